"""The SMTP dialogue as tlsfront relays it: protocol logic only, no I/O."""

from tlsfront.smtp.dialogue import Dialogue, DialogueStats, Phase
from tlsfront.smtp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from tlsfront.smtp.outcome import Ending, Outcome
from tlsfront.smtp.received import TraceInfo, build_received
from tlsfront.smtp.reply import Reply, ReplyReader, rewrite_ehlo

__all__ = [
    "Dialogue",
    "DialogueStats",
    "Ending",
    "LocalProtocolError",
    "Outcome",
    "Phase",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "ReplyReader",
    "TraceInfo",
    "build_received",
    "rewrite_ehlo",
]
