"""The SMTP dialogue core, without sockets: every input also fed byte by byte."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tlsfront.smtp import TRANSITIONS, Dialogue, Event, LocalProtocolError, Phase

GREETING = b"220 mx.example.org ESMTP\r\n"
EHLO_REPLY = b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
RECEIVED = b"Received: from test\r\n"


class Harness:
    """A Dialogue with both peers played by the test."""

    def __init__(self, bytewise: bool, **kwargs: Any) -> None:
        options: dict[str, Any] = {
            "hostname": "front.example.org",
            "tls_offered": True,
            "tls_active": False,
            "received": lambda helo, esmtp: RECEIVED,
        }
        options.update(kwargs)
        self.d = Dialogue(**options)
        self.bytewise = bytewise
        self.client_got = b""
        self.backend_got = b""

    def _chunks(self, data: bytes) -> Iterator[bytes]:
        if self.bytewise and data:
            yield from (data[i : i + 1] for i in range(len(data)))
        else:
            yield data

    def _collect(self) -> None:
        self.client_got += self.d.take_client_output()
        self.backend_got += self.d.take_backend_output()

    def client(self, data: bytes) -> None:
        for chunk in self._chunks(data):
            self.d.receive_client(chunk)
            self._collect()

    def backend(self, data: bytes) -> None:
        for chunk in self._chunks(data):
            self.d.receive_backend(chunk)
            self._collect()

    def take(self) -> tuple[bytes, bytes]:
        self._collect()
        out = (self.client_got, self.backend_got)
        self.client_got = self.backend_got = b""
        return out

    def greeted(self) -> Harness:
        self.backend(GREETING)
        assert self.take() == (GREETING, b"")
        return self

    def ehloed(self) -> Harness:
        self.greeted()
        self.client(b"EHLO client.example\r\n")
        self.backend(EHLO_REPLY)
        self.take()
        return self


@pytest.fixture(params=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytewise")


def phase(h: Harness) -> Phase:
    """The dialogue's phase (a call, so that mypy does not narrow it across steps)."""
    return h.d.phase


def make(bytewise: bool, **kwargs: Any) -> Harness:
    return Harness(bytewise, **kwargs)


def test_greeting_and_ehlo_gain_starttls_before_last_line(bytewise: bool) -> None:
    h = make(bytewise).greeted()
    h.client(b"EHLO client.example\r\n")
    assert h.take() == (b"", b"EHLO client.example\r\n")
    h.backend(EHLO_REPLY)
    client, _ = h.take()
    assert client == (b"250-mx.example.org\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n")


def test_one_line_ehlo_reply_gains_starttls_at_the_end(bytewise: bool) -> None:
    h = make(bytewise).greeted()
    h.client(b"EHLO c\r\n")
    h.backend(b"250 mx.example.org\r\n")
    assert h.take()[0] == b"250-mx.example.org\r\n250 STARTTLS\r\n"


def test_backend_keywords_that_tlsfront_cannot_carry_are_dropped(bytewise: bool) -> None:
    h = make(bytewise, tls_offered=False).greeted()
    h.client(b"EHLO c\r\n")
    h.backend(
        b"250-mx\r\n250-STARTTLS\r\n250-CHUNKING\r\n250-XCLIENT NAME ADDR\r\n"
        b"250-BINARYMIME\r\n250 PIPELINING\r\n"
    )
    assert h.take()[0] == b"250-mx\r\n250 PIPELINING\r\n"


def test_helo_reply_is_untouched(bytewise: bool) -> None:
    h = make(bytewise).greeted()
    h.client(b"HELO c\r\n")
    h.backend(b"250 mx.example.org\r\n")
    assert h.take()[0] == b"250 mx.example.org\r\n"


def test_no_starttls_once_tls_is_active(bytewise: bool) -> None:
    h = make(bytewise, tls_active=True).greeted()
    h.client(b"EHLO c\r\n")
    h.backend(EHLO_REPLY)
    assert h.take()[0] == EHLO_REPLY


@pytest.mark.parametrize(
    "behind", [b"RSET\r\n", b"MAIL FROM:<a@b>\r\n", b"EHLO x\r\n", b"RSET\r\nQUIT\r\n"]
)
def test_commands_pipelined_behind_starttls_are_discarded(bytewise: bool, behind: bytes) -> None:
    """threat `starttls-injection`: nothing injected in clear is ever executed."""
    h = make(bytewise).ehloed()
    h.client(b"STARTTLS\r\n" + behind)
    assert phase(h) is Phase.STARTTLS_READY
    assert not h.d.client_wants_data
    h.d.starttls_accept()
    client, backend = h.take()
    assert client == b"220 2.0.0 Ready to start TLS\r\n"
    assert backend == b""
    assert h.d.stats.discarded_after_starttls == len(behind)
    assert phase(h) is Phase.HANDSHAKE
    assert h.d.backend_should_close
    # The old backend going away during the handshake is no failure.
    h.backend(b"")
    assert h.take() == (b"", b"")


def test_replies_owed_before_starttls_go_first(bytewise: bool) -> None:
    """threat `reply-order`: NOOP's 250 is written before the 220."""
    h = make(bytewise).ehloed()
    h.client(b"NOOP\r\nSTARTTLS\r\n")
    assert h.take() == (b"", b"NOOP\r\n")
    assert phase(h) is Phase.STARTTLS_WAIT
    h.backend(b"250 ok\r\n")
    assert phase(h) is Phase.STARTTLS_READY
    h.d.starttls_accept()
    assert h.take()[0] == b"250 ok\r\n220 2.0.0 Ready to start TLS\r\n"


def test_starttls_rules(bytewise: bool) -> None:
    """threat `starttls-rules`."""
    h = make(bytewise).ehloed()
    h.client(b"STARTTLS now\r\n")
    assert h.take() == (b"501 5.5.4 Syntax: STARTTLS\r\n", b"")
    inside = make(bytewise, tls_active=True).ehloed()
    inside.client(b"STARTTLS\r\n")
    assert inside.take() == (b"554 5.5.1 Error: TLS already active\r\n", b"")
    plain = make(bytewise, tls_offered=False).ehloed()
    plain.client(b"STARTTLS\r\n")
    assert plain.take() == (b"502 5.5.1 Error: command not implemented\r\n", b"")


def test_starttls_refused_when_tls_cannot_be_had(bytewise: bool) -> None:
    h = make(bytewise).ehloed()
    h.client(b"STARTTLS\r\n")
    h.d.starttls_refuse()
    assert h.take()[0] == b"454 4.7.0 TLS not available due to local problem\r\n"
    assert phase(h) is Phase.COMMAND
    h.client(b"NOOP\r\n")
    assert h.take() == (b"", b"NOOP\r\n")


def test_require_tls_refuses_mail_before_starttls(bytewise: bool) -> None:
    """threat `starttls-stripping`."""
    h = make(bytewise, require_tls=True).greeted()
    h.client(b"EHLO c\r\n")
    h.backend(b"250-mx\r\n250-AUTH LOGIN PLAIN\r\n250 PIPELINING\r\n")
    assert h.take()[0] == b"250-mx\r\n250-STARTTLS\r\n250 PIPELINING\r\n"
    for command in (b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n", b"DATA\r\n", b"AUTH PLAIN x\r\n"):
        h.client(command)
        assert h.take() == (b"530 5.7.0 Must issue a STARTTLS command first\r\n", b"")
    h.client(b"NOOP\r\n")
    assert h.take() == (b"", b"NOOP\r\n")


def test_local_and_backend_replies_keep_command_order(bytewise: bool) -> None:
    h = make(bytewise, pipelining_strict=False).ehloed()  # BDAT with more behind it
    h.client(b"MAIL FROM:<a@b>\r\nBDAT 10 LAST\r\nRCPT TO:<c@d>\r\n")
    assert h.take() == (b"", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    h.backend(b"250 ok\r\n")
    assert h.take()[0] == b"250 ok\r\n502 5.5.1 Error: command not implemented\r\n"
    h.backend(b"250 ok\r\n")
    assert h.take()[0] == b"250 ok\r\n"


def _to_data(h: Harness) -> None:
    h.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    h.backend(b"250 ok\r\n250 ok\r\n")
    assert phase(h) is Phase.DATA_WAIT
    assert not h.d.client_wants_data


def test_message_goes_through_with_received_header_first(bytewise: bool) -> None:
    h = make(bytewise).ehloed()
    _to_data(h)
    h.take()
    h.backend(b"354 go ahead\r\n")
    # the header waits for the body's first bytes: one write to the backend, not two
    assert h.take() == (b"354 go ahead\r\n", b"")
    h.client(b"Subject: hi\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n")
    client, backend = h.take()
    assert client == b""
    assert backend == RECEIVED + b"Subject: hi\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n"
    h.backend(b"250 ok 123 qp 4\r\n221 bye\r\n")
    assert h.take()[0] == b"250 ok 123 qp 4\r\n221 bye\r\n"
    assert h.d.closing
    assert h.d.stats.messages == 1


def test_empty_message(bytewise: bool) -> None:
    h = make(bytewise, received=None).ehloed()
    _to_data(h)
    h.backend(b"354 go ahead\r\n")
    h.take()
    h.client(b".\r\n")
    assert h.take() == (b"", b".\r\n")


def test_body_pipelined_behind_a_refused_data_is_never_run(bytewise: bool) -> None:
    """Also where pipelining is not policed (a relaxed profile), DATA mode
    starts only on the backend's 354."""
    h = make(bytewise, pipelining_strict=False).ehloed()
    h.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nRSET\r\nMAIL FROM:<x@y>\r\n.\r\n")
    _, backend = h.take()
    assert backend == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
    h.backend(b"250 ok\r\n553 no\r\n554 no valid recipients\r\n")
    client, backend = h.take()
    assert client == (
        b"250 ok\r\n553 no\r\n554 no valid recipients\r\n"
        b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
    )
    assert backend == b""
    assert h.d.closing


@pytest.mark.parametrize(
    "body",
    [
        b"a\n.\nMAIL FROM:<x@y>\r\n",
        b"a\r.\rMAIL FROM:<x@y>\r\n",
        b"a\r\n.\nMAIL FROM:<x@y>\r\n",
        b"a\n.\r\nMAIL FROM:<x@y>\r\n",
        b"a\r\n.\rMAIL FROM:<x@y>\r\n",
        b"a\r\n\0.\r\nMAIL FROM:<x@y>\r\n",
        b"a\r\n.\0\r\nMAIL FROM:<x@y>\r\n",
    ],
)
def test_smuggling_terminators_are_refused(bytewise: bool, body: bytes) -> None:
    """threat `smtp-smuggling`: never two messages; the backend never sees a fake end."""
    h = make(bytewise).ehloed()
    _to_data(h)
    h.backend(b"354 go ahead\r\n")
    h.take()
    h.client(body + b"RCPT TO:<e@f>\r\nDATA\r\n\r\nsecond\r\n.\r\n")
    client, backend = h.take()
    assert client.startswith(b"550 5.5.2 ")
    assert b"MAIL" not in backend
    assert b"\r\n.\r\n" not in RECEIVED + backend
    assert h.d.closing
    assert h.d.backend_should_close
    assert h.d.stats.messages == 0


def test_body_line_too_long(bytewise: bool) -> None:
    h = make(bytewise, max_text_line=100).ehloed()
    _to_data(h)
    h.backend(b"354 go ahead\r\n")
    h.take()
    h.client(b"x" * 98 + b"\r\n")  # exactly 100 with CRLF: fine
    assert h.take() == (b"", RECEIVED + b"x" * 98 + b"\r\n")
    h.client(b"y" * 200)
    client, backend = h.take()
    assert client == b"500 5.5.2 Error: message line too long\r\n"
    # fed byte by byte, the line's first 99 bytes went on before the 100th
    # broke the limit; the backend sees its input end without a final dot
    assert backend == (b"y" * 99 if bytewise else b"")
    assert h.d.closing
    assert h.d.backend_should_close


@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("text", [998, 999])
def test_body_line_limit_as_rfc_5321_counts_it(dot: bool, text: int) -> None:
    """998 octets of text pass, 999 do not; a transparency dot is not counted.

    The line (and the terminator behind it) is cut in two at every place.
    """
    line = (b"." if dot else b"x") + b"y" * (text - 1)
    wire = (b"." + line if dot else line) + b"\r\n.\r\n"
    for cut in range(len(wire) + 1):
        h = make(False, received=None).ehloed()
        _to_data(h)
        h.backend(b"354 go ahead\r\n")
        h.take()
        for piece in (wire[:cut], wire[cut:]):
            if piece:  # b"" would be the client's end of input
                h.client(piece)
        client, backend = h.take()
        if text == 998:
            assert (client, backend) == (b"", wire), cut
            assert phase(h) is Phase.COMMAND
        else:
            assert client == b"500 5.5.2 Error: message line too long\r\n", cut
            assert b"\r\n.\r\n" not in backend
            assert h.d.closing


def test_command_line_too_long_closes_at_the_limit() -> None:
    """threat `long-lines`: 64 MiB without LF never buffers more than the limit."""
    h = make(False).greeted()
    chunk = b"A" * 65536
    for _ in range(1024):
        if not h.d.client_wants_data:
            break
        h.client(chunk)
    assert h.take() == (b"500 5.5.2 Error: line too long\r\n", b"")
    assert h.d.closing


def test_command_of_exactly_the_limit_is_accepted(bytewise: bool) -> None:
    h = make(bytewise).greeted()
    line = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(line) == 512
    h.client(line)
    assert h.take() == (b"", line)


@pytest.mark.parametrize("line", [b"EHLO a\rb\r\n", b"EHLO a\0b\r\n", b"EHLO ab\n"])
def test_bare_cr_lf_nul_in_commands(bytewise: bool, line: bytes) -> None:
    """threat `bare-cr-lf-nul`: refused, never forwarded; the session goes on."""
    h = make(bytewise).greeted()
    h.client(line)
    assert h.take() == (b"500 5.5.2 Error: bare CR, bare LF or NUL in command line\r\n", b"")
    h.client(b"NOOP\r\n")
    assert h.take() == (b"", b"NOOP\r\n")


@pytest.mark.parametrize("after_dot", [b"", b"250 o"])
def test_backend_dies_after_the_dot(bytewise: bool, after_dot: bytes) -> None:
    """threat `false-acknowledgement`: 451, never 250, also after half a reply."""
    h = make(bytewise).ehloed()
    _to_data(h)
    h.backend(b"354 go ahead\r\n")
    h.client(b"hello\r\n.\r\n")
    h.take()
    h.backend(after_dot)
    h.backend(b"")
    client, _ = h.take()
    assert client == b"451 4.3.0 Error: backend failed, message not accepted\r\n"
    assert h.d.closing
    assert h.d.stats.messages == 0


def test_backend_dies_while_idle(bytewise: bool) -> None:
    h = make(bytewise).ehloed()
    h.backend(b"")
    assert h.take()[0] == b"421 4.3.0 front.example.org Service not available\r\n"
    assert h.d.closing


def test_backend_dies_during_the_body(bytewise: bool) -> None:
    h = make(bytewise).ehloed()
    _to_data(h)
    h.backend(b"354 go ahead\r\n")
    h.take()
    h.client(b"part one\r\n")
    h.backend(b"")
    assert h.take()[0] == b""  # the client is not listening yet
    h.client(b"part two\r\n.\r\n")
    client, backend = h.take()
    assert client == b"451 4.3.0 Error: backend failed, message not accepted\r\n"
    assert backend == b""


def test_backend_timeout_at_the_dot(bytewise: bool) -> None:
    h = make(bytewise).ehloed()
    _to_data(h)
    h.backend(b"354 go ahead\r\n")
    h.client(b"hello\r\n.\r\n")
    h.take()
    assert h.d.waiting_for == "backend"
    h.d.timeout("backend")
    assert h.take()[0].startswith(b"451 4.3.0")


def test_garbage_from_the_backend_is_a_failure(bytewise: bool) -> None:
    h = make(bytewise).greeted()
    h.client(b"NOOP\r\n")
    h.backend(b"hello there\r\n")
    assert h.take()[0].startswith(b"421 4.3.0")
    assert h.d.closing


def test_client_vanishes_mid_data(bytewise: bool) -> None:
    """threat `client-vanishes`: the backend gets EOF and never a terminator."""
    h = make(bytewise).ehloed()
    _to_data(h)
    h.backend(b"354 go ahead\r\n")
    h.take()
    h.client(b"half a bo")
    h.client(b"")
    _, backend = h.take()
    assert b"." not in backend
    assert h.d.closing
    assert h.d.backend_should_close


def test_client_eof_waits_for_owed_replies(bytewise: bool) -> None:
    h = make(bytewise).ehloed()
    h.client(b"NOOP\r\n")
    h.client(b"")
    assert not h.d.closing
    assert h.d.backend_should_close
    h.backend(b"250 ok\r\n")
    assert h.take()[0] == b"250 ok\r\n"
    assert h.d.closing


def test_size_limits(bytewise: bool) -> None:
    """threat `oversized-message`."""
    h = make(bytewise, max_message_size=100).greeted()
    h.client(b"EHLO c\r\n")
    h.backend(EHLO_REPLY)
    assert b"250-SIZE 100\r\n" in h.take()[0]
    h.client(b"MAIL FROM:<a@b> SIZE=1000\r\n")
    assert h.take() == (b"552 5.3.4 Error: message size exceeds fixed limit\r\n", b"")
    _to_data(h)
    h.backend(b"354 go ahead\r\n")
    h.take()
    h.client(b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\n")
    client, backend = h.take()
    assert client == b"552 5.3.4 Error: message too big\r\n"
    assert b".\r\n" not in backend
    assert phase(h) is Phase.RESET  # the session goes on, with a fresh backend


def test_after_552_for_a_big_body_the_session_goes_on(bytewise: bool) -> None:
    """The backend's input closes without an end of data as soon as the body is
    too big; the rest is read and dropped; the client's dot gets 552; what it
    pipelined behind goes to a fresh backend, after its own EHLO replayed."""
    h = make(bytewise, max_message_size=100).ehloed()
    _to_data(h)
    h.backend(b"354 go ahead\r\n")
    h.take()
    h.client(b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n")
    assert h.d.backend_should_close  # no end of data: the backend queues nothing
    assert h.d.waiting_for == "client"
    # fed whole, the chunk that passes the limit is not passed on at all;
    # byte by byte, the first 100 bytes went on, as they came
    assert h.take() == (b"", (RECEIVED + b"x" * 60 + b"\r\n" + b"y" * 38) if bytewise else b"")
    h.backend(b"")  # it exits; that is no failure
    assert h.d.backend_error is None
    h.client(b"z" * 500 + b"\r\n")
    assert h.take() == (b"", b"")  # dropped
    assert phase(h) is Phase.BODY
    h.client(b".\r\nRSET\r\nMAIL FROM:<a@b>\r\n")
    client, backend = h.take()
    assert (client, b".\r\n" in backend) == (b"552 5.3.4 Error: message too big\r\n", False)
    assert phase(h) is Phase.RESET
    assert (h.d.stats.refused, h.d.stats.messages) == (1, 0)
    assert h.d.waiting_for is None
    assert not h.d.client_wants_data
    carry = h.d.carry()
    assert carry.hello is not None
    assert carry.hello.raw == b"EHLO client.example\r\n"
    assert carry.client_bytes == b"RSET\r\nMAIL FROM:<a@b>\r\n"

    fresh = make(bytewise, max_message_size=100, carry=carry)
    assert fresh.take() == (b"", b"EHLO client.example\r\n")  # replayed
    fresh.backend(GREETING + EHLO_REPLY)  # both swallowed
    assert fresh.take() == (b"", b"RSET\r\nMAIL FROM:<a@b>\r\n")
    fresh.backend(b"250 flushed\r\n250 ok\r\n")
    assert fresh.take() == (b"250 flushed\r\n250 ok\r\n", b"")
    assert phase(fresh) is Phase.COMMAND
    assert fresh.d.stats.helo == "client.example"  # for tlsfront's Received header


def test_pipeline_depth_is_bounded() -> None:
    h = make(False, max_pipeline=3).greeted()
    h.client(b"NOOP\r\n" * 10)
    assert h.take() == (b"", b"NOOP\r\n" * 3)
    assert not h.d.client_wants_data
    h.backend(b"250 ok\r\n")
    assert h.take() == (b"250 ok\r\n", b"NOOP\r\n")


def test_fresh_backend_greeting_is_swallowed(bytewise: bool) -> None:
    h = make(bytewise, tls_active=True, swallow_greeting=True)
    h.client(b"EHLO c\r\n")
    h.backend(GREETING + EHLO_REPLY)
    assert h.take() == (EHLO_REPLY, b"EHLO c\r\n")


def test_client_timeout(bytewise: bool) -> None:
    h = make(bytewise).ehloed()
    assert h.d.waiting_for == "client"
    h.d.timeout("client")
    assert h.take()[0] == b"421 4.4.2 front.example.org Error: timeout exceeded\r\n"
    assert h.d.closing


def test_unsolicited_backend_reply_is_passed_on(bytewise: bool) -> None:
    h = make(bytewise).ehloed()
    h.backend(b"451 timeout (#4.4.2)\r\n")
    assert h.take()[0] == b"451 timeout (#4.4.2)\r\n"


def test_rblsmtpd_style_refusal_reaches_the_client(bytewise: bool) -> None:
    h = make(bytewise)
    h.backend(b"554 blocked, see http://example.org/\r\n")
    assert h.take()[0] == b"554 blocked, see http://example.org/\r\n"
    h.client(b"EHLO c\r\n")
    h.backend(b"553 blocked\r\n")
    assert h.take()[0] == b"553 blocked\r\n"


def test_xclient_from_the_client_is_refused(bytewise: bool) -> None:
    h = make(bytewise).ehloed()
    h.client(b"XCLIENT ADDR=10.0.0.1\r\n")
    assert h.take() == (b"502 5.5.1 Error: command not implemented\r\n", b"")


def test_every_phase_is_reachable_and_may_close() -> None:
    reached, todo = {Phase.COMMAND}, [Phase.COMMAND]
    while todo:
        for target in TRANSITIONS[todo.pop()].values():
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert reached == set(Phase)
    assert all(moves[Event.CLOSE] is Phase.CLOSING for moves in TRANSITIONS.values())


@pytest.mark.parametrize("event", [e for e in Event if e not in TRANSITIONS[Phase.COMMAND]])
def test_a_move_the_table_lacks_is_refused(event: Event) -> None:
    h = make(False).ehloed()
    with pytest.raises(LocalProtocolError, match="no move on"):
        h.d._move(event)
    assert phase(h) is Phase.COMMAND


def test_starttls_answers_only_when_pending() -> None:
    h = make(False).ehloed()
    with pytest.raises(LocalProtocolError, match="STARTTLS is not pending"):
        h.d.starttls_accept()
    with pytest.raises(LocalProtocolError, match="STARTTLS is not pending"):
        h.d.starttls_refuse()
