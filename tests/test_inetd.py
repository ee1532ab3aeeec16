"""`tlsfront inetd -p PROFILE`: one connection on stdin/stdout, as a real process.

Over a socket pair (inetd, systemd `Accept=yes`) and under a real `tcpserver`,
as a daemontools or runit run script starts it. tlsfront is one link of a
UCSPI chain there: what its own environment holds (the run script's exports,
what tcpserver's rules set for the client, RELAYCLIENT included) reaches the
backend, as through rblsmtpd; the variables tlsfront owns (the client's
address and name, the SSL_* ones) are its own whatever it inherited; the
profile's `rules` apply on top.
"""

from __future__ import annotations

import json
import os
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
import trustme
from support.front import BACKENDS, capture_backend, toml_str
from support.ucspi import Lines, sessions, tcpserver

from tlsfront.config.files import load_config
from tlsfront.inbound.server import Server

QUEUE = BACKENDS / "queue.py"

PROFILE = """
[profile.smtp]
hostname = "front.example.org"
cert = {cert}
backend = {backend}
rules = {rules}
"""


def write_setup(tmp_path: Path, tls_dir: Path, rules: str, *extra: str) -> tuple[Path, Path]:
    """A config with a capture backend and these tcprules; (config, capture dir)."""
    capture = tmp_path / "capture"
    capture.mkdir()
    rules_path = tmp_path / "tcp.smtp"
    rules_path.write_text(rules)
    config = tmp_path / "tlsfront.toml"
    config.write_text(
        PROFILE.format(
            cert=toml_str(tls_dir / "servercert.pem"),
            backend=capture_backend(capture, *extra),
            rules=toml_str(rules_path),
        )
    )
    return config, capture


def queue_program(tmp_path: Path) -> Path:
    """A QMAILQUEUE program recording what it is given into tmp_path/queued."""
    (tmp_path / "queued").mkdir()
    script = tmp_path / "queue"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {QUEUE} {tmp_path / 'queued'}\n")
    script.chmod(0o755)
    return script


def queued_messages(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("queued-*.json"))]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tlsfront", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def inetd_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "tlsfront", "inetd", "-p", "smtp", "-c", str(config)]


def spawn(config: Path, sock: socket.socket, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`tlsfront inetd` with `sock` as its standard input and output."""
    with sock:
        return subprocess.Popen(
            inetd_argv(config),
            stdin=sock.fileno(),
            stdout=sock.fileno(),
            stderr=subprocess.PIPE,
            env={"PATH": os.environ["PATH"], **env},
        )


async def finish(process: subprocess.Popen[bytes]) -> str:
    """Wait for the process to exit 0; its log."""
    with trio.fail_after(30):
        code = await trio.to_thread.run_sync(process.wait)
    assert process.stderr is not None
    with process.stderr:
        log = process.stderr.read().decode()
    assert code == 0, log
    return log


PARENT_ENV = {
    # what tcpserver would set for a client 192.0.2.7:4711 on 192.0.2.1:25
    "PROTO": "TCP",
    "TCPREMOTEIP": "192.0.2.7",
    "TCPREMOTEPORT": "4711",
    "TCPLOCALIP": "192.0.2.1",
    "TCPLOCALPORT": "25",
    "TCPREMOTEHOST": "Client.Example.NET.",
    # a run script's export: passed on
    "FROM_PARENT": "yes",
    # owned by tlsfront: what the parent says is replaced or dropped
    "SSL_CLIENT_S_DN": "CN=forged",
    "SSL_PROTOCOL": "forged",
    "LISTEN_FDS": "7",
}


async def test_socketpair_under_tcpserver_variables(
    tmp_path: Path, tls_dir: Path, client_context: ssl.SSLContext
) -> None:
    """STARTTLS and a message over a socket pair; the client is who TCP* says."""
    config, capture = write_setup(
        tmp_path, tls_dir, '192.0.2.7:allow,FROM_RULES="yes"\n:allow,RELAYCLIENT=""\n'
    )
    ours, theirs = socket.socketpair()
    process = spawn(config, theirs, PARENT_ENV)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    with trio.fail_after(30):
        plain = Lines(stream)
        assert (await plain.reply()).startswith(b"220 ")
        assert b"250-STARTTLS\r\n" in await plain.command(b"EHLO client.example.net")
        assert (await plain.command(b"STARTTLS")).startswith(b"220 ")
        tls = trio.SSLStream(stream, client_context, server_hostname="localhost")
        await tls.do_handshake()
        lines = Lines(tls)
        assert b"STARTTLS" not in await lines.command(b"EHLO client.example.net")
        assert (await lines.command(b"MAIL FROM:<a@example.net>")).startswith(b"250 ")
        # no RELAYCLIENT from the parent, nor from the rule for this address
        assert (await lines.command(b"RCPT TO:<c@example.com>")).startswith(b"553 ")
        assert (await lines.command(b"RCPT TO:<b@example.org>")).startswith(b"250 ")
        assert (await lines.command(b"DATA")).startswith(b"354 ")
        assert (await lines.command(b"Subject: hi\r\n\r\nHello.\r\n.")).startswith(b"250 ")
        assert (await lines.command(b"QUIT")).startswith(b"221 ")
        await tls.aclose()
    log = await finish(process)
    assert "client=192.0.2.7:4711 profile=smtp tls=TLSv1." in log
    _, after_tls = sessions(capture)
    env = after_tls["env"]
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("192.0.2.7", "4711")
    assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == ("192.0.2.1", "25")
    assert env["TCPREMOTEHOST"] == "client.example.net"
    assert env["FROM_RULES"] == "yes"  # the profile's rules, for the address tcpserver named
    assert "RELAYCLIENT" not in env
    assert env["FROM_PARENT"] == "yes"
    assert "SSL_CLIENT_S_DN" not in env
    assert env["SSL_PROTOCOL"].startswith("TLSv1.")
    assert "LISTEN_FDS" not in env
    (body,) = after_tls["messages"]
    assert body.startswith(b"Received: from client.example.net ([192.0.2.7])\r\n")


async def test_tcpserver_host_name_meets_host_rules(tmp_path: Path, tls_dir: Path) -> None:
    """TCPREMOTEHOST from tcpserver is the name `=host` keys match, as for its own -x rules."""
    config, capture = write_setup(tmp_path, tls_dir, '=.example.net:allow,FROM_HOST="yes"\n:deny\n')
    ours, theirs = socket.socketpair()
    process = spawn(config, theirs, PARENT_ENV)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    with trio.fail_after(30):
        lines = Lines(stream)
        assert (await lines.reply()).startswith(b"220 ")
        assert (await lines.command(b"QUIT")).startswith(b"221 ")
        await stream.aclose()
    await finish(process)
    (session,) = sessions(capture)
    assert session["env"]["FROM_HOST"] == "yes"
    assert session["env"]["TCPREMOTEHOST"] == "client.example.net"


async def test_accepted_socket_gives_the_client_address(tmp_path: Path, tls_dir: Path) -> None:
    """systemd Accept=yes and inetd hand over an accepted TCP socket and no TCP* variables."""
    config, capture = write_setup(tmp_path, tls_dir, '127.0.0.1:allow,FROM_RULES="local"\n')
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        local_port, client_port = listener.getsockname()[1], client.getsockname()[1]
    process = spawn(config, accepted, {"FROM_UNIT": "yes"})
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
    with trio.fail_after(30):
        lines = Lines(stream)
        assert (await lines.reply()).startswith(b"220 ")
        assert (await lines.command(b"HELO c")).startswith(b"250 ")
        assert (await lines.command(b"MAIL FROM:<a@example.net>")).startswith(b"250 ")
        assert (await lines.command(b"RCPT TO:<c@example.com>")).startswith(b"553 ")
        assert (await lines.command(b"QUIT")).startswith(b"221 ")
        await stream.aclose()
    await finish(process)
    (session,) = sessions(capture)
    env = session["env"]
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("127.0.0.1", str(client_port))
    assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == ("127.0.0.1", str(local_port))
    assert env["FROM_RULES"] == "local"
    assert env["FROM_UNIT"] == "yes"  # the unit's Environment=, as a run script's export
    assert "RELAYCLIENT" not in env
    assert "TCPREMOTEHOST" not in env


async def test_socketpair_deny_closes_before_any_smtp(tmp_path: Path, tls_dir: Path) -> None:
    config, capture = write_setup(tmp_path, tls_dir, "192.0.2.1-9:deny\n:allow\n")
    ours, theirs = socket.socketpair()
    process = spawn(config, theirs, PARENT_ENV)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    with trio.fail_after(30):
        assert await stream.receive_some() == b""
        await stream.aclose()
    log = await finish(process)
    assert "[192.0.2.7] denied by " in log
    assert f"{tmp_path / 'tcp.smtp'}:1" in log
    assert sessions(capture) == []


# ---------------------------------------------------------------- under tcpserver


def smtp_session(
    port: int, context: ssl.SSLContext, recipients: list[str]
) -> tuple[dict[str, tuple[int, bytes]], int]:
    """STARTTLS, one message; (refused recipients, the client's own port)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        assert smtp.sock is not None
        client_port = smtp.sock.getsockname()[1]
        smtp.starttls(context=context)
        refused = smtp.sendmail("a@example.net", recipients, b"Subject: hi\r\n\r\nHello.\r\n")
    return refused, client_port


async def test_under_tcpserver(
    tmp_path: Path, tls_dir: Path, client_context: ssl.SSLContext
) -> None:
    """`tcpserver ... tlsfront inetd -p smtp`: the run-script drop-in.

    The run script exports QMAILQUEUE (a capture program standing in for
    simscan) and DATABYTES; tcpserver's own rules (-x) give 127.0.0.1
    RELAYCLIENT and a variable. The backend gets all of it, as qmail-smtpd
    got it from tcpserver: the message is relayed, and queued through the
    run script's QMAILQUEUE.
    """
    config, capture = write_setup(
        tmp_path, tls_dir, '127.0.0.1:allow,FROM_RULES="yes"\n', "--qmailqueue"
    )
    queue = queue_program(tmp_path)
    outer = tmp_path / "tcp.outer"
    outer.write_text('127.0.0.1:allow,RELAYCLIENT="",FROM_TCPSERVER="yes"\n:deny\n')
    log = tmp_path / "tcpserver.log"
    exports = {"QMAILQUEUE": str(queue), "DATABYTES": "20000000", "CHKUSER_START": "ALWAYS"}
    async with tcpserver(inetd_argv(config), log, rules=outer, env=exports) as port:
        with trio.fail_after(60):
            refused, client_port = await trio.to_thread.run_sync(
                lambda: smtp_session(port, client_context, ["b@example.org", "c@example.com"])
            )
    assert refused == {}  # tcp.smtp's RELAYCLIENT for 127.0.0.1 lets it relay
    assert "tcpserver: ok " in log.read_text()
    plain, after_tls = sessions(capture)
    for session in (plain, after_tls):
        env = session["env"]
        assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("127.0.0.1", str(client_port))
        assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == ("127.0.0.1", str(port))
        assert env["FROM_RULES"] == "yes"
        assert env["FROM_TCPSERVER"] == "yes"
        assert env["RELAYCLIENT"] == ""
        assert (env["DATABYTES"], env["CHKUSER_START"]) == ("20000000", "ALWAYS")
    assert after_tls["env"]["SSL_PROTOCOL"].startswith("TLSv1.")
    (envelope,) = after_tls["envelopes"]
    assert envelope["to"] == ["b@example.org", "c@example.com"]
    assert after_tls["queued"] == [0]
    (queued,) = queued_messages(tmp_path / "queued")
    assert queued["from"] == "a@example.net"
    assert queued["to"] == ["b@example.org", "c@example.com"]
    assert "Hello." in queued["message"]


async def test_under_tcpserver_without_a_relay_rule(
    tmp_path: Path, tls_dir: Path, client_context: ssl.SSLContext
) -> None:
    """The control: without tcp.smtp's RELAYCLIENT the same client may not relay."""
    config, capture = write_setup(tmp_path, tls_dir, ":allow\n")
    outer = tmp_path / "tcp.outer"
    outer.write_text('127.0.0.1:allow,FROM_TCPSERVER="yes"\n:deny\n')
    async with tcpserver(inetd_argv(config), tmp_path / "tcpserver.log", rules=outer) as port:
        with trio.fail_after(60):
            refused, _ = await trio.to_thread.run_sync(
                lambda: smtp_session(port, client_context, ["b@example.org", "c@example.com"])
            )
    assert list(refused) == ["c@example.com"]
    assert refused["c@example.com"][0] == 553
    _, after_tls = sessions(capture)
    assert after_tls["env"]["FROM_TCPSERVER"] == "yes"
    assert "RELAYCLIENT" not in after_tls["env"]


async def test_under_tcpserver_rules_deny(tmp_path: Path, tls_dir: Path) -> None:
    config, capture = write_setup(tmp_path, tls_dir, "127.0.0.1:deny\n")
    log = tmp_path / "tcpserver.log"
    async with tcpserver(inetd_argv(config), log) as port:
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            assert await stream.receive_some() == b""
            await stream.aclose()
    assert sessions(capture) == []


async def test_under_tcpserver_relay_by_certificate(
    tmp_path: Path, tls_dir: Path, ca: trustme.CA
) -> None:
    """The qmail-tls way through the run script: a listed certificate relays."""
    config, capture = write_setup(tmp_path, tls_dir, ":allow\n")
    tlsclients = tmp_path / "tlsclients"
    tlsclients.write_text("alice@example.net\n")
    config.write_text(
        config.read_text()
        + f'client_cert = "request"\nclient_ca = {toml_str(tls_dir / "ca.pem")}\n'
        + f"relay_clients = {toml_str(tlsclients)}\n"
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    ca.issue_cert("alice@example.net").configure_cert(context)
    async with tcpserver(inetd_argv(config), tmp_path / "tcpserver.log") as port:
        with trio.fail_after(60):
            refused, _ = await trio.to_thread.run_sync(
                lambda: smtp_session(port, context, ["c@example.com"])
            )
    assert refused == {}
    _, after_tls = sessions(capture)
    assert after_tls["env"]["RELAYCLIENT"] == ""
    assert after_tls["envelopes"][0]["to"] == ["c@example.com"]


async def test_rules_that_do_not_load_close_the_connection(tmp_path: Path, tls_dir: Path) -> None:
    """No earlier rules to fall back on: closed, not open to all (tcpserver without its cdb)."""
    config, capture = write_setup(tmp_path, tls_dir, "192.0.2.:deny\n:allow,RELAYCLIENT\n")
    ours, theirs = socket.socketpair()
    process = spawn(config, theirs, PARENT_ENV)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    with trio.fail_after(30):
        assert await stream.receive_some() == b""
        await stream.aclose()
        code = await trio.to_thread.run_sync(process.wait)
    assert process.stderr is not None
    with process.stderr:
        log = process.stderr.read().decode()
    assert code == 1
    assert f"{tmp_path / 'tcp.smtp'}:2: " in log
    assert "connection closed" in log
    assert sessions(capture) == []


# -- a profile served only through inetd ---------------------------------------------


INETD_ONLY = """\
[profile.smtp]
tls = "none"
backend = ["/bin/cat"]
"""


def test_a_profile_for_inetd_needs_no_listen(tmp_path: Path) -> None:
    """It loads and passes check; `run` refuses a configuration with nothing to
    listen for, and skips such a profile beside one that listens."""
    config = tmp_path / "tlsfront.toml"
    config.write_text(INETD_ONLY)
    assert load_config(config).profiles["smtp"].listen == ()
    checked = run_cli("check", "-c", str(config))
    assert checked.returncode == 0, checked.stdout
    assert "served only through tlsfront inetd -p smtp" in checked.stdout
    ran = run_cli("run", "-c", str(config))
    assert ran.returncode == 1
    assert "no profile has listen or systemd" in ran.stderr


async def test_run_skips_an_inetd_only_profile(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = tmp_path / "tlsfront.toml"
    config.write_text(
        INETD_ONLY + '[profile.other]\nlisten = ["127.0.0.1:0"]\ntls = "none"\n'
        'backend = ["/bin/cat"]\n'
    )
    server = await nursery.start(Server(load_config(config)).run)
    assert server.addresses["smtp"] == []
    assert len(server.addresses["other"]) == 1
    server.stop()
