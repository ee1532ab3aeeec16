"""A backend's standard error, logged line by line with its session's id.

qmail programs write their complaints to standard error (qmail-smtpd's
"unable to read controls", a qmail-queue wrapper's "virus scanner not
found", rblsmtpd's notes). Inherited as tcpserver would pass it, those bytes
would land in tlsfront's log raw, interleaved with other sessions' lines
and without a level. Instead each exec backend writes into a pipe of its
own; `StderrLog` reads it while the session runs and logs each line at
WARNING (logger `tlsfront.backend`) as

    WARNING backend pid 1234 session 5678.9: qmail-smtpd: unable to read controls

`session` is the id on the session's end line. A backend that writes a
flood gets `MAX_LINES` logged, then one line saying how many more were
dropped; an over-long line is cut at `MAX_LINE` characters. What is still
in the pipe when the backend has exited is read without waiting (`drain`):
a grandchild that keeps the pipe open (a daemon started by the chain)
never holds the session.
"""

from __future__ import annotations

import logging
import os

import trio

log = logging.getLogger("tlsfront.backend")

LEVEL = logging.WARNING
MAX_LINE = 1000  # characters logged of one line
MAX_LINES = 100  # lines logged per backend; the rest are counted
READ_SIZE = 4096
_DATA, _EMPTY, _END = object(), object(), object()


class StderrLog:
    """The read end of one backend's stderr pipe (owned, non-blocking)."""

    def __init__(self, fd: int, pid: int) -> None:
        os.set_blocking(fd, False)
        self._fd: int | None = fd
        self._held = b""
        self._logged = 0
        self._dropped = 0
        self.pid = pid
        self.session = "-"  # the session's id, set by the session that started it

    @property
    def prefix(self) -> str:
        return f"backend pid {self.pid} session {self.session}"

    async def run(self) -> None:
        """Log lines as they come, until the pipe's end (or cancellation)."""
        while self._fd is not None:
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:
                return
            if self._read() is _END:
                return

    def drain(self) -> None:
        """Log what the pipe holds now, and the last incomplete line; then close it."""
        while self._fd is not None and self._read() is _DATA:
            pass
        if self._held:
            self._line(self._held)
            self._held = b""
        self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        if self._dropped:
            log.log(LEVEL, "%s: %d more line(s) not logged", self.prefix, self._dropped)
            self._dropped = 0

    def _read(self) -> object:
        """One read: _DATA, _EMPTY (nothing there now) or _END (the pipe's end)."""
        if self._fd is None:
            return _END
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return _EMPTY
        except OSError:
            data = b""
        if not data:
            if self._held:
                self._line(self._held)
                self._held = b""
            return _END
        lines = (self._held + data).split(b"\n")
        self._held = lines.pop()
        if len(self._held) > MAX_LINE:  # no newline in sight: log what there is
            lines.append(self._held)
            self._held = b""
        for line in lines:
            self._line(line)
        return _DATA

    def _line(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line.strip():
            return
        if self._logged >= MAX_LINES:
            self._dropped += 1
            return
        self._logged += 1
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE] + "..."
        log.log(LEVEL, "%s: %s", self.prefix, line)


__all__ = ["LEVEL", "MAX_LINE", "MAX_LINES", "StderrLog"]
