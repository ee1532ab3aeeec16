"""`workers = N`: processes sharing the listening sockets; reload, stop, restart."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import trio
from support.accounts import kill_group
from support.front import capture_backend, toml_str

CONFIG = """
[defaults]
hostname = "front.example.org"
workers = 2
shutdown_grace = 5
allow_root_backend = true  # as root (CI), the capture backend stays root

[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}
"""


class Workers:
    """`tlsfront run` with workers, its stderr collected as it comes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.log = ""
        self._more = trio.Event()

    async def collect(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.log += chunk.decode()
            self._more.set()
            self._more = trio.Event()

    async def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """Until the log holds `count` matches (woken by each chunk of stderr)."""
        with trio.fail_after(30):
            while len(found := list(re.finditer(pattern, self.log))) < count:
                await self._more.wait()
        return found


def send(port: int, context: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.starttls(context=context)
        smtp.sendmail("a@example.net", ["b@example.org"], b"Subject: w\r\n\r\nhi\r\n")


async def test_workers_serve_reload_restart_and_stop(
    tmp_path: Path, tls_dir: Path, client_context: ssl.SSLContext, nursery: trio.Nursery
) -> None:
    capture = tmp_path / "capture"
    capture.mkdir()
    config = tmp_path / "tlsfront.toml"
    config.write_text(
        CONFIG.format(cert=toml_str(tls_dir / "servercert.pem"), backend=capture_backend(capture))
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tlsfront", "run", "-c", str(config)],
        stderr=subprocess.PIPE,
    )
    workers = Workers(process)
    nursery.start_soon(workers.collect)
    try:
        started = await workers.wait_for(r"worker (\d) started \(pid (\d+)\)", 2)
        pids = {int(m.group(2)) for m in started}
        listening = await workers.wait_for(r"listening on \[127\.0\.0\.1\]:(\d+)", 2)
        ports = {int(m.group(1)) for m in listening}
        assert len(ports) == 1  # both workers on the one socket the parent bound
        port = ports.pop()
        for _ in range(6):
            await trio.to_thread.run_sync(send, port, client_context)
        await workers.wait_for(r"session end: .* messages=1 ", 6)

        process.send_signal(signal.SIGHUP)
        await workers.wait_for(r"reloaded the configuration", 2)

        # a worker that dies is started again; mail still flows
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        await workers.wait_for(rf"worker \d \(pid {victim}\) died")
        await workers.wait_for(r"worker (\d) started \(pid (\d+)\)", 3)
        await trio.to_thread.run_sync(send, port, client_context)

        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
        await workers.wait_for(r"stopped", 2)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


LIMITED = """
[defaults]
hostname = "front.example.org"
workers = 2
shutdown_grace = 5
metrics_listen = "127.0.0.1:0"
allow_root_backend = true  # as root (CI), the capture backend stays root

[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}
max_per_ip = 1
"""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def _stopped(pid: int) -> None:
    """Until the kernel shows `pid` stopped (SIGSTOP takes effect at once; this confirms it)."""
    with trio.fail_after(10):
        while _state(pid) != "T":
            await trio.lowlevel.checkpoint()


async def _line(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as answer:
        text = answer.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def test_limits_and_metrics_hold_for_the_whole_server(
    tmp_path: Path, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """Two workers, `max_per_ip = 1`: a connection held by one worker makes the
    other refuse the same address; the one metrics endpoint shows both workers'
    sessions. Each worker in turn is stopped (SIGSTOP), so that the other one
    must be the one that accepts."""
    capture = tmp_path / "capture"
    capture.mkdir()
    config = tmp_path / "tlsfront.toml"
    config.write_text(
        LIMITED.format(cert=toml_str(tls_dir / "servercert.pem"), backend=capture_backend(capture))
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tlsfront", "run", "-c", str(config)],
        stderr=subprocess.PIPE,
        start_new_session=True,  # on a failure, the workers go with the parent
    )
    workers = Workers(process)
    nursery.start_soon(workers.collect)
    stopped: list[int] = []
    try:
        started = await workers.wait_for(r"worker (\d) started \(pid (\d+)\)", 2)
        pids = {int(m.group(1)): int(m.group(2)) for m in started}
        (listening,) = {
            int(m.group(1))
            for m in await workers.wait_for(r"listening on \[127\.0\.0\.1\]:(\d+)", 2)
        }
        (metrics,) = await workers.wait_for(r"metrics on http://\[127\.0\.0\.1\]:(\d+)/")
        metrics_port = int(metrics.group(1))
        assert len(re.findall(r"metrics on http", workers.log)) == 1  # worker 0 alone

        with trio.fail_after(30):
            os.kill(pids[1], signal.SIGSTOP)
            stopped.append(pids[1])
            await _stopped(pids[1])
            held = await trio.open_tcp_stream("127.0.0.1", listening)  # worker 0 takes it
            assert (await _line(held)).startswith(b"220 ")

            os.kill(pids[1], signal.SIGCONT)
            stopped.remove(pids[1])
            os.kill(pids[0], signal.SIGSTOP)
            stopped.append(pids[0])
            await _stopped(pids[0])
            second = await trio.open_tcp_stream("127.0.0.1", listening)  # worker 1 takes it
            refusal = await _line(second)
            assert refusal.startswith(b"421 4.7.0 "), refusal
            assert b"too many connections from 127.0.0.1" in refusal
            await second.aclose()
            os.kill(pids[0], signal.SIGCONT)
            stopped.remove(pids[0])

            await held.send_all(b"QUIT\r\n")
            assert (await _line(held)).startswith(b"221 ")
            await held.aclose()
            await workers.wait_for(r"session end: ")

        figures = await trio.to_thread.run_sync(_scrape, metrics_port)
        assert figures["tlsfront_metrics_workers"] == 2
        # one session ended in each worker: the endpoint shows both
        assert figures['tlsfront_sessions_total{outcome="refused",profile="smtp"}'] == 1
        ended = sum(v for k, v in figures.items() if k.startswith("tlsfront_sessions_total{"))
        assert ended == 2
        assert figures['tlsfront_active_sessions{profile="smtp"}'] == 0

        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        if process.returncode is None:
            kill_group(process)
            await process.wait()
