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
might also take as an end (bare LF or CR around a dot, or a NUL) is
refused, never normalized: normalizing LF to CRLF would turn `\\n.\\n` into a
real end of data for qmail.

The scanner passes on each chunk as it came, the very object, up to the
terminator: it holds back no incomplete line and copies nothing. What a
chunk leaves open is kept as a few numbers instead: the last four bytes
(a terminator may straddle two chunks) and how much of the line in
progress was counted so far. The one exception is a chunk that ends with
a CR: that CR is held back until the byte after it shows whether it is
bare (a copy of the chunk, about one chunk in eighty). Every byte passed
on has been checked; a chunk that breaks a rule is not passed on, and the
backend, never sent a terminator, queues nothing.

A pass by a C-level `bytes` method or by `re` costs about a third to half
a nanosecond a byte (memchr far less), so the checks make two full passes
over a chunk whatever its lines, and one short call per `max_line` bytes:

* bare CR, and the end: one `re` search for a CR that no LF follows or
  that starts CRLF "." CRLF, whichever comes first (`re` looks for the CR
  with a tight loop and tries the rest only there); a chunk with no "."
  (a memchr; a base64 attachment has none) cannot hold an end, and the
  search looks for the bare CR alone;
* bare LF and NUL: one `translate` pass keeps only the CRs, LFs and NULs,
  which, with every CR followed by an LF, must read CRLF CRLF ...;
* line length: a walk by memrchr from line start to line start, a step of
  nearly `max_line` bytes each however short the lines (one `rfind` per
  step, about 260 for a 256 KiB chunk at the RFC's limit): cheaper than a
  third full pass, which a regular expression for a long line would be.

The line limit counts as RFC 5321 §4.5.3.1.6 does: `max_line` is the
longest line with its CRLF, and the dot a client adds for transparency
(§4.5.2) does not count, so a 998-octet line that starts with "." passes
although it is 1001 octets on the wire.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tlsfront.smtp.errors import RemoteProtocolError
from tlsfront.smtp.replies import bad_body, body_line_too_long, message_too_big

_END = b"\r\n.\r\n"
# translate() deletes these, leaving the CRs, LFs and NULs
_NOT_CR_LF_NUL = bytes(b for b in range(256) if b not in b"\r\n\0")
_CRLF = b"\r\n"
_CR, _LF, _DOT = 0x0D, 0x0A, 0x2E


# A CR that no LF follows; the same, or a CR that starts the terminator,
# whichever comes first. `re` looks for the CR with a tight C loop and
# tries the rest only there, once a line.
_BARE_CR = re.compile(rb"\r[^\n]")
_BARE_CR_OR_END = re.compile(rb"\r(?:\n\.\r\n|[^\n])")


@dataclass
class BodyResult:
    forward: bytes  # body bytes to pass on, ending with the terminator when `done`
    done: bool
    rest: bytes  # bytes after the terminator (pipelined commands)


class BodyScanner:
    """The body after `354`, up to and including the terminator.

    `max_line` is the longest line allowed, CRLF included (None: no limit,
    as for mail qmail has already queued); `max_size` the most bytes (0: no
    limit). Each feed passes on all it was given, up to the terminator;
    a feed that breaks a rule raises and passes nothing on. After that, the
    scanner only looks for the end: later feeds forward nothing and say
    where the body ended, so a server that refused a body can answer after
    the client's final dot (`feed(b"")` looks at what the failed feed had).
    """

    __slots__ = ("_held", "_line", "_max_line", "_max_size", "_refused", "_tail", "size")

    def __init__(self, max_line: int | None, max_size: int = 0) -> None:
        self._max_line = max_line
        self._max_size = max_size
        # The last bytes passed on (at first the DATA line's CRLF, so that a
        # first line of "." ends the body too); after a refusal, the bytes
        # in which the end is still to be looked for.
        self._tail = b"\r\n"
        self._held = False  # a CR is held back until the byte after it is seen
        # Bytes counted so far in the line in progress; -1 at a line start.
        self._line = -1
        self._refused = False
        self.size = 0

    def feed(self, data: bytes) -> BodyResult:
        """Scan more body bytes. Raises `RemoteProtocolError` on bad input."""
        if self._held:
            data = b"\r" + data
            self._held = False
        if self._refused:
            return self._skip(data)
        try:
            return self._scan(data)
        except RemoteProtocolError:
            self._refused = True
            self._tail += data
            raise

    def _end(self, data: bytes) -> int:
        """Where the terminator ends in `data`, or -1. Raises on a bare CR before it."""
        tail = self._tail
        at = (tail + data[:4]).find(_END)
        if at >= 0:  # it starts in the bytes passed on before
            return at + len(_END) - len(tail)
        # Only data with a "." can hold an end (a base64 attachment has none).
        found = (_BARE_CR_OR_END if b"." in data else _BARE_CR).search(data)
        if found is None:
            return -1
        if found.end() - found.start() != len(_END):
            raise bad_body()
        return found.end()

    def _scan(self, data: bytes) -> BodyResult:
        cut = self._end(data)
        if cut >= 0:
            self._check(data, cut - 3)  # the lines up to the LF before the dot
            self._count(cut)
            return BodyResult(data[:cut], True, data[cut:])
        end = len(data)
        if end and data[-1] == _CR:
            end -= 1
        self._check(data, end)
        self._count(end)
        if end < len(data):  # rare: a copy, but no unchecked CR passed on
            data = data[:end]
            self._held = True
        if data:
            self._tail = data[-4:] if len(data) >= 4 else (self._tail + data)[-4:]
        return BodyResult(data, False, b"")

    def _skip(self, data: bytes) -> BodyResult:
        joint = self._tail + data
        at = joint.find(_END)
        if at >= 0:
            return BodyResult(b"", True, joint[at + len(_END) :])
        self._tail = joint[-4:]
        return BodyResult(b"", False, b"")

    def _count(self, n: int) -> None:
        self.size += n
        if self._max_size and self.size > self._max_size:
            raise message_too_big()

    def _check(self, data: bytes, end: int) -> None:
        """Check `data[:end]`, the bytes after the last ones passed on (`_end`
        has found no bare CR in them).

        When `end` is where a terminator's dot is, they end with its CRLF;
        `end` <= 0: that CRLF was passed on before, and checked.
        """
        if end <= 0:
            return
        # With every CR followed by an LF, the CRs, LFs and NULs must be
        # CRLF, CRLF, ...: a NUL or an LF on its own breaks the pattern.
        # What was passed on before ends with an LF or a byte other than CR
        # (a last CR is held back), and `end` is after an LF or before a
        # held CR, so no CRLF straddles the edges.
        marks = (data if end == len(data) else data[:end]).translate(None, _NOT_CR_LF_NUL)
        if marks != _CRLF * (len(marks) >> 1):
            raise bad_body()
        if self._max_line is not None:
            self._line = _line_walk(data, end, self._max_line, self._line)


def _line_walk(data: bytes, end: int, limit: int, line: int) -> int:
    """Raise if a line of `data[:end]` counts `limit` bytes or more before its LF.

    `line` is what the line in progress before `data` has counted (-1: `data`
    starts a line); returns the same for the line in progress at `end`.
    A line's leading dot (the transparency dot) does not count.

    From a line start, every line that starts within the next `limit` bytes
    up to the last LF among them is shorter than `limit`; no LF among them
    is a line of `limit` or more, unless it starts with a dot and its LF is
    the very next byte. So a walk by memrchr takes a step of nearly `limit`
    bytes each, whatever the number of lines: one C call per step, about
    sixty-five for 64 KiB at the RFC's limit.
    """
    start = 0
    if line >= 0:  # the line in progress must end within `limit - line` bytes
        lf = data.find(b"\n", 0, min(end, limit - line))
        if lf < 0:
            if end >= limit - line:
                raise body_line_too_long()
            return line + end
        start = lf + 1
    rfind = data.rfind
    while end - start >= limit:
        lf = rfind(b"\n", start, start + limit)
        if lf < 0:
            # Only a line of a dot and limit - 1 bytes more may go on.
            if data[start] != _DOT:
                raise body_line_too_long()
            lf = start + limit
            if lf >= end:
                break  # that line is still open: counted below
            if data[lf] != _LF:
                raise body_line_too_long()
        start = lf + 1
    # The rest is shorter than a line may be; what of it is still open?
    last = rfind(b"\n", start, end) + 1 or start
    if last == end:
        return -1
    return end - last - (data[last] == _DOT)
