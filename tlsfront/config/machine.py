"""Defaults that depend on the machine: host name, state directory, default backend."""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

QMAIL_SMTPD = Path("/var/qmail/bin/qmail-smtpd")

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


def default_account(backend: list[str]) -> dict[str, object]:
    """The account keys of the embedded default's profiles.

    qmail-smtpd runs as qmaild (group nofiles when it exists), as qmail's
    own run script has it. The bundled sink writes into the state directory
    of the account tlsfront runs as, so it keeps that account, root included.
    """
    if backend != [str(QMAIL_SMTPD)]:
        return {"allow_root_backend": True}
    try:
        pwd.getpwnam("qmaild")
    except KeyError:
        return {}  # `run` as root says what to do
    try:
        grp.getgrnam("nofiles")
    except KeyError:
        return {"user": "qmaild"}
    return {"user": "qmaild", "group": "nofiles"}
