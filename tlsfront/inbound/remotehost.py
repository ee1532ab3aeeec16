"""The client's host name, for `=host` tcprules keys and TCPREMOTEHOST.

Theory of operation
-------------------
tcpserver looks up the client's name unless run with -H, and with -p
(paranoid) keeps it only when the name's own addresses include the client's.
A PTR record says whatever the holder of the client's address block wants it
to say, so a rule such as `=relay.example.com:allow,RELAYCLIENT=""` is safe
only with that confirmation: tlsfront always confirms, as -p does.

The look-up is made only when the profile's rules have a key that needs a
name (`=host`, `=.suffix`, `=`, `user@=host`); without one tlsfront behaves
as `tcpserver -H` and TCPREMOTEHOST is not set. It is bounded by
LOOKUP_TIMEOUT. A failure, a timeout, a name that does not point back, or an
unsafe name (anything but letters, digits, `-`, `_` and dots: the name ends
up in qmail-smtpd's Received line) all mean "no name": only the address keys
apply then, as with tcpserver.

The resolver is the profile's `dns_servers` when set, else the system's.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import weakref
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.resolver
import trio

from tlsfront.net.dns import make_resolver
from tlsfront.qmail.tcprules import Rules

log = logging.getLogger("tlsfront.inbound.remotehost")

LOOKUP_TIMEOUT = 10.0  # seconds for the PTR and the confirming A/AAAA look-ups together
MAX_NAMES = 4  # PTR names tried, in the order the answer gives them
_SAFE_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?")

_needs: weakref.WeakKeyDictionary[Rules, bool] = weakref.WeakKeyDictionary()


def needs_host(rules: Rules) -> bool:
    """Whether any key of `rules` can match only with a host name."""
    known = _needs.get(rules)
    if known is None:
        known = _needs[rules] = any("=" in rule.key for rule in rules)
    return known


def safe_host(name: str) -> str | None:
    """`name` in lower case without its final dot, or None if it has unsafe characters."""
    name = name.lower().rstrip(".")
    return name if _SAFE_NAME.fullmatch(name) and ".." not in name else None


@functools.cache
def _resolver(servers: tuple[str, ...]) -> dns.asyncresolver.Resolver:
    resolver = make_resolver(servers, dnssec=False)
    resolver.lifetime = LOOKUP_TIMEOUT
    resolver.timeout = min(resolver.timeout, LOOKUP_TIMEOUT / 2)
    return resolver


async def lookup_host(ip: str, servers: Sequence[str] = ()) -> str | None:
    """The forward-confirmed host name of `ip` (lower case, no final dot), or None."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    with trio.move_on_after(LOOKUP_TIMEOUT):
        try:
            name = await _confirmed(address, _resolver(tuple(servers)))
        except dns.exception.DNSException as exc:
            log.debug("[%s]: no host name: %s", ip, exc.__class__.__name__)
            return None
        if name is None:
            log.debug("[%s]: no host name that points back to it", ip)
        return name
    log.info("[%s]: host name look-up timed out after %gs", ip, LOOKUP_TIMEOUT)
    return None


async def _confirmed(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    resolver: dns.asyncresolver.Resolver,
) -> str | None:
    answer = await resolver.resolve_address(str(address), raise_on_no_answer=False)
    names = [safe_host(record.to_text()) for record in (answer.rrset or ())][:MAX_NAMES]
    rdtype = "A" if address.version == 4 else "AAAA"
    for name in names:
        if name is None:
            continue
        try:
            forward = await resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            continue
        for record in forward.rrset or ():
            if ipaddress.ip_address(record.to_text()) == address:
                return name
    return None
