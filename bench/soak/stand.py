"""The soak's server: a real `tlsfront run` with two workers, and its figures.

Everything lives in one temporary directory: the certificates (made by
`tlsfront cert`), the configuration, the relay list, the backend's queue and
the server's log. Ports are picked free on 127.0.0.1 beforehand; the metrics
port p serves worker 0 and p + 1 worker 1, so both must be free.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.soak import backend

WORKERS = 2
CLIENT_EMAIL = "soak@example.net"
_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def free_port(count: int = 1) -> int:
    """A port p on 127.0.0.1 such that p .. p+count-1 are all free just now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
            held = []
            try:
                for k in range(1, count):
                    extra = socket.socket()
                    held.append(extra)
                    extra.bind(("127.0.0.1", base + k))
                return base
            except OSError:
                continue
            finally:
                for s in held:
                    s.close()
    raise RuntimeError("no free ports")


def _toml(value: object) -> str:
    return json.dumps(str(value))


@dataclass
class Figures:
    rss_kib: int
    fds: int
    processes: int


class Stand:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.queue = directory / "queue"
        self.queue.mkdir()
        self.certs = directory / "certs"
        self.log_path = directory / "tlsfront.log"
        self.relay_list = directory / "tlsclients"
        self.ports = {name: free_port() for name in ("starttls", "implicit", "plain")}
        self.metrics_port = free_port(WORKERS)
        self.process: subprocess.Popen[bytes] | None = None

    # --- set-up --------------------------------------------------------------

    def make_certificates(self) -> None:
        tool = [sys.executable, "-m", "tlsfront", "cert"]
        for args in (
            ["ca"],
            ["server", "--name", "localhost"],
            ["client", "--email", CLIENT_EMAIL],
        ):
            subprocess.run(
                [*tool, *args, "--dir", str(self.certs)], check=True, stdout=subprocess.DEVNULL
            )

    def client_contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        plain = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        plain.check_hostname = False  # the soak connects by address
        with_cert = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        with_cert.check_hostname = False
        with_cert.load_cert_chain(self.certs / f"client-{CLIENT_EMAIL}.pem")
        return plain, with_cert

    def write_relay_list(self, listed: bool) -> None:
        """The relay list, rewritten in place (as an editor would)."""
        text = f"# soak\n{CLIENT_EMAIL}\n" if listed else "# soak: nobody\n"
        self.relay_list.write_text(text)

    def write_config(self) -> Path:
        argv = [sys.executable, backend.__file__, "--queue", self.queue]
        argv += ["--rcpthost", "example.org"]
        lines = [
            "[defaults]",
            'hostname = "soak.example.org"',
            f"workers = {WORKERS}",
            "shutdown_grace = 5",
            "allow_root_backend = true",  # run as root, the stand-in backend stays root
            f'metrics_listen = "127.0.0.1:{self.metrics_port}"',
            "backend = [" + ", ".join(_toml(a) for a in argv) + "]",
            "timeout_handshake = 20",
            "timeout_command = 30",
            "timeout_data = 30",
        ]
        for name, port in self.ports.items():
            tls = "none" if name == "plain" else name
            lines += ["", f"[profile.{name}]", f'listen = ["127.0.0.1:{port}"]', f'tls = "{tls}"']
            if name != "plain":
                lines += [
                    f"cert = {_toml(self.certs / 'server.pem')}",
                    'client_cert = "request"',
                    f"client_ca = {_toml(self.certs / 'ca.pem')}",
                    f"relay_clients = {_toml(self.relay_list)}",
                ]
        path = self.dir / "tlsfront.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    # --- the process ---------------------------------------------------------

    def start(self) -> None:
        self.make_certificates()
        self.write_relay_list(True)
        config = self.write_config()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tlsfront", "run", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while len(re.findall(r"listening on", self.log())) < WORKERS * len(self.ports):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tlsfront did not start:\n" + self.log()[-3000:])
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> dict[int, int]:
        """Worker index -> pid of its latest start."""
        return {int(m.group(1)): int(m.group(2)) for m in _STARTED.finditer(self.log())}

    def hup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    def kill_worker(self, index: int) -> float:
        """SIGKILL to worker ``index``; seconds until its replacement started."""
        victim = self.workers()[index]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + 10
        while self.workers().get(index) == victim:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {index} (pid {victim}) was not replaced")
            time.sleep(0.005)
        return time.monotonic() - killed

    def active_sessions(self) -> int:
        """Sessions in progress, from the one endpoint that sums every worker's."""
        total = 0
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        for line in text.splitlines():
            if line.startswith("tlsfront_active_sessions{"):
                total += int(float(line.rsplit(" ", 1)[1]))
        return total

    def wait_idle(self, timeout: float) -> tuple[int, float]:
        """Until no session is active; the last count seen and the seconds it took."""
        start = time.monotonic()
        while (active := self.active_sessions()) and time.monotonic() - start < timeout:
            time.sleep(0.1)
        return active, time.monotonic() - start

    def figures(self) -> Figures:
        """Memory and descriptors of the parent and its workers (not the backends)."""
        pids = [self.pid, *self.workers().values()]
        rss = fds = alive = 0
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                count = len(os.listdir(f"/proc/{pid}/fd"))
            except FileNotFoundError:
                continue  # a worker that was killed
            alive += 1
            fds += count
            match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            rss += int(match.group(1)) if match else 0
        return Figures(rss, fds, alive)

    def stop(self) -> int | None:
        """SIGTERM, then the exit status (None if it had to be killed)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None
