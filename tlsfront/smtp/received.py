"""The Received trace header tlsfront puts in front of each message.

RFC 5321 §4.4 for the shape, RFC 3848 for the `with` protocol name. Every
piece of client-controlled text (the HELO name, certificate names) is
reduced to safe characters first, so no client can add a header line.
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
_LITERAL = re.compile(r"^\[[0-9A-Fa-f:.]{2,45}\]$|^\[IPv6:[0-9A-Fa-f:.]{2,45}\]$")
_UNSAFE_IN_COMMENT = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e ]")  # no ( ) \ or controls


def comment_text(text: str, limit: int = 200) -> str:
    """Make `text` safe inside a header comment: printable ASCII, no ( ) \\."""
    return _UNSAFE_IN_COMMENT.sub("?", text)[:limit]


@functools.lru_cache(maxsize=4096)  # per message, and ipaddress is slow
def address_literal(ip: str) -> str:
    try:
        version = ipaddress.ip_address(ip).version
    except ValueError:
        return "[unknown]"
    return f"[IPv6:{ip}]" if version == 6 else f"[{ip}]"


@dataclass(frozen=True)
class ClientCertTrace:
    """The client-certificate result, as Postfix puts it in its Received header."""

    common_name: str  # the client certificate's subject CN (raw; made safe here)
    issuer: str  # its issuer's CN (raw; made safe here)
    verified: bool  # the chain verified against client_ca

    def comment(self) -> str:
        """'Client CN "x", Issuer "y" (verified OK)': the inside of one comment."""
        verdict = "verified OK" if self.verified else "not verified"
        return (
            f'Client CN "{_quoted(self.common_name)}", Issuer "{_quoted(self.issuer)}" ({verdict})'
        )


def _quoted(text: str) -> str:
    return comment_text(text, 100).replace('"', "?")


@dataclass(frozen=True)
class TraceInfo:
    """What the Received header says about a session."""

    hostname: str
    client_ip: str
    client_host: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_bits: int = 0
    tls_alg_bits: int = 0
    # (Client CN "x", Issuer "y" (verified OK)) when the client showed a certificate
    client_cert: ClientCertTrace | None = None
    # the qmail patch's "(cert user@example.com)" when a certificate authorized relaying
    relay_cert: str | None = None
    authenticated: bool = False  # a login by tlsfront's own AUTH: ESMTPSA (RFC 3848)
    auth_user: str | None = None  # who, where received_auth_user says to show it


def build_received(info: TraceInfo, helo: str | None, esmtp: bool, when: datetime) -> bytes:
    helo_text = helo or ""
    if _DOMAIN.match(helo_text) or _LITERAL.match(helo_text):
        from_part = ["from", helo_text]
    else:
        # Not a domain: say what was given, safely, inside the comment.
        from_part = ["from", "unknown"]
    tcp_info = address_literal(info.client_ip)
    if info.client_host and _DOMAIN.match(info.client_host):
        tcp_info = f"{info.client_host} {tcp_info}"
    if from_part[1] == "unknown" and helo_text:
        tcp_info = f"{tcp_info} (HELO {comment_text(helo_text, 64)})"
    clauses = [f"Received: from {from_part[1]} ({tcp_info})"]
    if info.tls_version:
        proto = "ESMTPSA" if info.authenticated else ("ESMTPS" if esmtp else "SMTPS")
        clauses.append(f"by {info.hostname} (tlsfront) with {proto}")
        if info.auth_user:
            clauses.append(f"(authenticated as {comment_text(info.auth_user, 64)})")
        clauses.append(
            f"(using {comment_text(info.tls_version)} with cipher "
            f"{comment_text(info.tls_cipher or 'unknown')} "
            f"({info.tls_bits}/{info.tls_alg_bits} bits))"
        )
        if info.client_cert:
            clauses.append(f"({info.client_cert.comment()})")
        if info.relay_cert:
            clauses.append(f"(cert {comment_text(info.relay_cert)})")
    else:
        clauses.append(f"by {info.hostname} (tlsfront) with {'ESMTP' if esmtp else 'SMTP'}")
    clauses[-1] += ";"
    clauses.append(email.utils.format_datetime(when))
    # One clause a line: every continuation line starts with a tab (RFC 5322 folding).
    return ("\r\n\t".join(clauses) + "\r\n").encode("ascii")
