"""A TCP backend (qmail-smtpd left under its own tcpserver) with relay separation.

The backends are real `tcpserver`s running the capture backend (the bundled
sink, recording). Relay permission travels by the address tlsfront uses: a
second backend port whose tcprules grant RELAYCLIENT (`relay_backend_connect`),
or a second source address (`relay_source_address`). Also `tlsfront check`
on the classic mistake, a backend whose rules trust every local connection
(threat `env-spoofing`).
"""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from support.front import Front, toml_str
from support.ucspi import capture_argv, sessions, tcpserver

from tlsfront.config.files import load_config
from tlsfront.ops.check import Report, check_config, check_tcp_backend

MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n"


def profile_text(tmp_path: Path, backend: str, extra: str = "") -> str:
    tlsclients = tmp_path / "tlsclients"
    tlsclients.write_text("alice@example.net\n")
    return f"""
[profile.smtp]
listen = ["127.0.0.1:0"]
cert = {{cert}}
client_cert = "request"
client_ca = {{ca}}
relay_clients = {toml_str(tlsclients)}
backend_connect = "{backend}"
{extra}
"""


def client_context(ca: trustme.CA, certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if certificate:
        ca.issue_cert("alice@example.net").configure_cert(context)
    return context


def send(port: int, context: ssl.SSLContext | None, recipients: list[str]) -> dict[str, Any]:
    """One message, after STARTTLS when `context` is given; the refused recipients."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        if context is not None:
            smtp.starttls(context=context)
        try:
            return dict(smtp.sendmail("a@example.net", recipients, MESSAGE))
        except smtplib.SMTPRecipientsRefused as exc:
            return dict(exc.recipients)


async def in_thread(port: int, context: ssl.SSLContext | None, to: list[str]) -> dict[str, Any]:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(lambda: send(port, context, to))


@pytest.fixture
async def two_backends(tmp_path: Path) -> Any:
    """A plain backend and a relay backend (tcprules `:allow,RELAYCLIENT=""`)."""
    plain, relay = tmp_path / "plain", tmp_path / "relay"
    rules = tmp_path / "tcp.relay"
    rules.write_text(':allow,RELAYCLIENT=""\n')
    log = tmp_path / "tcpserver.log"
    async with (
        tcpserver(capture_argv(plain), log) as plain_port,
        tcpserver(capture_argv(relay), log, rules=rules) as relay_port,
    ):
        yield (plain, plain_port), (relay, relay_port)


async def test_unauthorized_session_reaches_the_plain_backend(
    start_front: Any, tmp_path: Path, ca: trustme.CA, two_backends: Any
) -> None:
    (plain, plain_port), (relay, relay_port) = two_backends
    front: Front = await start_front(
        profile_text(
            tmp_path,
            f"127.0.0.1:{plain_port}",
            f'relay_backend_connect = "127.0.0.1:{relay_port}"',
        )
    )
    refused = await in_thread(
        front.port("smtp"), client_context(ca, False), ["b@example.org", "c@example.com"]
    )
    assert list(refused) == ["c@example.com"]
    assert refused["c@example.com"][0] == 553
    (after_tls,) = sessions(plain)  # started at MAIL, inside TLS
    assert sessions(relay) == []
    assert "RELAYCLIENT" not in after_tls["env"]
    assert after_tls["env"]["TCPLOCALPORT"] == str(plain_port)
    assert after_tls["envelopes"][0]["to"] == ["b@example.org"]
    (body,) = after_tls["messages"]
    # tlsfront's own header names the real client and the TLS session
    assert body.startswith(b"Received: from ")
    assert b"with ESMTPS" in body.split(b"\r\n\r\n")[0]


async def test_certificate_session_reaches_the_relay_backend(
    start_front: Any, tmp_path: Path, ca: trustme.CA, two_backends: Any
) -> None:
    (plain, plain_port), (relay, relay_port) = two_backends
    front: Front = await start_front(
        profile_text(
            tmp_path,
            f"127.0.0.1:{plain_port}",
            f'relay_backend_connect = "127.0.0.1:{relay_port}"',
        )
    )
    refused = await in_thread(front.port("smtp"), client_context(ca, True), ["c@example.com"])
    assert refused == {}
    assert sessions(plain) == []  # before TLS nothing needed a backend
    (after_tls,) = sessions(relay)
    assert after_tls["env"]["RELAYCLIENT"] == ""
    assert after_tls["env"]["TCPLOCALPORT"] == str(relay_port)
    assert after_tls["envelopes"][0]["to"] == ["c@example.com"]


async def test_rules_relay_goes_to_the_relay_backend(
    start_front: Any, tmp_path: Path, two_backends: Any
) -> None:
    """A RELAYCLIENT line of tlsfront's own rules picks the relay address too."""
    (plain, plain_port), (relay, relay_port) = two_backends
    rules = tmp_path / "tcp.smtp"
    rules.write_text('127.0.0.1:allow,RELAYCLIENT=""\n')
    front: Front = await start_front(
        profile_text(
            tmp_path,
            f"127.0.0.1:{plain_port}",
            f'relay_backend_connect = "127.0.0.1:{relay_port}"\nrules = {toml_str(rules)}',
        )
    )
    assert await in_thread(front.port("smtp"), None, ["c@example.com"]) == {}
    assert sessions(plain) == []
    (session,) = sessions(relay)
    assert session["envelopes"][0]["to"] == ["c@example.com"]


async def test_relay_source_address(start_front: Any, tmp_path: Path, ca: trustme.CA) -> None:
    """One backend; its tcprules grant RELAYCLIENT to 127.0.0.2 only."""
    capture = tmp_path / "backend"
    rules = tmp_path / "tcp.backend"
    rules.write_text('127.0.0.2:allow,RELAYCLIENT=""\n:allow\n')
    async with tcpserver(capture_argv(capture), tmp_path / "log", rules=rules) as port:
        front: Front = await start_front(
            profile_text(
                tmp_path,
                f"127.0.0.1:{port}",
                'source_address = "127.0.0.3"\nrelay_source_address = "127.0.0.2"',
            )
        )
        stranger = await in_thread(front.port("smtp"), client_context(ca, False), ["c@ex.com"])
        alice = await in_thread(front.port("smtp"), client_context(ca, True), ["c@ex.com"])
    assert stranger["c@ex.com"][0] == 553
    assert alice == {}
    remote = [(s["env"]["TCPREMOTEIP"], "RELAYCLIENT" in s["env"]) for s in sessions(capture)]
    assert remote == [
        ("127.0.0.3", False),  # stranger, after TLS (none before: nothing needed one)
        ("127.0.0.2", True),  # alice, after TLS
    ]


async def test_backend_rules_trusting_loopback_make_an_open_relay(
    start_front: Any, tmp_path: Path
) -> None:
    """threat `env-spoofing`: what `tlsfront check` warns about, shown happening."""
    capture = tmp_path / "backend"
    rules = tmp_path / "tcp.smtp"
    rules.write_text('127.:allow,RELAYCLIENT=""\n:allow\n')
    async with tcpserver(capture_argv(capture), tmp_path / "log", rules=rules) as port:
        front: Front = await start_front(profile_text(tmp_path, f"127.0.0.1:{port}"))
        assert await in_thread(front.port("smtp"), None, ["c@example.com"]) == {}
    report = Report()
    check_tcp_backend(front.config.profiles["smtp"], report, None, rules)
    assert (
        f"profile smtp: the backend's rules line {rules}:1 grants RELAYCLIENT to 127.0.0.1,"
        f" the address tlsfront connects to the TCP backend 127.0.0.1:{port} from for"
        " sessions that may not relay: every client may relay through tlsfront: an open"
        " relay. Remove RELAYCLIENT for 127.0.0.1 at the backend and let authorized"
        " sessions use relay_backend_connect or relay_source_address"
    ) in report.warnings


# ------------------------------------------------------------ tlsfront check


def write(tmp_path: Path, profile: str, rules: str | None = None) -> Path:
    text = '[defaults]\nhostname = "front.example.org"\n[profile.smtp]\nlisten = ["127.0.0.1:0"]\n'
    text += 'tls = "none"\n' + profile
    if rules is not None:
        path = tmp_path / "tcp.smtp"
        path.write_text(rules)
        text += f"rules = {toml_str(path)}\n"
    config_path = tmp_path / "tlsfront.toml"
    config_path.write_text(text)
    return config_path


def check(tmp_path: Path, profile: str, rules: str | None = None) -> Report:
    return check_config(load_config(write(tmp_path, profile, rules)))


def test_check_warns_about_own_rules_trusting_the_source(tmp_path: Path) -> None:
    report = check(tmp_path, 'backend_connect = "127.0.0.1:2525"\n', '127.:allow,RELAYCLIENT=""\n')
    assert report.errors == []
    assert (
        f"profile smtp: rules line {tmp_path / 'tcp.smtp'}:1 grants RELAYCLIENT to 127.0.0.1,"
        " the address tlsfront connects to the TCP backend 127.0.0.1:2525 from for sessions"
        " that may not relay. These are tlsfront's own rules; if the backend's tcpserver"
        " reads them too (-x with the same file compiled), every client may relay through"
        " tlsfront: an open relay. Remove RELAYCLIENT for 127.0.0.1 at the backend and let"
        " authorized sessions use relay_backend_connect or relay_source_address"
    ) in report.warnings
    assert (
        "profile smtp: sessions allowed to relay reach the TCP backend 127.0.0.1:2525 as"
        " every other session does, so it cannot let them relay: set relay_backend_connect"
        " or relay_source_address"
    ) in report.warnings


def test_check_quiet_when_sources_are_separated(tmp_path: Path) -> None:
    report = check(
        tmp_path,
        'backend_connect = "127.0.0.1:2525"\nsource_address = "127.0.0.3"\n'
        'relay_source_address = "127.0.0.2"\n',
        '127.0.0.2:allow,RELAYCLIENT=""\n:allow\n',
    )
    assert (report.errors, report.warnings) == ([], [])


@pytest.mark.parametrize(
    ("backend", "rules", "sources"),
    [
        # its tcpserver may look host names up: 127.0.0.1 and ::1 are "localhost"
        ("localhost:2525", '=localhost:allow,RELAYCLIENT=""\n', ["127.0.0.1", "::1"]),
        ("[::1]:2525", '::1:allow,RELAYCLIENT=""\n', ["::1"]),
        # Linux connects to any 127.x from 127.0.0.1
        ("127.0.0.9:2525", '127.0.0.1:allow,RELAYCLIENT=""\n', ["127.0.0.1"]),
    ],
)
def test_check_finds_the_source_address(
    tmp_path: Path, backend: str, rules: str, sources: list[str]
) -> None:
    backend_rules = tmp_path / "tcp.backend"
    backend_rules.write_text(rules)
    profile = load_config(write(tmp_path, f'backend_connect = "{backend}"\n')).profiles["smtp"]
    report = Report()
    check_tcp_backend(profile, report, None, backend_rules)
    assert [w for w in report.warnings if "an open relay" in w] == [
        f"profile smtp: the backend's rules line {backend_rules}:1 grants RELAYCLIENT to"
        f" {source}, the address tlsfront connects to the TCP backend {backend} from for"
        " sessions that may not relay: every client may relay through tlsfront: an open"
        f" relay. Remove RELAYCLIENT for {source} at the backend and let authorized"
        " sessions use relay_backend_connect or relay_source_address"
        for source in sources
    ]


def test_check_cannot_tell_a_remote_source(tmp_path: Path) -> None:
    report = check(tmp_path, 'backend_connect = "192.0.2.25:25"\n')
    assert report.warnings == [
        "profile smtp: cannot tell which address tlsfront connects to 192.0.2.25:25 from:"
        " set source_address, and make sure the backend's tcprules do not grant"
        " RELAYCLIENT to it"
    ]


def test_check_variables_that_cannot_travel(tmp_path: Path) -> None:
    report = check(
        tmp_path,
        'backend_connect = "127.0.0.1:2525"\nsource_address = "127.0.0.3"\n'
        'env = { DATABYTES = "100" }\n',
        '127.0.0.1:allow,RBLSMTPD="",GREETDELAY="5"\n',
    )
    assert report.warnings == [
        "profile smtp: DATABYTES, GREETDELAY, RBLSMTPD never reach a TCP backend: over"
        " TCP only RELAYCLIENT travels (by the address used)"
    ]


def test_check_exec_backend_has_no_tcp_warnings(tmp_path: Path) -> None:
    report = check(
        tmp_path, 'backend = ["/bin/cat"]\nuser = "nobody"\n', '127.:allow,RELAYCLIENT=""\n'
    )
    assert (report.errors, report.warnings) == ([], [])


def test_check_command_exits_0_on_warnings(tmp_path: Path) -> None:
    config = write(tmp_path, 'backend_connect = "127.0.0.1:2525"\n', '127.:allow,RELAYCLIENT=""\n')
    result = subprocess.run(
        [sys.executable, "-m", "tlsfront", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: profile smtp: rules line " in result.stdout
    assert result.stdout.endswith("OK: 0 error(s), 2 warning(s)\n")
