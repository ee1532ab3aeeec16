"""`workers = N`: N processes serving the same listening sockets.

Theory of operation
-------------------
The parent opens every listening socket (or takes systemd's), checks that the
configuration loads, and forks N workers. Each worker runs a complete trio
server on the inherited sockets: the kernel hands each new connection to one
of the workers waiting in accept(). The parent runs no event loop; it only
supervises:

* SIGHUP goes to every worker, and each re-reads the configuration itself,
  exactly as a single process does (a worker whose reload fails keeps its
  old configuration and logs why); except when the workers have given up
  root (tlsfront.ops.privileges): then the parent, still root, loads the
  configuration again and, when it loads, starts fresh workers and stops
  the old ones gracefully ("reload by replacement");
* SIGTERM / SIGINT go to every worker (graceful stop); the parent exits when
  the last one has;
* a worker that dies unexpectedly is started again, no more than once a
  second; if workers keep dying within a second of starting, the parent stops;
  its connections die with it: only the worker holds them (sockets are not
  inherited by backends), so the kernel closes them at once and their clients
  read EOF or a reset instead of waiting, and their backends read EOF on stdin
  and end without queueing a message whose final dot they had not seen;
* systemd hears READY / RELOADING / STOPPING / WATCHDOG from the parent only
  (the service's main process, as NotifyAccess=main wants).

The workers behave as one server to the outside:

* `max_connections` and `max_per_ip` hold for the whole server: the parent
  makes the shared counters (`tlsfront.inbound.sharedlimits`) before it
  forks, gives each worker it starts a column of them that no living
  worker has, and zeroes a worker's column once it has been reaped (a
  worker that died took its connections with it); `tls_rate_limit` is
  still counted by each worker;
* one metrics endpoint: worker 0 serves `metrics_listen` with the sum of
  the current workers' figures (`tlsfront.ops.workermetrics`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tlsfront.config.schema import Config
from tlsfront.inbound.sharedlimits import SharedLimits
from tlsfront.net.address import split_host_port
from tlsfront.ops.systemd import Notifier, PassedSocket, match_sockets, watchdog_interval

log = logging.getLogger("tlsfront")

BACKLOG = 1024
SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
# A worker that dies within this many seconds of starting counts as a crash loop.
QUICK_DEATH = 1.0
MAX_QUICK_DEATHS = 5

WorkerMain = Callable[[int, Mapping[str, Sequence[socket.socket]]], int]
# Reload by replacement: the new workers' main, or None to keep the old ones.
Reloader = Callable[[], WorkerMain | None]


def open_sockets(config: Config, passed: Sequence[PassedSocket]) -> dict[str, list[socket.socket]]:
    """Every profile's listening sockets: systemd's when passed, else bound here."""
    if passed:
        assigned = match_sockets(config, [p.name for p in passed])
        return {
            name: [socket.socket(fileno=passed[i].fd) for i in indexes]
            for name, indexes in assigned.items()
        }
    opened: dict[str, list[socket.socket]] = {}
    for name, profile in config.profiles.items():
        opened[name] = []
        for spec in profile.listen:
            host, port = split_host_port(spec)
            hosts = ["0.0.0.0", "::"] if host == "*" else [host]
            for address in hosts:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                try:
                    sock = socket.create_server((address, port), family=family, backlog=BACKLOG)
                except OSError as exc:
                    raise OSError(f"profile {name}: cannot listen on {spec}: {exc}") from exc
                sock.set_inheritable(False)  # workers get it by fork, backends never
                opened[name].append(sock)
    return opened


@dataclass(frozen=True)
class WorkerPlace:
    """What a worker knows of the others."""

    index: int
    tag: int  # the parent's process id: names the workers' private metrics sockets
    limits: SharedLimits  # `limits.worker`: this process's column


# Columns of the shared counters per worker index: the current worker and
# old ones still finishing their sessions after reloads by replacement.
COLUMNS_PER_WORKER = 4


def shared_limits(config: Config, workers: int) -> SharedLimits:
    """The connection counters all workers share, sized for the configured limits."""
    capacity = sum(p.max_connections or 1000 for p in config.profiles.values())
    return SharedLimits(list(config.profiles), workers, capacity, workers * COLUMNS_PER_WORKER)


class Supervisor:
    def __init__(
        self,
        count: int,
        sockets: Mapping[str, Sequence[socket.socket]],
        worker_main: WorkerMain,
        reloader: Reloader | None = None,
        limits: SharedLimits | None = None,
    ) -> None:
        self.count = count
        self.limits = limits
        self.columns: dict[int, int] = {}  # pid -> its column of the shared counters
        self.sockets = sockets
        self.worker_main = worker_main
        self.reloader = reloader
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, started)
        self.retiring: set[int] = set()  # replaced workers finishing their sessions
        self.stopping = False
        self.quick_deaths = 0
        self.notifier = Notifier.from_environ()

    def _column(self, index: int) -> int:
        """A column of the shared counters that no living worker counts in."""
        assert self.limits is not None
        taken = set(self.columns.values())
        free = [c for c in range(self.limits.columns) if c not in taken]
        return free[0] if free else index  # more reloads at once than columns: share one

    def spawn(self, index: int) -> None:
        column = self._column(index) if self.limits is not None else 0
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                if self.limits is not None:
                    self.limits.worker = column
                for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                    os.environ.pop(key, None)
                for signum in SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
                code = self.worker_main(index, self.sockets)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        self.children[pid] = (index, time.monotonic())
        if self.limits is not None:
            self.columns[pid] = column
            self.limits.set_current(index, column)
        log.info("worker %d started (pid %d)", index, pid)

    def signal_all(self, signum: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def replace(self) -> None:
        """SIGHUP with a reloader: fresh workers, the old ones stop gracefully."""
        assert self.reloader is not None
        worker_main = self.reloader()
        if worker_main is None:
            return  # the reloader said why; the old workers go on
        old = list(self.children)
        self.children.clear()
        self.retiring.update(old)
        for pid in old:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.worker_main = worker_main
        for index in range(self.count):
            self.spawn(index)
        log.info("reload: %d new workers, %d old ones finishing", self.count, len(old))

    def reap(self) -> None:
        while self.children or self.retiring:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            column = self.columns.pop(pid, None)
            if self.limits is not None and column is not None:
                self.limits.forget_worker(column)  # its connections ended with it
            if pid in self.retiring:
                self.retiring.discard(pid)
                log.info("replaced worker (pid %d) stopped", pid)
                continue
            index, started = self.children.pop(pid, (-1, 0.0))
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                log.info("worker %d (pid %d) stopped", index, pid)
                continue
            log.error("worker %d (pid %d) died with status %d", index, pid, code)
            if time.monotonic() - started < QUICK_DEATH:
                self.quick_deaths += 1
                if self.quick_deaths >= MAX_QUICK_DEATHS:
                    log.error("workers keep dying at start: stopping")
                    self.stop(signal.SIGTERM)
                    continue
                time.sleep(QUICK_DEATH)
            else:
                self.quick_deaths = 0
            self.spawn(index)

    def stop(self, signum: int) -> None:
        if self.stopping:
            log.warning("%s again: workers stop now", signal.Signals(signum).name)
            for pid in self.retiring:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        else:
            log.info("stopping %d workers on %s", len(self.children), signal.Signals(signum).name)
            self.notifier.stopping("stopping")
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        for index in range(self.count):
            self.spawn(index)
        self.notifier.ready(f"{self.count} workers")
        watchdog = watchdog_interval()
        while self.children or self.retiring:
            info = signal.sigtimedwait(SIGNALS, watchdog or 3600.0)
            if watchdog:
                self.notifier.watchdog()
            if info is None:
                continue
            if info.si_signo == signal.SIGCHLD:
                self.reap()
            elif info.si_signo == signal.SIGHUP:
                self.notifier.reloading()
                if self.reloader is None:
                    self.signal_all(signal.SIGHUP)
                elif not self.stopping:
                    self.replace()
                self.notifier.ready(f"{self.count} workers")
            else:
                self.stop(info.si_signo)
        self.notifier.close()
        return 1 if self.quick_deaths >= MAX_QUICK_DEATHS else 0
