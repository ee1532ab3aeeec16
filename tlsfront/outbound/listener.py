"""The relay's server side: qmail-remote talks to it as to any SMTP server.

Theory of operation: qmail-remote sends one message a session: HELO, MAIL,
the RCPTs of one host, DATA, the body, QUIT, each command waiting for its
reply. MAIL is answered here (the destination is not known yet). The first
RCPT names the destination domain: the `Dialer` opens a session with that
domain's servers and sends MAIL there. From then on every RCPT, DATA and
final-dot reply qmail-remote sees is the remote server's own reply, byte
for byte, except when the remote side fails: then the answer is a 4xx (the
message stays in qmail's queue), never a 250. A RCPT for another domain in
the same transaction gets `451 4.5.3` (qmail-remote never sends one).

Commands and the body are read by the same rules as the inbound side's
(`tlsfront.smtp.command`, `tlsfront.smtp.body`): a command line with a bare
CR, LF or NUL, or too long, ends the session with the inbound side's `500
5.5.2`. The body is passed on as it comes (qmail-remote has dot-stuffed
it), with no line limit (the mail is already queued); the final dot goes to
the remote server only when the whole body arrived clean. A body with a
bare CR, bare LF or NUL is refused with `554 5.6.0` without a final dot
(the remote server discards it). A body sent before the `354` it needed,
behind a DATA the remote server refused, is never read as commands: the
session ends with `421 4.5.0`.
"""

from __future__ import annotations

import ipaddress
import logging

import trio

from tlsfront.config.schema import Profile
from tlsfront.net.address import unmap
from tlsfront.outbound import stats
from tlsfront.outbound.client import RemoteError
from tlsfront.outbound.context import Runtime, default_runtime
from tlsfront.outbound.control import control_dirs
from tlsfront.outbound.dialer import Dialer, RemoteSession
from tlsfront.smtp import replies
from tlsfront.smtp.body import BodyScanner
from tlsfront.smtp.command import Command, address_domain, parse_command, parse_path, take_line
from tlsfront.smtp.errors import RemoteProtocolError
from tlsfront.smtp.reply import Reply

log = logging.getLogger("tlsfront.outbound")


class _ClientGone(Exception):
    """qmail-remote closed the connection, timed out or broke the protocol."""


def client_allowed(client_ip: str, allow_from: tuple[str, ...]) -> bool:
    try:
        address = ipaddress.ip_address(unmap(client_ip.strip("[]")))
    except ValueError:
        return False
    for network in allow_from:
        try:
            if address in ipaddress.ip_network(network, strict=False):
                return True
        except ValueError:
            continue
    return False


async def serve_outbound(
    stream: trio.abc.Stream,
    client_ip: str,
    profile: Profile,
    *,
    runtime: Runtime | None = None,
) -> None:
    """Serve one qmail-remote connection on an outbound profile."""
    relay = Relay(stream, profile, runtime or default_runtime())
    try:
        if not client_allowed(client_ip, profile.allow_from):
            log.warning("outbound client=%s refused: not in allow_from", client_ip)
            await relay.reply(replies.relay_not_permitted())
            return
        await relay.run()
    except _ClientGone:
        pass
    finally:
        await relay.close()


class Relay:
    def __init__(self, stream: trio.abc.Stream, profile: Profile, runtime: Runtime) -> None:
        self.stream = stream
        self.profile = profile
        self.dialer = Dialer(profile, runtime, control_dirs(profile))
        self.buffer = bytearray()  # from qmail-remote, not yet read as a command or body
        self.name = profile.hostname or "localhost"
        self._reset()

    def _reset(self) -> None:
        self.sender: bytes | None = None
        self.domain: str | None = None
        self.remote: RemoteSession | None = None
        self.failure: Reply | None = None  # the answer for every RCPT once dialing failed
        self.accepted = 0
        self.last: Reply | None = None  # the last RCPT / DATA reply given
        self.final: Reply | None = None  # the reply given after the final dot

    # -- the client side -------------------------------------------------

    async def reply(self, reply: Reply) -> None:
        try:
            with trio.fail_after(self.profile.timeout_command):
                await self.stream.send_all(reply.raw)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as err:
            raise _ClientGone from err

    async def _receive(self, *, data: bool = False) -> bytes:
        """Bytes from qmail-remote (b"" at its end), within the command or DATA timeout."""
        profile = self.profile
        with trio.move_on_after(profile.timeout_data if data else profile.timeout_command):
            try:
                return bytes(await self.stream.receive_some(65536))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _ClientGone from None
        await self.reply(replies.relay_timeout())
        raise _ClientGone

    async def _command(self) -> Command:
        while True:
            try:
                line = take_line(self.buffer, self.profile.max_command_line)
                if line is not None:
                    return parse_command(line)
            except RemoteProtocolError as err:
                await self.reply(replies.of_error(err))
                raise _ClientGone from None
            data = await self._receive()
            if not data:
                raise _ClientGone
            self.buffer += data

    async def run(self) -> None:
        await self.reply(replies.relay_greeting(self.name))
        while True:
            command = await self._command()
            verb, argument = command.verb, command.args
            if verb in ("HELO", "EHLO"):
                await self._end_transaction()
                await self.reply(replies.relay_hello(self.name))
            elif verb == "MAIL":
                await self._mail(argument)
            elif verb == "RCPT":
                await self._rcpt(argument)
            elif verb == "DATA":
                await self._data()
            elif verb == "RSET":
                await self._end_transaction()
                await self.reply(replies.relay_ok())
            elif verb == "NOOP":
                await self.reply(replies.relay_ok())
            elif verb == "VRFY":
                await self.reply(replies.relay_vrfy())
            elif verb == "QUIT":
                await self._end_transaction()
                await self.reply(replies.relay_bye(self.name))
                return
            else:
                await self.reply(replies.relay_not_implemented())

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                await self._end_transaction()
            await trio.aclose_forcefully(self.stream)

    # -- the transaction -------------------------------------------------

    async def _mail(self, argument: bytes) -> None:
        if self.sender is not None:
            await self.reply(replies.relay_nested_mail())
            return
        try:
            self.sender = parse_path(argument, b"FROM")
        except RemoteProtocolError as err:
            await self.reply(replies.of_error(err))
            return
        await self.reply(replies.relay_sender_ok())

    async def _rcpt(self, argument: bytes) -> None:
        if self.sender is None:
            await self.reply(replies.relay_mail_first())
            return
        try:
            recipient = parse_path(argument, b"TO")
        except RemoteProtocolError as err:
            await self.reply(replies.of_error(err))
            return
        domain = address_domain(recipient)
        if domain is None:
            await self.reply(replies.relay_no_domain())
            return
        if self.domain is None:
            self.domain = domain
            opened = await self.dialer.open(domain, self.sender)
            if isinstance(opened, Reply):
                self.failure = opened
            else:
                self.remote = opened
                if not (200 <= opened.mail_reply.code < 300):
                    self.failure = opened.mail_reply
        elif domain != self.domain:
            await self.reply(replies.relay_one_domain())
            return
        reply = self.failure or await self._remote_command(b"RCPT TO:<" + recipient + b">")
        if 200 <= reply.code < 300:
            self.accepted += 1
        self.last = reply
        await self.reply(reply)

    async def _remote_command(self, line: bytes) -> Reply:
        """The remote server's reply, or a 451 when the remote session broke."""
        assert self.remote is not None
        try:
            return await self.remote.client.command(line)
        except RemoteError as err:
            return await self._remote_broken(err)

    async def _remote_broken(self, err: RemoteError) -> Reply:
        assert self.remote is not None
        where = self.remote.where
        await self.remote.client.aclose()
        self.failure = replies.relay_remote_broken(where, err.reason)
        return self.failure

    async def _data(self) -> None:
        if self.sender is None:
            await self.reply(replies.relay_mail_first())
            return
        if self.accepted == 0:
            await self.reply(replies.relay_no_recipients())
            return
        reply = self.failure or await self._remote_command(b"DATA")
        if reply.code != 354:
            if 200 <= reply.code < 300:  # a server that skips 354 is broken
                assert self.remote is not None
                reply = await self._remote_broken(RemoteError("DATA answered without 354"))
            self.last = reply
            await self.reply(reply)
            if self.buffer:
                # the body came before the 354 it needed: never run it as commands
                await self.reply(replies.relay_synchronization_error())
                raise _ClientGone
            return
        await self.reply(reply)
        self.last = self.final = await self._body()
        await self.reply(self.final)
        await self._end_transaction()

    async def _body(self) -> Reply:
        """Pass the body on; the reply for qmail-remote after its final dot."""
        assert self.remote is not None
        scanner = BodyScanner(max_line=None)
        problem: Reply | None = None
        data = bytes(self.buffer)
        self.buffer.clear()
        while True:
            try:
                chunk = scanner.feed(data)
            except RemoteProtocolError as err:
                problem = problem or replies.relay_body_refused(err)
                await self.remote.client.aclose()
                chunk = scanner.feed(b"")  # from now on it only looks for the end
            if problem is None and chunk.forward:
                try:
                    await self.remote.client.send(chunk.forward)
                except RemoteError as err:
                    problem = await self._remote_broken(err)
            if chunk.done:
                self.buffer += chunk.rest
                break
            try:
                data = await self._receive(data=True)
                if not data:
                    raise _ClientGone
            except _ClientGone:
                # no final dot: the remote server discards the message
                await self.remote.client.aclose()
                raise
        if problem is not None:
            return problem
        try:
            return await self.remote.client.read_reply(final=True)
        except RemoteError as err:
            return await self._remote_broken(err)

    async def _end_transaction(self) -> None:
        """Log and count a finished transaction, close its remote session."""
        if self.domain is not None:
            self._log()
        if self.remote is not None:
            await self.remote.client.quit()
        self._reset()

    def _log(self) -> None:
        remote, reply = self.remote, self.final or self.last
        if self.final is not None and 200 <= self.final.code < 300:
            result = "delivered"
        elif reply is None or 200 <= reply.code < 400:
            result = "abandoned"  # qmail-remote stopped before the end of DATA
        elif reply.code >= 500:
            result = "bounced"
        else:
            result = "deferred"
        tls = remote.tls.label if remote is not None else "none"
        stats.record_outcome(result, tls)
        log.info(
            "outbound domain=%s mx=%s %s result=%s reply=%r",
            self.domain,
            remote.where if remote is not None else "-",
            _describe(remote),
            result,
            reply.first_line if reply is not None else "-",
        )


def _describe(remote: RemoteSession | None) -> str:
    """The TLS of a transaction's remote session, and who it logged in as."""
    if remote is None:
        return "tls=none"
    text = remote.tls.describe()
    return text if remote.login is None else f"{text} login={remote.login}"
