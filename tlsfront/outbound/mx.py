"""Where a domain's mail goes: static routes, MX records, A/AAAA records.

Routes work like qmail's `smtproutes`: the recipient domain is looked up
whole, then as `.parent` suffixes (`.example.com`, `.com`), then `""` (the
default route). A value is `host`, `host:port`, `[address]:port`; an empty
value means "use the MX records". A route host is an address or a name
looked up by A/AAAA (no MX), as qmail does.

Otherwise MX records in preference order (equal preferences shuffled, RFC
5321 §5.1); no MX record means the domain itself (implicit MX); a lone
`MX 0 .` (RFC 7505) or a domain that does not exist is permanent, as it is
for qmail-remote; any other DNS failure is temporary.

DNS goes through dnspython's async resolver, which runs on trio (it picks
its backend by asking sniffio which library is running).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver

from tlsfront.net.address import ip_literal, parse_hostport

MAX_HOPS = 10
MAX_ADDRESSES = 4  # per host


class DnsFailure(Exception):
    """A look-up that failed; `permanent` when the answer is final (NXDOMAIN)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


@dataclass(frozen=True)
class Answer:
    records: tuple[dns.rdata.Rdata, ...]
    secure: bool  # the resolver set AD (validated by DNSSEC)


class Dns:
    """Look-ups that say whether the answer was validated."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver

    async def query(self, name: str, rdtype: str) -> Answer:
        """Records of one type; no records is an empty answer, NXDOMAIN permanent."""
        try:
            answer = await self.resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            raise DnsFailure(f"{name}: no such domain", permanent=True) from None
        except dns.resolver.NoNameservers:
            raise DnsFailure(f"{name} {rdtype}: DNS servers failed") from None
        except dns.exception.Timeout:
            raise DnsFailure(f"{name} {rdtype}: DNS timeout") from None
        except dns.exception.DNSException as err:
            raise DnsFailure(f"{name} {rdtype}: {err.__class__.__name__}") from None
        secure = bool(answer.response.flags & dns.flags.AD)
        records = tuple(answer.rrset) if answer.rrset is not None else ()
        return Answer(records, secure)

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of a host (a literal is returned as is)."""
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        found: list[str] = []
        errors: list[DnsFailure] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.query(host, rdtype)
            except DnsFailure as err:
                errors.append(err)
                if err.permanent:
                    break
                continue
            found.extend(r.to_text() for r in answer.records)
        if not found and errors:
            raise errors[0]
        return found[:MAX_ADDRESSES]


@dataclass(frozen=True)
class Hop:
    host: str  # MX name, route host or address; names the tlshosts file
    port: int
    preference: int = 0


@dataclass(frozen=True)
class Destination:
    domain: str
    hops: tuple[Hop, ...]
    source: str  # "route", "mx", "implicit" or "literal"
    secure: bool = False  # the MX answer was validated


def lookup_route(routes: Mapping[str, str], domain: str) -> str | None:
    """The smtproutes-style entry for a domain, or None."""
    domain = domain.lower().rstrip(".")
    keys = {k.lower(): v for k, v in routes.items()}
    if domain in keys:
        return keys[domain]
    for i, char in enumerate(domain):
        if char == "." and domain[i:] in keys:
            return keys[domain[i:]]
    return keys.get("")


async def find_hops(
    domain: str, routes: Mapping[str, str], dns_: Dns, default_port: int
) -> Destination:
    """The hosts to try for a domain, best first; raises DnsFailure."""
    route = lookup_route(routes, domain)
    if route:
        host, port = parse_hostport(route, default_port)
        return Destination(domain, (Hop(host.lower().rstrip("."), port),), "route")
    literal = ip_literal(domain) if domain.startswith("[") else None
    if literal is not None:
        return Destination(domain, (Hop(literal, default_port),), "literal")
    answer = await dns_.query(domain, "MX")
    if not answer.records:
        return Destination(domain, (Hop(domain, default_port),), "implicit", answer.secure)
    records: list[tuple[int, float, str]] = []
    for record in answer.records:
        if record.exchange == dns.name.root:  # type: ignore[attr-defined]
            continue
        exchange = record.exchange.to_text(omit_final_dot=True).lower()  # type: ignore[attr-defined]
        preference = int(record.preference)  # type: ignore[attr-defined]
        records.append((preference, random.random(), exchange))
    if not records:
        raise DnsFailure(f"{domain}: does not accept mail (null MX)", permanent=True)
    records.sort()
    hops = tuple(Hop(name, default_port, pref) for pref, _, name in records[:MAX_HOPS])
    return Destination(domain, hops, "mx", answer.secure)
