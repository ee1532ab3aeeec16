"""The TLS stream: one server-side TLS connection behind a trio stream, at run time.

`tlsfront.tls.context` builds the OpenSSL context (configuration time); this
module runs connections on it: the handshake, records both ways,
close_notify, and what the handshake negotiated (`TLSInfo`).

Theory of operation
-------------------

Each `TLSStream` drives an `SSL.Connection` whose socket is a pair of memory
BIOs: ciphertext from the transport goes in with ``bio_write``, ciphertext
OpenSSL produces comes out with ``bio_read``. OpenSSL never touches a file
descriptor, so all I/O is trio's and every wait is cancellable.

The stream's state is one `StreamState`, moved only by `_on(event)` along the
`_MOVES` table::

    HANDSHAKE --handshake done--> OPEN --peer EOF-----> PEER_CLOSED
        |                          |    --send failed--> SEND_FAILED
        |                          |    --TLS error----> BROKEN
        +--handshake failed, send failed--> BROKEN
    PEER_CLOSED --send failed, TLS error--> BROKEN
    SEND_FAILED --peer EOF, TLS error-----> BROKEN
    any state --aclose--> CLOSED; BROKEN and CLOSED keep every other event

PEER_CLOSED (close_notify or the transport's EOF was read) still sends: SMTP
replies may follow the client's last command. SEND_FAILED (a transport send
failed or was cancelled part-way through a record, so nothing more can
follow it) still receives. BROKEN refuses both; CLOSED raises
`trio.ClosedResourceError`.

Outgoing ciphertext has one queue (OpenSSL's outgoing BIO, drained into
``_outgoing``) and one sender at a time (``_flushing``). The sender keeps
sending until the queue is empty, so bytes leave in the order OpenSSL
produced them, even with one task reading and another writing at once (in
the proxy: the client reader, and the backend reader sending the replies it
got). A reader that produced ciphertext while a writer sends leaves it in
the queue for the writer; a writer that finds the reader sending waits for
it (``_flush_done``, an Event made only then). `send_all` encrypts 64 KiB per
SSL_write (partial writes off) and sends the result in one transport send.

Incoming ciphertext is read only by the handshake (under ``_handshake_lock``,
dropped once it is done) and afterwards by `receive_some`, which hands it to
its `Reader` (`tlsfront.tls.incoming`): record after record, everything
OpenSSL can give up to max_bytes in one chunk, not one 16 KB record per
call. A transport read of 64 KiB that comes back full says a large message
is flowing: the next reads take what the kernel holds, up to 256 KiB at a
time, into a buffer of the stream's own (``_bulk``, with the transport's
`receive_now`, which never waits). When the kernel has nothing, the buffer
goes and the stream waits with a plain 64 KiB read: a session never waits,
idle or not, holding it. A TLS error behind good records is raised by the call after
the one that returns them. Renegotiation is disabled, so writing never
needs to read.

`aclose` sends close_notify when the stream can still send (OPEN or
PEER_CLOSED, no send in progress), so a client that reads the last reply
(a 421, a 500 for a line too long) sees a clean end rather than a truncation
attack; it never waits for the peer's close_notify and spends at most
`_CLOSE_NOTIFY_TIMEOUT` on sending its own.

The OpenSSL callbacks the context installs write into the connection's
`HandshakeNotes` (was it a full handshake, the first certificate
verification error); `TLSInfo` is made from them and the connection when the
handshake completes.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable
from dataclasses import dataclass

import trio
from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import lib as _openssl

from tlsfront.net.conflict import ConflictDetector
from tlsfront.tls.incoming import RECEIVE, Reader

__all__ = [
    "HandshakeFailure",
    "HandshakeNotes",
    "StreamState",
    "TLSHandshakeError",
    "TLSInfo",
    "TLSStream",
]

_CHUNK = 65536  # bytes per transport read that may wait (see _bulk) and per SSL_write
# Bytes per read of OpenSSL's outgoing BIO: one SSL_write of a chunk, with
# its record overhead, comes out in one read.
_PULL = _CHUNK + 8192
_CLOSE_NOTIFY_TIMEOUT = 5.0  # seconds aclose() spends on a best-effort close_notify


class HandshakeFailure(enum.Enum):
    """Why a handshake failed, from a fixed set (a metric label is its value)."""

    NOT_TLS = "not TLS"
    NO_SHARED_CIPHER = "no shared cipher"
    UNSUPPORTED_PROTOCOL = "unsupported protocol"
    EOF = "eof"
    CONNECTION_LOST = "connection lost"
    CERTIFICATE_REQUIRED = "certificate required"
    PEER_CERTIFICATE_REJECTED = "peer certificate rejected"
    ALERT = "alert from peer"
    TIMEOUT = "timeout"  # the caller's deadline; the engine never raises it
    OTHER = "other"  # an OpenSSL error none of the above names


class TLSHandshakeError(Exception):
    """The handshake failed. `kind` says why, from a fixed set; `reason` is its
    words for the log: the kind's, or OpenSSL's own text for `OTHER`.
    `detail` says more (OpenSSL's text, the verify error).
    """

    def __init__(self, kind: HandshakeFailure, detail: str | None = None) -> None:
        reason = (detail or kind.value) if kind is HandshakeFailure.OTHER else kind.value
        text = reason if not detail or detail == reason else f"{reason}: {detail}"
        super().__init__(text)
        self.kind = kind
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class TLSInfo:
    version: str  # "TLSv1.3"
    cipher: str  # OpenSSL name, e.g. "TLS_AES_256_GCM_SHA384"
    bits: int  # secret bits used
    alg_bits: int
    peer_cert: x509.Certificate | None
    peer_chain: tuple[x509.Certificate, ...]  # as the client sent it, leaf first
    verified: bool  # peer cert verified against client_ca (+CRL), no error at any depth
    verify_error: str | None  # first error; None when verified or no certificate
    resumed: bool
    server_name: str | None  # SNI as sent by the client (not sanitized)
    cert_name: str | None = None  # the certificates' server-name entry, "default" or None


# OpenSSL reason text -> our short reason
_F = HandshakeFailure
# Whether the handshake resumed a session: one call after it, where an info
# callback (pyOpenSSL has no method for this) cost ~20 calls into Python per
# handshake. The binding is cryptography's own, which pyOpenSSL exposes.
_session_reused = _openssl.SSL_session_reused
_TLS1_3 = 0x0304  # the protocol version number of TLS 1.3 (RFC 8446)
_HANDSHAKE_REASONS = (
    ("wrong version number", _F.NOT_TLS),
    ("http request", _F.NOT_TLS),
    ("https proxy request", _F.NOT_TLS),
    ("packet length too long", _F.NOT_TLS),
    ("record layer failure", _F.NOT_TLS),
    ("unknown protocol", _F.NOT_TLS),
    ("no shared cipher", _F.NO_SHARED_CIPHER),
    ("unsupported protocol", _F.UNSUPPORTED_PROTOCOL),
    ("version too low", _F.UNSUPPORTED_PROTOCOL),
    ("no protocols available", _F.UNSUPPORTED_PROTOCOL),
    ("peer did not return a certificate", _F.CERTIFICATE_REQUIRED),
    ("certificate verify failed", _F.PEER_CERTIFICATE_REJECTED),
    ("alert", _F.ALERT),
)


def _handshake_error(exc: SSL.Error, notes: HandshakeNotes) -> TLSHandshakeError:
    if isinstance(exc, SSL.SysCallError):
        return TLSHandshakeError(_F.EOF, "unexpected EOF")
    texts = []
    if exc.args and isinstance(exc.args[0], list):
        texts = [str(e[2]) for e in exc.args[0] if isinstance(e, tuple) and len(e) >= 3]
    detail = texts[0] if texts else (str(exc) or type(exc).__name__)
    for needle, kind in _HANDSHAKE_REASONS:
        if needle in detail:
            if kind is _F.PEER_CERTIFICATE_REJECTED and notes.verify_error:
                detail = notes.verify_error
            return TLSHandshakeError(kind, detail)
    return TLSHandshakeError(_F.OTHER, detail)


class HandshakeNotes:
    """Per-connection notes the OpenSSL callbacks take during the handshake."""

    __slots__ = ("cert_name", "verify_called", "verify_error")

    def __init__(self) -> None:
        self.cert_name: str | None = None  # the server-name entry chosen, if the profile has any
        self.verify_called = False
        self.verify_error: str | None = None


# ----------------------------------------------------------------------------
# The state


class StreamState(enum.Enum):
    """Where a `TLSStream` is in its life (see the module doc for the moves)."""

    HANDSHAKE = "handshake"  # wrapped; the handshake has not completed
    OPEN = "open"  # records both ways
    PEER_CLOSED = "peer closed"  # close_notify or EOF read: receive gives b"", send works
    SEND_FAILED = "send failed"  # a send broke off: receive works, send raises
    BROKEN = "broken"  # handshake failed, TLS error, or both directions gone
    CLOSED = "closed"  # aclose() was called


class _Event(enum.Enum):
    HANDSHAKE_DONE = enum.auto()
    HANDSHAKE_FAILED = enum.auto()
    PEER_EOF = enum.auto()  # close_notify, or EOF from the transport
    SEND_FAILED = enum.auto()  # a transport send failed or was cancelled
    TLS_ERROR = enum.auto()  # OpenSSL failed reading or writing a record


_S = StreamState
_E = _Event
# The legal moves of the live states. Any state moves to CLOSED on aclose();
# BROKEN and CLOSED keep every other event (a concurrent task may still
# report one). An event missing here for a live state is a bug in this module.
_MOVES: dict[tuple[StreamState, _Event], StreamState] = {
    (_S.HANDSHAKE, _E.HANDSHAKE_DONE): _S.OPEN,
    (_S.HANDSHAKE, _E.HANDSHAKE_FAILED): _S.BROKEN,
    (_S.HANDSHAKE, _E.SEND_FAILED): _S.BROKEN,
    (_S.OPEN, _E.PEER_EOF): _S.PEER_CLOSED,
    (_S.OPEN, _E.SEND_FAILED): _S.SEND_FAILED,
    (_S.OPEN, _E.TLS_ERROR): _S.BROKEN,
    (_S.PEER_CLOSED, _E.SEND_FAILED): _S.BROKEN,
    (_S.PEER_CLOSED, _E.TLS_ERROR): _S.BROKEN,
    (_S.SEND_FAILED, _E.SEND_FAILED): _S.SEND_FAILED,
    (_S.SEND_FAILED, _E.PEER_EOF): _S.BROKEN,
    (_S.SEND_FAILED, _E.TLS_ERROR): _S.BROKEN,
}
_FINAL = (_S.BROKEN, _S.CLOSED)


# ----------------------------------------------------------------------------
# The stream


class TLSStream(trio.abc.Stream):
    """Server side of one TLS connection over `transport_stream`.

    One task may receive while another sends. Transport failures and TLS errors
    after the handshake raise `trio.BrokenResourceError`; use after `aclose`
    raises `trio.ClosedResourceError`.
    """

    # Thousands of these idle at once: no per-instance dict.
    __slots__ = (
        "_bulk",
        "_conn",
        "_error",
        "_flush_done",
        "_flushing",
        "_handshake_failed",
        "_handshake_lock",
        "_info",
        "_notes",
        "_outgoing",
        "_reader",
        "_receive_conflict",
        "_receive_now",
        "_send_conflict",
        "_state",
        "transport_stream",
    )

    def __init__(
        self, transport: trio.abc.Stream, conn: SSL.Connection, notes: HandshakeNotes
    ) -> None:
        self.transport_stream = transport
        self._conn = conn
        self._notes = notes
        self._state = StreamState.HANDSHAKE
        self._handshake_lock: trio.Lock | None = trio.Lock()  # dropped once the handshake is done
        # why it failed, kept without the exception (whose traceback would tie
        # this stream into a reference cycle through its own frames)
        self._handshake_failed: tuple[HandshakeFailure, str | None] | None = None
        self._info: TLSInfo | None = None  # made when the handshake completes
        self._outgoing: list[bytes] = []
        self._flushing = False  # a task is sending the outgoing queue
        self._flush_done: trio.Event | None = None  # made only when a second sender waits
        self._error: trio.BrokenResourceError | None = None  # TLS error behind returned data
        self._reader = Reader(conn)
        # Bulk reads: the transport's `receive_now`, if it has one, and the
        # buffer it reads into while a large message flows (see the module doc).
        self._receive_now: Callable[[bytearray], int | None] | None = getattr(
            transport, "receive_now", None
        )
        self._bulk: bytearray | None = None
        self._receive_conflict = ConflictDetector("another task is already receiving")
        self._send_conflict = ConflictDetector("another task is already sending")

    @property
    def state(self) -> StreamState:
        return self._state

    def _on(self, event: _Event) -> None:
        state = self._state
        if state not in _FINAL:
            self._state = _MOVES[state, event]

    # -- ciphertext plumbing -------------------------------------------------

    def _pull(self) -> None:
        """Move everything OpenSSL has written into the outgoing queue."""
        read = self._conn.bio_read
        try:
            while True:
                data = read(_PULL)
                self._outgoing.append(data)
                if len(data) < _PULL:
                    return  # a memory BIO reads short only when it is empty
        except SSL.WantReadError:
            return

    async def _flush(self, *, wait: bool = True) -> None:
        """Send the outgoing queue. With wait=False, leave it to a current sender."""
        self._pull()
        outgoing = self._outgoing
        if not outgoing:
            return
        while self._flushing:
            # The current sender sends what we queued too; a writer waits
            # until it is out (or the sender failed and left it).
            if not wait:
                return
            if self._flush_done is None:
                self._flush_done = trio.Event()
            await self._flush_done.wait()
            if not outgoing:
                return
        # Uncontended, this takes no checkpoint of its own: the transport
        # send below is one.
        self._flushing = True
        try:
            while outgoing:
                state = self._state
                if state is StreamState.SEND_FAILED or state is StreamState.BROKEN:
                    outgoing.clear()
                    raise trio.BrokenResourceError("an earlier send failed")
                data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
                outgoing.clear()
                try:
                    await self.transport_stream.send_all(data)
                except trio.ClosedResourceError:
                    self._on(_Event.SEND_FAILED)
                    if self._state is StreamState.CLOSED:
                        raise
                    raise trio.BrokenResourceError("transport closed") from None
                except BaseException:
                    # Part of a record may be out: nothing more can follow it.
                    self._on(_Event.SEND_FAILED)
                    raise
        finally:
            self._flushing = False
            done, self._flush_done = self._flush_done, None
            if done is not None:
                done.set()

    async def _receive_transport(self) -> bytes | bytearray:
        try:
            return await self.transport_stream.receive_some(_CHUNK)
        except trio.ClosedResourceError:
            if self._state is StreamState.CLOSED:
                raise
            raise trio.BrokenResourceError("transport closed") from None

    def _raise_unusable(self) -> None:
        """For BROKEN and CLOSED: the error the caller gets."""
        if self._state is StreamState.CLOSED:
            raise trio.ClosedResourceError("TLS stream was closed")
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise trio.BrokenResourceError("TLS stream is broken")

    # -- handshake -------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the server handshake; later calls return, or re-raise its failure, at once.

        Raises TLSHandshakeError (a lost transport is `HandshakeFailure.CONNECTION_LOST`),
        or trio.ClosedResourceError when aclose() was called. The caller bounds
        the time it may take (cancellation is safe).
        """
        lock = self._handshake_lock
        if lock is None:  # done
            await trio.lowlevel.checkpoint()
            return
        # Uncontended, as it nearly always is, taken without a pass through
        # the scheduler (`Lock.acquire` always makes one).
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._info is not None:
                return
            if self._handshake_failed is not None:
                raise TLSHandshakeError(*self._handshake_failed)
            if self._state is StreamState.CLOSED:
                raise trio.ClosedResourceError("TLS stream was closed")
            try:
                await self._handshake()
            except TLSHandshakeError as exc:
                self._handshake_failed = (exc.kind, exc.detail)
                self._on(_Event.HANDSHAKE_FAILED)
                raise
            except trio.BrokenResourceError as exc:
                error = TLSHandshakeError(_F.CONNECTION_LOST, str(exc) or None)
                self._handshake_failed = (error.kind, error.detail)
                self._on(_Event.HANDSHAKE_FAILED)
                raise error from exc
            self._info = self._make_info()
            self._on(_Event.HANDSHAKE_DONE)
            self._handshake_lock = None
        finally:
            lock.release()

    async def _handshake(self) -> None:
        conn = self._conn
        # The server speaks second: nothing to do before the ClientHello.
        while True:
            data = await self._receive_transport()
            if not data:
                raise TLSHandshakeError(_F.EOF, "connection closed during the handshake")
            conn.bio_write(data)
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                await self._flush()
                continue
            except SSL.Error as exc:
                error = _handshake_error(exc, self._notes)
                # Let the client see OpenSSL's alert, if the transport takes it.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._flush()
                raise error from None
            break
        if conn.get_protocol_version() < _TLS1_3:
            await self._flush()  # our Finished: the client waits for it
        # TLS 1.3's session tickets wait for the next send, or go out before
        # the next wait for the peer (`receive_some`), whichever comes first:
        # the client's first command usually comes with its Finished, so
        # the tickets leave with the reply to it, in one send instead of two.

    async def _ensure_handshake(self) -> None:
        try:
            await self.do_handshake()
        except TLSHandshakeError as exc:
            raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc

    def info(self) -> TLSInfo:
        """What the handshake negotiated. Raises trio.NeedHandshakeError before it."""
        if self._info is None:
            raise trio.NeedHandshakeError("the TLS handshake has not completed")
        return self._info

    def _make_info(self) -> TLSInfo:
        conn = self._conn
        notes = self._notes
        cipher = conn.get_cipher_name() or ""
        bits = conn.get_cipher_bits() or 0
        resumed = bool(_session_reused(conn._ssl))
        unparsable = False
        try:
            peer = conn.get_peer_certificate(as_cryptography=True)
            sent = conn.get_peer_cert_chain(as_cryptography=True) or []
        except ValueError:  # OpenSSL took it, cryptography cannot parse it
            peer, sent, unparsable = None, [], True
        chain: tuple[x509.Certificate, ...] = ()
        if peer is not None:
            chain = tuple(sent) if sent and sent[0] == peer else (peer, *sent)
        if peer is None:
            verified = False
            verify_error = "certificate cannot be parsed" if unparsable else None
        else:
            verified = notes.verify_called and notes.verify_error is None and not resumed
            verify_error = None if verified else (notes.verify_error or "not verified")
        name = conn.get_servername()
        return TLSInfo(
            version=conn.get_protocol_version_name(),
            cipher=cipher,
            bits=bits,
            alg_bits=168 if "DES-CBC3" in cipher else bits,
            peer_cert=peer,
            peer_chain=chain,
            verified=verified,
            verify_error=verify_error,
            resumed=resumed,
            server_name=name.decode("ascii", "replace") if name else None,
            cert_name=notes.cert_name,
        )

    # -- trio.abc.Stream -------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = RECEIVE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        conflict = self._receive_conflict
        if conflict.held:
            raise conflict.busy()
        conflict.held = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            state = self._state
            if state is not StreamState.OPEN and state is not StreamState.SEND_FAILED:
                if state is StreamState.HANDSHAKE:
                    await self._ensure_handshake()
                elif state is StreamState.PEER_CLOSED:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                else:
                    self._raise_unusable()
            # A transport read is a checkpoint; without one, take a checkpoint.
            awaited = False
            reader = self._reader
            while True:
                if not reader.drained:
                    data = self._decrypt(max_bytes)
                    if data is None:
                        break  # close_notify
                    if data:
                        if not awaited:
                            await trio.lowlevel.cancel_shielded_checkpoint()
                        return data
                # Before waiting on the peer, send what reading made OpenSSL
                # write (a KeyUpdate reply, an alert).
                self._pull()
                if self._outgoing:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await self._flush(wait=False)
                bulk = self._bulk
                size = None if bulk is None else self._receive_at_hand(bulk)
                ciphertext: bytes | bytearray
                if bulk is not None and size is not None:
                    ciphertext = bulk
                else:
                    ciphertext, size = await self._receive_ciphertext()
                    awaited = True
                if not size:
                    self._on(_Event.PEER_EOF)
                    break
                reader.take(ciphertext, size)
            if not awaited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return b""
        finally:
            conflict.held = False

    def _receive_at_hand(self, bulk: bytearray) -> int | None:
        """What the kernel holds now, into ``_bulk``; None (and the buffer
        goes) when it holds nothing."""
        assert self._receive_now is not None
        try:
            size = self._receive_now(bulk)
        except trio.ClosedResourceError:
            if self._state is StreamState.CLOSED:
                raise
            raise trio.BrokenResourceError("transport closed") from None
        if size is None:
            self._bulk = None
        return size

    async def _receive_ciphertext(self) -> tuple[bytes | bytearray, int]:
        """One transport read, which may wait; a full one starts bulk reads."""
        try:
            data = await self.transport_stream.receive_some(_CHUNK)
        except trio.ClosedResourceError:
            if self._state is StreamState.CLOSED:
                raise
            raise trio.BrokenResourceError("transport closed") from None
        if len(data) >= _CHUNK and self._receive_now is not None:
            self._bulk = bytearray(RECEIVE)
        return data, len(data)

    def _decrypt(self, max_bytes: int) -> bytes | None:
        """All the plaintext OpenSSL can give now, up to `max_bytes`; b"" if none.

        None: close_notify came, and no data before it (data before it is
        returned first; the stream has moved on, so the next call ends).
        """
        data, exc = self._reader.decrypt(max_bytes)
        if exc is None:
            return data
        if isinstance(exc, SSL.ZeroReturnError):  # close_notify
            self._on(_Event.PEER_EOF)
            return data or None
        self._on(_Event.TLS_ERROR)
        if not data:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        # Hand out what came before the error; the next call raises it.
        self._error = trio.BrokenResourceError(f"TLS error: {exc}")
        self._error.__cause__ = exc
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        conflict = self._send_conflict
        if conflict.held:
            raise conflict.busy()
        conflict.held = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            state = self._state
            if state is not StreamState.OPEN and state is not StreamState.PEER_CLOSED:
                if state is StreamState.HANDSHAKE:
                    await self._ensure_handshake()
                elif state is StreamState.SEND_FAILED:
                    raise trio.BrokenResourceError("an earlier send failed")
                else:
                    self._raise_unusable()
            view = memoryview(data).cast("B")
            size = len(view)
            if not size:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            send = self._conn.send
            for start in range(0, size, _CHUNK):
                # Encrypt a whole chunk, then send it in one go. The context
                # turns partial writes off (pyOpenSSL turns them on), so one
                # SSL_write takes the chunk; the loop is for older pyOpenSSL.
                chunk = view[start : start + _CHUNK] if size > _CHUNK else view
                try:
                    sent = send(chunk)
                    while sent < len(chunk):
                        chunk = chunk[sent:]
                        sent = send(chunk)
                except SSL.Error as exc:
                    self._on(_Event.TLS_ERROR)
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
                await self._flush()
        finally:
            conflict.held = False

    async def wait_send_all_might_not_block(self) -> None:
        conflict = self._send_conflict
        if conflict.held:
            raise conflict.busy()
        conflict.held = True
        try:
            if self._state in _FINAL:
                self._raise_unusable()
            try:
                await self.transport_stream.wait_send_all_might_not_block()
            except trio.ClosedResourceError:
                if self._state is StreamState.CLOSED:
                    raise
                raise trio.BrokenResourceError("transport closed") from None
        finally:
            conflict.held = False

    async def aclose(self) -> None:
        """Send close_notify if that can be done quickly, then close the transport.

        Never waits for the peer's close_notify; sending ours is bounded by
        `_CLOSE_NOTIFY_TIMEOUT` (and by the caller's cancel scope).
        """
        state = self._state
        if state is StreamState.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        self._state = StreamState.CLOSED
        try:
            can_send = state is StreamState.OPEN or state is StreamState.PEER_CLOSED
            if can_send and not self._flushing:
                with contextlib.suppress(SSL.Error):
                    self._conn.shutdown()
                with (
                    trio.move_on_after(_CLOSE_NOTIFY_TIMEOUT),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    await self._flush()
        finally:
            await self.transport_stream.aclose()
