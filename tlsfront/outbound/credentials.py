"""Credentials for the relay's routes: who to log in as at which smarthost.

Two sources, read in this order (the first line for a host and port wins):

* `route_credentials`: tlsfront's own file, one route a line:

      # host[:port]             user                 password
      smarthost.example.net:587  alice@example.net    correct horse battery staple
      [2001:db8::25]:587         relay                s3cret

  The password is the rest of the line after the user name and the blanks
  that follow it, so it may hold spaces and `#`; blanks at its end are
  dropped (a password cannot end in a blank). A line whose first non-blank
  character is `#` is a comment; blank lines are skipped. A host without a
  port stands for every port of that host.

* `smtproutes` (filled from `qmail_control`): qmail's file in the form the
  qmail-remote AUTH patch reads, `domain:relay[:port] user password`. Only
  the lines that carry a user and a password are taken, as credentials for
  `relay[:port]`; where mail goes is still decided by `routes`. Some builds
  of the patch let a user name starting with `-` log in without TLS; the
  `-` is dropped and TLS is required all the same.

A file that holds passwords must be readable by its owner only (no group or
other permission bits): one that is not is refused, naming it. Errors never
show a password.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tlsfront.auth.secret import Secret
from tlsfront.config.schema import Profile
from tlsfront.net.address import parse_hostport
from tlsfront.ops.watch import FileWatch
from tlsfront.outbound.policy import table_level


class CredentialsError(Exception):
    """A credentials file that cannot be used; the text names it, never a password."""


@dataclass(frozen=True)
class Login:
    """One route's credentials; the password shows as `<secret>`."""

    host: str  # lower case, no trailing dot, no brackets
    port: int | None  # None: every port
    user: str
    password: Secret
    source: str  # "file:line"

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


class LoginTable:
    """Logins by host and port; the first one given for a key wins."""

    def __init__(self, logins: Iterable[Login] = ()) -> None:
        self.logins: list[Login] = []
        self._by_key: dict[tuple[str, int | None], Login] = {}
        for login in logins:
            if (login.host, login.port) not in self._by_key:
                self._by_key[login.host, login.port] = login
                self.logins.append(login)

    def find(self, host: str, port: int) -> Login | None:
        host = _host_key(host)
        return self._by_key.get((host, port)) or self._by_key.get((host, None))

    def __len__(self) -> int:
        return len(self.logins)


def _host_key(host: str) -> str:
    return host.strip("[]").lower().rstrip(".")


def _target(text: str) -> tuple[str, int | None] | None:
    """`host`, `host:port`, `[address]` or `[address]:port`; None when malformed."""
    port_text: str | None = None
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        return None  # an IPv6 address with a port goes in brackets
    else:
        host = text
    host = _host_key(host)
    if not host or any(c in host for c in "/@"):
        return None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)


def _user_and_password(rest: str) -> tuple[str, str] | None:
    parts = rest.split(None, 1)
    if len(parts) != 2:
        return None
    user, password = parts[0], parts[1].rstrip()
    if not password or "\0" in user + password:
        return None
    return user, password


def parse_route_credentials(text: str, path: Path) -> list[Login]:
    """The lines of a `route_credentials` file."""
    logins = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        head, *rest = line.split(None, 1)
        target = _target(head)
        pair = _user_and_password(rest[0] if rest else "")
        if target is None or pair is None:
            raise CredentialsError(f"{where}: not 'host[:port] user password'")
        logins.append(Login(target[0], target[1], pair[0], Secret(pair[1].encode()), where))
    return logins


def parse_smtproutes(text: str, path: Path) -> list[Login]:
    """The lines of qmail's smtproutes that carry credentials (AUTH patch form)."""
    logins = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        parts = line.split(None, 1)
        if len(parts) < 2 or line.startswith("#"):
            continue  # a plain route: qmail-remote's business
        where = f"{path}:{number}"
        route, rest = parts
        _domain, colon, relay = route.partition(":")
        target = _target(relay) if colon and relay else None
        pair = _user_and_password(rest)
        if target is None or pair is None:
            raise CredentialsError(f"{where}: not 'domain:relay[:port] user password'")
        user = pair[0][1:] if pair[0].startswith("-") and len(pair[0]) > 1 else pair[0]
        logins.append(Login(target[0], target[1], user, Secret(pair[1].encode()), where))
    return logins


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CredentialsError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read: {exc.strerror or exc}") from None


def check_private(path: Path) -> None:
    """Refuse a file that others than its owner may read or write."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise CredentialsError(
            f"{path}: holds passwords but is open to others than its owner (mode {mode:04o});"
            f" chmod 600 {path}"
        )


def read_route_credentials(path: Path) -> list[Login]:
    check_private(path)
    return parse_route_credentials(_read(path), path)


def read_smtproutes(path: Path) -> list[Login]:
    """Credentials from smtproutes; only a file that holds some must be private."""
    logins = parse_smtproutes(_read(path), path)
    if logins:
        check_private(path)
    return logins


def read_logins(route_credentials: Path | None, smtproutes: Path | None) -> LoginTable:
    """Both sources, `route_credentials` first; raises CredentialsError."""
    logins: list[Login] = []
    if route_credentials is not None:
        logins += read_route_credentials(route_credentials)
    if smtproutes is not None:
        logins += read_smtproutes(smtproutes)
    return LoginTable(logins)


def profile_logins(profile: Profile) -> LoginTable:
    """A profile's credentials, read now; raises CredentialsError."""
    return read_logins(profile.route_credentials, profile.smtproutes)


def _same_target(target: str, login: Login) -> bool:
    host, port = parse_hostport(target, 25)
    return _host_key(host) == login.host and login.port in (None, port)


def describe_logins(profile: Profile) -> list[str]:
    """What `check` says of each login: where, as whom, which routes, their TLS.

    Raises CredentialsError when a file cannot be used.
    """
    notes = []
    for login in profile_logins(profile).logins:
        text = (
            f"{login.source}: logs in to {login.target} as {login.user} (PLAIN or LOGIN)"
            " only inside TLS verified for that host: TLS required, policy at least 'verify'"
        )
        routed = [d for d, t in profile.routes.items() if t and _same_target(t, login)]
        for domain in routed:
            level = table_level(profile.tls_policy, domain)
            raised = (
                f" (tls_policy '{level}' raised)" if level in ("none", "may", "encrypt") else ""
            )
            text += f"; route {domain or '(default)'} -> {profile.routes[domain]}{raised}"
        if not routed:
            text += "; no route names it (used where an MX host is that host)"
        notes.append(text)
    return notes


class RouteLogins:
    """A profile's credentials files, read again for new deliveries when they change.

    A change that breaks a file is logged and the last good table kept;
    `get()` is None only while the files have never been read successfully.
    """

    def __init__(self, name: str, route_credentials: Path | None, smtproutes: Path | None):
        files: Sequence[Path] = [p for p in (route_credentials, smtproutes) if p is not None]
        self.watch: FileWatch[LoginTable] | None = None
        if files:
            self.watch = FileWatch(
                f"profile {name}: route credentials",
                files,
                lambda: read_logins(route_credentials, smtproutes),
            )

    def get(self) -> LoginTable | None:
        return LoginTable() if self.watch is None else self.watch.get()

    @property
    def error(self) -> str | None:
        return None if self.watch is None else self.watch.error


__all__ = [
    "CredentialsError",
    "Login",
    "LoginTable",
    "RouteLogins",
    "check_private",
    "describe_logins",
    "parse_route_credentials",
    "parse_smtproutes",
    "profile_logins",
    "read_logins",
]
