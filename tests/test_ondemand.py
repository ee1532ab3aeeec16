"""The backend on demand, end to end: backend starts counted, refusing backends.

Every backend start is a real process that leaves a record (`Front.started`),
the probe's included; `Front.sessions` is the clients' share of them.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from support.front import FAULTY, Front, capture_backend, need_tool, toml_str
from support.hostile import SessionLog, session_log
from support.ucspi import Lines

LIMIT = 30

PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}
"""
IMPLICIT = """
[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = {cert}
backend = {backend}
"""


@pytest.fixture
def log() -> Iterator[SessionLog]:
    with session_log() as handler:
        yield handler


async def plain(front: Front, profile: str = "smtp") -> tuple[trio.abc.Stream, Lines]:
    stream = await trio.open_tcp_stream("127.0.0.1", front.port(profile))
    return stream, Lines(stream)


async def starttls(
    lines: Lines, context: ssl.SSLContext, ehlo: bytes = b"EHLO client.example"
) -> Lines:
    assert (await lines.command(b"STARTTLS")).startswith(b"220 ")
    tls = trio.SSLStream(lines.stream, context, server_hostname="localhost")
    await tls.do_handshake()
    tls_lines = Lines(tls)
    assert (await tls_lines.command(ehlo)).startswith(b"250")
    return tls_lines


async def mail(lines: Lines) -> None:
    assert (await lines.command(b"MAIL FROM:<a@example.net>")).startswith(b"250")
    assert (await lines.command(b"RCPT TO:<b@example.org>")).startswith(b"250")
    assert (await lines.command(b"DATA")).startswith(b"354")
    assert (await lines.command(b"Subject: t\r\n\r\nhi\r\n.")).startswith(b"250")


@pytest.mark.parametrize(
    ("start", "with_mail", "backends"),
    [
        ("on-demand", False, 0),  # EHLO, STARTTLS, EHLO, QUIT: no backend at all
        ("on-demand", True, 1),  # one backend, started at MAIL, inside TLS
        ("connect", False, 2),  # one per phase, as before
        ("connect", True, 2),
    ],
)
async def test_backend_starts_per_starttls_session(
    start_front: Any,
    client_context: ssl.SSLContext,
    log: SessionLog,
    start: str,
    with_mail: bool,
    backends: int,
) -> None:
    front: Front = await start_front(PROFILE + f'backend_start = "{start}"\n')
    probes = len(front.started())
    assert probes == (1 if start == "on-demand" else 0)
    with trio.fail_after(LIMIT):
        _, lines = await plain(front)
        assert (await lines.reply()).startswith(b"220 ")
        assert b"STARTTLS" in await lines.command(b"EHLO client.example")
        tls = await starttls(lines, client_context)
        if with_mail:
            await mail(tls)
        assert (await tls.command(b"QUIT")).startswith(b"221 ")
        await tls.stream.aclose()
        await log.wait_ends(1)
    assert len(front.started()) - probes == backends
    assert len(front.maildir()) == with_mail
    if with_mail:
        session = front.sessions()[-1]
        assert session["env"]["SSL_PROTOCOL"].startswith("TLSv1.")
        # the client's own EHLO, for qmail's Received line
        assert session["stdin"].startswith(b"EHLO client.example\r\nMAIL FROM:<a@example.net>")


async def test_implicit_tls_session_without_mail_starts_no_backend(
    start_front: Any, client_context: ssl.SSLContext, log: SessionLog
) -> None:
    front: Front = await start_front(IMPLICIT)
    with trio.fail_after(LIMIT):
        tcp = await trio.open_tcp_stream("127.0.0.1", front.port("smtps"))
        stream = trio.SSLStream(tcp, client_context, server_hostname="localhost")
        lines = Lines(stream)
        assert (await lines.reply()).startswith(b"220 ")
        assert (await lines.command(b"EHLO scanner.example")).startswith(b"250")
        assert (await lines.command(b"NOOP")).startswith(b"250")
        assert (await lines.command(b"RSET")).startswith(b"250")
        assert (await lines.command(b"QUIT")).startswith(b"221 ")
        await stream.aclose()
        await log.wait_ends(1)
    assert front.sessions() == []
    assert "outcome=ok reason='quit'" in log.ends[0]


async def test_the_probe_and_the_answers_it_teaches(start_front: Any, log: SessionLog) -> None:
    """tlsfront's greeting and EHLO reply are the backend's, byte for byte."""
    both = PROFILE + PROFILE.replace("smtp]", "connect]") + 'backend_start = "connect"\n'
    front: Front = await start_front(both)
    (probe,) = front.started()
    env = probe["env"]
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("127.0.0.1", "0")
    assert env["TCPLOCALPORT"] == "0"  # the configured port: 0 in the tests
    assert "SSL_PROTOCOL" not in env
    assert probe["stdin"] == b"EHLO front.example.org\r\nQUIT\r\n"
    seen = {}
    with trio.fail_after(LIMIT):
        for name in ("smtp", "connect"):
            stream, lines = await plain(front, name)
            greeting = await lines.reply()
            seen[name] = (
                greeting,
                await lines.command(b"EHLO c"),
                await lines.command(b"HELO c"),
            )
            await lines.command(b"QUIT")
            await stream.aclose()
        await log.wait_ends(2)
    assert seen["smtp"] == seen["connect"]
    assert seen["smtp"][1] == (
        b"250-front.example.org\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
    )


async def test_qmail_control_names_the_greeting(
    start_front: Any, tmp_path: Path, tls_dir: Path, log: SessionLog
) -> None:
    control = tmp_path / "control"
    control.mkdir()
    (control / "me").write_text("me.example.org\n")
    (control / "smtpgreeting").write_text("greeting.example.org hello\n")
    (control / "servercert.pem").write_bytes((tls_dir / "servercert.pem").read_bytes())
    front: Front = await start_front(
        PROFILE.replace("cert = {cert}", f"qmail_control = {toml_str(control)}")
    )
    with trio.fail_after(LIMIT):
        stream, lines = await plain(front)
        assert await lines.reply() == b"220 greeting.example.org hello ESMTP\r\n"
        ehlo = await lines.command(b"EHLO c")
        assert ehlo.startswith(b"250-greeting.example.org hello\r\n250-PIPELINING\r\n")
        await lines.command(b"QUIT")
        await stream.aclose()
        await log.wait_ends(1)


def wrapped(tmp_path: Path, *front_argv: str) -> str:
    """The capture backend behind other programs, as a TOML array."""
    capture = capture_backend(tmp_path / "capture")
    return "[" + "".join(f"{toml_str(a)}, " for a in front_argv) + capture[1:]


async def test_probe_failure_offers_no_extension_until_a_session_shows_them(
    start_front: Any, tmp_path: Path, log: SessionLog
) -> None:
    """A backend down at start: tlsfront starts, and offers only its own keywords."""
    up = tmp_path / "up"
    script = tmp_path / "not-yet"
    script.write_text(f"#!/bin/sh\n[ -e {up} ] || {{ printf '421 not yet\\r\\n'; exit 0; }}\n")
    script.write_text(script.read_text() + 'exec "$@"\n')
    script.chmod(0o755)
    front: Front = await start_front(
        PROFILE.replace("{backend}", wrapped(tmp_path, str(script)).replace("{", "{{"))
    )
    assert front.sessions() == []
    up.touch()  # the backend is there now
    with trio.fail_after(LIMIT):
        for ended, ehlo in enumerate((b"250-front.example.org\r\n250 STARTTLS\r\n", None)):
            stream, lines = await plain(front)
            assert await lines.reply() == b"220 front.example.org ESMTP\r\n"
            reply = await lines.command(b"EHLO c")
            if ehlo is not None:
                assert reply == ehlo
                # the session's backend answers the client's EHLO: its extensions
                assert (await lines.command(b"MAIL FROM:<a@example.net>")).startswith(b"250")
            else:
                assert reply == (
                    b"250-front.example.org\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
                )
            await lines.command(b"QUIT")
            await stream.aclose()
            await log.wait_ends(ended + 1)


@pytest.mark.parametrize("listed", ["-You are listed", "Try later"])
async def test_rblsmtpd_in_the_chain_refuses_and_nothing_is_queued(
    start_front: Any, client_context: ssl.SSLContext, tmp_path: Path, log: SessionLog, listed: str
) -> None:
    """rblsmtpd (RBLSMTPD set: no DNS) answers the client; qmail-smtpd never runs."""
    chain = wrapped(tmp_path, need_tool("rblsmtpd"), "-r", "rbl.invalid")
    front: Front = await start_front(
        PROFILE.replace("{backend}", chain.replace("{", "{{"))
        + f"env = {{{{ RBLSMTPD = {toml_str(listed)} }}}}\n"
    )
    code, text = (b"553", listed[1:]) if listed.startswith("-") else (b"451", listed)
    with trio.fail_after(LIMIT):
        _, lines = await plain(front)
        assert await lines.reply() == b"220 rblsmtpd.local\r\n"  # its own greeting
        await lines.command(b"EHLO c")
        tls = await starttls(lines, client_context)
        await tls.command(b"MAIL FROM:<a@example.net>")
        refusal = await tls.command(b"RCPT TO:<b@example.org>")
        assert refusal == code + b" " + text.encode() + b"\r\n"
        assert await tls.command(b"DATA") == refusal
        assert (await tls.command(b"QUIT")).startswith(b"221 ")
        await tls.stream.aclose()
        await log.wait_ends(1)
    assert front.sessions() == []  # the program behind rblsmtpd never ran
    assert front.maildir() == []


@pytest.mark.parametrize(
    ("mode", "reply", "closes"),
    [
        ("421-at-connect", b"421 service unavailable\r\n", True),
        ("greeting-554", b"554 blocked\r\n", False),
    ],
)
async def test_a_refusing_greeting_refuses_the_command_that_started_it(
    start_front: Any, log: SessionLog, mode: str, reply: bytes, closes: bool
) -> None:
    argv = ", ".join(toml_str(a) for a in (sys.executable, FAULTY, "--mode", mode))
    front: Front = await start_front(PROFILE.replace("{backend}", f"[{argv}]"))
    with trio.fail_after(LIMIT):
        stream, lines = await plain(front)
        assert await lines.reply() == b"220 front.example.org ESMTP\r\n"  # the probe failed
        assert await lines.command(b"EHLO c") == b"250-front.example.org\r\n250 STARTTLS\r\n"
        assert await lines.command(b"MAIL FROM:<a@example.net>") == reply
        if closes:
            assert await stream.receive_some() == b""
        else:
            assert await lines.command(b"RCPT TO:<b@example.org>") == reply
            assert await lines.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
            assert (await lines.command(b"QUIT")).startswith(b"221 ")
        await stream.aclose()
        await log.wait_ends(1)
    outcome = "backend_closed" if closes else "ok"
    assert f"outcome={outcome}" in log.ends[0]
