"""`python -m bench.soak --seconds N`: see the package docstring."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.soak.check import check, read_queue, summary
from bench.soak.clients import Client, Tally, Target
from bench.soak.messages import MAX_LINE
from bench.soak.stand import Figures, Stand

# How far memory and descriptors may stay above their level before the load.
RSS_SLACK_KIB = 24 * 1024
RSS_SLACK_RATIO = 0.5
FD_SLACK = 2
WARM_UP_SESSIONS = 12
# Sessions the server ends early must all be the killed worker's, ending this
# soon after the kill; any other is a defect.
KILL_WINDOW = 3.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration")
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--hup-every", type=float, default=4.0, help="mean seconds between SIGHUPs")
    parser.add_argument(
        "--dot-line-max",
        type=int,
        default=MAX_LINE,
        help="longest dot-leading body line, before stuffing (default: %(default)s)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def chaos(
    stand: Stand, rng: random.Random, seconds: float, hup_every: float
) -> tuple[list[str], float]:
    """SIGHUPs, relay-list rewrites and one worker kill, until the time is up.

    Returns notes for the report and the moment of the kill.
    """
    notes = []
    killed = 0.0
    start = time.monotonic()
    deadline = start + seconds
    kill_at = start + seconds * rng.uniform(0.3, 0.6)
    next_hup = start + rng.uniform(0.5, 1.5) * hup_every
    listed = True
    hups = rewrites = 0
    while (now := time.monotonic()) < deadline:
        if kill_at and now >= kill_at:
            index = rng.randrange(len(stand.workers()))
            killed = time.monotonic()
            took = stand.kill_worker(index)
            notes.append(f"worker {index} killed with SIGKILL, replaced in {took * 1000:.0f} ms")
            kill_at = 0
        if now >= next_hup:
            stand.hup()
            hups += 1
            next_hup = now + rng.uniform(0.5, 1.5) * hup_every
        listed = not listed
        stand.write_relay_list(listed)
        rewrites += 1
        time.sleep(min(rng.uniform(0.3, 1.5), max(0.0, deadline - time.monotonic())))
    notes.append(f"SIGHUP sent {hups} times; relay list rewritten {rewrites} times")
    return notes, killed


def run_clients(clients: list[Client], deadline: float) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=c.run, args=(deadline,), name=f"client-{c.number}", daemon=True)
        for c in clients
    ]
    for t in threads:
        t.start()
    return threads


def leaks(before: Figures, after: Figures) -> list[str]:
    problems = []
    allowed = before.rss_kib * (1 + RSS_SLACK_RATIO) + RSS_SLACK_KIB
    if after.rss_kib > allowed:
        problems.append(f"memory did not come back: {after.rss_kib} KiB > {allowed:.0f} KiB")
    if after.fds > before.fds + FD_SLACK:
        problems.append(f"descriptors did not come back: {after.fds} > {before.fds}")
    if after.processes != before.processes:
        problems.append(f"{after.processes} tlsfront processes, {before.processes} before")
    return problems


def soak(args: argparse.Namespace, directory: Path) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"soak: seed {seed}, {args.seconds:g} s, {args.clients} clients, in {directory}")
    rng = random.Random(seed)
    stand = Stand(directory)
    problems: list[str] = []
    try:
        stand.start()
        plain, with_cert = stand.client_contexts()
        target = Target(stand.ports, plain, with_cert, dot_max=args.dot_line_max)
        tally = Tally()

        # warm-up: every profile served by both workers before the first figures
        warm = Client(-1, seed, target, tally)
        for i in range(WARM_UP_SESSIONS):
            warm.session("clean", ("starttls", "implicit", "plain")[i % 3])
        stand.wait_idle(10)
        before = stand.figures()

        clients = [Client(i, seed, target, tally) for i in range(args.clients)]
        started = time.monotonic()
        threads = run_clients(clients, started + args.seconds)
        notes, killed = chaos(stand, rng, args.seconds, args.hup_every)
        for t in threads:  # each session is bounded by the client timeouts
            t.join()
        drained = time.monotonic() - started - args.seconds
        active, idle_after = stand.wait_idle(30)
        time.sleep(1.0)  # the backends' exits are reaped
        after = stand.figures()

        verdict = check(tally.sent, read_queue(stand.queue))
        sessions = sum(tally.sessions.values())
        print(f"sessions: {sessions} in {args.seconds:g} s (last ones ended {drained:.1f} s late)")
        for line in summary(verdict, tally.sessions):
            print(line)
        print(
            "replies to the final dot: "
            + ", ".join(f"{k} {n}" for k, n in sorted(tally.replies.items()))
        )
        print(
            "sessions cut short by the server, by kind: "
            + (", ".join(f"{k} {n}" for k, n in sorted(tally.cut.items())) or "none")
        )
        elsewhere = sum(1 for t in tally.cut_times if not 0 <= t - killed < KILL_WINDOW)
        print(f"  {len(tally.cut_times) - elsewhere} of them when the worker was killed")
        for reason, n in tally.cut_reasons.most_common(8):
            print(f"  {n} x {reason}")
        for note in notes:
            print(note)
        print(f"active sessions at the end: {active} (idle {idle_after:.1f} s after the clients)")
        print(
            f"memory (VmRSS, parent + workers): {before.rss_kib} KiB before, "
            f"{after.rss_kib} KiB after"
        )
        print(f"open descriptors (parent + workers): {before.fds} before, {after.fds} after")

        problems += verdict.problems
        problems += [f"hung: {h}" for h in tally.hung]
        problems += [f"client error: {e}" for e in tally.errors]
        if elsewhere:
            problems.append(f"{elsewhere} sessions cut short with no worker killed")
        if active:
            problems.append(f"{active} sessions still active")
        problems += leaks(before, after)
    finally:
        status = stand.stop()
    if status != 0:
        problems.append(f"tlsfront exited with {status} on SIGTERM")
    for problem in problems:
        print("FAIL: " + problem)
    print("soak: " + ("FAILED" if problems else "passed"))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.keep:
        return soak(args, Path(tempfile.mkdtemp(prefix="soak-")))
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        return soak(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
