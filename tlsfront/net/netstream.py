"""Streams that try the system call before they wait: TCP and pipes.

Theory of operation
-------------------
`trio.SocketStream` makes every `send_all` and `receive_some` a full
checkpoint: it yields to the scheduler before or after the system call even
when the kernel could serve it at once. SMTP through a proxy is a string of
short request/reply round trips, each of which is a read and a write on
both sides, so those yields were a large share of a session's CPU time.

`NetStream` does the system call first and waits (`trio.lowlevel.
wait_readable`/`wait_writable`) only when the kernel says it would block:

* `send_all` of a reply that fits the socket buffer, nearly every SMTP
  write, costs one `send` and no task switch;
* `receive_some` waits when nothing is there, as a request/reply protocol
  nearly always finds; when data is already there it still yields once
  (a cancel-shielded checkpoint), so a peer that floods a session cannot
  starve the other tasks, and a cancellation is seen at the next wait.
  After a read that emptied the kernel's buffer (fewer bytes than asked
  for) the next one waits first instead: the peer has yet to answer what
  was just sent, and a read that fails with EAGAIN would cost a system
  call and an exception for nothing (nginx keeps the same "ready" flag).

Everything else keeps `trio.SocketStream`'s semantics: `ClosedResourceError`
after `aclose`, `BrokenResourceError` for a reset, `send_eof` as a half
close, `TCP_NODELAY` on. `PipeStream` does the same for one end of a pipe
(the exec backend's standard input or output), where trio's `FdStream`
yields on every call.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import trio

from tlsfront.net.conflict import ConflictDetector


class _TryFirst:
    """The loops both streams share: the system call first, a wait only on EAGAIN.

    A subclass says what to wait on (`_handle`), how to read and write it,
    and how to let it go; any `OSError` but EAGAIN means the peer is gone.
    """

    # Two per idle TLS session (the client's socket and the backend's): no
    # per-instance dict.
    __slots__ = ("_closed", "_drained", "_handle", "_receive_conflict", "_send_conflict")

    _handle: Any  # what trio.lowlevel.wait_readable/wait_writable take

    def __init__(self) -> None:
        self._closed = False
        self._drained = False  # the last read emptied the buffer: wait first
        self._send_conflict = ConflictDetector("another task is already sending")
        self._receive_conflict = ConflictDetector("another task is already receiving")

    def _read(self, size: int) -> bytes:
        raise NotImplementedError

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        conflict = self._send_conflict
        if conflict.held:
            raise conflict.busy()
        conflict.held = True
        try:
            self._check_open()
            view = memoryview(data)
            sent = 0
            while True:
                try:
                    sent += self._write(view[sent:] if sent else data)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                if sent >= len(view):
                    return
                await trio.lowlevel.wait_writable(self._handle)
                self._check_open()
        finally:
            conflict.held = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.wait_writable(self._handle)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        conflict = self._receive_conflict
        if conflict.held:
            raise conflict.busy()
        conflict.held = True
        try:
            self._check_open()
            size = max_bytes or 65536
            waited = self._drained
            if waited:
                await trio.lowlevel.wait_readable(self._handle)
                self._check_open()
            while True:
                try:
                    data = self._read(size)
                except BlockingIOError:
                    data = None  # wait below, not in here: an idle session would
                    # keep the exception, its traceback and frame while it waits
                except OSError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                if data is None:
                    await trio.lowlevel.wait_readable(self._handle)
                    self._check_open()
                    waited = True
                    continue
                self._drained = len(data) < size
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()  # fairness (module doc)
                return data
        finally:
            conflict.held = False

    def receive_now(self, buffer: bytearray) -> int | None:
        """What the kernel holds now, read into `buffer`: the bytes read, 0 at
        EOF, None when it holds nothing (a read would wait).

        Never waits and never yields: the caller takes its checkpoints (the
        TLS stream's bulk reads, which read a large message at hand without
        a bytes object of the buffer's size each time, and wait with
        `receive_some` once it is not).
        """
        if self._receive_conflict.held:
            raise self._receive_conflict.busy()
        self._check_open()
        try:
            count = self._read_into(buffer)
        except BlockingIOError:
            self._drained = True
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        self._drained = count < len(buffer)
        return count

    def _read_into(self, buffer: bytearray) -> int:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")

    def close(self) -> None:
        """`aclose` without the checkpoint: nothing in closing it waits."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._handle)
            self._release()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class NetStream(_TryFirst, trio.abc.HalfCloseableStream):
    """A connected TCP socket as a trio stream (see the module doc)."""

    __slots__ = ("socket",)

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = self._handle = sock

    @classmethod
    def adopt(cls, stream: trio.SocketStream) -> NetStream:
        """Take over an accepted `trio.SocketStream`'s socket (which it no longer owns)."""
        return cls(socket.socket(fileno=stream.socket.detach()))

    @classmethod
    async def connect(cls, host: str, port: int, source: str | None = None) -> NetStream:
        """One plain connect to a numeric address, from `source` when given."""
        family = socket.AF_INET6 if ":" in (source or host) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if source is not None:
                sock.bind((source, 0))
            try:
                sock.connect((host, port))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, f"connect: {errno.errorcode.get(error, error)}") from None
            else:
                await trio.lowlevel.checkpoint()
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def _read(self, size: int) -> bytes:
        return self.socket.recv(size)

    def _read_into(self, buffer: bytearray) -> int:
        return self.socket.recv_into(buffer)

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        return self.socket.send(data)

    def _release(self) -> None:
        self.socket.close()

    async def send_eof(self) -> None:
        # A half close never blocks: no pass through the scheduler either,
        # as for a send the kernel takes at once.
        self._check_open()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise trio.BrokenResourceError(str(exc)) from exc


class PipeStream(_TryFirst, trio.abc.SendStream, trio.abc.ReceiveStream):
    """One end of a pipe, owned: made non-blocking, closed by `aclose`."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        super().__init__()
        os.set_blocking(fd, False)
        self.fd = self._handle = fd

    def fileno(self) -> int:
        return self.fd

    def _read(self, size: int) -> bytes:
        return os.read(self.fd, size)

    def _read_into(self, buffer: bytearray) -> int:
        return os.readv(self.fd, [buffer])

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        return os.write(self.fd, data)

    def _release(self) -> None:
        os.close(self.fd)


__all__ = ["NetStream", "PipeStream"]
