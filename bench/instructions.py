"""Instructions per session under callgrind: a figure the machine's noise does not move.

    python -m bench.instructions [--modes starttls,implicit] [--seconds 10] [--out DIR]
                                 [--size BYTES] [--messages N] [--targets tlsfront,nginx]
                                 [--concurrency N]
                                 [--backend tcp|exec]

CPU time per session is what the targets are judged by, but on a small or
shared machine it moves by tens of percent from one run to the next.
Valgrind's callgrind counts the instructions a server executes in user
space, which hardly changes between runs, so two versions of tlsfront, or
tlsfront and nginx, can be compared to a few percent.

Each server runs alone under callgrind with counting off; after a warm-up
(two seconds of sessions, uncounted) counting is switched on for `--seconds`
of full sessions at concurrency 1 (or `--concurrency`), then off.
Instructions / sessions is the figure (the sessions in flight at the end are
counted as half each). Above concurrency 1 the count includes what grows
with the number of sessions held at once: the garbage collector's passes
over them, and fewer scheduler passes per session as events come in batches.

`--backend exec` runs tlsfront alone with the exec backend
(`perl bench/smtpd.pl`, a process per session with mail) instead of the
TCP sink: the programs run outside callgrind, so the count is what
tlsfront itself pays per session for starting, feeding and reaping one
(mode `plain` too, without TLS).

What it does not see: the kernel's work (system calls, TCP on loopback),
which is a larger share of nginx's time than of tlsfront's, so the ratio
here is somewhat kinder to nginx than CPU time is. Use it to follow
tlsfront's own cost and the distance to nginx, beside the CPU-time figures
of `python -m bench`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import objects
from bench.loadgen import Spec
from bench.targets import (
    HERE,
    SMTPD,
    Sink,
    Target,
    start_nginx,
    start_sink,
    start_tlsfront,
    versions,
)
from tlsfront.tls.certs import make_self_signed

CALLGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=False)


def _sessions(spec: Spec) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", json.dumps(spec.__dict__)],
        capture_output=True,
        text=True,
        cwd=HERE.parent,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


def count(
    target: Target,
    mode: str,
    seconds: float,
    out: Path,
    size: int = 10240,
    messages: int = 1,
    concurrency: int = 1,
) -> tuple[float, int]:
    """(instructions per session, sessions) for one server and client mode.

    `size` and `messages`: each session's messages (large ones: the body path's
    instructions per MB, which is the per-session figure over size x messages).
    """
    pid = target.proc.pid
    spec = Spec(
        "127.0.0.1",
        target.ports[mode],
        mode,
        size=size,
        messages=messages,
        concurrency=concurrency,
        duration=2.0,
        warmup=0.0,
        timeout=120,
    )
    _sessions(spec)  # warm-up: caches, imports, the first handshakes
    _control(pid, "-i", "on")
    spec.duration = seconds
    result = _sessions(spec)
    _control(pid, "-i", "off")
    _control(pid, "-d")  # writes the counts so far
    sessions = int(str(result["sessions"]))
    errors = int(str(result["errors"]))
    if errors or not sessions:
        raise RuntimeError(f"{target.name} {mode}: {sessions} sessions, {errors} errors")
    total = 0
    for name in glob.glob(str(out) + "*"):
        for line in Path(name).read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total / (sessions + concurrency / 2), sessions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="starttls,implicit")
    parser.add_argument("--seconds", type=float, default=10.0, help="counted seconds per point")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--size", type=int, default=10240, help="message bytes")
    parser.add_argument("--messages", type=int, default=1, help="messages per session")
    parser.add_argument("--targets", default="tlsfront,nginx")
    parser.add_argument("--concurrency", type=int, default=1, help="sessions at once")
    parser.add_argument(
        "--backend",
        choices=("tcp", "exec"),
        default="tcp",
        help="tlsfront's backend: the TCP sink, or perl bench/smtpd.pl per session (tlsfront only)",
    )
    args = parser.parse_args(argv)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    rows: list[tuple[str, str, float, int]] = []
    parts: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tlsfront-instr-") as tmp:
        directory = Path(tmp)
        cert, key = directory / "cert.pem", directory / "key.pem"
        make_self_signed("localhost", cert, key)
        cpus = os.sched_getaffinity(0)  # counts do not depend on where it runs
        sink: Sink = start_sink(directory, cpus)
        try:
            names = [t for t in args.targets.split(",") if t in ("tlsfront", "nginx")]
            if args.backend == "exec":
                names = [t for t in names if t == "tlsfront"]
            for name in names:
                out = directory / f"{name}.callgrind"
                wrap = [*CALLGRIND, f"--callgrind-out-file={out}"]
                if name == "tlsfront" and args.backend == "exec":
                    target: Target | None = start_tlsfront(
                        directory,
                        cpus,
                        cert,
                        key,
                        backend=["perl", str(SMTPD)],
                        modes=tuple(modes),
                        wrap=wrap,
                    )
                elif name == "tlsfront":
                    target = start_tlsfront(
                        directory,
                        cpus,
                        cert,
                        key,
                        backend_connect=f"127.0.0.1:{sink.smtp}",
                        modes=tuple(modes),
                        wrap=wrap,
                    )
                else:
                    target = start_nginx(directory, cpus, cert, key, sink, wrap=wrap)
                if target is None:
                    print(f"{name}: not installed, skipped", file=sys.stderr)
                    continue
                try:
                    for mode in [m for m in modes if m in target.ports]:
                        for old in glob.glob(str(out) + "*"):
                            Path(old).unlink()
                        per_session, sessions = count(
                            target,
                            mode,
                            args.seconds,
                            out,
                            args.size,
                            args.messages,
                            args.concurrency,
                        )
                        rows.append((name, mode, per_session, sessions))
                        parts[name, mode] = objects.breakdown(out, sessions + args.concurrency / 2)
                        mb = args.size * args.messages / 1e6
                        print(
                            f"{name:9} {mode:9} {per_session / 1e6:6.2f} M instructions/session "
                            f"({sessions} sessions; {per_session / mb / 1e6:.2f} M per MB "
                            f"of message)",
                            flush=True,
                        )
                finally:
                    target.stop()
        finally:
            sink.proc.stop()
    report = markdown(rows, args.backend) + "\n" + "\n".join(objects.markdown(parts))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "instructions.md").write_text(report)
    print(report)
    return 0


def markdown(rows: list[tuple[str, str, float, int]], backend: str = "tcp") -> str:
    v = versions()
    openssl = v.get("pyOpenSSL's OpenSSL", "?")
    lines = [
        "# Instructions per session (callgrind, user space)",
        "",
        f"- tlsfront's OpenSSL: {openssl}; nginx: {v.get('nginx', 'not run')}",
    ]
    if backend == "exec":
        lines.append("- tlsfront's backend: perl bench/smtpd.pl per session (not counted)")
    lines += [
        "",
        "| mode | tlsfront | nginx | ratio tlsfront/nginx |",
        "|---|---|---|---|",
    ]
    by = {(name, mode): per for name, mode, per, _ in rows}
    for mode in dict.fromkeys(mode for _, mode, _, _ in rows):
        ours, theirs = by.get(("tlsfront", mode)), by.get(("nginx", mode))
        ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
        cell = [f"{x / 1e6:.2f} M" if x else "-" for x in (ours, theirs)]
        lines.append(f"| {mode} | {cell[0]} | {cell[1]} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
