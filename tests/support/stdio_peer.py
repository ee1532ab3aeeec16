"""Talking to a backend program over its pipes, as tlsfront does: for the
tests of the sink and of the stand-in backends."""

from __future__ import annotations

import trio


class Peer:
    """The client side of a backend's pipes (and its stderr, when piped)."""

    def __init__(self, proc: trio.Process) -> None:
        assert proc.stdin is not None
        assert proc.stdout is not None
        self.proc = proc
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.buf = bytearray()
        self.errbuf = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stdin.send_all(data)

    async def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = await self.stdout.receive_some(65536)
            if not data:
                raise EOFError(bytes(self.buf))
            self.buf += data
        line, _, rest = bytes(self.buf).partition(b"\r\n")
        self.buf[:] = rest
        return line

    async def reply(self) -> list[bytes]:
        lines = [await self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(await self.line())
        return lines

    async def rest(self) -> bytes:
        while data := await self.stdout.receive_some(65536):
            self.buf += data
        out = bytes(self.buf)
        self.buf.clear()
        return out

    async def announced(self, event: bytes) -> None:
        """Wait for the backend's stderr line announcing ``event``."""
        assert self.stderr is not None
        while event + b"\n" not in self.errbuf:
            data = await self.stderr.receive_some(4096)
            if not data:
                raise EOFError(bytes(self.errbuf))
            self.errbuf += data
