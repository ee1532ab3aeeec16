"""tlsfront configuration: TOML read into frozen dataclasses, checked when loaded.

Theory of operation
-------------------
`tomllib` turns the file into dicts. Each key is converted by a converter
derived from the type annotation of the dataclass field of the same name
(bool, int, float, str, Path, Literal[...], tuple[...], Mapping[...]), then by
the extra check listed for it in `_CHECKS` (addresses, networks, fingerprints,
minimums). Nothing unknown is kept: a key that names no field is an error.

A profile is assembled from layers, the later winning:

    field defaults
    [defaults] keys           \\  the values read from a qmail control directory
    qmail control values       >  sit just below the table that names
    [profile.NAME] keys       /   qmail_control (profile's own, else [defaults])

Keys that belong to the other mode (inbound/outbound) are errors in a profile
and silently skipped when they come from [defaults]. Then the cross-key rules
of `_INBOUND_RULES` / `_OUTBOUND_RULES` run on the finished Profile.

tomllib reports no positions for keys, so `KeyLines` (tlsfront/tomllines.py) scans the (already
valid) text once and maps every table and dotted key path to its first line;
each ConfigError names the file, that line, the table and the key.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

from tlsfront.config.machine import default_hostname, default_state_dir
from tlsfront.config.tomllines import KeyLines
from tlsfront.qmail.control import QmailControl, QmailControlError, read_control

SYSTEM_CONFIG = Path("/etc/tlsfront/tlsfront.toml")

Mode = Literal["inbound", "outbound"]
TlsMode = Literal["starttls", "implicit", "none"]
TlsVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
BackendStart = Literal["on-demand", "connect"]
ClientCert = Literal["none", "request", "require"]
TlsPolicy = Literal["none", "may", "encrypt", "verify"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(Exception):
    """A configuration that cannot be used; str() is "FILE:LINE: [TABLE] key 'KEY': MESSAGE"."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        line: int | None = None,
        table: str | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.table = table
        self.key = key
        where = str(path) if path is not None else "<config>"
        if line is not None:
            where += f":{line}"
        what = f"[{table}]" if table else ""
        if key:
            what = f"{what} key '{key}'".lstrip()
        super().__init__(f"{where}: {what}: {message}" if what else f"{where}: {message}")


def _empty_map() -> Mapping[Any, Any]:
    return MappingProxyType({})


# The schema. Every field is a key of the same name in TOML; the annotation
# drives the conversion, `_CHECKS` below adds what a type cannot say.


@dataclass(frozen=True)
class Settings:
    """Global settings, from [defaults]."""

    hostname: str  # default: qmail control/me, else socket.getfqdn()
    state_dir: Path  # default: defaults.default_state_dir()
    log_format: LogFormat = "text"  # log lines as text or one JSON object each
    log_level: LogLevel = "info"  # least severe level logged
    metrics_listen: str | None = None  # "host:port" of the metrics endpoint
    workers: int = 0  # processes sharing the listening sockets; 0 = one per core
    shutdown_grace: float = 30.0  # seconds sessions get to finish on shutdown


@dataclass(frozen=True)
class Profile:
    """One listening service: [profile.NAME]."""

    name: str  # the NAME of [profile.NAME] (not a key)
    mode: Mode = "inbound"  # inbound: clients to a backend; outbound: qmail-remote out
    listen: tuple[str, ...] = ()  # "host:port" list: "0.0.0.0:25", "[::]:25", "*:25"
    systemd: str | None = None  # socket unit FileDescriptorName to take sockets from
    hostname: str = ""  # name in greetings and headers; from [defaults] when unset
    qmail_control: Path | None = None  # qmail control dir to read TLS files from
    # TLS (inbound)
    tls: TlsMode = "starttls"  # STARTTLS, TLS from the first byte (465), or none
    require_tls: bool = False  # 530 for MAIL/RCPT/DATA/AUTH before STARTTLS
    cert: tuple[Path, ...] = ()  # PEM certificate chain(s); a servercert.pem works alone
    key: tuple[Path, ...] = ()  # PEM keys, one per cert; empty: key is in the cert file
    ciphers: str | None = None  # OpenSSL cipher string for TLS <= 1.2
    ciphersuites: str | None = None  # TLS 1.3 cipher suites
    min_tls_version: TlsVersion = "TLSv1.2"  # oldest protocol accepted
    dhparams: Path | None = None  # PEM DH parameters (qmail dh2048.pem)
    client_cert: ClientCert = "none"  # ask for a client certificate; require = refuse without
    client_ca: Path | None = None  # CA bundle client certificates are verified against
    client_crl: Path | None = None  # PEM CRLs; revoked certificates do not authorize
    relay_clients: Path | None = None  # qmail tlsclients: addresses allowed to relay
    relay_fingerprints: tuple[str, ...] = ()  # SHA-256 fingerprints allowed to relay
    relay_fingerprints_file: Path | None = None  # same, one a line (relay_fingerprints = "path")
    # backend (inbound)
    backend: tuple[str, ...] = ()  # argv run for each session (qmail-smtpd)
    backend_start: BackendStart = "on-demand"  # at the first command that needs it, or connect
    backend_connect: str | None = None  # "host:port" of a TCP backend instead
    relay_backend_connect: str | None = None  # TCP backend for sessions allowed to relay
    source_address: str | None = None  # local IP to connect to the TCP backend from
    relay_source_address: str | None = None  # same, for sessions allowed to relay
    backend_rules: Path | None = None  # the TCP backend's own tcprules source, for `check`
    env: Mapping[str, str] = field(default_factory=_empty_map)  # extra backend environment
    rules: Path | None = None  # tcprules source file (/etc/tcp.smtp)
    received_header: bool = True  # add tlsfront's Received header to each message
    # limits and timeouts
    max_connections: int = 200  # sessions at once on this profile
    max_per_ip: int = 50  # sessions at once from one client address
    max_message_size: int = 0  # bytes, 0 = unlimited (qmail databytes)
    max_command_line: int = 512  # octets with CRLF (RFC 5321 minimum 512)
    max_text_line: int = 1000  # octets with CRLF (RFC 5321 minimum 1000)
    timeout_handshake: float = 30.0  # seconds for the TLS handshake
    timeout_command: float = 300.0  # seconds idle between commands
    timeout_data: float = 300.0  # seconds idle inside DATA
    min_data_rate: int = 500  # bytes/s a DATA transfer must keep up, 0 = off
    timeout_backend: float = 300.0  # seconds to wait for a backend reply
    tls_rate_limit: int = 0  # new TLS sessions a minute per client IP, 0 = off
    proxy_protocol: bool = False  # expect a PROXY protocol header (v1/v2)
    proxy_trusted: tuple[str, ...] = ()  # networks allowed to send PROXY headers
    # outbound (mode = "outbound")
    allow_from: tuple[str, ...] = ("127.0.0.1/32", "::1/128")  # networks that may relay out
    routes: Mapping[str, str] = field(default_factory=_empty_map)  # domain -> "host[:port]"
    tlshosts: Path | None = None  # qmail tlshosts/: <host>.pem = TLS required, verified
    notlshosts: Path | None = None  # qmail notlshosts/: <host> = no STARTTLS
    client_cert_file: Path | None = None  # qmail clientcert.pem, shown to servers that ask
    tls_policy: Mapping[str, TlsPolicy] = field(default_factory=_empty_map)  # domain -> policy
    mta_sts: bool = False  # honour MTA-STS policies (RFC 8461)
    dane: bool = False  # honour DANE TLSA records (RFC 7672)
    dns_servers: tuple[str, ...] = ()  # "ip[:port]" resolvers (outbound; =host rules inbound)
    helo_name: str | None = None  # EHLO name outbound; default hostname
    timeout_connect: float = 30.0  # seconds to connect to a remote server


@dataclass(frozen=True)
class Config:
    path: Path | None  # None for the embedded default
    settings: Settings
    profiles: Mapping[str, Profile]  # in file order


_INBOUND_ONLY = frozenset(
    {
        *("tls", "require_tls", "cert", "key", "dhparams", "received_header", "tls_rate_limit"),
        *("client_cert", "client_ca", "client_crl", "relay_clients", "relay_fingerprints"),
        *("relay_fingerprints_file", "backend", "backend_connect", "relay_backend_connect"),
        *("source_address", "relay_source_address", "backend_rules", "env", "rules"),
        *("proxy_protocol", "proxy_trusted", "backend_start"),
    }
)
_OUTBOUND_ONLY = frozenset(
    {
        *("allow_from", "routes", "tlshosts", "notlshosts", "client_cert_file", "tls_policy"),
        *("mta_sts", "dane", "helo_name", "timeout_connect"),
    }
)
# keys that take a single string as well as a list
_ONE_OR_MANY = frozenset({"cert", "key", "listen"})


# -- conversions driven by the annotations ----------------------------------


class _Bad(Exception):
    """A value that does not fit; `sub` names the part of it (a table key)."""

    def __init__(self, message: str, sub: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.sub = sub


@dataclass(frozen=True)
class _Ctx:
    base: Path  # relative paths are relative to this directory
    environ: Mapping[str, str]

    def path(self, text: str) -> Path:
        home = self.environ.get("HOME")
        if home and (text == "~" or text.startswith("~/")):
            p = Path(home) / text[2:]
        else:
            p = Path(text).expanduser()
        return p if p.is_absolute() else self.base / p


_Conv = Callable[[Any, _Ctx], Any]


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML dates and times


def _to_bool(value: Any, ctx: _Ctx) -> bool:
    if isinstance(value, bool):
        return value
    raise _Bad(f"must be true or false, not {_describe(value)}")


def _to_int(value: Any, ctx: _Ctx) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"must be a whole number, not {_describe(value)}")
    if value < 0:
        raise _Bad(f"must not be negative, not {value}")
    return value


def _to_float(value: Any, ctx: _Ctx) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"must be a number, not {_describe(value)}")
    if not math.isfinite(value):
        raise _Bad(f"must be a finite number, not {value}")
    if value < 0:
        raise _Bad(f"must not be negative, not {value}")
    return float(value)


def _to_str(value: Any, ctx: _Ctx) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be a string, not {_describe(value)}")
    if "\0" in value:
        raise _Bad("must not contain a NUL character")
    return value


def _to_nonempty_str(value: Any, ctx: _Ctx) -> str:
    text = _to_str(value, ctx)
    if not text:
        raise _Bad("must not be empty (leave the key out instead)")
    return text


def _to_path(value: Any, ctx: _Ctx) -> Path:
    if not isinstance(value, str):
        raise _Bad(f"must be a path (a string), not {_describe(value)}")
    if not value or "\0" in value:
        raise _Bad("must be a non-empty path without NUL characters")
    return ctx.path(value)


def _to_literal(choices: tuple[str, ...]) -> _Conv:
    def conv(value: Any, ctx: _Ctx) -> str:
        if isinstance(value, str) and value in choices:
            return value
        listed = ", ".join(repr(c) for c in choices)
        raise _Bad(f"must be one of {listed}, not {_describe(value)}")

    return conv


def _to_tuple(item: _Conv, one_or_many: bool) -> _Conv:
    def conv(value: Any, ctx: _Ctx) -> tuple[Any, ...]:
        if one_or_many and isinstance(value, str):
            return (item(value, ctx),)
        if not isinstance(value, list):
            kind = "a string or a list" if one_or_many else "a list"
            raise _Bad(f"must be {kind}, not {_describe(value)}")
        out = []
        for n, element in enumerate(value, 1):
            try:
                out.append(item(element, ctx))
            except _Bad as exc:
                raise _Bad(f"item {n}: {exc.message}") from None
        return tuple(out)

    return conv


def _to_mapping(item: _Conv) -> _Conv:
    def conv(value: Any, ctx: _Ctx) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise _Bad(f'must be a table such as {{ NAME = "value" }}, not {_describe(value)}')
        out = {}
        for name, element in value.items():
            try:
                out[name] = item(element, ctx)
            except _Bad as exc:
                raise _Bad(f"{name!r}: {exc.message}", (name,)) from None
        return MappingProxyType(out)

    return conv


_SIMPLE: dict[Any, _Conv] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: _to_path,
}


def _converter(name: str, annotation: Any) -> _Conv:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):  # X | None: TOML has no null, so just X
        (inner,) = (a for a in args if a is not type(None))
        conv = _converter(name, inner)
        return _to_nonempty_str if conv is _to_str else conv
    if origin is Literal:
        return _to_literal(args)
    if origin is tuple:
        return _to_tuple(_converter(name, args[0]), name in _ONE_OR_MANY)
    if origin is Mapping:
        return _to_mapping(_converter(name, args[1]))
    return _SIMPLE[annotation]


def _converters(cls: type, skip: frozenset[str] = frozenset()) -> dict[str, _Conv]:
    hints = get_type_hints(cls)
    return {f.name: _converter(f.name, hints[f.name]) for f in fields(cls) if f.name not in skip}


_SETTINGS_CONV = _converters(Settings)
_PROFILE_CONV = _converters(Profile, frozenset({"name"}))


# -- checks a type cannot express -----------------------------------------------

_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DOMAIN = re.compile(r"\.?(?:[A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+\.?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_HEX_PAIRS = re.compile(r"(?:[0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}")


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


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _hostname(text: str) -> str:
    if len(text) > 253 or not all(_LABEL.fullmatch(part) for part in text.split(".")):
        raise _Bad(f"{text!r} is not a host name such as mail.example.com")
    return text


def _listen_address(text: str) -> str:
    try:
        host, _ = split_host_port(text)
    except ValueError as exc:
        raise _Bad(f"{text!r}: {exc}") from None
    if host != "*" and not _is_ip(host):
        raise _Bad(f"{text!r}: listen on an IP address or *, not a name")
    return text


def _connect_address(text: str) -> str:
    try:
        host, port = split_host_port(text)
    except ValueError as exc:
        raise _Bad(f"{text!r}: {exc}") from None
    if port == 0:
        raise _Bad(f"{text!r}: port 0 is not a number from 1 to 65535")
    if _is_ip(host):
        if ipaddress.ip_address(host).is_unspecified:
            raise _Bad(f"{text!r}: cannot connect to an unspecified address")
    elif host == "*" or not _DOMAIN.fullmatch(host):
        raise _Bad(f"{text!r}: {host!r} is not an IP address or a host name")
    return text


def _bind_ip(text: str) -> str:
    if not _is_ip(text):
        raise _Bad(f"{text!r} is not an IP address")
    return text


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise _Bad(f"{text!r} is not a network such as 192.0.2.0/24 or 2001:db8::/32") from None


def _fingerprint(text: str) -> str:
    if not (_HEX64.fullmatch(text) or _HEX_PAIRS.fullmatch(text)):
        hint = ""
        if len(text.replace(":", "")) == 40:
            hint = " (this looks like SHA-1; use openssl x509 -noout -fingerprint -sha256)"
        raise _Bad(f"{text!r} is not a SHA-256 fingerprint of 64 hex digits{hint}")
    digits = text.replace(":", "").upper()
    return ":".join(digits[i : i + 2] for i in range(0, 64, 2))


def _resolver(text: str) -> str:
    try:
        host = text if _is_ip(text) else split_host_port(text)[0]
    except ValueError:
        host = ""
    if not _is_ip(host):
        raise _Bad(f"{text!r}: a resolver is an IP address, with an optional :port")
    return text


def _fd_name(text: str) -> str:
    if len(text) > 255 or ":" in text or not all(" " < c <= "~" for c in text):
        raise _Bad(f"{text!r} is not a systemd FileDescriptorName")
    return text


def _argv(argv: tuple[str, ...]) -> tuple[str, ...]:
    if not argv or not argv[0]:
        raise _Bad('must name a program: backend = ["/var/qmail/bin/qmail-smtpd"]')
    return argv


def _env(env: Mapping[str, str]) -> Mapping[str, str]:
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise _Bad(f"{name!r} is not an environment variable name", (name,))
    return env


def _domains(table: Mapping[str, Any]) -> Mapping[str, Any]:
    for name in table:
        if name and not _DOMAIN.fullmatch(name):
            raise _Bad(f'{name!r} is not a domain ("" is the default entry)', (name,))
    return table


def _routes(table: Mapping[str, str]) -> Mapping[str, str]:
    _domains(table)
    for name, target in table.items():
        if not target:
            continue  # "": deliver by MX, as an empty smtproutes relay does
        host_only = target.startswith("[") and target.endswith("]") and _is_ip(target[1:-1])
        if not host_only and not (_DOMAIN.fullmatch(target) or _is_ip(target)):
            try:
                _connect_address(target)
            except _Bad as exc:
                raise _Bad(f"{name!r}: {exc.message}", (name,)) from None
    return table


def _at_least(minimum: int, why: str = "") -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value < minimum:
            raise _Bad(f"must be at least {minimum}{why}, not {value}")
        return value

    return check


def _above_zero(value: float) -> float:
    if value <= 0:
        raise _Bad(f"must be more than 0 seconds, not {value}")
    return value


def _each(check: Callable[[str], str]) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    def run(values: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for n, value in enumerate(values, 1):
            try:
                out.append(check(value))
            except _Bad as exc:
                where = "" if len(values) == 1 else f"item {n}: "
                raise _Bad(where + exc.message) from None
        return tuple(out)

    return run


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "hostname": _hostname,
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
    "max_connections": _at_least(1),
    "max_per_ip": _at_least(1),
    "max_command_line": _at_least(512, " (RFC 5321 4.5.3.1.4)"),
    "max_text_line": _at_least(1000, " (RFC 5321 4.5.3.1.6)"),
    "timeout_handshake": _above_zero,
    "timeout_command": _above_zero,
    "timeout_data": _above_zero,
    "timeout_backend": _above_zero,
    "timeout_connect": _above_zero,
    "proxy_trusted": _each(_network),
    "allow_from": _each(_network),
    "routes": _routes,
    "tls_policy": _domains,
    "dns_servers": _each(_resolver),
    "helo_name": _hostname,
}


# -- rules across keys, run on the finished Profile -----------------------------

_Rule = tuple[str, Callable[[Profile], bool], str]

_NEEDS_LISTEN: _Rule = (
    "listen",
    lambda p: not p.listen and p.systemd is None,
    'needs listen = ["host:port", ...] or systemd = "NAME"',
)
_INBOUND_RULES: tuple[_Rule, ...] = (
    _NEEDS_LISTEN,
    (
        "backend",
        lambda p: not p.backend and p.backend_connect is None,
        'needs backend = ["/var/qmail/bin/qmail-smtpd"] or backend_connect = "host:port"',
    ),
    (
        "backend_connect",
        lambda p: bool(p.backend) and p.backend_connect is not None,
        "and backend are both set: a profile has one backend",
    ),
    (
        "cert",
        lambda p: p.tls != "none" and not p.cert,
        "tls = {p.tls!r} needs a certificate: set cert (a qmail servercert.pem works"
        " alone) or qmail_control to a directory with servercert.pem",
    ),
    (
        "key",
        lambda p: bool(p.key) and len(p.key) != len(p.cert),
        "has {n_key} entries but cert has {n_cert}: give one key per cert, or none"
        " when each cert file holds its key",
    ),
    ("require_tls", lambda p: p.require_tls and p.tls == "none", "needs TLS, but tls = 'none'"),
    (
        "client_cert",
        lambda p: p.client_cert != "none" and p.tls == "none",
        "{p.client_cert!r} needs TLS, but tls = 'none'",
    ),
    (
        "client_cert",
        lambda p: p.client_cert == "require" and p.client_ca is None,
        "'require' needs client_ca, the CA bundle to verify client certificates with",
    ),
    (
        "relay_clients",
        lambda p: p.relay_clients is not None and p.client_ca is None,
        "needs client_ca: addresses are trusted only from certificates verified against it",
    ),
    *(
        (
            name,
            lambda p, name=name: p.client_cert == "none" and bool(getattr(p, name)),
            'would never be used: set client_cert = "request"',
        )
        for name in ("relay_clients", "relay_fingerprints", "relay_fingerprints_file")
    ),
    *(
        (
            name,
            lambda p, name=name: getattr(p, name) is not None and p.backend_connect is None,
            "works only with backend_connect (an exec backend gets RELAYCLIENT instead)",
        )
        for name in (
            "relay_backend_connect",
            "source_address",
            "relay_source_address",
            "backend_rules",
        )
    ),
    (
        "relay_backend_connect",
        lambda p: (
            p.relay_backend_connect is not None and p.relay_backend_connect == p.backend_connect
        ),
        "equals backend_connect: relaying and other sessions would be indistinguishable",
    ),
    (
        "relay_source_address",
        lambda p: p.relay_source_address is not None and p.relay_source_address == p.source_address,
        "equals source_address: relaying and other sessions would be indistinguishable",
    ),
    (
        "proxy_protocol",
        lambda p: p.proxy_protocol and not p.proxy_trusted,
        "needs proxy_trusted: otherwise any client could claim any address",
    ),
)
_OUTBOUND_RULES: tuple[_Rule, ...] = (_NEEDS_LISTEN,)


# -- building a Config ----------------------------------------------------------


class _Where(NamedTuple):
    table: tuple[str, ...] | None  # None: from a qmail control file
    key: str  # the key as written (or the control file's name)
    file: Path | None = None  # the control file


class _Val(NamedTuple):
    value: Any
    where: _Where


def _table_name(table: tuple[str, ...]) -> str:
    return ".".join(table)


_PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class _Builder:
    def __init__(
        self,
        data: Mapping[str, Any],
        path: Path | None,
        lines: KeyLines | None,
        environ: Mapping[str, str] | None,
    ) -> None:
        self.data = data
        self.path = path
        self.lines = lines
        self.environ = os.environ if environ is None else environ
        base = path.absolute().parent if path is not None else Path.cwd()
        self.ctx = _Ctx(base, self.environ)
        self._controls: dict[Path, QmailControl] = {}

    # errors

    def error(
        self,
        table: tuple[str, ...] | None,
        key: str | None,
        message: str,
        sub: tuple[str, ...] = (),
    ) -> ConfigError:
        line = None
        if self.lines is not None and table is not None:
            line = self.lines.find(table + ((key,) if key else ()) + sub)
        return ConfigError(
            message,
            path=self.path,
            line=line,
            table=_table_name(table) if table else None,
            key=key,
        )

    def profile_error(
        self, table: tuple[str, ...], field_name: str, merged: Mapping[str, _Val], message: str
    ) -> ConfigError:
        """An error about a profile, at the key's line when the profile set it."""
        val = merged.get(field_name)
        if val is None:
            return self.error(table, field_name, message)
        where = val.where
        if where.table == table:
            return self.error(table, where.key, message)
        if where.table is not None:
            line = self.lines.find((*where.table, where.key)) if self.lines else None
            at = f", line {line}" if line else ""
            message += f" (set in [{_table_name(where.table)}]{at})"
        else:
            message += f" (from qmail control file {where.file})"
        return self.error(table, field_name, message)

    def unknown(self, table: tuple[str, ...], key: str, known: set[str]) -> ConfigError:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return self.error(table, key, f"unknown key{hint}")

    # conversion

    def convert(
        self, table: tuple[str, ...], key: str, value: Any, convs: Mapping[str, _Conv]
    ) -> tuple[str, _Val]:
        name = key
        if key == "relay_fingerprints" and isinstance(value, str):
            name = "relay_fingerprints_file"  # a Postfix relay_clientcerts file
        try:
            result = convs[name](value, self.ctx)
            check = _CHECKS.get(name)
            if check is not None:
                result = check(result)
        except _Bad as exc:
            raise self.error(table, key, exc.message, exc.sub) from None
        return name, _Val(result, _Where(table, key))

    def table(
        self, table: tuple[str, ...], raw: Any, convs: Mapping[str, _Conv], known: set[str]
    ) -> dict[str, _Val]:
        if not isinstance(raw, dict):
            raise self.error(table[:-1], table[-1], f"must be a table, not {_describe(raw)}")
        out: dict[str, _Val] = {}
        for key, value in raw.items():
            if key not in convs:
                if key in _SETTINGS_CONV:
                    raise self.error(table, key, "is a global setting: put it in [defaults]")
                raise self.unknown(table, key, known)
            name, val = self.convert(table, key, value, convs)
            if name in out:
                raise self.error(table, key, f"is given twice (also as '{out[name].where.key}')")
            out[name] = val
        return out

    def control(self, val: _Val) -> QmailControl:
        directory: Path = val.value
        if directory not in self._controls:
            try:
                self._controls[directory] = read_control(directory, self.environ)
            except QmailControlError as exc:
                assert val.where.table is not None
                raise self.error(val.where.table, val.where.key, str(exc)) from None
        return self._controls[directory]

    def control_values(self, qc: QmailControl, mode: str) -> dict[str, _Val]:
        """What the qmail-tls patch would take from the control directory."""
        out: dict[str, _Val] = {}

        def put(name: str, value: Any, file: Path | None) -> None:
            if value is not None and file is not None:
                out[name] = _Val(value, _Where(None, file.name, file))

        d = qc.directory
        if mode == "outbound":
            put("tlshosts", qc.tlshosts, qc.tlshosts)
            put("notlshosts", qc.notlshosts, qc.notlshosts)
            put("client_cert_file", qc.clientcert, qc.clientcert)
            return out
        put("cert", (qc.servercert,) if qc.servercert else None, qc.servercert)
        put("client_ca", qc.clientca, qc.clientca)
        put("client_crl", qc.clientcrl, qc.clientcrl)
        if qc.clientca is not None:  # the patch ignores tlsclients without a CA
            put("relay_clients", qc.tlsclients, qc.tlsclients)
        if qc.clientca is not None and qc.tlsclients is not None:
            put("client_cert", "request", qc.tlsclients)  # the patch then asks for one
        from_env = "TLSCIPHERS" in self.environ and bool(self.environ["TLSCIPHERS"])
        put("ciphers", qc.ciphers, Path("$TLSCIPHERS") if from_env else d / "tlsserverciphers")
        put("dhparams", qc.dhparams, qc.dhparams)
        if qc.databytes is not None and qc.databytes < 0:
            raise ConfigError("must not be negative", path=d / "databytes")
        put("max_message_size", qc.databytes, d / "databytes")
        return out

    def me(self, qc: QmailControl) -> str | None:
        if qc.me is None:
            return None
        try:
            return _hostname(qc.me)
        except _Bad as exc:
            raise ConfigError(exc.message, path=qc.directory / "me", line=1) from None

    # the whole

    def build(self) -> Config:
        for top, value in self.data.items():
            if top in ("defaults", "profile"):
                continue
            if isinstance(value, dict):
                message = "unknown table: the file holds [defaults] and [profile.NAME] tables"
                raise self.error((top,), None, message)
            raise self.error((), top, "unknown key outside any table: settings go in [defaults]")
        known = set(_SETTINGS_CONV) | set(_PROFILE_CONV)
        both = {**_PROFILE_CONV, **_SETTINGS_CONV}
        defaults = self.table(("defaults",), self.data.get("defaults", {}), both, known)
        d_settings = {k: v for k, v in defaults.items() if k in _SETTINGS_CONV}
        d_profile = {k: v for k, v in defaults.items() if k in _PROFILE_CONV}
        d_qc = self.control(d_profile["qmail_control"]) if "qmail_control" in d_profile else None

        settings_values = {k: v.value for k, v in d_settings.items()}
        if "hostname" not in settings_values:
            settings_values["hostname"] = (d_qc and self.me(d_qc)) or default_hostname()
        settings_values.setdefault("state_dir", default_state_dir(self.environ))
        settings = Settings(**settings_values)

        raw_profiles = self.data.get("profile", {})
        if not isinstance(raw_profiles, dict):
            raise self.error(("profile",), None, "must be [profile.NAME] tables")
        if not raw_profiles:
            raise self.error(None, None, "no [profile.NAME] table: nothing to serve")
        profiles: dict[str, Profile] = {}
        listening: dict[tuple[str, int], str] = {}
        sockets: dict[str, str] = {}
        for name, raw in raw_profiles.items():
            table = ("profile", name)
            if not _PROFILE_NAME.fullmatch(name):
                raise self.error(table, None, "a profile name is letters, digits, '_' and '-'")
            profile, merged = self.profile(table, raw, d_profile, d_qc, settings)
            for address in profile.listen:
                host, port = split_host_port(address)
                if host != "*":
                    host = ipaddress.ip_address(host).compressed
                if port != 0 and (host, port) in listening:  # 0: a free port each
                    other = listening[host, port]
                    where = "twice in listen" if other == name else f"also in [profile.{other}]"
                    raise self.profile_error(table, "listen", merged, f"{address!r} is {where}")
                listening[host, port] = name
            if profile.systemd is not None:
                other = sockets.setdefault(profile.systemd, name)
                if other != name:
                    raise self.profile_error(
                        table, "systemd", merged, f"{profile.systemd!r} is also [profile.{other}]'s"
                    )
            profiles[name] = profile
        return Config(self.path, settings, MappingProxyType(profiles))

    def profile(
        self,
        table: tuple[str, ...],
        raw: Any,
        d_profile: dict[str, _Val],
        d_qc: QmailControl | None,
        settings: Settings,
    ) -> tuple[Profile, dict[str, _Val]]:
        known = set(_PROFILE_CONV)
        own = self.table(table, raw, _PROFILE_CONV, known)
        mode_val = own.get("mode") or d_profile.get("mode")
        mode = "inbound" if mode_val is None else mode_val.value
        foreign = _OUTBOUND_ONLY if mode == "inbound" else _INBOUND_ONLY
        for name, val in own.items():
            if name in foreign:
                raise self.error(table, val.where.key, f"is not used by mode = {mode!r} profiles")
        inherited = {k: v for k, v in d_profile.items() if k not in foreign}
        if "backend" in own or "backend_connect" in own:  # the profile picks its own kind
            inherited.pop("backend", None)
            inherited.pop("backend_connect", None)

        # qmail control values sit just below the table that names the directory
        layers: list[dict[str, _Val]] = [inherited, own]
        qc = None
        if "qmail_control" in own:
            qc = self.control(own["qmail_control"])
            layers.insert(1, self.control_values(qc, mode))
        elif d_qc is not None:
            qc = d_qc
            layers.insert(0, self.control_values(qc, mode))
        merged: dict[str, _Val] = {}
        for layer in layers:
            merged.update(layer)

        if "hostname" not in merged:
            me = self.me(qc) if qc is not None else None
            merged["hostname"] = _Val(me or settings.hostname, _Where(None, "me"))
        relay_clients = merged.get("relay_clients")
        # an explicit client_cert = "none" switches the control files' relaying off
        from_control = relay_clients is not None and relay_clients.where.table is None
        if from_control and merged["client_cert"].value == "none":
            del merged["relay_clients"]

        profile = Profile(name=table[-1], **{k: v.value for k, v in merged.items()})
        rules = _INBOUND_RULES if mode == "inbound" else _OUTBOUND_RULES
        for key, broken, message in rules:
            if broken(profile):
                text = message.format(p=profile, n_key=len(profile.key), n_cert=len(profile.cert))
                raise self.profile_error(table, key, merged, text)
        return profile, merged


# -- public entry points --------------------------------------------------------

_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def parse_config(
    text: str, path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Parse and check TOML `text`; `path` names it in errors and anchors relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line: int | None = None
        match = _AT_LINE.search(message)
        if match:
            line = int(match[1])
            message = f"{message[: match.start()]} (column {match[2]})"
        elif message.endswith("(at end of document)"):
            line = text.count("\n") + 1
        raise ConfigError(f"TOML syntax: {message}", path=path, line=line) from exc
    return _Builder(data, path, KeyLines(text), environ).build()


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and check the configuration file at `path`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path=path) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError("is not UTF-8 text", path=path, line=line) from exc
    return parse_config(text, path, environ)


def config_from_dict(
    data: Mapping[str, Any], path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Check a configuration given as the dicts tomllib would produce (no line numbers)."""
    return _Builder(data, path, None, environ).build()


def find_config(explicit: Path | None) -> Path | None:
    """The file to load: `explicit`, else SYSTEM_CONFIG if it exists, else None (embedded)."""
    if explicit is not None:
        return explicit
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None
