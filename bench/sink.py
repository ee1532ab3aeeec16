"""The benchmark's backend: a fast plaintext SMTP sink, and nginx's auth_http responder.

    python -m bench.sink        prints {"smtp": PORT, "auth": PORT} and serves until killed

Both are asyncio protocols in one process (no streams, no per-line
coroutines): the sink must never be what limits a run. The sink accepts
every command, finds the end of DATA with one `find` per read, and throws
the message away. The auth_http responder answers every request with
"Auth-Status: OK" and the sink's address, which is all nginx's mail proxy
needs from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys

EHLO_REPLY = b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n"
_REPLIES = {
    b"HELO": b"250 sink.bench\r\n",
    b"MAIL": b"250 ok\r\n",
    b"RCPT": b"250 ok\r\n",
    b"RSET": b"250 flushed\r\n",
    b"NOOP": b"250 ok\r\n",
    b"QUIT": b"221 sink.bench\r\n",
    b"DATA": b"354 go ahead\r\n",
}
_END = b"\r\n.\r\n"


class SMTPSink(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.in_data = False
        self.tail = b""  # the last bytes of the body so far (an end may straddle reads)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink.bench ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        out: list[bytes] = []
        while data:
            if self.in_data:
                scan = self.tail + data
                end = scan.find(_END)
                if end < 0:
                    self.tail = scan[-4:]
                    return self._flush(out)
                data = scan[end + len(_END) :]
                self.in_data = False
                out.append(b"250 ok queued\r\n")
                continue
            data = self.buffer + data
            lf = data.find(b"\n")
            if lf < 0:
                self.buffer = data[-4096:]
                break
            line, data = data[:lf], data[lf + 1 :]
            self.buffer = b""
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(EHLO_REPLY)
            else:
                out.append(_REPLIES.get(verb, b"502 unimplemented\r\n"))
            if verb == b"DATA":
                self.in_data = True
                self.tail = b"\r\n"  # an empty body ends at once
            elif verb == b"QUIT":
                self._flush(out)
                self.transport.close()
                return
        self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


class AuthResponder(asyncio.Protocol):
    """nginx mail's auth_http: every login is fine, and goes to the sink."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.transport.write(self.answer)
            self.transport.close()
        elif len(self.buffer) > 65536:
            self.transport.close()


async def serve(host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    smtp = await loop.create_server(SMTPSink, host, 0, backlog=4096, reuse_address=True)
    smtp_port = smtp.sockets[0].getsockname()[1]
    answer = (
        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n"
        f"Auth-Server: {host}\r\nAuth-Port: {smtp_port}\r\n\r\n"
    ).encode()
    auth = await loop.create_server(
        lambda: AuthResponder(answer), host, 0, backlog=4096, reuse_address=True
    )
    print(json.dumps({"smtp": smtp_port, "auth": auth.sockets[0].getsockname()[1]}), flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    smtp.close()
    auth.close()


def main() -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
