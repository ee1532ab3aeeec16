"""Objects built from files, rebuilt for new sessions when the files change."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("tlsfront")

T = TypeVar("T")

# How often a watched file's metadata is looked at, at most.
RECHECK_SECONDS = 1.0


def _stamp(paths: Iterable[Path]) -> tuple[tuple[str, int, int, int], ...]:
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
            stamps.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stamps.append((str(path), -1, -1, -1))
    return tuple(stamps)


class FileWatch(Generic[T]):
    """An object built from files, rebuilt when one of them changes.

    A rebuild that fails is logged and the last good object is kept, so a
    half-written renewal never takes TLS away; `get()` is None only while no
    build has ever succeeded.
    """

    def __init__(self, what: str, paths: Iterable[Path], build: Callable[[], T]) -> None:
        self._what = what
        self._paths = tuple(paths)
        self._build = build
        self._value: T | None = None
        self._stamp: tuple[tuple[str, int, int, int], ...] | None = None
        self._checked = float("-inf")
        self.error: str | None = None

    def load(self) -> T:
        """Build now; raise on failure (used at start-up and on reload)."""
        stamp = _stamp(self._paths)
        value = self._build()
        self._value, self._stamp, self._checked, self.error = value, stamp, time.monotonic(), None
        return value

    def restamp(self) -> None:
        """Take the files' metadata as it looks now, without building again.

        For a worker that has just given up root: a file it can no longer
        even look at must not count as changed (and fail to load). Such a
        file is read again when a reload starts fresh workers.
        """
        if self._value is not None:
            self._stamp = _stamp(self._paths)

    def get(self) -> T | None:
        now = time.monotonic()
        if self._value is not None and now - self._checked < RECHECK_SECONDS:
            return self._value
        self._checked = now
        stamp = _stamp(self._paths)
        if stamp == self._stamp and self._value is not None:
            return self._value
        try:
            self._value = self._build()
            if self._stamp is not None:
                log.info("%s: files changed, reloaded", self._what)
            self.error = None
        except Exception as exc:
            self.error = str(exc)
            log.error(
                "%s: cannot load (%s); %s",
                self._what,
                exc,
                "keeping the previous one" if self._value else "TLS unavailable",
            )
        self._stamp = stamp
        return self._value


def watch_file(what: str, path: Path | None, read: Callable[[Path], T]) -> FileWatch[T] | None:
    """A FileWatch of the one file `path`, read by `read`; None when no file is configured."""
    if path is None:
        return None
    return FileWatch(what, [path], lambda: read(path))
