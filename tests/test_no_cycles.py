"""A finished session is freed by reference counting alone.

A session's objects (its dialogues, TLS stream, record...) that sit in a
reference cycle live on until the garbage collector finds them, and every
object that survives a collection makes the next ones dearer: under load the
collector's passes over them cost more per session than the SMTP dialogue
does. So no session leaves a cycle behind: the dialogue's helpers are given
the dialogue with each call instead of keeping it.
"""

from __future__ import annotations

import gc
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from support.front import Front
from support.hostile import SessionLog
from support.ucspi import Lines
from test_ondemand import IMPLICIT, LIMIT, PROFILE, log, mail, plain, starttls

__all__ = ["log"]  # the fixture, from test_ondemand


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The collector stopped, so that only a cycle can leave garbage behind."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def cyclic_tlsfront_objects() -> list[str]:
    """The type names of tlsfront objects that only the collector could free."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        names = sorted(
            {type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("tlsfront.")}
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return names


async def starttls_session_with_mail(front: Front, context: ssl.SSLContext) -> None:
    _, lines = await plain(front)
    assert (await lines.reply()).startswith(b"220 ")
    assert b"STARTTLS" in await lines.command(b"EHLO client.example")
    tls = await starttls(lines, context)
    await mail(tls)
    assert (await tls.command(b"QUIT")).startswith(b"221 ")
    await tls.stream.aclose()


async def implicit_session_without_mail(front: Front, context: ssl.SSLContext) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", front.port("smtps"))
    lines = Lines(trio.SSLStream(tcp, context, server_hostname="localhost"))
    assert (await lines.reply()).startswith(b"220 ")
    assert (await lines.command(b"EHLO scanner.example")).startswith(b"250")
    assert (await lines.command(b"QUIT")).startswith(b"221 ")
    await lines.stream.aclose()


async def failed_handshakes(front: Front) -> None:
    """A client that speaks plaintext to the implicit-TLS port, and one that
    leaves in the middle of its ClientHello."""
    tcp = await trio.open_tcp_stream("127.0.0.1", front.port("smtps"))
    await tcp.send_all(b"EHLO not-tls.example\r\n")
    while await tcp.receive_some(4096):
        pass
    await tcp.aclose()
    tcp = await trio.open_tcp_stream("127.0.0.1", front.port("smtps"))
    await tcp.send_all(bytes.fromhex("16030100c8010000c40303"))  # a ClientHello's start
    await tcp.aclose()


async def test_finished_sessions_leave_no_reference_cycles(
    start_front: Any, client_context: ssl.SSLContext, log: SessionLog, collector_off: None
) -> None:
    front: Front = await start_front(PROFILE + IMPLICIT)
    with trio.fail_after(LIMIT):
        await starttls_session_with_mail(front, client_context)
        await implicit_session_without_mail(front, client_context)
        await failed_handshakes(front)
        await log.wait_ends(4)
        await trio.testing.wait_all_tasks_blocked()
    assert len(front.maildir()) == 1  # the sessions did their work
    assert any("outcome=tls_failed reason='TLS handshake failed: not TLS'" in e for e in log.ends)
    assert cyclic_tlsfront_objects() == []
