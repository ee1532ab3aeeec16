"""SMTP replies: the `Reply` value, and what the EHLO reply's keywords say.

A reply is the same thing in both directions: the inbound side reads the
backend's replies and writes its own to the client; the outbound relay reads
a remote server's replies and writes its own to qmail-remote. Bytes become
replies in `tlsfront.smtp.replyreader`; the replies tlsfront writes itself
are in `tlsfront.smtp.replies`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete reply: its code and the text of each line (without code)."""

    code: int
    lines: tuple[bytes, ...]

    @property
    def raw(self) -> bytes:
        """The reply as it goes on the wire, CRLF line endings.

        A last line without text is the code alone (RFC 5321 §4.2:
        `Reply-code [ SP textstring ] CRLF`), except an AUTH challenge, which
        keeps its space (RFC 4954 §4: `"334" SP [base64] CRLF`).
        """
        last = len(self.lines) - 1
        code = b"%03d" % self.code
        space = self.code == 334
        return b"".join(
            code + (b" " + text if text or space else b"") + b"\r\n"
            if i == last
            else code + b"-" + text + b"\r\n"
            for i, text in enumerate(self.lines)
        )

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def first_line(self) -> str:
        """The first line, code included, printable (for logs and messages)."""
        text = self.lines[0].decode("utf-8", "replace") if self.lines else ""
        text = "".join(c if c.isprintable() else "?" for c in text)
        return f"{self.code} {text}".rstrip()

    @classmethod
    def make(cls, code: int, *lines: str) -> Reply:
        return cls(code, tuple(line.encode("utf-8") for line in lines) or (b"",))


def ehlo_keyword(text: bytes) -> str:
    """The extension keyword of an EHLO reply line, upper-cased."""
    return text.split(b" ", 1)[0].split(b"=", 1)[0].decode("ascii", "replace").upper()


def ehlo_keywords(reply: Reply) -> set[str]:
    """The extension keywords of an EHLO reply (every line after the first)."""
    return {ehlo_keyword(line) for line in reply.lines[1:]}


def rewrite_ehlo(reply: Reply, *, drop: Iterable[str], add: Iterable[str]) -> Reply:
    """Drop the extension keywords in `drop` and add those in `add`.

    The first line (the server's name and greeting) stays first. Added
    keywords go before the backend's last keyword line, so a multi-line
    reply keeps its own last line; a one-line reply gains them at the end.
    """
    if reply.code != 250:
        return reply
    banned = {k.upper() for k in drop}
    head, *keywords = reply.lines
    kept = [line for line in keywords if ehlo_keyword(line) not in banned]
    extra = [k.encode("ascii") for k in add if k.upper() not in {ehlo_keyword(x) for x in kept}]
    if kept:
        kept[-1:-1] = extra
    else:
        kept = extra
    return Reply(250, (head, *kept))
