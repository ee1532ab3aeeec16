"""Addresses: an (ip, port) pair, "host:port" text, IP literals.

Small shared types used by the listeners, the backends, the PROXY protocol,
the configuration checks and the outbound relay alike.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Address:
    ip: str
    port: int

    @classmethod
    def from_sockaddr(cls, sockaddr: object) -> Address:
        if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
            return cls(unmap(str(sockaddr[0])), int(sockaddr[1]))
        return cls("0.0.0.0", 0)


@functools.lru_cache(maxsize=4096)  # per connection, and ipaddress is slow
def unmap(ip: str) -> str:
    """`::ffff:1.2.3.4` is 1.2.3.4 to qmail and tcprules."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@functools.lru_cache(maxsize=64)  # the few configured hosts, looked at per connection
def is_ip(text: str) -> bool:
    """Whether `text` is an IPv4 or IPv6 address (no brackets)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def ip_literal(host: str) -> str | None:
    """The address when `host` is an IP address or `[address]`, else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]").removeprefix("IPv6:")))
    except ValueError:
        return None


def split_host_port(text: str) -> tuple[str, int]:
    """Split "host:port" or "[IPv6]:port"; the host comes back without brackets.

    The host may be "*" (every address). Port 0 passes (a listener on a free
    port, for tests); connect addresses refuse it. Raises ValueError with a
    reason; values from a loaded Config always split.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError("an IPv6 address is written [address]:port")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError("missing ':port'")
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets: [::1]:25")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535")
    if not host:
        raise ValueError("missing host before ':port' (use * for every address)")
    return host, int(port_text)


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port`, `[v4]`, a bare IPv6 address: lenient.

    For values the configuration has already checked (routes, resolvers);
    `split_host_port` is the strict form that says what is wrong.
    """
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port
