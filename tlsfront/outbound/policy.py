"""Which TLS to use with one destination host: a pure decision, no I/O.

The facts (control files found, TLSA records, the MTA-STS policy) are
gathered elsewhere; `decide` applies them in this order, first match wins:

1. the profile's `tls_policy` table (`none`, `may`, `encrypt`, `verify`),
   looked up by the recipient domain: `example.com` matches that domain,
   `.example.com` its subdomains, `""` everything else;
2. `tlshosts/<host>.pem`: TLS required, verified against that file;
3. `notlshosts/<host>` (or `notlshosts/<domain>`): cleartext;
4. `tlshosts/exhaustivelist`: cleartext for hosts without a `.pem`;
5. DANE (validated, usable TLSA records for the host), then MTA-STS;
6. opportunistic TLS (`may`).

A route that logs in (it has credentials) needs more: `with_credentials`
raises its decision to `verify` unless it already authenticates the server
on every attempt (`verify` by a tlshosts file or the trust store, DANE,
MTA-STS enforce), so a password never goes out in clear, nor to a server
whose certificate was not checked.

A decision is a list of attempts on the same host: each a `TlsAttempt` or
`None` for cleartext. An optional attempt that fails its handshake leads to
the next one on a new connection; a required one fails the host.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tlsfront.outbound.dane import TlsaRecord
from tlsfront.outbound.mtasts import StsPolicy, mx_matches


class Trust(enum.Enum):
    NONE = "none"  # encrypted, certificate not checked
    PEM = "pem"  # chain against the tlshosts file, then the host name
    WEBPKI = "webpki"  # chain against the trust store, then the host name
    DANE = "dane"  # TLSA records


@dataclass(frozen=True)
class TlsAttempt:
    trust: Trust
    required: bool  # False: no STARTTLS keeps the session in clear
    audit: bool = False  # verification failures are logged, not enforced


@dataclass(frozen=True)
class HostFacts:
    """What is known about one destination host before connecting."""

    pem: Path | None = None  # tlshosts/<host>.pem, when it exists
    exhaustive: bool = False  # tlshosts/exhaustivelist exists
    notls: bool = False  # notlshosts/<host> or notlshosts/<domain> exists
    tlsa: tuple[TlsaRecord, ...] = ()  # usable DNSSEC-validated TLSA records
    tlsa_unusable: bool = False  # validated TLSA records, none usable
    tlsa_error: str | None = None  # DANE applies but the TLSA look-up failed


@dataclass(frozen=True)
class Decision:
    source: str  # the rule that decided (for logs)
    level: str  # none, may, encrypt, verify, dane
    attempts: tuple[TlsAttempt | None, ...] = ()
    cafile: Path | None = None
    names: tuple[str, ...] = ()  # reference identities for the certificate
    tlsa: tuple[TlsaRecord, ...] = ()
    refuse: str | None = None  # this host must not be used, and why
    notes: tuple[str, ...] = field(default=())  # things to log (MTA-STS testing)


LEVELS = ("none", "may", "encrypt", "verify")

_MAY = (TlsAttempt(Trust.NONE, required=False), None)


def table_level(table: Mapping[str, str], domain: str) -> str | None:
    """The `tls_policy` entry for a domain, Postfix style."""
    domain = domain.lower().rstrip(".")
    if domain in table:
        return table[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        parent = "." + ".".join(labels[i:])
        if parent in table:
            return table[parent]
    return table.get("")


def _level(level: str, source: str, host: str, pem: Path | None) -> Decision:
    names = (host,)
    if level == "none":
        return Decision(source, level, (None,))
    if level == "may":
        return Decision(source, level, _MAY)
    if level == "encrypt":
        return Decision(source, level, (TlsAttempt(Trust.NONE, required=True),))
    trust = Trust.PEM if pem is not None else Trust.WEBPKI
    return Decision(source, "verify", (TlsAttempt(trust, required=True),), pem, names)


def decide(
    domain: str,
    host: str,
    table: Mapping[str, str],
    facts: HostFacts,
    sts: StsPolicy | None = None,
) -> Decision:
    """The TLS decision for delivering `domain`'s mail to `host`."""
    level = table_level(table, domain)
    if level is not None:
        return _level(level, "tls_policy", host, facts.pem)
    if facts.pem is not None:
        return _level("verify", "tlshosts", host, facts.pem)
    if facts.notls:
        return Decision("notlshosts", "none", (None,))
    if facts.exhaustive:
        return Decision("exhaustivelist", "none", (None,))
    if facts.tlsa_error is not None:
        return Decision("dane", "dane", refuse=facts.tlsa_error)
    if facts.tlsa:
        attempt = TlsAttempt(Trust.DANE, required=True)
        return Decision("dane", "dane", (attempt,), names=(host, domain), tlsa=facts.tlsa)
    if facts.tlsa_unusable:
        return Decision("dane", "encrypt", (TlsAttempt(Trust.NONE, required=True),))
    if sts is not None and sts.mode == "enforce":
        if not mx_matches(sts.mx, host):
            return Decision("mta-sts", "verify", refuse="MX host not in the MTA-STS policy")
        return Decision("mta-sts", "verify", (TlsAttempt(Trust.WEBPKI, True),), names=(host,))
    if sts is not None and sts.mode == "testing":
        notes = () if mx_matches(sts.mx, host) else ("MX host not in the MTA-STS policy",)
        attempts = (TlsAttempt(Trust.WEBPKI, required=False, audit=True), *_MAY)
        return Decision("mta-sts-testing", "may", attempts, names=(host,), notes=notes)
    return Decision("default", "may", _MAY)


def authenticated(decision: Decision) -> bool:
    """Every attempt requires TLS and checks the server's certificate."""
    return bool(decision.attempts) and all(
        a is not None and a.required and not a.audit and a.trust is not Trust.NONE
        for a in decision.attempts
    )


def with_credentials(decision: Decision, host: str, pem: Path | None) -> Decision:
    """The decision for a host the relay logs in to: at least `verify`."""
    if decision.refuse is not None or authenticated(decision):
        return decision
    return _level("verify", "credentials", host, pem)
