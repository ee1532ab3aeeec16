"""Hypothesis stateful testing of the SMTP dialogue (the sans-I/O core).

The state machine plays all three parts around a `Dialogue`: a client that
writes commands, bodies and hostile bytes (fake ends of data, bare CR and LF,
NUL, over-long lines) without waiting for replies; a backend that answers
what it received with codes of Hypothesis's choosing, or fails; and the
shell, which moves both byte streams in chunks of any size (reading the
client only when the dialogue asks for it, as phase.py does), answers
STARTTLS, starts the TLS phase with a fresh dialogue, and fires timeouts.

After every step the invariants are checked:

* nothing the client sent after a STARTTLS that was accepted for processing
  reaches the backend (threats `starttls-injection`, `injection-after-220`, `reply-order`);
* tlsfront produces no 2xx or 3xx of its own but the 220 to STARTTLS: every
  other one the client gets is a backend reply, byte for byte (an EHLO reply
  keeps the backend's first line and only loses or gains keywords);
* DATA mode starts only on the backend's 354, and no byte after DATA reaches
  the backend before that 354 was received (row 12);
* the backend receives well-formed CRLF command lines and bodies with CRLF
  line ends only, no NUL, ended only by CRLF.CRLF (rows 11 and 13): no fake
  terminator a lenient backend could take;
* once the client got `554 5.5.0` (SMTP protocol synchronization), the
  dialogue is closing and not one byte more reaches the backend.

Each run picks whether pipelining is policed (`pipelining_strict`, the
default) or relaxed, so the defences behind that rule are tested on their own.

Every client command carries a serial number where SMTP allows one, so a
line seen at the backend can be traced to where the client wrote it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tlsfront.smtp import Dialogue, Phase

RECEIVED = b"Received: from the-trace-header\r\n"
READY = b"220 2.0.0 Ready to start TLS\r\n"
DESYNC = b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
DROPPED = (b"CHUNKING", b"BINARYMIME", b"XCLIENT", b"XFORWARD", b"STARTTLS")


def _commands(n: int) -> list[bytes]:
    return [
        b"EHLO h%d.example\r\n" % n,
        b"HELO h%d.example\r\n" % n,
        b"MAIL FROM:<a%d@example.net>\r\n" % n,
        b"RCPT TO:<r%d@example.org>\r\n" % n,
        b"NOOP %d\r\n" % n,
        b"RSET %d\r\n" % n,
        b"VRFY v%d\r\n" % n,
        b"BDAT %d LAST\r\n" % n,
        b"XCLIENT ADDR=10.0.0.%d\r\n" % (n % 250),
        b"MAIL FROM:<s%d@example.net> SIZE=%d\r\n" % (n, n * 1000),
        b"Subject: body line %d\r\n" % n,
        b"..stuffed %d\r\n" % n,
        # a whole transaction, pipelined the way impatient clients do
        b"MAIL FROM:<t%d@example.net>\r\nRCPT TO:<t%d@example.org>\r\nDATA\r\n" % (n, n),
        b"Subject: message %d\r\n\r\nhello\r\n.\r\n" % n,
    ]


FIXED = [
    b"DATA\r\n",
    b"STARTTLS\r\n",
    b"STARTTLS now\r\n",
    b"QUIT\r\n",
    b".\r\n",
    b"\r\n",
    # smuggling and parser differentials
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r\n.\r",
    b"\0",
    b".\0\r\n",
    b"\n",
    b"\r",
]
LONG = [b"x" * 600, b"y" * 1100 + b"\r\n"]  # a command line, a body line over the limit

numbered = st.integers(0, len(_commands(0)) - 1).map(lambda i: ("numbered", i))
token_kinds = st.one_of(
    st.sampled_from(FIXED),
    numbered,
    numbered,
    st.sampled_from([b"DATA\r\n", b"STARTTLS\r\n", ("numbered", 12), ("numbered", 13)]),
)
# the backend mostly says yes, and chunks are often whole, so that sessions
# get somewhere in forty steps
choices = st.one_of(st.just(0), st.just(0), st.integers(0, 5))
client_sizes = st.one_of(st.just(1 << 16), st.just(0), st.integers(1, 200))  # 0: a line
backend_sizes = st.one_of(st.just(1 << 16), st.integers(1, 64))


@dataclass
class Owed:
    """A reply the backend owes: to what, in order."""

    kind: str  # greeting, ehlo, data, dot, quit, other


@dataclass
class BackendReply:
    raw: bytes
    kind: str


class BackendModel:
    """Reads what the dialogue sends the backend and checks it as it goes."""

    def __init__(self, received_header: bool) -> None:
        self.buffer = bytearray()
        self.mode = "command"  # command, data-wait, body
        self.owed: deque[Owed] = deque([Owed("greeting")])
        self.received_header = received_header
        self.body_started = False

    def feed(self, data: bytes) -> None:
        # Row 12: after DATA nothing may come before the 354 was received.
        assert self.mode != "data-wait", f"bytes after DATA before its reply: {data!r}"
        self.buffer += data
        self._parse()

    def _parse(self) -> None:
        while True:
            if self.mode == "command":
                end = self.buffer.find(b"\n")
                if end < 0:
                    return
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                # Row 13: whole CRLF lines, nothing qmail would read differently.
                assert line.endswith(b"\r\n"), line
                assert not any(c in line[:-2] for c in (b"\r", b"\n", b"\0")), line
                verb = line.split(b" ", 1)[0].strip().upper()
                assert verb not in (b"STARTTLS", b"BDAT", b"XCLIENT"), line
                kind = {b"EHLO": "ehlo", b"DATA": "data", b"QUIT": "quit"}.get(verb, "other")
                self.owed.append(Owed(kind))
                if kind == "data":
                    self.mode = "data-wait"
                    assert not self.buffer, "bytes behind DATA in the same write"
                    return
            elif self.mode == "body":
                if self.received_header and not self.body_started:
                    if len(self.buffer) < len(RECEIVED):
                        assert RECEIVED.startswith(bytes(self.buffer))
                        return
                    assert self.buffer.startswith(RECEIVED)
                    del self.buffer[: len(RECEIVED)]
                    self.body_started = True
                framed = b"\r\n" + bytes(self.buffer)
                end = framed.find(b"\r\n.\r\n")
                body = framed[2:] if end < 0 else framed[2 : end + 2]
                # Row 11: CRLF only, no NUL: nothing a lenient backend could
                # take for the end of the data. A line in progress may go on
                # before its end has come, but never a CR whose LF has not.
                assert b"\0" not in body, body
                assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n"), body
                assert not body.endswith(b"\r"), body
                if end < 0:
                    return
                assert not body or body.endswith(b"\r\n"), body
                del self.buffer[: end + 3]
                event("a message reached its end at the backend")
                self.owed.append(Owed("dot"))
                self.mode = "command"
                self.body_started = False
            else:
                return

    def reply_for(self, owed: Owed, choice: int) -> bytes:
        options = {
            "greeting": [b"220 mx.example ESMTP\r\n"] * 4 + [b"554 blocked\r\n", b"421 busy\r\n"],
            "ehlo": [
                b"250-mx.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-STARTTLS\r\n"
                b"250-XCLIENT NAME\r\n250 8BITMIME\r\n",
                b"250 mx.example\r\n",
                b"502 unimplemented\r\n",
            ],
            "data": [
                b"354 go ahead\r\n",
                b"503 RCPT first\r\n",
                b"554 no\r\n",
                b"451 try later\r\n",
            ],
            "dot": [b"250 ok 1 qp 2\r\n", b"451 qq failure\r\n", b"554 refused\r\n"],
            "quit": [b"221 mx.example\r\n"],
            "other": [
                b"250 ok\r\n",
                b"250-multi\r\n250 line\r\n",
                b"553 no\r\n",
                b"503 order\r\n",
                b"421 closing\r\n",
                b"252 maybe\r\n",
            ],
        }[owed.kind]
        return options[choice % len(options)]


def parse_replies(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete replies (raw) and the unparsed rest."""
    replies: list[bytes] = []
    start = 0
    current = 0
    while True:
        end = data.find(b"\n", current)
        if end < 0:
            return replies, data[start:]
        line = data[current : end + 1]
        current = end + 1
        if line[3:4] != b"-":
            replies.append(data[start:current])
            start = current


class DialogueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.serial = itertools.count()
        self.tls_active = False
        self.strict = True
        self._new_dialogue(swallow=False)

    @initialize(strict=st.booleans())
    def policing(self, strict: bool) -> None:
        """Pipelining policed or relaxed, for the whole run."""
        event("strict" if strict else "relaxed")
        self.strict = strict
        self._new_dialogue(swallow=False)

    # ------------------------------------------------------------- plumbing

    def _new_dialogue(self, *, swallow: bool) -> None:
        self.d = Dialogue(
            hostname="front.example",
            tls_offered=True,
            tls_active=self.tls_active,
            max_message_size=5000,
            max_pipeline=8,
            received=lambda helo, esmtp: RECEIVED,
            swallow_greeting=swallow,
            pipelining_strict=self.strict,
        )
        self.desynced = False
        self.swallow = swallow
        self.client_stream = bytearray()  # delivered to the dialogue
        self.client_pending = bytearray()  # written, not yet read by the shell
        self.client_output = b""
        self.client_replies: list[bytes] = []
        self.backend = BackendModel(received_header=True)
        self.backend_pending = bytearray()
        self.backend_replies: list[BackendReply] = []  # delivered to the dialogue, complete
        self.queued: deque[BackendReply] = deque()  # answered, not yet all delivered
        self.backend_partial = b""
        self.matched = 0  # backend replies accounted for in the client's 2xx/3xx
        self.forward_cursor = 0  # where in client_stream the last forwarded line was found
        self.barrier: int | None = None  # client_stream offset after an accepted STARTTLS
        self.blind_until = 0  # client_stream offset: before it, written before a DATA refusal
        self.starttls_accepted = False
        self.last_data_reply: bytes | None = None
        self.backend_failed = False

    def _collect(self) -> None:
        out = self.d.take_backend_output()
        if out:
            self._check_forwarded(out)
            self.backend.feed(out)
        self.client_output += self.d.take_client_output()
        replies, _ = parse_replies(self.client_output)
        for reply in replies[len(self.client_replies) :]:
            self._check_client_reply(reply)
            self.client_replies.append(reply)

    def _check_forwarded(self, out: bytes) -> None:
        """Every forwarded line comes from the client's stream, in order, and
        none from after an accepted STARTTLS."""
        assert not self.desynced, f"forwarded after 554 5.5.0: {out!r}"
        data = out.replace(RECEIVED, b"")
        for line in data.splitlines(keepends=True):
            at = self.client_stream.find(line, self.forward_cursor)
            assert at >= 0, f"forwarded bytes the client never sent: {line!r}"
            assert at >= self.blind_until, f"sent blind behind a refused DATA, run: {line!r}"
            self.forward_cursor = at + len(line)
            if self.barrier is not None:
                assert self.forward_cursor <= self.barrier, f"forwarded after STARTTLS: {line!r}"

    def _check_client_reply(self, reply: bytes) -> None:
        if reply == DESYNC:
            self.desynced = True
            assert self.d.closing
        if reply[:1] not in (b"2", b"3"):
            return
        if reply == READY and self.starttls_accepted:
            self.starttls_accepted = False
            return
        # tlsfront's own 2xx/3xx do not exist: find this one among the backend's
        for i in range(self.matched, len(self.backend_replies)):
            candidate = self.backend_replies[i]
            if self._same(reply, candidate):
                if self.swallow and candidate.kind == "greeting":
                    raise AssertionError("the fresh backend's greeting reached the client")
                self.matched = i + 1
                return
        raise AssertionError(f"a {reply[:3]!r} the backend never sent: {reply!r}")

    def _same(self, reply: bytes, candidate: BackendReply) -> bool:
        if reply == candidate.raw:
            return True
        if candidate.kind != "ehlo" or reply[:3] != b"250":
            return False
        # an EHLO reply: the backend's first line; its keywords less those
        # tlsfront cannot carry; STARTTLS (tlsfront's own) only before TLS
        ours, theirs = reply.split(b"\r\n")[:-1], candidate.raw.split(b"\r\n")[:-1]
        if ours[0][4:] != theirs[0][4:]:
            return False
        allowed = {line[4:] for line in theirs[1:]} - set(DROPPED) | {b"SIZE 5000"}
        if not self.tls_active:
            allowed.add(b"STARTTLS")
        return all(line[4:] in allowed for line in ours[1:])

    @contextmanager
    def _watching_starttls(self) -> Iterator[None]:
        """Around a dialogue input that may make it take a STARTTLS command."""
        waiting = (Phase.STARTTLS_WAIT, Phase.STARTTLS_READY)
        before = self.d.phase
        discarded = self.d.stats.discarded_after_starttls
        yield
        if self.d.phase in waiting and before not in waiting:
            # What was thrown away is the tail of what was read; just before it
            # ends the STARTTLS line that was taken.
            thrown = self.d.stats.discarded_after_starttls - discarded
            self.barrier = len(self.client_stream) - thrown
            assert self.client_stream[: self.barrier].endswith(b"STARTTLS\r\n")
            event("STARTTLS taken" + (", bytes behind it thrown away" if thrown else ""))

    def _reads_client(self) -> bool:
        return self.d.client_wants_data or self.d.client_read_ahead

    # ---------------------------------------------------------------- client

    @rule(tokens=st.lists(token_kinds, min_size=1, max_size=8))
    def client_writes(self, tokens: list[object]) -> None:
        for token in tokens:
            if isinstance(token, tuple):
                self.client_pending += _commands(next(self.serial))[token[1]]
            else:
                assert isinstance(token, bytes)
                self.client_pending += token

    @rule(line=st.sampled_from(LONG))
    def client_writes_a_long_line(self, line: bytes) -> None:
        self.client_pending += line

    @precondition(lambda self: self.client_pending)
    @rule(size=client_sizes)
    def shell_reads_client(self, size: int) -> None:
        if not self._reads_client():
            return
        if size == 0:  # what a client writing line by line puts in one packet
            size = self.client_pending.find(b"\n") + 1 or len(self.client_pending)
        chunk = bytes(self.client_pending[:size])
        del self.client_pending[:size]
        self.client_stream += chunk
        with self._watching_starttls():
            self.d.receive_client(chunk)
        self._collect()

    @rule(smuggle=st.sampled_from([b"", *FIXED[6:13]]))
    def client_sends_a_message(self, smuggle: bytes) -> None:
        """A whole transaction in one write, its body perhaps with a fake end."""
        n = next(self.serial)
        self.client_pending += b"MAIL FROM:<m%d@example.net>\r\nRCPT TO:<m%d@example.org>\r\n" % (
            n,
            n,
        )
        self.client_pending += b"DATA\r\nSubject: %d\r\n\r\nbody%s\r\n.\r\n" % (n, smuggle)

    @rule()
    def pump(self) -> None:
        """The shell moves everything there is to move, each way, once."""
        if self.backend_pending:
            chunk = bytes(self.backend_pending)
            self.backend_pending.clear()
            self._deliver_backend(chunk)
        if self.client_pending and self._reads_client():
            chunk = bytes(self.client_pending)
            self.client_pending.clear()
            self.client_stream += chunk
            with self._watching_starttls():
                self.d.receive_client(chunk)
            self._collect()

    @precondition(lambda self: self.d.closing)
    @rule()
    def next_connection(self) -> None:
        """The session is over; a new client connects."""
        self.tls_active = False
        self._new_dialogue(swallow=False)
        event("a session closed")

    @precondition(lambda self: not self.d.closing)
    @rule(
        what=st.sampled_from(["client closes", "timer", b"", b"garbage\r\n", b"2"]),
        dice=st.integers(0, 5),
    )
    def something_ends(self, what: str | bytes, dice: int) -> None:
        """Now and then (one pick in six acts): the client closes, a timer runs
        out, or the backend dies (b"": EOF), speaks garbage or half a reply."""
        if dice:
            return
        if what == "client closes":
            if self._reads_client():
                self.d.receive_client(b"")
        elif what == "timer":
            side = self.d.waiting_for
            if side is not None:
                self.d.timeout(side)
        elif not self.backend_failed:
            assert isinstance(what, bytes)
            self.backend_failed = True
            self._deliver_backend(bytes(self.backend_pending) + what)
            self.backend_pending.clear()
            if what:
                self._deliver_backend(b"")
            return
        self._collect()

    # --------------------------------------------------------------- backend

    @precondition(lambda self: self.backend.owed and not self.backend_failed)
    @rule(picks=st.lists(choices, min_size=1, max_size=8))
    def backend_answers(self, picks: list[int]) -> None:
        """Replies to the oldest commands owed one, queued for the shell to read."""
        for choice in picks:
            if not self.backend.owed:
                return
            owed = self.backend.owed.popleft()
            raw = self.backend.reply_for(owed, choice)
            self.backend_pending += raw
            self.queued.append(BackendReply(raw, owed.kind))

    @precondition(lambda self: self.backend_pending)
    @rule(size=backend_sizes)
    def shell_reads_backend(self, size: int) -> None:
        chunk = bytes(self.backend_pending[:size])
        del self.backend_pending[:size]
        self._deliver_backend(chunk)

    @precondition(
        lambda self: (
            not self.backend_failed
            and not self.backend.owed
            and not self.queued
            and self.backend.mode == "command"
        )
    )
    @rule(raw=st.sampled_from([b"250 unsolicited\r\n", b"451 timeout (#4.4.2)\r\n"]))
    def backend_speaks_unasked(self, raw: bytes) -> None:
        """qmail's timeout notice before it exits: the backend's word, passed on.
        (Read at once: once a command is on its way, it would be that one's reply.)"""
        self.queued.append(BackendReply(raw, "unsolicited"))
        self._deliver_backend(raw)

    def _read_on(self) -> None:
        """The shell's reader, which runs whenever there is something to read."""
        while self.client_pending and self._reads_client():
            ahead = bytes(self.client_pending[:4096])
            del self.client_pending[:4096]
            self.client_stream += ahead
            with self._watching_starttls():
                self.d.receive_client(ahead)
            self._collect()

    def _deliver_backend(self, chunk: bytes) -> None:
        # While DATA waits for its reply the shell reads on (the client's bytes
        # are in its socket before the backend can answer).
        refused_data = False
        if self.d.phase is Phase.DATA_WAIT:
            self._read_on()
        before = self.d.phase
        # replies complete once this chunk is in
        self.backend_partial += chunk
        while self.queued:
            raw = self.queued[0].raw
            if not self.backend_partial.startswith(raw):
                break
            self.backend_partial = self.backend_partial[len(raw) :]
            reply = self.queued.popleft()
            self.backend_replies.append(reply)
            if reply.kind == "data":
                self.last_data_reply = raw
                if self.backend.mode == "data-wait":
                    self.backend.mode = "body" if raw.startswith(b"354") else "command"
                if not raw.startswith(b"354"):
                    # Row 12: what the client wrote before this refusal could
                    # reach it was written blind; none of it may run as commands.
                    self.blind_until = len(self.client_stream) + len(self.client_pending)
                    refused_data = True
        with self._watching_starttls():
            self.d.receive_backend(chunk)
        if self.d.phase is Phase.BODY and before is not Phase.BODY:
            # Row 12: the body starts only on the backend's 354.
            assert self.last_data_reply is not None
            assert self.last_data_reply.startswith(b"354 ")
            event("DATA body started")
        self._collect()
        if refused_data and self.client_pending:
            event("DATA refused with a body written behind it")
            self._read_on()  # whatever was written blind is read now

    # ----------------------------------------------------------------- shell

    @precondition(lambda self: self.d.phase is Phase.STARTTLS_READY)
    @rule(accept=st.booleans())
    def shell_answers_starttls(self, accept: bool) -> None:
        """220 and a handshake that succeeds, or 454 (no certificate, a rate limit)."""
        if accept:
            self.starttls_accepted = True
            self.d.starttls_accept()
            self._collect()
            self._handshake_done()
            return
        self.d.starttls_refuse()
        # what came after this STARTTLS was thrown away; new bytes are new commands
        self.forward_cursor = len(self.client_stream)
        self.barrier = None
        self._collect()
        # the client goes on at once; only that may reach the backend
        probe = b"NOOP probe %d\r\n" % next(self.serial)
        self.client_stream += probe
        self.d.receive_client(probe)
        self._collect()

    def _handshake_done(self) -> None:
        """The 220 went out, the handshake succeeded: a fresh dialogue and backend."""
        assert self.d.phase is Phase.HANDSHAKE
        assert self.client_output.endswith(READY)
        self.tls_active = True
        self._new_dialogue(swallow=True)
        event("TLS phase")

    # ------------------------------------------------------------ invariants

    @invariant()
    def nothing_to_the_backend_while_starttls_is_pending(self) -> None:
        if self.d.phase in (Phase.STARTTLS_WAIT, Phase.STARTTLS_READY, Phase.HANDSHAKE):
            assert self.d.backend_output_size == 0
            assert not self.d.client_wants_data

    @invariant()
    def body_only_after_354(self) -> None:
        if self.d.phase is Phase.BODY:
            assert self.last_data_reply is not None
            assert self.last_data_reply.startswith(b"354 ")

    @invariant()
    def pipelining_is_bounded(self) -> None:
        """Never more commands at the backend unanswered than max_pipeline."""
        assert len(self.backend.owed) + len(self.queued) <= 8

    @invariant()
    def outboxes_are_drained(self) -> None:
        assert self.d.backend_output_size == 0
        assert self.d.client_output_size == 0


TestDialogueProperties = DialogueMachine.TestCase
TestDialogueProperties.settings = settings(
    max_examples=800,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
