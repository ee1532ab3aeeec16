"""The DATA body: finding the end, refusing what could smuggle a message.

Both directions hold a body to these rules: the inbound dialogue (a
client's body on its way to the backend) and the outbound relay
(qmail-remote's body on its way to a remote server).

Theory of operation
-------------------
tlsfront forwards the body exactly as the client sent it (dot-stuffed, CRLF
line endings); the backend unstuffs it. Only one sequence ends the body:
CRLF "." CRLF, where the CRLF before the dot may be the end of the DATA
command line itself (an empty message). Anything that a lenient backend
might also take as an end (bare LF or CR around a dot, THREATS row 11) is
refused, never normalized: normalizing LF to CRLF would turn `\\n.\\n` into a
real end of data for qmail.

The scanner works on whole lines: it keeps back the last incomplete line
(bounded by the line limit) and hands out everything before it at once, so
the per-byte work is done by C-level `bytes` methods rather than a loop.
A pass by a `bytes` method runs at one or two GB/s, slower than the TLS
decryption of the same bytes, so there are few passes:

* the end: only data with a "." can hold one (a base64 attachment has none),
  so a memchr for "." comes before the search for CRLF "." CRLF;
* bare CR and LF: two `translate` passes mark where the CRs and where the
  LFs are; every CR must be followed by an LF and every LF preceded by a CR,
  which is one comparison of the CR marks with the LF marks shifted by one;
* NUL: a memchr;
* line length: from each line start, the last LF within the limit (memrchr)
  is where the next look starts, a few finds per 64 KiB.

The line limit counts as RFC 5321 §4.5.3.1.6 does: `max_line` is the
longest line with its CRLF, and the dot a client adds for transparency
(§4.5.2) does not count, so a 998-octet line that starts with "." passes
although it is 1001 octets on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlsfront.smtp.errors import RemoteProtocolError
from tlsfront.smtp.replies import bad_body, body_line_too_long, message_too_big

_END = b"\r\n.\r\n"
# translate() deletes these, leaving the CRs, LFs and NULs
_NOT_CR_LF_NUL = bytes(b for b in range(256) if b not in b"\r\n\0")
# With no line limit, an incomplete line longer than this is passed on in
# parts (all but a last CR, whose LF is still to be seen).
FLUSH_AT = 65536


@dataclass
class BodyResult:
    forward: bytes  # body bytes to pass on, ending with the terminator when `done`
    done: bool
    rest: bytes  # bytes after the terminator (pipelined commands)


class BodyScanner:
    """The body after `354`, up to and including the terminator.

    `max_line` is the longest line allowed, CRLF included (None: no limit,
    as for mail qmail has already queued); `max_size` the most bytes (0: no
    limit). After a feed raised, the scanner only looks for the end: later
    feeds forward nothing and say where the body ended, so a server that
    refused a body can answer after the client's final dot (`feed(b"")`
    looks at what the failed feed held).
    """

    def __init__(self, max_line: int | None, max_size: int = 0) -> None:
        self._max_line = max_line
        self._max_size = max_size
        self._held = b""
        self._mid_line = False  # `_held` starts within a line passed on in parts
        self._refused = False
        self.size = 0

    def feed(self, data: bytes) -> BodyResult:
        """Scan more body bytes. Raises `RemoteProtocolError` on bad input."""
        if self._held:
            data = self._held + data
            self._held = b""
        if self._refused:
            return self._skip(data)
        try:
            return self._scan(data)
        except RemoteProtocolError:
            self._refused = True
            self._held = data
            raise

    def _end(self, data: bytes) -> int:
        """Where the terminator in `data` ends, or -1."""
        # `data` starts at the start of a line (unless `_mid_line`), and the
        # body starts right after the DATA line's CRLF: a line start is
        # always preceded by CRLF, so a first line of "." ends the body too.
        if b"." not in data:
            return -1
        if not self._mid_line and data.startswith(b".\r\n"):
            return 3
        end = data.find(_END)
        return end + len(_END) if end >= 0 else -1

    def _scan(self, data: bytes) -> BodyResult:
        cut = self._end(data)
        if cut >= 0:
            body, rest = data[:cut], data[cut:]
            self._check(data, cut - 3)
            self._count(cut)
            return BodyResult(body, True, rest)
        complete_end = data.rfind(b"\n") + 1
        held = data[complete_end:]
        if complete_end:
            self._mid_line = False
        if self._max_line is not None:
            if len(held) >= self._max_line + held.startswith(b"."):
                raise body_line_too_long()
        elif len(held) > FLUSH_AT:
            complete_end = len(data) - held.endswith(b"\r")
            self._mid_line = True
        self._check(data, complete_end)
        self._held = data[complete_end:]
        self._count(complete_end)
        return BodyResult(data[:complete_end], False, b"")

    def _skip(self, data: bytes) -> BodyResult:
        cut = self._end(data)
        if cut >= 0:
            return BodyResult(b"", True, data[cut:])
        if len(data) > 4:  # enough for all but the last byte of a terminator
            data, self._mid_line = data[-4:], True
        self._held = data
        return BodyResult(b"", False, b"")

    def _count(self, n: int) -> None:
        self.size += n
        if self._max_size and self.size > self._max_size:
            raise message_too_big()

    def _check(self, data: bytes, end: int) -> None:
        """`data[:end]` is whole CRLF lines (when final: up to the terminator's CRLF)."""
        if not end:
            return
        # Of CR, LF and NUL, there must be one CR and one LF for each CRLF
        # (a CRLF cannot straddle `end`: data[end - 1] is an LF, or a byte
        # other than CR when a long line is passed on in parts).
        marks = len(data.translate(None, _NOT_CR_LF_NUL))
        if end < len(data):
            marks -= len(data[end:].translate(None, _NOT_CR_LF_NUL))
        if marks != 2 * data.count(b"\r\n", 0, end):
            raise bad_body()
        if self._max_line is not None and _has_long_line(data, end, self._max_line):
            raise body_line_too_long()


def _has_long_line(data: bytes, end: int, limit: int) -> bool:
    """Whether a line of `data[:end]` (whole lines) counts `limit` or more bytes before its LF.

    A line's leading dot (the transparency dot) does not count. From a line
    start, every line that starts within the next `limit` bytes (one more
    when the line starts with a dot) up to the last LF among them is
    shorter than `limit`; no LF among them is a line of `limit` or more.
    """
    start = 0
    while True:
        span = limit + 1 if data.startswith(b".", start) else limit
        if end - start < span:
            return False
        lf = data.rfind(b"\n", start, start + span)
        if lf < 0:
            return True
        start = lf + 1
