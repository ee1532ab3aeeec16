"""How a session ended, as a value: set where it happens, read by logs and metrics.

Each way a session can end is one `Outcome`. Whoever sees the event sets
it: the dialogue (QUIT, the client gone or too slow, the backend's 421, a
protocol error, the backend failing), and the session shell around it (a
TLS handshake that failed, a backend that did not start, a rate limit,
cancellation). An `Ending` pairs the outcome with the words the session
end line shows (`reason='quit'`); nothing downstream reads those words to
decide anything. The mapping from outcomes to metric labels is in
`tlsfront.inbound.record`, in one table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    # set by the dialogue
    QUIT = enum.auto()  # the client said QUIT
    CLIENT_CLOSED = enum.auto()  # the client hung up between transactions
    CLIENT_LOST = enum.auto()  # the client hung up in the middle of DATA
    CLIENT_TIMEOUT = enum.auto()  # the client was too slow (or stopped reading)
    PROTOCOL_ERROR = enum.auto()  # the client broke the protocol; tlsfront closed
    PIPELINING = enum.auto()  # the client pipelined where RFC 2920 forbids it: 554 5.5.0
    SHUTDOWN = enum.auto()  # tlsfront is stopping: 421 4.3.2 at an idle point
    BACKEND_CLOSED = enum.auto()  # the backend answered 421 and closed the channel
    BACKEND_TIMEOUT = enum.auto()  # the backend did not answer in time
    BACKEND_EXITED = enum.auto()  # the backend went away
    BACKEND_PROTOCOL = enum.auto()  # the backend spoke nonsense
    # set by the session shell
    BACKEND_START = enum.auto()  # the backend could not be started
    TLS_FAILED = enum.auto()  # the TLS handshake failed, timed out or was cut
    TLS_UNAVAILABLE = enum.auto()  # implicit TLS, but no certificate is loaded
    RATE_LIMITED = enum.auto()  # too many new TLS sessions from the client
    CANCELLED = enum.auto()  # the server cut the session (the end of a stop)


BACKEND_FAILURES = frozenset(
    {
        Outcome.BACKEND_START,
        Outcome.BACKEND_TIMEOUT,
        Outcome.BACKEND_EXITED,
        Outcome.BACKEND_PROTOCOL,
    }
)


@dataclass(frozen=True, slots=True)
class Ending:
    """An outcome and the words for it in the log (never parsed)."""

    outcome: Outcome
    text: str


__all__ = ["BACKEND_FAILURES", "Ending", "Outcome"]
