"""Refusals on an implicit-TLS port, observed on the wire.

On port 465 the client speaks first, with a ClientHello; a connection over
a limit is closed before any TLS, since a 421 in clear would be garbage to a
TLS client. These tests send a real ClientHello (made by Python's ssl module
over memory buffers) on a raw socket and read every byte that comes back:
past `max_per_ip` or `max_connections` nothing does, no ServerHello (a
handshake record starts with 0x16), no 421. A connection within the limits
sends the same ClientHello and does get a ServerHello, so the tests can see
one when it comes.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import pytest
import trio
from support.front import Front

HANDSHAKE = 0x16  # TLS record type of a ServerHello

PROFILE = """
[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = {cert}
backend = {backend}
"""


def client_hello() -> bytes:
    """The first flight of a real TLS client: one ClientHello record."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == HANDSHAKE  # a handshake record
    assert hello[5] == 1  # holding a ClientHello
    return hello


async def everything_back(stream: trio.SocketStream, limit: int = 1 << 16) -> bytes:
    """All bytes until the close (a reset counts as the close), at most `limit`;
    a TLS handshake record ends the wait at once (the server would wait for
    the client's next flight)."""
    data = b""
    while len(data) < limit:
        try:
            chunk = await stream.receive_some()
        except trio.BrokenResourceError:
            break
        if not chunk:
            break
        data += chunk
        if data[0] == HANDSHAKE:
            break
    return data


async def hello_and_answer(port: int) -> bytes:
    """Connect, send a ClientHello, return what comes back up to the close."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        with contextlib.suppress(trio.BrokenResourceError):  # closed: the read sees it
            await stream.send_all(client_hello())
        return await everything_back(stream)
    finally:
        await stream.aclose()


async def first_record(stream: trio.SocketStream) -> int:
    """Send a ClientHello; the type of the first record that comes back."""
    await stream.send_all(client_hello())
    data = await stream.receive_some()
    assert data, "closed"
    return data[0]


@pytest.mark.parametrize("limit", ["max_per_ip", "max_connections"])
async def test_no_server_hello_past_a_connection_limit(start_front: Any, limit: str) -> None:
    other = "max_connections" if limit == "max_per_ip" else "max_per_ip"
    front: Front = await start_front(PROFILE + f"{limit} = 2\n{other} = 100\n")
    port = front.port("smtps")
    with trio.fail_after(20):
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        # the held connections are within the limit: a ServerHello comes back
        assert await first_record(held[0]) == HANDSHAKE
        # the third: closed with not a byte sent, neither TLS nor a 421 in clear
        assert await hello_and_answer(port) == b""
        for stream in held:
            await stream.aclose()


async def test_plaintext_to_the_implicit_port_is_closed_in_silence(start_front: Any) -> None:
    """An SMTP command instead of a ClientHello: the connection is closed at
    once (well within the handshake timeout) and nothing at all comes back,
    no 220 or other SMTP reply in clear, no TLS record; no backend starts."""
    front: Front = await start_front(PROFILE + "timeout_handshake = 60\n")
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", front.port("smtps"))
        await stream.send_all(b"EHLO x\r\n")
        data = await everything_back(stream)
        await stream.aclose()
    assert data == b""
    assert front.sessions() == []
