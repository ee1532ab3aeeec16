"""Interop with clients nobody here wrote: swaks and openssl s_client."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from support.front import Front, need_tool

PROFILES = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}

[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = {cert}
backend = {backend}
"""

pytestmark = pytest.mark.interop


async def run(argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )


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
        "rcpt@example.org",
        "--helo",
        "swaks.example.net",
        "--header",
        "Subject: interop",
        *extra,
    ]


@pytest.mark.parametrize(
    ("profile", "flags"),
    [("smtp", ["--tls"]), ("smtps", ["--tls-on-connect"]), ("smtp", ["--tls", "--pipeline"])],
)
async def test_swaks(start_front: Any, profile: str, flags: list[str]) -> None:
    front: Front = await start_front(PROFILES)
    result = await run(swaks(front.port(profile), *flags))
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "TLS started" in output or profile == "smtps"
    assert "<~  250 ok " in output  # the reply to the dot, over TLS
    (delivered,) = front.maildir()
    assert b"by front.example.org (tlsfront) with ESMTPS" in delivered
    assert b"Subject: interop" in delivered


async def test_swaks_sees_starttls_once_and_only_before_tls(start_front: Any) -> None:
    front: Front = await start_front(PROFILES)
    result = await run(swaks(front.port("smtp"), "--tls", "--quit-after", "helo"))
    output = result.stdout.decode()
    assert output.count("250-STARTTLS") + output.count("250 STARTTLS") == 1
    # the EHLO after TLS (swaks prints TLS lines with '~>'/'<~') has no STARTTLS
    after_tls = output.split("TLS started", 1)[1]
    assert "STARTTLS" not in after_tls


S_CLIENT_DIALOGUE = (
    b"EHLO openssl.example.net\r\nMAIL FROM:<a@example.net>\r\n"
    b"RCPT TO:<b@example.org>\r\nDATA\r\n"
    b"Subject: via s_client\r\n\r\nhello\r\n.\r\nQUIT\r\n"
)
# s_client writes its stdin as it reads it, never waiting for a reply: the
# body comes before the 354, which only a relaxed profile takes.
RELAXED = PROFILES.replace('tls = "starttls"\n', 'tls = "starttls"\npipelining_strict = false\n')


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "relaxed"])
async def test_openssl_s_client_starttls(start_front: Any, tls_dir: Path, strict: bool) -> None:
    front: Front = await start_front(PROFILES if strict else RELAXED)
    result = await run(
        [
            need_tool("openssl"),
            "s_client",
            "-starttls",
            "smtp",
            "-quiet",
            "-connect",
            f"127.0.0.1:{front.port('smtp')}",
            "-CAfile",
            str(tls_dir / "ca.pem"),
            "-verify_return_error",
            "-servername",
            "localhost",
        ],
        stdin=S_CLIENT_DIALOGUE,
    )
    assert b"verify return:1" in result.stderr
    if strict:
        assert b"554 5.5.0 Error: SMTP protocol synchronization" in result.stdout
        assert b"354" not in result.stdout
        assert front.maildir() == []
        return
    # relaxed: the body waits in tlsfront for the 354, DATA mode only then
    assert b"354 go ahead" in result.stdout
    assert b"221 front.example.org" in result.stdout
    (delivered,) = front.maildir()
    assert b"Subject: via s_client" in delivered
    assert b"with ESMTPS" in delivered
