"""The stand-in backends of tests/support/backends/ do what they promise."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from support.stdio_peer import Peer

from tlsfront.sink import read_maildir

BACKENDS = Path(__file__).resolve().parent / "support" / "backends"
FAULTY = [sys.executable, str(BACKENDS / "faulty.py")]
CAPTURE = [sys.executable, str(BACKENDS / "capture.py")]
LIMIT = 20

SESSION = b"EHLO client.test\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
BODY = b"Subject: t\r\n\r\n..dotted\r\n.\r\n"


def backend_env(**extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TCPLOCALHOST": "mx.test",
        "TCPREMOTEIP": "192.0.2.7",
    }
    env.update(extra)
    return env


@asynccontextmanager
async def spawn(args: list[str], env: dict[str, str] | None = None) -> AsyncIterator[Peer]:
    proc = await trio.lowlevel.open_process(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=backend_env() if env is None else env,
    )
    try:
        yield Peer(proc)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()
            await proc.wait()


async def up_to_354(peer: Peer) -> None:
    assert (await peer.reply())[0].startswith(b"220 ")
    await peer.send(SESSION)
    assert [(await peer.reply())[-1] for _ in range(4)] == [
        b"250 8BITMIME",
        b"250 ok",
        b"250 ok",
        b"354 go ahead",
    ]


def run(args: list[str], script: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        args, input=script, capture_output=True, env=backend_env(), timeout=LIMIT, check=False
    )


# faulty.py


def test_exit_before_greeting() -> None:
    done = run([*FAULTY, "--mode", "exit-before-greeting"], b"EHLO x\r\n")
    assert (done.stdout, done.returncode) == (b"", 1)


def test_421_at_connect() -> None:
    done = run([*FAULTY, "--mode", "421-at-connect"], b"EHLO x\r\n")
    assert (done.stdout, done.returncode) == (b"421 service unavailable\r\n", 0)


async def test_hang_after_data_never_answers_the_dot() -> None:
    with trio.fail_after(LIMIT):
        async with spawn([*FAULTY, "--mode", "hang-after-data"]) as peer:
            await up_to_354(peer)
            await peer.send(BODY + b"QUIT\r\n")
            await peer.stdin.aclose()  # not even EOF wakes it
            await peer.announced(b"faulty: hang-after-data: hanging")
            # "never" needs some bound: the pipe stays open and silent a while
            with trio.move_on_after(0.3) as quiet:
                await peer.rest()
            assert quiet.cancelled_caught
            assert peer.proc.poll() is None
            peer.proc.kill()
            assert await peer.rest() == b""  # all it wrote before the kill: nothing
            assert await peer.proc.wait() == -signal.SIGKILL  # it was still running


async def test_die_after_dot() -> None:
    with trio.fail_after(LIMIT):
        async with spawn([*FAULTY, "--mode", "die-after-dot"]) as peer:
            await up_to_354(peer)
            await peer.send(b"Subject: t\r\n\r\nbody\r\n")
            assert peer.proc.poll() is None  # the body alone does not end it
            await peer.send(b".\r\nQUIT\r\n")
            assert await peer.rest() == b""
            assert await peer.proc.wait() == 1
            await peer.announced(b"faulty: die-after-dot: dying")


async def test_half_reply() -> None:
    with trio.fail_after(LIMIT):
        async with spawn([*FAULTY, "--mode", "half-reply"]) as peer:
            await up_to_354(peer)
            await peer.send(BODY + b"QUIT\r\n")
            assert await peer.rest() == b"250 o"
            assert await peer.proc.wait() == 0


async def test_slow_reply_delays_every_reply() -> None:
    delay = 0.3
    with trio.fail_after(LIMIT):
        start = trio.current_time()
        async with spawn([*FAULTY, "--mode", "slow-reply", "--delay", str(delay)]) as peer:
            assert await peer.reply() == [b"220 mx.test ESMTP"]
            greeted = trio.current_time()
            assert greeted - start >= delay
            await peer.send(b"NOOP\r\n")
            assert await peer.reply() == [b"250 ok"]
            assert trio.current_time() - greeted >= delay
            await peer.send(b"QUIT\r\n")
            assert await peer.reply() == [b"221 mx.test"]
            assert await peer.proc.wait() == 0


async def test_flood_output_never_ends() -> None:
    line = b"250-" + b"x" * 70
    with trio.fail_after(LIMIT):
        async with spawn([*FAULTY, "--mode", "flood-output"]) as peer:
            assert await peer.reply() != []  # the greeting
            received = 0
            while received < 4 << 20:
                data = await peer.stdout.receive_some(1 << 16)
                assert data
                peer.buf += data
                received += len(data)
            lines = bytes(peer.buf).split(b"\r\n")[:-1]
            assert len(lines) > 50_000
            assert set(lines) == {line}
            assert peer.proc.poll() is None


def test_greeting_554_refuses_everything_until_quit() -> None:
    script = b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nQUIT\r\nNOOP\r\n"
    done = run([*FAULTY, "--mode", "greeting-554"], script)
    replies = done.stdout.split(b"\r\n")
    assert replies[0] == b"554 blocked"
    assert [r[:4] for r in replies[1:]] == [b"553 "] * 4 + [b"221 ", b""]
    assert done.returncode == 0


def test_unknown_mode_is_refused() -> None:
    done = run([*FAULTY, "--mode", "nonsense"])
    assert done.returncode == 2
    assert b"invalid choice" in done.stderr


# capture.py


def sessions(directory: Path) -> list[dict[str, Any]]:
    """The session records, oldest first, base64 fields decoded."""
    records = []
    for path in directory.glob("session-*.json"):
        assert re.fullmatch(r"session-\d+-\d+\.json", path.name)
        record: dict[str, Any] = json.loads(path.read_text())
        for key in ("stdin", "stdout"):
            record[key] = base64.b64decode(record[key])
        record["messages"] = [base64.b64decode(m) for m in record["messages"]]
        if record["partial"] is not None:
            record["partial"] = base64.b64decode(record["partial"])
        records.append(record)
    return sorted(records, key=lambda r: (r["started"], r["pid"]))


def test_capture_records_env_stdin_and_raw_bodies(tmp_path: Path) -> None:
    script = SESSION.replace(b"b@example.com", b"b@elsewhere.test") + BODY + b"QUIT\r\n"
    env = backend_env(RELAYCLIENT="+relayed", SSL_PROTOCOL="TLSv1.3")
    done = subprocess.run(
        [*CAPTURE, "--dir", str(tmp_path), "--rcpthost", "example.com"],
        input=script,
        capture_output=True,
        env=env,
        timeout=LIMIT,
        check=False,
    )
    assert done.returncode == 0
    (record,) = sessions(tmp_path)
    for key, value in env.items():
        assert record["env"][key] == value
    assert record["stdin"] == script
    assert record["stdout"] == done.stdout
    assert record["messages"] == [BODY]  # raw: dots still stuffed, terminator kept
    assert record["partial"] is None
    assert record["envelopes"] == [
        {"from": "a@example.net", "to": ["b@elsewhere.test+relayed"], "complete": True}
    ]
    assert record["exit"] == 0
    (message,) = read_maildir(tmp_path / "Maildir")
    assert message.endswith(b"\nSubject: t\n\n.dotted\n")
    assert b"(HELO client.test) (192.0.2.7)" in message


def test_capture_refuses_relay_like_the_sink(tmp_path: Path) -> None:
    script = SESSION.replace(b"b@example.com", b"b@elsewhere.test")
    done = run([*CAPTURE, "--dir", str(tmp_path), "--rcpthost", "example.com"], script)
    assert b"\r\n553 sorry, that domain isn't in my list" in done.stdout
    (record,) = sessions(tmp_path)
    assert record["envelopes"] == []
    assert record["exit"] == done.returncode == 1


def test_capture_records_a_body_cut_short(tmp_path: Path) -> None:
    script = SESSION + b"Subject: t\r\n\r\nhalf a bo"
    done = run([*CAPTURE, "--dir", str(tmp_path), "--maildir", str(tmp_path / "md")], script)
    assert done.returncode == 1
    (record,) = sessions(tmp_path)
    assert record["messages"] == []
    assert record["partial"] == b"Subject: t\r\n\r\nhalf a bo"
    assert record["envelopes"][0]["complete"] is False
    assert record["exit"] == 1
    assert read_maildir(tmp_path / "md") == []


@pytest.mark.parametrize(("sig", "exit"), [(signal.SIGTERM, 128 + 15), (signal.SIGKILL, None)])
async def test_capture_is_written_as_the_session_goes(
    tmp_path: Path, sig: signal.Signals, exit: int | None
) -> None:
    with trio.fail_after(LIMIT):
        async with spawn([*CAPTURE, "--dir", str(tmp_path)]) as peer:
            assert await peer.reply() == [b"220 mx.test ESMTP"]
            await peer.send(b"EHLO client.test\r\nNOOP\r\n")
            assert (await peer.reply())[-1] == b"250 8BITMIME"
            assert await peer.reply() == [b"250 ok"]
            peer.proc.send_signal(sig)
            await peer.proc.wait()
    (record,) = sessions(tmp_path)
    assert record["stdin"] == b"EHLO client.test\r\nNOOP\r\n"
    assert record["stdout"].endswith(b"250 8BITMIME\r\n250 ok\r\n")
    assert record["exit"] == exit


def test_capture_keeps_sessions_apart(tmp_path: Path) -> None:
    for n in range(2):
        run([*CAPTURE, "--dir", str(tmp_path)], b"HELO number%d\r\nQUIT\r\n" % n)
    first, second = sessions(tmp_path)
    assert first["stdin"] == b"HELO number0\r\nQUIT\r\n"
    assert second["stdin"] == b"HELO number1\r\nQUIT\r\n"
    assert len(list(tmp_path.glob("session-*.json"))) == 2
    assert list(tmp_path.glob(".*")) == []
