"""Command synchronization in the dialogue core: every input at every split.

Each case is one client input, fed in two `receive_client` calls split at
every position, with the backend answering what it has been sent between
the two calls (as a backend that is quick does) or only at the end. The
expected outcome follows from the definitions in
`tlsfront.smtp.synchronization`: whether a reply was owed when a byte
arrived, whether bytes waited behind a line when it was taken.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_ondemand_dialogue import FACE
from test_smtp_dialogue import EHLO_REPLY, GREETING, RECEIVED, Harness

from tlsfront.smtp import Outcome, Phase
from tlsfront.smtp.synchronization import Discipline

DESYNC = b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
ENVELOPE = b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n"
FIRST = b"Subject: one\r\n\r\nfirst\r\n.\r\n"
SECOND_BODY = b"Subject: two\r\n\r\nsecond\r\n.\r\n"
# what the backend says to each command it receives
ANSWERS = {
    b"HELO": b"250 mx.example.org\r\n",
    b"EHLO": EHLO_REPLY,
    b"MAIL": b"250 ok\r\n",
    b"RCPT": b"250 ok\r\n",
    b"DATA": b"354 go ahead\r\n",
    b"NOOP": b"250 ok\r\n",
    b"RSET": b"250 ok\r\n",
    b"QUIT": b"221 bye\r\n",
}


class Backend:
    """Plays a backend: answers each complete command line it was sent."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.seen = b""
        self.pending = b""
        self.in_body = False
        self.messages: list[bytes] = []
        self.body = b""

    def answer(self) -> None:
        """Answer everything the dialogue has sent the backend so far."""
        while True:
            self.h._collect()
            sent, self.h.backend_got = self.h.backend_got, b""
            self.seen += sent
            self.pending += sent
            replies = b""
            while True:
                if self.in_body:
                    end = self.pending.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    self.messages.append(self.body + self.pending[: end + 5])
                    self.pending = self.pending[end + 5 :]
                    self.in_body, self.body = False, b""
                    replies += b"250 ok queued\r\n"
                    continue
                end = self.pending.find(b"\r\n")
                if end < 0:
                    break
                line, self.pending = self.pending[:end], self.pending[end + 2 :]
                replies += ANSWERS[line[:4].upper()]
                if line.upper() == b"DATA":
                    self.in_body = True
            if not replies:
                return
            self.h.backend(replies)


def run(
    data: bytes,
    split: int,
    *,
    prefix: tuple[bytes, ...] = (b"EHLO c\r\n",),
    quick: bool,
    **kw: Any,
) -> tuple[Harness, Backend, bytes]:
    """A greeted session; each of `prefix` sent and answered in turn; then
    `data` in two calls split at `split`, the backend answering between
    them if `quick`. Returns what the client got for `data`."""
    h = Harness(False, **kw)
    be = Backend(h)
    h.backend(GREETING)
    h.take()
    for step in prefix:
        h.client(step)
        be.answer()
    got = b""
    h.client_got = b""
    for part in (data[:split], data[split:]):
        if part and not h.d.closing and (h.d.client_wants_data or h.d.client_read_ahead):
            h.d.receive_client(part)
        if quick:
            be.answer()
        got += h.client_got
        h.client_got = b""
    be.answer()
    got += h.client_got
    h.client_got = b""
    return h, be, got


def splits(data: bytes) -> list[int]:
    return list(range(len(data) + 1))


def mark(data: bytes, needle: bytes) -> int:
    """The offset just past the first `needle` in `data`."""
    return data.index(needle) + len(needle)


# ---------------------------------------------------------------------------
# The headline case: one message ended, the next pipelined with its body.

NEXT = FIRST[-3:] + ENVELOPE + b"DATA\r\n" + SECOND_BODY


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "slow"])
@pytest.mark.parametrize("split", splits(NEXT))
def test_next_message_pipelined_with_its_body_is_refused(split: int, quick: bool) -> None:
    first = (b"EHLO c\r\n", ENVELOPE, b"DATA\r\n", FIRST[:-3])
    h, be, got = run(NEXT, split, prefix=first, quick=quick)
    if quick and split == mark(NEXT, b"DATA\r\n"):
        # the second write came after the 354 had been passed on: not pipelined
        assert be.messages[1:] == [RECEIVED + SECOND_BODY]
        assert not h.d.closing
        return
    assert got.endswith(DESYNC)
    assert got.count(b"354") == 0
    assert len(be.messages) == 1  # the first message stands
    assert b"second" not in be.seen
    assert h.d.closing
    assert h.d.stats.ending is not None
    assert h.d.stats.ending.outcome is Outcome.PIPELINING


def test_legitimate_pipelining_passes_in_one_write() -> None:
    """RFC 2920: MAIL, RCPT, DATA in one group, the body after the 354."""
    h, be, got = run(ENVELOPE + b"DATA\r\n", 0, quick=False)
    assert got == b"250 ok\r\n250 ok\r\n354 go ahead\r\n"
    assert h.d.phase is Phase.BODY
    h.client(FIRST + b"MAIL FROM:<c@example.net>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n")
    be.answer()
    assert h.take()[0] == b"250 ok queued\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n"
    h.client(SECOND_BODY + b"QUIT\r\n")
    be.answer()
    assert h.take()[0] == b"250 ok queued\r\n221 bye\r\n"
    assert len(be.messages) == 2
    assert h.d.stats.ending is not None
    assert h.d.stats.ending.outcome is Outcome.QUIT


# ---------------------------------------------------------------------------
# Behind DATA, BDAT and QUIT


@pytest.mark.parametrize("behind", [b"RSET\r\n", b"Subject: early\r\n", b"x"])
@pytest.mark.parametrize("quick", [True, False], ids=["quick", "slow"])
def test_anything_behind_data_at_every_split(behind: bytes, quick: bool) -> None:
    data = ENVELOPE + b"DATA\r\n" + behind
    after_data = mark(data, b"DATA\r\n")
    for split in splits(data):
        h, be, got = run(data, split, quick=quick)
        if quick and split == after_data:
            assert got.endswith(b"354 go ahead\r\n")  # the rest is then a body
            continue
        assert got.endswith(DESYNC), split
        assert b"354" not in got
        assert be.messages == []
        assert h.d.closing


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "slow"])
def test_a_command_behind_quit_at_every_split(quick: bool) -> None:
    data = b"NOOP\r\nQUIT\r\nNOOP\r\n"
    after_quit = mark(data, b"QUIT\r\n")
    for split in splits(data):
        h, _be, got = run(data, split, quick=quick)
        assert h.d.closing
        if quick and split == after_quit:
            assert got == b"250 ok\r\n221 bye\r\n"  # closed before the NOOP came
            continue
        assert got == b"250 ok\r\n" + DESYNC, split
        assert h.d.stats.ending is not None
        assert h.d.stats.ending.outcome is Outcome.PIPELINING


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "slow"])
def test_chunk_behind_bdat_at_every_split(quick: bool) -> None:
    """BDAT is refused (no CHUNKING); its chunk must not run as commands."""
    chunk = b"RSET\r\nMAIL FROM:<evil@example.net>\r\n"
    data = ENVELOPE + b"BDAT %d LAST\r\n" % len(chunk) + chunk
    after_bdat = mark(data, b"LAST\r\n")
    for split in splits(data):
        _h, be, got = run(data, split, quick=quick)
        if split == after_bdat and quick:
            continue  # the 502 went out before the chunk came: it is commands then
        assert got.endswith(DESYNC), split
        assert b"evil" not in be.seen


# ---------------------------------------------------------------------------
# A client that said HELO was offered no pipelining


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "slow"])
def test_helo_client_may_not_pipeline_at_every_split(quick: bool) -> None:
    data = b"HELO c\r\n" + ENVELOPE
    lines = [mark(data, b"HELO c\r\n")]  # the only split that does not merge with HELO
    for split in splits(data):
        h, be, got = run(data, split, prefix=(), quick=quick)
        assert h.d.closing, split
        assert got.endswith(DESYNC)
        assert b"RCPT" not in be.seen
        if split == lines[0]:
            # HELO's line alone: it is answered, then MAIL is refused (it
            # came while that answer was owed, or had RCPT behind it)
            assert got == b"250 mx.example.org\r\n" + DESYNC
        else:
            assert got == DESYNC  # HELO's own line was followed


def test_helo_client_waiting_for_every_reply_passes() -> None:
    h, be, _got = run(b"", 0, prefix=(b"HELO c\r\n",), quick=True)
    for line in [*ENVELOPE.splitlines(keepends=True), b"DATA\r\n", FIRST, b"QUIT\r\n"]:
        h.client(line)
        be.answer()
    assert h.take()[0] == b"250 ok\r\n250 ok\r\n354 go ahead\r\n250 ok queued\r\n221 bye\r\n"
    assert be.messages == [RECEIVED + FIRST]
    assert h.d.stats.ending is not None
    assert h.d.stats.ending.outcome is Outcome.QUIT


def test_helo_client_pipelining_behind_the_end_of_data() -> None:
    h, be, _got = run(b"", 0, prefix=(b"HELO c\r\n",), quick=True)
    for line in [*ENVELOPE.splitlines(keepends=True), b"DATA\r\n"]:
        h.client(line)
        be.answer()
    h.take()
    h.client(FIRST + b"QUIT\r\n")
    be.answer()
    assert h.take()[0] == b"250 ok queued\r\n" + DESYNC  # the message stands, QUIT does not
    assert len(be.messages) == 1


def test_ehlo_after_helo_allows_pipelining_again() -> None:
    _h, _be, got = run(b"EHLO c\r\n" + ENVELOPE, 0, prefix=(b"HELO c\r\n",), quick=False)
    assert got == EHLO_REPLY.replace(b"250 8BITMIME", b"250-STARTTLS\r\n250 8BITMIME") + (
        b"250 ok\r\n250 ok\r\n"
    )


# ---------------------------------------------------------------------------
# Where it is not policed


@pytest.mark.parametrize(
    "options", [{"pipelining_strict": False}, {"authorized": True}], ids=["relaxed", "certificate"]
)
def test_not_policed_the_body_waits_for_354(options: dict[str, Any]) -> None:
    """Relaxed profile or trusted client: the old defence, DATA mode only on 354."""
    data = b"HELO c\r\n" + ENVELOPE + b"DATA\r\n" + FIRST + b"QUIT\r\n"
    for split in splits(data):
        _h, be, got = run(data, split, prefix=(), quick=False, **options)
        assert DESYNC not in got
        assert got.endswith(b"354 go ahead\r\n250 ok queued\r\n221 bye\r\n"), split
        assert be.messages == [RECEIVED + FIRST]


def test_a_login_ends_the_policing() -> None:
    """After a successful AUTH the session is trusted: a body sent before the
    354 waits for it, as on a relaxed profile."""
    h, be, _ = run(b"", 0, quick=True)
    assert not h.d.trusted
    h.d.auth_user = "alice"  # what `auth_concluded` sets on success
    assert h.d.trusted
    h.client(ENVELOPE + b"DATA\r\n" + FIRST)
    be.answer()
    assert h.take()[0] == b"250 ok\r\n250 ok\r\n354 go ahead\r\n250 ok queued\r\n"
    assert be.messages == [RECEIVED + FIRST]


@pytest.mark.parametrize("split", range(len(b"HELO c\r\nMAIL FROM:<a@b>\r\n") + 1))
def test_on_demand_no_backend_for_a_client_out_of_sync(split: int) -> None:
    """With the backend on demand, HELO is answered in the backend's words by
    tlsfront; a client that pipelines behind it is refused before any
    backend is started for it."""
    h = Harness(False, face=FACE)
    h.take()
    data = b"HELO c\r\nMAIL FROM:<a@b>\r\n"
    for part in (data[:split], data[split:]):
        if part and h.d.client_wants_data:
            h.d.receive_client(part)
    client, backend = h.take()
    if split == len(b"HELO c\r\n"):  # answered at once, so MAIL came after its reply
        assert client == b"250 mx.example.org\r\n"
        assert h.d.backend_wanted
        return
    assert client.endswith(DESYNC)
    assert not h.d.backend_wanted
    assert backend == b""
    assert h.d.closing


def test_discipline_words() -> None:
    d = Discipline()
    assert d.command("EHLO", followed=False, owed=False) is None
    assert d.command("DATA", followed=True, owed=False) == "improper command pipelining after DATA"
    assert d.command("MAIL", followed=True, owed=True) is None  # ESMTP: a group
    assert d.command("HELO", followed=True, owed=False) is not None
    assert d.arrival(ender=None, owed=True) == "improper command pipelining by a HELO client"
    relaxed = Discipline(strict=False)
    assert relaxed.command("QUIT", followed=True, owed=False) is None
    assert relaxed.arrival(ender="QUIT", owed=True) is None


def test_the_log_event_shows_what_was_sent() -> None:
    h, _be, _got = run(b"QUIT\r\nNOOP\r\n", 0, quick=False)
    assert any(
        e.startswith("improper command pipelining after QUIT: b'NOOP") for e in h.d.stats.events
    )
