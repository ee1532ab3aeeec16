"""systemd: listening sockets from a socket unit, and readiness notification.

Theory of operation
-------------------
Socket activation (sd_listen_fds(3)). A `.socket` unit binds the ports as
root and starts tlsfront with them already open as file descriptors 3, 4,
...: `LISTEN_FDS` says how many, `LISTEN_PID` whom they are for (a process
that merely inherited the variables must not take them), `LISTEN_FDNAMES`
the socket units' `FileDescriptorName=` values, colon separated, one per
descriptor. Each descriptor is served by the profile whose `systemd =
"NAME"` matches; a descriptor no profile claims, or a profile whose name
came with no descriptor, is a start-up error, because either means the
unit files and the configuration disagree about what is served where.
Profiles without `systemd` listen on their own `listen` addresses. The
variables are removed from the environment once read, as sd_listen_fds()
does.

Notification (sd_notify(3)). With `Type=notify` systemd passes the path of
an AF_UNIX datagram socket in `NOTIFY_SOCKET` (a leading '@' names an
abstract socket); each message is one datagram of `NAME=VALUE` lines:
`READY=1` once every listener is open, `RELOADING=1` with `MONOTONIC_USEC`
(systemd 253 wants the timestamp) and `READY=1` again around a reload,
`STOPPING=1`, `STATUS=` free text for `systemctl status`, and `WATCHDOG=1`
at half the `WATCHDOG_USEC` interval when `WatchdogSec=` is set. Without
`NOTIFY_SOCKET` every call is a no-op, so the same code runs under
daemontools or in a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from tlsfront.config.schema import Config

log = logging.getLogger("tlsfront")

LISTEN_FDS_START = 3


class SystemdError(Exception):
    """The sockets systemd passed and the configuration do not fit together."""


@dataclass(frozen=True)
class PassedSocket:
    fd: int
    name: str  # FileDescriptorName=; systemd's default is the socket unit's name


def passed_sockets(
    environ: MutableMapping[str, str] | None = None, *, unset: bool = True
) -> list[PassedSocket]:
    """The descriptors systemd passed to this process; [] when there are none.

    Each is made close-on-exec, so no backend inherits a listening socket.
    """
    env = os.environ if environ is None else environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid is None or count is None:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        return []  # meant for another process
    if not count.isdigit():
        raise SystemdError(f"LISTEN_FDS={count!r} is not a number")
    n = int(count)
    labels = names.split(":") if names else []
    labels += ["unknown"] * (n - len(labels))
    result = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise SystemdError(f"LISTEN_FDS={n}, but descriptor {fd} is not open: {exc}") from exc
        result.append(PassedSocket(fd, labels[i]))
    return result


def match_sockets(config: Config, names: Sequence[str]) -> dict[str, list[int]]:
    """Which of the passed descriptors (by position) each profile serves.

    Raises SystemdError naming every mismatch between `names` and the
    profiles' `systemd` keys.
    """
    by_name = {p.systemd: p.name for p in config.profiles.values() if p.systemd is not None}
    problems = []
    assigned: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        profile = by_name.get(name)
        if profile is None:
            wanted = ", ".join(repr(n) for n in by_name) or "none"
            problems.append(
                f"the socket unit passed a descriptor named {name!r}, but no profile has "
                f'systemd = "{name}" (profiles ask for: {wanted}; the name is the socket '
                "unit's FileDescriptorName=)"
            )
        else:
            assigned.setdefault(profile, []).append(index)
    for name, profile in by_name.items():
        if profile in assigned:
            continue
        p = config.profiles[profile]
        if not names and p.listen:
            continue  # not socket-activated: the profile's own addresses serve
        if names:
            problems.append(
                f'profile {profile}: systemd = "{name}", but no socket unit passed a '
                f"descriptor of that name (passed: {', '.join(repr(n) for n in names)}); "
                f"set FileDescriptorName={name} in its socket unit"
            )
        else:
            problems.append(
                f'profile {profile}: systemd = "{name}", but tlsfront was not started by '
                "a socket unit (no LISTEN_FDS); add listen = [...] to run it without systemd"
            )
    if problems:
        raise SystemdError("; ".join(problems))
    return assigned


def _listener(passed: PassedSocket) -> trio.SocketListener:
    sock = socket.socket(fileno=passed.fd)
    what = f"descriptor {passed.fd} ({passed.name!r})"
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.detach()
        raise SystemdError(f"{what} is not a TCP socket (use ListenStream=PORT)")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise SystemdError(
            f"{what} is not listening: an Accept=yes socket unit runs `tlsfront inetd`"
        )
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def listeners_by_profile(
    config: Config, passed: Sequence[PassedSocket]
) -> dict[str, list[trio.SocketListener]]:
    """Listeners made of the passed descriptors, per profile name (see `match_sockets`)."""
    assigned = match_sockets(config, [p.name for p in passed])
    return {
        profile: [_listener(passed[i]) for i in indexes] for profile, indexes in assigned.items()
    }


def take_connection(passed: Sequence[PassedSocket]) -> int | None:
    """For `tlsfront inetd` under Accept=yes without StandardInput=socket: the
    one connected socket passed as descriptor 3, or None."""
    if not passed:
        return None
    if len(passed) != 1:
        raise SystemdError(f"inetd mode takes one connection, systemd passed {len(passed)}")
    fd = passed[0].fd
    sock = socket.socket(fileno=fd)
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        sock.detach()
    if listening:
        raise SystemdError(
            "inetd mode got a listening socket: set Accept=yes in the socket unit, "
            "or serve it with `tlsfront run`"
        )
    return fd


# ----------------------------------------------------------------- sd_notify


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock: and other transports tlsfront does not speak


class Notifier:
    """Sends sd_notify messages; does nothing when not run by systemd."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        env = os.environ if environ is None else environ
        value = env.pop("NOTIFY_SOCKET", None) if unset else env.get("NOTIFY_SOCKET")
        if not value:
            return cls(None)
        address = _socket_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET=%s: unsupported address, not notifying systemd", value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram; False when it could not be sent (logged once)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(2.0)  # the manager reads promptly; never hang on it
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
            self._failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(
    environ: MutableMapping[str, str] | None = None, *, unset: bool = True
) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if unset:
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def session_status(counts: Mapping[str, int], stopping: bool = False) -> str:
    """The STATUS= text: live sessions, per profile."""
    total = sum(counts.values())
    detail = ", ".join(f"{name} {n}" for name, n in counts.items())
    head = "stopping: " if stopping else ""
    noun = "session" if total == 1 else "sessions"
    return f"{head}{total} {noun}" + (f" ({detail})" if detail else "")


# ------------------------------------------------------- tlsfront check --units

# Options that, for a service that is not root, make systemd set no_new_privs,
# under which qmail-queue's setuid bit is ignored.
_IMPLY_NNP = (
    "NoNewPrivileges",
    "SystemCallFilter",
    "SystemCallArchitectures",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "PrivateDevices",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectClock",
    "ProtectHostname",
    "MemoryDenyWriteExecute",
    "LockPersonality",
)
_NO = ("no", "false", "0", "off", "")


def read_unit(path: Path) -> dict[str, list[str]]:
    """A unit file's `Key=value` lines (every section), each key's values in order."""
    values: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def _last(unit: Mapping[str, list[str]], key: str, default: str = "") -> str:
    return unit.get(key, [default])[-1]


def _seconds(text: str) -> float | None:
    total, number = 0.0, ""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    for part in text.split():
        number = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        suffix = part[len(number) :]
        if not number or suffix not in units:
            return None
        total += float(number) * units[suffix]
    return total if text.split() else None


def check_units(config: Config, directory: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings): what the unit files in `directory` and `config` disagree on."""
    errors: list[str] = []
    warnings: list[str] = []
    wanted = {p.systemd: p.name for p in config.profiles.values() if p.systemd is not None}
    provided: set[str] = set()
    for path in sorted(directory.glob("*.socket")):
        unit = read_unit(path)
        if _last(unit, "Accept").lower() in ("yes", "true", "1", "on"):
            template = directory / f"{path.stem}@.service"
            if template.exists():
                for command in read_unit(template).get("ExecStart", []):
                    words = command.split()
                    if "inetd" in words and "-p" in words[:-1]:
                        profile = words[words.index("-p") + 1]
                        if profile not in config.profiles:
                            errors.append(
                                f"{template.name}: runs profile {profile!r}, "
                                "which the configuration does not have"
                            )
            continue
        name = _last(unit, "FileDescriptorName", path.name)
        provided.add(name)
        if name not in wanted:
            errors.append(
                f"{path.name}: passes descriptors named {name!r}, but no profile "
                f'has systemd = "{name}"'
            )
    for name, profile in wanted.items():
        if name not in provided:
            warnings.append(
                f'profile {profile}: systemd = "{name}", but no socket unit in '
                f"{directory} has FileDescriptorName={name}"
            )
    grace = config.settings.shutdown_grace
    execs = any(p.backend for p in config.profiles.values())
    for path in sorted(directory.glob("*.service")):
        unit = read_unit(path)
        if not any(" run" in c for c in unit.get("ExecStart", [])):
            continue
        user = _last(unit, "User", "root")
        nnp = [k for k in _IMPLY_NNP if k in unit and _last(unit, k).lower() not in _NO]
        if execs and nnp and user not in ("root", "0"):
            warnings.append(
                f"{path.name}: {', '.join(nnp)} set no_new_privs for user {user}: "
                "qmail-queue's setuid bit is then ignored and every message fails "
                "with 'qq temporary problem'"
            )
        if _last(unit, "KillMode", "control-group") not in ("mixed", "process"):
            warnings.append(
                f"{path.name}: KillMode=mixed keeps SIGTERM from the backends, "
                "which would otherwise drop messages in flight on stop"
            )
        timeout = _seconds(_last(unit, "TimeoutStopSec", "90"))
        if timeout is not None and timeout < 2 * grace:
            warnings.append(
                f"{path.name}: TimeoutStopSec={timeout:g}s is less than twice "
                f"shutdown_grace ({grace:g}s): systemd may kill sessions tlsfront "
                "would still let finish"
            )
    return errors, warnings
