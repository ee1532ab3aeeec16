"""What of tlsfront's own environment a backend gets.

Under `tlsfront run`: only the names of `env_inherit`, never RELAYCLIENT
(refused in the key, and a stray one in the environment relays nothing).
Under `tlsfront inetd` (tested end to end in test_inetd.py): everything but
the variables tlsfront owns.
"""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import pytest
import trio

from tlsfront.config.errors import ConfigError
from tlsfront.config.files import parse_config
from tlsfront.inbound.backend import inherited_environment

PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "none"
backend = {backend}
env_inherit = ["QMAILQUEUE", "DATABYTES", "NOT_SET_ANYWHERE"]
"""


async def test_run_takes_only_the_env_inherit_names(
    start_front: Any, clean_environ: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QMAILQUEUE", "/var/qmail/bin/simscan")
    monkeypatch.setenv("DATABYTES", "20000000")
    monkeypatch.setenv("SPFBEHAVIOR", "3")  # exported, but not named
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    front = await start_front(PROFILE)

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", front.port("smtp"), timeout=20) as smtp:
            return smtp.sendmail("a@example.net", ["b@example.org"], b"Subject: e\r\n\r\nhi\r\n")

    with trio.fail_after(30):
        assert await trio.to_thread.run_sync(send) == {}
    (session,) = front.sessions()
    env = session["env"]
    assert env["QMAILQUEUE"] == "/var/qmail/bin/simscan"
    assert env["DATABYTES"] == "20000000"
    assert "SPFBEHAVIOR" not in env
    assert "NOT_SET_ANYWHERE" not in env
    assert "RELAYCLIENT" not in env  # clean_environ put a stray one in tlsfront's
    assert env["TCPREMOTEIP"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("RELAYCLIENT", "RELAYCLIENT is never taken from tlsfront's own environment"),
        ("TCPREMOTEIP", "'TCPREMOTEIP' is set by tlsfront for each session"),
        ("SSL_CLIENT_S_DN", "'SSL_CLIENT_S_DN' is set by tlsfront for each session"),
        ("A-B", "'A-B' is not an environment variable name"),
    ],
)
def test_env_inherit_refuses_what_tlsfront_decides(name: str, message: str) -> None:
    text = PROFILE.format(backend='["/bin/cat"]').replace(
        '"NOT_SET_ANYWHERE"', f'"NOT_SET_ANYWHERE", "{name}"'
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, Path("/etc/tlsfront/tlsfront.toml"))
    assert "key 'env_inherit'" in str(err.value)
    assert message in str(err.value)


def test_inetd_passes_all_but_what_tlsfront_owns() -> None:
    inherited = inherited_environment(
        {
            "QMAILQUEUE": "/var/qmail/bin/simscan",
            "RELAYCLIENT": "",  # from tcp.smtp: tcpserver saw the real client
            "TCPREMOTEINFO": "alice",  # tcpserver -r: tlsfront never looks it up
            "PROTO": "TCP",
            "TCPREMOTEIP": "192.0.2.7",
            "TCPREMOTEHOST": "evil\nname",
            "TCPLOCALHOST": "mx.example.org",
            "SSL_CLIENT_VERIFY": "SUCCESS",
            "LISTEN_FDS": "1",
            "LISTEN_PID": "1",
        }
    )
    assert inherited == {
        "QMAILQUEUE": "/var/qmail/bin/simscan",
        "RELAYCLIENT": "",
        "TCPREMOTEINFO": "alice",
    }
