"""How a session ended: a typed value set where it happens, words for the log,
and metric labels from fixed sets, whatever a peer or OpenSSL said."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from test_smtp_dialogue import Harness

from tlsfront.inbound.record import (
    BACKEND_LABELS,
    SESSION_LABELS,
    BackendLabel,
    SessionLabel,
    SessionRecord,
)
from tlsfront.net.address import Address
from tlsfront.ops import counters
from tlsfront.smtp import Ending, Outcome
from tlsfront.smtp.outcome import BACKEND_FAILURES
from tlsfront.tls.stream import (
    HandshakeFailure,
    HandshakeNotes,
    TLSHandshakeError,
    _handshake_error,
)

HANDSHAKE_LABELS = frozenset(failure.value for failure in HandshakeFailure)


def record(profile: str = "p") -> SessionRecord:
    return SessionRecord(profile, Address("192.0.2.1", 40000), 0.0)


def test_every_outcome_has_a_label_from_the_fixed_set() -> None:
    assert set(SESSION_LABELS) == set(Outcome)
    for outcome in Outcome:
        r = record()
        r.end(outcome, "words")
        assert r.outcome in SessionLabel
        assert r.outcome is SESSION_LABELS[outcome]
        assert (r.backend_label is not None) == (outcome in BACKEND_FAILURES)
    assert set(BACKEND_LABELS) == BACKEND_FAILURES
    assert set(BACKEND_LABELS.values()) == set(BackendLabel)


def test_labels_are_those_the_dashboards_know() -> None:
    assert [label.value for label in SessionLabel] == [
        "ok",
        "timeout",
        "client_lost",
        "tls_failed",
        "rate_limited",
        "backend_failed",
        "backend_closed",
        "protocol_error",
        "pipelining",
        "refused",
        "denied",
        "shutdown",
        "cancelled",
        "error",
    ]


def _data(h: Harness) -> None:
    h.ehloed()
    h.client(b"MAIL FROM:<a@example.org>\r\n")
    h.backend(b"250 ok\r\n")
    h.client(b"RCPT TO:<b@example.org>\r\n")
    h.backend(b"250 ok\r\n")


def _client_lost(h: Harness) -> None:
    _data(h)
    h.client(b"DATA\r\n")
    h.backend(b"354 go ahead\r\n")
    h.client(b"Subject: half a message\r\n")
    h.client(b"")


def _pipelined_body(h: Harness) -> None:
    _data(h)
    h.client(b"DATA\r\nSubject: too early\r\n")
    h.backend(b"354 go ahead\r\n")


def _pipelined_body_trusted(h: Harness) -> None:
    h.d.auth_user = "alice"  # logged in: pipelining is not policed
    _data(h)
    h.client(b"DATA\r\nSubject: too early\r\n")
    h.backend(b"554 no\r\n")


def _noop(h: Harness) -> None:
    h.ehloed()
    h.client(b"NOOP\r\n")


def _quit(h: Harness) -> None:
    h.ehloed()
    h.client(b"QUIT\r\n")
    h.backend(b"221 bye\r\n")


def _hang_up(h: Harness) -> None:
    h.ehloed()
    h.client(b"")


def _client_timeout(h: Harness) -> None:
    h.ehloed()
    h.d.timeout("client")


def _shutdown(h: Harness) -> None:
    h.ehloed()
    assert h.d.shutdown()


def _backend_421(h: Harness) -> None:
    _noop(h)
    h.backend(b"421 4.3.2 going away\r\n")


def _backend_hung(h: Harness) -> None:
    _noop(h)
    h.d.timeout("backend")


def _backend_gone(h: Harness) -> None:
    _noop(h)
    h.backend(b"")


def _backend_nonsense(h: Harness) -> None:
    _noop(h)
    h.backend(b"hello there\r\n")


# The dialogue's events, each with the outcome it sets and the words the log shows.
DIALOGUE_CASES: list[tuple[str, Callable[[Harness], None], Outcome, str, SessionLabel]] = [
    (
        "quit",
        _quit,
        Outcome.QUIT,
        "quit",
        SessionLabel.OK,
    ),
    (
        "hang-up",
        _hang_up,
        Outcome.CLIENT_CLOSED,
        "client closed the connection",
        SessionLabel.OK,
    ),
    (
        "lost in DATA",
        _client_lost,
        Outcome.CLIENT_LOST,
        "client closed the connection during DATA",
        SessionLabel.CLIENT_LOST,
    ),
    (
        "client timeout",
        _client_timeout,
        Outcome.CLIENT_TIMEOUT,
        "client timed out",
        SessionLabel.TIMEOUT,
    ),
    (
        "shutdown",
        _shutdown,
        Outcome.SHUTDOWN,
        "shutting down",
        SessionLabel.SHUTDOWN,
    ),
    (
        "pipelined body",
        _pipelined_body,
        Outcome.PIPELINING,
        "improper command pipelining after DATA",
        SessionLabel.PIPELINING,
    ),
    (
        "pipelined body, trusted client",
        _pipelined_body_trusted,
        Outcome.PROTOCOL_ERROR,
        "pipelining after a refused DATA",
        SessionLabel.PROTOCOL_ERROR,
    ),
    (
        "backend 421",
        _backend_421,
        Outcome.BACKEND_CLOSED,
        "backend closed the session: 421 4.3.2 going away",
        SessionLabel.BACKEND_CLOSED,
    ),
    (
        "backend hung",
        _backend_hung,
        Outcome.BACKEND_TIMEOUT,
        "backend did not answer in time",
        SessionLabel.BACKEND_FAILED,
    ),
    (
        "backend gone",
        _backend_gone,
        Outcome.BACKEND_EXITED,
        "backend closed the connection",
        SessionLabel.BACKEND_FAILED,
    ),
    (
        "backend nonsense",
        _backend_nonsense,
        Outcome.BACKEND_PROTOCOL,
        "Backend failure: malformed reply line",
        SessionLabel.BACKEND_FAILED,
    ),
]


@pytest.mark.parametrize(
    ("drive", "outcome", "words", "label"),
    [case[1:] for case in DIALOGUE_CASES],
    ids=[case[0] for case in DIALOGUE_CASES],
)
def test_the_dialogue_sets_the_outcome_where_it_happens(
    drive: Callable[[Harness], None], outcome: Outcome, words: str, label: SessionLabel
) -> None:
    h = Harness(False)
    drive(h)
    assert h.d.stats.ending == Ending(outcome, words)
    failure = h.d.backend_error
    assert (failure is not None) == (outcome in BACKEND_FAILURES)
    r = record()
    r.ending = h.d.stats.ending  # as the session carries it over
    r.backend_failure = failure.outcome if failure is not None else None
    assert r.outcome is label
    assert r.line(1.0).endswith(f"outcome={label.value} reason={words!r}")
    assert r.fields(1.0)["reason"] == words


def test_a_backend_failure_labels_the_session_even_if_a_later_phase_quit() -> None:
    r = record()
    r.backend_failure = Outcome.BACKEND_EXITED
    r.ending = Ending(Outcome.QUIT, "quit")
    assert r.outcome is SessionLabel.BACKEND_FAILED
    assert r.reason == "quit"
    assert r.backend_label is BackendLabel.EXITED


def _openssl_error(text: str) -> SSL.Error:
    return SSL.Error([("SSL routines", "", text)])


@given(st.text(min_size=1))
def test_any_openssl_error_text_yields_a_bounded_label(text: str) -> None:
    error = _handshake_error(_openssl_error(text), HandshakeNotes())
    assert error.kind in HandshakeFailure
    r = record()
    r.tls_failure = error.kind
    assert r.tls_failure_label in HANDSHAKE_LABELS
    assert r.outcome is SessionLabel.TLS_FAILED


def test_an_unknown_openssl_error_keeps_its_words_for_the_log_only() -> None:
    text = "a failure no release of OpenSSL has named yet"
    error = _handshake_error(_openssl_error(text), HandshakeNotes())
    assert error.kind is HandshakeFailure.OTHER
    assert (error.reason, str(error)) == (text, text)  # the log's words
    known = _handshake_error(_openssl_error("no shared cipher"), HandshakeNotes())
    assert (known.kind, known.reason) == (HandshakeFailure.NO_SHARED_CIPHER, "no shared cipher")

    profile = "unknown-openssl-error"
    r = record(profile)
    r.end(Outcome.TLS_FAILED, f"TLS handshake failed: {error.reason}")
    r.tls_failure = error.kind
    counters.session_ended(r)
    failures = {
        sample.labels["reason"]: sample.value
        for metric in counters.REGISTRY.collect()
        if metric.name == "tlsfront_tls_handshake_failures"
        for sample in metric.samples
        if sample.labels["profile"] == profile
    }
    assert failures == {"other": 1.0}
    sessions = counters.REGISTRY.get_sample_value(
        "tlsfront_sessions_total", {"profile": profile, "outcome": "tls_failed"}
    )
    assert sessions == 1.0
    assert "reason='TLS handshake failed: a failure no release" in r.line(1.0)


def test_a_handshake_error_rebuilt_from_its_kind_is_the_same() -> None:
    # (a second do_handshake re-raises the first failure this way)
    for kind in HandshakeFailure:
        first = TLSHandshakeError(kind, "detail words")
        again = TLSHandshakeError(first.kind, first.detail)
        assert (again.kind, again.reason, str(again)) == (first.kind, first.reason, str(first))
