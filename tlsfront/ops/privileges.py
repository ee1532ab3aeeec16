"""Root's powers: used to start, then given up.

Theory of operation
-------------------
Started as root (to bind ports 25, 465, 587 and to read root-only keys),
`tlsfront run` does what needs root in a small supervising parent and serves
in workers that hold no root power at all:

* the parent binds every listening socket (or takes systemd's) and loads the
  whole configuration, keys included, to refuse a broken one before any fork;
* each worker, forked from it, builds its TLS contexts (reading the keys
  while still root), then gives up root for good: setgroups([]), setgid,
  setuid to the one account the profiles' `user`/`group` name (as tcpserver
  -u -g does after binding). The kernel then clears every capability of the
  worker; its backends, started by it, inherit exactly that account;
* SIGHUP reaches the parent, which still is root: it loads the configuration
  again (reading the keys as root), and when that works it starts fresh
  workers on the same sockets and stops the old ones gracefully (they finish
  their sessions within shutdown_grace). A configuration that does not load
  changes nothing: the old workers go on serving.

The workers can drop to one account only: when profiles name different
accounts, or a profile runs its backends as root (`allow_root_backend`),
the workers keep root, and each backend switches to its profile's account
in the child before the exec. A profile with an exec backend and no `user`
would run qmail-smtpd as root: `run` refuses that as root unless the
profile says `allow_root_backend = true`, and `check` warns about it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from tlsfront.config.account import Account, resolve_account
from tlsfront.config.schema import Config, Profile

log = logging.getLogger("tlsfront")


class PrivilegeError(Exception):
    """An account change that the configuration asks for and cannot be made."""


def profile_account(profile: Profile) -> Account | None:
    if profile.user is None:
        return None
    return resolve_account(profile.user, profile.group)


def root_backends(config: Config) -> list[str]:
    """Profiles whose exec backends would run as root when tlsfront is root."""
    return [
        name
        for name, p in config.profiles.items()
        if p.mode == "inbound"
        and p.backend
        and not p.allow_root_backend
        and (p.user is None or _is_root(p))
    ]


def _is_root(profile: Profile) -> bool:
    account = profile_account(profile)
    return account is not None and account.is_root


def root_backend_problem(config: Config) -> str | None:
    """Why `run` as root refuses `config`, or None."""
    names = root_backends(config)
    if not names:
        return None
    listed = ", ".join(f"[profile.{n}]" for n in names)
    return (
        f"{listed}: the backend would run as root; set user (and group), as "
        'tcpserver -u/-g did, e.g. user = "qmaild", group = "nofiles"; '
        "or allow_root_backend = true"
    )


def serving_account(profiles: Iterable[Profile]) -> Account | None:
    """The one account workers can drop to, or None when they must keep root.

    That is the account every profile that names one names, provided no
    exec backend must run as root (a profile without `user`).
    """
    accounts: set[Account] = set()
    for p in profiles:
        account = profile_account(p)
        if account is None:
            if p.mode == "inbound" and p.backend:
                return None  # its backends run as tlsfront itself: root
            continue
        accounts.add(account)
    if len(accounts) != 1:
        return None
    (account,) = accounts
    return None if account.is_root else account


def drop_to(account: Account) -> None:
    """Become `account` for good: exactly its group, no supplementary groups."""
    try:
        os.setgroups([])
        os.setgid(account.gid)
        os.setuid(account.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot become {account.name}: {exc.strerror or exc}") from exc
    if os.getuid() == 0 or os.geteuid() == 0:  # pragma: no cover (the kernel guarantees it)
        raise PrivilegeError(f"still root after becoming {account.name}")
    log.info("serving as %s (uid %d, gid %d)", account.name, account.uid, account.gid)


def check_accounts(profiles: Iterable[Profile]) -> None:
    """As a non-root user, backends can run only as that user's own account."""
    if os.geteuid() == 0:
        return
    for p in profiles:
        account = profile_account(p)
        if account is None or not (p.mode == "inbound" and p.backend):
            continue
        if (account.uid, account.gid) != (os.geteuid(), os.getegid()):
            raise PrivilegeError(
                f"profile {p.name}: backends cannot run as {account.name}: "
                "tlsfront is not started as root"
            )
