"""A profile's certificates by server name, whichever form `cert` and `key` took.

`cert` is a list of PEM files (one per key type) or a table of such lists
by server name with a `default` entry; `key` has the same form, or is
empty when each certificate file holds its key. `entries` gives both forms
as one table, a plain list being the table of `default` alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tlsfront.config.schema import CertFiles, Profile
from tlsfront.tls.sni import DEFAULT

Entry = tuple[tuple[Path, ...], tuple[Path | None, ...]]  # certificates, their keys


def _table(files: CertFiles) -> Mapping[str, tuple[Path, ...]]:
    return files if isinstance(files, Mapping) else {DEFAULT: files}


def entries(cert: CertFiles, key: CertFiles) -> dict[str, Entry]:
    """A profile's `cert` and `key` as one table: server name (or `default`)
    -> its certificate files and key files (None: the key is in the cert)."""
    keys = _table(key) if key else {}
    out: dict[str, Entry] = {}
    for name, certs in _table(cert).items():
        out[name] = (certs, keys.get(name) or (None,) * len(certs))
    return out


def files(cert: CertFiles, key: CertFiles) -> list[Path]:
    """Every certificate and key file, for the reload watch."""
    found = entries(cert, key).values()
    return [path for certs, keys in found for path in (*certs, *keys) if path is not None]


def keys_mismatch(profile: Profile) -> bool:
    """`key` or `cert` a table, but not one key per certificate by the same names."""
    if not profile.key:
        return False
    if not isinstance(profile.cert, Mapping) and not isinstance(profile.key, Mapping):
        return False  # plain lists: the length rule covers them
    cert, key = _table(profile.cert), _table(profile.key)
    return set(key) != set(cert) or any(len(key[n]) != len(cert[n]) for n in cert)


__all__ = ["Entry", "entries", "files", "keys_mismatch"]
