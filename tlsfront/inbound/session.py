"""One client session: the trio shell around the SMTP dialogue.

Theory of operation
-------------------
A session runs in phases. A phase is one `Dialogue` and at most one
backend: the plaintext part of a STARTTLS session is one phase, the part
after the handshake is another, with a fresh backend if any (RFC 3207
§4.2); an implicit-TLS session does its handshake first and has one phase.

With `backend_start = "on-demand"` (the default) a phase starts without a
backend: the dialogue answers with the backend's face, learned beforehand
(`ProfileRuntime.face`), until a command needs the backend. The client
reader, which fed that command, then starts it (`_Phase.start_backend`)
with the environment of that moment (TLS, certificate, rules) and starts
its reader task. A session that ends before MAIL starts no backend at all,
and a STARTTLS session with mail one. With `backend_start = "connect"`
each phase starts its backend first, as tcpserver would.

Within a phase three tasks share the dialogue (its methods are synchronous,
so no two ever interleave inside it):

* the client reader reads only while `client_wants_data` says so: after
  STARTTLS it stops, so bytes behind it stay in the kernel (the ClientHello
  must not be eaten); while DATA waits for its reply it reads on, bounded
  (`client_read_ahead`), so that a body sent too early is seen as one;
* the backend reader feeds the backend's replies;
* the supervisor (the phase's own task) runs the timers and ends the phase
  once the dialogue is closing or ready for the handshake and the last
  reply has gone out; when the server stops (`ShutdownNotice`) it has the
  dialogue answer `421 4.3.2` at the first idle point (`Dialogue.shutdown`),
  never mid-DATA.

There are no writer tasks: the task that changed the dialogue sends what
its outboxes now hold (`_Phase.flush`), so a command or a reply crosses
the proxy without a task switch. Each side has one sender at a time; a task
that finds it busy leaves the bytes to it, and it sends until the outbox is
empty. A send that blocks (a client that does not read) is bounded by the
supervisor's timer, which covers the longest-running send as well as the
timeout of whatever the dialogue waits for.

After every change `_Phase.update` does, without a task switch, what needs
no waiting: it answers STARTTLS's question, restarts the timer when the
dialogue moves on, and pulses one `_Signal`; a pulse wakes only the tasks
whose condition holds. Reading stops while the other side's outbox is above
a high-water mark, so a slow peer slows its partner down instead of filling
memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from datetime import datetime
from functools import partial

import trio

from tlsfront.auth import replies as auth_replies
from tlsfront.auth.gate import AuthGate
from tlsfront.auth.sasl import Credentials
from tlsfront.auth.throttle import FailureLimiter, SessionThrottle, clean_user
from tlsfront.auth.verifier import Verifier
from tlsfront.inbound.backend import (
    DEFAULT_PATH,
    Backend,
    BackendError,
    BackendStarter,
    ExecBackend,
    start_backend,
    ucspi_environment,
)
from tlsfront.inbound.profileruntime import ProfileRuntime
from tlsfront.inbound.ratelimit import TLSRateLimiter
from tlsfront.inbound.record import SessionRecord
from tlsfront.inbound.relaypolicy import RelayDecision, RelayGrant
from tlsfront.inbound.remotehost import PendingHost
from tlsfront.net.address import Address
from tlsfront.net.netstream import NetStream
from tlsfront.ops import counters, logs
from tlsfront.smtp import Dialogue, Outcome, Phase, TraceInfo, build_received
from tlsfront.smtp.dialogue import Carry
from tlsfront.smtp.face import BackendFace
from tlsfront.smtp.replies import backend_unavailable
from tlsfront.tls.context import ServerTLS
from tlsfront.tls.stream import HandshakeFailure, TLSHandshakeError, TLSInfo

log = logging.getLogger("tlsfront.inbound.session")

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


class ShutdownNotice:
    """Set when the server stops: sessions close at their next idle point.

    `trio.Event`'s interface, plus callbacks run when it is set, so that a
    session learns of it without a task of its own waiting on it.
    """

    def __init__(self) -> None:
        self._event = trio.Event()
        self._callbacks: set[Callable[[], None]] = set()

    def set(self) -> None:
        if not self._event.is_set():
            self._event.set()
            for callback in list(self._callbacks):
                callback()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.add(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.discard(callback)


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
        shutdown: ShutdownNotice | None = None,
        remote_host: PendingHost | None = None,
        verifier: Verifier | None = None,
        auth_failures: FailureLimiter | None = None,
    ) -> None:
        self.runtime = runtime
        self.profile = runtime.profile
        self.client = client
        self.local = local
        self.rules_env = rules_env or {}
        self.record = SessionRecord(self.profile.name, client, trio.current_time())
        self.record.relay = RelayGrant.before_tls(
            self.runtime.inherited, self.profile.env, self.rules_env
        )
        self._stream: trio.abc.Stream = stream
        self._client_closed = False
        self._tls_info: TLSInfo | None = None
        self._decision: RelayDecision | None = None
        self._next_tls: ServerTLS | None = None
        self._backend_starter = backend_starter
        self._tls_rate = tls_rate
        self.shutdown = shutdown  # set: close at the next idle point (421 4.3.2)
        self.remote_host = remote_host  # the client's name, looked up beside the session
        self.verifier = verifier  # tlsfront's own AUTH, when the profile has one
        self._auth_failures = auth_failures or FailureLimiter()
        self._gate: AuthGate | None = None
        self.auth_user: str | None = None  # who logged in (the backend's environment)

    # ------------------------------------------------------------- the whole

    async def _close_client(self) -> None:
        if self._client_closed:
            return
        self._client_closed = True
        stream = self._stream
        if isinstance(stream, NetStream):
            stream.close()  # plaintext: nothing to send, nothing to wait for
            return
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
            await stream.aclose()  # TLS: close_notify, bounded

    async def run(self) -> None:
        try:
            await self._run()
        except trio.Cancelled:
            if self.record.ending is None:
                self.record.end(Outcome.CANCELLED, "cancelled")
            raise
        finally:
            await self._close_client()
            now = trio.current_time()
            record = self.record
            if log.isEnabledFor(logging.INFO):
                fields = logs.fields("session_end", record.fields(now))
                log.info("%s", record.line(now), extra=fields)
            counters.session_ended(record)

    async def _run(self) -> None:
        if self.profile.tls == "implicit":
            server_tls = self.runtime.tls.get() if self.runtime.tls else None
            if not self.tls_allowed():
                self.record.end(Outcome.RATE_LIMITED, "too many new TLS sessions")
                return
            if server_tls is None or not await self._handshake(server_tls):
                if self.record.ending is None:
                    self.record.end(Outcome.TLS_UNAVAILABLE, "TLS unavailable")
                return
        learned = self.runtime.face
        on_demand = learned is not None and self.profile.backend_start == "on-demand"
        face = learned.current if learned is not None and on_demand else None
        after_tls = False
        carry: Carry | None = None  # after a message dropped mid-body (Phase.RESET)
        while True:
            backend = None
            if face is None:
                backend = await self._start_backend()
                if backend is None:
                    return
            dialogue = self._dialogue(after_tls, face, carry)
            phase = _Phase(self, dialogue, backend)
            try:
                await self._run_phase(phase)
            finally:
                if dialogue.phase not in _GOES_ON:
                    # The client has had its last reply: it does not wait for
                    # a hung backend to be reaped (up to EXIT_GRACE).
                    await self._close_client()
                if phase.backend is not None:
                    self.record.backend_exit = await phase.backend.aclose()
                self._phase_ended(dialogue, face)
            carry = dialogue.carry() if dialogue.phase is Phase.RESET else None
            if carry is not None:
                continue  # a fresh backend (on demand: when needed), the same client
            if dialogue.phase is not Phase.HANDSHAKE:
                return
            assert self._next_tls is not None
            if not await self._handshake(self._next_tls):
                return
            after_tls = True

    def _phase_ended(self, dialogue: Dialogue, face: BackendFace | None) -> None:
        record = self.record
        record.messages += dialogue.stats.messages
        record.refused += dialogue.stats.refused
        record.bytes += dialogue.stats.body_bytes
        record.events += dialogue.stats.events
        start_failed = record.backend_failure is Outcome.BACKEND_START  # its words say why
        if dialogue.stats.ending is not None and not start_failed:
            record.ending = dialogue.stats.ending
        if dialogue.backend_error is not None:
            record.backend_failure = dialogue.backend_error.outcome
        learned = self.runtime.face
        if learned and face and not face.probed and dialogue.backend_ehlo is not None:
            # No probe got through: a backend that answered a client's EHLO
            # has shown its extensions after all.
            learned.learn_from_session(dialogue.backend_ehlo)

    def _dialogue(
        self, after_tls: bool, face: BackendFace | None, carry: Carry | None = None
    ) -> Dialogue:
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
            swallow_greeting=after_tls or carry is not None,
            face=face,
            greet=not after_tls and carry is None,
            carry=carry,
            auth=self.verifier is not None,
            require_auth=p.require_auth,
            authorized=bool(self._decision and self._decision.relay),
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
            authenticated=self.auth_user is not None,
            auth_user=self.auth_user if self.profile.received_auth_user else None,
        )
        return build_received(trace, helo, esmtp, datetime.now().astimezone())

    # ----------------------------------------------------------------- AUTH

    def auth_gate(self) -> AuthGate:
        if self._gate is None:
            assert self.verifier is not None
            p = self.profile
            throttle = SessionThrottle(
                self._auth_failures, self.client.ip, max_failures=p.auth_max_failures
            )
            env = {
                "PATH": DEFAULT_PATH,
                "PROTO": "TCP",
                "TCPREMOTEIP": self.client.ip,
                "TCPREMOTEPORT": str(self.client.port),
                "TCPLOCALIP": self.local.ip,
                "TCPLOCALPORT": str(self.local.port),
                "TCPLOCALHOST": p.hostname,
            }
            if self._tls_info is not None:  # always, since AUTH is only inside TLS
                env.update(tls_environment(self._tls_info))
            self._gate = AuthGate(
                self.verifier,
                throttle,
                env,
                on_result=partial(counters.auth_result, p.name),
            )
        return self._gate

    async def conclude_auth(self, d: Dialogue) -> None:
        """Check the credentials of the dialogue's AUTH; answer it."""
        step = d.auth_due
        assert step is not None
        gate = self.auth_gate()
        if not gate.may_try():
            if isinstance(step, Credentials):
                step.wipe()
            d.auth_concluded(auth_replies.TOO_MANY_FAILURES, None, True)
            return
        decision = await gate.conclude(step)
        if decision.user is not None:
            self.auth_user = decision.user
            self.record.events.append(f"logged in as {clean_user(decision.user)}")
            log.info(
                "profile %s: [%s] logged in as %s",
                self.profile.name,
                self.client.ip,
                clean_user(decision.user),
            )
        d.auth_concluded(decision.reply, decision.user, decision.close)

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
            with trio.CancelScope(
                deadline=trio.current_time() + self.profile.timeout_handshake
            ) as timer:
                await tls_stream.do_handshake()
            if timer.cancelled_caught:
                raise trio.TooSlowError
        except TLSHandshakeError as exc:
            self.record.end(Outcome.TLS_FAILED, f"TLS handshake failed: {exc.reason}")
            self.record.tls_failure = exc.kind
            log.info("TLS handshake failed from [%s]: %s", self.client.ip, exc)
            return False
        except trio.TooSlowError:
            self.record.end(Outcome.TLS_FAILED, "TLS handshake timed out")
            self.record.tls_failure = HandshakeFailure.TIMEOUT
            return False
        except STREAM_ERRORS:
            self.record.end(
                Outcome.TLS_FAILED, "client closed the connection during the TLS handshake"
            )
            self.record.tls_failure = HandshakeFailure.CONNECTION_LOST
            return False
        self._stream = tls_stream
        info = self._tls_info = tls_stream.info()
        decision = self._decision = self.runtime.relay.decide(info)
        self.record.tls_version, self.record.tls_cipher = info.version, info.cipher
        self.record.cert_status = decision.status
        if decision.relay:
            self.record.relay = RelayGrant.CERT
        # Postfix's words: name[address], the name once its look-up is over
        name = self.remote_host.peek().name if self.remote_host is not None else None
        who = f"{name or 'unknown'}[{self.client.ip}]"
        if decision.server_fault:  # a stale CRL: every certificate is refused
            log.warning("%s: no valid cert for gatewaying: %s", who, decision.reason)
        if log.isEnabledFor(logging.INFO):  # the fields cost even when not logged
            log.info(
                "%s TLS connection established from %s: %s with cipher %s (%d/%d bits)",
                decision.status,
                who,
                info.version,
                info.cipher,
                info.bits,
                info.alg_bits,
                extra=logs.fields(
                    "tls",
                    {
                        "client_ip": self.client.ip,
                        "client_host": name,
                        "profile": self.profile.name,
                        "tls_version": info.version,
                        "tls_cipher": info.cipher,
                        "cert": decision.status,
                        "relay": self.record.relay.value,
                    },
                ),
            )
            if decision.relay:
                log.info("%s: relaying allowed for cert %s", who, decision.address)
            elif decision.cert is not None and not decision.server_fault:
                log.info("%s: no valid cert for gatewaying: %s", who, decision.reason)
        return True

    # -------------------------------------------------------------- backend

    async def _start_backend(self) -> Backend | None:
        """The backend at the start of a phase; on failure 421 to the client."""
        backend = await self.launch_backend()
        if backend is None:
            reply = backend_unavailable(self.profile.hostname).raw
            with trio.move_on_after(10), contextlib.suppress(*STREAM_ERRORS):
                await self._stream.send_all(reply)
        return backend

    async def launch_backend(self) -> Backend | None:
        """Start the backend with what is known now; None (logged) if it fails."""
        p = self.profile
        decision = self._decision
        relay = bool(decision and decision.relay)
        tls_env = tls_environment(self._tls_info) if self._tls_info else {}
        if decision is not None:
            tls_env.update(decision.env)
        rules_env = self.rules_env
        if self.auth_user is not None:
            # as the qmail AUTH patches: RELAYCLIENT, and the user for the Received line
            relay = True
            tls_env["TCPREMOTEINFO"] = tls_env["SMTPAUTHUSER"] = self.auth_user
        if self.remote_host is not None:  # bounded by remote_host_timeout
            name = (await self.remote_host.get()).remote_host(p.remote_host_paranoid)
            if name is not None:  # after the rule's variables: they cannot misstate it
                rules_env = {**rules_env, "TCPREMOTEHOST": name}
        env = ucspi_environment(
            client=self.client,
            local=self.local,
            hostname=p.hostname,
            profile_env=p.env,
            rules_env=rules_env,
            tls_env=tls_env,
            relay=relay,
            inherited=self.runtime.inherited,
        )
        try:
            with trio.CancelScope(deadline=trio.current_time() + p.timeout_backend):
                return await self._backend_starter(p, env, relay)
            raise trio.TooSlowError(f"no backend within {p.timeout_backend:g}s")
        except (BackendError, trio.TooSlowError) as exc:
            self.record.end(Outcome.BACKEND_START, f"backend failure: {exc}")
            log.error("profile %s: %s", p.name, exc)
            return None

    # --------------------------------------------------------------- a phase

    async def _run_phase(self, phase: _Phase) -> None:
        shutdown = self.shutdown
        if shutdown is not None:
            shutdown.subscribe(phase.server_stopping)
        try:
            async with trio.open_nursery() as nursery:
                phase.nursery = nursery
                nursery.start_soon(phase.client_reader)
                if phase.backend is not None:
                    phase.backend_started()
                await phase.supervise()
                nursery.cancel_scope.cancel()
        finally:
            if shutdown is not None:
                shutdown.unsubscribe(phase.server_stopping)


_TERMINAL = frozenset({Phase.CLOSING, Phase.HANDSHAKE, Phase.RESET})
_GOES_ON = frozenset({Phase.HANDSHAKE, Phase.RESET})  # the client stays; a new phase comes


class _Phase:
    """The tasks of one phase (see the module doc)."""

    def __init__(self, session: Session, d: Dialogue, backend: Backend | None) -> None:
        self.s = session
        self.d = d
        self.client = session._stream
        self.backend = backend  # None until the dialogue wants one (on demand)
        self.nursery: trio.Nursery | None = None  # the phase's tasks, once running
        self.changed = _Signal()
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
                data = bytes(await self.client.receive_some(READ_SIZE))
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
            backend.stderr.session = self.s.record.id
            nursery.start_soon(backend.stderr.run)

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


__all__ = ["Session", "ShutdownNotice", "tls_environment"]
