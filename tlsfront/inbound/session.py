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
reader, which fed that command, then starts it (`PhaseTasks.start_backend`)
with the environment of that moment (TLS, certificate, rules) and starts
its reader task. A session that ends before MAIL starts no backend at all,
and a STARTTLS session with mail one. With `backend_start = "connect"`
each phase starts its backend first, as tcpserver would.

Within a phase three tasks share the dialogue (its methods are synchronous,
so no two ever interleave inside it); they live in `phase.py` (`PhaseTasks`):

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
its outboxes now hold (`PhaseTasks.flush`), so a command or a reply crosses
the proxy without a task switch. Each side has one sender at a time; a task
that finds it busy leaves the bytes to it, and it sends until the outbox is
empty. A send that blocks (a client that does not read) is bounded by the
supervisor's timer, which covers the longest-running send as well as the
timeout of whatever the dialogue waits for.

After every change `PhaseTasks.update` does, without a task switch, what
needs no waiting: it answers STARTTLS's question, restarts the timer when
the dialogue moves on, and pulses one `Signal` (`signals.py`, beside
`ShutdownNotice`); a pulse wakes only the tasks whose condition holds.
Reading stops while the other side's outbox is above a high-water mark, so
a slow peer slows its partner down instead of filling memory.

This module keeps what outlives a phase: the TLS handshake and the relay
decision it brings, starting a backend with the environment of the moment,
tlsfront's own AUTH, and the session's record and its log line.
"""

from __future__ import annotations

import contextlib
import logging
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
    start_backend,
    ucspi_environment,
)
from tlsfront.inbound.phase import STREAM_ERRORS, PhaseTasks
from tlsfront.inbound.profileruntime import ProfileRuntime
from tlsfront.inbound.ratelimit import TLSRateLimiter
from tlsfront.inbound.record import SessionRecord
from tlsfront.inbound.relaypolicy import RelayDecision, RelayGrant
from tlsfront.inbound.remotehost import PendingHost
from tlsfront.inbound.signals import ShutdownNotice
from tlsfront.net.address import Address
from tlsfront.net.netstream import NetStream
from tlsfront.ops import counters, logs
from tlsfront.smtp import Dialogue, Outcome, Phase, TraceInfo, build_received
from tlsfront.smtp.dialogue import Carry
from tlsfront.smtp.face import BackendFace
from tlsfront.smtp.replies import backend_unavailable
from tlsfront.tls.context import ServerTLS
from tlsfront.tls.sni import server_name
from tlsfront.tls.stream import HandshakeFailure, TLSHandshakeError, TLSInfo

log = logging.getLogger("tlsfront.inbound.session")

_GOES_ON = frozenset({Phase.HANDSHAKE, Phase.RESET})  # the client stays; a new phase comes


def tls_environment(info: TLSInfo) -> dict[str, str]:
    env = {
        "SSL_PROTOCOL": info.version,
        "SSL_CIPHER": info.cipher,
        "SSL_CIPHER_USEKEYSIZE": str(info.bits),
        "SSL_CIPHER_ALGKEYSIZE": str(info.alg_bits),
        "SSL_SESSION_RESUMED": "Resumed" if info.resumed else "Initial",
    }
    name = server_name(info.server_name)  # a host name, or nothing at all
    if name:
        env["SSL_TLS_SNI"] = name
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
            phase = PhaseTasks(self, dialogue, backend)
            try:
                await phase.run()
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
            pipelining_strict=p.pipelining_strict,
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
        self.record.sni = info.cert_name
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
                        "sni": info.cert_name,
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


__all__ = ["Session", "tls_environment"]
