"""tcprules in the running server: deny before any SMTP, variables for the backend,
tcpserver's order of keys, and `=host` keys with a confirmed reverse look-up.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from support.front import Front, capture_backend, toml_str, write_config
from support.hostile import session_log
from support.outbound_fakes import DnsResponder
from support.ucspi import Lines

from tlsfront.config.files import load_config
from tlsfront.inbound import remotehost
from tlsfront.inbound.server import Server

PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "{tls}"
cert = {{cert}}
backend = {{backend}}
rules = {rules}
remote_host_lookup = false
"""


def rules_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tcp.smtp"
    path.write_text(text)
    return path


async def start_with_rules(
    start_front: Any, tmp_path: Path, rules: str, tls: str = "starttls"
) -> Front:
    path = rules_file(tmp_path, rules)
    front: Front = await start_front(PROFILE.format(tls=tls, rules=toml_str(path)))
    return front


async def connect(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=source)


async def assert_denied(port: int, source: str = "127.0.0.1") -> None:
    """Closed before a single byte: no greeting, no 421, nothing."""
    with trio.fail_after(20):
        stream = await connect(port, source)
        assert await stream.receive_some() == b""
        await stream.aclose()


async def relay_attempt(port: int, source: str = "127.0.0.1") -> bytes:
    """HELO, MAIL, a foreign RCPT, QUIT; the reply to the RCPT."""
    with trio.fail_after(20):
        stream = await connect(port, source)
        lines = Lines(stream)
        assert (await lines.reply()).startswith(b"220 ")
        assert (await lines.command(b"HELO c")).startswith(b"250 ")
        assert (await lines.command(b"MAIL FROM:<a@example.net>")).startswith(b"250 ")
        reply = await lines.command(b"RCPT TO:<c@example.com>")
        assert (await lines.command(b"QUIT")).startswith(b"221 ")
        await stream.aclose()
    return reply


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_deny_closes_before_any_smtp(start_front: Any, tmp_path: Path, tls: str) -> None:
    front = await start_with_rules(start_front, tmp_path, ":deny\n", tls)
    await assert_denied(front.port("smtp"))
    assert front.sessions() == []  # no backend was ever started


async def test_relayclient_for_local_clients(
    start_front: Any, tmp_path: Path, client_context: ssl.SSLContext
) -> None:
    """The classic `127.:allow,RELAYCLIENT=""`: local clients relay, before TLS and after."""
    front = await start_with_rules(start_front, tmp_path, '127.:allow,RELAYCLIENT=""\n:allow\n')
    with session_log() as log, trio.fail_after(20):
        assert (await relay_attempt(front.port("smtp"))).startswith(b"250 ")
        await log.wait_ends(1)
    assert " relay=rule " in log.ends[0]  # the session end line says why it could relay
    with trio.fail_after(20):
        stream = await connect(front.port("smtp"))
        plain = Lines(stream)
        assert (await plain.reply()).startswith(b"220 ")
        assert (await plain.command(b"STARTTLS")).startswith(b"220 ")
        tls = trio.SSLStream(stream, client_context, server_hostname="localhost")
        await tls.do_handshake()
        lines = Lines(tls)
        assert (await lines.command(b"HELO c")).startswith(b"250 ")
        assert (await lines.command(b"MAIL FROM:<a@example.net>")).startswith(b"250 ")
        assert (await lines.command(b"RCPT TO:<c@example.com>")).startswith(b"250 ")
        assert (await lines.command(b"QUIT")).startswith(b"221 ")
        await tls.aclose()
    sessions = front.sessions()
    assert len(sessions) == 2  # one a session: started at MAIL
    for session in sessions:
        assert session["env"]["RELAYCLIENT"] == ""
    assert "SSL_PROTOCOL" in sessions[-1]["env"]


async def test_no_rule_for_the_client_no_relay(start_front: Any, tmp_path: Path) -> None:
    front = await start_with_rules(start_front, tmp_path, '10.:allow,RELAYCLIENT=""\n')
    with session_log() as log, trio.fail_after(20):
        assert (await relay_attempt(front.port("smtp"))).startswith(b"553 ")
        await log.wait_ends(1)
    assert " relay=no " in log.ends[0]
    (session,) = front.sessions()
    assert "RELAYCLIENT" not in session["env"]


async def test_variables_reach_the_backend(start_front: Any, tmp_path: Path) -> None:
    rules = (
        "127.0.0.1:allow,"
        'GREETING="hello",EMPTY="",QUOTED=/a "b",c=d/,'
        # a rule cannot misstate the client: the UCSPI variables win
        'TCPREMOTEIP="10.9.9.9",TCPLOCALPORT="1",TCPREMOTEHOST="trusted.example"\n'
    )
    front = await start_with_rules(start_front, tmp_path, rules)
    assert (await relay_attempt(front.port("smtp"))).startswith(b"553 ")
    (session,) = front.sessions()
    env = session["env"]
    assert (env["GREETING"], env["EMPTY"], env["QUOTED"]) == ("hello", "", 'a "b",c=d')
    assert env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["TCPLOCALPORT"] == str(front.port("smtp"))
    assert env["TCPREMOTEHOST"] == "trusted.example"  # no name looked up: a rule may set it


RANKED = """\
127.0.0.1:allow,WHICH="exact"
127.0.0.2-4:deny
127.0.0.10-12:allow,WHICH="range"
127.0.1.:allow,WHICH="127.0.1."
127.0.:allow,WHICH="127.0."
127.:allow,WHICH="127."
:deny
"""


@pytest.mark.parametrize(
    ("source", "which"),
    [
        ("127.0.0.1", "exact"),
        ("127.0.0.2", None),
        ("127.0.0.4", None),
        ("127.0.0.5", "127.0."),
        ("127.0.0.9", "127.0."),
        ("127.0.0.10", "range"),
        ("127.0.0.12", "range"),
        ("127.0.0.13", "127.0."),
        ("127.0.1.5", "127.0.1."),
        ("127.1.0.1", "127."),
    ],
)
async def test_first_match_as_tcpserver(
    start_front: Any, tmp_path: Path, source: str, which: str | None
) -> None:
    """Exact address, then the longest prefix; ranges are exact keys."""
    front = await start_with_rules(start_front, tmp_path, RANKED)
    if which is None:
        await assert_denied(front.port("smtp"), source)
        assert front.sessions() == []
        return
    assert (await relay_attempt(front.port("smtp"), source)).startswith(b"553 ")
    (session,) = front.sessions()
    assert session["env"]["WHICH"] == which
    assert session["env"]["TCPREMOTEIP"] == source


async def test_empty_key_is_the_default(start_front: Any, tmp_path: Path) -> None:
    front = await start_with_rules(start_front, tmp_path, '127.0.0.1:allow,WHICH="one"\n:deny\n')
    await assert_denied(front.port("smtp"), "127.0.0.2")
    assert (await relay_attempt(front.port("smtp"), "127.0.0.1")).startswith(b"553 ")
    assert [s["env"]["WHICH"] for s in front.sessions()] == ["one"]


# ------------------------------------------------------------------ =host keys

HOST_RULES = """\
=mail.example.net:allow,RELAYCLIENT="",WHICH="host"
=liar.example.net:allow,RELAYCLIENT="",WHICH="liar"
=.example.com:allow,WHICH="suffix"
=:allow,WHICH="named"
:deny
"""


def reverse(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


@pytest.fixture
async def dns_server(nursery: trio.Nursery) -> tuple[DnsResponder, str]:
    responder = DnsResponder()
    records = {
        "127.0.0.1": ("MAIL.Example.NET.", "127.0.0.1"),  # confirmed, any case
        "127.0.0.2": ("liar.example.net.", "192.0.2.1"),  # does not point back
        "127.0.0.3": ("a.b.example.com.", "127.0.0.3"),
        "127.0.0.4": ("other.example.org.", "127.0.0.4"),
        "127.0.0.6": ("evil\\013\\010x.example.com.", "127.0.0.6"),  # CR LF in a name
    }
    for ip, (name, address) in records.items():
        responder.add(reverse(ip), "PTR", name)
        responder.add(name, "A", address)
    # 127.0.0.5 has no PTR record at all
    return responder, await responder.listen(nursery)


async def start_with_dns(
    nursery: trio.Nursery,
    tmp_path: Path,
    tls_dir: Path,
    rules: str,
    dns_address: str,
    **keys: Any,
) -> Front:
    """A front whose inbound profile looks names up at `dns_address`, with `keys`."""
    capture = tmp_path / "capture"
    capture.mkdir()
    text = PROFILE.format(tls="starttls", rules=toml_str(rules_file(tmp_path, rules))).format(
        cert=toml_str(tls_dir / "servercert.pem"), backend=capture_backend(capture)
    )
    config = load_config(
        write_config(tmp_path, '[defaults]\nhostname = "front.example.org"\n' + text)
    )
    keys.setdefault("remote_host_lookup", True)
    profile = dataclasses.replace(config.profiles["smtp"], dns_servers=(dns_address,), **keys)
    config = dataclasses.replace(config, profiles={"smtp": profile})
    server = await nursery.start(Server(config).run)
    return Front(server, config, capture)


@pytest.mark.parametrize(
    ("source", "which", "host", "relay"),
    [
        ("127.0.0.1", "host", "mail.example.net", True),
        ("127.0.0.2", None, None, False),  # the PTR is not confirmed: no name, :deny
        ("127.0.0.3", "suffix", "a.b.example.com", False),
        ("127.0.0.4", "named", "other.example.org", False),
        ("127.0.0.5", None, None, False),  # no PTR
        ("127.0.0.6", None, None, False),  # unsafe name
    ],
)
async def test_host_keys(
    nursery: trio.Nursery,
    tmp_path: Path,
    tls_dir: Path,
    dns_server: tuple[DnsResponder, str],
    source: str,
    which: str | None,
    host: str | None,
    relay: bool,
) -> None:
    responder, address = dns_server
    front = await start_with_dns(nursery, tmp_path, tls_dir, HOST_RULES, address)
    port = front.port("smtp")
    if which is None:
        await assert_denied(port, source)
        assert front.sessions() == []
    else:
        reply = await relay_attempt(port, source)
        assert reply.startswith(b"250 " if relay else b"553 ")
        (session,) = front.sessions()
        env = session["env"]
        assert (env["WHICH"], env["TCPREMOTEHOST"]) == (which, host)
        assert ("RELAYCLIENT" in env) == relay
    assert (reverse(source), "PTR") in responder.queries


async def test_no_look_up_with_remote_host_lookup_false(
    nursery: trio.Nursery, tmp_path: Path, tls_dir: Path, dns_server: tuple[DnsResponder, str]
) -> None:
    """Like tcpserver -H: no DNS query, no TCPREMOTEHOST, and `=host` keys never match."""
    responder, address = dns_server
    rules = '=mail.example.net:allow,WHICH="host"\n:allow,WHICH="default"\n'
    front = await start_with_dns(
        nursery, tmp_path, tls_dir, rules, address, remote_host_lookup=False
    )
    assert (await relay_attempt(front.port("smtp"))).startswith(b"553 ")
    (session,) = front.sessions()
    assert "TCPREMOTEHOST" not in session["env"]
    assert session["env"]["WHICH"] == "default"
    assert responder.queries == []


@pytest.mark.parametrize(
    ("source", "paranoid", "host", "forward"),
    [
        ("127.0.0.1", False, "mail.example.net", False),
        ("127.0.0.2", False, "liar.example.net", False),  # as tcpserver without -p
        ("127.0.0.1", True, "mail.example.net", True),
        ("127.0.0.2", True, None, True),  # -p: the name does not point back
        ("127.0.0.5", False, None, False),  # no PTR record
    ],
)
async def test_remote_host_without_host_keys(
    nursery: trio.Nursery,
    tmp_path: Path,
    tls_dir: Path,
    dns_server: tuple[DnsResponder, str],
    source: str,
    paranoid: bool,
    host: str | None,
    forward: bool,
) -> None:
    """tcpserver's default: TCPREMOTEHOST from the PTR record; -p confirms it first."""
    responder, address = dns_server
    rules = ':allow,A="1"\n'
    front = await start_with_dns(
        nursery, tmp_path, tls_dir, rules, address, remote_host_paranoid=paranoid
    )
    assert (await relay_attempt(front.port("smtp"), source)).startswith(b"553 ")
    (session,) = front.sessions()
    assert session["env"].get("TCPREMOTEHOST") == host
    assert (reverse(source), "PTR") in responder.queries
    # the forward look-up is made only when something needs a confirmed name
    assert any(rdtype == "A" for _, rdtype in responder.queries) == forward


async def test_look_up_gives_up_after_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A resolver that never answers costs the timeout, then the name is unknown."""
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as silent:
        await silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        start = trio.current_time()
        cache = remotehost.HostCache()
        found = await remotehost.lookup_host(
            "127.0.0.1", [f"127.0.0.1:{port}"], seconds=3.0, cache=cache
        )
        assert found == remotehost.NO_NAME
        assert trio.current_time() - start == pytest.approx(3.0)
        # remembered: the next client from there does not wait again
        again = await remotehost.lookup_host(
            "127.0.0.1", [f"127.0.0.1:{port}"], seconds=3.0, cache=cache
        )
        assert again == remotehost.NO_NAME
        assert trio.current_time() - start == pytest.approx(3.0)


async def test_servfail_means_no_name(nursery: trio.Nursery) -> None:
    responder = DnsResponder()
    responder.servfail.add(reverse("127.0.0.1"))
    address = await responder.listen(nursery)
    with trio.fail_after(20):
        found = await remotehost.lookup_host(
            "127.0.0.1", [address], seconds=10, cache=remotehost.HostCache()
        )
        assert found == remotehost.NO_NAME


async def test_a_name_is_looked_up_once_for_many_sessions(
    nursery: trio.Nursery, tmp_path: Path, tls_dir: Path, dns_server: tuple[DnsResponder, str]
) -> None:
    """The cache answers the client's next connections: no query, no task."""
    responder, address = dns_server
    front = await start_with_dns(nursery, tmp_path, tls_dir, ":allow\n", address)
    for _ in range(3):
        assert (await relay_attempt(front.port("smtp"))).startswith(b"553 ")
    assert [s["env"]["TCPREMOTEHOST"] for s in front.sessions()] == ["mail.example.net"] * 3
    assert responder.queries == [(reverse("127.0.0.1"), "PTR")]
