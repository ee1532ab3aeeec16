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
sends becomes a `Pending` entry (`tlsfront.smtp.pending`) in one queue. A command for the backend is
written to the backend outbox and waits for the backend's next reply; a
command tlsfront answers gets its reply at once. Replies leave the queue from
the head only, when they are there: the order is kept by construction. The
backend's greeting is the reply to the first, virtual, entry. The
backend's replies, its EHLO rewritten, and its failures are handled in
`tlsfront.smtp.backendside`.

Three commands change how client bytes are read:

* `DATA` holds the client's bytes until the backend answers. Only the
  backend's `354` starts the body; any other reply with
  client bytes already waiting behind `DATA` is a synchronization error.
  The shell keeps reading meanwhile (`client_read_ahead`, up to
  `DATA_WAIT_BUFFER`), so that a body sent without waiting for the reply is
  seen as such, as Postfix sees input pending when its reply goes out, and
  not run as commands. Unless synchronization is relaxed (below), such a
  body is refused outright.
* In the body (`tlsfront.smtp.message`), `BodyScanner` finds the one true
  end (CRLF.CRLF) and refuses bare CR, bare LF and NUL rather than passing
  them to a lenient backend. tlsfront's Received header goes first.
* `STARTTLS` (tlsfront's own, `tlsfront.smtp.starttls`) throws away every
  byte pipelined behind it, waits until every reply owed before it has gone out,
  then sets `phase` to `STARTTLS_READY`. The shell answers `220` through
  `starttls_accept()` (or `454` through `starttls_refuse()` when TLS cannot
  be had), and does the handshake. After TLS the shell builds a new
  `Dialogue` (and, if any, a fresh backend): nothing from before TLS
  survives.

The backend on demand (`tlsfront.smtp.ondemand`): given the backend's
face, the dialogue starts without a backend (`backend` is `ABSENT`) and
answers the greeting, EHLO, HELO, NOOP, RSET and QUIT itself; the first
command that needs the backend is held (`backend_wanted`) until one runs
and has accepted the client's HELO or EHLO, or it gets the backend's
refusal.

tlsfront's own AUTH (`tlsfront.smtp.authexchange`) reads the client's
response lines in `Phase.AUTH` and waits for the shell's verdict
(`auth_due`, `auth_concluded`).

A message over `max_message_size` is refused, and the session goes on, as
with qmail-smtpd's databytes (RFC 5321 §4.5.3.1.10): the backend's input is
closed at once without an end of data (it queues nothing and exits), the
rest of the body is read and dropped, and the client's end of data gets
`552`. Then `phase` is `RESET`: the shell starts a fresh backend and a new
`Dialogue` with what this one hands over (`carry`): the client's HELO or
EHLO, replayed to the new backend with its reply and greeting swallowed,
and the client bytes read but not yet taken (commands pipelined behind the
dot). RSET, MAIL and QUIT then work as after any refused message.

Synchronization (`tlsfront.smtp.synchronization`, its rules and their
checks on this queue): input pipelined where
RFC 2920 forbids it (behind DATA, BDAT or QUIT; any from a HELO client)
gets `554 5.5.0` in the place of the reply to the command it broke and ends
the session, unless the session is `trusted` or not `pipelining_strict`.

The phases and the events that move between them are one table,
`TRANSITIONS` in `tlsfront.smtp.phases`; every change of `phase` goes
through `_move`, which refuses a move the table does not have. A phase
change that the shell must act on is visible in `phase`, `client_wants_data`, `client_read_ahead`,
`waiting_for` and `backend_should_close`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Modules, not names: tlsfront.auth's own modules import this package's
# reply type, so either side may be imported first.
from tlsfront.auth import replies as auth_replies
from tlsfront.auth import sasl
from tlsfront.smtp import backendside, replies, starttls, synchronization
from tlsfront.smtp.authexchange import AuthExchange
from tlsfront.smtp.body import BodyScanner
from tlsfront.smtp.command import Command, parse_command, take_line
from tlsfront.smtp.errors import ProtocolError, RemoteProtocolError
from tlsfront.smtp.face import BackendFace
from tlsfront.smtp.message import after_data, process_body
from tlsfront.smtp.ondemand import OWNED_VERBS, BackendOnDemand
from tlsfront.smtp.outcome import Ending, Outcome
from tlsfront.smtp.pending import DialogueStats, Kind, Pending
from tlsfront.smtp.phases import (
    BACKEND_TRANSITIONS,
    TRANSITIONS,
    BackendEvent,
    BackendState,
    Event,
    Phase,
    Side,
)
from tlsfront.smtp.reply import Reply
from tlsfront.smtp.replyreader import ReplyReader
from tlsfront.smtp.synchronization import Discipline


@dataclass(frozen=True)
class Carry:
    """What a dialogue in `RESET` hands to the next one (see the module doc)."""

    hello: Command | None  # the client's last accepted HELO/EHLO, for the new backend
    client_bytes: bytes  # read from the client and not yet taken
    auth_user: str | None = None  # who logged in (tlsfront's own AUTH)


REFUSED_VERBS = frozenset({"BDAT", "XCLIENT", "XFORWARD"})
# How much a client may send behind DATA before the backend's reply: read
# and held, it is the start of the body after a 354, a synchronization error
# after anything else.
DATA_WAIT_BUFFER = 65536
_FORWARDED_KINDS = {
    "EHLO": Kind.EHLO,
    "HELO": Kind.HELO,
    "DATA": Kind.DATA,
    "QUIT": Kind.QUIT,
    "MAIL": Kind.MAIL,
    "RSET": Kind.RSET,
}


class Dialogue:
    """One client talking to one backend through tlsfront (see module doc)."""

    # One per session, held for as long as it lasts: no per-instance dict
    # (about 1 kB less per idle session).
    __slots__ = (
        "_auth",
        "_authorized",
        "_authx",
        "_awaiting",
        "_backend_dead",
        "_body",
        "_client_buffer",
        "_client_eof",
        "_desync",
        "_dropped",
        "_esmtp",
        "_hello",
        "_in_transaction",
        "_max_command_line",
        "_max_message_size",
        "_max_pipeline",
        "_max_text_line",
        "_ondemand",
        "_pending",
        "_received",
        "_replies",
        "_require_auth",
        "_sync",
        "_to_backend",
        "_to_backend_size",
        "_to_client",
        "_trace_header",
        "auth_user",
        "backend",
        "backend_ehlo",
        "backend_should_close",
        "hostname",
        "phase",
        "require_tls",
        "stats",
        "tls_active",
        "tls_offered",
    )

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
        self._pending: list[Pending] = []
        self._awaiting: list[Pending] = []  # entries waiting for a backend reply
        self._body: BodyScanner | None = None
        self._backend_dead: Ending | None = None
        self._dropped: Reply | None = None  # the 552 owed for a message refused mid-body
        self._trace_header = b""  # the Received header, sent with the body's first bytes
        self._hello: Command | None = None  # the client's last accepted HELO/EHLO
        self.backend_should_close = False
        self._ondemand = None if face is None else BackendOnDemand(face)
        self.backend_ehlo: Reply | None = None  # its reply to the client's EHLO, on demand
        hello = carry.hello if carry is not None else None
        self._auth = auth
        self._require_auth = require_auth
        self._authorized = authorized
        self.auth_user = carry.auth_user if carry is not None else None
        self._sync = Discipline(strict=pipelining_strict)
        self._desync = False
        if hello is not None:
            self._sync.command(hello.verb, followed=False, owed=False)  # a HELO client or not
        self._authx = AuthExchange()
        self._in_transaction = False
        if face is None:
            self.backend = BackendState.READY
            self._forward(Pending(Kind.GREETING, swallow=swallow_greeting or carry is not None))
            if hello is not None:
                kind = Kind.EHLO if hello.verb == "EHLO" else Kind.HELO
                self._forward(Pending(kind, hello, swallow=True))
        else:
            self.backend = BackendState.ABSENT
            if greet:
                self._answer(Pending(Kind.GREETING), face.greeting)
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
        if self.phase is not Phase.BODY and synchronization.arrived_early(self, data):
            return
        if self.phase is Phase.BODY and not self._client_buffer:
            process_body(self, data)  # the bulk of a message: no copy into the buffer
        else:
            self._client_buffer += data
        self._process_client()

    def receive_backend(self, data: bytes) -> None:
        """Bytes read from the backend; b"" when it closed its output."""
        backendside.receive(self, data)

    def timeout(self, side: Side) -> None:
        """The shell's timer for `waiting_for` ran out."""
        if side == "backend":
            self.backend_failed(Outcome.BACKEND_TIMEOUT, "backend did not answer in time")
            return
        self._to_client += replies.client_timeout(self.hostname).raw
        self._close(Outcome.CLIENT_TIMEOUT, "client timed out")

    def backend_failed(self, outcome: Outcome, why: str) -> None:
        """The backend died, hung or spoke nonsense: 4xx to the client, never 250."""
        backendside.failed(self, outcome, why)

    # ------------------------------------------------------ backend on demand

    def backend_started(self) -> None:
        """The shell started the backend that `backend_wanted` asked for."""
        self._demand.started(self)

    def backend_unavailable(self) -> None:
        """The backend could not be started: 421 to the held command, and close."""
        self._demand.unavailable(self)

    @property
    def _demand(self) -> BackendOnDemand:
        assert self._ondemand is not None  # the backend on demand: a face was given
        return self._ondemand

    # -------------------------------------------------------- tlsfront's AUTH

    @property
    def auth_due(self) -> sasl.Credentials | sasl.Refused | None:
        """An AUTH exchange the shell must conclude (`AuthGate.conclude`), or None."""
        return self._authx.due

    def auth_concluded(self, reply: Reply, user: str | None, close: bool) -> None:
        """The shell's verdict on `auth_due` (`AuthGate.conclude`)."""
        self._authx.concluded(self, reply, user, close)

    # ---------------------------------------------------------------- STARTTLS

    def starttls_accept(self) -> None:
        """Answer 220; the shell then sends it and does the handshake."""
        starttls.accept(self)

    def starttls_refuse(self, text: str = replies.TLS_UNAVAILABLE) -> None:
        """TLS cannot be had now (no certificate, a rate limit): 454, go on."""
        starttls.refuse(self, text)

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

    def _forward(self, entry: Pending, *, queued: bool = True) -> None:
        if queued:
            self._pending.append(entry)
        self._awaiting.append(entry)
        if entry.command is not None:
            self._send_backend(entry.command.raw)

    def _answer(self, entry: Pending, reply: Reply, *, close: bool = False) -> None:
        entry.reply = reply
        entry.close_after = close
        self._pending.append(entry)

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
        if self._pending and self._pending[0].kind is Kind.STARTTLS:
            if self.phase is Phase.STARTTLS_WAIT:
                self._move(Event.STARTTLS_DUE)
        elif not self._pending and self._client_eof:
            self._close(Outcome.CLIENT_CLOSED, "client closed the connection")

    def _after_reply(self, entry: Pending, reply: Reply) -> None:
        if entry.close_after:
            self._close(Outcome.PROTOCOL_ERROR, reply.raw.decode("utf-8", "replace").strip())
            return
        if reply.code == 421 and not entry.swallow:
            # The backend is closing the channel (RFC 5321 §3.8): so does the session.
            first = reply.lines[0].decode("utf-8", "replace")
            self._close(Outcome.BACKEND_CLOSED, f"backend closed the session: 421 {first}")
            return
        kind = entry.kind
        if kind is Kind.MAIL:
            self._in_transaction = 200 <= reply.code < 300
        elif kind in (Kind.RSET, Kind.HELO, Kind.EHLO, Kind.DOT):
            self._in_transaction = False
        if kind is Kind.AUTH and reply.code == 235 and self.backend is not BackendState.ABSENT:
            # A backend from before the login runs: a fresh one, with its environment
            self._move(Event.AUTHENTICATED)
            self.backend_should_close = True
            return
        if kind in (Kind.HELO, Kind.EHLO) and reply.code == 250:
            assert entry.command is not None
            self._hello = entry.command
            self.stats.helo = entry.command.args.decode("utf-8", "replace") or None
            self._esmtp = kind is Kind.EHLO
        elif kind is Kind.QUIT:
            self._close(Outcome.QUIT, "quit")
        elif kind is Kind.DOT:
            if 200 <= reply.code < 300:
                self.stats.messages += 1
            else:
                self.stats.refused += 1
            if entry.reset_after:
                self._move(Event.MESSAGE_DROPPED)
        elif kind is Kind.DATA:
            after_data(self, reply)

    def _process_client(self) -> None:
        while self._client_buffer and self.phase in (Phase.COMMAND, Phase.BODY, Phase.AUTH):
            if self.phase is Phase.AUTH:
                if self.auth_due is not None or not self._authx.line(self):
                    return
                continue
            if self.backend in (BackendState.WANTED, BackendState.CHECKING):
                return  # resumed once the held command is with the backend
            if self._dropped is not None and self.phase is Phase.COMMAND:
                return  # kept for the next dialogue (`carry`)
            if self.phase is Phase.BODY:
                process_body(self)
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
        self._answer(Pending(Kind.OTHER), replies.of_error(error), close=True)
        self._deliver()

    def _command_line(self, line: bytes) -> None:
        self.stats.commands += 1
        try:
            command = parse_command(line)
        except RemoteProtocolError as exc:
            self.stats.events.append(exc.text)
            self._answer(Pending(Kind.OTHER), replies.of_error(exc))
            self._deliver()
            return
        why = self._sync.command(
            command.verb,
            followed=bool(self._client_buffer),
            owed=synchronization.owed(self),
            trusted=self.trusted,
        )
        if why is not None:
            synchronization.out_of_sync(self, why, self._client_buffer)
            self._answer(
                Pending(Kind.OTHER, command, desync=True),
                replies.synchronization_error(),
                close=True,
            )
        else:
            self._command(command)
        self._deliver()

    def _command(self, command: Command) -> None:
        verb = command.verb
        entry = Pending(Kind.OTHER, command)
        if self.require_tls and not self.tls_active and verb not in starttls.ALLOWED_BEFORE_TLS:
            self._answer(entry, replies.starttls_first())
        elif verb == "STARTTLS":
            starttls.starttls_read(self, entry, command)
        elif verb == "AUTH" and self._auth:
            self._authx.start(self, entry, command)
        elif verb == "MAIL" and self._require_auth and not (self.auth_user or self._authorized):
            self._answer(entry, auth_replies.REQUIRED)
        elif verb in REFUSED_VERBS:
            self._answer(entry, replies.not_implemented())
        elif verb == "MAIL" and self._too_big(command):
            self._answer(entry, replies.size_exceeded())
        elif self.backend is not BackendState.READY and verb in OWNED_VERBS:
            self._demand.answer(self, entry, command)
        elif self.backend is BackendState.REFUSED:
            refusal = self._demand.refusal
            assert refusal is not None
            self._answer(entry, refusal)
        else:
            entry.kind = _FORWARDED_KINDS.get(verb, Kind.OTHER)
            if self.backend is BackendState.ABSENT:
                self._demand.hold(self, entry)
                return
            self._forward(entry)
            if entry.kind is Kind.DATA:
                self._move(Event.DATA_SENT)

    def _too_big(self, command: Command) -> bool:
        size = command.size_param
        return bool(self._max_message_size and size is not None and size > self._max_message_size)
