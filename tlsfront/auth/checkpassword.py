"""The checkpassword interface, as qmail programs run it (vchkpw and kin).

Theory of operation
-------------------
`auth_checkpassword = ["/home/vpopmail/bin/vchkpw", "/bin/true"]` names the
program and its arguments; by the convention, the program checks the
password and on success runs the rest of its argv (here `/bin/true`), whose
exit status becomes its own. tlsfront writes `user NUL password NUL
timestamp NUL` to a pipe that the program finds as file descriptor 3 (the
timestamp is empty: PLAIN and LOGIN have none), and reads the verdict from
the exit status: 0 good, 1 bad, anything else (111 by the convention, a
signal, a program that cannot start) a temporary failure.

The program gets exactly the environment it is given (the session's UCSPI
variables) on /dev/null for stdin and stdout; its stderr is collected, with
the password cut out, to explain a temporary failure in the log. It runs in
a process group of its own, as `uid`/`gid` with no supplementary groups when
those are set (what `setuidgid` does), and when it outlives the timeout the
whole group is killed and the verdict is a temporary failure.

File descriptor 3 is arranged by `/bin/sh` (the pipe is its stdin, which it
moves to 3 before it replaces itself with the program by `exec`): the other
way to place a descriptor at a fixed number in a child (`preexec_fn`) is
unsafe in a process with threads.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
from collections.abc import Mapping, Sequence

import trio

from tlsfront.auth.sasl import Credentials
from tlsfront.auth.verifier import AuthResult, Verdict

# checkpassword programs read at most 512 bytes from descriptor 3.
MAX_INPUT = 512
MAX_STDERR = 1024
DEFAULT_TIMEOUT = 30.0
SHELL = "/bin/sh"
# The pipe arrives as stdin; the program gets it as descriptor 3, and /dev/null
# as stdin. (A shell can name only descriptors 0 to 9 in a redirection.)
_MOVE_STDIN_TO_3 = 'exec "$@" 3<&0 0</dev/null'


class CheckpasswordVerifier:
    """Runs a checkpassword program for each login."""

    name = "checkpassword"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        if len(argv) < 2:
            raise ValueError("a checkpassword command needs the program to run on success")
        if (uid is None) != (gid is None):
            raise ValueError("give both uid and gid, or neither")
        self.argv = list(argv)
        self.timeout = timeout
        self.uid = uid
        self.gid = gid

    @classmethod
    def as_user(
        cls, argv: Sequence[str], user: str, *, timeout: float = DEFAULT_TIMEOUT
    ) -> CheckpasswordVerifier:
        """Runs as the named account's uid and gid, as `setuidgid user` does."""
        entry = pwd.getpwnam(user)  # KeyError for an unknown user
        return cls(argv, timeout=timeout, uid=entry.pw_uid, gid=entry.pw_gid)

    async def verify(self, creds: Credentials, env: Mapping[str, str]) -> AuthResult:
        password = creds.password.reveal()
        data = bytearray(creds.user.encode() + b"\0" + password + b"\0\0")
        try:
            if len(data) > MAX_INPUT:
                return AuthResult(Verdict.BAD, creds.user, "credentials too long")
            return await self._run(creds.user, data, password, env)
        finally:
            data[:] = bytes(len(data))

    async def _run(
        self, user: str, data: bytearray, password: bytes, env: Mapping[str, str]
    ) -> AuthResult:
        readable, writable = os.pipe()
        try:
            os.write(writable, data)  # far below a pipe's capacity: never blocks
        finally:
            os.close(writable)
        stderr = b""
        try:
            with trio.move_on_after(self.timeout) as scope:
                result = await trio.run_process(
                    [SHELL, "-c", _MOVE_STDIN_TO_3, "checkpassword", *self.argv],
                    stdin=readable,
                    stdout=subprocess.DEVNULL,
                    capture_stderr=True,
                    check=False,
                    env=dict(env),
                    process_group=0,
                    deliver_cancel=_kill_group,
                    user=self.uid,
                    group=self.gid,
                    extra_groups=None if self.gid is None else [],
                )
                stderr = result.stderr[:MAX_STDERR]
        except OSError as exc:
            return AuthResult(Verdict.TEMPFAIL, user, f"cannot run {self.argv[0]}: {exc}")
        finally:
            os.close(readable)
        if scope.cancelled_caught:
            return AuthResult(Verdict.TEMPFAIL, user, f"{self.argv[0]} timed out")
        if result.returncode == 0:
            return AuthResult(Verdict.GOOD, user)
        if result.returncode == 1:
            return AuthResult(Verdict.BAD, user)
        why = f"{self.argv[0]} exited {_status(result.returncode)}"
        text = _redact(stderr, password)
        return AuthResult(Verdict.TEMPFAIL, user, f"{why}: {text}" if text else why)


async def _kill_group(process: trio.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _status(returncode: int) -> str:
    if returncode < 0:
        return f"on signal {-returncode}"
    return str(returncode)


def _redact(stderr: bytes, password: bytes) -> str:
    if password:
        stderr = stderr.replace(password, b"<secret>")
    text = stderr.decode("utf-8", "replace").strip()
    return " ".join(text.split())[:200]


__all__ = ["DEFAULT_TIMEOUT", "CheckpasswordVerifier"]
