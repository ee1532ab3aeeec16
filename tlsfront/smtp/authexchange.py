"""tlsfront's own AUTH exchange, inside the SMTP dialogue.

When a verifier is configured, tlsfront answers AUTH itself and the backend
never sees it. The exchange is refused with 503 before TLS, after a login,
and inside a mail transaction; otherwise `tlsfront.auth.sasl` drives it:
each 334 challenge is answered in place, and the dialogue stays in
`Phase.AUTH`, reading the client's response lines (one line at most
`sasl.MAX_LINE` long) rather than commands. When the exchange has what it
needs to decide (`due`: credentials, or a refusal of the client's input),
the shell checks it and gives its verdict through `Dialogue.auth_concluded`;
its reply takes the AUTH command's place in the reply queue. A failure too
many gets its 535, then 421 and the end of the session. The 530 for a MAIL
before a login (`require_auth`) is the dialogue's own rule.

`AuthExchange` holds that state for one `Dialogue` and works on its reply
queue; it does no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Modules, not names: tlsfront.auth's own modules import this package's
# reply type, so either side may be imported first.
from tlsfront.auth import replies as auth_replies
from tlsfront.auth import sasl
from tlsfront.smtp.command import Command
from tlsfront.smtp.pending import Kind, Pending
from tlsfront.smtp.phases import Event
from tlsfront.smtp.reply import Reply

if TYPE_CHECKING:
    from tlsfront.smtp.dialogue import Dialogue


class AuthExchange:
    """The AUTH exchange in progress, if any, of one dialogue (see module doc)."""

    def __init__(self) -> None:
        self._server: sasl.ServerAuth | None = None  # an exchange in progress
        self._entry: Pending | None = None
        self.due: sasl.Credentials | sasl.Refused | None = None  # the shell must conclude it

    def start(self, d: Dialogue, entry: Pending, command: Command) -> None:
        entry.kind = Kind.AUTH
        if not d.tls_active:
            d._answer(entry, auth_replies.STARTTLS_FIRST)
        elif d.auth_user is not None:
            d._answer(entry, auth_replies.ALREADY)
        elif d._in_transaction:
            d._answer(entry, auth_replies.IN_TRANSACTION)
        else:
            self._server = sasl.ServerAuth(command.args.decode("utf-8", "replace"))
            d._move(Event.AUTH_READ)
            self._step(d, entry, self._server.start())

    def _step(self, d: Dialogue, entry: Pending, step: sasl.Step) -> None:
        if isinstance(step, sasl.Challenge):
            d._answer(entry, step.reply)  # a 334; the next line is the response
            self._entry = Pending(Kind.AUTH)
            return
        d._pending.append(entry)  # answered by `concluded`
        self._entry = entry
        self.due = step

    def line(self, d: Dialogue) -> bool:
        """One response line of the exchange; False until a whole line is there."""
        buffer = d._client_buffer
        end = buffer.find(b"\n", 0, sasl.MAX_LINE)
        if end < 0:
            if len(buffer) >= sasl.MAX_LINE:
                buffer.clear()
                self._conclude(d, auth_replies.LINE_TOO_LONG)
            return False
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        entry, exchange = self._entry, self._server
        assert entry is not None
        assert exchange is not None
        self._step(d, entry, exchange.receive(line.rstrip(b"\r\n")))
        d._deliver()
        return True

    def concluded(self, d: Dialogue, reply: Reply, user: str | None, close: bool) -> None:
        """The shell's verdict on `due`."""
        self.due = None
        if user is not None:
            d.auth_user = user
        self._conclude(d, reply, close)

    def _conclude(self, d: Dialogue, reply: Reply, close: bool = False) -> None:
        entry = self._entry
        assert entry is not None
        if entry not in d._pending:
            d._pending.append(entry)
        entry.reply = reply
        self._entry = self._server = None
        d._move(Event.AUTH_DONE)
        if close and reply.code == 421:  # the limits, before any check
            entry.close_after = True
        elif close:  # a failure too many: its 535, then 421 and close
            d._answer(Pending(Kind.OTHER), auth_replies.TOO_MANY_FAILURES, close=True)
        d._deliver()
        d._process_client()
