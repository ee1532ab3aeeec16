"""The threat `unauth-pipelining` (docs/security.md), black-box against a running tlsfront.

The default profile (``pipelining_strict`` on) refuses input pipelined where
RFC 2920 forbids it with ``554 5.5.0`` and ends the session; a client that
relays by certificate is trusted and not policed. Split tests send the
bytes in two writes at every position, tlsfront acting on the first before
the second is sent (`send_split`): a split exactly where a well-behaved
client would wait for the reply is then no pipelining at all.
"""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from support.front import Front
from support.hostile import Client, RecordingBackend, SessionLog, code, each_split, send_split
from support.tls_certs import issue
from test_threats import (
    BYE,
    EXEC_PROFILE,
    LISTED,
    READY,
    TCP_PROFILE,
    connect,
    context_with,
    is_closed,
    log,
    recorder,
    relay_front,
)

__all__ = ["log", "recorder"]  # fixtures

DESYNC = b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
STRICT_TCP = TCP_PROFILE.replace("pipelining_strict = false\n", "")
STRICT_EXEC = EXEC_PROFILE.replace("pipelining_strict = false\n", "")
FIRST = b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
SECOND = b"MAIL FROM:<x@example.net>\r\nRCPT TO:<e@example.org>\r\nDATA\r\n"
BODY_2 = b"Subject: second\r\n\r\nsmuggled\r\n.\r\n"


async def strict_front(start_front: Any, recorder: RecordingBackend) -> Front:
    front: Front = await start_front(STRICT_TCP.format(backend=recorder.address))
    return front


async def ehlo_to_first_354(front: Front) -> Client:
    client = await connect(front)
    assert code(await client.command(b"EHLO c")) == 250
    await client.send(FIRST)  # RFC 2920: one group, DATA last
    assert [await client.reply() for _ in range(3)] == [
        b"250 ok\r\n",
        b"250 ok\r\n",
        b"354 go ahead\r\n",
    ]
    return client


async def test_unauth_pipelining_next_message_pipelined_with_its_body_at_every_split(
    start_front: Any, recorder: RecordingBackend
) -> None:
    """The end of one message, then MAIL, RCPT, DATA and the next body in one
    write: 554 in the place of the 354, nothing of the second message reaches
    the backend. Only a split right behind DATA waits for the 354."""
    front = await strict_front(start_front, recorder)
    data = b"Subject: first\r\n\r\nhello\r\n.\r\n" + SECOND + BODY_2
    waits = data.index(SECOND) + len(SECOND)
    legitimate = set()

    async def attempt(i: int, head: bytes, tail: bytes) -> None:
        client = await ehlo_to_first_354(front)
        await send_split(client, head, tail)
        replies = [await client.reply() for _ in range(4)]
        assert replies[:3] == [b"250 ok 1\r\n", b"250 ok\r\n", b"250 ok\r\n"]
        if i == waits:
            legitimate.add(i)
            assert replies[3] == b"354 go ahead\r\n"
            assert await client.reply() == b"250 ok 2\r\n"
            assert await client.command(b"QUIT") == BYE
        else:
            assert replies[3] == DESYNC, i
            assert await is_closed(client)
        await client.aclose()

    with trio.fail_after(60):
        await each_split(data, attempt)
        await recorder.all_done()
    assert legitimate == {waits}
    assert len(recorder.conversations) == len(data)
    smuggled = [c for c in recorder.conversations if any(b"smuggled" in m for m in c.messages)]
    assert len(smuggled) == 1  # the one split that waited for the 354
    for conv in recorder.conversations:
        assert conv.messages[0].endswith(b"\r\nhello\r\n.\r\n")
        if conv not in smuggled:
            assert len(conv.messages) == 1
            assert b"smuggled" not in (conv.partial or b"")


async def test_unauth_pipelining_into_a_qmail_backend(start_front: Any, log: SessionLog) -> None:
    """The same in one write to the qmail-smtpd stand-in: one message queued."""
    front: Front = await start_front(STRICT_EXEC)
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        assert code(await client.command(b"EHLO c")) == 250
        await client.send(FIRST)
        assert [code(await client.reply()) for _ in range(3)] == [250, 250, 354]
        await client.send(b"Subject: first\r\n\r\nhello\r\n.\r\n" + SECOND + BODY_2)
        assert [await client.reply() for _ in range(4)][1:] == [
            b"250 ok\r\n",
            b"250 ok\r\n",
            DESYNC,
        ]
        assert await is_closed(client)
        await client.aclose()
        await log.wait_ends(1)
    (delivered,) = front.maildir()
    assert b"Subject: first" in delivered
    assert " outcome=pipelining reason='improper command pipelining after DATA'" in log.ends[0]
    (session,) = front.sessions()
    assert b"smuggled" not in session["stdin"]


@pytest.mark.parametrize("ender", [b"QUIT", b"BDAT 5 LAST"])
async def test_unauth_pipelining_a_command_behind_quit_or_bdat_at_every_split(
    start_front: Any, recorder: RecordingBackend, ender: bytes
) -> None:
    front = await strict_front(start_front, recorder)
    data = b"NOOP\r\n" + ender + b"\r\nRSET\r\n"
    waits = data.index(b"RSET")

    async def attempt(i: int, head: bytes, tail: bytes) -> None:
        client = await connect(front)
        assert code(await client.command(b"EHLO c")) == 250
        await send_split(client, head, tail)
        assert await client.reply() == b"250 ok\r\n"
        last = await client.reply()
        if i != waits:
            assert last == DESYNC, i
        elif ender == b"QUIT":
            assert last == BYE
        else:  # BDAT refused before the rest came: the rest is a command
            assert last.startswith(b"502 5.5.1")
            assert await client.reply() == b"250 ok\r\n"
            assert await client.command(b"QUIT") == BYE
        assert await is_closed(client)
        await client.aclose()

    with trio.fail_after(60):
        await each_split(data, attempt)
        await recorder.all_done()


async def test_unauth_pipelining_helo_client_may_not_pipeline_at_every_split(
    start_front: Any, recorder: RecordingBackend, log: SessionLog
) -> None:
    """HELO offers no PIPELINING: two commands in one write are refused."""
    front = await strict_front(start_front, recorder)
    data = b"HELO c\r\n" + FIRST
    waits = len(b"HELO c\r\n")

    async def attempt(i: int, head: bytes, tail: bytes) -> None:
        client = await connect(front)
        await send_split(client, head, tail)
        if i == waits:
            assert await client.reply() == b"250 backend.example.org\r\n"
        assert await client.reply() == DESYNC, i
        assert await is_closed(client)
        await client.aclose()

    with trio.fail_after(60):
        await each_split(data, attempt)
        await recorder.all_done()
    for conv in recorder.conversations:
        assert b"RCPT TO:<b@example.org>\r\n" not in conv.commands
        assert conv.messages == []
    await log.wait_ends(len(data))
    assert all("outcome=pipelining" in line for line in log.ends)


async def test_unauth_pipelining_smtplib_is_well_behaved(
    start_front: Any, recorder: RecordingBackend
) -> None:
    """Python's smtplib (EHLO, one command at a time) passes the strict default."""
    front = await strict_front(start_front, recorder)

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", front.port("smtp"), timeout=20) as smtp:
            return smtp.sendmail("a@example.net", ["b@example.org"], b"Subject: s\r\n\r\nhi\r\n")

    with trio.fail_after(30):
        refused = await trio.to_thread.run_sync(send)
        await recorder.all_done()
    assert refused == {}
    (conv,) = recorder.conversations
    assert len(conv.messages) == 1


@pytest.mark.parametrize("listed", [True, False], ids=["relaying", "not relaying"])
async def test_unauth_pipelining_a_relaying_certificate_is_trusted(
    start_front: Any, tmp_path: Path, ca: trustme.CA, log: SessionLog, listed: bool
) -> None:
    """A client that relays by certificate is not policed; any other is."""
    cert = issue(ca, san_emails=[LISTED if listed else "someone@example.net"])
    front = await relay_front(start_front, tmp_path, ca, issue(ca, san_emails=[LISTED]))
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        assert await client.command(b"STARTTLS") == READY
        await client.starttls(context_with(ca, cert, tmp_path))
        await client.send(b"HELO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n")
        replies = [await client.reply()]
        if listed:
            replies += [await client.reply(), await client.reply()]
            assert [code(r) for r in replies] == [250, 250, 250]
            assert code(await client.command(b"QUIT")) == 221
        else:
            assert replies == [DESYNC]
        await client.aclose()
        await log.wait_ends(1)
    assert ("outcome=pipelining" in log.ends[0]) is not listed
