"""Prometheus metrics: what tlsfront counts, and the endpoint that serves them.

Theory of operation
-------------------
The counters live in one registry for the process (`REGISTRY`). A session
counts itself once, when it ends, from its `SessionRecord`
(`session_ended`): its outcome, its TLS handshake (version, cipher) or the
handshake's failure, the relay decision for a client certificate, a backend
failure, and the messages and message bytes it relayed. The server counts
the connections it refuses before any session starts.

What describes the running server rather than past events (sessions in
progress, each configured certificate's expiry, a certificate that failed
to reload) is not bookkept: `ServerCollector` reads it from the server at
scrape time, so it is never stale.

The endpoint (`serve_metrics`) is a small HTTP responder on trio instead of
prometheus_client's own threaded server: it runs in the event loop that
owns the server's state, so the collector reads live objects without
locks; a slow or stuck scraper costs one task, not a thread; and it stops
with everything else. It answers GET (and HEAD) of `/metrics` or `/` with
the text format, or OpenMetrics when the scraper asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, Counter, ProcessCollector
from prometheus_client import disable_created_metrics as _disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from tlsfront.config.load import split_host_port
from tlsfront.inbound.backend import Address
from tlsfront.inbound.relaypolicy import RelayGrant

if TYPE_CHECKING:
    from tlsfront.inbound.server import Server
    from tlsfront.inbound.session import SessionRecord

log = logging.getLogger("tlsfront")

# `*_created` series double every counter for no use on a dashboard.
_disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

OUTCOMES = (
    "ok",
    "timeout",
    "client_lost",
    "tls_failed",
    "rate_limited",
    "backend_failed",
    "backend_closed",
    "protocol_error",
    "refused",
    "denied",
    "shutdown",
    "cancelled",
    "error",
)

SESSIONS = Counter(
    "tlsfront_sessions",
    "Connections ended, by profile and outcome",
    ["profile", "outcome"],
    registry=REGISTRY,
)
HANDSHAKES = Counter(
    "tlsfront_tls_handshakes",
    "TLS handshakes completed, by protocol version and cipher",
    ["profile", "version", "cipher"],
    registry=REGISTRY,
)
HANDSHAKE_FAILURES = Counter(
    "tlsfront_tls_handshake_failures",
    "TLS handshakes that failed, by reason",
    ["profile", "reason"],
    registry=REGISTRY,
)
RELAY = Counter(
    "tlsfront_relay_decisions",
    "Client certificates shown, by whether they authorized relaying (granted) or not "
    "(refused) and by Postfix-style verdict",
    ["profile", "decision", "cert"],
    registry=REGISTRY,
)
BACKEND_FAILURES = Counter(
    "tlsfront_backend_failures",
    "Backends that could not start (start), hung (timeout), went away (exited) or "
    "spoke nonsense (protocol)",
    ["profile", "kind"],
    registry=REGISTRY,
)
MESSAGES = Counter(
    "tlsfront_messages",
    "Messages whose end of data the backend answered, by accepted or refused",
    ["profile", "result"],
    registry=REGISTRY,
)
MESSAGE_BYTES = Counter(
    "tlsfront_message_bytes",
    "Message bytes relayed from clients to the backend",
    ["profile"],
    registry=REGISTRY,
)
RELOADS = Counter(
    "tlsfront_reloads",
    "Configuration reloads (SIGHUP), by result",
    ["result"],
    registry=REGISTRY,
)


def declare_profiles(names: Iterable[str]) -> None:
    """Make the per-profile series exist at 0, so rate() works from the start."""
    for name in names:
        for outcome in OUTCOMES:
            SESSIONS.labels(name, outcome)
        for result in ("accepted", "refused"):
            MESSAGES.labels(name, result)
        MESSAGE_BYTES.labels(name)
    for result in ("ok", "failed"):
        RELOADS.labels(result)


def backend_failure_kind(why: str) -> str:
    """timeout, exited or protocol, from the dialogue's words for a failure."""
    if "in time" in why:
        return "timeout"
    if why.startswith("backend closed"):
        return "exited"
    return "protocol"


def session_ended(record: SessionRecord) -> None:
    profile = record.profile
    SESSIONS.labels(profile, record.outcome).inc()
    if record.tls_version is not None:
        HANDSHAKES.labels(profile, record.tls_version, record.tls_cipher or "").inc()
        if record.cert_status not in ("none", "Anonymous"):
            decision = "granted" if record.relay is RelayGrant.CERT else "refused"
            RELAY.labels(profile, decision, record.cert_status).inc()
    if record.tls_failure is not None:
        HANDSHAKE_FAILURES.labels(profile, record.tls_failure).inc()
    if record.backend_failure is not None:
        BACKEND_FAILURES.labels(profile, record.backend_failure).inc()
    if record.messages:
        MESSAGES.labels(profile, "accepted").inc(record.messages)
    if record.refused:
        MESSAGES.labels(profile, "refused").inc(record.refused)
    if record.bytes:
        MESSAGE_BYTES.labels(profile).inc(record.bytes)


def connection_refused(profile: str, outcome: str) -> None:
    """A connection turned away before a session: `refused` (limits) or `denied` (rules)."""
    SESSIONS.labels(profile, outcome).inc()


class ServerCollector(Collector):
    """The server's live state, read at each scrape."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "tlsfront_active_sessions", "Sessions in progress", labels=["profile"]
        )
        expiry = GaugeMetricFamily(
            "tlsfront_certificate_expiry_timestamp_seconds",
            "When each configured server certificate expires (Unix time)",
            labels=["profile", "path"],
        )
        broken = GaugeMetricFamily(
            "tlsfront_tls_files_error",
            "1 while a profile's changed TLS files fail to load (the previous ones serve)",
            labels=["profile"],
        )
        for name, profile_server in self.server.profiles.items():
            active.add_metric([name], profile_server.limits.active)
            watch = profile_server.runtime.tls
            if watch is None:
                continue
            server_tls = watch.get()
            broken.add_metric([name], 1 if watch.error else 0)
            if server_tls is None:
                continue
            for creds in server_tls.settings.credentials:
                expires = creds.chain[0].not_valid_after_utc.timestamp()
                expiry.add_metric([name, str(creds.cert_path)], expires)
        yield active
        yield expiry
        yield broken
        yield from outbound_metrics()


def outbound_metrics() -> Iterator[Metric]:
    """The outbound relay's deliveries, by result and TLS outcome (tlsfront.outbound.stats)."""
    from tlsfront.outbound import stats

    deliveries = CounterMetricFamily(
        "tlsfront_outbound_deliveries",
        "Outbound transactions, by result (delivered, deferred, bounced, abandoned) and TLS "
        "(verified, encrypted, cleartext, none)",
        labels=["result", "tls"],
    )
    for (result, tls), count in sorted(stats.outcomes.items()):
        deliveries.add_metric([result, tls], count)
    attempts = CounterMetricFamily(
        "tlsfront_outbound_connections",
        "Outbound connection attempts, by how they ended",
        labels=["tls"],
    )
    for tls, count in sorted(stats.attempts.items()):
        attempts.add_metric([tls], count)
    yield deliveries
    yield attempts


class _Exposed(Collector):
    """Everything one endpoint shows: the process registry and the server's state."""

    def __init__(self, server: Server | None) -> None:
        self._server = ServerCollector(server) if server is not None else None

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        if self._server is not None:
            yield from self._server.collect()


MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0


def _response(status: str, content_type: str, body: bytes, head: bool = False) -> bytes:
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return header if head else header + body


def render(request: bytes, exposed: Collector) -> bytes:
    """The HTTP response to one request head (sans I/O: a test calls it directly)."""
    head, _, _ = request.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", "text/plain", b"bad request\n")
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", "text/plain", b"GET only\n")
    if target.split("?", 1)[0] not in ("/metrics", "/"):
        return _response("404 Not Found", "text/plain", b"see /metrics\n")
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    return _response("200 OK", content_type, encoder(exposed), head=method == "HEAD")


async def _handle(stream: trio.SocketStream, exposed: Collector) -> None:
    request = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        try:
            while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                request += chunk
            if b"\r\n\r\n" in request:
                await stream.send_all(render(request, exposed))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def serve_metrics(
    address: str,
    server: Server | None = None,
    *,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the metrics on `address` ("host:port") until cancelled."""
    host, port = split_host_port(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=None if host == "*" else host)
    except OSError as exc:
        from tlsfront.inbound.server import StartupError

        raise StartupError(f"metrics_listen {address}: cannot listen: {exc}") from exc
    bound = [Address.from_sockaddr(ln.socket.getsockname()) for ln in listeners]
    for where in bound:
        log.info("metrics on http://[%s]:%d/metrics", where.ip, where.port)
    exposed = _Exposed(server)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, exposed)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)
