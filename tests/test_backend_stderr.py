"""A backend's stderr: logged a line at a time, at WARNING, with its session's id."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from support.front import Front, toml_str
from support.hostile import session_log
from support.ucspi import Lines

from tlsfront.inbound import stderr
from tlsfront.inbound.backend import ExecBackend

SINK = [sys.executable, "-m", "tlsfront.sink", "--maildir"]


def backend_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tlsfront.backend"]


async def test_lines_partial_lines_and_the_end(caplog: pytest.LogCaptureFixture) -> None:
    script = 'printf "one\\ntw" >&2; sleep 0.2; printf "o\\r\\n\\n" >&2; printf "last" >&2'
    with trio.fail_after(20):
        backend = await ExecBackend.start(["/bin/sh", "-c", script], {"PATH": "/bin:/usr/bin"})
        backend.stderr.watch("77.1")
        assert await backend.wait() == 0
        await backend.aclose()  # reads what is left, the line without a newline too
    records = backend_lines(caplog)
    pid = backend.process.pid
    assert [r.getMessage() for r in records] == [
        f"backend pid {pid} session 77.1: {text}" for text in ("one", "two", "last")
    ]
    assert {r.levelno for r in records} == {logging.WARNING}


async def test_a_flood_is_cut(caplog: pytest.LogCaptureFixture) -> None:
    count = stderr.MAX_LINES + 50
    long_line = "x" * (stderr.MAX_LINE + 500)
    script = (
        f"echo {long_line} >&2; i=1; while [ $i -lt {count} ]; do echo l$i >&2; i=$((i+1)); done"
    )
    with trio.fail_after(20):
        backend = await ExecBackend.start(["/bin/sh", "-c", script], {"PATH": "/bin:/usr/bin"})
        backend.stderr.watch("-")
        await backend.wait()
        await backend.aclose()
    messages = [r.getMessage() for r in backend_lines(caplog)]
    assert len(messages) == stderr.MAX_LINES + 1
    assert len(messages[0]) < stderr.MAX_LINE + 100  # cut
    assert messages[-1].endswith(": 50 more line(s) not logged")


async def test_the_session_id_names_the_backend_lines(
    start_front: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The backend's complaint and the session end line carry the same id; nothing
    of it reaches tlsfront's own stderr raw."""
    maildir = tmp_path / "Maildir"
    chain = ["/bin/sh", "-c", 'echo "unable to read controls (#4.3.0)" >&2; exec "$@"', "sh"]
    argv = [*chain, *SINK, str(maildir)]
    front: Front = await start_front(
        '[profile.smtp]\nlisten = ["127.0.0.1:0"]\ntls = "none"\n'
        f"backend = [{', '.join(toml_str(a) for a in argv)}]\n"
    )
    with session_log() as log, trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", front.port("smtp"))
        lines = Lines(stream)
        assert (await lines.reply()).startswith(b"220 ")
        # MAIL starts the backend (on demand)
        assert (await lines.command(b"MAIL FROM:<a@example.net>")).startswith(b"250 ")
        assert (await lines.command(b"QUIT")).startswith(b"221 ")
        await stream.aclose()
        await log.wait_ends(1)
    (end,) = log.ends
    session_id = end.split(" id=", 1)[1].split()[0]
    probe, record = backend_lines(caplog)  # the probe at start said it too
    assert probe.getMessage().endswith(" session probe: unable to read controls (#4.3.0)")
    assert record.levelno == logging.WARNING
    assert record.getMessage().endswith(f" session {session_id}: unable to read controls (#4.3.0)")
