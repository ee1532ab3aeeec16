"""`tlsfront inetd` over a real socket pair; STARTTLS when the certificate cannot load."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import trio
from support.front import capture_backend


async def test_starttls_with_a_broken_certificate_gets_454(tmp_path: Path) -> None:
    """threat `starttls-rules`: 454 4.7.0 when TLS cannot be had; mail still flows in clear."""
    broken = tmp_path / "servercert.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    capture = tmp_path / "capture"
    capture.mkdir()
    config = tmp_path / "tlsfront.toml"
    config.write_text(
        f'[profile.smtp]\nlisten = ["127.0.0.1:0"]\ncert = "{broken}"\n'
        f'hostname = "front.example.org"\nbackend = {capture_backend(capture)}\n'
    )
    ours, theirs = socket.socketpair()
    with theirs:
        process = subprocess.Popen(  # noqa: ASYNC220 (started once, before any I/O)
            [sys.executable, "-m", "tlsfront", "inetd", "-p", "smtp", "-c", str(config)],
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=subprocess.PIPE,
        )
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    replies = b""
    with trio.fail_after(30):
        assert (await stream.receive_some()).startswith(b"220 ")
        await stream.send_all(b"EHLO c\r\n")
        while not replies.endswith(b"250 8BITMIME\r\n"):
            replies += await stream.receive_some()
        assert b"250-STARTTLS\r\n" in replies
        await stream.send_all(b"STARTTLS\r\n")
        assert (
            await stream.receive_some() == b"454 4.7.0 TLS not available due to local problem\r\n"
        )
        await stream.send_all(b"QUIT\r\n")
        assert (await stream.receive_some()).startswith(b"221 ")
        await stream.aclose()
        await trio.to_thread.run_sync(process.wait)
    assert process.stderr is not None
    with process.stderr:
        log = process.stderr.read().decode()
    assert str(broken) in log
    assert "TLS unavailable" in log
