"""The per-client limit on new TLS sessions, on its own (threat `handshake-flood`)."""

from __future__ import annotations

from tlsfront.inbound.ratelimit import TLSRateLimiter


def test_limit_per_address_over_a_sliding_minute() -> None:
    limiter = TLSRateLimiter()
    assert [limiter.allow("192.0.2.1", 3, t) for t in (0, 10, 20, 30)] == [
        True,
        True,
        True,
        False,
    ]
    assert limiter.allow("192.0.2.2", 3, 30)  # another address has its own count
    assert not limiter.allow("192.0.2.1", 3, 59.9)
    assert limiter.allow("192.0.2.1", 3, 60.0)  # the one from t=0 has left the window
    assert not limiter.allow("192.0.2.1", 3, 60.5)
    assert limiter.allow("192.0.2.1", 3, 70.0)


def test_refused_attempts_do_not_count() -> None:
    limiter = TLSRateLimiter()
    assert limiter.allow("192.0.2.1", 1, 0)
    for t in range(1, 60):
        assert not limiter.allow("192.0.2.1", 1, t)
    assert limiter.allow("192.0.2.1", 1, 60)


def test_zero_means_no_limit_and_no_memory() -> None:
    limiter = TLSRateLimiter()
    assert all(limiter.allow(f"192.0.2.{i % 7}", 0, i) for i in range(1000))
    assert len(limiter) == 0


def test_a_lowered_limit_applies_at_once() -> None:
    limiter = TLSRateLimiter()
    assert all(limiter.allow("192.0.2.1", 10, t) for t in range(5))
    assert not limiter.allow("192.0.2.1", 2, 5)  # a reload lowered it to 2
    assert not limiter.allow("192.0.2.1", 2, 30)
    assert limiter.allow("192.0.2.1", 20, 30)  # raised again: the history stays


def test_addresses_gone_quiet_are_forgotten() -> None:
    """Memory is bounded by the addresses seen in the last two windows."""
    limiter = TLSRateLimiter()
    for i in range(10_000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", 5, i / 1000)
    assert len(limiter) == 10_000
    limiter.allow("192.0.2.1", 5, 200.0)
    assert len(limiter) == 1
