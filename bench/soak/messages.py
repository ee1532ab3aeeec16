"""The soak's messages: sizes, lines near the limit, dot-leading lines.

A message is generated from a random generator, so a seed gives the same
mail. Its first header is ``X-Soak-Id``, by which the backend records it.
The client sends it dot-stuffed (a line that starts with ``.`` gets one more
in front); what must be queued is the message as generated, with LF line
endings, as the sink stores it, so the digest the client keeps is of that.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

# RFC 5321 §4.5.3.1.6: a text line is at most 998 octets before its CRLF; the
# dot added for transparency is not part of the line.
MAX_LINE = 998
_ALPHABET = bytes(range(0x21, 0x7F)) + b"     "


@dataclass(frozen=True)
class Message:
    id: str
    wire: bytes  # dot-stuffed, CRLF, ending with the terminator
    sha256: str  # of the message as it must be queued
    size: int
    dot_lines: int
    long_lines: int


class Pool:
    """Printable text to cut lines from, cheaper than drawing every byte."""

    def __init__(self, rng: random.Random, size: int = 1 << 16) -> None:
        self.text = bytes(rng.choice(_ALPHABET) for _ in range(size))

    def line(self, rng: random.Random, length: int) -> bytes:
        start = rng.randrange(len(self.text) - MAX_LINE)
        text = self.text[start : start + length]
        # the first octet decides dot-stuffing; leading dots are placed on purpose
        return b"x" + text[1:] if text[:1] in (b".", b" ") else text


def body_size(rng: random.Random, *, small: bool = False) -> int:
    """From 200 bytes to a few MB, mostly small, as mail is."""
    roll = rng.random()
    if small or roll < 0.70:
        return rng.randint(200, 8_000)
    if roll < 0.94:
        return rng.randint(8_000, 200_000)
    return rng.randint(1_000_000, 3_000_000)


def body_lines(rng: random.Random, pool: Pool, size: int, dot_max: int) -> list[bytes]:
    lines: list[bytes] = []
    total = 0
    while total < size:
        roll = rng.random()
        if roll < 0.06:  # near the limit, the limit itself included
            line = pool.line(rng, rng.randint(MAX_LINE - 8, MAX_LINE))
        elif roll < 0.14:  # dot-leading: ".", "..", ".text", up to dot_max octets
            kind = rng.random()
            if kind < 0.3:
                line = b"."
            elif kind < 0.45:
                line = b".."
            else:
                length = rng.choice([rng.randint(2, 80), rng.randint(dot_max - 4, dot_max)])
                line = b"." + pool.line(rng, length - 1)
        elif roll < 0.18:
            line = b""
        else:
            line = pool.line(rng, rng.randint(1, 120))
        lines.append(line)
        total += len(line) + 2
    return lines


def make_message(
    rng: random.Random, pool: Pool, ident: str, size: int, *, dot_max: int = MAX_LINE
) -> Message:
    """A message of about ``size`` octets; ``dot_max`` caps dot-leading lines."""
    header = [
        b"X-Soak-Id: " + ident.encode(),
        b"From: <soak@example.net>",
        b"To: <user@example.org>",
        b"Subject: soak " + ident.encode(),
        b"",
    ]
    lines = header + body_lines(rng, pool, size, dot_max)
    stored = b"".join(line + b"\n" for line in lines)
    wire = b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines)
    return Message(
        id=ident,
        wire=wire + b".\r\n",
        sha256=hashlib.sha256(stored).hexdigest(),
        size=len(stored),
        dot_lines=sum(1 for line in lines if line[:1] == b"."),
        long_lines=sum(1 for line in lines if len(line) >= MAX_LINE - 8),
    )
