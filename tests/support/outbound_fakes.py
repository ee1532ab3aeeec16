"""Test peers for the outbound relay: fake MX servers, a DNS responder, qmail-remote.

* `FakeMx`: a small trio SMTP server with a choice of faults (no STARTTLS,
  a handshake that breaks after 220, chosen replies to RCPT / DATA / dot, a
  client certificate required). It records what it received.
* `DnsResponder`: answers UDP queries from a dictionary of records, built
  with dnspython's message code; sets AD when told to.
* `qmail_remote`: a client that says exactly what netqmail's qmail-remote
  says: waits for 220, HELO, MAIL FROM, RCPT TO each, DATA only when a
  recipient was accepted, the body with LF turned to CRLF and dot-stuffed,
  the final dot, QUIT.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio
import trio.testing

from tlsfront.config.schema import Profile
from tlsfront.outbound.context import Connector, Runtime
from tlsfront.outbound.listener import serve_outbound
from tlsfront.outbound.mtasts import StsCache

# -- the fake remote server ----------------------------------------------------


@dataclass
class Message:
    sender: bytes
    recipients: list[bytes]
    body: bytes
    tls: str | None  # TLS version, None in clear
    client_cert: dict[str, Any] | None


@dataclass
class FakeMx:
    name: str = "mx.example.test"
    tls: ssl.SSLContext | None = None  # STARTTLS offered with this context
    offer_starttls: bool = True
    break_handshake: bool = False  # close the connection right after 220 to STARTTLS
    greeting: bytes = b"220 mx.example.test ESMTP fake\r\n"
    mail_reply: bytes = b"250 2.1.0 ok\r\n"
    rcpt_replies: Mapping[bytes, bytes] = field(default_factory=dict)  # address -> reply
    data_reply: bytes = b"354 go ahead\r\n"
    dot_reply: bytes = b"250 2.0.0 ok queued as 1234\r\n"
    silent: bool = False  # never says anything
    hang_at_dot: bool = False  # never answers the final dot
    # records
    connections: int = 0
    handshakes: int = 0
    commands: list[bytes] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)

    async def listen(self, nursery: trio.Nursery, host: str = "127.0.0.1", port: int = 0) -> int:
        listeners = await trio.open_tcp_listeners(port, host=host)
        nursery.start_soon(trio.serve_listeners, self.handle, listeners)
        sockname = listeners[0].socket.getsockname()
        return int(sockname[1])

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        try:
            await self._session(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _session(self, stream: trio.abc.Stream) -> None:
        if self.silent:
            await trio.sleep_forever()
        reader = _Lines(stream)
        await stream.send_all(self.greeting)
        if not self.greeting.startswith(b"220"):
            return
        tls: trio.SSLStream[trio.abc.Stream] | None = None
        sender: bytes | None = None
        recipients: list[bytes] = []
        while True:
            line = await reader.line()
            if line is None:
                return
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                lines = [self.name.encode(), b"PIPELINING", b"8BITMIME"]
                if self.tls is not None and self.offer_starttls and tls is None:
                    lines.append(b"STARTTLS")
                out = b"".join(b"250-" + x + b"\r\n" for x in lines[:-1])
                await stream.send_all(out + b"250 " + lines[-1] + b"\r\n")
            elif verb == b"HELO":
                await stream.send_all(b"250 " + self.name.encode() + b"\r\n")
            elif line.upper() == b"STARTTLS" and self.tls is not None and tls is None:
                await stream.send_all(b"220 2.0.0 ready to start TLS\r\n")
                if self.break_handshake:
                    return
                tls = trio.SSLStream(stream, self.tls, server_side=True)
                await tls.do_handshake()
                self.handshakes += 1
                stream = tls
                reader = _Lines(stream)
                sender, recipients = None, []
            elif verb == b"MAIL":
                sender = line[10:].strip(b"<>")
                recipients = []
                await stream.send_all(self.mail_reply)
            elif verb == b"RCPT":
                address = line[8:].strip(b"<>")
                reply = self.rcpt_replies.get(address, b"250 2.1.5 ok\r\n")
                if reply.startswith(b"2"):
                    recipients.append(address)
                await stream.send_all(reply)
            elif verb == b"DATA":
                await stream.send_all(self.data_reply)
                if not self.data_reply.startswith(b"354"):
                    continue
                body = await reader.body()
                if body is None:
                    return
                if self.hang_at_dot:
                    await trio.sleep_forever()
                if self.dot_reply.startswith(b"2"):
                    cert = tls.getpeercert() if tls is not None else None
                    version = tls.version() if tls is not None else None
                    assert sender is not None
                    self.messages.append(Message(sender, recipients, body, version, cert))
                await stream.send_all(self.dot_reply)
            elif verb == b"QUIT":
                await stream.send_all(b"221 2.0.0 bye\r\n")
                return
            else:
                await stream.send_all(b"250 2.0.0 ok\r\n")


class _Lines:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def line(self) -> bytes | None:
        while b"\r\n" not in self.buffer:
            if not await self._more():
                return None
        end = self.buffer.index(b"\r\n")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def body(self) -> bytes | None:
        """The body up to CRLF.CRLF (dot-stuffing kept), or None at EOF."""
        while True:
            joined = b"\r\n" + self.buffer
            at = joined.find(b"\r\n.\r\n")
            if at >= 0:
                body = bytes(joined[2 : at + 2])
                del self.buffer[: at + 3]
                return body
            if not await self._more():
                return None


def memory_connector(nursery: trio.Nursery, server: FakeMx | None) -> Connector:
    """A `Runtime.connect` that links to `server` in memory (None: connect hangs)."""

    async def connect(address: str, port: int) -> trio.abc.Stream:
        if server is None:
            await trio.sleep_forever()
        client, remote = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle, remote)
        return client

    return connect


async def listen_on_addresses(nursery: trio.Nursery, servers: Sequence[tuple[FakeMx, str]]) -> int:
    """Start servers on several loopback addresses, all on one port."""
    first, host = servers[0]
    port = await first.listen(nursery, host)
    for server, other in servers[1:]:
        await server.listen(nursery, other, port)
    return port


def server_context(leaf: Any, *, client_ca: Any = None) -> ssl.SSLContext:
    """A server context for a trustme leaf; requires a client cert from `client_ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(ctx)
    return ctx


# -- the DNS responder ----------------------------------------------------------


@dataclass
class DnsResponder:
    """Records as {(name, type): [rdata text, ...]}; unknown names are NXDOMAIN."""

    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    secure: bool = False  # set AD in every answer
    servfail: set[str] = field(default_factory=set)  # names answered with SERVFAIL
    queries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, rdtype: str, *values: str) -> None:
        self.records.setdefault((name.lower().rstrip("."), rdtype), []).extend(values)

    async def listen(self, nursery: trio.Nursery) -> str:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        nursery.start_soon(self._serve, sock)
        return f"127.0.0.1:{sock.getsockname()[1]}"

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        with sock:
            while True:
                wire, peer = await sock.recvfrom(4096)
                await sock.sendto(self.answer(wire), peer)

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        values = self.records.get((name, rdtype))
        if values:
            rrset = dns.rrset.from_text_list(question.name, 300, "IN", rdtype, values)
            response.answer.append(rrset)
        elif not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        if self.secure:
            response.flags |= dns.flags.AD
        return response.to_wire()


# -- qmail-remote, as it speaks ------------------------------------------------------


@dataclass
class QmailResult:
    greeting: bytes = b""
    helo: bytes = b""
    mail: bytes = b""
    rcpt: list[bytes] = field(default_factory=list)
    data: bytes = b""
    dot: bytes = b""


class _Replies:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.lines = _Lines(stream)

    async def reply(self) -> bytes:
        """A whole reply, lines joined with CRLF (b"" at EOF)."""
        out: list[bytes] = []
        while True:
            line = await self.lines.line()
            if line is None:
                return b"\r\n".join(out)
            out.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(out)


def stuffed(body: bytes) -> bytes:
    """LF to CRLF and dot-stuffing, as qmail-remote's blast() does."""
    if body and not body.endswith(b"\n"):
        body += b"\n"
    out = []
    for line in body.split(b"\n")[:-1]:
        out.append((b"." + line if line.startswith(b".") else line) + b"\r\n")
    return b"".join(out)


async def qmail_remote(
    stream: trio.abc.Stream,
    sender: bytes,
    recipients: Sequence[bytes],
    body: bytes,
    helo: bytes = b"client.example",
) -> QmailResult:
    result = QmailResult()
    replies = _Replies(stream)
    result.greeting = await replies.reply()

    async def command(line: bytes) -> bytes:
        await stream.send_all(line + b"\r\n")
        return await replies.reply()

    if not result.greeting.startswith(b"220"):
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"QUIT\r\n")
        return result
    result.helo = await command(b"HELO " + helo)
    if not result.helo.startswith(b"250"):
        await command(b"QUIT")
        return result
    result.mail = await command(b"MAIL FROM:<" + sender + b">")
    if not result.mail.startswith(b"250"):
        await command(b"QUIT")
        return result
    for recipient in recipients:
        result.rcpt.append(await command(b"RCPT TO:<" + recipient + b">"))
    if not any(r.startswith(b"250") for r in result.rcpt):
        await command(b"QUIT")
        return result
    result.data = await command(b"DATA")
    if not result.data.startswith(b"354"):
        await command(b"QUIT")
        return result
    await stream.send_all(stuffed(body))
    result.dot = await command(b".")
    await command(b"QUIT")
    return result


# -- the relay under test ----------------------------------------------------------


def outbound_profile(**overrides: Any) -> Profile:
    values: dict[str, Any] = {
        "name": "out",
        "mode": "outbound",
        "hostname": "relay.example.test",
        "timeout_connect": 5.0,
        "timeout_command": 10.0,
        "timeout_data": 10.0,
        "timeout_handshake": 5.0,
    }
    values.update(overrides)
    return Profile(**values)


def make_runtime(ca_pem: str | None = None, **overrides: Any) -> Runtime:
    runtime = Runtime(trust_cadata=ca_pem, sts_cache=StsCache(fetch_timeout=5.0))
    for key, value in overrides.items():
        setattr(runtime, key, value)
    return runtime


async def relay_message(
    profile: Profile,
    runtime: Runtime,
    recipients: Sequence[bytes],
    body: bytes = b"Subject: test\n\nhello\n",
    sender: bytes = b"alice@relay.example.test",
    client_ip: str = "127.0.0.1",
) -> QmailResult:
    """Run one qmail-remote session against serve_outbound over a memory stream."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_outbound, runtime=runtime), server, client_ip, profile)
        result = await qmail_remote(client, sender, recipients, body)
        await client.aclose()
    return result


def write_pem(directory: Path, name: str, pem: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(pem)
    return path
