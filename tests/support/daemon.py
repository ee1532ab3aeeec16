"""`tlsfront` as a real process, the way systemd runs it, for the systemd tests.

`passing_sockets` wraps a command so that it starts with the given listening
sockets as descriptors 3, 4, ... and LISTEN_FDS / LISTEN_PID /
LISTEN_FDNAMES set, exactly what systemd hands a service. The sockets are
bound by the test on port 0 first, so no port is ever guessed; that command
may be `systemd-socket-activate` itself, which passes inherited descriptors
on to its child (its own --listen= needs a fixed port number).

`NotifySocket` is the receiving end of sd_notify: an AF_UNIX datagram
socket (abstract, or a path) whose messages the test reads as dicts.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

# Runs in the child: move the inherited sockets to 3, 4, ..., set the
# LISTEN_* variables for this very process, then exec the real command
# (exec keeps the process id, so LISTEN_PID stays true).
_WRAPPER = """
import fcntl, json, os, sys
fds, names = json.loads(sys.argv[1])
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
if names:
    os.environ["LISTEN_FDNAMES"] = ":".join(names)
os.execvp(sys.argv[2], sys.argv[2:])
"""

TLSFRONT = [sys.executable, "-m", "tlsfront"]


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def passing_sockets(
    sockets: Sequence[socket.socket], names: Sequence[str] | None, argv: Sequence[str]
) -> tuple[list[str], tuple[int, ...]]:
    """(argv, pass_fds) that start `argv` with `sockets` as systemd would."""
    fds = tuple(s.fileno() for s in sockets)
    spec = json.dumps([list(fds), list(names or [])])
    return [sys.executable, "-c", _WRAPPER, spec, *argv], fds


def child_environ(**extra: str) -> dict[str, str]:
    """A small environment for the daemon: nothing of the test's own leaks in."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    env.update(extra)
    return env


class NotifySocket:
    """The systemd side of sd_notify: receives the daemon's datagrams."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"tlsfront-test-{secrets.token_hex(8)}"
            self.address = "@" + name
            self._bind = "\0" + name
        else:
            self.address = self._bind = str(path)
        self.messages: list[dict[str, str]] = []

    async def __aenter__(self) -> NotifySocket:
        await self.sock.bind(self._bind)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    async def receive(self) -> dict[str, str]:
        data = await self.sock.recv(65536)
        message = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append(message)
        return message

    async def wait_for(self, key: str, value: str | None = None) -> dict[str, str]:
        """The next message that sets `key` (to `value`, when given)."""
        while True:
            message = await self.receive()
            if key in message and (value is None or message[key] == value):
                return message


@dataclass
class Daemon:
    """A running tlsfront process."""

    process: trio.Process
    stderr: Path
    sockets: list[socket.socket] = field(default_factory=list)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def wait(self) -> int:
        """The exit status (the caller bounds the wait)."""
        return await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM if still running; then wait for the exit."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        for sock in self.sockets:
            sock.close()


async def start_daemon(
    argv: Sequence[str],
    tmp_path: Path,
    env: Mapping[str, str],
    sockets: Sequence[socket.socket] = (),
    names: Sequence[str] | None = None,
) -> Daemon:
    """Start `argv`, with `sockets` passed the systemd way when there are any."""
    stderr = tmp_path / f"daemon-{secrets.token_hex(4)}.log"
    pass_fds: tuple[int, ...] = ()
    command = list(argv)
    if sockets:
        command, pass_fds = passing_sockets(sockets, names, argv)
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            command,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            pass_fds=pass_fds,
        )
    return Daemon(process, stderr, list(sockets))


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every JSON line of a log, parsed; a text-format line of tlsfront's fails."""
    lines = text.splitlines()
    assert not [x for x in lines if x.split(" ", 1)[0] in ("DEBUG", "INFO", "WARNING", "ERROR")]
    return [json.loads(line) for line in lines if line.startswith("{")]
