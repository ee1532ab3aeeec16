"""MTA-STS: policies fetched over HTTPS from a local server, enforce and testing modes."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field

import pytest
import trio
import trustme
from support.outbound_fakes import (
    DnsResponder,
    FakeMx,
    listen_on_addresses,
    make_runtime,
    outbound_profile,
    relay_message,
    server_context,
)

from tlsfront.outbound.mtasts import (
    StsError,
    mx_matches,
    parse_policy,
    parse_response,
    parse_txt,
)

RCPT = b"bob@example.test"


@dataclass
class PolicyServer:
    """HTTPS server for mta-sts.example.test: one policy, a request counter."""

    ctx: ssl.SSLContext
    body: bytes
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, self.ctx, server_side=True, https_compatible=True)
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = await tls.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            self.requests.append(request)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
            await tls.send_all(head % len(self.body) + self.body)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(tls)


@pytest.fixture(scope="module")
def sts_ca() -> trustme.CA:
    return trustme.CA()


async def sts_setup(
    nursery: trio.Nursery, sts_ca: trustme.CA, policy: str, *, mx_cert: str = "mx.example.test"
) -> tuple[FakeMx, PolicyServer, dict[str, object], dict[str, object]]:
    mx = FakeMx(tls=server_context(sts_ca.issue_cert(mx_cert)))
    smtp_port = await listen_on_addresses(nursery, [(mx, "127.0.0.2")])
    https_cert = sts_ca.issue_cert("mta-sts.example.test")
    server = PolicyServer(server_context(https_cert), policy.encode())
    listeners = await nursery.start(trio.serve_tcp, server.handle, 0)
    https_port = listeners[0].socket.getsockname()[1]
    dns_ = DnsResponder()
    dns_.add("example.test", "MX", "10 mx.example.test.")
    dns_.add("mx.example.test", "A", "127.0.0.2")
    dns_.add("_mta-sts.example.test", "TXT", '"v=STSv1; id=20240101T000000"')
    dns_.add("mta-sts.example.test", "A", "127.0.0.1")
    profile = {"mta_sts": True, "dns_servers": (await dns_.listen(nursery),)}
    runtime = {"smtp_port": smtp_port, "https_port": https_port}
    return mx, server, profile, runtime


POLICY = "version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n"


async def test_enforce_delivers_to_a_matching_verified_mx(
    nursery: trio.Nursery, sts_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    policy = POLICY.format(mode="enforce", mx="*.example.test")
    mx, server, keys, rt = await sts_setup(nursery, sts_ca, policy)
    runtime = make_runtime(sts_ca.cert_pem.bytes().decode(), **rt)
    with trio.fail_after(20), caplog.at_level(logging.INFO, "tlsfront.outbound"):
        first = await relay_message(outbound_profile(**keys), runtime, [RCPT])
        second = await relay_message(outbound_profile(**keys), runtime, [RCPT])
    assert first.dot.startswith(b"250 ")
    assert second.dot.startswith(b"250 ")
    assert [m.tls for m in mx.messages] == ["TLSv1.3", "TLSv1.3"]
    assert len(server.requests) == 1  # cached for max_age
    assert server.requests[0].startswith(b"GET /.well-known/mta-sts.txt HTTP/1.0\r\n")
    assert b"Host: mta-sts.example.test\r\n" in server.requests[0]
    assert "verified=yes policy=mta-sts" in caplog.text


async def test_enforce_refuses_an_mx_not_in_the_policy(
    nursery: trio.Nursery, sts_ca: trustme.CA
) -> None:
    policy = POLICY.format(mode="enforce", mx="mail.elsewhere.test")
    mx, _, keys, rt = await sts_setup(nursery, sts_ca, policy)
    runtime = make_runtime(sts_ca.cert_pem.bytes().decode(), **rt)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), runtime, [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    assert b"not in the MTA-STS policy" in result.rcpt[0]
    assert mx.connections == 0


async def test_enforce_refuses_a_certificate_for_another_name(
    nursery: trio.Nursery, sts_ca: trustme.CA
) -> None:
    policy = POLICY.format(mode="enforce", mx="mx.example.test")
    mx, _, keys, rt = await sts_setup(nursery, sts_ca, policy, mx_cert="other.example.test")
    runtime = make_runtime(sts_ca.cert_pem.bytes().decode(), **rt)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), runtime, [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    assert mx.messages == []


async def test_testing_mode_only_logs(
    nursery: trio.Nursery, sts_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    policy = POLICY.format(mode="testing", mx="mail.elsewhere.test")
    mx, _, keys, rt = await sts_setup(nursery, sts_ca, policy, mx_cert="other.example.test")
    runtime = make_runtime(sts_ca.cert_pem.bytes().decode(), **rt)
    with trio.fail_after(20), caplog.at_level(logging.INFO, "tlsfront.outbound"):
        result = await relay_message(outbound_profile(**keys), runtime, [RCPT])
    assert result.dot.startswith(b"250 ")
    assert [m.tls for m in mx.messages] == ["TLSv1.3"]
    assert "mta-sts testing: MX host not in the MTA-STS policy" in caplog.text
    assert "mta-sts testing: certificate does not match mx.example.test" in caplog.text
    assert "verified=no policy=mta-sts-testing" in caplog.text


async def test_policy_server_with_an_untrusted_certificate_means_no_policy(
    nursery: trio.Nursery, sts_ca: trustme.CA
) -> None:
    policy = POLICY.format(mode="enforce", mx="mail.elsewhere.test")
    _mx, server, keys, rt = await sts_setup(nursery, sts_ca, policy)
    runtime = make_runtime(trustme.CA().cert_pem.bytes().decode(), **rt)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), runtime, [RCPT])
    assert result.dot.startswith(b"250 ")  # no policy: opportunistic
    assert server.requests == []


async def test_mta_sts_off_by_default(nursery: trio.Nursery, sts_ca: trustme.CA) -> None:
    policy = POLICY.format(mode="enforce", mx="mail.elsewhere.test")
    _mx, server, keys, rt = await sts_setup(nursery, sts_ca, policy)
    keys["mta_sts"] = False
    runtime = make_runtime(sts_ca.cert_pem.bytes().decode(), **rt)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), runtime, [RCPT])
    assert result.dot.startswith(b"250 ")
    assert server.requests == []


def test_parse_txt() -> None:
    assert parse_txt(["v=STSv1; id=abc123;"]) == "abc123"
    assert parse_txt(["v=STSv1;id=abc123"]) == "abc123"
    assert parse_txt(["other", "v=STSv1; id=x1"]) == "x1"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two: no policy
    assert parse_txt(["v=STSv1; id=not valid!"]) is None
    assert parse_txt(["v=STSv10; id=abc"]) is None
    assert parse_txt([]) is None


def test_parse_policy() -> None:
    text = (
        "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.Example.NET\nmax_age: 604800\n"
    )
    policy = parse_policy(text)
    assert policy.mode == "enforce"
    assert policy.mx == ("mail.example.com", "*.example.net")
    assert policy.max_age == 604800
    assert parse_policy("version: STSv1\r\nmode: none\r\nmax_age: 999999999\r\n").max_age == (
        31557600
    )
    for bad in (
        "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a\n",
        "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
        "garbage",
    ):
        with pytest.raises(StsError):
            parse_policy(bad)


def test_mx_patterns() -> None:
    assert mx_matches(["mail.example.com"], "MAIL.example.com.")
    assert mx_matches(["*.example.com"], "mx1.example.com")
    assert not mx_matches(["*.example.com"], "a.b.example.com")
    assert not mx_matches(["*.example.com"], "example.com")
    assert not mx_matches(["mail.example.com"], "mail.example.org")


def test_parse_response() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nbody"
    assert parse_response(ok) == "body"
    sized = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nbody"
    assert parse_response(sized) == "bo"
    for bad in (
        b"HTTP/1.1 301 Moved\r\nLocation: x\r\nContent-Type: text/plain\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\nbody",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nbody",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n",
        b"SMTP 220\r\n\r\n",
    ):
        with pytest.raises(StsError):
            parse_response(bad)
