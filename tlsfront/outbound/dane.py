"""DANE for SMTP (RFC 7672): TLSA records and matching them to a server's chain.

Used only when the profile enables it and names a validating resolver: an
answer counts as DNSSEC-validated when the resolver sets the AD bit (tlsfront
does no validation itself). For an MX host whose TLSA RRset
(`_25._tcp.HOST`) is validated and holds usable records, TLS is required
and the server's certificates must match:

* DANE-EE (usage 3): the leaf certificate (selector 0) or its public key
  (selector 1) matches, whole (type 0) or by SHA-256 / SHA-512 (type 1 / 2);
  no name check and no expiry check (RFC 7672 §3.1.1);
* DANE-TA (usage 2): a certificate the server sent after its leaf matches;
  the leaf must then chain to it and be valid for the MX host name or the
  recipient domain (RFC 7672 §3.2.2).

PKIX usages 0 and 1 are unusable for SMTP (RFC 7672 §3.1.3); a validated
TLSA RRset with no usable record still makes TLS mandatory, unauthenticated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import verification

from tlsfront.outbound.mx import Dns, DnsFailure


@dataclass(frozen=True)
class TlsaRecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (2, 3) and self.selector in (0, 1) and self.mtype in (0, 1, 2)


@dataclass(frozen=True)
class TlsaAnswer:
    records: tuple[TlsaRecord, ...]  # the usable ones
    unusable_only: bool  # a validated RRset existed, with no usable record


async def lookup_tlsa(dns_: Dns, host: str, port: int) -> TlsaAnswer | None:
    """Validated TLSA records for a host, or None when DANE does not apply.

    Raises DnsFailure when the look-up itself fails (not a denial).
    """
    try:
        answer = await dns_.query(f"_{port}._tcp.{host}", "TLSA")
    except DnsFailure as err:
        if err.permanent:
            return None
        raise
    if not answer.secure or not answer.records:
        return None
    records = tuple(
        TlsaRecord(r.usage, r.selector, r.mtype, bytes(r.cert))  # type: ignore[attr-defined]
        for r in answer.records
    )
    usable = tuple(r for r in records if r.usable)
    return TlsaAnswer(usable, not usable)


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(Encoding.DER)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def record_matches(record: TlsaRecord, cert: x509.Certificate) -> bool:
    data = _selected(cert, record.selector)
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def _chains_to(
    leaf: x509.Certificate,
    anchor: x509.Certificate,
    intermediates: list[x509.Certificate],
    names: Sequence[str],
) -> bool:
    store = verification.Store([anchor])
    # X.509 chain rules, not the CA/Browser Forum's extension rules: DANE-TA
    # anchors are often private CAs
    agnostic = verification.Criticality.AGNOSTIC
    permit = verification.ExtensionPolicy.permit_all()
    ca_policy = permit.require_present(x509.BasicConstraints, agnostic, None)
    ee_policy = permit.require_present(x509.SubjectAlternativeName, agnostic, None)
    for name in names:
        builder = verification.PolicyBuilder().store(store)
        builder = builder.extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        verifier = builder.build_server_verifier(x509.DNSName(name))
        try:
            verifier.verify(leaf, intermediates)
        except (verification.VerificationError, ValueError):
            continue
        return True
    return False


def check_chain(
    records: Sequence[TlsaRecord], chain_der: Sequence[bytes], names: Sequence[str]
) -> str | None:
    """None when a record matches the chain (leaf first), else why not."""
    if not chain_der:
        return "server sent no certificate"
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError:
        return "server certificate cannot be parsed"
    leaf, rest = chain[0], chain[1:]
    for record in records:
        if record.usage == 3 and record_matches(record, leaf):
            return None
    for record in records:
        if record.usage != 2:
            continue
        for index, candidate in enumerate(rest):
            if record_matches(record, candidate) and _chains_to(
                leaf, candidate, rest[:index], names
            ):
                return None
    return "no TLSA record matches the server certificate"
