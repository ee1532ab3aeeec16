"""The backend on demand: what the dialogue answers before a backend runs.

Given the backend's face (`BackendFace`: its greeting and EHLO reply), the
dialogue starts without a backend (`backend` is `BackendState.ABSENT`). It
answers the greeting, EHLO, HELO, NOOP, RSET and QUIT itself, with the
backend's own words. The first command it does not own (MAIL, VRFY, HELP,
anything else) is held, and `backend` becomes `WANTED`: the shell starts
the backend, with everything known by then in its environment, and calls
`backend_started` (or `backend_unavailable`). Nothing behind the held
command is read meanwhile. The backend's greeting is then checked, not
passed on; the client's own HELO or EHLO line is sent and its reply checked
the same way; only then does the held command go to the backend (`READY`),
and the dialogue relays from there on. A greeting or HELO reply that is not
2xx is a refusal (`REFUSED`): the held command, and every later one that
needs the backend, gets that very reply, and a 421 closes the session; no
command ever reaches a refusing backend.

`BackendOnDemand` holds that state for one `Dialogue` and works on its
reply queue, which each method is given (it keeps no reference to the
dialogue, so a finished session is freed by reference counting alone, with
no cycle for the garbage collector to find); it does no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlsfront.smtp import backendside, replies
from tlsfront.smtp.command import Command
from tlsfront.smtp.face import BackendFace
from tlsfront.smtp.pending import Kind, Pending
from tlsfront.smtp.phases import BackendEvent, BackendState, Event
from tlsfront.smtp.reply import Reply

if TYPE_CHECKING:
    from tlsfront.smtp.dialogue import Dialogue

# What tlsfront answers itself while no backend runs (STARTTLS is always its own).
OWNED_VERBS = frozenset({"EHLO", "HELO", "NOOP", "RSET", "QUIT"})


class BackendOnDemand:
    """The held command, and the backend's refusal, of one dialogue (see module doc)."""

    def __init__(self, face: BackendFace) -> None:
        self.face = face
        self.held: Pending | None = None  # the command that wants the backend
        self.refusal: Reply | None = None

    def hold(self, d: Dialogue, entry: Pending) -> None:
        """The first command that needs the backend: answered once it runs."""
        d._pending.append(entry)
        self.held = entry
        d._backend_move(BackendEvent.NEEDED)

    def started(self, d: Dialogue) -> None:
        if d.backend is not BackendState.WANTED:
            raise replies.no_backend_wanted()
        d._backend_move(BackendEvent.STARTED)
        d._awaiting.append(Pending(Kind.GREETING, swallow=True, check=True))

    def unavailable(self, d: Dialogue) -> None:
        held = self.held
        if d.backend is not BackendState.WANTED or held is None:
            raise replies.no_backend_wanted()
        self.held = None
        d._backend_move(BackendEvent.UNAVAILABLE)
        held.reply = replies.backend_unavailable(d.hostname)
        held.close_after = True
        d._deliver()

    def checked(self, d: Dialogue, entry: Pending, reply: Reply) -> None:
        """The backend's greeting or HELO reply, on demand: go on, or refuse."""
        if not 200 <= reply.code < 300:
            self._refuse(d, reply)
            return
        hello = d._hello
        if entry.kind is Kind.GREETING and hello is not None:
            kind = Kind.EHLO if hello.verb == "EHLO" else Kind.HELO
            d._forward(Pending(kind, hello, swallow=True, check=True), queued=False)
            return
        if entry.kind is Kind.EHLO:
            d.backend_ehlo = reply
        held = self.held
        assert held is not None
        self.held = None
        d._backend_move(BackendEvent.ACCEPTED)
        d._forward(held, queued=False)
        if held.kind is Kind.DATA:
            d._move(Event.DATA_SENT)

    def _refuse(self, d: Dialogue, reply: Reply) -> None:
        """The backend refused the session: its reply answers the held command."""
        held = self.held
        assert held is not None
        self.held = None
        d._backend_move(BackendEvent.REFUSED)
        self.refusal = reply
        d._awaiting.clear()
        d.backend_should_close = True
        first = reply.lines[0].decode("utf-8", "replace") if reply.lines else ""
        d.stats.events.append(f"backend refused the session: {reply.code} {first}")
        held.reply = reply
        d._deliver()

    def answer(self, d: Dialogue, entry: Pending, command: Command) -> None:
        """A command tlsfront answers itself while no backend runs."""
        verb = command.verb
        if verb == "EHLO":
            entry.kind = Kind.EHLO
            d._answer(entry, backendside.advertised(d, self.face.ehlo))
        elif verb == "HELO":
            entry.kind = Kind.HELO
            d._answer(entry, self.face.helo)
        elif verb == "QUIT":
            entry.kind = Kind.QUIT
            d._answer(entry, replies.closing(d.hostname))
        else:  # NOOP, RSET: no transaction exists without a backend
            entry.kind = Kind.RSET if verb == "RSET" else Kind.OTHER
            d._answer(entry, replies.ok())
