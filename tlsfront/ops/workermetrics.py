"""One metrics endpoint for all the workers of a server.

Theory of operation
-------------------
With `workers = N`, each worker counts its own sessions and knows its own
live state. Each worker serves its figures, in the text format, on a
private Unix socket in the abstract namespace, named after the parent's
process id and the worker's column of the shared counters, which no other
living worker has (nothing on disk to clean up, gone with the process).
Worker 0 alone serves `metrics_listen`: at each scrape it reads the
figures of every current worker (their columns are in the shared memory;
its own figures directly), and answers with their sum, so a dashboard
sees one server whichever worker served a client. Old workers finishing
their sessions after a reload by replacement are left out, as a worker
that died is.

Counters and gauges add up across the workers (sessions, messages,
sessions in progress, memory), except what describes a thing all workers
share, where the sum would be meaningless: a certificate's expiry and the
TLS-files error flag take the largest value, the process start time the
smallest. `tlsfront_metrics_workers` says how many workers answered: one
that is being started again after a death is left out of that scrape
(with its counters, which died with it, as they do with a single process).

Only a process of the same user may read a worker's socket, and worker 0
reads only from one of its own user (the peer's credentials are checked
on both ends); a worker whose name is taken serves on, and its figures
are missing from the sum.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterable, Iterator

import trio
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("tlsfront")

READ_TIMEOUT = 5.0
MAX_TEXT = 16 << 20
# What all workers share: the sum would be meaningless.
_LARGEST = frozenset(
    {
        "tlsfront_certificate_expiry_timestamp_seconds",
        "tlsfront_tls_files_error",
        "process_max_fds",
    }
)
_SMALLEST = frozenset({"process_start_time_seconds"})


def worker_address(tag: int, column: int) -> bytes:
    """The abstract Unix socket of the worker in `column` of the server whose parent is `tag`."""
    return f"\0tlsfront-{tag}-metrics-{column}".encode()


def _same_user(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]
    return uid == os.getuid()


def exposition(collector: Collector) -> bytes:
    registry = _One(collector)
    return generate_latest(registry)


class _One:
    """A registry of one collector, as `generate_latest` wants it."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def collect(self) -> Iterable[Metric]:
        return self._collector.collect()


async def serve_worker_figures(
    tag: int,
    index: int,
    exposed: Collector,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer each connection to this worker's private socket with its figures."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(worker_address(tag, index))
    except OSError as exc:  # the name is taken: serve on, only without the sum's share
        log.error("worker %d: cannot serve its figures to worker 0: %s", index, exc)
        sock.close()
        task_status.started()
        return
    with sock:
        sock.listen(16)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_answer, conn, exposed)


async def _answer(conn: trio.socket.SocketType, exposed: Collector) -> None:
    with conn:
        try:
            if not _same_user(conn):  # type: ignore[arg-type]
                return
            stream = trio.SocketStream(conn)
            with trio.move_on_after(READ_TIMEOUT):
                await stream.send_all(exposition(exposed))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _read(tag: int, index: int) -> bytes | None:
    """Worker `index`'s figures, or None when it does not answer in time."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock, trio.move_on_after(READ_TIMEOUT):
        try:
            await sock.connect(worker_address(tag, index))
            if not _same_user(sock):  # type: ignore[arg-type]
                return None
            chunks, size = [], 0
            while chunk := await sock.recv(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_TEXT:
                    return None
            return b"".join(chunks)
        except OSError:
            return None
    return None


class Merged(Collector):
    """The sum of the workers' figures (see the module doc), from their text."""

    def __init__(self, texts: list[bytes]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for text in self.texts:
            for family in text_string_to_metric_families(text.decode("utf-8", "replace")):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                samples = values.setdefault(merged.name, {})
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key not in samples:
                        samples[key] = sample.value
                    elif family.name in _LARGEST:
                        samples[key] = max(samples[key], sample.value)
                    elif family.name in _SMALLEST:
                        samples[key] = min(samples[key], sample.value)
                    else:
                        samples[key] += sample.value
        for name, family in families.items():
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family
        workers = GaugeMetricFamily(
            "tlsfront_metrics_workers", "Worker processes whose figures this scrape sums"
        )
        workers.add_metric([], len(self.texts))
        yield workers


async def gather(tag: int, columns: list[int], mine: int, own: Collector) -> Collector:
    """The figures of the workers in `columns`, summed: this one's (`mine`)
    directly, the others' by socket."""
    texts: dict[int, bytes | None] = {mine: exposition(own)}

    async def read(column: int) -> None:
        texts[column] = await _read(tag, column)

    async with trio.open_nursery() as nursery:
        for column in columns:
            if column != mine:
                nursery.start_soon(read, column)
    answered = [text for text in texts.values() if text is not None]
    if len(answered) < len(set(columns) | {mine}):
        log.debug("metrics: %d of %d workers answered", len(answered), len(columns))
    return Merged(answered)


__all__ = ["Merged", "gather", "serve_worker_figures", "worker_address"]
