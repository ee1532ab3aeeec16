"""The session record: what one session did, and how it ended, for logs and metrics.

The session fills a `SessionRecord` in as things happen: the handshake's
version and cipher, the relay decision, the messages, and how it ended (an
`Ending`, set where the event happened: the dialogue, the TLS handshake,
the backend's start). When the session is over, the end line is logged
from it (`line`, `fields`) and the counters read it.

This module is the one place where an outcome becomes words and labels:
the end line shows the ending's own words (`reason='quit'`) and a metric
label from `SessionLabel`, a fixed set, whatever the words were. A failed
handshake is labelled by its `HandshakeFailure` and a failed backend by a
`BackendLabel`, fixed sets too, so no text from a peer or from OpenSSL
ever becomes a label.
"""

from __future__ import annotations

import enum
import itertools
import os
from dataclasses import dataclass, field

from tlsfront.inbound.relaypolicy import RelayGrant
from tlsfront.net.address import Address
from tlsfront.smtp.outcome import Ending, Outcome
from tlsfront.tls.stream import HandshakeFailure


class SessionLabel(enum.StrEnum):
    """The `outcome` label of a connection that ended (logs and metrics)."""

    OK = "ok"
    TIMEOUT = "timeout"
    CLIENT_LOST = "client_lost"
    TLS_FAILED = "tls_failed"
    RATE_LIMITED = "rate_limited"
    BACKEND_FAILED = "backend_failed"
    BACKEND_CLOSED = "backend_closed"
    PROTOCOL_ERROR = "protocol_error"
    PIPELINING = "pipelining"  # SMTP protocol synchronization (554 5.5.0)
    REFUSED = "refused"  # turned away by a connection limit, before a session
    DENIED = "denied"  # turned away by an access rule, before a session
    SHUTDOWN = "shutdown"
    CANCELLED = "cancelled"
    ERROR = "error"  # an internal error ended the connection


class BackendLabel(enum.StrEnum):
    """The `kind` label of a backend failure."""

    START = "start"  # could not be started
    TIMEOUT = "timeout"  # hung
    EXITED = "exited"  # went away
    PROTOCOL = "protocol"  # spoke nonsense


SESSION_LABELS: dict[Outcome, SessionLabel] = {
    Outcome.QUIT: SessionLabel.OK,
    Outcome.CLIENT_CLOSED: SessionLabel.OK,
    Outcome.CLIENT_LOST: SessionLabel.CLIENT_LOST,
    Outcome.CLIENT_TIMEOUT: SessionLabel.TIMEOUT,
    Outcome.PROTOCOL_ERROR: SessionLabel.PROTOCOL_ERROR,
    Outcome.PIPELINING: SessionLabel.PIPELINING,
    Outcome.SHUTDOWN: SessionLabel.SHUTDOWN,
    Outcome.BACKEND_CLOSED: SessionLabel.BACKEND_CLOSED,
    Outcome.BACKEND_TIMEOUT: SessionLabel.BACKEND_FAILED,
    Outcome.BACKEND_EXITED: SessionLabel.BACKEND_FAILED,
    Outcome.BACKEND_PROTOCOL: SessionLabel.BACKEND_FAILED,
    Outcome.BACKEND_START: SessionLabel.BACKEND_FAILED,
    Outcome.TLS_FAILED: SessionLabel.TLS_FAILED,
    Outcome.TLS_UNAVAILABLE: SessionLabel.TLS_FAILED,
    Outcome.RATE_LIMITED: SessionLabel.RATE_LIMITED,
    Outcome.CANCELLED: SessionLabel.CANCELLED,
}

BACKEND_LABELS: dict[Outcome, BackendLabel] = {
    Outcome.BACKEND_START: BackendLabel.START,
    Outcome.BACKEND_TIMEOUT: BackendLabel.TIMEOUT,
    Outcome.BACKEND_EXITED: BackendLabel.EXITED,
    Outcome.BACKEND_PROTOCOL: BackendLabel.PROTOCOL,
}


_serial = itertools.count(1)


def next_session_id() -> str:
    """A session's id: unique on the host for the life of the process (pid.serial)."""
    return f"{os.getpid()}.{next(_serial)}"


def handshake_label(failure: HandshakeFailure) -> str:
    """The `reason` label of a failed handshake: one of a fixed set."""
    return failure.value


@dataclass(slots=True)
class SessionRecord:
    """What the end-of-session log line reports, and the counters count."""

    profile: str
    client: Address
    started: float
    tls_version: str | None = None
    tls_cipher: str | None = None
    sni: str | None = None  # the server-name entry whose certificate was sent, if a table
    cert_status: str = "none"
    relay: RelayGrant = RelayGrant.NO  # why it may relay
    messages: int = 0
    refused: int = 0
    bytes: int = 0
    backend_exit: int | None = None
    ending: Ending | None = None  # how it ended; None only after an internal error
    events: list[str] = field(default_factory=list)
    tls_failure: HandshakeFailure | None = None  # the handshake's, when it failed
    backend_failure: Outcome | None = None  # a backend failure in any phase
    id: str = field(default_factory=next_session_id)  # names its backends' stderr lines

    def end(self, outcome: Outcome, text: str) -> None:
        """Record how the session ended, in the shell's own words."""
        self.ending = Ending(outcome, text)
        if outcome in BACKEND_LABELS:
            self.backend_failure = outcome

    @property
    def reason(self) -> str:
        """The ending in words, for the log."""
        return self.ending.text if self.ending is not None else ""

    @property
    def outcome(self) -> SessionLabel:
        """The label for how the session ended (logs and metrics).

        A failed handshake or a failed backend labels the session even when
        a later phase ended otherwise; a session that has no ending (an
        internal error cut it) counts as a protocol error.
        """
        if self.tls_failure is not None:
            return SessionLabel.TLS_FAILED
        if self.backend_failure is not None:
            return SessionLabel.BACKEND_FAILED
        if self.ending is None:
            return SessionLabel.PROTOCOL_ERROR
        return SESSION_LABELS[self.ending.outcome]

    @property
    def backend_label(self) -> BackendLabel | None:
        if self.backend_failure is None:
            return None
        return BACKEND_LABELS[self.backend_failure]

    @property
    def tls_failure_label(self) -> str | None:
        return None if self.tls_failure is None else handshake_label(self.tls_failure)

    def fields(self, now: float) -> dict[str, object]:
        """The end line's fields, by name (the JSON log's keys)."""
        return {
            "session_id": self.id,
            "client_ip": self.client.ip,
            "client_port": self.client.port,
            "profile": self.profile,
            "tls_version": self.tls_version,
            "tls_cipher": self.tls_cipher,
            "sni": self.sni,
            "cert": self.cert_status,
            "relay": self.relay.value,
            "messages": self.messages,
            "refused": self.refused,
            "bytes": self.bytes,
            "backend_exit": self.backend_exit,
            "duration": round(now - self.started, 3),
            "outcome": self.outcome.value,
            "reason": self.reason,
        }

    def line(self, now: float) -> str:
        tls = f"{self.tls_version}/{self.tls_cipher}" if self.tls_version else "none"
        if self.sni is not None:
            tls += f" sni={self.sni}"
        exit_status = "-" if self.backend_exit is None else str(self.backend_exit)
        return (
            f"session end: id={self.id} client={self.client.ip}:{self.client.port} "
            f"profile={self.profile} "
            f"tls={tls} cert={self.cert_status} relay={self.relay.value} messages={self.messages} "
            f"refused={self.refused} bytes={self.bytes} backend_exit={exit_status} "
            f"duration={now - self.started:.3f}s outcome={self.outcome.value} "
            f"reason={self.reason!r}"
        )


__all__ = [
    "BACKEND_LABELS",
    "SESSION_LABELS",
    "BackendLabel",
    "SessionLabel",
    "SessionRecord",
    "handshake_label",
    "next_session_id",
]
