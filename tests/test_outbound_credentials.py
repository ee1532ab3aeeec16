"""Route credentials: the two file forms, their permissions, the policy they force, `check`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support.configs import load
from support.daemon import TLSFRONT

from tlsfront.outbound.credentials import (
    CredentialsError,
    LoginTable,
    RouteLogins,
    parse_route_credentials,
    parse_smtproutes,
    read_logins,
)
from tlsfront.outbound.policy import Decision, HostFacts, Trust, decide, with_credentials
from tlsfront.outbound.stats import record_login, reset

FILE = Path("/etc/tlsfront/smarthost")

# -- tlsfront's own file -------------------------------------------------------------


def test_route_credentials_lines() -> None:
    text = (
        "# host[:port] user password\n"
        "\n"
        "   # an indented comment\n"
        "Smarthost.Example.NET.:587  alice@example.net   correct horse # battery  \n"
        "[2001:db8::25]:2525\trelay\ts3cret\n"
        "backup.example.net bob pw\n"
    )
    logins = parse_route_credentials(text, FILE)
    assert [(x.host, x.port, x.user, x.source) for x in logins] == [
        ("smarthost.example.net", 587, "alice@example.net", f"{FILE}:4"),
        ("2001:db8::25", 2525, "relay", f"{FILE}:5"),
        ("backup.example.net", None, "bob", f"{FILE}:6"),
    ]
    # the rest of the line, blanks inside kept, blanks at its end dropped
    assert logins[0].password.reveal() == b"correct horse # battery"
    assert logins[1].password.reveal() == b"s3cret"
    assert [x.target for x in logins] == [
        "smarthost.example.net:587",
        "[2001:db8::25]:2525",
        "backup.example.net",
    ]
    assert "correct" not in repr(logins[0])


def test_a_password_is_split_only_at_line_ends() -> None:
    text = "smart.example.net alice form\x0cfeed\x1cand\u2028more\r\n"
    (login,) = parse_route_credentials(text, FILE)
    assert login.password.reveal() == "form\x0cfeed\x1cand\u2028more".encode()


def test_lookup_by_host_and_port_then_host_alone() -> None:
    table = LoginTable(
        parse_route_credentials(
            "smart.example.net:587 a pw1\nsmart.example.net b pw2\nsmart.example.net:587 c pw3\n",
            FILE,
        )
    )
    assert len(table) == 2  # the first line for a host and port wins
    found = table.find("SMART.example.net.", 587)
    assert found is not None
    assert found.user == "a"
    found = table.find("smart.example.net", 25)
    assert found is not None
    assert found.user == "b"
    assert table.find("other.example.net", 587) is None
    assert LoginTable().find("smart.example.net", 587) is None


@pytest.mark.parametrize(
    "line",
    [
        "smart.example.net alice",  # no password
        "smart.example.net",
        "smart.example.net:0 alice secret",
        "smart.example.net:99999 alice secret",
        "smart.example.net:smtp alice secret",
        "2001:db8::25:587 alice secret",  # IPv6 needs brackets
        "[2001:db8::25 alice secret",
        "user@smart.example.net alice secret",
    ],
)
def test_malformed_lines_name_the_line_never_the_password(line: str) -> None:
    with pytest.raises(CredentialsError) as info:
        parse_route_credentials(f"# first\n{line}\n", FILE)
    assert str(info.value) == f"{FILE}:2: not 'host[:port] user password'"


# -- qmail's smtproutes, as the qmail-remote AUTH patch reads it ---------------------------


def test_smtproutes_lines_with_credentials() -> None:
    text = (
        ":127.0.0.1:10025\n"  # qmail-remote's route to tlsfront: no credentials
        "example.com:mx.example.com\n"
        "isp.example:smtp.isp.example:587 alice@isp.example s3cret\n"
        ".example.org:relay.example.org -bob pw\n"  # `-`: the patch's "clear is fine"
    )
    logins = parse_smtproutes(text, Path("smtproutes"))
    assert [(x.host, x.port, x.user, x.source) for x in logins] == [
        ("smtp.isp.example", 587, "alice@isp.example", "smtproutes:3"),
        ("relay.example.org", None, "bob", "smtproutes:4"),
    ]
    assert logins[0].password.reveal() == b"s3cret"


@pytest.mark.parametrize("line", [":smtp.isp.example:587 alice", "isp.example: alice pw", "x y z"])
def test_malformed_smtproutes_credentials(line: str) -> None:
    with pytest.raises(CredentialsError) as info:
        parse_smtproutes(line + "\n", Path("smtproutes"))
    assert str(info.value) == "smtproutes:1: not 'domain:relay[:port] user password'"


# -- permissions ---------------------------------------------------------------------------


def test_a_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "smarthost"
    path.write_text("smart.example.net alice secret\n")
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(CredentialsError) as info:
            read_logins(path, None)
        assert str(info.value) == (
            f"{path}: holds passwords but is open to others than its owner"
            f" (mode {mode:04o}); chmod 600 {path}"
        )
    path.chmod(0o600)
    assert len(read_logins(path, None)) == 1
    path.chmod(0o400)
    assert len(read_logins(path, None)) == 1


def test_smtproutes_must_be_private_only_when_it_holds_passwords(tmp_path: Path) -> None:
    routes = tmp_path / "smtproutes"
    routes.write_text(":127.0.0.1:10025\n")
    routes.chmod(0o644)
    assert len(read_logins(None, routes)) == 0
    routes.write_text(":smtp.isp.example:587 alice secret\n")
    with pytest.raises(CredentialsError, match="holds passwords but is open"):
        read_logins(None, routes)
    routes.chmod(0o600)
    assert len(read_logins(None, routes)) == 1


def test_both_files_own_file_first(tmp_path: Path) -> None:
    own, routes = tmp_path / "smarthost", tmp_path / "smtproutes"
    own.write_text("smart.example.net:587 mine pw\n")
    routes.write_text(":smart.example.net:587 theirs pw\n:other.example.net other pw\n")
    own.chmod(0o600)
    routes.chmod(0o600)
    table = read_logins(own, routes)
    assert [x.user for x in table.logins] == ["mine", "other"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read"):
        read_logins(tmp_path / "nothing", None)


def test_watched_files_keep_the_last_good_table(tmp_path: Path) -> None:
    path = tmp_path / "smarthost"
    path.write_text("smart.example.net alice secret\n")
    path.chmod(0o600)
    logins = RouteLogins("out", path, None)
    assert logins.watch is not None
    logins.watch.load()
    path.chmod(0o644)
    path.write_text("smart.example.net alice other secret\n")
    logins.watch._checked = float("-inf")  # look at the files now
    table = logins.get()
    assert table is not None
    assert table.logins[0].password.reveal() == b"secret"
    assert logins.error is not None
    assert "open to others" in logins.error
    assert RouteLogins("plain", None, None).get() is not None  # no files: no logins


# -- the policy of a route that logs in -------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "facts", "source", "trust"),
    [
        ({}, HostFacts(), "credentials", Trust.WEBPKI),  # default may
        ({"": "none"}, HostFacts(), "credentials", Trust.WEBPKI),
        ({"": "encrypt"}, HostFacts(), "credentials", Trust.WEBPKI),
        ({"": "verify"}, HostFacts(), "tls_policy", Trust.WEBPKI),
        ({}, HostFacts(pem=Path("/pin.pem")), "tlshosts", Trust.PEM),
        ({"": "may"}, HostFacts(pem=Path("/pin.pem")), "credentials", Trust.PEM),
        ({}, HostFacts(notls=True), "credentials", Trust.WEBPKI),
        ({}, HostFacts(exhaustive=True), "credentials", Trust.WEBPKI),
        ({}, HostFacts(tlsa_unusable=True), "credentials", Trust.WEBPKI),
    ],
)
def test_credentials_raise_the_policy_to_verify(
    table: dict[str, str], facts: HostFacts, source: str, trust: Trust
) -> None:
    decision = with_credentials(decide("example.org", "smart", table, facts), "smart", facts.pem)
    assert (decision.source, decision.level) == (source, "verify")
    assert [(a.trust, a.required) for a in decision.attempts if a is not None] == [(trust, True)]
    assert None not in decision.attempts  # never a cleartext attempt


def test_a_refused_host_stays_refused() -> None:
    refused = Decision("dane", "dane", refuse="TLSA look-up failed")
    assert with_credentials(refused, "smart", None) is refused


# -- qmail_control, check and run -------------------------------------------------------------

OUT = """\
[profile.out]
mode = "outbound"
listen = ["127.0.0.1:0"]
"""


def test_qmail_control_reads_smtproutes(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    text = OUT + 'qmail_control = "control"\n'
    assert load(tmp_path, text).profiles["out"].smtproutes is None
    (control / "smtproutes").write_text(":127.0.0.1:10025\n")
    assert load(tmp_path, text).profiles["out"].smtproutes == control / "smtproutes"


def _tlsfront(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TLSFRONT, *args], capture_output=True, text=True, timeout=30, check=False
    )


def _config(tmp_path: Path, mode: int, extra: str = "") -> tuple[Path, Path]:
    credentials = tmp_path / "smarthost"
    credentials.write_text("smart.example.net:587 alice@example.net secret words\n")
    credentials.chmod(mode)
    config = tmp_path / "tlsfront.toml"
    config.write_text(OUT + 'route_credentials = "smarthost"\n' + extra)
    return config, credentials


@pytest.mark.parametrize("command", ["check", "run"])
def test_check_and_run_refuse_credentials_open_to_others(tmp_path: Path, command: str) -> None:
    config, credentials = _config(tmp_path, 0o644)
    result = _tlsfront(command, "-c", str(config))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"{credentials}: holds passwords but is open to others than its owner" in output
    assert "secret" not in output


def test_check_says_which_routes_log_in_and_that_they_require_tls(tmp_path: Path) -> None:
    routes = 'routes = { "" = "smart.example.net:587", "example.com" = "" }\n'
    config, credentials = _config(tmp_path, 0o600, routes + 'tls_policy = { "" = "may" }\n')
    result = _tlsfront("check", "-c", str(config))
    assert result.returncode == 0, result.stdout
    assert (
        f"ok: profile out: {credentials}:1: logs in to smart.example.net:587 as"
        " alice@example.net (PLAIN or LOGIN) only inside TLS verified for that host:"
        " TLS required, policy at least 'verify';"
        " route (default) -> smart.example.net:587 (tls_policy 'may' raised)"
    ) in result.stdout
    assert "secret" not in result.stdout


def test_login_counters_reach_the_metrics() -> None:
    from tlsfront.ops.metrics_endpoint import outbound_metrics

    reset()
    record_login("succeeded", "PLAIN")
    record_login("rejected", "LOGIN")
    record_login("rejected", "LOGIN")
    (family,) = [f for f in outbound_metrics() if f.name == "tlsfront_outbound_logins"]
    found = {(s.labels["result"], s.labels["mechanism"]): s.value for s in family.samples}
    assert found == {("succeeded", "PLAIN"): 1, ("rejected", "LOGIN"): 2}
    reset()
