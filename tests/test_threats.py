"""The threats of docs/security.md, black-box against a running tlsfront on loopback.

Each test is named after its threat and asserts both what the client sees and
what the backend received. Two kinds of backend: the capture backend
(tests/support/backends/capture.py, the qmail-smtpd stand-in, exec'd per session and
recording its stdin, environment and messages) where qmail's own behaviour
matters, and `RecordingBackend` (a TCP backend in this process) for the
threats tested with their bytes split at every position (`starttls-injection`,
`injection-after-220`, `reply-order`, `smtp-smuggling`, `pipelining-desync`): there,
hundreds of sessions need no process start-ups, and `send_split` makes sure
tlsfront has acted on the first write before the second one is sent.

Threats tested elsewhere (not repeated here):

- `starttls-injection` (one write, then TLS, exec backend): test_server.py
  test_injection_behind_starttls_never_reaches_a_backend
- `handshake-failure`: test_server.py test_garbage_after_starttls_feeds_no_backend (plaintext
  and garbage after 220), test_timeouts.py test_starttls_without_a_client_hello
  (half a ClientHello, then silence), test_tls.py test_garbage_instead_of_client_hello
- `starttls-stripping`: test_server.py test_require_tls
- `smtp-smuggling`, `pipelining-desync`, `bare-cr-lf-nul`, `long-lines`, the
  dialogue core byte by byte: test_smtp_dialogue.py
- `long-lines`, 64 MiB without a line end and a 10 MB header line: test_abuse.py
  test_64_mib_without_a_line_end, test_ten_megabyte_header_line
- `connection-flood` (per address): test_server.py test_connection_limit_per_ip
- `slow-clients`: test_timeouts.py (idle, trickled command, slow body, no ClientHello),
  test_abuse.py (slowloris at every stage, a client that never reads)
- `false-acknowledgement`: test_backend_faults.py (every faulty.py mode), test_timeouts.py
  test_slow_backend_at_the_dot
- `weak-tls`: test_tls_audit.py
- `plaintext-on-implicit`: test_server.py test_plaintext_to_the_implicit_port_is_closed
- `handshake-flood`: test_abuse.py test_handshake_flood_from_one_address
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from support.front import CAPTURE, Front, capture_backend, need_tool, toml_str, write_config
from support.hostile import (
    Client,
    RecordingBackend,
    SessionLog,
    code,
    each_split,
    send_split,
    session_log,
)
from support.tls_certs import NOW, Issued, crl_pem, issue, make_crl

from tlsfront.sink import read_maildir

GREETING = b"220 backend.example.org ESMTP\r\n"
READY = b"220 2.0.0 Ready to start TLS\r\n"
BYE = b"221 backend.example.org\r\n"

# Most rows pipeline a HELO session's envelope in one write, which the
# synchronization rule (`unauth-pipelining`) refuses by default. They prove the defences
# that stand where that rule does not apply (a relaxed profile, a trusted
# client), so their profiles relax it; test_threats_pipelining.py tests the default.

# The split tests speak to the recording backend in every phase, so that what
# reaches a backend, and when, shows; with the backend on demand (the
# default) most of these sessions would reach none (test_ondemand.py).
TCP_PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {{cert}}
backend_connect = "{backend}"
backend_start = "connect"
max_connections = 1000
max_per_ip = 1000
pipelining_strict = false
"""

EXEC_PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}
pipelining_strict = false
"""

ENVELOPE = b"HELO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"


@pytest.fixture
async def recorder(nursery: trio.Nursery) -> RecordingBackend:
    return await RecordingBackend().start(nursery)


@pytest.fixture
def log() -> Any:
    with session_log() as handler:
        yield handler


async def tcp_front(start_front: Any, recorder: RecordingBackend, extra: str = "") -> Front:
    front: Front = await start_front(TCP_PROFILE.format(backend=recorder.address) + extra)
    return front


async def connect(front: Front, profile: str = "smtp") -> Client:
    client = await Client.connect(front.port(profile))
    assert await client.reply() == GREETING
    return client


async def is_closed(client: Client) -> bool:
    """Nothing but an optional TLS alert record, then the end of the stream."""
    rest = await client.rest()
    return rest == b"" or (rest[:1] == b"\x15" and len(rest) <= 7)


# ----------------------------------------------------------------------------
# Rows 1-3: STARTTLS and what is pipelined around it

INJECTIONS = [b"RSET\r\n", b"MAIL FROM:<a@b>\r\n", b"EHLO x\r\n"]


@pytest.mark.parametrize("injected", INJECTIONS)
async def test_injection_behind_starttls_at_every_split(
    start_front: Any,
    recorder: RecordingBackend,
    client_context: ssl.SSLContext,
    injected: bytes,
) -> None:
    """`STARTTLS\\r\\n` + a command, split at every position, then a real handshake.

    Split inside the STARTTLS line, the injected command comes with the rest of
    the line and is thrown away: TLS comes up and the first reply over TLS is
    the one to our own command. Split after it, the injected bytes are what the
    TLS layer reads instead of a ClientHello: the handshake fails and the
    connection closes. Either way no backend ever receives the command.
    """
    front = await tcp_front(start_front, recorder)
    data = b"STARTTLS\r\n" + injected
    outcomes: dict[int, str] = {}

    async def attempt(i: int, head: bytes, tail: bytes) -> None:
        client = await connect(front)
        await send_split(client, head, tail)
        assert await client.reply() == READY
        try:
            await client.starttls(client_context)
        except trio.BrokenResourceError:
            outcomes[i] = "closed"
            await client.aclose()
            return
        assert await client.command(b"NOOP %d" % i) == b"250 ok\r\n"
        assert await client.command(b"QUIT") == BYE
        await client.aclose()
        outcomes[i] = "tls"

    with trio.fail_after(60):
        await each_split(data, attempt)
        await recorder.all_done()
    starttls = len(b"STARTTLS\r\n")
    assert outcomes == {i: "tls" if i < starttls else "closed" for i in range(len(data))}
    after_tls = sorted(c.commands for c in recorder.conversations if c.commands)
    assert after_tls == sorted(
        [b"NOOP %d\r\n" % i, b"QUIT\r\n"] for i, how in outcomes.items() if how == "tls"
    )
    assert all(injected not in c.received for c in recorder.conversations)


async def test_injection_behind_a_refused_starttls_at_every_split(
    start_front: Any, recorder: RecordingBackend, client_context: ssl.SSLContext
) -> None:
    """STARTTLS refused with 454 (here: over tls_rate_limit) and a command
    pipelined behind it: the command is thrown away all the same, and the
    session goes on in clear with what the client sends after the 454."""
    front = await tcp_front(start_front, recorder, "tls_rate_limit = 1\n")
    with trio.fail_after(30):  # the one TLS session this minute allows
        client = await connect(front)
        assert await client.command(b"STARTTLS") == READY
        await client.starttls(client_context)
        assert await client.command(b"QUIT") == BYE
        await client.aclose()
    refused = b"454 4.7.0 Error: too many new TLS sessions from 127.0.0.1\r\n"
    data = b"STARTTLS\r\nMAIL FROM:<injected@example.net>\r\n"

    async def attempt(i: int, head: bytes, tail: bytes) -> None:
        if i >= len(b"STARTTLS\r\n"):
            return  # the command would come after the 454: a new command, not injected
        client = await connect(front)
        await send_split(client, head, tail)
        assert await client.reply() == refused
        assert await client.command(b"NOOP %d" % i) == b"250 ok\r\n"
        assert await client.command(b"QUIT") == BYE
        await client.aclose()

    with trio.fail_after(60):
        await each_split(data, attempt)
        await recorder.all_done()
    assert len(recorder.conversations) == 2 + len(b"STARTTLS\r\n")
    assert all(b"injected" not in c.received for c in recorder.conversations)


@pytest.mark.parametrize("injected", INJECTIONS)
async def test_plaintext_between_the_220_and_the_client_hello(
    start_front: Any, recorder: RecordingBackend, injected: bytes
) -> None:
    """`STARTTLS\\r\\n` (split anywhere), the 220, then a command (split anywhere)
    where the ClientHello belongs: the handshake fails at once and the
    connection is closed; no backend is fed, no second backend is started."""
    front = await tcp_front(start_front, recorder)
    starttls = b"STARTTLS\r\n"
    splits = [(i, len(injected)) for i in range(len(starttls))]
    splits += [(len(starttls), j) for j in range(1, len(injected))]

    async def attempt(i: int, j: int) -> None:
        client = await connect(front)
        await send_split(client, starttls[:i], starttls[i:])
        assert await client.reply() == READY
        await send_split(client, injected[:j], injected[j:])
        assert await is_closed(client)
        await client.aclose()

    with trio.fail_after(20):  # well inside the 30 s handshake timeout
        async with trio.open_nursery() as nursery:
            for i, j in splits:
                nursery.start_soon(attempt, i, j)
        await recorder.all_done()
    assert len(recorder.conversations) == len(splits)
    assert all(c.received == b"" for c in recorder.conversations)


async def test_replies_owed_before_the_220_go_first(
    start_front: Any, recorder: RecordingBackend, client_context: ssl.SSLContext
) -> None:
    """`NOOP\\r\\nSTARTTLS\\r\\n` split at every position: `250` then `220`, nothing
    else in clear (the handshake would fail on it), and TLS comes up."""
    front = await tcp_front(start_front, recorder)

    async def attempt(i: int, head: bytes, tail: bytes) -> None:
        client = await connect(front)
        await send_split(client, head, tail)
        assert await client.reply() == b"250 ok\r\n"
        assert await client.reply() == READY
        await client.starttls(client_context)  # asserts that nothing else was read
        assert await client.command(b"NOOP %d" % i) == b"250 ok\r\n"
        assert await client.command(b"QUIT") == BYE
        await client.aclose()

    data = b"NOOP\r\nSTARTTLS\r\n"
    with trio.fail_after(60):
        await each_split(data, attempt)
        await recorder.all_done()
    plain = [c.received for c in recorder.conversations if b"QUIT" not in c.received]
    assert plain == [b"NOOP\r\n"] * len(data)
    fresh = sorted(c.received for c in recorder.conversations if b"QUIT" in c.received)
    assert fresh == sorted(b"NOOP %d\r\nQUIT\r\n" % i for i in range(len(data)))


# ----------------------------------------------------------------------------
# Rows 11-12: the DATA body

REFUSED_BODY = b"550 5.5.2 Error: bare CR, bare LF or NUL in message, message refused\r\n"
SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r\n.\r",
    b"\r\n\0.\r\n",
    b"\r\n.\0\r\n",
]
SECOND = b"MAIL FROM:<x@example.net>\r\nRCPT TO:<e@example.org>\r\nDATA\r\n\r\nsecond\r\n.\r\n"


async def up_to_354(front: Front) -> Client:
    """A session pipelined up to DATA; the 354 read."""
    client = await connect(front)
    await client.send(ENVELOPE)
    replies = [await client.reply() for _ in range(4)]
    assert replies == [
        b"250 backend.example.org\r\n",
        b"250 ok\r\n",
        b"250 ok\r\n",
        b"354 go ahead\r\n",
    ]
    return client


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=repr)
async def test_smuggling_at_every_split(
    start_front: Any, recorder: RecordingBackend, fake_end: bytes
) -> None:
    """A body with a fake end of data and a second message behind it, split at
    every position: refused with 550 5.5.2, the backend never receives the fake
    end nor the second envelope; never two messages, nothing normalized."""
    front = await tcp_front(start_front, recorder)
    body = b"Subject: first\r\n\r\nhello" + fake_end + SECOND + b"QUIT\r\n"

    async def attempt(i: int, head: bytes, tail: bytes) -> None:
        client = await up_to_354(front)
        await send_split(client, head, tail)
        assert await client.reply() == REFUSED_BODY
        assert await is_closed(client)
        await client.aclose()

    with trio.fail_after(60):
        await each_split(body, attempt)
        await recorder.all_done()
    assert len(recorder.conversations) == len(body)
    for conv in recorder.conversations:
        assert conv.commands == ENVELOPE.splitlines(keepends=True)
        assert conv.messages == []
        assert conv.lenient_ends == []
        assert conv.partial is not None
        assert b"x@example.net" not in conv.partial
        # nothing normalized either: the only line ends that got through are CRLF
        assert conv.partial.count(b"\n") == conv.partial.count(b"\r") == conv.partial.count(b"\r\n")


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=repr)
async def test_smuggling_into_a_qmail_backend(
    start_front: Any, fake_end: bytes, log: SessionLog
) -> None:
    """The same in one write, to the qmail-smtpd stand-in: nothing delivered."""
    front: Front = await start_front(EXEC_PROFILE)
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        await client.send(ENVELOPE)
        assert [code(await client.reply()) for _ in range(4)] == [250, 250, 250, 354]
        await client.send(b"Subject: first\r\n\r\nhello" + fake_end + SECOND)
        assert await client.reply() == REFUSED_BODY
        assert await is_closed(client)
        await client.aclose()
        await log.wait_ends(1)
    (session,) = front.sessions()
    assert session["messages"] == []
    assert session["envelopes"] == [
        {"from": "a@example.net", "to": ["b@example.org"], "complete": False}
    ]
    assert b"x@example.net" not in session["stdin"]
    assert front.maildir() == []


BODY_WITH_COMMANDS = b"Subject: p\r\n\r\nRSET\r\nMAIL FROM:<evil@example.net>\r\n.\r\n"


async def test_body_pipelined_behind_data_at_every_split(
    start_front: Any, recorder: RecordingBackend
) -> None:
    """Envelope, DATA and a body that looks like commands in one go, split at
    every position: the body is a body (DATA mode only on the backend's 354),
    one message, and none of its lines runs as a command."""
    front = await tcp_front(start_front, recorder)
    data = ENVELOPE + BODY_WITH_COMMANDS + b"QUIT\r\n"

    async def attempt(i: int, head: bytes, tail: bytes) -> None:
        client = await connect(front)
        await send_split(client, head, tail)
        replies = [await client.reply() for _ in range(6)]
        assert replies == [
            b"250 backend.example.org\r\n",
            b"250 ok\r\n",
            b"250 ok\r\n",
            b"354 go ahead\r\n",
            b"250 ok 1\r\n",
            BYE,
        ]
        assert await is_closed(client)
        await client.aclose()

    with trio.fail_after(60):
        await each_split(data, attempt)
        await recorder.all_done()
    for conv in recorder.conversations:
        assert conv.commands == [*ENVELOPE.splitlines(keepends=True), b"QUIT\r\n"]
        (message,) = conv.messages
        assert message.startswith(b"Received: from c ([127.0.0.1])\r\n")
        assert message.endswith(b"\r\n" + BODY_WITH_COMMANDS)


REFUSED_ENVELOPE = b"HELO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@elsewhere.example>\r\n"
DESYNC = b"554 5.5.0 Error: SMTP protocol synchronization\r\n"


async def test_body_behind_a_refused_data_at_every_split(
    start_front: Any, recorder: RecordingBackend
) -> None:
    """DATA that fails (no valid recipient) with a body pipelined behind it:
    554 5.5.0 and close, the body never reaches the backend as commands.

    Split everywhere up to the end of the DATA line; a split after it would
    send the "body" after the reply to DATA, as new commands, which is what
    they then are.
    """
    front = await tcp_front(start_front, recorder)
    head_part = REFUSED_ENVELOPE + b"DATA\r\n"
    data = head_part + BODY_WITH_COMMANDS

    async def attempt(i: int, head: bytes, tail: bytes) -> None:
        if i >= len(head_part):
            return
        client = await connect(front)
        await send_split(client, head, tail)
        replies = [await client.reply() for _ in range(5)]
        assert replies == [
            b"250 backend.example.org\r\n",
            b"250 ok\r\n",
            b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n",
            b"503 RCPT first (#5.5.1)\r\n",
            DESYNC,
        ]
        assert await is_closed(client)
        await client.aclose()

    with trio.fail_after(60):
        await each_split(data, attempt)
        await recorder.all_done()
    assert len(recorder.conversations) == len(head_part)
    for conv in recorder.conversations:
        assert conv.commands == head_part.splitlines(keepends=True)


@pytest.mark.parametrize("accept", [True, False])
async def test_body_sent_before_the_backend_answers_data(
    start_front: Any, nursery: trio.Nursery, accept: bool
) -> None:
    """The body comes while the backend still thinks about DATA. Accepted: it is
    passed on only after the 354. Refused: 554 5.5.0, never run as commands
    (Postfix's check: input that was waiting when the reply went out)."""
    release = trio.Event()
    recorder = await RecordingBackend(hold_data=release).start(nursery)
    front = await tcp_front(start_front, recorder)
    envelope = ENVELOPE if accept else REFUSED_ENVELOPE + b"DATA\r\n"
    with trio.fail_after(30):
        client = await connect(front)
        await client.send(envelope)
        (conv,) = recorder.conversations
        await conv.data_command.wait()
        await client.send(BODY_WITH_COMMANDS + b"QUIT\r\n")
        await trio.testing.wait_all_tasks_blocked()
        assert conv.received == envelope  # nothing of the body before the reply
        release.set()
        replies = (await client.rest()).splitlines(keepends=True)
        await client.aclose()
        await recorder.all_done()
    if accept:
        assert replies[3:] == [b"354 go ahead\r\n", b"250 ok 1\r\n", BYE]
        assert conv.commands == [*envelope.splitlines(keepends=True), b"QUIT\r\n"]
        (message,) = conv.messages
        assert message.endswith(b"\r\n" + BODY_WITH_COMMANDS)
    else:
        assert replies[3:] == [b"503 RCPT first (#5.5.1)\r\n", DESYNC]
        assert conv.commands == envelope.splitlines(keepends=True)


# ----------------------------------------------------------------------------
# Rows 4, 5: STARTTLS state and rules


async def test_nothing_from_before_tls_survives(
    start_front: Any, client_context: ssl.SSLContext, clean_environ: None, log: SessionLog
) -> None:
    """EHLO and MAIL in clear, STARTTLS, then RCPT without a new MAIL: qmail's
    503, because the backend after TLS is a fresh one. Nothing of the clear
    part shows in the message; relaying is decided on the TLS session alone."""
    front: Front = await start_front(EXEC_PROFILE)
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        assert b"250-STARTTLS\r\n" in await client.command(b"EHLO before.example")
        assert await client.command(b"MAIL FROM:<before@example.net>") == b"250 ok\r\n"
        assert await client.command(b"STARTTLS") == READY
        await client.starttls(client_context)
        assert await client.command(b"RCPT TO:<b@example.org>") == b"503 MAIL first (#5.5.1)\r\n"
        assert code(await client.command(b"EHLO after.example")) == 250
        assert await client.command(b"MAIL FROM:<after@example.net>") == b"250 ok\r\n"
        assert code(await client.command(b"RCPT TO:<x@elsewhere.example>")) == 553
        assert await client.command(b"RCPT TO:<b@example.org>") == b"250 ok\r\n"
        assert code(await client.command(b"DATA")) == 354
        assert code(await client.command(b"Subject: after\r\n\r\nhi\r\n.")) == 250
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
    plain, tls = front.sessions()
    assert plain["stdin"] == b"EHLO before.example\r\nMAIL FROM:<before@example.net>\r\n"
    assert tls["stdin"].startswith(b"RCPT TO:<b@example.org>\r\nEHLO after.example\r\n")
    assert "RELAYCLIENT" not in plain["env"]
    assert "RELAYCLIENT" not in tls["env"]
    assert tls["envelopes"][0]["from"] == "after@example.net"
    (delivered,) = front.maildir()
    assert b"before" not in delivered
    assert b"Received: from after.example ([127.0.0.1])\r\n" in tls["messages"][0]


async def test_starttls_rules(
    start_front: Any, recorder: RecordingBackend, client_context: ssl.SSLContext
) -> None:
    """501 with arguments, 554 once TLS is up, advertised once and only before
    TLS, never on the implicit-TLS port."""
    front = await tcp_front(
        start_front,
        recorder,
        f"""
[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = {{cert}}
backend_connect = "{recorder.address}"
backend_start = "connect"
""",
    )
    with trio.fail_after(30):
        client = await connect(front)
        ehlo = await client.command(b"EHLO c")
        assert ehlo.count(b"STARTTLS") == 1
        assert b"250-STARTTLS\r\n" in ehlo
        assert await client.command(b"STARTTLS now") == b"501 5.5.4 Syntax: STARTTLS\r\n"
        assert await client.command(b"STARTTLS") == READY
        await client.starttls(client_context)
        assert b"STARTTLS" not in await client.command(b"EHLO c")
        tls_active = b"554 5.5.1 Error: TLS already active\r\n"
        assert await client.command(b"STARTTLS") == tls_active
        assert await client.command(b"QUIT") == BYE
        await client.aclose()

        tcp = await trio.open_tcp_stream("127.0.0.1", front.port("smtps"))
        implicit = Client(trio.SSLStream(tcp, client_context, server_hostname="localhost"))
        assert await implicit.reply() == GREETING
        assert b"STARTTLS" not in await implicit.command(b"EHLO c")
        assert await implicit.command(b"STARTTLS") == tls_active
        assert await implicit.command(b"QUIT") == BYE
        await implicit.aclose()
        await recorder.all_done()
    assert all(b"STARTTLS" not in c.received for c in recorder.conversations)


async def test_starttls_when_the_certificate_cannot_load(tmp_path: Path) -> None:
    """`tlsfront inetd` with a certificate that is not there: 454 4.7.0, and the
    session goes on in clear."""
    capture = tmp_path / "capture"
    config = write_config(
        tmp_path,
        f"""
[defaults]
hostname = "front.example.org"

[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {toml_str(tmp_path / "missing.pem")}
backend = {capture_backend(capture)}
""",
    )
    argv = [sys.executable, "-m", "tlsfront", "inetd", "-p", "smtp", "-c", str(config)]
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        client = Client(trio.StapledStream(process.stdin, process.stdout))
        try:
            assert code(await client.reply()) == 220
            assert code(await client.command(b"EHLO c")) == 250
            assert await client.command(b"STARTTLS") == (
                b"454 4.7.0 TLS not available due to local problem\r\n"
            )
            assert await client.command(b"NOOP") == b"250 ok\r\n"
            assert code(await client.command(b"QUIT")) == 221
            await process.stdin.aclose()
            stderr = b""
            while chunk := await process.stderr.receive_some(65536):
                stderr += chunk
            assert await process.wait() == 0
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                for stream in (process.stdin, process.stdout, process.stderr):
                    await stream.aclose()
    assert b"missing.pem" in stderr


# ----------------------------------------------------------------------------
# Rows 8-10: who may relay

RELAY_PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {{cert}}
backend = {{backend}}
client_cert = "request"
client_ca = {{ca}}
client_crl = {crl}
relay_clients = {clients}
"""
LISTED = "relay@example.net"
RELAY_CASES = ["none", "self-signed", "other CA", "expired", "revoked", "not listed", "listed"]


def client_certificate(case: str, ca: trustme.CA, other_ca: trustme.CA) -> Issued | None:
    week = datetime.timedelta(days=7)
    if case == "none":
        return None
    if case == "self-signed":
        return issue(None, san_emails=[LISTED])
    if case == "other CA":
        return issue(other_ca, san_emails=[LISTED])
    if case == "expired":
        return issue(ca, san_emails=[LISTED], not_before=NOW - 2 * week, not_after=NOW - week)
    if case == "not listed":
        return issue(ca, san_emails=["someone@example.net"])
    return issue(ca, san_emails=[LISTED])  # "revoked" (its serial is in the CRL) and "listed"


async def relay_front(start_front: Any, tmp_path: Path, ca: trustme.CA, revoked: Issued) -> Front:
    crl = tmp_path / "clientcrl.pem"
    crl.write_bytes(crl_pem(make_crl(ca, [revoked.cert])))
    clients = tmp_path / "tlsclients"
    clients.write_text(LISTED + "\n")
    front: Front = await start_front(
        RELAY_PROFILE.format(crl=toml_str(crl), clients=toml_str(clients))
    )
    return front


def context_with(ca: trustme.CA, cert: Issued | None, tmp_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert is not None:
        cert.load_into(context, tmp_path, "client")
    return context


async def relay_attempt(front: Front, context: ssl.SSLContext) -> bytes:
    """STARTTLS with `context`, then a recipient in a foreign domain."""
    client = await Client.connect(front.port("smtp"))
    assert code(await client.reply()) == 220
    assert await client.command(b"STARTTLS") == READY
    await client.starttls(context)
    assert code(await client.command(b"EHLO client.example")) == 250
    assert await client.command(b"MAIL FROM:<a@example.net>") == b"250 ok\r\n"
    reply = await client.command(b"RCPT TO:<x@elsewhere.example>")
    assert code(await client.command(b"QUIT")) == 221
    await client.aclose()
    return reply


@pytest.mark.parametrize("case", RELAY_CASES)
async def test_only_a_valid_listed_certificate_relays(
    start_front: Any,
    tmp_path: Path,
    ca: trustme.CA,
    other_ca: trustme.CA,
    clean_environ: None,
    log: SessionLog,
    case: str,
) -> None:
    """553 for every certificate but a verified, unrevoked, unexpired one whose
    address is listed; tlsfront's own environment holds RELAYCLIENT= and
    TCPREMOTEIP=10.66.66.66 throughout (clean_environ), and neither leaks."""
    cert = client_certificate(case, ca, other_ca)
    revoked = cert if cert is not None and case == "revoked" else issue(ca, san_emails=[LISTED])
    front = await relay_front(start_front, tmp_path, ca, revoked)
    with trio.fail_after(30):
        reply = await relay_attempt(front, context_with(ca, cert, tmp_path))
        await log.wait_ends(1)
    # one backend, inside TLS: nothing before STARTTLS needed one
    (tls,) = front.sessions()
    if case == "listed":
        assert reply == b"250 ok\r\n"
        assert tls["env"]["RELAYCLIENT"] == ""
        assert f"relaying allowed for cert {LISTED}" in "\n".join(log.lines)
        assert " relay=cert " in log.ends[-1]
    else:
        assert reply == (
            b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
        )
        assert "RELAYCLIENT" not in tls["env"]
        assert " relay=no " in log.ends[-1]
    assert tls["env"]["TCPREMOTEIP"] == "127.0.0.1"


async def test_a_certificate_from_an_unknown_ca_does_not_break_tls(
    start_front: Any,
    tmp_path: Path,
    ca: trustme.CA,
    other_ca: trustme.CA,
    log: SessionLog,
) -> None:
    """A profile that asks for client certificates gets one it cannot verify:
    TLS completes (Postfix's ask_ccert), no relay, logged as Untrusted."""
    front = await relay_front(start_front, tmp_path, ca, issue(ca))
    stranger = issue(other_ca, common_name="mx.sender.example", san_emails=[LISTED])
    with trio.fail_after(30):
        reply = await relay_attempt(front, context_with(ca, stranger, tmp_path))
        await log.wait_ends(1)
    assert code(reply) == 553
    (tls,) = front.sessions()
    assert tls["env"]["SSL_PROTOCOL"].startswith("TLSv1.")
    assert tls["env"]["SSL_CLIENT_VERIFY"].startswith("FAILED:")
    assert any(
        "Untrusted TLS connection established from" in line and "127.0.0.1" in line
        for line in log.lines
    )
    assert "cert=Untrusted relay=no" in log.ends[0]


async def test_the_backend_sees_the_real_client(
    start_front: Any, clean_environ: None, log: SessionLog
) -> None:
    """tlsfront runs with TCPREMOTEIP=10.66.66.66 and RELAYCLIENT= in its own
    environment; the exec'd qmail stand-in gets neither: its Received line
    names the real client, and a relay attempt gets 553."""
    front: Front = await start_front(EXEC_PROFILE)
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        for line in (b"HELO c", b"MAIL FROM:<a@example.net>"):
            assert code(await client.command(line)) == 250
        assert code(await client.command(b"RCPT TO:<x@elsewhere.example>")) == 553
        assert code(await client.command(b"RCPT TO:<b@example.org>")) == 250
        assert code(await client.command(b"DATA")) == 354
        assert code(await client.command(b"Subject: real\r\n\r\nhi\r\n.")) == 250
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
    (session,) = front.sessions()
    assert session["env"]["TCPREMOTEIP"] == "127.0.0.1"
    assert "RELAYCLIENT" not in session["env"]
    (delivered,) = front.maildir()
    assert b"Received: from unknown (HELO c) (127.0.0.1)\n" in delivered
    assert b"10.66.66.66" not in delivered


BACKEND_RULES = b'127.0.0.2:allow\n127.:allow,RELAYCLIENT=""\n'


async def tcpserver_backend(nursery: trio.Nursery, tmp_path: Path) -> int:
    """The capture backend under a real tcpserver whose rules let 127. relay."""
    source = tmp_path / "tcp.smtp"
    source.write_bytes(BACKEND_RULES)
    cdb = tmp_path / "tcp.smtp.cdb"
    await trio.run_process(
        [need_tool("tcprules"), str(cdb), str(tmp_path / "tcp.smtp.tmp")], stdin=BACKEND_RULES
    )
    capture = tmp_path / "capture"
    argv = [
        need_tool("tcpserver"),
        "-1",
        "-x",
        str(cdb),
        "-R",
        "-H",
        "-l",
        "backend.example.org",
        "127.0.0.1",
        "0",
        sys.executable,
        str(CAPTURE),
        "--dir",
        str(capture),
        "--rcpthost",
        "example.org",
    ]
    # Not this process's environment: clean_environ put RELAYCLIENT= in it.
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, env=environment)
    assert process.stdout is not None
    stdout = process.stdout

    async def reap() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                process.terminate()
                await process.wait()
                await stdout.aclose()

    nursery.start_soon(reap)
    port = b""
    while not port.endswith(b"\n"):
        port += await stdout.receive_some(16)
    return int(port)


async def test_tcp_backend_that_lets_localhost_relay(
    start_front: Any, nursery: trio.Nursery, tmp_path: Path, tls_dir: Path, clean_environ: None
) -> None:
    """A qmail-smtpd under tcpserver with `127.:allow,RELAYCLIENT=""`: tlsfront
    connects from 127.0.0.2, which the rules do not let relay, so a relay
    attempt gets 553; `tlsfront check` warns about that line when a profile
    would connect from an address it covers."""
    need_tool("tcpserver")
    port = await tcpserver_backend(nursery, tmp_path)
    front: Front = await start_front(f"""
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {{cert}}
backend_connect = "127.0.0.1:{port}"
source_address = "127.0.0.2"
""")
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        for line in (b"HELO c", b"MAIL FROM:<a@example.net>"):
            assert code(await client.command(line)) == 250
        assert code(await client.command(b"RCPT TO:<x@elsewhere.example>")) == 553
        assert code(await client.command(b"RCPT TO:<b@example.org>")) == 250
        assert code(await client.command(b"DATA")) == 354
        assert code(await client.command(b"Subject: tcp\r\n\r\nhi\r\n.")) == 250
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
    paths = (tmp_path / "capture").glob("session-*.json")
    records = [json.loads(path.read_text()) for path in paths]
    assert len(records) == 2  # the probe that learned the backend's EHLO, and the session
    for record in records:
        assert record["env"]["TCPREMOTEIP"] == "127.0.0.2"
        assert "RELAYCLIENT" not in record["env"]
    # The real client shows in tlsfront's own trace header.
    (delivered,) = read_maildir(tmp_path / "capture" / "Maildir")
    assert b"Received: from c ([127.0.0.1])\n\tby front.example.org (tlsfront)" in delivered

    async def check(source_address: str) -> str:
        directory = tmp_path / f"check-{source_address or 'default'}"
        directory.mkdir()
        config = write_config(
            directory,
            f"""
[defaults]
hostname = "front.example.org"

[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {toml_str(tls_dir / "servercert.pem")}
backend_connect = "127.0.0.1:{port}"
rules = {toml_str(tmp_path / "tcp.smtp")}
{f'source_address = "{source_address}"' if source_address else ""}
""",
        )
        done = await trio.run_process(
            [sys.executable, "-m", "tlsfront", "check", "-c", str(config)],
            capture_stdout=True,
            check=False,
        )
        assert done.returncode == 0  # warnings, no errors
        return done.stdout.decode()

    with trio.fail_after(30):
        unset = await check("")
        fixed = await check("127.0.0.2")
    assert "tcp.smtp:2 grants RELAYCLIENT to 127.0.0.1" in unset
    assert "an open relay" in unset
    assert "grants RELAYCLIENT" not in fixed


# ----------------------------------------------------------------------------
# Rows 13-16: bad bytes, sizes, floods

BAD_COMMAND = b"500 5.5.2 Error: bare CR, bare LF or NUL in command line\r\n"


@pytest.mark.parametrize(
    "line", [b"EHLO a\rb\r\n", b"EHLO a\0b\r\n", b"EHLO ab\n", b"MAIL FROM:<a@b>\n"]
)
async def test_bare_cr_lf_nul_in_commands(start_front: Any, line: bytes, log: SessionLog) -> None:
    """qmail would split at LF and stop at NUL: tlsfront refuses the line with
    500 and passes nothing of it on; the session goes on."""
    front: Front = await start_front(EXEC_PROFILE)
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        await client.send(line)
        assert await client.reply() == BAD_COMMAND
        assert code(await client.command(b"NOOP")) == 250
        # MAIL starts the backend: what it gets shows nothing of the bad line
        assert await client.command(b"MAIL FROM:<a@b>") == b"250 ok\r\n"
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
    (session,) = front.sessions()
    assert session["stdin"] == b"MAIL FROM:<a@b>\r\nQUIT\r\n"


async def test_hostile_certificate_name_adds_no_header(
    start_front: Any, tmp_path: Path, ca: trustme.CA, log: SessionLog
) -> None:
    """A client certificate whose CN is `x\\r\\nX-Evil: 1`: the Received header
    stays one header, and no variable given to the backend holds a line break."""
    front = await relay_front(start_front, tmp_path, ca, issue(ca))
    evil = issue(ca, common_name="x\r\nX-Evil: 1", san_emails=["someone@example.net"])
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        assert await client.command(b"STARTTLS") == READY
        await client.starttls(context_with(ca, evil, tmp_path))
        for line in (b"EHLO c.example", b"MAIL FROM:<a@example.net>", b"RCPT TO:<b@example.org>"):
            assert code(await client.command(line)) == 250
        assert code(await client.command(b"DATA")) == 354
        assert code(await client.command(b"Subject: evil\r\n\r\nhi\r\n.")) == 250
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
    (tls,) = front.sessions()
    (message,) = tls["messages"]
    header = message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert header[0].startswith(b"Received: from c.example ([127.0.0.1])")
    assert [line[:1] for line in header[1:-1]] == [b"\t"] * (len(header) - 2)
    assert header[-1] == b"Subject: evil"
    # the name shows only inside the certificate comment, made harmless there
    (named,) = [line for line in header if b"X-Evil" in line]
    assert named.startswith(b'\t(Client CN "x')
    assert not any("\r" in v or "\n" in v for k, v in tls["env"].items() if k != "SSL_CLIENT_CERT")
    assert not any(line.startswith("X-Evil") for line in "\n".join(log.lines).splitlines())


async def test_oversized_message(start_front: Any, log: SessionLog) -> None:
    """Above max_message_size: 552 for a SIZE= that says so, 552 for a body that
    turns out so; nothing queued, and the session goes on with a fresh backend."""
    front: Front = await start_front(EXEC_PROFILE + "max_message_size = 1000\n")
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        assert b"250-SIZE 1000\r\n" in await client.command(b"EHLO c")
        assert await client.command(b"MAIL FROM:<a@example.net> SIZE=5000") == (
            b"552 5.3.4 Error: message size exceeds fixed limit\r\n"
        )
        for line in (b"MAIL FROM:<a@example.net>", b"RCPT TO:<b@example.org>"):
            assert code(await client.command(line)) == 250
        assert code(await client.command(b"DATA")) == 354
        await client.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 30 + b".\r\n")
        assert await client.reply() == b"552 5.3.4 Error: message too big\r\n"
        assert code(await client.command(b"RSET")) == 250
        for line in (b"MAIL FROM:<a@example.net>", b"RCPT TO:<b@example.org>", b"DATA"):
            assert code(await client.command(line)) in (250, 354)
        await client.send(b"Subject: small\r\n\r\nfits\r\n.\r\n")
        assert code(await client.reply()) == 250
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
    dropped, fresh = front.sessions()
    assert dropped["messages"] == []
    assert b"SIZE=5000" not in dropped["stdin"]
    assert not dropped["stdin"].endswith(b"\r\n.\r\n")  # no end of data: nothing queued
    # its EHLO replayed; the fresh backend started at MAIL (the RSET, with no
    # backend running, was tlsfront's own)
    assert fresh["stdin"].startswith(b"EHLO c\r\nMAIL FROM:<a@example.net>\r\n")
    (message,) = front.maildir()
    assert b"Subject: small" in message
    assert " messages=1 refused=1 " in log.ends[0]


async def test_a_fatal_reply_over_tls_ends_with_close_notify(
    start_front: Any, recorder: RecordingBackend, client_context: ssl.SSLContext
) -> None:
    """After `500 5.5.2` for a line too long, the client reads the reply and
    then a TLS close_notify (b""), not a connection torn down under it."""
    front = await tcp_front(
        start_front,
        recorder,
        f"""
[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = {{cert}}
backend_connect = "{recorder.address}"
""",
    )
    with trio.fail_after(30):
        tcp = await trio.open_tcp_stream("127.0.0.1", front.port("smtps"))
        stream = trio.SSLStream(tcp, client_context, server_hostname="localhost")
        client = Client(stream)
        assert await client.reply() == GREETING
        for line in (b"EHLO c", b"MAIL FROM:<a@example.net>", b"RCPT TO:<b@example.org>"):
            assert code(await client.command(line)) == 250
        assert code(await client.command(b"DATA")) == 354
        await client.send(b"." + b"y" * 999 + b"\r\n")  # 999 octets and the stuffed dot
        assert await client.reply() == b"500 5.5.2 Error: message line too long\r\n"
        assert await stream.receive_some() == b""  # raises on an EOF without close_notify
        await stream.aclose()


async def test_one_more_than_the_total_limit(start_front: Any, recorder: RecordingBackend) -> None:
    """max_connections, from four addresses: the one too many gets 421 4.7.0,
    the others go on. (The per-address limit: test_server.py.)"""
    front: Front = await start_front(
        TCP_PROFILE.format(backend=recorder.address).replace(
            "max_connections = 1000", "max_connections = 3"
        )
    )
    with trio.fail_after(30):
        clients = []
        for i in (2, 3, 4):
            client = await Client.connect(front.port("smtp"), local_address=f"127.0.0.{i}")
            assert await client.reply() == GREETING
            clients.append(client)
        extra = await Client.connect(front.port("smtp"), local_address="127.0.0.5")
        assert await extra.reply() == (
            b"421 4.7.0 front.example.org Error: too many connections\r\n"
        )
        assert await is_closed(extra)
        await extra.aclose()
        for client in clients:
            assert await client.command(b"NOOP") == b"250 ok\r\n"
            await client.aclose()
        await recorder.all_done()
    assert len(recorder.conversations) == 3


# ----------------------------------------------------------------------------
# Rows 18, 21, 22: the end of a message, its trace header, extensions


async def test_client_vanishes_mid_data(start_front: Any, log: SessionLog) -> None:
    """Half a body, then the connection closes: the backend sees its input end
    without a final dot, and nothing is queued."""
    front: Front = await start_front(EXEC_PROFILE)
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        await client.send(ENVELOPE)
        assert [code(await client.reply()) for _ in range(4)] == [250, 250, 250, 354]
        await client.send(b"Subject: half\r\n\r\nthe first half of a bo")
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
        await log.wait_ends(1)
    (session,) = front.sessions()
    assert session["messages"] == []
    assert session["envelopes"][0]["complete"] is False
    # the body goes on as it comes, an unfinished line too, but never an end
    assert session["partial"].endswith(b"Subject: half\r\n\r\nthe first half of a bo")
    assert b"\r\n.\r\n" not in session["stdin"]
    assert session["exit"] == 1  # qmail's die_read
    assert front.maildir() == []
    assert "reason='client closed the connection during DATA'" in log.ends[0]


@pytest.mark.parametrize("tls", [True, False])
async def test_one_well_formed_trace_header(
    start_front: Any, client_context: ssl.SSLContext, log: SessionLog, tls: bool
) -> None:
    """The first bytes the backend receives after 354: one new Received header
    on top of the client's own, `with ESMTPS` over TLS (RFC 3848), CRLF line
    ends, folded lines starting with white space, none longer than 998."""
    front: Front = await start_front(EXEC_PROFILE)
    message = b"Received: from earlier.example by client.example; 1 Jan 2026\r\n"
    message += b"Subject: trace\r\n\r\nbody\r\n"
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        if tls:
            assert await client.command(b"STARTTLS") == READY
            await client.starttls(client_context)
        for line in (
            b"EHLO client.example",
            b"MAIL FROM:<a@example.net>",
            b"RCPT TO:<b@example.org>",
        ):
            assert code(await client.command(line)) == 250
        assert code(await client.command(b"DATA")) == 354
        assert code(await client.command(message + b".")) == 250
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
    (body,) = front.sessions()[-1]["messages"]
    assert body.endswith(b"\r\n" + message + b".\r\n")
    ours = body[: -len(message + b".\r\n")]
    lines = ours.split(b"\r\n")
    assert lines[-1] == b""  # ends with CRLF
    assert lines[0].startswith(b"Received: from client.example ([127.0.0.1])")
    assert all(line[:1] in (b"\t", b" ") for line in lines[1:-1])
    assert all(len(line) <= 998 for line in lines)
    assert b"\n" not in ours.replace(b"\r\n", b"")
    assert b"\r" not in ours.replace(b"\r\n", b"")
    assert ours.count(b"Received:") == 1
    if tls:
        assert b"\tby front.example.org (tlsfront) with ESMTPS\r\n\t(using TLSv1." in ours
    else:
        assert b"\tby front.example.org (tlsfront) with ESMTP;\r\n" in ours


async def test_nothing_advertised_the_backend_cannot_honour(
    start_front: Any, nursery: trio.Nursery
) -> None:
    """A backend that offers more than tlsfront can carry: CHUNKING, BINARYMIME,
    XCLIENT, XFORWARD and its own STARTTLS are dropped; BDAT and XCLIENT are
    refused by tlsfront and never reach it; REQUIRETLS is not advertised, and a
    MAIL that asks for it gets the backend's own answer."""
    backend = await RecordingBackend(
        ehlo=[
            b"PIPELINING",
            b"8BITMIME",
            b"CHUNKING",
            b"BINARYMIME",
            b"XCLIENT NAME ADDR",
            b"XFORWARD NAME",
            b"STARTTLS",
            b"SMTPUTF8",
        ]
    ).start(nursery)
    front = await tcp_front(start_front, backend)
    with trio.fail_after(30):
        client = await connect(front)
        ehlo = await client.command(b"EHLO c")
        keywords = [line[4:].split(b" ")[0] for line in ehlo.splitlines()[1:]]
        assert keywords == [b"PIPELINING", b"8BITMIME", b"STARTTLS", b"SMTPUTF8"]
        not_implemented = b"502 5.5.1 Error: command not implemented\r\n"
        assert await client.command(b"MAIL FROM:<a@example.net> REQUIRETLS") == b"250 ok\r\n"
        assert await client.command(b"BDAT 10 LAST") == not_implemented
        assert await client.command(b"XCLIENT ADDR=10.0.0.1") == not_implemented
        assert await client.command(b"QUIT") == BYE
        await client.aclose()
        await backend.all_done()
    (conv,) = backend.conversations
    assert conv.commands == [
        b"EHLO c\r\n",
        b"MAIL FROM:<a@example.net> REQUIRETLS\r\n",
        b"QUIT\r\n",
    ]
