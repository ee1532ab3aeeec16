"""The inetd starter and the handoff socket, as real processes under a real tcpserver.

A run script that runs `python3 -S -E tlsfront/starter.py -p smtp ...` where it
ran `tlsfront inetd -p smtp ...` has each connection handed to a running
`tlsfront run` (descriptor passing over its `handoff_socket`), which serves
it as `tlsfront inetd` would have; without a daemon the starter becomes
`tlsfront inetd` itself.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from support.daemon import passing_sockets
from support.front import toml_str
from support.ucspi import Lines, sessions, tcpserver
from test_inetd import smtp_session, write_setup

import tlsfront.starter

STARTER = Path(tlsfront.starter.__file__)

# what a run script exports, which `tlsfront inetd` sees as its environment
RUN_SCRIPT_ENV = {"DATABYTES": "1000000", "FROM_RUN_SCRIPT": "yes"}

# variables that differ from one connection to the next
PER_CONNECTION = {"TCPREMOTEPORT", "SSL_SESSION_ID"}


def starter_argv(config: Path, handoff: Path, profile: str = "smtp") -> list[str]:
    return [
        sys.executable,
        "-S",
        "-E",
        str(STARTER),
        "-s",
        str(handoff),
        "-p",
        profile,
        "-c",
        str(config),
    ]


def add_handoff(config: Path, handoff: Path, extra: str = "", workers: int = 1) -> None:
    """[defaults] with the handoff socket, `workers`, a short grace."""
    text = f"[defaults]\nhandoff_socket = {toml_str(handoff)}\nworkers = {workers}\n"
    text += "shutdown_grace = 1\n"
    if os.geteuid() == 0:
        text += "allow_root_backend = true  # as root (CI), the capture backend stays root\n"
    config.write_text(text + extra + config.read_text())


class Daemon:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.log = b""

    def text(self) -> str:
        return self.log.decode(errors="replace")


@asynccontextmanager
async def daemon(config: Path) -> AsyncIterator[Daemon]:
    """`tlsfront run -c CONFIG` until the block ends, once its handoff socket listens."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tlsfront", "run", "-c", str(config)],
        stderr=subprocess.PIPE,
        env={"PATH": os.environ["PATH"]},
    )
    assert process.stderr is not None
    running = Daemon(process)
    listening = trio.Event()

    async def read_log() -> None:
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some():
            running.log += chunk
            if b"handoff: listening on" in running.log:
                listening.set()
        listening.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            with trio.fail_after(30):
                await listening.wait()
            assert process.returncode is None, running.text()
            try:
                yield running
            finally:
                with trio.CancelScope(shield=True), trio.fail_after(30):
                    process.terminate()
                    await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def spawn_starter(argv: list[str], sock: socket.socket) -> subprocess.Popen[bytes]:
    """The starter with `sock` as its standard input and output, as inetd runs it."""
    with sock:
        return subprocess.Popen(
            argv,
            stdin=sock.fileno(),
            stdout=sock.fileno(),
            stderr=subprocess.PIPE,
            env={"PATH": os.environ["PATH"]},
        )


def backend_env(record: dict[str, object]) -> dict[str, str]:
    env = record["env"]
    assert isinstance(env, dict)
    return {k: v for k, v in env.items() if k not in PER_CONNECTION}


async def test_handed_over_under_tcpserver(
    tmp_path: Path, tls_dir: Path, client_context: ssl.SSLContext
) -> None:
    """tcpserver + the starter: the daemon serves the session, with the
    environment the in-process `tlsfront inetd` gives the backend, and the
    starter lives until the session ends (tcpserver's -c keeps counting)."""
    config, capture = write_setup(tmp_path, tls_dir, '127.0.0.1:allow,FROM_RULES="yes"\n')
    handoff = tmp_path / "run" / "handoff.sock"
    add_handoff(config, handoff)
    log = tmp_path / "tcpserver.log"
    async with daemon(config) as running:
        assert handoff.is_socket()
        assert handoff.stat().st_mode & 0o777 == 0o600
        async with tcpserver(starter_argv(config, handoff), log, env=RUN_SCRIPT_ENV) as port:
            with trio.fail_after(60):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                lines = Lines(stream)
                assert (await lines.reply()).startswith(b"220 ")
                # the starter, tcpserver's child, is still there while the session runs
                (pid,) = [
                    int(line.split()[2])
                    for line in log.read_text().splitlines()
                    if line.startswith("tcpserver: pid ")
                ]
                os.kill(pid, 0)
                assert (await lines.command(b"QUIT")).startswith(b"221 ")
                assert await stream.receive_some() == b""
                await stream.aclose()
                refused, client_port = await trio.to_thread.run_sync(
                    lambda: smtp_session(port, client_context, ["b@example.org"])
                )
    assert refused == {}
    assert f"client=127.0.0.1:{client_port} profile=smtp tls=TLSv1." in running.text()
    assert f"tcpserver: end {pid} status 0" in log.read_text()
    # one backend: the QUIT-only session needed none, the other one at MAIL
    (after_tls,) = sessions(capture)
    assert (after_tls["env"]["TCPREMOTEIP"], after_tls["env"]["TCPREMOTEPORT"]) == (
        "127.0.0.1",
        str(client_port),
    )
    assert after_tls["env"]["TCPLOCALPORT"] == str(port)
    assert after_tls["env"]["FROM_RULES"] == "yes"
    # the run script's exports reach the backend, as under tlsfront inetd
    assert after_tls["env"]["FROM_RUN_SCRIPT"] == "yes"
    assert after_tls["env"]["DATABYTES"] == "1000000"
    assert after_tls["envelopes"][0]["to"] == ["b@example.org"]
    (body,) = after_tls["messages"]
    assert b"by front.example.org (tlsfront) with ESMTPS" in body

    # the same connection served in-process (no daemon): the same environment
    async with tcpserver(starter_argv(config, handoff), log, env=RUN_SCRIPT_ENV) as port:
        with trio.fail_after(60):
            await trio.to_thread.run_sync(
                lambda: smtp_session(port, client_context, ["b@example.org"])
            )
    # in-process (tlsfront inetd) the backend starts at connect: a plaintext one too
    _, plain_here, after_tls_here = sessions(capture)
    assert "SSL_PROTOCOL" not in plain_here["env"]
    assert backend_env(after_tls_here) == backend_env(after_tls) | {"TCPLOCALPORT": str(port)}


async def test_handed_over_to_workers(
    tmp_path: Path, tls_dir: Path, client_context: ssl.SSLContext
) -> None:
    """workers = 2: the parent binds the handoff socket, a worker takes the session;
    the socket file goes when the daemon stops. (No profile has a listen: the
    handoff socket is all the daemon serves.)"""
    config, capture = write_setup(tmp_path, tls_dir, ":allow\n")
    assert "listen" not in config.read_text()
    handoff = tmp_path / "handoff.sock"
    add_handoff(config, handoff, workers=2)
    log = tmp_path / "tcpserver.log"
    async with daemon(config) as running, tcpserver(starter_argv(config, handoff), log) as port:
        with trio.fail_after(60):
            refused, client_port = await trio.to_thread.run_sync(
                lambda: smtp_session(port, client_context, ["b@example.org"])
            )
    assert refused == {}
    assert "starting 2 workers" in running.text()
    assert f"client=127.0.0.1:{client_port} profile=smtp tls=TLSv1." in running.text()
    assert not handoff.exists()
    (after_tls,) = sessions(capture)  # one backend, at MAIL
    assert after_tls["envelopes"][0]["to"] == ["b@example.org"]


def spawn_systemd_style(argv: list[str], sock: socket.socket) -> subprocess.Popen[bytes]:
    """`argv` with the connection as fd 3 and LISTEN_FDS=1, as systemd Accept=yes
    without StandardInput=socket starts it; stdin and stdout are not the client."""
    wrapped, fds = passing_sockets([sock], ["connection"], argv)
    with sock:
        return subprocess.Popen(
            wrapped,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": os.environ["PATH"], "FROM_UNIT": "yes"},
        )


async def test_systemd_connection_on_fd_3(tmp_path: Path, tls_dir: Path) -> None:
    """LISTEN_FDS=1 for the starter itself: fd 3 is the connection handed over
    (that LISTEN_* is not sent along: test_message_round_trip)."""
    config, capture = write_setup(tmp_path, tls_dir, ":allow\n")
    handoff = tmp_path / "handoff.sock"
    add_handoff(config, handoff)
    async with daemon(config) as running:
        ours, theirs = socket.socketpair()
        starter = spawn_systemd_style(starter_argv(config, handoff), theirs)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        with trio.fail_after(60):
            lines = Lines(stream)
            assert (await lines.reply()).startswith(b"220 ")
            # MAIL starts the backend (on demand in the daemon)
            assert (await lines.command(b"MAIL FROM:<a@example.net>")).startswith(b"250 ")
            assert (await lines.command(b"QUIT")).startswith(b"221 ")
            await stream.aclose()
            assert await trio.to_thread.run_sync(starter.wait) == 0
    assert starter.stderr is not None
    with starter.stderr:
        assert starter.stderr.read() == b""  # handed over, no fallback
    assert " client=0.0.0.0:0 profile=smtp tls=none " in running.text()
    (session,) = sessions(capture)
    assert session["env"]["TCPREMOTEIP"] == "0.0.0.0"


async def test_no_daemon_serves_in_process(
    tmp_path: Path, tls_dir: Path, client_context: ssl.SSLContext
) -> None:
    """Nothing at the handoff socket: the starter becomes `tlsfront inetd`."""
    config, capture = write_setup(tmp_path, tls_dir, ":allow\n")
    handoff = tmp_path / "nobody-here.sock"
    log = tmp_path / "tcpserver.log"
    async with tcpserver(starter_argv(config, handoff), log) as port:
        with trio.fail_after(60):
            refused, client_port = await trio.to_thread.run_sync(
                lambda: smtp_session(port, client_context, ["b@example.org"])
            )
    assert refused == {}
    _, after_tls = sessions(capture)
    assert after_tls["env"]["TCPREMOTEPORT"] == str(client_port)
    assert after_tls["envelopes"][0]["to"] == ["b@example.org"]
    assert "handoff refused" not in log.read_text()  # no daemon is not worth a line


async def test_unknown_profile_is_answered_no(tmp_path: Path, tls_dir: Path) -> None:
    """A profile the daemon lacks: `-`, and the starter keeps the connection."""
    config, capture = write_setup(tmp_path, tls_dir, ":allow\n")
    handoff = tmp_path / "handoff.sock"
    add_handoff(config, handoff)
    async with daemon(config) as running:
        ours, theirs = socket.socketpair()
        with ours, theirs, socket.socket(socket.AF_UNIX) as conn:
            with trio.fail_after(30):
                await trio.to_thread.run_sync(conn.connect, str(handoff))
                data = tlsfront.starter.message("nosuch", {b"A": b"1"})
                socket.send_fds(conn, [data], [theirs.fileno()])
                answer = await trio.to_thread.run_sync(conn.recv, 100)
    assert answer.startswith(b"-no inbound profile 'nosuch'")
    assert "handoff: no inbound profile 'nosuch'" in running.text()
    assert sessions(capture) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the socket to another account")
async def test_other_uid_refused(tmp_path: Path, tls_dir: Path) -> None:
    """handoff_user = nobody: the socket is nobody's, 0600, and root's connection
    (which file permissions do not stop) is closed by the SO_PEERCRED check."""
    config, capture = write_setup(tmp_path, tls_dir, ":allow\n")
    handoff = tmp_path / "handoff.sock"
    add_handoff(config, handoff, 'handoff_user = "nobody"\n')
    nobody = 65534
    async with daemon(config) as running:
        st = handoff.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (nobody, 0o600)
        ours, theirs = socket.socketpair()
        with ours, theirs, socket.socket(socket.AF_UNIX) as conn:
            with trio.fail_after(30):
                await trio.to_thread.run_sync(conn.connect, str(handoff))
                data = tlsfront.starter.message("smtp", {})
                try:
                    socket.send_fds(conn, [data], [theirs.fileno()])
                    answer = await trio.to_thread.run_sync(conn.recv, 100)
                except ConnectionError:
                    answer = b""  # closed on with the message unread: a reset
            assert answer == b""
            theirs.close()
            # the connection was not taken: no greeting, the client end just closes
            with trio.fail_after(30):
                assert await trio.to_thread.run_sync(ours.recv, 100) == b""
        # the starter, refused the same way, says so and serves the connection itself
        ours, theirs = socket.socketpair()
        starter = spawn_starter(starter_argv(config, handoff), theirs)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        with trio.fail_after(60):
            lines = Lines(stream)
            assert (await lines.reply()).startswith(b"220 ")
            assert (await lines.command(b"QUIT")).startswith(b"221 ")
            await stream.aclose()
            assert await trio.to_thread.run_sync(starter.wait) == 0
    assert f"handoff: refused a connection from uid 0 (allowed: {nobody})" in running.text()
    assert starter.stderr is not None
    with starter.stderr:
        said = starter.stderr.read().decode()
    (line,) = [line for line in said.splitlines() if line.startswith("tlsfront starter:")]
    # closed on before or after the message was read: "closed", or a reset
    assert line.startswith(f"tlsfront starter: handoff refused: {handoff}: ")
    assert line.endswith(": serving in-process")
    (session,) = sessions(capture)  # served by the starter's own tlsfront inetd
    assert session["env"]["TCPREMOTEIP"] == "0.0.0.0"


def test_check_names_the_handoff_account(tmp_path: Path, tls_dir: Path) -> None:
    """`tlsfront check`: an account that does not exist is an error."""
    from tlsfront.config.files import load_chosen
    from tlsfront.ops.check import check_config

    config, _ = write_setup(tmp_path, tls_dir, ":allow\n")
    add_handoff(config, tmp_path / "handoff.sock", 'handoff_user = "no-such-account"\n')
    loaded = load_chosen(str(config))
    assert loaded is not None
    report = check_config(loaded)
    assert "handoff_user: no account 'no-such-account'" in report.errors
    config.write_text(config.read_text().replace('"no-such-account"', '"4242"'))
    loaded = load_chosen(str(config))
    assert loaded is not None
    report = check_config(loaded)
    assert not report.errors
    assert f"handoff socket {tmp_path / 'handoff.sock'} for uid 4242" in report.notes


def test_message_round_trip() -> None:
    """What the starter sends is what the daemon reads; systemd's LISTEN_* stay behind."""
    from tlsfront.inbound.handoff import MAGIC, parse_message

    environ = {
        b"TCPREMOTEIP": b"192.0.2.7",
        b"EMPTY": b"",
        b"WITH_EQUALS": b"a=b",
        b"LATIN1": b"caf\xe9",
        b"LISTEN_FDS": b"1",
        b"LISTEN_PID": b"42",
    }
    data = tlsfront.starter.message("smtp", environ)
    assert data.startswith(MAGIC)
    size = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "big")
    body = data[len(MAGIC) + 4 :]
    assert len(body) == size
    profile, env = parse_message(body)
    assert profile == "smtp"
    assert env == {
        "TCPREMOTEIP": "192.0.2.7",
        "EMPTY": "",
        "WITH_EQUALS": "a=b",
        "LATIN1": os.fsdecode(b"caf\xe9"),
    }
    with pytest.raises(ValueError, match="malformed environment entry"):
        parse_message(b"smtp\0NOEQUALS\0")


def test_starter_arguments() -> None:
    parse = tlsfront.starter.parse
    assert parse(["-p", "smtp"]) == ("smtp", None, tlsfront.starter.DEFAULT_SOCKET)
    assert parse(["-psmtp", "-c", "/etc/t.toml", "--socket", "/s"]) == ("smtp", "/etc/t.toml", "/s")
    assert parse(["--profile", "smtps", "--config", "c"])[:2] == ("smtps", "c")
    for wrong in ([], ["-c", "x"], ["-p"], ["-x", "y", "-p", "smtp"]):
        with pytest.raises(ValueError, match=r"^-"):
            parse(wrong)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the socket to another account")
def test_socket_for_the_serving_account(tmp_path: Path) -> None:
    """Started as root with workers that become an account: without handoff_user
    the socket is that account's; a stale file is replaced, a live one refused."""
    from tlsfront.config.schema import Settings
    from tlsfront.inbound.handoff import HandoffError, HandoffSocket

    path = tmp_path / "run" / "handoff.sock"
    settings = Settings(hostname="h", state_dir=tmp_path, handoff_socket=path)
    handoff = HandoffSocket.bind(settings, 65534)
    assert handoff is not None
    try:
        st = path.stat()
        assert (handoff.uid, st.st_uid, st.st_mode & 0o777) == (65534, 65534, 0o600)
        assert path.parent.stat().st_mode & 0o777 == 0o755
        with pytest.raises(HandoffError, match="another process listens on it"):
            HandoffSocket.bind(settings)
    finally:
        handoff.sock.close()  # as a crash would leave it: the file stays
    assert path.is_socket()
    again = HandoffSocket.bind(settings)  # nobody listens: replaced
    assert again is not None
    assert again.uid == 0
    again.close()
    assert not path.exists()
