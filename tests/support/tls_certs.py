"""Certificates for the TLS tests, made with trustme and cryptography at test time.

trustme makes the everyday CA, server and client certificates; the odd ones
(expired, not yet valid, self-signed, subject emailAddress, hostile CN, a given
key usage) are signed here with cryptography, by a trustme CA's key. CRLs too.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...] = ()  # intermediates, if any

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM) + b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.chain
        )

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write NAME.crt (with chain) and NAME.key; return their paths."""
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        return cert_path, key_path

    def load_into(self, ctx: ssl.SSLContext, directory: Path, name: str) -> None:
        cert_path, key_path = self.write(directory, name)
        ctx.load_cert_chain(cert_path, key_path)


def ca_key(ca: trustme.CA) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return key


def ca_cert(ca: trustme.CA) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes())


def from_trustme(leaf: trustme.LeafCert) -> Issued:
    pems = [blob.bytes() for blob in leaf.cert_chain_pems]
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    certs = [x509.load_pem_x509_certificate(p) for p in pems]
    return Issued(certs[0], key, tuple(certs[1:]))


def _key_usage(digital_signature: bool, key_agreement: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def issue(
    ca: trustme.CA | None,
    *,
    common_name: str | None = "client.example",
    subject_emails: Sequence[str] = (),
    san_emails: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    key_usage: x509.KeyUsage | None = None,
    serial: int | None = None,
    rsa_key: bool = False,
) -> Issued:
    """A leaf certificate signed by `ca`, or self-signed when `ca` is None."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if rsa_key:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsfront tests")]
    if common_name is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    attrs += [x509.NameAttribute(NameOID.EMAIL_ADDRESS, e) for e in subject_emails]
    subject = x509.Name(attrs)
    if ca is None:
        issuer, sign_key = subject, key
    else:
        issuer, sign_key = ca_cert(ca).subject, ca_key(ca)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    sans: list[x509.GeneralName] = [x509.RFC822Name(e) for e in san_emails]
    sans += [x509.DNSName(d) for d in dns_names]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    builder = builder.add_extension(key_usage or _key_usage(True), critical=True)
    if ca is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key(ca).public_key()),
            critical=False,
        )
    return Issued(builder.sign(sign_key, hashes.SHA256()), key)


def make_crl(
    ca: trustme.CA,
    revoked: Sequence[x509.Certificate] = (),
    *,
    next_update: datetime.datetime | None = None,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert(ca).subject)
        .last_update(NOW - DAY)
        .next_update(next_update or NOW + 7 * DAY)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(NOW - DAY)
            .build()
        )
    return builder.sign(ca_key(ca), hashes.SHA256())


def crl_pem(*crls: x509.CertificateRevocationList) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)
