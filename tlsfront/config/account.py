"""The account backends run as: `user` and `group`, as tcpserver's -u and -g.

A name is looked up in the system's user and group databases; a number is
taken as it is, as tcpserver takes `-u "$QMAILDUID"`. Without `group`, the
user's login group is used (as `setuidgid` does); a numeric user that the
user database does not know needs `group` too. The group set is exactly
that one group: no supplementary groups, whatever /etc/group lists for the
user (again as `setuidgid`).
"""

from __future__ import annotations

import functools
import grp
import pwd
from dataclasses import dataclass


class AccountError(ValueError):
    """A `user` or `group` this machine does not know."""


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int
    name: str  # "qmaild:nofiles", for messages

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def _uid(user: str) -> tuple[int, int | None, str]:
    """(uid, login group or None, name) of `user`."""
    if user.isdigit():
        try:
            entry = pwd.getpwuid(int(user))
        except KeyError:
            return int(user), None, user
        return entry.pw_uid, entry.pw_gid, entry.pw_name
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise AccountError(f"no user {user!r} on this machine") from None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def _gid(group: str) -> tuple[int, str]:
    if group.isdigit():
        try:
            return int(group), grp.getgrgid(int(group)).gr_name
        except KeyError:
            return int(group), group
    try:
        return grp.getgrnam(group).gr_gid, group
    except KeyError:
        raise AccountError(f"no group {group!r} on this machine") from None


@functools.lru_cache(maxsize=64)  # a handful of accounts, asked for per backend start
def resolve_account(user: str, group: str | None) -> Account:
    """The account named by `user` and `group`; raises AccountError."""
    uid, login_gid, user_name = _uid(user)
    if group is not None:
        gid, group_name = _gid(group)
    elif login_gid is not None:
        gid = login_gid
        try:
            group_name = grp.getgrgid(gid).gr_name
        except KeyError:
            group_name = str(gid)
    else:
        raise AccountError(f"user {user!r} is not in the user database: give group as well")
    return Account(uid, gid, f"{user_name}:{group_name}")


def check_user(user: str) -> str:
    """`user` if this machine knows it (or it is a number)."""
    _uid(user)
    return user


def check_group(group: str) -> str:
    """`group` if this machine knows it (or it is a number)."""
    _gid(group)
    return group
