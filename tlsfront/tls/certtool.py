"""`tlsfront cert`: a test CA, server and client certificates, for trying it out.

    tlsfront cert ca --dir DIR                         DIR/ca.pem, DIR/ca.key
    tlsfront cert server --dir DIR --name mx.example.org
                                                       DIR/server.pem (key + chain, qmail style)
    tlsfront cert client --dir DIR --email user@example.org
                                                       DIR/client-user@example.org.pem (key + cert)

The client certificate carries the address both as subject emailAddress (what
the qmail-tls patch reads) and as a SAN rfc822Name (what modern CAs issue).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _builder(
    subject: x509.Name, issuer: x509.Name, public: Any, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def make_ca(directory: Path, name: str = "tlsfront test CA") -> None:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, subject, key.public_key(), 3650)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(directory / "ca.key", _pem_key(key), private=True)
    _write(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


def _load_ca(directory: Path) -> tuple[x509.Certificate, Any]:
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    return cert, key


def _issue(
    directory: Path,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
) -> bytes:
    ca_cert, ca_key = _load_ca(directory)
    key = _key()
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return _pem_key(key) + cert.public_bytes(pem) + ca_cert.public_bytes(pem)


def make_server(directory: Path, name: str, days: int = 397) -> Path:
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    if name == "localhost":
        sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    path = directory / "server.pem"
    _write(path, _issue(directory, subject, sans, ExtendedKeyUsageOID.SERVER_AUTH, days), True)
    return path


def make_client(directory: Path, email: str, days: int = 397) -> Path:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, email.split("@", 1)[0]),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, email),
        ]
    )
    path = directory / f"client-{email}.pem"
    pem = _issue(
        directory, subject, [x509.RFC822Name(email)], ExtendedKeyUsageOID.CLIENT_AUTH, days
    )
    _write(path, pem, True)
    return path


def add_cert_parser(sub: Any) -> None:
    p = sub.add_parser("cert", help="make a test CA, server and client certificates")
    p.add_argument("kind", choices=["ca", "server", "client"])
    p.add_argument("--dir", default=".", help="where the CA lives and files go (default: .)")
    p.add_argument("--name", default="localhost", help="server host name (server)")
    p.add_argument("--email", help="the client's e-mail address (client)")
    p.add_argument("--days", type=int, default=397, help="validity (server, client)")
    p.set_defaults(func=lambda args: run_cert(args))


def run_cert(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if args.kind == "ca":
        make_ca(directory)
        print(directory / "ca.pem")
        return 0
    if not (directory / "ca.pem").exists():
        print(f"no CA in {directory}: run `tlsfront cert ca --dir {directory}` first")
        return 1
    if args.kind == "server":
        print(make_server(directory, args.name, args.days))
        return 0
    if not args.email or "@" not in args.email:
        print("a client certificate needs --email user@domain")
        return 1
    print(make_client(directory, args.email, args.days))
    return 0
