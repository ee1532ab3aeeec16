"""The backend on demand, in the dialogue alone: every input also fed byte by byte."""

from __future__ import annotations

from typing import Any

import pytest
from test_smtp_dialogue import Harness

from tlsfront.smtp import Phase
from tlsfront.smtp.face import BackendFace, Probe, ProbeFailed
from tlsfront.smtp.phases import BackendState
from tlsfront.smtp.reply import Reply

GREETING = b"220 mx.example.org ESMTP\r\n"
EHLO_REPLY = b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
FACE = BackendFace.learned(
    Reply(220, (b"mx.example.org ESMTP",)),
    Reply(250, (b"mx.example.org", b"PIPELINING", b"8BITMIME")),
)


@pytest.fixture(params=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytewise")


def make(bytewise: bool, **kwargs: Any) -> Harness:
    # these tests pipeline what a HELO client may not (test_pipelining.py has
    # the rule with the backend on demand)
    kwargs.setdefault("pipelining_strict", False)
    return Harness(bytewise, face=kwargs.pop("face", FACE), **kwargs)


def state(h: Harness) -> BackendState:
    return h.d.backend


def started(h: Harness) -> None:
    """The shell's part: the backend was wanted, and now runs."""
    assert h.d.backend_wanted
    h.d.backend_started()


def test_greeting_and_ehlo_are_the_backends_words_without_a_backend(bytewise: bool) -> None:
    h = make(bytewise)
    assert h.take() == (GREETING, b"")
    h.client(b"EHLO client.example\r\nNOOP\r\nRSET\r\nHELO other.example\r\nQUIT\r\n")
    assert h.take() == (
        b"250-mx.example.org\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
        b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n250 mx.example.org\r\n"
        b"221 2.0.0 front.example.org closing connection\r\n",
        b"",
    )
    assert state(h) is BackendState.ABSENT
    assert h.d.closing


def test_no_extension_the_backend_lacks_without_a_probe(bytewise: bool) -> None:
    h = make(bytewise, face=BackendFace.conservative("mx.example.org"), max_message_size=1000)
    h.take()
    h.client(b"EHLO c\r\n")
    assert h.take()[0] == b"250-mx.example.org\r\n250-SIZE 1000\r\n250 STARTTLS\r\n"


def test_mail_starts_the_backend_with_the_clients_own_ehlo(bytewise: bool) -> None:
    h = make(bytewise)
    h.take()
    h.client(b"ehlo client.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    client, backend = h.take()
    assert client.startswith(b"250-mx.example.org")  # the EHLO reply, nothing more yet
    assert backend == b""
    assert state(h) is BackendState.WANTED
    assert not h.d.client_wants_data  # nothing read behind the held command
    assert h.d.waiting_for == "backend"
    started(h)
    h.backend(GREETING)
    assert h.take() == (b"", b"ehlo client.example\r\n")  # checked, not passed on
    h.backend(EHLO_REPLY)
    # the held command only now, and what was pipelined behind it
    assert h.take() == (b"", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    h.backend(b"250 ok\r\n250 ok\r\n")
    assert h.take() == (b"250 ok\r\n250 ok\r\n", b"")
    assert state(h) is BackendState.READY
    h.client(b"RSET\r\n")  # the backend's transaction: its RSET now
    assert h.take() == (b"", b"RSET\r\n")
    assert h.d.stats.helo == "client.example"


def test_no_hello_sends_none(bytewise: bool) -> None:
    h = make(bytewise)
    h.take()
    h.client(b"VRFY postmaster\r\n")
    started(h)
    h.backend(GREETING)
    assert h.take() == (b"", b"VRFY postmaster\r\n")
    h.backend(b"252 send some mail\r\n")
    assert h.take() == (b"252 send some mail\r\n", b"")


def test_data_as_the_first_command_for_the_backend(bytewise: bool) -> None:
    h = make(bytewise)
    h.take()
    h.client(b"HELO c\r\nDATA\r\n")
    started(h)
    h.backend(GREETING + b"250 mx.example.org\r\n")
    assert h.take() == (b"250 mx.example.org\r\n", b"HELO c\r\nDATA\r\n")
    assert h.d.phase is Phase.DATA_WAIT
    h.backend(b"503 MAIL first (#5.5.1)\r\n")
    assert h.take() == (b"503 MAIL first (#5.5.1)\r\n", b"")


@pytest.mark.parametrize(
    ("greeting", "closes"),
    [(b"421 service unavailable\r\n", True), (b"554 blocked\r\n", False)],
)
def test_a_refusing_greeting_answers_the_held_command(
    bytewise: bool, greeting: bytes, closes: bool
) -> None:
    h = make(bytewise)
    h.take()
    h.client(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")
    h.take()
    started(h)
    h.backend(greeting)
    client, backend = h.take()
    assert (client, backend) == (greeting, b"")  # its words; no EHLO, no MAIL sent
    assert state(h) is BackendState.REFUSED
    assert h.d.backend_should_close
    h.backend(b"")  # it exits: its refusal stands, no 421 of tlsfront's
    assert h.take() == (b"", b"")
    assert h.d.closing is closes
    if not closes:
        h.client(b"RCPT TO:<c@d>\r\nNOOP\r\nQUIT\r\n")
        assert h.take() == (
            greeting + b"250 2.0.0 Ok\r\n221 2.0.0 front.example.org closing connection\r\n",
            b"",
        )


def test_a_refused_helo_refuses_the_session(bytewise: bool) -> None:
    h = make(bytewise)
    h.take()
    h.client(b"EHLO bad.example\r\nMAIL FROM:<a@b>\r\n")
    h.take()
    started(h)
    h.backend(GREETING)
    assert h.take() == (b"", b"EHLO bad.example\r\n")
    h.backend(b"550 5.7.1 go away\r\n")
    assert h.take() == (b"550 5.7.1 go away\r\n", b"")
    assert state(h) is BackendState.REFUSED


def test_a_backend_that_cannot_start(bytewise: bool) -> None:
    h = make(bytewise)
    h.take()
    h.client(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")
    h.take()
    h.d.backend_unavailable()
    client, _ = h.take()
    assert client == b"421 4.3.0 front.example.org Service temporarily unavailable\r\n"
    assert h.d.closing


def test_a_backend_that_dies_before_its_greeting(bytewise: bool) -> None:
    h = make(bytewise)
    h.take()
    h.client(b"MAIL FROM:<a@b>\r\n")
    started(h)
    h.backend(b"")
    client, backend = h.take()
    assert client.startswith(b"421 4.3.0 front.example.org Service not available")
    assert backend == b""
    assert h.d.closing


def test_client_gone_while_the_backend_is_wanted_starts_none(bytewise: bool) -> None:
    h = make(bytewise)
    h.take()
    h.client(b"MAIL FROM:<a@b>\r\n")
    h.client(b"")
    assert h.d.closing
    assert not h.d.backend_wanted


def test_require_tls_answers_before_any_backend(bytewise: bool) -> None:
    h = make(bytewise, require_tls=True)
    h.take()
    h.client(b"MAIL FROM:<a@b>\r\n")
    assert h.take() == (b"530 5.7.0 Must issue a STARTTLS command first\r\n", b"")
    assert state(h) is BackendState.ABSENT


def test_after_starttls_no_greeting(bytewise: bool) -> None:
    h = make(bytewise, tls_active=True, greet=False)
    assert h.take() == (b"", b"")
    h.client(b"EHLO c\r\n")
    assert h.take()[0] == b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


def test_starttls_with_a_running_backend_ends_it(bytewise: bool) -> None:
    """MAIL before STARTTLS: that backend is closed at STARTTLS (a fresh one after)."""
    h = make(bytewise)
    h.take()
    h.client(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")
    started(h)
    h.backend(GREETING + EHLO_REPLY + b"250 ok\r\n")
    h.take()
    h.client(b"STARTTLS\r\n")
    h.d.starttls_accept()
    assert h.d.phase is Phase.HANDSHAKE
    assert h.d.backend_should_close


def test_probe_conversation() -> None:
    probe = Probe("front.example.org")
    probe.receive(b"220 mx.example.org ESMTP\r\n")
    assert probe.take_output() == b"EHLO front.example.org\r\n"
    probe.receive(EHLO_REPLY)
    assert probe.take_output() == b"QUIT\r\n"
    assert probe.done
    assert probe.ehlo is not None
    assert probe.ehlo.lines[1:] == (b"PIPELINING", b"8BITMIME")


@pytest.mark.parametrize(
    "replies",
    [b"421 busy\r\n", b"220 ok\r\n502 unimplemented\r\n", b"garbage\r\n", b""],
)
def test_probe_failures(replies: bytes) -> None:
    probe = Probe("front.example.org")
    *before, last = replies.splitlines(keepends=True) or [b""]
    for line in before:
        probe.receive(line)
    with pytest.raises(ProbeFailed):
        probe.receive(last)


def test_control_files_name_the_server() -> None:
    face = BackendFace.learned(
        Reply(220, (b"probe.example ESMTP",)),
        Reply(250, (b"probe.example", b"PIPELINING")),
        "greeting.example",
    )
    assert face.greeting.raw == b"220 greeting.example ESMTP\r\n"
    assert face.ehlo.raw == b"250-greeting.example\r\n250 PIPELINING\r\n"
    assert face.helo.raw == b"250 greeting.example\r\n"


def test_after_a_dropped_message_the_next_backend_starts_on_demand(bytewise: bool) -> None:
    """The carry of a dialogue in RESET: its EHLO for the next backend, and
    the commands pipelined behind the dot, which start that backend at once."""
    h = make(bytewise, max_message_size=10)
    h.take()
    h.client(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")
    started(h)
    h.backend(GREETING + EHLO_REPLY + b"250 ok\r\n")
    h.client(b"RCPT TO:<c@d>\r\nDATA\r\n")
    h.backend(b"250 ok\r\n354 go ahead\r\n")
    h.take()
    h.client(b"Subject: too big\r\n\r\n.\r\nMAIL FROM:<e@f>\r\n")
    assert h.take()[0] == b"552 5.3.4 Error: message too big\r\n"
    assert h.d.phase is Phase.RESET
    carried = h.d.carry()
    nxt = make(bytewise, greet=False, carry=carried)
    assert nxt.take() == (b"", b"")  # no greeting; MAIL held
    assert nxt.d.backend_wanted
    assert nxt.d.stats.helo == "c"
    nxt.d.backend_started()
    nxt.backend(GREETING + EHLO_REPLY)
    assert nxt.take() == (b"", b"EHLO c\r\nMAIL FROM:<e@f>\r\n")
