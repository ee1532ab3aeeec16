"""Listening: one `ProfileServer` per profile, connection limits, reload, stop.

The server holds, per profile, the newest `ProfileRuntime`. A reload builds
a complete new set first (every file read and checked); only when all of it
loads does it replace the old set, so a failed reload changes nothing.
Sessions keep the runtime they started with.

Stopping (`stop`, on SIGTERM) is graceful, in three steps:

1. the listeners close at once and sessions go on undisturbed for
   `shutdown_grace` seconds; most end on their own;
2. then `shutdown` is set: each session that is idle in the command phase
   answers `421 4.3.2 <host> Service shutting down` and closes, and a
   session in the middle of a message keeps going until the backend has
   answered its end of data, and closes the same way at that idle point;
3. sessions still busy another `shutdown_grace` seconds later are cut: the
   backend sees its input close without a final dot and queues nothing, and
   the client, never told 250 for that message, sends it again later.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from tlsfront.auth.dovecot import DovecotVerifier
from tlsfront.auth.throttle import FailureLimiter
from tlsfront.auth.verifier import Verifier
from tlsfront.config.schema import Config, Profile
from tlsfront.inbound.probe import probe
from tlsfront.inbound.profileruntime import ProfileRuntime
from tlsfront.inbound.ratelimit import TLSRateLimiter
from tlsfront.inbound.record import SessionLabel
from tlsfront.inbound.remotehost import PendingHost, cached_host, needs_host
from tlsfront.inbound.session import Session
from tlsfront.inbound.sharedlimits import SharedLimits
from tlsfront.inbound.signals import ShutdownNotice
from tlsfront.net.address import Address, split_host_port
from tlsfront.net.netstream import NetStream
from tlsfront.net.proxyproto import accept_proxied
from tlsfront.ops import counters
from tlsfront.ops.allocator import keep_large_buffers
from tlsfront.qmail.tcprules import Rules
from tlsfront.smtp import replies

log = logging.getLogger("tlsfront")

Handler = Callable[[trio.SocketStream], Awaitable[None]]
# Another source of sessions for `Server.run` (the handoff socket): started
# with the nursery its sessions run in, it calls task_status.started() once
# it accepts, and accepts until cancelled.
Acceptor = Callable[..., Awaitable[None]]


class StartupError(Exception):
    """A listener or a file could not be set up; the message says which."""


def _peer(stream: trio.SocketStream, remote: bool) -> Address:
    try:
        name = stream.socket.getpeername() if remote else stream.socket.getsockname()
    except OSError:
        return Address("0.0.0.0", 0)
    return Address.from_sockaddr(name)


@dataclass
class Limits:
    """Connection counts of one profile; they outlive reloads.

    With `shared` (`workers` > 1), `max_connections` and `max_per_ip` are
    counted for the whole server in memory all workers share; `active` and
    `per_ip` still count this process's own connections.
    """

    active: int = 0
    per_ip: Counter[str] = field(default_factory=Counter)
    tls_rate: TLSRateLimiter = field(default_factory=TLSRateLimiter)  # tls_rate_limit
    auth_failures: FailureLimiter = field(default_factory=FailureLimiter)  # per address
    shared: SharedLimits | None = None

    def admit(self, profile: Profile, ip: str) -> str | None:
        if self.shared is not None:
            refusal = self.shared.admit(
                profile.name, ip, profile.max_connections, profile.max_per_ip
            )
            if refusal is not None:
                return refusal
        else:
            if profile.max_connections and self.active >= profile.max_connections:
                return "too many connections"
            if profile.max_per_ip and self.per_ip[ip] >= profile.max_per_ip:
                return f"too many connections from {ip}"
        self.active += 1
        self.per_ip[ip] += 1
        return None

    def release(self, profile: str, ip: str) -> None:
        if self.shared is not None:
            self.shared.release(profile, ip)
        self.active -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class Verifiers:
    """The AUTH verifiers of a server: checkpassword per runtime, Dovecot shared.

    A Dovecot socket is one connection shared by the sessions of a process,
    kept in the server's own nursery (`nursery`, set while it runs).
    """

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self._dovecot: dict[Path, DovecotVerifier] = {}

    def for_runtime(self, runtime: ProfileRuntime) -> Verifier | None:
        if runtime.auth is not None:
            return runtime.auth
        path = runtime.profile.auth_dovecot
        if path is None or self.nursery is None:
            return None
        verifier = self._dovecot.get(path)
        if verifier is None:
            verifier = self._dovecot[path] = DovecotVerifier(self.nursery, str(path))
        return verifier


class ProfileServer:
    def __init__(
        self,
        runtime: ProfileRuntime,
        shutdown: ShutdownNotice | None = None,
        verifiers: Verifiers | None = None,
        shared: SharedLimits | None = None,
    ) -> None:
        self.runtime = runtime
        self.limits = Limits(shared=shared)
        self.shutdown = shutdown  # set when the server stops (see the module doc)
        self.verifiers = verifiers or Verifiers()

    @property
    def name(self) -> str:
        return self.runtime.profile.name

    async def handle(self, accepted: trio.SocketStream) -> None:
        client, local = _peer(accepted, True), _peer(accepted, False)
        stream = NetStream.adopt(accepted)
        profile = self.runtime.profile
        if profile.proxy_protocol:  # the client's address comes in a PROXY header
            proxied = await accept_proxied(stream, client, local, profile)
            if proxied is not None:
                await self.serve_stream(*proxied)
            return
        await self.serve_stream(stream, client, local)

    async def serve_stream(
        self,
        stream: trio.abc.Stream,
        client: Address,
        local: Address,
        host: str | None = None,
        runtime: ProfileRuntime | None = None,
    ) -> None:
        """One client. `host`: its name when already known (tcpserver's TCPREMOTEHOST).
        `runtime`: the session's own (a handed-over connection's environment),
        else the profile's current one."""
        runtime = runtime or self.runtime  # this session keeps it, whatever reloads come
        profile = runtime.profile
        refusal = self.limits.admit(profile, client.ip)
        if refusal is not None:
            log.warning("profile %s: refused [%s]: %s", profile.name, client.ip, refusal)
            counters.connection_refused(profile.name, SessionLabel.REFUSED)
            await _refuse(stream, profile, refusal)
            return
        try:
            if profile.mode == "outbound":
                from tlsfront.outbound.listener import serve_outbound

                try:
                    await serve_outbound(stream, client.ip, profile)
                finally:
                    await stream.aclose()
                return
            rules = runtime.rules.get() if runtime.rules is not None else None
            confirm = rules is not None and needs_host(rules)
            known = _known_host(profile, client.ip, host, confirm)
            if known is not None:
                await self._serve_inbound(runtime, rules, stream, client, local, known)
                return
            # the client's name is looked up beside the session (see remotehost)
            async with trio.open_nursery() as lookups:
                pending = PendingHost.start(lookups, client.ip, profile, confirm=confirm)
                await self._serve_inbound(runtime, rules, stream, client, local, pending)
                lookups.cancel_scope.cancel()
        finally:
            self.limits.release(profile.name, client.ip)

    async def _serve_inbound(
        self,
        runtime: ProfileRuntime,
        rules: Rules | None,
        stream: trio.abc.Stream,
        client: Address,
        local: Address,
        host: PendingHost,
    ) -> None:
        """An inbound session, after the rules (`=host` keys: the confirmed name)."""
        profile = runtime.profile
        rules_env: dict[str, str] = {}
        if rules is not None:
            name = (await host.get()).confirmed if needs_host(rules) else None
            rule = rules.match(client.ip, name)
            if rule is not None and not rule.allow:
                log.info("profile %s: [%s] denied by %s", profile.name, client.ip, rule.source)
                counters.connection_refused(profile.name, SessionLabel.DENIED)
                await stream.aclose()
                return
            if rule is not None:
                rules_env = dict(rule.env)
        await Session(
            runtime,
            stream,
            client,
            local,
            rules_env,
            tls_rate=self.limits.tls_rate,
            shutdown=self.shutdown,
            remote_host=host,
            verifier=self.verifiers.for_runtime(runtime),
            auth_failures=self.limits.auth_failures,
        ).run()


def _known_host(profile: Profile, ip: str, host: str | None, confirm: bool) -> PendingHost | None:
    """The client's name without a look-up (tcpserver's, none as with -H, or the
    cache's), or None: a look-up is due."""
    if host is not None or not profile.remote_host_lookup:
        return PendingHost.known(host)
    cached = cached_host(ip, profile, confirm=confirm)
    return None if cached is None else PendingHost(cached)


async def _refuse(stream: trio.abc.Stream, profile: Profile, why: str) -> None:
    """421 where the client reads SMTP in clear; just close on implicit TLS."""
    with trio.move_on_after(5):
        try:
            if profile.tls != "implicit":
                await stream.send_all(replies.refused_connection(profile.hostname, why).raw)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await stream.aclose()


def inetd_only(config: Config) -> list[str]:
    """Profiles with neither `listen` nor `systemd`: `tlsfront inetd -p NAME` serves them."""
    return [n for n, p in config.profiles.items() if not p.listen and p.systemd is None]


def check_something_listens(config: Config) -> None:
    """`tlsfront run` needs one profile it can listen for, or the handoff
    socket (inetd starters hand it the connections); raise StartupError if none."""
    if config.settings.handoff_socket is None and len(inetd_only(config)) == len(config.profiles):
        raise StartupError(
            "no profile has listen or systemd: nothing for tlsfront run to serve"
            " (such profiles are for tlsfront inetd -p NAME)"
        )


async def open_listeners(profile: Profile) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    for spec in profile.listen:
        host, port = split_host_port(spec)
        try:
            listeners += await trio.open_tcp_listeners(port, host=None if host == "*" else host)
        except OSError as exc:
            for listener in listeners:
                await listener.aclose()
            raise StartupError(f"profile {profile.name}: cannot listen on {spec}: {exc}") from exc
    return listeners


def build_runtimes(config: Config) -> dict[str, ProfileRuntime]:
    """Every profile's runtime, all files loaded; raises on the first problem."""
    runtimes = {}
    for name, profile in config.profiles.items():
        try:
            runtimes[name] = ProfileRuntime.build(profile)
        except Exception as exc:
            raise StartupError(f"profile {name}: {exc}") from exc
    return runtimes


async def probe_backends(runtimes: Iterable[ProfileRuntime]) -> None:
    """Learn the face of every backend started on demand (see `inbound.probe`)."""
    async with trio.open_nursery() as nursery:
        for runtime in runtimes:
            p = runtime.profile
            if p.mode != "inbound" or p.backend_start != "on-demand" or runtime.face is None:
                continue
            rules_env: dict[str, str] = {}
            rules = runtime.rules.get() if runtime.rules is not None else None
            rule = rules.match("127.0.0.1") if rules is not None else None
            if rule is not None:
                rules_env = dict(rule.env)
            nursery.start_soon(probe, p, runtime.face, rules_env, runtime.inherited)


class Server:
    """Every profile of a configuration, listening."""

    def __init__(self, config: Config, shared: SharedLimits | None = None) -> None:
        """`shared`: the limits of a server of several workers (tlsfront.ops.workers)."""
        self.config = config
        # Set at the end of the grace: sessions close at their next idle point.
        self.shutdown = ShutdownNotice()
        self.verifiers = Verifiers()  # AUTH verifiers shared by the sessions
        self.profiles = {
            name: ProfileServer(runtime, self.shutdown, self.verifiers, shared)
            for name, runtime in build_runtimes(config).items()
        }
        self.addresses: dict[str, list[Address]] = {}
        self.active = 0  # connections being handled, refused ones included
        self.stopping = False
        self._stop = trio.Event()
        self._ended = trio.Event()  # pulsed when a connection ends
        counters.declare_profiles(self.profiles)

    def session_counts(self) -> dict[str, int]:
        """Sessions in progress, per profile."""
        return {name: server.limits.active for name, server in self.profiles.items()}

    async def reload(self, config: Config) -> None:
        """Take a new configuration for new sessions; raise and change nothing on error.

        The backends started on demand are probed again (`inbound.probe`)
        before the new configuration serves its first session.

        Every file is read again (new runtimes, loaded eagerly), also the
        ones that did not change. Profiles, `listen` and `systemd` are
        fixed while running: changing them needs a restart.
        """
        changed = sorted(set(config.profiles) ^ set(self.profiles))
        if changed:
            raise StartupError(
                f"profiles added or removed ({', '.join(changed)}): restart to apply"
            )
        for name in self.profiles:
            old, new = self.config.profiles[name], config.profiles[name]
            if (old.listen, old.systemd) != (new.listen, new.systemd):
                raise StartupError(f"profile {name}: listen or systemd changed: restart to apply")
        runtimes = build_runtimes(config)
        for name, runtime in runtimes.items():
            known = self.profiles[name].runtime.face
            if runtime.face is not None and known is not None:
                runtime.face.take_over(known)  # should the probe fail
        await probe_backends(runtimes.values())
        for name, runtime in runtimes.items():
            self.profiles[name].runtime = runtime
        self.config = config

    def stop(self) -> None:
        """Stop gracefully (see the module doc); `run` returns when it is done."""
        self.stopping = True
        self._stop.set()

    @contextmanager
    def connection(self) -> Iterator[None]:
        """Count a connection in progress for as long as the block runs."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._ended.set()
            self._ended = trio.Event()

    async def _handle(self, server: ProfileServer, stream: trio.SocketStream) -> None:
        with self.connection():
            try:
                await server.handle(stream)
            except Exception:
                # One session's bug must not take every other session down.
                log.exception("profile %s: internal error in a session", server.name)
                counters.connection_refused(server.name, SessionLabel.ERROR)

    async def wait_idle(self) -> None:
        """Until no connection is in progress."""
        while self.active:
            await self._ended.wait()

    async def run(
        self,
        listeners: Mapping[str, Sequence[trio.SocketListener]] | None = None,
        *,
        acceptors: Sequence[Acceptor] = (),
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `stop()` has run its course, or until cancelled.

        `listeners` (e.g. from systemd) replace a profile's `listen`.
        `acceptors`: more sources of sessions, e.g. the handoff socket's
        (tlsfront.inbound.handoff), stopped with the listeners.
        """
        keep_large_buffers()  # large messages reuse their pages (see the module)
        opened: dict[str, list[trio.SocketListener]] = {}
        try:
            for name, server in self.profiles.items():
                if listeners is not None and name in listeners:
                    opened[name] = list(listeners[name])
                else:
                    opened[name] = await open_listeners(server.runtime.profile)
                self.addresses[name] = [
                    Address.from_sockaddr(ln.socket.getsockname()) for ln in opened[name]
                ]
                if not opened[name]:
                    log.info("profile %s: no listen: served by tlsfront inetd only", name)
                for address in self.addresses[name]:
                    log.info("profile %s: listening on [%s]:%d", name, address.ip, address.port)
        except BaseException:
            for ls in opened.values():
                for listener in ls:
                    await trio.aclose_forcefully(listener)
            raise
        await probe_backends(server.runtime for server in self.profiles.values())
        async with trio.open_nursery() as services, trio.open_nursery() as sessions:
            self.verifiers.nursery = services  # a Dovecot connection, while sessions run
            async with trio.open_nursery() as accepting:
                for name, server in self.profiles.items():
                    if not opened[name]:
                        continue
                    serve = partial(
                        trio.serve_listeners,
                        partial(self._handle, server),
                        opened[name],
                        handler_nursery=sessions,
                    )
                    await accepting.start(serve)
                for acceptor in acceptors:
                    await accepting.start(acceptor, sessions)
                task_status.started(self)
                await self._stop.wait()
                accepting.cancel_scope.cancel()  # closes the listeners
            await self._drain(sessions)
            services.cancel_scope.cancel()

    async def _drain(self, sessions: trio.Nursery) -> None:
        grace = self.config.settings.shutdown_grace
        log.info("stopping: no new connections; %d in progress", self.active)
        with trio.move_on_after(grace):
            await self.wait_idle()
        if not self.active:
            return
        log.info("stopping: closing %d idle session(s) with 421", self.active)
        self.shutdown.set()
        with trio.move_on_after(grace):
            await self.wait_idle()
        if self.active:
            log.warning("stopping: cutting %d session(s) still busy", self.active)
            sessions.cancel_scope.cancel()
