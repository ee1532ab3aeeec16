"""Command lines from an SMTP client: splitting, validation, parsing.

The same rules hold for the inbound side's clients and for qmail-remote at
the outbound relay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tlsfront.smtp.replies import bad_characters, bad_path, line_too_long

_SIZE_PARAM = re.compile(rb"(?:^|\s)SIZE=(\d{1,20})(?:\s|$)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
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


def take_line(buffer: bytearray, max_line: int) -> bytes | None:
    """Remove and return the first line of `buffer`, its LF included.

    None while the line is incomplete. A line of more than `max_line`
    octets (its CRLF counted) raises `line_too_long()`, as soon as that
    many octets without an LF are buffered.
    """
    end = buffer.find(b"\n", 0, max_line)
    if end < 0:
        if len(buffer) >= max_line:
            raise line_too_long()
        return None
    line = bytes(buffer[: end + 1])
    del buffer[: end + 1]
    return line


def parse_command(line: bytes) -> Command:
    """Parse one line that ends in LF.

    A line must end in CRLF and hold no other CR, LF or NUL: qmail splits on
    LF and stops at NUL, so letting either through would make tlsfront and
    the backend read different commands (threats `smtp-smuggling`, `bare-cr-lf-nul`).
    """
    if not line.endswith(b"\r\n"):
        raise bad_characters()
    body = line[:-2]
    if b"\r" in body or b"\n" in body or b"\0" in body:
        raise bad_characters()
    verb, _, args = body.partition(b" ")
    return Command(verb.decode("ascii", "replace").upper(), args.strip(b" "), line)


def parse_path(argument: bytes, keyword: bytes) -> bytes:
    """The address in `FROM:<addr>` / `TO:<addr>`; parameters are refused.

    Raises `bad_path(...)` when the argument is not in that form.
    """
    head = argument[: len(keyword) + 1]
    if head.upper() != keyword.upper() + b":":
        raise bad_path("syntax error in the address argument")
    rest = argument[len(keyword) + 1 :].lstrip(b" ")
    if not rest.startswith(b"<"):
        raise bad_path("address must be in angle brackets")
    end = rest.find(b">")
    if end < 0:
        raise bad_path("address must be in angle brackets")
    address, params = rest[1:end], rest[end + 1 :].strip(b" ")
    if params:
        raise bad_path("parameters are not supported")
    if b"<" in address or b" " in address:
        raise bad_path("malformed address")
    if b":" in address and address.startswith(b"@"):
        address = address.split(b":", 1)[1]  # drop an RFC 5321 source route
    return address


def address_domain(address: bytes) -> str | None:
    """The lower-cased domain of an address, or None when it has none."""
    if b"@" not in address:
        return None
    domain = address.rsplit(b"@", 1)[1]
    if not domain:
        return None
    try:
        text = domain.decode("ascii")
    except UnicodeDecodeError:
        try:
            text = domain.decode("utf-8").encode("idna").decode("ascii")
        except (UnicodeError, ValueError):
            return None
    return text.lower().rstrip(".") or None
