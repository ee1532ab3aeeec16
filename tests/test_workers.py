"""`workers = N`: processes sharing the listening sockets; reload, stop, restart."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import trio
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
