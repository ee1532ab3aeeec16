"""The shipped daemontools/runit service: conf/supervise/run and log/run.

The run scripts are used as shipped, with only their paths moved into a
temporary directory (the tlsfront command, the configuration, the log
directory) and the qmaill log account replaced by nobody, which every Debian
machine has. The configuration runs the backend as nobody, standing in for
qmaild. Started as root, as supervise starts it:

- under a real `svscan` (Debian's daemontools; CI installs it): the message
  goes through, the backend runs as nobody, multilog writes tlsfront's lines
  with a TAI64N stamp, `svc -h` reloads and `svc -d` stops it gracefully;
- the run script's command line alone, its standard output read as a log
  program would: every log line arrives there, none on standard error.

Needs root (CI runs the tests as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from support.accounts import (
    NOBODY,
    TREE,
    StreamLog,
    kill_group,
    nobody_capture,
    nobody_python,
    shared_directory,
)
from support.front import need_tool, toml_str

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as CI runs the tests")

SHIPPED = TREE / "conf" / "supervise"


@pytest.fixture
def shared() -> Iterator[Path]:
    with shared_directory() as directory:
        yield directory


def service(shared: Path, tls_dir: Path) -> tuple[Path, Path]:
    """The service directory and its log directory, from the shipped scripts."""
    python, pythonpath = nobody_python()
    bin_dir = shared / "bin"
    bin_dir.mkdir()
    command = bin_dir / "tlsfront"
    env = "".join(f"{k}={v} " for k, v in pythonpath.items())
    command.write_text(f'#!/bin/sh\nexec env {env}{" ".join(python)} -m tlsfront "$@"\n')
    command.chmod(0o755)
    capture = shared / "capture"
    backend = [*python, str(nobody_capture()), "--dir", str(capture), "--rcpthost", "example.org"]
    config = shared / "tlsfront.toml"
    config.write_text(
        f"""
[defaults]
hostname = "front.example.org"
workers = 1
shutdown_grace = 5
user = "nobody"  # qmaild on a qmail host

[profile.smtp]
listen = ["127.0.0.1:0"]
cert = {toml_str(tls_dir / "servercert.pem")}
backend = [{", ".join(toml_str(a) for a in backend)}]
env = {{ {", ".join(f"{k} = {toml_str(v)}" for k, v in pythonpath.items())} }}
"""
    )
    logs = shared / "log"
    logs.mkdir()
    os.chown(logs, NOBODY.pw_uid, NOBODY.pw_gid)
    directory = shared / "service" / "tlsfront"
    (directory / "log").mkdir(parents=True)
    run = (SHIPPED / "run").read_text()
    run = run.replace("/usr/local/bin/tlsfront", str(command))
    run = run.replace("/etc/tlsfront/tlsfront.toml", str(config))
    log_run = (SHIPPED / "log" / "run").read_text()
    log_run = log_run.replace("setuidgid qmaill", "setuidgid nobody")
    log_run = log_run.replace("/var/log/tlsfront", str(logs))
    for path, text in ((directory / "run", run), (directory / "log" / "run", log_run)):
        assert str(shared) in text  # the paths were there to move
        path.write_text(text)
        path.chmod(0o755)
    return directory, logs


def send(port: int, context: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.starttls(context=context)
        smtp.sendmail("a@example.net", ["b@example.org"], b"Subject: s\r\n\r\nhi\r\n")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (svscan's supervise processes)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


async def wait_exit(pid: int) -> None:
    """Until `pid`, a process that is not our child, has exited (its pidfd is readable)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def run(*argv: str) -> None:
    await trio.run_process(list(argv))


async def test_under_svscan(
    shared: Path, tls_dir: Path, client_context: ssl.SSLContext, nursery: trio.Nursery
) -> None:
    svscan, svc = need_tool("svscan"), need_tool("svc")
    directory, logs = service(shared, tls_dir)
    current = logs / "current"
    current.touch()
    os.chown(current, NOBODY.pw_uid, NOBODY.pw_gid)
    scanner = await trio.lowlevel.open_process([svscan, str(directory.parent)], cwd="/")
    # multilog writes the file; tail -F turns it into a stream to wait on
    tail = await trio.lowlevel.open_process(
        ["tail", "-F", "-n", "+1", str(current)], stdout=subprocess.PIPE
    )
    assert tail.stdout is not None
    log = StreamLog(tail.stdout)
    nursery.start_soon(log.collect)
    supervised: list[int] = []
    try:
        (listening,) = await log.wait_for(r"listening on \[127\.0\.0\.1\]:(\d+)")
        await log.wait_for(r"serving as nobody:nogroup")
        supervised = children(scanner.pid)
        assert len(supervised) == 2  # supervise for the service and for its log
        port = int(listening.group(1))
        with trio.fail_after(30):
            await trio.to_thread.run_sync(send, port, client_context)
        await log.wait_for(r"INFO session end: .* messages=1 ")
        assert all(re.match(r"@4000[0-9a-f]{20} ", line) for line in log.text.splitlines())
        records = [json.loads(p.read_text()) for p in (shared / "capture").glob("session-*.json")]
        assert records
        for record in records:
            assert record["ids"] == {"uid": NOBODY.pw_uid, "gid": NOBODY.pw_gid, "groups": []}

        await run(svc, "-h", str(directory))
        await log.wait_for(r"reloaded the configuration")
        await run(svc, "-d", str(directory))
        await log.wait_for(r"stopping \d+ workers on SIGTERM")
        await log.wait_for(r"worker 0 \(pid \d+\) stopped")
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(30):
            await run(svc, "-dx", str(directory), str(directory / "log"))
            for pid in supervised:
                await wait_exit(pid)  # supervise exits by itself once down after -x
            for process in (scanner, tail):
                process.terminate()
                await process.wait()


async def test_the_run_script_logs_to_standard_output(
    shared: Path, tls_dir: Path, client_context: ssl.SSLContext, nursery: trio.Nursery
) -> None:
    """The run script's command line, without `exec 2>&1`: standard output
    holds every log line, standard error nothing."""
    directory, _ = service(shared, tls_dir)
    script = (directory / "run").read_text().splitlines()
    (line,) = [ln for ln in script if ln.startswith("exec ") and "2>&1" not in ln]
    argv = line.split()[1:]
    assert argv[1:] == ["run", "-c", str(shared / "tlsfront.toml"), "--log-stdout"]
    assert shutil.which("tlsfront", path=str(shared / "bin")) == argv[0]
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", start_new_session=True
    )
    assert process.stdout is not None
    assert process.stderr is not None
    out, err = StreamLog(process.stdout), StreamLog(process.stderr)
    nursery.start_soon(out.collect)
    nursery.start_soon(err.collect)
    try:
        (listening,) = await out.wait_for(r"listening on \[127\.0\.0\.1\]:(\d+)")
        with trio.fail_after(30):
            await trio.to_thread.run_sync(send, int(listening.group(1)), client_context)
        await out.wait_for(r"INFO session end: .* messages=1 ")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
        await out.wait_for(r"worker 0 \(pid \d+\) stopped")
    finally:
        kill_group(process)
        await process.wait()
    assert "INFO serving as nobody:nogroup" in out.text
    assert err.text == ""
