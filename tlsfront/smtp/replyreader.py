"""Bytes from an SMTP server in, complete replies out, for both directions.

The inbound side reads its backend's replies with it, the outbound relay a
remote server's. Both hold the peer to the same rules:

* every line ends in CRLF; a bare LF, or a CR anywhere else, is a broken
  peer (what is passed on is always rebuilt with CRLF, so a reply can never
  carry a line ending of its own to the other side);
* a line is `ddd` followed by a space, a hyphen or its end, with a code
  from 200 to 599 that stays the same within a multi-line reply;
* a line longer than `MAX_REPLY_LINE`, or a reply of more than
  `MAX_REPLY_LINES` lines, is a broken peer, not something to buffer
  without end.

Replies that came complete before the failure in the same `feed` are still
returned (a `250` for a queued message must not be lost to garbage behind
it); the failure is then in `failure`, and every later `feed` raises it.
"""

from __future__ import annotations

from tlsfront.smtp.errors import RemoteProtocolError
from tlsfront.smtp.replies import bad_reply
from tlsfront.smtp.reply import Reply

MAX_REPLY_LINE = 4096  # octets of one line, its CRLF not counted
MAX_REPLY_LINES = 100


class ReplyReader:
    """`feed` bytes, take the replies they completed (see module doc)."""

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
        """The replies `data` completed. Raises `RemoteProtocolError` on a broken peer."""
        if self.failure is not None:
            raise self.failure
        found: list[Reply] = []
        try:
            self._parse(data, found)
        except RemoteProtocolError as exc:
            self.failure = exc
            self._buffer.clear()
            if not found:
                raise
        return found

    def _parse(self, data: bytes, found: list[Reply]) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE + 1:  # room for the CR
                    raise bad_reply("reply line too long")
                return
            if end == 0 or self._buffer[end - 1] != 0x0D:
                raise bad_reply("reply line ends in a bare LF")
            if end - 1 > MAX_REPLY_LINE:
                raise bad_reply("reply line too long")
            line = bytes(self._buffer[: end - 1])
            del self._buffer[: end + 1]
            reply = self._line(line)
            if reply is not None:
                found.append(reply)

    def _line(self, line: bytes) -> Reply | None:
        if b"\r" in line:
            raise bad_reply("bare CR or LF in a reply line")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            raise bad_reply("malformed reply line")
        code = int(line[:3])
        if not 200 <= code <= 599:
            raise bad_reply("reply code out of range")
        if self._code is not None and code != self._code:
            raise bad_reply("reply code changes within a multi-line reply")
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            raise bad_reply("reply has too many lines")
        if line[3:4] == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._lines = []
        self._code = None
        return reply
