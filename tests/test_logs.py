"""Log lines: the text and JSON formats, the session end line, nothing secret."""

from __future__ import annotations

import io
import json
import logging
import os
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from support.front import Front
from support.hostile import Client, code

from tlsfront.ops import logs

PROFILE = """
[profile.logged]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}
"""

MARKER = b"body-marker-7f3a9c"


def record(
    message: str, *args: object, level: int = logging.INFO, **extra: Any
) -> logging.LogRecord:
    rec = logging.LogRecord("tlsfront.inbound.session", level, __file__, 1, message, args, None)
    for key, val in extra.items():
        setattr(rec, key, val)
    return rec


def test_text_is_one_line_per_event() -> None:
    formatter = logs.TextFormatter()
    line = formatter.format(record("from %s: %s", "[192.0.2.1]", "evil\r\nINFO forged line\x00"))
    assert line == "INFO from [192.0.2.1]: evil\\x0d\\x0aINFO forged line\\x00"
    assert "\n" not in line


def test_text_for_journald_carries_the_priority() -> None:
    formatter = logs.TextFormatter(syslog_prefix=True)
    assert formatter.format(record("x", level=logging.ERROR)) == "<3>ERROR x"
    assert formatter.format(record("x", level=logging.WARNING)) == "<4>WARNING x"
    assert formatter.format(record("x")) == "<6>INFO x"


def test_json_has_the_event_fields() -> None:
    rec = record(
        "session end: ...", **logs.fields("session_end", {"client_ip": "192.0.2.1", "messages": 2})
    )
    line = logs.JSONFormatter().format(rec)
    assert "\n" not in line
    data = json.loads(line)
    assert data["event"] == "session_end"
    assert data["client_ip"] == "192.0.2.1"
    assert data["messages"] == 2
    assert data["level"] == "info"
    assert data["logger"] == "tlsfront.inbound.session"
    assert data["message"] == "session end: ..."
    assert data["time"].endswith("Z")
    # A field never overwrites the basic keys.
    clash = record("m", **logs.fields("x", {"message": "forged", "level": "debug"}))
    data = json.loads(logs.JSONFormatter().format(clash))
    assert (data["message"], data["level"]) == ("m", "info")


def test_json_carries_an_exception_in_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord(
            "tlsfront", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = logs.JSONFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_journal_stream_is_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stream"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.stderr_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not logs.stderr_is_journal(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not logs.stderr_is_journal(stream)


@contextmanager
def captured(formatter: logging.Formatter) -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger = logging.getLogger("tlsfront")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_setup_chooses_the_format() -> None:
    logger = logging.getLogger("tlsfront")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        out = io.StringIO()
        logs.setup("warning", "json", out)
        logging.getLogger("tlsfront.inbound.session").info("not shown")
        logging.getLogger("tlsfront.inbound.session").warning("shown")
        (line,) = out.getvalue().splitlines()
        assert json.loads(line)["message"] == "shown"
        out = io.StringIO()
        logs.setup("info", "text", out)
        logging.getLogger("tlsfront").info("plain")
        assert out.getvalue() == "INFO plain\n"
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


async def one_session(front: Front, context: ssl.SSLContext) -> None:
    client = await Client.connect(front.port("logged"))
    assert code(await client.reply()) == 220
    assert code(await client.command(b"EHLO client.example.net")) == 250
    assert code(await client.command(b"STARTTLS")) == 220
    await client.starttls(context)
    assert code(await client.command(b"EHLO client.example.net")) == 250
    assert code(await client.command(b"MAIL FROM:<a@example.net>")) == 250
    assert code(await client.command(b"RCPT TO:<b@example.org>")) == 250
    assert code(await client.command(b"DATA")) == 354
    await client.send(b"Subject: " + MARKER + b"\r\n\r\n" + MARKER + b"\r\n.\r\n")
    assert code(await client.reply()) == 250
    assert code(await client.command(b"QUIT")) == 221
    assert await client.rest() == b""
    await client.aclose()


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_session_end_line_has_every_field(
    start_front: Any, client_context: ssl.SSLContext, tls_dir: Path, fmt: str
) -> None:
    front: Front = await start_front(PROFILE)
    formatter = logs.JSONFormatter() if fmt == "json" else logs.TextFormatter()
    with captured(formatter) as out:
        with trio.fail_after(30):
            await one_session(front, client_context)
            await front.server.wait_idle()  # the end line comes once the backend is reaped
    text = out.getvalue()
    # No message content and no key material, in any line.
    assert MARKER.decode() not in text
    key_pem = (tls_dir / "servercert.pem").read_text()
    key_body = key_pem.split("PRIVATE KEY-----")[1].split("-----")[0].strip().splitlines()
    assert not any(part in text for part in key_body if len(part) > 16)
    lines = text.splitlines()
    if fmt == "text":
        (end,) = [line for line in lines if line.startswith("INFO session end:")]
        for key in (
            "client=127.0.0.1:",
            "profile=logged",
            "tls=TLSv1.",
            "cert=Anonymous",
            "relay=no",
            "messages=1",
            "refused=0",
            "bytes=",
            "backend_exit=0",
            "duration=",
            "outcome=ok",
            "reason='quit'",
        ):
            assert key in end
        (handshake,) = [line for line in lines if "TLS connection established" in line]
        assert handshake.startswith("INFO Anonymous TLS connection established from ")
        return
    entries = [json.loads(line) for line in lines]
    (end,) = [e for e in entries if e.get("event") == "session_end"]
    assert end["client_ip"] == "127.0.0.1"
    assert end["client_port"] > 0
    assert end["profile"] == "logged"
    assert end["tls_version"].startswith("TLSv1.")
    assert end["tls_cipher"]
    assert (end["cert"], end["relay"]) == ("Anonymous", "no")
    assert (end["messages"], end["refused"]) == (1, 0)
    assert end["bytes"] > 2 * len(MARKER)
    assert end["backend_exit"] == 0
    assert isinstance(end["duration"], float)
    assert (end["outcome"], end["reason"]) == ("ok", "quit")
    (tls,) = [e for e in entries if e.get("event") == "tls"]
    assert tls["tls_version"] == end["tls_version"]
    assert tls["cert"] == "Anonymous"
