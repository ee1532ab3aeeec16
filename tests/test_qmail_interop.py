"""tlsfront in front of the real, unmodified qmail-smtpd (netqmail 1.06).

The rest of the suite measures tlsfront against stand-ins written for it
(the capture backend, the recording backend); those are stricter than
qmail, which ends a command line at a bare LF, takes a body line of any
length and a lone CR in a body as text. Here the backend is qmail-smtpd
itself, with a queue program of the tests (tests/support/qmail.py): what
qmail queues is what a real host would deliver. The tests skip when the
binary is absent on a user's clone and fail when it is absent in CI.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from support.front import Front, need_tool, toml_str
from support.hostile import Client, SessionLog, code, each_split, send_split, session_log
from support.qmail import LOCAL, ME, RELAY_REFUSED, QmailHome
from support.tls_certs import issue
from support.ucspi import Lines, tcpserver

pytestmark = pytest.mark.interop

READY = b"220 2.0.0 Ready to start TLS\r\n"
GREETING = f"220 {ME} ESMTP\r\n".encode()
RCPT = f"rcpt@{LOCAL}".encode()
ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<" + RCPT + b">\r\nDATA\r\n"
REFUSED_BODY = b"550 5.5.2 Error: bare CR, bare LF or NUL in message, message refused\r\n"
LINE_TOO_LONG = b"500 5.5.2 Error: message line too long\r\n"


@pytest.fixture
def qmail(tmp_path: Path) -> QmailHome:
    return QmailHome.make(tmp_path)


@pytest.fixture
def log() -> Any:
    with session_log() as handler:
        yield handler


def profile(qmail: QmailHome, tls: str = "starttls", extra: str = "", name: str = "smtp") -> str:
    """A profile in front of qmail; braces doubled for start_front's format()."""
    keys = qmail.profile_keys().replace("{", "{{").replace("}", "}}")
    return (
        f'[profile.{name}]\nlisten = ["127.0.0.1:0"]\ntls = "{tls}"\ncert = {{cert}}\n'
        f"{keys}{extra}\n"
    )


async def run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)


def swaks(port: int, *extra: str) -> list[str]:
    return [
        need_tool("swaks"),
        "--server",
        "127.0.0.1",
        "--port",
        str(port),
        "--from",
        "sender@example.net",
        "--to",
        RCPT.decode(),
        "--helo",
        "swaks.example.net",
        "--header",
        "Subject: interop",
        *extra,
    ]


async def connect(front: Front, name: str = "smtp") -> Client:
    client = await Client.connect(front.port(name))
    assert await client.reply() == GREETING
    return client


async def is_closed(client: Client) -> bool:
    rest = await client.rest()
    return rest == b"" or (rest[:1] == b"\x15" and len(rest) <= 7)


# ----------------------------------------------------------------------------
# Delivery and qmail's own view of the client


@pytest.mark.parametrize(("tls", "flag"), [("starttls", "--tls"), ("implicit", "--tls-on-connect")])
async def test_swaks_delivers_through_qmail(
    start_front: Any, qmail: QmailHome, tls: str, flag: str
) -> None:
    """swaks over STARTTLS and implicit TLS: one message queued by qmail, with
    qmail's own Received line, which names the client's address (TCPREMOTEIP)
    and its HELO name, above tlsfront's trace header."""
    front: Front = await start_front(profile(qmail, tls))
    result = await run(swaks(front.port("smtp"), flag))
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "<~  250 ok " in output  # qmail's reply to the dot, over TLS
    (queued,) = qmail.queued()
    assert queued.sender == b"sender@example.net"
    assert queued.recipients == [RCPT]
    # qmail adds its line on top of what it received, tlsfront's line first
    theirs, ours = queued.message.split(b"\nReceived: ", 1)
    assert theirs.startswith(b"Received: from unknown (HELO swaks.example.net) (127.0.0.1)\n")
    assert ours.startswith(b"from swaks.example.net ([127.0.0.1])")
    assert b"by front.example.org (tlsfront) with ESMTPS" in ours
    assert b"Subject: interop" in queued.message
    assert b"\r" not in queued.message  # qmail converted the line ends


async def test_client_vanishes_mid_data(
    start_front: Any, qmail: QmailHome, client_context: ssl.SSLContext, log: SessionLog
) -> None:
    """Half a body, then the connection closes: qmail sees its input end
    without a final dot and queues nothing."""
    front: Front = await start_front(profile(qmail))
    with trio.fail_after(30):
        client = await connect(front)
        assert await client.command(b"STARTTLS") == READY
        await client.starttls(client_context)
        await client.send(ENVELOPE)
        assert [code(await client.reply()) for _ in range(4)] == [250, 250, 250, 354]
        await client.send(b"Subject: half\r\n\r\nthe first half of a bo")
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
        await log.wait_ends(1)
    assert qmail.queued() == []
    assert "reason='client closed the connection during DATA'" in log.ends[-1]


async def test_databytes_is_qmails_to_enforce(
    start_front: Any, tmp_path: Path, log: SessionLog
) -> None:
    """control/databytes: qmail's 552 reaches the client as qmail wrote it."""
    qmail = QmailHome.make(tmp_path, databytes=2000)
    front: Front = await start_front(profile(qmail, "none"))
    with trio.fail_after(30):
        client = await connect(front)
        await client.send(ENVELOPE)
        assert [code(await client.reply()) for _ in range(4)] == [250, 250, 250, 354]
        await client.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 40 + b".\r\n")
        reply = await client.reply()
        assert reply == b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
    assert qmail.queued() == []


# ----------------------------------------------------------------------------
# Relay: qmail's RELAYCLIENT rule


LISTED = "relay@example.net"


async def relay_attempt(front: Front, context: ssl.SSLContext) -> tuple[bytes, bytes]:
    """STARTTLS with `context`; the replies to a foreign and a local recipient."""
    client = await connect(front)
    assert await client.command(b"STARTTLS") == READY
    await client.starttls(context)
    assert code(await client.command(b"EHLO client.example")) == 250
    assert await client.command(b"MAIL FROM:<a@example.net>") == b"250 ok\r\n"
    foreign = await client.command(b"RCPT TO:<x@elsewhere.example>")
    local = await client.command(b"RCPT TO:<" + RCPT + b">")
    assert code(await client.command(b"DATA")) == 354
    assert code(await client.command(b"Subject: relay\r\n\r\nhi\r\n.")) == 250
    assert code(await client.command(b"QUIT")) == 221
    await client.aclose()
    return foreign, local


@pytest.mark.parametrize("listed", [True, False])
async def test_relay_by_certificate(
    start_front: Any,
    qmail: QmailHome,
    tmp_path: Path,
    ca: trustme.CA,
    clean_environ: None,
    log: SessionLog,
    listed: bool,
) -> None:
    """A verified certificate whose address is in tlsclients starts qmail with
    RELAYCLIENT: the foreign recipient is accepted and queued. Without one,
    qmail's own 553 (and tlsfront's stray RELAYCLIENT does not leak)."""
    clients = tmp_path / "tlsclients"
    clients.write_text(LISTED + "\n")
    front: Front = await start_front(
        profile(
            qmail,
            extra=f'client_cert = "request"\nclient_ca = {{ca}}\n'
            f"relay_clients = {toml_str(clients)}\n",
        )
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    issue(ca, san_emails=[LISTED if listed else "other@example.net"]).load_into(
        context, tmp_path, "client"
    )
    with trio.fail_after(30):
        foreign, local = await relay_attempt(front, context)
        await log.wait_ends(1)
    assert local == b"250 ok\r\n"
    (queued,) = qmail.queued()
    if listed:
        assert foreign == b"250 ok\r\n"
        assert queued.recipients == [b"x@elsewhere.example", RCPT]
    else:
        assert foreign == RELAY_REFUSED
        assert queued.recipients == [RCPT]


@pytest.mark.parametrize("relay", [True, False])
async def test_relay_by_tcprules(
    start_front: Any,
    qmail: QmailHome,
    tmp_path: Path,
    client_context: ssl.SSLContext,
    clean_environ: None,
    log: SessionLog,
    relay: bool,
) -> None:
    """The profile's tcprules give RELAYCLIENT to 127.0.0.1, as /etc/tcp.smtp
    does on a qmail host; a rule for another address relays nothing."""
    rules = tmp_path / "tcp.smtp"
    address = "127.0.0.1" if relay else "127.0.0.9"
    rules.write_text(f'{address}:allow,RELAYCLIENT=""\n:allow\n')
    front: Front = await start_front(profile(qmail, extra=f"rules = {toml_str(rules)}\n"))
    with trio.fail_after(30):
        foreign, local = await relay_attempt(front, client_context)
        await log.wait_ends(1)
    assert local == b"250 ok\r\n"
    assert foreign == (b"250 ok\r\n" if relay else RELAY_REFUSED)
    (queued,) = qmail.queued()
    assert len(queued.recipients) == (2 if relay else 1)


# ----------------------------------------------------------------------------
# The body: smuggling and the line limit, with a backend that is lenient

SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r\n.\r",
    b"\r\n\0.\r\n",
    b"\r\n.\0\r\n",
]
SECOND = (
    b"MAIL FROM:<x@example.net>\r\nRCPT TO:<" + RCPT + b">\r\nDATA\r\n\r\nsecond\r\n.\r\nQUIT\r\n"
)
FIRST = b"Subject: first\r\n\r\nhello"


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=repr)
async def test_smuggling_at_every_split_into_qmail(
    start_front: Any, qmail: QmailHome, fake_end: bytes
) -> None:
    """A fake end of data with a second message behind it, split at every
    position from just before the fake end to well into the second envelope:
    the fake end never reaches qmail (to which a lone CR is body text); the
    client gets tlsfront's 550 and nothing is queued, so never two messages.
    (Splits further out only move plain text from one write to the other;
    the recording-backend test in test_threats.py takes every one of them.)"""
    front: Front = await start_front(profile(qmail, "none", "max_per_ip = 100\n"))
    body = FIRST + fake_end + SECOND
    start = len(FIRST) - 2
    window = body[: start + len(fake_end) + 32]

    async def attempt(i: int, head: bytes, tail: bytes) -> None:
        if 0 < i < start:
            return
        client = await connect(front)
        await client.send(ENVELOPE)
        assert [code(await client.reply()) for _ in range(4)] == [250, 250, 250, 354]
        await send_split(client, head, tail + body[len(window) :])
        assert await client.reply() == REFUSED_BODY
        assert await is_closed(client)
        await client.aclose()

    with trio.fail_after(60):
        await each_split(window, attempt, concurrency=8)
    assert qmail.queued() == []


def body_line(length: int, dot: bool) -> bytes:
    """A body line of `length` octets (without CRLF) as sent, dot-stuffed when it
    starts with a dot."""
    if dot:
        return b".." + b"y" * (length - 1)
    return b"y" * length


LINE_CASES = [
    pytest.param(998, False, id="998"),
    pytest.param(998, True, id="998-dot"),
    pytest.param(999, False, id="999"),
    pytest.param(999, True, id="999-dot"),
    pytest.param(1000, False, id="1000"),
    pytest.param(1000, True, id="1000-dot"),
]


@pytest.mark.parametrize(("length", "dot"), LINE_CASES)
async def test_line_length_limit(
    start_front: Any, qmail: QmailHome, log: SessionLog, length: int, dot: bool
) -> None:
    """RFC 5321 4.5.3.1.6: a text line is at most 998 octets before its CRLF,
    counted before dot-stuffing. qmail takes any length, so the limit is
    tlsfront's: up to 998 qmail queues the line intact (unstuffed), beyond
    it the client gets 500 and nothing is queued."""
    front: Front = await start_front(profile(qmail, "none"))
    line = body_line(length, dot)
    with trio.fail_after(30):
        client = await connect(front)
        await client.send(ENVELOPE)
        assert [code(await client.reply()) for _ in range(4)] == [250, 250, 250, 354]
        await client.send(b"Subject: long\r\n\r\n" + line + b"\r\nend\r\n.\r\n")
        reply = await client.reply()
        await client.aclose()
        await log.wait_ends(1)
    if length <= 998:
        assert code(reply) == 250, reply
        (queued,) = qmail.queued()
        unstuffed = line[1:] if dot else line
        assert len(unstuffed) == length
        assert b"\n" + unstuffed + b"\nend\n" in queued.message
    else:
        assert reply == LINE_TOO_LONG
        assert qmail.queued() == []


# ----------------------------------------------------------------------------
# inetd mode under a real tcpserver


async def test_inetd_under_tcpserver_into_qmail(
    qmail: QmailHome, tmp_path: Path, tls_dir: Path, client_context: ssl.SSLContext
) -> None:
    """`tcpserver ... tlsfront inetd -p smtp`, qmail-smtpd behind: a message
    over STARTTLS is queued, and qmail's Received line names the client
    address tcpserver saw."""
    config = tmp_path / "tlsfront.toml"
    env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in qmail.env().items())
    config.write_text(
        '[profile.smtp]\nlisten = ["127.0.0.1:0"]\nhostname = "front.example.org"\n'
        f"cert = {toml_str(tls_dir / 'servercert.pem')}\n"
        f"backend = {json.dumps(qmail.argv())}\nenv = {{ {env} }}\n"
    )
    argv = [sys.executable, "-m", "tlsfront", "inetd", "-p", "smtp", "-c", str(config)]
    log = tmp_path / "tcpserver.log"
    async with tcpserver(argv, log) as port:
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            plain = Lines(stream)
            assert await plain.reply() == GREETING
            assert b"250-STARTTLS\r\n" in await plain.command(b"EHLO client.example.net")
            assert await plain.command(b"STARTTLS") == READY
            tls = trio.SSLStream(stream, client_context, server_hostname="localhost")
            await tls.do_handshake()
            lines = Lines(tls)
            assert b"STARTTLS" not in await lines.command(b"EHLO client.example.net")
            assert await lines.command(b"MAIL FROM:<a@example.net>") == b"250 ok\r\n"
            assert await lines.command(b"RCPT TO:<" + RCPT + b">") == b"250 ok\r\n"
            assert code(await lines.command(b"DATA")) == 354
            assert code(await lines.command(b"Subject: inetd\r\n\r\nhi\r\n.")) == 250
            assert code(await lines.command(b"QUIT")) == 221
            await tls.aclose()
    (queued,) = qmail.queued()
    assert queued.message.startswith(
        b"Received: from unknown (HELO client.example.net) (127.0.0.1)\n"
    )
    assert b"Subject: inetd" in queued.message
