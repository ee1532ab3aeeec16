"""The outbound TLS policy decision, host-name matching, routes and control files."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tlsfront.net.address import parse_hostport
from tlsfront.net.dns import parse_server
from tlsfront.outbound.control import ControlDirs, host_facts
from tlsfront.outbound.dane import TlsaRecord
from tlsfront.outbound.mtasts import StsPolicy
from tlsfront.outbound.mx import lookup_route
from tlsfront.outbound.policy import HostFacts, TlsAttempt, Trust, decide, table_level
from tlsfront.tls.client import host_matches

PEM = Path("/control/tlshosts/mx.example.test.pem")
TLSA = (TlsaRecord(3, 1, 1, b"\0" * 32),)
ENFORCE = StsPolicy("enforce", ("*.example.test",), 86400)
TESTING = StsPolicy("testing", ("other.test",), 86400)


def test_table_lookup_postfix_style() -> None:
    table = {"example.test": "verify", ".example.test": "encrypt", "": "may"}
    assert table_level(table, "Example.Test.") == "verify"
    assert table_level(table, "a.b.example.test") == "encrypt"
    assert table_level(table, "example.org") == "may"
    assert table_level({"example.test": "none"}, "sub.example.test") is None


@pytest.mark.parametrize(
    ("table", "facts", "sts", "source", "level"),
    [
        # tls_policy beats everything
        ({"example.test": "none"}, HostFacts(pem=PEM), ENFORCE, "tls_policy", "none"),
        ({"example.test": "may"}, HostFacts(tlsa=TLSA), None, "tls_policy", "may"),
        # then tlshosts/<host>.pem, notlshosts, exhaustivelist
        ({}, HostFacts(pem=PEM, notls=True, exhaustive=True), None, "tlshosts", "verify"),
        ({}, HostFacts(notls=True, tlsa=TLSA), ENFORCE, "notlshosts", "none"),
        ({}, HostFacts(exhaustive=True, tlsa=TLSA), ENFORCE, "exhaustivelist", "none"),
        # then DANE, then MTA-STS, then opportunistic
        ({}, HostFacts(tlsa=TLSA), ENFORCE, "dane", "dane"),
        ({}, HostFacts(tlsa_unusable=True), ENFORCE, "dane", "encrypt"),
        ({}, HostFacts(), ENFORCE, "mta-sts", "verify"),
        ({}, HostFacts(), TESTING, "mta-sts-testing", "may"),
        ({}, HostFacts(), StsPolicy("none", (), 1), "default", "may"),
        ({}, HostFacts(), None, "default", "may"),
    ],
)
def test_precedence(
    table: dict[str, str], facts: HostFacts, sts: StsPolicy | None, source: str, level: str
) -> None:
    decision = decide("example.test", "mx.example.test", table, facts, sts)
    assert (decision.source, decision.level) == (source, level)


def test_attempts() -> None:
    may = decide("example.test", "mx.example.test", {}, HostFacts())
    assert may.attempts == (TlsAttempt(Trust.NONE, required=False), None)
    pem = decide("example.test", "mx.example.test", {}, HostFacts(pem=PEM))
    assert pem.attempts == (TlsAttempt(Trust.PEM, required=True),)
    assert (pem.cafile, pem.names) == (PEM, ("mx.example.test",))
    verify = decide("example.test", "mx.example.test", {"example.test": "verify"}, HostFacts())
    assert verify.attempts == (TlsAttempt(Trust.WEBPKI, required=True),)
    encrypt = decide("example.test", "mx.example.test", {"example.test": "encrypt"}, HostFacts())
    assert encrypt.attempts == (TlsAttempt(Trust.NONE, required=True),)
    dane = decide("example.test", "mx.example.test", {}, HostFacts(tlsa=TLSA))
    assert dane.names == ("mx.example.test", "example.test")
    testing = decide("example.test", "mx.example.test", {}, HostFacts(), TESTING)
    assert testing.attempts[0] == TlsAttempt(Trust.WEBPKI, required=False, audit=True)
    assert testing.notes == ("MX host not in the MTA-STS policy",)


def test_refusals() -> None:
    other = decide("example.test", "mx.elsewhere.test", {}, HostFacts(), ENFORCE)
    assert other.refuse == "MX host not in the MTA-STS policy"
    broken = decide("example.test", "mx.example.test", {}, HostFacts(tlsa_error="SERVFAIL"))
    assert broken.refuse == "SERVFAIL"


def cert(cn: str | None, dns: list[str], ips: tuple[str, ...] = ()) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_host_name_matching() -> None:
    san = cert("cn.example.test", ["mx.example.test", "*.wild.example.test"])
    assert host_matches(san, "MX.example.test.")
    assert host_matches(san, "a.wild.example.test")
    assert not host_matches(san, "a.b.wild.example.test")  # one label only
    assert not host_matches(san, "wild.example.test")
    assert not host_matches(san, "cn.example.test")  # CN ignored when there is a DNS SAN
    only_cn = cert("cn.example.test", [])
    assert host_matches(only_cn, "cn.example.test")
    assert not host_matches(only_cn, "other.example.test")
    assert not host_matches(cert("*.test", ["*.test"]), "x.test")  # no wildcard over a TLD
    assert not host_matches(cert(None, ["m*.example.test"]), "mx.example.test")
    by_ip = cert(None, ["mx.example.test"], ("127.0.0.1",))
    assert host_matches(by_ip, "127.0.0.1")
    assert not host_matches(by_ip, "127.0.0.2")


def test_routes_like_smtproutes() -> None:
    routes = {"example.test": "a:2525", ".example.test": "b", "": "c", "mx.test": ""}
    assert lookup_route(routes, "example.test") == "a:2525"
    assert lookup_route(routes, "x.y.example.test") == "b"
    assert lookup_route(routes, "example.org") == "c"
    assert lookup_route(routes, "mx.test") == ""  # empty: use MX records
    assert lookup_route({}, "example.org") is None
    assert parse_hostport("mx.test", 25) == ("mx.test", 25)
    assert parse_hostport("mx.test:2525", 25) == ("mx.test", 2525)
    assert parse_hostport("[::1]:2525", 25) == ("::1", 2525)
    assert parse_hostport("[192.0.2.1]", 25) == ("192.0.2.1", 25)
    assert parse_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_server("::1") == ("::1", 53)
    assert parse_server("[::1]:5353") == ("::1", 5353)


def test_control_files(tmp_path: Path) -> None:
    tlshosts, notlshosts = tmp_path / "tlshosts", tmp_path / "notlshosts"
    tlshosts.mkdir()
    notlshosts.mkdir()
    (tlshosts / "mx.example.test.pem").write_text("pem")
    (notlshosts / "plain.example.test").write_text("")
    (notlshosts / "nodomain.test").write_text("")
    dirs = ControlDirs(tlshosts, notlshosts, None)
    assert host_facts(dirs, "MX.example.test.", "example.test").pem == (
        tlshosts / "mx.example.test.pem"
    )
    assert host_facts(dirs, "plain.example.test", "example.test").notls
    assert host_facts(dirs, "mx.nodomain.test", "nodomain.test").notls
    assert host_facts(dirs, "../tlshosts/mx.example.test", "x.test") == HostFacts()
    assert not host_facts(dirs, "other.test", "other.test").exhaustive
    (tlshosts / "exhaustivelist").write_text("")
    assert host_facts(dirs, "other.test", "other.test").exhaustive
    assert host_facts(ControlDirs(None, None, None), "mx.example.test", "x") == HostFacts()
