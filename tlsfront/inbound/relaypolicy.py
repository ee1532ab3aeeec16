"""Who may relay: the qmail-tls `tlsclients` rule, and Postfix-style fingerprints.

A session may relay (the backend is started with RELAYCLIENT="") when its
client certificate

* verified against `client_ca` (chain, dates, CRL: OpenSSL's verdict, which
  the TLS engine records without failing the handshake), is fit for client
  use (key usage), and carries an address listed in `relay_clients` (the
  subject emailAddress the qmail patch reads, or a SAN rfc822Name); or
* has a SHA-256 fingerprint listed in `relay_fingerprints`, is within its
  validity dates and is not revoked by `client_crl` (a pinned certificate
  needs no CA, but may not be expired).

Nothing else grants relaying here (a resumed session never does). The
verdict has Postfix's words: Anonymous (no certificate), Untrusted (did not
verify), Trusted (verified, not authorized), Verified (authorized to relay).

The lists are files the admin edits while tlsfront runs; new sessions see
the change (`tlsfront.ops.watch`). At start-up and reload a missing or malformed
list is an error. Later, a list that disappears is empty and a malformed line
is skipped with a log line: a mistake while editing never widens who may
relay, and never keeps an address the admin has just removed.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from tlsfront.config.schema import Profile
from tlsfront.ops.watch import watch_file
from tlsfront.qmail.control import CR_LINE_END
from tlsfront.smtp.received import ClientCertTrace
from tlsfront.tls.certs import PeerCertificate, normalize_fingerprint, peer_certificate, sanitize
from tlsfront.tls.stream import TLSInfo

__all__ = [
    "RelayDecision",
    "RelayGrant",
    "RelayListError",
    "RelayPolicy",
    "read_fingerprints",
    "read_relay_clients",
    "unverified_reason",
]

log = logging.getLogger("tlsfront.inbound.relaypolicy")


class RelayListError(Exception):
    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")


# ----------------------------------------------------------------------------
# The list files


def _lines(path: Path, strict: bool, *, refuse_cr: bool = False) -> list[tuple[int, str]]:
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")  # no newline translation
    except FileNotFoundError:
        if strict:
            raise
        return []
    result = []
    # lines end at LF only, as qmail reads control files (not at VT, FF, U+2028)
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.split("#", 1)[0].strip()
        if line and refuse_cr and raw.rstrip(" \t").endswith("\r"):
            _bad_line(strict, path, number, CR_LINE_END)  # as tcp.smtp (tcprules)
            continue
        if line:
            result.append((number, line))
    return result


def _bad_line(strict: bool, path: Path, number: int, message: str) -> None:
    if strict:
        raise RelayListError(path, number, message)
    log.error("%s:%d: %s; line skipped", path, number, message)


def read_relay_clients(path: Path, *, strict: bool = True) -> frozenset[str]:
    """A qmail `tlsclients` file: one address a line, compared case-insensitively.

    strict=False (a list re-read while running): a missing file is empty and
    a malformed line is logged and skipped instead of raising.
    """
    addresses = set()
    for number, line in _lines(path, strict, refuse_cr=True):
        if "@" not in line or any(ch.isspace() or not ch.isprintable() for ch in line):
            _bad_line(strict, path, number, f"not an e-mail address: {sanitize(line)!r}")
            continue
        addresses.add(line.lower())
    return frozenset(addresses)


def read_fingerprints(path: Path, *, strict: bool = True) -> frozenset[str]:
    """A Postfix `relay_clientcerts` style file: a fingerprint first on each line."""
    prints = set()
    for number, line in _lines(path, strict):
        try:
            prints.add(normalize_fingerprint(line.split()[0]))
        except ValueError as exc:
            _bad_line(strict, path, number, str(exc))
    return frozenset(prints)


# ----------------------------------------------------------------------------
# The decision


class RelayGrant(enum.Enum):
    """Why a session may relay (the backend gets RELAYCLIENT), in the session's log line."""

    NO = "no"  # it may not
    CERT = "cert"  # its client certificate authorized it (the decision below)
    RULE = "rule"  # a tcprules line or the profile's env sets RELAYCLIENT

    @classmethod
    def before_tls(cls, *envs: Mapping[str, str]) -> RelayGrant:
        """The grant a session starts with: by rule when one of `envs` sets RELAYCLIENT."""
        return cls.RULE if any("RELAYCLIENT" in env for env in envs) else cls.NO


# OpenSSL's verify errors that say the server's CRL is unusable, not the certificate
CRL_FAULTS = frozenset(
    {
        "CRL has expired",
        "CRL is not yet valid",
        "unable to get certificate CRL",
        "CRL signature failure",
        "unable to get CRL issuer certificate",
    }
)


@dataclass(frozen=True, slots=True)
class RelayDecision:
    relay: bool
    status: str  # Anonymous, Untrusted, Trusted or Verified (see the module doc)
    reason: str | None  # why a certificate did not authorize relaying
    address: str | None = None  # the listed address (or fingerprint) that authorized it
    cert: PeerCertificate | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # SSL_CLIENT_*, sanitized
    verified: bool = False  # the certificate verified against client_ca
    issuer_cn: str = ""
    verify_error: str | None = None  # OpenSSL's verdict when it did not verify

    @property
    def server_fault(self) -> bool:
        """The certificate did not relay because of the server's own CRL (stale, unusable)."""
        return self.verify_error in CRL_FAULTS

    @property
    def trace(self) -> ClientCertTrace | None:
        """The client-certificate comment of the Received header."""
        if self.cert is None:
            return None
        return ClientCertTrace(self.cert.common_name or "", self.issuer_cn, self.verified)


def _name_values(get_name: Callable[[], x509.Name], oid: x509.ObjectIdentifier) -> list[str]:
    try:
        attrs = get_name().get_attributes_for_oid(oid)
    except ValueError:  # a name cryptography parses lazily and rejects
        return []
    return [a.value if isinstance(a.value, str) else a.value.decode("latin-1") for a in attrs]


def _asn1_time(when: datetime) -> str:
    """OpenSSL's ASN1_TIME_print form, as mod_ssl puts it in SSL_CLIENT_V_*."""
    return f"{when:%b} {when.day:2d} {when:%H:%M:%S %Y} GMT"


def _cert_env(
    cert: PeerCertificate | None, raw: x509.Certificate | None, verify: str
) -> dict[str, str]:
    """mod_ssl / ucspi-ssl style variables. SSL_CLIENT_CERT keeps PEM's newlines."""
    env = {"SSL_CLIENT_VERIFY": verify}
    if cert is None or raw is None:
        return env
    env.update(
        SSL_CLIENT_S_DN=sanitize(cert.subject_dn, 1024),
        SSL_CLIENT_I_DN=sanitize(cert.issuer_dn, 1024),
        SSL_CLIENT_M_SERIAL=cert.serial,
        SSL_CLIENT_V_START=_asn1_time(cert.not_before),
        SSL_CLIENT_V_END=_asn1_time(cert.not_after),
        SSL_CLIENT_CERT=cert.pem,
        SSL_CLIENT_FINGERPRINT=cert.fingerprint,
    )
    if cert.common_name:
        env["SSL_CLIENT_S_DN_CN"] = sanitize(cert.common_name)
    issuer_cns = _name_values(lambda: raw.issuer, NameOID.COMMON_NAME)
    if issuer_cns:
        env["SSL_CLIENT_I_DN_CN"] = sanitize(issuer_cns[0])
    subject_emails = _name_values(lambda: raw.subject, NameOID.EMAIL_ADDRESS)
    if subject_emails:
        env["SSL_CLIENT_S_DN_Email"] = sanitize(subject_emails[0])
    san_emails = [e for e in cert.emails if e not in subject_emails]
    for n, address in enumerate(san_emails[:8]):
        env[f"SSL_CLIENT_SAN_Email_{n}"] = sanitize(address)
    return env


# OpenSSL's verify errors, in the words of the qmail patch's log line
_NOT_SIGNED = frozenset(
    {
        "unable to get local issuer certificate",
        "unable to get issuer certificate",
        "unable to verify the first certificate",
        "self-signed certificate",
        "self-signed certificate in certificate chain",
        "certificate signature failure",
        "certificate not trusted",
        "invalid CA certificate",
    }
)
_PLAIN_WORDS = {
    "certificate revoked": "revoked",
    "certificate has expired": "expired",
    "certificate is not yet valid": "not yet valid",
}


def unverified_reason(verify_error: str | None) -> str:
    """'not signed by client_ca (...)', 'revoked', 'expired', ... for the log."""
    if verify_error is None:
        return "not verified"
    if verify_error in _NOT_SIGNED:
        return f"not signed by client_ca ({verify_error})"
    return _PLAIN_WORDS.get(verify_error, verify_error)


class RelayPolicy:
    """The relay rule of one profile, with its files watched for changes."""

    def __init__(
        self,
        name: str,
        clients_file: Path | None,
        fingerprints: frozenset[str],
        fingerprints_file: Path | None,
    ) -> None:
        self._inline = frozenset(normalize_fingerprint(p) for p in fingerprints)
        self._clients_file = clients_file
        self._prints_file = fingerprints_file
        self._clients = watch_file(
            f"profile {name}: relay_clients",
            clients_file,
            lambda path: read_relay_clients(path, strict=False),
        )
        self._prints = watch_file(
            f"profile {name}: relay_fingerprints",
            fingerprints_file,
            lambda path: read_fingerprints(path, strict=False),
        )

    @classmethod
    def from_profile(cls, profile: Profile) -> RelayPolicy:
        return cls(
            profile.name,
            profile.relay_clients,
            frozenset(profile.relay_fingerprints),
            profile.relay_fingerprints_file,
        )

    def load(self) -> None:
        """Read the lists now (start-up, reload): raise on a missing file or a bad line."""
        if self._clients_file is not None and self._clients is not None:
            read_relay_clients(self._clients_file)
            self._clients.load()
        if self._prints_file is not None and self._prints is not None:
            read_fingerprints(self._prints_file)
            self._prints.load()

    def restamp(self) -> None:
        """After giving up root: see FileWatch.restamp."""
        for watch in (self._clients, self._prints):
            if watch is not None:
                watch.restamp()

    def _listed_fingerprints(self) -> frozenset[str]:
        from_file = self._prints.get() if self._prints is not None else None
        return self._inline | (from_file or frozenset())

    def _listed_clients(self) -> frozenset[str]:
        return (self._clients.get() if self._clients is not None else None) or frozenset()

    def decide(self, info: TLSInfo | None, now: datetime | None = None) -> RelayDecision:
        if info is None or info.peer_cert is None:
            return RelayDecision(False, "Anonymous", None, env=_cert_env(None, None, "NONE"))
        now = now or datetime.now(UTC)
        raw = info.peer_cert
        cert = peer_certificate(raw)
        verified = info.verified
        verify = "SUCCESS" if verified else f"FAILED:{info.verify_error or 'not verified'}"
        issuer_cns = _name_values(lambda: raw.issuer, NameOID.COMMON_NAME)
        issuer_cn = issuer_cns[0] if issuer_cns else cert.issuer_dn

        def refuse(reason: str) -> RelayDecision:
            status = "Trusted" if verified else "Untrusted"
            env = _cert_env(cert, raw, verify)
            return RelayDecision(
                False, status, reason, None, cert, env, verified, issuer_cn, info.verify_error
            )

        def allow(by: str) -> RelayDecision:
            env = _cert_env(cert, raw, verify)
            return RelayDecision(True, "Verified", None, by, cert, env, verified, issuer_cn)

        if info.resumed:  # nothing was verified in this handshake (resumption is off anyway)
            return refuse("resumed session")
        if cert.fingerprint in self._listed_fingerprints():
            if info.verify_error == "certificate revoked":
                return refuse("listed fingerprint, but revoked")
            if now < cert.not_before:
                return refuse("listed fingerprint, but not yet valid")
            if now > cert.not_after:
                return refuse("listed fingerprint, but expired")
            return allow(cert.fingerprint)
        if not verified:
            return refuse(unverified_reason(info.verify_error))
        if not cert.has_client_auth_usage:
            return refuse("key usage does not allow client authentication")
        if not cert.emails:
            return refuse("no address in certificate")
        clients = self._listed_clients()
        for address in cert.emails:
            if address.lower() in clients:
                return allow(sanitize(address))
        shown = ", ".join(sanitize(a, 100) for a in cert.emails[:4])
        return refuse(f"address not listed: {shown}")
