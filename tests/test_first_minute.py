"""The README's first minute: the embedded default delivers over STARTTLS and implicit TLS."""

from __future__ import annotations

import dataclasses
import smtplib
import ssl
from pathlib import Path

import pytest
import trio

from tlsfront.cli import main
from tlsfront.config.certtable import entries
from tlsfront.config.embedded import embedded_config, ensure_default_files
from tlsfront.config.schema import Config
from tlsfront.inbound.server import Server
from tlsfront.ops.check import check_config
from tlsfront.sink import read_maildir


def on_port_zero(config: Config) -> Config:
    """The embedded default, listening on ephemeral ports instead of 2525/4650."""
    profiles = {
        name: dataclasses.replace(p, listen=("127.0.0.1:0",)) for name, p in config.profiles.items()
    }
    return dataclasses.replace(config, profiles=profiles)


def deliver(port: int, implicit: bool, cafile: Path) -> None:
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False  # the self-signed certificate names this host
    message = b"Subject: first minute\r\n\r\nhello\r\n"
    if implicit:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=20) as smtp:
            smtp.sendmail("me@example.net", ["root@localhost"], message)
    else:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
            smtp.starttls(context=context)
            smtp.sendmail("me@example.net", ["root@localhost"], message)


async def test_embedded_default_delivers_both_ways(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tlsfront.config.machine.QMAIL_SMTPD", tmp_path / "no-qmail-here")
    config = embedded_config(state_dir=tmp_path / "state")
    assert config.profiles["smtp"].listen == ("127.0.0.1:2525",)
    assert config.profiles["smtps"].listen == ("127.0.0.1:4650",)
    ensure_default_files(config)
    assert not check_config(config).errors
    server: Server = await nursery.start(Server(on_port_zero(config)).run)
    cert = entries(config.profiles["smtp"].cert, config.profiles["smtp"].key)["default"][0][0]
    for profile, implicit in (("smtp", False), ("smtps", True)):
        port = server.addresses[profile][0].port
        with trio.fail_after(30):
            await trio.to_thread.run_sync(deliver, port, implicit, cert)
    messages = read_maildir(tmp_path / "state" / "Maildir")
    assert len(messages) == 2
    for message in messages:
        assert b"(tlsfront) with ESMTPS" in message
        assert b"Subject: first minute" in message


def test_cert_command_makes_a_ca_a_server_and_a_client(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    assert main(["cert", "ca", "--dir", str(directory)]) == 0
    assert main(["cert", "server", "--dir", str(directory), "--name", "mx.example.org"]) == 0
    assert main(["cert", "client", "--dir", str(directory), "--email", "u@example.org"]) == 0
    assert (directory / "server.pem").exists()
    assert (directory / "client-u@example.org.pem").stat().st_mode & 0o077 == 0
    assert main(["cert", "client", "--dir", str(directory)]) == 1


def test_check_reports_errors_with_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tlsfront.toml"
    config.write_text(
        '[profile.smtp]\nlisten = ["127.0.0.1:2525"]\ncert = "missing.pem"\n'
        'backend = ["/nonexistent/qmail-smtpd"]\n'
    )
    assert main(["check", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert "missing.pem" in out
    assert "backend program /nonexistent/qmail-smtpd not found" in out
    config.write_text('[profile.smtp]\nlisten = ["127.0.0.1:2525"]\ntls = "startls"\n')
    assert main(["check", "-c", str(config)]) == 1
    assert "tlsfront.toml:3: [profile.smtp] key 'tls'" in capsys.readouterr().out
