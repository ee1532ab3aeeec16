"""Commands tlsfront answers itself: everything but the greeting verbs before
TLS on a `require_tls` profile, and a client's XFORWARD.

A `530` before STARTTLS has to hold for every verb the backend might act on
or leak from (VRFY and EXPN probe mailboxes, HELP names the software), not
only for the mail transaction; an unknown verb too, since the backend may
know it. XFORWARD overwrites the client's identity at a Postfix-style backend
and is never forwarded. The recording backend shows what reached it.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trio
from support.front import Front
from support.hostile import Client, RecordingBackend, SessionLog, code, session_log

READY = b"220 2.0.0 Ready to start TLS\r\n"
MUST_TLS = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
NOT_IMPLEMENTED = b"502 5.5.1 Error: command not implemented\r\n"

PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {{cert}}
backend_connect = "{backend}"
require_tls = {require}
"""

BEFORE_TLS = [
    b"VRFY postmaster",
    b"EXPN staff",
    b"HELP",
    b"XFORWARD ADDR=192.0.2.1",
    b"XYZZY plugh",
    b"MAIL FROM:<a@example.net>",
    b"RCPT TO:<b@example.org>",
    b"DATA",
]


@pytest.fixture
async def recorder(nursery: trio.Nursery) -> RecordingBackend:
    return await RecordingBackend().start(nursery)


@pytest.fixture
def log() -> Any:
    with session_log() as handler:
        yield handler


async def front_for(start_front: Any, recorder: RecordingBackend, require: bool) -> Front:
    text = PROFILE.format(backend=recorder.address, require="true" if require else "false")
    front: Front = await start_front(text)
    return front


async def test_nothing_but_the_greeting_verbs_before_tls(
    start_front: Any,
    recorder: RecordingBackend,
    client_context: ssl.SSLContext,
    log: SessionLog,
) -> None:
    """Each verb gets 530 and never reaches the backend; then STARTTLS, and
    the same connection delivers a message."""
    front = await front_for(start_front, recorder, True)
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        assert code(await client.command(b"EHLO client.example")) == 250
        for line in BEFORE_TLS:
            assert await client.command(line) == MUST_TLS, line
        assert code(await client.command(b"NOOP")) == 250
        assert await client.command(b"STARTTLS") == READY
        await client.starttls(client_context)
        assert code(await client.command(b"EHLO client.example")) == 250
        assert await client.command(b"MAIL FROM:<a@example.net>") == b"250 ok\r\n"
        assert await client.command(b"RCPT TO:<b@example.org>") == b"250 ok\r\n"
        assert await client.command(b"DATA") == b"354 go ahead\r\n"
        assert await client.command(b"Subject: after tls\r\n\r\nhi\r\n.") == b"250 ok 1\r\n"
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
        await recorder.all_done()
    # The probe, at start; then one backend, at MAIL inside TLS: nothing
    # before TLS needed one.
    probe, tls = recorder.conversations
    assert probe.commands == [b"EHLO front.example.org\r\n", b"QUIT\r\n"]
    assert tls.commands[:2] == [b"EHLO client.example\r\n", b"MAIL FROM:<a@example.net>\r\n"]
    for line in BEFORE_TLS[:5]:  # the envelope verbs came again after TLS
        assert line.split()[0] not in bytes(tls.received)
    assert len(tls.messages) == 1
    assert b"Subject: after tls" in tls.messages[0]


@pytest.mark.parametrize("tls", [False, True])
async def test_a_clients_xforward_is_refused(
    start_front: Any,
    recorder: RecordingBackend,
    client_context: ssl.SSLContext,
    log: SessionLog,
    tls: bool,
) -> None:
    """XFORWARD gets tlsfront's own 502, in clear and over TLS, and the
    backend never sees it; the session goes on."""
    front = await front_for(start_front, recorder, False)
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        if tls:
            assert await client.command(b"STARTTLS") == READY
            await client.starttls(client_context)
        assert code(await client.command(b"EHLO client.example")) == 250
        assert await client.command(b"XFORWARD ADDR=192.0.2.1 NAME=spoof") == NOT_IMPLEMENTED
        assert await client.command(b"MAIL FROM:<a@example.net>") == b"250 ok\r\n"
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
        await recorder.all_done()
    for conv in recorder.conversations:
        assert b"XFORWARD" not in bytes(conv.received)
