"""What the outbound relay keeps between sessions, and what tests replace.

One `Runtime` per process: the MTA-STS cache, resolvers by DNS server list,
the trust store for `verify` and MTA-STS, the SMTP and HTTPS ports (25 and
443 in production; tests point them at their own servers) and the function
that opens TCP connections.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tlsfront.net.dns import make_resolver
from tlsfront.outbound.certcheck import client_context
from tlsfront.outbound.mtasts import StsCache
from tlsfront.outbound.mx import Dns

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

    def dns(self, servers: tuple[str, ...], *, dnssec: bool) -> Dns:
        key = (servers, dnssec)
        if key not in self._resolvers:
            self._resolvers[key] = Dns(make_resolver(servers, dnssec=dnssec))
        return self._resolvers[key]

    def https_context(self) -> ssl.SSLContext:
        """WebPKI context for fetching MTA-STS policies (host name checked)."""
        ctx = client_context(verify=True, cafile=self.trust_cafile, cadata=self.trust_cadata)
        ctx.verify_flags &= ~ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.check_hostname = True
        return ctx


_default: Runtime | None = None


def default_runtime() -> Runtime:
    global _default
    if _default is None:
        _default = Runtime()
    return _default
