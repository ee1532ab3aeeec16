"""DANE-TLSA: records from a local DNS responder that sets (or not) the AD bit."""

from __future__ import annotations

import hashlib
import logging

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from support.outbound_fakes import (
    DnsResponder,
    FakeMx,
    listen_on_addresses,
    make_runtime,
    outbound_profile,
    relay_message,
    server_context,
)

from tlsfront.outbound.dane import TlsaRecord, check_chain, record_matches

RCPT = b"bob@example.test"
MX = "mx.example.test"


def spki_sha256(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def cert_sha256(pem: bytes) -> str:
    return hashlib.sha256(
        x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    ).hexdigest()


async def dane_setup(
    nursery: trio.Nursery, leaf: trustme.LeafCert, tlsa: list[str], *, secure: bool = True
) -> tuple[FakeMx, DnsResponder, dict[str, object], int]:
    mx = FakeMx(tls=server_context(leaf))
    port = await listen_on_addresses(nursery, [(mx, "127.0.0.2")])
    dns_ = DnsResponder(secure=secure)
    dns_.add("example.test", "MX", f"10 {MX}.")
    dns_.add(MX, "A", "127.0.0.2")
    if tlsa:
        dns_.add(f"_{port}._tcp.{MX}", "TLSA", *tlsa)
    keys: dict[str, object] = {"dane": True, "dns_servers": (await dns_.listen(nursery),)}
    return mx, dns_, keys, port


async def test_dane_ee_spki_match_delivers_verified(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    leaf = trustme.CA().issue_cert("unrelated.name")  # DANE-EE: no name, no CA check
    digest = spki_sha256(leaf.cert_chain_pems[0].bytes())
    mx, _, keys, port = await dane_setup(nursery, leaf, [f"3 1 1 {digest}"])
    with trio.fail_after(20), caplog.at_level(logging.INFO, "tlsfront.outbound"):
        result = await relay_message(outbound_profile(**keys), make_runtime(smtp_port=port), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert [m.tls for m in mx.messages] == ["TLSv1.3"]
    assert "verified=yes policy=dane" in caplog.text


async def test_dane_ee_full_certificate_match(nursery: trio.Nursery) -> None:
    leaf = trustme.CA().issue_cert(MX)
    digest = cert_sha256(leaf.cert_chain_pems[0].bytes())
    _mx, _, keys, port = await dane_setup(nursery, leaf, [f"3 0 1 {digest}"])
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(smtp_port=port), [RCPT])
    assert result.dot.startswith(b"250 ")


async def test_dane_mismatch_defers(nursery: trio.Nursery) -> None:
    leaf = trustme.CA().issue_cert(MX)
    other = trustme.CA().issue_cert(MX)
    digest = spki_sha256(other.cert_chain_pems[0].bytes())
    mx, _, keys, port = await dane_setup(nursery, leaf, [f"3 1 1 {digest}"])
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(smtp_port=port), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    assert b"no TLSA record matches" in result.rcpt[0]
    assert mx.messages == []


async def test_dane_without_starttls_defers(nursery: trio.Nursery) -> None:
    leaf = trustme.CA().issue_cert(MX)
    digest = spki_sha256(leaf.cert_chain_pems[0].bytes())
    mx, _, keys, port = await dane_setup(nursery, leaf, [f"3 1 1 {digest}"])
    mx.offer_starttls = False
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(smtp_port=port), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")


async def test_dane_ta_matches_the_intermediate(nursery: trio.Nursery) -> None:
    intermediate = trustme.CA().create_child_ca()
    leaf = intermediate.issue_cert(MX)
    digest = spki_sha256(intermediate.cert_pem.bytes())
    _mx, _, keys, port = await dane_setup(nursery, leaf, [f"2 1 1 {digest}"])
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(smtp_port=port), [RCPT])
    assert result.dot.startswith(b"250 ")


async def test_dane_ta_requires_the_host_name(nursery: trio.Nursery) -> None:
    intermediate = trustme.CA().create_child_ca()
    leaf = intermediate.issue_cert("elsewhere.test")
    digest = spki_sha256(intermediate.cert_pem.bytes())
    _mx, _, keys, port = await dane_setup(nursery, leaf, [f"2 1 1 {digest}"])
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(smtp_port=port), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")


async def test_unvalidated_answers_mean_no_dane(nursery: trio.Nursery) -> None:
    leaf = trustme.CA().issue_cert(MX)
    other = trustme.CA().issue_cert(MX)
    digest = spki_sha256(other.cert_chain_pems[0].bytes())
    _mx, _, keys, port = await dane_setup(nursery, leaf, [f"3 1 1 {digest}"], secure=False)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(smtp_port=port), [RCPT])
    assert result.dot.startswith(b"250 ")  # opportunistic TLS, records ignored


async def test_only_unusable_records_make_tls_mandatory(nursery: trio.Nursery) -> None:
    leaf = trustme.CA().issue_cert(MX)
    digest = spki_sha256(leaf.cert_chain_pems[0].bytes())
    mx, _, keys, port = await dane_setup(nursery, leaf, [f"1 1 1 {digest}"])
    mx.offer_starttls = False
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(smtp_port=port), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")


async def test_dane_off_by_default(nursery: trio.Nursery) -> None:
    leaf = trustme.CA().issue_cert(MX)
    other = trustme.CA().issue_cert(MX)
    digest = spki_sha256(other.cert_chain_pems[0].bytes())
    _mx, dns_, keys, port = await dane_setup(nursery, leaf, [f"3 1 1 {digest}"])
    keys["dane"] = False
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(smtp_port=port), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert not any(rdtype == "TLSA" for _, rdtype in dns_.queries)


def test_record_matching_by_selector_and_type() -> None:
    pem = trustme.CA().issue_cert(MX).cert_chain_pems[0].bytes()
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(Encoding.DER)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert record_matches(TlsaRecord(3, 0, 0, der), cert)
    assert record_matches(TlsaRecord(3, 1, 2, hashlib.sha512(spki).digest()), cert)
    assert not record_matches(TlsaRecord(3, 1, 1, hashlib.sha256(der).digest()), cert)
    assert check_chain([TlsaRecord(3, 1, 1, hashlib.sha256(spki).digest())], [der], [MX]) is None
    assert check_chain([TlsaRecord(3, 1, 1, b"x" * 32)], [der], [MX]) is not None
    assert check_chain([TlsaRecord(3, 1, 1, b"x" * 32)], [], [MX]) is not None
