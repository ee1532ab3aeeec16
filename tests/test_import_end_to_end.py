"""`tlsfront import-qmail` on a qmail-tls host, then `tlsfront check`, then serving it.

The host: a control directory as the qmail-tls patch wants it (servercert.pem
with key and chain in one file, clientca.pem, tlsclients, me) and the tcprules
source its tcpserver compiled. The printed configuration is checked as is,
then served with two changes only (listen on a free loopback port, the
capture backend in place of /var/qmail/bin/qmail-smtpd), and must behave as
the patched qmail did: STARTTLS offered, relay by certificate, relay by IP
from tcprules, deny.
"""

from __future__ import annotations

import re
import smtplib
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from support.front import Front, capture_backend

from tlsfront.config.files import load_config
from tlsfront.inbound.server import Server

TCP_SMTP = """\
# /etc/tcp.smtp
127.0.0.1:allow
127.0.0.5-9:deny
127.:allow,RELAYCLIENT=""
:allow
"""
LISTED = "alice@example.net"
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n"


def tlsfront(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tlsfront", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def qmail_host(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> tuple[Path, Path]:
    """(control directory, tcprules source) of a qmail-tls host."""
    root = tmp_path_factory.mktemp("qmail")
    control = root / "control"
    control.mkdir()
    # issued by an intermediate, as a real CA does: the chain is complete
    server = ca.create_child_ca().issue_cert("mx.example.org", "127.0.0.1")
    server.private_key_and_cert_chain_pem.write_to_path(str(control / "servercert.pem"))
    ca.cert_pem.write_to_path(str(control / "clientca.pem"))
    (control / "tlsclients").write_text(f"{LISTED}\n")
    (control / "me").write_text("mx.example.org\n")
    rules = root / "tcp.smtp"
    rules.write_text(TCP_SMTP)
    return control, rules


@pytest.fixture(scope="module")
def imported(qmail_host: tuple[Path, Path]) -> str:
    control, rules = qmail_host
    result = tlsfront("import-qmail", "--control", str(control), "--rules", str(rules))
    assert result.returncode == 0, result.stderr
    return result.stdout


def for_the_test(text: str, capture: Path) -> str:
    """The two changes: a free loopback port, the capture backend."""
    text, listens = re.subn(r'(?m)^listen = \["0\.0\.0\.0:25"\]$', 'listen = ["127.0.0.1:0"]', text)
    text, backends = re.subn(
        r'(?m)^backend = \["[^"]*/bin/qmail-smtpd"\]$',
        lambda _: "backend = " + capture_backend(capture),
        text,
    )
    assert (listens, backends) == (1, 1)
    return text


def test_check_accepts_the_output(tmp_path: Path, imported: str) -> None:
    capture = tmp_path / "capture"
    config = tmp_path / "tlsfront.toml"
    # the account qmail-smtpd runs as: qmaild where qmail is installed
    text = for_the_test(imported, capture).replace("[defaults]\n", '[defaults]\nuser = "nobody"\n')
    config.write_text(text)
    result = tlsfront("check", "-c", str(config))
    assert result.returncode == 0, result.stdout
    assert result.stdout.endswith("OK: 0 error(s), 0 warning(s)\n")
    assert "profile smtp: rules " in result.stdout
    assert "profile smtp: relay_clients lists 1 address(es)" in result.stdout


def test_check_of_the_output_as_printed(
    tmp_path: Path, imported: str, qmail_host: tuple[Path, Path]
) -> None:
    """Unchanged, the only thing `check` can fault here is a host without qmail:
    the backend is qmail-smtpd in the qmail home, the control directory's parent."""
    config = tmp_path / "tlsfront.toml"
    config.write_text(imported)
    result = tlsfront("check", "-c", str(config))
    qmail_smtpd = qmail_host[0].parent / "bin" / "qmail-smtpd"
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert errors == [f"error: profile smtp: backend program {qmail_smtpd} not found"]


def test_the_output_says_what_it_found(imported: str, qmail_host: tuple[Path, Path]) -> None:
    control, rules = qmail_host
    data = tomllib.loads(imported)
    assert data["defaults"]["qmail_control"] == str(control)
    smtp = data["profile"]["smtp"]
    assert (smtp["tls"], smtp["client_cert"], smtp["rules"]) == ("starttls", "request", str(rules))
    assert '# RELAYCLIENT (relay by IP) for "127."' in imported
    assert '# deny for "127.0.0.5".."127.0.0.9"' in imported


@pytest.fixture
async def front(nursery: trio.Nursery, tmp_path: Path, imported: str) -> Front:
    capture = tmp_path / "capture"
    capture.mkdir()
    path = tmp_path / "tlsfront.toml"
    path.write_text(for_the_test(imported, capture))
    config = load_config(path)
    server = await nursery.start(Server(config).run)
    return Front(server, config, capture)


def session(
    port: int, source: str, context: ssl.SSLContext, recipients: list[str]
) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.example.net")
        seen["greeting"] = smtp.ehlo_resp
        seen["starttls"] = smtp.has_extn("starttls")
        smtp.starttls(context=context)
        try:
            seen["refused"] = smtp.sendmail("a@example.net", recipients, MESSAGE)
        except smtplib.SMTPRecipientsRefused as exc:
            seen["refused"] = exc.recipients
    return seen


def context(ca: trustme.CA, certificate: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if certificate is not None:
        ca.issue_cert(certificate).configure_cert(ctx)
    return ctx


async def run(
    front: Front, source: str, ctx: ssl.SSLContext, recipients: list[str]
) -> dict[str, Any]:
    port = front.port("smtp")
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(lambda: session(port, source, ctx, recipients))


@pytest.mark.parametrize(
    ("source", "certificate", "relays", "by"),
    [
        ("127.0.0.1", LISTED, True, "certificate"),
        ("127.0.0.1", "bob@example.net", False, None),  # a good certificate, not listed
        ("127.0.0.1", None, False, None),
        ("127.0.0.2", None, True, "rules"),  # 127.:allow,RELAYCLIENT=""
        ("127.0.0.10", None, True, "rules"),
    ],
)
async def test_serves_the_same_behaviour(
    front: Front, ca: trustme.CA, source: str, certificate: str | None, relays: bool, by: str | None
) -> None:
    seen = await run(front, source, context(ca, certificate), ["b@example.org", "c@example.com"])
    assert seen["starttls"]
    assert seen["greeting"].startswith(b"mx.example.org")  # control/me
    if relays:
        assert seen["refused"] == {}
    else:
        assert list(seen["refused"]) == ["c@example.com"]
        assert seen["refused"]["c@example.com"][0] == 553
    # one backend, started at MAIL inside TLS (that relay by IP holds before
    # TLS too: test_rules_integration.py)
    (after_tls,) = front.sessions()
    env = after_tls["env"]
    assert env["TCPREMOTEIP"] == source
    assert ("RELAYCLIENT" in env) == relays
    if certificate is not None:
        assert env["SSL_CLIENT_SAN_Email_0"] == certificate
    (body,) = after_tls["messages"]
    header = body.split(b"\r\n\r\n")[0]
    assert f"[{source}]".encode() in header.split(b"\r\n")[0]
    assert b"with ESMTPS" in header


@pytest.mark.parametrize("source", ["127.0.0.5", "127.0.0.9"])
async def test_denied_range(front: Front, source: str) -> None:
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", front.port("smtp"), local_address=source)
        assert await stream.receive_some() == b""
        await stream.aclose()
    assert front.sessions() == []
