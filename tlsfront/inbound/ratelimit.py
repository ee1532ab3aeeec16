"""A per-client limit on new TLS sessions (threat `handshake-flood`).

Theory of operation
-------------------
A full TLS handshake costs the server a private-key operation; a client
that opens handshake after handshake can keep a core busy while sending
next to nothing. Postfix answers with `smtpd_client_new_tls_session_rate_limit`;
tlsfront's equivalent is the profile key `tls_rate_limit`: at most that many
TLS handshakes per client IP address in any 60-second window. Beyond it,
STARTTLS gets `454 4.7.0` (the client may go on in clear or come back later)
and a connection to an implicit-TLS port is closed before the handshake.

The limiter keeps, per address, the start times of its handshakes in the last
window: never more than `limit` of them, because a refused attempt is not
recorded. Addresses whose newest entry has left the window are forgotten by
a sweep that runs at most once a window, so memory is bounded by the limit
times the number of addresses seen in the last two windows.

The limit is passed in at each call rather than stored, so a configuration
reload that changes it applies to the next attempt while the history stays.
Time comes from the caller (`trio.current_time()`), which keeps the limiter
testable on virtual time.
"""

from __future__ import annotations

from collections import deque

WINDOW = 60.0  # seconds: the limit is "per minute"


class TLSRateLimiter:
    """Counts new TLS sessions per client address over a sliding window."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._starts: dict[str, deque[float]] = {}
        self._last_sweep = float("-inf")

    def allow(self, ip: str, limit: int, now: float) -> bool:
        """Whether `ip` may start a TLS session now; records it when it may.

        `limit` <= 0 means no limit (nothing is recorded).
        """
        if limit <= 0:
            return True
        self._sweep(now)
        starts = self._starts.get(ip)
        if starts is None:
            starts = self._starts[ip] = deque()
        horizon = now - self.window
        while starts and starts[0] <= horizon:
            starts.popleft()
        while len(starts) > limit:  # the limit was lowered by a reload
            starts.popleft()
        if len(starts) >= limit:
            return False
        starts.append(now)
        return True

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self.window:
            return
        self._last_sweep = now
        horizon = now - self.window
        stale = [ip for ip, starts in self._starts.items() if not starts or starts[-1] <= horizon]
        for ip in stale:
            del self._starts[ip]

    def __len__(self) -> int:
        """How many addresses are being tracked (for tests and metrics)."""
        return len(self._starts)


__all__ = ["WINDOW", "TLSRateLimiter"]
