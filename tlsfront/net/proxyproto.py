"""The PROXY protocol (v1 text, v2 binary): the client's address behind a load balancer.

Theory of operation
-------------------
A load balancer that forwards TCP (HAProxy, nginx stream, the cloud ones)
hides the client: tlsfront sees the balancer's address. With
``proxy_protocol = true`` the balancer writes one header before the first
byte of the client's own stream, naming the client's and the destination's
address and port; tlsfront reads it, and from then on the session is the
client's: TCPREMOTEIP, the Received header, tcprules and ``max_per_ip``
all see the real client.

Only a peer in ``proxy_trusted`` may send one (anybody else could claim any
address): a connection from elsewhere is closed before a byte is read, as
is one whose header is malformed, incomplete or slow. A trusted peer must
send a header; there is no "maybe" (the client's first bytes could be
crafted to look like one).

`ProxyHeaderReader` is sans-I/O: bytes in (`feed`), a `ProxyInfo` out once
the header is complete, with the bytes that followed it in `trailing`
(with implicit TLS the ClientHello may arrive in the same read). It is
exact and bounded: it decides on each byte as it comes (a wrong signature
byte fails at once), reads a v1 line of at most 107 bytes, and a v2 header
of at most 16 + `max_v2_length` bytes. v2 TLVs are checked for framing and
kept, not interpreted.

A LOCAL header (v2; the balancer's own health check) and an UNKNOWN one
carry no client address: the connection's own addresses stand.

The trio side is at the end: `accept_proxied` reads the header from an
accepted connection with a deadline and returns the stream to use (one
that replays `trailing` first when there is any) and the addresses.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import struct
from dataclasses import dataclass
from typing import Literal

import trio

from tlsfront.config.schema import Profile
from tlsfront.net.address import Address, unmap

log = logging.getLogger("tlsfront.net.proxyproto")

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the whole line with CRLF (the spec's worst case, TCP6)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16  # signature, version/command, family/transport, length
MAX_V2_LENGTH = 4096  # addresses + TLVs accepted (the format allows 65535)

_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
# v2 family/transport bytes: (protocol name, address block length)
_Protocol = Literal["TCP4", "TCP6", "UNKNOWN"]
_V2_FAMILIES: dict[int, tuple[_Protocol, int]] = {
    0x00: ("UNKNOWN", 0),  # AF_UNSPEC
    0x11: ("TCP4", 12),  # AF_INET, STREAM
    0x21: ("TCP6", 36),  # AF_INET6, STREAM
    0x31: ("UNKNOWN", 216),  # AF_UNIX, STREAM: no IP address to give
}


class ProxyProtocolError(Exception):
    """The peer did not send a valid PROXY protocol header; `str()` says why."""


@dataclass(frozen=True)
class ProxyInfo:
    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    protocol: _Protocol
    source: tuple[str, int] | None  # the client; None for LOCAL and UNKNOWN
    destination: tuple[str, int] | None  # the address the client connected to
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 type-length-value extensions
    length: int = 0  # bytes the header took


class ProxyHeaderReader:
    """Reads one PROXY header (see the module doc). `feed` until it returns a result."""

    def __init__(self, max_v2_length: int = MAX_V2_LENGTH) -> None:
        self._max_v2_length = max_v2_length
        self._buffer = bytearray()
        self._result: ProxyInfo | None = None
        self.trailing = b""  # bytes after the header, once it is complete

    def feed(self, data: bytes) -> ProxyInfo | None:
        """Take more bytes; the header once complete, else None. Raises ProxyProtocolError."""
        if self._result is not None:
            self.trailing += data
            return self._result
        start = len(self._buffer)
        self._buffer += data
        buf = self._buffer
        if not buf:
            return None
        if buf[0:1] == b"P":
            return self._v1(start)
        if buf[0:1] == b"\r":
            return self._v2()
        raise ProxyProtocolError("no PROXY protocol header")

    def eof(self) -> None:
        """The peer closed before the header was complete."""
        if self._result is None:
            raise ProxyProtocolError("connection closed inside the PROXY header")

    def _done(self, info: ProxyInfo) -> ProxyInfo:
        self._result = info
        self.trailing = bytes(self._buffer[info.length :])
        self._buffer.clear()
        return info

    # -- v1: "PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n" -----------------

    def _v1(self, start: int) -> ProxyInfo | None:
        buf = self._buffer
        head = bytes(buf[: len(V1_PREFIX)])
        if not V1_PREFIX.startswith(head):
            raise ProxyProtocolError("no PROXY protocol header")
        lf = buf.find(b"\n", max(0, start - 1), V1_MAX)
        if lf < 0:
            if len(buf) >= V1_MAX:
                raise ProxyProtocolError("PROXY v1 line too long")
            if b"\r" in buf[len(V1_PREFIX) : -1]:
                raise ProxyProtocolError("bare CR in the PROXY v1 line")
            return None
        if lf == 0 or buf[lf - 1] != 0x0D or b"\r" in buf[: lf - 1]:
            raise ProxyProtocolError("PROXY v1 line not ended by CRLF")
        if lf < len(V1_PREFIX):
            raise ProxyProtocolError("no PROXY protocol header")
        return self._done(_parse_v1(bytes(buf[len(V1_PREFIX) : lf - 1]), lf + 1))

    # -- v2: signature, then binary --------------------------------------------

    def _v2(self) -> ProxyInfo | None:
        buf = self._buffer
        head = bytes(buf[: len(V2_SIGNATURE)])
        if not V2_SIGNATURE.startswith(head):
            raise ProxyProtocolError("no PROXY protocol header")
        if len(buf) > 12 and buf[12] >> 4 != 2:
            raise ProxyProtocolError(f"PROXY protocol version {buf[12] >> 4} is not 2")
        if len(buf) > 12 and buf[12] & 0x0F not in (0, 1):
            raise ProxyProtocolError(f"unknown PROXY v2 command {buf[12] & 0x0F}")
        proxy = len(buf) > 12 and buf[12] & 0x0F == 1
        if proxy and len(buf) > 13 and buf[13] not in _V2_FAMILIES:
            raise ProxyProtocolError(f"unsupported PROXY v2 address family 0x{buf[13]:02x}")
        if len(buf) < V2_HEADER:
            return None
        length = struct.unpack_from("!H", buf, 14)[0]
        if length > self._max_v2_length:
            raise ProxyProtocolError(f"PROXY v2 header of {length} bytes is too long")
        if proxy and length < _V2_FAMILIES[buf[13]][1]:
            raise ProxyProtocolError("PROXY v2 addresses are truncated")
        if len(buf) < V2_HEADER + length:
            return None
        return self._done(_parse_v2(bytes(buf[: V2_HEADER + length])))


def _parse_v1(line: bytes, length: int) -> ProxyInfo:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    fields = text.split(" ")
    if fields[0] == "UNKNOWN":  # anything may follow; it says nothing usable
        return ProxyInfo(1, "PROXY", "UNKNOWN", None, None, length=length)
    if fields[0] not in ("TCP4", "TCP6") or len(fields) != 5:
        raise ProxyProtocolError("malformed PROXY v1 line")
    protocol: Literal["TCP4", "TCP6"] = "TCP4" if fields[0] == "TCP4" else "TCP6"
    version = 4 if protocol == "TCP4" else 6
    source = (_ip_text(fields[1], version), _port(fields[3]))
    destination = (_ip_text(fields[2], version), _port(fields[4]))
    return ProxyInfo(1, "PROXY", protocol, source, destination, length=length)


def _ip_text(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"bad address {text!r} in the PROXY header") from None
    if ip.version != version or "%" in text:
        raise ProxyProtocolError(f"bad address {text!r} in the PROXY header")
    return str(ip)


def _port(text: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyProtocolError(f"bad port {text!r} in the PROXY header")
    return int(text)


def _parse_v2(header: bytes) -> ProxyInfo:
    command: Literal["PROXY", "LOCAL"] = "PROXY" if header[12] & 0x0F else "LOCAL"
    body = header[V2_HEADER:]
    if command == "LOCAL":  # the balancer speaking for itself; addresses ignored
        return ProxyInfo(2, "LOCAL", "UNKNOWN", None, None, length=len(header))
    protocol, size = _V2_FAMILIES[header[13]]  # checked as the bytes came
    source = destination = None
    if protocol == "TCP4":
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        source = (str(ipaddress.IPv4Address(src)), sport)
        destination = (str(ipaddress.IPv4Address(dst)), dport)
    elif protocol == "TCP6":
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        source = (str(ipaddress.IPv6Address(src)), sport)
        destination = (str(ipaddress.IPv6Address(dst)), dport)
    return ProxyInfo(2, "PROXY", protocol, source, destination, _tlvs(body[size:]), len(header))


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    found = []
    at = 0
    while at < len(data):
        if at + 3 > len(data):
            raise ProxyProtocolError("truncated PROXY v2 TLV")
        kind, size = struct.unpack_from("!BH", data, at)
        if at + 3 + size > len(data):
            raise ProxyProtocolError("truncated PROXY v2 TLV")
        found.append((kind, data[at + 3 : at + 3 + size]))
        at += 3 + size
    return tuple(found)


# ----------------------------------------------------------------------------
# The trio side


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream that first returns `prefix`, then reads from `stream`."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.transport_stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


@functools.lru_cache(maxsize=64)
def _networks(
    specs: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(spec, strict=False) for spec in specs)


def trusted(ip: str, networks: tuple[str, ...]) -> bool:
    """Whether `ip` is in one of `networks` (CIDR strings, as proxy_trusted holds them)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in _networks(networks))


async def read_proxy_header(
    stream: trio.abc.HalfCloseableStream,
) -> tuple[ProxyInfo, trio.abc.HalfCloseableStream]:
    """The header and the stream to go on with. Raises ProxyProtocolError.

    The caller bounds the time it may take.
    """
    reader = ProxyHeaderReader()
    while True:
        data = await stream.receive_some(4096)
        if not data:
            reader.eof()
        info = reader.feed(bytes(data))
        if info is not None:
            break
    rest = reader.trailing
    return info, (PrefixedStream(stream, rest) if rest else stream)


async def accept_proxied(
    stream: trio.abc.HalfCloseableStream, peer: Address, local: Address, profile: Profile
) -> tuple[trio.abc.HalfCloseableStream, Address, Address] | None:
    """(stream, client, local) for a connection on a proxy_protocol profile.

    None when the connection was closed: an untrusted peer, or no valid
    header within the profile's timeout_handshake.
    """
    if not trusted(peer.ip, profile.proxy_trusted):
        log.info("profile %s: [%s] is not in proxy_trusted: closed", profile.name, peer.ip)
        await trio.aclose_forcefully(stream)
        return None
    try:
        with trio.fail_after(profile.timeout_handshake):
            info, rest = await read_proxy_header(stream)
    except (ProxyProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        why = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
        log.warning("profile %s: PROXY header from [%s]: %s: closed", profile.name, peer.ip, why)
        await trio.aclose_forcefully(stream)
        return None
    if info.source is None or info.destination is None:
        return rest, peer, local  # LOCAL (a health check) or UNKNOWN
    client = Address(unmap(info.source[0]), info.source[1])
    return rest, client, Address(unmap(info.destination[0]), info.destination[1])


__all__ = [
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "PrefixedStream",
    "ProxyHeaderReader",
    "ProxyInfo",
    "ProxyProtocolError",
    "accept_proxied",
    "read_proxy_header",
    "trusted",
]
