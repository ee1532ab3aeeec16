"""The entries of the dialogue's reply queue, and its counters.

Each command the client sends becomes one `Pending` entry in the order its
reply is owed; `Kind` says what its reply sets going. The dialogue, its
backend on demand (`tlsfront.smtp.ondemand`), its AUTH exchange
(`tlsfront.smtp.authexchange`) and its message transfer
(`tlsfront.smtp.message`) all work on these entries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tlsfront.smtp.command import Command
from tlsfront.smtp.outcome import Ending
from tlsfront.smtp.reply import Reply


class Kind(enum.Enum):
    GREETING = enum.auto()
    HELO = enum.auto()
    EHLO = enum.auto()
    DATA = enum.auto()
    DOT = enum.auto()
    QUIT = enum.auto()
    STARTTLS = enum.auto()
    MAIL = enum.auto()
    RSET = enum.auto()
    AUTH = enum.auto()
    OTHER = enum.auto()


@dataclass(eq=False, slots=True)
class Pending:
    kind: Kind
    command: Command | None = None
    reply: Reply | None = None
    swallow: bool = False  # the fresh backend's greeting after TLS
    check: bool = False  # on demand: a greeting or HELO reply checked, never passed on
    close_after: bool = False  # a fatal local error: close once it is sent
    desync: bool = False  # input pipelined behind it: 554 5.5.0 in its place, close
    reset_after: bool = False  # the 552 of a dropped message: a fresh backend next


@dataclass(slots=True)
class DialogueStats:
    commands: int = 0  # command lines read from the client
    messages: int = 0  # messages the backend accepted (2xx after the dot)
    refused: int = 0  # messages the backend or tlsfront refused
    body_bytes: int = 0
    discarded_after_starttls: int = 0
    helo: str | None = None
    ending: Ending | None = None  # how the dialogue ended; the first cause wins
    events: list[str] = field(default_factory=list)  # notable protocol events, for the log
