"""qmail_control: what a qmail control directory gives each kind of profile."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.configs import assert_at, fails, load, make_control

from tlsfront.config.machine import default_hostname


@pytest.fixture
def control(tmp_path: Path) -> Path:
    """A qmail-tls style control directory (contents do not matter to config)."""
    return make_control(tmp_path)


# -- qmail control -------------------------------------------------------------------

QMAIL = """\
[defaults]
qmail_control = "control"

[profile.smtp]
listen = ["0.0.0.0:25"]
backend = ["/var/qmail/bin/qmail-smtpd"]
"""


def test_qmail_control_fills_what_the_patch_reads(tmp_path: Path, control: Path) -> None:
    cfg = load(tmp_path, QMAIL)
    p = cfg.profiles["smtp"]
    assert p.qmail_control == control
    assert p.cert == (control / "servercert.pem",)
    assert p.key == ()
    assert p.client_ca == control / "clientca.pem"
    assert p.client_crl == control / "clientcrl.pem"
    assert p.relay_clients == control / "tlsclients"
    assert p.client_cert == "request"  # clientca.pem + tlsclients: the patch asks
    assert p.ciphers == "HIGH:!aNULL"
    assert p.dhparams == control / "dh2048.pem"
    assert p.max_message_size == 20000000
    assert p.hostname == cfg.settings.hostname == "mx.example.net"
    assert p.tlshosts is None  # outbound only


def test_qmail_control_explicit_keys_win(tmp_path: Path, control: Path) -> None:
    text = (
        "[defaults]\nhostname = 'mail.example.com'\n"
        + QMAIL.removeprefix("[defaults]\n")
        + 'cert = "mine.pem"\nciphers = "HIGH"\nclient_cert = "require"\n'
        + "max_message_size = 5\n"
    )
    p = load(tmp_path, text, {"TLSCIPHERS": "MEDIUM"}).profiles["smtp"]
    assert p.cert == (tmp_path / "mine.pem",)
    assert p.ciphers == "HIGH"
    assert p.client_cert == "require"
    assert p.max_message_size == 5
    assert p.hostname == "mail.example.com"
    assert p.client_ca == control / "clientca.pem"


def test_tlsciphers_environment_wins_over_file(tmp_path: Path, control: Path) -> None:
    p = load(tmp_path, QMAIL, {"TLSCIPHERS": "MEDIUM:!RC4"}).profiles["smtp"]
    assert p.ciphers == "MEDIUM:!RC4"


def test_client_cert_needs_both_files(tmp_path: Path, control: Path) -> None:
    (control / "tlsclients").unlink()
    p = load(tmp_path, QMAIL).profiles["smtp"]
    assert (p.client_cert, p.relay_clients, p.client_ca) == (
        "none",
        None,
        control / "clientca.pem",
    )
    (control / "tlsclients").write_text("a@b\n")
    (control / "clientca.pem").unlink()
    p = load(tmp_path, QMAIL).profiles["smtp"]
    # without a CA the patch ignores tlsclients: so does tlsfront
    assert (p.client_cert, p.relay_clients, p.client_ca) == ("none", None, None)


def test_explicit_client_cert_none_turns_control_relaying_off(
    tmp_path: Path, control: Path
) -> None:
    p = load(tmp_path, QMAIL + 'client_cert = "none"\n').profiles["smtp"]
    assert (p.client_cert, p.relay_clients) == ("none", None)


def test_qmail_control_minimal_dir(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "servercert.pem").write_text("x")
    p = load(tmp_path, QMAIL).profiles["smtp"]
    assert p.cert == (tmp_path / "control" / "servercert.pem",)
    assert (p.client_ca, p.client_cert, p.ciphers, p.dhparams) == (None, "none", None, None)
    assert p.max_message_size == 0
    assert p.hostname == default_hostname()


def test_qmail_control_without_servercert(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    err = fails(tmp_path, QMAIL)
    assert_at(err, tmp_path / "tlsfront.toml", 4, "profile.smtp", "cert")
    assert "servercert.pem" in err.message


def test_profile_qmail_control_sits_above_defaults(tmp_path: Path, control: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "servercert.pem").write_text("x")
    (other / "me").write_text("other.example.net\n")
    (other / "tlsserverciphers").write_text("MEDIUM\n")
    (other / "dh1024.pem").write_text("x")
    text = QMAIL + '\n[profile.alt]\nlisten = ["0.0.0.0:26"]\nqmail_control = "other"\n'
    text += 'backend = ["/bin/cat"]\ndhparams = "mine.pem"\n'
    text = text.replace("[defaults]\n", '[defaults]\nciphers = "LOW"\n')
    cfg = load(tmp_path, text)
    smtp, alt = cfg.profiles["smtp"], cfg.profiles["alt"]
    assert smtp.ciphers == "LOW"  # [defaults] key over [defaults]' control dir
    assert alt.cert == (other / "servercert.pem",)
    assert alt.client_ca is None  # nothing from the other directory leaks in
    assert alt.ciphers == "MEDIUM"  # the profile's control dir over [defaults] keys
    assert alt.dhparams == tmp_path / "mine.pem"  # the profile's keys over its control dir
    assert alt.hostname == "other.example.net"
    assert cfg.settings.hostname == smtp.hostname == "mx.example.net"


def test_qmail_control_outbound(tmp_path: Path, control: Path) -> None:
    text = QMAIL + '\n[profile.out]\nmode = "outbound"\nlisten = ["127.0.0.1:10025"]\n'
    p = load(tmp_path, text).profiles["out"]
    assert p.tlshosts == control / "tlshosts"
    assert p.notlshosts == control / "notlshosts"
    assert p.client_cert_file == control / "clientcert.pem"
    assert (p.cert, p.client_ca, p.max_message_size) == ((), None, 0)


def test_qmail_control_errors(tmp_path: Path, control: Path) -> None:
    path = tmp_path / "tlsfront.toml"
    err = fails(tmp_path, QMAIL.replace('"control"', '"missing"'))
    assert_at(err, path, 2, "defaults", "qmail_control")
    assert str(tmp_path / "missing") in err.message

    (control / "databytes").write_text("lots\n")
    err = fails(tmp_path, QMAIL)
    assert_at(err, path, 2, "defaults", "qmail_control")
    assert "databytes" in err.message
    (control / "databytes").write_text("-1\n")
    assert "databytes" in str(fails(tmp_path, QMAIL))
    (control / "databytes").unlink()

    (control / "me").write_text("not a name\n")
    err = fails(tmp_path, QMAIL)
    assert err.path == control / "me"
