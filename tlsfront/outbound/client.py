"""The SMTP client side: one connection to a remote server.

Moves bytes between a trio stream and the sans-I/O `ReplyReader` (the one
the inbound side reads its backend with). Every
failure (connection lost, timeout, malformed reply) becomes a `RemoteError`
whose text is safe to log and to put in a 4xx reply. After `220` to
STARTTLS, bytes the server sent before the handshake are a protocol error
(an injection in the clear, the client-side twin of CVE-2011-0411).
"""

from __future__ import annotations

import contextlib

import trio

from tlsfront.smtp.errors import RemoteProtocolError
from tlsfront.smtp.reply import Reply, ehlo_keywords
from tlsfront.smtp.replyreader import ReplyReader
from tlsfront.tls.client import ClientContext, ClientTLSStream, client_stream


class RemoteError(Exception):
    """The remote session broke; `handshake` when the TLS handshake failed."""

    def __init__(self, reason: str, *, handshake: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.handshake = handshake


QUIT_TIMEOUT = 10.0


class SmtpClient:
    """Timeouts: `timeout` for each reply and send, `data_timeout` for the
    reply to the final dot, `handshake_timeout` for the TLS handshake."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        timeout: float,
        *,
        data_timeout: float | None = None,
        handshake_timeout: float | None = None,
    ) -> None:
        self.stream: trio.abc.Stream = stream
        self.timeout = timeout
        self.data_timeout = timeout if data_timeout is None else data_timeout
        self.handshake_timeout = timeout if handshake_timeout is None else handshake_timeout
        self._reader = ReplyReader()
        self._replies: list[Reply] = []  # complete, not yet asked for
        self._eof = False
        self.ehlo: Reply | None = None  # the last reply to EHLO (its AUTH line)

    async def read_reply(self, *, final: bool = False) -> Reply:
        """The next reply; `final` for the reply to the final dot."""
        with trio.move_on_after(self.data_timeout if final else self.timeout):
            while True:
                if self._replies:
                    return self._replies.pop(0)
                if self._reader.failure is not None:
                    raise RemoteError(f"protocol error: {self._reader.failure.text}")
                if self._eof:
                    raise RemoteError("connection closed by the server")
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                    raise RemoteError(f"connection lost: {err or type(err).__name__}") from None
                self._eof = not data
                # a failure stays in `failure`, raised once the replies before it are read
                with contextlib.suppress(RemoteProtocolError):
                    self._replies += self._reader.feed(bytes(data))
        raise RemoteError("timeout waiting for the server's reply")

    async def send(self, data: bytes) -> None:
        try:
            with trio.fail_after(self.timeout):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise RemoteError("timeout sending to the server") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            raise RemoteError(f"connection lost: {err or type(err).__name__}") from None

    async def command(self, line: bytes) -> Reply:
        await self.send(line + b"\r\n")
        return await self.read_reply()

    async def hello(self, name: str) -> set[str]:
        """EHLO (HELO when EHLO is refused); the extension keywords."""
        reply = await self.command(b"EHLO " + name.encode("ascii", "replace"))
        self.ehlo = reply
        if reply.code == 250:
            return ehlo_keywords(reply)
        if reply.code < 500:
            raise RemoteError(f"EHLO refused: {reply.first_line}")
        reply = await self.command(b"HELO " + name.encode("ascii", "replace"))
        if reply.code != 250:
            raise RemoteError(f"HELO refused: {reply.first_line}")
        return set()

    async def handshake(self, ctx: ClientContext, server_hostname: str | None) -> ClientTLSStream:
        """Start TLS on the connection (after the server's 220 to STARTTLS)."""
        if self._replies or self._reader.partial:
            raise RemoteError("server sent data after its 220 to STARTTLS")
        tls = client_stream(self.stream, ctx, server_hostname)
        try:
            with trio.fail_after(self.handshake_timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            raise RemoteError("TLS handshake timed out", handshake=True) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            cause = err.__cause__ or err
            raise RemoteError(f"TLS handshake failed: {cause}", handshake=True) from None
        self.stream = tls
        return tls

    async def quit(self) -> None:
        """QUIT politely, then close whatever the server does."""
        with trio.move_on_after(QUIT_TIMEOUT), contextlib.suppress(RemoteError):
            await self.command(b"QUIT")
        await self.aclose()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
