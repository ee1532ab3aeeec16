"""Loading and checking a configuration: keys, types, addresses, [defaults], per-mode rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

import pytest
from support.configs import ENV, MINIMAL, assert_at, fails, line_of, load, make_control, write

from tlsfront.config.errors import ConfigError
from tlsfront.config.files import load_config, parse_config
from tlsfront.config.machine import default_hostname, default_state_dir
from tlsfront.config.schema import Profile, Settings
from tlsfront.net.address import split_host_port


@pytest.fixture
def control(tmp_path: Path) -> Path:
    """A qmail-tls style control directory (contents do not matter to config)."""
    return make_control(tmp_path)


# -- the happy path -------------------------------------------------------------


def test_minimal_profile(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL)
    assert cfg.path == tmp_path / "tlsfront.toml"
    assert list(cfg.profiles) == ["smtp"]
    p = cfg.profiles["smtp"]
    assert p.name == "smtp"
    assert p.mode == "inbound"
    assert p.listen == ("127.0.0.1:2525",)
    assert p.cert == (tmp_path / "cert.pem",)
    assert p.key == ()
    assert p.backend == ("/bin/cat",)
    assert p.tls == "starttls"
    assert p.hostname == cfg.settings.hostname == default_hostname()
    assert cfg.settings.state_dir == default_state_dir(ENV)
    assert cfg.settings.log_level == "info"
    assert p.allow_from == ("127.0.0.1/32", "::1/128")


def test_every_key_accepted(tmp_path: Path) -> None:
    text = """\
[defaults]
hostname = "mail.example.com"
state_dir = "state"
log_format = "json"
log_level = "debug"
metrics_listen = "127.0.0.1:9100"
workers = 2
shutdown_grace = 5

[profile.in]
listen = "[::1]:2525"
systemd = "smtp"
hostname = "in.example.com"
tls = "implicit"
require_tls = true
cert = ["rsa.pem", "ecdsa.pem"]
key = ["rsa.key", "ecdsa.key"]
ciphers = "HIGH"
ciphersuites = "TLS_AES_256_GCM_SHA384"
min_tls_version = "TLSv1.3"
dhparams = "dh.pem"
client_cert = "require"
client_ca = "ca.pem"
client_crl = "crl.pem"
relay_clients = "tlsclients"
relay_fingerprints = ["ab" ]
relay_fingerprints_file = "fps"
backend_connect = "127.0.0.1:2526"
relay_backend_connect = "127.0.0.1:2527"
source_address = "127.0.0.2"
relay_source_address = "127.0.0.3"
env = { DATABYTES = "1000", RELAYCLIENT = "" }
rules = "tcp.smtp"
received_header = false
pipelining_strict = false
max_connections = 10
max_per_ip = 2
max_message_size = 1000000
max_command_line = 2048
max_text_line = 2000
timeout_handshake = 1.5
timeout_command = 60
timeout_data = 60
min_data_rate = 0
timeout_backend = 10
tls_rate_limit = 30
proxy_protocol = true
proxy_trusted = ["10.0.0.0/8"]

[profile.out]
mode = "outbound"
listen = ["127.0.0.1:10025"]
allow_from = ["127.0.0.1", "10.1.2.3/8"]
routes = { "" = "smarthost.example.net:587", "example.org" = "[2001:db8::1]", "x.org" = "" }
tlshosts = "tlshosts"
notlshosts = "notlshosts"
client_cert_file = "clientcert.pem"
tls_policy = { "" = "may", "example.org" = "verify" }
mta_sts = true
dane = true
dns_servers = ["127.0.0.53", "[::1]:5353", "192.0.2.1:53"]
helo_name = "out.example.com"
timeout_connect = 5
""".replace('["ab" ]', '["' + "ab" * 32 + '"]')
    cfg = load(tmp_path, text)
    s = cfg.settings
    assert s == Settings(
        hostname="mail.example.com",
        state_dir=tmp_path / "state",
        log_format="json",
        log_level="debug",
        metrics_listen="127.0.0.1:9100",
        workers=2,
        shutdown_grace=5.0,
    )
    p = cfg.profiles["in"]
    assert p.listen == ("[::1]:2525",)
    assert p.cert == (tmp_path / "rsa.pem", tmp_path / "ecdsa.pem")
    assert p.relay_fingerprints == (":".join(["AB"] * 32),)
    assert p.relay_fingerprints_file == tmp_path / "fps"
    assert dict(p.env) == {"DATABYTES": "1000", "RELAYCLIENT": ""}
    assert p.pipelining_strict is False
    assert p.timeout_command == 60.0
    assert isinstance(p.timeout_command, float)
    assert p.hostname == "in.example.com"
    o = cfg.profiles["out"]
    assert o.allow_from == ("127.0.0.1/32", "10.0.0.0/8")
    assert o.routes[""] == "smarthost.example.net:587"
    assert o.tls_policy == {"": "may", "example.org": "verify"}
    assert o.tlshosts == tmp_path / "tlshosts"
    assert o.hostname == "mail.example.com"
    assert list(cfg.profiles) == ["in", "out"]


def test_values_are_immutable(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL + 'env = { A = "1" }\n')
    p = cfg.profiles["smtp"]
    assert isinstance(p.env, MappingProxyType)
    assert isinstance(p.routes, MappingProxyType)
    assert isinstance(p.tls_policy, MappingProxyType)
    assert isinstance(cfg.profiles, MappingProxyType)
    with pytest.raises(TypeError):
        p.env["B"] = "2"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tls = "none"  # type: ignore[misc]


def test_ipv6_listen(tmp_path: Path) -> None:
    text = MINIMAL.replace('"127.0.0.1:2525"', '"[::1]:25", "[::]:587", "*:465", "0.0.0.0:26"')
    p = load(tmp_path, text).profiles["smtp"]
    assert p.listen == ("[::1]:25", "[::]:587", "*:465", "0.0.0.0:26")
    assert [split_host_port(a) for a in p.listen] == [
        ("::1", 25),
        ("::", 587),
        ("*", 465),
        ("0.0.0.0", 26),
    ]


def test_relative_paths_and_home(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    text = MINIMAL.replace('"cert.pem"', '["../certs/a.pem", "/abs/b.pem", "~/c.pem"]')
    text += 'rules = "tcp.smtp"\nclient_cert = "request"\nclient_ca = "~"\n'
    p = load_config(write(sub, text), {"HOME": "/home/bob"}).profiles["smtp"]
    assert p.cert == (sub / "../certs/a.pem", Path("/abs/b.pem"), Path("/home/bob/c.pem"))
    assert p.rules == sub / "tcp.smtp"
    assert p.client_ca == Path("/home/bob")
    # parse_config without a path anchors relative paths at the working directory
    p = parse_config(MINIMAL, None, ENV).profiles["smtp"]
    assert p.cert == (Path.cwd() / "cert.pem",)


def test_fingerprints_normalized(tmp_path: Path) -> None:
    colon = ":".join(["ab"] * 32)
    plain = "0F" * 32
    text = MINIMAL + f'client_cert = "request"\nrelay_fingerprints = ["{colon}", "{plain}"]\n'
    p = load(tmp_path, text).profiles["smtp"]
    assert p.relay_fingerprints == (colon.upper(), ":".join(["0F"] * 32))


def test_relay_fingerprints_as_file(tmp_path: Path) -> None:
    text = MINIMAL + 'client_cert = "request"\nrelay_fingerprints = "relay_clientcerts"\n'
    p = load(tmp_path, text).profiles["smtp"]
    assert p.relay_fingerprints == ()
    assert p.relay_fingerprints_file == tmp_path / "relay_clientcerts"


# -- every key's type error names file, line, key ---------------------------------

# a wrong value for every key, and a word of the message it must get
WRONG: dict[str, tuple[str, str]] = {
    # settings
    "state_dir": ("5", "must be a path"),
    "log_format": ('"xml"', "must be one of 'text', 'json', not 'xml'"),
    "log_level": ('"verbose"', "must be one of 'debug'"),
    "metrics_listen": ('"localhost"', "missing ':port'"),
    "workers": ("-1", "must not be negative"),
    "shutdown_grace": ("-1", "must not be negative"),
    "handoff_socket": ("5", "must be a path"),
    "handoff_user": ('""', "must not be empty"),
    # profile
    "mode": ('"both"', "must be one of 'inbound', 'outbound', not 'both'"),
    "listen": ("25", "must be a string or a list"),
    "systemd": ('"a:b"', "FileDescriptorName"),
    "hostname": ('"bad name"', "not a host name"),
    "qmail_control": ("true", "must be a path"),
    "tls": ('"startls"', "must be one of 'starttls', 'implicit', 'none', not 'startls'"),
    "require_tls": ('"yes"', "must be true or false, not 'yes'"),
    "cert": ("[1]", "item 1: must be a path"),
    "key": ("{}", 'a table by server name needs a "default" entry'),
    "ciphers": ('""', "must not be empty"),
    "ciphersuites": ("1", "must be a string"),
    "min_tls_version": ('"SSLv3"', "must be one of 'TLSv1'"),
    "dhparams": ('""', "non-empty path"),
    "client_cert": ('"optional"', "must be one of 'none', 'request', 'require'"),
    "backend_start": ('"lazy"', "must be one of 'on-demand', 'connect'"),
    "auth_checkpassword": ('"/bin/checkpassword"', "must be a list"),
    "auth_dovecot": ("5", "must be a path"),
    "require_auth": ('"yes"', "true or false"),
    "auth_max_failures": ("-1", "must not be negative"),
    "received_auth_user": ("1", "true or false"),
    "client_ca": ("[]", "must be a path"),
    "client_crl": ("1.5", "must be a path"),
    "relay_clients": ("false", "must be a path"),
    "relay_fingerprints": ('["AB:CD"]', "not a SHA-256 fingerprint"),
    "relay_fingerprints_file": ("[]", "must be a path"),
    "backend": ('"/var/qmail/bin/qmail-smtpd"', "must be a list"),
    "backend_connect": ('"127.0.0.1:99999"', "port '99999'"),
    "relay_backend_connect": ('"::1:25"', "in brackets"),
    "source_address": ('"127.0.0.256"', "not an IP address"),
    "relay_source_address": ("1", "must be a string"),
    "backend_rules": ("5", "must be a path"),
    "env": ('{ "A-B" = "1" }', "not an environment variable name"),
    "env_inherit": ('["RELAYCLIENT"]', "RELAYCLIENT is never taken from tlsfront's own"),
    "user": ('"no-such-user-here"', "no user 'no-such-user-here' on this machine"),
    "group": ('"no-such-group-here"', "no group 'no-such-group-here' on this machine"),
    "allow_root_backend": ('"yes"', "must be true or false"),
    "rules": ("1979-05-27", "not a date"),
    "received_header": ("1", "must be true or false, not 1"),
    "remote_host_lookup": ('"no"', "must be true or false"),
    "remote_host_paranoid": ("0", "must be true or false"),
    "remote_host_timeout": ("0", "more than 0"),
    "pipelining_strict": ('"no"', "must be true or false, not 'no'"),
    "max_connections": ("true", "must be a whole number, not true"),
    "max_per_ip": ("1.5", "must be a whole number, not 1.5"),
    "max_message_size": ('"10M"', "must be a whole number, not '10M'"),
    "max_command_line": ("100", "at least 512"),
    "max_text_line": ("999", "at least 1000"),
    "timeout_handshake": ("0", "more than 0"),
    "timeout_command": ("true", "must be a number, not true"),
    "timeout_data": ("inf", "finite"),
    "min_data_rate": ("-5", "must not be negative"),
    "timeout_backend": ("nan", "finite"),
    "tls_rate_limit": ("1e3", "whole number"),
    "proxy_protocol": ('"on"', "true or false"),
    "proxy_trusted": ('["10.0.0.0/33"]', "not a network"),
    "allow_from": ('["localhost"]', "not a network"),
    "routes": ('{ "example.com" = 5 }', "'example.com': must be a string"),
    "tlshosts": ("5", "must be a path"),
    "notlshosts": ("5", "must be a path"),
    "client_cert_file": ("5", "must be a path"),
    "tls_policy": ('{ "example.com" = "must" }', "must be one of 'none', 'may'"),
    "mta_sts": ("1", "true or false"),
    "dane": ('"true"', "true or false"),
    "dns_servers": ('["dns.google"]', "a resolver is an IP address"),
    "helo_name": ('"a..b"', "not a host name"),
    "timeout_connect": ("-0.5", "must not be negative"),
    "route_credentials": ("5", "must be a path"),
    "smtproutes": ("[]", "must be a path"),
}
SETTINGS_KEYS = {f.name for f in dataclasses.fields(Settings)}


def test_wrong_list_covers_every_key() -> None:
    keys = SETTINGS_KEYS | {f.name for f in dataclasses.fields(Profile)} - {"name"}
    assert set(WRONG) | {"hostname"} == keys


@pytest.mark.parametrize("key", sorted(WRONG))
def test_wrong_value_names_file_line_key(tmp_path: Path, key: str) -> None:
    value, words = WRONG[key]
    in_defaults = key in SETTINGS_KEYS
    table = "defaults" if in_defaults else "profile.smtp"
    text = f"[defaults]\n# global\n{key} = {value}\n\n" if in_defaults else ""
    # a key MINIMAL has already is moved to the end
    text += "".join(line for line in MINIMAL.splitlines(True) if not line.startswith(key + " ="))
    if not in_defaults:
        text += f"# the key under test\n{key} = {value}\n"
    path = tmp_path / "tlsfront.toml"
    err = fails(tmp_path, text)
    assert_at(err, path, line_of(text, f"{key} ="), table, key)
    assert words in err.message


@pytest.mark.parametrize("key", ["tls", "workers", "listen"])
def test_wrong_value_in_defaults_is_reported_at_defaults(tmp_path: Path, key: str) -> None:
    value = WRONG[key][0]
    text = f"[defaults]\n\n{key} = {value}\n\n" + MINIMAL
    err = fails(tmp_path, text)
    assert_at(err, tmp_path / "tlsfront.toml", 3, "defaults", key)


def test_message_format_exactly(tmp_path: Path) -> None:
    text = MINIMAL + 'tls = "startls"\n'
    err = fails(tmp_path, text)
    assert str(err) == (
        f"{tmp_path / 'tlsfront.toml'}:5: [profile.smtp] key 'tls': "
        "must be one of 'starttls', 'implicit', 'none', not 'startls'"
    )


def test_unknown_keys_and_tables(tmp_path: Path) -> None:
    path = tmp_path / "tlsfront.toml"
    err = fails(tmp_path, MINIMAL + "requre_tls = true\n")
    assert_at(err, path, 5, "profile.smtp", "requre_tls")
    assert "did you mean 'require_tls'" in err.message

    err = fails(tmp_path, "[defaults]\nhostname = 'a.b'\nfrobnicate = 1\n" + MINIMAL)
    assert_at(err, path, 3, "defaults", "frobnicate")
    assert err.message == "unknown key"

    err = fails(tmp_path, MINIMAL + "\n[profiles.x]\nlisten = []\n")
    assert_at(err, path, 6, "profiles", None)
    assert "unknown table" in err.message

    err = fails(tmp_path, "hostname = 'a'\n" + MINIMAL)
    assert_at(err, path, 1, None, "hostname")
    assert str(err) == f"{path}:1: key 'hostname': {err.message}"
    assert "go in [defaults]" in err.message

    err = fails(tmp_path, MINIMAL + "workers = 4\n")
    assert_at(err, path, 5, "profile.smtp", "workers")
    assert err.message == "applies to [defaults] only (a global setting)"

    err = fails(tmp_path, MINIMAL + "name = 'other'\n")
    assert_at(err, path, 5, "profile.smtp", "name")

    err = fails(tmp_path, MINIMAL + "[profile.smtp.env]\nA = 1\n")
    assert_at(err, path, 6, "profile.smtp", "env")
    assert "'A': must be a string" in err.message

    err = fails(tmp_path, MINIMAL + "\n[profile.'bad name']\nlisten = []\n")
    assert_at(err, path, 6, "profile.bad name", None)


def test_lines_of_dotted_and_inline_tables(tmp_path: Path) -> None:
    path = tmp_path / "tlsfront.toml"
    text = (
        "[profile]\n"
        's = """\n'
        'tls = "x"\n'
        '"""\n'
        'smtp = { listen = ["127.0.0.1:25"], cert = "c", backend = ["/bin/cat"],'
        ' tls = "bad" }\n'
    )
    err = fails(tmp_path, text)
    assert_at(err, path, 2, "profile", "s")  # 's' is not a table

    text = text.replace('s = """\ntls = "x"\n"""\n', "# nothing\n#\n#\n")
    err = fails(tmp_path, text)
    assert_at(err, path, 5, "profile.smtp", "tls")

    text = (
        "profile.smtp.listen = [\n"
        '  "127.0.0.1:25",  # a comment with key = "value"\n'
        "]\n"
        "profile.smtp.cert = '''\n"
        "tls = 'x'\n"
        "'''\n"
        'profile.smtp.backend = ["/bin/cat"]\n'
        '"profile".smtp."tls" = "bad"\n'
    )
    err = fails(tmp_path, text)
    assert_at(err, path, 8, "profile.smtp", "tls")


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    text = MINIMAL + "tls = \n"
    err = fails(tmp_path, text)
    assert err.path == tmp_path / "tlsfront.toml"
    assert err.line == 5
    assert "TOML syntax" in str(err)
    assert str(err).startswith(f"{tmp_path / 'tlsfront.toml'}:5: ")

    err = fails(tmp_path, MINIMAL + 'tls = "starttls"\ntls = "none"\n')
    assert err.line == 6


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, ENV)
    assert info.value.path == missing
    assert str(info.value).startswith(f"{missing}: cannot read")

    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"# ok\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, ENV)
    assert (info.value.path, info.value.line) == (bad, 2)


def test_no_profiles(tmp_path: Path) -> None:
    err = fails(tmp_path, "[defaults]\nhostname = 'a.example'\n")
    assert "nothing to serve" in err.message


# -- addresses, networks, fingerprints ----------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:1", "0.0.0.0:25", "*:25", "[::]:25", "[::1]:65535", "[2001:db8::1]:587", "[::1]:0"],
)
def test_listen_good(tmp_path: Path, address: str) -> None:
    text = MINIMAL.replace("127.0.0.1:2525", address)
    assert load(tmp_path, text).profiles["smtp"].listen == (address,)


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("127.0.0.1", "missing ':port'"),
        ("127.0.0.1:65536", "from 1 to 65535"),
        ("127.0.0.1:x", "from 1 to 65535"),
        ("127.0.0.1:-1", "from 1 to 65535"),
        (":25", "missing host"),
        ("::1:25", "in brackets"),
        ("[::1]25", "[address]:port"),
        ("[::1:25", "[address]:port"),
        ("[127.0.0.1]:25", "not an IPv6 address"),
        ("127.0.0.256:25", "IP address or *"),
        ("localhost:25", "IP address or *"),
        ("", "missing ':port'"),
    ],
)
def test_listen_bad(tmp_path: Path, address: str, words: str) -> None:
    text = MINIMAL.replace("127.0.0.1:2525", address)
    err = fails(tmp_path, text)
    assert_at(err, tmp_path / "tlsfront.toml", 2, "profile.smtp", "listen")
    assert words in err.message


def test_second_listen_item_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace('"127.0.0.1:2525"', '"127.0.0.1:25", "127.0.0.1"')
    assert fails(tmp_path, text).message.startswith("item 2: '127.0.0.1'")


def test_connect_addresses(tmp_path: Path) -> None:
    base = MINIMAL.replace('backend = ["/bin/cat"]', 'backend_connect = "{}"')
    for good in ("127.0.0.1:2525", "[::1]:25", "backend.example:25", "localhost:2525"):
        p = load(tmp_path, base.format(good)).profiles["smtp"]
        assert p.backend_connect == good
    for bad in ("0.0.0.0:25", "*:25", "[::]:25", "bad_host!:25", "a:b:25", "127.0.0.1:0"):
        err = fails(tmp_path, base.format(bad))
        assert err.key == "backend_connect", bad


def test_networks_normalized(tmp_path: Path) -> None:
    text = MINIMAL + (
        'proxy_protocol = true\nproxy_trusted = ["192.168.1.7/24", "::1", "2001:DB8::/32"]\n'
    )
    p = load(tmp_path, text).profiles["smtp"]
    assert p.proxy_trusted == ("192.168.1.0/24", "::1/128", "2001:db8::/32")


@pytest.mark.parametrize(
    ("fingerprint", "words"),
    [
        ("AB" * 31, "64 hex digits"),
        ("AB" * 33, "64 hex digits"),
        ("G" * 64, "64 hex digits"),
        (":".join(["AB"] * 20), "looks like SHA-1"),
        ("ABC:" + "AB" * 30, "64 hex digits"),
        (":" + "AB" * 32, "64 hex digits"),
    ],
)
def test_bad_fingerprints(tmp_path: Path, fingerprint: str, words: str) -> None:
    text = MINIMAL + f'client_cert = "request"\nrelay_fingerprints = ["{fingerprint}"]\n'
    err = fails(tmp_path, text)
    assert_at(err, tmp_path / "tlsfront.toml", 6, "profile.smtp", "relay_fingerprints")
    assert words in err.message


# -- [defaults] ---------------------------------------------------------------------


def test_defaults_inherited_and_overridden(tmp_path: Path) -> None:
    text = """\
[defaults]
hostname = "mail.example.com"
max_per_ip = 5
cert = "default.pem"
backend = ["/var/qmail/bin/qmail-smtpd"]
env = { DATABYTES = "100" }
allow_from = ["10.0.0.0/8"]

[profile.smtp]
listen = ["0.0.0.0:25"]

[profile.submission]
listen = ["0.0.0.0:587"]
hostname = "submit.example.com"
max_per_ip = 9
cert = "submit.pem"
require_tls = true

[profile.tcp]
listen = ["0.0.0.0:2525"]
backend_connect = "127.0.0.1:2526"

[profile.out]
mode = "outbound"
listen = ["127.0.0.1:10025"]
"""
    cfg = load(tmp_path, text)
    smtp, sub, tcp, out = (cfg.profiles[n] for n in ("smtp", "submission", "tcp", "out"))
    assert smtp.max_per_ip == 5
    assert smtp.cert == (tmp_path / "default.pem",)
    assert smtp.hostname == "mail.example.com"
    assert smtp.env == {"DATABYTES": "100"}
    assert smtp.allow_from == ("127.0.0.1/32", "::1/128")  # outbound key: not for inbound
    assert (sub.max_per_ip, sub.hostname, sub.require_tls) == (9, "submit.example.com", True)
    assert sub.cert == (tmp_path / "submit.pem",)
    assert sub.backend == ("/var/qmail/bin/qmail-smtpd",)
    # a profile that picks a TCP backend does not also inherit the exec one
    assert (tcp.backend, tcp.backend_connect) == ((), "127.0.0.1:2526")
    # inbound keys from [defaults] do not reach an outbound profile
    assert (out.cert, out.backend, out.env) == ((), (), {})
    assert out.allow_from == ("10.0.0.0/8",)
    assert out.max_per_ip == 5
    assert cfg.settings.hostname == "mail.example.com"


def test_defaults_key_broken_for_one_profile(tmp_path: Path) -> None:
    text = "[defaults]\nrequire_tls = true\n\n" + MINIMAL + "tls = 'none'\n"
    err = fails(tmp_path, text)
    assert_at(err, tmp_path / "tlsfront.toml", 4, "profile.smtp", "require_tls")
    assert "(set in [defaults], line 2)" in err.message


# -- per-mode rules -----------------------------------------------------------------

BROKEN: list[tuple[str, str, str, str]] = [
    # (what is appended to MINIMAL or replaces a line, key blamed, words)
    ('backend = ["/bin/cat"]', "", "backend", "needs backend"),
    ("", 'backend_connect = "127.0.0.1:26"', "backend_connect", "both set"),
    ('cert = "cert.pem"', "", "cert", "needs a certificate"),
    ("", 'key = ["a.key", "b.key"]', "key", "has 2 entries but cert has 1"),
    ("", "require_tls = true\ntls = 'none'", "require_tls", "needs TLS"),
    ("", "tls = 'none'\nclient_cert = 'request'", "client_cert", "needs TLS"),
    ("", "client_cert = 'require'", "client_cert", "needs client_ca"),
    ("", "client_cert = 'request'\nrelay_clients = 'c'", "relay_clients", "needs client_ca"),
    ("", "relay_clients = 'c'\nclient_ca = 'ca'", "relay_clients", "would never be used"),
    (
        "",
        f"relay_fingerprints = ['{'AB' * 32}']",
        "relay_fingerprints",
        'would never be used: set client_cert = "request"',
    ),
    ("", "relay_fingerprints = 'fps'", "relay_fingerprints", "would never be used"),
    ("", "relay_backend_connect = '127.0.0.1:26'", "relay_backend_connect", "backend_connect"),
    ("", "source_address = '127.0.0.2'", "source_address", "only with backend_connect"),
    ("", "relay_source_address = '127.0.0.2'", "relay_source_address", "only with backend"),
    (
        'backend = ["/bin/cat"]',
        'backend_connect = "127.0.0.1:26"\nrelay_backend_connect = "127.0.0.1:26"',
        "relay_backend_connect",
        "equals backend_connect",
    ),
    (
        'backend = ["/bin/cat"]',
        'backend_connect = "127.0.0.1:26"\nsource_address = "127.0.0.2"\n'
        'relay_source_address = "127.0.0.2"',
        "relay_source_address",
        "equals source_address",
    ),
    ("", "proxy_protocol = true", "proxy_protocol", "needs proxy_trusted"),
    ("", "allow_from = ['127.0.0.1']", "allow_from", "applies to outbound profiles only"),
    ("", "routes = {}", "routes", "applies to outbound profiles only"),
    ("", "helo_name = 'a.example'", "helo_name", "applies to outbound profiles only"),
    ('backend = ["/bin/cat"]', "backend = []", "backend", "must name a program"),
    ('backend = ["/bin/cat"]', 'backend = [""]', "backend", "must name a program"),
]


@pytest.mark.parametrize(("remove", "add", "key", "words"), BROKEN)
def test_inbound_rules(tmp_path: Path, remove: str, add: str, key: str, words: str) -> None:
    text = (MINIMAL.replace(remove + "\n", "") if remove else MINIMAL) + add + "\n"
    err = fails(tmp_path, text)
    assert err.table == "profile.smtp"
    assert err.key == key
    assert words in err.message
    line = line_of(text, key + " =") if f"\n{key} =" in text else 1
    assert err.line == line


def test_systemd_alone_is_enough(tmp_path: Path) -> None:
    text = MINIMAL.replace('listen = ["127.0.0.1:2525"]', 'systemd = "smtp"')
    p = load(tmp_path, text).profiles["smtp"]
    assert (p.listen, p.systemd) == ((), "smtp")


def test_tls_none_needs_no_cert(tmp_path: Path) -> None:
    text = MINIMAL.replace('cert = "cert.pem"', 'tls = "none"')
    assert load(tmp_path, text).profiles["smtp"].cert == ()


def test_outbound_rejects_inbound_keys(tmp_path: Path) -> None:
    base = '[profile.out]\nmode = "outbound"\nlisten = ["127.0.0.1:10025"]\n'
    for key, value in [("tls", '"none"'), ("cert", '"c.pem"'), ("backend", '["/bin/cat"]')]:
        err = fails(tmp_path, base + f"{key} = {value}\n")
        assert_at(err, tmp_path / "tlsfront.toml", 4, "profile.out", key)
        assert err.message == "applies to inbound profiles only"
    # no listen: served only through `tlsfront inetd` (see test_inetd)
    (tmp_path / "tlsfront.toml").write_text(base.replace('listen = ["127.0.0.1:10025"]\n', ""))
    assert load_config(tmp_path / "tlsfront.toml").profiles["out"].listen == ()


def test_duplicate_listen_and_systemd(tmp_path: Path) -> None:
    second = MINIMAL.replace("[profile.smtp]", "[profile.again]")
    err = fails(tmp_path, MINIMAL + "\n" + second)
    assert_at(err, tmp_path / "tlsfront.toml", 7, "profile.again", "listen")
    assert "also in [profile.smtp]" in err.message

    # the same address written differently is the same address
    err = fails(
        tmp_path,
        MINIMAL.replace("127.0.0.1:2525", "[::1]:25")
        + "\n"
        + second.replace("127.0.0.1:2525", "[0:0::1]:25"),
    )
    assert err.key == "listen"

    err = fails(tmp_path, MINIMAL.replace('"127.0.0.1:2525"', '"*:25", "*:25"'))
    assert "twice" in err.message

    # port 0 (a free port, as tests use) is never a clash
    zero = MINIMAL.replace("127.0.0.1:2525", "127.0.0.1:0")
    cfg = load(tmp_path, zero + "\n" + zero.replace("[profile.smtp]", "[profile.b]"))
    assert [p.listen for p in cfg.profiles.values()] == [("127.0.0.1:0",)] * 2

    sd = MINIMAL.replace('listen = ["127.0.0.1:2525"]', 'systemd = "smtp"')
    err = fails(tmp_path, sd + "\n" + sd.replace("[profile.smtp]", "[profile.b]"))
    assert_at(err, tmp_path / "tlsfront.toml", 7, "profile.b", "systemd")
