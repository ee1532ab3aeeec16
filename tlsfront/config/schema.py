"""The configuration schema: every key, its type, its default and where it applies.

This is the one table of keys. `Settings` holds the global settings, which
stand in `[defaults]` only. Each field of `Profile` is a key of
`[profile.NAME]` (and of `[defaults]`, as a default for the profiles that
accept it), and declares the profiles it applies to:

    inbound(...)   inbound profiles only (clients in front of a backend)
    outbound(...)  outbound profiles only (the relay for qmail-remote)
    both(...)      every profile

A key set in a profile it does not apply to would be ignored, so the loader
refuses it, naming the file, the line and the key. A key in `[defaults]`
applies to the profiles that accept it and is left out of the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

Mode = Literal["inbound", "outbound"]
Scope = Literal["inbound", "outbound", "both", "defaults"]
TlsMode = Literal["starttls", "implicit", "none"]
TlsVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
ClientCert = Literal["none", "request", "require"]
BackendStart = Literal["on-demand", "connect"]
TlsPolicy = Literal["none", "may", "encrypt", "verify"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
# PEM files, one per key type (RSA, ECDSA); or a table of such lists by
# server name (SNI), with a "default" entry (tlsfront.config.certtable)
CertFiles = tuple[Path, ...] | Mapping[str, tuple[Path, ...]]

_APPLIES = "applies"


def _key(scope: Scope, default: Any = MISSING, factory: Callable[[], Any] | None = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={_APPLIES: scope})
    return field(default=default, metadata={_APPLIES: scope})


def inbound(default: Any = MISSING, *, factory: Callable[[], Any] | None = None) -> Any:
    """A key of inbound profiles only."""
    return _key("inbound", default, factory)


def outbound(default: Any = MISSING, *, factory: Callable[[], Any] | None = None) -> Any:
    """A key of outbound profiles only."""
    return _key("outbound", default, factory)


def both(default: Any = MISSING, *, factory: Callable[[], Any] | None = None) -> Any:
    """A key of every profile."""
    return _key("both", default, factory)


def _empty_map() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Settings:
    """Global settings, from [defaults] only."""

    hostname: str  # default: qmail control/me, else socket.getfqdn()
    state_dir: Path  # default: machine.default_state_dir()
    log_format: LogFormat = "text"  # log lines as text or one JSON object each
    log_level: LogLevel = "info"  # least severe level logged
    metrics_listen: str | None = None  # "host:port" of the metrics endpoint
    workers: int = 0  # processes sharing the listening sockets; 0 = one per core
    shutdown_grace: float = 30.0  # seconds sessions get to finish on shutdown
    handoff_socket: Path | None = None  # UNIX socket inetd starters hand connections to
    handoff_user: str | None = None  # the one account that may hand over; default: the serving one


@dataclass(frozen=True)
class Profile:
    """One listening service: [profile.NAME]."""

    name: str  # the NAME of [profile.NAME] (not a key)
    mode: Mode = both("inbound")  # inbound: clients to a backend; outbound: qmail-remote out
    listen: tuple[str, ...] = both(())  # "host:port" list: "0.0.0.0:25", "[::]:25", "*:25"
    systemd: str | None = both(None)  # socket unit FileDescriptorName to take sockets from
    hostname: str = both("")  # name in greetings and headers; from [defaults] when unset
    qmail_control: Path | None = both(None)  # qmail control dir to read TLS files from
    # TLS (inbound)
    tls: TlsMode = inbound("starttls")  # STARTTLS, TLS from the first byte (465), or none
    require_tls: bool = inbound(False)  # 530 for MAIL/RCPT/DATA/AUTH before STARTTLS
    cert: CertFiles = inbound(())  # PEM chain(s), or a table by server name; servercert.pem alone
    key: CertFiles = inbound(())  # PEM keys, one per cert (same names); empty: key is in the cert
    ciphers: str | None = inbound(None)  # OpenSSL cipher string for TLS <= 1.2
    ciphersuites: str | None = inbound(None)  # TLS 1.3 cipher suites
    min_tls_version: TlsVersion = both("TLSv1.2")  # oldest protocol accepted (and offered out)
    dhparams: Path | None = inbound(None)  # PEM DH parameters (qmail dh2048.pem)
    client_cert: ClientCert = inbound(
        "none"
    )  # ask for a client cert; "require": no cert, no session
    client_ca: Path | None = inbound(None)  # CA bundle client certificates are verified against
    client_crl: Path | None = inbound(None)  # PEM CRLs; revoked certificates do not authorize
    relay_clients: Path | None = inbound(None)  # qmail tlsclients: addresses allowed to relay
    relay_fingerprints: tuple[str, ...] = inbound(())  # SHA-256 fingerprints allowed to relay
    relay_fingerprints_file: Path | None = inbound(None)  # same, one a line (a path given)
    # backend (inbound)
    backend: tuple[str, ...] = inbound(())  # argv run for each session (qmail-smtpd)
    backend_start: BackendStart = inbound("on-demand")  # at the first command needing it; connect
    backend_connect: str | None = inbound(None)  # "host:port" of a TCP backend instead
    relay_backend_connect: str | None = inbound(None)  # TCP backend for sessions allowed to relay
    source_address: str | None = inbound(None)  # local IP to connect to the TCP backend from
    relay_source_address: str | None = inbound(None)  # same, for sessions allowed to relay
    backend_rules: Path | None = inbound(None)  # the TCP backend's own tcprules, for `check`
    env: Mapping[str, str] = inbound(factory=_empty_map)  # extra backend environment
    env_inherit: tuple[str, ...] = inbound(())  # names taken from tlsfront's own environment
    user: str | None = both(None)  # account of backends and workers (name or number), tcpserver -u
    group: str | None = both(None)  # its only group (default: the user's login group), -g
    allow_root_backend: bool = inbound(False)  # tlsfront started as root may run backends as root
    rules: Path | None = inbound(None)  # tcprules source file (/etc/tcp.smtp)
    received_header: bool = inbound(True)  # add tlsfront's Received header to each message
    # SMTP AUTH of tlsfront's own (inside TLS only)
    auth_checkpassword: tuple[str, ...] = inbound(())  # checkpassword argv: program, then prog
    auth_dovecot: Path | None = inbound(None)  # Dovecot's auth-client socket
    require_auth: bool = inbound(False)  # MAIL needs a login (or a relaying certificate)
    auth_max_failures: int = inbound(3)  # failed logins in a session before 421
    received_auth_user: bool = inbound(False)  # the login name in the Received header
    remote_host_lookup: bool = inbound(True)  # TCPREMOTEHOST from PTR (false: tcpserver -H)
    remote_host_paranoid: bool = inbound(False)  # only a name that points back (tcpserver -p)
    remote_host_timeout: float = inbound(5.0)  # seconds a look-up may delay a session, at most
    pipelining_strict: bool = inbound(True)  # 554 5.5.0 to input pipelined against RFC 2920
    # limits and timeouts
    max_connections: int = both(200)  # sessions at once on this profile
    max_per_ip: int = both(50)  # sessions at once from one client address
    max_message_size: int = inbound(0)  # bytes, 0 = unlimited (qmail databytes)
    max_command_line: int = both(512)  # octets with CRLF (RFC 5321 minimum 512)
    max_text_line: int = inbound(1000)  # octets with CRLF (RFC 5321 minimum 1000)
    timeout_handshake: float = both(30.0)  # seconds for the TLS handshake
    timeout_command: float = both(300.0)  # seconds idle between commands
    timeout_data: float = both(300.0)  # seconds idle inside DATA
    min_data_rate: int = inbound(500)  # bytes/s a DATA transfer must keep up, 0 = off
    timeout_backend: float = inbound(300.0)  # seconds to wait for a backend reply
    tls_rate_limit: int = inbound(0)  # new TLS sessions a minute per client IP, 0 = off
    proxy_protocol: bool = inbound(False)  # expect a PROXY protocol header (v1/v2)
    proxy_trusted: tuple[str, ...] = inbound(())  # networks allowed to send PROXY headers
    # outbound
    allow_from: tuple[str, ...] = outbound(("127.0.0.1/32", "::1/128"))  # may relay out
    routes: Mapping[str, str] = outbound(factory=_empty_map)  # domain -> "host[:port]"
    tlshosts: Path | None = outbound(None)  # qmail tlshosts/: <host>.pem = TLS required
    notlshosts: Path | None = outbound(None)  # qmail notlshosts/: <host> = no STARTTLS
    client_cert_file: Path | None = outbound(None)  # qmail clientcert.pem, for servers that ask
    tls_policy: Mapping[str, TlsPolicy] = outbound(factory=_empty_map)  # domain -> policy
    mta_sts: bool = outbound(False)  # honour MTA-STS policies (RFC 8461)
    dane: bool = outbound(False)  # honour DANE TLSA records (RFC 7672)
    dns_servers: tuple[str, ...] = both(())  # "ip[:port]" resolvers (MX out; client names in)
    helo_name: str | None = outbound(None)  # EHLO name outbound; default hostname
    timeout_connect: float = outbound(30.0)  # seconds to connect to a remote server
    route_credentials: Path | None = outbound(None)  # "host[:port] user password" lines
    smtproutes: Path | None = outbound(None)  # qmail smtproutes, AUTH patch lines: credentials


@dataclass(frozen=True)
class Config:
    path: Path | None  # None for the embedded default
    settings: Settings
    profiles: Mapping[str, Profile]  # in file order


def _scopes() -> dict[str, Scope]:
    out: dict[str, Scope] = {}
    for f in fields(Profile):
        if f.name == "name":
            continue
        scope = f.metadata.get(_APPLIES)
        if scope is None:
            raise TypeError(f"Profile.{f.name} does not say where it applies")
        out[f.name] = scope
    for f in fields(Settings):
        out.setdefault(f.name, "defaults")  # hostname: a setting that profiles override
    return out


# every key -> where it applies
SCOPES: Mapping[str, Scope] = MappingProxyType(_scopes())


def applies_to(key: str, mode: Mode) -> bool:
    """Whether the profile key `key` has an effect in a profile of `mode`."""
    scope = profile_scope(key)
    return scope == "both" or scope == mode


def profile_scope(key: str) -> Scope:
    """Where the Profile field `key` applies."""
    scope: Scope = Profile.__dataclass_fields__[key].metadata[_APPLIES]
    return scope


def refusal(key: str) -> str:
    """Why a profile key is refused in a profile it does not apply to."""
    return f"applies to {profile_scope(key)} profiles only"


# keys that take a single string as well as a list
ONE_OR_MANY = frozenset({"cert", "key", "listen"})
