"""SMTP as tlsfront speaks it, in both directions: protocol logic only, no I/O."""

from tlsfront.smtp.dialogue import Dialogue
from tlsfront.smtp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from tlsfront.smtp.outcome import Ending, Outcome
from tlsfront.smtp.pending import DialogueStats
from tlsfront.smtp.phases import TRANSITIONS, Event, Phase, Side
from tlsfront.smtp.received import TraceInfo, build_received
from tlsfront.smtp.reply import Reply, rewrite_ehlo
from tlsfront.smtp.replyreader import ReplyReader

__all__ = [
    "TRANSITIONS",
    "Dialogue",
    "DialogueStats",
    "Ending",
    "Event",
    "LocalProtocolError",
    "Outcome",
    "Phase",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "ReplyReader",
    "Side",
    "TraceInfo",
    "build_received",
    "rewrite_ehlo",
]
