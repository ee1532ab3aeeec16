"""Certificates by server name (SNI): names, wildcards, the choice, the coverage.

A profile's `cert` may be a table by server name: an exact name
("mail.example.org"), a wildcard for one label ("*.example.net" covers
"a.example.net", not "example.net" nor "a.b.example.net", as RFC 6125 §6.4.3
has clients match), and `default` for clients that send no name or a name
the table does not have. Each entry holds one certificate per key type
(RSA and ECDSA side by side), as a plain `cert` does.

`choose` is the server's rule: the exact name first, then the wildcard of
its parent domain, else `default`. `covers` is `tlsfront check`'s: the
certificate of an entry must be valid for the entry's name, so that a
client that verifies the name gets no mismatch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cryptography import x509

from .client import certificate_names, host_matches

DEFAULT = "default"  # the entry for clients that send no server name

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


def server_name(raw: bytes | str | None) -> str | None:
    """The name a client sent, normalized (lower case, no final dot), or None
    when it is not a DNS host name: nothing else is looked up or passed on."""
    if raw is None:
        return None
    try:
        text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None
    name = text.lower().removesuffix(".")
    if not name or len(name) > 253:
        return None
    if not all(_LABEL.match(label) for label in name.split(".")):
        return None
    return name


def table_name(key: str) -> str | None:
    """A table key normalized, or None when it is neither a host name, a
    one-label wildcard ("*.example.net") nor `default`."""
    if key == DEFAULT:
        return DEFAULT
    if key.startswith("*."):
        rest = server_name(key[2:])
        return None if rest is None or "." not in rest else "*." + rest
    return server_name(key)


def choose(names: Mapping[str, object], sent: str | None) -> str:
    """The entry for a client that sent `sent` (normalized): exact, wildcard, default."""
    if sent is None:
        return DEFAULT
    if sent in names:
        return sent
    _, dot, parent = sent.partition(".")
    if dot and "." in parent and f"*.{parent}" in names:
        return f"*.{parent}"
    return DEFAULT


def covers(cert: x509.Certificate, name: str) -> bool:
    """Whether `cert` is valid for the table entry `name` (not `default`).

    A host name must match one of the certificate's names (a wildcard
    certificate included); a wildcard entry needs that very wildcard among
    them, since it stands for every name under it.
    """
    if name.startswith("*."):
        dns, _ = certificate_names(cert)
        return any(pattern.lower().removesuffix(".") == name for pattern in dns)
    return host_matches(cert, name)


def names_of(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate is for (SAN, else CN), for messages."""
    return certificate_names(cert)[0]


__all__ = ["DEFAULT", "choose", "covers", "names_of", "server_name", "table_name"]
