"""The outbound relay's SMTP byte handling, with no I/O.

Three small machines, each fed bytes and asked for what they found:

* `ReplyReader` turns a remote server's bytes into `Reply` objects
  (multi-line replies, bounded lines and line counts).
* `LineReader` splits qmail-remote's command stream into CRLF lines, bounded.
* `DataReader` follows a DATA body (already dot-stuffed by qmail-remote) up to
  the CRLF.CRLF terminator. It hands back the bytes to forward unchanged and
  the bytes found after the terminator. A bare CR or LF is refused and a CR
  at the end of a chunk is held back until the next byte shows what follows,
  so the remote server never receives a line ending other than CRLF (no
  `\\n.\\n` or `\\r.\\r` that a lenient server could take for the end).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100


class SmtpSyntaxError(Exception):
    """Bytes that break the protocol; the message says how."""


@dataclass(frozen=True)
class Reply:
    """One complete reply: its code and the text of each line (code removed)."""

    code: int
    lines: tuple[bytes, ...]

    @classmethod
    def make(cls, code: int, *lines: str) -> Reply:
        return cls(code, tuple(line.encode("utf-8") for line in lines) or (b"",))

    def encode(self) -> bytes:
        """The reply as it goes on the wire, CRLF line endings."""
        last = len(self.lines) - 1
        code = b"%03d" % self.code
        out = []
        for i, text in enumerate(self.lines):
            sep = b" " if i == last else b"-"
            out.append(code + (sep + text if text or i != last else b"") + b"\r\n")
        return b"".join(out)

    @property
    def first_line(self) -> str:
        """The first line, code included, printable (for logs and messages)."""
        text = self.lines[0].decode("utf-8", "replace") if self.lines else ""
        text = "".join(c if c.isprintable() else "?" for c in text)
        return f"{self.code} {text}".rstrip()


class ReplyReader:
    """Bytes from a remote server in, complete `Reply` objects out.

    Lines must end in CRLF; a line that is not `ddd` followed by space,
    hyphen or its end is an `SmtpSyntaxError`, as is a code outside 2xx-5xx,
    a code that changes within one reply, or a reply beyond the bounds.
    """

    def __init__(self, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._code: int | None = None
        self._max_line = max_line
        self._max_lines = max_lines
        self.eof = False

    def receive_data(self, data: bytes) -> None:
        """Add bytes; `b""` means the server closed the connection."""
        if not data:
            self.eof = True
        self._buffer += data

    @property
    def buffered(self) -> bytes:
        """Bytes received but not yet part of a returned reply."""
        return bytes(self._buffer)

    @property
    def idle(self) -> bool:
        """True when no reply is partly received."""
        return not self._buffer and not self._lines

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None when more bytes are needed."""
        while True:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > self._max_line:
                    raise SmtpSyntaxError("reply line too long")
                if b"\n" in self._buffer:
                    raise SmtpSyntaxError("reply line ends in a bare LF")
                return None
            if end > self._max_line:
                raise SmtpSyntaxError("reply line too long")
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            reply = self._line(line)
            if reply is not None:
                return reply

    def _line(self, line: bytes) -> Reply | None:
        if b"\n" in line or b"\r" in line:
            raise SmtpSyntaxError("bare CR or LF in a reply line")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            raise SmtpSyntaxError("malformed reply line")
        code = int(line[:3])
        if not 200 <= code <= 599:
            raise SmtpSyntaxError("reply code out of range")
        if self._code is not None and code != self._code:
            raise SmtpSyntaxError("reply code changes within a multi-line reply")
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > self._max_lines:
            raise SmtpSyntaxError("reply has too many lines")
        if line[3:4] == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._lines = []
        self._code = None
        return reply


class LineReader:
    """qmail-remote's commands: CRLF lines of at most `max_line` octets (CRLF included)."""

    def __init__(self, max_line: int) -> None:
        self._buffer = bytearray()
        self._max_line = max_line

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> bool:
        """True when bytes beyond the lines returned so far are buffered."""
        return bool(self._buffer)

    def take_buffer(self) -> bytes:
        """Remove and return every buffered byte (the start of a DATA body)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_line(self) -> bytes | None:
        """The next line without its CRLF, or None when more bytes are needed."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) >= self._max_line:
                raise SmtpSyntaxError("line too long")
            return None
        if end + 1 > self._max_line:
            raise SmtpSyntaxError("line too long")
        if end == 0 or self._buffer[end - 1] != 0x0D:
            raise SmtpSyntaxError("bare LF in a command line")
        line = bytes(self._buffer[: end - 1])
        del self._buffer[: end + 1]
        if b"\r" in line or b"\0" in line:
            raise SmtpSyntaxError("bare CR or NUL in a command line")
        return line


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@dataclass(frozen=True)
class DataChunk:
    """What one `DataReader.feed` found."""

    forward: bytes  # body bytes to send on, unchanged (the terminator included)
    done: bool  # the terminator was seen
    rest: bytes  # bytes after the terminator (commands pipelined behind it)


class DataReader:
    """The body after `354`, up to and including the CRLF.CRLF terminator."""

    def __init__(self, *, strict: bool = True) -> None:
        # The last bytes forwarded (a body starts as if after a CRLF).
        self._tail = b"\r\n" if strict else b""
        self._strict = strict
        self._carry = b""
        self.size = 0
        self.done = False

    def feed(self, data: bytes) -> DataChunk:
        if self.done:
            raise RuntimeError("DataReader fed after the terminator")
        buf = self._carry + data
        self._carry = b""
        if buf.endswith(b"\r"):
            self._carry, buf = b"\r", buf[:-1]
        joined = self._tail + buf
        at = joined.find(b"\r\n.\r\n")
        if at >= 0:
            end = at + 5 - len(self._tail)
            forward, rest = buf[:end], buf[end:] + self._carry
            self._carry = b""
            self.done = True
        else:
            forward, rest = buf, b""
        # the lookbehind needs the byte before this chunk; the tail ends it
        if self._strict and _BARE.search(self._tail[-1:] + forward, 1):
            raise SmtpSyntaxError("bare CR or LF in the message")
        self._tail = (self._tail + forward)[-4:]
        self.size += len(forward)
        return DataChunk(forward, self.done, rest)


def parse_path(argument: bytes, keyword: bytes) -> bytes:
    """The address in `FROM:<addr>` / `TO:<addr>`; parameters are refused.

    Raises `SmtpSyntaxError` when the argument is not in that form.
    """
    head = argument[: len(keyword) + 1]
    if head.upper() != keyword.upper() + b":":
        raise SmtpSyntaxError("syntax error in the address argument")
    rest = argument[len(keyword) + 1 :].lstrip(b" ")
    if not rest.startswith(b"<"):
        raise SmtpSyntaxError("address must be in angle brackets")
    end = rest.find(b">")
    if end < 0:
        raise SmtpSyntaxError("address must be in angle brackets")
    address, params = rest[1:end], rest[end + 1 :].strip(b" ")
    if params:
        raise SmtpSyntaxError("parameters are not supported")
    if b"<" in address or b" " in address:
        raise SmtpSyntaxError("malformed address")
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


def split_command(line: bytes) -> tuple[str, bytes]:
    """The upper-cased verb and the argument after one space."""
    verb, _, argument = line.partition(b" ")
    return verb.decode("ascii", "replace").upper(), argument
