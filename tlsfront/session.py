"""One client session: the trio shell around the SMTP dialogue.

Theory of operation
-------------------
A session runs in phases. A phase is one backend and one `Dialogue`: the
plaintext part of a STARTTLS session is one phase, the part after the
handshake is another, with a fresh backend (RFC 3207 §4.2); an implicit-TLS
session does its handshake first and has one phase.

Within a phase five tasks share the dialogue (its methods are synchronous,
so no two ever interleave inside it):

* the client reader reads only while `client_wants_data` says so: after
  STARTTLS it stops, so bytes behind it stay in the kernel (the ClientHello
  must not be eaten); while DATA waits for its reply it reads on, bounded
  (`client_read_ahead`), so that a body sent too early is seen as one;
* the backend reader feeds the backend's replies;
* one writer per direction is the only sender on its stream, and sends
  whatever the dialogue's outbox holds, in order;
* the supervisor (the phase's own task) runs the timers, answers the
  dialogue's STARTTLS question, and ends the phase once the dialogue is
  closing or ready for the handshake and the client writer has flushed;
  when the server's `shutdown` event is set it has the dialogue answer
  `421 4.3.2` at the first idle point (`Dialogue.shutdown`), never mid-DATA.

Every change to the dialogue pulses one `_Signal`; each waiting task hands
it the condition it waits for, and a pulse wakes only the tasks whose
condition holds (and each re-checks it when it runs). Reading stops while the other
side's outbox is above a high-water mark, so a slow peer slows its partner
down instead of filling memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import trio

from tlsfront import logs, metrics
from tlsfront.backend import (
    Address,
    Backend,
    BackendError,
    BackendStarter,
    start_backend,
    ucspi_environment,
)
from tlsfront.ratelimit import TLSRateLimiter
from tlsfront.relay import RelayDecision
from tlsfront.runtime import ProfileRuntime
from tlsfront.smtp import Dialogue, Phase, TraceInfo, build_received
from tlsfront.tls import ServerTLS, TLSHandshakeError, TLSInfo

log = logging.getLogger("tlsfront.session")

READ_SIZE = 65536
HIGH_WATER = 256 * 1024
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Signal:
    """Wakes, at each pulse, the waiting tasks whose condition now holds.

    The conditions are evaluated by `pulse` itself, so a task whose
    condition a change did not make true is not scheduled at all: a task
    switch costs far more than a few attribute reads.
    """

    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[], bool], trio.Event]] = []

    def pulse(self) -> None:
        if not self._waiters:
            return
        waiting: list[tuple[Callable[[], bool], trio.Event]] = []
        for condition, event in self._waiters:
            if condition():
                event.set()
            else:
                waiting.append((condition, event))
        self._waiters = waiting

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until a pulse finds `condition()` true (the caller saw it false)."""
        entry = (condition, trio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        finally:
            if not entry[1].is_set():
                self._waiters.remove(entry)


@dataclass
class SessionRecord:
    """What the end-of-session log line reports."""

    profile: str
    client: Address
    started: float
    tls_version: str | None = None
    tls_cipher: str | None = None
    cert_status: str = "none"
    relay: str = "no"
    messages: int = 0
    refused: int = 0
    bytes: int = 0
    backend_exit: int | None = None
    reason: str = ""
    events: list[str] = field(default_factory=list)
    tls_failure: str | None = None  # the handshake's short failure reason
    backend_failure: str | None = None  # start, timeout, exited, protocol

    @property
    def outcome(self) -> str:
        """One word for how the session ended (logs and metrics)."""
        if self.tls_failure is not None:
            return "tls_failed"
        if self.backend_failure is not None:
            return "backend_failed"
        if self.reason.startswith("backend closed the session: 421"):
            return "backend_closed"
        return _OUTCOMES.get(self.reason, "protocol_error")

    def fields(self, now: float) -> dict[str, object]:
        """The end line's fields, by name (the JSON log's keys)."""
        return {
            "client_ip": self.client.ip,
            "client_port": self.client.port,
            "profile": self.profile,
            "tls_version": self.tls_version,
            "tls_cipher": self.tls_cipher,
            "cert": self.cert_status,
            "relay": self.relay,
            "messages": self.messages,
            "refused": self.refused,
            "bytes": self.bytes,
            "backend_exit": self.backend_exit,
            "duration": round(now - self.started, 3),
            "outcome": self.outcome,
            "reason": self.reason,
        }

    def line(self, now: float) -> str:
        tls = f"{self.tls_version}/{self.tls_cipher}" if self.tls_version else "none"
        exit_status = "-" if self.backend_exit is None else str(self.backend_exit)
        return (
            f"session end: client={self.client.ip}:{self.client.port} profile={self.profile} "
            f"tls={tls} cert={self.cert_status} relay={self.relay} messages={self.messages} "
            f"refused={self.refused} bytes={self.bytes} backend_exit={exit_status} "
            f"duration={now - self.started:.3f}s outcome={self.outcome} reason={self.reason!r}"
        )


# How a session that ended for one of these reasons ended; others are the
# client's protocol errors (too long a line, a bare LF, pipelining ...).
_OUTCOMES = {
    "quit": "ok",
    "client closed the connection": "ok",
    "client closed the connection during DATA": "client_lost",
    "client timed out": "timeout",
    "TLS unavailable": "tls_failed",
    "too many new TLS sessions": "rate_limited",
    "shutting down": "shutdown",
    "cancelled": "cancelled",
}


def tls_environment(info: TLSInfo) -> dict[str, str]:
    env = {
        "SSL_PROTOCOL": info.version,
        "SSL_CIPHER": info.cipher,
        "SSL_CIPHER_USEKEYSIZE": str(info.bits),
        "SSL_CIPHER_ALGKEYSIZE": str(info.alg_bits),
        "SSL_SESSION_RESUMED": "Resumed" if info.resumed else "Initial",
    }
    if info.server_name:
        env["SSL_TLS_SNI"] = info.server_name
    return env


class Session:
    def __init__(
        self,
        runtime: ProfileRuntime,
        stream: trio.abc.Stream,
        client: Address,
        local: Address,
        rules_env: dict[str, str] | None = None,
        backend_starter: BackendStarter = start_backend,
        tls_rate: TLSRateLimiter | None = None,
        shutdown: trio.Event | None = None,
    ) -> None:
        self.runtime = runtime
        self.profile = runtime.profile
        self.client = client
        self.local = local
        self.rules_env = rules_env or {}
        self.record = SessionRecord(self.profile.name, client, trio.current_time())
        self._stream: trio.abc.Stream = stream
        self._tls_info: TLSInfo | None = None
        self._decision: RelayDecision | None = None
        self._next_tls: ServerTLS | None = None
        self._backend_starter = backend_starter
        self._tls_rate = tls_rate
        self.shutdown = shutdown  # set: close at the next idle point (421 4.3.2)

    # ------------------------------------------------------------- the whole

    async def _close_client(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self._stream.aclose()

    async def run(self) -> None:
        try:
            await self._run()
        except trio.Cancelled:
            self.record.reason = self.record.reason or "cancelled"
            raise
        finally:
            await self._close_client()
            now = trio.current_time()
            record = self.record
            log.info("%s", record.line(now), extra=logs.fields("session_end", record.fields(now)))
            metrics.session_ended(record)

    async def _run(self) -> None:
        if self.profile.tls == "implicit":
            server_tls = self.runtime.tls.get() if self.runtime.tls else None
            if not self.tls_allowed():
                self.record.reason = "too many new TLS sessions"
                return
            if server_tls is None or not await self._handshake(server_tls):
                self.record.reason = self.record.reason or "TLS unavailable"
                return
        swallow_greeting = False
        while True:
            backend = await self._start_backend()
            if backend is None:
                return
            dialogue = self._dialogue(swallow_greeting)
            try:
                await self._run_phase(dialogue, backend)
            finally:
                if dialogue.phase is not Phase.HANDSHAKE:
                    # The client has had its last reply: it does not wait for
                    # a hung backend to be reaped (up to EXIT_GRACE).
                    await self._close_client()
                self.record.backend_exit = await backend.aclose()
                self.record.messages += dialogue.stats.messages
                self.record.refused += dialogue.stats.refused
                self.record.bytes += dialogue.stats.body_bytes
                self.record.events += dialogue.stats.events
                self.record.reason = dialogue.stats.close_reason or self.record.reason
                if dialogue.backend_error is not None:
                    self.record.backend_failure = metrics.backend_failure_kind(
                        dialogue.backend_error
                    )
            if dialogue.phase is not Phase.HANDSHAKE:
                return
            assert self._next_tls is not None
            if not await self._handshake(self._next_tls):
                return
            swallow_greeting = True

    def _dialogue(self, swallow_greeting: bool) -> Dialogue:
        p = self.profile
        return Dialogue(
            hostname=p.hostname,
            tls_offered=p.tls == "starttls",
            tls_active=self._tls_info is not None,
            require_tls=p.require_tls,
            max_command_line=p.max_command_line,
            max_text_line=p.max_text_line,
            max_message_size=p.max_message_size,
            received=self._received if p.received_header else None,
            swallow_greeting=swallow_greeting,
        )

    def _received(self, helo: str | None, esmtp: bool) -> bytes:
        info, decision = self._tls_info, self._decision
        trace = TraceInfo(
            hostname=self.profile.hostname,
            client_ip=self.client.ip,
            tls_version=info.version if info else None,
            tls_cipher=info.cipher if info else None,
            tls_bits=info.bits if info else 0,
            tls_alg_bits=info.alg_bits if info else 0,
            client_cert=decision.trace if decision else None,
            relay_cert=decision.address if decision and decision.relay else None,
        )
        return build_received(trace, helo, esmtp, datetime.now().astimezone())

    # ------------------------------------------------------------------ TLS

    def tls_allowed(self) -> bool:
        """The profile's `tls_rate_limit`: may this client start one more TLS session?"""
        limit = self.profile.tls_rate_limit
        if self._tls_rate is None or self._tls_rate.allow(
            self.client.ip, limit, trio.current_time()
        ):
            return True
        log.warning(
            "profile %s: [%s] more than %d new TLS sessions a minute",
            self.profile.name,
            self.client.ip,
            limit,
        )
        return False

    async def _handshake(self, server_tls: ServerTLS) -> bool:
        tls_stream = server_tls.wrap(self._stream)
        try:
            with trio.fail_after(self.profile.timeout_handshake):
                await tls_stream.do_handshake()
        except TLSHandshakeError as exc:
            self.record.reason = f"TLS handshake failed: {exc.reason}"
            self.record.tls_failure = exc.reason
            log.info("TLS handshake failed from [%s]: %s", self.client.ip, exc)
            return False
        except trio.TooSlowError:
            self.record.reason = "TLS handshake timed out"
            self.record.tls_failure = "timeout"
            return False
        except STREAM_ERRORS:
            self.record.reason = "client closed the connection during the TLS handshake"
            self.record.tls_failure = "connection lost"
            return False
        self._stream = tls_stream
        info = self._tls_info = tls_stream.info()
        decision = self._decision = self.runtime.relay.decide(info)
        self.record.tls_version, self.record.tls_cipher = info.version, info.cipher
        self.record.cert_status = decision.status
        self.record.relay = "yes" if decision.relay else "no"
        # Postfix's words; "unknown": tlsfront does no reverse lookup
        log.info(
            "%s TLS connection established from unknown[%s]: %s with cipher %s (%d/%d bits)",
            decision.status,
            self.client.ip,
            info.version,
            info.cipher,
            info.bits,
            info.alg_bits,
            extra=logs.fields(
                "tls",
                {
                    "client_ip": self.client.ip,
                    "profile": self.profile.name,
                    "tls_version": info.version,
                    "tls_cipher": info.cipher,
                    "cert": decision.status,
                    "relay": "yes" if decision.relay else "no",
                },
            ),
        )
        if decision.relay:
            log.info("unknown[%s]: relaying allowed for cert %s", self.client.ip, decision.address)
        elif decision.cert is not None:
            log.info(
                "unknown[%s]: no valid cert for gatewaying: %s", self.client.ip, decision.reason
            )
        return True

    # -------------------------------------------------------------- backend

    async def _start_backend(self) -> Backend | None:
        p = self.profile
        decision = self._decision
        relay = bool(decision and decision.relay)
        tls_env = tls_environment(self._tls_info) if self._tls_info else {}
        if decision is not None:
            tls_env.update(decision.env)
        env = ucspi_environment(
            client=self.client,
            local=self.local,
            hostname=p.hostname,
            profile_env=p.env,
            rules_env=self.rules_env,
            tls_env=tls_env,
            relay=relay,
        )
        try:
            with trio.fail_after(p.timeout_backend):
                return await self._backend_starter(p, env, relay)
        except (BackendError, trio.TooSlowError) as exc:
            self.record.reason = f"backend failure: {exc}"
            self.record.backend_failure = "start"
            log.error("profile %s: %s", p.name, exc)
            reply = f"421 4.3.0 {p.hostname} Service temporarily unavailable\r\n".encode()
            with trio.move_on_after(10), contextlib.suppress(*STREAM_ERRORS):
                await self._stream.send_all(reply)
            return None

    # --------------------------------------------------------------- a phase

    async def _run_phase(self, d: Dialogue, backend: Backend) -> None:
        phase = _Phase(self, d, backend)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(phase.client_reader)
            nursery.start_soon(phase.backend_reader)
            nursery.start_soon(phase.client_writer)
            nursery.start_soon(phase.backend_writer)
            if self.shutdown is not None:
                nursery.start_soon(phase.watch_shutdown)
            await phase.supervise()
            nursery.cancel_scope.cancel()


class _Phase:
    """The tasks of one phase (see the module doc)."""

    def __init__(self, session: Session, d: Dialogue, backend: Backend) -> None:
        self.s = session
        self.d = d
        self.client = session._stream
        self.backend = backend
        self.changed = _Signal()
        self.client_sending = False
        self.client_broken = False
        self.backend_eof_sent = False
        self.last_client_read = self.last_backend_read = trio.current_time()

    def _terminal(self) -> bool:
        return self.d.phase in (Phase.CLOSING, Phase.HANDSHAKE)

    def _may_read_client(self) -> bool:
        d = self.d
        wants = d.client_wants_data or d.client_read_ahead
        return self._terminal() or (wants and d.backend_output_size <= HIGH_WATER)

    def _client_output(self) -> bool:
        return self.d.client_output_size > 0

    def _backend_work(self) -> bool:
        d = self.d
        return d.backend_output_size > 0 or (d.backend_should_close and not self.backend_eof_sent)

    def _client_not_full(self) -> bool:
        return self.d.client_output_size <= HIGH_WATER

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
                data = bytes(await self.client.receive_some(READ_SIZE))
            except STREAM_ERRORS:
                data = b""
            self.last_client_read = trio.current_time()
            d.receive_client(data)
            self.changed.pulse()
            if not data:
                return

    async def backend_reader(self) -> None:
        d = self.d
        while True:
            while d.client_output_size > HIGH_WATER:
                await self.changed.wait_until(self._client_not_full)
            try:
                data = await self.backend.receive_some(READ_SIZE)
            except STREAM_ERRORS:
                data = b""
            self.last_backend_read = trio.current_time()
            d.receive_backend(data)
            self.changed.pulse()
            if not data:
                return

    async def client_writer(self) -> None:
        while True:
            data = self.d.take_client_output()
            if not data:
                await self.changed.wait_until(self._client_output)
                continue
            self.client_sending = True
            try:
                # A client that stops reading must not hold the session
                # forever: it has timeout_command to take each write.
                with trio.move_on_after(self.s.profile.timeout_command) as stalled:
                    await self.client.send_all(data)
            except STREAM_ERRORS:
                self.client_broken = True
                self.d.receive_client(b"")
            finally:
                self.client_sending = False
            if stalled.cancelled_caught:
                self.client_broken = True
                self.d.timeout("client")
            self.changed.pulse()
            if self.client_broken:
                return

    async def backend_writer(self) -> None:
        while True:
            data = self.d.take_backend_output()
            try:
                if data:
                    await self.backend.send_all(data)
                elif self.d.backend_should_close and not self.backend_eof_sent:
                    self.backend_eof_sent = True
                    await self.backend.send_eof()
                else:
                    await self.changed.wait_until(self._backend_work)
                    continue
            except STREAM_ERRORS:
                self.d.backend_failed("backend closed its input")
                self.changed.pulse()
                return
            self.changed.pulse()

    def _deadline(self) -> tuple[float, str | None]:
        p = self.s.profile
        side = self.d.waiting_for
        if side == "backend":
            return max(self.mark, self.last_backend_read) + p.timeout_backend, side
        if side == "client":
            if self.d.phase is Phase.BODY:
                idle = self.last_client_read + p.timeout_data
                if p.min_data_rate:
                    budget = p.timeout_data + self.d.stats.body_bytes / p.min_data_rate
                    return min(idle, self.mark + budget), side
                return idle, side
            return self.mark + p.timeout_command, side
        return math.inf, None

    async def watch_shutdown(self) -> None:
        assert self.s.shutdown is not None
        await self.s.shutdown.wait()
        self.changed.pulse()

    def _shutdown_due(self) -> bool:
        """The server is stopping and the client may speak: time for 421."""
        shutdown, d = self.s.shutdown, self.d
        return (
            shutdown is not None
            and shutdown.is_set()
            and d.phase is Phase.COMMAND
            and d.waiting_for == "client"
        )

    def _key(self) -> tuple[str | None, Phase, int]:
        """What the timers depend on: a new key restarts the current one."""
        d = self.d
        return d.waiting_for, d.phase, d.stats.commands

    def _needs_supervisor(self, key: object) -> Callable[[], bool]:
        def check() -> bool:
            d = self.d
            return (
                self.client_broken
                or d.phase is Phase.STARTTLS_READY
                or (self._terminal() and not self.client_sending and not d.client_output_size)
                or self._key() != key
                or self._shutdown_due()
            )

        return check

    async def supervise(self) -> None:
        d = self.d
        key: object = None
        self.mark = trio.current_time()
        while True:
            if self.client_broken:
                return
            if self._terminal() and not self.client_sending and not d.client_output_size:
                return
            if d.phase is Phase.STARTTLS_READY:
                self._answer_starttls()
                self.changed.pulse()
                continue
            if self._shutdown_due() and d.shutdown():
                self.changed.pulse()  # 421 4.3.2 queued; the phase ends once it is sent
                continue
            new_key = self._key()
            if new_key != key:
                key, self.mark = new_key, trio.current_time()
            deadline, side = self._deadline()
            with trio.move_on_at(deadline):
                await self.changed.wait_until(self._needs_supervisor(key))
                continue
            if side is not None and self._deadline()[0] <= trio.current_time():
                d.timeout(side)
                self.changed.pulse()

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


__all__ = ["Session", "SessionRecord", "tls_environment"]
