"""Certificates, keys, CA bundles and CRLs: loading, checking, describing.

Pure `cryptography`; no I/O beyond reading and writing the named files. Every
loading error is a `CertError` that names the file, so `tlsfront check` and the
start-up code can print it as is.

`PeerCertificate` describes a client certificate with raw values taken from the
certificate; anything that goes into an environment variable or a header must
pass through `sanitize` first.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertError",
    "PeerCertificate",
    "ServerCredentials",
    "cert_expiry",
    "fingerprint_sha256",
    "load_ca_bundle",
    "load_crls",
    "load_server_credentials",
    "make_self_signed",
    "normalize_fingerprint",
    "peer_certificate",
    "sanitize",
    "stale_crls",
]


class CertError(Exception):
    """A certificate, key, CA or CRL file that cannot be used."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)
        self.message = message


@dataclass(frozen=True)
class ServerCredentials:
    cert_path: Path
    key_path: Path
    chain: tuple[x509.Certificate, ...]  # leaf first
    key: PrivateKeyTypes


# Key types OpenSSL can use for a TLS server certificate.
_SERVER_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"ENCRYPTED PRIVATE KEY"}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertError(path, f"cannot read: {exc.strerror or exc}") from None


def _pem_blocks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(label, whole PEM block) for every block in `data`, in file order."""
    for match in _PEM_BLOCK.finditer(data):
        yield match.group(1), match.group(0)


def _parse_certs(path: Path, data: bytes) -> list[x509.Certificate]:
    certs = []
    for label, block in _pem_blocks(data):
        if label in (b"CERTIFICATE", b"X509 CERTIFICATE"):
            try:
                certs.append(x509.load_pem_x509_certificate(block))
            except ValueError as exc:
                raise CertError(path, f"certificate {len(certs) + 1}: {exc}") from None
        elif label == b"TRUSTED CERTIFICATE":
            raise CertError(path, "OpenSSL 'TRUSTED CERTIFICATE' blocks are not supported")
    return certs


def _parse_keys(path: Path, data: bytes) -> list[PrivateKeyTypes]:
    keys = []
    for label, block in _pem_blocks(data):
        if label not in _KEY_LABELS:
            continue
        if label == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in block:
            raise CertError(path, "private key is encrypted (a server key must be unencrypted)")
        try:
            keys.append(serialization.load_pem_private_key(block, password=None))
        except TypeError:
            raise CertError(path, "private key is encrypted") from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise CertError(path, f"cannot parse private key: {exc}") from None
    return keys


def _spki_of_key(key: PrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_server_credentials(cert_path: Path, key_path: Path | None) -> ServerCredentials:
    """Load a certificate (with its chain) and its private key.

    With `key_path` None the key must be in the certificate file, as in qmail's
    `control/servercert.pem` (key and certificates in either order). The leaf is
    the certificate that matches the key; the others follow in file order.
    """
    cert_data = _read(cert_path)
    certs = _parse_certs(cert_path, cert_data)
    if not certs:
        raise CertError(cert_path, "no certificate found (expected PEM 'BEGIN CERTIFICATE')")
    source = cert_path if key_path is None else key_path
    key_data = cert_data if key_path is None else _read(key_path)
    keys = _parse_keys(source, key_data)
    if not keys:
        hint = "" if key_path is not None else " (set 'key' or put the key in this file)"
        raise CertError(source, f"no private key found{hint}")
    if len(keys) > 1:
        raise CertError(source, "more than one private key")
    key = keys[0]
    if not isinstance(key, _SERVER_KEY_TYPES):
        raise CertError(source, f"unsupported key type {type(key).__name__}")
    want = _spki_of_key(key)
    leaf_index = next((i for i, c in enumerate(certs) if _spki_of_cert(c) == want), None)
    if leaf_index is None:
        where = "" if key_path is None else f" in {cert_path}"
        raise CertError(source, f"private key does not match the certificate{where}")
    chain = (certs[leaf_index], *certs[:leaf_index], *certs[leaf_index + 1 :])
    return ServerCredentials(
        cert_path=cert_path,
        key_path=key_path if key_path is not None else cert_path,
        chain=chain,
        key=key,
    )


def _spki_of_cert(cert: x509.Certificate) -> bytes:
    try:
        return cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, UnsupportedAlgorithm):
        return b""


def load_ca_bundle(path: Path) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (e.g. qmail's `control/clientca.pem`)."""
    certs = _parse_certs(path, _read(path))
    if not certs:
        raise CertError(path, "no certificate found (expected PEM 'BEGIN CERTIFICATE')")
    return certs


def load_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file (e.g. qmail's `control/clientcrl.pem`)."""
    crls = []
    for label, block in _pem_blocks(_read(path)):
        if label == b"X509 CRL":
            try:
                crls.append(x509.load_pem_x509_crl(block))
            except ValueError as exc:
                raise CertError(path, f"CRL {len(crls) + 1}: {exc}") from None
    if not crls:
        raise CertError(path, "no CRL found (expected PEM 'BEGIN X509 CRL')")
    return crls


def stale_crls(crls: Sequence[x509.CertificateRevocationList], now: datetime.datetime) -> list[str]:
    """Why each CRL OpenSSL would refuse is unusable (past nextUpdate, not yet valid).

    With CRL checking on, a certificate whose issuer's CRL is stale does
    not verify: one stale CRL refuses every certificate of that CA.
    """
    problems = []
    for n, crl in enumerate(crls, 1):
        issuer = crl.issuer.rfc4514_string()
        last = crl.last_update_utc
        if last > now:
            problems.append(
                f"CRL {n} (issuer {issuer}) is not valid before {last:%Y-%m-%d %H:%M} UTC"
            )
        following = crl.next_update_utc
        if following is not None and following < now:
            problems.append(
                f"CRL {n} (issuer {issuer}) is past its nextUpdate ({following:%Y-%m-%d %H:%M}"
                " UTC): OpenSSL refuses every client certificate of that CA until a fresh CRL"
                " is installed"
            )
    return problems


def cert_expiry(path: Path) -> datetime.datetime:
    """notAfter of the first certificate in a PEM file (aware, UTC)."""
    certs = _parse_certs(path, _read(path))
    if not certs:
        raise CertError(path, "no certificate found")
    return certs[0].not_valid_after_utc


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as 'AB:CD:...' (Postfix relay_clientcerts form)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}")


def normalize_fingerprint(text: str) -> str:
    """'ab:cd:..' / 'ABCD..' -> 'AB:CD:..'; ValueError unless 32 hex pairs."""
    text = text.strip()
    if not _FINGERPRINT.fullmatch(text):
        raise ValueError(f"not a SHA-256 fingerprint (64 hex digits): {text!r}")
    return bytes.fromhex(text.replace(":", "")).hex(":").upper()


# ----------------------------------------------------------------------------
# Describing a peer certificate


@dataclass(frozen=True)
class PeerCertificate:
    subject_dn: str  # RFC 4514, as mod_ssl's SSL_CLIENT_S_DN
    issuer_dn: str
    serial: str  # upper-case hex, even number of digits
    common_name: str | None
    emails: tuple[str, ...]  # subject emailAddress first, then SAN rfc822Name
    not_before: datetime.datetime
    not_after: datetime.datetime
    fingerprint: str
    pem: str
    has_client_auth_usage: bool


_DN_NAMES = {NameOID.EMAIL_ADDRESS: "emailAddress"}


def _dn(get_name: Callable[[], x509.Name]) -> str:
    try:
        return get_name().rfc4514_string(_DN_NAMES)
    except ValueError:  # a name cryptography parses lazily and rejects
        return ""


def _attr_strings(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    out = []
    for attr in name.get_attributes_for_oid(oid):
        value = attr.value
        out.append(value if isinstance(value, str) else value.decode("latin-1"))
    return out


def _serial_hex(serial: int) -> str:
    digits = f"{abs(serial):X}"
    if len(digits) % 2:
        digits = "0" + digits
    return ("-" if serial < 0 else "") + digits


def _extension(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> object | None:
    """The value of an extension, None when absent. ValueError when malformed."""
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _has_client_auth_usage(cert: x509.Certificate) -> bool:
    try:
        eku = _extension(cert, x509.ExtendedKeyUsage)
        ku = _extension(cert, x509.KeyUsage)
    except ValueError:
        return False
    if isinstance(eku, x509.ExtendedKeyUsage):
        allowed = {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
        if not allowed.intersection(eku):
            return False
    return not (isinstance(ku, x509.KeyUsage) and not (ku.digital_signature or ku.key_agreement))


def peer_certificate(cert: x509.Certificate) -> PeerCertificate:
    """Describe a (client) certificate. Never raises on odd but parseable certificates."""
    try:
        subject: x509.Name | None = cert.subject
    except ValueError:
        subject = None
    emails: list[str] = []
    common_name = None
    if subject is not None:
        emails.extend(_attr_strings(subject, NameOID.EMAIL_ADDRESS))
        cns = _attr_strings(subject, NameOID.COMMON_NAME)
        common_name = cns[0] if cns else None
    try:
        san = _extension(cert, x509.SubjectAlternativeName)
    except ValueError:
        san = None
    if isinstance(san, x509.SubjectAlternativeName):
        emails.extend(san.get_values_for_type(x509.RFC822Name))
    return PeerCertificate(
        subject_dn=_dn(lambda: cert.subject),
        issuer_dn=_dn(lambda: cert.issuer),
        serial=_serial_hex(cert.serial_number),
        common_name=common_name,
        emails=tuple(dict.fromkeys(emails)),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=fingerprint_sha256(cert),
        pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        has_client_auth_usage=_has_client_auth_usage(cert),
    )


def sanitize(text: str, limit: int = 256) -> str:
    """Keep only printable characters (no C0, DEL, C1, line or format controls)."""
    # str.isprintable() is False for C0, DEL, C1, format characters (Cf) and
    # every separator but the ASCII space (U+2028 and friends).
    return "".join(ch for ch in text if ch.isprintable())[:limit]


# ----------------------------------------------------------------------------
# The self-signed certificate of the embedded default


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    """ECDSA P-256 certificate for `hostname` (+ localhost, 127.0.0.1, ::1), 825 days.

    The key file gets mode 0600. When both paths are the same file, it holds key
    and certificate (qmail servercert.pem style).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        sans.append(x509.DNSName(hostname))
    if hostname != "localhost":
        sans.append(x509.DNSName("localhost"))
    for ip in ("127.0.0.1", "::1"):
        if hostname != ip:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
    cn = hostname if 0 < len(hostname) <= 64 else "localhost"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsfront self-signed"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    if Path(cert_path).resolve() == Path(key_path).resolve():
        _write_atomically(key_path, key_pem + cert_pem, 0o600)
        return
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert_pem, 0o644)
