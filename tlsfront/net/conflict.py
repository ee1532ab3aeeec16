"""One task at a time per direction of a stream.

A trio stream allows one task to send while another receives, but not two
senders or two receivers at once: their bytes would interleave, or each
would read part of what the other waits for. Every stream of tlsfront (the
try-first sockets and pipes, the TLS stream) guards each direction with a
`ConflictDetector`, the same way::

    conflict = self._send_conflict
    if conflict.held:
        raise conflict.busy()
    conflict.held = True
    try:
        ...  # the whole send, waits included
    finally:
        conflict.held = False

A second task arriving while the first is inside gets
`trio.BusyResourceError` at once (a bug in the caller, never a wait).

Why not a context manager (``with conflict:``), as trio's own streams do:
every send and receive of a session passes here, twice with TLS (the TLS
stream and its socket), about a hundred times in a short mail session, and
a ``with`` on a Python class costs two interpreter-level calls each time
(about 0.3 us more than a flag on CPython 3.11, near 1 % of such a session's
CPU time). A slot test and two stores cost next to nothing.
"""

from __future__ import annotations

import trio

__all__ = ["ConflictDetector"]


class ConflictDetector:
    """Whether a task is inside one direction of a stream (`held`), and the error if so."""

    __slots__ = ("_message", "held")

    def __init__(self, message: str) -> None:
        self._message = message
        self.held = False

    def busy(self) -> trio.BusyResourceError:
        """The error for a second task (the caller raises it)."""
        return trio.BusyResourceError(self._message)
