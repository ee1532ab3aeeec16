"""The relay logs in to a smarthost (aiosmtpd with an authenticator), only inside verified TLS.

qmail-remote's dialogue goes in (the stand-in of `support.outbound_fakes`),
the relay routes every domain to the smarthost over real TCP, and the far
end says who logged in, with which mechanism, and whether AUTH reached it at
all.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from support.far_smtp import FarSmtp
from support.outbound_fakes import (
    DnsResponder,
    make_runtime,
    outbound_profile,
    relay_message,
    server_context,
    write_pem,
)

from tlsfront.auth.secret import Secret
from tlsfront.config.schema import Profile
from tlsfront.ops import watch
from tlsfront.outbound import dialer, stats
from tlsfront.outbound.client import RemoteError, SmtpClient
from tlsfront.outbound.credentials import Login
from tlsfront.outbound.login import MAX_ROUNDS, log_in
from tlsfront.smtp.reply import Reply

SMARTHOST = "smarthost.example.test"
USER = "alice@example.test"
PASSWORD = "pass word #1"  # a space and a hash: the file takes the rest of the line
RCPT = b"bob@example.org"

StartFar = Callable[..., FarSmtp]


@pytest.fixture(scope="module")
def good_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def bad_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def start_far(good_ca: trustme.CA) -> Iterator[StartFar]:
    """`start_far(**FarSmtp fields)`: a running smarthost knowing USER, with TLS by good_ca."""
    started: list[FarSmtp] = []

    def start(**fields: Any) -> FarSmtp:
        fields.setdefault("tls", server_context(good_ca.issue_cert(SMARTHOST)))
        far = FarSmtp(users={USER: PASSWORD}, **fields)
        far.start()
        started.append(far)
        return far

    yield start
    for far in started:
        far.stop()


@pytest.fixture(autouse=True)
def _fresh_stats() -> None:
    stats.reset()


async def smarthost_profile(
    nursery: trio.Nursery,
    tmp_path: Path,
    far: FarSmtp,
    *,
    password: str = PASSWORD,
    **keys: Any,
) -> Profile:
    """Every domain routed to `far`, with credentials for it in a private file."""
    dns_ = DnsResponder()
    dns_.add(SMARTHOST, "A", "127.0.0.1")
    servers = (await dns_.listen(nursery),)
    credentials = tmp_path / "smarthost"
    credentials.write_text(f"# the ISP's relay\n\n{SMARTHOST}:{far.port}  {USER}  {password}\n")
    credentials.chmod(0o600)
    values: dict[str, Any] = {
        "routes": {"": f"{SMARTHOST}:{far.port}"},
        "dns_servers": servers,
        "route_credentials": credentials,
    }
    values.update(keys)
    return outbound_profile(**values)


def pinned(tmp_path: Path, ca: trustme.CA) -> dict[str, Any]:
    """Profile keys that pin `ca` for the smarthost (qmail's tlshosts/<host>.pem)."""
    write_pem(tmp_path / "tlshosts", f"{SMARTHOST}.pem", ca.cert_pem.bytes())
    return {"tlshosts": tmp_path / "tlshosts"}


def outbound_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("tlsfront")]


async def test_logs_in_with_plain_inside_pinned_tls(
    nursery: trio.Nursery,
    tmp_path: Path,
    good_ca: trustme.CA,
    start_far: StartFar,
    caplog: pytest.LogCaptureFixture,
) -> None:
    far = start_far()
    profile = await smarthost_profile(nursery, tmp_path, far, **pinned(tmp_path, good_ca))
    with trio.fail_after(20), caplog.at_level(logging.INFO, "tlsfront.outbound"):
        result = await relay_message(profile, make_runtime(), [RCPT])
    assert result.rcpt == [b"250 OK"]
    assert result.dot == b"250 2.0.0 queued by the far end"
    assert far.auth_commands == ["PLAIN"]
    assert far.logins == [(USER, True)]
    [message] = far.messages
    assert (message.user, message.tls, message.recipients) == (USER, True, ["bob@example.org"])
    assert b"hello" in message.body
    assert stats.logins == {("succeeded", "PLAIN"): 1}
    lines = outbound_lines(caplog)
    assert any(f"logged in as {USER} mechanism=PLAIN" in line for line in lines)
    assert any(
        f"verified=yes policy=tlshosts login={USER} result=delivered" in line for line in lines
    )


async def test_logs_in_with_login_and_raises_a_weak_policy_to_verify(
    nursery: trio.Nursery,
    tmp_path: Path,
    good_ca: trustme.CA,
    start_far: StartFar,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """LOGIN when PLAIN is not offered; tls_policy 'may' becomes 'verify' (trust store)."""
    far = start_far(mechanisms=("LOGIN",))
    profile = await smarthost_profile(nursery, tmp_path, far, tls_policy={"": "may"})
    runtime = make_runtime(good_ca.cert_pem.bytes().decode())
    with trio.fail_after(20), caplog.at_level(logging.INFO, "tlsfront.outbound"):
        result = await relay_message(profile, runtime, [RCPT])
    assert result.dot.startswith(b"250 ")
    assert far.auth_commands == ["LOGIN"]
    assert [m.user for m in far.messages] == [USER]
    assert stats.logins == {("succeeded", "LOGIN"): 1}
    assert any("verified=yes policy=credentials" in line for line in outbound_lines(caplog))


async def test_wrong_password_bounces_with_5_7_8(
    nursery: trio.Nursery, tmp_path: Path, good_ca: trustme.CA, start_far: StartFar
) -> None:
    far = start_far()
    profile = await smarthost_profile(
        nursery, tmp_path, far, password="wrong", **pinned(tmp_path, good_ca)
    )
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(), [RCPT, b"carol@example.org"])
    # every recipient gets the permanent answer: qmail bounces, with the far end's words
    for reply in result.rcpt:
        assert reply.startswith(b"554 5.7.8 ")
        assert f"refused the login as {USER}".encode() in reply
        assert b"535 5.7.8 Authentication credentials invalid" in reply
    assert result.data == b""  # qmail-remote never got to DATA
    assert far.logins == [(USER, False)]  # one try, not one per address or recipient
    assert far.messages == []
    assert stats.logins == {("rejected", "PLAIN"): 1}
    assert stats.outcomes == {("bounced", "none"): 1}


async def test_temporary_login_failure_defers(
    nursery: trio.Nursery, tmp_path: Path, good_ca: trustme.CA, start_far: StartFar
) -> None:
    far = start_far(tempfail=True)
    profile = await smarthost_profile(nursery, tmp_path, far, **pinned(tmp_path, good_ca))
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.0 ")
    assert b"454 4.7.0 Temporary authentication failure" in result.rcpt[0]
    assert far.messages == []
    assert stats.logins == {("tempfail", "PLAIN"): 1}
    assert stats.outcomes == {("deferred", "none"): 1}


async def test_no_common_mechanism_defers(
    nursery: trio.Nursery, tmp_path: Path, good_ca: trustme.CA, start_far: StartFar
) -> None:
    far = start_far(mechanisms=("CRAM-MD5",))
    profile = await smarthost_profile(nursery, tmp_path, far, **pinned(tmp_path, good_ca))
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.0 ")
    assert b"offers neither PLAIN nor LOGIN" in result.rcpt[0]
    assert far.auth_commands == []
    assert stats.logins == {("unavailable", "-"): 1}


async def test_a_server_that_keeps_challenging_is_left() -> None:
    """LOGIN answers two prompts, then cancels; a server that goes on is broken."""
    client_end, server_end = trio.testing.memory_stream_pair()
    client = SmtpClient(client_end, 5.0)
    client.ehlo = Reply.make(250, "smarthost", "AUTH LOGIN")
    login = Login(SMARTHOST, None, USER, Secret(PASSWORD.encode()), "test")
    sent: list[bytes] = []

    async def server() -> None:
        while True:
            data = await server_end.receive_some(4096)
            if not data:
                return
            sent.append(bytes(data))
            await server_end.send_all(b"334 VXNlcm5hbWU6\r\n")

    async with trio.open_nursery() as inner:
        inner.start_soon(server)
        with trio.fail_after(5), pytest.raises(RemoteError, match="does not end"):
            await log_in(client, login, "example.org", "smarthost")
        await client_end.aclose()
    assert sent[0] == b"AUTH LOGIN\r\n"
    assert sent[-1] == b"*\r\n"
    assert len(sent) == MAX_ROUNDS


async def test_untrusted_certificate_gets_no_credentials(
    nursery: trio.Nursery,
    tmp_path: Path,
    good_ca: trustme.CA,
    bad_ca: trustme.CA,
    start_far: StartFar,
) -> None:
    """The far end's certificate is not the pinned CA's: no AUTH, the message waits."""
    far = start_far(tls=server_context(bad_ca.issue_cert(SMARTHOST)))
    profile = await smarthost_profile(nursery, tmp_path, far, **pinned(tmp_path, good_ca))
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    assert b"certificate verify failed" in result.rcpt[0]
    assert far.auth_commands == []
    assert far.logins == []
    assert far.messages == []


async def test_untrusted_certificate_under_opportunistic_policy_gets_no_credentials(
    nursery: trio.Nursery, tmp_path: Path, bad_ca: trustme.CA, start_far: StartFar
) -> None:
    """tls_policy 'may' would fall back to clear after a failed handshake; not with a login."""
    far = start_far(tls=server_context(bad_ca.issue_cert(SMARTHOST)), auth_in_clear=True)
    profile = await smarthost_profile(nursery, tmp_path, far, tls_policy={"": "may"})
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    assert far.auth_commands == []
    assert far.messages == []


async def test_server_without_starttls_gets_no_credentials(
    nursery: trio.Nursery, tmp_path: Path, good_ca: trustme.CA, start_far: StartFar
) -> None:
    """A server that offers AUTH in clear and no STARTTLS: nothing is sent, the message waits."""
    far = start_far(tls=None, auth_in_clear=True)
    profile = await smarthost_profile(nursery, tmp_path, far, **pinned(tmp_path, good_ca))
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    assert b"STARTTLS not offered" in result.rcpt[0]
    assert far.auth_commands == []
    assert far.messages == []


async def test_unverified_tls_gets_no_credentials_even_if_the_policy_were_not_raised(
    nursery: trio.Nursery,
    tmp_path: Path,
    start_far: StartFar,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dialer's own check, behind the raised policy: encrypted is not enough."""
    monkeypatch.setattr(dialer, "with_credentials", lambda decision, host, pem: decision)
    far = start_far()
    profile = await smarthost_profile(nursery, tmp_path, far, tls_policy={"": "encrypt"})
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    assert b"credentials withheld: TLS not verified" in result.rcpt[0]
    assert far.auth_commands == []


async def test_route_without_credentials_does_not_log_in(
    nursery: trio.Nursery, tmp_path: Path, good_ca: trustme.CA, start_far: StartFar
) -> None:
    """Positive control: the same smarthost without credentials refuses MAIL (530)."""
    far = start_far()
    profile = await smarthost_profile(nursery, tmp_path, far, **pinned(tmp_path, good_ca))
    assert profile.route_credentials is not None
    profile.route_credentials.write_text("# nothing here\n")
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"530 ")
    assert far.auth_commands == []


async def test_changed_credentials_apply_to_the_next_delivery(
    nursery: trio.Nursery,
    tmp_path: Path,
    good_ca: trustme.CA,
    start_far: StartFar,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch, "RECHECK_SECONDS", 0.0)
    far = start_far()
    profile = await smarthost_profile(
        nursery, tmp_path, far, password="outdated", **pinned(tmp_path, good_ca)
    )
    runtime = make_runtime()
    with trio.fail_after(30):
        first = await relay_message(profile, runtime, [RCPT])
        assert profile.route_credentials is not None
        profile.route_credentials.write_text(f"{SMARTHOST} {USER} {PASSWORD}\n")
        second = await relay_message(profile, runtime, [RCPT])
    assert first.rcpt[0].startswith(b"554 5.7.8 ")
    assert second.dot.startswith(b"250 ")
    assert far.logins == [(USER, False), (USER, True)]


async def test_the_password_never_reaches_the_log(
    nursery: trio.Nursery,
    tmp_path: Path,
    good_ca: trustme.CA,
    start_far: StartFar,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG, through a good login (PLAIN, then LOGIN) and a refused one."""
    forms = [PASSWORD]
    forms.append(base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode())
    forms.append(base64.b64encode(PASSWORD.encode()).decode())
    with trio.fail_after(30), caplog.at_level(logging.DEBUG):
        for fields, password in (
            ({}, PASSWORD),
            ({"mechanisms": ("LOGIN",)}, PASSWORD),
            ({}, PASSWORD + "x"),
        ):
            far = start_far(**fields)
            keys = pinned(tmp_path, good_ca)
            profile = await smarthost_profile(nursery, tmp_path, far, password=password, **keys)
            await relay_message(profile, make_runtime(), [RCPT])
        forms.append(base64.b64encode(f"\0{USER}\0{PASSWORD}x".encode()).decode())
    assert len(far.logins) == 1
    text = "\n".join(outbound_lines(caplog))
    assert f"logged in as {USER}" in text  # the log was captured
    assert f"login as {USER} mechanism=PLAIN refused" in text
    for form in forms:
        assert form not in text
