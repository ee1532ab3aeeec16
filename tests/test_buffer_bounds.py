"""The session's buffers stay bounded whatever the client sends.

Two bounds, each on virtual time with a lockstep client stream (a write
completes only as the session reads it, as with a full TCP window), so the
test sees exactly how much the session took in:

* replies the client does not read: past the client outbox's high-water
  mark the session stops reading commands, so a client that pipelines
  10 MB of NOOPs and never reads costs a bounded amount of memory, and the
  session ends at `timeout_command`;
* a body sent behind DATA before the backend's reply: at most
  `DATA_WAIT_BUFFER` is read ahead and held; the rest waits in the client's
  stream until the 354, then goes through whole.

The backend reply line bound (4,096 octets) is tested with a real process
in test_backend_faults.py (mode `endless-line`).
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from support.hostile import RecordingBackend
from support.virtual import Traced, VirtualSession, vt_profile

from tlsfront.inbound.phase import HIGH_WATER
from tlsfront.smtp.dialogue import DATA_WAIT_BUFFER

CHUNK = 4096


class Sender:
    """Writes `total` bytes of `pattern` in CHUNK writes, counting what was taken."""

    def __init__(self, stream: trio.abc.SendStream, pattern: bytes, total: int) -> None:
        assert CHUNK % len(pattern) == 0
        self.stream = stream
        self.chunk = pattern * (CHUNK // len(pattern))
        self.total = total
        self.taken = 0
        self.finished = trio.Event()

    async def run(self) -> None:
        try:
            while self.taken < self.total:
                await self.stream.send_all(self.chunk)
                self.taken += CHUNK
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.finished.set()


async def test_ten_megabytes_pipelined_to_a_client_that_never_reads(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """10 MB of NOOPs in one go, no reply ever read: the session takes in a
    bounded amount (its reply to the client cannot go out, so the backend's
    replies wait, so the pipelining depth fills, so reading stops), its
    memory stays bounded, and it ends at timeout_command, not later."""
    vs = VirtualSession(nursery, vt_profile(tls_dir), lockstep=True)
    sender = Sender(vs.client, b"NOOP 1\r\n", 10 << 20)
    start = trio.current_time()
    with Traced() as traced:
        nursery.start_soon(sender.run)
        with trio.fail_after(3600):
            await vs.done.wait()
        elapsed = trio.current_time() - start
        peak = traced.peak()
    assert 300 <= elapsed <= 301
    assert vs.session.record.reason == "client timed out"
    assert sender.taken < HIGH_WATER
    assert peak < 1 << 20, peak
    (conv,) = vs.recorder.conversations
    with trio.fail_after(5):
        await conv.done.wait()  # the backend got its EOF
    assert len(conv.received) <= sender.taken


async def test_body_behind_a_held_data_is_read_ahead_only_so_far(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """1 MiB of body sent while the backend holds its reply to DATA: the
    session reads ahead at most DATA_WAIT_BUFFER (and one read more), the
    backend sees none of it; after the 354 all of it goes through, whole."""
    release = trio.Event()
    recorder = RecordingBackend(hold_data=release)
    # a body before the 354 is refused unless the profile relaxes that rule
    relaxed = vt_profile(tls_dir, extra="pipelining_strict = false\n")
    vs = VirtualSession(nursery, relaxed, lockstep=True, recorder=recorder)
    envelope = b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
    replies = bytearray()

    async def read_replies() -> None:
        while chunk := await vs.client.receive_some():
            replies.extend(chunk)

    nursery.start_soon(read_replies)
    with trio.fail_after(60):
        await vs.client.send_all(envelope)
        (conv,) = recorder.conversations
        await conv.data_command.wait()
        line = b"y" * 62 + b"\r\n"
        body = Sender(vs.client, line, 1 << 20)
        nursery.start_soon(body.run)
        await trio.testing.wait_all_tasks_blocked()
        held = body.taken
        assert bytes(conv.received) == envelope
        release.set()
        await body.finished.wait()
        await vs.client.send_all(b".\r\nQUIT\r\n")
        await vs.done.wait()
    assert DATA_WAIT_BUFFER <= held <= DATA_WAIT_BUFFER + 65536, held
    (message,) = conv.messages
    assert message.count(line) == (1 << 20) // len(line)
    assert replies.endswith(b"354 go ahead\r\n250 ok 1\r\n221 backend.example.org\r\n")
