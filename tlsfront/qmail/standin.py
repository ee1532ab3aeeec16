"""Stand-ins for the programs of a daemontools/runit run script.

`tlsfront import-qmail --run` runs the real run script, with each program of
the chain that leads to tcpserver replaced by this file (see runscript.py):

    python3 -S -E standin.py LOG NAME ARG...

NAME says which program it stands in for. Each stand-in appends one JSON line
to LOG (its argv, its environment, its directory, what it noted), then does
what the real program does to the rest of the chain and execs it:

- envdir DIR CHILD: really reads DIR, as envdir does (first line of each
  file, trailing blanks cut, NUL read as newline; an empty file removes the
  variable);
- envuidgid ACCOUNT CHILD: sets UID and GID from the account, as envuidgid;
- setuidgid ACCOUNT CHILD: records the account and does not switch to it;
- softlimit OPTS CHILD: records the limits and does not apply them (a
  2 MB limit would stop the stand-ins, which are Python);
- fghack, pgrphack CHILD: nothing but the exec;
- chpst OPTS CHILD (runit): -u/-U as setuidgid/envuidgid, -e as envdir,
  the limits as softlimit;
- tcpserver, tcpsvd: record everything and exit 0 without serving.

The environment recorded and passed on is the one this process was started
with, read from /proc/self/environ where there is one: the interpreter may add
variables of its own (LC_CTYPE) to os.environ, and they were not the script's.

This file runs outside the package, with nothing but the standard library.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import sys

Env = dict[str, str]

SOFTLIMIT_OPTS = "madsflcoptr"  # each takes a value: -m BYTES ...
CHPST_VALUE_OPTS = "uUbeJn/CmdosplfcrtL"  # chpst options that take a value


class Record:
    def __init__(self, log: str, name: str, argv: list[str], env: Env) -> None:
        self.log, self.name, self.argv, self.env = log, name, argv, env
        self.notes: list[str] = []
        self.limits: dict[str, str] = {}
        self.account: str | None = None

    def write(self) -> None:
        line = {
            "program": self.name,
            "argv": self.argv,
            "env": self.env,
            "cwd": os.getcwd(),
            "notes": self.notes,
            "limits": self.limits,
            "account": self.account,
        }
        with open(self.log, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(json.dumps(line) + "\n")


def start_environment() -> Env:
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return dict(os.environ)
    env: Env = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return env


def read_envdir(directory: str, env: Env, record: Record) -> None:
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") or "=" in name:
            continue
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            env.pop(name, None)
            continue
        line = data.split(b"\n", 1)[0].rstrip(b" \t").replace(b"\0", b"\n")
        env[name] = os.fsdecode(line)
    record.notes.append(f"envdir {directory}")


def account_ids(account: str, record: Record) -> tuple[str, str] | None:
    user, _, group = account.partition(":")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        record.notes.append(f"account {user!r} does not exist on this machine")
        return None
    gid = str(entry.pw_gid)
    if group:
        try:
            gid = str(grp.getgrnam(group).gr_gid)
        except KeyError:
            record.notes.append(f"group {group!r} does not exist on this machine")
    return str(entry.pw_uid), gid


def options(args: list[str], takes_value: str) -> tuple[list[tuple[str, str]], int]:
    """getopt for the stand-ins: ([(option, value)], index of the child)."""
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        if args[i] == "--":
            return found, i + 1
        word, j = args[i], 1
        while j < len(word):
            opt = word[j]
            if opt in takes_value:
                value = word[j + 1 :]
                if not value:
                    i += 1
                    value = args[i] if i < len(args) else ""
                found.append((opt, value))
                break
            found.append((opt, ""))
            j += 1
        i += 1
    return found, i


def step(name: str, args: list[str], env: Env, record: Record) -> list[str] | None:
    """What program NAME does before its child: the child's argv, or None to stop."""
    if name in ("tcpserver", "tcpsvd"):
        return None
    if name in ("fghack", "pgrphack"):
        return args
    if name in ("setuidgid", "envuidgid"):
        if not args:
            return None
        record.account = args[0]
        if name == "envuidgid":
            ids = account_ids(args[0], record)
            if ids is not None:
                env["UID"], env["GID"] = ids
        return args[1:]
    if name == "envdir":
        if not args:
            return None
        read_envdir(args[0], env, record)
        return args[1:]
    if name == "softlimit":
        found, child = options(args, SOFTLIMIT_OPTS)
        record.limits.update(found)
        return args[child:]
    if name == "chpst":
        found, child = options(args, CHPST_VALUE_OPTS)
        for opt, value in found:
            if opt == "u":
                record.account = value
            elif opt == "U":
                ids = account_ids(value, record)
                if ids is not None:
                    env["UID"], env["GID"] = ids
            elif opt == "e":
                read_envdir(value, env, record)
            elif opt in "mdosplfcrt":
                record.limits[opt] = value
            elif opt not in "vP":
                record.notes.append(f"chpst -{opt} {value}".rstrip())
        return args[child:]
    return args


def main() -> int:
    log, name, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    env = start_environment()
    record = Record(log, name, [name, *args], dict(env))
    child = step(name, args, env, record)
    record.write()
    if not child:
        return 0
    try:
        os.execvpe(child[0], child, env)
    except OSError as exc:
        print(f"{name} stand-in: cannot run {child[0]}: {exc}", file=sys.stderr)
        return 111
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
