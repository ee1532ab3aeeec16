"""The abuse limits of SMTP AUTH, and the fail2ban filter against the log line."""

from __future__ import annotations

import configparser
import logging
import re
from pathlib import Path

import pytest

from tlsfront.auth.throttle import (
    FailureLimiter,
    SessionThrottle,
    clean_user,
    failure_line,
    log_failure,
)

FILTER = Path(__file__).resolve().parent.parent / "conf" / "fail2ban" / "tlsfront-auth.conf"


def test_each_failure_costs_more_up_to_the_cap() -> None:
    throttle = SessionThrottle(
        FailureLimiter(), "192.0.2.7", max_failures=10, per_minute=100, max_delay=10
    )
    delays = [throttle.failed(float(t)).delay for t in range(6)]
    assert delays == [2, 4, 8, 10, 10, 10]


def test_a_session_closes_at_its_maximum() -> None:
    throttle = SessionThrottle(FailureLimiter(), "192.0.2.7", max_failures=3, per_minute=100)
    assert throttle.may_try(0)
    assert [throttle.failed(t).close for t in (0, 1, 2)] == [False, False, True]
    assert not throttle.may_try(3)


def test_failures_per_address_per_minute_across_sessions() -> None:
    limiter = FailureLimiter()
    sessions = [
        SessionThrottle(limiter, "192.0.2.7", max_failures=3, per_minute=4) for _ in range(3)
    ]
    assert not sessions[0].failed(0).close
    assert not sessions[1].failed(10).close
    assert not sessions[0].failed(20).close
    assert sessions[2].failed(30).close  # the fourth failure of the address this minute
    fresh = SessionThrottle(limiter, "192.0.2.7", max_failures=3, per_minute=4)
    assert not fresh.may_try(59)
    assert fresh.may_try(60.5)  # the failure at t=0 has left the window
    other = SessionThrottle(limiter, "192.0.2.8", max_failures=3, per_minute=4)
    assert other.may_try(30)  # another address has its own count


def test_zero_means_no_limit() -> None:
    throttle = SessionThrottle(FailureLimiter(), "192.0.2.7", max_failures=0, per_minute=0)
    assert not any(throttle.failed(t).close for t in range(100))
    assert throttle.may_try(100)


def test_addresses_gone_quiet_are_forgotten() -> None:
    limiter = FailureLimiter()
    for i in range(1000):
        limiter.record(f"10.0.{i // 256}.{i % 256}", i / 100)
    assert len(limiter) == 1000
    limiter.record("192.0.2.7", 200)
    assert len(limiter) == 1


def fail2ban_regex() -> re.Pattern[str]:
    """The filter's failregex, with fail2ban's <HOST> as an address group."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(FILTER)
    failregex = parser["Definition"]["failregex"].strip()
    return re.compile(failregex.replace("<HOST>", r"(?P<host>[0-9A-Fa-f.:]+)"))


@pytest.mark.parametrize("ip", ["192.0.2.7", "2001:db8::7"])
def test_the_fail2ban_filter_matches_the_log_line(ip: str) -> None:
    line = "Dec  4 19:00:00 mx tlsfront[123]: WARNING " + failure_line(
        ip, "alice@example.org", "PLAIN", "checkpassword"
    )
    match = fail2ban_regex().search(line)
    assert match is not None
    assert match["host"] == ip


@pytest.mark.parametrize(
    "user",
    [
        "x client=203.0.113.9 user=y",
        "x\nAUTH failed: client=203.0.113.9 user=y mechanism=PLAIN verifier=v",
        "\tclient=203.0.113.9",
        None,
        "",
    ],
)
def test_a_crafted_user_name_cannot_name_another_host(user: str | None) -> None:
    line = failure_line("192.0.2.7", user, "LOGIN", "dovecot")
    assert "\n" not in line
    matches = [m["host"] for m in fail2ban_regex().finditer(line)]
    assert matches == ["192.0.2.7"]


def test_user_names_are_cut_and_cleaned() -> None:
    assert clean_user("ålice bob") == "?lice?bob"
    assert clean_user("a" * 100) == "a" * 64
    assert clean_user(None) == "-"


def test_the_failure_is_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="tlsfront"):
        log_failure("192.0.2.7", "alice", "PLAIN", "checkpassword")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "AUTH failed: client=192.0.2.7 user=alice mechanism=PLAIN verifier=checkpassword",
        )
    ]
