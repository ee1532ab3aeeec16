"""The DNS resolver factory: the system's resolver, or the servers a profile names.

Used by the outbound relay (MX, A/AAAA, TLSA look-ups) and by the inbound
side (forward-confirmed client host names for tcprules `=host` keys).
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.asyncresolver
import dns.flags
import dns.nameserver
import dns.resolver

from tlsfront.net.address import parse_hostport


def parse_server(text: str) -> tuple[str, int]:
    """`ip`, `ip:port`, `[v6]:port` or a bare IPv6 address; port 53 by default."""
    return parse_hostport(text, 53)


def make_resolver(servers: Sequence[str], *, dnssec: bool) -> dns.asyncresolver.Resolver:
    """A resolver for the profile's `dns_servers`, else the system's
    (`/etc/resolv.conf`; a resolver on localhost when there is none).

    With `dnssec` the queries carry DO and AD so that a validating resolver
    says in its answer whether it validated it.
    """
    if servers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        nameservers: list[str | dns.nameserver.Nameserver] = []
        for text in servers:
            address, port = parse_server(text)
            nameservers.append(dns.nameserver.Do53Nameserver(address, port))
        resolver.nameservers = nameservers
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1", "::1"]
    resolver.lifetime = 20.0
    resolver.timeout = 5.0
    if dnssec:
        resolver.use_edns(0, dns.flags.DO, 1232)
        resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver
