"""Abuse limits on SMTP AUTH, and the failure log line fail2ban reads.

Theory of operation
-------------------
A password guesser is slowed three ways:

- every failed attempt in a session costs a delay before the `535` goes out,
  `base_delay` doubled for each earlier failure, up to `max_delay`;
- a session has at most `max_failures` failed attempts (`auth_max_failures`):
  the last one is answered, then `421 4.7.0` and the connection is closed;
- an address has at most `per_minute` failures in any 60-second window across
  all the sessions of the process (`FailureLimiter`, one per process); beyond
  it, AUTH gets `421 4.7.0` and the session is closed before any check.

Only failed attempts count: a good login costs nothing, and neither does a
cancelled or malformed exchange (the exchange decides, see `sasl.Refused`).
A temporary failure of the verifier is not the client's fault and costs
nothing either.

Each failure is logged as one line of a fixed format,
`AUTH failed: client=<ip> user=<name> mechanism=<mech> verifier=<name>`,
which `conf/fail2ban/tlsfront-auth.conf` matches. The user name is the
client's own text, so it is cut to 64 characters and every space, control
character and non-ASCII character in it becomes `?`: a crafted name cannot
forge a second `client=` for fail2ban to ban. No password is ever passed here.
Time comes from the caller (`trio.current_time()`), so this runs on virtual time.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

WINDOW = 60.0
MAX_USER = 64
log = logging.getLogger("tlsfront")


class FailureLimiter:
    """Failed logins per client address over a sliding minute (one per process)."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._failures: dict[str, deque[float]] = {}
        self._last_sweep = float("-inf")

    def record(self, ip: str, now: float) -> None:
        self._sweep(now)
        self._failures.setdefault(ip, deque()).append(now)

    def count(self, ip: str, now: float) -> int:
        """Failures of `ip` in the window that ends now."""
        failures = self._failures.get(ip)
        if failures is None:
            return 0
        horizon = now - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        return len(failures)

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self.window:
            return
        self._last_sweep = now
        horizon = now - self.window
        stale = [ip for ip, times in self._failures.items() if not times or times[-1] <= horizon]
        for ip in stale:
            del self._failures[ip]

    def __len__(self) -> int:
        return len(self._failures)


@dataclass(frozen=True)
class Penalty:
    """After a failure: wait `delay` seconds, reply 535, then close if `close`
    (after `421 4.7.0 Too many failed authentication attempts`)."""

    delay: float
    close: bool


class SessionThrottle:
    """The limits as one session sees them."""

    def __init__(
        self,
        limiter: FailureLimiter,
        ip: str,
        *,
        max_failures: int = 3,
        per_minute: int = 10,
        base_delay: float = 2.0,
        max_delay: float = 30.0,
    ) -> None:
        self.limiter = limiter
        self.ip = ip
        self.max_failures = max_failures
        self.per_minute = per_minute
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.failures = 0

    def may_try(self, now: float) -> bool:
        """Whether an AUTH may be checked now; if not: 421 4.7.0 and close."""
        if 0 < self.max_failures <= self.failures:
            return False
        return not (0 < self.per_minute <= self.limiter.count(self.ip, now))

    def failed(self, now: float) -> Penalty:
        self.failures += 1
        self.limiter.record(self.ip, now)
        delay = min(self.max_delay, self.base_delay * 2 ** (self.failures - 1))
        return Penalty(delay, close=not self.may_try(now))


def clean_user(user: str | None) -> str:
    """The user name as it may appear in a log line (see the module doc)."""
    if not user:
        return "-"
    cut = user[:MAX_USER]
    return "".join(c if "!" <= c <= "~" else "?" for c in cut)


def failure_line(ip: str, user: str | None, mechanism: str, verifier: str) -> str:
    return (
        f"AUTH failed: client={ip} user={clean_user(user)} "
        f"mechanism={mechanism} verifier={verifier}"
    )


def log_failure(ip: str, user: str | None, mechanism: str, verifier: str) -> None:
    log.warning("%s", failure_line(ip, user, mechanism, verifier))


__all__ = [
    "WINDOW",
    "FailureLimiter",
    "Penalty",
    "SessionThrottle",
    "clean_user",
    "failure_line",
    "log_failure",
]
