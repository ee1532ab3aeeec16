"""PROXY protocol v1/v2: the sans-I/O reader, and listeners that take the header."""

from __future__ import annotations

import ipaddress
import ssl
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from support.front import Front
from support.hostile import task_count

from tlsfront.net.proxyproto import (
    V2_SIGNATURE,
    ProxyHeaderReader,
    ProxyInfo,
    ProxyProtocolError,
    trusted,
)

# ----------------------------------------------------------------------------
# Building headers (independently of the reader)


def v2(
    command: int = 1,
    family: int = 0x11,
    addresses: bytes | None = None,
    tlvs: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    if addresses is None:
        addresses = tcp4("192.0.2.7", "198.51.100.1", 40000, 25)
    body = addresses + tlvs
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + body


def tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tcp6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


# ----------------------------------------------------------------------------
# Feeding: whole, and one byte at a time


def whole(data: bytes) -> tuple[ProxyInfo, bytes]:
    reader = ProxyHeaderReader()
    info = reader.feed(data)
    assert info is not None
    return info, reader.trailing


def bytewise(data: bytes, header_length: int) -> tuple[ProxyInfo, bytes]:
    """Feed one byte at a time: nothing until the header's last byte, then the result."""
    reader = ProxyHeaderReader()
    for n in range(len(data)):
        info = reader.feed(data[n : n + 1])
        if n < header_length - 1:
            assert info is None, f"a result after {n + 1} of {header_length} bytes"
        else:
            assert info is not None
    assert info is not None
    return info, reader.trailing


def both(data: bytes, header_length: int) -> Iterator[tuple[ProxyInfo, bytes]]:
    yield whole(data)
    yield bytewise(data, header_length)


def fails_at(data: bytes) -> int:
    """Feed one byte at a time; the 1-based count of bytes at which the reader refused."""
    reader = ProxyHeaderReader()
    for n in range(len(data)):
        try:
            reader.feed(data[n : n + 1])
        except ProxyProtocolError:
            with pytest.raises(ProxyProtocolError):
                ProxyHeaderReader().feed(data)  # and fed whole, too
            return n + 1
    raise AssertionError("never refused")


# ----------------------------------------------------------------------------
# v1


@pytest.mark.parametrize(
    ("line", "protocol", "source", "destination"),
    [
        (
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n",
            "TCP4",
            ("192.0.2.7", 40000),
            ("198.51.100.1", 25),
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 0 65535\r\n",
            "TCP6",
            ("2001:db8::7", 0),
            ("2001:db8::1", 65535),
        ),
        (
            b"PROXY TCP6 2001:0db8:0000:0000:0000:0000:0000:0007 ::1 1 2\r\n",
            "TCP6",
            ("2001:db8::7", 1),
            ("::1", 2),
        ),
        (b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n", "TCP6", ("::ffff:c000:207", 1), ("::1", 2)),
        (b"PROXY UNKNOWN\r\n", "UNKNOWN", None, None),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", "UNKNOWN", None, None),
    ],
)
def test_v1(line: bytes, protocol: str, source: Any, destination: Any) -> None:
    for info, rest in both(line + b"EHLO x\r\n", len(line)):
        assert info == ProxyInfo(1, "PROXY", protocol, source, destination, length=len(line))  # type: ignore[arg-type]
        assert rest == b"EHLO x\r\n"


def test_v1_longest_line_is_107_bytes() -> None:
    longest = b"PROXY UNKNOWN " + b"x" * (107 - 16) + b"\r\n"
    assert len(longest) == 107
    for info, rest in both(longest, 107):
        assert info.protocol == "UNKNOWN"
        assert rest == b""
    too_long = b"PROXY UNKNOWN " + b"x" * (108 - 16) + b"\r\n"
    assert fails_at(too_long) == 107  # refused at the 107th byte: no LF by then


def test_v1_feed_after_the_header_adds_to_trailing() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(b"PROXY UNKNOWN\r\nab") is not None
    assert reader.feed(b"cd") is not None
    assert reader.trailing == b"abcd"


@pytest.mark.parametrize(
    ("data", "refused_at"),
    [
        # refused at the first byte that cannot start a header
        (b"EHLO example.org\r\n", 1),
        (b"\x16\x03\x01\x02\x00", 1),  # a ClientHello
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 1),
        (b"PROXY4 1.2.3.4\r\n", 6),
        (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", 6),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", 20),  # bare CR, seen when the next byte comes
        (b"PROXY \r\n", 8),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", 32),
        # a complete line that says something wrong: refused at its LF
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", None),  # bare LF
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", None),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", None),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", None),
        (b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", None),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", None),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", None),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", None),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", None),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xb2\r\n", None),
    ],
)
def test_v1_refused(data: bytes, refused_at: int | None) -> None:
    assert fails_at(data) == (len(data) if refused_at is None else refused_at)


def test_eof_inside_the_header() -> None:
    for partial in (b"PROXY TCP4 1.2.3.4", V2_SIGNATURE[:5], v2()[:20]):
        reader = ProxyHeaderReader()
        assert reader.feed(partial) is None
        with pytest.raises(ProxyProtocolError, match="closed inside"):
            reader.eof()
    reader = ProxyHeaderReader()
    reader.feed(b"PROXY UNKNOWN\r\n")
    reader.eof()  # after a whole header it is fine


# ----------------------------------------------------------------------------
# v2


def test_v2_tcp4() -> None:
    header = v2()
    for info, rest in both(header + b"\x16\x03\x01", len(header)):
        assert info == ProxyInfo(
            2, "PROXY", "TCP4", ("192.0.2.7", 40000), ("198.51.100.1", 25), (), len(header)
        )
        assert len(header) == 28
        assert rest == b"\x16\x03\x01"


def test_v2_tcp6_with_tlvs() -> None:
    tlvs = tlv(0x02, b"mx.example.org") + tlv(0x04, b"\0" * 5) + tlv(0xE0, b"")
    header = v2(family=0x21, addresses=tcp6("2001:db8::7", "2001:db8::1", 1, 25), tlvs=tlvs)
    for info, rest in both(header, len(header)):
        assert info.protocol == "TCP6"
        assert info.source == ("2001:db8::7", 1)
        assert info.destination == ("2001:db8::1", 25)
        assert info.tlvs == ((0x02, b"mx.example.org"), (0x04, b"\0" * 5), (0xE0, b""))
        assert rest == b""


def test_v2_local_ignores_the_addresses() -> None:
    """The balancer's own connection (a health check): its address block means nothing."""
    for family, body in ((0x00, b""), (0x11, b"\xff" * 3), (0x99, b"junk")):
        header = v2(command=0, family=family, addresses=body)
        for info, rest in both(header + b"QUIT\r\n", len(header)):
            assert info == ProxyInfo(2, "LOCAL", "UNKNOWN", None, None, (), len(header))
            assert rest == b"QUIT\r\n"


@pytest.mark.parametrize("family", [0x00, 0x31])
def test_v2_without_an_ip_address(family: int) -> None:
    size = 216 if family == 0x31 else 0
    header = v2(family=family, addresses=b"/tmp/s".ljust(size, b"\0") if size else b"")
    for info, _ in both(header, len(header)):
        assert (info.command, info.protocol, info.source) == ("PROXY", "UNKNOWN", None)


@pytest.mark.parametrize(
    ("data", "refused_at"),
    [
        (b"\r\n\r\n\x00\r\nQUIT\r", 12),  # the signature's last byte
        (b"\r\nGET / HTTP/1.0\r\n", 3),
        (b"\r\n\r\n\x01", 5),
        (v2(version=1), 13),
        (v2(version=3), 13),
        (v2(command=2), 13),
        (v2(command=0xF), 13),
        (v2(family=0x12), 14),  # UDP over IPv4
        (v2(family=0x22), 14),  # UDP over IPv6
        (v2(family=0x01), 14),  # UNSPEC family, STREAM
        (v2(family=0x41), 14),
        (v2(addresses=b"\0" * 8), 16),  # INET needs 12 bytes
        (v2(family=0x21, addresses=b"\0" * 35), 16),
        (v2(addresses=b"", length=4097), 16),  # longer than accepted
        (v2(tlvs=b"\x02\x00"), 30),  # a TLV cut in its length
        (v2(tlvs=b"\x02\x00\x05abc"), 34),  # a TLV longer than what is left
    ],
)
def test_v2_refused(data: bytes, refused_at: int) -> None:
    assert fails_at(data) == refused_at


def test_v2_length_limit_is_configurable() -> None:
    header = v2(tlvs=tlv(0xE1, b"x" * 5000))
    info = ProxyHeaderReader(max_v2_length=65535).feed(header)
    assert info is not None
    assert info.tlvs == ((0xE1, b"x" * 5000),)
    with pytest.raises(ProxyProtocolError, match="too long"):
        ProxyHeaderReader().feed(header)


# ----------------------------------------------------------------------------
# trusted networks


def test_trusted() -> None:
    nets = ("10.0.0.0/8", "2001:db8::/32", "127.0.0.1")
    assert trusted("10.1.2.3", nets)
    assert trusted("127.0.0.1", nets)
    assert trusted("2001:db8::5", nets)
    assert not trusted("127.0.0.2", nets)
    assert not trusted("11.0.0.1", nets)
    assert not trusted("not an ip", nets)
    assert not trusted("10.0.0.1", ())


# ----------------------------------------------------------------------------
# Listeners: a real tlsfront with the capture backend

PROFILES = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}
proxy_protocol = true
proxy_trusted = ["127.0.0.0/30"]
max_per_ip = 1
timeout_handshake = 5

[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = {cert}
backend = {backend}
proxy_protocol = true
proxy_trusted = ["127.0.0.1"]

[profile.elsewhere]
listen = ["127.0.0.1:0"]
tls = "none"
backend = {backend}
proxy_protocol = true
proxy_trusted = ["192.0.2.0/24", "::1"]
"""

MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n.\r\n"


class MemoryTLS:
    """A TLS client over a trio stream whose ClientHello can be had before sending."""

    def __init__(self, stream: trio.abc.Stream, context: ssl.SSLContext) -> None:
        self.stream = stream
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def client_hello(self) -> bytes:
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    async def _pump(self, step: Any) -> Any:
        while True:
            try:
                result = step()
            except ssl.SSLWantReadError:
                if pending := self.outgoing.read():
                    await self.stream.send_all(pending)
                data = await self.stream.receive_some(65536)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
                continue
            if pending := self.outgoing.read():
                await self.stream.send_all(pending)
            return result

    async def handshake(self) -> None:
        await self._pump(self.tls.do_handshake)

    async def send_all(self, data: bytes) -> None:
        await self._pump(lambda: self.tls.write(data))

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        data = await self._pump(lambda: self.tls.read(max_bytes))
        assert isinstance(data, bytes)
        return data


class SMTP:
    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = b""

    async def reply(self) -> bytes:
        while True:
            lines = self.buffer.split(b"\r\n")
            for n, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    reply = b"\r\n".join(lines[: n + 1]) + b"\r\n"
                    self.buffer = self.buffer[len(reply) :]
                    return reply
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(self.buffer)
            self.buffer += data

    async def command(self, line: bytes) -> bytes:
        await self.stream.send_all(line)
        return await self.reply()


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def closed_without_a_word(stream: trio.abc.Stream) -> bool:
    """True when the server closed the connection without sending anything."""
    try:
        return await stream.receive_some(100) == b""
    except trio.BrokenResourceError:  # reset: it closed with our bytes unread
        return True


async def send_mail(smtp: SMTP) -> None:
    assert (await smtp.command(b"EHLO client.example.net\r\n")).startswith(b"250")
    assert (await smtp.command(b"MAIL FROM:<a@example.net>\r\n")).startswith(b"250")
    assert (await smtp.command(b"RCPT TO:<b@example.org>\r\n")).startswith(b"250")
    assert (await smtp.command(b"DATA\r\n")).startswith(b"354")
    assert (await smtp.command(MESSAGE)).startswith(b"250")
    assert (await smtp.command(b"QUIT\r\n")).startswith(b"221")


async def test_v1_header_gives_the_backend_the_client(
    start_front: Any, clean_environ: None
) -> None:
    front: Front = await start_front(PROFILES)
    with trio.fail_after(30):
        stream = await connect(front.port("smtp"))
        await stream.send_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n")
        smtp = SMTP(stream)
        assert (await smtp.reply()).startswith(b"220")
        await send_mail(smtp)
        await stream.aclose()
    (session,) = front.sessions()
    env = session["env"]
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("192.0.2.7", "40000")
    assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == ("198.51.100.1", "25")
    (message,) = session["messages"]
    assert message.startswith(b"Received: from client.example.net ([192.0.2.7])\r\n")


async def test_v2_header_and_client_hello_in_one_read(
    start_front: Any, client_context: ssl.SSLContext, clean_environ: None
) -> None:
    """Implicit TLS: the ClientHello right behind the header must reach the handshake."""
    front: Front = await start_front(PROFILES)
    with trio.fail_after(30):
        stream = await connect(front.port("smtps"))
        tls = MemoryTLS(stream, client_context)
        header = v2(family=0x21, addresses=tcp6("2001:db8::7", "2001:db8::25", 50000, 465))
        await stream.send_all(header + tls.client_hello())
        await tls.handshake()
        smtp = SMTP(tls)
        assert (await smtp.reply()).startswith(b"220")
        await send_mail(smtp)
        await stream.aclose()
    (session,) = front.sessions()
    env = session["env"]
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("2001:db8::7", "50000")
    assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == ("2001:db8::25", "465")
    assert env["SSL_PROTOCOL"].startswith("TLSv1.")
    received = session["messages"][0]
    assert received.startswith(b"Received: from client.example.net ([IPv6:2001:db8::7])")


async def test_local_header_keeps_the_connection_addresses(
    start_front: Any, clean_environ: None
) -> None:
    """A health check from the balancer itself is served as the balancer."""
    front: Front = await start_front(PROFILES)
    with trio.fail_after(30):
        stream = await connect(front.port("smtp"))
        await stream.send_all(v2(command=0, family=0x00, addresses=b""))
        smtp = SMTP(stream)
        assert (await smtp.reply()).startswith(b"220")
        # MAIL starts the backend (the backend on demand): what does it see?
        assert (await smtp.command(b"MAIL FROM:<a@example.net>\r\n")).startswith(b"250")
        assert (await smtp.command(b"QUIT\r\n")).startswith(b"221")
        await stream.aclose()
    (session,) = front.sessions()
    assert session["env"]["TCPREMOTEIP"] == "127.0.0.1"
    assert session["env"]["TCPLOCALPORT"] == str(front.port("smtp"))


async def test_untrusted_peer_is_closed(start_front: Any, clean_environ: None) -> None:
    front: Front = await start_front(PROFILES)
    with trio.fail_after(30):
        async with await connect(front.port("elsewhere")) as stream:
            await stream.send_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n")
            assert await closed_without_a_word(stream)
    assert front.sessions() == []


@pytest.mark.parametrize(
    "first",
    [
        b"EHLO client.example.net\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\n",
        V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\0" * 12,  # UDP
    ],
)
async def test_bad_header_is_closed(start_front: Any, clean_environ: None, first: bytes) -> None:
    front: Front = await start_front(PROFILES)
    with trio.fail_after(30):
        async with await connect(front.port("smtp")) as stream:
            await stream.send_all(first)
            assert await closed_without_a_word(stream)
    assert front.sessions() == []


async def test_missing_header_times_out(
    start_front: Any, clean_environ: None, mock_clock: trio.testing.MockClock
) -> None:
    """No header: closed at timeout_handshake (5 s), not before.

    The clock stands still unless the test moves it (no autojump: with real
    sockets an automatic jump could come while a byte is still in the
    kernel), so the test waits for tlsfront to accept the connection, a
    kernel event, and then moves time itself. The pytest timeout bounds it.
    """
    front: Front = await start_front(PROFILES)
    await trio.testing.wait_all_tasks_blocked()
    idle = task_count()
    async with await connect(front.port("smtp")) as stream:
        while task_count() == idle:  # until the connection's handler runs
            await trio.testing.wait_all_tasks_blocked()
        accepted = task_count()
        mock_clock.jump(4.99)
        await trio.testing.wait_all_tasks_blocked()
        assert task_count() == accepted  # still waiting for the header
        mock_clock.jump(0.02)
        assert await closed_without_a_word(stream)
    assert front.sessions() == []


async def test_max_per_ip_counts_the_real_client(start_front: Any, clean_environ: None) -> None:
    front: Front = await start_front(PROFILES)
    port = front.port("smtp")

    async def session_from(ip: str) -> tuple[trio.SocketStream, bytes]:
        stream = await connect(port)
        await stream.send_all(f"PROXY TCP4 {ip} 198.51.100.1 40000 25\r\n".encode())
        return stream, await SMTP(stream).reply()

    with trio.fail_after(30):
        first, greeting = await session_from("192.0.2.7")
        assert greeting.startswith(b"220")
        second, refusal = await session_from("192.0.2.7")
        assert refusal.startswith(b"421")
        assert b"192.0.2.7" in refusal
        other, greeting = await session_from("192.0.2.8")
        assert greeting.startswith(b"220")
        for stream in (first, second, other):
            await stream.aclose()
