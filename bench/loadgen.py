"""The load generator: many SMTP sessions at once from one lean process.

    python -m bench.loadgen SPEC_JSON

Theory of operation
-------------------
The client must cost less CPU than the servers it measures, so it is not
built on asyncio: each session is a generator that runs until a
non-blocking socket call would block, then yields ``(fd, event)``; a
`selectors` loop resumes it when the socket is ready. Sockets stay
registered between waits and are modified only when the awaited event
changes, so most waits cost one epoll_wait and nothing else. TLS is
pyOpenSSL on the non-blocking socket itself (no memory BIOs), with
certificate checks off (as most sending MTAs do: opportunistic TLS).
pyOpenSSL rather than the standard library's `ssl` because its OpenSSL
(the one bundled with `cryptography`) is often newer than the system's, and
OpenSSL 3.0, the system's on Debian 12, spends most of a client handshake
decoding the server's certificate.

A run keeps `concurrency` sessions going: each slot starts a new session as
soon as its last one ends. Sessions ending in the warm-up are not counted;
after it the process prints ``measuring`` (the caller samples the server's
CPU then), counts for `duration` seconds, prints ``done``, and finally one
JSON line of results, including its own CPU time, to show whether the
client itself was the limit.

Modes: ``plain`` (EHLO, MAIL, RCPT, DATA, QUIT in clear), ``starttls``
(EHLO, STARTTLS, handshake, EHLO, then the same), ``implicit`` (handshake
first). ``resume`` offers each slot's last TLS session for resumption.
``idle`` opens `concurrency` sessions up to the EHLO reply after TLS, prints
``ready``, and holds them until a line arrives on standard input.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import selectors
import socket
import sys
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
Wait = tuple[int, int]  # (fd, event)
Task = Generator[Wait, None, None]
_CHUNK = 65536


@dataclass
class Spec:
    host: str
    port: int
    mode: str  # plain | starttls | implicit
    concurrency: int = 1
    size: int = 10240  # message body bytes
    messages: int = 1  # messages per session
    resume: bool = False
    duration: float = 5.0
    warmup: float = 1.0
    idle: bool = False
    timeout: float = 60.0  # idle: how long all sessions may take to get parked
    groups: str = "X25519"  # TLS key exchange groups offered


@dataclass
class Result:
    sessions: int = 0
    messages: int = 0
    body_bytes: int = 0
    errors: int = 0
    resumed: int = 0
    tls_sessions: int = 0
    wall: float = 0.0
    cpu: float = 0.0  # this process's user + system seconds in the window
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


class SessionError(Exception):
    pass


def make_message(size: int) -> bytes:
    """A message of about `size` body bytes, CRLF lines of 78 octets, ending in CRLF.CRLF."""
    head = b"From: a@bench.example\r\nTo: b@bench.example\r\nSubject: bench\r\n\r\n"
    line = b"X" * 76 + b"\r\n"
    body = line * max(1, size // len(line))
    return head + body + b".\r\n"


def client_context(groups: str = "X25519") -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)  # keep TLS 1.3 tickets for resumption
    # X25519 alone: what every server here (OpenSSL 3.0 included) would pick,
    # so each does the same key exchange. OpenSSL 3.5+ would otherwise offer
    # a post-quantum hybrid only the newer servers can take.
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:
        raise ValueError(f"unknown TLS groups {groups!r}")
    return ctx


class Conn:
    """One client connection: a buffered reply reader over a plain or TLS socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tls: SSL.Connection | None = None
        self.fd = sock.fileno()
        self.buffer = b""

    def close(self) -> None:
        if self.tls is not None:
            # close_notify: without it OpenSSL marks the session not resumable
            with contextlib.suppress(SSL.Error):
                self.tls.shutdown()
        self.sock.close()

    def _recv(self) -> Generator[Wait, None, bytes]:
        while True:
            try:
                data = self.tls.recv(_CHUNK) if self.tls else self.sock.recv(_CHUNK)
            except (BlockingIOError, SSL.WantReadError):
                yield self.fd, READ
                continue
            except SSL.WantWriteError:
                yield self.fd, WRITE
                continue
            except SSL.Error as exc:
                raise SessionError(f"TLS: {exc!r}") from None
            if not data:
                raise SessionError("connection closed by server")
            return data

    def reply(self) -> Generator[Wait, None, bytes]:
        """One complete (possibly multi-line) reply."""
        while True:
            start = 0
            while True:
                lf = self.buffer.find(b"\n", start)
                if lf < 0:
                    break
                if self.buffer[start + 3 : start + 4] != b"-":
                    reply, self.buffer = self.buffer[: lf + 1], self.buffer[lf + 1 :]
                    return reply
                start = lf + 1
            self.buffer += yield from self._recv()

    def expect(self, code: bytes) -> Generator[Wait, None, bytes]:
        reply = yield from self.reply()
        if not reply.startswith(code):
            raise SessionError(f"expected {code.decode()}, got {reply[:60]!r}")
        return reply

    def send(self, data: bytes) -> Generator[Wait, None, None]:
        view = memoryview(data)
        while view:
            chunk = view[:_CHUNK]
            try:
                sent = self.tls.send(chunk) if self.tls else self.sock.send(chunk)
            except (BlockingIOError, SSL.WantWriteError):
                yield self.fd, WRITE
                continue
            except SSL.WantReadError:
                yield self.fd, READ
                continue
            except SSL.Error as exc:
                raise SessionError(f"TLS: {exc!r}") from None
            view = view[sent:]

    def command(self, line: bytes, code: bytes) -> Generator[Wait, None, bytes]:
        yield from self.send(line)
        return (yield from self.expect(code))

    def start_tls(
        self, ctx: SSL.Context, session: SSL.Session | None
    ) -> Generator[Wait, None, SSL.Connection]:
        if self.buffer:
            raise SessionError("bytes after the STARTTLS reply")
        tls = SSL.Connection(ctx, self.sock)
        tls.set_connect_state()
        tls.set_tlsext_host_name(b"localhost")
        if session is not None:
            tls.set_session(session)
        self.tls = tls
        while True:
            try:
                tls.do_handshake()
            except SSL.WantReadError:
                yield self.fd, READ
            except SSL.WantWriteError:
                yield self.fd, WRITE
            except SSL.Error as exc:
                raise SessionError(f"TLS handshake: {exc!r}") from None
            else:
                return tls


def session_reused(tls: SSL.Connection) -> bool:
    return bool(_lib.SSL_session_reused(tls._ssl))


def connect(host: str, port: int) -> Generator[Wait, None, socket.socket]:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = sock.connect_ex((host, port))
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise SessionError(f"connect: {os.strerror(err)}")
    if err:
        yield sock.fileno(), WRITE
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            raise SessionError(f"connect: {os.strerror(err)}")
    return sock


class Runner:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.ctx = client_context(spec.groups)
        self.message = make_message(spec.size)
        self.result = Result()
        self.counting = False
        self.stopping = False
        self.parked = 0
        self.sessions: list[SSL.Session | None] = [None] * spec.concurrency
        self.sel = selectors.DefaultSelector()
        self.tasks: dict[int, Task] = {}  # slot -> its task
        self.waiting: dict[int, Wait] = {}  # slot -> the (fd, event) registered for it
        self.sleepers: list[tuple[float, int]] = []  # (monotonic time, slot) to resume

    # -- one session -----------------------------------------------------------

    def session(self, slot: int) -> Generator[Wait, None, None]:
        spec = self.spec
        started = time.perf_counter()
        sock = yield from connect(spec.host, spec.port)
        conn = Conn(sock)
        try:
            reuse = self.sessions[slot] if spec.resume else None
            if spec.mode == "implicit":
                yield from conn.start_tls(self.ctx, reuse)
            yield from conn.expect(b"220")
            yield from conn.command(b"EHLO client.bench\r\n", b"250")
            if spec.mode == "starttls":
                yield from conn.command(b"STARTTLS\r\n", b"220")
                yield from conn.start_tls(self.ctx, reuse)
                yield from conn.command(b"EHLO client.bench\r\n", b"250")
            if spec.idle:
                self.parked += 1
                while True:
                    yield conn.fd, READ  # held open; never resumed until the end
            for _ in range(spec.messages):
                yield from conn.command(b"MAIL FROM:<a@bench.example>\r\n", b"250")
                yield from conn.command(b"RCPT TO:<b@bench.example>\r\n", b"250")
                yield from conn.command(b"DATA\r\n", b"354")
                yield from conn.command(self.message, b"250")
                if self.counting:
                    self.result.messages += 1
                    self.result.body_bytes += len(self.message)
            yield from conn.command(b"QUIT\r\n", b"221")
            if conn.tls is not None:
                if spec.resume:
                    self.sessions[slot] = conn.tls.get_session()
                if self.counting:
                    self.result.tls_sessions += 1
                    self.result.resumed += session_reused(conn.tls)
            if self.counting:
                self.result.sessions += 1
                self.result.latencies.append(time.perf_counter() - started)
        finally:
            self.forget(slot)
            conn.close()

    def slot_loop(self, slot: int) -> Task:
        while not self.stopping:
            started = time.monotonic()
            try:
                yield from self.session(slot)
            except (SessionError, OSError) as exc:
                self.forget(slot)
                if self.counting:
                    self.result.errors += 1
                    if len(self.result.error_samples) < 5:
                        self.result.error_samples.append(f"{type(exc).__name__}: {exc}")
                if self.spec.idle:
                    return
                # back off a little, or a refusing server turns into a busy loop
                if time.monotonic() - started < 0.01:
                    yield -1, 0

    # -- the loop ---------------------------------------------------------------

    def advance(self, slot: int) -> None:
        """Run a slot's task until it waits, and (re)register what it waits for."""
        try:
            fd, event = next(self.tasks[slot])
        except StopIteration:
            self.forget(slot)
            del self.tasks[slot]
            return
        if fd < 0:
            self.forget(slot)
            self.sleepers.append((time.monotonic() + 0.05, slot))
            return
        old = self.waiting.get(slot)
        if old == (fd, event):
            return
        if old is not None and old[0] == fd:
            self.sel.modify(fd, event, slot)
        else:
            self.forget(slot)
            self.sel.register(fd, event, slot)
        self.waiting[slot] = (fd, event)

    def forget(self, slot: int) -> None:
        """Drop a slot's registration; done before its socket closes (fds are reused)."""
        old = self.waiting.pop(slot, None)
        if old is not None:
            self.sel.unregister(old[0])

    def run(self) -> Result:
        spec = self.spec
        for slot in range(spec.concurrency):
            self.tasks[slot] = self.slot_loop(slot)
            self.advance(slot)
        t0 = time.monotonic()
        warm_end = t0 + (0 if spec.idle else spec.warmup)
        end = warm_end + spec.duration
        cpu0 = 0.0
        while self.tasks:
            now = time.monotonic()
            if spec.idle:
                if self.parked >= len(self.tasks) or now - t0 > spec.timeout:
                    break
            elif not self.counting and now >= warm_end:
                self.counting = True
                cpu0 = _cpu()
                print("measuring", flush=True)
            elif self.counting and now >= end:
                break
            if self.sleepers:
                due = [s for s in self.sleepers if s[0] <= now]
                for item in due:
                    self.sleepers.remove(item)
                    if item[1] in self.tasks:
                        self.advance(item[1])
            for key, _ in self.sel.select(timeout=0.05):
                slot = key.data
                if slot in self.tasks:
                    self.advance(slot)
        self.result.wall = spec.duration
        self.result.cpu = _cpu() - cpu0
        if spec.idle:
            self.result.sessions = self.parked
            print("ready", flush=True)
            sys.stdin.readline()
        else:
            print("done", flush=True)
        self.stopping = True
        for task in self.tasks.values():
            task.close()  # each session's `finally` unregisters and closes its socket
        self.sel.close()
        return self.result


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = Spec(**json.loads(args[0]))
    result = Runner(spec).run()
    out = asdict(result)
    latencies = out.pop("latencies")
    out["p50"] = percentile(latencies, 0.50)
    out["p99"] = percentile(latencies, 0.99)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
