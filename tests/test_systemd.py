"""systemd: socket activation for real, sd_notify, and the unit files themselves.

The daemon tests run `tlsfront` under `systemd-socket-activate` (Debian's
`systemd` package; no systemd as PID 1 needed). Its own --listen= wants a
fixed port, which a test must not guess, so the test binds the listening
sockets on port 0 itself and hands them to systemd-socket-activate the
systemd way (it passes inherited descriptors on to its child): the names
still come from its --fdname=, and --accept / --inetd behave as always.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from support.daemon import (
    TLSFRONT,
    NotifySocket,
    child_environ,
    json_lines,
    listening_socket,
    start_daemon,
)
from support.front import capture_backend, need_tool, toml_str
from support.hostile import Client, code
from support.ucspi import sessions

from tlsfront.cli import main
from tlsfront.config.files import parse_config
from tlsfront.ops.systemd import (
    Notifier,
    SystemdError,
    match_sockets,
    passed_sockets,
    session_status,
    watchdog_interval,
)

UNITS = Path(__file__).resolve().parent.parent / "systemd"
MESSAGE = b"Subject: socket activation\r\n\r\nHello.\r\n.\r\n"

TWO_PROFILES = """
[defaults]
hostname = "front.example.org"
log_format = "json"
workers = 1  # one process: these tests watch its own notifications
allow_root_backend = true  # as root (CI), the capture backend stays root
shutdown_grace = 5
state_dir = {state}

[profile.smtp]
systemd = "smtp"
tls = "starttls"
cert = {cert}
backend = {backend}

[profile.submission]
systemd = "submission"
tls = "starttls"
require_tls = true
cert = {cert}
backend = {backend}
"""


def write_config(tmp_path: Path, tls_dir: Path, text: str = TWO_PROFILES) -> tuple[Path, Path]:
    capture = tmp_path / "capture"
    capture.mkdir(exist_ok=True)
    config = tmp_path / "tlsfront.toml"
    config.write_text(
        text.format(
            cert=toml_str(tls_dir / "servercert.pem"),
            backend=capture_backend(capture),
            state=toml_str(tmp_path / "state"),
        )
    )
    return config, capture


def port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


async def send_mail(client: Client, context: ssl.SSLContext) -> None:
    """EHLO, STARTTLS, one message, QUIT; the greeting already read."""
    assert code(await client.command(b"EHLO client.example.net")) == 250
    assert code(await client.command(b"STARTTLS")) == 220
    await client.starttls(context)
    assert code(await client.command(b"EHLO client.example.net")) == 250
    assert code(await client.command(b"MAIL FROM:<a@example.net>")) == 250
    assert code(await client.command(b"RCPT TO:<b@example.org>")) == 250
    assert code(await client.command(b"DATA")) == 354
    await client.send(MESSAGE)
    assert code(await client.reply()) == 250
    assert code(await client.command(b"QUIT")) == 221
    # tlsfront closes the connection once the backend has exited, so its
    # capture is complete when this returns.
    assert await client.rest() == b""
    await client.aclose()


# ---------------------------------------------------------------- the daemon


async def test_socket_activation_with_named_descriptors(
    tmp_path: Path, tls_dir: Path, client_context: ssl.SSLContext
) -> None:
    tool = need_tool("systemd-socket-activate")
    config, capture = write_config(tmp_path, tls_dir)
    smtp, submission = listening_socket(), listening_socket()
    smtp_port = port(smtp)
    async with NotifySocket() as notify:
        argv = [
            tool,
            "--fdname=smtp:submission",
            "-E",
            f"NOTIFY_SOCKET={notify.address}",
            "-E",
            "WATCHDOG_USEC=400000",
            *TLSFRONT,
            "run",
            "-c",
            str(config),
        ]
        daemon = await start_daemon(argv, tmp_path, child_environ(), [smtp, submission])
        try:
            with trio.fail_after(60):
                # systemd-socket-activate starts tlsfront at the first connection.
                first = await Client.connect(port(smtp))
                assert (await first.reply()).startswith(b"220 ")
                ready = await notify.wait_for("READY", "1")
                assert "session" in ready["STATUS"]
                await notify.wait_for("WATCHDOG", "1")  # at half of WATCHDOG_USEC
                # 587 is the submission profile: TLS required there, not on 25.
                second = await Client.connect(port(submission))
                assert (await second.reply()).startswith(b"220 ")
                assert code(await second.command(b"EHLO client.example.net")) == 250
                assert (await second.command(b"MAIL FROM:<a@example.net>")).startswith(b"530 5.7.0")
                # STATUS= counts the live sessions, per profile.
                status = "2 sessions (smtp 1, submission 1)"
                while (await notify.wait_for("STATUS"))["STATUS"] != status:
                    pass
                await send_mail(first, client_context)
                # A reload is announced, stamped, and ends ready again.
                daemon.signal(signal.SIGHUP)
                reloading = await notify.wait_for("RELOADING", "1")
                now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                assert abs(int(reloading["MONOTONIC_USEC"]) - now_usec) < 60_000_000
                await notify.wait_for("READY", "1")
                assert code(await second.command(b"QUIT")) == 221
                await second.aclose()
                daemon.signal(signal.SIGTERM)
                await notify.wait_for("STOPPING", "1")
                assert await daemon.wait() == 0
        finally:
            await daemon.stop()
    log = daemon.log()
    entries = json_lines(log)  # log_format = "json": every line is an object
    ends = [e for e in entries if e.get("event") == "session_end"]
    assert sorted(e["profile"] for e in ends) == ["smtp", "submission"]
    assert any(e["messages"] == 1 and e["tls_version"] for e in ends)
    assert any("reloaded the configuration" in e["message"] for e in entries)
    (tls,) = [s for s in sessions(capture) if "SSL_PROTOCOL" in s["env"]]
    assert tls["env"]["TCPLOCALPORT"] == str(smtp_port)
    assert "LISTEN_FDS" not in tls["env"]
    assert "NOTIFY_SOCKET" not in tls["env"]


@pytest.mark.parametrize("style", ["inetd", "fd3"])
async def test_accept_yes_runs_tlsfront_inetd(
    tmp_path: Path, tls_dir: Path, client_context: ssl.SSLContext, style: str
) -> None:
    """Accept=yes: a process per connection, on stdin/stdout (StandardInput=socket,
    systemd-socket-activate --inetd) or as descriptor 3 (plain Accept=yes)."""
    tool = need_tool("systemd-socket-activate")
    config, capture = write_config(tmp_path, tls_dir)
    sock = listening_socket()
    sock_port = port(sock)
    extra = ["--inetd"] if style == "inetd" else []
    argv = [tool, "--accept", *extra, *TLSFRONT, "inetd", "-p", "smtp", "-c", str(config)]
    daemon = await start_daemon(argv, tmp_path, child_environ(), [sock])
    try:
        with trio.fail_after(60):
            for _ in range(2):
                client = await Client.connect(port(sock))
                assert (await client.reply()).startswith(b"220 ")
                await send_mail(client, client_context)
    finally:
        await daemon.stop()
    done = [s for s in sessions(capture) if s["messages"]]
    assert len(done) == 2
    for session in done:
        assert session["env"]["TCPREMOTEIP"] == "127.0.0.1"
        assert session["env"]["TCPLOCALPORT"] == str(sock_port)
        assert session["env"]["SSL_PROTOCOL"].startswith("TLSv1.")


async def run_once(
    tmp_path: Path, argv: list[str], sockets: list[socket.socket], names: list[str] | None
) -> tuple[int, str]:
    daemon = await start_daemon(argv, tmp_path, child_environ(), sockets, names)
    try:
        with trio.fail_after(60):
            status = await daemon.wait()
    finally:
        await daemon.stop()
    return status, daemon.log()


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["smtp", "other"], "descriptor named 'other'"),
        (["smtp"], "no socket unit passed a descriptor of that name"),
        (["smtp", "tlsfront.socket"], "FileDescriptorName="),
    ],
)
async def test_units_and_config_that_disagree_stop_the_start(
    tmp_path: Path, tls_dir: Path, names: list[str], expected: str
) -> None:
    config, _ = write_config(tmp_path, tls_dir)
    sockets = [listening_socket() for _ in names]
    status, log = await run_once(tmp_path, [*TLSFRONT, "run", "-c", str(config)], sockets, names)
    assert status == 1
    assert expected in log


async def test_a_systemd_profile_without_socket_activation(tmp_path: Path, tls_dir: Path) -> None:
    config, _ = write_config(tmp_path, tls_dir)
    status, log = await run_once(tmp_path, [*TLSFRONT, "run", "-c", str(config)], [], None)
    assert status == 1
    assert "not started by a socket unit" in log


async def test_inetd_refuses_a_listening_socket(tmp_path: Path, tls_dir: Path) -> None:
    config, _ = write_config(tmp_path, tls_dir)
    argv = [*TLSFRONT, "inetd", "-p", "smtp", "-c", str(config)]
    status, log = await run_once(tmp_path, argv, [listening_socket()], None)
    assert status == 1
    assert "Accept=yes" in log


# ----------------------------------------------------------- matching, pure


def two_profiles(extra: str = "") -> str:
    return (
        '[defaults]\nhostname = "mx.example.org"\nstate_dir = "/nonexistent"\n'
        '[profile.smtp]\nsystemd = "smtp"\ntls = "none"\nbackend = ["/bin/true"]\n'
        '[profile.submission]\nsystemd = "submission"\ntls = "none"\nbackend = ["/bin/true"]\n'
        + extra
    )


def test_match_sockets_by_name() -> None:
    config = parse_config(
        two_profiles(
            '[profile.local]\nlisten = ["127.0.0.1:0"]\ntls = "none"\nbackend = ["/bin/true"]\n'
        )
    )
    # Several descriptors may share a name (IPv4 and IPv6 sockets of one unit).
    assert match_sockets(config, ["submission", "smtp", "smtp"]) == {
        "submission": [0],
        "smtp": [1, 2],
    }


def test_match_sockets_reports_every_mismatch() -> None:
    config = parse_config(two_profiles())
    with pytest.raises(SystemdError) as info:
        match_sockets(config, ["smtp", "smtps"])
    text = str(info.value)
    assert "descriptor named 'smtps'" in text
    assert "profile submission" in text


def test_without_socket_activation_listen_serves() -> None:
    config = parse_config(
        two_profiles().replace(
            'systemd = "submission"', 'systemd = "submission"\nlisten = ["127.0.0.1:0"]'
        )
    )
    with pytest.raises(SystemdError, match=r"profile smtp: .* not started by a socket unit"):
        match_sockets(config, [])
    config = parse_config(
        two_profiles()
        .replace('systemd = "submission"', 'systemd = "submission"\nlisten = ["127.0.0.1:0"]')
        .replace('systemd = "smtp"', 'systemd = "smtp"\nlisten = ["127.0.0.1:0"]')
    )
    assert match_sockets(config, []) == {}


def test_passed_sockets_are_only_for_their_process() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert passed_sockets(env) == []
    assert env == {}  # removed once read, as sd_listen_fds(unset=1) does
    assert passed_sockets({"PATH": "/bin"}) == []
    with pytest.raises(SystemdError, match="not a number"):
        passed_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})


# ----------------------------------------------------------------- sd_notify


@pytest.mark.parametrize("kind", ["abstract", "path"])
async def test_notifier_messages(kind: str) -> None:
    path = None
    if kind == "path":
        directory = Path(trio_tempdir())  # AF_UNIX paths are short: not under tmp_path
        path = directory / "notify"
    try:
        async with NotifySocket(path) as notify:
            env = {"NOTIFY_SOCKET": notify.address}
            notifier = Notifier.from_environ(env)
            assert env == {}  # not passed on to children
            with trio.fail_after(10):
                assert notifier.ready("0 sessions")
                assert await notify.receive() == {"READY": "1", "STATUS": "0 sessions"}
                assert notifier.reloading()
                message = await notify.receive()
                assert message["RELOADING"] == "1"
                assert int(message["MONOTONIC_USEC"]) > 0
                assert notifier.status("3 sessions (smtp 3)")
                assert await notify.receive() == {"STATUS": "3 sessions (smtp 3)"}
                assert notifier.watchdog()
                assert await notify.receive() == {"WATCHDOG": "1"}
                assert notifier.stopping()
                assert await notify.receive() == {"STOPPING": "1"}
            notifier.close()
    finally:
        if path is not None:
            shutil.rmtree(path.parent)


def trio_tempdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="tlsfront-", dir="/tmp")


def test_notifier_without_systemd_does_nothing() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_notifier_survives_a_vanished_manager(tmp_path: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert not notifier.ready()  # logged once, never raised
    notifier.close()


def test_watchdog_interval() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 1.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval(other) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_session_status() -> None:
    assert session_status({"smtp": 2, "smtps": 1}) == "3 sessions (smtp 2, smtps 1)"
    assert session_status({"smtp": 1}, stopping=True) == "stopping: 1 session (smtp 1)"
    assert session_status({}) == "0 sessions"


# ---------------------------------------------------------------- unit files


def test_unit_files_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on every unit in systemd/.

    It needs no running systemd, but it does need to work in this container:
    it is probed on a trivial unit first, and the test skips (with its
    error) where even that fails, for example without /proc or in a
    sandbox that forbids what it sets up. In CI it must run.
    """
    analyze = need_tool("systemd-analyze")
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "probe.service").write_text("[Service]\nExecStart=/bin/true\n")
    tried = subprocess.run(
        [analyze, "verify", "--man=no", str(probe / "probe.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if tried.returncode != 0 or tried.stdout or tried.stderr:
        if os.environ.get("CI"):
            pytest.fail(f"systemd-analyze verify cannot run here: {tried.stderr}")
        pytest.skip(f"systemd-analyze verify cannot run here: {tried.stderr.strip()}")
    units = tmp_path / "units"
    units.mkdir()
    names = sorted(p.name for p in UNITS.iterdir() if p.suffix in (".socket", ".service"))
    assert {
        "tlsfront.socket",
        "tlsfront.service",
        "tlsfront-inetd.socket",
        "tlsfront-inetd@.service",
    } <= set(names)
    # The units name /usr/local/bin/tlsfront (docs/install.md); verify checks that it
    # is executable.
    tlsfront = shutil.which("tlsfront") or str(Path(sys.executable).parent / "tlsfront")
    for name in names:
        text = (UNITS / name).read_text()
        assert "/usr/local/bin/tlsfront " in text or name.endswith(".socket")
        (units / name).write_text(text.replace("/usr/local/bin/tlsfront ", f"{tlsfront} "))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(str(units / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_units_fit_the_configuration_keys() -> None:
    """Every FileDescriptorName= the units set is a name the docs' config uses,
    and the service gets SIGTERM alone (its qmail-smtpd children must not)."""
    names = set()
    for path in UNITS.glob("*.socket"):
        for line in path.read_text().splitlines():
            if line.startswith("FileDescriptorName="):
                names.add(line.split("=", 1)[1])
    assert names == {"smtp", "submission", "smtps"}
    service = (UNITS / "tlsfront.service").read_text()
    for needed in (
        "Type=notify",
        "KillMode=mixed",
        "User=qmaild",
        "ExecReload=",
        "NoNewPrivileges=no",
        "ProtectSystem=strict",
    ):
        assert needed in service
    inetd = (UNITS / "tlsfront-inetd@.service").read_text()
    assert "StandardInput=socket" in inetd
    assert "StandardError=journal" in inetd
    assert "Accept=yes" in (UNITS / "tlsfront-inetd.socket").read_text()


def test_check_units_against_the_configuration(
    tmp_path: Path, tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = write_config(tmp_path, tls_dir)
    units = tmp_path / "units"
    units.mkdir()
    for name in ("tlsfront.socket", "tlsfront-submission.socket", "tlsfront.service"):
        shutil.copy(UNITS / name, units / name)
    assert main(["check", "-c", str(config), "--units", str(units)]) == 0
    out = capsys.readouterr().out
    assert "systemd units: " in out
    assert "OK: 0 error(s), 0 warning(s)" in out.split("systemd units: ")[1]
    # A socket nobody serves is an error; a hardened service that would break
    # qmail-queue, and a stop timeout below twice the grace, are warnings.
    shutil.copy(UNITS / "tlsfront-smtps.socket", units)
    service = (UNITS / "tlsfront.service").read_text()
    service = service.replace(
        "NoNewPrivileges=no", "NoNewPrivileges=yes\nSystemCallFilter=@system-service"
    ).replace("TimeoutStopSec=90", "TimeoutStopSec=8")
    (units / "tlsfront.service").write_text(service)
    assert main(["check", "-c", str(config), "--units", str(units)]) == 1
    out = capsys.readouterr().out.split("systemd units: ")[1]
    assert "tlsfront-smtps.socket: passes descriptors named 'smtps'" in out
    assert "NoNewPrivileges, SystemCallFilter set no_new_privs for user qmaild" in out
    assert "TimeoutStopSec=8s is less than twice shutdown_grace (5s)" in out
    # Accept=yes: the instance's -p must name a profile.
    for path in units.iterdir():
        path.unlink()
    shutil.copy(UNITS / "tlsfront-inetd.socket", units)
    template = (UNITS / "tlsfront-inetd@.service").read_text()
    (units / "tlsfront-inetd@.service").write_text(template.replace("-p smtp", "-p smtps"))
    assert main(["check", "-c", str(config), "--units", str(units)]) == 1
    assert "runs profile 'smtps'" in capsys.readouterr().out
