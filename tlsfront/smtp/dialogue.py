"""The SMTP dialogue between a client and a backend, as tlsfront relays it.

Theory of operation
-------------------
`Dialogue` is a sans-I/O state machine in the style of h11: the trio shell
feeds it the bytes it reads from the client (`receive_client`) and from the
backend (`receive_backend`), and sends whatever it then finds in the two
outboxes (`take_client_output`, `take_backend_output`). It never touches a
socket, a clock or a process, so every edge case is a short test.

Replies must reach the client in the order of its commands, also when
commands are pipelined (RFC 2920) and some are answered by tlsfront itself
(a `530` on a TLS-only port, a `502` for BDAT). So each command the client
sends becomes a `_Pending` entry in one queue. A command for the backend is
written to the backend outbox and waits for the backend's next reply; a
command tlsfront answers gets its reply at once. Replies leave the queue from
the head only, when they are there: the order is kept by construction. The
backend's greeting is the reply to the first, virtual, entry.

Three commands change how client bytes are read:

* `DATA` holds the client's bytes until the backend answers. Only the
  backend's `354` starts the body (THREATS row 12); any other reply with
  client bytes already waiting behind `DATA` is a synchronization error.
  The shell keeps reading meanwhile (`client_read_ahead`, up to
  `DATA_WAIT_BUFFER`), so that a body sent without waiting for the reply is
  seen as such, as Postfix sees input pending when its reply goes out, and
  not run as commands. Unless synchronization is relaxed (below), such a
  body is refused outright.
* In the body, `BodyScanner` finds the one true end (CRLF.CRLF) and refuses
  bare CR, bare LF and NUL rather than passing them to a lenient backend.
  tlsfront's Received header is written to the backend before the body.
* `STARTTLS` (tlsfront's own) throws away every byte pipelined behind it
  (THREATS rows 1-3), waits until every reply owed before it has gone out,
  then sets `phase` to `STARTTLS_READY`. The shell answers `220` through
  `starttls_accept()` (or `454` through `starttls_refuse()` when TLS cannot
  be had), and does the handshake. After TLS the shell builds a new
  `Dialogue` (and, if any, a fresh backend): nothing from before TLS
  survives.

The backend on demand
---------------------
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
and the dialogue relays from there on as above. A greeting or HELO reply
that is not 2xx is a refusal (`REFUSED`): the held command, and every later
one that needs the backend, gets that very reply, and a 421 closes the
session; no command ever reaches a refusing backend.

A message over `max_message_size` is refused, and the session goes on, as
with qmail-smtpd's databytes (RFC 5321 §4.5.3.1.10): the backend's input is
closed at once without an end of data (it queues nothing and exits), the
rest of the body is read and dropped, and the client's end of data gets
`552`. Then `phase` is `RESET`: the shell starts a fresh backend and a new
`Dialogue` with what this one hands over (`carry`): the client's HELO or
EHLO, replayed to the new backend with its reply and greeting swallowed,
and the client bytes read but not yet taken (commands pipelined behind the
dot). RSET, MAIL and QUIT then work as after any refused message.

Synchronization (`tlsfront.smtp.synchronization`): input pipelined where
RFC 2920 forbids it (behind DATA, BDAT or QUIT; any from a HELO client)
gets `554 5.5.0` in the place of the reply to the command it broke and ends
the session, unless the session is `trusted` or not `pipelining_strict`.

The phases and the events that move between them are one table,
`TRANSITIONS` in `tlsfront.smtp.phases`; every change of `phase` goes
through `_move`, which refuses a move the table does not have. A phase change that the shell
must act on is visible in `phase`, `client_wants_data`, `client_read_ahead`,
`waiting_for` and `backend_should_close`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

# Modules, not names: tlsfront.auth's own modules import this package's
# reply type, so either side may be imported first.
from tlsfront.auth import replies as auth_replies
from tlsfront.auth import sasl
from tlsfront.smtp import replies
from tlsfront.smtp.body import BodyScanner
from tlsfront.smtp.command import Command, parse_command, take_line
from tlsfront.smtp.errors import ProtocolError, RemoteProtocolError
from tlsfront.smtp.face import BackendFace
from tlsfront.smtp.outcome import Ending, Outcome
from tlsfront.smtp.phases import (
    BACKEND_TRANSITIONS,
    TRANSITIONS,
    BackendEvent,
    BackendState,
    Event,
    Phase,
    Side,
)
from tlsfront.smtp.reply import Reply, rewrite_ehlo
from tlsfront.smtp.replyreader import ReplyReader
from tlsfront.smtp.synchronization import GROUP_ENDERS, Discipline


class _Kind(enum.Enum):
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


@dataclass(eq=False)
class _Pending:
    kind: _Kind
    command: Command | None = None
    reply: Reply | None = None
    swallow: bool = False  # the fresh backend's greeting after TLS
    check: bool = False  # on demand: a greeting or HELO reply checked, never passed on
    close_after: bool = False  # a fatal local error: close once it is sent
    desync: bool = False  # input pipelined behind it: 554 5.5.0 in its place, close
    reset_after: bool = False  # the 552 of a dropped message: a fresh backend next


@dataclass(frozen=True)
class Carry:
    """What a dialogue in `RESET` hands to the next one (see the module doc)."""

    hello: Command | None  # the client's last accepted HELO/EHLO, for the new backend
    client_bytes: bytes  # read from the client and not yet taken
    auth_user: str | None = None  # who logged in (tlsfront's own AUTH)


# Keywords tlsfront never passes on from the backend's EHLO reply: STARTTLS
# is tlsfront's own, and the others would let a client speak to the backend
# in a way this dialogue does not follow (BDAT chunks) or could abuse
# (XCLIENT/XFORWARD overwrite the client's identity at the backend).
DROPPED_KEYWORDS = frozenset({"STARTTLS", "CHUNKING", "BINARYMIME", "XCLIENT", "XFORWARD"})
REFUSED_VERBS = frozenset({"BDAT", "XCLIENT", "XFORWARD"})
# How much a client may send behind DATA before the backend's reply: read
# and held, it is the start of the body after a 354, a synchronization error
# after anything else.
DATA_WAIT_BUFFER = 65536
# What a client may do before TLS on a port that requires it (RFC 3207 §4).
ALLOWED_BEFORE_TLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "RSET", "QUIT"})
_FORWARDED_KINDS = {
    "EHLO": _Kind.EHLO,
    "HELO": _Kind.HELO,
    "DATA": _Kind.DATA,
    "QUIT": _Kind.QUIT,
    "MAIL": _Kind.MAIL,
    "RSET": _Kind.RSET,
}
# What tlsfront answers itself while no backend runs (STARTTLS is always its own).
OWNED_VERBS = frozenset({"EHLO", "HELO", "NOOP", "RSET", "QUIT"})


@dataclass
class DialogueStats:
    commands: int = 0  # command lines read from the client
    messages: int = 0  # messages the backend accepted (2xx after the dot)
    refused: int = 0  # messages the backend or tlsfront refused
    body_bytes: int = 0
    discarded_after_starttls: int = 0
    helo: str | None = None
    ending: Ending | None = None  # how the dialogue ended; the first cause wins
    events: list[str] = field(default_factory=list)  # notable protocol events, for the log


class Dialogue:
    """One client talking to one backend through tlsfront (see module doc)."""

    def __init__(
        self,
        *,
        hostname: str,
        tls_offered: bool,
        tls_active: bool,
        require_tls: bool = False,
        max_command_line: int = 512,
        max_text_line: int = 1000,
        max_message_size: int = 0,
        max_pipeline: int = 100,
        received: Callable[[str | None, bool], bytes] | None = None,
        swallow_greeting: bool = False,
        pipelining_strict: bool = True,
        face: BackendFace | None = None,
        greet: bool = True,
        carry: Carry | None = None,
        auth: bool = False,
        require_auth: bool = False,
        authorized: bool = False,
    ) -> None:
        """`face`: the backend on demand, answering as it would; else one runs now.

        `greet` (on demand only): send the greeting; not after STARTTLS.
        `carry`: a session that goes on after a dropped message (see the module doc).
        `auth`: tlsfront answers AUTH itself (a verifier is configured);
        `require_auth`: MAIL needs a login first, unless `authorized` (a
        client certificate that grants relaying).
        `pipelining_strict`: refuse input pipelined against RFC 2920 from a
        client that is not `trusted` (tlsfront.smtp.synchronization).
        """
        self.hostname = hostname
        self.tls_offered = tls_offered
        self.tls_active = tls_active
        self.require_tls = require_tls
        self._max_command_line = max_command_line
        self._max_text_line = max_text_line
        self._max_message_size = max_message_size
        self._max_pipeline = max_pipeline
        self._received = received
        self.phase = Phase.COMMAND  # changed only by `_move`
        self.stats = DialogueStats()
        self._esmtp = False
        self._replies = ReplyReader()
        self._client_buffer = bytearray()
        self._client_eof = False
        self._to_client = bytearray()
        self._to_backend: list[bytes] = []  # chunks, joined when taken: no copy of a body
        self._to_backend_size = 0
        # Lists, not deques: never longer than max_pipeline, and an empty
        # deque takes 760 bytes where an empty list takes 56, per session.
        self._pending: list[_Pending] = []
        self._awaiting: list[_Pending] = []  # entries waiting for a backend reply
        self._body: BodyScanner | None = None
        self._backend_dead: Ending | None = None
        self._dropped: Reply | None = None  # the 552 owed for a message refused mid-body
        self._hello: Command | None = None  # the client's last accepted HELO/EHLO
        self.backend_should_close = False
        self._face = face
        self._held: _Pending | None = None  # the command that wants the backend
        self._refusal: Reply | None = None
        self.backend_ehlo: Reply | None = None  # its reply to the client's EHLO, on demand
        hello = carry.hello if carry is not None else None
        self._auth = auth
        self._require_auth = require_auth
        self._authorized = authorized
        self.auth_user = carry.auth_user if carry is not None else None
        self._sync = Discipline(strict=pipelining_strict, trusted=lambda: self.trusted)
        self._desync = False
        if hello is not None:
            self._sync.command(hello.verb, followed=False, owed=False)  # a HELO client or not
        self._sasl: sasl.ServerAuth | None = None  # an AUTH exchange in progress
        self._auth_entry: _Pending | None = None
        self.auth_due: sasl.Credentials | sasl.Refused | None = None  # the shell must conclude it
        self._in_transaction = False
        if face is None:
            self.backend = BackendState.READY
            self._forward(_Pending(_Kind.GREETING, swallow=swallow_greeting or carry is not None))
            if hello is not None:
                kind = _Kind.EHLO if hello.verb == "EHLO" else _Kind.HELO
                self._forward(_Pending(kind, hello, swallow=True))
        else:
            self.backend = BackendState.ABSENT
            if greet:
                self._answer(_Pending(_Kind.GREETING), face.greeting)
                self._deliver()
            if hello is not None:  # for the next backend, and the Received header
                self._hello = hello
                self.stats.helo = hello.args.decode("utf-8", "replace") or None
                self._esmtp = hello.verb == "EHLO"
        if carry is not None:
            self._client_buffer += carry.client_bytes
            if face is not None:  # no backend's greeting comes to set them going
                self._process_client()

    def carry(self) -> Carry:
        """What the next dialogue takes over, in `RESET`."""
        return Carry(self._hello, bytes(self._client_buffer), self.auth_user)

    # ------------------------------------------------------------------ output

    def take_client_output(self) -> bytes:
        data = bytes(self._to_client)
        self._to_client.clear()
        return data

    def take_backend_output(self) -> bytes:
        data = b"".join(self._to_backend)  # one chunk: that very object
        self._to_backend.clear()
        self._to_backend_size = 0
        return data

    def _send_backend(self, data: bytes) -> None:
        self._to_backend.append(data)
        self._to_backend_size += len(data)

    @property
    def backend_output_size(self) -> int:
        return self._to_backend_size

    @property
    def client_output_size(self) -> int:
        return len(self._to_client)

    @property
    def closing(self) -> bool:
        return self.phase is Phase.CLOSING

    @property
    def client_wants_data(self) -> bool:
        """Whether the shell should read from the client now."""
        if self._client_eof or any(p.close_after for p in self._pending):
            return False
        if self.backend in (BackendState.WANTED, BackendState.CHECKING):
            return False  # nothing is read behind the held command
        if self.phase is Phase.BODY:
            return True
        if self.phase is Phase.AUTH:
            return self.auth_due is None
        return self.phase is Phase.COMMAND and len(self._pending) < self._max_pipeline

    @property
    def client_read_ahead(self) -> bool:
        """Whether the shell should read on while DATA waits for its reply.

        The dialogue takes nothing from those bytes yet; it holds them (up
        to `DATA_WAIT_BUFFER`) until the reply says whether they are a body
        (354) or a synchronization error (anything else).
        """
        return (
            self.phase is Phase.DATA_WAIT
            and not self._client_eof
            and not self._desync
            and len(self._client_buffer) < DATA_WAIT_BUFFER
        )

    @property
    def waiting_for(self) -> Side | None:
        """'backend' while a reply is owed by it, 'client' while the client must speak."""
        if self.phase in (Phase.CLOSING, Phase.HANDSHAKE, Phase.STARTTLS_READY, Phase.RESET):
            return None
        if self._awaiting or self.backend is BackendState.WANTED:
            return "backend"
        if self._client_eof:
            return None
        return "client"

    @property
    def trusted(self) -> bool:
        """Logged in, or relaying by certificate: pipelining is not policed."""
        return self._authorized or self.auth_user is not None

    @property
    def backend_wanted(self) -> bool:
        """The shell must start the backend now and call `backend_started`."""
        return self.backend is BackendState.WANTED and self.phase is not Phase.CLOSING

    @property
    def backend_error(self) -> Ending | None:
        """Why the backend failed (died, hung, spoke nonsense), or None."""
        return self._backend_dead

    # ------------------------------------------------------------------- input

    def receive_client(self, data: bytes) -> None:
        """Bytes read from the client; b"" when the client closed its side."""
        if self.phase is Phase.CLOSING:
            return
        if not data:
            self._client_eof = True
            if self.phase is not Phase.DATA_WAIT:  # there, a body may still be to pass on
                self.backend_should_close = True
            if self.phase is Phase.BODY:
                self._close(Outcome.CLIENT_LOST, "client closed the connection during DATA")
            elif not self._pending or self.backend is BackendState.WANTED:
                self._close(Outcome.CLIENT_CLOSED, "client closed the connection")
            return
        if self.phase in (Phase.STARTTLS_WAIT, Phase.STARTTLS_READY, Phase.HANDSHAKE):
            self.stats.discarded_after_starttls += len(data)
            return
        if self._desync:
            return  # refused already; nothing more is read
        if self.phase is not Phase.BODY and self._arrived_early(data):
            return
        if self.phase is Phase.BODY and not self._client_buffer:
            self._process_body(data)  # the bulk of a message: no copy into the buffer
        else:
            self._client_buffer += data
        self._process_client()

    def receive_backend(self, data: bytes) -> None:
        """Bytes read from the backend; b"" when it closed its output."""
        if self.phase in (Phase.CLOSING, Phase.HANDSHAKE) or self._dropped is not None:
            return  # the old backend is being shut down; nothing it says counts
        if self.backend is BackendState.REFUSED:
            return  # it refused the session and is being shut down
        if not data:
            self.backend_failed(Outcome.BACKEND_EXITED, "backend closed the connection")
            return
        try:
            found = self._replies.feed(data)
        except ProtocolError as exc:
            self.backend_failed(Outcome.BACKEND_PROTOCOL, f"Backend failure: {exc.text}")
            return
        for reply in found:
            self._on_backend_reply(reply)
            if self.closing:
                return
        if self._replies.failure is not None:
            self.backend_failed(
                Outcome.BACKEND_PROTOCOL, f"Backend failure: {self._replies.failure.text}"
            )
            return
        self._process_client()
        if self._client_eof and self.phase is Phase.BODY:
            # The client closed while DATA was pending and sent no end of data.
            self._close(Outcome.CLIENT_LOST, "client closed the connection during DATA")

    def timeout(self, side: Side) -> None:
        """The shell's timer for `waiting_for` ran out."""
        if side == "backend":
            self.backend_failed(Outcome.BACKEND_TIMEOUT, "backend did not answer in time")
            return
        self._to_client += replies.client_timeout(self.hostname).raw
        self._close(Outcome.CLIENT_TIMEOUT, "client timed out")

    def backend_failed(self, outcome: Outcome, why: str) -> None:
        """The backend died, hung or spoke nonsense: 4xx to the client, never 250."""
        if self.phase in (Phase.CLOSING, Phase.HANDSHAKE) or self._backend_dead is not None:
            return
        if self.backend is BackendState.REFUSED:
            return  # its refusal stands; it is being shut down
        if self._dropped is not None:
            return  # its input was closed on purpose: a fresh one comes (RESET)
        self._backend_dead = Ending(outcome, why)
        self.backend_should_close = True
        self.stats.events.append(why)
        if self.stats.ending is None:
            self.stats.ending = self._backend_dead  # the cause, not the 4xx it becomes, for the log
        if self.phase is Phase.BODY:
            # The client is still sending the body and not reading: answer
            # at its end of data, which _process_body waits for.
            return
        for p in self._pending:
            if p.reply is None:
                if p.kind is _Kind.DOT:
                    p.reply = replies.message_lost()
                    self.stats.refused += 1
                else:
                    p.reply = replies.backend_gone(self.hostname, in_reply=True)
                p.close_after = True
                break
        else:
            if not self._pending:
                self._pending.append(
                    _Pending(
                        _Kind.OTHER,
                        reply=replies.backend_gone(self.hostname, in_reply=False),
                        close_after=True,
                    )
                )
        self._awaiting.clear()
        self._deliver()

    # ------------------------------------------------------ backend on demand

    def backend_started(self) -> None:
        """The shell started the backend that `backend_wanted` asked for."""
        if self.backend is not BackendState.WANTED:
            raise replies.no_backend_wanted()
        self._backend_move(BackendEvent.STARTED)
        self._awaiting.append(_Pending(_Kind.GREETING, swallow=True, check=True))

    def backend_unavailable(self) -> None:
        """The backend could not be started: 421 to the held command, and close."""
        held = self._held
        if self.backend is not BackendState.WANTED or held is None:
            raise replies.no_backend_wanted()
        self._held = None
        self._backend_move(BackendEvent.UNAVAILABLE)
        held.reply = replies.backend_unavailable(self.hostname)
        held.close_after = True
        self._deliver()

    def _checked(self, entry: _Pending, reply: Reply) -> None:
        """The backend's greeting or HELO reply, on demand: go on, or refuse."""
        if not 200 <= reply.code < 300:
            self._refuse(reply)
            return
        hello = self._hello
        if entry.kind is _Kind.GREETING and hello is not None:
            kind = _Kind.EHLO if hello.verb == "EHLO" else _Kind.HELO
            self._forward(_Pending(kind, hello, swallow=True, check=True), queued=False)
            return
        if entry.kind is _Kind.EHLO:
            self.backend_ehlo = reply
        held = self._held
        assert held is not None
        self._held = None
        self._backend_move(BackendEvent.ACCEPTED)
        self._forward(held, queued=False)
        if held.kind is _Kind.DATA:
            self._move(Event.DATA_SENT)

    def _refuse(self, reply: Reply) -> None:
        """The backend refused the session: its reply answers the held command."""
        held = self._held
        assert held is not None
        self._held = None
        self._backend_move(BackendEvent.REFUSED)
        self._refusal = reply
        self._awaiting.clear()
        self.backend_should_close = True
        first = reply.lines[0].decode("utf-8", "replace") if reply.lines else ""
        self.stats.events.append(f"backend refused the session: {reply.code} {first}")
        held.reply = reply
        self._deliver()

    def _answer_locally(self, entry: _Pending, command: Command) -> None:
        """A command tlsfront answers itself while no backend runs."""
        face = self._face
        assert face is not None
        verb = command.verb
        if verb == "EHLO":
            entry.kind = _Kind.EHLO
            self._answer(entry, self._rewrite_ehlo(face.ehlo))
        elif verb == "HELO":
            entry.kind = _Kind.HELO
            self._answer(entry, face.helo)
        elif verb == "QUIT":
            entry.kind = _Kind.QUIT
            self._answer(entry, replies.closing(self.hostname))
        else:  # NOOP, RSET: no transaction exists without a backend
            entry.kind = _Kind.RSET if verb == "RSET" else _Kind.OTHER
            self._answer(entry, replies.ok())

    # -------------------------------------------------------- tlsfront's AUTH

    def _start_auth(self, entry: _Pending, command: Command) -> None:
        entry.kind = _Kind.AUTH
        if not self.tls_active:
            self._answer(entry, auth_replies.STARTTLS_FIRST)
        elif self.auth_user is not None:
            self._answer(entry, auth_replies.ALREADY)
        elif self._in_transaction:
            self._answer(entry, auth_replies.IN_TRANSACTION)
        else:
            self._sasl = sasl.ServerAuth(command.args.decode("utf-8", "replace"))
            self._move(Event.AUTH_READ)
            self._auth_step(entry, self._sasl.start())

    def _auth_step(self, entry: _Pending, step: sasl.Step) -> None:
        if isinstance(step, sasl.Challenge):
            self._answer(entry, step.reply)  # a 334; the next line is the response
            self._auth_entry = _Pending(_Kind.AUTH)
            return
        self._pending.append(entry)  # answered by `auth_concluded`
        self._auth_entry = entry
        self.auth_due = step

    def _auth_line(self) -> bool:
        """One response line of the exchange; False until a whole line is there."""
        end = self._client_buffer.find(b"\n", 0, sasl.MAX_LINE)
        if end < 0:
            if len(self._client_buffer) >= sasl.MAX_LINE:
                self._client_buffer.clear()
                self._conclude(auth_replies.LINE_TOO_LONG)
            return False
        line = bytes(self._client_buffer[: end + 1])
        del self._client_buffer[: end + 1]
        entry, exchange = self._auth_entry, self._sasl
        assert entry is not None
        assert exchange is not None
        self._auth_step(entry, exchange.receive(line.rstrip(b"\r\n")))
        self._deliver()
        return True

    def auth_concluded(self, reply: Reply, user: str | None, close: bool) -> None:
        """The shell's verdict on `auth_due` (`AuthGate.conclude`)."""
        self.auth_due = None
        if user is not None:
            self.auth_user = user
        self._conclude(reply, close)

    def _conclude(self, reply: Reply, close: bool = False) -> None:
        entry = self._auth_entry
        assert entry is not None
        if entry not in self._pending:
            self._pending.append(entry)
        entry.reply = reply
        self._auth_entry = self._sasl = None
        self._move(Event.AUTH_DONE)
        if close and reply.code == 421:  # the limits, before any check
            entry.close_after = True
        elif close:  # a failure too many: its 535, then 421 and close
            self._answer(_Pending(_Kind.OTHER), auth_replies.TOO_MANY_FAILURES, close=True)
        self._deliver()
        self._process_client()

    # ---------------------------------------------------------------- STARTTLS

    def starttls_accept(self) -> None:
        """Answer 220; the shell then sends it and does the handshake."""
        if self.phase is not Phase.STARTTLS_READY:
            raise replies.starttls_not_pending()
        self._pending.pop(0)
        self._to_client += replies.ready_for_tls().raw
        self._move(Event.TLS_ACCEPTED)
        self.backend_should_close = True

    def starttls_refuse(self, text: str = replies.TLS_UNAVAILABLE) -> None:
        """TLS cannot be had now (no certificate, a rate limit): 454, go on."""
        if self.phase is not Phase.STARTTLS_READY:
            raise replies.starttls_not_pending()
        self._pending.pop(0)
        self._to_client += replies.tls_unavailable(text).raw
        self._move(Event.TLS_REFUSED)

    # ---------------------------------------------------------------- shutdown

    def shutdown(self) -> bool:
        """tlsfront is stopping: when idle, answer 421 4.3.2 and close.

        Idle is the command phase with no reply owed, so a message in
        progress is never cut: during DATA (or while the backend has yet to
        answer anything) this returns False and the shell asks again later.
        """
        if self.phase is not Phase.COMMAND or self._pending:
            return False
        self._client_buffer.clear()  # a command not yet complete is never run
        self._to_client += replies.shutting_down(self.hostname).raw
        self._close(Outcome.SHUTDOWN, "shutting down")
        return True

    # --------------------------------------------------------------- internals

    def _move(self, event: Event) -> None:
        """Change `phase` as `TRANSITIONS` says `event` does."""
        target = TRANSITIONS[self.phase].get(event)
        if target is None:
            raise replies.illegal_move(self.phase.value, event.value)
        self.phase = target

    def _backend_move(self, event: BackendEvent) -> None:
        """Change `backend` as `BACKEND_TRANSITIONS` says `event` does."""
        target = BACKEND_TRANSITIONS[self.backend].get(event)
        if target is None:
            raise replies.illegal_move(self.backend.value, event.value)
        self.backend = target

    def _close(self, outcome: Outcome, reason: str) -> None:
        self._move(Event.CLOSE)
        self.backend_should_close = True
        if self.stats.ending is None:
            self.stats.ending = Ending(outcome, reason)

    def _forward(self, entry: _Pending, *, queued: bool = True) -> None:
        if queued:
            self._pending.append(entry)
        self._awaiting.append(entry)
        if entry.command is not None:
            self._send_backend(entry.command.raw)

    def _answer(self, entry: _Pending, reply: Reply, *, close: bool = False) -> None:
        entry.reply = reply
        entry.close_after = close
        self._pending.append(entry)

    def _on_backend_reply(self, reply: Reply) -> None:
        if not self._awaiting:
            # Unsolicited (a backend's timeout notice before it exits): the
            # backend's word, passed on as it is.
            self._to_client += reply.raw
            return
        entry = self._awaiting.pop(0)
        if entry.check:
            self._checked(entry, reply)
            return
        if entry.kind is _Kind.EHLO:
            reply = self._rewrite_ehlo(reply)
        entry.reply = reply
        self._deliver()

    def _rewrite_ehlo(self, reply: Reply) -> Reply:
        drop = set(DROPPED_KEYWORDS)
        if self._auth or (self.require_tls and not self.tls_active):
            drop.add("AUTH")  # tlsfront's own; no passwords in clear where TLS is required
        add = []
        if self._auth and self.tls_active:
            add.append("AUTH " + " ".join(sasl.MECHANISMS))
        if self._max_message_size:
            add.append(f"SIZE {self._max_message_size}")
        if self.tls_offered and not self.tls_active:
            add.append("STARTTLS")
        return rewrite_ehlo(reply, drop=drop, add=add)

    def _deliver(self) -> None:
        """Send every reply at the head of the queue that is there."""
        while self._pending and self._pending[0].reply is not None:
            entry = self._pending.pop(0)
            assert entry.reply is not None
            if entry.desync:
                self._to_client += replies.synchronization_error().raw
                self._close(Outcome.PIPELINING, "SMTP protocol synchronization")
                return
            if not entry.swallow:
                self._to_client += entry.reply.raw
            self._after_reply(entry, entry.reply)
            if self.phase in (Phase.CLOSING, Phase.RESET):
                return
        if self._pending and self._pending[0].kind is _Kind.STARTTLS:
            if self.phase is Phase.STARTTLS_WAIT:
                self._move(Event.STARTTLS_DUE)
        elif not self._pending and self._client_eof:
            self._close(Outcome.CLIENT_CLOSED, "client closed the connection")

    def _after_reply(self, entry: _Pending, reply: Reply) -> None:
        if entry.close_after:
            self._close(Outcome.PROTOCOL_ERROR, reply.raw.decode("utf-8", "replace").strip())
            return
        if reply.code == 421 and not entry.swallow:
            # The backend is closing the channel (RFC 5321 §3.8): so does the session.
            first = reply.lines[0].decode("utf-8", "replace")
            self._close(Outcome.BACKEND_CLOSED, f"backend closed the session: 421 {first}")
            return
        kind = entry.kind
        if kind is _Kind.MAIL:
            self._in_transaction = 200 <= reply.code < 300
        elif kind in (_Kind.RSET, _Kind.HELO, _Kind.EHLO, _Kind.DOT):
            self._in_transaction = False
        if kind is _Kind.AUTH and reply.code == 235 and self.backend is not BackendState.ABSENT:
            # A backend from before the login runs: a fresh one, with its environment
            self._move(Event.AUTHENTICATED)
            self.backend_should_close = True
            return
        if kind in (_Kind.HELO, _Kind.EHLO) and reply.code == 250:
            assert entry.command is not None
            self._hello = entry.command
            self.stats.helo = entry.command.args.decode("utf-8", "replace") or None
            self._esmtp = kind is _Kind.EHLO
        elif kind is _Kind.QUIT:
            self._close(Outcome.QUIT, "quit")
        elif kind is _Kind.DOT:
            if 200 <= reply.code < 300:
                self.stats.messages += 1
            else:
                self.stats.refused += 1
            if entry.reset_after:
                self._move(Event.MESSAGE_DROPPED)
        elif kind is _Kind.DATA:
            self._after_data(reply)

    def _after_data(self, reply: Reply) -> None:
        if reply.code == 354:
            self._move(Event.GO_AHEAD)
            self._body = BodyScanner(self._max_text_line, self._max_message_size)
            if self._received is not None:
                self._send_backend(self._received(self.stats.helo, self._esmtp))
            return
        self._move(Event.DATA_REFUSED)
        if self._client_buffer:
            # The client sent more behind DATA before knowing its fate: if
            # that was a body, reading it as commands would run it.
            self._client_buffer.clear()
            self._to_client += replies.synchronization_error().raw
            self._close(Outcome.PROTOCOL_ERROR, "pipelining after a refused DATA")

    def _process_client(self) -> None:
        while self._client_buffer and self.phase in (Phase.COMMAND, Phase.BODY, Phase.AUTH):
            if self.phase is Phase.AUTH:
                if self.auth_due is not None or not self._auth_line():
                    return
                continue
            if self.backend in (BackendState.WANTED, BackendState.CHECKING):
                return  # resumed once the held command is with the backend
            if self._dropped is not None and self.phase is Phase.COMMAND:
                return  # kept for the next dialogue (`carry`)
            if self.phase is Phase.BODY:
                self._process_body()
                continue
            if len(self._pending) >= self._max_pipeline:
                return  # resumed as replies come back
            try:
                line = take_line(self._client_buffer, self._max_command_line)
            except RemoteProtocolError as exc:
                self._client_buffer.clear()
                self._fatal(exc)
                return
            if line is None:
                return
            self._command_line(line)
            if any(p.close_after for p in self._pending):
                self._client_buffer.clear()
                return

    def _fatal(self, error: ProtocolError) -> None:
        self.stats.events.append(error.text)
        self._answer(_Pending(_Kind.OTHER), replies.of_error(error), close=True)
        self._deliver()

    def _command_line(self, line: bytes) -> None:
        self.stats.commands += 1
        try:
            command = parse_command(line)
        except RemoteProtocolError as exc:
            self.stats.events.append(exc.text)
            self._answer(_Pending(_Kind.OTHER), replies.of_error(exc))
            self._deliver()
            return
        why = self._sync.command(
            command.verb, followed=bool(self._client_buffer), owed=self._owed()
        )
        if why is not None:
            self._out_of_sync(why, self._client_buffer)
            self._answer(
                _Pending(_Kind.OTHER, command, desync=True),
                replies.synchronization_error(),
                close=True,
            )
        else:
            self._command(command)
        self._deliver()

    # ---------------------------------------------------------- synchronization

    def _owed(self) -> bool:
        """A reply to the client is still owed (not a swallowed one of a fresh backend)."""
        return any(not p.swallow for p in self._pending)

    def _arrived_early(self, data: bytes) -> bool:
        """Client bytes outside the body: refused if a reply they should await is owed."""
        if not self._owed():
            return False
        ender = verb = None
        for p in self._pending:
            if p.command is not None and p.command.verb in GROUP_ENDERS:
                ender, verb = p, p.command.verb
                break
        why = self._sync.arrival(ender=verb, owed=True)
        if why is None:
            return False
        self._out_of_sync(why, self._client_buffer + data)
        if ender is not None:
            ender.desync = ender.close_after = True  # its reply, when it comes, is replaced
        else:
            self._answer(
                _Pending(_Kind.OTHER, desync=True), replies.synchronization_error(), close=True
            )
        self._deliver()
        return True

    def _out_of_sync(self, why: str, input: bytes | bytearray) -> None:
        """Record a synchronization error; nothing more the client sent is read."""
        self._desync = True
        self.stats.events.append(f"{why}: {bytes(input[:40])!r}")
        self._client_buffer.clear()
        if self.stats.ending is None:
            self.stats.ending = Ending(Outcome.PIPELINING, why)

    def _command(self, command: Command) -> None:
        verb = command.verb
        entry = _Pending(_Kind.OTHER, command)
        if self.require_tls and not self.tls_active and verb not in ALLOWED_BEFORE_TLS:
            self._answer(entry, replies.starttls_first())
        elif verb == "STARTTLS":
            self._starttls(entry, command)
        elif verb == "AUTH" and self._auth:
            self._start_auth(entry, command)
        elif verb == "MAIL" and self._require_auth and not (self.auth_user or self._authorized):
            self._answer(entry, auth_replies.REQUIRED)
        elif verb in REFUSED_VERBS:
            self._answer(entry, replies.not_implemented())
        elif verb == "MAIL" and self._too_big(command):
            self._answer(entry, replies.size_exceeded())
        elif self.backend is not BackendState.READY and verb in OWNED_VERBS:
            self._answer_locally(entry, command)
        elif self.backend is BackendState.REFUSED:
            assert self._refusal is not None
            self._answer(entry, self._refusal)
        else:
            entry.kind = _FORWARDED_KINDS.get(verb, _Kind.OTHER)
            if self.backend is BackendState.ABSENT:
                self._pending.append(entry)  # answered once the backend runs
                self._held = entry
                self._backend_move(BackendEvent.NEEDED)
                return
            self._forward(entry)
            if entry.kind is _Kind.DATA:
                self._move(Event.DATA_SENT)

    def _too_big(self, command: Command) -> bool:
        size = command.size_param
        return bool(self._max_message_size and size is not None and size > self._max_message_size)

    def _starttls(self, entry: _Pending, command: Command) -> None:
        if command.args:
            self._answer(entry, replies.starttls_syntax())
        elif self.tls_active:
            self._answer(entry, replies.tls_already_active())
        elif not self.tls_offered:
            self._answer(entry, replies.not_implemented())
        else:
            entry.kind = _Kind.STARTTLS
            self._pending.append(entry)
            discarded = len(self._client_buffer)
            if discarded:
                self.stats.discarded_after_starttls += discarded
                self.stats.events.append(f"discarded {discarded} bytes pipelined after STARTTLS")
            self._client_buffer.clear()
            self._move(Event.STARTTLS_READ)

    def _process_body(self, data: bytes | None = None) -> None:
        """Scan `data`, or else what the client buffer holds, as body bytes."""
        assert self._body is not None
        if data is None:
            data = bytes(self._client_buffer)
            self._client_buffer.clear()
        try:
            result = self._body.feed(data)
        except RemoteProtocolError as exc:
            self.stats.events.append(exc.text)
            if exc.code == 552 and self._dropped is None:
                # Too big: refused, but not a protocol error. The backend
                # gets no end of data; the rest of the body is dropped.
                self._dropped = replies.of_error(exc)
                self.backend_should_close = True
                result = self._body.feed(b"")
            else:
                self.stats.refused += 1
                self._to_client += exc.reply
                self._close(Outcome.PROTOCOL_ERROR, exc.text)
                return
        self.stats.body_bytes += len(result.forward)
        if self._backend_dead is None:
            self._send_backend(result.forward)
        if not result.done:
            return
        self._body = None
        self._move(Event.BODY_END)
        self._client_buffer += result.rest
        why = self._sync.command(".", followed=bool(self._client_buffer), owed=self._owed())
        if why is not None:  # the dot is answered; what was pipelined behind it is not
            self._out_of_sync(why, self._client_buffer)
        if self._dropped is not None:  # answered now; a fresh backend next (RESET)
            dot = _Pending(_Kind.DOT, reply=self._dropped, reset_after=why is None)
            self._pending.append(dot)
        elif self._backend_dead is not None:
            self.stats.refused += 1
            self._to_client += replies.message_lost().raw
            self._close(self._backend_dead.outcome, self._backend_dead.text)
            return
        else:
            dot = _Pending(_Kind.DOT)
            self._pending.append(dot)
            self._awaiting.append(dot)
        if why is not None:
            self._answer(
                _Pending(_Kind.OTHER, desync=True), replies.synchronization_error(), close=True
            )
        if self._dropped is not None:
            self._deliver()
