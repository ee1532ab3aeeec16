"""One task at a time per direction of a stream.

A trio stream allows one task to send while another receives, but not two
senders or two receivers at once: their bytes would interleave, or each
would read part of what the other waits for. Every stream of tlsfront (the
try-first sockets and pipes, the TLS stream) guards each direction with a
`ConflictDetector`::

    with self._send_conflict:
        ...  # the whole send, waits included

A second task entering while the first is inside gets
`trio.BusyResourceError` at once (a bug in the caller, never a wait).
"""

from __future__ import annotations

from types import TracebackType

import trio

__all__ = ["ConflictDetector"]


class ConflictDetector:
    """Raises `trio.BusyResourceError(message)` when entered while already entered."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._held = False
