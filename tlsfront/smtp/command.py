"""Command lines from the client: splitting, validation, parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tlsfront.smtp.errors import RemoteProtocolError

_SIZE_PARAM = re.compile(rb"(?:^|\s)SIZE=(\d{1,20})(?:\s|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Command:
    """One command line. `verb` is upper-cased; `raw` keeps the exact bytes."""

    verb: str
    args: bytes
    raw: bytes

    @property
    def size_param(self) -> int | None:
        """The value of a MAIL FROM `SIZE=` parameter, if any (RFC 1870)."""
        match = _SIZE_PARAM.search(self.args)
        return int(match.group(1)) if match else None


def line_too_long() -> RemoteProtocolError:
    return RemoteProtocolError(500, "5.5.2", "Error: line too long")


def bad_characters() -> RemoteProtocolError:
    return RemoteProtocolError(500, "5.5.2", "Error: bare CR, bare LF or NUL in command line")


def parse_command(line: bytes) -> Command:
    """Parse one line that ends in LF.

    A line must end in CRLF and hold no other CR, LF or NUL: qmail splits on
    LF and stops at NUL, so letting either through would make tlsfront and
    the backend read different commands (THREATS rows 11 and 13).
    """
    if not line.endswith(b"\r\n"):
        raise bad_characters()
    body = line[:-2]
    if b"\r" in body or b"\n" in body or b"\0" in body:
        raise bad_characters()
    verb, _, args = body.partition(b" ")
    return Command(verb.decode("ascii", "replace").upper(), args.strip(b" "), line)
