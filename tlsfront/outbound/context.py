"""What the outbound relay keeps between sessions, and what tests replace.

One `Runtime` per process: the MTA-STS cache, resolvers by DNS server list,
the route credentials files (watched),
the trust store for `verify` and MTA-STS, the SMTP and HTTPS ports (25 and
443 in production; tests point them at their own servers) and the function
that opens TCP connections.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tlsfront.config.schema import Profile
from tlsfront.net.dns import make_resolver
from tlsfront.outbound.credentials import RouteLogins
from tlsfront.outbound.mtasts import StsCache
from tlsfront.outbound.mx import Dns
from tlsfront.tls.client import ClientContext, https_context

Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def tcp_connect(address: str, port: int) -> trio.abc.Stream:
    """A TCP connection to an address (never a name: DNS is done before)."""
    return await trio.open_tcp_stream(address, port)


@dataclass
class Runtime:
    smtp_port: int = 25
    https_port: int = 443
    # trust store for `verify`, MTA-STS and the policy fetch; None: the system's
    trust_cafile: Path | None = None
    trust_cadata: str | None = None
    connect: Connector = tcp_connect
    sts_cache: StsCache = field(default_factory=StsCache)
    _resolvers: dict[tuple[tuple[str, ...], bool], Dns] = field(default_factory=dict)
    _logins: dict[tuple[str, Path | None, Path | None], RouteLogins] = field(default_factory=dict)

    def dns(self, servers: tuple[str, ...], *, dnssec: bool) -> Dns:
        key = (servers, dnssec)
        if key not in self._resolvers:
            self._resolvers[key] = Dns(make_resolver(servers, dnssec=dnssec))
        return self._resolvers[key]

    def logins(self, profile: Profile) -> RouteLogins:
        """The profile's route credentials, watched for changes."""
        key = (profile.name, profile.route_credentials, profile.smtproutes)
        if key not in self._logins:
            self._logins[key] = RouteLogins(*key)
        return self._logins[key]

    def https_context(self) -> ClientContext:
        """WebPKI context for fetching MTA-STS policies (host name checked)."""
        return https_context(self.trust_cafile, self.trust_cadata)


_default: Runtime | None = None


def default_runtime() -> Runtime:
    global _default
    if _default is None:
        _default = Runtime()
    return _default
