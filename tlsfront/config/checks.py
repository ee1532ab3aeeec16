"""Checks a type cannot express: host names, addresses, networks, minimums.

`CHECKS` maps a key to the check run on its converted value; a check
returns the value (perhaps normalized) or raises `Bad` with the reason.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from tlsfront.config.account import AccountError, check_group, check_user
from tlsfront.config.errors import Bad
from tlsfront.net.address import is_ip, split_host_port

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DOMAIN = re.compile(r"\.?(?:[A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+\.?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_HEX_PAIRS = re.compile(r"(?:[0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}")


def hostname(text: str) -> str:
    if len(text) > 253 or not all(_LABEL.fullmatch(part) for part in text.split(".")):
        raise Bad(f"{text!r} is not a host name such as mail.example.com")
    return text


def _listen_address(text: str) -> str:
    try:
        host, _ = split_host_port(text)
    except ValueError as exc:
        raise Bad(f"{text!r}: {exc}") from None
    if host != "*" and not is_ip(host):
        raise Bad(f"{text!r}: listen on an IP address or *, not a name")
    return text


def _connect_address(text: str) -> str:
    try:
        host, port = split_host_port(text)
    except ValueError as exc:
        raise Bad(f"{text!r}: {exc}") from None
    if port == 0:
        raise Bad(f"{text!r}: port 0 is not a number from 1 to 65535")
    if is_ip(host):
        if ipaddress.ip_address(host).is_unspecified:
            raise Bad(f"{text!r}: cannot connect to an unspecified address")
    elif host == "*" or not _DOMAIN.fullmatch(host):
        raise Bad(f"{text!r}: {host!r} is not an IP address or a host name")
    return text


def _bind_ip(text: str) -> str:
    if not is_ip(text):
        raise Bad(f"{text!r} is not an IP address")
    return text


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise Bad(f"{text!r} is not a network such as 192.0.2.0/24 or 2001:db8::/32") from None


def _fingerprint(text: str) -> str:
    if not (_HEX64.fullmatch(text) or _HEX_PAIRS.fullmatch(text)):
        hint = ""
        if len(text.replace(":", "")) == 40:
            hint = " (this looks like SHA-1; use openssl x509 -noout -fingerprint -sha256)"
        raise Bad(f"{text!r} is not a SHA-256 fingerprint of 64 hex digits{hint}")
    digits = text.replace(":", "").upper()
    return ":".join(digits[i : i + 2] for i in range(0, 64, 2))


def _resolver(text: str) -> str:
    try:
        host = text if is_ip(text) else split_host_port(text)[0]
    except ValueError:
        host = ""
    if not is_ip(host):
        raise Bad(f"{text!r}: a resolver is an IP address, with an optional :port")
    return text


def _fd_name(text: str) -> str:
    if len(text) > 255 or ":" in text or not all(" " < c <= "~" for c in text):
        raise Bad(f"{text!r} is not a systemd FileDescriptorName")
    return text


def _argv(argv: tuple[str, ...]) -> tuple[str, ...]:
    if not argv or not argv[0]:
        raise Bad('must name a program: backend = ["/var/qmail/bin/qmail-smtpd"]')
    return argv


def _env(env: Mapping[str, str]) -> Mapping[str, str]:
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise Bad(f"{name!r} is not an environment variable name", (name,))
    return env


# Set by tlsfront for every session: never taken from its own environment.
OWNED_PREFIXES = ("SSL_",)
OWNED_NAMES = frozenset(
    {
        *("PROTO", "TCPLOCALIP", "TCPLOCALPORT", "TCPLOCALHOST"),
        *("TCPREMOTEIP", "TCPREMOTEPORT", "TCPREMOTEHOST"),
    }
)


def is_owned(name: str) -> bool:
    """Whether tlsfront itself sets the backend variable `name`, whatever it inherited."""
    return name in OWNED_NAMES or name.startswith(OWNED_PREFIXES)


def _inherit_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise Bad(f"{name!r} is not an environment variable name")
    if name == "RELAYCLIENT":
        raise Bad(
            "RELAYCLIENT is never taken from tlsfront's own environment: "
            "a RELAYCLIENT rule in `rules` or a client certificate grants it"
        )
    if is_owned(name):
        raise Bad(f"{name!r} is set by tlsfront for each session")
    return name


def _account(check: Callable[[str], str]) -> Callable[[str], str]:
    def run(value: str) -> str:
        try:
            return check(value)
        except AccountError as exc:
            raise Bad(str(exc)) from None

    return run


def _domains(table: Mapping[str, Any]) -> Mapping[str, Any]:
    for name in table:
        if name and not _DOMAIN.fullmatch(name):
            raise Bad(f'{name!r} is not a domain ("" is the default entry)', (name,))
    return table


def _routes(table: Mapping[str, str]) -> Mapping[str, str]:
    _domains(table)
    for name, target in table.items():
        if not target:
            continue  # "": deliver by MX, as an empty smtproutes relay does
        host_only = target.startswith("[") and target.endswith("]") and is_ip(target[1:-1])
        if not host_only and not (_DOMAIN.fullmatch(target) or is_ip(target)):
            try:
                _connect_address(target)
            except Bad as exc:
                raise Bad(f"{name!r}: {exc.message}", (name,)) from None
    return table


def _at_least(minimum: int, why: str = "") -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value < minimum:
            raise Bad(f"must be at least {minimum}{why}, not {value}")
        return value

    return check


def _above_zero(value: float) -> float:
    if value <= 0:
        raise Bad(f"must be more than 0 seconds, not {value}")
    return value


def _each(check: Callable[[str], str]) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    def run(values: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for n, value in enumerate(values, 1):
            try:
                out.append(check(value))
            except Bad as exc:
                where = "" if len(values) == 1 else f"item {n}: "
                raise Bad(where + exc.message) from None
        return tuple(out)

    return run


CHECKS: dict[str, Callable[[Any], Any]] = {
    "hostname": hostname,
    "metrics_listen": _listen_address,
    "workers": _at_least(0),
    "listen": _each(_listen_address),
    "systemd": _fd_name,
    "relay_fingerprints": _each(_fingerprint),
    "backend": _argv,
    "backend_connect": _connect_address,
    "relay_backend_connect": _connect_address,
    "source_address": _bind_ip,
    "relay_source_address": _bind_ip,
    "env": _env,
    "env_inherit": _each(_inherit_name),
    "user": _account(check_user),
    "group": _account(check_group),
    "max_connections": _at_least(1),
    "max_per_ip": _at_least(1),
    "max_command_line": _at_least(512, " (RFC 5321 4.5.3.1.4)"),
    "max_text_line": _at_least(1000, " (RFC 5321 4.5.3.1.6)"),
    "timeout_handshake": _above_zero,
    "timeout_command": _above_zero,
    "timeout_data": _above_zero,
    "timeout_backend": _above_zero,
    "remote_host_timeout": _above_zero,
    "timeout_connect": _above_zero,
    "proxy_trusted": _each(_network),
    "allow_from": _each(_network),
    "routes": _routes,
    "tls_policy": _domains,
    "dns_servers": _each(_resolver),
    "helo_name": hostname,
}
