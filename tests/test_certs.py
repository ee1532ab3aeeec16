"""tlsfront.tls.certs: loading credentials, CA bundles and CRLs; describing client certificates."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import stat
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.tls_certs import NOW, Issued, crl_pem, from_trustme, issue, make_crl

from tlsfront.tls.certs import (
    CertError,
    cert_expiry,
    fingerprint_sha256,
    load_ca_bundle,
    load_crls,
    load_server_credentials,
    make_self_signed,
    normalize_fingerprint,
    peer_certificate,
    sanitize,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server(ca: trustme.CA) -> Issued:
    return from_trustme(ca.issue_cert("mail.example"))


# -- server credentials ------------------------------------------------------


@pytest.mark.parametrize("key_first", [True, False])
def test_combined_servercert_pem_loads_in_either_order(
    tmp_path: Path, server: Issued, key_first: bool
) -> None:
    path = tmp_path / "servercert.pem"
    parts = [server.key_pem, server.cert_pem]
    path.write_bytes(b"".join(parts if key_first else parts[::-1]))
    creds = load_server_credentials(path, None)
    assert creds.chain == (server.cert,)
    assert creds.cert_path == creds.key_path == path
    assert isinstance(creds.key, ec.EllipticCurvePrivateKey)
    assert creds.key.private_numbers() == server.key.private_numbers()


def test_separate_files_with_chain_put_the_leaf_first(tmp_path: Path) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = from_trustme(intermediate.issue_cert("mail.example"))
    assert len(leaf.chain) == 1
    # Intermediate written before the leaf: the leaf is the one matching the key.
    cert_path = tmp_path / "fullchain.pem"
    cert_path.write_bytes(
        leaf.chain[0].public_bytes(serialization.Encoding.PEM)
        + leaf.cert.public_bytes(serialization.Encoding.PEM)
    )
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(leaf.key_pem)
    creds = load_server_credentials(cert_path, key_path)
    assert creds.chain == (leaf.cert, leaf.chain[0])
    assert creds.key_path == key_path


def test_pkcs8_key_loads(tmp_path: Path, server: Issued) -> None:
    path = tmp_path / "s.pem"
    pkcs8 = server.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(server.cert_pem + pkcs8)
    assert load_server_credentials(path, None).chain[0] == server.cert


def _expect_cert_error(path: Path, key: Path | None, words: str) -> CertError:
    with pytest.raises(CertError) as info:
        load_server_credentials(path, key)
    err = info.value
    assert words in err.message
    assert str(err) == f"{err.path}: {err.message}"
    return err


def test_missing_file(tmp_path: Path) -> None:
    err = _expect_cert_error(tmp_path / "nope.pem", None, "cannot read")
    assert err.path == tmp_path / "nope.pem"


def test_no_certificate(tmp_path: Path, server: Issued) -> None:
    path = tmp_path / "key-only.pem"
    path.write_bytes(server.key_pem)
    _expect_cert_error(path, None, "no certificate")


def test_garbage_is_not_a_certificate(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    _expect_cert_error(path, None, "certificate 1")


def test_no_key_in_combined_file_names_the_file(tmp_path: Path, server: Issued) -> None:
    path = tmp_path / "cert-only.pem"
    path.write_bytes(server.cert_pem)
    err = _expect_cert_error(path, None, "no private key")
    assert err.path == path


def test_no_key_in_key_file_names_the_key_file(tmp_path: Path, server: Issued) -> None:
    cert_path, _ = server.write(tmp_path, "s")
    other = tmp_path / "empty.key"
    other.write_bytes(b"")
    err = _expect_cert_error(cert_path, other, "no private key")
    assert err.path == other


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_encrypted_key_is_refused(
    tmp_path: Path, server: Issued, fmt: serialization.PrivateFormat
) -> None:
    path = tmp_path / "enc.pem"
    enc = server.key.private_bytes(
        serialization.Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"secret")
    )
    path.write_bytes(server.cert_pem + enc)
    _expect_cert_error(path, None, "encrypted")


def test_key_mismatch(tmp_path: Path, ca: trustme.CA, server: Issued) -> None:
    other = from_trustme(ca.issue_cert("other.example"))
    cert_path, _ = server.write(tmp_path, "s")
    _, other_key = other.write(tmp_path, "o")
    err = _expect_cert_error(cert_path, other_key, "does not match")
    assert err.path == other_key
    assert str(cert_path) in err.message
    combined = tmp_path / "mixed.pem"
    combined.write_bytes(server.cert_pem + other.key_pem)
    _expect_cert_error(combined, None, "does not match")


def test_two_keys_are_refused(tmp_path: Path, ca: trustme.CA, server: Issued) -> None:
    other = from_trustme(ca.issue_cert("other.example"))
    path = tmp_path / "two.pem"
    path.write_bytes(server.cert_pem + server.key_pem + other.key_pem)
    _expect_cert_error(path, None, "more than one private key")


# -- CA bundles and CRLs ---------------------------------------------------------


def test_ca_bundle_with_several_certificates(tmp_path: Path) -> None:
    cas = [trustme.CA() for _ in range(3)]
    path = tmp_path / "clientca.pem"
    path.write_bytes(b"# comment lines are fine\n" + b"".join(c.cert_pem.bytes() for c in cas))
    loaded = load_ca_bundle(path)
    assert [c.subject for c in loaded] == [
        x509.load_pem_x509_certificate(c.cert_pem.bytes()).subject for c in cas
    ]


@pytest.mark.parametrize("content", [b"", b"not a pem file\n", b"\x00\xff" * 100])
def test_empty_or_garbage_ca_bundle(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "clientca.pem"
    path.write_bytes(content)
    with pytest.raises(CertError, match="no certificate") as info:
        load_ca_bundle(path)
    assert info.value.path == path
    with pytest.raises(CertError, match="cannot read"):
        load_ca_bundle(tmp_path / "missing.pem")


def test_crls_several_in_one_file(tmp_path: Path) -> None:
    ca1, ca2 = trustme.CA(), trustme.CA()
    leaf = issue(ca1)
    path = tmp_path / "clientcrl.pem"
    path.write_bytes(crl_pem(make_crl(ca1, [leaf.cert]), make_crl(ca2)))
    crls = load_crls(path)
    assert len(crls) == 2
    assert crls[0].get_revoked_certificate_by_serial_number(leaf.cert.serial_number) is not None


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"],
)
def test_bad_crl_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "clientcrl.pem"
    path.write_bytes(content)
    with pytest.raises(CertError) as info:
        load_crls(path)
    assert info.value.path == path


# -- fingerprints --------------------------------------------------------------


def test_fingerprint_is_sha256_of_der_with_colons(server: Issued) -> None:
    der = server.cert.public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    fp = fingerprint_sha256(server.cert)
    assert fp.replace(":", "") == digest
    assert len(fp) == 95
    assert fp.count(":") == 31


def test_normalize_fingerprint_forms(server: Issued) -> None:
    fp = fingerprint_sha256(server.cert)
    assert normalize_fingerprint(fp) == fp
    assert normalize_fingerprint(fp.lower()) == fp
    assert normalize_fingerprint(fp.replace(":", "")) == fp
    assert normalize_fingerprint(f"  {fp.replace(':', '').lower()}\n") == fp


@pytest.mark.parametrize(
    "text", ["", "AB:CD", "G" * 64, "A" * 63, "A" * 65, "AB" * 31 + "A:B", "AB CD" + "0" * 60]
)
def test_normalize_fingerprint_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        normalize_fingerprint(text)


# -- peer certificates -----------------------------------------------------------


def test_peer_certificate_fields(ca: trustme.CA) -> None:
    leaf = issue(
        ca,
        common_name="Relay Client",
        subject_emails=["Postmaster@Example.ORG"],
        san_emails=["relay@example.net", "Postmaster@Example.ORG"],
        serial=0x0ABCDE,
        not_before=NOW - 2 * datetime.timedelta(days=1),
        not_after=NOW + datetime.timedelta(days=10),
    )
    peer = peer_certificate(leaf.cert)
    assert peer.common_name == "Relay Client"
    assert peer.emails == ("Postmaster@Example.ORG", "relay@example.net")
    assert peer.subject_dn == (
        "emailAddress=Postmaster@Example.ORG,CN=Relay Client,O=tlsfront tests"
    )
    assert peer.issuer_dn == leaf.cert.issuer.rfc4514_string()
    assert peer.serial == "0ABCDE"
    assert peer.fingerprint == fingerprint_sha256(leaf.cert)
    assert peer.not_before == leaf.cert.not_valid_before_utc
    assert peer.not_after == leaf.cert.not_valid_after_utc
    assert peer.not_after.tzinfo is not None
    assert x509.load_pem_x509_certificate(peer.pem.encode()) == leaf.cert
    assert peer.has_client_auth_usage


def test_peer_certificate_san_only_and_no_cn(ca: trustme.CA) -> None:
    leaf = issue(ca, common_name=None, san_emails=["only@san.example"])
    peer = peer_certificate(leaf.cert)
    assert peer.common_name is None
    assert peer.emails == ("only@san.example",)
    trustme_leaf = from_trustme(ca.issue_cert("user@example.com", "mx.example.com"))
    assert peer_certificate(trustme_leaf.cert).emails == ("user@example.com",)


def test_peer_certificate_hostile_cn_is_raw_and_sanitize_strips_it(ca: trustme.CA) -> None:
    evil = "x\r\nX-Evil: 1\x00\x7f\x85\u2028end"
    leaf = issue(ca, common_name=evil)
    peer = peer_certificate(leaf.cert)
    assert peer.common_name == evil
    assert sanitize(peer.common_name) == "xX-Evil: 1end"
    for field in (peer.subject_dn, peer.common_name):
        clean = sanitize(field)
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in clean)
        assert "\u2028" not in clean


def test_sanitize() -> None:
    assert sanitize("plain text, ünïcödé ok") == "plain text, ünïcödé ok"
    assert sanitize("a\tb\nc\rd\x1be\x7ff\x9fg\u200bh\ufeffi") == "abcdefghi"
    assert sanitize("x" * 300) == "x" * 256
    assert sanitize("y" * 20, limit=5) == "yyyyy"
    # Truncation happens after stripping, so hidden characters do not count.
    assert sanitize("\x00" * 10 + "abc", limit=3) == "abc"


@pytest.mark.parametrize(
    ("eku", "key_usage", "expected"),
    [
        ([ExtendedKeyUsageOID.CLIENT_AUTH], None, True),
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], None, True),
        ([ExtendedKeyUsageOID.SERVER_AUTH], None, False),
        ([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], None, True),
        (None, None, True),
        (None, "agreement", True),
        (None, "encipherment", False),
        ([ExtendedKeyUsageOID.CLIENT_AUTH], "encipherment", False),
    ],
)
def test_client_auth_usage(
    ca: trustme.CA,
    eku: list[x509.ObjectIdentifier] | None,
    key_usage: str | None,
    expected: bool,
) -> None:
    ku = None
    if key_usage is not None:
        ku = x509.KeyUsage(
            digital_signature=False,
            content_commitment=False,
            key_encipherment=key_usage == "encipherment",
            data_encipherment=False,
            key_agreement=key_usage == "agreement",
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
    leaf = issue(ca, eku=eku, key_usage=ku)
    assert peer_certificate(leaf.cert).has_client_auth_usage is expected


# -- self-signed default certificate ---------------------------------------------


def test_make_self_signed(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "state" / "cert.pem", tmp_path / "state" / "key.pem"
    make_self_signed("mail.example.org", cert_path, key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    creds = load_server_credentials(cert_path, key_path)
    cert = creds.chain[0]
    assert isinstance(creds.key, ec.EllipticCurvePrivateKey)
    assert creds.key.curve.name == "secp256r1"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ("mail.example.org")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=825) <= lifetime <= datetime.timedelta(days=826)
    assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.UTC)
    assert cert_expiry(cert_path) == cert.not_valid_after_utc
    # No temporary files left behind.
    assert sorted(p.name for p in cert_path.parent.iterdir()) == ["cert.pem", "key.pem"]


def test_make_self_signed_replaces_and_can_combine(tmp_path: Path) -> None:
    path = tmp_path / "servercert.pem"
    make_self_signed("localhost", path, path)
    first = load_server_credentials(path, None).chain[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    make_self_signed("localhost", path, path)
    second = load_server_credentials(path, None).chain[0]
    assert first != second
    san = second.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_cert_expiry_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.pem"
    path.write_bytes(b"nothing")
    with pytest.raises(CertError, match="no certificate"):
        cert_expiry(path)
