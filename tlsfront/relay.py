"""Who may relay: the qmail-tls `tlsclients` rule, and Postfix-style fingerprints.

A session may relay (the backend is started with RELAYCLIENT="") when its
client certificate

* verified against `client_ca` (chain, dates, CRL: OpenSSL's verdict, which
  the TLS engine records without failing the handshake), is fit for client
  use (key usage), and carries an address listed in `relay_clients` (the
  subject emailAddress the qmail patch reads, or a SAN rfc822Name); or
* has a SHA-256 fingerprint listed in `relay_fingerprints`, and is within its
  validity dates (a pinned certificate needs no CA, but may not be expired).

Nothing else grants relaying here. The lists are files that the admin edits
while tlsfront runs; they are re-read for new sessions when they change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tlsfront.certs import PeerCertificate, normalize_fingerprint, peer_certificate, sanitize
from tlsfront.config import Profile
from tlsfront.tls import TLSInfo
from tlsfront.watch import FileWatch


class RelayListError(Exception):
    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")


def _lines(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    result = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            result.append((number, line))
    return result


def read_relay_clients(path: Path) -> frozenset[str]:
    """A qmail `tlsclients` file: one address a line, compared case-insensitively."""
    addresses = set()
    for number, line in _lines(path):
        if "@" not in line or " " in line:
            raise RelayListError(path, number, f"not an e-mail address: {line!r}")
        addresses.add(line.lower())
    return frozenset(addresses)


def read_fingerprints(path: Path) -> frozenset[str]:
    """A Postfix `relay_clientcerts` style file: a fingerprint first on each line."""
    prints = set()
    for number, line in _lines(path):
        try:
            prints.add(normalize_fingerprint(line.split()[0]))
        except ValueError as exc:
            raise RelayListError(path, number, str(exc)) from exc
    return frozenset(prints)


@dataclass(frozen=True)
class RelayDecision:
    relay: bool
    # Postfix's words: Anonymous (no certificate), Untrusted (did not
    # verify), Trusted (verified), Verified (verified and authorized)
    status: str
    reason: str | None  # why it may not relay, when a certificate was shown
    address: str | None = None  # the listed address (or fingerprint) that authorized it
    cert: PeerCertificate | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def trace(self) -> str | None:
        """The Received header comment about the client certificate."""
        if self.cert is None:
            return None
        verdict = "verified OK" if self.status in ("Trusted", "Verified") else "not verified"
        return (
            f'Client CN "{sanitize(self.cert.common_name or "")}", '
            f'Issuer "{sanitize(self.cert.issuer_dn)}" ({verdict})'
        )


def _cert_env(cert: PeerCertificate | None, verify: str) -> dict[str, str]:
    env = {"SSL_CLIENT_VERIFY": verify}
    if cert is None:
        return env
    env.update(
        SSL_CLIENT_S_DN=sanitize(cert.subject_dn, 1024),
        SSL_CLIENT_I_DN=sanitize(cert.issuer_dn, 1024),
        SSL_CLIENT_M_SERIAL=cert.serial,
        SSL_CLIENT_V_START=cert.not_before.strftime("%b %d %H:%M:%S %Y GMT"),
        SSL_CLIENT_V_END=cert.not_after.strftime("%b %d %H:%M:%S %Y GMT"),
        SSL_CLIENT_CERT=cert.pem,
        SSL_CLIENT_FINGERPRINT=cert.fingerprint,
    )
    if cert.common_name:
        env["SSL_CLIENT_S_DN_CN"] = sanitize(cert.common_name)
    if cert.emails:
        env["SSL_CLIENT_S_DN_Email"] = sanitize(cert.emails[0])
    return env


class RelayPolicy:
    """The relay rule of one profile, with its files watched for changes."""

    def __init__(
        self,
        name: str,
        clients_file: Path | None,
        fingerprints: frozenset[str],
        fingerprints_file: Path | None,
    ) -> None:
        self._inline = fingerprints
        self._clients = (
            FileWatch(
                f"profile {name}: relay_clients",
                [clients_file],
                lambda: read_relay_clients(clients_file),
            )
            if clients_file is not None
            else None
        )
        self._prints = (
            FileWatch(
                f"profile {name}: relay_fingerprints",
                [fingerprints_file],
                lambda: read_fingerprints(fingerprints_file),
            )
            if fingerprints_file is not None
            else None
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
        for watch in (self._clients, self._prints):
            if watch is not None:
                watch.load()

    def decide(self, info: TLSInfo | None, now: datetime | None = None) -> RelayDecision:
        if info is None or info.peer_cert is None:
            return RelayDecision(False, "Anonymous", None, env=_cert_env(None, "NONE"))
        now = now or datetime.now(UTC)
        cert = peer_certificate(info.peer_cert)
        verify = "SUCCESS" if info.verified else f"FAILED:{info.verify_error or 'unknown'}"
        env = _cert_env(cert, verify)
        status = "Trusted" if info.verified else "Untrusted"
        prints = self._inline | ((self._prints.get() if self._prints else None) or frozenset())
        if cert.fingerprint in prints:
            if cert.not_before <= now <= cert.not_after:
                return RelayDecision(True, "Verified", None, cert.fingerprint, cert, env)
            return RelayDecision(
                False,
                status,
                "listed fingerprint, but expired or not yet valid",
                cert=cert,
                env=env,
            )
        if not info.verified:
            reason = info.verify_error or "not signed by client_ca"
            return RelayDecision(False, status, reason, cert=cert, env=env)
        if not cert.has_client_auth_usage:
            return RelayDecision(
                False, status, "key usage does not allow client authentication", cert=cert, env=env
            )
        clients = (self._clients.get() if self._clients else None) or frozenset()
        if not cert.emails:
            return RelayDecision(False, status, "no address in certificate", cert=cert, env=env)
        for address in cert.emails:
            if address.lower() in clients:
                return RelayDecision(True, "Verified", None, sanitize(address), cert, env)
        return RelayDecision(
            False, status, f"address {sanitize(cert.emails[0])} not listed", cert=cert, env=env
        )
