"""The qmail-tls patch's outbound control files, read at each delivery.

`tlshosts/<host>.pem`, `tlshosts/exhaustivelist` and `notlshosts/<host>` are
looked up by existence, as the patch does with stat(), so a change applies
to the next delivery without a reload. The directories are the profile's
`tlshosts` / `notlshosts` (which the loader fills from `qmail_control`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tlsfront.config.schema import Profile
from tlsfront.outbound.policy import HostFacts

# a host name or address usable as a file name (no "/", no leading dot)
_SAFE_NAME = re.compile(r"[a-z0-9_\[][a-z0-9._:\[\]-]*")


@dataclass(frozen=True)
class ControlDirs:
    tlshosts: Path | None
    notlshosts: Path | None
    client_cert: Path | None


def control_dirs(profile: Profile) -> ControlDirs:
    """The profile's directories; `qmail_control` was resolved when it was loaded."""
    return ControlDirs(profile.tlshosts, profile.notlshosts, profile.client_cert_file)


def _safe(name: str) -> str | None:
    name = name.lower().rstrip(".")
    return name if _SAFE_NAME.fullmatch(name) and ".." not in name else None


def host_facts(dirs: ControlDirs, host: str, domain: str) -> HostFacts:
    """What the control files say about delivering `domain` to `host`."""
    safe_host, safe_domain = _safe(host), _safe(domain)
    pem = None
    exhaustive = notls = False
    if dirs.tlshosts is not None:
        if safe_host is not None and (dirs.tlshosts / f"{safe_host}.pem").is_file():
            pem = dirs.tlshosts / f"{safe_host}.pem"
        exhaustive = (dirs.tlshosts / "exhaustivelist").exists()
    if dirs.notlshosts is not None:
        notls = any(
            name is not None and (dirs.notlshosts / name).exists()
            for name in (safe_host, safe_domain)
        )
    return HostFacts(pem=pem, exhaustive=exhaustive, notls=notls)
