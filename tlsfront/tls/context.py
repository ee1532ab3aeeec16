"""TLS contexts: what a profile's TLS settings become, at configuration time.

Together with `tlsfront.tls.stream` (the run-time half) this is where
tlsfront's server side meets its TLS library: OpenSSL, through pyOpenSSL.
Nothing outside `tlsfront.tls` imports a TLS library.

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
built, so every configuration error (versions, cipher strings, certificates
and keys, one certificate per key type, client CA and CRL files, DH
parameters) shows at start-up as a `TLSConfigError` naming the setting. A
reload builds a new `ServerTLS`; sessions keep the one they started with.
`ServerTLS.wrap` makes a `TLSStream` per accepted connection.

Client certificates: the context-wide verify callback finds the connection's
`HandshakeNotes` through its app data and records the first error OpenSSL
reports. ``request`` returns True for every certificate; ``require`` returns
OpenSSL's verdict and refuses connections without a certificate. The
callback clears OpenSSL's own verdict when it says yes, so a session's
verification result lives only in the notes. Session resumption would skip
verification and leave no result, so ``request``/``require`` profiles turn
the session cache and tickets off. Other profiles keep tickets on.

Certificates by server name (SNI): each name of `TLSSettings.by_name` gets
a context of its own, built like the default one with that name's
certificates. The default context's server-name callback reads the name
the client sent, picks the entry (`tlsfront.tls.sni.choose`: exact name,
wildcard, default), switches the connection to its context and notes the
entry's name for the session's log line.

Whether a handshake was resumed is learned from the info callback: a full
handshake passes through the "write certificate" state, a resumed one does not.
Profiles that cannot resume have no info callback; their handshakes are full.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

from .certs import CertError, ServerCredentials, load_ca_bundle, load_crls
from .sni import DEFAULT, choose, server_name
from .stream import HandshakeNotes, TLSStream

__all__ = [
    "DEFAULT_CIPHERS",
    "ServerTLS",
    "TLSConfigError",
    "TLSSettings",
    "issued_by_trusted_root",
    "non_forward_secret",
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

# pyOpenSSL's contexts allow SSL_write to return after one record; not
# exported by name (the value is fixed by OpenSSL's API).
_MODE_ENABLE_PARTIAL_WRITE = 0x1


@dataclass(frozen=True)
class TLSSettings:
    credentials: tuple[ServerCredentials, ...]  # one per key type (RSA, ECDSA, ...)
    # other certificates by server name ("mail.example.org", "*.example.net")
    by_name: Mapping[str, tuple[ServerCredentials, ...]] = field(default_factory=dict)
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


# ----------------------------------------------------------------------------
# The callbacks


def _notes(conn: SSL.Connection) -> HandshakeNotes:
    data = conn.get_app_data()
    assert isinstance(data, HandshakeNotes)
    return data


def _make_verify_callback(
    require: bool,
) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
    def callback(conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        notes = _notes(conn)
        notes.verify_called = True
        if not ok and notes.verify_error is None:
            notes.verify_error = _verify_reason(errnum)
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


# ----------------------------------------------------------------------------
# The context


class ServerTLS:
    """A server-side TLS context built from `TLSSettings`; wraps accepted streams."""

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self._context = self._build(settings)
        self._by_name: dict[str, SSL.Context] = {}
        for name, credentials in settings.by_name.items():
            try:
                self._by_name[name] = self._build(replace(settings, credentials=credentials))
            except TLSConfigError as exc:
                raise TLSConfigError(exc.setting, f"server name {name}: {exc.message}") from None
        if self._by_name:
            self._context.set_tlsext_servername_callback(self._choose)

    def _choose(self, conn: SSL.Connection) -> None:
        """The server-name callback: the certificates for the name the client sent."""
        name = choose(self._by_name, server_name(conn.get_servername()))
        _notes(conn).cert_name = name
        if name != DEFAULT:
            conn.set_context(self._by_name[name])

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
        notes = HandshakeNotes()
        if self._by_name:
            notes.cert_name = DEFAULT  # until the server-name callback chooses
        conn.set_app_data(notes)
        return TLSStream(transport, conn, notes)


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


# -- questions `tlsfront check` asks of the TLS library ------------------------------


def issued_by_trusted_root(leaf: x509.Certificate) -> bool:
    """Whether this host's trust store (OpenSSL's default paths, `SSL_CERT_FILE`)
    completes `leaf`'s chain with a root alone: nothing in between is missing."""
    ssl_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ssl_context.set_default_verify_paths()
    store = ssl_context.get_cert_store()
    if store is None:
        return False
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf))
    try:
        chain = context.get_verified_chain()
    except crypto.X509StoreContextError:
        return False
    return len(chain) == 2


def non_forward_secret(ciphers: str) -> list[str]:
    """The suites a TLS <= 1.2 cipher string enables without forward secrecy
    (RSA key exchange) or without authentication (anonymous DH). PSK and SRP
    suites are left out: without their callbacks they are never chosen."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        ctx.set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        return []  # refused when the context is built, with its own message
    names = SSL.Connection(ctx, None).get_cipher_list()
    weak = []
    for name in names:
        if name.startswith(("TLS_", "SRP-")) or "PSK" in name:  # TLS 1.3 or never chosen
            continue
        if name.startswith(("ADH-", "AECDH-")) or not name.startswith(("ECDHE-", "DHE-")):
            weak.append(name)
    return weak
