"""`Dialogue.shutdown()`: 421 4.3.2 at an idle point, never in the middle of a message."""

from __future__ import annotations

import pytest
from test_smtp_dialogue import GREETING, RECEIVED, Harness, phase

from tlsfront.smtp import Ending, Outcome, Phase

SHUTTING_DOWN = b"421 4.3.2 front.example.org Service shutting down\r\n"


@pytest.fixture(params=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytewise")


def test_idle_in_command_phase_gets_421_and_closes(bytewise: bool) -> None:
    h = Harness(bytewise).ehloed()
    assert h.d.shutdown()
    assert h.take() == (SHUTTING_DOWN, b"")
    assert phase(h) is Phase.CLOSING
    assert h.d.backend_should_close
    assert h.d.stats.ending == Ending(Outcome.SHUTDOWN, "shutting down")
    # Closing is final: a second call and late client bytes change nothing.
    assert not h.d.shutdown()
    h.client(b"MAIL FROM:<a@example.net>\r\n")
    assert h.take() == (b"", b"")


def test_half_a_command_is_dropped_not_run(bytewise: bool) -> None:
    h = Harness(bytewise).ehloed()
    h.client(b"MAIL FROM:<a@exa")
    assert h.d.shutdown()
    assert h.take() == (SHUTTING_DOWN, b"")
    h.client(b"mple.net>\r\n")
    assert h.take() == (b"", b"")


def test_not_before_the_greeting() -> None:
    h = Harness(False)
    assert not h.d.shutdown()  # the backend's greeting is still owed
    h.backend(GREETING)
    assert h.take() == (GREETING, b"")
    assert h.d.shutdown()
    assert h.take() == (SHUTTING_DOWN, b"")


def test_not_while_a_reply_is_owed(bytewise: bool) -> None:
    h = Harness(bytewise).ehloed()
    h.client(b"MAIL FROM:<a@example.net>\r\n")
    assert h.take() == (b"", b"MAIL FROM:<a@example.net>\r\n")
    assert not h.d.shutdown()
    h.backend(b"250 ok\r\n")
    # The reply owed goes out first; the 421 only after it.
    assert h.take() == (b"250 ok\r\n", b"")
    assert h.d.shutdown()
    assert h.take() == (SHUTTING_DOWN, b"")


def test_a_message_in_progress_is_finished_first(bytewise: bool) -> None:
    h = Harness(bytewise).ehloed()
    h.client(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    h.backend(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
    assert h.take()[1].endswith(b"DATA\r\n")
    h.client(b"Subject: x\r\n\r\nfirst half\r\n")
    assert not h.d.shutdown()  # mid-DATA: never cut
    assert phase(h) is Phase.BODY
    h.client(b"second half\r\n.\r\n")
    client, backend = h.take()
    assert client == b""
    assert backend == RECEIVED + b"Subject: x\r\n\r\nfirst half\r\nsecond half\r\n.\r\n"
    assert not h.d.shutdown()  # the backend has not answered the dot yet
    h.backend(b"250 ok 1234 qp 42\r\n")
    assert h.take() == (b"250 ok 1234 qp 42\r\n", b"")
    assert h.d.stats.messages == 1
    assert h.d.shutdown()
    assert h.take() == (SHUTTING_DOWN, b"")


def test_not_while_starttls_is_pending() -> None:
    h = Harness(False).ehloed()
    h.client(b"STARTTLS\r\n")
    assert phase(h) is Phase.STARTTLS_READY
    assert not h.d.shutdown()
    h.d.starttls_accept()
    assert not h.d.shutdown()
    assert h.take()[0] == b"220 2.0.0 Ready to start TLS\r\n"
