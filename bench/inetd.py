"""`python -m bench.inetd`: the CPU one connection costs on the inetd path.

A qmail host's run script starts one program per connection under tcpserver.
This measures, per connection, the CPU time of:

* `qmail`: tcpserver + the backend alone, plaintext (what the host spent
  before tlsfront);
* `starter`: tcpserver + the inetd starter (tlsfront/starter.py under
  `python3 -S -E`), which hands the connection to a running `tlsfront run`
  over its handoff socket, + that daemon + the backends it starts;
* `inetd`: tcpserver + a whole `tlsfront inetd -p PROFILE` per connection.

The tlsfront rows are measured with plaintext sessions (the client does not
use STARTTLS: what tlsfront adds per connection, apart from cryptography)
and with STARTTLS sessions (a full handshake each, no resumption).

The backend is the real qmail-smtpd when it is found where the tests look
for it (tests/support/qmail.py; $TLSFRONT_QMAIL_SMTPD names it), run in a
scratch qmail home with a queue program that
reads and discards; else `bench/smtpd.pl`, a qmail-smtpd stand-in that
starts about as fast. The run script's exports (QMAILQUEUE) are tcpserver's
environment, as on a real host.

CPU comes from /proc (bench.procs.cpu_seconds): each server process with
its living descendants and its reaped children, so tcpserver is charged for
the starters (or the whole inetd processes) and the backends it ran, and the
daemon for the backends it started. Sessions run one at a time from this
process (pinned to the other cores when there are two), each one greeting,
EHLO, MAIL, RCPT, DATA with a short message, QUIT. The target: the starter
path adds at most 30 ms of CPU per connection to the qmail row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import smtplib
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.procs import Proc, cores, cpu_seconds, free_port, wait_listening

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SMTPD = HERE / "smtpd.pl"
STARTER = REPO / "tlsfront" / "starter.py"
TARGET_MS = 30.0
RCPT_DOMAIN = "bench.example"
# settles the reaping of the last children before CPU is read
SETTLE = 0.5

QUEUE = """#!/bin/sh
# reads the message (fd 0) and the envelope (fd 1) and queues nothing
cat >/dev/null && cat <&1 >/dev/null
"""


@dataclass
class Row:
    name: str
    sessions: int
    tcpserver_ms: float  # tcpserver and its children, per session
    daemon_ms: float  # the tlsfront daemon and its backends, per session
    wall_ms: float  # per session, seen by the client

    @property
    def total_ms(self) -> float:
        return self.tcpserver_ms + self.daemon_ms


def real_qmail_smtpd() -> Path | None:
    """The real qmail-smtpd where the tests look for it, when it is there."""
    named = os.environ.get("TLSFRONT_QMAIL_SMTPD")
    path = Path(named) if named else REPO.parent / "shared" / "qmail" / "qmail-smtpd"
    return path if os.access(path, os.X_OK) else None


def backend(directory: Path) -> tuple[list[str], dict[str, str], str]:
    """(argv, run-script exports, description) of the backend."""
    binary = real_qmail_smtpd()
    if binary is None:
        return ["perl", str(SMTPD)], {}, "bench/smtpd.pl (qmail-smtpd not found)"
    home = directory / "qmail"
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_text("mx.bench.example\n")
    (home / "control" / "rcpthosts").write_text(RCPT_DOMAIN + "\n")
    queue = home / "queue"
    queue.write_text(QUEUE)
    queue.chmod(0o755)
    argv = ["/bin/sh", "-c", f'cd "{home}" && exec "{binary}"']
    return argv, {"QMAILQUEUE": str(queue)}, f"qmail-smtpd ({binary})"


def start_tcpserver(
    directory: Path, cpus: set[int], program: list[str], env: dict[str, str], name: str
) -> tuple[Proc, int]:
    binary = shutil.which("tcpserver")
    if binary is None:
        raise SystemExit("tcpserver is not installed (Debian: ucspi-tcp)")
    port = free_port()
    argv = [binary, "-q", "-R", "-H", "-l", "front.bench", "-c", "100", "127.0.0.1", str(port)]
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    proc = Proc([*argv, *program], cpus, directory / f"{name}.log", env=run_env)
    wait_listening(port)
    return proc, port


def start_daemon(directory: Path, cpus: set[int], config: Path) -> Proc:
    proc = Proc(
        [sys.executable, "-m", "tlsfront", "run", "-c", str(config)],
        cpus,
        directory / "daemon.log",
        cwd=REPO,
    )
    handoff = directory / "handoff.sock"
    deadline = time.monotonic() + 60
    while not handoff.is_socket():
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tlsfront run did not start; see {proc.log}")
        time.sleep(0.05)
    return proc


def write_config(directory: Path, argv: list[str], env: dict[str, str]) -> Path:
    from tlsfront.tls.certs import make_self_signed

    cert, key = directory / "cert.pem", directory / "key.pem"
    make_self_signed("localhost", cert, key)
    env_line = ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items())
    # as root, the backend runs as root as it does under this tcpserver (no -u)
    as_root = "allow_root_backend = true\n" if os.geteuid() == 0 else ""
    config = directory / "tlsfront.toml"
    config.write_text(
        f"""[defaults]
hostname = "front.bench"
log_level = "warning"
workers = 1
handoff_socket = {json.dumps(str(directory / "handoff.sock"))}
{as_root}
[profile.smtp]
listen = ["127.0.0.1:0"]
cert = {json.dumps(str(cert))}
key = {json.dumps(str(key))}
backend = {json.dumps(argv)}
env = {{ {env_line} }}
max_connections = 100000
max_per_ip = 100000
"""
    )
    return config


def session(port: int, context: ssl.SSLContext | None) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.bench", timeout=60) as smtp:
        if context is not None:
            smtp.starttls(context=context)
        refused = smtp.sendmail(
            "a@client.bench", [f"b@{RCPT_DOMAIN}"], b"Subject: bench\r\n\r\nHello.\r\n"
        )
        assert not refused, refused


def measure(
    name: str,
    count: int,
    port: int,
    tcpserver: Proc,
    daemon: Proc | None,
    context: ssl.SSLContext | None,
    say: Callable[[str], None],
) -> Row:
    for _ in range(2):  # warm the caches and the daemon
        session(port, context)
    time.sleep(SETTLE)
    before = cpu_seconds(tcpserver.pid), cpu_seconds(daemon.pid) if daemon else 0.0
    start = time.perf_counter()
    for _ in range(count):
        session(port, context)
    wall = time.perf_counter() - start
    time.sleep(SETTLE)
    after = cpu_seconds(tcpserver.pid), cpu_seconds(daemon.pid) if daemon else 0.0
    row = Row(
        name,
        count,
        (after[0] - before[0]) / count * 1000,
        (after[1] - before[1]) / count * 1000,
        wall / count * 1000,
    )
    say(f"{name:<18} {row.total_ms:7.1f} ms CPU/connection ({row.wall_ms:.1f} ms wall)")
    return row


def run(args: argparse.Namespace, directory: Path, say: Callable[[str], None]) -> dict[str, object]:
    server_cpus, client_cpus = cores()
    os.sched_setaffinity(0, client_cpus)
    argv, exports, described = backend(directory)
    say(f"backend: {described}")
    config = write_config(directory, argv, exports)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    python = sys.executable
    starter = [python, "-S", "-E", str(STARTER), "-s", str(directory / "handoff.sock")]
    starter += ["-p", "smtp", "-c", str(config)]
    inetd = [python, "-m", "tlsfront", "inetd", "-p", "smtp", "-c", str(config)]
    rows: list[Row] = []
    procs: list[Proc] = []
    try:
        tcpserver, port = start_tcpserver(directory, server_cpus, argv, exports, "qmail")
        procs.append(tcpserver)
        rows.append(measure("qmail", args.sessions, port, tcpserver, None, None, say))
        tcpserver.stop()

        daemon = start_daemon(directory, server_cpus, config)
        procs.append(daemon)
        tcpserver, port = start_tcpserver(directory, server_cpus, starter, exports, "starter")
        procs.append(tcpserver)
        rows.append(measure("starter", args.sessions, port, tcpserver, daemon, None, say))
        rows.append(
            measure("starter+STARTTLS", args.sessions, port, tcpserver, daemon, context, say)
        )
        tcpserver.stop()
        daemon.stop()

        tcpserver, port = start_tcpserver(directory, server_cpus, inetd, exports, "inetd")
        procs.append(tcpserver)
        rows.append(measure("inetd", args.inetd_sessions, port, tcpserver, None, None, say))
        rows.append(
            measure("inetd+STARTTLS", args.inetd_sessions, port, tcpserver, None, context, say)
        )
    finally:
        for proc in procs:
            proc.stop()
    by = {row.name: row for row in rows}
    base = by["qmail"].total_ms
    added = by["starter"].total_ms - base
    return {
        "backend": described,
        "rows": [asdict(row) | {"total_ms": row.total_ms} for row in rows],
        "added_ms": added,
        "added_starttls_ms": by["starter+STARTTLS"].total_ms - base,
        "target_ms": TARGET_MS,
        "within_target": added <= TARGET_MS,
        "ratios": {
            "starter/qmail": by["starter"].total_ms / base,
            "inetd/qmail": by["inetd"].total_ms / base,
            "inetd/starter": by["inetd"].total_ms / by["starter"].total_ms,
        },
    }


def report(result: dict[str, object]) -> str:
    rows = result["rows"]
    assert isinstance(rows, list)
    lines = [
        f"backend: {result['backend']}",
        "",
        "| path | sessions | tcpserver + children | daemon + backends | CPU/connection | wall |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['sessions']} | {row['tcpserver_ms']:.1f} ms"
            f" | {row['daemon_ms']:.1f} ms | {row['total_ms']:.1f} ms | {row['wall_ms']:.1f} ms |"
        )
    ratios = result["ratios"]
    assert isinstance(ratios, dict)
    lines.append("")
    lines += [f"{name}: {value:.1f}x" for name, value in ratios.items()]
    verdict = "within" if result["within_target"] else "OVER"
    lines.append(
        f"the starter path adds {result['added_ms']:.1f} ms of CPU per connection "
        f"({result['added_starttls_ms']:.1f} ms with STARTTLS): {verdict} the "
        f"{result['target_ms']:.0f} ms target"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.inetd", description=__doc__)
    parser.add_argument("--sessions", type=int, default=200, help="per qmail/starter row")
    parser.add_argument("--inetd-sessions", type=int, default=30, help="per inetd row")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-inetd-") as tmp:
        result = run(args, Path(tmp), lambda text: print(text, file=sys.stderr, flush=True))
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
