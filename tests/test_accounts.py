"""Accounts: backends run as `user`/`group`, tlsfront gives up root after start-up.

Started as root, as under supervise or systemd, `tlsfront run` with
`user = "nobody"` (an account every Debian machine has; the group is its
login group, nogroup) must run the backend as nobody:nogroup with no
supplementary groups, its workers must hold no root power at all (read in
/proc/PID/status), and a reload must still read the root-only key (the
parent, still root, starts fresh workers). The tests need root: CI runs them
as root, elsewhere they are skipped.

The backend and the workers run as nobody, so what they run must be
readable by nobody (tests/support/accounts.py).
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from support.accounts import (
    NOBODY,
    StreamLog,
    kill_group,
    nobody_capture,
    nobody_python,
    shared_directory,
)
from support.front import toml_str

from tlsfront.config.files import parse_config
from tlsfront.inbound.server import Server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as CI runs the tests")


@pytest.fixture
def shared() -> Iterator[Path]:
    with shared_directory() as directory:
        yield directory


def capture_argv(python: list[str], capture: Path) -> str:
    argv = [*python, str(nobody_capture()), "--dir", str(capture), "--rcpthost", "example.org"]
    return "[" + ", ".join(toml_str(a) for a in argv) + "]"


def env_table(env: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k} = {toml_str(v)}" for k, v in env.items()) + "}"


def records(capture: Path) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text()) for p in capture.glob("session-*.json")]
    return sorted(found, key=lambda r: r["started"])


def send(port: int, context: ssl.SSLContext) -> bytes:
    """One message over STARTTLS; the EHLO reply (the backend names TCPLOCALHOST)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.starttls(context=context)
        smtp.sendmail("a@example.net", ["b@example.org"], b"Subject: a\r\n\r\nhi\r\n")
        return bytes(smtp.ehlo_resp or b"")


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


CONFIG = """
[defaults]
hostname = "{hostname}"
workers = 1
shutdown_grace = 5
user = "nobody"

[profile.smtp]
listen = ["127.0.0.1:0"]
cert = {cert}
backend = {backend}
env = {env}
"""


async def test_run_as_root_serves_as_the_account(
    shared: Path, tls_dir: Path, client_context: ssl.SSLContext, nursery: trio.Nursery
) -> None:
    """Backends as nobody:nogroup with no supplementary groups; a worker with
    no capability at all; a reload that reads the root-only key again."""
    key = tls_dir / "servercert.pem"
    key.chmod(0o600)  # root's alone, in a directory only root can enter
    python, pythonpath = nobody_python()
    capture = shared / "capture"
    config = shared / "tlsfront.toml"

    def write(hostname: str) -> None:
        config.write_text(
            CONFIG.format(
                hostname=hostname,
                cert=toml_str(key),
                backend=capture_argv(python, capture),
                env=env_table(pythonpath),
            )
        )

    write("first.example.org")
    process = await trio.lowlevel.open_process(
        [*python, "-m", "tlsfront", "run", "-c", str(config)],
        stderr=subprocess.PIPE,
        env={"PATH": os.environ["PATH"], **pythonpath},
        cwd="/",
        start_new_session=True,  # its workers too are ended, whatever happens
    )
    assert process.stderr is not None
    daemon = StreamLog(process.stderr)
    nursery.start_soon(daemon.collect)
    try:
        (started,) = await daemon.wait_for(r"worker 0 started \(pid (\d+)\)")
        worker = int(started.group(1))
        await daemon.wait_for(r"serving as nobody:nogroup")
        (listening,) = await daemon.wait_for(r"listening on \[127\.0\.0\.1\]:(\d+)")
        port = int(listening.group(1))
        greeting = await trio.to_thread.run_sync(send, port, client_context)
        assert b"first.example.org" in greeting
        await daemon.wait_for(r"session end: .* messages=1 ")

        ids = {"uid": NOBODY.pw_uid, "gid": NOBODY.pw_gid, "groups": []}
        for record in records(capture):
            assert record["ids"] == ids
        worker_status = status(worker)
        assert worker_status["Uid"].split() == [str(NOBODY.pw_uid)] * 4
        assert worker_status["Gid"].split() == [str(NOBODY.pw_gid)] * 4
        assert worker_status["Groups"] == ""
        for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(worker_status[caps], 16) == 0, caps
        # the parent keeps root: it binds nothing more, it reloads
        assert status(process.pid)["Uid"].split()[0] == "0"

        write("second.example.org")
        process.send_signal(signal.SIGHUP)
        await daemon.wait_for(r"reloaded the configuration")
        fresh = (await daemon.wait_for(r"worker 0 started \(pid (\d+)\)", 2))[1]
        await daemon.wait_for(rf"replaced worker \(pid {worker}\) stopped")
        greeting = await trio.to_thread.run_sync(send, port, client_context)
        assert b"second.example.org" in greeting
        await daemon.wait_for(r"session end: .* messages=1 ", 2)
        assert status(int(fresh.group(1)))["Uid"].split()[0] == str(NOBODY.pw_uid)
        assert all(r["ids"] == ids for r in records(capture))
        assert " ERROR " not in daemon.text
        assert "cannot load" not in daemon.text

        # a reload that does not load keeps the workers serving
        config.write_text("[profile.smtp]\nnonsense = 1\n")
        process.send_signal(signal.SIGHUP)
        await daemon.wait_for(r"reload failed, keeping the running workers")
        greeting = await trio.to_thread.run_sync(send, port, client_context)
        assert b"second.example.org" in greeting

        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        kill_group(process)
        await process.wait()


async def test_backends_switch_account_when_tlsfront_keeps_root(
    shared: Path, tls_dir: Path, client_context: ssl.SSLContext, nursery: trio.Nursery
) -> None:
    """Served in a process that stays root (as with profiles naming different
    accounts), each backend still becomes its profile's account before exec."""
    python, pythonpath = nobody_python()
    capture = shared / "capture"
    text = f"""
[profile.smtp]
listen = ["127.0.0.1:0"]
cert = {toml_str(tls_dir / "servercert.pem")}
backend = {capture_argv(python, capture)}
env = {env_table(pythonpath)}
user = "nobody"
"""
    os.setgroups([0, 4])  # root with supplementary groups: none may reach the backend
    try:
        config = parse_config(text, shared / "tlsfront.toml")
        server = await nursery.start(Server(config).run)
        port = server.addresses["smtp"][0].port
        with trio.fail_after(30):
            await trio.to_thread.run_sync(send, port, client_context)
    finally:
        os.setgroups([0])
    (plain, tls) = records(capture)
    for record in (plain, tls):
        assert record["ids"] == {"uid": NOBODY.pw_uid, "gid": NOBODY.pw_gid, "groups": []}


def tlsfront_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tlsfront", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_run_as_root_refuses_a_root_backend(tmp_path: Path, tls_dir: Path) -> None:
    config = tmp_path / "tlsfront.toml"
    body = f"""
[profile.smtp]
listen = ["127.0.0.1:0"]
cert = {toml_str(tls_dir / "servercert.pem")}
backend = ["/bin/cat"]
"""
    config.write_text(body)
    result = tlsfront_cli("run", "-c", str(config))
    assert result.returncode == 1
    assert "[profile.smtp]: the backend would run as root" in result.stderr
    assert "listening on" not in result.stderr
    checked = tlsfront_cli("check", "-c", str(config))
    assert "warning: profile smtp: backends would run as tlsfront's own account" in checked.stdout
    assert "allow_root_backend = true" in checked.stdout

    config.write_text(body + 'user = "root"\n')
    result = tlsfront_cli("run", "-c", str(config))
    assert result.returncode == 1
    assert "the backend would run as root" in result.stderr

    config.write_text(body + 'user = "nobody"\n')
    checked = tlsfront_cli("check", "-c", str(config))
    assert "profile smtp: backends run as nobody:nogroup" in checked.stdout
    assert "would run as" not in checked.stdout


def test_not_root_runs_backends_only_as_itself(shared: Path) -> None:
    """Only root can switch accounts: started as nobody, a profile naming
    another account is refused before anything is served."""
    python, pythonpath = nobody_python()
    config = shared / "tlsfront.toml"
    body = '[profile.smtp]\nlisten = ["127.0.0.1:0"]\ntls = "none"\nbackend = ["/bin/cat"]\n'

    def run_as_nobody() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*python, "-m", "tlsfront", "run", "-c", str(config)],
            user=NOBODY.pw_uid,
            group=NOBODY.pw_gid,
            extra_groups=[],
            env={"PATH": os.environ["PATH"], **pythonpath},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    config.write_text(body + 'user = "root"\n')
    result = run_as_nobody()
    assert result.returncode == 1
    assert "profile smtp: backends cannot run as root:root: tlsfront is not started as root" in (
        result.stderr
    )
    assert "listening on" not in result.stderr
