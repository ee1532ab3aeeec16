"""Backends: a program exec'd per session (the qmail way) or a TCP server.

Both look the same to the session: a byte stream with `send_all`,
`receive_some`, `send_eof` and `aclose`. The exec backend gets the UCSPI
environment `tcpserver` would give qmail-smtpd. Under `tlsfront run` it is
built from scratch, so nothing of tlsfront's own environment (a stray
RELAYCLIENT above all) reaches it except the names of `env_inherit`. Under
`tlsfront inetd`, tlsfront is one link of a UCSPI chain, as rblsmtpd is: the
environment it was started with (the run script's exports, the variables
tcpserver's rules set for this client) is the base, and tlsfront replaces
only the variables it owns (`is_owned`). RELAYCLIENT is never removed there:
tcpserver's rules saw the real client.

The program runs as the profile's `user`/`group` with no supplementary
groups. When tlsfront already runs as exactly that account (its workers
drop to it after start-up, tlsfront.ops.privileges) nothing changes at the
start and it is started by posix_spawn (tlsfront.inbound.spawn); otherwise
Popen switches the account in the child before the exec (setgroups,
setgid, setuid, as setuidgid does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import trio

from tlsfront.config.account import Account, resolve_account
from tlsfront.config.checks import is_owned
from tlsfront.config.schema import Profile
from tlsfront.inbound.spawn import Child, spawn
from tlsfront.inbound.stderr import StderrLog
from tlsfront.net.address import Address, is_ip, split_host_port
from tlsfront.net.netstream import NetStream, PipeStream

DEFAULT_PATH = "/var/qmail/bin:/usr/local/bin:/usr/bin:/bin"
# How long a backend may take to exit once its input is closed.
EXIT_GRACE = 10.0


class BackendError(Exception):
    """The backend could not be started or reached."""


# systemd's socket-passing variables describe tlsfront's own descriptors.
_NOT_PASSED = frozenset({"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})


def inherited_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What of `tlsfront inetd`'s own environment reaches its backends: all
    but the variables tlsfront owns and systemd's descriptor passing."""
    return {
        k: v
        for k, v in environ.items()
        if not is_owned(k) and k not in _NOT_PASSED and "=" not in k
    }


def chosen_environment(names: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """`env_inherit`: the named variables of tlsfront's own environment that are set."""
    return {name: environ[name] for name in names if name in environ}


def ucspi_environment(
    *,
    client: Address,
    local: Address,
    hostname: str,
    profile_env: Mapping[str, str],
    rules_env: Mapping[str, str],
    tls_env: Mapping[str, str],
    relay: bool,
    inherited: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one backend session, lowest precedence first.

    What tlsfront inherited (`inherited_environment` under inetd,
    `env_inherit` under run), the profile's `env` and the tcprules variables
    come first; the UCSPI variables follow so that none of them can misstate
    the client's address; the TLS variables and the relay decision come
    last. Under run RELAYCLIENT is set only by a rule or by a certificate
    that authorizes relaying.
    """
    env = {"PATH": DEFAULT_PATH}
    if inherited:
        env.update(inherited)
    env.update(profile_env)
    env.update(rules_env)
    env.update(
        PROTO="TCP",
        TCPLOCALIP=local.ip,
        TCPLOCALPORT=str(local.port),
        TCPLOCALHOST=hostname,
        TCPREMOTEIP=client.ip,
        TCPREMOTEPORT=str(client.port),
    )
    env.update(tls_env)
    if relay:
        env["RELAYCLIENT"] = ""
    return env


class ExecBackend:
    """A backend program connected by pipes, like tcpserver runs qmail-smtpd.

    Started in the event loop's own thread (tlsfront.inbound.spawn: the
    child borrows tlsfront's memory until it execs, so the loop pauses well
    under a millisecond), where `trio.lowlevel.open_process` pays a thread
    hand-off per program. The pipes are `PipeStream`s, and the exit is
    awaited through a pidfd, as trio does.
    """

    def __init__(
        self,
        process: Child,
        stdin: PipeStream,
        stdout: PipeStream,
        stderr: StderrLog,
    ) -> None:
        self.process = process
        self._stdin = stdin
        self._stdout = stdout
        self.stderr = stderr  # logged line by line (tlsfront.inbound.stderr)
        self._eof_sent = False
        # The pipe's own method: a session idle on its backend waits one
        # coroutine frame less.
        self.receive_some: Receive = stdout.receive_some

    @classmethod
    async def start(
        cls, argv: Sequence[str], env: Mapping[str, str], account: Account | None = None
    ) -> ExecBackend:
        child_in, to_child = os.pipe()  # both ends close-on-exec; the child's are dup'd
        from_child, child_out = os.pipe()
        errors, child_err = os.pipe()
        try:
            process = spawn(argv, env, (child_in, child_out, child_err), account)
        except OSError as exc:
            for fd in (to_child, from_child, errors):
                os.close(fd)
            raise BackendError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
        finally:
            for fd in (child_in, child_out, child_err):
                os.close(fd)
        # No checkpoint: the start never waits, and a pass through the
        # scheduler costs a session at concurrency 1 about as much as the
        # spawn itself.
        stderr = StderrLog(errors, process.pid)
        return cls(process, PipeStream(to_child), PipeStream(from_child), stderr)

    @property
    def description(self) -> str:
        return f"pid {self.process.pid}"

    async def send_all(self, data: bytes) -> None:
        await self._stdin.send_all(data)

    async def send_eof(self) -> None:
        self._close_input()  # closing a pipe never waits (no checkpoint, as in start)

    def _close_input(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            self._stdin.close()

    async def wait(self) -> int:
        """Wait for the program to exit; its status (negative: killed by that signal)."""
        return await self.process.wait()

    async def aclose(self) -> int | None:
        """Close its input, give it EXIT_GRACE to exit, then kill it.

        Returns the exit status (negative: killed by that signal). A program
        that has already exited (it answered QUIT) is reaped without a pass
        through the scheduler; otherwise the wait is shielded from the
        session's cancellation, bounded by EXIT_GRACE alone.
        """
        self._close_input()
        process = self.process
        if process.poll() is None:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + EXIT_GRACE):
                await process.wait()
            if process.poll() is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
        self._stdout.close()
        self.stderr.drain()
        return process.returncode


class TCPBackend:
    """A plaintext SMTP server reached over TCP (qmail-smtpd under tcpserver)."""

    def __init__(self, stream: NetStream, target: str) -> None:
        self._stream = stream
        self._eof_sent = False
        self.description = target
        self.receive_some: Receive = stream.receive_some  # as above

    @classmethod
    async def connect(cls, target: str, source_address: str | None = None) -> TCPBackend:
        host, port = split_host_port(target)
        try:
            stream: NetStream
            if source_address is None and not is_ip(host):
                stream = NetStream.adopt(await trio.open_tcp_stream(host, port))
            else:
                # one address: no happy-eyeballs tasks, which cost a session measurable CPU
                stream = await NetStream.connect(host, port, source_address)
        except OSError as exc:
            raise BackendError(f"cannot connect to {target}: {exc}") from exc
        return cls(stream, target)

    async def send_all(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def send_eof(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.send_eof()

    async def aclose(self) -> int | None:
        self._stream.close()  # never waits, so needs no shield from cancellation
        return None


class Receive(Protocol):
    """A stream's `receive_some`, the size optional."""

    def __call__(self, max_bytes: int = ..., /) -> Awaitable[bytes]: ...


class Backend(Protocol):
    """What a session needs of a backend connection."""

    async def send_all(self, data: bytes) -> None: ...
    @property
    def receive_some(self) -> Receive: ...
    async def send_eof(self) -> None: ...
    async def aclose(self) -> int | None: ...


BackendStarter = Callable[[Profile, Mapping[str, str], bool], Awaitable[Backend]]


def backend_account(profile: Profile) -> Account | None:
    """The account the profile's backends run as; None: tlsfront's own."""
    if profile.user is None:
        return None
    return resolve_account(profile.user, profile.group)  # checked when loaded


async def start_backend(profile: Profile, env: Mapping[str, str], relay: bool) -> Backend:
    """Exec the profile's program, or connect to its TCP backend.

    Over TCP the relay decision cannot travel in an environment: an
    authorized session goes to `relay_backend_connect` and/or from
    `relay_source_address`, whose tcprules at the backend grant RELAYCLIENT.
    A session is authorized when an exec backend would have had RELAYCLIENT:
    by its certificate, or by a RELAYCLIENT line of the profile's own `rules`.
    """
    if profile.backend:
        return await ExecBackend.start(profile.backend, env, backend_account(profile))
    assert profile.backend_connect is not None
    relay = relay or "RELAYCLIENT" in env
    target = (profile.relay_backend_connect if relay else None) or profile.backend_connect
    source = (profile.relay_source_address if relay else None) or profile.source_address
    return await TCPBackend.connect(target, source)
