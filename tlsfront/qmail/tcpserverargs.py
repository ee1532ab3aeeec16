"""What a run script's tcpserver was asked to do, in tlsfront's terms.

From the stand-ins' records (runscript.py): tcpserver's options, host and
port, the program chain after them, the environment the script exported, and
what the programs before it (softlimit, setuidgid, envuidgid, envdir, chpst)
did. Everything that has no tlsfront equivalent, or whose value the script
could not produce on this machine, is said in `untranslated`.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tlsfront.qmail.runscript import Evaluation, Step

# tcpserver's options that take a value (ucspi-tcp 0.88, ucspi-tcp6)
_TCPSERVER_VALUE = "xtugclbBI"
_TCPSVD_VALUE = "cCxuibl"
# ports tcpserver users name, for a machine whose /etc/services lacks them
_PORTS = {"smtp": 25, "submission": 587, "smtps": 465, "urd": 465, "ssmtp": 465}
# variables tcpserver sets for each connection, and tlsfront's own: never copied
_OWNED_PREFIXES = ("TCP", "SSL_", "TLS_")
_OWNED = frozenset({"PROTO", "RELAYCLIENT", "UID", "GID", "PATH", "PWD", "OLDPWD", "SHLVL", "_"})
TLS_MEMORY = 100_000_000  # bytes: measured, TLS starts with 100 MB, fails with 30 MB


@dataclass
class Service:
    """The smtpd service the run script starts, translated."""

    listen: list[str] = field(default_factory=list)
    backend: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    group: str | None = None
    max_connections: int | None = None
    rules: Path | None = None  # the -x FILE.cdb, absolute
    rules_optional: bool = False  # -X: a missing .cdb is not an error
    hostname: str | None = None
    remote_host_lookup: bool | None = None  # False for -H
    remote_host_paranoid: bool | None = None  # True for -p
    memory_limit: str | None = None  # softlimit -m / chpst -m before the server
    notes: list[str] = field(default_factory=list)
    untranslated: list[str] = field(default_factory=list)
    server_env: dict[str, str] = field(default_factory=dict)  # all that tcpserver got
    qmail_home: Path | None = None  # from the qmail-smtpd of the chain


def _options(args: list[str], takes_value: str) -> tuple[list[tuple[str, str]], list[str]]:
    """getopt: the options and the operands after them."""
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        if args[i] == "--":
            return found, args[i + 1 :]
        word, j = args[i], 1
        while j < len(word):
            if word[j] in takes_value:
                value = word[j + 1 :]
                if not value:
                    i += 1
                    value = args[i] if i < len(args) else ""
                found.append((word[j], value))
                break
            found.append((word[j], ""))
            j += 1
        i += 1
    return found, args[i:]


def _port(text: str) -> int | None:
    if text.isdigit():
        return int(text)
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        return _PORTS.get(text)


def _address(host: str, port: int, service: Service) -> str | None:
    if host in ("0", "0.0.0.0", ""):
        return f"0.0.0.0:{port}"
    if host in ("::", ":::0", "::0"):
        return f"[::]:{port}"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError):
            service.untranslated.append(f"listen address {host!r}: not an address or a name here")
            return None
        service.notes.append(f"{host!r} is {ip} here: tlsfront listens on addresses only")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _account_name(number: str, what: str, service: Service) -> str | None:
    """A uid or gid named as this machine names it, else the number."""
    if not number:
        service.untranslated.append(
            f"{what}: the script gave tcpserver an empty value (its account look-up, e.g. "
            "`id -u qmaild`, failed on this machine); set it by hand"
        )
        return None
    if not number.isdigit():
        service.untranslated.append(f"{what} {number!r} is not a number, as tcpserver wants")
        return None
    try:
        if what == "user":
            return pwd.getpwuid(int(number)).pw_name
        return grp.getgrgid(int(number)).gr_name
    except KeyError:
        service.notes.append(f"{what} {number} has no name on this machine: kept as a number")
        return number


def _before_server(steps: tuple[Step, ...], service: Service) -> None:
    """What softlimit, setuidgid, envuidgid, envdir and chpst did before tcpserver."""
    for step in steps:
        service.notes.extend(f"{step.program}: {note}" for note in step.notes)
        if "m" in step.limits:
            service.memory_limit = step.limits["m"]
        if step.account is not None and step.program in ("setuidgid", "chpst"):
            user, _, group = step.account.partition(":")
            service.user = user
            service.group = group or _primary_group(user)
            service.notes.append(
                f"{step.program} {step.account}: tcpserver itself ran as that account"
            )


def _primary_group(user: str) -> str | None:
    try:
        gid = pwd.getpwnam(user).pw_gid
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _tcpserver(step: Step, service: Service) -> list[str]:
    opts, operands = _options(list(step.argv[1:]), _TCPSERVER_VALUE)
    for opt, value in opts:
        if opt == "c":
            if value.isdigit() and int(value) > 0:
                service.max_connections = int(value)
            else:
                service.untranslated.append(f"-c {value!r}: not a connection count")
        elif opt in "ug":
            name = _account_name(value, "user" if opt == "u" else "group", service)
            if opt == "u":
                service.user = name
            else:
                service.group = name
        elif opt == "U":
            for var, what in (("UID", "user"), ("GID", "group")):
                name = _account_name(step.env.get(var, ""), what, service)
                setattr(service, what, name)
        elif opt == "x":
            service.rules = Path(step.cwd, value)
        elif opt == "X":
            service.rules_optional = True
        elif opt == "l":
            if value == "0":
                service.notes.append("-l 0: no local name look-up; tlsfront uses hostname")
            elif value:
                service.hostname = value
            else:
                service.untranslated.append("-l '': the script gave tcpserver an empty name")
        elif opt == "H":
            service.remote_host_lookup = False
        elif opt == "h":
            service.remote_host_lookup = True
        elif opt == "p":
            service.remote_host_paranoid = True
        elif opt == "P":
            service.remote_host_paranoid = False
        elif opt == "R":
            service.notes.append("-R: no TCPREMOTEINFO look-up; tlsfront never makes one")
        elif opt == "r":
            service.untranslated.append("-r: tlsfront makes no ident (TCPREMOTEINFO) look-up")
        elif opt == "B":
            service.untranslated.append(f"-B {value!r}: tlsfront writes no banner")
        elif opt in "vqQ":
            service.notes.append(f"-{opt}: tlsfront logs each session its own way")
        elif opt in "dDoO1bt":
            service.notes.append(f"-{opt}{' ' + value if value else ''}: no tlsfront equivalent")
        else:
            service.untranslated.append(f"-{opt}{' ' + value if value else ''}: not known")
    return operands


def _tcpsvd(step: Step, service: Service) -> list[str]:
    opts, operands = _options(list(step.argv[1:]), _TCPSVD_VALUE)
    for opt, value in opts:
        if opt == "c" and value.isdigit():
            service.max_connections = int(value)
        elif opt == "u":
            user, _, group = value.partition(":")
            service.user, service.group = user, group or _primary_group(user)
        elif opt == "x":
            service.rules = Path(step.cwd, value)
        elif opt == "l":
            if value and value != "0":
                service.hostname = value
        elif opt == "h":
            service.remote_host_lookup = True
        elif opt == "v":
            continue
        else:
            service.untranslated.append(f"tcpsvd -{opt} {value}".rstrip() + ": not translated")
    if not any(opt == "h" for opt, _ in opts):
        service.remote_host_lookup = False  # tcpsvd looks names up only with -h
    return operands


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # bytes that were not UTF-8 are carried as lone surrogates
        return False
    return True


def _absolute_program(backend: list[str], server: Step, service: Service) -> list[str]:
    """The chain with its first program found as tcpserver would have found it."""
    first = backend[0]
    if "/" in first:
        return list(backend)
    found = shutil.which(first, path=server.env.get("PATH", ""))
    if found is None:
        service.untranslated.append(
            f"{first}: not found in the PATH the script gave tcpserver; name it with its directory"
        )
        return list(backend)
    service.notes.append(
        f"{first} is {found} in the script's PATH; the rest of the chain is found through"
        " the PATH tlsfront gives its backends"
    )
    return [found, *backend[1:]]


def translate(evaluation: Evaluation) -> Service:
    """The service a run script's evaluation shows."""
    service = Service()
    server = evaluation.server
    _before_server(evaluation.steps[:-1], service)
    if server.program == "tcpsvd":
        operands = _tcpsvd(server, service)
    else:
        operands = _tcpserver(server, service)
    if len(operands) < 3:
        service.untranslated.append(
            f"{server.program} was given no host, port and program: {list(server.argv)}"
        )
        return service
    host, port_text, backend = operands[0], operands[1], operands[2:]
    port = _port(port_text)
    if port is None:
        service.untranslated.append(f"port {port_text!r}: not a number or a known service name")
    else:
        address = _address(host, port, service)
        if address is not None:
            service.listen.append(address)
    if all(_utf8(word) for word in backend):
        service.backend = _absolute_program(backend, server, service)
    else:
        service.untranslated.append(f"the chain {backend!r} is not UTF-8, which TOML needs")
    for word in backend:
        if Path(word).name == "qmail-smtpd" and Path(word).is_absolute():
            service.qmail_home = Path(word).parent.parent
    service.server_env = dict(server.env)
    start = evaluation.start_env
    for name, value in server.env.items():
        if start.get(name) == value:
            continue
        if name in _OWNED or name.startswith(_OWNED_PREFIXES):
            if name == "RELAYCLIENT":
                service.untranslated.append(
                    "RELAYCLIENT is set for every client: tlsfront sets it itself (certificates,"
                    " rules); give it in rules if every client may really relay"
                )
            elif name == "PATH":
                service.notes.append(f"the script set PATH={value}")
            continue
        if _utf8(name) and _utf8(value):
            service.env[name] = value
        else:
            service.untranslated.append(f"{name!r}={value!r} is not UTF-8, which TOML needs")
    for line in evaluation.stderr.splitlines():
        if line.strip():
            service.untranslated.append(f"the script said: {line.strip()}")
    return service


_CONTROL_WORD = re.compile(r"(/[\w./+-]*?)/control/[\w.-]+")


def implied_control(evaluation: Evaluation, service: Service) -> Path:
    """The control directory the run script implies.

    The qmail home is the parent of the control directory: the one of the
    chain's qmail-smtpd (HOME/bin/qmail-smtpd) when its control directory
    exists, else the first HOME/control/FILE the script names, else
    /var/qmail.
    """
    if service.qmail_home is not None and (service.qmail_home / "control").is_dir():
        return service.qmail_home / "control"
    for match in _CONTROL_WORD.finditer(evaluation.text):
        candidate = Path(match.group(1), "control")
        if candidate.is_dir():
            return candidate
    if service.qmail_home is not None:
        return service.qmail_home / "control"
    return Path("/var/qmail/control")
