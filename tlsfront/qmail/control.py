"""Reading a qmail (and qmail-tls patch) control directory.

Only what tlsfront needs is read: the TLS files of the qmail-tls patch, `me`
for the host name, `smtpgreeting` for the greeting, and `databytes`. Files
are found by name; a missing optional file is simply absent, an unreadable
one is an error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class QmailControlError(Exception):
    """A control file exists but cannot be read or makes no sense."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class QmailControl:
    """What a control directory holds; every path names a file that exists."""

    directory: Path
    me: str | None = None
    smtpgreeting: str | None = None  # qmail-smtpd's greeting text (default: me)
    servercert: Path | None = None
    clientca: Path | None = None
    clientcrl: Path | None = None
    tlsclients: Path | None = None
    # tlsserverciphers, or the TLSCIPHERS environment variable, which wins as
    # in the patch
    ciphers: str | None = None
    dhparams: Path | None = None
    rcpthosts: Path | None = None
    databytes: int | None = None
    # the outbound half of the patch
    clientcert: Path | None = None
    tlshosts: Path | None = None
    notlshosts: Path | None = None
    # the qmail-remote AUTH patch's credentials stand in `smtproutes`
    smtproutes: Path | None = None


def _existing(path: Path) -> Path | None:
    if not path.exists():
        return None
    if not os.access(path, os.R_OK):
        raise QmailControlError(path, "exists but is not readable")
    return path


# A CRLF file (written on Windows) is refused the same way in tcp.smtp and
# tlsclients: tcprules refuses such a line, and qmail keeps the CR as part of
# a control file's line, so the address never matches; either way nothing
# would work as the admin meant, so tlsfront says so instead of guessing.
CR_LINE_END = (
    "the line ends in CR (a CRLF file?): qmail and tcprules read LF line ends only;"
    " convert the file (dos2unix)"
)


def _read(path: Path) -> str | None:
    """A control file's text, or None when it does not exist."""
    found = _existing(path)
    if found is None:
        return None
    try:
        return found.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise QmailControlError(path, exc.strerror or str(exc)) from exc


def _first_line(path: Path) -> str | None:
    """The first line of a control file, as qmail's control_rldef reads it."""
    text = _read(path)
    line = text.split("\n", 1)[0].strip() if text is not None else ""
    return line or None


def _cipher_list(path: Path) -> str | None:
    """tlsserverciphers as the patch reads it: lines joined by ':', comments skipped."""
    text = _read(path)
    if text is None:
        return None
    parts = [line.strip() for line in text.split("\n")]
    joined = ":".join(p for p in parts if p and not p.startswith("#"))
    return joined or None


def read_control(directory: Path, environ: Mapping[str, str] | None = None) -> QmailControl:
    """Read the control files tlsfront uses from `directory`."""
    environ = os.environ if environ is None else environ
    if not directory.is_dir():
        raise QmailControlError(directory, "is not a directory")
    d = directory
    ciphers = environ.get("TLSCIPHERS") or _cipher_list(d / "tlsserverciphers")
    databytes_text = _first_line(d / "databytes")
    databytes: int | None = None
    if databytes_text is not None:
        try:
            databytes = int(databytes_text)
        except ValueError as exc:
            raise QmailControlError(d / "databytes", "is not a number") from exc
    dirs = {name: d / name for name in ("tlshosts", "notlshosts")}
    return QmailControl(
        directory=d,
        me=_first_line(d / "me"),
        smtpgreeting=_first_line(d / "smtpgreeting"),
        servercert=_existing(d / "servercert.pem"),
        clientca=_existing(d / "clientca.pem"),
        clientcrl=_existing(d / "clientcrl.pem"),
        tlsclients=_existing(d / "tlsclients"),
        ciphers=ciphers,
        dhparams=_existing(d / "dh2048.pem") or _existing(d / "dh1024.pem"),
        rcpthosts=_existing(d / "rcpthosts"),
        databytes=databytes,
        clientcert=_existing(d / "clientcert.pem"),
        tlshosts=dirs["tlshosts"] if dirs["tlshosts"].is_dir() else None,
        notlshosts=dirs["notlshosts"] if dirs["notlshosts"].is_dir() else None,
        smtproutes=_existing(d / "smtproutes"),
    )
