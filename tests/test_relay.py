"""tlsfront.inbound.relaypolicy: who may relay, decided on TLSInfo objects (no sockets).

The TLSInfo values stand for what the TLS engine records (test_tls.py proves
it records them); the black-box matrix with real clients is in
test_relay_matrix.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from support.tls_certs import DAY, NOW, Issued, issue

import tlsfront.ops.watch
from tlsfront.inbound.relaypolicy import (
    RelayListError,
    RelayPolicy,
    read_fingerprints,
    read_relay_clients,
    unverified_reason,
)
from tlsfront.smtp.received import ClientCertTrace, TraceInfo, build_received
from tlsfront.tls.certs import fingerprint_sha256
from tlsfront.tls.stream import TLSInfo

LISTED = "alice@example.net"


def tls_info(leaf: Issued | None, verified: bool = True, error: str | None = None) -> TLSInfo:
    cert = leaf.cert if leaf is not None else None
    return TLSInfo(
        version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        bits=256,
        alg_bits=256,
        peer_cert=cert,
        peer_chain=(cert,) if cert is not None else (),
        verified=verified and cert is not None,
        verify_error=None if verified or cert is None else error,
        resumed=False,
        server_name=None,
    )


def replace(path: Path, text: str) -> None:
    """Write a new version of a file the way editors and deploy tools do."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def clients_file(tmp_path: Path) -> Path:
    path = tmp_path / "tlsclients"
    path.write_text(f"# who may relay\n\n{LISTED}\n  BOB@Example.NET  # trailing comment\n")
    return path


@pytest.fixture
def policy(clients_file: Path) -> RelayPolicy:
    p = RelayPolicy("smtp", clients_file, frozenset(), None)
    p.load()
    return p


@pytest.fixture(autouse=True)
def recheck_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Watched files are looked at on every decision (no wall-clock wait)."""
    monkeypatch.setattr(tlsfront.ops.watch, "RECHECK_SECONDS", 0)


# ---------------------------------------------------------------- the matrix


def test_no_tls_or_no_certificate_is_anonymous(policy: RelayPolicy, ca: trustme.CA) -> None:
    for info in (None, tls_info(None)):
        d = policy.decide(info)
        assert (d.relay, d.status, d.reason, d.cert) == (False, "Anonymous", None, None)
        assert dict(d.env) == {"SSL_CLIENT_VERIFY": "NONE"}
        assert d.trace is None


@pytest.mark.parametrize(
    ("subject", "san", "authorized_by"),
    [
        ([LISTED], [], LISTED),  # what the qmail patch reads
        ([], ["bob@example.net"], "bob@example.net"),  # what modern CAs issue
        (["Alice@EXAMPLE.net"], [], "Alice@EXAMPLE.net"),  # case-insensitive
        (["nobody@example.net"], ["Bob@example.net"], "Bob@example.net"),  # any listed one
    ],
)
def test_verified_and_listed_relays(
    policy: RelayPolicy, ca: trustme.CA, subject: list[str], san: list[str], authorized_by: str
) -> None:
    d = policy.decide(tls_info(issue(ca, subject_emails=subject, san_emails=san)))
    assert (d.relay, d.status, d.reason, d.address) == (True, "Verified", None, authorized_by)
    assert d.env["SSL_CLIENT_VERIFY"] == "SUCCESS"
    assert d.trace == ClientCertTrace("client.example", d.issuer_cn, verified=True)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            "unable to get local issuer certificate",
            "not signed by client_ca (unable to get local issuer certificate)",
        ),
        ("self-signed certificate", "not signed by client_ca (self-signed certificate)"),
        ("certificate has expired", "expired"),
        ("certificate is not yet valid", "not yet valid"),
        ("certificate revoked", "revoked"),
        ("unsupported certificate purpose", "unsupported certificate purpose"),
        ("CRL has expired", "CRL has expired"),
        (None, "not verified"),
    ],
)
def test_listed_address_without_verification_never_relays(
    policy: RelayPolicy, ca: trustme.CA, error: str | None, reason: str
) -> None:
    d = policy.decide(tls_info(issue(ca, subject_emails=[LISTED]), verified=False, error=error))
    assert (d.relay, d.status, d.reason, d.address) == (False, "Untrusted", reason, None)
    assert d.env["SSL_CLIENT_VERIFY"] == f"FAILED:{error or 'not verified'}"
    assert d.trace is not None
    assert not d.trace.verified
    assert "not verified" in d.trace.comment()


def test_verified_but_not_listed(policy: RelayPolicy, ca: trustme.CA) -> None:
    d = policy.decide(tls_info(issue(ca, subject_emails=["mallory@example.net"])))
    assert (d.relay, d.status) == (False, "Trusted")
    assert d.reason == "address not listed: mallory@example.net"
    assert "(verified OK)" in d.trace.comment() if d.trace else False


def test_verified_without_any_address(policy: RelayPolicy, ca: trustme.CA) -> None:
    d = policy.decide(tls_info(issue(ca)))
    assert (d.relay, d.status, d.reason) == (False, "Trusted", "no address in certificate")


def test_key_usage_unfit_for_a_client(policy: RelayPolicy, ca: trustme.CA) -> None:
    """OpenSSL flags these itself; the rule does not depend on it."""
    leaf = issue(ca, subject_emails=[LISTED], eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    d = policy.decide(tls_info(leaf))
    assert (d.relay, d.reason) == (False, "key usage does not allow client authentication")


def test_resumed_session_never_relays(ca: trustme.CA) -> None:
    leaf = issue(ca, subject_emails=[LISTED])
    p = fingerprint_policy(leaf)
    info = dataclasses.replace(tls_info(leaf), resumed=True)
    d = p.decide(info)
    assert (d.relay, d.reason) == (False, "resumed session")


def test_no_list_at_all_relays_nobody(ca: trustme.CA) -> None:
    p = RelayPolicy("smtp", None, frozenset(), None)
    p.load()
    d = p.decide(tls_info(issue(ca, subject_emails=[LISTED])))
    assert (d.relay, d.status) == (False, "Trusted")


def test_address_with_a_hidden_suffix_does_not_match(policy: RelayPolicy, ca: trustme.CA) -> None:
    for trick in (LISTED + "\x00.evil.example", LISTED + " ", " " + LISTED, LISTED + ".evil"):
        d = policy.decide(tls_info(issue(ca, san_emails=[trick])))
        assert not d.relay, trick
        assert d.reason is not None
        assert "\x00" not in d.reason


# ------------------------------------------------------------- fingerprints


def fingerprint_policy(*leaves: Issued, lower: bool = False) -> RelayPolicy:
    prints = [fingerprint_sha256(leaf.cert) for leaf in leaves]
    if lower:
        prints = [p.lower().replace(":", "") for p in prints]
    p = RelayPolicy("smtp", None, frozenset(prints), None)
    p.load()
    return p


@pytest.mark.parametrize("lower", [False, True])
def test_listed_fingerprint_relays_a_self_signed_certificate(lower: bool) -> None:
    leaf = issue(None, common_name="mx.partner.example")
    d = fingerprint_policy(leaf, lower=lower).decide(
        tls_info(leaf, verified=False, error="self-signed certificate")
    )
    assert (d.relay, d.status, d.address) == (True, "Verified", fingerprint_sha256(leaf.cert))
    # the trace tells the truth about the chain: pinned, not verified
    assert d.trace == ClientCertTrace("mx.partner.example", "mx.partner.example", verified=False)
    assert d.env["SSL_CLIENT_VERIFY"] == "FAILED:self-signed certificate"


def test_fingerprint_of_another_certificate_does_not_relay() -> None:
    listed, shown = issue(None), issue(None)
    d = fingerprint_policy(listed).decide(tls_info(shown, False, "self-signed certificate"))
    assert not d.relay
    assert d.reason == "not signed by client_ca (self-signed certificate)"


@pytest.mark.parametrize(
    ("leaf_kw", "error", "reason"),
    [
        (
            {"not_before": NOW - 30 * DAY, "not_after": NOW - DAY},
            "certificate has expired",
            "listed fingerprint, but expired",
        ),
        (
            {"not_before": NOW + DAY, "not_after": NOW + 30 * DAY},
            "certificate is not yet valid",
            "listed fingerprint, but not yet valid",
        ),
        ({}, "certificate revoked", "listed fingerprint, but revoked"),
    ],
)
def test_listed_fingerprint_out_of_date_or_revoked(
    ca: trustme.CA, leaf_kw: dict[str, datetime.datetime], error: str, reason: str
) -> None:
    leaf = issue(ca, **leaf_kw)  # type: ignore[arg-type]
    d = fingerprint_policy(leaf).decide(tls_info(leaf, verified=False, error=error))
    assert (d.relay, d.reason) == (False, reason)


def test_fingerprints_file_is_watched(tmp_path: Path) -> None:
    first, second = issue(None), issue(None)
    path = tmp_path / "relay_clientcerts"
    path.write_text(f"{fingerprint_sha256(first.cert)} mx1.partner.example\n")
    p = RelayPolicy("smtp", None, frozenset(), path)
    p.load()
    info1, info2 = (tls_info(x, False, "self-signed certificate") for x in (first, second))
    assert (p.decide(info1).relay, p.decide(info2).relay) == (True, False)
    replace(path, f"# swapped\n{fingerprint_sha256(second.cert).replace(':', '').lower()}\n")
    assert (p.decide(info1).relay, p.decide(info2).relay) == (False, True)


# --------------------------------------------------------- the environment

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def test_environment_values(policy: RelayPolicy, ca: trustme.CA) -> None:
    leaf = issue(ca, common_name="alice", subject_emails=[LISTED], san_emails=["a2@example.net"])
    env = dict(policy.decide(tls_info(leaf)).env)
    cert = leaf.cert
    assert env["SSL_CLIENT_S_DN"] == "emailAddress=alice@example.net,CN=alice,O=tlsfront tests"
    assert env["SSL_CLIENT_I_DN"] == cert.issuer.rfc4514_string()
    assert int(env["SSL_CLIENT_M_SERIAL"], 16) == cert.serial_number
    assert env["SSL_CLIENT_S_DN_CN"] == "alice"
    assert env["SSL_CLIENT_S_DN_Email"] == LISTED
    assert env["SSL_CLIENT_SAN_Email_0"] == "a2@example.net"
    for key, when in (("V_START", cert.not_valid_before_utc), ("V_END", cert.not_valid_after_utc)):
        value = env[f"SSL_CLIENT_{key}"]
        assert re.fullmatch(r"[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d \d{4} GMT", value), value
        parsed = datetime.datetime.strptime(value, "%b %d %H:%M:%S %Y GMT")
        assert parsed.replace(tzinfo=datetime.UTC) == when
    assert x509.load_pem_x509_certificate(env["SSL_CLIENT_CERT"].encode()) == cert
    assert env["SSL_CLIENT_FINGERPRINT"] == fingerprint_sha256(cert)
    assert env["SSL_CLIENT_VERIFY"] == "SUCCESS"


def test_san_only_address_is_not_a_subject_email(policy: RelayPolicy, ca: trustme.CA) -> None:
    env = policy.decide(tls_info(issue(ca, san_emails=[LISTED]))).env
    assert "SSL_CLIENT_S_DN_Email" not in env
    assert env["SSL_CLIENT_SAN_Email_0"] == LISTED


def test_hostile_names_reach_no_environment_or_header(policy: RelayPolicy, ca: trustme.CA) -> None:
    """threat `bare-cr-lf-nul`: a CN with CR/LF, NUL, U+2028; an address with CR/LF."""
    evil = "x\r\nX-Evil: 1\x00\u2028y"
    leaf = issue(ca, common_name=evil, subject_emails=["a@b\r\nX-Evil: 2"], san_emails=[LISTED])
    d = policy.decide(tls_info(leaf))
    assert d.relay
    assert d.address == LISTED
    for key, value in d.env.items():
        if key == "SSL_CLIENT_CERT":  # PEM: base64 lines, our own
            assert CONTROL.sub("", value.replace("\n", "")) == value.replace("\n", "")
            continue
        assert not CONTROL.search(value), (key, value)
    assert d.env["SSL_CLIENT_S_DN_CN"] == "xX-Evil: 1y"
    assert d.trace is not None
    trace = TraceInfo(
        hostname="front.example.org",
        client_ip="192.0.2.1",
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        tls_bits=256,
        tls_alg_bits=256,
        client_cert=d.trace,
        relay_cert=d.address,
    )
    header = build_received(trace, "client.example", True, datetime.datetime.now(datetime.UTC))
    lines = header.split(b"\r\n")
    assert lines[-1] == b""
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert b"\n" not in header.replace(b"\r\n", b"")
    assert b"\r" not in header.replace(b"\r\n", b"")
    assert not any(line.lstrip().startswith(b"X-Evil") for line in lines)


def test_unverified_reason_words() -> None:
    assert unverified_reason("certificate revoked") == "revoked"
    assert unverified_reason("invalid CA certificate").startswith("not signed by client_ca")


# ------------------------------------------------------------ the trace


def test_received_comment_postfix_style() -> None:
    trace = TraceInfo(
        hostname="front.example.org",
        client_ip="192.0.2.1",
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        tls_bits=256,
        tls_alg_bits=256,
        client_cert=ClientCertTrace('al"ice (x)', "Example CA", verified=True),
        relay_cert="alice@example.net",
    )
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    assert build_received(trace, "client.example", True, when) == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby front.example.org (tlsfront) with ESMTPS\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
        b'\t(Client CN "al?ice ?x?", Issuer "Example CA" (verified OK))\r\n'
        b"\t(cert alice@example.net);\r\n"
        b"\tFri, 02 Jan 2026 03:04:05 +0000\r\n"
    )


# ------------------------------------------------------------ the list files


def test_tlsclients_file(clients_file: Path) -> None:
    assert read_relay_clients(clients_file) == {LISTED, "bob@example.net"}


@pytest.mark.parametrize("bad", ["not-an-address", "two words@example.net", "a@b\x0bc"])
def test_tlsclients_bad_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "tlsclients"
    path.write_text(f"{LISTED}\n\n{bad}\n")
    with pytest.raises(RelayListError, match=rf"^{re.escape(str(path))}:3: not an e-mail"):
        read_relay_clients(path)
    # re-read while running: the bad line is skipped, the rest stands
    assert read_relay_clients(path, strict=False) == {LISTED}


def test_fingerprints_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "fps"
    path.write_text("# pinned\nAB:CD\n")
    with pytest.raises(RelayListError, match=r":2: not a SHA-256 fingerprint"):
        read_fingerprints(path)
    assert read_fingerprints(path, strict=False) == frozenset()


def test_missing_list_is_an_error_at_start(tmp_path: Path) -> None:
    for policy in (
        RelayPolicy("smtp", tmp_path / "nope", frozenset(), None),
        RelayPolicy("smtp", None, frozenset(), tmp_path / "nope"),
    ):
        with pytest.raises(FileNotFoundError):
            policy.load()


# ------------------------------------------------- changes without restart


def test_changed_tlsclients_take_effect(
    policy: RelayPolicy, clients_file: Path, ca: trustme.CA
) -> None:
    carol = tls_info(issue(ca, subject_emails=["carol@example.net"]))
    alice = tls_info(issue(ca, subject_emails=[LISTED]))
    assert (policy.decide(carol).relay, policy.decide(alice).relay) == (False, True)
    replace(clients_file, "Carol@example.net\n")
    assert (policy.decide(carol).relay, policy.decide(alice).relay) == (True, False)


def test_removed_tlsclients_relays_nobody(
    policy: RelayPolicy, clients_file: Path, ca: trustme.CA
) -> None:
    alice = tls_info(issue(ca, subject_emails=[LISTED]))
    assert policy.decide(alice).relay
    clients_file.unlink()
    assert not policy.decide(alice).relay
    clients_file.write_text(LISTED + "\n")
    assert policy.decide(alice).relay


def test_edit_with_a_mistake_still_removes_addresses(
    policy: RelayPolicy, clients_file: Path, ca: trustme.CA
) -> None:
    """A typo elsewhere in the file must not keep the address the admin removed."""
    alice = tls_info(issue(ca, subject_emails=[LISTED]))
    bob = tls_info(issue(ca, subject_emails=["bob@example.net"]))
    replace(clients_file, "bob@example.net\nthis is a typo\n")
    assert (policy.decide(alice).relay, policy.decide(bob).relay) == (False, True)


def test_lists_are_not_reread_within_the_recheck_interval(
    policy: RelayPolicy, clients_file: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsfront.ops.watch, "RECHECK_SECONDS", 3600)
    carol = tls_info(issue(ca, subject_emails=["carol@example.net"]))
    assert not policy.decide(carol).relay
    replace(clients_file, "carol@example.net\n")
    assert not policy.decide(carol).relay  # the cached list, no stat() per session
