"""The Dovecot verifier against a real Dovecot, and against a silent peer.

The real one runs from a configuration made here (its own base directory, a
passwd-file for alice, a checkpassword passdb that fails temporarily for the
user `tempfail`), as a plain process that the test stops; nothing of the
system's Dovecot is used or changed.
"""

from __future__ import annotations

import base64
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from support.front import need_tool

from tlsfront.auth.dovecot import escape, open_dovecot, unescape
from tlsfront.auth.sasl import Credentials
from tlsfront.auth.secret import Secret
from tlsfront.auth.verifier import Verdict

CHECKPASSWORD = Path(__file__).resolve().parent / "support" / "checkpassword.py"
LIMIT = 20
ENV = {"TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "192.0.2.1", "SSL_PROTOCOL": "TLSv1.3"}
_clients = iter(range(1, 1 << 16))


def client_env() -> dict[str, str]:
    """A new client address each time: Dovecot delays the answers to an address
    that failed before (its own penalty, 2 seconds and doubling), which these
    tests would otherwise wait out."""
    n = next(_clients)
    return {**ENV, "TCPREMOTEIP": f"198.18.{n >> 8}.{n & 255}"}


CASES = [
    ("alice", b"wonderland", Verdict.GOOD),
    ("alice", b"looking-glass", Verdict.BAD),
    ("bob", b"wonderland", Verdict.BAD),
    ("tempfail", b"x", Verdict.TEMPFAIL),
]


class Dovecot:
    def __init__(self, directory: Path, binary: str) -> None:
        self.directory = directory
        self.binary = binary
        self.config = directory / "dovecot.conf"
        self.socket = str(directory / "run" / "auth-client")
        passwd = directory / "passwd"
        passwd.write_text("alice:{PLAIN}wonderland::::::\n")
        helper = directory / "checkpassword"
        helper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{CHECKPASSWORD}" "$@"\n')
        helper.chmod(0o755)
        self.config.write_text(
            f"""
base_dir = {directory}/run
state_dir = {directory}/state
log_path = {directory}/dovecot.log
protocols =
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
passdb {{
  driver = checkpassword
  args = {helper}
  username_filter = tempfail
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth-worker {{
  user = root
}}
"""
        )

    def start(self) -> None:
        """Returns once the auth socket exists (the daemon forks after that)."""
        subprocess.run([self.binary, "-c", str(self.config)], check=True, timeout=LIMIT)

    def stop(self) -> None:
        """Stops the master and every process it started, and waits for them."""
        master = int((self.directory / "run" / "master.pid").read_text())
        pidfds = [os.pidfd_open(pid) for pid in group_members(master)]
        try:
            os.killpg(master, signal.SIGTERM)  # the daemon leads its own group
            poller = select.poll()
            for pidfd in pidfds:
                poller.register(pidfd, select.POLLIN)
                if not poller.poll(LIMIT * 1000):
                    os.killpg(master, signal.SIGKILL)
                    raise AssertionError("dovecot did not stop")
                poller.unregister(pidfd)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                members.append(int(entry.name))
    return members


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    binary = need_tool("dovecot")
    # Short (a socket path has at most 107 bytes), and open to Dovecot's users.
    directory = Path(tempfile.mkdtemp(prefix="tlsfront-dovecot-"))
    directory.chmod(0o755)
    server = Dovecot(directory, binary)
    server.start()
    try:
        yield server
    finally:
        if (directory / "run" / "master.pid").exists():
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def creds(user: str, password: bytes, mechanism: str = "PLAIN") -> Credentials:
    return Credentials(mechanism, user, Secret(password))


async def test_good_bad_and_temporary_on_one_connection(dovecot: Dovecot) -> None:
    with trio.fail_after(LIMIT):
        async with open_dovecot(dovecot.socket) as verifier:
            for user, password, verdict in CASES:
                result = await verifier.verify(creds(user, password), client_env())
                assert (result.verdict, result.user) == (verdict, user)
            login = await verifier.verify(creds("alice", b"wonderland", "LOGIN"), client_env())
            assert login.verdict is Verdict.GOOD
            assert verifier.connections == 1


async def test_concurrent_requests_share_the_connection(dovecot: Dovecot) -> None:
    results: dict[int, Verdict] = {}
    with trio.fail_after(LIMIT):
        async with open_dovecot(dovecot.socket) as verifier:

            async def one(i: int) -> None:
                user, password, _ = CASES[i % len(CASES)]
                results[i] = (await verifier.verify(creds(user, password), client_env())).verdict

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
            assert verifier.connections == 1
    assert results == {i: CASES[i % len(CASES)][2] for i in range(20)}


async def test_reconnects_after_dovecot_restarts(dovecot: Dovecot) -> None:
    with trio.fail_after(LIMIT):
        async with open_dovecot(dovecot.socket) as verifier:
            assert (await verifier.verify(creds("alice", b"wonderland"), client_env())).verdict is (
                Verdict.GOOD
            )
            await trio.to_thread.run_sync(dovecot.stop)
            down = await verifier.verify(creds("alice", b"wonderland"), client_env())
            assert down.verdict is Verdict.TEMPFAIL
            await trio.to_thread.run_sync(dovecot.start)
            assert (await verifier.verify(creds("alice", b"wonderland"), client_env())).verdict is (
                Verdict.GOOD
            )
            assert verifier.connections >= 2


async def test_no_dovecot_is_a_temporary_failure(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with open_dovecot(str(tmp_path / "auth-client")) as verifier:
            result = await verifier.verify(creds("alice", b"wonderland"), client_env())
    assert result.verdict is Verdict.TEMPFAIL
    assert "cannot connect" in result.detail


HANDSHAKE = b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nSPID\t1\nCUID\t1\nCOOKIE\tab\nDONE\n"


async def silent_peer(
    path: Path, seen: list[bytes], task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Completes the handshake, records what it gets, never answers a request."""
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen()
    async with trio.SocketListener(sock) as listener:
        task_status.started()
        async with await listener.accept() as stream:
            await stream.send_all(HANDSHAKE)
            while data := await stream.receive_some():
                seen.append(data)


async def test_a_request_without_answer_times_out(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(silent_peer, tmp_path / "auth-client", seen)
        async with open_dovecot(str(tmp_path / "auth-client"), request_timeout=5) as verifier:
            with trio.fail_after(LIMIT):
                started = trio.current_time()
                result = await verifier.verify(creds("alice", b"wonderland"), ENV)
            assert trio.current_time() - started == pytest.approx(5)
        nursery.cancel_scope.cancel()
    assert result.verdict is Verdict.TEMPFAIL
    assert "timed out" in result.detail
    assert b"wonderland" not in result.detail.encode()
    lines = b"".join(seen).decode().splitlines()
    assert lines[0] == "VERSION\t1\t2"
    assert lines[1].startswith("CPID\t")
    fields = lines[2].split("\t")
    assert fields[:6] == ["AUTH", "1", "PLAIN", "service=smtp", "nologin", "lip=192.0.2.1"]
    assert "rip=192.0.2.7" in fields
    assert "secured" in fields
    assert fields[-1] == "resp=" + base64.b64encode(b"\0alice\0wonderland").decode()


def test_escaping_round_trips() -> None:
    for value in ["plain", "tab\there", "line\nbreak\r", "\x01one", ""]:
        assert unescape(escape(value)) == value
        assert "\t" not in escape(value)
        assert "\n" not in escape(value)
