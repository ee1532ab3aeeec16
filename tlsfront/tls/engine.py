"""The TLS engine: OpenSSL, through pyOpenSSL, behind a trio stream.

This is the only module that knows which TLS library tlsfront uses.

Why not the standard library: a profile with ``client_cert = "request"`` asks
every client for a certificate and must never fail a handshake over the answer.
Sending MTAs present whatever certificate they have (their own CA, self-signed,
expired); they must still get TLS, with the outcome recorded for the relay
decision. Python's ``ssl`` module aborts the handshake on any certificate it
cannot verify and has no verify callback. OpenSSL's verify callback lets us
note the first error and carry on.

Theory of operation
-------------------

`ServerTLS` turns `TLSSettings` into one `OpenSSL.SSL.Context` when it is
built (so configuration errors show at start-up) and wraps accepted
connections. Each `TLSStream` drives an `SSL.Connection` whose socket is a pair
of memory BIOs: ciphertext from the transport goes in with ``bio_write``,
ciphertext OpenSSL produces comes out with ``bio_read``. OpenSSL never touches
a file descriptor, so all I/O is trio's and every wait is cancellable.

Outgoing ciphertext has one queue (OpenSSL's outgoing BIO, drained into
``_outgoing``) and one sender at a time (``_flushing``). The sender keeps
sending until the queue is empty, so bytes leave in the order OpenSSL
produced them, even with one task reading and another writing at once (in
the proxy: the client reader, and the backend reader sending the replies
it got). A reader that produced
ciphertext while a writer sends leaves it in the queue for the writer; a
writer that finds the reader sending waits for it (``_flush_done``, an Event
made only then). `send_all` encrypts 64 KiB per SSL_write (partial writes
off) and sends the result in one transport send.

Incoming ciphertext is read only by the handshake (under ``_handshake_lock``,
dropped once it is done) and afterwards by `receive_some`, at most 64 KiB per
transport read, fed to OpenSSL a record's worth at a time (`_feed`: memory
BIOs never shrink). `receive_some` hands out all the plaintext OpenSSL can
give, up to max_bytes, not one 16 KB record per call; ``_drained`` remembers
that OpenSSL has nothing more, so the next call goes straight to the
transport. A TLS error behind good records is raised by the call after the
one that returns them. Renegotiation is disabled, so writing never needs to
read.

Client certificates: the context-wide verify callback finds the stream's
`_Outcome` through the connection's app data and records the first error
OpenSSL reports. ``request`` returns True for every certificate; ``require``
returns OpenSSL's verdict and refuses connections without a certificate. The
callback clears OpenSSL's own verdict when it says yes, so a session's
verification result lives only in `_Outcome`. Session resumption would skip
verification and leave no outcome, so ``request``/``require`` profiles turn
the session cache and tickets off. Other profiles keep tickets on.

Whether a handshake was resumed is learned from the info callback: a full
handshake passes through the "write certificate" state, a resumed one does not.
Profiles that cannot resume have no info callback; their handshakes are full.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

from .certs import CertError, ServerCredentials, load_ca_bundle, load_crls

__all__ = [
    "DEFAULT_CIPHERS",
    "HandshakeFailure",
    "ServerTLS",
    "TLSConfigError",
    "TLSHandshakeError",
    "TLSInfo",
    "TLSSettings",
    "TLSStream",
]

# Forward-secret AEAD suites only, for TLS 1.2 (TLS 1.3 suites are all AEAD).
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_DHE_CIPHERS = "DHE+AESGCM:DHE+CHACHA20"
# Added to the default when min_version is below TLS 1.2: those clients have
# no AEAD suites, and an admin who lowers the minimum wants them served.
_LEGACY_CIPHERS = "ECDHE+AES+SHA"
_CIPHER_TAIL = ":!aNULL:!eNULL:!DSS"

_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}

_CHUNK = 65536  # bytes per transport read and per SSL_write
_RECORD = 16384  # the most plaintext one SSL_read returns (a TLS record)
_FEED = _RECORD + 512  # ciphertext per write into OpenSSL's incoming BIO (see _feed)
# Bytes per read of OpenSSL's outgoing BIO: one SSL_write of a chunk, with
# its record overhead, comes out in one read.
_PULL = _CHUNK + 8192
# pyOpenSSL's contexts allow SSL_write to return after one record; not
# exported by name (the value is fixed by OpenSSL's API).
_MODE_ENABLE_PARTIAL_WRITE = 0x1
_CLOSE_NOTIFY_TIMEOUT = 5.0  # seconds aclose() spends on a best-effort close_notify
_FULL_HANDSHAKE_STATE = b"SSLv3/TLS write certificate"


@dataclass(frozen=True)
class TLSSettings:
    credentials: tuple[ServerCredentials, ...]  # one per key type (RSA, ECDSA, ...)
    # "TLSv1" .. "TLSv1.3". Below TLSv1.2 OpenSSL needs security level 0:
    # ":@SECLEVEL=0" is added to the cipher string unless it sets a level.
    min_version: str = "TLSv1.2"
    # None = DEFAULT_CIPHERS (+ DHE with dhparams, + ECDHE CBC below TLSv1.2)
    ciphers: str | None = None
    ciphersuites: str | None = None  # TLS 1.3; None = OpenSSL's default
    dhparams: Path | None = None
    client_cert: Literal["none", "request", "require"] = "none"
    client_ca: Path | None = None
    client_crl: Path | None = None


class TLSConfigError(Exception):
    """Settings that cannot become a TLS context; str(err) names the setting/file."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


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


@dataclass(frozen=True)
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


# ----------------------------------------------------------------------------
# OpenSSL's verdicts in words

_V = SSL.X509VerificationCodes
_VERIFY_REASONS = {
    _V.ERR_UNABLE_TO_GET_ISSUER_CERT: "unable to get issuer certificate",
    _V.ERR_UNABLE_TO_GET_CRL: "unable to get certificate CRL",
    _V.ERR_UNABLE_TO_DECRYPT_CERT_SIGNATURE: "unable to decrypt certificate's signature",
    _V.ERR_UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY: "unable to decode issuer public key",
    _V.ERR_CERT_SIGNATURE_FAILURE: "certificate signature failure",
    _V.ERR_CRL_SIGNATURE_FAILURE: "CRL signature failure",
    _V.ERR_CERT_NOT_YET_VALID: "certificate is not yet valid",
    _V.ERR_CERT_HAS_EXPIRED: "certificate has expired",
    _V.ERR_CRL_NOT_YET_VALID: "CRL is not yet valid",
    _V.ERR_CRL_HAS_EXPIRED: "CRL has expired",
    _V.ERR_ERROR_IN_CERT_NOT_BEFORE_FIELD: "format error in certificate's notBefore field",
    _V.ERR_ERROR_IN_CERT_NOT_AFTER_FIELD: "format error in certificate's notAfter field",
    _V.ERR_DEPTH_ZERO_SELF_SIGNED_CERT: "self-signed certificate",
    _V.ERR_SELF_SIGNED_CERT_IN_CHAIN: "self-signed certificate in certificate chain",
    _V.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "unable to get local issuer certificate",
    _V.ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE: "unable to verify the first certificate",
    _V.ERR_CERT_CHAIN_TOO_LONG: "certificate chain too long",
    _V.ERR_CERT_REVOKED: "certificate revoked",
    _V.ERR_INVALID_CA: "invalid CA certificate",
    _V.ERR_PATH_LENGTH_EXCEEDED: "path length constraint exceeded",
    _V.ERR_INVALID_PURPOSE: "unsupported certificate purpose",
    _V.ERR_CERT_UNTRUSTED: "certificate not trusted",
    _V.ERR_CERT_REJECTED: "certificate rejected",
    _V.ERR_KEYUSAGE_NO_CERTSIGN: "key usage does not include certificate signing",
    _V.ERR_UNABLE_TO_GET_CRL_ISSUER: "unable to get CRL issuer certificate",
    _V.ERR_UNHANDLED_CRITICAL_EXTENSION: "unhandled critical extension",
    _V.ERR_KEYUSAGE_NO_CRL_SIGN: "key usage does not include CRL signing",
    _V.ERR_UNHANDLED_CRITICAL_CRL_EXTENSION: "unhandled critical CRL extension",
    _V.ERR_INVALID_NON_CA: "invalid non-CA certificate (has CA markings)",
    _V.ERR_KEYUSAGE_NO_DIGITAL_SIGNATURE: "key usage does not include digital signature",
    _V.ERR_INVALID_EXTENSION: "invalid or inconsistent certificate extension",
    _V.ERR_PERMITTED_VIOLATION: "permitted subtree violation",
    _V.ERR_EXCLUDED_VIOLATION: "excluded subtree violation",
    _V.ERR_DIFFERENT_CRL_SCOPE: "different CRL scope",
}


def _verify_reason(errnum: int) -> str:
    return _VERIFY_REASONS.get(errnum, f"error {errnum}")


# OpenSSL reason text -> why, in our terms
_F = HandshakeFailure
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


def _handshake_error(exc: SSL.Error, outcome: _Outcome) -> TLSHandshakeError:
    if isinstance(exc, SSL.SysCallError):
        return TLSHandshakeError(_F.EOF, "unexpected EOF")
    texts = []
    if exc.args and isinstance(exc.args[0], list):
        texts = [str(e[2]) for e in exc.args[0] if isinstance(e, tuple) and len(e) >= 3]
    detail = texts[0] if texts else (str(exc) or type(exc).__name__)
    for needle, kind in _HANDSHAKE_REASONS:
        if needle in detail:
            if kind is _F.PEER_CERTIFICATE_REJECTED and outcome.verify_error:
                detail = outcome.verify_error
            return TLSHandshakeError(kind, detail)
    return TLSHandshakeError(_F.OTHER, detail)


# ----------------------------------------------------------------------------
# The context


class _Outcome:
    """Per-connection notes the OpenSSL callbacks take."""

    __slots__ = ("full_handshake", "verify_called", "verify_error")

    def __init__(self, full_handshake: bool) -> None:
        self.verify_called = False
        self.verify_error: str | None = None
        self.full_handshake = full_handshake


def _outcome(conn: SSL.Connection) -> _Outcome:
    data = conn.get_app_data()
    assert isinstance(data, _Outcome)
    return data


def _info_callback(conn: SSL.Connection, where: int, ret: int) -> None:
    if where & SSL.SSL_CB_LOOP and conn.get_state_string() == _FULL_HANDSHAKE_STATE:
        _outcome(conn).full_handshake = True


def _make_verify_callback(
    require: bool,
) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
    def callback(conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        outcome = _outcome(conn)
        outcome.verify_called = True
        if not ok and outcome.verify_error is None:
            outcome.verify_error = _verify_reason(errnum)
        return bool(ok) if require else True

    return callback


_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


def _key_kind(creds: ServerCredentials) -> str:
    """OpenSSL keeps one certificate per kind of key."""
    for cls, kind in zip(_KEY_TYPES, ("RSA", "ECDSA", "Ed25519", "Ed448"), strict=True):
        if isinstance(creds.key, cls):
            return kind
    raise TLSConfigError("key", f"{creds.key_path}: unsupported key type")


def _use_credentials(ctx: SSL.Context, creds: ServerCredentials) -> None:
    key = creds.key
    if not isinstance(key, _KEY_TYPES):
        raise TLSConfigError("key", f"{creds.key_path}: unsupported key type")
    try:
        if len(creds.chain) == 1:
            ctx.use_certificate(creds.chain[0])
        else:
            # pyOpenSSL can set a per-certificate chain only from a file; with
            # RSA and ECDSA certificates each must keep its own intermediates.
            pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in creds.chain)
            with tempfile.TemporaryDirectory(prefix="tlsfront-") as tmp:
                chain_file = Path(tmp, "chain.pem")
                chain_file.write_bytes(pem)
                ctx.use_certificate_chain_file(str(chain_file))
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except (SSL.Error, OSError) as exc:
        raise TLSConfigError("cert", f"{creds.cert_path}: cannot use: {exc}") from None


def _cipher_string(settings: TLSSettings) -> str:
    if settings.ciphers is not None:
        ciphers = settings.ciphers
    else:
        ciphers = DEFAULT_CIPHERS
        if settings.dhparams is not None:
            ciphers += ":" + _DHE_CIPHERS
        if _VERSIONS[settings.min_version] < SSL.TLS1_2_VERSION:
            ciphers += ":" + _LEGACY_CIPHERS
        ciphers += _CIPHER_TAIL
    # OpenSSL only speaks TLS 1.0/1.1 at security level 0.
    if _VERSIONS[settings.min_version] < SSL.TLS1_2_VERSION and "@SECLEVEL" not in ciphers:
        ciphers += ":@SECLEVEL=0"
    return ciphers


def _session_id_context(settings: TLSSettings) -> bytes:
    """Sessions belong to one set of certificates and policy."""
    h = hashlib.sha256(b"tlsfront")
    for creds in settings.credentials:
        h.update(creds.chain[0].fingerprint(hashes.SHA256()))
    policy = (settings.min_version, settings.ciphers, settings.ciphersuites, settings.client_cert)
    h.update(repr(policy).encode())
    return h.digest()[:32]  # SSL_MAX_SID_CTX_LENGTH


class ServerTLS:
    """A server-side TLS context built from `TLSSettings`; wraps accepted streams."""

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self._context = self._build(settings)
        # Profiles that ask for a certificate never resume (see _build).
        self._always_full = settings.client_cert != "none"

    @staticmethod
    def _build(settings: TLSSettings) -> SSL.Context:
        if not settings.credentials:
            raise TLSConfigError("cert", "no certificate configured")
        if settings.min_version not in _VERSIONS:
            raise TLSConfigError("min_tls_version", f"unknown version {settings.min_version!r}")
        if settings.client_cert not in ("none", "request", "require"):
            raise TLSConfigError("client_cert", f"unknown mode {settings.client_cert!r}")
        if settings.client_cert == "require" and settings.client_ca is None:
            raise TLSConfigError("client_ca", "client_cert = 'require' needs client_ca")
        asks_cert = settings.client_cert != "none"
        if asks_cert and settings.client_crl is not None and settings.client_ca is None:
            raise TLSConfigError("client_crl", "needs client_ca")

        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(_VERSIONS[settings.min_version])
        options = (
            SSL.OP_NO_SSLv2
            | SSL.OP_NO_SSLv3
            | SSL.OP_NO_COMPRESSION
            | SSL.OP_CIPHER_SERVER_PREFERENCE
            | SSL.OP_NO_RENEGOTIATION
        )
        if asks_cert:
            options |= SSL.OP_NO_TICKET
        ctx.set_options(options)

        ciphers = _cipher_string(settings)
        try:
            ctx.set_cipher_list(ciphers.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError):
            raise TLSConfigError("ciphers", f"no usable cipher in {ciphers!r}") from None
        if settings.ciphersuites is not None:
            try:
                ctx.set_tls13_ciphersuites(settings.ciphersuites.encode("ascii"))
            except (SSL.Error, UnicodeEncodeError):
                raise TLSConfigError(
                    "ciphersuites", f"no usable TLS 1.3 suite in {settings.ciphersuites!r}"
                ) from None
        if settings.dhparams is not None:
            try:
                with settings.dhparams.open("rb"):
                    pass
                ctx.load_tmp_dh(str(settings.dhparams))
            except OSError as exc:
                raise TLSConfigError(
                    "dhparams", f"{settings.dhparams}: cannot read: {exc.strerror or exc}"
                ) from None
            except SSL.Error:
                raise TLSConfigError(
                    "dhparams", f"{settings.dhparams}: no PEM DH parameters"
                ) from None

        seen_types: set[str] = set()
        for creds in settings.credentials:
            kind = _key_kind(creds)
            if kind in seen_types:
                raise TLSConfigError("cert", f"{creds.cert_path}: a second {kind} certificate")
            seen_types.add(kind)
            _use_credentials(ctx, creds)

        if asks_cert:
            _configure_client_auth(ctx, settings)
        ctx.set_session_id(_session_id_context(settings))
        if not asks_cert:
            # ~20 calls into Python per handshake: only where it can resume.
            ctx.set_info_callback(_info_callback)
        # Free a connection's read and write buffers (about 34 KB) while it
        # idles: most of a mail server's connections wait for the next command.
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        # One SSL_write per chunk rather than one per 16 KB record. A memory
        # BIO never refuses a write, so SSL_write never stops half-way.
        ctx.clear_mode(_MODE_ENABLE_PARTIAL_WRITE)
        return ctx

    def wrap(self, transport: trio.abc.Stream) -> TLSStream:
        conn = SSL.Connection(self._context, None)
        conn.set_accept_state()
        outcome = _Outcome(full_handshake=self._always_full)
        conn.set_app_data(outcome)
        return TLSStream(transport, conn, outcome)


def _configure_client_auth(ctx: SSL.Context, settings: TLSSettings) -> None:
    store = ctx.get_cert_store()
    assert store is not None
    if settings.client_ca is not None:
        try:
            cas = load_ca_bundle(settings.client_ca)
        except CertError as exc:
            raise TLSConfigError("client_ca", str(exc)) from None
        for ca in cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
            ctx.add_client_ca(ca)
    if settings.client_crl is not None:
        try:
            crls = load_crls(settings.client_crl)
        except CertError as exc:
            raise TLSConfigError("client_crl", str(exc)) from None
        for crl in crls:
            store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    mode = SSL.VERIFY_PEER
    if settings.client_cert == "require":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode, _make_verify_callback(settings.client_cert == "require"))
    # A resumed session skips verification: no cache, no tickets.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)


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
        "_broken",
        "_closed",
        "_conn",
        "_drained",
        "_eof",
        "_error",
        "_flush_done",
        "_flushing",
        "_handshake_done",
        "_handshake_failed",
        "_handshake_lock",
        "_info",
        "_outcome",
        "_outgoing",
        "_receiving",
        "_send_broken",
        "_sending",
        "_unfed",
        "transport_stream",
    )

    def __init__(self, transport: trio.abc.Stream, conn: SSL.Connection, outcome: _Outcome):
        self.transport_stream = transport
        self._conn = conn
        self._outcome = outcome
        self._handshake_lock: trio.Lock | None = trio.Lock()  # dropped once the handshake is done
        self._outgoing: list[bytes] = []
        self._flushing = False  # a task is sending the outgoing queue
        self._flush_done: trio.Event | None = None  # made only when a second sender waits
        self._handshake_done = False
        self._handshake_failed: TLSHandshakeError | None = None
        self._closed = False
        self._broken = False  # TLS state unusable (failed handshake, TLS error)
        self._error: trio.BrokenResourceError | None = None  # TLS error behind returned data
        self._send_broken = False  # a transport send failed or was cancelled mid-way
        self._eof = False  # close_notify or transport EOF seen
        self._unfed: memoryview | None = None  # read from the transport, not yet fed
        self._drained = False  # recv said WantRead since the last bio_write, nothing unfed
        self._receiving = False
        self._sending = False
        self._info: TLSInfo | None = None

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
                if self._send_broken:
                    outgoing.clear()
                    raise trio.BrokenResourceError("an earlier send failed")
                data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
                outgoing.clear()
                try:
                    await self.transport_stream.send_all(data)
                except trio.ClosedResourceError:
                    self._send_broken = True
                    if self._closed:
                        raise
                    raise trio.BrokenResourceError("transport closed") from None
                except BaseException:
                    # Part of a record may be out: nothing more can follow it.
                    self._send_broken = True
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
            if self._closed:
                raise
            raise trio.BrokenResourceError("transport closed") from None

    def _raise_unusable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream was closed")
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._broken:
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
        async with lock:
            if self._handshake_done:
                return
            if self._handshake_failed is not None:
                failed = self._handshake_failed
                raise TLSHandshakeError(failed.kind, failed.detail)
            if self._closed:
                raise trio.ClosedResourceError("TLS stream was closed")
            try:
                await self._handshake()
            except TLSHandshakeError as exc:
                self._handshake_failed = exc
                self._broken = True
                raise
            except trio.BrokenResourceError as exc:
                self._broken = True
                error = TLSHandshakeError(_F.CONNECTION_LOST, str(exc) or None)
                self._handshake_failed = error
                raise error from exc
            self._handshake_done = True
            self._handshake_lock = None

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
                error = _handshake_error(exc, self._outcome)
                # Let the client see OpenSSL's alert, if the transport takes it.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._flush()
                raise error from None
            break
        await self._flush()  # our Finished / TLS 1.3 session tickets

    async def _ensure_handshake(self) -> None:
        if self._handshake_done:
            return
        try:
            await self.do_handshake()
        except TLSHandshakeError as exc:
            raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc

    def info(self) -> TLSInfo:
        """What the handshake negotiated. Raises trio.NeedHandshakeError before it."""
        if not self._handshake_done:
            raise trio.NeedHandshakeError("the TLS handshake has not completed")
        if self._info is None:
            self._info = self._make_info()
        return self._info

    def _make_info(self) -> TLSInfo:
        conn = self._conn
        outcome = self._outcome
        cipher = conn.get_cipher_name() or ""
        bits = conn.get_cipher_bits() or 0
        resumed = not outcome.full_handshake
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
            verified = outcome.verify_called and outcome.verify_error is None and not resumed
            verify_error = None if verified else (outcome.verify_error or "not verified")
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
        )

    # -- trio.abc.Stream -------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = _CHUNK
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed or self._broken:
                self._raise_unusable()
            if not self._handshake_done:
                await self._ensure_handshake()
            # A transport read is a checkpoint; without one, take a checkpoint.
            awaited = False
            while not self._eof:
                if not self._drained:
                    data = self._decrypt(max_bytes)
                    if data:
                        if not awaited:
                            await trio.lowlevel.cancel_shielded_checkpoint()
                        return data
                    if self._eof:
                        break
                # Before waiting on the peer, send what reading made OpenSSL
                # write (a KeyUpdate reply, an alert).
                self._pull()
                if self._outgoing:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await self._flush(wait=False)
                try:
                    ciphertext = await self.transport_stream.receive_some(_CHUNK)
                except trio.ClosedResourceError:
                    if self._closed:
                        raise
                    raise trio.BrokenResourceError("transport closed") from None
                awaited = True
                if not ciphertext:
                    self._eof = True
                    break
                self._unfed = memoryview(ciphertext)
                self._feed()
                self._drained = False
            if not awaited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return b""
        finally:
            self._receiving = False

    def _feed(self) -> None:
        """Give OpenSSL the next slice of the ciphertext read from the transport.

        A memory BIO keeps the largest size it ever held: fed whole 64 KiB
        transport reads, each connection would keep ~85 kB after its first
        large message. Slices of about a record, each fed once OpenSSL has
        taken the last one, keep that near 20 kB.
        """
        unfed = self._unfed
        assert unfed is not None
        self._conn.bio_write(unfed[:_FEED])
        self._unfed = unfed[_FEED:] if len(unfed) > _FEED else None

    def _decrypt(self, max_bytes: int) -> bytes:
        """All the plaintext OpenSSL can give now, up to `max_bytes`; b"" if none.

        SSL_read returns one record at a time: take them all, so that a
        64 KiB transport read is one chunk for the caller, not four.
        """
        recv = self._conn.recv
        pieces: list[bytes] = []
        try:
            while max_bytes:
                try:
                    data = recv(min(max_bytes, _RECORD))
                except SSL.WantReadError:
                    if self._unfed is None:
                        self._drained = True
                        break
                    self._feed()
                    continue
                pieces.append(data)
                max_bytes -= len(data)
        except SSL.ZeroReturnError:  # close_notify
            self._eof = True
        except SSL.Error as exc:
            self._broken = True
            if not pieces:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            # Hand out what came before the error; the next call raises it.
            self._error = trio.BrokenResourceError(f"TLS error: {exc}")
            self._error.__cause__ = exc
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed or self._broken:
                self._raise_unusable()
            if not self._handshake_done:
                await self._ensure_handshake()
            if self._send_broken:
                raise trio.BrokenResourceError("an earlier send failed")
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
                    self._broken = True
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
                await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._sending = True
        try:
            if self._closed or self._broken:
                self._raise_unusable()
            try:
                await self.transport_stream.wait_send_all_might_not_block()
            except trio.ClosedResourceError:
                if self._closed:
                    raise
                raise trio.BrokenResourceError("transport closed") from None
        finally:
            self._sending = False

    async def aclose(self) -> None:
        """Send close_notify if that can be done quickly, then close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            usable = not (self._broken or self._send_broken or self._flushing)
            if self._handshake_done and usable:
                with contextlib.suppress(SSL.Error):
                    self._conn.shutdown()
                with (
                    trio.move_on_after(_CLOSE_NOTIFY_TIMEOUT),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    await self._flush()
        finally:
            await self.transport_stream.aclose()
