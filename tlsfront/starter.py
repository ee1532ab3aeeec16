"""The inetd starter: hand one connection to a running tlsfront, else serve it here.

Run as `python3 -S -E .../tlsfront/starter.py -p PROFILE [-c FILE] [-s SOCKET]`
where a run script would run `tlsfront inetd -p PROFILE [-c FILE]`, e.g. under
tcpserver. It does the job of `tlsfront inetd` for a fraction of its cost.

Theory of operation
-------------------
`tlsfront inetd` is a whole Python program per connection: the interpreter,
the site machinery, trio, OpenSSL, the configuration, the certificates and a
TLS context, some 0.3 s of CPU, where the qmail-smtpd it fronts costs about
a millisecond. The starter is standalone on purpose: it imports nothing of
tlsfront and nothing of the standard library but `_socket`, `errno`, `os`
and `sys`, so that `python3 -S -E` starts it in about the time the
interpreter itself needs.

It connects to the handoff socket of a running `tlsfront run` (the
`handoff_socket` setting, `/run/tlsfront/handoff.sock` unless `-s` says
otherwise) and sends, in one message, the connection (descriptors 0 and 1, as
SCM_RIGHTS), the profile name and its whole environment: the UCSPI variables
tcpserver set for this client and everything the run script exported, which
`tlsfront inetd` would have passed on to the backend. The daemon checks the
sender's uid (SO_PEERCRED), answers one byte `+` once it holds the
connection, and serves the session exactly as `tlsfront inetd` would have,
with the named profile.

After the `+` the starter closes its copies of the connection (the daemon's
is then the only one, so the client sees the end of the session when the
daemon ends it) and waits, blocked in recv() and costing no CPU, until the
daemon closes the handoff connection at the end of the session. It waits
rather than exits because tcpserver counts a connection until its child
exits: `tcpserver -c N` keeps limiting the sessions in progress, and
tcpserver's `-v` log line `end` comes when the session really ends.

Whenever the handoff does not happen (no socket, nobody listening, the daemon
refuses the profile or the sender, or gives no answer within a few
seconds), the starter still holds the connection and becomes `tlsfront
inetd -p PROFILE [-c FILE]` with exec (saying why on stderr, unless simply
no daemon runs): the same interpreter without `-S`,
the same arguments, the same environment, the same descriptors. A host
where the daemon is down serves mail as before, only more expensively.

Under systemd (`Accept=yes` with the connection on fd 3, LISTEN_FDS=1 for
this process) the connection is fd 3; the LISTEN_* variables, which describe
this process's descriptors, are not sent.

The wire format, starter to daemon: "TLSFRONT1\\0", then a 4-byte big-endian
length, then that many bytes: the profile name, NUL, and the environment
as NAME=VALUE entries each ended by NUL. The descriptors ride on the first
bytes. Daemon to starter: `+` (taken) or `-` with a reason (refused), and
the end of the stream when the session is over.
"""

import _socket
import errno
import os
import sys

DEFAULT_SOCKET = "/run/tlsfront/handoff.sock"
MAGIC = b"TLSFRONT1\0"
ANSWER_TIMEOUT = 10.0  # seconds for the daemon's `+` before serving here instead
_SYSTEMD = (b"LISTEN_FDS", b"LISTEN_PID", b"LISTEN_FDNAMES")

USAGE = "usage: starter.py -p PROFILE [-c FILE] [-s SOCKET]\n"


def parse(argv: list[str]) -> tuple[str, str | None, str]:
    """(profile, config or None, socket path) from the command line."""
    profile: str | None = None
    config: str | None = None
    path = DEFAULT_SOCKET
    args = list(argv)
    while args:
        flag = args.pop(0)
        if flag in ("-p", "--profile", "-c", "--config", "-s", "--socket") and args:
            value = args.pop(0)
        elif flag[:2] in ("-p", "-c", "-s") and len(flag) > 2:
            flag, value = flag[:2], flag[2:]
        else:
            raise ValueError(flag)
        if flag in ("-p", "--profile"):
            profile = value
        elif flag in ("-c", "--config"):
            config = value
        else:
            path = value
    if not profile:
        raise ValueError("-p")
    return profile, config, path


def connection_fds() -> list[int]:
    """The descriptors of the connection: systemd's fd 3, else 0 and 1."""
    if os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        return [3]
    return [0, 1]


def message(profile: str, environ: dict[bytes, bytes]) -> bytes:
    """The handoff message for `profile` with the environment `environ` (bytes)."""
    body: list[bytes] = [profile.encode("utf-8", "surrogateescape"), b"\0"]
    for name, value in environ.items():
        if name in _SYSTEMD:
            continue
        body += [name, b"=", value, b"\0"]
    data = b"".join(body)
    return MAGIC + len(data).to_bytes(4, "big") + data


class Refused(Exception):
    """The handoff did not happen, for a reason worth a log line."""


# nobody listens: the daemon is not running, serving here is expected
_NO_DAEMON = (errno.ENOENT, errno.ECONNREFUSED)


def hand_off(path: str, profile: str, fds: list[int]) -> _socket.socket | None:
    """Hand the connection over: the handoff socket once the daemon holds it,
    None when no daemon listens; Refused when one did not take it."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(ANSWER_TIMEOUT)
        sock.connect(path)
        data = message(profile, dict(os.environb))
        packed = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
        rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, packed)]
        sent = sock.sendmsg([data], rights)
        if sent < len(data):
            sock.sendall(data[sent:])
        answer = sock.recv(512)
    except OSError as exc:
        sock.close()
        if exc.errno in _NO_DAEMON:
            return None
        raise Refused(f"{path}: {exc.strerror or exc}") from None
    if answer[:1] != b"+":
        sock.close()
        why = answer[1:].decode("utf-8", "replace").strip() or "closed"
        raise Refused(f"{path}: {why}")
    sock.settimeout(None)
    return sock


def fallback(profile: str, config: str | None) -> None:
    """Become `tlsfront inetd` (same interpreter, site enabled)."""
    argv = [sys.executable, "-m", "tlsfront", "inetd", "-p", profile]
    if config is not None:
        argv += ["-c", config]
    os.execv(sys.executable, argv)


def main(argv: list[str] | None = None) -> int:
    try:
        profile, config, path = parse(sys.argv[1:] if argv is None else argv)
    except ValueError:
        os.write(2, USAGE.encode())
        return 100
    fds = connection_fds()
    try:
        sock = hand_off(path, profile, fds)
    except Refused as exc:
        os.write(2, f"tlsfront starter: handoff refused: {exc}: serving in-process\n".encode())
        sock = None
    if sock is None:
        try:
            fallback(profile, config)
        except OSError as exc:
            os.write(2, f"tlsfront starter: cannot run tlsfront inetd: {exc}\n".encode())
        return 111
    for fd in fds:
        os.close(fd)
    try:
        while sock.recv(4096):  # until the daemon ends the session
            pass
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
