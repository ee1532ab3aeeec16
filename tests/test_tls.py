"""tlsfront.tls.context and tlsfront.tls.stream: OpenSSL behind a trio stream.

The client side is Python's ssl module (trio.SSLStream), so every handshake
here is checked against a TLS implementation we did not write; one test uses
`openssl s_client`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from support.tls_certs import DAY, NOW, Issued, crl_pem, from_trustme, issue, make_crl

import tlsfront
from tlsfront.net.netstream import NetStream
from tlsfront.tls import incoming
from tlsfront.tls.certs import ServerCredentials, load_server_credentials
from tlsfront.tls.context import ServerTLS, TLSConfigError, TLSSettings
from tlsfront.tls.stream import StreamState, TLSHandshakeError, TLSStream

TIMEOUT = 20


# -- fixtures and helpers ----------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_cert(ca: trustme.CA) -> Issued:
    return from_trustme(ca.issue_cert("localhost", "mail.example"))


@pytest.fixture
def creds(tmp_path: Path, server_cert: Issued) -> ServerCredentials:
    path = tmp_path / "servercert.pem"
    path.write_bytes(server_cert.key_pem + server_cert.cert_pem)
    return load_server_credentials(path, None)


@pytest.fixture(params=["bindings", "public"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Records read through OpenSSL's bindings directly, or through pyOpenSSL's public calls."""
    if request.param == "public":
        monkeypatch.setattr(incoming, "use_bindings", False)
    else:
        assert incoming.use_bindings  # the bindings are there: the fast path is tested
    return str(request.param)


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> Path:
    path = tmp_path / "clientca.pem"
    path.write_bytes(ca.cert_pem.bytes())
    return path


def client_context(
    ca: trustme.CA,
    *,
    cert: Issued | None = None,
    tmp: Path | None = None,
    max_version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if max_version is not None:
        ctx.maximum_version = max_version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if cert is not None:
        assert tmp is not None
        cert.load_into(ctx, tmp, f"client{id(cert)}")
    return ctx


async def handshake(
    server: ServerTLS, cctx: ssl.SSLContext, *, hostname: str = "localhost"
) -> tuple[
    TLSStream,
    trio.SSLStream[
        trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]
    ],
    BaseException | None,
]:
    """Both handshakes over a memory stream pair; returns (server, client, server error)."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_transport, cctx, server_hostname=hostname)
    stream = server.wrap(server_transport)
    failure: list[BaseException] = []

    async def server_side() -> None:
        try:
            await stream.do_handshake()
        except TLSHandshakeError as exc:
            failure.append(exc)
            await stream.aclose()

    async def client_side() -> None:
        try:
            await client.do_handshake()
        except trio.BrokenResourceError:
            await client_transport.aclose()  # as a real client hangs up

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side)
            nursery.start_soon(client_side)
    return stream, client, failure[0] if failure else None


def client_hello(cctx: ssl.SSLContext) -> bytes:
    """The first flight of a stdlib client."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = cctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


class OneByteAtATime(trio.abc.Stream):
    """A transport that hands out one byte per receive and records read sizes."""

    def __init__(self, inner: trio.abc.Stream, one: bool = True) -> None:
        self.inner = inner
        self.one = one
        self.asked: list[int | None] = []
        self.sent: list[bytes] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.asked.append(max_bytes)
        return bytes(await self.inner.receive_some(1 if self.one else max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


Handler = Callable[[TLSStream], Awaitable[None]]


@asynccontextmanager
async def loopback_server(server: ServerTLS, handler: Handler) -> AsyncIterator[int]:
    """Serve TLS on 127.0.0.1 (port 0); yields the port."""

    async def handle(transport: trio.SocketStream) -> None:
        stream = server.wrap(transport)
        try:
            await handler(stream)
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def echo(stream: TLSStream) -> None:
    """Echo with one task reading and another writing, as the proxy uses a stream."""
    await stream.do_handshake()
    send, receive = trio.open_memory_channel[bytes](4)

    async def reader() -> None:
        async with send:
            while data := await stream.receive_some():
                await send.send(data)

    async def writer() -> None:
        async with receive:
            async for data in receive:
                await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def client_roundtrip(port: int, cctx: ssl.SSLContext, total: int) -> tuple[bytes, bytes]:
    """Send `total` random bytes in odd-sized pieces while reading the echo."""
    payload = os.urandom(total)
    received = hashlib.sha256()
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    client = trio.SSLStream(tcp, cctx, server_hostname="localhost")

    async def sender() -> None:
        view = memoryview(payload)
        size = 1
        while view:
            await client.send_all(view[:size])
            view = view[size:]
            size = size * 3 % 100_003 + 1

    async def receiver() -> None:
        got = 0
        while got < total:
            data = await client.receive_some()
            assert data
            received.update(data)
            got += len(data)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)
        await client.aclose()
    return hashlib.sha256(payload).digest(), received.digest()


# -- data transfer -------------------------------------------------------------------


async def test_echo_both_directions_concurrently(
    ca: trustme.CA, creds: ServerCredentials, engine: str
) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    async with loopback_server(server, echo) as port:
        sent, received = await client_roundtrip(port, client_context(ca), 300_000)
    assert sent == received


async def test_large_transfer_intact(ca: trustme.CA, creds: ServerCredentials, engine: str) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    async with loopback_server(server, echo) as port:
        sent, received = await client_roundtrip(port, client_context(ca), 8 * 1024 * 1024)
    assert sent == received


async def test_reader_and_writer_may_start_before_the_handshake(
    ca: trustme.CA, creds: ServerCredentials
) -> None:
    """Both tasks trigger the handshake; it runs once and neither sees a partial state."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(server_transport)
    client = trio.SSLStream(client_transport, client_context(ca), server_hostname="localhost")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, b"220 hello\r\n")
            assert await client.receive_some() == b"220 hello\r\n"
            await client.send_all(b"EHLO x\r\n")
            assert await stream.receive_some() == b"EHLO x\r\n"


async def test_transport_reads_are_bounded(ca: trustme.CA, creds: ServerCredentials) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    recorder = OneByteAtATime(server_transport, one=False)
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(recorder)
    client = trio.SSLStream(client_transport, client_context(ca), server_hostname="localhost")
    blob = os.urandom(1024 * 1024)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, blob)
            got = bytearray()
            while len(got) < len(blob):
                got += await stream.receive_some(1_000_000)
    assert got == blob
    assert recorder.asked
    assert all(n is not None and n <= 65536 for n in recorder.asked)


class ReadRecorder(trio.abc.Stream):
    """A socket stream that records which read each transport read was, and its size."""

    def __init__(self, inner: NetStream) -> None:
        self.inner = inner
        self.reads: list[tuple[str, int]] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.reads.append(("some", len(data)))
        return data

    def receive_now(self, buffer: bytearray) -> int | None:
        n = self.inner.receive_now(buffer)
        self.reads.append(("now", -1 if n is None else n))
        return n

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_bulk_reads_go_into_a_buffer_that_goes_at_the_first_short_read(
    ca: trustme.CA, creds: ServerCredentials, engine: str
) -> None:
    """A full 64 KiB read starts bulk reads (what the kernel holds, up to 256 KiB,
    into the stream's own buffer, handed out as large chunks); once the
    kernel holds nothing the buffer goes and the stream waits with a plain
    read, so a waiting session holds no such buffer."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    with trio.fail_after(TIMEOUT):
        client_net = await NetStream.connect("127.0.0.1", port)
        recorder = ReadRecorder(NetStream.adopt(await listener.accept()))
    await listener.aclose()
    # Room for more than 64 KiB in flight, whatever the kernel's autotuning does.
    recorder.inner.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client_net.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(recorder)
    assert (stream._reader._ssl is None) == (engine == "public")
    client = trio.SSLStream(client_net, client_context(ca), server_hostname="localhost")
    blob = os.urandom(4 * 1024 * 1024)
    chunks: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await stream.do_handshake()
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, blob)
            await trio.testing.wait_all_tasks_blocked()  # the socket buffers are full
            while len(got) < len(blob):
                data = await stream.receive_some()
                chunks.append(len(data))
                got += data
        assert got == blob
        for line in (b"QUIT\r\n", b"NOOP\r\n"):
            await client.send_all(line)
            assert await stream.receive_some() == line
        # A session that waits for its peer holds no bulk buffer.
        waited: list[bytes] = []

        async def read() -> None:
            waited.append(await stream.receive_some())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert stream._bulk is None
            await client.send_all(b"RSET\r\n")
        assert waited == [b"RSET\r\n"]
    assert max(chunks) > 65536
    bulk = [n for how, n in recorder.reads if how == "now"]
    assert max(bulk) > 65536
    assert max(bulk) <= incoming.RECEIVE
    # Each wait is a plain read, after the kernel was found empty (-1).
    for before, (how, _) in zip(recorder.reads, recorder.reads[1:], strict=False):
        if how == "some" and before[0] == "now":
            assert before[1] == -1
    assert recorder.reads[-1][0] == "some"
    await client_net.aclose()
    await stream.aclose()


async def test_receive_returns_every_record_at_hand(
    ca: trustme.CA, creds: ServerCredentials, engine: str
) -> None:
    """One transport read holding several records is one chunk, up to max_bytes."""
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    stream, client, _ = await handshake(server, client_context(ca))
    blob = os.urandom(3 * 16384)  # three full records, ~48 KiB of ciphertext
    with trio.fail_after(TIMEOUT):
        await client.send_all(blob)
        assert await stream.receive_some(65536) == blob
        await client.send_all(blob)
        got = [await stream.receive_some(1000) for _ in range(3)]
        assert [len(part) for part in got] == [1000, 1000, 1000]
        rest = bytearray()
        while len(rest) < len(blob) - 3000:
            rest += await stream.receive_some(65536)
    assert b"".join(got) + rest == blob


class Capture(trio.abc.Stream):
    """A transport that can hold back what is sent, to be sent later in one piece."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.held: list[bytes] | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.held is None:
            await self.inner.send_all(data)
        else:
            self.held.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_tls_error_comes_after_the_records_before_it(
    ca: trustme.CA, creds: ServerCredentials, engine: str
) -> None:
    """A forged record behind good ones: the good data first, then BrokenResourceError."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    capture = Capture(client_transport)
    client = trio.SSLStream(capture, client_context(ca), server_hostname="localhost")
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(server_transport)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await stream.do_handshake()
        capture.held = []
        await client.send_all(b"MAIL FROM:<a@b>\r\n")
        await client.send_all(b"RCPT TO:<c@d>\r\n")
        good, forged = capture.held
        forged = forged[:-1] + bytes([forged[-1] ^ 1])  # breaks the AEAD tag
        await client_transport.send_all(good + forged)
        assert await stream.receive_some() == b"MAIL FROM:<a@b>\r\n"
        with pytest.raises(trio.BrokenResourceError, match="TLS error"):
            await stream.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()


async def test_handshake_fed_one_byte_at_a_time(ca: trustme.CA, creds: ServerCredentials) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(OneByteAtATime(server_transport))
    client = trio.SSLStream(client_transport, client_context(ca), server_hostname="localhost")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await stream.do_handshake()
        await client.send_all(b"MAIL FROM:<a@b>\r\n")
        got = b""
        while len(got) < 17:
            got += await stream.receive_some()
    assert got == b"MAIL FROM:<a@b>\r\n"


# -- versions, ciphers, info ------------------------------------------------------------


async def test_tls13_info(ca: trustme.CA, creds: ServerCredentials) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    stream, client, error = await handshake(server, client_context(ca), hostname="mail.example")
    assert error is None
    info = stream.info()
    assert info.version == "TLSv1.3"
    assert info.cipher == client.cipher()[0]
    assert info.bits == info.alg_bits == client.cipher()[2]
    assert info.bits >= 128
    assert info.peer_cert is None
    assert info.peer_chain == ()
    assert not info.verified
    assert info.verify_error is None
    assert not info.resumed
    assert info.server_name == "mail.example"
    assert stream.info() is info


async def test_tls12_client(ca: trustme.CA, creds: ServerCredentials) -> None:
    # the client waits for the server's Finished: it is sent at once, not with data
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    cctx = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2)
    stream, client, error = await handshake(server, cctx)
    assert error is None
    info = stream.info()
    assert info.version == "TLSv1.2"
    assert info.cipher.startswith("ECDHE-ECDSA-")
    assert "GCM" in info.cipher or "CHACHA20" in info.cipher
    assert info.cipher == client.cipher()[0]


async def test_tls13_tickets_leave_with_the_first_reply(
    ca: trustme.CA, creds: ServerCredentials
) -> None:
    """TLS 1.3: the server's flight, then its session tickets with its first reply, in
    one send (as for implicit TLS's greeting; a command that comes with the client's
    Finished is answered the same way)."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    recorder = OneByteAtATime(server_transport, one=False)
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(recorder)
    client = trio.SSLStream(client_transport, client_context(ca), server_hostname="localhost")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.do_handshake)
            await client.do_handshake()
        assert stream.info().version == "TLSv1.3"
        assert len(recorder.sent) == 1  # ServerHello ... Finished; no tickets yet
        await stream.send_all(b"220 mx.example ESMTP\r\n")
        assert await client.receive_some() == b"220 mx.example ESMTP\r\n"
    assert len(recorder.sent) == 2
    assert len(recorder.sent[1]) > 200  # the tickets (hundreds of bytes) with the greeting


def legacy_client(ca: trustme.CA, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = client_context(ca)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    return ctx


async def test_tls11_client_refused(ca: trustme.CA, creds: ServerCredentials) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    stream, _, error = await handshake(server, legacy_client(ca, ssl.TLSVersion.TLSv1_1))
    assert isinstance(error, TLSHandshakeError)
    assert error.reason == "unsupported protocol"
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()


async def test_tls12_refused_when_minimum_is_13(ca: trustme.CA, creds: ServerCredentials) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,), min_version="TLSv1.3"))
    cctx = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2)
    _, _, error = await handshake(server, cctx)
    assert isinstance(error, TLSHandshakeError)
    assert error.reason == "unsupported protocol"


async def test_lowered_minimum_serves_tls1_clients(
    ca: trustme.CA, creds: ServerCredentials
) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,), min_version="TLSv1"))
    stream, _, error = await handshake(server, legacy_client(ca, ssl.TLSVersion.TLSv1))
    assert error is None
    assert stream.info().version == "TLSv1"
    assert stream.info().cipher.startswith("ECDHE-ECDSA-AES")


async def test_no_shared_cipher(ca: trustme.CA, creds: ServerCredentials) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    cctx = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA")
    _, _, error = await handshake(server, cctx)
    assert isinstance(error, TLSHandshakeError)
    assert error.reason == "no shared cipher"


async def test_rsa_and_ecdsa_certificates_each_with_own_chain(
    tmp_path: Path, ca: trustme.CA
) -> None:
    rsa_leaf = from_trustme(
        ca.create_child_ca().issue_cert("localhost", key_type=trustme.KeyType.RSA)
    )
    ec_leaf = from_trustme(ca.create_child_ca().issue_cert("localhost"))
    loaded = []
    for name, leaf in (("rsa", rsa_leaf), ("ec", ec_leaf)):
        cert_path, key_path = leaf.write(tmp_path, name)
        loaded.append(load_server_credentials(cert_path, key_path))
    server = ServerTLS(TLSSettings(credentials=tuple(loaded)))
    for kind, leaf in (("RSA", rsa_leaf), ("ECDSA", ec_leaf)):
        ciphers = f"ECDHE-{kind}-AES128-GCM-SHA256"
        cctx = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2, ciphers=ciphers)
        _, client, error = await handshake(server, cctx)
        assert error is None
        assert client.getpeercert(binary_form=True) == leaf.cert.public_bytes(
            serialization.Encoding.DER
        )


def need_openssl() -> None:
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("the openssl command is not installed")
        pytest.skip("the openssl command is not installed")


def ffdhe2048(tmp_path: Path) -> Path:
    need_openssl()
    path = tmp_path / "dh2048.pem"
    subprocess.run(
        [
            "openssl",
            "genpkey",
            "-genparam",
            "-algorithm",
            "DH",
            "-pkeyopt",
            "group:ffdhe2048",
            "-out",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    return path


async def test_dhparams_enable_dhe(tmp_path: Path, ca: trustme.CA) -> None:
    leaf = from_trustme(ca.issue_cert("localhost", key_type=trustme.KeyType.RSA))
    creds = load_server_credentials(*leaf.write(tmp_path, "rsa"))
    cctx = client_context(
        ca, max_version=ssl.TLSVersion.TLSv1_2, ciphers="DHE-RSA-AES128-GCM-SHA256"
    )
    _, _, error = await handshake(ServerTLS(TLSSettings(credentials=(creds,))), cctx)
    assert isinstance(error, TLSHandshakeError)
    assert error.reason == "no shared cipher"
    server = ServerTLS(TLSSettings(credentials=(creds,), dhparams=ffdhe2048(tmp_path)))
    stream, _, error = await handshake(server, cctx)
    assert error is None
    assert stream.info().cipher == "DHE-RSA-AES128-GCM-SHA256"


async def test_ciphersuites_for_tls13(ca: trustme.CA, creds: ServerCredentials) -> None:
    settings = TLSSettings(credentials=(creds,), ciphersuites="TLS_CHACHA20_POLY1305_SHA256")
    stream, _, error = await handshake(ServerTLS(settings), client_context(ca))
    assert error is None
    assert stream.info().cipher == "TLS_CHACHA20_POLY1305_SHA256"


# -- handshake failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"EHLO client.example\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 64],
)
@pytest.mark.parametrize("one_byte", [False, True])
async def test_garbage_instead_of_client_hello(
    creds: ServerCredentials, garbage: bytes, one_byte: bool
) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    transport: trio.abc.Stream = server_transport
    if one_byte:
        transport = OneByteAtATime(server_transport)
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(transport)
    await client_transport.send_all(garbage)
    with trio.fail_after(TIMEOUT), pytest.raises(TLSHandshakeError) as info:
        await stream.do_handshake()
    assert info.value.reason == "not TLS"
    # Idempotent: the same failure again, and the data path reports it as broken.
    with pytest.raises(TLSHandshakeError, match="not TLS"):
        await stream.do_handshake()
    with pytest.raises(trio.BrokenResourceError):
        await stream.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"x")
    with pytest.raises(trio.NeedHandshakeError):
        stream.info()


async def test_eof_mid_handshake(ca: trustme.CA, creds: ServerCredentials) -> None:
    hello = client_hello(client_context(ca))
    client_transport, server_transport = trio.testing.memory_stream_pair()
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(server_transport)
    await client_transport.send_all(hello[: len(hello) // 2])
    await client_transport.aclose()
    with trio.fail_after(TIMEOUT), pytest.raises(TLSHandshakeError) as info:
        await stream.do_handshake()
    assert info.value.reason == "eof"


async def test_half_a_client_hello_then_silence_is_cancellable(
    ca: trustme.CA, creds: ServerCredentials, autojump_clock: trio.testing.MockClock
) -> None:
    hello = client_hello(client_context(ca))
    client_transport, server_transport = trio.testing.memory_stream_pair()
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(server_transport)
    await client_transport.send_all(hello[:10])
    with trio.move_on_after(30) as scope:
        await stream.do_handshake()
    assert scope.cancelled_caught
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.do_handshake()


async def test_client_rejecting_our_certificate(
    other_ca: trustme.CA, creds: ServerCredentials
) -> None:
    """A stdlib client driven by hand, so that its alert reaches us."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(server_transport)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(other_ca).wrap_bio(incoming, outgoing, server_hostname="localhost")

    async def client() -> None:
        while True:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                await client_transport.send_all(outgoing.read())
                incoming.write(await client_transport.receive_some())
            except ssl.SSLCertVerificationError:
                await client_transport.send_all(outgoing.read())  # the alert
                return

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            with pytest.raises(TLSHandshakeError) as info:
                await stream.do_handshake()
    assert info.value.reason == "alert from peer"
    assert info.value.detail is not None
    assert "unknown ca" in info.value.detail


# -- client certificates: request --------------------------------------------------------

VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="TLSv1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="TLSv1.3"),
]


def request_server(creds: ServerCredentials, ca_file: Path, crl: Path | None = None) -> ServerTLS:
    return ServerTLS(
        TLSSettings(credentials=(creds,), client_cert="request", client_ca=ca_file, client_crl=crl)
    )


@pytest.mark.parametrize("version", VERSIONS)
async def test_request_without_certificate(
    ca: trustme.CA, creds: ServerCredentials, ca_file: Path, version: ssl.TLSVersion
) -> None:
    cctx = client_context(ca, max_version=version)
    stream, _, error = await handshake(request_server(creds, ca_file), cctx)
    assert error is None
    info = stream.info()
    assert info.peer_cert is None
    assert not info.verified
    assert info.verify_error is None


@pytest.mark.parametrize("version", VERSIONS)
async def test_request_with_valid_certificate(
    tmp_path: Path, ca: trustme.CA, creds: ServerCredentials, ca_file: Path, version: ssl.TLSVersion
) -> None:
    leaf = issue(ca, subject_emails=["relay@example.org"])
    cctx = client_context(ca, cert=leaf, tmp=tmp_path, max_version=version)
    stream, _, error = await handshake(request_server(creds, ca_file), cctx)
    assert error is None
    info = stream.info()
    assert info.peer_cert == leaf.cert
    assert info.peer_chain[0] == leaf.cert  # the stdlib client adds its root
    assert info.verified
    assert info.verify_error is None
    assert info.version == ("TLSv1.3" if version == ssl.TLSVersion.TLSv1_3 else "TLSv1.2")


async def test_request_with_intermediate_sent_by_client(
    tmp_path: Path, ca: trustme.CA, creds: ServerCredentials, ca_file: Path
) -> None:
    leaf = from_trustme(ca.create_child_ca().issue_cert("client@example.org"))
    cctx = client_context(ca, cert=leaf, tmp=tmp_path)
    stream, _, error = await handshake(request_server(creds, ca_file), cctx)
    assert error is None
    info = stream.info()
    assert info.verified
    assert info.peer_chain[:2] == (leaf.cert, *leaf.chain)


def _bad_certificates(ca: trustme.CA, other_ca: trustme.CA) -> dict[str, tuple[Issued, str]]:
    return {
        "other CA": (issue(other_ca), "unable to get local issuer certificate"),
        "self-signed": (issue(None), "self-signed certificate"),
        "expired": (
            issue(ca, not_before=NOW - 30 * DAY, not_after=NOW - DAY),
            "certificate has expired",
        ),
        "not yet valid": (
            issue(ca, not_before=NOW + DAY, not_after=NOW + 30 * DAY),
            "certificate is not yet valid",
        ),
        "server-only usage": (
            issue(ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
            "unsupported certificate purpose",
        ),
    }


BAD = ["other CA", "self-signed", "expired", "not yet valid", "server-only usage"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", BAD)
async def test_request_never_fails_the_handshake_over_a_bad_certificate(
    tmp_path: Path,
    ca: trustme.CA,
    other_ca: trustme.CA,
    creds: ServerCredentials,
    ca_file: Path,
    kind: str,
    version: ssl.TLSVersion,
) -> None:
    leaf, reason = _bad_certificates(ca, other_ca)[kind]
    cctx = client_context(ca, cert=leaf, tmp=tmp_path, max_version=version)
    stream, client, error = await handshake(request_server(creds, ca_file), cctx)
    assert error is None
    info = stream.info()
    assert info.peer_cert == leaf.cert
    assert not info.verified
    assert info.verify_error == reason
    # TLS really is up.
    with trio.fail_after(TIMEOUT):
        await client.send_all(b"RCPT TO:<x@y>\r\n")
        assert await stream.receive_some() == b"RCPT TO:<x@y>\r\n"


async def test_request_without_any_client_ca(
    tmp_path: Path, ca: trustme.CA, other_ca: trustme.CA, creds: ServerCredentials
) -> None:
    """Fingerprint-only setups: certificates are asked for, none can verify."""
    server = ServerTLS(TLSSettings(credentials=(creds,), client_cert="request"))
    leaf = issue(other_ca)
    stream, _, error = await handshake(server, client_context(ca, cert=leaf, tmp=tmp_path))
    assert error is None
    assert stream.info().peer_cert == leaf.cert
    assert not stream.info().verified
    assert stream.info().verify_error == "unable to get local issuer certificate"


@pytest.mark.parametrize("version", VERSIONS)
async def test_request_with_crl(
    tmp_path: Path,
    ca: trustme.CA,
    other_ca: trustme.CA,
    creds: ServerCredentials,
    ca_file: Path,
    version: ssl.TLSVersion,
) -> None:
    revoked, good = issue(ca), issue(ca)
    crl_file = tmp_path / "clientcrl.pem"
    crl_file.write_bytes(crl_pem(make_crl(other_ca), make_crl(ca, [revoked.cert])))
    server = request_server(creds, ca_file, crl_file)
    for leaf, verified, reason in ((revoked, False, "certificate revoked"), (good, True, None)):
        cctx = client_context(ca, cert=leaf, tmp=tmp_path, max_version=version)
        stream, _, error = await handshake(server, cctx)
        assert error is None
        assert stream.info().verified is verified
        assert stream.info().verify_error == reason


async def test_expired_crl_verifies_nobody(
    tmp_path: Path, ca: trustme.CA, creds: ServerCredentials, ca_file: Path
) -> None:
    crl_file = tmp_path / "clientcrl.pem"
    crl_file.write_bytes(crl_pem(make_crl(ca, next_update=NOW - DAY / 2)))
    cctx = client_context(ca, cert=issue(ca), tmp=tmp_path)
    stream, _, error = await handshake(request_server(creds, ca_file, crl_file), cctx)
    assert error is None
    assert not stream.info().verified
    assert stream.info().verify_error == "CRL has expired"


# -- client certificates: require --------------------------------------------------------


def require_server(creds: ServerCredentials, ca_file: Path) -> ServerTLS:
    return ServerTLS(TLSSettings(credentials=(creds,), client_cert="require", client_ca=ca_file))


@pytest.mark.parametrize("version", VERSIONS)
async def test_require_refuses_no_certificate(
    ca: trustme.CA, creds: ServerCredentials, ca_file: Path, version: ssl.TLSVersion
) -> None:
    cctx = client_context(ca, max_version=version)
    _, _, error = await handshake(require_server(creds, ca_file), cctx)
    assert isinstance(error, TLSHandshakeError)
    assert error.reason == "certificate required"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", ["other CA", "expired"])
async def test_require_refuses_bad_certificate(
    tmp_path: Path,
    ca: trustme.CA,
    other_ca: trustme.CA,
    creds: ServerCredentials,
    ca_file: Path,
    kind: str,
    version: ssl.TLSVersion,
) -> None:
    leaf, reason = _bad_certificates(ca, other_ca)[kind]
    cctx = client_context(ca, cert=leaf, tmp=tmp_path, max_version=version)
    _, _, error = await handshake(require_server(creds, ca_file), cctx)
    assert isinstance(error, TLSHandshakeError)
    assert error.reason == "peer certificate rejected"
    assert error.detail == reason


async def test_require_accepts_valid_certificate(
    tmp_path: Path, ca: trustme.CA, creds: ServerCredentials, ca_file: Path
) -> None:
    leaf = issue(ca)
    cctx = client_context(ca, cert=leaf, tmp=tmp_path)
    stream, _, error = await handshake(require_server(creds, ca_file), cctx)
    assert error is None
    assert stream.info().verified


# -- session resumption --------------------------------------------------------------------


async def _resume(server: ServerTLS, cctx: ssl.SSLContext) -> tuple[bool, bool]:
    """Two connections, the second offering the first one's session."""
    stream, client, error = await handshake(server, cctx)
    assert error is None
    assert not stream.info().resumed
    # TLS 1.3 tickets come after the handshake: let the client read them.
    await stream.send_all(b"220 ready\r\n")
    assert await client.receive_some() == b"220 ready\r\n"
    session = client.session
    assert session is not None

    client_transport, server_transport = trio.testing.memory_stream_pair()
    client2 = trio.SSLStream(client_transport, cctx, server_hostname="localhost")
    client2.session = session
    stream2 = server.wrap(server_transport)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client2.do_handshake)
            await stream2.do_handshake()
    return bool(client2.session_reused), stream2.info().resumed


@pytest.mark.parametrize("version", VERSIONS)
async def test_resumption_on_a_none_profile(
    ca: trustme.CA, creds: ServerCredentials, version: ssl.TLSVersion
) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    client_reused, server_resumed = await _resume(server, client_context(ca, max_version=version))
    assert client_reused
    assert server_resumed


@pytest.mark.parametrize("version", VERSIONS)
async def test_no_resumption_on_a_request_profile(
    tmp_path: Path, ca: trustme.CA, creds: ServerCredentials, ca_file: Path, version: ssl.TLSVersion
) -> None:
    server = request_server(creds, ca_file)
    cctx = client_context(ca, cert=issue(ca), tmp=tmp_path, max_version=version)
    client_reused, server_resumed = await _resume(server, cctx)
    assert not client_reused
    assert not server_resumed


# -- stream semantics -------------------------------------------------------------------------


async def test_close_notify_both_ways(
    ca: trustme.CA, creds: ServerCredentials, engine: str
) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    stream, client, _ = await handshake(server, client_context(ca))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)
            assert await stream.receive_some() == b""
            assert await stream.receive_some() == b""

    stream, client, _ = await handshake(server, client_context(ca))
    with trio.fail_after(TIMEOUT):
        await stream.send_all(b"221 bye\r\n")
        await stream.aclose()
        assert await client.receive_some() == b"221 bye\r\n"
        assert await client.receive_some() == b""  # close_notify, not a bare EOF
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
    await stream.aclose()  # idempotent


async def test_transport_eof_without_close_notify(ca: trustme.CA, creds: ServerCredentials) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    stream, client, _ = await handshake(server, client_context(ca))
    await client.transport_stream.aclose()
    with trio.fail_after(TIMEOUT):
        assert await stream.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"x" * 100)


async def test_aclose_wakes_a_blocked_reader(ca: trustme.CA, creds: ServerCredentials) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    stream, _, _ = await handshake(server, client_context(ca))

    async def read() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()


async def test_two_readers_conflict(ca: trustme.CA, creds: ServerCredentials) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    stream, client, _ = await handshake(server, client_context(ca))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await stream.receive_some()
            await client.send_all(b"x")
        await stream.wait_send_all_might_not_block()


async def test_two_senders_conflict(ca: trustme.CA, creds: ServerCredentials) -> None:
    """The shared ConflictDetector guards sending as it guards receiving."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    held = Capture(server_transport)
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(held)
    client = trio.SSLStream(client_transport, client_context(ca), server_hostname="localhost")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await stream.do_handshake()
        gate = trio.Event()

        async def slow_send_all(data: bytes | bytearray | memoryview) -> None:
            await gate.wait()
            await server_transport.send_all(data)

        held.send_all = slow_send_all  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, b"250 one\r\n")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError, match="already sending"):
                await stream.send_all(b"250 two\r\n")
            with pytest.raises(trio.BusyResourceError):
                await stream.wait_send_all_might_not_block()
            gate.set()
        assert await client.receive_some() == b"250 one\r\n"


def state(stream: TLSStream) -> StreamState:
    return stream.state  # read afresh each time (a property mypy would narrow)


async def test_states_from_handshake_to_close(ca: trustme.CA, creds: ServerCredentials) -> None:
    server = ServerTLS(TLSSettings(credentials=(creds,)))
    assert server.wrap(trio.testing.memory_stream_pair()[1]).state is StreamState.HANDSHAKE
    stream, client, _ = await handshake(server, client_context(ca))
    assert state(stream) is StreamState.OPEN
    with trio.fail_after(TIMEOUT):
        await client.transport_stream.send_stream.aclose()  # the client's half ends
        assert await stream.receive_some() == b""
        assert state(stream) is StreamState.PEER_CLOSED
        assert await stream.receive_some() == b""
        await stream.send_all(b"221 bye\r\n")  # replies still go out
        assert await client.receive_some() == b"221 bye\r\n"
        await stream.aclose()
        assert state(stream) is StreamState.CLOSED
        assert await client.receive_some() == b""  # close_notify


class FailingSends(Capture):
    """A transport whose sends fail once `fail` is set."""

    fail = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.fail:
            raise trio.BrokenResourceError("reset by peer")
        await self.inner.send_all(data)


async def test_a_failed_send_stops_sending_not_receiving(
    ca: trustme.CA, creds: ServerCredentials
) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    transport = FailingSends(server_transport)
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(transport)
    client = trio.SSLStream(client_transport, client_context(ca), server_hostname="localhost")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await stream.do_handshake()
        transport.fail = True
        with pytest.raises(trio.BrokenResourceError, match="reset by peer"):
            await stream.send_all(b"250 ok\r\n")
        assert state(stream) is StreamState.SEND_FAILED
        with pytest.raises(trio.BrokenResourceError, match="an earlier send failed"):
            await stream.send_all(b"250 ok\r\n")
        await client.send_all(b"QUIT\r\n")
        assert await stream.receive_some() == b"QUIT\r\n"
        await client.transport_stream.send_stream.aclose()
        assert await stream.receive_some() == b""  # the end, as ever
        assert state(stream) is StreamState.BROKEN  # neither way is left
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()
        await stream.aclose()  # no close_notify: it would follow a broken record
        assert state(stream) is StreamState.CLOSED


def test_only_tlsfront_tls_imports_a_tls_library() -> None:
    """The TLS library is known in tlsfront/tls/ alone (server and client side)."""
    root = Path(tlsfront.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.parent.name == "tls" and path.parent.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            if any(name.split(".")[0] in ("ssl", "OpenSSL") for name in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


async def test_info_before_handshake(creds: ServerCredentials) -> None:
    _, server_transport = trio.testing.memory_stream_pair()
    stream = ServerTLS(TLSSettings(credentials=(creds,))).wrap(server_transport)
    with pytest.raises(trio.NeedHandshakeError):
        stream.info()


# -- configuration errors ----------------------------------------------------------------------


def _config_error(**kwargs: object) -> TLSConfigError:
    with pytest.raises(TLSConfigError) as info:
        ServerTLS(TLSSettings(**kwargs))  # type: ignore[arg-type]
    return info.value


def test_config_errors(tmp_path: Path, creds: ServerCredentials, ca_file: Path) -> None:
    assert _config_error(credentials=()).setting == "cert"
    assert _config_error(credentials=(creds,), ciphers="NOPE").setting == "ciphers"
    assert _config_error(credentials=(creds,), ciphersuites="NOPE").setting == "ciphersuites"
    assert _config_error(credentials=(creds,), min_version="SSLv3").setting == "min_tls_version"
    assert _config_error(credentials=(creds,), client_cert="require").setting == "client_ca"
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"garbage")
    err = _config_error(credentials=(creds,), dhparams=garbage)
    assert err.setting == "dhparams"
    assert str(garbage) in str(err)
    err = _config_error(credentials=(creds,), dhparams=tmp_path / "missing.pem")
    assert "cannot read" in str(err)
    err = _config_error(credentials=(creds,), client_cert="request", client_ca=garbage)
    assert err.setting == "client_ca"
    assert str(garbage) in str(err)
    err = _config_error(
        credentials=(creds,), client_cert="request", client_ca=ca_file, client_crl=garbage
    )
    assert err.setting == "client_crl"
    assert _config_error(credentials=(creds, creds)).setting == "cert"
    err = _config_error(credentials=(creds,), client_cert="request", client_crl=garbage)
    assert err.setting == "client_crl"
    # Unused client settings on a profile that asks for no certificate are fine.
    ServerTLS(TLSSettings(credentials=(creds,), client_crl=garbage, client_ca=garbage))


# -- a real client: openssl s_client ---------------------------------------------------------


@pytest.mark.interop
async def test_openssl_s_client_with_unrelated_certificate(
    tmp_path: Path, ca: trustme.CA, other_ca: trustme.CA, creds: ServerCredentials, ca_file: Path
) -> None:
    need_openssl()
    infos = []

    async def handler(stream: TLSStream) -> None:
        await stream.do_handshake()
        infos.append(stream.info())
        await stream.send_all(b"220 hello\r\n")
        received = b""
        while b"\n" not in received:
            received += await stream.receive_some()
        await stream.send_all(b"221 bye " + received)

    cert_path, key_path = issue(other_ca, common_name="mx.other.example").write(tmp_path, "c")
    trust = tmp_path / "trust.pem"
    trust.write_bytes(ca.cert_pem.bytes())
    async with loopback_server(request_server(creds, ca_file), handler) as port:
        with trio.fail_after(TIMEOUT):
            result = await trio.run_process(
                [
                    "openssl",
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{port}",
                    "-servername",
                    "localhost",
                    "-CAfile",
                    str(trust),
                    "-cert",
                    str(cert_path),
                    "-key",
                    str(key_path),
                    "-ign_eof",
                    "-nocommands",
                ],
                stdin=b"QUIT\r\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert "220 hello" in out
    assert "221 bye QUIT" in out
    assert "Acceptable client certificate CA names" in out
    ca_name = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject
    cn = ca_name.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    assert str(cn) in out
    assert len(infos) == 1
    assert infos[0].peer_cert is not None
    assert not infos[0].verified
    assert infos[0].verify_error == "unable to get local issuer certificate"
