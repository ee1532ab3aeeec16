"""The soak: its checker catches every kind of loss, and a 45-second run passes."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import pytest

from bench.soak.check import Queued, Sent, check
from bench.soak.messages import MAX_LINE, Pool, make_message

SEED = 16
SECONDS = 45


def good() -> tuple[list[Sent], list[Queued]]:
    sent = [
        Sent("a", "d-a", "acked"),
        Sent("b", "d-b", "abandoned"),
        Sent("c", "d-c", "unsure"),
        Sent("d", "d-d", "unsure"),
        Sent("e", "d-e", "refused", doomed=True),
    ]
    return sent, [Queued("a", "d-a"), Queued("c", "d-c")]


def test_a_sound_run_passes() -> None:
    verdict = check(*good())
    assert verdict.ok, verdict.problems
    assert verdict.queued == 2
    assert verdict.unsure_queued == 1


@pytest.mark.parametrize(
    ("queued", "problem"),
    [
        ([Queued("c", "d-c")], "a: the client saw 250 but it was not queued"),
        ([Queued("a", "d-a"), Queued("a", "d-a")], "a: queued 2 times"),
        ([Queued("a", "other")], "a: queued with a body that differs"),
        ([Queued("a", "d-a"), Queued("b", "d-b")], "b: abandoned before the final dot but queued"),
        ([Queued("a", "d-a"), Queued("c", "d-c"), Queued("c", "d-c")], "c: queued 2 times"),
        ([Queued("a", "d-a"), Queued("e", "d-e")], "e: queued although the backend died"),
        ([Queued("a", "d-a"), Queued("z", "d-z")], "z: queued but no client sent it"),
        ([Queued("a", "d-a"), Queued(None, "x")], "without X-Soak-Id"),
    ],
)
def test_the_checker_reports_each_kind_of_loss(queued: list[Queued], problem: str) -> None:
    sent, _ = good()
    verdict = check(sent, queued)
    assert not verdict.ok
    assert any(problem in p for p in verdict.problems), verdict.problems


def test_a_valid_message_refused_is_a_failure() -> None:
    verdict = check([Sent("a", "d-a", "refused", reply="554 no")], [])
    assert verdict.problems == ["a: a valid message was refused: 554 no"]


def test_the_wire_form_unstuffs_to_what_the_digest_covers() -> None:
    rng = random.Random(1)
    pool = Pool(rng)
    for n in range(20):
        msg = make_message(rng, pool, f"m{n}", rng.randint(200, 50_000))
        lines = msg.wire.split(b"\r\n")
        assert lines[-2:] == [b".", b""]
        assert all(len(line) <= MAX_LINE + 1 for line in lines)
        stored = b"".join((line[1:] if line[:1] == b"." else line) + b"\n" for line in lines[:-2])
        assert hashlib.sha256(stored).hexdigest() == msg.sha256
        assert stored.startswith(b"X-Soak-Id: m%d\n" % n)


@pytest.mark.timeout(SECONDS + 150)
def test_the_soak_passes() -> None:
    command = [sys.executable, "-m", "bench.soak", "--seconds", str(SECONDS), "--seed", str(SEED)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS + 120)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "soak: passed" in result.stdout
    assert "killed with SIGKILL, replaced in" in result.stdout
