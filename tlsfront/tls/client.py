"""Client-side TLS: the outbound relay's connections and the MTA-STS policy fetch.

The client side uses Python's ``ssl`` module (through `trio.SSLStream`), not
pyOpenSSL as the server side does: a client verifies the server or does not
(``CERT_REQUIRED`` or ``CERT_NONE``), and needs neither the server side's
verify callback nor its memory-BIO engine. Like the server side it is kept
inside `tlsfront.tls`: the outbound modules get contexts, streams and checks
from here and import no TLS library themselves.

OpenSSL verifies the chain (against a `tlshosts/<host>.pem` file or a trust
store) with `check_hostname` off; the name is checked here, on the
`cryptography` certificate, the way the qmail-tls patch does it: the DNS
names of the subjectAltName, the subject CN only when there is no DNS name,
and a `*.` wildcard standing for exactly one whole left-most label.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = [
    "ClientContext",
    "ClientTLSStream",
    "certificate_names",
    "client_context",
    "client_stream",
    "host_matches",
    "https_context",
    "matches_any",
    "peer_chain",
]

ClientContext = ssl.SSLContext
ClientTLSStream = trio.SSLStream[trio.abc.Stream]

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def client_context(
    *,
    verify: bool,
    cafile: Path | None = None,
    cadata: str | None = None,
    client_cert: Path | None = None,
    min_version: str = "TLSv1.2",
) -> ssl.SSLContext:
    """A client context; `verify` needs `cafile`, `cadata` or the system store."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = _VERSIONS.get(min_version, ssl.TLSVersion.TLSv1_2)
    if verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        if cafile is not None or cadata is not None:
            ctx.load_verify_locations(
                cafile=str(cafile) if cafile is not None else None, cadata=cadata
            )
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        # a tlshosts file may hold the server's own certificate, not a root
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert))
    return ctx


def https_context(cafile: Path | None = None, cadata: str | None = None) -> ssl.SSLContext:
    """WebPKI context for fetching MTA-STS policies: full chain, host name checked."""
    ctx = client_context(verify=True, cafile=cafile, cadata=cadata)
    ctx.verify_flags &= ~ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.check_hostname = True
    return ctx


def client_stream(
    transport: trio.abc.Stream,
    ctx: ssl.SSLContext,
    server_hostname: str | None,
    *,
    https: bool = False,
) -> ClientTLSStream:
    """`transport` wrapped for a client handshake (not yet done).

    `https`: tolerate a server that closes without close_notify, as web
    servers do (the HTTP response carries its own end).
    """
    return trio.SSLStream(transport, ctx, server_hostname=server_hostname, https_compatible=https)


def _label_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if not pattern or not host:
        return False
    if pattern.startswith("*."):
        suffix = pattern[2:]
        if "*" in suffix or "." not in suffix:
            return False  # no wildcard for a whole top-level domain
        head, dot, rest = host.partition(".")
        return bool(head) and bool(dot) and rest == suffix
    return "*" not in pattern and pattern == host


def certificate_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """DNS names (SAN, else CN) and IP addresses (SAN) a certificate is for."""
    dns: list[str] = []
    ips: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        dns = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        ips = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    if not dns:
        for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attribute.value
            dns.append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return dns, ips


def host_matches(cert: x509.Certificate, host: str) -> bool:
    """True when the certificate is for `host` (a DNS name or an IP address)."""
    dns, ips = certificate_names(cert)
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is not None:
        return any(ipaddress.ip_address(ip) == address for ip in ips)
    return any(_label_match(pattern, host) for pattern in dns)


def matches_any(cert: x509.Certificate, hosts: tuple[str, ...]) -> bool:
    return any(host_matches(cert, host) for host in hosts)


def peer_chain(stream: ClientTLSStream) -> list[bytes]:
    """The DER certificates the server sent, leaf first (before verification).

    Python 3.13 has `get_unverified_chain()`; 3.10-3.12 have it on the
    internal object. Without either, only the leaf is known.
    """
    ssl_object: ssl.SSLObject = stream._ssl_object
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        out: list[bytes] = []
        for cert in chain:
            der = cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
            out.append(bytes(der))
        if out:
            return out
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []
