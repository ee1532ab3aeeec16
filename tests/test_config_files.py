"""The embedded default, finding the configuration file, and the example in conf/."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from support.configs import ENV, MINIMAL, ROOT, make_control

from tlsfront.config import files as config_module
from tlsfront.config import machine as defaults_module
from tlsfront.config.certtable import entries
from tlsfront.config.embedded import embedded_config, ensure_default_files
from tlsfront.config.errors import ConfigError
from tlsfront.config.files import config_from_dict, find_config, load_config, parse_config
from tlsfront.config.machine import default_hostname, default_state_dir


@pytest.fixture
def control(tmp_path: Path) -> Path:
    """A qmail-tls style control directory (contents do not matter to config)."""
    return make_control(tmp_path)


# -- the embedded default -----------------------------------------------------------


@pytest.fixture
def no_qmail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults_module, "QMAIL_SMTPD", tmp_path / "no-qmail-smtpd")


def test_embedded_default_shape(tmp_path: Path, no_qmail: None) -> None:
    state = tmp_path / "state"
    cfg = embedded_config(state, ENV)
    assert cfg.path is None
    assert cfg.settings.state_dir == state
    host = default_hostname()
    assert cfg.settings.hostname == host
    assert list(cfg.profiles) == ["smtp", "smtps"]
    smtp, smtps = cfg.profiles["smtp"], cfg.profiles["smtps"]
    assert (smtp.listen, smtp.tls) == (("127.0.0.1:2525",), "starttls")
    assert (smtps.listen, smtps.tls) == (("127.0.0.1:4650",), "implicit")
    sink = (
        sys.executable,
        "-m",
        "tlsfront.sink",
        "--maildir",
        str(state / "Maildir"),
        "--rcpthost",
        "localhost",
        "--rcpthost",
        host,
    )
    for p in (smtp, smtps):
        assert p.cert == (state / "tls" / "cert.pem",)
        assert p.key == (state / "tls" / "key.pem",)
        assert p.hostname == host
        assert p.backend == sink
        assert (p.require_tls, p.client_cert, p.mode) == (False, "none", "inbound")


def test_embedded_default_uses_qmail_when_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "qmail-smtpd"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setattr(defaults_module, "QMAIL_SMTPD", fake)
    fake.chmod(0o644)
    assert not os.access(fake, os.X_OK)  # even for root: no x bit, not executable
    assert embedded_config(tmp_path, ENV).profiles["smtp"].backend[0] == sys.executable
    fake.chmod(0o755)
    assert embedded_config(tmp_path, ENV).profiles["smtp"].backend == (str(fake),)


def test_embedded_default_state_dir_from_environment(no_qmail: None) -> None:
    cfg = embedded_config(None, ENV)
    assert cfg.settings.state_dir == default_state_dir(ENV)
    assert cfg.profiles["smtp"].cert == (default_state_dir(ENV) / "tls" / "cert.pem",)


def test_default_state_dir() -> None:
    assert default_state_dir({"HOME": "/h"}, euid=0) == Path("/var/lib/tlsfront")
    assert default_state_dir({"HOME": "/h"}, euid=1000) == Path("/h/.local/state/tlsfront")
    xdg = {"HOME": "/h", "XDG_STATE_HOME": "/x"}
    assert default_state_dir(xdg, euid=1000) == Path("/x/tlsfront")
    relative = {"HOME": "/h", "XDG_STATE_HOME": "x"}
    assert default_state_dir(relative, euid=1000) == Path("/h/.local/state/tlsfront")


def test_default_hostname() -> None:
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", default_hostname())


def test_config_from_dict_checks_too() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"profile": {"smtp": {"listen": "127.0.0.1:25", "tls": "x"}}})
    assert (info.value.path, info.value.line, info.value.key) == (None, None, "tls")
    assert str(info.value).startswith("<config>: [profile.smtp] key 'tls': ")


# -- finding the file ---------------------------------------------------------------


def test_find_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "etc" / "tlsfront.toml"
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", system)
    explicit = tmp_path / "mine.toml"
    assert find_config(explicit) == explicit  # even before it exists: load reports it
    assert find_config(None) is None
    system.parent.mkdir()
    system.write_text(MINIMAL)
    assert find_config(None) == system
    assert find_config(explicit) == explicit


# -- the example in conf/ -----------------------------------------------------------

EXAMPLE = ROOT / "conf" / "tlsfront.toml"


def example_text(control: Path) -> str:
    text = EXAMPLE.read_text()
    assert text.count('"/var/qmail/control"') == 1
    return text.replace('"/var/qmail/control"', f'"{control}"')


def test_example_config_loads(tmp_path: Path, control: Path) -> None:
    cfg = parse_config(example_text(control), tmp_path / "tlsfront.toml", ENV)
    assert list(cfg.profiles) == ["smtp", "submission", "smtps"]
    smtp, sub, smtps = cfg.profiles.values()
    assert cfg.settings.hostname == "mail.example.com"
    for p in cfg.profiles.values():
        assert p.backend == ("/var/qmail/bin/qmail-smtpd",)
        assert p.cert == (control / "servercert.pem",)
        assert p.hostname == "mail.example.com"
        assert p.client_ca == control / "clientca.pem"
    assert smtp.listen == ("0.0.0.0:25", "[::]:25")
    assert (smtp.tls, smtp.client_cert, smtp.relay_clients) == (
        "starttls",
        "request",
        control / "tlsclients",
    )
    assert smtp.rules == Path("/etc/tcp.smtp")
    assert (sub.tls, sub.require_tls) == ("starttls", True)
    assert sub.listen[0] == "0.0.0.0:587"
    assert (smtps.tls, smtps.listen[0]) == ("implicit", "0.0.0.0:465")


def test_example_config_outbound_block_loads(tmp_path: Path, control: Path) -> None:
    text = example_text(control)
    head, marker, tail = text.partition("# [profile.outbound]")
    assert marker
    block = "\n".join(line.removeprefix("# ") for line in (marker + tail).splitlines())
    cfg = parse_config(head + block, tmp_path / "tlsfront.toml", ENV)
    out = cfg.profiles["outbound"]
    assert (out.mode, out.listen) == ("outbound", ("127.0.0.1:10025",))
    assert out.tls_policy == {"": "may", "example.org": "verify"}
    assert out.tlshosts == control / "tlshosts"


def test_example_config_without_qmail_names_control_dir() -> None:
    if Path("/var/qmail/control").is_dir():
        pytest.skip("this host has qmail")
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, ENV)
    assert info.value.key == "qmail_control"
    assert "/var/qmail/control" in info.value.message


def test_ensure_default_files(tmp_path: Path, no_qmail: None) -> None:
    from cryptography import x509

    cfg = embedded_config(tmp_path / "state", ENV)
    ensure_default_files(cfg)
    (cert,), (key,) = entries(cfg.profiles["smtp"].cert, cfg.profiles["smtp"].key)["default"]
    assert key is not None
    assert key.stat().st_mode & 0o077 == 0
    first = x509.load_pem_x509_certificate(cert.read_bytes())
    ensure_default_files(cfg)  # there already: kept
    assert x509.load_pem_x509_certificate(cert.read_bytes()) == first
