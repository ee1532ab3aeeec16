"""One session's AUTH outcome: verdicts, delays, closing, logging, counting."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping

import pytest
import trio
import trio.testing

from tlsfront.auth import replies
from tlsfront.auth.gate import AuthGate, Decision
from tlsfront.auth.sasl import Challenge, Credentials, Refused, ServerAuth
from tlsfront.auth.throttle import FailureLimiter, SessionThrottle
from tlsfront.auth.verifier import AuthResult, Verdict

ENV = {"TCPREMOTEIP": "192.0.2.7"}


class TableVerifier:
    """A verifier over a fixed table; `tempfail` is always temporarily failing."""

    name = "table"

    def __init__(self) -> None:
        self.seen: list[Credentials] = []

    async def verify(self, creds: Credentials, env: Mapping[str, str]) -> AuthResult:
        self.seen.append(creds)
        assert env == ENV
        if creds.user == "tempfail":
            return AuthResult(Verdict.TEMPFAIL, creds.user, "backend down")
        good = creds.user == "alice" and creds.password.matches(b"wonderland")
        return AuthResult(Verdict.GOOD if good else Verdict.BAD, creds.user)


def plain(user: str, password: bytes) -> Credentials | Refused:
    message = base64.b64encode(b"\0" + user.encode() + b"\0" + password).decode()
    step = ServerAuth("PLAIN " + message).start()
    assert not isinstance(step, Challenge)
    return step


def gate(
    verifier: TableVerifier, limiter: FailureLimiter | None = None, **limits: int
) -> tuple[AuthGate, list[tuple[str, str, str]]]:
    counted: list[tuple[str, str, str]] = []
    throttle = SessionThrottle(
        FailureLimiter() if limiter is None else limiter, "192.0.2.7", **limits
    )
    return AuthGate(verifier, throttle, ENV, on_result=lambda *a: counted.append(a)), counted


async def test_good_login(autojump_clock: trio.testing.MockClock) -> None:
    verifier = TableVerifier()
    g, counted = gate(verifier)
    start = trio.current_time()
    assert await g.conclude(plain("alice", b"wonderland")) == Decision(
        replies.SUCCEEDED, user="alice"
    )
    assert trio.current_time() == start  # no delay for a good login
    assert counted == [("PLAIN", "table", "good")]
    assert verifier.seen[0].password.reveal() == b""  # wiped after the check


async def test_failures_wait_longer_each_time_then_close(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    g, counted = gate(TableVerifier(), max_failures=3, per_minute=100)
    waits, closes = [], []
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            assert g.may_try()
            start = trio.current_time()
            decision = await g.conclude(plain("alice", b"guess"))
            waits.append(trio.current_time() - start)
            closes.append(decision.close)
            assert decision.reply == replies.INVALID
    assert waits == [2, 4, 8]
    assert closes == [False, False, True]
    assert not g.may_try()
    assert counted == [("PLAIN", "table", "bad")] * 3
    assert (
        caplog.messages
        == ["AUTH failed: client=192.0.2.7 user=alice mechanism=PLAIN verifier=table"] * 3
    )
    assert "guess" not in caplog.text


async def test_a_temporary_failure_costs_nothing(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    g, counted = gate(TableVerifier(), max_failures=1)
    start = trio.current_time()
    with caplog.at_level(logging.DEBUG):
        decision = await g.conclude(plain("tempfail", b"secret-pw"))
    assert decision == Decision(replies.TEMPFAIL)
    assert trio.current_time() == start
    assert g.may_try()
    assert counted == [("PLAIN", "table", "tempfail")]
    assert "backend down" in caplog.text
    assert "secret-pw" not in caplog.text


async def test_refusals_cost_only_when_they_were_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    verifier = TableVerifier()
    g, _ = gate(verifier, max_failures=2)
    assert await g.conclude(Refused(replies.CANCELLED)) == Decision(replies.CANCELLED)
    other = ServerAuth("PLAIN " + base64.b64encode(b"root\0alice\0wonderland").decode()).start()
    assert isinstance(other, Refused)
    start = trio.current_time()
    assert await g.conclude(other) == Decision(replies.INVALID)
    assert trio.current_time() - start == 2
    assert g.throttle.failures == 1
    assert verifier.seen == []  # refused without asking the verifier


async def test_the_address_limit_spans_sessions(autojump_clock: trio.testing.MockClock) -> None:
    limiter = FailureLimiter()
    first, _ = gate(TableVerifier(), limiter, max_failures=10, per_minute=2)
    second, _ = gate(TableVerifier(), limiter, max_failures=10, per_minute=2)
    assert not (await first.conclude(plain("alice", b"a"))).close
    assert (await second.conclude(plain("alice", b"b"))).close
    assert not first.may_try()
