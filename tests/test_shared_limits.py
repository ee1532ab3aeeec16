"""tlsfront.inbound.sharedlimits: the connection counters all workers share."""

from __future__ import annotations

import os
import random
from collections import Counter

from tlsfront.inbound.sharedlimits import SharedLimits


def test_counts_agree_with_a_plain_counter_through_churn() -> None:
    """Thousands of admits and releases over a small table: collisions, wrap-
    around and removal by shifting back all happen; the counts stay exact."""
    limits = SharedLimits(["smtp", "smtps"], workers=3, capacity=40)
    rng = random.Random(15)
    model: Counter[tuple[str, str, int]] = Counter()
    ips = [f"192.0.2.{i}" for i in range(30)] + [f"2001:db8::{i:x}" for i in range(30)]
    for _ in range(20_000):
        profile = rng.choice(["smtp", "smtps"])
        ip = rng.choice(ips)
        limits.worker = rng.randrange(3)
        held = [k for k in model if model[k] and k[2] == limits.worker]
        if held and rng.random() < 0.5:
            profile, ip, _ = key = rng.choice(held)
            limits.release(profile, ip)
            model[key] -= 1
            continue
        total = sum(n for (p, _, _), n in model.items() if p == profile)
        from_ip = sum(n for (p, i, _), n in model.items() if (p, i) == (profile, ip))
        refusal = limits.admit(profile, ip, max_connections=35, max_per_ip=3)
        if total >= 35:
            assert refusal == "too many connections"
        elif from_ip >= 3:
            assert refusal == f"too many connections from {ip}"
        else:
            assert refusal is None
            model[profile, ip, limits.worker] += 1
        for name in ("smtp", "smtps"):
            assert limits.active(name) == sum(n for (p, _, _), n in model.items() if p == name)
        assert limits.from_ip(profile, ip) == sum(
            n for (p, i, _), n in model.items() if (p, i) == (profile, ip)
        )
    for (profile, ip, worker), n in model.items():
        limits.worker = worker
        for _ in range(n):
            limits.release(profile, ip)
    assert all(limits.from_ip("smtp", ip) == 0 for ip in ips)
    assert limits.active("smtp") == limits.active("smtps") == 0
    assert limits.admit("smtp", ips[0], 35, 3) is None  # still usable


def test_a_dead_workers_connections_are_forgotten() -> None:
    limits = SharedLimits(["smtp"], workers=2, capacity=10)
    limits.worker = 1
    for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
        assert limits.admit("smtp", ip, 10, 2) is None
    limits.worker = 0
    assert limits.admit("smtp", "192.0.2.1", 10, 2) == "too many connections from 192.0.2.1"
    assert limits.admit("smtp", "192.0.2.2", 10, 2) is None
    limits.forget_worker(1)
    assert limits.active("smtp") == 1
    assert limits.from_ip("smtp", "192.0.2.1") == 0
    assert limits.from_ip("smtp", "192.0.2.2") == 1
    assert limits.admit("smtp", "192.0.2.1", 10, 2) is None


def test_a_forked_process_counts_in_the_same_table() -> None:
    """What a worker (a child made by fork) admits, every other process sees."""
    limits = SharedLimits(["smtp"], workers=2, capacity=10)
    pid = os.fork()
    if pid == 0:  # the child: worker 1
        limits.worker = 1
        os._exit(0 if limits.admit("smtp", "198.51.100.7", 10, 1) is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert limits.from_ip("smtp", "198.51.100.7") == 1
    assert limits.admit("smtp", "198.51.100.7", 10, 1) == ("too many connections from 198.51.100.7")


def test_a_full_table_refuses_rather_than_overflows() -> None:
    limits = SharedLimits(["smtp"], workers=1, capacity=1)  # the smallest table: 64 slots
    admitted = sum(limits.admit("smtp", f"10.0.0.{i}", 0, 0) is None for i in range(100))
    assert admitted == 64
    assert limits.admit("smtp", "10.0.1.1", 0, 0) == "too many connections"
