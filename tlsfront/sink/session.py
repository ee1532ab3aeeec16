"""One SMTP session on stdin/stdout, as qmail-smtpd 1.03 runs it.

Input is read with ``os.read`` into a bounded buffer; replies are buffered and
written out just before the next blocking read, so a pipelined group of
commands gets its replies in order and at once. A message is streamed through
:class:`~tlsfront.sink.data.DataDecoder` into the session's message store.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from tlsfront.sink.control import Config
from tlsfront.sink.data import DataDecoder, StrayNewline
from tlsfront.sink.envelope import parse_address, rcpthost_allowed
from tlsfront.sink.maildir import Delivery, MessageStore

LINE_LIMIT = 64 * 1024
READ_SIZE = 64 * 1024
MAXHOPS = 100

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass
class Envelope:
    sender: bytes
    recipients: list[bytes] = field(default_factory=list)


class SessionEnd(Exception):
    """Ends the session with an exit code; ``flush`` sends pending replies first."""

    def __init__(self, code: int, *, flush: bool = False) -> None:
        super().__init__(code)
        self.code = code
        self.flush = flush


def _leading_number(text: str) -> int:
    m = re.match(r"\d+", text)
    return int(m.group()) if m else 0


def _safe(text: bytes) -> bytes:
    """qmail's received.c safeput: characters outside a small set become '?'."""
    return re.sub(rb"[^A-Za-z0-9.@%+/=:\-]", b"?", text)


def _date822() -> bytes:
    t = time.gmtime()
    return (
        f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} -0000"
    ).encode()


class SinkSession:
    """One SMTP session as qmail-smtpd 1.03 runs it.

    Subclasses (the test backends) may override ``read_input``, ``write_output``,
    ``reply``, ``finish_message`` and the hooks ``body_chunk`` / ``body_end``.
    """

    def __init__(
        self,
        config: Config,
        store: MessageStore,
        environ: Mapping[str, str] | None = None,
        stdin_fd: int = 0,
        stdout_fd: int = 1,
    ) -> None:
        env = os.environ if environ is None else environ
        self.config = config
        self.store = store
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.greeting = os.fsencode(config.hostname or env.get("TCPLOCALHOST") or "unknown")
        self.local = os.fsencode(env.get("TCPLOCALHOST") or env.get("TCPLOCALIP") or "unknown")
        self.remoteip = os.fsencode(env.get("TCPREMOTEIP") or "unknown")
        self.remotehost = os.fsencode(env.get("TCPREMOTEHOST") or "unknown")
        info = env.get("TCPREMOTEINFO")
        self.remoteinfo = None if info is None else os.fsencode(info)
        relay = env.get("RELAYCLIENT")
        self.relayclient = None if relay is None else os.fsencode(relay)
        self.databytes = config.databytes
        if "DATABYTES" in env:
            self.databytes = _leading_number(env["DATABYTES"])
        self.helo: bytes | None = None  # set only when it differs from remotehost
        self.envelope: Envelope | None = None  # None until MAIL ("seenmail")
        self._buf = bytearray()
        self._out = bytearray()
        self._commands = {
            b"helo": self.smtp_helo,
            b"ehlo": self.smtp_ehlo,
            b"mail": self.smtp_mail,
            b"rcpt": self.smtp_rcpt,
            b"data": self.smtp_data,
            b"rset": self.smtp_rset,
            b"noop": self.smtp_noop,
            b"vrfy": self.smtp_vrfy,
            b"help": self.smtp_help,
            b"quit": self.smtp_quit,
        }

    # I/O

    def read_input(self) -> bytes:
        """One read from stdin; b"" at EOF. Replies 451 and ends on timeout."""
        ready, _, _ = select.select([self.stdin_fd], [], [], self.config.timeout)
        if not ready:
            self.reply(b"451 timeout (#4.4.2)")
            raise SessionEnd(1, flush=True)
        try:
            return os.read(self.stdin_fd, READ_SIZE)
        except OSError:
            return b""

    def write_output(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.stdout_fd, view) :]

    def reply(self, line: bytes) -> None:
        """Queue one reply line (without CRLF); it goes out before the next read."""
        self._out += line + b"\r\n"

    def flush(self) -> None:
        if not self._out:
            return
        data = bytes(self._out)
        self._out.clear()
        try:
            self.write_output(data)
        except OSError:
            raise SessionEnd(1) from None

    def _fill(self) -> None:
        self.flush()
        data = self.read_input()
        if not data:
            raise SessionEnd(1)  # qmail's die_read
        self._buf += data

    def _next_line(self) -> bytes:
        searched = 0
        while True:
            nl = self._buf.find(b"\n", searched)
            if nl > LINE_LIMIT or (nl < 0 and len(self._buf) > LINE_LIMIT):
                self.reply(b"500 sorry, that line is too long (#5.5.2)")
                raise SessionEnd(1, flush=True)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return line
            searched = len(self._buf)
            self._fill()

    def run(self) -> int:
        """Serve the session; returns the exit code."""
        try:
            self.reply(b"220 " + self.greeting + b" ESMTP")
            while True:
                line = self._next_line()
                if line.endswith(b"\r"):
                    line = line[:-1]
                line = line.split(b"\0", 1)[0]  # qmail sees a C string
                verb, _, arg = line.partition(b" ")
                handler = self._commands.get(verb.lower(), self.smtp_unimplemented)
                handler(arg.lstrip(b" "))
        except SessionEnd as end:
            if end.flush:
                with contextlib.suppress(SessionEnd):
                    self.flush()
            return end.code

    # commands

    def _dohelo(self, arg: bytes) -> None:
        self.helo = arg if arg.lower() != self.remotehost.lower() else None

    def smtp_helo(self, arg: bytes) -> None:
        self.reply(b"250 " + self.greeting)
        self.envelope = None
        self._dohelo(arg)

    def smtp_ehlo(self, arg: bytes) -> None:
        self.reply(b"250-" + self.greeting)
        self.reply(b"250-PIPELINING")
        self.reply(b"250 8BITMIME")
        self.envelope = None
        self._dohelo(arg)

    def smtp_mail(self, arg: bytes) -> None:
        addr = parse_address(arg)
        if addr is None:
            self.reply(b"555 syntax error (#5.5.4)")
            return
        self.envelope = Envelope(addr)
        self.reply(b"250 ok")

    def smtp_rcpt(self, arg: bytes) -> None:
        if self.envelope is None:
            self.reply(b"503 MAIL first (#5.5.1)")
            return
        addr = parse_address(arg)
        if addr is None:
            self.reply(b"555 syntax error (#5.5.4)")
            return
        if self.relayclient is not None:
            addr += self.relayclient
        elif not rcpthost_allowed(addr, self.config.rcpthosts):
            self.reply(b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
            return
        self.envelope.recipients.append(addr)
        self.reply(b"250 ok")

    def smtp_rset(self, arg: bytes) -> None:
        self.envelope = None
        self.reply(b"250 flushed")

    def smtp_noop(self, arg: bytes) -> None:
        self.reply(b"250 ok")

    def smtp_vrfy(self, arg: bytes) -> None:
        self.reply(b"252 send some mail, i'll try my best")

    def smtp_help(self, arg: bytes) -> None:
        self.reply(b"214 qmail home page: http://pobox.com/~djb/qmail.html")

    def smtp_quit(self, arg: bytes) -> None:
        self.reply(b"221 " + self.greeting)
        raise SessionEnd(0, flush=True)

    def smtp_unimplemented(self, arg: bytes) -> None:
        self.reply(b"502 unimplemented (#5.5.1)")

    def received_line(self) -> bytes:
        """qmail-smtpd's own trace header, LF-terminated."""
        line = b"Received: from " + _safe(self.remotehost)
        if self.helo is not None:
            line += b" (HELO " + _safe(self.helo) + b")"
        line += b" ("
        if self.remoteinfo is not None:
            line += _safe(self.remoteinfo) + b"@"
        line += _safe(self.remoteip) + b")\n  by " + _safe(self.local)
        return line + b" with SMTP; " + _date822() + b"\n"

    def smtp_data(self, arg: bytes) -> None:
        envelope = self.envelope
        if envelope is None:
            self.reply(b"503 MAIL first (#5.5.1)")
            return
        if not envelope.recipients:
            self.reply(b"503 RCPT first (#5.5.1)")
            return
        self.envelope = None
        try:
            delivery = self.store.begin(envelope.sender)
        except OSError:
            self.reply(b"451 qqt failure (#4.3.0)")
            return
        finished = False
        try:
            self.reply(b"354 go ahead")
            failed = False
            try:
                delivery.write(self.received_line())
            except OSError:
                failed = True
            decoder = DataDecoder()
            size = 0
            done = False
            while not done:
                if not self._buf:
                    try:
                        self._fill()
                    except SessionEnd:
                        self.body_end(envelope, complete=False)
                        raise
                try:
                    text, used, done = decoder.feed(bytes(self._buf))
                except StrayNewline as stray:
                    self.body_chunk(bytes(self._buf[: stray.consumed]))
                    self.body_end(envelope, complete=False)
                    self.reply(b"451 See http://pobox.com/~djb/docs/smtplf.html.")
                    raise SessionEnd(1, flush=True) from None
                self.body_chunk(bytes(self._buf[:used]))
                del self._buf[:used]
                size += len(text)
                if failed or (self.databytes and size > self.databytes):
                    continue
                try:
                    delivery.write(text)
                except OSError:
                    failed = True
            self.body_end(envelope, complete=True)
            oversize = bool(self.databytes) and size > self.databytes
            self.finish_message(delivery, envelope, decoder.hops, oversize, failed)
            finished = True
        finally:
            if not finished:
                delivery.abort()

    def finish_message(
        self,
        delivery: Delivery,
        envelope: Envelope,
        hops: int,
        oversize: bool,
        failed: bool,
    ) -> None:
        """After the final dot: deliver (or not) and give the reply."""
        if hops >= MAXHOPS:
            delivery.abort()
            self.reply(b"554 too many hops, this message is looping (#5.4.6)")
        elif oversize:
            delivery.abort()
            self.reply(b"552 sorry, that message size exceeds my databytes limit (#5.3.4)")
        elif failed:
            delivery.abort()
            self.reply(b"451 qq write error or disk full (#4.3.0)")
        else:
            try:
                delivery.commit()
            except OSError:
                delivery.abort()
                self.reply(b"451 qq write error or disk full (#4.3.0)")
                return
            self.reply(b"250 ok %d qp %d" % (int(time.time()), os.getpid()))

    def body_chunk(self, raw: bytes) -> None:
        """Hook: raw DATA bytes, before unstuffing, as they are consumed."""

    def body_end(self, envelope: Envelope, complete: bool) -> None:
        """Hook: the DATA body ended, with its final dot (``complete``) or without."""
