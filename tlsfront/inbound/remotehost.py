"""The client's host name: TCPREMOTEHOST, and the name `=host` tcprules keys match.

Theory of operation
-------------------
tcpserver looks up the name of every client from its PTR record unless run
with -H, and with -p (paranoid) keeps it only when the name's own addresses
include the client's. tlsfront does the same: `remote_host_lookup` (on by
default, `false` for -H) and `remote_host_paranoid` (-p). The name becomes
TCPREMOTEHOST, which qmail-smtpd writes in its Received line.

A PTR record says whatever the holder of the client's address block wants
it to say, so the name `=host` rules match is always the confirmed one,
paranoid or not: a rule such as `=relay.example.com:allow,RELAYCLIENT=""`
cannot be earned by a PTR record alone.

The look-up starts when the connection is accepted and runs beside the
session (`PendingHost`), so the greeting, EHLO or the TLS handshake do not
wait for DNS; what needs the name waits for it: the rules, when they have a
key that needs a name, and the backend's start (TCPREMOTEHOST). All of it
is bounded by `remote_host_timeout`, counted from the accept, so a resolver
that never answers delays a session by that much at most. A failure, a
timeout, a name that does not point back, or an unsafe name (anything but
letters, digits, `-`, `_` and dots: the name ends up in qmail-smtpd's
Received line) all mean "no name", as with tcpserver.

Answers are cached per process (`HostCache`: bounded, each entry for
`CACHE_TTL` seconds, failures for `FAILURE_TTL`), so a client that
reconnects, or a resolver that is down, costs one look-up, not one per
connection. The resolver is the profile's `dns_servers` when set (the same
key as the outbound relay's), else the system's.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver
import trio

from tlsfront.config.schema import Profile
from tlsfront.net.dns import make_resolver
from tlsfront.qmail.tcprules import Rules

log = logging.getLogger("tlsfront.inbound.remotehost")

MAX_NAMES = 4  # PTR names tried, in the order the answer gives them
CACHE_SIZE = 4096  # clients remembered
CACHE_TTL = 600.0  # seconds a name (or its absence) is remembered
FAILURE_TTL = 60.0  # seconds a timeout or a resolver failure is remembered
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


@dataclass(frozen=True, slots=True)
class HostName:
    """What the look-up found: the PTR name, and the one that points back."""

    name: str | None = None  # the first safe PTR name, confirmed or not
    confirmed: str | None = None  # a PTR name whose A/AAAA records include the client

    def remote_host(self, paranoid: bool) -> str | None:
        """TCPREMOTEHOST: with -p only a confirmed name, as tcpserver."""
        return self.confirmed if paranoid else self.name


NO_NAME = HostName()


class HostCache:
    """Look-up results by (resolvers, address): bounded, least recently used out first."""

    def __init__(self, size: int = CACHE_SIZE, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[tuple[object, ...], tuple[float, HostName]] = OrderedDict()

    def get(self, key: tuple[object, ...]) -> HostName | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: tuple[object, ...], value: HostName, ttl: float) -> None:
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


CACHE = HostCache()


@functools.cache
def _resolver(servers: tuple[str, ...]) -> dns.asyncresolver.Resolver:
    resolver = make_resolver(servers, dnssec=False)
    resolver.cache = None  # HostCache keeps the answers, the failures too
    return resolver


async def lookup_host(
    ip: str,
    servers: Sequence[str] = (),
    *,
    seconds: float,
    confirm: bool = True,
    cache: HostCache = CACHE,
) -> HostName:
    """The host name of `ip` (lower case, no final dot), within `seconds`.

    `confirm`: also find a name that points back (paranoid, or for the rules).
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return NO_NAME
    key = _key(servers, address, confirm)
    cached = cache.get(key)
    if cached is not None:
        return cached
    resolver = _resolver(tuple(servers))
    found: HostName | None = None
    with trio.move_on_after(seconds):
        try:
            found = await _look_up(address, resolver, confirm)
        except dns.exception.DNSException as exc:
            log.debug("[%s]: no host name: %s", ip, exc.__class__.__name__)
            cache.put(key, NO_NAME, FAILURE_TTL)
            return NO_NAME
    if found is None:
        log.info("[%s]: host name look-up timed out after %gs", ip, seconds)
        cache.put(key, NO_NAME, FAILURE_TTL)
        return NO_NAME
    if confirm and found.name is not None and found.confirmed is None:
        log.debug("[%s]: no host name that points back to it", ip)
    cache.put(key, found, CACHE_TTL)
    return found


def _key(
    servers: Sequence[str],
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    confirm: bool,
) -> tuple[object, ...]:
    return (tuple(servers), address, confirm)


def cached_host(ip: str, profile: Profile, *, confirm: bool) -> HostName | None:
    """What the cache knows of `ip` for `profile`, or None: a look-up is due."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return NO_NAME
    confirm = confirm or profile.remote_host_paranoid
    return CACHE.get(_key(profile.dns_servers, address, confirm))


async def _look_up(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    resolver: dns.asyncresolver.Resolver,
    confirm: bool,
) -> HostName:
    try:
        answer = await resolver.resolve_address(str(address), raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return NO_NAME
    names = [safe_host(record.to_text()) for record in (answer.rrset or ())][:MAX_NAMES]
    safe = [name for name in names if name is not None]
    if not safe:
        return NO_NAME
    if not confirm:
        return HostName(safe[0])
    rdtype = "A" if address.version == 4 else "AAAA"
    for name in safe:
        try:
            forward = await resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            continue
        for record in forward.rrset or ():
            if ipaddress.ip_address(record.to_text()) == address:
                return HostName(safe[0], name)
    return HostName(safe[0])


class PendingHost:
    """A client's look-up, started at accept and awaited by what needs the name.

    `get` waits at most until `remote_host_timeout` after the start; `peek`
    never waits (the TLS log line takes the name only if it is known).
    """

    def __init__(self, result: HostName | None = None, deadline: float = 0.0) -> None:
        self._result = result
        self._done = trio.Event()
        self._deadline = deadline
        if result is not None:
            self._done.set()

    @classmethod
    def known(cls, name: str | None) -> PendingHost:
        """A name another program looked up (tcpserver's TCPREMOTEHOST in inetd mode)."""
        return cls(HostName(name, name) if name else NO_NAME)

    @classmethod
    def start(
        cls, nursery: trio.Nursery, ip: str, profile: Profile, *, confirm: bool
    ) -> PendingHost:
        """Start the look-up of `ip` as `profile` says, in `nursery`."""
        seconds = profile.remote_host_timeout
        pending = cls(deadline=trio.current_time() + seconds)
        confirm = confirm or profile.remote_host_paranoid
        nursery.start_soon(pending._run, ip, profile.dns_servers, seconds, confirm)
        return pending

    async def _run(self, ip: str, servers: Sequence[str], seconds: float, confirm: bool) -> None:
        try:
            self._result = await lookup_host(ip, servers, seconds=seconds, confirm=confirm)
        finally:
            self._done.set()

    async def get(self) -> HostName:
        """The result, waiting for it until the deadline at most."""
        if not self._done.is_set():
            with trio.move_on_at(self._deadline):
                await self._done.wait()
        return self._result or NO_NAME

    def peek(self) -> HostName:
        """The result if the look-up is over, else no name."""
        return self._result or NO_NAME


__all__ = [
    "CACHE",
    "NO_NAME",
    "HostCache",
    "HostName",
    "PendingHost",
    "cached_host",
    "lookup_host",
    "needs_host",
    "safe_host",
]
