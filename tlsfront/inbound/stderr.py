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

Theory of operation
-------------------
Most backends never write to standard error, yet a reader task per backend
cost every session a task's start, its registration with the event loop
and its cancellation at the end. Instead one task per trio run (a system
task, started with the first backend) reads the stderr pipes of all of
them: each pipe is registered in an epoll set of that reader's own
(`watch`: one system call), the task waits on that set's descriptor, and
when it is readable reads one chunk from each pipe that has data, then
waits again, so a flooding backend cannot starve the sessions. A pipe
leaves the set at its end (the backend exited, and no grandchild holds it)
or when its session drains it.
"""

from __future__ import annotations

import logging
import os
import select

import trio

log = logging.getLogger("tlsfront.backend")

LEVEL = logging.WARNING
MAX_LINE = 1000  # characters logged of one line
MAX_LINES = 100  # lines logged per backend; the rest are counted
READ_SIZE = 4096
_DATA, _EMPTY, _END = object(), object(), object()


class StderrLog:
    """The read end of one backend's stderr pipe (owned, non-blocking)."""

    __slots__ = ("_dropped", "_fd", "_held", "_logged", "_watched", "pid", "session")

    def __init__(self, fd: int, pid: int) -> None:
        os.set_blocking(fd, False)
        self._fd: int | None = fd
        self._held = b""
        self._logged = 0
        self._dropped = 0
        self._watched: _Reader | None = None
        self.pid = pid
        self.session = "-"  # the session's id, set by the session that started it

    @property
    def prefix(self) -> str:
        return f"backend pid {self.pid} session {self.session}"

    def watch(self, session: str) -> None:
        """Log its lines as they come from now on, naming `session`."""
        self.session = session
        if self._fd is not None and self._watched is None:
            self._watched = _reader()
            self._watched.add(self._fd, self)

    def readable(self) -> None:
        """The reader saw data (or the end) in the pipe: take one chunk."""
        if self._read() is _END:
            self.close()

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
            if self._watched is not None:
                self._watched.remove(fd)
                self._watched = None
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


class _Reader:
    """The one task of a trio run that reads every watched stderr pipe."""

    def __init__(self) -> None:
        self._epoll = select.epoll()  # close-on-exec, as everything Python opens
        self._logs: dict[int, StderrLog] = {}

    def add(self, fd: int, stderr: StderrLog) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._logs[fd] = stderr

    def remove(self, fd: int) -> None:
        if self._logs.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _read(self, fd: int) -> None:
        stderr = self._logs.get(fd)
        if stderr is None:
            return
        try:
            stderr.readable()
        except Exception:  # a system task must not fail: drop that pipe
            log.exception("%s: reading its stderr failed", stderr.prefix)
            stderr.close()

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll)
                for fd, _ in self._epoll.poll(0):
                    self._read(fd)  # a helper: no local keeps a backend's log while waiting
        finally:
            for stderr in list(self._logs.values()):
                stderr.close()
            self._epoll.close()


READER_TASK = "backend stderr reader"  # the task's name
_READER: trio.lowlevel.RunVar[_Reader] = trio.lowlevel.RunVar("tlsfront_stderr_reader")


def _reader() -> _Reader:
    """This trio run's reader, started by the first backend that needs it."""
    try:
        return _READER.get()
    except LookupError:
        reader = _Reader()
        _READER.set(reader)
        trio.lowlevel.spawn_system_task(reader.run, name=READER_TASK)
        return reader


__all__ = ["LEVEL", "MAX_LINE", "MAX_LINES", "READER_TASK", "StderrLog"]
