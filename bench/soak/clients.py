"""The soak's clients: one SMTP session at a time, well-behaved or faulty.

Plain blocking sockets and the standard library's ``ssl``, one thread per
client; every socket has a timeout, so a server that stops answering shows up
as a ``hung`` session instead of a stuck soak. Each session is one of
:data:`KINDS`:

- ``clean``: 1 to 3 messages, then QUIT;
- ``slow``: as clean, with pauses between commands and the body in small
  pieces (always faster than the server's minimum data rate);
- ``vanish-data``: goes away in the middle of a body;
- ``vanish-dot``: goes away right after the final dot, without reading the reply;
- ``vanish-handshake``: sends part of a ClientHello and goes away;
- ``garbage``: binary noise instead of commands (or instead of a ClientHello);
- ``die-backend``: one message goes to the recipient that makes the backend
  die in its body.

TLS sessions sometimes present a client certificate, so the relay decision
(whose list the soak rewrites under load) is taken on live sessions.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import struct
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

from bench.soak.check import Sent
from bench.soak.messages import MAX_LINE, Pool, body_size, make_message

KINDS = {
    "clean": 0.70,
    "slow": 0.05,
    "vanish-data": 0.06,
    "vanish-dot": 0.05,
    "vanish-handshake": 0.04,
    "garbage": 0.04,
    "die-backend": 0.06,
}
PROFILES = ("starttls", "implicit", "plain")
CLIENT_TIMEOUT = 60.0


class Closed(Exception):
    """The server closed the connection (or reset it)."""


class Hung(Exception):
    """The server let a read wait past the client's timeout."""


@dataclass
class Target:
    ports: dict[str, int]
    context: ssl.SSLContext  # no client certificate
    cert_context: ssl.SSLContext  # presents the soak's client certificate
    dot_max: int = MAX_LINE


@dataclass
class Tally:
    """What all clients saw, shared by their threads."""

    sent: list[Sent] = field(default_factory=list)
    sessions: Counter[str] = field(default_factory=Counter)
    cut: Counter[str] = field(default_factory=Counter)  # sessions the server ended early
    cut_reasons: Counter[str] = field(default_factory=Counter)
    cut_times: list[float] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the soak's own failures
    replies: Counter[str] = field(default_factory=Counter)  # final-dot replies by code
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sent: Sent) -> None:
        with self.lock:
            self.sent.append(sent)


class Conn:
    """A line-reading SMTP connection on a plain or TLS socket."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=CLIENT_TIMEOUT
        )
        self.buf = b""

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            if isinstance(exc, TimeoutError):
                raise Hung("send") from exc
            raise Closed(str(exc)) from exc

    def reply(self) -> tuple[int, bytes]:
        """One (possibly multi-line) reply: its code and its last line."""
        while True:
            line = self._line()
            if len(line) < 4 or line[3:4] != b"-":
                return (int(line[:3]) if line[:3].isdigit() else 0), line

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except TimeoutError as exc:
                raise Hung("read") from exc
            except (OSError, ssl.SSLError) as exc:
                raise Closed(str(exc)) from exc
            if not data:
                raise Closed("EOF")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r")

    def command(self, line: bytes, expect: int) -> None:
        self.send(line + b"\r\n")
        code, text = self.reply()
        if code != expect:
            raise Closed(f"{line!r}: {text!r}")

    def start_tls(self, context: ssl.SSLContext) -> None:
        try:
            self.sock = context.wrap_socket(self.sock)
        except TimeoutError as exc:
            raise Hung("handshake") from exc
        except (OSError, ssl.SSLError) as exc:
            raise Closed(str(exc)) from exc

    def vanish(self, rng: random.Random) -> None:
        """Goes away, by FIN or (half the time) by RST."""
        sock = self.sock
        if rng.random() < 0.5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if isinstance(sock, ssl.SSLSocket):  # no close_notify: the client simply vanishes
            sock = socket.socket(fileno=sock.detach())
        sock.close()

    def close(self) -> None:
        self.sock.close()


def partial_client_hello(context: ssl.SSLContext, rng: random.Random) -> bytes:
    """The first part of a real ClientHello, made on memory BIOs."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the ServerHello
        tls.do_handshake()
    hello = outgoing.read()
    return hello[: rng.randint(1, len(hello) - 1)]


class Client:
    """One client thread's sessions, until the deadline."""

    def __init__(self, number: int, seed: int, target: Target, tally: Tally) -> None:
        self.number = number
        self.rng = random.Random(f"{seed}-{number}")
        self.pool = Pool(self.rng)
        self.target = target
        self.tally = tally
        self.count = 0

    def run(self, deadline: float) -> None:
        try:
            while time.monotonic() < deadline:
                kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
                profile = self.rng.choice(PROFILES)
                self.session(kind, profile)
        except Exception:  # a defect of the soak itself: reported, never hidden
            with self.tally.lock:
                self.tally.errors.append(traceback.format_exc())

    def session(self, kind: str, profile: str) -> None:
        tally = self.tally
        with tally.lock:
            tally.sessions[kind] += 1
        conn: Conn | None = None
        try:
            conn = Conn(self.target.ports[profile])
            if kind == "vanish-handshake" and profile != "plain":
                self.vanish_handshake(conn, profile)
                return
            if kind == "garbage":
                self.garbage(conn, profile)
                return
            self.dialogue(conn, kind, profile)
        except Hung as exc:
            with tally.lock:
                tally.hung.append(f"{kind}/{profile}: {exc}")
        except (Closed, OSError) as exc:
            with tally.lock:
                tally.cut[kind] += 1
                tally.cut_reasons[f"{kind}/{profile}: {str(exc)[:70]}"] += 1
                tally.cut_times.append(time.monotonic())
        finally:
            if conn is not None:
                conn.close()

    def context(self) -> ssl.SSLContext:
        use_cert = self.rng.random() < 0.3
        return self.target.cert_context if use_cert else self.target.context

    def dialogue(self, conn: Conn, kind: str, profile: str) -> None:
        slow = kind == "slow"
        if profile == "implicit":
            conn.start_tls(self.context())
        self.expect_greeting(conn)
        self.pause(slow)
        conn.command(b"EHLO client.example.net", 250)
        if profile == "starttls":
            conn.command(b"STARTTLS", 220)
            conn.start_tls(self.context())
            conn.command(b"EHLO client.example.net", 250)
        count = self.rng.randint(1, 3)
        fault_at = self.rng.randrange(count)
        for i in range(count):
            fault = kind if i == fault_at else "clean"
            if not self.message(conn, fault, slow):
                return
        self.pause(slow)
        conn.command(b"QUIT", 221)

    def expect_greeting(self, conn: Conn) -> None:
        code, text = conn.reply()
        if code != 220:
            raise Closed(f"greeting {text!r}")

    def message(self, conn: Conn, fault: str, slow: bool) -> bool:
        """One transaction; False when the session is over."""
        self.count += 1
        ident = f"c{self.number}m{self.count}"
        doomed = fault == "die-backend"
        size = body_size(self.rng, small=slow)
        msg = make_message(self.rng, self.pool, ident, size, dot_max=self.target.dot_max)
        rcpt = b"die@example.org" if doomed else b"user@example.org"
        self.pause(slow)
        conn.command(b"MAIL FROM:<soak@example.net>", 250)
        self.pause(slow)
        conn.command(b"RCPT TO:<" + rcpt + b">", 250)
        self.pause(slow)
        conn.command(b"DATA", 354)
        # from here on the message exists for the checker
        outcome = "abandoned"
        reply = b""
        try:
            if fault == "vanish-data":
                conn.send(msg.wire[: self.rng.randrange(len(msg.wire) - 1)])
                conn.vanish(self.rng)
                return False
            if slow:
                self.send_slowly(conn, msg.wire)
            else:
                conn.send(msg.wire)
            outcome = "unsure"
            if fault == "vanish-dot":
                conn.vanish(self.rng)
                return False
            code, reply = conn.reply()
            outcome = "acked" if code == 250 else "refused"
            with self.tally.lock:
                self.tally.replies[reply[:3].decode("ascii", "replace")] += 1
            return code == 250
        finally:
            text = reply.decode("ascii", "replace")
            self.tally.add(Sent(ident, msg.sha256, outcome, doomed, text))

    def send_slowly(self, conn: Conn, data: bytes) -> None:
        view = memoryview(data)
        while view:
            step = self.rng.randint(500, 4000)
            conn.send(bytes(view[:step]))
            view = view[step:]
            time.sleep(0.02)

    def pause(self, slow: bool) -> None:
        if slow:
            time.sleep(self.rng.uniform(0.2, 1.5))

    def vanish_handshake(self, conn: Conn, profile: str) -> None:
        if profile == "starttls":
            self.expect_greeting(conn)
            conn.command(b"EHLO client.example.net", 250)
            conn.command(b"STARTTLS", 220)
        conn.send(partial_client_hello(self.context(), self.rng))
        conn.vanish(self.rng)

    def garbage(self, conn: Conn, profile: str) -> None:
        """Noise, then whatever the server answers until it closes (or 2 s)."""
        if profile != "implicit":
            self.expect_greeting(conn)
        conn.send(self.rng.randbytes(self.rng.randint(16, 4096)))
        conn.sock.settimeout(2.0)
        try:
            while conn.sock.recv(65536):
                pass
        except (OSError, ssl.SSLError):
            pass
