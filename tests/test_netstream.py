"""NetStream: trio.SocketStream's semantics without a task switch per call."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from tlsfront.net.netstream import NetStream

pytestmark = pytest.mark.trio


async def pair() -> tuple[NetStream, NetStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    with trio.fail_after(5):
        client = await NetStream.connect("127.0.0.1", port)
        accepted = await listener.accept()
    await listener.aclose()
    return client, NetStream.adopt(accepted)


async def test_round_trip_and_half_close() -> None:
    a, b = await pair()
    with trio.fail_after(5):
        await a.send_all(b"EHLO x\r\n")
        assert await b.receive_some(100) == b"EHLO x\r\n"
        await a.send_eof()
        assert await b.receive_some(100) == b""  # EOF, and b can still send
        await b.send_all(b"221 bye\r\n")
        assert await a.receive_some(100) == b"221 bye\r\n"
    assert a.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert b.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await a.aclose()
    await b.aclose()


async def test_a_send_larger_than_the_buffers_waits_and_completes() -> None:
    a, b = await pair()
    a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 16384  # 4 MiB: the first send cannot take it all
    received = bytearray()

    async def reader() -> None:
        while len(received) < len(data):
            chunk = await b.receive_some(65536)
            assert chunk
            received.extend(chunk)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await a.send_all(data)
    assert bytes(received) == data
    await a.aclose()
    await b.aclose()


async def test_closed_and_broken() -> None:
    a, b = await pair()
    await a.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await a.receive_some(10)
    # d's peer is gone with a reset (SO_LINGER 0): d's next read fails as broken
    c, d = await pair()
    c.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await c.aclose()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await d.receive_some(10)  # ECONNRESET
    await b.aclose()
    await d.aclose()


async def test_closing_wakes_a_waiting_reader() -> None:
    a, b = await pair()

    async def read() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await a.receive_some(10)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await a.aclose()
    await b.aclose()


async def test_a_peer_that_never_reads_blocks_the_sender_and_a_second_sender_is_an_error() -> None:
    a, b = await pair()
    a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    finished = False

    async def fill() -> None:
        nonlocal finished
        await a.send_all(b"x" * (8 << 20))  # blocks: nobody reads
        finished = True

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fill)
            await trio.testing.wait_all_tasks_blocked()
            assert not finished
            with pytest.raises(trio.BusyResourceError):
                await a.send_all(b"y")
            nursery.cancel_scope.cancel()
    assert not finished
    await a.aclose()
    await b.aclose()


async def test_a_flooding_peer_does_not_starve_other_tasks() -> None:
    """Data always ready: receive_some still yields, so others run."""
    a, b = await pair()
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(5):
        await a.send_all(b"x" * 200_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            got = 0
            while got < 200_000:
                got += len(await b.receive_some(1000))  # always ready: 200 reads
            nursery.cancel_scope.cancel()
    assert ticks >= 150
    await a.aclose()
    await b.aclose()


async def test_connect_refused_is_an_oserror() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with trio.fail_after(5), pytest.raises(ConnectionRefusedError):
        await NetStream.connect("127.0.0.1", port)


async def test_receive_now_takes_what_is_there_without_waiting() -> None:
    """Into a caller's buffer: the count, None when nothing is there, 0 at EOF."""
    a, b = await pair()
    buffer = bytearray(1000)
    with trio.fail_after(5):
        assert b.receive_now(buffer) is None  # nothing yet: no wait
        await a.send_all(b"EHLO x\r\n")
        await trio.lowlevel.wait_readable(b.socket)
        assert b.receive_now(buffer) == 8
        assert buffer[:8] == b"EHLO x\r\n"
        await a.send_all(b"y" * 200_000)
        got = 0
        while got < 200_000:
            n = b.receive_now(buffer)
            if n is None:
                await trio.lowlevel.wait_readable(b.socket)
                continue
            assert n
            assert buffer[:n] == b"y" * n
            got += n
        assert b.receive_now(buffer) is None
        await a.send_eof()
        await trio.lowlevel.wait_readable(b.socket)
        assert b.receive_now(buffer) == 0
    await b.aclose()
    with pytest.raises(trio.ClosedResourceError):
        b.receive_now(buffer)
    await a.aclose()
