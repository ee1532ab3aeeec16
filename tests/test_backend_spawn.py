"""How an exec backend is started and reaped (tlsfront.inbound.spawn).

Real programs: what the child inherits (only its three descriptors, SIGPIPE
and SIGXFSZ at their defaults), where its program is found (the backend's
PATH, not tlsfront's), its exit status by pidfd and without one, and the
stderr of several backends read by one task.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import trio

from tlsfront.inbound import spawn, stderr
from tlsfront.inbound.backend import BackendError, ExecBackend

ENV = {"PATH": "/bin:/usr/bin"}


async def output_of(backend: ExecBackend) -> bytes:
    data = b""
    while chunk := await backend.receive_some(4096):
        data += chunk
    return data


async def test_the_program_gets_its_three_descriptors_and_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A descriptor tlsfront inherited open across exec is closed by the first start."""
    monkeypatch.setattr(spawn, "_sealed", False)  # as in a fresh process
    kept_read, kept_write = os.pipe()
    os.set_inheritable(kept_write, True)  # what a careless parent might leave us
    script = (
        "import os, sys\n"
        "def is_open(fd):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "    except OSError:\n"
        "        return False\n"
        "    return True\n"
        "print(sorted(fd for fd in range(64) if is_open(fd)))\n"
    )
    try:
        with trio.fail_after(20):
            backend = await ExecBackend.start([sys.executable, "-c", script], ENV)
            assert await output_of(backend) == b"[0, 1, 2]\n"
            assert await backend.aclose() == 0
        assert not os.get_inheritable(kept_write)
    finally:
        os.close(kept_read)
        os.close(kept_write)


async def test_sigpipe_and_sigxfsz_are_at_their_defaults() -> None:
    """Python ignores both; the program must not inherit that (qmail-smtpd dies of
    a broken pipe under tcpserver, and does here)."""
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # tlsfront's own
    with trio.fail_after(20):
        backend = await ExecBackend.start(["cat", "/proc/self/status"], ENV)
        status = (await output_of(backend)).decode()
        assert await backend.aclose() == 0
    (ignored,) = [line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")]
    mask = int(ignored, 16)
    assert not mask & (1 << (signal.SIGPIPE - 1))
    assert not mask & (1 << (signal.SIGXFSZ - 1))


def executable(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\necho found\n")
    path.chmod(mode)
    return path


def test_the_program_is_found_in_the_backends_path(tmp_path: Path) -> None:
    first, second, third = (tmp_path / n for n in ("first", "second", "third"))
    for directory in (first, second, third):
        directory.mkdir()
    (first / "prog").mkdir()  # a directory of that name is no program
    executable(second / "prog", 0o644)  # nor a file that cannot be executed
    found = executable(third / "prog")
    env = {"PATH": f"{tmp_path / 'missing'}:{first}:{second}:{third}"}
    assert spawn.find_program("prog", env) == str(found)
    assert spawn.find_program("./prog", env) == "./prog"  # a slash: taken as it is
    with pytest.raises(PermissionError):
        spawn.find_program("prog", {"PATH": f"{first}:{second}"})
    with pytest.raises(FileNotFoundError):
        spawn.find_program("prog", {"PATH": str(first / "missing")})


async def test_a_program_not_found_is_a_backend_error(tmp_path: Path) -> None:
    executable(tmp_path / "prog")
    with pytest.raises(BackendError, match="cannot start prog: No such file or directory"):
        await ExecBackend.start(["prog"], ENV)  # in tlsfront's PATH or not, not the backend's
    with trio.fail_after(20):
        backend = await ExecBackend.start(["prog"], {"PATH": str(tmp_path)})
        assert await output_of(backend) == b"found\n"
        assert await backend.aclose() == 0
    os.chmod(tmp_path / "prog", stat.S_IRUSR)
    with pytest.raises(BackendError, match="cannot start prog: Permission denied"):
        await ExecBackend.start(["prog"], {"PATH": str(tmp_path)})


async def test_exit_status_with_and_without_pidfds(monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(20):
        backend = await ExecBackend.start(["sh", "-c", "read line; exit 3"], ENV)
        assert await backend.aclose() == 3  # its input closed: it exits
        backend = await ExecBackend.start(["sh", "-c", 'kill -TERM "$$"'], ENV)
        assert await backend.wait() == -signal.SIGTERM
        assert await backend.aclose() == -signal.SIGTERM

        def no_pidfds(pid: int, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", no_pidfds)
        backend = await ExecBackend.start(["sh", "-c", "sleep 0.2; exit 5"], ENV)
        assert await backend.wait() == 5
        assert await backend.aclose() == 5


async def test_a_backend_on_stdio_descriptors_still_starts() -> None:
    """Its ends among 0-2 (tlsfront started with them closed): Popen starts it."""
    read_end, write_end = os.pipe()
    try:
        child = spawn.spawn(["sh", "-c", "exit 4"], ENV, (0, write_end, 2))
        with trio.fail_after(20):
            assert await child.wait() == 4
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_one_task_reads_the_stderr_of_every_backend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three backends complaining at once: their lines, each with its session, and
    one reader task for all of them (none per backend)."""
    script = 'echo "first $1" >&2; read line; echo "second $1" >&2'
    three = Lines(3)
    logging.getLogger("tlsfront.backend").addHandler(three)
    try:
        with trio.fail_after(20):
            backends = []
            for n in range(3):
                backend = await ExecBackend.start(["sh", "-c", script, "sh", str(n)], ENV)
                backend.stderr.watch(f"s{n}")
                backends.append(backend)
            await three.logged.wait()  # read while they run: none has exited yet
            readers = [t for t in all_tasks() if t.name == stderr.READER_TASK]
            assert len(readers) == 1
            for backend in backends:
                assert await backend.aclose() == 0
    finally:
        logging.getLogger("tlsfront.backend").removeHandler(three)
    lines = sorted(r.getMessage() for r in caplog.records if r.name == "tlsfront.backend")
    assert lines == sorted(
        f"backend pid {b.process.pid} session s{n}: {word} {n}"
        for n, b in enumerate(backends)
        for word in ("first", "second")
    )
    assert {r.levelno for r in caplog.records if r.name == "tlsfront.backend"} == {logging.WARNING}


class Lines(logging.Handler):
    """Sets `logged` once `count` records have come."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.logged = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.count -= 1
        if self.count <= 0:
            self.logged.set()


def all_tasks() -> list[trio.lowlevel.Task]:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    found, todo = [], [root]
    while todo:
        task = todo.pop()
        found.append(task)
        todo.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return found
