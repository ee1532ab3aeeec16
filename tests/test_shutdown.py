"""Graceful stop (`Server.stop`, SIGTERM): nothing the backend accepted is cut.

The grace is short and real (these sessions talk to real backend processes,
so the clock cannot be virtual); every wait is for an event the server
shows: a reply, the end of the connection, `server.shutdown`, `run` ending.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from support.front import capture_backend, toml_str, write_config
from support.hostile import Client, code

from tlsfront.config.files import load_config
from tlsfront.inbound.server import Server

PROFILE = """
[defaults]
hostname = "front.example.org"
shutdown_grace = {grace}
workers = 1  # one process: these tests watch its own notifications

[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}
"""

SHUTTING_DOWN = b"421 4.3.2 front.example.org Service shutting down\r\n"


@dataclass
class Serving:
    server: Server
    done: trio.Event
    capture: Path

    @property
    def port(self) -> int:
        return self.server.addresses["smtp"][0].port

    def maildir(self) -> list[bytes]:
        new = self.capture / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


@pytest.fixture
async def serve(
    nursery: trio.Nursery, tmp_path: Path, tls_dir: Path
) -> Callable[[float], Awaitable[Serving]]:
    capture = tmp_path / "capture"
    capture.mkdir()

    async def start(grace: float) -> Serving:
        text = PROFILE.format(
            grace=grace,
            cert=toml_str(tls_dir / "servercert.pem"),
            backend=capture_backend(capture),
        )
        server = Server(load_config(write_config(tmp_path, text)))
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[Server]) -> None:
            await server.run(task_status=task_status)
            done.set()

        await nursery.start(run)
        return Serving(server, done, capture)

    return start


async def ehlo(serving: Serving) -> Client:
    client = await Client.connect(serving.port)
    assert (await client.reply()).startswith(b"220 ")
    assert code(await client.command(b"EHLO client.example.net")) == 250
    return client


@pytest.mark.parametrize("tls", [False, True])
async def test_idle_sessions_get_421_after_the_grace(
    serve: Callable[[float], Awaitable[Serving]], client_context: ssl.SSLContext, tls: bool
) -> None:
    serving = await serve(0.5)
    with trio.fail_after(30):
        client = await ehlo(serving)
        if tls:
            assert code(await client.command(b"STARTTLS")) == 220
            await client.starttls(client_context)
            assert code(await client.command(b"EHLO client.example.net")) == 250
        stopped_at = trio.current_time()
        serving.server.stop()
        await trio.testing.wait_all_tasks_blocked()
        # No new connections from the moment of the stop ...
        with pytest.raises(OSError, match="onnect"):
            await trio.open_tcp_stream("127.0.0.1", serving.port)
        # ... while the idle one is left alone for the grace, then told.
        assert await client.reply() == SHUTTING_DOWN
        assert trio.current_time() - stopped_at >= 0.5
        assert await client.rest() == b""
        await client.aclose()
        await serving.done.wait()


async def test_a_message_in_flight_is_finished_first(
    serve: Callable[[float], Awaitable[Serving]],
) -> None:
    serving = await serve(0.3)
    with trio.fail_after(30):
        client = await ehlo(serving)
        assert code(await client.command(b"MAIL FROM:<a@example.net>")) == 250
        assert code(await client.command(b"RCPT TO:<b@example.org>")) == 250
        assert code(await client.command(b"DATA")) == 354
        await client.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        serving.server.stop()
        await serving.server.shutdown.wait()  # the grace is over, the session mid-DATA
        await client.send(b"second half\r\n.\r\n")
        assert code(await client.reply()) == 250  # the backend's answer reaches the client
        assert await client.reply() == SHUTTING_DOWN  # and only then the 421
        assert await client.rest() == b""
        await client.aclose()
        await serving.done.wait()
    (message,) = serving.maildir()
    assert message.endswith(b"first half\nsecond half\n")


async def test_sessions_that_end_on_their_own_end_the_stop_early(
    serve: Callable[[float], Awaitable[Serving]],
) -> None:
    serving = await serve(600)
    with trio.fail_after(30):  # far less than the grace
        client = await ehlo(serving)
        serving.server.stop()
        assert code(await client.command(b"QUIT")) == 221
        assert await client.rest() == b""
        await client.aclose()
        await serving.done.wait()
    assert not serving.server.shutdown.is_set()


async def test_what_is_still_busy_after_twice_the_grace_is_cut(
    serve: Callable[[float], Awaitable[Serving]],
) -> None:
    serving = await serve(0.3)
    with trio.fail_after(30):
        client = await ehlo(serving)
        assert code(await client.command(b"MAIL FROM:<a@example.net>")) == 250
        assert code(await client.command(b"RCPT TO:<b@example.org>")) == 250
        assert code(await client.command(b"DATA")) == 354
        await client.send(b"Subject: never finished\r\n\r\nhalf a body\r\n")
        started = trio.current_time()
        serving.server.stop()
        # The client never sends the dot: after the grace, and as long again
        # for the message in flight, the session is cut without a reply.
        assert await client.rest() == b""
        await client.aclose()
        assert trio.current_time() - started >= 0.6
        await serving.done.wait()
    assert serving.maildir() == []
