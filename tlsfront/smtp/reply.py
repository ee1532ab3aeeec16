"""Replies from the backend: parsing (multi-line, bounded) and EHLO rewriting."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tlsfront.smtp.errors import RemoteProtocolError

# A backend reply line longer than this, or a reply with more lines, is a
# broken backend, not something to buffer without end.
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100


@dataclass(frozen=True)
class Reply:
    """One complete reply: its code and the text of each line (without code)."""

    code: int
    lines: tuple[bytes, ...]

    @property
    def raw(self) -> bytes:
        """The reply as it goes on the wire, CRLF line endings."""
        last = len(self.lines) - 1
        code = b"%03d" % self.code
        return b"".join(
            code + (b" " if i == last else b"-") + text + b"\r\n"
            for i, text in enumerate(self.lines)
        )

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @classmethod
    def make(cls, code: int, *lines: str) -> Reply:
        return cls(code, tuple(line.encode("utf-8") for line in lines))


def _backend_error(why: str) -> RemoteProtocolError:
    return RemoteProtocolError(421, "4.3.0", f"Backend failure: {why}")


class ReplyReader:
    """Bytes from the backend in, complete `Reply` objects out.

    Lines end in LF (a CR before it is dropped); qmail always writes CRLF.
    A line that is not `ddd` followed by ` `, `-` or the end is a backend
    failure, as is a line or a reply beyond the bounds above. Replies that
    came complete before the failure in the same `feed` are still returned
    (a `250` for a queued message must not be lost to garbage behind it);
    the failure is then in `failure`, and every later `feed` raises it.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._code: int | None = None
        self.failure: RemoteProtocolError | None = None

    @property
    def partial(self) -> bool:
        """True while a reply (or a line of one) is incomplete."""
        return bool(self._buffer) or bool(self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        if self.failure is not None:
            raise self.failure
        replies: list[Reply] = []
        try:
            self._parse(data, replies)
        except RemoteProtocolError as exc:
            self.failure = exc
            self._buffer.clear()
            if not replies:
                raise
        return replies

    def _parse(self, data: bytes, replies: list[Reply]) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise _backend_error("reply line too long")
                return
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if len(line) > MAX_REPLY_LINE:
                raise _backend_error("reply line too long")
            reply = self._line(line.removesuffix(b"\r"))
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> Reply | None:
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in b" -"):
            raise _backend_error("malformed reply line")
        code = int(line[:3])
        if code < 200 or code > 599:
            raise _backend_error("reply code out of range")
        if self._code is not None and code != self._code:
            raise _backend_error("reply code changes within a multi-line reply")
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            raise _backend_error("reply has too many lines")
        if line[3:4] == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._lines = []
        self._code = None
        return reply


def ehlo_keyword(text: bytes) -> str:
    """The extension keyword of an EHLO reply line, upper-cased."""
    return text.split(b" ", 1)[0].split(b"=", 1)[0].decode("ascii", "replace").upper()


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
