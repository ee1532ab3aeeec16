"""Prometheus counters: what tlsfront counts as it happens.

The counters live in one registry for the process (`REGISTRY`). A session
counts itself once, when it ends, from its `SessionRecord`
(`session_ended`): its outcome, its TLS handshake (version, cipher) or the
handshake's failure, the relay decision for a client certificate, why it
could relay (`relay_sessions`: by certificate or by rule), a backend
failure, and the messages and message bytes it relayed. The server counts
the connections it refuses before any session starts. Every label that says
how something ended comes from a fixed set (`tlsfront.inbound.record`).

What describes the running server rather than past events is read at
scrape time instead (`tlsfront.ops.metrics_endpoint`).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, ProcessCollector
from prometheus_client import disable_created_metrics as _disable_created_metrics

from tlsfront.inbound.record import SessionLabel, SessionRecord
from tlsfront.inbound.relaypolicy import RelayGrant

# `*_created` series double every counter for no use on a dashboard.
_disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

SESSIONS = Counter(
    "tlsfront_sessions",
    "Connections ended, by profile and outcome",
    ["profile", "outcome"],
    registry=REGISTRY,
)
HANDSHAKES = Counter(
    "tlsfront_tls_handshakes",
    "TLS handshakes completed, by protocol version and cipher",
    ["profile", "version", "cipher"],
    registry=REGISTRY,
)
HANDSHAKE_FAILURES = Counter(
    "tlsfront_tls_handshake_failures",
    "TLS handshakes that failed, by reason",
    ["profile", "reason"],
    registry=REGISTRY,
)
RELAY = Counter(
    "tlsfront_relay_decisions",
    "Client certificates shown, by whether they authorized relaying (granted) or not "
    "(refused) and by Postfix-style verdict",
    ["profile", "decision", "cert"],
    registry=REGISTRY,
)
AUTH_RESULTS = Counter(
    "tlsfront_auth_results",
    "Logins checked by tlsfront's own AUTH, by mechanism, verifier and result "
    "(good, bad, tempfail)",
    ["profile", "mechanism", "verifier", "result"],
    registry=REGISTRY,
)
RELAY_SESSIONS = Counter(
    "tlsfront_relay_sessions",
    "Sessions that could relay (the backend had RELAYCLIENT), by why: a client "
    "certificate (cert) or a tcprules line or the profile's env (rule)",
    ["profile", "reason"],
    registry=REGISTRY,
)
BACKEND_FAILURES = Counter(
    "tlsfront_backend_failures",
    "Backends that could not start (start), hung (timeout), went away (exited) or "
    "spoke nonsense (protocol)",
    ["profile", "kind"],
    registry=REGISTRY,
)
MESSAGES = Counter(
    "tlsfront_messages",
    "Messages whose end of data the backend answered, by accepted or refused",
    ["profile", "result"],
    registry=REGISTRY,
)
MESSAGE_BYTES = Counter(
    "tlsfront_message_bytes",
    "Message bytes relayed from clients to the backend",
    ["profile"],
    registry=REGISTRY,
)
RELOADS = Counter(
    "tlsfront_reloads",
    "Configuration reloads (SIGHUP), by result",
    ["result"],
    registry=REGISTRY,
)


def auth_result(profile: str, mechanism: str, verifier: str, result: str) -> None:
    AUTH_RESULTS.labels(profile, mechanism, verifier, result).inc()


def declare_profiles(names: Iterable[str]) -> None:
    """Make the per-profile series exist at 0, so rate() works from the start."""
    for name in names:
        for outcome in SessionLabel:
            SESSIONS.labels(name, outcome.value)
        for result in ("accepted", "refused"):
            MESSAGES.labels(name, result)
        MESSAGE_BYTES.labels(name)
        for grant in RelayGrant:
            if grant is not RelayGrant.NO:
                RELAY_SESSIONS.labels(name, grant.value)
    for result in ("ok", "failed"):
        RELOADS.labels(result)


def session_ended(record: SessionRecord) -> None:
    profile = record.profile
    SESSIONS.labels(profile, record.outcome.value).inc()
    if record.tls_version is not None:
        HANDSHAKES.labels(profile, record.tls_version, record.tls_cipher or "").inc()
        if record.cert_status not in ("none", "Anonymous"):
            decision = "granted" if record.relay is RelayGrant.CERT else "refused"
            RELAY.labels(profile, decision, record.cert_status).inc()
    if record.relay is not RelayGrant.NO:
        RELAY_SESSIONS.labels(profile, record.relay.value).inc()
    tls_failure = record.tls_failure_label
    if tls_failure is not None:
        HANDSHAKE_FAILURES.labels(profile, tls_failure).inc()
    backend_failure = record.backend_label
    if backend_failure is not None:
        BACKEND_FAILURES.labels(profile, backend_failure.value).inc()
    if record.messages:
        MESSAGES.labels(profile, "accepted").inc(record.messages)
    if record.refused:
        MESSAGES.labels(profile, "refused").inc(record.refused)
    if record.bytes:
        MESSAGE_BYTES.labels(profile).inc(record.bytes)


def connection_refused(profile: str, outcome: SessionLabel) -> None:
    """A connection turned away before (or cut outside) a session: `refused` by
    the limits, `denied` by the rules, `error` when an internal error ended it."""
    SESSIONS.labels(profile, outcome.value).inc()


__all__ = [
    "BACKEND_FAILURES",
    "HANDSHAKES",
    "HANDSHAKE_FAILURES",
    "MESSAGES",
    "MESSAGE_BYTES",
    "REGISTRY",
    "RELAY",
    "RELAY_SESSIONS",
    "RELOADS",
    "SESSIONS",
    "connection_refused",
    "declare_profiles",
    "session_ended",
]
