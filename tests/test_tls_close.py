"""A session that ends with a fatal reply ends its TLS with close_notify.

After `500 5.5.2` (a line too long) or `421` (a timeout) tlsfront closes the
connection. The client must read the reply and then a clean end of the TLS
stream: without close_notify, Python's ssl client (like most) reports the
truncation as an error (SSLEOFError), and an MTA may log or retry it as a
lost connection rather than the reply it got.

The client is Python's ssl module through trio.SSLStream (not
https_compatible, so a missing close_notify raises), on an in-memory stream to
the real session code, so virtual time can run the timeout.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path

import trio
import trio.testing

from tlsfront.config.files import parse_config
from tlsfront.inbound.backend import Backend
from tlsfront.inbound.profileruntime import ProfileRuntime
from tlsfront.inbound.session import Session
from tlsfront.net.address import Address

PROFILE = """
[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = "{cert}"
backend = ["/bin/false"]
hostname = "front.example.org"
timeout_command = 300
timeout_handshake = 30
"""


class Responder:
    """A backend that greets and says 250 to every line."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(self._respond, theirs)

    async def _respond(self, stream: trio.abc.Stream) -> None:
        await stream.send_all(b"220 backend ESMTP\r\n")
        while data := await stream.receive_some():
            await stream.send_all(b"250 ok\r\n" * data.count(b"\n"))

    async def send_all(self, data: bytes) -> None:
        await self.ours.send_all(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        return bytes(await self.ours.receive_some(max_bytes))

    async def send_eof(self) -> None:
        await self.ours.send_stream.aclose()

    async def aclose(self) -> int | None:
        await self.ours.aclose()
        return 0


async def tls_session(
    nursery: trio.Nursery, tls_dir: Path, client_context: ssl.SSLContext
) -> trio.SSLStream[trio.abc.Stream]:
    """A session on an implicit-TLS profile; the client's stream, after the greeting."""
    profile = parse_config(PROFILE.format(cert=tls_dir / "servercert.pem")).profiles["smtps"]
    client_side, server_side = trio.testing.memory_stream_pair()
    responder = Responder(nursery)

    async def starter(_p: object, _env: Mapping[str, str], _relay: bool) -> Backend:
        return responder

    session = Session(
        ProfileRuntime.build(profile),
        server_side,
        Address("192.0.2.1", 4444),
        Address("127.0.0.1", 465),
        backend_starter=starter,
    )
    nursery.start_soon(session.run)
    client: trio.SSLStream[trio.abc.Stream]
    client = trio.SSLStream(client_side, client_context, server_hostname="localhost")
    # tlsfront's own greeting: the backend starts on demand (no probe here)
    assert await client.receive_some() == b"220 front.example.org ESMTP\r\n"
    return client


async def read_to_the_end(client: trio.SSLStream[trio.abc.Stream]) -> bytes:
    """Everything until the end of the TLS stream; a truncation raises."""
    data = b""
    while chunk := await client.receive_some():
        data += chunk
    return data


async def test_line_too_long_then_close_notify(
    nursery: trio.Nursery, tls_dir: Path, client_context: ssl.SSLContext
) -> None:
    with trio.fail_after(20):
        client = await tls_session(nursery, tls_dir, client_context)
        await client.send_all(b"EHLO " + b"x" * 4000 + b"\r\n")
        assert await read_to_the_end(client) == b"500 5.5.2 Error: line too long\r\n"


async def test_timeout_then_close_notify(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    tls_dir: Path,
    client_context: ssl.SSLContext,
) -> None:
    client = await tls_session(nursery, tls_dir, client_context)
    assert await read_to_the_end(client) == (
        b"421 4.4.2 front.example.org Error: timeout exceeded\r\n"
    )
