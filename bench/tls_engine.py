"""What the pyOpenSSL engine costs against trio.SSLStream (stdlib ssl).

    python -m bench.tls_engine [--mib 64] [--handshakes 300]

One process, loopback TCP. The server side is either tlsfront's TLSStream or
trio.SSLStream(server_side=True), with the same certificate (ECDSA P-256 from
trustme) and the same stdlib client. The client runs in the same thread, so
the figures include its cost too: they compare whole loops, and the ratio
understates the difference between the two server engines.

Bulk: MiB of random data one way (client to server, then server to client),
64 KiB writes. Round trips: one small record each way per trip, as an SMTP
command and its reply (the per-call cost of receive_some and send_all).
Handshakes: sequential full handshakes (connect, handshake, one byte each
way, close), without and with a client certificate requested.
"""

from __future__ import annotations

import argparse
import functools
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio
import trustme

from tlsfront.tls.certs import load_server_credentials
from tlsfront.tls.context import ServerTLS, TLSSettings

WRITE = 64 * 1024
PY = sys.version.split()[0]

Wrap = Callable[[trio.SocketStream], trio.abc.Stream]


@dataclass
class Setup:
    ours: Wrap
    stdlib: Wrap
    client: ssl.SSLContext


def make_setups(directory: Path) -> tuple[Setup, Setup]:
    """(plain, client certificate requested) setups sharing one server certificate."""
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    combined = directory / "servercert.pem"
    server.private_key_and_cert_chain_pem.write_to_path(str(combined))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    creds = load_server_credentials(combined, None)

    client = ssl.create_default_context()
    ca.configure_trust(client)
    client_with_cert = ssl.create_default_context()
    ca.configure_trust(client_with_cert)
    ca.issue_cert("client@example.org").configure_cert(client_with_cert)

    def stdlib_context(request: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(combined)
        if request:
            ctx.verify_mode = ssl.CERT_OPTIONAL
            ctx.load_verify_locations(ca_file)
        return ctx

    setups = []
    for request, cctx in ((False, client), (True, client_with_cert)):
        ours = ServerTLS(
            TLSSettings(
                credentials=(creds,),
                client_cert="request" if request else "none",
                client_ca=ca_file if request else None,
            )
        )
        sctx = stdlib_context(request)
        setups.append(
            Setup(
                ours=ours.wrap,
                stdlib=functools.partial(trio.SSLStream, ssl_context=sctx, server_side=True),
                client=cctx,
            )
        )
    return setups[0], setups[1]


async def serve(
    wrap: Wrap,
    handler: Callable[[trio.abc.Stream], Awaitable[None]],
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def handle(transport: trio.SocketStream) -> None:
        stream = wrap(transport)
        try:
            await handler(stream)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        task_status.started(listeners[0].socket.getsockname()[1])


async def connect(port: int, cctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    client = trio.SSLStream(tcp, cctx, server_hostname="localhost")
    await client.do_handshake()
    return client


async def bulk_upload(wrap: Wrap, cctx: ssl.SSLContext, total: int) -> float:
    """Client sends `total` bytes; seconds until the server has them all."""
    block = os.urandom(WRITE)

    async def sink(stream: trio.abc.Stream) -> None:
        got = 0
        while got < total:
            data = await stream.receive_some(WRITE)
            if not data:
                raise RuntimeError("short upload")
            got += len(data)
        await stream.send_all(b"k")

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, wrap, sink)
        client = await connect(port, cctx)
        start = time.perf_counter()
        for _ in range(total // WRITE):
            await client.send_all(block)
        assert await client.receive_some(1) == b"k"
        elapsed = time.perf_counter() - start
        await client.aclose()
        nursery.cancel_scope.cancel()
    return elapsed


async def bulk_download(wrap: Wrap, cctx: ssl.SSLContext, total: int) -> float:
    """Server sends `total` bytes; seconds until the client has them all."""
    block = os.urandom(WRITE)

    async def source(stream: trio.abc.Stream) -> None:
        assert await stream.receive_some(1) == b"g"
        for _ in range(total // WRITE):
            await stream.send_all(block)
        await stream.receive_some(1)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, wrap, source)
        client = await connect(port, cctx)
        start = time.perf_counter()
        await client.send_all(b"g")
        got = 0
        while got < total:
            got += len(await client.receive_some(WRITE))
        elapsed = time.perf_counter() - start
        await client.aclose()
        nursery.cancel_scope.cancel()
    return elapsed


async def round_trips(wrap: Wrap, cctx: ssl.SSLContext, count: int) -> float:
    """Seconds for `count` command/reply exchanges of one small record each way."""
    command, reply = b"RCPT TO:<someone@example.org>\r\n", b"250 2.1.5 Ok\r\n"

    async def answer(stream: trio.abc.Stream) -> None:
        for _ in range(count):
            await stream.receive_some(WRITE)
            await stream.send_all(reply)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, wrap, answer)
        client = await connect(port, cctx)
        start = time.perf_counter()
        for _ in range(count):
            await client.send_all(command)
            await client.receive_some(WRITE)
        elapsed = time.perf_counter() - start
        await client.aclose()
        nursery.cancel_scope.cancel()
    return elapsed


async def handshakes(wrap: Wrap, cctx: ssl.SSLContext, count: int) -> float:
    """Seconds for `count` sequential connections with a full handshake each."""

    async def greet(stream: trio.abc.Stream) -> None:
        await stream.send_all(b"2")
        await stream.receive_some(1)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, wrap, greet)
        start = time.perf_counter()
        for _ in range(count):
            client = await connect(port, cctx)
            assert await client.receive_some(1) == b"2"
            await client.send_all(b"q")
            await client.aclose()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs else "n/a"


async def run(mib: int, count: int, rounds: int) -> None:
    total = mib * 1024 * 1024
    trip_count = 20 * count
    with tempfile.TemporaryDirectory(prefix="tlsfront-bench-") as tmp:
        plain, request = make_setups(Path(tmp))
        # Warm up both engines once.
        for wrap in (plain.ours, plain.stdlib):
            await bulk_upload(wrap, plain.client, WRITE * 16)

        print(f"tlsfront TLS engine vs trio.SSLStream: one process, loopback, Python {PY}")
        print(f"  {_openssl_versions()}")
        print(f"  best of {rounds} rounds, engines alternating within each round")
        print()
        print(f"{'measure':<48}{'TLSStream':>11}{'SSLStream':>11}{'ratio':>7}")

        # Each measure: (label, async fn(wrap) -> rate). Best rate of all rounds.
        async def upload(wrap: Wrap) -> float:
            return total / await bulk_upload(wrap, plain.client, total) / 1e6

        async def download(wrap: Wrap) -> float:
            return total / await bulk_download(wrap, plain.client, total) / 1e6

        async def trips(wrap: Wrap) -> float:
            return trip_count / await round_trips(wrap, plain.client, trip_count)

        def handshake_rate(setup: Setup) -> Callable[[Wrap], Awaitable[float]]:
            async def rate(wrap: Wrap) -> float:
                return count / await handshakes(wrap, setup.client, count)

            return rate

        measures: list[tuple[str, Callable[[Wrap], Awaitable[float]], Setup]] = [
            (f"bulk upload client->server, {mib} MiB (MB/s)", upload, plain),
            (f"bulk download server->client, {mib} MiB (MB/s)", download, plain),
            (f"round trips/s, small records (n={trip_count})", trips, plain),
            (f"handshakes/s, no client cert (n={count})", handshake_rate(plain), plain),
            (f"handshakes/s, client cert asked+sent (n={count})", handshake_rate(request), request),
        ]
        for label, measure, setup in measures:
            ours = theirs = 0.0
            for _ in range(rounds):
                ours = max(ours, await measure(setup.ours))
                theirs = max(theirs, await measure(setup.stdlib))
            print(f"{label:<48}{ours:>11.1f}{theirs:>11.1f}{_ratio(ours, theirs):>7}")


def _openssl_versions() -> str:
    from OpenSSL import SSL

    engine = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    return f"TLSStream: pyOpenSSL on {engine}; SSLStream: ssl on {ssl.OPENSSL_VERSION}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=64, help="bulk transfer size (MiB)")
    parser.add_argument("--handshakes", type=int, default=300, help="handshakes per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best one counts")
    args = parser.parse_args(argv)
    trio.run(run, args.mib, args.handshakes, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
