"""`tlsfront import-qmail --run`: real run scripts, run with stand-ins, translated.

The scripts are the ones qmail hosts really have, with their paths moved into
a temporary qmail home: the "Life with qmail" daemontools script (backticks,
softlimit and tcpserver by absolute path, its own PATH, an exported
QMAILQUEUE, rblsmtpd in the chain) and a runit one (envdir ./env, chpst,
tcpserver -U from the environment). The account is `nobody`, which every
Debian machine has; a script whose account does not exist is a test of its own.
"""

from __future__ import annotations

import grp
import pwd
import re
import shutil
import smtplib
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
from support.front import Front, capture_backend

from tlsfront.config.files import load_config
from tlsfront.inbound.server import Server
from tlsfront.qmail.importqmail import render_config
from tlsfront.qmail.runscript import RunScriptError, evaluate
from tlsfront.qmail.tcpserverargs import translate

# the account keys: served in this process, the backend runs as the test's
# own user (tests/test_accounts.py serves as another account)
ACCOUNT_KEYS = ("user", "group")
NOBODY_GROUP = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name

LIFE_WITH_QMAIL = """\
#!/bin/sh

QMAILDUID=`id -u {account}`
NOFILESGID=`id -g {account}`
MAXSMTPD=`cat {home}/control/concurrencyincoming`
LOCAL=`head -1 {home}/control/me`
PATH="{home}/bin:/usr/local/bin:/usr/bin:/bin"
export PATH
QMAILQUEUE="{home}/bin/simscan"
export QMAILQUEUE
if [ -z "$QMAILDUID" -o -z "$NOFILESGID" -o -z "$MAXSMTPD" -o -z "$LOCAL" ]; then
    echo QMAILDUID, NOFILESGID, MAXSMTPD, or LOCAL is unset in
    echo {home}/supervise/qmail-smtpd/run
    exit 1
fi
if [ ! -f {home}/control/rcpthosts ]; then
    echo "No {home}/control/rcpthosts!"
    echo "Refusing to start SMTP listener because it'll create an open relay"
    exit 1
fi
exec /usr/local/bin/softlimit -m 2000000 \\
    /usr/local/bin/tcpserver -v -R -l "$LOCAL" -x {etc}/tcp.smtp.cdb -c "$MAXSMTPD" \\
        -u "$QMAILDUID" -g "$NOFILESGID" 0 smtp \\
        {rblsmtpd} -r zen.spamhaus.org {home}/bin/qmail-smtpd 2>&1
"""

RUNIT = """\
#!/bin/sh
exec 2>&1
exec envdir ./env sh -c '
    exec chpst -U {account} -m 100000000 \\
        tcpserver -vRHp -U -l "$LOCAL" -x {etc}/tcp.smtp.cdb -c "${{MAXSMTPD:-20}}" \\
        127.0.0.1 25 rblsmtpd -r zen.spamhaus.org qmail-smtpd
'
"""


def executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


class Host:
    """A qmail home, its tcprules, and a service directory with a run script."""

    def __init__(self, root: Path) -> None:
        self.home = root / "qmail"
        self.control = self.home / "control"
        self.etc = root / "etc"
        self.service = self.home / "supervise" / "qmail-smtpd"
        self.control.mkdir(parents=True)
        self.etc.mkdir()
        self.service.mkdir(parents=True)
        (self.control / "me").write_text("mx.example.org\n")
        (self.control / "concurrencyincoming").write_text("20\n")
        (self.control / "rcpthosts").write_text("example.org\n")
        (self.etc / "tcp.smtp").write_text('127.:allow,RELAYCLIENT=""\n:allow\n')
        (self.etc / "tcp.smtp.cdb").write_bytes(b"")  # only its name matters here
        executable(self.home / "bin" / "qmail-smtpd")
        real = shutil.which("rblsmtpd")
        self.rblsmtpd = real or str(executable(root / "ucspi" / "rblsmtpd"))
        self.run = self.service / "run"

    def script(self, template: str, account: str = "nobody") -> Path:
        text = template.format(
            home=self.home, etc=self.etc, rblsmtpd=self.rblsmtpd, account=account
        )
        executable(self.run, text)
        return self.run


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def tlsfront(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tlsfront", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def without_account(text: str) -> str:
    pattern = r"(?m)^(" + "|".join(ACCOUNT_KEYS) + r") = .*\n"
    return re.sub(pattern, "", text)


def test_life_with_qmail(host: Host) -> None:
    run = host.script(LIFE_WITH_QMAIL)
    result = tlsfront("import-qmail", "--run", str(run))
    assert result.returncode == 0, result.stderr
    assert "could not translate" not in result.stderr
    data: dict[str, Any] = tomllib.loads(result.stdout)
    defaults = data["defaults"]
    # --control is the one the chain's qmail-smtpd implies: its home's
    assert defaults["qmail_control"] == str(host.control)
    assert defaults["backend"] == [
        host.rblsmtpd,
        "-r",
        "zen.spamhaus.org",
        str(host.home / "bin" / "qmail-smtpd"),
    ]
    # exported by the script; PATH is the script's own, not given on
    assert defaults["env"] == {"QMAILQUEUE": str(host.home / "bin" / "simscan")}
    assert (defaults["user"], defaults["group"]) == ("nobody", NOBODY_GROUP)
    assert defaults["hostname"] == "mx.example.org"  # -l "$LOCAL" is control/me
    assert "remote_host_lookup" not in defaults  # no -H: looked up, as tcpserver did
    smtp = data["profile"]["smtp"]
    assert smtp["listen"] == ["0.0.0.0:25"]  # 0 smtp
    assert smtp["max_connections"] == 20  # -c "$MAXSMTPD"
    assert smtp["rules"] == str(host.etc / "tcp.smtp")  # the source of the .cdb
    assert "hostname" not in smtp
    assert "softlimit -m 2000000" in result.stdout
    assert "at least 100 MB" in result.stdout
    assert '# systemd = "smtp"' in result.stdout


def test_life_with_qmail_passes_check(host: Host, tmp_path: Path) -> None:
    """The output, as it is, is a configuration `check` accepts."""
    run = host.script(LIFE_WITH_QMAIL)
    result = tlsfront("import-qmail", "--run", str(run))
    assert result.returncode == 0, result.stderr
    config = tmp_path / "tlsfront.toml"
    config.write_text(result.stdout)
    checked = tlsfront("check", "-c", str(config))
    assert checked.returncode == 0, checked.stdout
    assert "OK: 0 error(s)" in checked.stdout


def test_an_account_missing_here_is_said(host: Host) -> None:
    try:
        pwd.getpwnam("qmaild")
        pytest.skip("this machine has a qmaild account")
    except KeyError:
        pass
    run = host.script(LIFE_WITH_QMAIL, account="qmaild")
    # the script itself refuses to start with QMAILDUID unset, as it would here
    with pytest.raises(RunScriptError, match="QMAILDUID, NOFILESGID, MAXSMTPD, or LOCAL"):
        evaluate(run)
    # without its guard, tcpserver is given -u "" -g "": said, not guessed
    run.write_text(re.sub(r'(?s)if \[ -z "\$QMAILDUID".*?fi\n', "", run.read_text()))
    result = tlsfront("import-qmail", "--run", str(run))
    assert result.returncode == 0, result.stderr
    assert "could not translate: user: the script gave tcpserver an empty value" in result.stderr
    assert "could not translate: the script said: id: " in result.stderr
    assert "COULD NOT TRANSLATE" in result.stdout
    data = tomllib.loads(result.stdout)
    assert "user" not in data["defaults"]
    assert "group" not in data["defaults"]


def test_runit_with_envdir_and_chpst(host: Host) -> None:
    env = host.service / "env"
    env.mkdir()
    (env / "LOCAL").write_text("smtp.example.org\n")
    (env / "MAXSMTPD").write_text("35\n")
    (env / "QMAILQUEUE").write_text(f"{host.home}/bin/qmail-scanner-queue.pl  \nignored\n")
    (env / "DATABYTES").write_text("20000000\n")
    (env / "SPFBEHAVIOR").write_text("3\n")
    (env / "CHKUSER_START").write_text("ALWAYS\n")
    (env / ".hidden").write_text("skipped, as envdir skips it\n")
    (env / "TZ").write_text("")  # an empty file removes the variable
    run = host.script(RUNIT)
    # a PATH where qmail-smtpd and rblsmtpd are, as the host's svscan would have
    executable(host.home / "bin" / "rblsmtpd")
    run.write_text(
        run.read_text().replace("exec 2>&1\n", f"exec 2>&1\nPATH={host.home}/bin:$PATH\n")
    )
    evaluation = evaluate(run)
    assert [step.program for step in evaluation.steps] == ["envdir", "chpst", "tcpserver"]
    service = translate(evaluation)
    assert service.env == {
        "LOCAL": "smtp.example.org",
        "MAXSMTPD": "35",
        "QMAILQUEUE": f"{host.home}/bin/qmail-scanner-queue.pl",
        "DATABYTES": "20000000",
        "SPFBEHAVIOR": "3",
        "CHKUSER_START": "ALWAYS",
    }
    assert service.untranslated == []
    text = render_config(host.control, service=service, systemd=True)
    data = tomllib.loads(text)
    defaults, smtp = data["defaults"], data["profile"]["smtp"]
    assert defaults["backend"] == [
        str(host.home / "bin" / "rblsmtpd"),
        "-r",
        "zen.spamhaus.org",
        "qmail-smtpd",
    ]
    assert (defaults["user"], defaults["group"]) == ("nobody", NOBODY_GROUP)  # -U from chpst -U
    assert defaults["remote_host_lookup"] is False  # -H
    assert defaults["remote_host_paranoid"] is True  # -p
    assert defaults["env"]["DATABYTES"] == "20000000"
    assert "softlimit -m 100000000" in text
    assert smtp["systemd"] == "smtp"
    assert "listen" not in smtp
    assert '# listen = ["127.0.0.1:25"]' in text
    assert (smtp["max_connections"], smtp["hostname"]) == (35, "smtp.example.org")


def test_chpst_u_is_the_account(host: Host) -> None:
    script = """#!/bin/sh
exec chpst -u nobody /usr/bin/tcpserver -H 0 587 {home}/bin/qmail-smtpd
"""
    service = translate(evaluate(host.script(script)))
    assert (service.user, service.group) == ("nobody", NOBODY_GROUP)
    assert service.listen == ["0.0.0.0:587"]
    assert service.backend == [str(host.home / "bin" / "qmail-smtpd")]


def test_a_script_that_never_starts_tcpserver(host: Host) -> None:
    (host.control / "rcpthosts").unlink()
    with pytest.raises(RunScriptError, match=r"never started tcpserver.*No .*rcpthosts!"):
        evaluate(host.script(LIFE_WITH_QMAIL))


def test_a_script_that_hangs_is_stopped(host: Host) -> None:
    run = host.script("#!/bin/sh\nexec sleep 600\n")
    with pytest.raises(RunScriptError, match=r"still running after 0\.5 s"):
        evaluate(run, timeout=0.5)


def test_unknown_options_and_bad_values_are_said(host: Host) -> None:
    script = """#!/bin/sh
exec tcpserver -B "220 hi\\r\\n" -r -c many -l 0 nowhere.invalid 2525 {home}/bin/qmail-smtpd
"""
    service = translate(evaluate(host.script(script)))
    said = "\n".join(service.untranslated)
    assert "-B" in said
    assert "-r:" in said
    assert "-c 'many'" in said
    assert "listen address 'nowhere.invalid'" in said
    assert service.listen == []
    assert service.hostname is None


async def test_served_as_the_script_served_it(
    host: Host, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Served (on a free port, the capture program in place of the chain), the
    backend gets the script's QMAILQUEUE and the rules' RELAYCLIENT."""
    run = host.script(LIFE_WITH_QMAIL)
    result = tlsfront("import-qmail", "--run", str(run))
    assert result.returncode == 0, result.stderr
    capture = tmp_path / "capture"
    capture.mkdir()
    text, listens = re.subn(
        r'(?m)^listen = \["0\.0\.0\.0:25"\]$', 'listen = ["127.0.0.1:0"]', result.stdout
    )
    text, backends = re.subn(
        r"(?m)^backend = .*$", lambda _: "backend = " + capture_backend(capture), text
    )
    assert (listens, backends) == (1, 1)
    config_path = tmp_path / "tlsfront.toml"
    config_path.write_text(without_account(text))
    config = load_config(config_path)
    server = await nursery.start(Server(config).run)
    port = server.addresses["smtp"][0].port

    def send() -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=("127.0.0.2", 0)) as c:
            return c.sendmail("a@example.net", ["c@example.com"], b"Subject: hi\r\n\r\nHi.\r\n")

    with trio.fail_after(60):
        refused = await trio.to_thread.run_sync(send)
    assert refused == {}  # 127.:allow,RELAYCLIENT="" let it relay
    (session,) = Front(server, config, capture).sessions()
    assert session["env"]["QMAILQUEUE"] == str(host.home / "bin" / "simscan")
    assert "RELAYCLIENT" in session["env"]


def test_values_toml_cannot_hold_are_said(host: Host) -> None:
    script = """#!/bin/sh
LATIN1=`printf 'caf\\351'`
export LATIN1
exec tcpserver 0 25 {home}/bin/qmail-smtpd
"""
    service = translate(evaluate(host.script(script)))
    assert "LATIN1" not in service.env
    assert any("is not UTF-8" in problem for problem in service.untranslated)
    assert tomllib.loads(render_config(host.control, service=service))
