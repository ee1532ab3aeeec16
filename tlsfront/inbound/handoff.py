"""The handoff socket: connections handed over by inetd starters.

Theory of operation
-------------------
With `handoff_socket` set in [defaults], `tlsfront run` listens on that UNIX
socket besides its TCP listeners. A run script that runs the starter
(tlsfront.starter, a tiny standalone program) where it ran `tlsfront inetd`
has each connection handed over to this process instead of paying for a whole
Python program per connection. Each handoff is one stream connection:

1. the peer's credentials (SO_PEERCRED) must be those of `handoff_user`
   (tcpserver's `-u` account; by default the account tlsfront serves as:
   the one its workers become when started as root, else its own);
   anyone else is closed on at once, before a byte is read. The socket file
   itself belongs to that account, mode 0600, so nobody else can even
   connect (root excepted, whom the uid check refuses);
2. the message (format in tlsfront.starter) brings the connection's
   descriptors, the profile name and the starter's whole environment, within
   `RECEIVE_TIMEOUT` seconds and `MAX_MESSAGE` bytes;
3. an unknown or outbound profile is answered `-` and its descriptors are
   closed: the starter then serves the connection itself, the slow way, and
   `tlsfront inetd` says what is wrong;
4. otherwise the answer is `+` and the session is served exactly as
   `tlsfront inetd -p PROFILE` would serve it with that environment
   (`tlsfront.inbound.inetd.serve_connection`), by this process's profile
   server: its certificates and rules already loaded, its limits counted
   with the TCP listeners' sessions, its shutdown applying to it;
5. when the session ends, the handoff connection is closed: the starter,
   waiting on it, exits, and tcpserver counts the connection as ended.

Why one account only: whoever hands a connection over also says who the
client is (TCPREMOTEIP) and gives the environment the backend starts from,
as whoever starts `tlsfront inetd` does; under tcpserver that is tcpserver's
`-u` account, which could as well start qmail-smtpd with any environment.

The socket is bound by the process that binds the TCP listeners (the
parent, with `workers`), so that every worker accepts on it. A file left at
the path by an earlier run is replaced when nothing listens on it; one with
a live listener is an error, as a TCP port in use is.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import pwd
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from tlsfront.config.schema import Settings
from tlsfront.inbound.inetd import fd_stream, serve_connection

if TYPE_CHECKING:
    from tlsfront.inbound.server import Server

log = logging.getLogger("tlsfront")

MAGIC = b"TLSFRONT1\0"  # as tlsfront.starter sends it
MAX_MESSAGE = 1 << 20  # bytes of profile name and environment
MAX_FDS = 2  # the connection: one socket, or two pipe ends
RECEIVE_TIMEOUT = 5.0  # seconds for the whole message
BACKLOG = 1024


class HandoffError(Exception):
    """The handoff socket cannot be set up; the message says why."""


def handoff_uid(user: str | None, default: int | None = None) -> int:
    """The uid allowed to hand connections over: `handoff_user`, else
    `default` (the account the workers serve as), else our own."""
    if user is None:
        return os.geteuid() if default is None else default
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise HandoffError(f"handoff_user: no account {user!r}") from None


@dataclass
class HandoffSocket:
    """The bound and listening handoff socket and who may use it."""

    sock: socket.socket
    path: Path
    uid: int
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file we made

    @classmethod
    def bind(cls, settings: Settings, default_uid: int | None = None) -> HandoffSocket | None:
        """The socket `handoff_socket` names, or None when it is not set.
        `default_uid`: who may hand over without `handoff_user` (the account
        the workers become when started as root), else our own uid."""
        if settings.handoff_socket is None:
            return None
        path = settings.handoff_socket
        uid = handoff_uid(settings.handoff_user, default_uid)
        if uid != os.geteuid() and os.geteuid() != 0:
            raise HandoffError(
                f"handoff_socket {path}: only root can give it to uid {uid} (handoff_user)"
            )
        if not path.parent.is_dir():
            # searchable by the starter's account whatever the umask
            path.parent.mkdir(parents=True)
            path.parent.chmod(0o755)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # 0600 from the start, never wider
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise HandoffError(f"handoff_socket {path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        if uid != os.geteuid():
            os.chown(path, uid, -1)
        sock.listen(BACKLOG)
        sock.set_inheritable(False)  # workers get it by fork, backends never
        st = os.stat(path)
        return cls(sock, path, uid, (st.st_dev, st.st_ino))

    def close(self) -> None:
        """Close it, and remove the file if it is still the one we made."""
        self.sock.close()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(self.path)
        except OSError:
            pass


def _remove_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse when somebody does."""
    if not path.is_socket():
        if path.exists() or path.is_symlink():
            raise HandoffError(f"handoff_socket {path}: exists and is not a socket")
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise HandoffError(f"handoff_socket {path}: {exc}") from exc
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise HandoffError(f"handoff_socket {path}: another process listens on it")


@dataclass
class Handoff:
    """One handed-over connection, as received."""

    fds: list[int]
    profile: str
    environ: dict[str, str]


def peer_uid(sock: trio.socket.SocketType) -> int:
    """The uid of the process at the other end (as of its connect)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]
    return uid


def parse_message(data: bytes) -> tuple[str, dict[str, str]]:
    """(profile, environment) from a message's body; ValueError when malformed."""
    fields = data.split(b"\0")
    if len(fields) < 2 or fields[-1] != b"":
        raise ValueError("malformed message")
    profile = os.fsdecode(fields[0])
    environ: dict[str, str] = {}
    for entry in fields[1:-1]:
        name, eq, value = entry.partition(b"=")
        if not eq or not name:
            raise ValueError("malformed environment entry")
        environ[os.fsdecode(name)] = os.fsdecode(value)
    return profile, environ


def _take_fds(ancdata: list[tuple[int, int, bytes]], fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(data[: len(data) - len(data) % got.itemsize])
            fds.extend(got)


async def receive(conn: trio.socket.SocketType, fds: list[int]) -> Handoff:
    """Read one handoff message; received descriptors are appended to `fds`
    at once, so that the caller closes them whatever happens."""
    ancsize = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    data, ancdata, flags, _ = await conn.recvmsg(65536, ancsize, socket.MSG_CMSG_CLOEXEC)
    _take_fds(ancdata, fds)
    if flags & socket.MSG_CTRUNC or not 1 <= len(fds) <= MAX_FDS:
        raise ValueError(f"{len(fds)} descriptors")
    head = len(MAGIC) + 4
    while len(data) < head:
        chunk = await conn.recv(head - len(data))
        if not chunk:
            raise ValueError("message cut short")
        data += chunk
    if not data.startswith(MAGIC):
        raise ValueError("not a handoff message")
    size = int.from_bytes(data[len(MAGIC) : head], "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes")
    body = bytearray(data[head:])
    while len(body) < size:
        chunk = await conn.recv(min(65536, size - len(body)))
        if not chunk:
            raise ValueError("message cut short")
        body += chunk
    if len(body) != size:
        raise ValueError("more than the message")
    profile, environ = parse_message(bytes(body))
    return Handoff(list(fds), profile, environ)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with suppress(OSError):
            os.close(fd)
    fds.clear()


@contextmanager
def _owned(fds: list[int]) -> Iterator[list[int]]:
    try:
        yield fds
    finally:
        _close_all(fds)


async def handle(server: Server, handoff: HandoffSocket, conn: trio.socket.SocketType) -> None:
    """One starter's connection: check, receive, serve, close."""
    with conn, _owned([]) as fds:
        uid = peer_uid(conn)
        if uid != handoff.uid:
            log.warning("handoff: refused a connection from uid %d (allowed: %d)", uid, handoff.uid)
            return
        try:
            with trio.fail_after(RECEIVE_TIMEOUT):
                message = await receive(conn, fds)
        except (ValueError, OSError, trio.TooSlowError) as exc:
            log.warning("handoff: refused a message from uid %d: %s", uid, exc)
            return
        profile_server = server.profiles.get(message.profile)
        if profile_server is None or profile_server.runtime.profile.mode != "inbound":
            why = f"no inbound profile {message.profile!r}"
            log.warning("handoff: %s: the starter serves it itself", why)
            await _send(conn, b"-" + why.encode() + b"\n")
            return
        if not await _send(conn, b"+"):
            return  # the starter is gone: nobody waits for this session
        fd_in = fds[0]
        fd_out = fds[1] if len(fds) > 1 else fds[0]
        if fd_out != fd_in and _same_file(fd_in, fd_out):
            os.close(fd_out)
            fd_out = fd_in
        fds.clear()  # the stream owns them now
        stream, client, local = fd_stream(fd_in, fd_out)
        async with stream:
            await serve_connection(profile_server, stream, client, local, message.environ)


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


async def _send(conn: trio.socket.SocketType, data: bytes) -> bool:
    try:
        with trio.move_on_after(RECEIVE_TIMEOUT):
            await conn.send(data)
            return True
    except OSError:
        pass
    return False


async def serve_handoff(
    server: Server,
    handoff: HandoffSocket,
    sessions: trio.Nursery,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept starters until cancelled; each session runs in `sessions`."""
    listener = trio.socket.from_stdlib_socket(handoff.sock)
    with listener:
        log.info("handoff: listening on %s for uid %d", handoff.path, handoff.uid)
        task_status.started()
        while True:
            try:
                conn, _ = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("handoff: accept: %s", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            sessions.start_soon(_tracked, server, handoff, conn)


async def _tracked(server: Server, handoff: HandoffSocket, conn: trio.socket.SocketType) -> None:
    with server.connection():
        try:
            await handle(server, handoff, conn)
        except Exception:
            # One session's bug must not take every other session down.
            log.exception("handoff: internal error in a session")
