"""`python -m bench`: tlsfront against nginx's mail proxy and stunnel, in one run.

Theory of operation
-------------------
Everything runs on this machine over loopback. The servers under test
(tlsfront, nginx, stunnel; tcpserver for the exec backend) are pinned to the
first core; the load generator, the sink backend and nginx's auth_http
responder to the others. Every figure a target is judged by comes from the
same run as the figures it is compared with, measured in turns (for each
concurrency, each target in turn), so that drift on the machine hits all of
them alike.

Phases, each optional:

1. idle memory: on fresh servers (after a short warm-up), N idle TLS
   sessions (STARTTLS done, EHLO answered); the server's RSS delta / N;
2. the concurrency sweep: full sessions at each concurrency, per mode;
3. resumed sessions, at one concurrency;
4. bulk: large messages, several per session;
5. the exec backend: tlsfront starting a program per session (at MAIL, on
   demand) against tcpserver starting the same program, in plaintext.

The load generator reports its own CPU use; a client above ~90 % of its
core means that figure measured the client, and the report flags it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.loadgen import Spec
from bench.procs import Proc, cores, cpu_seconds, rss_bytes
from bench.report import write_report
from bench.targets import (
    SMTPD,
    Target,
    baseline,
    machine,
    start_nginx,
    start_sink,
    start_stunnel,
    start_tcpserver,
    start_tlsfront,
    versions,
)

CLIENT_BUSY = 0.9  # client CPU share above which a figure is flagged


@dataclass
class Measure:
    phase: str  # sweep, resumed, bulk, exec
    target: str
    mode: str  # the client's mode: plain, starttls, implicit
    concurrency: int
    size: int
    messages: int
    resume: bool
    sessions: int
    sessions_s: float
    messages_s: float
    mb_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms: float  # server CPU per session (for plaintext: the sink's)
    server_cpu_share: float  # of one core
    client_cpu_share: float
    errors: int
    resumed_share: float
    error_samples: list[str]


@dataclass
class Idle:
    target: str
    mode: str
    sessions: int
    rss_before: int
    rss_after: int

    @property
    def per_session(self) -> float:
        return (self.rss_after - self.rss_before) / max(1, self.sessions)


class Bench:
    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args = args
        self.dir = directory
        self.server_cpus, self.client_cpus = cores()
        self.measures: list[Measure] = []
        self.idle: list[Idle] = []

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _loadgen(self, spec: Spec, stdin: int | None = subprocess.DEVNULL) -> Proc:
        return Proc(
            [sys.executable, "-m", "bench.loadgen", json.dumps(asdict(spec))],
            self.client_cpus,
            self.dir / "loadgen.log",
            stdout=subprocess.PIPE,
            stdin=stdin,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def measure(
        self,
        phase: str,
        target: Target,
        mode: str,
        concurrency: int,
        *,
        size: int | None = None,
        messages: int = 1,
        resume: bool = False,
        duration: float | None = None,
    ) -> Measure:
        a = self.args
        spec = Spec(
            host="127.0.0.1",
            port=target.ports[mode],
            mode=mode,
            concurrency=concurrency,
            size=a.size if size is None else size,
            messages=messages,
            resume=resume,
            duration=a.duration if duration is None else duration,
            warmup=a.warmup,
        )
        proc = self._loadgen(spec)
        assert proc.popen.stdout is not None
        cpu = {}
        result: dict[str, object] = {}
        for raw in proc.popen.stdout:
            line = raw.decode().strip()
            if line in ("measuring", "done"):
                cpu[line] = cpu_seconds(target.proc.pid)
            elif line.startswith("{"):
                result = json.loads(line)
        proc.stop()
        if not result or len(cpu) < 2:
            raise RuntimeError(f"load generator failed; see {self.dir / 'loadgen.log'}")
        wall = float(str(result["wall"]))
        sessions = int(str(result["sessions"]))
        server_cpu = cpu["done"] - cpu["measuring"]
        tls_sessions = int(str(result["tls_sessions"]))
        samples = result["error_samples"]
        m = Measure(
            phase=phase,
            target=target.name,
            mode=mode,
            concurrency=concurrency,
            size=spec.size,
            messages=messages,
            resume=resume,
            sessions=sessions,
            sessions_s=sessions / wall,
            messages_s=int(str(result["messages"])) / wall,
            mb_s=int(str(result["body_bytes"])) / wall / 1e6,
            p50_ms=float(str(result["p50"])) * 1000,
            p99_ms=float(str(result["p99"])) * 1000,
            server_cpu_ms=server_cpu / sessions * 1000 if sessions else 0.0,
            server_cpu_share=server_cpu / wall,
            client_cpu_share=float(str(result["cpu"])) / wall,
            errors=int(str(result["errors"])),
            resumed_share=int(str(result["resumed"])) / tls_sessions if tls_sessions else 0.0,
            error_samples=list(samples) if isinstance(samples, list) else [],
        )
        flag = "  CLIENT-BOUND" if m.client_cpu_share > CLIENT_BUSY else ""
        self.say(
            f"  {phase:8} {target.name:10} {mode:8} c={concurrency:<4} "
            f"{m.sessions_s:8.1f} sess/s {m.mb_s:7.2f} MB/s p50 {m.p50_ms:7.1f} ms "
            f"p99 {m.p99_ms:7.1f} ms server {m.server_cpu_ms:5.2f} ms/sess "
            f"({m.server_cpu_share:4.0%}) client {m.client_cpu_share:4.0%} "
            f"errors {m.errors}{flag}"
        )
        if m.errors:
            self.say(f"    e.g. {m.error_samples[:2]}")
        self.measures.append(m)
        return m

    def idle_memory(self, target: Target, mode: str, count: int) -> Idle:
        spec = Spec(
            host="127.0.0.1", port=target.ports[mode], mode=mode, concurrency=count, idle=True
        )
        before = rss_bytes(target.proc.pid)
        proc = self._loadgen(spec, stdin=subprocess.PIPE)
        assert proc.popen.stdout is not None
        assert proc.popen.stdin is not None
        after = before
        result: dict[str, object] = {}
        for raw in proc.popen.stdout:
            line = raw.decode().strip()
            if line == "ready":
                # let the server settle (buffers drained, tasks parked)
                time.sleep(min(1.0, self.args.duration))
                after = rss_bytes(target.proc.pid)
                proc.popen.stdin.write(b"\n")
                proc.popen.stdin.flush()
            elif line.startswith("{"):
                result = json.loads(line)
        proc.popen.stdin.close()
        proc.stop()
        idle = Idle(target.name, mode, int(str(result.get("sessions", 0))), before, after)
        self.say(
            f"  idle     {target.name:10} {mode:8} n={idle.sessions:<5} "
            f"{idle.per_session / 1024:6.1f} kB per idle TLS session "
            f"(RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB)"
        )
        self.idle.append(idle)
        time.sleep(0.5)
        return idle

    # -- the run -------------------------------------------------------------

    def run(self) -> Path:
        a = self.args
        from tlsfront.tls.certs import make_self_signed

        cert, key = self.dir / "cert.pem", self.dir / "key.pem"
        make_self_signed("localhost", cert, key)
        sink = start_sink(self.dir, self.client_cpus)
        targets: list[Target] = []
        exec_targets: list[Target] = []
        try:
            wanted = set(a.targets)
            if "tlsfront" in wanted:
                targets.append(
                    start_tlsfront(
                        self.dir,
                        self.server_cpus,
                        cert,
                        key,
                        backend_connect=f"127.0.0.1:{sink.smtp}",
                        log_level=a.log_level,
                    )
                )
            for name, starter in (("nginx", start_nginx), ("stunnel", start_stunnel)):
                if name in wanted:
                    found = starter(self.dir, self.server_cpus, cert, key, sink)
                    if found is None:
                        self.say(f"{name}: not installed (or did not start); skipped")
                    else:
                        targets.append(found)
            plain = baseline(sink)
            self.say(
                f"server cores {sorted(self.server_cpus)}, client cores "
                f"{sorted(self.client_cpus)}; results in {a.out}"
            )

            for target in targets:  # warm-up: imports, caches, first allocations
                self.measure("warmup", target, _modes(target)[0], 4, duration=min(1.0, a.duration))
            self.measures.clear()
            if a.idle:
                for target in targets:
                    self.idle_memory(target, _modes(target)[0], a.idle)
            for mode in a.modes:
                for concurrency in a.concurrency:
                    if mode == a.modes[0]:
                        self.measure("sweep", plain, "plain", concurrency)
                    for target in targets:
                        if mode in target.ports:
                            self.measure("sweep", target, mode, concurrency)
            if a.resume:
                for mode in a.modes:
                    for target in targets:
                        if mode in target.ports:
                            self.measure("resumed", target, mode, a.resume, resume=True)
            if a.bulk_size:
                for target in [plain, *targets]:
                    mode = "plain" if target is plain else _modes(target)[0]
                    self.measure(
                        "bulk",
                        target,
                        mode,
                        a.bulk_concurrency,
                        size=a.bulk_size,
                        messages=a.bulk_messages,
                    )
            for target in targets:
                target.stop()
            targets = []
            if a.exec:
                exec_targets = self.exec_phase()
        finally:
            for target in targets + exec_targets:
                target.stop()
            sink.proc.stop()
        return write_report(
            a.out,
            measures=[asdict(m) for m in self.measures],
            idle=[{**asdict(i), "per_session": i.per_session} for i in self.idle],
            settings=self.settings(),
        )

    def exec_phase(self) -> list[Target]:
        a = self.args
        started: list[Target] = []
        for label in a.exec:
            if label == "perl":
                program = ["perl", str(SMTPD)]
            else:
                maildir = self.dir / "maildir"
                program = [sys.executable, "-m", "tlsfront.sink", "--maildir", str(maildir)]
            cert, key = self.dir / "cert.pem", self.dir / "key.pem"
            front = start_tlsfront(
                self.dir,
                self.server_cpus,
                cert,
                key,
                backend=program,
                modes=("plain", "starttls", "implicit"),
                log_level=a.log_level,
                name=f"tlsfront-exec-{label}",
            )
            front.name = f"tlsfront+{label}"
            started.append(front)
            tcpserver = start_tcpserver(self.dir, self.server_cpus, program)
            if tcpserver is None:
                self.say("tcpserver: not installed; exec comparison skipped")
                return started
            tcpserver.name = f"tcpserver+{label}"
            started.append(tcpserver)
            self.measure("warmup", front, "plain", 4, duration=min(1.0, a.duration))
            self.measures.pop()
            for _ in range(a.exec_rounds):
                self.measure("exec", tcpserver, "plain", a.exec_concurrency)
                for mode in ("plain", "starttls", "implicit"):
                    self.measure("exec", front, mode, a.exec_concurrency)
            front.stop()
            tcpserver.stop()
        return started

    def settings(self) -> dict[str, object]:
        a = self.args
        return {
            "machine": machine(),
            "versions": versions(),
            "server_cores": sorted(self.server_cpus),
            "client_cores": sorted(self.client_cpus),
            "duration": a.duration,
            "warmup": a.warmup,
            "size": a.size,
            "bulk": [a.bulk_size, a.bulk_concurrency, a.bulk_messages],
            "idle": a.idle,
            "log_level": a.log_level,
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
        }


def _modes(target: Target) -> list[str]:
    return [m for m in ("starttls", "implicit", "plain") if m in target.ports]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark tlsfront against nginx's mail proxy and stunnel on loopback.",
    )
    p.add_argument(
        "--targets",
        type=lambda s: s.split(","),
        default=["tlsfront", "nginx", "stunnel"],
        help="comma-separated: tlsfront,nginx,stunnel (default: all installed)",
    )
    p.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=["starttls", "implicit"],
        help="client modes to sweep: starttls,implicit",
    )
    p.add_argument(
        "--concurrency",
        type=_ints,
        default=[1, 8, 32, 128, 512],
        help="concurrent sessions to sweep (default 1,8,32,128,512)",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--size", type=int, default=10240, help="message size in bytes")
    p.add_argument(
        "--resume",
        type=int,
        default=128,
        metavar="C",
        help="measure resumed TLS sessions at concurrency C (0: skip)",
    )
    p.add_argument("--bulk-size", type=int, default=1 << 20, help="bulk message size (0: skip)")
    p.add_argument("--bulk-concurrency", type=int, default=4)
    p.add_argument("--bulk-messages", type=int, default=50, help="bulk messages per session")
    p.add_argument(
        "--idle",
        type=int,
        default=2000,
        metavar="N",
        help="idle TLS sessions for the memory figure (0: skip)",
    )
    p.add_argument(
        "--exec",
        type=lambda s: [x for x in s.split(",") if x],
        default=["perl", "sink"],
        help="exec-backend comparison with: perl (bench/smtpd.pl), sink "
        "(python -m tlsfront.sink); comma-separated, empty to skip",
    )
    p.add_argument("--exec-concurrency", type=int, default=16)
    p.add_argument("--exec-rounds", type=int, default=1)
    p.add_argument("--log-level", default="warning", help="tlsfront's log_level")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/out"),
        help="directory for results.md, results.json, sessions.png",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: c=1,8, 1 s each, 50 idle sessions, small bulk",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.concurrency, args.duration, args.warmup = [1, 8], 1.0, 0.3
        args.idle, args.resume, args.bulk_size, args.bulk_messages = 50, 8, 65536, 2
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tlsfront-bench-") as tmp:
        report = Bench(args, Path(tmp)).run()
    print(report.read_text())
    return 0
