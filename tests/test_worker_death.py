"""A worker killed outright: its clients are closed at once, a new worker serves."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio
from support.front import capture_backend

from bench.soak.stand import free_port

CONFIG = """
[defaults]
hostname = "front.example.org"
workers = 2
shutdown_grace = 5
allow_root_backend = true  # as root (CI), the capture backend stays root

[profile.plain]
listen = ["127.0.0.1:{port}"]
tls = "none"
backend = {backend}
"""


class Log:
    """The server's stderr, collected as it comes."""

    def __init__(self) -> None:
        self.text = ""
        self._more = trio.Event()

    async def collect(self, process: trio.Process) -> None:
        assert process.stderr is not None
        async for chunk in process.stderr:
            self.text += chunk.decode()
            self._more.set()
            self._more = trio.Event()

    async def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        with trio.fail_after(30):
            while len(found := list(re.finditer(pattern, self.text))) < count:
                await self._more.wait()
        return found


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def reply(self) -> bytes:
        while not re.search(rb"(^|\n)\d{3} [^\n]*\n", self.buf):
            data = await self.stream.receive_some()
            assert data, f"EOF after {self.buf!r}"
            self.buf += data
        reply, self.buf = self.buf, b""
        return reply

    async def command(self, line: bytes, code: bytes) -> None:
        await self.stream.send_all(line + b"\r\n")
        assert (await self.reply()).split(b"\n")[-2].startswith(code)


async def open_session(port: int) -> Client:
    client = Client(await trio.open_tcp_stream("127.0.0.1", port))
    assert (await client.reply()).startswith(b"220")
    await client.command(b"EHLO client.example.net", b"250")
    return client


def backend_parent(capture: Path, marker: bytes) -> int:
    """The pid of the worker whose backend has read ``marker`` (as recorded)."""
    for path in capture.glob("session-*.json"):
        record = json.loads(path.read_text())
        if marker in base64.b64decode(record["stdin"]):
            status = Path(f"/proc/{record['pid']}/status").read_text()
            match = re.search(r"^PPid:\s+(\d+)", status, re.M)
            assert match is not None
            return int(match.group(1))
    raise LookupError(marker)


async def test_killed_worker_closes_its_clients_and_is_replaced(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    capture = tmp_path / "capture"
    capture.mkdir()
    port = free_port()
    config = tmp_path / "tlsfront.toml"
    config.write_text(CONFIG.format(port=port, backend=capture_backend(capture)))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tlsfront", "run", "-c", str(config)], stderr=subprocess.PIPE
    )
    log = Log()
    nursery.start_soon(log.collect, process)
    try:
        await log.wait_for(r"listening on", 2)

        # a client in the middle of a body
        client = await open_session(port)
        await client.command(b"MAIL FROM:<a@example.net>", b"250")
        await client.command(b"RCPT TO:<b@example.org>", b"250")
        await client.command(b"DATA", b"354")
        await client.stream.send_all(b"Subject: cut\r\n\r\nhalf-sent-marker\r\n")
        # the backend saved its record before it wrote 354; it is the only one
        # with a MAIL (the others are the workers' probes, long gone)
        victim = backend_parent(capture, b"MAIL FROM:<a@example.net>")
        os.kill(victim, signal.SIGKILL)
        # the client reads EOF or a reset at once, never waits for a timeout
        with trio.fail_after(5):
            try:
                while await client.stream.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass
        await client.stream.aclose()

        died = await log.wait_for(rf"worker (\d) \(pid {victim}\) died")
        index = died[0].group(1)
        started = await log.wait_for(rf"worker {index} started \(pid (\d+)\)", 2)
        replacement = int(started[-1].group(1))
        assert replacement != victim

        # new sessions are served, by the replacement among others
        served_by: set[int] = set()
        for n in range(30):
            client = await open_session(port)
            marker = f"after-{n}".encode()
            await client.command(b"MAIL FROM:<a@example.net>", b"250")
            await client.command(b"RCPT TO:<b@example.org>", b"250")
            await client.command(b"DATA", b"354")
            await client.command(b"Subject: again\r\n\r\n" + marker + b"\r\n.", b"250")
            served_by.add(backend_parent(capture, marker))
            await client.command(b"QUIT", b"221")
            await client.stream.aclose()
            if replacement in served_by:
                break
        assert replacement in served_by

        # the interrupted message never reached the queue
        new = capture / "Maildir" / "new"
        assert not [p for p in new.iterdir() if b"half-sent-marker" in p.read_bytes()]

        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            # SIGTERM first: the parent passes it on, so no worker outlives the test
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
