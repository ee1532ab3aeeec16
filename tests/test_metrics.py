"""The metrics endpoint, scraped over HTTP and read with prometheus_client's parser.

The counters are the process's, shared by every test in this run, so each
test here serves a profile of its own name and reads only its series.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from support.front import Front, toml_str
from support.hostile import Client, code

from tlsfront.config.certtable import entries
from tlsfront.inbound.record import SessionRecord
from tlsfront.inbound.relaypolicy import RelayGrant
from tlsfront.net.address import Address
from tlsfront.ops import counters
from tlsfront.ops.metrics_endpoint import _Exposed, render, serve_metrics
from tlsfront.smtp.outcome import Outcome

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "conf" / "grafana-dashboard.json"
DOCS = ROOT / "docs" / "operations.md"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def http(address: Address, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream(address.ip, address.port)
    await stream.send_all(request)
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    await stream.aclose()
    return data


async def scrape(address: Address) -> Samples:
    response = await http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    return parse(body.decode())


@dataclass
class Metered:
    front: Front
    metrics: Address
    cert: Path


PROFILE = """
[profile.{name}]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {{cert}}
backend = {{backend}}
client_cert = "request"
client_ca = {{ca}}
relay_clients = {clients}
max_per_ip = 3
"""


@pytest.fixture
async def metered(
    start_front: Any, nursery: trio.Nursery, tmp_path: Path
) -> Callable[[str], Awaitable[Metered]]:
    clients = tmp_path / "tlsclients"
    clients.write_text("relay@example.org\n")

    async def start(name: str) -> Metered:
        front: Front = await start_front(PROFILE.format(name=name, clients=toml_str(clients)))
        bound = await nursery.start(serve_metrics, "127.0.0.1:0", front.server)
        cert = entries(front.config.profiles[name].cert, front.config.profiles[name].key)[
            "default"
        ][0][0]
        return Metered(front, bound[0], cert)

    return start


def client_context(ca: trustme.CA, tmp_path: Path, email: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if email is not None:
        ca.issue_cert(email).configure_cert(context)
    return context


async def mail(port: int, context: ssl.SSLContext, body: bytes) -> None:
    client = await Client.connect(port)
    assert code(await client.reply()) == 220
    assert code(await client.command(b"EHLO client.example.net")) == 250
    assert code(await client.command(b"STARTTLS")) == 220
    await client.starttls(context)
    assert code(await client.command(b"EHLO client.example.net")) == 250
    assert code(await client.command(b"MAIL FROM:<a@example.net>")) == 250
    assert code(await client.command(b"RCPT TO:<b@example.org>")) == 250
    assert code(await client.command(b"DATA")) == 354
    await client.send(body + b".\r\n")
    assert code(await client.reply()) == 250
    assert code(await client.command(b"QUIT")) == 221
    assert await client.rest() == b""
    await client.aclose()


async def test_sessions_handshakes_relay_and_bytes(
    metered: Callable[[str], Awaitable[Metered]], ca: trustme.CA, tmp_path: Path
) -> None:
    m = await metered("counted")
    port = m.front.port("counted")
    body = b"Subject: counted\r\n\r\n" + b"x" * 900 + b"\r\n"
    with trio.fail_after(60):
        await mail(port, client_context(ca, tmp_path, "relay@example.org"), body)
        await mail(port, client_context(ca, tmp_path, "other@example.org"), body)
        await mail(port, client_context(ca, tmp_path, None), body)
        # A handshake that fails: plaintext after the 220.
        bad = await Client.connect(port)
        assert code(await bad.reply()) == 220
        assert code(await bad.command(b"STARTTLS")) == 220
        await bad.send(b"EHLO this is not TLS\r\n" * 20)
        await bad.rest()
        await bad.aclose()
        await m.front.server.wait_idle()  # a client is let go before its backend is reaped
        samples = await scrape(m.metrics)
    p = "counted"
    assert value(samples, "tlsfront_sessions_total", profile=p, outcome="ok") == 3
    assert value(samples, "tlsfront_sessions_total", profile=p, outcome="tls_failed") == 1
    handshakes = {
        dict(labels)["version"]: v
        for (name, labels), v in samples.items()
        if name == "tlsfront_tls_handshakes_total" and dict(labels)["profile"] == p
    }
    assert sum(handshakes.values()) == 3
    assert set(handshakes) <= {"TLSv1.2", "TLSv1.3"}
    failures = [
        dict(labels)["reason"]
        for (name, labels), v in samples.items()
        if name == "tlsfront_tls_handshake_failures_total" and dict(labels)["profile"] == p
    ]
    assert len(failures) == 1
    relay = "tlsfront_relay_decisions_total"
    assert value(samples, relay, profile=p, decision="granted", cert="Verified") == 1
    assert value(samples, relay, profile=p, decision="refused", cert="Trusted") == 1
    why = "tlsfront_relay_sessions_total"
    assert value(samples, why, profile=p, reason="cert") == 1
    assert value(samples, why, profile=p, reason="rule") == 0
    assert value(samples, "tlsfront_messages_total", profile=p, result="accepted") == 3
    # Each body as the client sent it, its end-of-data line included.
    relayed = value(samples, "tlsfront_message_bytes_total", profile=p)
    assert relayed == 3 * len(body + b".\r\n")
    assert value(samples, "tlsfront_active_sessions", profile=p) == 0


async def test_live_state_refusals_and_certificate_expiry(
    metered: Callable[[str], Awaitable[Metered]],
) -> None:
    m = await metered("live")
    port = m.front.port("live")
    with trio.fail_after(60):
        held = [await Client.connect(port) for _ in range(3)]
        for client in held:
            assert code(await client.reply()) == 220
        refused = await Client.connect(port)  # max_per_ip = 3
        assert (await refused.reply()).startswith(b"421 4.7.0")
        await refused.aclose()
        samples = await scrape(m.metrics)
        for client in held:
            assert code(await client.command(b"QUIT")) == 221
            await client.aclose()
    assert value(samples, "tlsfront_active_sessions", profile="live") == 3
    assert value(samples, "tlsfront_sessions_total", profile="live", outcome="refused") == 1
    # Declared at start: a graph of a rare outcome starts at 0, not at nothing.
    timeouts = frozenset({("profile", "live"), ("outcome", "timeout")})
    assert ("tlsfront_sessions_total", timeouts) in samples
    leaf = x509.load_pem_x509_certificates(m.cert.read_bytes())[0]
    expiry = value(
        samples,
        "tlsfront_certificate_expiry_timestamp_seconds",
        profile="live",
        path=str(m.cert),
    )
    assert expiry == leaf.not_valid_after_utc.timestamp()
    assert value(samples, "tlsfront_tls_files_error", profile="live") == 0
    assert any(name == "process_open_fds" for name, _ in samples)


def test_http_answers() -> None:
    exposed = _Exposed(None)
    assert render(b"POST /metrics HTTP/1.1\r\n\r\n", exposed).startswith(b"HTTP/1.1 405 ")
    assert render(b"GET /other HTTP/1.1\r\n\r\n", exposed).startswith(b"HTTP/1.1 404 ")
    assert render(b"garbage\r\n\r\n", exposed).startswith(b"HTTP/1.1 400 ")
    head = render(b"HEAD /metrics HTTP/1.0\r\n\r\n", exposed)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")
    open_metrics = render(
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
        exposed,
    )
    assert b"Content-Type: application/openmetrics-text" in open_metrics
    assert open_metrics.endswith(b"# EOF\n")
    full = render(b"GET / HTTP/1.1\r\n\r\n", exposed)
    samples = parse(full.partition(b"\r\n\r\n")[2].decode())
    assert any(name == "process_open_fds" for name, _ in samples)


async def test_a_slow_scraper_costs_nothing_but_its_own_connection(
    metered: Callable[[str], Awaitable[Metered]],
) -> None:
    m = await metered("slow")
    with trio.fail_after(30):
        stuck = await trio.open_tcp_stream(m.metrics.ip, m.metrics.port)
        await stuck.send_all(b"GET /metr")  # and never the rest
        samples = await scrape(m.metrics)  # others are served meanwhile
        await stuck.aclose()
    assert ("tlsfront_active_sessions", frozenset({("profile", "slow")})) in samples


async def test_the_dashboard_graphs_metrics_that_exist(
    metered: Callable[[str], Awaitable[Metered]],
) -> None:
    m = await metered("dashboard")
    with trio.fail_after(30):
        response = await http(m.metrics, b"GET /metrics HTTP/1.0\r\n\r\n")
    text = response.partition(b"\r\n\r\n")[2].decode()
    families = {family.name for family in text_string_to_metric_families(text)}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b(?:tlsfront|process)_\w+", e)}
    used = {re.sub(r"_total$", "", n) for n in names}
    assert used
    assert used <= families, used - families
    documented = set(re.findall(r"`(tlsfront_\w+)`", DOCS.read_text()))
    assert {re.sub(r"_total$", "", n) for n in documented} <= families


def test_relay_sessions_count_each_reason() -> None:
    """A session that could relay is counted once, by why: certificate or rule."""
    name = "relay-reasons"
    counters.declare_profiles([name])

    def count(reason: str) -> float | None:
        labels = {"profile": name, "reason": reason}
        return counters.REGISTRY.get_sample_value("tlsfront_relay_sessions_total", labels)

    assert (count("cert"), count("rule")) == (0, 0)
    for grant in (RelayGrant.RULE, RelayGrant.RULE, RelayGrant.CERT, RelayGrant.NO):
        record = SessionRecord(name, Address("192.0.2.1", 1), 0.0)
        record.relay = grant
        record.end(Outcome.QUIT, "quit")
        counters.session_ended(record)
    assert (count("cert"), count("rule"), count("no")) == (1, 2, None)
