"""A real `Session` on virtual time: in-memory streams, an in-process backend.

trio's MockClock (the `autojump_clock` fixture) jumps to the next deadline
whenever every task waits, so a 300-second timeout costs nothing. The
backend starts at connect (`backend_start = "connect"`): a backend for every
connection from its first byte is the most a client can make tlsfront hold. The
client side is a trio stream the test drives; the backend is a
`RecordingBackend` conversation over an in-memory stream. `Traced` measures
what the session allocates with tracemalloc.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import trio
import trio.testing

from support.hostile import MemoryBackend, RecordingBackend
from tlsfront.config.files import parse_config
from tlsfront.config.schema import Profile
from tlsfront.inbound.backend import Backend
from tlsfront.inbound.profileruntime import ProfileRuntime
from tlsfront.inbound.ratelimit import TLSRateLimiter
from tlsfront.inbound.session import Session
from tlsfront.net.address import Address

VT_PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "{tls}"
cert = "{cert}"
backend = ["/bin/false"]
hostname = "front.example.org"
backend_start = "connect"
timeout_handshake = 30
timeout_command = 300
timeout_data = 300
min_data_rate = 500
"""


def vt_profile(tls_dir: Path, tls: str = "starttls", extra: str = "") -> Profile:
    text = VT_PROFILE.format(tls=tls, cert=tls_dir / "servercert.pem") + extra
    return parse_config(text).profiles["smtp"]


class VirtualSession:
    """A Session on in-memory streams, its backend recorded in process."""

    def __init__(
        self,
        nursery: trio.Nursery,
        profile: Profile,
        *,
        lockstep: bool = False,
        tls_rate: TLSRateLimiter | None = None,
        client_ip: str = "192.0.2.1",
        recorder: RecordingBackend | None = None,
    ) -> None:
        pair: tuple[trio.abc.Stream, trio.abc.Stream]
        if lockstep:
            pair = trio.testing.lockstep_stream_pair()
        else:
            pair = trio.testing.memory_stream_pair()
        self.client: trio.abc.Stream = pair[0]
        server_side = pair[1]
        self.recorder = RecordingBackend() if recorder is None else recorder
        self.done = trio.Event()

        async def starter(_p: Profile, _env: object, _relay: bool) -> Backend:
            return MemoryBackend(self.recorder, nursery)

        self.session = Session(
            ProfileRuntime.build(profile),
            server_side,
            Address(client_ip, 4444),
            Address("127.0.0.1", 25),
            backend_starter=starter,
            tls_rate=tls_rate,
        )

        async def run() -> None:
            await self.session.run()
            self.done.set()

        nursery.start_soon(run)

    async def read_until(self, end: bytes) -> bytes:
        data = b""
        while not data.endswith(end):
            chunk = await self.client.receive_some()
            assert chunk, data
            data += chunk
        return data

    async def rest(self) -> bytes:
        data = b""
        try:
            while chunk := await self.client.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            pass
        return data


async def trickle(stream: trio.abc.SendStream, data: bytes, interval: float) -> int:
    """One byte every `interval` seconds until the peer hangs up; returns bytes sent."""
    sent = 0
    try:
        for byte in data:
            await stream.send_all(bytes([byte]))
            sent += 1
            await trio.sleep(interval)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return sent


class Traced:
    """tracemalloc for the length of a `with`; `growth()` and `peak()` in bytes."""

    def __enter__(self) -> Traced:
        self._was_tracing = tracemalloc.is_tracing()
        if not self._was_tracing:
            tracemalloc.start()
        gc.collect()
        tracemalloc.reset_peak()
        self.start = tracemalloc.get_traced_memory()[0]
        return self

    def growth(self) -> int:
        return tracemalloc.get_traced_memory()[0] - self.start

    def peak(self) -> int:
        return tracemalloc.get_traced_memory()[1] - self.start

    def __exit__(self, *exc: object) -> None:
        if not self._was_tracing:
            tracemalloc.stop()
