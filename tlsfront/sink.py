"""The bundled sink: a small qmail-smtpd-compatible receiver delivering into a Maildir.

Theory of operation
-------------------
Like qmail-smtpd it serves exactly one SMTP session on stdin/stdout, started
per connection by whoever accepted it (tlsfront, tcpserver, inetd), and reads
the connection's facts from the UCSPI environment. Input is read with
``os.read`` into a bounded buffer; replies are buffered and written out just
before the next blocking read, which is what qmail's ``saferead`` does, so a
pipelined group of commands (RFC 2920) gets its replies in order and at once.

The DATA stream goes through :class:`DataDecoder`, a byte-level state machine
with qmail-smtpd's ``blast()`` semantics: CRLF becomes LF, a leading dot is
removed, ``CRLF . CRLF`` ends the message, and a bare LF anywhere aborts the
session with qmail's ``451 See http://pobox.com/~djb/docs/smtplf.html.``. The
stored text streams into a file under the Maildir's ``tmp/`` and is renamed into
``new/`` only after the final dot; every other ending (EOF, bare LF, size limit)
removes it, so nothing is delivered without the terminator.

A delivered file holds ``Return-Path: <sender>`` (as qmail-local writes it),
then qmail-smtpd's own Received line, then the message, with LF line endings.

Environment, as qmail-smtpd 1.03 reads it: ``TCPLOCALHOST`` (``TCPLOCALIP``,
``unknown``) is the ``by`` host of the Received line; ``TCPREMOTEIP``,
``TCPREMOTEHOST`` (``unknown`` when unset), ``TCPREMOTEINFO``; ``RELAYCLIENT``
(when set any recipient is accepted and the value is appended to it);
``DATABYTES`` (overrides ``--databytes``; 0 means no limit).

Where this differs from qmail-smtpd 1.03
----------------------------------------
- No control directory: ``--hostname`` stands for ``control/me`` and
  ``control/smtpgreeting``; without it the greeting name is ``TCPLOCALHOST``,
  then ``unknown``. ``--rcpthosts``/``--rcpthost`` stand for
  ``control/rcpthosts``; ``--databytes`` for ``control/databytes``; ``--timeout``
  for ``control/timeoutsmtpd``. No ``morercpthosts``, ``badmailfrom`` or
  ``localiphost``.
- A ``--rcpthosts`` file that is missing is an error (``421 unable to read
  controls``); qmail treats a missing ``rcpthosts`` as "accept everything".
  With neither option, every recipient is accepted, as qmail does without
  ``rcpthosts``.
- A command line longer than 64 KiB is refused with ``500 sorry, that line is
  too long (#5.5.2)`` and the session ends; qmail's buffer grows without bound.
- Messages go into a Maildir instead of the queue; ``qp`` in ``250 ok`` is this
  process's id. Unknown commands get ``502 unimplemented (#5.5.1)`` as in qmail
  1.03 (there is no ``500 unrecognised`` in qmail-smtpd).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

LINE_LIMIT = 64 * 1024
READ_SIZE = 64 * 1024
MAXHOPS = 100
ADDRESS_LIMIT = 900
DEFAULT_TIMEOUT = 1200.0

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# --- the DATA stream ---------------------------------------------------------


class StrayNewline(Exception):
    """A bare LF in the DATA stream; ``consumed`` counts the bytes up to and with it."""

    def __init__(self, consumed: int) -> None:
        super().__init__("bare LF in DATA")
        self.consumed = consumed


_MID, _LINE_START, _DOT, _DOT_CR, _CR = range(5)
_CR_OR_LF = re.compile(rb"[\r\n]")
_HOP_PREFIXES = (b"received", b"delivered")


class DataDecoder:
    """qmail-smtpd's DATA semantics as a sans-I/O machine.

    ``feed(data)`` returns ``(text, consumed, done)``: the stored text made from
    the bytes it consumed, how many bytes of ``data`` it consumed, and whether
    the final dot was among them (bytes after it are left for the caller).
    ``hops`` counts header lines starting with ``Received``/``Delivered``.
    """

    def __init__(self) -> None:
        self._state = _LINE_START
        self.hops = 0
        self._in_header = True
        self._prefix = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, int, bool]:
        out = bytearray()
        state = self._state
        i, n = 0, len(data)
        done = False
        while i < n:
            if state == _MID:
                m = _CR_OR_LF.search(data, i)
                j = n if m is None else m.start()
                if j > i:
                    out += data[i:j]
                    i = j
                    continue
            ch = data[i]
            i += 1
            if ch == 0x0A and state in (_MID, _LINE_START, _DOT):
                raise StrayNewline(i)
            if state == _MID:  # ch is CR
                state = _CR
            elif state == _LINE_START:
                if ch == 0x2E:
                    state = _DOT
                elif ch == 0x0D:
                    state = _CR
                else:
                    out.append(ch)
                    state = _MID
            elif state == _DOT:  # the leading dot is dropped
                if ch == 0x0D:
                    state = _DOT_CR
                else:
                    out.append(ch)
                    state = _MID
            elif state == _DOT_CR:
                if ch == 0x0A:
                    done = True
                    break
                out += b".\r"
                if ch == 0x0D:
                    state = _CR
                else:
                    out.append(ch)
                    state = _MID
            else:  # _CR: a CR is pending
                if ch == 0x0A:
                    out.append(0x0A)
                    state = _LINE_START
                elif ch == 0x0D:
                    out.append(0x0D)
                else:
                    out += bytes((0x0D, ch))
                    state = _MID
        self._state = state
        text = bytes(out)
        self._count_hops(text)
        return text, i, done

    def _count_hops(self, text: bytes) -> None:
        pos = 0
        while self._in_header and pos < len(text):
            nl = text.find(b"\n", pos)
            end = len(text) if nl < 0 else nl
            room = 9 - len(self._prefix)
            if room > 0:
                self._prefix += text[pos : min(end, pos + room)]
            if nl < 0:
                return
            if not self._prefix:
                self._in_header = False  # the empty line ends the header
            elif bytes(self._prefix).lower().startswith(_HOP_PREFIXES):
                self.hops += 1
            self._prefix.clear()
            pos = nl + 1


# --- envelope rules ----------------------------------------------------------


def parse_address(arg: bytes) -> bytes | None:
    """The address of a MAIL/RCPT argument as qmail-smtpd's addrparse takes it.

    No check of ``FROM:``/``TO:``: qmail looks for ``<`` (else takes what follows
    ``:`` up to a space), strips a source route, quotes and backslashes.
    ``None`` for an address over 900 octets.
    """
    terminator = 0x3E  # '>'
    lt = arg.find(b"<")
    if lt >= 0:
        arg = arg[lt + 1 :]
    else:
        terminator = 0x20
        colon = arg.find(b":")
        arg = b"" if colon < 0 else arg[colon + 1 :].lstrip(b" ")
    if arg.startswith(b"@"):
        colon = arg.find(b":")
        arg = b"" if colon < 0 else arg[colon + 1 :]
    addr = bytearray()
    escaped = quoted = False
    for ch in arg:
        if escaped:
            addr.append(ch)
            escaped = False
        elif ch == terminator and not quoted:
            break
        elif ch == 0x5C:
            escaped = True
        elif ch == 0x22:
            quoted = not quoted
        else:
            addr.append(ch)
    if len(addr) + 1 > ADDRESS_LIMIT:
        return None
    return bytes(addr)


def rcpthost_allowed(address: bytes, rcpthosts: frozenset[bytes] | None) -> bool:
    """qmail's rcpthosts rule: no list allows all; no ``@`` is local; else the
    domain, or any suffix of it starting at a dot (``.example.com``), is listed."""
    if rcpthosts is None:
        return True
    at = address.rfind(b"@")
    if at < 0:
        return True
    host = address[at + 1 :].lower()
    return any((j == 0 or host[j] == 0x2E) and host[j:] in rcpthosts for j in range(len(host)))


class ControlError(Exception):
    """A file named on the command line cannot be read."""


def read_rcpthosts(path: Path) -> frozenset[bytes]:
    """An rcpthosts file: one domain a line, ``#`` comments and blank lines skipped."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from exc
    hosts = set()
    for line in raw.split(b"\n"):
        line = line.rstrip(b" \t\r")
        if line and not line.startswith(b"#"):
            hosts.add(line.lower())
    return frozenset(hosts)


# --- Maildir -----------------------------------------------------------------


class Delivery(Protocol):
    def write(self, data: bytes) -> None: ...
    def commit(self) -> str: ...
    def abort(self) -> None: ...


class MessageStore(Protocol):
    def begin(self, sender: bytes) -> Delivery: ...


def _maildir_hostname() -> str:
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


class _MaildirDelivery:
    def __init__(self, root: Path, name: str, file: BinaryIO) -> None:
        self._root = root
        self.name = name
        self._file = file
        self._open = True

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> str:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.rename(self._root / "tmp" / self.name, self._root / "new" / self.name)
        self._open = False
        return self.name

    def abort(self) -> None:
        if not self._open:
            return
        self._open = False
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._root / "tmp" / self.name)


class Maildir:
    """Delivery into a Maildir: written under tmp/, renamed into new/ when whole."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._count = 0

    def begin(self, sender: bytes) -> Delivery:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, exist_ok=True)
        self._count += 1
        now = time.time()
        name = (
            f"{int(now)}.M{int(now % 1 * 1_000_000):06d}P{os.getpid()}Q{self._count}"
            f".{_maildir_hostname()}"
        )
        fd = os.open(self.path / "tmp" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        delivery = _MaildirDelivery(self.path, name, os.fdopen(fd, "wb"))
        try:
            delivery.write(b"Return-Path: <" + sender + b">\n")
        except OSError:
            delivery.abort()
            raise
        return delivery


def read_maildir(path: Path | str) -> list[bytes]:
    """The messages in a Maildir's new/, sorted by file name ([] if there is none)."""
    new = Path(path) / "new"
    try:
        names = sorted(n for n in os.listdir(new) if not n.startswith("."))
    except FileNotFoundError:
        return []
    return [(new / n).read_bytes() for n in names]


# --- the session -------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What qmail-smtpd would read from control files."""

    hostname: str | None = None
    rcpthosts: frozenset[bytes] | None = None
    databytes: int = 0
    timeout: float = DEFAULT_TIMEOUT


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


# --- command line ------------------------------------------------------------


def build_parser(
    prog: str | None = None, *, maildir_required: bool = True
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m tlsfront.sink",
        description="A qmail-smtpd-compatible SMTP receiver on stdin/stdout "
        "that delivers into a Maildir.",
    )
    parser.add_argument(
        "--maildir", type=Path, required=maildir_required, help="Maildir to deliver into"
    )
    parser.add_argument("--rcpthosts", type=Path, help="file of accepted domains, as qmail's")
    parser.add_argument(
        "--rcpthost",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="an accepted domain (.example.com: its subdomains); repeatable",
    )
    parser.add_argument("--hostname", help="greeting name (default: $TCPLOCALHOST)")
    parser.add_argument(
        "--databytes", type=int, default=0, help="size limit in bytes; 0: none ($DATABYTES wins)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for each read"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config the parsed options describe; ControlError if a file is unreadable."""
    rcpthosts: frozenset[bytes] | None = None
    if args.rcpthosts is not None or args.rcpthost:
        hosts = {os.fsencode(h).lower() for h in args.rcpthost}
        if args.rcpthosts is not None:
            hosts |= read_rcpthosts(args.rcpthosts)
        rcpthosts = frozenset(hosts)
    return Config(
        hostname=args.hostname,
        rcpthosts=rcpthosts,
        databytes=max(0, args.databytes),
        timeout=args.timeout,
    )


def control_failure(prog: str, exc: ControlError) -> int:
    """What qmail-smtpd does when it cannot read its controls."""
    print(f"{prog}: {exc}", file=sys.stderr)
    with contextlib.suppress(OSError):
        os.write(1, b"421 unable to read controls (#4.3.0)\r\n")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ControlError as exc:
        return control_failure("tlsfront.sink", exc)
    return SinkSession(config, Maildir(args.maildir)).run()


if __name__ == "__main__":
    sys.exit(main())
