"""Counters of outbound deliveries, for the metrics code to read.

`outcomes[(result, tls)]` counts finished transactions:

* result: "delivered" (the remote server said 2xx to the final dot),
  "deferred" (qmail got a 4xx: it will retry), "bounced" (qmail got a 5xx),
  "abandoned" (qmail-remote ended the transaction before its final dot);
* tls: "verified" (certificate checked by policy), "encrypted" (TLS, not
  checked), "cleartext", or "none" (no remote session was opened).

`attempts[tls]` counts connection attempts by how they ended, with the
values above plus "failed" (connect, greeting, STARTTLS or handshake error).

`logins[(result, mechanism)]` counts logins to smarthosts (AUTH): result
"succeeded", "rejected" (a 5xx: the message bounces), "tempfail" (a 4xx)
or "unavailable" (the server offers neither PLAIN nor LOGIN; mechanism "-").
"""

from __future__ import annotations

from collections import Counter

outcomes: Counter[tuple[str, str]] = Counter()
attempts: Counter[str] = Counter()
logins: Counter[tuple[str, str]] = Counter()


def record_outcome(result: str, tls: str) -> None:
    outcomes[(result, tls)] += 1


def record_attempt(tls: str) -> None:
    attempts[tls] += 1


def record_login(result: str, mechanism: str) -> None:
    logins[(result, mechanism)] += 1


def snapshot() -> dict[str, dict[str, int]]:
    """A copy of the counters as plain dictionaries."""
    return {
        "outcomes": {f"{result}:{tls}": n for (result, tls), n in outcomes.items()},
        "attempts": dict(attempts),
        "logins": {f"{result}:{mechanism}": n for (result, mechanism), n in logins.items()},
    }


def reset() -> None:
    outcomes.clear()
    attempts.clear()
    logins.clear()
