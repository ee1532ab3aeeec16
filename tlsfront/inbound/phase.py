"""One phase of a session: its tasks around one dialogue and at most one backend.

The client reader, the backend reader and the supervisor of a phase, the
senders they call, and the timers; how they share the dialogue is told in
the theory of operation of `tlsfront.inbound.session`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

from tlsfront.inbound.backend import Backend, ExecBackend
from tlsfront.inbound.signals import Signal
from tlsfront.smtp import Dialogue, Outcome, Phase

if TYPE_CHECKING:
    from tlsfront.inbound.session import Session

READ_SIZE = 65536  # the backend's reads; the client's are its stream's own size
HIGH_WATER = 256 * 1024
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)

_TERMINAL = frozenset({Phase.CLOSING, Phase.HANDSHAKE, Phase.RESET})


class PhaseTasks:
    """The tasks of one phase (see the module doc)."""

    def __init__(self, session: Session, d: Dialogue, backend: Backend | None) -> None:
        self.s = session
        self.d = d
        self.client = session._stream
        self.backend = backend  # None until the dialogue wants one (on demand)
        self.nursery: trio.Nursery | None = None  # the phase's tasks, once running
        self.changed = Signal()
        self.now = trio.lowlevel.current_clock().current_time  # fewer frames than trio's
        shutdown = session.shutdown
        self.stopping = shutdown is not None and shutdown.is_set()  # see server_stopping
        self.client_sending = False
        self.client_send_deadline = math.inf
        self.client_broken = False
        self.backend_sending = False
        self.backend_broken = False
        self.backend_eof_sent = False
        self.last_client_read = self.last_backend_read = self.mark = self.now()
        self.key: tuple[str | None, Phase, int] | None = None
        self.timer: trio.CancelScope | None = None  # the supervisor's, while it waits

    async def run(self) -> None:
        """The phase's tasks, until the supervisor ends the phase."""
        shutdown = self.s.shutdown
        if shutdown is not None:
            shutdown.subscribe(self.server_stopping)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self.client_reader)
                if self.backend is not None:
                    self.backend_started()
                await self.supervise()
                nursery.cancel_scope.cancel()
        finally:
            if shutdown is not None:
                shutdown.unsubscribe(self.server_stopping)

    # -------------------------------------------------------- synchronous part

    def update(self) -> None:
        """After every change to the dialogue or to a sender: the supervision
        that needs no task switch (STARTTLS's answer, restarting the timer),
        then wake the tasks whose condition now holds."""
        d = self.d
        if d.phase is Phase.STARTTLS_READY:
            self._answer_starttls()
        key = (d.waiting_for, d.phase, d.stats.commands)
        if key != self.key:
            self.key, self.mark = key, self.now()
            timer = self.timer
            if timer is not None:
                # Only ever brought forward here: a later deadline is found
                # when the timer fires early, which is cheaper than moving
                # it at every command.
                deadline = self._deadline()
                if deadline < timer.deadline:
                    timer.deadline = deadline
        self.changed.pulse()

    def _terminal(self) -> bool:
        return self.d.phase in _TERMINAL

    def _may_read_client(self) -> bool:
        d = self.d
        wants = d.client_wants_data or d.client_read_ahead
        return self._terminal() or (wants and d.backend_output_size <= HIGH_WATER)

    def _client_not_full(self) -> bool:
        return self.d.client_output_size <= HIGH_WATER

    def _finished(self) -> bool:
        """The phase is over: the client is gone, or its last reply is sent."""
        d = self.d
        return self.client_broken or (
            self._terminal() and not self.client_sending and not d.client_output_size
        )

    def _needs_supervisor(self) -> bool:
        return self._finished() or self._shutdown_due()

    def server_stopping(self) -> None:
        """The ShutdownNotice's callback."""
        self.stopping = True
        self.changed.pulse()

    # ------------------------------------------------------------- the readers

    async def client_reader(self) -> None:
        d = self.d
        while True:
            while not (d.client_wants_data or d.client_read_ahead) or (
                d.backend_output_size > HIGH_WATER
            ):
                if self._terminal():
                    return
                await self.changed.wait_until(self._may_read_client)
            try:
                # No size: each stream reads what suits it (a socket 64 KiB,
                # the TLS stream up to 256 KiB of a large message at hand).
                data = bytes(await self.client.receive_some())
            except STREAM_ERRORS:
                data = b""
            self.last_client_read = self.now()
            d.receive_client(data)
            self.update()
            await self.flush()
            if d.auth_due is not None:
                await self.s.conclude_auth(d)
                self.update()
                await self.flush()
            if d.backend_wanted:
                await self.start_backend()
            if not data:
                return

    async def start_backend(self) -> None:
        """The backend on demand, for the command the dialogue holds."""
        d = self.d
        backend = await self.s.launch_backend()
        if backend is None:
            d.backend_unavailable()
        else:
            self.backend = backend
            self.last_backend_read = self.now()
            self.backend_started()
            d.backend_started()
        self.update()
        await self.flush()

    def backend_started(self) -> None:
        """Its reader, and its stderr logged as lines."""
        backend = self.backend
        nursery = self.nursery
        assert backend is not None
        assert nursery is not None
        nursery.start_soon(self.backend_reader)
        if isinstance(backend, ExecBackend):
            backend.stderr.watch(self.s.record.id)

    async def backend_reader(self) -> None:
        d = self.d
        backend = self.backend
        assert backend is not None
        while True:
            while d.client_output_size > HIGH_WATER:
                await self.changed.wait_until(self._client_not_full)
            try:
                data = await backend.receive_some(READ_SIZE)
            except STREAM_ERRORS:
                data = b""
            self.last_backend_read = self.now()
            d.receive_backend(data)
            self.update()
            await self.flush()
            if not data:
                return

    # ------------------------------------------------------------- the senders

    async def flush(self) -> None:
        """Send what the dialogue's outboxes hold, in the calling task.

        Each side has one sender at a time: a task that finds the other
        side's sender busy leaves the bytes to it (the sender loops until
        the outbox is empty, and no task switch comes between its last look
        and its flag going down).
        """
        if not self.backend_sending:
            await self._flush_backend()
        if not self.client_sending:
            await self._flush_client()

    async def _flush_backend(self) -> None:
        d = self.d
        if not d.backend_output_size and (self.backend_eof_sent or not d.backend_should_close):
            return  # nothing to do: no flag to raise, nobody to wake
        backend = self.backend
        if backend is None:
            d.take_backend_output()  # nothing was ever written for it
            return
        self.backend_sending = True
        try:
            while True:
                data = d.take_backend_output()
                if self.backend_broken:
                    return  # nowhere to send it; the dialogue has answered 4xx
                if data:
                    await backend.send_all(data)
                elif d.backend_should_close and not self.backend_eof_sent:
                    self.backend_eof_sent = True
                    await backend.send_eof()
                else:
                    return
        except STREAM_ERRORS:
            self.backend_broken = True
            d.backend_failed(Outcome.BACKEND_EXITED, "backend closed its input")
        finally:
            self.backend_sending = False
            self.update()

    async def _flush_client(self) -> None:
        d = self.d
        if not d.client_output_size or self.client_broken:
            return
        self.client_sending = True
        try:
            while not self.client_broken:
                data = d.take_client_output()
                if not data:
                    return
                # A client that stops reading must not hold the session
                # forever: it has timeout_command to take each write. The
                # supervisor's timer enforces it (`_deadline`), so the common
                # write that never blocks pays for no timer of its own.
                deadline = self.now() + self.s.profile.timeout_command
                self.client_send_deadline = deadline
                timer = self.timer
                if timer is not None and deadline < timer.deadline:
                    timer.deadline = deadline
                await self.client.send_all(data)
        except STREAM_ERRORS:
            self.client_broken = True
            d.receive_client(b"")
        finally:
            self.client_sending = False
            self.update()

    # -------------------------------------------------------------- supervisor

    def _deadline(self) -> float:
        """When the supervisor must look again: the timeout of what is awaited."""
        p = self.s.profile
        d = self.d
        side = d.waiting_for
        if side == "backend":
            deadline = max(self.mark, self.last_backend_read) + p.timeout_backend
        elif side == "client":
            if d.phase is Phase.BODY:
                deadline = self.last_client_read + p.timeout_data
                if p.min_data_rate:
                    budget = p.timeout_data + d.stats.body_bytes / p.min_data_rate
                    deadline = min(deadline, self.mark + budget)
            else:
                deadline = self.mark + p.timeout_command
        else:
            deadline = math.inf
        if self.client_sending:
            deadline = min(deadline, self.client_send_deadline)
        return deadline

    def _shutdown_due(self) -> bool:
        """The server is stopping and the client may speak: time for 421."""
        d = self.d
        return self.stopping and d.phase is Phase.COMMAND and d.waiting_for == "client"

    async def supervise(self) -> None:
        """Run the timers and end the phase; everything else is `update`'s."""
        d = self.d
        self.update()
        if d.client_output_size:  # tlsfront's own greeting (the backend on demand)
            await self._supervisor_flush()
        if d.backend_wanted:  # wanted by commands carried over from the last phase
            await self.start_backend()
        while not self._finished():
            now = self.now()
            if self.client_sending and self.client_send_deadline <= now:
                self.client_broken = True  # it stopped reading: the write stalled
                d.timeout("client")
                return
            act = self._shutdown_due() and d.shutdown()  # 421 4.3.2 queued
            side = d.waiting_for
            if not act and side is not None and self._deadline() <= now:
                d.timeout(side)
                act = True
            if act:
                self.update()
                await self._supervisor_flush()
                continue
            with trio.CancelScope(deadline=self._deadline()) as self.timer:
                await self.changed.wait_until(self._needs_supervisor)
            self.timer = None

    async def _supervisor_flush(self) -> None:
        """Send a reply of the supervisor's own (421), never blocking its timers."""
        with trio.move_on_after(self.s.profile.timeout_command) as stalled:
            await self.flush()
        if stalled.cancelled_caught:
            self.client_broken = True

    def _answer_starttls(self) -> None:
        watch = self.s.runtime.tls
        server_tls = watch.get() if watch is not None else None
        if server_tls is None:
            self.d.starttls_refuse()
            return
        if not self.s.tls_allowed():
            self.d.starttls_refuse(f"Error: too many new TLS sessions from {self.s.client.ip}")
            return
        self.s._next_tls = server_tls
        self.d.starttls_accept()


__all__ = ["HIGH_WATER", "READ_SIZE", "STREAM_ERRORS", "PhaseTasks"]
