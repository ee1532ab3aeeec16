"""The checkpassword verifier against a real program that follows the interface."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tlsfront.auth.checkpassword import CheckpasswordVerifier
from tlsfront.auth.sasl import Credentials
from tlsfront.auth.secret import Secret
from tlsfront.auth.verifier import Verdict

PROGRAM = str(Path(__file__).resolve().parent / "support" / "checkpassword.py")
LIMIT = 20
ENV = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.7", "TCPLOCALPORT": "587"}


def creds(user: str, password: bytes) -> Credentials:
    return Credentials("PLAIN", user, Secret(password))


def verifier(
    python: str = sys.executable, *, timeout: float = 30, uid: int | None = None
) -> CheckpasswordVerifier:
    gid = uid
    return CheckpasswordVerifier([python, PROGRAM, "/bin/true"], timeout=timeout, uid=uid, gid=gid)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any user may write (the tests' tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="tlsfront-checkpw-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


async def check(v: CheckpasswordVerifier, user: str, password: bytes, **env: str) -> Verdict:
    with trio.fail_after(LIMIT):
        return (await v.verify(creds(user, password), {**ENV, **env})).verdict


async def test_good_bad_and_temporary() -> None:
    v = verifier()
    assert await check(v, "alice", b"wonderland") is Verdict.GOOD
    assert await check(v, "alice", b"looking-glass") is Verdict.BAD
    assert await check(v, "bob", b"wonderland") is Verdict.BAD
    assert await check(v, "tempfail", b"x") is Verdict.TEMPFAIL


async def test_the_program_after_success_decides() -> None:
    """By the convention, the exit status of the program run on success counts."""
    v = CheckpasswordVerifier([sys.executable, PROGRAM, "/bin/false"])
    assert await check(v, "alice", b"wonderland") is Verdict.BAD


async def test_input_on_descriptor_3_and_environment(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    assert await check(verifier(), "alice", b"wonderland", CHECKPW_REPORT=str(report)) is (
        Verdict.GOOD
    )
    seen = json.loads(report.read_text())
    assert bytes.fromhex(seen["input"]) == b"alice\0wonderland\0\0"
    assert seen["fd3_after_eof"] == ""  # the pipe is closed after the input
    assert seen["env"]["TCPREMOTEIP"] == "192.0.2.7"
    assert "CHECKPW_REPORT" in seen["env"]
    # Exactly the environment given, nothing of the caller's own (PWD is the
    # shell's, LC_CTYPE Python's own locale coercion).
    assert set(seen["env"]) - {"PWD", "SHLVL", "_", "LC_CTYPE"} == {*ENV, "CHECKPW_REPORT"}


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
async def test_runs_as_the_given_user_without_groups(shared_dir: Path) -> None:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 a plain user can run")
    report = shared_dir / "report.json"
    v = CheckpasswordVerifier.as_user([python, PROGRAM, "/bin/true"], "nobody")
    assert (v.uid, v.gid) != (None, None)
    assert await check(v, "alice", b"wonderland", CHECKPW_REPORT=str(report)) is Verdict.GOOD
    seen = json.loads(report.read_text())
    assert (seen["uid"], seen["gid"], seen["groups"]) == (v.uid, v.gid, [])
    assert seen["uid"] != 0


async def test_a_program_that_cannot_start_is_temporary() -> None:
    v = CheckpasswordVerifier(["/nonexistent/vchkpw", "/bin/true"])
    result = await v.verify(creds("alice", b"wonderland"), ENV)
    assert result.verdict is Verdict.TEMPFAIL
    assert "/nonexistent/vchkpw" in result.detail


async def test_the_password_is_cut_out_of_its_stderr() -> None:
    result = await verifier().verify(creds("noisy", b"s3cr3t-pw"), ENV)
    assert result.verdict is Verdict.TEMPFAIL
    assert "exited 111" in result.detail
    assert "password was <secret>" in result.detail
    assert "s3cr3t-pw" not in result.detail


async def test_overlong_credentials_are_refused_without_running() -> None:
    v = CheckpasswordVerifier(["/nonexistent/vchkpw", "/bin/true"])
    result = await v.verify(creds("alice", b"x" * 600), ENV)
    assert result.verdict is Verdict.BAD


def test_a_command_without_the_program_to_run_is_refused() -> None:
    with pytest.raises(ValueError, match="on success"):
        CheckpasswordVerifier(["/home/vpopmail/bin/vchkpw"])
    with pytest.raises(ValueError, match="both"):
        CheckpasswordVerifier(["/home/vpopmail/bin/vchkpw", "/bin/true"], uid=89)


@pytest.mark.timeout(LIMIT)
async def test_timeout_kills_the_process_group(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The program and its child die; the verdict is a temporary failure."""
    fifo = tmp_path / "pids"
    os.mkfifo(fifo)
    v = verifier(timeout=10)
    results: list[Verdict] = []

    async def run() -> None:
        results.append(await check(v, "slow", b"x", CHECKPW_PIDS=str(fifo)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        pids = [int(p) for p in (await trio.to_thread.run_sync(fifo.read_text)).split()]
        pidfds = [os.pidfd_open(pid) for pid in pids]
        mock_clock.jump(11)
    assert results == [Verdict.TEMPFAIL]
    try:
        for pidfd in pidfds:  # readable once the process has died (SIGKILL: at once)
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


async def test_the_password_never_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG, for every outcome, nothing logged or returned holds the password."""
    password = b"Tr0ub4dor&3"
    v = verifier()
    results = []
    with caplog.at_level(logging.DEBUG):
        for user in ("alice", "bob", "tempfail", "noisy"):
            results.append(await v.verify(creds(user, password), ENV))
    assert {r.verdict for r in results} == {Verdict.BAD, Verdict.TEMPFAIL}
    text = caplog.text + "".join(repr(r) + str(r.reply.raw) for r in results)
    assert password.decode() not in text
