"""Resource bounds under abuse.

Threats `long-lines`, `connection-flood`, `slow-clients`, `handshake-flood`.

Two kinds of test. Slowloris at each stage runs a real `Session` on virtual
time (trio's MockClock jumps to the next deadline), with in-memory streams
and an in-process backend, so a 300-second timeout costs nothing. The floods
run a real tlsfront on loopback with a real TCP backend (`RecordingBackend`,
in this process, so a thousand sessions need no thousand processes), and
measure memory with tracemalloc.

Both keep `backend_start = "connect"`: a backend for every connection from
its first byte is the most a client can make tlsfront hold, and these tests
speak to that backend (test_ondemand.py has the sessions that start none).
"""

from __future__ import annotations

import resource
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from support.front import Front
from support.hostile import Client, RecordingBackend, code
from support.virtual import Traced, VirtualSession, trickle, vt_profile

from tlsfront.inbound.ratelimit import TLSRateLimiter

# ----------------------------------------------------------------------------
# Slowloris, on virtual time


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a real TLS client, as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def test_client_that_never_reads_its_replies(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """A client that sends but never reads must not hold a session forever.

    On a lockstep stream every write waits for the client's read, as a full
    TCP window would: writes to the client are bounded by timeout_command.
    """
    vs = VirtualSession(nursery, vt_profile(tls_dir), lockstep=True)
    start = trio.current_time()
    with trio.fail_after(3600):
        await vs.done.wait()
    assert 300 <= trio.current_time() - start <= 301
    assert vs.session.record.reason == "client timed out"
    (conv,) = vs.recorder.conversations
    assert conv.received == b""
    await conv.done.wait()  # the backend got its EOF


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_client_hello_one_byte_at_a_time(
    autojump_clock: trio.testing.MockClock,
    tls_dir: Path,
    nursery: trio.Nursery,
    client_context: ssl.SSLContext,
    tls: str,
) -> None:
    """Slowloris in the handshake: the handshake timeout is for the whole of it."""
    vs = VirtualSession(nursery, vt_profile(tls_dir, tls))
    if tls == "starttls":
        assert await vs.read_until(b"\r\n") == b"220 backend.example.org ESMTP\r\n"
        await vs.client.send_all(b"STARTTLS\r\n")
        assert await vs.read_until(b"\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
    hello = client_hello(client_context)
    start = trio.current_time()
    sent = await trickle(vs.client, hello, 1.0)
    await vs.done.wait()
    assert 30 <= trio.current_time() - start <= 31
    assert sent <= 31 < len(hello)
    assert vs.session.record.reason == "TLS handshake timed out"
    # STARTTLS: the plaintext backend saw nothing; implicit: none was started
    assert [c.received for c in vs.recorder.conversations] == ([b""] if tls == "starttls" else [])


async def test_command_trickled_slower_than_the_idle_time(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """A byte every 250 s never lets the connection go idle for 300 s: the
    command timer runs from the last reply, not from the last byte."""
    vs = VirtualSession(nursery, vt_profile(tls_dir))
    assert await vs.read_until(b"\r\n") == b"220 backend.example.org ESMTP\r\n"
    start = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(trickle, vs.client, b"NOOP" + b" x" * 100 + b"\r\n", 250.0)
        assert await vs.rest() == b"421 4.4.2 front.example.org Error: timeout exceeded\r\n"
        assert 300 <= trio.current_time() - start <= 301
        inner.cancel_scope.cancel()
    assert vs.recorder.conversations[0].received == b""


async def test_commands_inside_tls_are_timed_too(
    autojump_clock: trio.testing.MockClock,
    tls_dir: Path,
    nursery: trio.Nursery,
    client_context: ssl.SSLContext,
) -> None:
    vs = VirtualSession(nursery, vt_profile(tls_dir, "implicit"))
    tls = trio.SSLStream(vs.client, client_context, server_hostname="localhost")
    await tls.do_handshake()
    assert await tls.receive_some() == b"220 backend.example.org ESMTP\r\n"
    start = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(trickle, tls, b"EHLO slow.example\r\n", 250.0)
        reply = await tls.receive_some()
        inner.cancel_scope.cancel()
    assert reply == b"421 4.4.2 front.example.org Error: timeout exceeded\r\n"
    assert 300 <= trio.current_time() - start <= 301
    await vs.done.wait()


async def test_body_trickled_slower_than_the_idle_time(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """Slowloris in DATA: a byte every 250 s resets the idle timer each time;
    the minimum data rate ends it at timeout_data plus its tiny budget."""
    vs = VirtualSession(nursery, vt_profile(tls_dir))
    await vs.client.send_all(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
    await vs.read_until(b"354 go ahead\r\n")
    start = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(trickle, vs.client, b"Subject: slow\r\n" * 10, 250.0)
        assert (await vs.rest()).startswith(b"421 4.4.2 ")
        # two bytes came: a budget of 300 s + 2 / 500 s
        assert 300 <= trio.current_time() - start <= 301
        inner.cancel_scope.cancel()
    (conv,) = vs.recorder.conversations
    assert conv.messages == []
    await conv.done.wait()
    assert conv.partial is not None


async def test_many_slow_clients_do_not_delay_a_fast_one(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """Fifty trickling sessions and one normal one: the normal one is done at once."""
    profile = vt_profile(tls_dir)
    slow = [VirtualSession(nursery, profile) for _ in range(50)]
    for vs in slow:
        nursery.start_soon(trickle, vs.client, b"NOOP" * 100, 10.0)
    fast = VirtualSession(nursery, profile)
    start = trio.current_time()
    await fast.client.send_all(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
    await fast.read_until(b"354 go ahead\r\n")
    await fast.client.send_all(b"Subject: fast\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert (await fast.rest()).endswith(b"250 ok 1\r\n221 backend.example.org\r\n")
    assert trio.current_time() - start < 1
    for vs in slow:
        await vs.done.wait()
    assert all(vs.session.record.reason == "client timed out" for vs in slow)


async def test_tls_rate_limit_is_per_minute(
    autojump_clock: trio.testing.MockClock, tls_dir: Path, nursery: trio.Nursery
) -> None:
    """tls_rate_limit = 2: a third STARTTLS within the minute gets 454 4.7.0,
    another address is not affected, and a minute later the first may again."""
    profile = vt_profile(tls_dir, extra="tls_rate_limit = 2\n")
    limiter = TLSRateLimiter()

    async def starttls(ip: str) -> bytes:
        vs = VirtualSession(nursery, profile, tls_rate=limiter, client_ip=ip)
        await vs.read_until(b"\r\n")
        await vs.client.send_all(b"STARTTLS\r\n")
        answer = await vs.read_until(b"\r\n")
        await vs.client.aclose()  # no handshake: it fails at once
        await vs.done.wait()
        return answer

    ready = b"220 2.0.0 Ready to start TLS\r\n"
    refused = b"454 4.7.0 Error: too many new TLS sessions from 192.0.2.1\r\n"
    assert [await starttls("192.0.2.1") for _ in range(3)] == [ready, ready, refused]
    assert await starttls("192.0.2.2") == ready
    await trio.sleep(59)
    assert await starttls("192.0.2.1") == refused
    await trio.sleep(1)
    assert await starttls("192.0.2.1") == ready


# ----------------------------------------------------------------------------
# Floods, on loopback

FLOOD_PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {{cert}}
backend_connect = "{backend}"
backend_start = "connect"
max_connections = {max_connections}
max_per_ip = {max_connections}
timeout_command = {timeout}
{extra}
"""


async def flood_front(
    start_front: Any,
    nursery: trio.Nursery,
    *,
    max_connections: int = 200,
    timeout_command: float = 300,
    extra: str = "",
    **backend_options: Any,
) -> tuple[Front, RecordingBackend]:
    backend = await RecordingBackend(**backend_options).start(nursery)
    front: Front = await start_front(
        FLOOD_PROFILE.format(
            backend=backend.address,
            max_connections=max_connections,
            timeout=timeout_command,
            extra=extra,
        )
    )
    return front, backend


async def send_mail(client: Client, subject: bytes = b"hello") -> bytes:
    """EHLO .. QUIT on an open session (after the greeting); returns the dot's reply."""
    assert code(await client.command(b"EHLO mail.example")) == 250
    assert code(await client.command(b"MAIL FROM:<a@example.net>")) == 250
    assert code(await client.command(b"RCPT TO:<b@example.org>")) == 250
    assert code(await client.command(b"DATA")) == 354
    reply = await client.command(b"Subject: " + subject + b"\r\n\r\nhi\r\n.")
    assert code(await client.command(b"QUIT")) == 221
    return reply


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


IDLE = 1000
IDLE_TIMEOUT = 300.0


def rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def test_a_thousand_idle_connections(
    start_front: Any,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    mock_clock: trio.testing.MockClock,
) -> None:
    """1,000 clients connect and say nothing; another one sends mail meanwhile.

    Each idle session costs a bounded amount of memory (resident memory here:
    tracemalloc would slow the connecting down too much), then every one of
    them is closed with 421 4.4.2 when timeout_command runs out. The clock
    stands still until the test moves it past timeout_command, so however
    long the connecting takes, no session times out early (the pytest
    timeout bounds the test).
    """
    # client, tlsfront's two sockets and the backend's, per session
    raise_fd_limit(4 * IDLE + 512)
    front, backend = await flood_front(
        start_front, nursery, max_connections=IDLE + 10, timeout_command=IDLE_TIMEOUT
    )
    port = front.port("smtp")
    clients: list[Client] = []

    async def connect(limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            client = await Client.connect(port)
            assert await client.reply() == b"220 backend.example.org ESMTP\r\n"
            clients.append(client)

    rss_before = rss()
    limiter = trio.CapacityLimiter(100)
    async with trio.open_nursery() as connecting:
        for _ in range(IDLE):
            connecting.start_soon(connect, limiter)
    await trio.testing.wait_all_tasks_blocked()
    per_session = (rss() - rss_before) / IDLE
    limits = front.server.profiles["smtp"].limits
    assert limits.active == IDLE
    # One more client is served at once.
    other = await Client.connect(port)
    assert code(await other.reply()) == 220
    assert (await send_mail(other)).startswith(b"250 ok ")
    await other.aclose()
    # Just before timeout_command every idle one is still there; then the
    # timeout takes them all.
    mock_clock.jump(IDLE_TIMEOUT - 0.01)
    await trio.testing.wait_all_tasks_blocked()
    assert limits.active == IDLE
    mock_clock.jump(0.02)
    timeouts = []

    async def wait_out(client: Client) -> None:
        timeouts.append(await client.rest())
        await client.aclose()

    async with trio.open_nursery() as waiting:
        for client in clients:
            waiting.start_soon(wait_out, client)
    # The recording backend, the test's clients and tlsfront share this process
    # (one 64 KiB read buffer held per session would be more than all of it).
    assert per_session < 64 * 1024, per_session
    assert timeouts == [b"421 4.4.2 front.example.org Error: timeout exceeded\r\n"] * IDLE
    assert len(backend.conversations) == IDLE + 1


async def test_64_mib_without_a_line_end(start_front: Any, nursery: trio.Nursery) -> None:
    """threat `long-lines`: 500 5.5.2 and close at the limit; memory stays flat."""
    front, backend = await flood_front(start_front, nursery)
    chunk = b"A" * 65536
    sent = 0
    with trio.fail_after(60), Traced() as traced:
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        try:
            while sent < 64 << 20:
                await client.send(chunk)
                sent += len(chunk)
        except trio.BrokenResourceError:
            pass
        reply = await client.reply()
        await client.aclose()
        await backend.all_done()
        peak = traced.peak()
    assert reply == b"500 5.5.2 Error: line too long\r\n"
    assert sent < 64 << 20  # closed long before the end
    (conv,) = backend.conversations
    assert conv.received == b""
    # tlsfront reads 64 KiB at a time and keeps at most a line (512 bytes)
    assert peak < 1 << 20, peak


async def test_ten_megabyte_header_line(start_front: Any, nursery: trio.Nursery) -> None:
    """threat `long-lines` in DATA: 500 5.5.2 at the text line limit, no message."""
    front, backend = await flood_front(start_front, nursery)
    with trio.fail_after(60), Traced() as traced:
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        for line in (b"HELO c", b"MAIL FROM:<a@example.net>", b"RCPT TO:<b@example.org>"):
            assert code(await client.command(line)) == 250
        assert code(await client.command(b"DATA")) == 354
        try:
            await client.send(b"Subject: ")
            for _ in range(160):
                await client.send(b"x" * 65536)
        except trio.BrokenResourceError:
            pass
        reply = await client.reply()
        await client.aclose()
        await backend.all_done()
        peak = traced.peak()
    assert reply == b"500 5.5.2 Error: message line too long\r\n"
    (conv,) = backend.conversations
    assert conv.messages == []
    # of the line, at most what came before the read that broke the limit
    # reached the backend, behind tlsfront's Received header (which goes
    # with the body's first bytes: none at all when the first read broke
    # it), and no end of data
    partial = conv.partial or b""
    if partial:
        assert partial.startswith(b"Received: from c ([127.0.0.1])\r\n")
    line = partial.rpartition(b"\r\n")[2]
    assert b"Subject: x".startswith(line[:10])
    assert len(line) < 1000
    assert b"\r\n.\r\n" not in partial
    assert peak < 1 << 20, peak


async def test_ten_thousand_pipelined_commands(start_front: Any, nursery: trio.Nursery) -> None:
    """One write of 10,000 commands: every reply comes, in order, and tlsfront
    never has more than its pipelining depth (100) outstanding at the backend."""
    front, backend = await flood_front(start_front, nursery)
    commands = b"".join(b"NOOP %d\r\n" % i for i in range(10_000))
    with trio.fail_after(60), Traced() as traced:
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        replies = []

        async def read_replies() -> None:
            for _ in range(10_000):
                replies.append(await client.reply())

        async with trio.open_nursery() as both:
            both.start_soon(read_replies)
            await client.send(commands)
        assert await client.command(b"QUIT") == b"221 backend.example.org\r\n"
        await client.aclose()
        await backend.all_done()
        peak = traced.peak()
    assert replies == [b"250 ok\r\n"] * 10_000
    (conv,) = backend.conversations
    assert b"".join(conv.commands) == commands + b"QUIT\r\n"
    assert conv.most_unanswered <= 100
    # with the test's own 10,000 replies and the backend's record: about 1.4 MB;
    # a dialogue queueing every command pipelined would add some 4 MB
    assert peak < 3 << 20, peak


RATE_PROFILES = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {{cert}}
backend_connect = "{backend}"
tls_rate_limit = {limit}

[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = {{cert}}
backend_connect = "{backend}"
tls_rate_limit = {limit}
"""
RATE_LIMIT = 10
FLOOD = 30


async def starttls_flood(port: int, context: ssl.SSLContext) -> list[bytes]:
    """FLOOD sessions from 127.0.0.1, one after the other: STARTTLS, handshake, QUIT."""
    answers = []
    for _ in range(FLOOD):
        client = await Client.connect(port)
        assert code(await client.reply()) == 220
        answer = await client.command(b"STARTTLS")
        answers.append(answer)
        if code(answer) == 220:
            await client.starttls(context)
        else:  # refused: the session goes on in clear
            assert code(await client.command(b"NOOP")) == 250
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
    return answers


async def implicit_flood(port: int, context: ssl.SSLContext) -> list[bool]:
    """FLOOD connections to the implicit port: did the handshake succeed?"""
    results = []
    for _ in range(FLOOD):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(tcp, context, server_hostname="localhost")
        try:
            await tls.do_handshake()
            greeting = await tls.receive_some()
            results.append(greeting.startswith(b"220 "))
        except trio.BrokenResourceError:
            results.append(False)
        await tcp.aclose()
    return results


async def test_handshake_flood_from_one_address(
    start_front: Any,
    nursery: trio.Nursery,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """threat `handshake-flood`: past tls_rate_limit a minute, STARTTLS gets 454 4.7.0 and the
    implicit port closes before the handshake; another client sends mail meanwhile."""
    backend = await RecordingBackend().start(nursery)
    front: Front = await start_front(
        RATE_PROFILES.format(backend=backend.address, limit=RATE_LIMIT)
    )
    results: dict[str, Any] = {}

    async def flood_starttls() -> None:
        results["starttls"] = await starttls_flood(front.port("smtp"), client_context)

    async def flood_implicit() -> None:
        results["implicit"] = await implicit_flood(front.port("smtps"), client_context)

    async def bystander() -> None:
        client = await Client.connect(front.port("smtp"), local_address="127.0.0.2")
        assert code(await client.reply()) == 220
        for _ in range(3):
            assert code(await client.command(b"NOOP")) == 250
        assert await client.command(b"STARTTLS") == b"220 2.0.0 Ready to start TLS\r\n"
        await client.starttls(client_context)
        results["bystander"] = await send_mail(client)
        await client.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as flood:
            flood.start_soon(flood_starttls)
            flood.start_soon(flood_implicit)
            flood.start_soon(bystander)
    refused = b"454 4.7.0 Error: too many new TLS sessions from 127.0.0.1\r\n"
    assert results["starttls"] == (
        [b"220 2.0.0 Ready to start TLS\r\n"] * RATE_LIMIT + [refused] * (FLOOD - RATE_LIMIT)
    )
    assert results["implicit"] == [True] * RATE_LIMIT + [False] * (FLOOD - RATE_LIMIT)
    assert results["bystander"].startswith(b"250 ok ")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "profile smtp: [127.0.0.1] more than 10 new TLS sessions a minute" in warnings
    assert "profile smtps: [127.0.0.1] more than 10 new TLS sessions a minute" in warnings
    # The flood sends no MAIL: no backend for it at all (the backend on
    # demand); the bystander's mail, one; the two profiles' probes, two.
    assert len(backend.conversations) == 1 + 2
