"""Defaults that depend on the machine: host name, state directory, embedded config.

The embedded configuration is what `tlsfront run` serves when there is no
config file anywhere: STARTTLS on 127.0.0.1:2525 and implicit TLS on
127.0.0.1:4650, in front of qmail-smtpd when it is installed, else in front
of the bundled sink, so a first message can go through within a minute.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlsfront.config import Config

QMAIL_SMTPD = Path("/var/qmail/bin/qmail-smtpd")
SMTP_LISTEN = "127.0.0.1:2525"
SMTPS_LISTEN = "127.0.0.1:4650"

_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")


def default_hostname() -> str:
    """This host's fully qualified name, or "localhost" if it has no usable one."""
    name = socket.getfqdn()
    if _HOSTNAME.fullmatch(name) and ".." not in name:
        return name
    return "localhost"


def default_state_dir(environ: Mapping[str, str] | None = None, *, euid: int | None = None) -> Path:
    """/var/lib/tlsfront for root, else $XDG_STATE_HOME/tlsfront or ~/.local/state/tlsfront."""
    environ = os.environ if environ is None else environ
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/tlsfront")
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative ones
        return Path(xdg) / "tlsfront"
    home = environ.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "state" / "tlsfront"


def default_backend(state_dir: Path, hostname: str) -> list[str]:
    """qmail-smtpd when it is installed and executable, else the bundled sink."""
    if QMAIL_SMTPD.is_file() and os.access(QMAIL_SMTPD, os.X_OK):
        return [str(QMAIL_SMTPD)]
    return [
        sys.executable,
        "-m",
        "tlsfront.sink",
        "--maildir",
        str(state_dir / "Maildir"),
        "--rcpthost",
        "localhost",
        "--rcpthost",
        hostname,
    ]


def default_tls_files(state_dir: Path) -> tuple[Path, Path]:
    """Certificate and key of the embedded default, made on first run."""
    return state_dir / "tls" / "cert.pem", state_dir / "tls" / "key.pem"


def ensure_default_files(config: Config) -> None:
    """Make the embedded default's self-signed certificate if it is missing."""
    from tlsfront.certs import make_self_signed

    cert, key = default_tls_files(config.settings.state_dir)
    if not (cert.exists() and key.exists()):
        make_self_signed(config.settings.hostname, cert, key)


def embedded_config(
    state_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """The configuration served when no file exists (DESIGN.md "Embedded default").

    Built as the dicts tomllib would return and checked by the same code as a
    file, so it obeys every rule a file does; dicts rather than TOML text so
    that paths (sys.executable, $HOME) need no quoting.
    """
    from tlsfront.config import config_from_dict

    state = default_state_dir(environ) if state_dir is None else state_dir
    hostname = default_hostname()
    cert, key = default_tls_files(state)  # made by ensure_default_files
    tls_files = {"cert": str(cert), "key": str(key)}
    backend = default_backend(state, hostname)
    data: dict[str, Any] = {
        "defaults": {"hostname": hostname, "state_dir": str(state)},
        "profile": {
            "smtp": {"listen": [SMTP_LISTEN], "tls": "starttls", "backend": backend, **tls_files},
            "smtps": {"listen": [SMTPS_LISTEN], "tls": "implicit", "backend": backend, **tls_files},
        },
    }
    return config_from_dict(data, None, environ)
