"""Where each key applies: the schema's scopes are enforced, and every key is read.

A key set in a profile it does not apply to would be ignored, so it is
refused (by the loader, and so by `tlsfront check` and `tlsfront run`). The
walk over the schema proves, key by key and mode by mode, that an accepted
key reaches the built Profile and that the code serving that mode reads it:
a key added to the schema without a reader, or read by a side it is not
declared for, fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
from pathlib import Path

import pytest
from support.daemon import TLSFRONT

from tlsfront.config.errors import ConfigError
from tlsfront.config.files import parse_config
from tlsfront.config.schema import SCOPES, Mode, Profile, Settings, applies_to

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tlsfront"
ENV: dict[str, str] = {"HOME": "/home/alice"}

# the keys of a profile of each mode that loads, as TOML text
BASE: dict[Mode, dict[str, str]] = {
    "inbound": {"listen": '["127.0.0.1:0"]', "cert": '"c.pem"', "backend": '["/bin/cat"]'},
    "outbound": {"mode": '"outbound"', "listen": '["127.0.0.1:0"]'},
}

# key -> (a value other than the default, keys it needs beside it); TOML text.
SAMPLES: dict[str, tuple[str, dict[str, str]]] = {
    "mode": ('"outbound"', {}),  # only meaningful in the outbound base; see below
    "listen": ('["127.0.0.1:2"]', {}),
    "systemd": ('"smtp"', {}),
    "hostname": ('"mx.example.test"', {}),
    "qmail_control": ('"control"', {}),
    "tls": ('"implicit"', {}),
    "require_tls": ("true", {}),
    "cert": ('["a.pem", "b.pem"]', {}),
    "key": ('"k.pem"', {}),
    "ciphers": ('"HIGH"', {}),
    "ciphersuites": ('"TLS_AES_128_GCM_SHA256"', {}),
    "min_tls_version": ('"TLSv1.3"', {}),
    "dhparams": ('"dh.pem"', {}),
    "client_cert": ('"request"', {}),
    "client_ca": ('"ca.pem"', {}),
    "client_crl": ('"crl.pem"', {}),
    "relay_clients": ('"tlsclients"', {"client_cert": '"request"', "client_ca": '"ca.pem"'}),
    "relay_fingerprints": (f'["{"AB" * 32}"]', {"client_cert": '"request"'}),
    "relay_fingerprints_file": ('"prints"', {"client_cert": '"request"'}),
    "backend": ('["/bin/true"]', {}),
    "backend_start": ('"connect"', {}),
    "auth_checkpassword": ('["/bin/checkpassword", "/bin/true"]', {}),
    "auth_dovecot": ('"/run/dovecot/auth-client"', {}),
    "require_auth": ("true", {"auth_checkpassword": '["/bin/checkpassword", "/bin/true"]'}),
    "auth_max_failures": ("5", {}),
    "received_auth_user": ("true", {}),
    "backend_connect": ('"127.0.0.1:25"', {}),
    "relay_backend_connect": ('"127.0.0.1:26"', {"backend_connect": '"127.0.0.1:25"'}),
    "source_address": ('"127.0.0.2"', {"backend_connect": '"127.0.0.1:25"'}),
    "relay_source_address": ('"127.0.0.3"', {"backend_connect": '"127.0.0.1:25"'}),
    "backend_rules": ('"tcp.smtp"', {"backend_connect": '"127.0.0.1:25"'}),
    "env": ("{ X = '1' }", {}),
    "env_inherit": ('["QMAILQUEUE"]', {}),
    "user": ('"nobody"', {}),
    "group": ('"nogroup"', {"user": '"nobody"'}),
    "allow_root_backend": ("true", {}),
    "rules": ('"tcp.smtp"', {}),
    "received_header": ("false", {}),
    "remote_host_lookup": ("false", {}),
    "remote_host_paranoid": ("true", {}),
    "remote_host_timeout": ("2.5", {}),
    "pipelining_strict": ("false", {}),
    "max_connections": ("7", {}),
    "max_per_ip": ("3", {}),
    "max_message_size": ("1000000", {}),
    "max_command_line": ("1024", {}),
    "max_text_line": ("2000", {}),
    "timeout_handshake": ("5", {}),
    "timeout_command": ("6", {}),
    "timeout_data": ("7", {}),
    "min_data_rate": ("9", {}),
    "timeout_backend": ("8", {}),
    "tls_rate_limit": ("10", {}),
    "proxy_protocol": ("true", {"proxy_trusted": '["10.0.0.0/8"]'}),
    "proxy_trusted": ('["10.0.0.0/8"]', {}),
    "allow_from": ('["10.0.0.0/8"]', {}),
    "routes": ("{ 'example.test' = 'mx.example.test' }", {}),
    "tlshosts": ('"tlshosts"', {}),
    "notlshosts": ('"notlshosts"', {}),
    "client_cert_file": ('"clientcert.pem"', {}),
    "tls_policy": ("{ 'example.test' = 'verify' }", {}),
    "mta_sts": ("true", {}),
    "dane": ("true", {}),
    "dns_servers": ('["127.0.0.1:53"]', {}),
    "helo_name": ('"relay.example.test"', {}),
    "timeout_connect": ("11", {}),
    "route_credentials": ('"smarthost"', {}),
    "smtproutes": ('"smtproutes"', {}),
}

PROFILE_KEYS = [f.name for f in dataclasses.fields(Profile) if f.name != "name"]
SETTINGS_KEYS = [f.name for f in dataclasses.fields(Settings)]
MODES: tuple[Mode, ...] = ("inbound", "outbound")


def render(keys: dict[str, str], defaults: dict[str, str] | None = None) -> str:
    text = "".join(f"{k} = {v}\n" for k, v in (defaults or {}).items())
    text = f"[defaults]\n{text}" if text else ""
    return text + "[profile.p]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


def profile_of(text: str, control: Path | None = None) -> Profile:
    path = (control.parent if control else Path("/nonexistent")) / "tlsfront.toml"
    return parse_config(text, path, ENV).profiles["p"]


def test_every_key_declares_where_it_applies() -> None:
    assert set(SCOPES) == set(PROFILE_KEYS) | set(SETTINGS_KEYS)
    assert {SCOPES[k] for k in PROFILE_KEYS} <= {"inbound", "outbound", "both"}
    assert all(SCOPES[k] == "defaults" for k in SETTINGS_KEYS if k not in PROFILE_KEYS)
    # a key added to the schema needs a sample here, so the walk below covers it
    assert set(SAMPLES) == set(PROFILE_KEYS)


# mode picks the base (every outbound case sets it); qmail_control has its own test
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", [k for k in PROFILE_KEYS if k not in ("mode", "qmail_control")])
def test_each_key_is_taken_where_it_applies_and_refused_elsewhere(key: str, mode: Mode) -> None:
    value, companions = SAMPLES[key]
    if applies_to(key, mode):
        without = {**BASE[mode], **companions}
        with_key = {**without, key: value}
        for keys in (without, with_key):
            if "backend_connect" in keys:  # a profile has one backend
                keys.pop("backend", None)
        carried = getattr(profile_of(render(with_key)), key)
        assert carried != getattr(profile_of(render(without)), key), f"{key} not carried"
        return
    base = BASE[mode]
    line = len(base) + 2
    with pytest.raises(ConfigError) as info:
        profile_of(render({**base, key: value}))
    err = info.value
    assert (err.line, err.table, err.key) == (line, "profile.p", key)
    assert err.message == f"applies to {SCOPES[key]} profiles only"
    assert str(err) == f"/nonexistent/tlsfront.toml:{line}: [profile.p] key '{key}': {err.message}"
    # the same key as a default does not trouble a profile it does not apply to
    profile = profile_of(render(base, {key: value}))
    assert getattr(profile, key) == getattr(profile_of(render(base)), key)


def test_qmail_control_is_taken_by_both_modes(tmp_path: Path) -> None:
    control = tmp_path / "control"
    (control / "tlshosts").mkdir(parents=True)
    (control / "servercert.pem").write_text("x\n")
    (control / "me").write_text("mx.example.test\n")
    cases: tuple[tuple[Mode, str], ...] = (("inbound", "cert"), ("outbound", "tlshosts"))
    for mode, field in cases:
        keys = {k: v for k, v in BASE[mode].items() if k != "cert"}
        profile = profile_of(render({**keys, "qmail_control": '"control"'}), control)
        assert profile.qmail_control == control
        assert profile.hostname == "mx.example.test"
        assert getattr(profile, field), f"{mode}: nothing taken from the control directory"


# -- every accepted key is read by the code that serves its mode -------------------

# modules that serve profiles of every mode (listeners, limits, sockets, the
# account workers serve as)
EVERY_MODE = {"inbound/server.py", "ops/systemd.py", "ops/workers.py", "ops/privileges.py"}
# keys consumed while loading: they fill other keys (tested above)
LOAD_TIME = {"qmail_control"}


def _reads() -> dict[str, set[str]]:
    """key -> modules (under tlsfront/) reading `<...profile>.key` or `<...settings>.key`."""
    keys = set(PROFILE_KEYS) | set(SETTINGS_KEYS)
    found: dict[str, set[str]] = {k: set() for k in keys}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if module.startswith("config/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in keys:
                owner = ast.unparse(node.value)
                if owner == "p" or owner.endswith(("profile", "settings")):
                    found[node.attr].add(module)
    return found


READS = _reads()


def _serves(module: str, mode: Mode) -> bool:
    if module in EVERY_MODE:
        return True
    return module.startswith("outbound/") == (mode == "outbound")


@pytest.mark.parametrize("key", sorted(set(PROFILE_KEYS) - LOAD_TIME))
def test_each_profile_key_is_read_by_each_mode_it_applies_to(key: str) -> None:
    for mode in MODES:
        readers = {m for m in READS[key] if _serves(m, mode)}
        if applies_to(key, mode):
            assert readers, f"{key} applies to {mode} profiles but nothing there reads it"
        else:
            # read only where it can never be set: the schema says the wrong scope
            only_mode = {m for m in readers if m not in EVERY_MODE}
            assert not only_mode, f"{key} is read by {sorted(only_mode)} but refused in {mode}"


@pytest.mark.parametrize("key", sorted(set(SETTINGS_KEYS) - set(PROFILE_KEYS)))
def test_each_setting_is_read(key: str) -> None:
    assert READS[key], f"[defaults] {key} is accepted but nothing reads it"


# -- the command line refuses a misplaced key ---------------------------------------

MISPLACED = [
    (
        "inbound-only key in an outbound profile",
        '[profile.out]\nmode = "outbound"\nlisten = ["127.0.0.1:0"]\nciphers = "HIGH"\n',
        "tlsfront.toml:4: [profile.out] key 'ciphers': applies to inbound profiles only",
    ),
    (
        "outbound-only key in an inbound profile",
        '[profile.smtp]\nlisten = ["127.0.0.1:0"]\ntls = "none"\nbackend = ["/bin/cat"]\n'
        'helo_name = "relay.example.test"\n',
        "tlsfront.toml:5: [profile.smtp] key 'helo_name': applies to outbound profiles only",
    ),
]


def _tlsfront(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TLSFRONT, *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize(
    ("text", "expected"), [m[1:] for m in MISPLACED], ids=[m[0] for m in MISPLACED]
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_cli_refuses_a_misplaced_key(
    tmp_path: Path, command: str, text: str, expected: str
) -> None:
    config = tmp_path / "tlsfront.toml"
    config.write_text(text)
    result = _tlsfront(command, "-c", str(config))
    assert result.returncode == 1
    assert f"{tmp_path}/{expected}" in result.stdout + result.stderr
