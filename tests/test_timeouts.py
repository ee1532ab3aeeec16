"""Timeouts on virtual time (threats `slow-clients`, `false-acknowledgement`).

The client is an in-memory stream and the backend an in-process qmail-like
responder, so trio's MockClock can jump: a real process or socket would let
the clock run ahead of I/O. Everything else is the real session code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
import trio.testing

from tlsfront.config.files import parse_config
from tlsfront.config.schema import Profile
from tlsfront.inbound.backend import Backend
from tlsfront.inbound.profileruntime import ProfileRuntime
from tlsfront.inbound.session import Session
from tlsfront.net.address import Address

PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "{tls}"
{cert}
backend = ["/bin/false"]
hostname = "front.example.org"
timeout_command = 300
timeout_data = 300
timeout_handshake = 30
timeout_backend = 120
min_data_rate = 500
"""


def profile(tls_dir: Path, tls: str = "none") -> Profile:
    cert = f'cert = "{tls_dir / "servercert.pem"}"' if tls != "none" else ""
    return parse_config(PROFILE.format(tls=tls, cert=cert)).profiles["smtp"]


class InProcessBackend:
    """A qmail-smtpd-like responder on a memory stream; `dot_delay` stalls the dot."""

    def __init__(self, nursery: trio.Nursery, dot_delay: float = 0.0) -> None:
        self.ours, theirs = trio.testing.memory_stream_pair()
        self.received = b""
        self.dot_delay = dot_delay
        nursery.start_soon(self._respond, theirs)

    async def _respond(self, stream: trio.abc.Stream) -> None:
        await stream.send_all(b"220 backend ESMTP\r\n")
        buffer = b""
        in_data = False
        while data := await stream.receive_some():
            self.received += data
            buffer += data
            while True:
                if in_data:
                    end = buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    buffer = buffer[end + 5 :]
                    in_data = False
                    await trio.sleep(self.dot_delay)
                    await stream.send_all(b"250 ok\r\n")
                    continue
                line, sep, rest = buffer.partition(b"\r\n")
                if not sep:
                    break
                buffer = rest
                if line.upper() == b"DATA":
                    in_data = True
                    await stream.send_all(b"354 go ahead\r\n")
                elif line.upper() == b"QUIT":
                    await stream.send_all(b"221 bye\r\n")
                    return
                else:
                    await stream.send_all(b"250 ok\r\n")

    async def send_all(self, data: bytes) -> None:
        await self.ours.send_all(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        return bytes(await self.ours.receive_some(max_bytes))

    async def send_eof(self) -> None:
        await self.ours.send_stream.aclose()

    async def aclose(self) -> int | None:
        await self.ours.aclose()
        return 0


async def run_session(
    nursery: trio.Nursery, p: Profile, dot_delay: float = 0.0
) -> tuple[trio.abc.Stream, InProcessBackend]:
    client, server_side = trio.testing.memory_stream_pair()
    backend = InProcessBackend(nursery, dot_delay)

    async def starter(_p: Profile, _env: Mapping[str, str], _relay: bool) -> Backend:
        return backend

    session = Session(
        ProfileRuntime.build(p),
        server_side,
        Address("192.0.2.1", 4444),
        Address("127.0.0.1", 25),
        backend_starter=starter,
    )
    nursery.start_soon(session.run)
    return client, backend


# tlsfront's greeting: the backend starts on demand, at the first command
# that needs it (no probe ran for this runtime: the host name, no extensions)
GREETING = b"220 front.example.org ESMTP\r\n"


async def trickle(stream: trio.abc.Stream, data: bytes) -> None:
    """One byte a second until tlsfront closes the connection."""
    with pytest.raises(trio.BrokenResourceError):  # noqa: PT012 (the loop is the point)
        for byte in data:
            await stream.send_all(bytes([byte]))
            await trio.sleep(1)


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


async def test_idle_client_after_greeting(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    client, _ = await run_session(nursery, profile(tls_dir))
    start = trio.current_time()
    data = await read_until_closed(client)
    assert data == GREETING + b"421 4.4.2 front.example.org Error: timeout exceeded\r\n"
    assert 300 <= trio.current_time() - start < 301


async def test_one_byte_a_second_in_a_command(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """A trickled command line does not reset the command timer."""
    client, backend = await run_session(nursery, profile(tls_dir))
    assert await client.receive_some() == GREETING
    start = trio.current_time()
    await trickle(client, b"NOOP " * 200)
    closed_at = trio.current_time() - start
    assert 300 <= closed_at < 302
    assert b"421 4.4.2" in await read_until_closed(client)
    assert backend.received == b""


async def test_slow_body_is_cut_by_the_minimum_data_rate(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    client, backend = await run_session(nursery, profile(tls_dir))
    await client.send_all(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    replies = b""
    while not replies.endswith(b"354 go ahead\r\n"):
        replies += await client.receive_some()
    start = trio.current_time()
    await trickle(client, b"x" * 2000)
    assert 300 <= trio.current_time() - start < 302
    assert (await read_until_closed(client)).startswith(b"421 4.4.2")
    assert b"\r\n.\r\n" not in backend.received


async def test_starttls_without_a_client_hello(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """threats `handshake-failure`, `slow-clients`: the handshake has its own, shorter, timeout."""
    client, backend = await run_session(nursery, profile(tls_dir, "starttls"))
    assert await client.receive_some() == GREETING
    await client.send_all(b"STARTTLS\r\n")
    assert await client.receive_some() == b"220 2.0.0 Ready to start TLS\r\n"
    start = trio.current_time()
    await client.send_all(b"\x16\x03\x01")  # half a record header, then silence
    assert await read_until_closed(client) == b""
    assert 30 <= trio.current_time() - start < 31
    assert backend.received == b""


@pytest.mark.parametrize("delay", [119.0, 121.0])
async def test_slow_backend_at_the_dot(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery, delay: float
) -> None:
    """threat `false-acknowledgement`: a 250 only from the backend, a 451 when it is too slow."""
    client, _ = await run_session(nursery, profile(tls_dir), dot_delay=delay)
    await client.send_all(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    replies = b""
    while not replies.endswith(b"354 go ahead\r\n"):
        replies += await client.receive_some()
    await client.send_all(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    reply = await client.receive_some()
    if delay < 120:
        assert reply == b"250 ok\r\n"
    else:
        assert reply == b"451 4.3.0 Error: backend failed, message not accepted\r\n"
