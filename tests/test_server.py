"""tlsfront end to end over loopback: real TLS, real backend processes, smtplib."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable
from typing import Any

import pytest
import trio
from support.front import Front

STARTTLS_PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}
"""

TWO_PROFILES = (
    STARTTLS_PROFILE
    + """
[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = {cert}
backend = {backend}
"""
)

# Where a property holds for both ways of starting the backend, the test
# runs with each; `backend_start = "connect"` keeps a backend per phase.
BACKEND_STARTS = ["on-demand", "connect"]


def starting(profile: str, start: str) -> str:
    return profile.replace(
        "backend = {backend}", f'backend = {{backend}}\nbackend_start = "{start}"'
    )


MESSAGE = b"From: a@example.net\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


async def in_thread(fn: Callable[[], Any]) -> Any:
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(fn)


def send_starttls(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("client.example.net")
        seen["before"] = dict(smtp.esmtp_features)
        smtp.starttls(context=context)
        smtp.ehlo("client.example.net")
        seen["after"] = dict(smtp.esmtp_features)
        seen["refused"] = smtp.sendmail("a@example.net", ["b@example.org"], MESSAGE)
    return seen


@pytest.mark.parametrize("start", BACKEND_STARTS)
async def test_starttls_session(
    start_front: Any, client_context: ssl.SSLContext, clean_environ: None, start: str
) -> None:
    front: Front = await start_front(starting(STARTTLS_PROFILE, start))
    seen = await in_thread(lambda: send_starttls(front.port("smtp"), client_context))
    assert "starttls" in seen["before"]
    assert "starttls" not in seen["after"]
    assert seen["refused"] == {}
    if start == "connect":
        plain, tls = front.sessions()
        # The plaintext backend session saw EHLO and nothing from after TLS.
        assert plain["stdin"] == b"ehlo client.example.net\r\n"
        assert "SSL_PROTOCOL" not in plain["env"]
        assert "RELAYCLIENT" not in plain["env"]
    else:
        (tls,) = front.sessions()  # one backend, started at MAIL, inside TLS
        # tlsfront answered the same EHLO reply the backend gives
        assert seen["after"] == {"pipelining": "", "8bitmime": ""}
    # The fresh backend after TLS: UCSPI environment, TLS variables, no relay.
    env = tls["env"]
    assert env["PROTO"] == "TCP"
    assert env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["TCPLOCALIP"] == "127.0.0.1"
    assert env["TCPLOCALPORT"] == str(front.port("smtp"))
    assert env["TCPLOCALHOST"] == "front.example.org"
    assert env["SSL_PROTOCOL"].startswith("TLSv1.")
    assert env["SSL_CIPHER"]
    assert "RELAYCLIENT" not in env
    assert tls["stdin"].startswith(b"ehlo client.example.net\r\nmail FROM:<a@example.net>")
    (body,) = tls["messages"]
    assert body.startswith(
        b"Received: from client.example.net ([127.0.0.1])\r\n"
        b"\tby front.example.org (tlsfront) with ESMTPS\r\n\t(using TLSv1."
    )
    received, _ = body.split(b"\r\nFrom:", 1)
    # One header, folded lines start with white space, CRLF endings (threat `trace-header`).
    assert all(line.startswith(b"\t") for line in received.split(b"\r\n")[1:])
    assert b"\n" not in received.replace(b"\r\n", b"")
    assert received.count(b"Received:") == 1
    assert body.endswith(MESSAGE + b".\r\n")
    # qmail's own Received line names the real client.
    (delivered,) = front.maildir()
    assert b"(127.0.0.1)\n  by front.example.org with SMTP" in delivered


def send_implicit(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=context) as smtp:
        smtp.ehlo("client.example.net")
        seen["features"] = dict(smtp.esmtp_features)
        seen["refused"] = smtp.sendmail("a@example.net", ["b@example.org"], MESSAGE)
    return seen


async def test_implicit_tls_session(start_front: Any, client_context: ssl.SSLContext) -> None:
    front: Front = await start_front(TWO_PROFILES)
    seen = await in_thread(lambda: send_implicit(front.port("smtps"), client_context))
    assert "starttls" not in seen["features"]
    assert seen["refused"] == {}
    (session,) = front.sessions()
    assert session["env"]["SSL_PROTOCOL"].startswith("TLSv1.")
    (body,) = session["messages"]
    assert b"with ESMTPS" in body.split(b"\r\n\r\n")[0]


def plaintext_dialogue(port: int, lines: list[bytes]) -> list[tuple[int, bytes]]:
    replies = []
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("c")
        for line in lines:
            smtp.putcmd(line.decode())
            replies.append(smtp.getreply())
    return replies


async def test_require_tls(start_front: Any) -> None:
    front: Front = await start_front(
        STARTTLS_PROFILE.replace('tls = "starttls"', 'tls = "starttls"\nrequire_tls = true')
    )
    replies = await in_thread(
        lambda: plaintext_dialogue(
            front.port("smtp"), [b"MAIL FROM:<a@b>", b"RCPT TO:<b@example.org>", b"DATA"]
        )
    )
    for code, text in replies:
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")


async def test_connection_limit_per_ip(start_front: Any) -> None:
    front: Front = await start_front(STARTTLS_PROFILE + "max_per_ip = 2\n")
    port = front.port("smtp")
    with trio.fail_after(20):
        first = await trio.open_tcp_stream("127.0.0.1", port)
        second = await trio.open_tcp_stream("127.0.0.1", port)
        assert (await first.receive_some()).startswith(b"220 ")
        assert (await second.receive_some()).startswith(b"220 ")
        third = await trio.open_tcp_stream("127.0.0.1", port)
        refused = await third.receive_some()
        assert refused.startswith(b"421 4.7.0 ")
        assert await third.receive_some() == b""
        # the others are unaffected
        await first.send_all(b"NOOP\r\n")
        assert (await first.receive_some()).startswith(b"250")
        for stream in (first, second, third):
            await stream.aclose()


async def test_plaintext_to_the_implicit_port_is_closed(start_front: Any) -> None:
    """threat `plaintext-on-implicit`."""
    front: Front = await start_front(TWO_PROFILES)
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", front.port("smtps"))
        await stream.send_all(b"EHLO x\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
        assert not data.startswith(b"220")
        await stream.aclose()
    assert front.sessions() == []


@pytest.mark.parametrize("start", BACKEND_STARTS)
async def test_garbage_after_starttls_feeds_no_backend(start_front: Any, start: str) -> None:
    """threat `handshake-failure`."""
    front: Front = await start_front(starting(STARTTLS_PROFILE, start))
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", front.port("smtp"))
        assert (await stream.receive_some()).startswith(b"220 ")
        await stream.send_all(b"STARTTLS\r\n")
        assert await stream.receive_some() == b"220 2.0.0 Ready to start TLS\r\n"
        await stream.send_all(b"RSET\r\nMAIL FROM:<a@b>\r\n")
        while await stream.receive_some():
            pass
        await stream.aclose()
    if start == "connect":
        (plain,) = front.sessions()
        assert plain["stdin"] == b""
    else:
        assert front.sessions() == []


@pytest.mark.parametrize("start", BACKEND_STARTS)
async def test_backend_that_cannot_start(start_front: Any, start: str) -> None:
    front: Front = await start_front(
        starting(STARTTLS_PROFILE, start).replace(
            "backend = {backend}", 'backend = ["/nonexistent/qmail-smtpd"]'
        )
    )
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", front.port("smtp"))
        reply = await stream.receive_some()
        if start == "on-demand":  # the greeting is tlsfront's; MAIL needs the backend
            assert reply == b"220 front.example.org ESMTP\r\n"
            await stream.send_all(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")
            reply = b""
            while chunk := await stream.receive_some():
                reply += chunk
            assert reply.endswith(
                b"\r\n421 4.3.0 front.example.org Service temporarily unavailable\r\n"
            )
        else:
            assert reply.startswith(b"421 4.3.0 front.example.org")
        await stream.aclose()


@pytest.mark.parametrize("start", BACKEND_STARTS)
@pytest.mark.parametrize("injected", [b"RSET\r\n", b"MAIL FROM:<a@b>\r\n", b"EHLO x\r\n"])
async def test_injection_behind_starttls_never_reaches_a_backend(
    start_front: Any, client_context: ssl.SSLContext, injected: bytes, start: str
) -> None:
    """threat `starttls-injection`, black-box: one write, then a real handshake."""
    front: Front = await start_front(starting(STARTTLS_PROFILE, start))
    with trio.fail_after(20):
        tcp = await trio.open_tcp_stream("127.0.0.1", front.port("smtp"))
        assert (await tcp.receive_some()).startswith(b"220 ")
        await tcp.send_all(b"STARTTLS\r\n" + injected)
        assert await tcp.receive_some() == b"220 2.0.0 Ready to start TLS\r\n"
        tls = trio.SSLStream(tcp, client_context, server_hostname="localhost")
        await tls.do_handshake()
        await tls.send_all(b"NOOP\r\n")
        # The first thing after TLS is the reply to our NOOP: nothing unsolicited.
        assert (await tls.receive_some()).startswith(b"250 ")
        await tls.send_all(b"QUIT\r\n")
        assert (await tls.receive_some()).startswith(b"221 ")
        await tls.aclose()
    if start == "connect":
        plain, fresh = front.sessions()
        assert plain["stdin"] == b""
        assert fresh["stdin"] == b"NOOP\r\nQUIT\r\n"
    else:  # NOOP and QUIT are tlsfront's own: no backend at all
        assert front.sessions() == []


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_listener_gives_the_backend_the_v6_address(
    start_front: Any, client_context: ssl.SSLContext
) -> None:
    front: Front = await start_front(STARTTLS_PROFILE.replace('"127.0.0.1:0"', '"[::1]:0"'))

    def session() -> None:
        with smtplib.SMTP("::1", front.port("smtp"), timeout=20) as smtp:
            smtp.starttls(context=client_context)
            smtp.sendmail("a@example.net", ["b@example.org"], MESSAGE)

    await in_thread(session)
    (tls,) = front.sessions()
    assert tls["env"]["TCPREMOTEIP"] == "::1"
    assert tls["env"]["TCPLOCALIP"] == "::1"
    (body,) = tls["messages"]
    assert body.startswith(b"Received: from ")
    assert b"([IPv6:::1])" in body.split(b"\r\n")[0]
