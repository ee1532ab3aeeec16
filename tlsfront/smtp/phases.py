"""The dialogue's phases, and the one table of moves between them.

`Dialogue.phase` says how the dialogue reads client bytes and what the shell
must do; it changes only by an `Event`, and only as `TRANSITIONS` says (an
event-driven table, as h11 keeps one). A move the table does not have is a
`LocalProtocolError`: a bug in the dialogue, never something a peer can
cause.

    COMMAND --DATA_SENT--> DATA_WAIT --GO_AHEAD--> BODY --BODY_END--> COMMAND
                           DATA_WAIT --DATA_REFUSED--> COMMAND
    COMMAND --STARTTLS_READ--> STARTTLS_WAIT --STARTTLS_DUE--> STARTTLS_READY
    STARTTLS_READY --TLS_ACCEPTED--> HANDSHAKE
    STARTTLS_READY --TLS_REFUSED--> COMMAND
    COMMAND --MESSAGE_DROPPED--> RESET
    COMMAND --AUTH_READ--> AUTH --AUTH_DONE--> COMMAND
    COMMAND --AUTHENTICATED--> RESET (235 sent, a backend from before it runs)
    any phase --CLOSE--> CLOSING

Where the backend starts on demand, the dialogue's backend has a state of
its own (`BackendState`), moved by a `BackendEvent` as
`BACKEND_TRANSITIONS` says, apart from the phase:

    ABSENT --NEEDED--> WANTED --STARTED--> CHECKING --ACCEPTED--> READY
                       WANTED --UNAVAILABLE--> REFUSED
                                           CHECKING --REFUSED--> REFUSED

With the backend at connect it is READY from the start.
"""

from __future__ import annotations

import enum
from typing import Literal


class Phase(enum.Enum):
    COMMAND = "command"  # reading command lines
    DATA_WAIT = "data-wait"  # DATA sent to the backend, client paused until its reply
    BODY = "body"  # reading the message body
    STARTTLS_WAIT = "starttls-wait"  # STARTTLS read, replies owed before it still out
    STARTTLS_READY = "starttls-ready"  # the shell must accept or refuse STARTTLS now
    HANDSHAKE = "handshake"  # 220 queued: the shell does the TLS handshake
    CLOSING = "closing"  # send what the client outbox holds, then close both sides
    RESET = "reset"  # a message dropped, or a login: the shell starts a fresh backend
    AUTH = "auth"  # tlsfront's own AUTH exchange: client lines are SASL responses


class Event(enum.Enum):
    """What moves the dialogue from one phase to another."""

    DATA_SENT = "DATA passed to the backend"
    GO_AHEAD = "the backend's 354"
    DATA_REFUSED = "the backend's reply to DATA, not 354"
    BODY_END = "the end of the body"
    STARTTLS_READ = "STARTTLS read"
    STARTTLS_DUE = "every reply owed before STARTTLS sent"
    TLS_ACCEPTED = "220 to STARTTLS"
    TLS_REFUSED = "454 to STARTTLS"
    MESSAGE_DROPPED = "552 sent for a message refused mid-body"
    AUTH_READ = "AUTH read, on a profile with a verifier"
    AUTH_DONE = "the AUTH exchange answered"
    AUTHENTICATED = "235 sent while a backend from before the login runs"
    CLOSE = "the session ends"


# Every legal move: the phase, the event, the phase it leads to.
TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    Phase.COMMAND: {
        Event.DATA_SENT: Phase.DATA_WAIT,
        Event.STARTTLS_READ: Phase.STARTTLS_WAIT,
        Event.MESSAGE_DROPPED: Phase.RESET,
        Event.AUTH_READ: Phase.AUTH,
        Event.AUTHENTICATED: Phase.RESET,
        Event.CLOSE: Phase.CLOSING,
    },
    Phase.AUTH: {
        Event.AUTH_DONE: Phase.COMMAND,
        Event.CLOSE: Phase.CLOSING,
    },
    Phase.DATA_WAIT: {
        Event.GO_AHEAD: Phase.BODY,
        Event.DATA_REFUSED: Phase.COMMAND,
        Event.CLOSE: Phase.CLOSING,
    },
    Phase.BODY: {
        Event.BODY_END: Phase.COMMAND,
        Event.CLOSE: Phase.CLOSING,
    },
    Phase.STARTTLS_WAIT: {
        Event.STARTTLS_DUE: Phase.STARTTLS_READY,
        Event.CLOSE: Phase.CLOSING,
    },
    Phase.STARTTLS_READY: {
        Event.TLS_ACCEPTED: Phase.HANDSHAKE,
        Event.TLS_REFUSED: Phase.COMMAND,
        Event.CLOSE: Phase.CLOSING,
    },
    Phase.HANDSHAKE: {Event.CLOSE: Phase.CLOSING},  # the client went away before it
    Phase.RESET: {Event.CLOSE: Phase.CLOSING},
    Phase.CLOSING: {Event.CLOSE: Phase.CLOSING},  # a second cause changes nothing
}


class BackendState(enum.Enum):
    """Where the dialogue's backend is (the backend on demand)."""

    ABSENT = "absent"  # none yet: tlsfront answers what it owns
    WANTED = "wanted"  # a held command needs it: the shell must start it
    CHECKING = "checking"  # started: its greeting and HELO reply are being checked
    READY = "ready"  # every command goes to it
    REFUSED = "refused"  # it refused (or could not start): its reply answers what needed it


class BackendEvent(enum.Enum):
    """What moves the backend from one state to another."""

    NEEDED = "a command tlsfront does not answer itself"
    STARTED = "the shell started the backend"
    UNAVAILABLE = "the backend could not be started"
    ACCEPTED = "2xx to its greeting and to the client's HELO/EHLO"
    REFUSED = "anything else to its greeting or to the client's HELO/EHLO"


BACKEND_TRANSITIONS: dict[BackendState, dict[BackendEvent, BackendState]] = {
    BackendState.ABSENT: {BackendEvent.NEEDED: BackendState.WANTED},
    BackendState.WANTED: {
        BackendEvent.STARTED: BackendState.CHECKING,
        BackendEvent.UNAVAILABLE: BackendState.REFUSED,
    },
    BackendState.CHECKING: {
        BackendEvent.ACCEPTED: BackendState.READY,
        BackendEvent.REFUSED: BackendState.REFUSED,
    },
    BackendState.READY: {},
    BackendState.REFUSED: {},
}

# Who the dialogue waits for; the shell's timer for that side runs meanwhile.
Side = Literal["client", "backend"]
