"""`min_data_rate` both ways, on virtual time.

A body's deadline is timeout_data from the start of the body plus one
second for every `min_data_rate` bytes received. So a body that keeps up
the rate may take longer than timeout_data in all, and a body that never
pauses for timeout_data but stays below the rate is cut when its budget
runs out: at 400 bytes/s against 500 bytes/s and 300 s, after t seconds
with 300 + 400 t / 500 = t, that is t = 1500 s.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from support.virtual import VirtualSession, vt_profile

LINE = b"z" * 98 + b"\r\n"  # 100 bytes
ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"


async def body_at(vs: VirtualSession, rate: int, seconds: int) -> None:
    """`rate` bytes a second (lines sent every 5 s) for `seconds`, then the dot."""
    chunk = LINE * (rate * 5 // len(LINE))
    try:
        for _ in range(seconds // 5):
            await vs.client.send_all(chunk)
            await trio.sleep(5)
        await vs.client.send_all(b".\r\nQUIT\r\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def test_a_fast_body_may_outlast_timeout_data(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """1000 bytes/s for 900 s, three times timeout_data: delivered."""
    vs = VirtualSession(nursery, vt_profile(tls_dir))
    await vs.client.send_all(ENVELOPE)
    await vs.read_until(b"354 go ahead\r\n")
    start = trio.current_time()
    nursery.start_soon(body_at, vs, 1000, 900)
    rest = await vs.rest()
    assert trio.current_time() - start >= 900
    assert rest == b"250 ok 1\r\n221 backend.example.org\r\n"
    (conv,) = vs.recorder.conversations
    (message,) = conv.messages
    assert message.count(LINE) == 9000


async def test_a_slow_body_is_cut_when_its_budget_runs_out(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """400 bytes/s, never idle for more than 5 s: 421 at 1500 s (give or take
    one 5-second step), nothing delivered."""
    vs = VirtualSession(nursery, vt_profile(tls_dir))
    await vs.client.send_all(ENVELOPE)
    await vs.read_until(b"354 go ahead\r\n")
    start = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(body_at, vs, 400, 3000)
        rest = await vs.rest()
        elapsed = trio.current_time() - start
        inner.cancel_scope.cancel()
    assert rest == b"421 4.4.2 front.example.org Error: timeout exceeded\r\n"
    assert 1495 <= elapsed <= 1505, elapsed
    (conv,) = vs.recorder.conversations
    await conv.done.wait()
    assert conv.messages == []
