"""Tools for the hostile-client tests: a raw SMTP client, a recording TCP backend.

`Client` writes exactly the bytes a test gives it (no line-ending repair, no
waiting for replies unless asked) and reads whole replies, so a test can
pipeline, split writes and inject. `RecordingBackend` is a qmail-like SMTP
server on loopback that tlsfront reaches through `backend_connect`; it keeps
every byte each connection received and, unlike qmail, also notices the
lenient end-of-data forms (threat `smtp-smuggling`), so a test can prove none of them
ever reached it. It runs in the test's own process: hundreds of sessions cost
no process start-ups.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio
import trio.testing

REPLY_LINE = re.compile(rb"^(\d{3})([ -]?)(.*)$")
LENIENT_ENDS = (b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b"\n.\r")


class ConnectionClosed(Exception):
    """The peer closed the connection while a reply was awaited."""


class Client:
    """An SMTP client that sends raw bytes and reads whole replies."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.tls = False

    @classmethod
    async def connect(cls, port: int, local_address: str | None = None) -> Client:
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
        return cls(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self.buffer += data
        return bool(data)

    async def reply(self) -> bytes:
        """One complete reply, all its lines, exactly as received."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end < 0:
                if not await self._fill():
                    raise ConnectionClosed(bytes(self.buffer))
                continue
            line = bytes(self.buffer[start:end])
            start = end + 1
            match = REPLY_LINE.match(line.rstrip(b"\r"))
            if match is None:
                raise AssertionError(f"not an SMTP reply line: {line!r}")
            if match.group(2) != b"-":
                reply = bytes(self.buffer[:start])
                del self.buffer[:start]
                return reply

    async def command(self, line: bytes) -> bytes:
        await self.send(line + b"\r\n")
        return await self.reply()

    async def rest(self) -> bytes:
        """Everything until the peer closes (a reset counts as the close)."""
        while await self._fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def starttls(self, context: ssl.SSLContext) -> None:
        """The TLS handshake, after the 220 has been read. Nothing may be pending."""
        assert not self.buffer, f"bytes in clear after the 220: {bytes(self.buffer)!r}"
        tls = trio.SSLStream(self.stream, context, server_hostname="localhost")
        await tls.do_handshake()
        self.stream = tls
        self.tls = True

    async def aclose(self) -> None:
        with trio.move_on_after(5):
            await self.stream.aclose()


def code(reply: bytes) -> int:
    return int(reply[:3])


# ----------------------------------------------------------------------------
# The recording backend


@dataclass
class Conversation:
    """What one backend connection received and how it read it."""

    number: int
    received: bytearray = field(default_factory=bytearray)
    commands: list[bytes] = field(default_factory=list)  # lines read as commands
    messages: list[bytes] = field(default_factory=list)  # bodies ended by CRLF.CRLF
    partial: bytes | None = None  # a body cut short by EOF
    lenient_ends: list[bytes] = field(default_factory=list)  # fake terminators seen in bodies
    most_unanswered: int = 0  # most command lines read before their replies went out
    done: trio.Event = field(default_factory=trio.Event)
    data_command: trio.Event = field(default_factory=trio.Event)  # DATA read


class RecordingBackend:
    """A qmail-like SMTP server that records everything (see the module doc).

    Recipients in `local_domains` are accepted, others get qmail's 553
    unless `relay` is set. `ehlo` is the list of keywords after the name.
    With `hold_data`, the reply to DATA waits until the test sets that event.
    """

    def __init__(
        self,
        *,
        ehlo: Sequence[bytes] = (b"PIPELINING", b"8BITMIME"),
        local_domains: Sequence[bytes] = (b"example.org",),
        relay: bool = False,
        hold_data: trio.Event | None = None,
    ) -> None:
        self.ehlo = list(ehlo)
        self.local_domains = [d.lower() for d in local_domains]
        self.relay = relay
        self.hold_data = hold_data
        self.conversations: list[Conversation] = []
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> RecordingBackend:
        listeners = await nursery.start(trio.serve_tcp, self._serve, 0)
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _serve(self, stream: trio.SocketStream) -> None:
        conv = Conversation(len(self.conversations))
        self.conversations.append(conv)
        try:
            await _Speaker(self, conv, stream).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            conv.done.set()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def all_done(self) -> None:
        for conv in list(self.conversations):
            await conv.done.wait()


class _Speaker:
    def __init__(self, backend: RecordingBackend, conv: Conversation, stream: trio.abc.Stream):
        self.b = backend
        self.conv = conv
        self.stream = stream
        self.buffer = b""
        self.sender: bytes | None = None
        self.recipients = 0
        self.out = bytearray()

    async def _flush(self) -> None:
        if self.out:
            data = bytes(self.out)
            self.out.clear()
            await self.stream.send_all(data)

    async def _read(self) -> bool:
        # Like qmail-smtpd: replies are buffered and go out before each read.
        await self._flush()
        data = await self.stream.receive_some(65536)
        self.conv.received += data
        self.buffer += data
        return bool(data)

    async def run(self) -> None:
        self.out += b"220 backend.example.org ESMTP\r\n"
        while True:
            unanswered = self.buffer.count(b"\n") + self.out.count(b"\n")
            self.conv.most_unanswered = max(self.conv.most_unanswered, unanswered)
            if b"\n" not in self.buffer:
                if not await self._read():
                    return
                continue
            line, _, self.buffer = self.buffer.partition(b"\n")
            self.conv.commands.append(line + b"\n")
            # qmail's reading: split on LF, a CR before it dropped, NUL ends it
            text = line.removesuffix(b"\r").split(b"\0", 1)[0]
            verb, _, arg = text.partition(b" ")
            reply = await self._command(verb.upper(), arg)
            if reply is None:
                await self._flush()
                return
            self.out += reply

    async def _command(self, verb: bytes, arg: bytes) -> bytes | None:
        if verb == b"EHLO":
            self.sender = None
            lines = [b"backend.example.org", *self.b.ehlo]
            return b"".join(
                b"250" + (b" " if i == len(lines) - 1 else b"-") + text + b"\r\n"
                for i, text in enumerate(lines)
            )
        if verb == b"HELO":
            self.sender = None
            return b"250 backend.example.org\r\n"
        if verb == b"MAIL":
            self.sender, self.recipients = arg, 0
            return b"250 ok\r\n"
        if verb == b"RCPT":
            if self.sender is None:
                return b"503 MAIL first (#5.5.1)\r\n"
            domain = arg.rsplit(b"@", 1)[-1].rstrip(b">").lower()
            if not self.b.relay and domain not in self.b.local_domains:
                return b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
            self.recipients += 1
            return b"250 ok\r\n"
        if verb == b"DATA":
            self.conv.data_command.set()
            if self.b.hold_data is not None:
                await self._flush()
                await self.b.hold_data.wait()
            if self.sender is None:
                return b"503 MAIL first (#5.5.1)\r\n"
            if not self.recipients:
                return b"503 RCPT first (#5.5.1)\r\n"
            self.out += b"354 go ahead\r\n"
            self.sender = None
            return await self._body()
        if verb == b"QUIT":
            self.out += b"221 backend.example.org\r\n"
            return None
        if verb in (b"NOOP", b"RSET"):
            return b"250 ok\r\n"
        return b"502 unimplemented (#5.5.1)\r\n"

    async def _body(self) -> bytes | None:
        while True:
            end = (b"\r\n" + self.buffer).find(b"\r\n.\r\n")
            if end >= 0:
                body, self.buffer = self.buffer[: end + 3], self.buffer[end + 3 :]
                self._lenient(body[:-3])
                self.conv.messages.append(body)
                return b"250 ok %d\r\n" % len(self.conv.messages)
            if not await self._read():
                self._lenient(self.buffer)
                self.conv.partial = self.buffer
                self.buffer = b""
                return None

    def _lenient(self, body: bytes) -> None:
        framed = b"\r\n" + body
        self.conv.lenient_ends += [end for end in LENIENT_ENDS if end in framed]


# ----------------------------------------------------------------------------
# Splitting, the session log, the task tree


async def each_split(
    data: bytes,
    run: Callable[[int, bytes, bytes], Awaitable[None]],
    *,
    concurrency: int = 24,
) -> None:
    """run(i, data[:i], data[i:]) for every i, one connection each, concurrently.

    i = 0 is the single write; every other i splits `data` into two writes.
    """
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            await run(i, data[:i], data[i:])

    async with trio.open_nursery() as nursery:
        for i in range(len(data)):
            nursery.start_soon(one, i)


async def send_split(client: Client, head: bytes, tail: bytes) -> None:
    """Two writes; tlsfront has read and acted on the first before the second.

    tlsfront and the recording backend run in this trio run, so once every
    task is blocked the first write has been read, parsed and answered as far
    as it can be: the split is seen, not merged in the kernel's buffer.
    """
    if head:
        await client.send(head)
    if head and tail:
        await trio.testing.wait_all_tasks_blocked()
    if tail:
        await client.send(tail)


class SessionLog(logging.Handler):
    """Collects tlsfront.inbound.session log lines and lets a test wait for session ends."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._changed.set()
        self._changed = trio.Event()

    @property
    def ends(self) -> list[str]:
        return [line for line in self.lines if line.startswith("session end:")]

    async def wait_ends(self, count: int) -> None:
        while len(self.ends) < count:
            await self._changed.wait()


@contextmanager
def session_log() -> Iterator[SessionLog]:
    logger = logging.getLogger("tlsfront.inbound.session")
    handler = SessionLog()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def task_count() -> int:
    """Every task alive in this trio run, found by walking the task tree."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


class MemoryBackend:
    """A `RecordingBackend` conversation over an in-memory stream: the backend
    of a `Session` run on virtual time (no process, no socket)."""

    def __init__(self, recorder: RecordingBackend, nursery: trio.Nursery) -> None:
        self._ours, theirs = trio.testing.memory_stream_pair()
        conv = Conversation(len(recorder.conversations))
        recorder.conversations.append(conv)
        self.conversation = conv

        async def speak() -> None:
            try:
                await _Speaker(recorder, conv, theirs).run()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                conv.done.set()
                await theirs.aclose()

        nursery.start_soon(speak)

    async def send_all(self, data: bytes) -> None:
        await self._ours.send_all(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        return bytes(await self._ours.receive_some(max_bytes))

    async def send_eof(self) -> None:
        await self._ours.send_stream.aclose()

    async def aclose(self) -> int | None:
        await self._ours.aclose()
        return 0
