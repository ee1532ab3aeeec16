"""TCPREMOTEHOST as tcpserver sets it: looked up beside the session, bounded, cached.

The DNS server is a stand-in on 127.0.0.1 (dnspython's wire format, a real
UDP socket): one that answers, or one that never does. The session tests
that need virtual time use an in-memory client and backend, so the clock
can jump over the look-up's timeout.
"""

from __future__ import annotations

import dataclasses
import smtplib
import ssl
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
import trio.testing
from support.front import Front, capture_backend, toml_str, write_config
from support.hostile import MemoryBackend, RecordingBackend, session_log
from support.outbound_fakes import DnsResponder
from support.ucspi import Lines

from tlsfront.config.files import load_config, parse_config
from tlsfront.config.schema import Profile
from tlsfront.inbound import remotehost
from tlsfront.inbound.backend import Backend
from tlsfront.inbound.profileruntime import ProfileRuntime
from tlsfront.inbound.remotehost import HostCache, HostName, PendingHost
from tlsfront.inbound.server import Server
from tlsfront.inbound.session import Session
from tlsfront.net.address import Address

CLIENT = "127.0.0.1"
NAME = "mail.example.net"


def reverse(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


@pytest.fixture
async def dns_address(nursery: trio.Nursery) -> str:
    responder = DnsResponder()
    responder.add(reverse(CLIENT), "PTR", "Mail.Example.NET.")
    responder.add(NAME, "A", CLIENT)
    return await responder.listen(nursery)


@pytest.fixture
async def silent_dns() -> object:
    """A UDP socket that reads nothing and answers nothing."""
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def profile(dns: str, timeout: float = 4.0) -> Profile:
    text = (
        '[profile.smtp]\nlisten = ["127.0.0.1:0"]\ntls = "none"\nbackend = ["/bin/false"]\n'
        f'hostname = "front.example.org"\ndns_servers = ["{dns}"]\n'
        f"remote_host_timeout = {timeout}\n"
    )
    return parse_config(text).profiles["smtp"]


async def session_with_look_up(
    nursery: trio.Nursery, p: Profile
) -> tuple[Lines, list[tuple[float, Mapping[str, str]]]]:
    """A session whose client name is looked up as the server does it; the
    backend starts are recorded as (time, environment)."""
    client, server_side = trio.testing.memory_stream_pair()
    recorder = RecordingBackend()
    starts: list[tuple[float, Mapping[str, str]]] = []

    async def starter(_p: Profile, env: Mapping[str, str], _relay: bool) -> Backend:
        starts.append((trio.current_time(), dict(env)))
        return MemoryBackend(recorder, nursery)

    pending = PendingHost.start(nursery, CLIENT, p, confirm=False)
    session = Session(
        ProfileRuntime.build(p),
        server_side,
        Address(CLIENT, 4444),
        Address("127.0.0.1", 25),
        backend_starter=starter,
        remote_host=pending,
    )
    nursery.start_soon(session.run)
    return Lines(client), starts


async def test_a_silent_resolver_delays_the_backend_by_the_timeout_at_most(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, silent_dns: str
) -> None:
    start = trio.current_time()
    lines, starts = await session_with_look_up(nursery, profile(silent_dns, timeout=4.0))
    assert (await lines.reply()).startswith(b"220 ")
    # MAIL at once: the backend it needs (started on demand) waits for the name
    assert (await lines.command(b"MAIL FROM:<a@example.net>")).startswith(b"250 ")
    ((when, env),) = starts
    assert when - start == pytest.approx(4.0)
    assert "TCPREMOTEHOST" not in env
    assert (await lines.command(b"QUIT")).startswith(b"221 ")


async def test_a_known_name_costs_no_wait(nursery: trio.Nursery, dns_address: str) -> None:
    with trio.fail_after(20):
        start = trio.current_time()
        lines, starts = await session_with_look_up(nursery, profile(dns_address, timeout=15.0))
        assert (await lines.reply()).startswith(b"220 ")
        assert (await lines.command(b"MAIL FROM:<a@example.net>")).startswith(b"250 ")
        ((when, env),) = starts
        assert env["TCPREMOTEHOST"] == NAME
        assert when - start < 5.0  # the answer, not the timeout
        assert (await lines.command(b"QUIT")).startswith(b"221 ")


async def test_pending_host_waits_until_its_deadline_only(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, silent_dns: str
) -> None:
    """Whoever asks late waits only for what is left of the timeout."""
    pending = PendingHost.start(nursery, CLIENT, profile(silent_dns, 6.0), confirm=True)
    assert pending.peek() == remotehost.NO_NAME  # never waits
    await trio.sleep(5.0)
    start = trio.current_time()
    assert await pending.get() == remotehost.NO_NAME
    assert trio.current_time() - start == pytest.approx(1.0)


def test_cache_is_bounded_and_expires() -> None:
    now = [0.0]
    cache = HostCache(size=2, clock=lambda: now[0])
    for n in range(3):
        cache.put((n,), HostName(f"h{n}.example"), ttl=10.0)
    assert len(cache) == 2
    assert cache.get((0,)) is None  # the least recently used went first
    assert cache.get((1,)) == HostName("h1.example")
    now[0] = 10.0
    assert cache.get((1,)) is None  # expired
    assert cache.get((2,)) is None


# -- the whole server: qmail's Received line and the TLS log line name the client --


async def test_qmail_received_line_and_tls_log_name_the_client(
    nursery: trio.Nursery, tmp_path: Path, tls_dir: Path, dns_address: str
) -> None:
    capture = tmp_path / "capture"
    capture.mkdir()
    text = (
        '[defaults]\nhostname = "front.example.org"\n[profile.smtp]\n'
        f'listen = ["127.0.0.1:0"]\ncert = {toml_str(tls_dir / "servercert.pem")}\n'
        f"backend = {capture_backend(capture)}\n"
    )
    config = load_config(write_config(tmp_path, text))
    p = dataclasses.replace(config.profiles["smtp"], dns_servers=(dns_address,))
    config = dataclasses.replace(config, profiles={"smtp": p})
    server = await nursery.start(Server(config).run)
    front = Front(server, config, capture)
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    context.check_hostname = False

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", front.port("smtp"), timeout=20) as smtp:
            smtp.starttls(context=context)
            smtp.sendmail("a@example.net", ["b@example.org"], b"Subject: x\r\n\r\nhello\r\n")

    with session_log() as log, trio.fail_after(30):
        await trio.to_thread.run_sync(send)
        await log.wait_ends(1)
    assert any(f"TLS connection established from {NAME}[127.0.0.1]" in x for x in log.lines)
    (message,) = front.maildir()
    # qmail's line, on top of tlsfront's own
    qmail, _tlsfront = [x for x in message.split(b"\n") if x.startswith(b"Received: from")]
    assert qmail.startswith(f"Received: from {NAME} (HELO ".encode()), qmail
    assert {s["env"].get("TCPREMOTEHOST") for s in front.sessions()} == {NAME}
