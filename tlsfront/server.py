"""Listening: one `ProfileServer` per profile, connection limits, reload.

The server holds, per profile, the newest `ProfileRuntime`. A reload builds
a complete new set first (every file read and checked); only when all of it
loads does it replace the old set, so a failed reload changes nothing.
Sessions keep the runtime they started with.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from tlsfront.backend import Address
from tlsfront.config import Config, Profile, split_host_port
from tlsfront.ratelimit import TLSRateLimiter
from tlsfront.remotehost import lookup_host, needs_host
from tlsfront.runtime import ProfileRuntime
from tlsfront.session import Session

log = logging.getLogger("tlsfront")

Handler = Callable[[trio.SocketStream], Awaitable[None]]


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
    """Connection counts of one profile; they outlive reloads."""

    active: int = 0
    per_ip: Counter[str] = field(default_factory=Counter)
    tls_rate: TLSRateLimiter = field(default_factory=TLSRateLimiter)  # tls_rate_limit

    def admit(self, profile: Profile, ip: str) -> str | None:
        if profile.max_connections and self.active >= profile.max_connections:
            return "too many connections"
        if profile.max_per_ip and self.per_ip[ip] >= profile.max_per_ip:
            return f"too many connections from {ip}"
        self.active += 1
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.active -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class ProfileServer:
    def __init__(self, runtime: ProfileRuntime) -> None:
        self.runtime = runtime
        self.limits = Limits()

    @property
    def name(self) -> str:
        return self.runtime.profile.name

    async def handle(self, stream: trio.SocketStream) -> None:
        await self.serve_stream(stream, _peer(stream, True), _peer(stream, False))

    async def serve_stream(
        self, stream: trio.abc.Stream, client: Address, local: Address, host: str | None = None
    ) -> None:
        """One client. `host`: its name when already known (tcpserver's TCPREMOTEHOST)."""
        runtime = self.runtime  # this session keeps it, whatever reloads come
        profile = runtime.profile
        refusal = self.limits.admit(profile, client.ip)
        if refusal is not None:
            log.warning("profile %s: refused [%s]: %s", profile.name, client.ip, refusal)
            await _refuse(stream, profile, refusal)
            return
        try:
            rules_env: dict[str, str] = {}
            rules = runtime.rules.get() if runtime.rules is not None else None
            if rules is not None:
                if host is None and needs_host(rules):
                    host = await lookup_host(client.ip, profile.dns_servers)
                rule = rules.match(client.ip, host)
                if rule is not None and not rule.allow:
                    log.info("profile %s: [%s] denied by %s", profile.name, client.ip, rule.source)
                    await stream.aclose()
                    return
                if rule is not None:
                    rules_env = dict(rule.env)
            if host is not None:  # after the rule's variables: they cannot misstate it
                rules_env["TCPREMOTEHOST"] = host
            if profile.mode == "outbound":
                from tlsfront.outbound.relay import serve_outbound

                try:
                    await serve_outbound(stream, client.ip, profile)
                finally:
                    await stream.aclose()
                return
            await Session(
                runtime, stream, client, local, rules_env, tls_rate=self.limits.tls_rate
            ).run()
        finally:
            self.limits.release(client.ip)


async def _refuse(stream: trio.abc.Stream, profile: Profile, why: str) -> None:
    """421 where the client reads SMTP in clear; just close on implicit TLS."""
    with trio.move_on_after(5):
        try:
            if profile.tls != "implicit":
                await stream.send_all(f"421 4.7.0 {profile.hostname} Error: {why}\r\n".encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await stream.aclose()


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


class Server:
    """Every profile of a configuration, listening."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.profiles = {
            name: ProfileServer(runtime) for name, runtime in build_runtimes(config).items()
        }
        self.addresses: dict[str, list[Address]] = {}

    def reload(self, config: Config) -> None:
        """Take a new configuration for new sessions; raise and change nothing on error."""
        if set(config.profiles) != set(self.profiles) or any(
            config.profiles[n].listen != self.config.profiles[n].listen for n in self.profiles
        ):
            raise StartupError("profiles or listen addresses changed: restart to apply")
        runtimes = build_runtimes(config)
        for name, runtime in runtimes.items():
            self.profiles[name].runtime = runtime
        self.config = config

    async def run(
        self,
        listeners: Mapping[str, Sequence[trio.SocketListener]] | None = None,
        *,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled. `listeners` (e.g. from systemd) replace `listen`."""
        opened: dict[str, Sequence[trio.SocketListener]] = {}
        for name, server in self.profiles.items():
            if listeners is not None and name in listeners:
                opened[name] = listeners[name]
            else:
                opened[name] = await open_listeners(server.runtime.profile)
            self.addresses[name] = [
                Address.from_sockaddr(ln.socket.getsockname()) for ln in opened[name]
            ]
            for address in self.addresses[name]:
                log.info("profile %s: listening on [%s]:%d", name, address.ip, address.port)
        async with trio.open_nursery() as nursery:
            for name, server in self.profiles.items():
                nursery.start_soon(trio.serve_listeners, server.handle, list(opened[name]))
            task_status.started(self)
