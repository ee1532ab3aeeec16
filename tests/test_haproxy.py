"""A real HAProxy in front of two tlsfront instances, PROXY protocol v2 and v1.

The client connects from 127.0.0.2, HAProxy connects to tlsfront from
127.0.0.3 (the only trusted address): the backend must see 127.0.0.2 and
the client's own port, never HAProxy's. HAProxy's listening socket is made
here (port 0) and handed over as an inherited descriptor (`bind fd@N`), so
no port is guessed.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
from support.front import Front, need_tool

CLIENT_IP = "127.0.0.2"
BALANCER_IP = "127.0.0.3"

INSTANCE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
hostname = "{name}.example.org"
tls = "starttls"
cert = {{cert}}
backend = {{backend}}
proxy_protocol = true
proxy_trusted = ["{balancer}/32"]
"""

MESSAGE = b"From: a@example.net\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


def haproxy_config(fd: int, servers: list[tuple[str, int, str]]) -> str:
    lines = [
        "global",
        "    maxconn 100",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 30s",
        "    timeout server 30s",
        "frontend smtp",
        f"    bind fd@{fd}",
        "    default_backend fronts",
        "backend fronts",
        "    balance roundrobin",
    ]
    lines += [
        f"    server {name} 127.0.0.1:{port} {option} source {BALANCER_IP}"
        for name, port, option in servers
    ]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def haproxy(tmp_path: Path, servers: list[tuple[str, int, str]]) -> AsyncIterator[int]:
    """Run HAProxy; yields the port its frontend listens on."""
    binary = need_tool("haproxy")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(listener.fileno(), servers))
    log = tmp_path / "haproxy.log"
    check = await trio.run_process(
        [binary, "-c", "-q", "-f", str(config)],
        check=False,
        pass_fds=(listener.fileno(),),
        capture_stderr=True,
    )
    assert check.returncode == 0, check.stderr.decode()
    with log.open("wb") as errors:
        process = await trio.lowlevel.open_process(
            [binary, "-db", "-f", str(config)],
            pass_fds=(listener.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=errors,
            stderr=errors,
        )
    try:
        yield listener.getsockname()[1]
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        listener.close()


def send_through(port: int, context: ssl.SSLContext) -> int:
    """One STARTTLS session from CLIENT_IP; returns the client's port."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(CLIENT_IP, 0)) as smtp:
        assert smtp.sock is not None
        client_port = int(smtp.sock.getsockname()[1])
        smtp.ehlo("client.example.net")
        smtp.starttls(context=context)
        smtp.ehlo("client.example.net")
        assert smtp.sendmail("a@example.net", ["b@example.org"], MESSAGE) == {}
    return client_port


async def test_haproxy_in_front_of_two_instances(
    start_front: Any, client_context: ssl.SSLContext, tmp_path: Path, clean_environ: None
) -> None:
    need_tool("haproxy")
    a: Front = await start_front(INSTANCE.format(name="a", balancer=BALANCER_IP))
    b: Front = await start_front(INSTANCE.format(name="b", balancer=BALANCER_IP))
    servers = [("a", a.port("smtp"), "send-proxy-v2"), ("b", b.port("smtp"), "send-proxy")]
    async with haproxy(tmp_path, servers) as port:
        with trio.fail_after(60):
            ports = [
                await trio.to_thread.run_sync(send_through, port, client_context) for _ in range(4)
            ]
    # Both instances share the capture directory; TCPLOCALHOST tells them apart.
    records = a.sessions()
    assert len(records) == 4  # four sessions, a backend each (started at MAIL, inside TLS)
    by_instance: dict[str, int] = {}
    for record in records:
        env = record["env"]
        assert env["TCPREMOTEIP"] == CLIENT_IP
        assert int(env["TCPREMOTEPORT"]) in ports
        # what the client connected to: HAProxy's frontend
        assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == ("127.0.0.1", str(port))
        by_instance[env["TCPLOCALHOST"]] = by_instance.get(env["TCPLOCALHOST"], 0) + 1
        for message in record["messages"]:
            assert message.startswith(f"Received: from client.example.net ([{CLIENT_IP}])".encode())
    # round robin: v2 (a) and v1 (b) both carried sessions
    assert by_instance == {"a.example.org": 2, "b.example.org": 2}
    assert sorted({int(r["env"]["TCPREMOTEPORT"]) for r in records}) == sorted(ports)


async def test_direct_connection_from_an_untrusted_address_is_closed(
    start_front: Any, clean_environ: None
) -> None:
    front: Front = await start_front(INSTANCE.format(name="a", balancer=BALANCER_IP))
    with trio.fail_after(30):
        sock = trio.socket.socket()
        await sock.bind((CLIENT_IP, 0))
        await sock.connect(("127.0.0.1", front.port("smtp")))
        header = f"PROXY TCP4 192.0.2.9 127.0.0.1 1 {front.port('smtp')}\r\n".encode()
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(header)
            # closed without a word (a reset when our header was left unread)
            with contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some(100) == b""
    assert front.sessions() == []
