"""Starting an exec backend's program, and reaping it.

Theory of operation
-------------------
A backend program starts for every session with mail, so its start is paid
per message. `subprocess.Popen` does most of its work in Python (argument
checks, its own error pipe, the environment encoded entry by entry, a lock
around waitpid): about 190,000 instructions per start and reap, measured
with callgrind. `os.posix_spawn` does the same in C, and glibc starts the
child as vfork does (the child borrows tlsfront's memory until it execs):
about 40,000, and no copy of tlsfront's page tables either.

What Popen did that posix_spawn is told to do:

* **The program's path** is looked up in the backend's own `PATH` (the one
  in its environment, as Popen and execvpe do), not tlsfront's, which is
  what `os.posix_spawnp` would search.
* **Signals.** Python ignores SIGPIPE and SIGXFSZ, and an ignored signal
  stays ignored across exec: both are reset to their defaults in the child
  (Popen's `restore_signals`), so qmail-smtpd dies of a broken pipe as it
  does under tcpserver. Handlers are reset by exec itself; the signal mask
  is inherited, as with Popen.
* **Descriptors.** Popen closes every descriptor but 0-2 in the child;
  posix_spawn has no such action in Python 3.11. Instead no descriptor of
  tlsfront survives an exec: those Python opens are close-on-exec (PEP
  446), the sockets tlsfront receives or hands to its workers are marked so
  where they come in, and whatever tlsfront inherited at start (from a
  shell, a supervisor) is marked so once, before the first program starts
  (`seal_descriptors`). A descriptor below 3 among the child's ends (tlsfront
  started with 0-2 closed) would need its close-on-exec flag cleared, which
  not every C library's dup2 action does: Popen starts that one.

A program that must run as another account than tlsfront's (tlsfront kept
root, the profile names a `user`) needs setgroups, setgid and setuid in the
child between fork and exec, which posix_spawn cannot do: Popen starts it.

The exit is awaited through a pidfd (valid even once the child is a
zombie), as trio does, then collected with one waitpid; where the kernel
has no pidfds, by looking at growing intervals.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
from collections.abc import Mapping, Sequence

import trio

from tlsfront.config.account import Account

# Ignored by Python, and ignored dispositions survive exec (see the module doc).
_DEFAULT_IN_CHILD = (signal.SIGPIPE, signal.SIGXFSZ)


class Child:
    """A started program: its pid, and its exit status once it is reaped.

    `returncode` is None while it runs, then its exit status (negative: the
    signal that killed it), as Popen's.
    """

    __slots__ = ("_popen", "pid", "returncode")

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._popen = popen

    def poll(self) -> int | None:
        """Reap it if it has exited, without waiting; its status or None."""
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.poll()
            else:
                self._collect(os.WNOHANG)
        return self.returncode

    async def wait(self) -> int:
        """Wait for it to exit; its status."""
        if self.poll() is None:
            try:
                pidfd = os.pidfd_open(self.pid)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                return await self._poll_until_exit()
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            if self._popen is not None:
                self.returncode = self._popen.wait()
            else:
                self._collect(0)
        assert self.returncode is not None
        return self.returncode

    async def _poll_until_exit(self) -> int:
        """Without pidfds (Linux before 5.3, valgrind): look at growing intervals."""
        delay = 0.001
        while (status := self.poll()) is None:
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)
        return status

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # gone already
                os.kill(self.pid, signal.SIGKILL)

    def _collect(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere: its status is lost
            self.returncode = 255
            return
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    stdio: tuple[int, int, int],
    account: Account | None = None,
) -> Child:
    """Start `argv` with `env`, the three descriptors as its stdin, stdout, stderr.

    `account`: the uid/gid it must run as when tlsfront's own differ (then
    tlsfront must be root). Raises OSError when the program cannot start.
    """
    if account is not None and os.geteuid() == 0 and not runs_as(account):
        return _popen(argv, env, stdio, account)
    if min(stdio) < 3:
        return _popen(argv, env, stdio, None)
    seal_descriptors()
    path = find_program(argv[0], env)
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
    pid = os.posix_spawn(path, list(argv), env, file_actions=actions, setsigdef=_DEFAULT_IN_CHILD)
    return Child(pid)


def _popen(
    argv: Sequence[str],
    env: Mapping[str, str],
    stdio: tuple[int, int, int],
    account: Account | None,
) -> Child:
    popen = subprocess.Popen(
        list(argv),
        stdin=stdio[0],
        stdout=stdio[1],
        stderr=stdio[2],
        env=dict(env),
        close_fds=True,
        user=None if account is None else account.uid,
        group=None if account is None else account.gid,
        extra_groups=None if account is None else [],
    )
    return Child(popen.pid, popen)


def find_program(name: str, env: Mapping[str, str]) -> str:
    """`name` as execvpe finds it in `env`'s PATH; OSError when it would fail.

    A name with a slash is taken as it is. Otherwise the first executable
    regular file in the PATH's directories wins; a match that is not
    executable is remembered (EACCES) and the search goes on.
    """
    if os.sep in name:
        return name
    denied = False
    for directory in os.get_exec_path(env):
        candidate = os.path.join(directory, name)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK):
            return candidate
        denied = True
    code = errno.EACCES if denied else errno.ENOENT
    raise OSError(code, os.strerror(code), name)


_sealed = False  # whether this process has sealed its descriptors


def _forget_seal() -> None:
    global _sealed
    _sealed = False


os.register_at_fork(after_in_child=_forget_seal)  # a worker looks at its own once


def seal_descriptors() -> None:
    """Make every descriptor above 2 close-on-exec, once per process (module doc)."""
    global _sealed
    if _sealed:
        return
    try:
        fds = [int(entry) for entry in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: every possible number
        fds = list(range(3, min(os.sysconf("SC_OPEN_MAX"), 1 << 16)))
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own descriptor, gone by now
                os.set_inheritable(fd, False)
    _sealed = True


def runs_as(account: Account) -> bool:
    """Whether this process has exactly `account`'s credentials and group set."""
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (
        account.uid,
        account.uid,
        account.gid,
        account.gid,
    ):
        return False
    return set(os.getgroups()) <= {account.gid}


__all__ = ["Child", "find_program", "runs_as", "seal_descriptors", "spawn"]
