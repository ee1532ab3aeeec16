"""tlsfront.ops.workermetrics: one endpoint shows the sum of the workers' figures."""

from __future__ import annotations

import os
import random

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tlsfront.ops.workermetrics import Merged, exposition, gather, serve_worker_figures


class Fixed(Collector):
    """One worker's figures."""

    def __init__(self, sessions: float, active: float, expiry: float, started: float) -> None:
        self.figures = (sessions, active, expiry, started)

    def collect(self) -> list[Metric]:
        sessions, active, expiry, started = self.figures
        counter = CounterMetricFamily("tlsfront_sessions", "ended", labels=["profile"])
        counter.add_metric(["smtp"], sessions)
        gauge = GaugeMetricFamily("tlsfront_active_sessions", "now", labels=["profile"])
        gauge.add_metric(["smtp"], active)
        cert = GaugeMetricFamily(
            "tlsfront_certificate_expiry_timestamp_seconds", "expiry", labels=["path"]
        )
        cert.add_metric(["/c.pem"], expiry)
        start = GaugeMetricFamily("process_start_time_seconds", "start")
        start.add_metric([], started)
        return [counter, gauge, cert, start]


def figures(text: bytes) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line and not line.startswith("#")
    }


def test_counters_and_gauges_add_up_shared_things_do_not() -> None:
    texts = [exposition(Fixed(3, 1, 2000, 50)), exposition(Fixed(4, 2, 2000, 40))]
    shown = figures(exposition(Merged(texts)))
    assert shown['tlsfront_sessions_total{profile="smtp"}'] == 7
    assert shown['tlsfront_active_sessions{profile="smtp"}'] == 3
    assert shown['tlsfront_certificate_expiry_timestamp_seconds{path="/c.pem"}'] == 2000
    assert shown["process_start_time_seconds"] == 40
    assert shown["tlsfront_metrics_workers"] == 2


async def test_gather_reads_every_worker_and_counts_who_answered(
    nursery: trio.Nursery,
) -> None:
    tag = os.getpid() * 1000 + random.randrange(1000)  # no clash with a running server
    with trio.fail_after(20):
        await nursery.start(serve_worker_figures, tag, 1, Fixed(5, 1, 9, 9))
        await nursery.start(serve_worker_figures, tag, 2, Fixed(6, 0, 9, 9))
        shown = figures(exposition(await gather(tag, [0, 1, 2], 0, Fixed(1, 1, 9, 9))))
        assert shown['tlsfront_sessions_total{profile="smtp"}'] == 12
        assert shown["tlsfront_metrics_workers"] == 3
        # worker 3 of 4 does not answer (being started again): left out
        shown = figures(exposition(await gather(tag, [0, 1, 2, 3], 0, Fixed(1, 1, 9, 9))))
        assert shown['tlsfront_sessions_total{profile="smtp"}'] == 12
        assert shown["tlsfront_metrics_workers"] == 3
