"""What `tlsfront check` says, and logs at run time, about files a qmail host brings:
a stale CRL, a certificate issued straight by a root, weak legacy ciphers,
host-name rules with the look-up off, CRLF line ends."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from support.front import toml_str
from support.hostile import Client, code, session_log
from support.tls_certs import DAY, NOW, crl_pem, make_crl

from tlsfront.config.files import load_config
from tlsfront.inbound.profileruntime import ProfileRuntime
from tlsfront.inbound.relaypolicy import RelayListError, read_relay_clients
from tlsfront.ops.check import Report, check_config
from tlsfront.qmail.control import CR_LINE_END


def config_with(tmp_path: Path, tls_dir: Path, extra: str) -> Path:
    path = tmp_path / "tlsfront.toml"
    path.write_text(
        '[profile.smtp]\nlisten = ["127.0.0.1:0"]\nbackend = ["/bin/cat"]\n'
        f"cert = {toml_str(tls_dir / 'servercert.pem')}\n" + extra
    )
    return path


def check(path: Path) -> Report:
    return check_config(load_config(path), NOW)


def crl_config(tmp_path: Path, tls_dir: Path, ca: trustme.CA, next_update: object) -> Path:
    crl = tmp_path / "clientcrl.pem"
    crl.write_bytes(crl_pem(make_crl(ca, next_update=next_update)))  # type: ignore[arg-type]
    extra = (
        f'client_cert = "request"\nclient_ca = {toml_str(tls_dir / "ca.pem")}\n'
        f"client_crl = {toml_str(crl)}\n"
    )
    return config_with(tmp_path, tls_dir, extra)


def test_a_crl_past_its_next_update_is_an_error(
    tmp_path: Path, tls_dir: Path, ca: trustme.CA
) -> None:
    report = check(crl_config(tmp_path, tls_dir, ca, NOW - DAY))
    (error,) = report.errors
    assert "clientcrl.pem: CRL 1" in error
    assert "past its nextUpdate" in error
    assert "refuses every client certificate" in error
    assert "FAILED" in report.render()


def test_a_fresh_crl_passes(tmp_path: Path, tls_dir: Path, ca: trustme.CA) -> None:
    assert check(crl_config(tmp_path, tls_dir, ca, NOW + DAY)).errors == []


def test_a_stale_crl_is_a_warning_when_loaded_at_run_time(
    tmp_path: Path, tls_dir: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    profile = load_config(crl_config(tmp_path, tls_dir, ca, NOW - DAY)).profiles["smtp"]
    with caplog.at_level(logging.INFO):
        ProfileRuntime.build(profile)  # start-up and reload build the same way
    (record,) = [r for r in caplog.records if "nextUpdate" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("profile smtp: ")


def test_no_intermediate_warning_for_a_leaf_of_a_trusted_root(
    tmp_path: Path, tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trustme issues the server certificate straight from its root: once that
    root is in the host's trust store there is nothing to complain about."""
    path = config_with(tmp_path, tls_dir, "")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "empty.pem"))
    (tmp_path / "empty.pem").write_text("")
    assert any("no intermediate certificates" in w for w in check(path).warnings)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_dir / "ca.pem"))
    assert not any("no intermediate certificates" in w for w in check(path).warnings)


def test_missing_intermediate_still_warned(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leaf of an intermediate, alone in its file: the root is trusted, the
    intermediate is missing."""
    leaf = ca.create_child_ca().issue_cert("mx.example.org")
    lone = tmp_path / "tls"
    lone.mkdir()
    leaf.private_key_pem.write_to_path(str(lone / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(lone / "servercert.pem"))
    path = config_with(tmp_path, lone, f"key = {toml_str(lone / 'key.pem')}\n")
    ca.cert_pem.write_to_path(str(tmp_path / "roots.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "roots.pem"))
    (warning,) = [w for w in check(path).warnings if "no intermediate" in w]
    assert "is not a root this host trusts" in warning


@pytest.mark.parametrize(
    ("ciphers", "weak"),
    [
        ("ECDHE+AESGCM:ECDHE+CHACHA20", None),
        ("HIGH:!aNULL", "AES256-GCM-SHA384"),  # a classic tlsserverciphers
        ("ECDHE+AESGCM:AES128-SHA", "AES128-SHA"),
    ],
)
def test_ciphers_without_forward_secrecy_are_warned(
    tmp_path: Path, tls_dir: Path, ciphers: str, weak: str | None
) -> None:
    report = check(config_with(tmp_path, tls_dir, f"ciphers = {toml_str(ciphers)}\n"))
    found = [w for w in report.warnings if "without forward secrecy" in w]
    if weak is None:
        assert found == []
    else:
        (warning,) = found
        assert weak in warning
        assert "PSK" not in warning  # never chosen without PSK callbacks
    assert report.errors == []


def test_host_rules_with_the_look_up_off_are_warned(tmp_path: Path, tls_dir: Path) -> None:
    rules = tmp_path / "tcp.smtp"
    rules.write_text('=mail.example.net:allow,RELAYCLIENT=""\n:allow\n')
    extra = f"rules = {toml_str(rules)}\n"
    assert not any(
        "never match" in w for w in check(config_with(tmp_path, tls_dir, extra)).warnings
    )
    off = check(config_with(tmp_path, tls_dir, extra + "remote_host_lookup = false\n"))
    assert any("remote_host_lookup = false: they never match" in w for w in off.warnings)


# -- CRLF line ends: tlsclients and tcp.smtp alike ----------------------------------


def test_crlf_is_refused_alike_in_tlsclients_and_tcp_smtp(tmp_path: Path, tls_dir: Path) -> None:
    """tcprules refuses a CRLF line; qmail would keep the CR in a tlsclients
    address, which then never matches. Both are an error, with the same words."""
    clients = tmp_path / "tlsclients"
    clients.write_bytes(b"# made on Windows\r\nalice@example.net\r\n")
    rules = tmp_path / "tcp.smtp"
    rules.write_bytes(b'127.:allow,RELAYCLIENT=""\r\n:allow\r\n')
    extra = (
        f'client_cert = "request"\nclient_ca = {toml_str(tls_dir / "ca.pem")}\n'
        f"relay_clients = {toml_str(clients)}\nrules = {toml_str(rules)}\n"
    )
    errors = check(config_with(tmp_path, tls_dir, extra)).errors
    assert sorted(errors) == sorted(
        f"profile smtp: {path}:{line}: {CR_LINE_END}" for path, line in ((clients, 2), (rules, 1))
    )


def test_a_crlf_line_in_tlsclients_changed_while_running_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clients = tmp_path / "tlsclients"
    clients.write_bytes(b"alice@example.net\nbob@example.net\r\n")
    with pytest.raises(RelayListError, match="ends in CR"):
        read_relay_clients(clients)
    assert read_relay_clients(clients, strict=False) == {"alice@example.net"}
    assert any("ends in CR" in r.getMessage() for r in caplog.records)


async def test_a_certificate_refused_for_a_stale_crl_is_a_warning(
    start_front: Any, tmp_path: Path, ca: trustme.CA
) -> None:
    """At run time the CRL goes stale unnoticed; each refused certificate then says
    so at WARNING (the server's fault), even with log_level = warning."""
    crl = tmp_path / "clientcrl.pem"
    crl.write_bytes(crl_pem(make_crl(ca, next_update=NOW - DAY)))
    front = await start_front(
        '[profile.smtp]\nlisten = ["127.0.0.1:0"]\ncert = {cert}\nbackend = {backend}\n'
        f'client_cert = "request"\nclient_ca = {{ca}}\nclient_crl = {toml_str(crl)}\n'
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    ca.issue_cert("alice@example.net").configure_cert(context)
    with session_log() as log, trio.fail_after(30):
        logging.getLogger("tlsfront.inbound.session").setLevel(logging.WARNING)
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        assert code(await client.command(b"STARTTLS")) == 220
        await client.starttls(context)
        assert code(await client.command(b"EHLO c")) == 250
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
    (line,) = [x for x in log.lines if "no valid cert" in x]
    assert line.endswith("no valid cert for gatewaying: CRL has expired")
