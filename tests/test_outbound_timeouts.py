"""Timeouts of the outbound relay, on virtual time (remote servers in memory)."""

from __future__ import annotations

from functools import partial

import trio
import trio.testing
from support.outbound_fakes import (
    FakeMx,
    make_runtime,
    memory_connector,
    outbound_profile,
    relay_message,
)

from tlsfront.outbound.listener import serve_outbound

RCPT = b"bob@example.test"
ROUTES = {"example.test": "192.0.2.1:25"}  # never dialled: the connector is in memory


async def test_connect_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    profile = outbound_profile(routes=ROUTES, timeout_connect=30.0)
    runtime = make_runtime(connect=memory_connector(nursery, None))
    start = trio.current_time()
    result = await relay_message(profile, runtime, [RCPT])
    assert result.rcpt[0].startswith(b"451 4.4.0 ")
    assert b"connect timed out" in result.rcpt[0]
    assert trio.current_time() - start >= 30.0


async def test_silent_server_times_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    profile = outbound_profile(routes=ROUTES, timeout_command=300.0)
    runtime = make_runtime(connect=memory_connector(nursery, FakeMx(silent=True)))
    start = trio.current_time()
    result = await relay_message(profile, runtime, [RCPT])
    assert result.rcpt[0].startswith(b"451 4.4.0 ")
    assert b"timeout waiting for the server's reply" in result.rcpt[0]
    assert 300.0 <= trio.current_time() - start < 400.0


async def test_no_reply_to_the_final_dot_is_a_4xx(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    mx = FakeMx(hang_at_dot=True)
    profile = outbound_profile(routes=ROUTES, timeout_command=60.0, timeout_data=600.0)
    runtime = make_runtime(connect=memory_connector(nursery, mx))
    start = trio.current_time()
    result = await relay_message(profile, runtime, [RCPT])
    assert result.rcpt == [b"250 2.1.5 ok"]
    assert result.dot.startswith(b"451 4.4.2 ")
    assert trio.current_time() - start >= 600.0


async def test_idle_qmail_remote_gets_421(autojump_clock: trio.testing.MockClock) -> None:
    profile = outbound_profile(routes=ROUTES, timeout_command=120.0)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_outbound, runtime=make_runtime()), server, "::1", profile)
        received = b""
        while not received.endswith(b"closing connection\r\n"):
            chunk = await client.receive_some(4096)
            assert chunk
            received += chunk
    assert received.split(b"\r\n")[1].startswith(b"421 4.4.2 ")
    assert trio.current_time() >= 120.0
