"""The DATA body: finding the end, refusing what could smuggle a message.

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
"""

from __future__ import annotations

from dataclasses import dataclass

from tlsfront.smtp.errors import RemoteProtocolError

_END = b"\r\n.\r\n"


def bad_body() -> RemoteProtocolError:
    return RemoteProtocolError(
        550, "5.5.2", "Error: bare CR, bare LF or NUL in message, message refused"
    )


def body_line_too_long() -> RemoteProtocolError:
    return RemoteProtocolError(500, "5.5.2", "Error: message line too long")


def message_too_big() -> RemoteProtocolError:
    return RemoteProtocolError(552, "5.3.4", "Error: message too big")


@dataclass
class BodyResult:
    forward: bytes  # body bytes to pass on, ending with the terminator when `done`
    done: bool
    rest: bytes  # bytes after the terminator (pipelined commands)


class BodyScanner:
    def __init__(self, max_line: int, max_size: int = 0) -> None:
        self._max_line = max_line
        self._max_size = max_size
        self._held = b""
        self.size = 0

    def feed(self, data: bytes) -> BodyResult:
        """Scan more body bytes. Raises `RemoteProtocolError` on bad input."""
        data = self._held + data
        # `data` starts at the start of a line, and the body starts right
        # after the DATA line's CRLF: a line start is always preceded by
        # CRLF, so a first line of "." ends the body too.
        if data.startswith(b".\r\n"):
            cut = 3
        else:
            end = data.find(_END)
            cut = end + len(_END) if end >= 0 else -1
        if cut >= 0:
            body, rest = data[:cut], data[cut:]
            self._check(body[:-3], final=True)
            self._held = b""
            self._count(len(body))
            return BodyResult(body, True, rest)
        last_lf = data.rfind(b"\n")
        complete, self._held = data[: last_lf + 1], data[last_lf + 1 :]
        if len(self._held) >= self._max_line:
            raise body_line_too_long()
        self._check(complete, final=False)
        self._count(len(complete))
        return BodyResult(complete, False, b"")

    def _count(self, n: int) -> None:
        self.size += n
        if self._max_size and self.size > self._max_size:
            raise message_too_big()

    def _check(self, lines: bytes, *, final: bool) -> None:
        """`lines` is whole CRLF lines (when final: up to the terminator's CRLF)."""
        if not lines:
            return
        if b"\0" in lines:
            raise bad_body()
        crlf = lines.count(b"\r\n")
        if lines.count(b"\n") != crlf or lines.count(b"\r") != crlf:
            raise bad_body()
        if len(lines) >= self._max_line and _has_long_line(lines, self._max_line):
            raise body_line_too_long()


def _has_long_line(lines: bytes, limit: int) -> bool:
    """Whether `lines` holds `limit` or more bytes in a row without an LF.

    Such a run contains a whole aligned window of limit // 2 bytes, so only
    when some window has no LF is it worth splitting into lines: a few
    dozen C-level finds instead of an object per line.
    """
    step = max(1, limit // 2)
    for start in range(0, len(lines) - step + 1, step):
        if lines.find(b"\n", start, start + step) < 0:
            return max(map(len, lines.split(b"\n"))) >= limit
    return False
