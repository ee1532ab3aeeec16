"""ucspi-tcp in the tests: a real `tcpserver` on a free loopback port, rules by `tcprules`,
and an SMTP reply reader for the dialogues these tests spell out.

`tcpserver -1` prints the port it bound to on standard output once it
listens, so port 0 works; `-H -R -l0` keep it from looking up names (there is
no DNS here) and from asking the client's ident server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from support.front import CAPTURE, Front, need_tool


async def compile_rules(source: Path) -> Path:
    """`tcprules SOURCE.cdb SOURCE.tmp < SOURCE`, as a qmail host's Makefile does."""
    cdb = source.with_name(source.name + ".cdb")
    tmp = source.with_name(source.name + ".tmp")
    await trio.run_process(
        [need_tool("tcprules"), str(cdb), str(tmp)], stdin=await trio.Path(source).read_bytes()
    )
    return cdb


def capture_argv(directory: Path) -> list[str]:
    """The capture backend (the bundled sink, recording) as tcpserver's program."""
    return [sys.executable, str(CAPTURE), "--dir", str(directory), "--rcpthost", "example.org"]


@asynccontextmanager
async def tcpserver(
    program: Sequence[str],
    log: Path,
    *,
    host: str = "127.0.0.1",
    rules: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[int]:
    """Run `tcpserver ... host 0 program` until the block ends; yield its port.

    `rules` is a tcprules source file, compiled and given with -x. `env` is
    added to a bare environment (PATH only). tcpserver's -v log goes to `log`.
    """
    argv = [need_tool("tcpserver"), "-1", "-v", "-H", "-R", "-l0"]
    if rules is not None:
        argv += ["-x", str(await compile_rules(rules))]
    argv += [host, "0", *program]
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = await trio.lowlevel.open_process(
            argv,
            stdout=subprocess.PIPE,
            stderr=fd,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
        )
    finally:
        os.close(fd)
    assert process.stdout is not None
    try:
        with trio.fail_after(20):
            printed = b""
            while not printed.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                assert chunk, f"tcpserver exited: {await trio.Path(log).read_text()}"
                printed += chunk
        yield int(printed)
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stdout.aclose()


def sessions(directory: Path) -> list[dict[str, Any]]:
    """What each capture backend session in `directory` recorded, in start order."""
    return Front(None, None, directory).sessions()  # type: ignore[arg-type]


class Lines:
    """SMTP replies read from a trio stream, for dialogues the tests spell out."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def reply(self) -> bytes:
        """One whole (possibly multi-line) reply."""
        while True:
            lines = self.buffer.split(b"\r\n")
            for n, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    reply = b"\r\n".join(lines[: n + 1]) + b"\r\n"
                    self.buffer = self.buffer[len(reply) :]
                    return reply
            chunk = await self.stream.receive_some()
            assert chunk, f"connection closed; pending {self.buffer!r}"
            self.buffer += chunk

    async def command(self, line: bytes) -> bytes:
        await self.stream.send_all(line + b"\r\n")
        return await self.reply()
