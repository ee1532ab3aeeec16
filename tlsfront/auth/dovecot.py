"""A client of Dovecot's authentication socket (`auth_dovecot`).

Theory of operation
-------------------
Dovecot's auth service speaks a line protocol on a Unix socket (by default
`/run/dovecot/auth-client`), the one Postfix and Exim use for SASL. The
client says `VERSION 1 2` and `CPID <pid>`; the server answers with its
`VERSION`, one `MECH` line per mechanism, `SPID`, `CUID`, `COOKIE` and
`DONE`. Each login is then one request, `AUTH <id> PLAIN service=smtp ...
resp=<base64>`, answered by `OK <id> user=...` (good), `FAIL <id> ...`
(bad, or a temporary failure when it carries `code=temp_fail` or the older
`temp`) or `CONT <id> <challenge>` (more rounds, which PLAIN never needs).
Fields are separated by tabs; a tab, newline or 0x01 inside a value is
escaped as 0x01 followed by `t`, `n` or `1`.

Whatever the client's own mechanism (PLAIN or LOGIN), tlsfront has the user
and password by then, so it always asks Dovecot with PLAIN; the `nologin`
flag says no mail-store login follows, and `secured` is sent when the session
is inside TLS (`SSL_PROTOCOL` in its environment).

One connection serves all the sessions of a process. Requests are
multiplexed on it by id: a reader task (in the verifier's own nursery) reads
the replies and wakes the request each belongs to. When the connection
breaks, every request in flight gets TEMPFAIL and the next request opens a
new connection. A request that gets no answer within `timeout` (connection
and handshake included) is a TEMPFAIL too; its late answer is dropped.
"""

from __future__ import annotations

import base64
import itertools
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import trio

from tlsfront.auth.sasl import Credentials
from tlsfront.auth.verifier import AuthResult, Verdict

DEFAULT_SOCKET = "/run/dovecot/auth-client"
DEFAULT_TIMEOUT = 30.0
MAX_LINE = 65536
_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\n": "\x01n", "\r": "\x01r"}
_UNESCAPES = {"1": "\x01", "t": "\t", "n": "\n", "r": "\r"}


def escape(value: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in value)


def unescape(value: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for c in chars:
        out.append(_UNESCAPES.get(next(chars, ""), "") if c == "\x01" else c)
    return "".join(out)


class ConnectionBroken(Exception):
    """The socket failed, closed, or spoke something else than the protocol."""


class _Connection:
    def __init__(self) -> None:
        self.ready = trio.Event()  # set when the handshake is done, or it failed
        self.broken = False
        self.why = ""
        self.mechanisms: set[str] = set()
        self.stream: trio.SocketStream | None = None
        self.pending: dict[int, _Waiter] = {}

    def fail(self, why: str) -> None:
        if self.broken:
            return
        self.broken = True
        self.why = why
        self.ready.set()
        for waiter in self.pending.values():
            waiter.set(None)
        self.pending.clear()


class _Waiter:
    def __init__(self) -> None:
        self.event = trio.Event()
        self.fields: list[str] | None = None

    def set(self, fields: list[str] | None) -> None:
        self.fields = fields
        self.event.set()


class DovecotVerifier:
    """Checks passwords through a Dovecot auth socket; use via `open_dovecot`."""

    name = "dovecot"

    def __init__(
        self,
        nursery: trio.Nursery,
        path: str = DEFAULT_SOCKET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        service: str = "smtp",
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.service = service
        self._nursery = nursery
        self._connection: _Connection | None = None
        self._ids = itertools.count(1)
        self._send_lock = trio.Lock()
        self.connections = 0  # how many were opened (for tests and metrics)

    async def verify(self, creds: Credentials, env: Mapping[str, str]) -> AuthResult:
        message = b"\0".join([creds.authzid.encode(), creds.user.encode(), creds.password.reveal()])
        resp = base64.b64encode(message).decode()
        with trio.move_on_after(self.timeout):
            return await self._request(creds.user, resp, env)
        return AuthResult(Verdict.TEMPFAIL, creds.user, "dovecot auth timed out")

    async def _request(self, user: str, resp: str, env: Mapping[str, str]) -> AuthResult:
        connection = self._current()
        await connection.ready.wait()
        if connection.broken:
            return AuthResult(Verdict.TEMPFAIL, user, connection.why)
        if "PLAIN" not in connection.mechanisms:
            return AuthResult(Verdict.TEMPFAIL, user, "dovecot does not offer PLAIN")
        request_id = next(self._ids)
        waiter = connection.pending[request_id] = _Waiter()
        try:
            line = "\t".join(["AUTH", str(request_id), "PLAIN", *_parameters(self, env)])
            try:
                async with self._send_lock:
                    assert connection.stream is not None
                    await connection.stream.send_all(f"{line}\tresp={resp}\n".encode())
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                connection.fail(f"dovecot auth socket: {exc}")
            await waiter.event.wait()
        finally:
            connection.pending.pop(request_id, None)
        return _result(user, waiter.fields, connection.why)

    def _current(self) -> _Connection:
        if self._connection is None or self._connection.broken:
            self._connection = _Connection()
            self.connections += 1
            self._nursery.start_soon(self._run, self._connection)
        return self._connection

    async def _run(self, connection: _Connection) -> None:
        try:
            stream = await trio.open_unix_socket(self.path)
        except OSError as exc:
            connection.fail(f"cannot connect to {self.path}: {exc.strerror or exc}")
            return
        connection.stream = stream
        try:
            async with stream:
                await stream.send_all(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
                async for fields in _lines(stream):
                    _dispatch(connection, fields)
            connection.fail("dovecot closed the auth socket")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            connection.fail(f"dovecot auth socket: {exc}")
        except ConnectionBroken as exc:
            connection.fail(str(exc))
        finally:
            connection.fail("dovecot auth connection closed")


def _parameters(verifier: DovecotVerifier, env: Mapping[str, str]) -> list[str]:
    params = [f"service={escape(verifier.service)}", "nologin"]
    for key, var in (
        ("lip", "TCPLOCALIP"),
        ("rip", "TCPREMOTEIP"),
        ("lport", "TCPLOCALPORT"),
        ("rport", "TCPREMOTEPORT"),
    ):
        if env.get(var):
            params.append(f"{key}={escape(env[var])}")
    if env.get("SSL_PROTOCOL"):
        params.append("secured")
    return params


def _dispatch(connection: _Connection, fields: list[str]) -> None:
    kind = fields[0]
    if not connection.ready.is_set():
        if kind == "VERSION":
            if len(fields) < 2 or fields[1] != "1":
                raise ConnectionBroken(f"dovecot auth protocol version {fields[1:]}")
        elif kind == "MECH" and len(fields) >= 2:
            connection.mechanisms.add(fields[1].upper())
        elif kind == "DONE":
            connection.ready.set()
        return
    if kind in ("OK", "FAIL", "CONT") and len(fields) >= 2 and fields[1].isdigit():
        waiter = connection.pending.pop(int(fields[1]), None)
        if waiter is not None:  # else: a request that timed out
            waiter.set(fields)


def _result(user: str, fields: list[str] | None, why: str) -> AuthResult:
    if fields is None:
        return AuthResult(Verdict.TEMPFAIL, user, why)
    args = dict(f.partition("=")[::2] for f in fields[2:])
    known = unescape(args.get("user", "")) or user
    if fields[0] == "OK":
        return AuthResult(Verdict.GOOD, known)
    if fields[0] == "FAIL":
        if "temp" in args or args.get("code") == "temp_fail":
            reason = unescape(args.get("reason", ""))
            return AuthResult(Verdict.TEMPFAIL, known, reason or "dovecot: temporary failure")
        return AuthResult(Verdict.BAD, known)
    return AuthResult(Verdict.TEMPFAIL, known, "dovecot asked for another round of PLAIN")


async def _lines(stream: trio.SocketStream) -> AsyncIterator[list[str]]:
    buffer = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffer += data
        *complete, buffer = buffer.split(b"\n")
        if len(buffer) > MAX_LINE:
            raise ConnectionBroken("an overlong line on the dovecot auth socket")
        for line in complete:
            yield line.decode("utf-8", "replace").split("\t")


@asynccontextmanager
async def open_dovecot(
    path: str = DEFAULT_SOCKET,
    *,
    request_timeout: float = DEFAULT_TIMEOUT,
    service: str = "smtp",
) -> AsyncIterator[DovecotVerifier]:
    """A verifier whose connection lives as long as the `async with` block."""
    async with trio.open_nursery() as nursery:
        verifier = DovecotVerifier(nursery, path, timeout=request_timeout, service=service)
        try:
            yield verifier
        finally:
            nursery.cancel_scope.cancel()


__all__ = ["DEFAULT_SOCKET", "DovecotVerifier", "escape", "open_dovecot", "unescape"]
