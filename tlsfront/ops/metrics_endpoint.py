"""The metrics endpoint: the counters and the server's live state, over HTTP.

Theory of operation
-------------------
Past events are counted as they happen (`tlsfront.ops.counters`). What
describes the running server rather than past events (sessions in
progress, each configured certificate's expiry, a certificate that failed
to reload) is not bookkept: `ServerCollector` reads it from the server at
scrape time, so it is never stale; the outbound relay's deliveries are read
from its own tallies (`tlsfront.outbound.stats`) the same way.

The endpoint (`serve_metrics`) is a small HTTP responder on trio instead of
prometheus_client's own threaded server: it runs in the event loop that
owns the server's state, so the collector reads live objects without
locks; a slow or stuck scraper costs one task, not a thread; and it stops
with everything else. It answers GET (and HEAD) of `/metrics` or `/` with
the text format, or OpenMetrics when the scraper asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from tlsfront.inbound.server import Server, StartupError
from tlsfront.net.address import Address, split_host_port
from tlsfront.ops.counters import REGISTRY
from tlsfront.outbound import stats

log = logging.getLogger("tlsfront")


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
            settings = server_tls.settings
            every = [settings.credentials, *settings.by_name.values()]  # by server name too
            for creds in (c for credentials in every for c in credentials):
                expires = creds.chain[0].not_valid_after_utc.timestamp()
                expiry.add_metric([name, str(creds.cert_path)], expires)
        yield active
        yield expiry
        yield broken
        yield from outbound_metrics()


def outbound_metrics() -> Iterator[Metric]:
    """The outbound relay's deliveries, by result and TLS outcome (tlsfront.outbound.stats)."""
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
    logins = CounterMetricFamily(
        "tlsfront_outbound_logins",
        "Outbound logins (AUTH) to smarthosts, by result (succeeded, rejected, tempfail, "
        "unavailable) and mechanism",
        labels=["result", "mechanism"],
    )
    for (result, mechanism), count in sorted(stats.logins.items()):
        logins.add_metric([result, mechanism], count)
    yield deliveries
    yield attempts
    yield logins


class _Exposed(Collector):
    """Everything one endpoint shows: the process registry and the server's state."""

    def __init__(self, server: Server | None) -> None:
        self._server = ServerCollector(server) if server is not None else None

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        if self._server is not None:
            yield from self._server.collect()


def exposed(server: Server | None) -> Collector:
    """Everything this process shows: its registry and the server's live state."""
    return _Exposed(server)


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


Gatherer = Callable[[Collector], Awaitable[Collector]]


async def _handle(
    stream: trio.SocketStream, exposed: Collector, gatherer: Gatherer | None = None
) -> None:
    request = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        try:
            while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                request += chunk
            if b"\r\n\r\n" in request:
                shown = exposed if gatherer is None else await gatherer(exposed)
                await stream.send_all(render(request, shown))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def serve_metrics(
    address: str,
    server: Server | None = None,
    gatherer: Gatherer | None = None,
    *,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the metrics on `address` ("host:port") until cancelled.

    `gatherer`: what a scrape shows, from this process's own figures (with
    workers, every worker's figures summed: tlsfront.ops.workermetrics).
    """
    host, port = split_host_port(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=None if host == "*" else host)
    except OSError as exc:
        raise StartupError(f"metrics_listen {address}: cannot listen: {exc}") from exc
    bound = [Address.from_sockaddr(ln.socket.getsockname()) for ln in listeners]
    for where in bound:
        log.info("metrics on http://[%s]:%d/metrics", where.ip, where.port)
    exposed = _Exposed(server)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, exposed, gatherer)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)
