"""Processes of the benchmark: starting them pinned, and reading their CPU and memory.

CPU time and memory come from /proc (Linux), with no third-party module:
`cpu_seconds` is user + system time of a process and its living
descendants plus what its reaped children used (cutime/cstime), so a server
that forks a backend per session (tcpserver, tlsfront with an exec backend)
is charged for the backends as well. `rss_bytes` is VmRSS summed over the
process and its descendants.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cores() -> tuple[set[int], set[int]]:
    """(server cores, client cores): the first core for the server, the rest for clients.

    With one core both share it, and the report says so.
    """
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        return set(mine), set(mine)
    return {mine[0]}, set(mine[1:])


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ")"
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """pid and every living process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    total = 0
    for n, member in enumerate(descendants(pid)):
        fields = _stat(member)
        if fields is None:
            continue
        # after the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14)
        total += int(fields[11]) + int(fields[12])
        if n == 0:
            total += int(fields[13]) + int(fields[14])
    return total / TICKS


def rss_bytes(pid: int) -> int:
    total = 0
    for member in descendants(pid):
        try:
            statm = Path(f"/proc/{member}/statm").read_text().split()
        except OSError:
            continue
        total += int(statm[1]) * PAGE
    return total


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago.

    Only for programs that cannot listen on port 0 and say which port they
    got (nginx, stunnel, tcpserver): another program could take it in
    between, and then that comparator fails to start and is reported missing.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Proc:
    """A child process pinned to `cpus`, with its output in `log`."""

    def __init__(
        self,
        argv: Sequence[str],
        cpus: set[int],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log = log
        self._log_file = log.open("ab")

        def pin() -> None:
            os.sched_setaffinity(0, cpus)

        self.popen = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=stdout if stdout is not None else self._log_file,
            stderr=self._log_file,
            env=env,
            cwd=cwd,
            preexec_fn=pin,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def read_json(self, timeout: float = 30.0) -> dict[str, int]:
        """The first line of its standard output, as JSON (the ports it listens on)."""
        assert self.popen.stdout is not None
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise RuntimeError(f"{self.argv[:3]} said nothing in {timeout}s; see {self.log}")
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.argv[:3]} exited; see {self.log}")
        value = json.loads(line)
        assert isinstance(value, dict)
        return value

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log_file.close()
