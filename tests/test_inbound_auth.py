"""tlsfront's own SMTP AUTH in front of the capture backend, with real clients.

The verifier is a checkpassword program that follows the interface
(tests/support/checkpassword.py: alice / wonderland is good). A good login
relays: the backend started after it has RELAYCLIENT, TCPREMOTEINFO and
SMTPAUTHUSER; a bad one gets 535 5.7.8 and the backend refuses the remote
recipient.
"""

from __future__ import annotations

import base64
import logging
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from support.front import Front, need_tool, toml_str
from support.hostile import SessionLog, session_log
from test_auth_dovecot import Dovecot
from test_auth_dovecot import dovecot as dovecot  # the fixture, a real Dovecot

from tlsfront.ops.counters import REGISTRY

CHECKPASSWORD = Path(__file__).parent / "support" / "checkpassword.py"
VERIFIER = f'[{toml_str(sys.executable)}, {toml_str(CHECKPASSWORD)}, "/bin/true"]'
PROFILES = f"""
[profile.submission]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {{cert}}
backend = {{backend}}
auth_checkpassword = {VERIFIER}
received_auth_user = true

[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = {{cert}}
backend = {{backend}}
auth_checkpassword = {VERIFIER}
"""
REMOTE = "someone@elsewhere.example"
MESSAGE = b"Subject: auth\r\n\r\nhello\r\n"
BAD = "not-the-password-4711"


@pytest.fixture
def log() -> Iterator[SessionLog]:
    with session_log() as handler:
        yield handler


async def in_thread(fn: Callable[[], Any]) -> Any:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(fn)


def submit(
    port: int, context: ssl.SSLContext, password: str, *, implicit: bool, mechanism: str
) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    smtp: smtplib.SMTP
    if implicit:
        smtp = smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=context)
    else:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    with smtp:
        if not implicit:
            smtp.ehlo("client.example")
            seen["before_tls"] = dict(smtp.esmtp_features)
            seen["auth_in_clear"] = smtp.docmd("AUTH", "PLAIN")
            smtp.starttls(context=context)
        smtp.ehlo("client.example")
        seen["features"] = dict(smtp.esmtp_features)
        smtp.user, smtp.password = "alice", password
        auth = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        try:
            seen["login"] = smtp.auth(mechanism, auth, initial_response_ok=mechanism == "PLAIN")
        except smtplib.SMTPAuthenticationError as exc:
            seen["login"] = (exc.smtp_code, exc.smtp_error)
        if seen["login"][0] == 235:
            seen["again"] = smtp.docmd("AUTH", "PLAIN")
        seen["mail"] = smtp.docmd("MAIL", "FROM:<alice@example.org>")
        seen["in_transaction"] = smtp.docmd("AUTH", "PLAIN")
        seen["rcpt"] = smtp.docmd("RCPT", f"TO:<{REMOTE}>")
        if seen["rcpt"][0] == 250:
            seen["dot"] = smtp.data(MESSAGE)
    return seen


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_good_login_relays_with_the_users_environment(
    start_front: Any,
    client_context: ssl.SSLContext,
    log: SessionLog,
    implicit: bool,
    mechanism: str,
) -> None:
    front: Front = await start_front(PROFILES)
    port = front.port("smtps" if implicit else "submission")
    seen = await in_thread(
        lambda: submit(port, client_context, "wonderland", implicit=implicit, mechanism=mechanism)
    )
    with trio.fail_after(30):
        await log.wait_ends(1)
    if not implicit:
        assert "auth" not in seen["before_tls"]  # no AUTH in clear
        assert seen["auth_in_clear"] == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert seen["features"]["auth"].split() == ["PLAIN", "LOGIN"]
    assert seen["login"] == (235, b"2.7.0 Authentication successful")
    assert seen["again"] == (503, b"5.5.1 Already authenticated")
    assert seen["in_transaction"][0] == 503
    assert seen["rcpt"][0] == 250  # a remote recipient: the backend lets alice relay
    assert seen["dot"][0] == 250
    (session,) = front.sessions()  # one backend, started after the login
    env = session["env"]
    assert env["RELAYCLIENT"] == ""
    assert env["TCPREMOTEINFO"] == env["SMTPAUTHUSER"] == "alice"
    (body,) = session["messages"]
    header = body.split(b"\r\n\r\n")[0]
    assert b"(tlsfront) with ESMTPSA" in header
    assert (b"(authenticated as alice)" in header) is (not implicit)  # received_auth_user


async def test_bad_password_is_refused_and_nothing_relays(
    start_front: Any,
    client_context: ssl.SSLContext,
    log: SessionLog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tlsfront")
    front: Front = await start_front(PROFILES)
    port = front.port("submission")
    labels = {"profile": "submission", "mechanism": "PLAIN", "verifier": "checkpassword"}

    def counted(result: str) -> float:
        found = REGISTRY.get_sample_value(
            "tlsfront_auth_results_total", {**labels, "result": result}
        )
        return found or 0.0

    before = counted("bad"), counted("good")
    seen = await in_thread(
        lambda: submit(port, client_context, BAD, implicit=False, mechanism="PLAIN")
    )
    assert (counted("bad"), counted("good")) == (before[0] + 1, before[1])
    with trio.fail_after(30):
        await log.wait_ends(1)
    assert seen["login"] == (535, b"5.7.8 Authentication credentials invalid")
    assert seen["rcpt"][0] == 553  # the backend: no relaying without a login
    (session,) = front.sessions()
    assert "RELAYCLIENT" not in session["env"]
    assert "SMTPAUTHUSER" not in session["env"]
    failures = [r.getMessage() for r in caplog.records if "AUTH failed" in r.getMessage()]
    assert failures == [
        "AUTH failed: client=127.0.0.1 user=alice mechanism=PLAIN verifier=checkpassword"
    ]


async def test_the_password_never_reaches_the_log(
    start_front: Any,
    client_context: ssl.SSLContext,
    log: SessionLog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG, with good and bad logins by both mechanisms: neither password,
    nor its base64, nor the PLAIN message's, is in any log record."""
    caplog.set_level(logging.DEBUG)
    front: Front = await start_front(PROFILES, 'log_level = "debug"\n')
    port = front.port("submission")
    for password in ("wonderland", BAD):
        for mechanism in ("PLAIN", "LOGIN"):
            await in_thread(
                partial(submit, port, client_context, password, implicit=False, mechanism=mechanism)
            )
    with trio.fail_after(60):
        await log.wait_ends(4)
    text = "\n".join(f"{r.getMessage()} {r.args!r} {r.__dict__}" for r in caplog.records)
    for password in ("wonderland", BAD):
        assert password not in text
        assert base64.b64encode(password.encode()).decode() not in text
        plain = base64.b64encode(f"\0alice\0{password}".encode()).decode()
        assert plain not in text
    assert "logged in as alice" in text  # the log does speak of the logins


async def test_require_auth_refuses_mail_before_a_login(
    start_front: Any, client_context: ssl.SSLContext, log: SessionLog
) -> None:
    front: Front = await start_front(
        PROFILES.replace("received_auth_user = true", "require_auth = true")
    )
    port = front.port("submission")

    def session() -> tuple[Any, Any]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.starttls(context=client_context)
            smtp.ehlo("client.example")
            refused = smtp.docmd("MAIL", "FROM:<alice@example.org>")
            smtp.login("alice", "wonderland")
            return refused, smtp.docmd("MAIL", "FROM:<alice@example.org>")

    refused, accepted = await in_thread(session)
    with trio.fail_after(30):
        await log.wait_ends(1)
    assert refused == (530, b"5.7.0 Authentication required")
    assert accepted[0] == 250


async def test_connect_mode_replaces_the_backend_from_before_the_login(
    start_front: Any, client_context: ssl.SSLContext, log: SessionLog
) -> None:
    front: Front = await start_front(
        PROFILES.replace("received_auth_user = true", 'backend_start = "connect"')
    )
    port = front.port("submission")
    seen = await in_thread(
        lambda: submit(port, client_context, "wonderland", implicit=False, mechanism="PLAIN")
    )
    with trio.fail_after(30):
        await log.wait_ends(1)
    assert seen["dot"][0] == 250
    plain, tls, after_login = front.sessions()
    assert "RELAYCLIENT" not in tls["env"]
    assert b"AUTH" not in tls["stdin"]  # tlsfront's own: never passed on
    assert after_login["env"]["SMTPAUTHUSER"] == "alice"
    assert after_login["stdin"].startswith(b"ehlo client.example\r\nMAIL FROM:<alice@")
    assert len(after_login["messages"]) == 1
    assert plain["messages"] == tls["messages"] == []


@pytest.mark.parametrize("tls", ["--tls", "--tls-on-connect"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks(
    start_front: Any, tls_dir: Path, log: SessionLog, tls: str, mechanism: str
) -> None:
    swaks = need_tool("swaks")
    front: Front = await start_front(PROFILES)
    port = front.port("smtps" if tls == "--tls-on-connect" else "submission")

    def run(password: str) -> subprocess.CompletedProcess[str]:
        argv = [swaks, "--server", "127.0.0.1", "--port", str(port), tls,
                "--auth", mechanism, "--auth-user", "alice", "--auth-password", password,
                "--from", "alice@example.org", "--to", REMOTE, "--timeout", "30"]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    good = await in_thread(lambda: run("wonderland"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "<~  235 2.7.0 Authentication successful" in good.stdout
    bad = await in_thread(lambda: run(BAD))
    assert "<~* 535 5.7.8 Authentication credentials invalid" in bad.stdout
    with trio.fail_after(30):
        await log.wait_ends(2)
    (session,) = front.sessions()  # the good one's; the bad one sent no MAIL
    assert session["env"]["SMTPAUTHUSER"] == "alice"
    assert len(session["messages"]) == 1


async def test_dovecot_verifies_for_a_profile(
    start_front: Any, client_context: ssl.SSLContext, log: SessionLog, dovecot: Dovecot
) -> None:
    """A real Dovecot (its passwd-file has alice / wonderland), one connection
    for the sessions of the server."""
    front: Front = await start_front(
        PROFILES.replace(
            f"auth_checkpassword = {VERIFIER}", f"auth_dovecot = {toml_str(dovecot.socket)}"
        )
    )
    port = front.port("submission")
    good = await in_thread(
        lambda: submit(port, client_context, "wonderland", implicit=False, mechanism="LOGIN")
    )
    bad = await in_thread(
        lambda: submit(port, client_context, BAD, implicit=False, mechanism="PLAIN")
    )
    with trio.fail_after(30):
        await log.wait_ends(2)
    assert good["login"] == (235, b"2.7.0 Authentication successful")
    assert good["dot"][0] == 250
    assert bad["login"] == (535, b"5.7.8 Authentication credentials invalid")
    assert bad["rcpt"][0] == 553
    relayed = [s for s in front.sessions() if "SMTPAUTHUSER" in s["env"]]
    assert [s["env"]["SMTPAUTHUSER"] for s in relayed] == ["alice"]
