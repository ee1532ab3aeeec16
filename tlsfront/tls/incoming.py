"""The receiving half of a TLS stream: ciphertext in, plaintext out.

`tlsfront.tls.stream.TLSStream` reads ciphertext from its transport and
hands it to a `Reader`, which feeds it to OpenSSL and takes the plaintext
out; the stream keeps the state and the errors' meaning.

Theory of operation
-------------------

A message body arrives as 16 KB TLS records, sixteen to a 256 KiB
transport read. pyOpenSSL's `Connection.recv` costs, for each one, a
buffer allocated and copied out into a new bytes object, and, when OpenSSL
has taken the last whole record of what it was fed, a `WantReadError`
raised and caught: a few microseconds of interpreter work per record,
more than the decryption itself. The `Reader` calls the same OpenSSL
functions, SSL_read, SSL_get_error and BIO_write, through the same cffi
bindings pyOpenSSL uses, and reads "wants more ciphertext" from
SSL_get_error's return value rather than from an exception. Every record
is decrypted into one plaintext buffer per thread, at its end, and the
caller gets one bytes object: one copy, however many records. Only the
rare outcomes (close_notify, a TLS error) go through pyOpenSSL, which
raises its usual exceptions for them. The Reader can also work through
pyOpenSSL's public `recv_into` and `bio_write` (`use_bindings = False`),
with the same results, more slowly: the tests run both, the public path as
the reference for the fast one.

The plaintext buffer is shared by every stream of the thread (trio runs a
server's sessions in one thread): it holds plaintext only between the
SSL_read that writes it and the copy out, within one call and no wait.

OpenSSL's memory BIO keeps the largest size it ever held, so ciphertext
goes in a record's worth at a time (`FEED`), each slice once OpenSSL has
taken the one before: fed whole 256 KiB transport reads, every connection
that ever received a large message would keep about 256 kB; fed in
slices, about 20 kB.
"""

from __future__ import annotations

import threading
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

__all__ = ["FEED", "RECEIVE", "Reader", "use_bindings"]

RECEIVE = 256 * 1024  # the most plaintext one `decrypt` returns
RECORD = 16384  # the most plaintext one TLS record holds
FEED = RECORD + 512  # ciphertext per write into OpenSSL's incoming BIO

_SSL_read: Any = _lib.SSL_read
_SSL_get_error: Any = _lib.SSL_get_error
_BIO_write: Any = _lib.BIO_write
_from_buffer: Any = _ffi.from_buffer
_WANT_READ: int = _lib.SSL_ERROR_WANT_READ

# Whether new Readers call OpenSSL through the bindings (the tests turn it
# off to run the public path too).
use_bindings = True


class _Plain(threading.local):
    """The thread's plaintext buffer, and its address for SSL_read."""

    def __init__(self) -> None:
        self.buffer = bytearray(RECEIVE)
        self.view = memoryview(self.buffer)
        self.address: Any = _from_buffer(self.buffer)


_plain = _Plain()


class Reader:
    """Feeds one connection's ciphertext to OpenSSL and takes its plaintext out.

    `take` hands it what the transport read; `decrypt` returns the plaintext
    OpenSSL can give from it. `drained`: OpenSSL has nothing more to give
    until more ciphertext comes (everything taken has been fed).
    """

    # One per TLS session: no per-instance dict.
    __slots__ = ("_address", "_conn", "_fed", "_rbio", "_size", "_ssl", "_taken", "drained")

    def __init__(self, conn: SSL.Connection) -> None:
        self._conn = conn
        ssl = getattr(conn, "_ssl", None)
        rbio = getattr(conn, "_into_ssl", None)
        direct = use_bindings and ssl is not None and rbio is not None
        self._ssl: Any = ssl if direct else None
        self._rbio: Any = rbio if direct else None
        # Read from the transport (its address for BIO_write), and how much
        # of it is fed. The handshake may have left records in OpenSSL, so
        # the first `decrypt` asks before anything.
        self._taken: bytes | bytearray | None = None
        self._size = 0
        self._address: Any = None
        self._fed = 0
        self.drained = False

    def take(self, ciphertext: bytes | bytearray, size: int) -> None:
        """The first `size` bytes of `ciphertext` are read from the transport;
        `decrypt` feeds them as it goes. Only when `drained`: what was taken
        before has all been fed.

        (A bytes or bytearray, not a view of one: the address BIO_write is
        given holds the buffer, and a memoryview in a reference cycle could
        be released by the garbage collector before that address.)
        """
        self._taken = ciphertext
        self._size = size
        self._fed = 0
        if self._ssl is not None:
            self._address = _from_buffer(ciphertext)
        self.drained = False

    def decrypt(self, max_bytes: int) -> tuple[bytes, SSL.Error | None]:
        """The plaintext OpenSSL can give now, up to `max_bytes` (and `RECEIVE`).

        Reads record after record, feeding ciphertext as OpenSSL asks for
        it, until it wants more than there is. An error (`SSL.ZeroReturnError`
        for close_notify) is returned beside the plaintext that came before
        it; nothing more is fed after it.
        """
        limit = min(max_bytes, RECEIVE)
        taken = self._taken
        size = self._size
        fed = self._fed
        got = 0
        error = None
        try:
            ssl = self._ssl
            if ssl is not None:
                output = _plain.address
                rbio = self._rbio
                address = self._address
                while got < limit:
                    n = _SSL_read(ssl, output + got, limit - got)
                    if n > 0:
                        got += n
                        continue
                    if _SSL_get_error(ssl, n) != _WANT_READ:
                        # Let pyOpenSSL say what it is, with its exception.
                        self._conn.recv(1)
                        raise SSL.Error("SSL_read failed")  # pragma: no cover
                    if fed >= size:
                        self.drained = True
                        break
                    n = min(FEED, size - fed)
                    if _BIO_write(rbio, address + fed, n) != n:  # out of memory
                        raise SSL.Error("BIO_write failed")
                    fed += n
            else:
                view = _plain.view
                recv_into = self._conn.recv_into
                while got < limit:
                    try:
                        got += recv_into(view[got:limit])
                    except SSL.WantReadError:
                        if fed >= size:
                            self.drained = True
                            break
                        assert taken is not None
                        piece = min(FEED, size - fed)
                        self._conn.bio_write(memoryview(taken)[fed : fed + piece])
                        fed += piece
        except SSL.Error as exc:
            error = exc
            fed = size  # nothing more is fed after an error
        if fed >= size:
            self._taken = self._address = None
            fed = self._size = 0
        self._fed = fed
        return bytes(_plain.view[:got]), error
