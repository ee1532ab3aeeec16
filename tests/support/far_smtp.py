"""A smarthost nobody here wrote: aiosmtpd with an authenticator, for the relay's login.

aiosmtpd runs on its own asyncio event loop in a thread, listening on a free
loopback port; the trio relay under test reaches it over real TCP. It offers
STARTTLS with the context it is given, and AUTH PLAIN and LOGIN (only inside
TLS unless told otherwise); `MAIL` before a login gets its own `530`.

What the relay did is recorded: `auth_commands` (the mechanism of every AUTH
command that reached the server, never its argument), `logins` (user and
whether the password matched) and `messages` (with the user the session had
logged in as).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Delivered:
    sender: str
    recipients: list[str]
    user: str | None  # the login of the session that sent it
    body: bytes
    tls: bool


class _Server(SMTP):
    def __init__(self, far: FarSmtp, *args: Any, **kwargs: Any) -> None:
        self._far = far
        super().__init__(*args, **kwargs)

    async def smtp_AUTH(self, arg: str) -> None:
        self._far.auth_commands.append(arg.split()[0].upper() if arg.split() else "")
        await super().smtp_AUTH(arg)


class _Handler:
    def __init__(self, far: FarSmtp) -> None:
        self._far = far

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        auth = session.auth_data
        login = auth.login if isinstance(auth, LoginPassword) else None
        content = envelope.original_content or b""
        self._far.messages.append(
            Delivered(
                sender=envelope.mail_from or "",
                recipients=list(envelope.rcpt_tos),
                user=login.decode() if isinstance(login, bytes) else None,
                body=content,
                tls=session.ssl is not None,
            )
        )
        return "250 2.0.0 queued by the far end"


@dataclass
class FarSmtp:
    users: Mapping[str, str]
    tls: ssl.SSLContext | None = None  # STARTTLS offered with this context
    auth_in_clear: bool = False  # offer AUTH before STARTTLS too (a careless server)
    mechanisms: Sequence[str] = ("PLAIN", "LOGIN")
    tempfail: bool = False  # answer every login with 454
    auth_commands: list[str] = field(default_factory=list)
    logins: list[tuple[str, bool]] = field(default_factory=list)
    messages: list[Delivered] = field(default_factory=list)
    port: int = 0

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        user = data.login.decode()
        if self.tempfail:
            self.logins.append((user, False))
            return AuthResult(
                success=False, handled=False, message="454 4.7.0 Temporary authentication failure"
            )
        good = self.users.get(user) == data.password.decode()
        self.logins.append((user, good))
        return AuthResult(success=good, handled=False, auth_data=data)

    def _factory(self, loop: asyncio.AbstractEventLoop) -> SMTP:
        excluded = [m for m in ("PLAIN", "LOGIN") if m not in self.mechanisms]
        return _Server(
            self,
            _Handler(self),
            hostname="smarthost.example.test",
            tls_context=self.tls,
            auth_required=not self.auth_in_clear,
            auth_require_tls=not self.auth_in_clear,
            auth_exclude_mechanism=excluded,
            authenticator=self._authenticate,
            loop=loop,
        )

    def start(self) -> int:
        """Listen on a free loopback port (returned), in a thread of its own."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(
                loop.create_server(lambda: self._factory(loop), "127.0.0.1", 0)
            )
            self.port = int(server.sockets[0].getsockname()[1])
            ready.set()
            loop.run_forever()
            server.close()
            loop.run_until_complete(server.wait_closed())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="far-smtp", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("aiosmtpd did not start")
        return self.port

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
