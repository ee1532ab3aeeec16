"""`tlsfront import-qmail`: the TOML it prints for qmail-tls style control directories."""

from __future__ import annotations

import dataclasses
import os
import pwd
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme

from tlsfront.config.files import load_config
from tlsfront.config.schema import Profile, Settings
from tlsfront.ops.check import check_config
from tlsfront.qmail.control import QmailControlError, read_control
from tlsfront.qmail.importqmail import SYSTEMD_SOCKETS, render_config, toml_string
from tlsfront.qmail.tcprules import RulesError

ALL_FILES = ("servercert.pem", "clientca.pem", "tlsclients", "tlsserverciphers", "me")
PROFILE_KEYS = {f.name for f in dataclasses.fields(Profile)} - {"name"}
DEFAULTS_KEYS = PROFILE_KEYS | {f.name for f in dataclasses.fields(Settings)}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def make_control(directory: Path, ca: trustme.CA, files: tuple[str, ...] = ALL_FILES) -> Path:
    """A qmail control directory holding `files`, the patch's way."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = {
        "tlsclients": "alice@example.org\n",
        "tlsserverciphers": "ECDHE+AESGCM:!aNULL\n",
        "me": "mx.example.org\n",
        "databytes": "20000000\n",
    }
    for name in files:
        path = directory / name
        if name == "servercert.pem":  # key and chain in one file, as qmail-tls wants it
            server = ca.issue_cert("mx.example.org")
            server.private_key_and_cert_chain_pem.write_to_path(str(path))
        elif name == "clientca.pem":
            ca.cert_pem.write_to_path(str(path))
        else:
            path.write_text(texts[name])
    return directory


def render(control: Path, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    kwargs.setdefault("environ", {})
    text = render_config(control, **kwargs)
    return text, tomllib.loads(text)


def assert_schema_keys(data: dict[str, Any]) -> None:
    assert set(data) <= {"defaults", "profile"}
    assert set(data["defaults"]) <= DEFAULTS_KEYS
    for table in data["profile"].values():
        assert set(table) <= PROFILE_KEYS


def test_full_qmail_tls_host(tmp_path: Path, ca: trustme.CA) -> None:
    control = make_control(tmp_path / "control", ca, (*ALL_FILES, "databytes"))
    rules = tmp_path / "tcp.smtp"
    rules.write_text('127.:allow,RELAYCLIENT=""\n192.168.1.1-99:allow,RELAYCLIENT=""\n:allow\n')
    text, data = render(control, rules=rules, smtps=True)
    assert_schema_keys(data)
    assert data["defaults"] == {
        "qmail_control": str(control),
        "hostname": "mx.example.org",
        "backend": [str(tmp_path / "bin" / "qmail-smtpd")],  # the qmail home's, not /var/qmail's
    }
    smtp = {
        "listen": ["0.0.0.0:25"],
        "tls": "starttls",
        "client_cert": "request",
        "rules": str(rules),
    }
    assert data["profile"] == {
        "smtp": smtp,
        "smtps": {**smtp, "listen": ["0.0.0.0:465"], "tls": "implicit"},
    }
    assert 'RELAYCLIENT (relay by IP) for "127.", "192.168.1.1".."192.168.1.99"' in text
    assert "# [profile.submission]" in text


def test_output_is_a_config_tlsfront_loads(tmp_path: Path, ca: trustme.CA) -> None:
    control = make_control(tmp_path / "control", ca, (*ALL_FILES, "databytes"))
    rules = tmp_path / "tcp.smtp"
    rules.write_text('127.:allow,RELAYCLIENT=""\n')
    text = render_config(control, rules, smtps=True, backend=["/bin/cat", "-u"], environ={})
    path = tmp_path / "etc" / "tlsfront.toml"
    path.parent.mkdir()
    path.write_text(text)
    config = load_config(path, environ={})
    assert config.settings.hostname == "mx.example.org"
    assert list(config.profiles) == ["smtp", "smtps"]
    smtp = config.profiles["smtp"]
    assert smtp.cert == (control / "servercert.pem",)
    assert (smtp.client_ca, smtp.relay_clients) == (
        control / "clientca.pem",
        control / "tlsclients",
    )
    assert smtp.client_cert == "request"
    assert smtp.ciphers == "ECDHE+AESGCM:!aNULL"
    assert smtp.max_message_size == 20000000
    assert smtp.backend == ("/bin/cat", "-u")
    assert smtp.rules == rules
    assert config.profiles["smtps"].tls == "implicit"
    report = check_config(config)
    assert report.errors == []
    assert f"profile smtp: rules {rules} read" in report.notes


def test_without_servercert_starttls_stays_off(tmp_path: Path, ca: trustme.CA) -> None:
    control = make_control(tmp_path / "control", ca, ("me",))
    text, data = render(control, smtps=True, backend=["/bin/cat"])
    assert_schema_keys(data)
    assert data["profile"] == {"smtp": {"listen": ["0.0.0.0:25"], "tls": "none"}}
    assert "control/servercert.pem was not found, so the patch offered no STARTTLS" in text
    assert "# [profile.smtps]" in text
    path = tmp_path / "tlsfront.toml"
    path.write_text(text)
    assert load_config(path, environ={}).profiles["smtp"].tls == "none"


def test_no_smtps_unless_asked(tmp_path: Path, ca: trustme.CA) -> None:
    text, data = render(make_control(tmp_path / "control", ca))
    assert list(data["profile"]) == ["smtp"]
    assert "--smtps adds it" in text


@pytest.mark.parametrize(
    "files", [("servercert.pem", "clientca.pem"), ("servercert.pem", "tlsclients")]
)
def test_client_certificates_need_both_files(
    tmp_path: Path, ca: trustme.CA, files: tuple[str, ...]
) -> None:
    text, data = render(make_control(tmp_path / "control", ca, files))
    assert "client_cert" not in data["profile"]["smtp"]
    assert "the patch never asked for a client certificate" in text


def test_tlsciphers_from_the_environment(tmp_path: Path, ca: trustme.CA) -> None:
    control = make_control(tmp_path / "control", ca)
    ciphers = 'HIGH:!aNULL:"odd"\\value'
    text, data = render(control, environ={"TLSCIPHERS": ciphers})
    assert data["defaults"]["ciphers"] == ciphers
    assert "TLSCIPHERS is set where this was made" in text


def test_tlsserverciphers_read_as_the_patch_does(tmp_path: Path, ca: trustme.CA) -> None:
    control = make_control(tmp_path / "control", ca, ("servercert.pem",))
    (control / "tlsserverciphers").write_text("# strong only\nECDHE+AESGCM\n\nDHE+AESGCM  \n")
    _, data = render(control)
    assert "ciphers" not in data["defaults"]  # left to qmail_control, which reads it right
    assert read_control(control, {}).ciphers == "ECDHE+AESGCM:DHE+AESGCM"


def test_single_line_tlsserverciphers_is_left_to_the_control_file(
    tmp_path: Path, ca: trustme.CA
) -> None:
    _, data = render(make_control(tmp_path / "control", ca))
    assert "ciphers" not in data["defaults"]


def test_odd_paths_are_escaped(tmp_path: Path, ca: trustme.CA) -> None:
    odd = tmp_path / 'qmail "control" \\ é\ttab\nline'
    control = make_control(odd, ca)
    rules = odd / 'tcp "smtp"'
    rules.write_text(":allow\n")
    _, data = render(control, rules=rules, backend=["/opt/bin/qmail smtpd", 'say "hi"'])
    assert data["defaults"]["qmail_control"] == str(odd)
    assert data["defaults"]["backend"] == ["/opt/bin/qmail smtpd", 'say "hi"']
    assert data["profile"]["smtp"]["rules"] == str(rules)


def test_relative_paths_become_absolute(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_control(tmp_path / "control", ca)
    (tmp_path / "tcp.smtp").write_text(":allow\n")
    monkeypatch.chdir(tmp_path)
    _, data = render(Path("control"), rules=Path("tcp.smtp"))
    assert data["defaults"]["qmail_control"] == str(tmp_path / "control")
    assert data["profile"]["smtp"]["rules"] == str(tmp_path / "tcp.smtp")


def test_rules_notes_stay_comments(tmp_path: Path, ca: trustme.CA) -> None:
    control = make_control(tmp_path / "control", ca)
    rules = tmp_path / "tcp.smtp"
    # keys with a control character and a byte that is not UTF-8, a dead line,
    # variables that matter behind tlsfront
    rules.write_bytes(
        b'1.2.3.\x7f:allow,RELAYCLIENT=""\n=h\xff.example:deny\nno colon\n'
        b':allow,SMTPS="1",TLSCIPHERS="ALL"\n'
    )
    text, data = render(control, rules=rules)
    assert data["profile"]["smtp"]["rules"] == str(rules)
    assert 'RELAYCLIENT (relay by IP) for "1.2.3.\\x7f"' in text
    assert "SMTPS is set by" in text
    assert "TLSCIPHERS is set by" in text
    assert f"# note: {rules}:3: no ':' in this line; tcprules ignores it" in text


def test_compiled_rules_are_swapped_for_their_source(tmp_path: Path, ca: trustme.CA) -> None:
    control = make_control(tmp_path / "control", ca)
    (tmp_path / "tcp.smtp").write_text(":allow\n")
    (tmp_path / "tcp.smtp.cdb").write_bytes(b"\0" * 2048)
    text, data = render(control, rules=tmp_path / "tcp.smtp.cdb")
    assert data["profile"]["smtp"]["rules"] == str(tmp_path / "tcp.smtp")
    assert "is compiled; its source" in text
    (tmp_path / "tcp.smtp").unlink()
    with pytest.raises(RulesError, match="is the compiled form"):
        render(control, rules=tmp_path / "tcp.smtp.cdb")


def test_broken_rules_are_refused(tmp_path: Path, ca: trustme.CA) -> None:
    rules = tmp_path / "tcp.smtp"
    rules.write_text("127.:allow\n10.:allow,RELAYCLIENT=yes\n")
    with pytest.raises(RulesError, match=rf"^{rules}:2: "):
        render(make_control(tmp_path / "control", ca), rules=rules)


def test_missing_control_directory(tmp_path: Path) -> None:
    with pytest.raises(QmailControlError, match="is not a directory"):
        render(tmp_path / "nowhere")


def test_control_path_that_is_not_utf8(tmp_path: Path, ca: trustme.CA) -> None:
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/ctl\xff"))
    make_control(odd, ca)
    with pytest.raises(QmailControlError, match="not UTF-8"):
        render(odd)


@pytest.mark.parametrize(
    "value",
    ["", "plain", 'q"uote', "back\\slash", "tab\tnew\nline\r", "\x00\x1f\x7f", "é ü 漢字 🙂"],
)
def test_toml_string_round_trips(value: str) -> None:
    assert tomllib.loads(f"v = {toml_string(value)}")["v"] == value


def test_toml_string_refuses_lone_surrogates() -> None:
    with pytest.raises(ValueError, match="not valid UTF-8"):
        toml_string("a\udcff")


def test_systemd_names_are_the_shipped_units(tmp_path: Path, ca: trustme.CA) -> None:
    """Each profile's systemd name is the FileDescriptorName of the socket unit
    shipped for it, written as the key with --systemd, else as an alternative."""
    units = Path(__file__).parent.parent / "systemd"
    for profile, unit in SYSTEMD_SOCKETS.items():
        assert f"\nFileDescriptorName={profile}\n" in (units / unit).read_text()
    control = make_control(tmp_path / "control", ca)
    text, data = render(control, smtps=True, systemd=True)
    assert_schema_keys(data)
    assert data["profile"]["smtp"]["systemd"] == "smtp"
    assert data["profile"]["smtps"]["systemd"] == "smtps"
    assert "listen" not in data["profile"]["smtp"]
    assert '# systemd = "submission"' in text
    text, data = render(control)
    assert data["profile"]["smtp"]["listen"] == ["0.0.0.0:25"]
    assert "systemd" not in data["profile"]["smtp"]
    assert '# systemd = "smtp"' in text


def test_backend_is_in_the_qmail_home(tmp_path: Path, ca: trustme.CA) -> None:
    control = make_control(tmp_path / "home" / "control", ca)
    _, data = render(control)
    assert data["defaults"]["backend"] == [str(tmp_path / "home" / "bin" / "qmail-smtpd")]


def test_the_account_of_qmails_own_run_script(tmp_path: Path, ca: trustme.CA) -> None:
    """Without a run script, qmaild:nofiles when this host has them; else it says so."""
    control = make_control(tmp_path / "control", ca, ("me",))
    text, data = render(control, backend=["/bin/cat"])
    try:
        pwd.getpwnam("qmaild")
    except KeyError:
        assert "user" not in data["defaults"]
        assert "# No qmaild account here: set user (and group)" in text
    else:
        assert data["defaults"]["user"] == "qmaild"
        assert "No qmaild account here" not in text
