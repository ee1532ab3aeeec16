"""Protocol errors, each carrying the SMTP reply it suggests (h11's model)."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class. `reply` is the complete reply line to send, with CRLF."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text

    @property
    def reply(self) -> bytes:
        return f"{self.code} {self.status} {self.text}\r\n".encode("ascii")


class RemoteProtocolError(ProtocolError):
    """The peer (client or backend) broke the protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to use the state machine in a way it does not allow."""
