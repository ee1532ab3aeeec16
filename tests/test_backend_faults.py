"""Broken backends (threat `false-acknowledgement`): real misbehaving processes behind tlsfront.

Each mode of tests/support/backends/faulty.py runs as the exec backend of a running
tlsfront. For each: the client's reply to the step that failed is a 4xx
(never a 250, RFC 5321 §6.1), the session's log line says what happened,
the faulty process is gone afterwards (reaped, not left running), and
tlsfront's tasks and memory are back where they were before the session.

The backend is started through `sh -c 'echo $$ >> PIDFILE; exec ...'`, so
the test learns each backend's pid without the backend's help (the probe's
too, which comes first where the backend starts on demand). With the backend
on demand a fault at the backend's greeting shows at the client's MAIL, the
command that started it; with `backend_start = "connect"`, at once.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from support.front import FAULTY, Front, toml_str
from support.hostile import Client, SessionLog, code, session_log

import tlsfront.inbound.backend
from tlsfront.inbound.backend import ExecBackend
from tlsfront.inbound.session import Session
from tlsfront.inbound.spawn import Child
from tlsfront.inbound.stderr import READER_TASK, StderrLog
from tlsfront.net.netstream import NetStream, PipeStream
from tlsfront.smtp import Dialogue

PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {{cert}}
backend = {backend}
timeout_backend = {timeout}
backend_start = "{start}"
"""

ENVELOPE = (
    b"EHLO client.example\r\n",
    b"MAIL FROM:<a@example.net>\r\n",
    b"RCPT TO:<b@example.org>\r\n",
)
BODY = b"Subject: fault\r\n\r\nhello\r\n.\r\n"


@pytest.fixture
def log() -> Iterator[SessionLog]:
    with session_log() as handler:
        yield handler


@pytest.fixture(autouse=True)
def _short_exit_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung backend is killed after EXIT_GRACE; 10 s of it would only slow the tests."""
    monkeypatch.setattr(tlsfront.inbound.backend, "EXIT_GRACE", 1.0)


BACKEND_STARTS = ["on-demand", "connect"]


def faulty_profile(
    tmp_path: Path,
    mode: str,
    *,
    delay: float = 3.0,
    timeout: float = 1.0,
    start: str = "on-demand",
) -> str:
    argv = [
        "/bin/sh",
        "-c",
        'echo $$ >> "$0"; exec "$@"',
        str(tmp_path / "pids"),
        sys.executable,
        str(FAULTY),
        "--mode",
        mode,
        "--delay",
        str(delay),
    ]
    backend = "[" + ", ".join(toml_str(a) for a in argv) + "]"
    return PROFILE.format(backend=backend, timeout=timeout, start=start)


def pids(tmp_path: Path) -> list[int]:
    return [int(line) for line in (tmp_path / "pids").read_text().split()]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def up_to_data(client: Client) -> None:
    """Greeting, EHLO, MAIL, RCPT (each 2xx from the backend), DATA answered 354."""
    assert code(await client.reply()) == 220
    for line in ENVELOPE:
        await client.send(line)
        assert code(await client.reply()) == 250
    assert await client.command(b"DATA") == b"354 go ahead\r\n"


TLSFRONT_GREETING = b"220 front.example.org ESMTP\r\n"  # the probe of these modes fails


async def fault_session(port: int, mode: str, start: str = "on-demand") -> list[bytes]:
    """One client session against `mode`; returns every reply after the fault point."""
    client = await Client.connect(port)
    try:
        if mode in ("hang-after-data", "die-after-dot", "half-reply"):
            await up_to_data(client)
            await client.send(BODY)
        elif start == "on-demand":
            # tlsfront answers the greeting and EHLO; MAIL starts the backend
            replies = [await client.reply()]
            replies.append(await client.command(b"EHLO client.example"))
            assert replies == [TLSFRONT_GREETING, b"250-front.example.org\r\n250 STARTTLS\r\n"]
            await client.send(b"MAIL FROM:<a@example.net>\r\n")
            if mode == "greeting-554":
                replies = [await client.reply(), await client.command(b"QUIT")]
                assert await client.rest() == b""
                return replies
        elif mode == "greeting-554":
            replies = [await client.reply()]
            replies.append(await client.command(b"EHLO client.example"))
            replies.append(await client.command(b"MAIL FROM:<a@example.net>"))
            replies.append(await client.command(b"QUIT"))
            assert await client.rest() == b""
            return replies
        elif mode == "flood-output":
            assert (await client.reply()).startswith(b"220 flood.invalid")
        elif mode == "endless-line":
            assert await client.reply() == b"220 endless.invalid ESMTP\r\n"
        # exit-before-greeting, 421-at-connect, slow-reply: the fault is at once
        replies = [await client.reply()]
        replies += split_replies(await client.rest())
        return replies
    finally:
        await client.aclose()


def split_replies(data: bytes) -> list[bytes]:
    return [line + b"\r\n" for line in data.split(b"\r\n") if line]


# mode -> (the client's replies from the fault on, the log's reason); on demand
# the flood and the endless line break the reply to a command (MAIL), at
# connect they come when no reply is owed
NOT_AVAILABLE = b"421 4.3.0 front.example.org Service not available"
LOST = b"451 4.3.0 Error: backend failed, message not accepted\r\n"
EXPECTED: dict[str, tuple[list[bytes], str]] = {
    "exit-before-greeting": (
        [NOT_AVAILABLE + b", closing channel\r\n"],
        "reason='backend closed the connection'",
    ),
    "421-at-connect": (
        [b"421 service unavailable\r\n"],
        "reason='backend closed the session: 421 service unavailable'",
    ),
    "hang-after-data": ([LOST], "reason='backend did not answer in time'"),
    "die-after-dot": ([LOST], "reason='backend closed the connection'"),
    "half-reply": ([LOST], "reason='backend closed the connection'"),
    "slow-reply": (
        [NOT_AVAILABLE + b", closing channel\r\n"],
        "reason='backend did not answer in time'",
    ),
    "flood-output": (
        [NOT_AVAILABLE + b", closing channel\r\n"],
        "reason='Backend failure: reply has too many lines'",
    ),
    "endless-line": (
        [NOT_AVAILABLE + b", closing channel\r\n"],
        "reason='Backend failure: reply line too long'",
    ),
}
AT_CONNECT = {
    **EXPECTED,
    **{
        mode: ([NOT_AVAILABLE + b"\r\n"], EXPECTED[mode][1])
        for mode in ("flood-output", "endless-line")
    },
}


def task_count() -> int:
    """Every task of this trio run but the one stderr reader, which the first
    backend starts and which stays for the rest of the run."""

    def walk(task: trio.lowlevel.Task) -> int:
        own = task.name != READER_TASK
        return own + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


def expected(mode: str, start: str) -> tuple[list[bytes], str]:
    return (AT_CONNECT if start == "connect" else EXPECTED)[mode]


@pytest.mark.parametrize("start", BACKEND_STARTS)
@pytest.mark.parametrize("mode", sorted(EXPECTED))
async def test_fault_gives_a_4xx_and_leaves_nothing_behind(
    start_front: Any,
    tmp_path: Path,
    log: SessionLog,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    start: str,
) -> None:
    front: Front = await start_front(faulty_profile(tmp_path, mode, start=start))
    port = front.port("smtp")
    probes = len(pids(tmp_path)) if start == "on-demand" else 0
    assert probes == (start == "on-demand")
    await trio.testing.wait_all_tasks_blocked()
    baseline = task_count()
    with trio.fail_after(30):
        replies = await fault_session(port, mode, start)
        await log.wait_ends(1)
        await trio.testing.wait_all_tasks_blocked()
    expected_replies, reason = expected(mode, start)
    assert replies == expected_replies
    assert all(400 <= code(r) < 500 for r in replies)
    (end,) = log.ends
    assert reason in end
    assert "messages=0" in end
    assert any(
        reason in r.getMessage() for r in caplog.records if r.name == "tlsfront.inbound.session"
    )
    assert len(pids(tmp_path)) == probes + 1
    assert all(gone(pid) for pid in pids(tmp_path))
    assert task_count() == baseline
    assert front.server.profiles["smtp"].limits.active == 0


@pytest.mark.parametrize("start", BACKEND_STARTS)
async def test_backend_refusal_at_connect_reaches_the_client(
    start_front: Any, tmp_path: Path, log: SessionLog, start: str
) -> None:
    """rblsmtpd / a tcprules deny in the backend chain: its 554 and 553s, never a 250."""
    front: Front = await start_front(faulty_profile(tmp_path, "greeting-554", start=start))
    with trio.fail_after(30):
        replies = await fault_session(front.port("smtp"), "greeting-554", start)
        await log.wait_ends(1)
    if start == "connect":
        assert replies == [
            b"554 blocked\r\n",
            b"553 sorry, blocked (#5.7.1)\r\n",
            b"553 sorry, blocked (#5.7.1)\r\n",
            b"221 blocked.invalid\r\n",
        ]
    else:  # its greeting answers the MAIL that started it; QUIT is tlsfront's
        assert replies == [
            b"554 blocked\r\n",
            b"221 2.0.0 front.example.org closing connection\r\n",
        ]
    assert all(gone(pid) for pid in pids(tmp_path))
    assert "reason='quit'" in log.ends[0]


async def test_slow_backend_within_the_timeout_is_waited_for(
    start_front: Any, tmp_path: Path, log: SessionLog
) -> None:
    """A slow reply is not a failure: the 250 is the backend's own, byte for byte."""
    front: Front = await start_front(faulty_profile(tmp_path, "slow-reply", delay=0.2, timeout=10))
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        await up_to_data(client)
        await client.send(BODY)
        reply = await client.reply()
        pid = pids(tmp_path)[-1]  # after the probe's
        assert reply.startswith(b"250 ok ")
        assert reply.endswith(b" qp %d\r\n" % pid)
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
    assert "messages=1" in log.ends[0]


SESSION_TYPES = (
    Session,
    Dialogue,
    ExecBackend,
    Child,
    StderrLog,
    subprocess.Popen,
    NetStream,
    PipeStream,
)
ROUNDS = 5


def census() -> Counter[str]:
    """How many objects of each kind a session is made of are alive.

    Not zero between sessions: trio's accept loop keeps the last stream it
    accepted until the next connection comes.
    """
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects() if isinstance(o, SESSION_TYPES))


LEAK_MODES = (
    "exit-before-greeting",
    "421-at-connect",
    "die-after-dot",
    "half-reply",
    "flood-output",
)


async def test_faults_do_not_leak_memory(
    start_front: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty-five failing sessions in a row leave tlsfront's memory and tasks as they were.

    No session object survives its session, and memory grows by less than a few
    KiB a session: trio drops the deadlines of finished cancel scopes lazily
    (its heap is pruned when it gets large), which is the only growth there is.
    No log handler here: captured log records would grow too. A session is over
    once its task has run to its end (the client is let go first, the backend
    reaped after).
    """
    monkeypatch.setattr(tlsfront.inbound.backend, "EXIT_GRACE", 0.2)  # the flooder ignores EOF
    profiles = "".join(
        faulty_profile(tmp_path, mode).replace("[profile.smtp]", f"[profile.{mode}]")
        for mode in LEAK_MODES
    )
    front: Front = await start_front(profiles)

    async def round_of_faults() -> None:
        for mode in LEAK_MODES:
            replies = await fault_session(front.port(mode), mode)
            assert replies == EXPECTED[mode][0]
            await front.server.wait_idle()  # the backend reaped, the session over

    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        with trio.fail_after(60):
            await round_of_faults()  # warm-up: caches, lazy imports
            objects = census()
            before = tracemalloc.get_traced_memory()[0]
            baseline = task_count()
            for _ in range(ROUNDS):
                await round_of_faults()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
    finally:
        if not tracing:
            tracemalloc.stop()
    assert task_count() == baseline
    assert census() == objects
    assert objects["Session"] == objects["Dialogue"] == objects["Child"] == 0
    assert objects["StderrLog"] == 0
    sessions = ROUNDS * len(LEAK_MODES)
    # A session holds a dialogue, 64 KiB read buffers, a process and two streams.
    assert (after - before) / sessions < 4096, after - before
    assert len(pids(tmp_path)) == 6 * len(LEAK_MODES) + len(LEAK_MODES)  # and one probe each
    assert all(gone(pid) for pid in pids(tmp_path))


async def test_client_is_let_go_before_a_hung_backend_is_reaped(
    start_front: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its 451 the client is closed at once, not after the backend's EXIT_GRACE."""
    monkeypatch.setattr(tlsfront.inbound.backend, "EXIT_GRACE", 8.0)
    front: Front = await start_front(faulty_profile(tmp_path, "hang-after-data"))
    client = await Client.connect(front.port("smtp"))
    try:
        await up_to_data(client)
        await client.send(BODY)
        assert await client.reply() == LOST
        with trio.fail_after(4):  # well inside EXIT_GRACE: the backend still hangs
            assert await client.rest() == b""
        pid = pids(tmp_path)[-1]  # after the probe's
        assert not gone(pid)
    finally:
        await client.aclose()
