"""SIGHUP: a new configuration and new files for new sessions, nothing lost.

tlsfront runs as a real process with its socket passed the systemd way and
NOTIFY_SOCKET set, so the test knows exactly when a reload has finished
(RELOADING=1, then READY=1) instead of waiting and hoping.
"""

from __future__ import annotations

import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme
from support.daemon import (
    TLSFRONT,
    Daemon,
    NotifySocket,
    child_environ,
    listening_socket,
    start_daemon,
)
from support.front import capture_backend, toml_str
from support.hostile import Client, code

CONFIG = """
[defaults]
hostname = "{hostname}"
workers = 1  # one process: these tests watch its own notifications
allow_root_backend = true  # as root (CI), the capture backend stays root
state_dir = {state}

[profile.smtp]
systemd = "smtp"
tls = "starttls"
cert = {cert}
backend = {backend}
{extra}
"""

MESSAGE = b"Subject: reload\r\n\r\nHello.\r\n.\r\n"


@dataclass
class Running:
    daemon: Daemon
    notify: NotifySocket
    port: int
    config: Path
    cert: Path
    capture: Path
    tmp_path: Path

    def write_config(self, hostname: str, extra: str = "", cert: Path | None = None) -> None:
        self.config.write_text(
            CONFIG.format(
                hostname=hostname,
                state=toml_str(self.tmp_path / "state"),
                cert=toml_str(cert or self.cert),
                backend=capture_backend(self.capture),
                extra=extra,
            )
        )

    async def reload(self) -> dict[str, str]:
        """SIGHUP; returns the READY=1 message that ends the reload."""
        self.daemon.signal(signal.SIGHUP)
        await self.notify.wait_for("RELOADING", "1")
        return await self.notify.wait_for("READY", "1")

    def maildir(self) -> list[bytes]:
        new = self.capture / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def write_cert(ca: trustme.CA, path: Path, unit: str) -> bytes:
    """A server certificate for localhost, told apart by its OU; returns its DER."""
    leaf = ca.issue_cert("localhost", "127.0.0.1", organization_unit_name=unit)
    staged = path.with_suffix(".new")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(staged))
    staged.replace(path)  # as an ACME client renews: a new file, renamed in place
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


@pytest.fixture
async def running(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Running]:
    capture = tmp_path / "capture"
    capture.mkdir()
    cert = tmp_path / "servercert.pem"
    write_cert(ca, cert, "first")
    sock = listening_socket()
    async with NotifySocket() as notify:
        run = Running(
            None,  # type: ignore[arg-type]  # the daemon is started below
            notify,
            sock.getsockname()[1],
            tmp_path / "tlsfront.toml",
            cert,
            capture,
            tmp_path,
        )
        run.write_config("front.example.org")
        argv = [*TLSFRONT, "run", "-c", str(run.config)]
        env = child_environ(NOTIFY_SOCKET=notify.address)
        run.daemon = await start_daemon(argv, tmp_path, env, [sock], ["smtp"])
        try:
            with trio.fail_after(30):
                await notify.wait_for("READY", "1")
            yield run
        finally:
            await run.daemon.stop()


async def starttls(run: Running, context: ssl.SSLContext) -> tuple[Client, bytes, bytes]:
    """A new session up to TLS: (client, its greeting, the certificate it was shown)."""
    client = await Client.connect(run.port)
    greeting = await client.reply()
    assert code(await client.command(b"EHLO client.example.net")) == 250
    assert code(await client.command(b"STARTTLS")) == 220
    await client.starttls(context)
    assert isinstance(client.stream, trio.SSLStream)
    der = client.stream.getpeercert(binary_form=True)
    assert der is not None
    assert code(await client.command(b"EHLO client.example.net")) == 250
    return client, greeting, der


async def finish_mail(client: Client) -> None:
    assert code(await client.command(b"DATA")) == 354
    await client.send(MESSAGE)
    assert code(await client.reply()) == 250
    assert code(await client.command(b"QUIT")) == 221
    assert await client.rest() == b""
    await client.aclose()


async def start_mail(client: Client) -> None:
    assert code(await client.command(b"MAIL FROM:<a@example.net>")) == 250
    assert code(await client.command(b"RCPT TO:<b@example.org>")) == 250


async def test_reload_under_a_live_session(
    running: Running, ca: trustme.CA, client_context: ssl.SSLContext
) -> None:
    run = running
    with trio.fail_after(60):
        old, greeting, old_der = await starttls(run, client_context)
        assert greeting.startswith(b"220 front.example.org")
        await start_mail(old)  # a transaction in progress across the reload
        new_der_expected = write_cert(ca, run.cert, "renewed")
        assert new_der_expected != old_der
        run.write_config("new.example.org")
        ready = await run.reload()
        assert "reload failed" not in ready.get("STATUS", "")
        # A new session: the new configuration and the new certificate.
        new, greeting, new_der = await starttls(run, client_context)
        assert greeting.startswith(b"220 new.example.org")
        assert new_der == new_der_expected
        # The old session finishes, on the configuration it started with.
        await finish_mail(old)
        await start_mail(new)
        await finish_mail(new)
    first, second = run.maildir()
    assert b"by front.example.org (tlsfront) with ESMTPS" in first
    assert b"by new.example.org (tlsfront) with ESMTPS" in second
    assert "reloaded the configuration" in run.daemon.log()


BROKEN = {
    "toml": ('hostname = "new.example.org"\n[profile.smtp\n', "tlsfront.toml:"),
    "unknown key": ('certt = "x.pem"\n', "key 'certt': unknown key"),
    "missing cert": ("", "nothing-here.pem"),
    "socket renamed": ('systemd = "other"\n', "restart to apply"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
async def test_a_failed_reload_keeps_the_old_configuration(
    running: Running, client_context: ssl.SSLContext, breakage: str
) -> None:
    run = running
    extra, expected = BROKEN[breakage]
    if breakage == "toml":
        run.config.write_text(run.config.read_text() + extra)
    elif breakage == "missing cert":
        run.write_config("new.example.org", cert=run.tmp_path / "nothing-here.pem")
    elif breakage == "socket renamed":
        text = run.config.read_text().replace('systemd = "smtp"\n', "")
        run.config.write_text(text.replace("front.example.org", "new.example.org") + extra)
    else:
        run.write_config("new.example.org", extra)
    with trio.fail_after(60):
        ready = await run.reload()
        assert ready["STATUS"].startswith("reload failed")
        client, greeting, _ = await starttls(run, client_context)
        assert greeting.startswith(b"220 front.example.org")  # the old configuration
        await start_mail(client)
        await finish_mail(client)
    log = run.daemon.log()
    assert "reload failed, keeping the running configuration" in log
    assert expected in log
    assert len(run.maildir()) == 1
