"""What a backend shows before any mail: its greeting and its EHLO reply.

With the backend on demand, tlsfront answers the greeting and EHLO itself
and starts the backend only when a command needs it. What it answers must
be what the backend would have said, so the backend's face is learned
beforehand:

* by a probe (`Probe`): the backend is started once, as for a local client,
  and asked `EHLO <hostname>` and `QUIT`; its greeting and EHLO reply are
  kept as they came;
* from qmail's control files where `qmail_control` is set: qmail-smtpd
  greets with `220 <smtpgreeting> ESMTP` (`control/smtpgreeting`, else
  `control/me`), and its EHLO and HELO replies begin with that text.

When no probe has succeeded, the EHLO reply carries no extension of the
backend's (`BackendFace.conservative`): tlsfront never offers a client an
extension that the backend may lack. `Probe` is sans-I/O, like the
dialogue: the shell feeds it the backend's bytes and sends what it says.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlsfront.smtp.errors import ProtocolError
from tlsfront.smtp.reply import Reply
from tlsfront.smtp.replyreader import ReplyReader


@dataclass(frozen=True)
class BackendFace:
    """The backend's greeting and EHLO reply, as tlsfront answers them itself."""

    greeting: Reply  # the 220 reply a client gets at connect
    ehlo: Reply  # the backend's own EHLO reply, before tlsfront's rewriting
    probed: bool  # the extensions come from the backend itself

    @property
    def helo(self) -> Reply:
        """The HELO reply: 250 and the first line of the EHLO reply (qmail's)."""
        return Reply(250, self.ehlo.lines[:1])

    @classmethod
    def conservative(cls, text: str) -> BackendFace:
        """No probe: greet with `text`, offer no extension of the backend's."""
        return cls(Reply.make(220, f"{text} ESMTP"), Reply.make(250, text), probed=False)

    @classmethod
    def learned(cls, greeting: Reply, ehlo: Reply, text: str | None = None) -> BackendFace:
        """What a probe saw; `text` (from qmail's control files) names the server."""
        if text is not None:
            greeting = Reply.make(220, f"{text} ESMTP")
            ehlo = Reply(250, (text.encode("utf-8"), *ehlo.lines[1:]))
        return cls(greeting, ehlo, probed=True)


class ProbeFailed(Exception):
    """The probe did not see a 2xx greeting and a 250 EHLO reply."""


class Probe:
    """The probe's side of one short SMTP session: greeting, EHLO, QUIT.

    Feed it the backend's bytes (`receive`); send what `take_output` gives.
    `done` once the EHLO reply is in; `ProbeFailed` for anything else than a
    2xx greeting and a 250 reply to EHLO.
    """

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        self._reader = ReplyReader()
        self._output = b""
        self.greeting: Reply | None = None
        self.ehlo: Reply | None = None

    @property
    def done(self) -> bool:
        return self.ehlo is not None

    def take_output(self) -> bytes:
        data, self._output = self._output, b""
        return data

    def receive(self, data: bytes) -> None:
        if not data:
            raise ProbeFailed("the backend closed the connection")
        try:
            replies = self._reader.feed(data)
        except ProtocolError as exc:
            raise ProbeFailed(exc.text) from exc
        for reply in replies:
            self._reply(reply)
        if self._reader.failure is not None:
            raise ProbeFailed(self._reader.failure.text)

    def _reply(self, reply: Reply) -> None:
        first = reply.lines[0].decode("utf-8", "replace") if reply.lines else ""
        if self.greeting is None:
            if not 200 <= reply.code < 300:
                raise ProbeFailed(f"greeting {reply.code} {first}")
            self.greeting = reply
            self._output = f"EHLO {self._hostname}\r\n".encode()
        elif self.ehlo is None:
            if reply.code != 250:
                raise ProbeFailed(f"EHLO answered {reply.code} {first}")
            self.ehlo = reply
            self._output = b"QUIT\r\n"


__all__ = ["BackendFace", "Probe", "ProbeFailed"]
