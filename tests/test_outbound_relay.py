"""The outbound relay end to end: qmail-remote's dialogue in, fake MX servers out."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from support.outbound_fakes import (
    DnsResponder,
    FakeMx,
    listen_on_addresses,
    make_runtime,
    outbound_profile,
    qmail_remote,
    relay_message,
    server_context,
    write_pem,
)

from tlsfront.config.files import config_from_dict
from tlsfront.outbound import stats
from tlsfront.outbound.listener import serve_outbound

MX = "mx.example.test"
RCPT = b"bob@example.test"


@pytest.fixture(scope="module")
def good_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def bad_ca() -> trustme.CA:
    return trustme.CA()


def tls_mx(ca: trustme.CA, *names: str, **kwargs: object) -> FakeMx:
    ctx = server_context(ca.issue_cert(*(names or (MX,))))
    return FakeMx(tls=ctx, **kwargs)  # type: ignore[arg-type]


async def routed(
    nursery: trio.Nursery, mx: FakeMx, **profile: object
) -> tuple[DnsResponder, dict[str, object]]:
    """Start `mx` and a DNS server that knows its name; profile keys routing to it."""
    port = await mx.listen(nursery)
    dns_ = DnsResponder()
    dns_.add(MX, "A", "127.0.0.1")
    servers = (await dns_.listen(nursery),)
    keys: dict[str, object] = {"routes": {"example.test": f"{MX}:{port}"}, "dns_servers": servers}
    keys.update(profile)
    return dns_, keys


async def test_opportunistic_tls_when_offered(nursery: trio.Nursery, good_ca: trustme.CA) -> None:
    mx = tls_mx(good_ca)
    _, keys = await routed(nursery, mx)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.rcpt == [b"250 2.1.5 ok"]
    assert result.dot == b"250 2.0.0 ok queued as 1234"
    assert mx.handshakes == 1
    assert [m.tls for m in mx.messages] == ["TLSv1.3"]
    assert mx.messages[0].body == b"Subject: test\r\n\r\nhello\r\n"
    assert mx.messages[0].sender == b"alice@relay.example.test"
    # EHLO said again after TLS, as RFC 3207 wants
    assert [c.split(b" ")[0] for c in mx.commands][:3] == [b"EHLO", b"STARTTLS", b"EHLO"]


async def test_cleartext_when_starttls_not_offered(nursery: trio.Nursery) -> None:
    mx = FakeMx()
    _, keys = await routed(nursery, mx)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert [m.tls for m in mx.messages] == [None]


async def test_broken_opportunistic_handshake_retries_in_clear(
    nursery: trio.Nursery, good_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    mx = tls_mx(good_ca, break_handshake=True)
    _, keys = await routed(nursery, mx)
    with trio.fail_after(20), caplog.at_level(logging.INFO, "tlsfront.outbound"):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert mx.connections == 2
    assert [m.tls for m in mx.messages] == [None]
    # the cleartext retry does not try STARTTLS again
    assert mx.commands.count(b"STARTTLS") == 1
    assert "retrying in cleartext" in caplog.text


async def test_tlshosts_pem_good_certificate_delivers_verified(
    nursery: trio.Nursery, good_ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_pem(tmp_path / "tlshosts", f"{MX}.pem", good_ca.cert_pem.bytes())
    mx = tls_mx(good_ca)
    _, keys = await routed(nursery, mx, tlshosts=tmp_path / "tlshosts")
    with trio.fail_after(20), caplog.at_level(logging.INFO, "tlsfront.outbound"):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert [m.tls for m in mx.messages] == ["TLSv1.3"]
    line = next(r.getMessage() for r in caplog.records if "result=delivered" in r.getMessage())
    assert "domain=example.test" in line
    assert f"mx={MX}[127.0.0.1]:" in line
    assert "tls=TLSv1.3 cipher=TLS_" in line
    assert "verified=yes policy=tlshosts" in line
    assert "reply='250 2.0.0 ok queued as 1234'" in line


async def test_tlshosts_pem_untrusted_certificate_defers(
    nursery: trio.Nursery, good_ca: trustme.CA, bad_ca: trustme.CA, tmp_path: Path
) -> None:
    write_pem(tmp_path / "tlshosts", f"{MX}.pem", good_ca.cert_pem.bytes())
    mx = tls_mx(bad_ca)
    _, keys = await routed(nursery, mx, tlshosts=tmp_path / "tlshosts")
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    assert b"certificate verify failed" in result.rcpt[0]
    assert mx.messages == []
    assert mx.connections == 1  # no retry in clear when TLS is required


async def test_tlshosts_pem_without_starttls_defers(
    nursery: trio.Nursery, good_ca: trustme.CA, tmp_path: Path
) -> None:
    write_pem(tmp_path / "tlshosts", f"{MX}.pem", good_ca.cert_pem.bytes())
    mx = tls_mx(good_ca, offer_starttls=False)
    _, keys = await routed(nursery, mx, tlshosts=tmp_path / "tlshosts")
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    assert b"STARTTLS not offered" in result.rcpt[0]
    assert mx.messages == []
    assert b"MAIL" not in b" ".join(mx.commands)


async def test_tlshosts_pem_host_name_mismatch_defers(
    nursery: trio.Nursery, good_ca: trustme.CA, tmp_path: Path
) -> None:
    write_pem(tmp_path / "tlshosts", f"{MX}.pem", good_ca.cert_pem.bytes())
    mx = tls_mx(good_ca, "other.example.test")
    _, keys = await routed(nursery, mx, tlshosts=tmp_path / "tlshosts")
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    assert b"does not match mx.example.test" in result.rcpt[0]
    assert mx.messages == []


async def test_tlshosts_wildcard_certificate_matches(
    nursery: trio.Nursery, good_ca: trustme.CA, tmp_path: Path
) -> None:
    write_pem(tmp_path / "tlshosts", f"{MX}.pem", good_ca.cert_pem.bytes())
    mx = tls_mx(good_ca, "*.example.test")
    _, keys = await routed(nursery, mx, tlshosts=tmp_path / "tlshosts")
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.dot.startswith(b"250 ")


async def test_exhaustivelist_means_clear_for_unlisted_hosts(
    nursery: trio.Nursery, good_ca: trustme.CA, tmp_path: Path
) -> None:
    write_pem(tmp_path / "tlshosts", "exhaustivelist", b"")
    write_pem(tmp_path / "tlshosts", "elsewhere.example.test.pem", good_ca.cert_pem.bytes())
    mx = tls_mx(good_ca)
    _, keys = await routed(nursery, mx, tlshosts=tmp_path / "tlshosts")
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert [m.tls for m in mx.messages] == [None]
    assert b"STARTTLS" not in mx.commands


async def test_exhaustivelist_keeps_tls_for_listed_hosts(
    nursery: trio.Nursery, good_ca: trustme.CA, tmp_path: Path
) -> None:
    write_pem(tmp_path / "tlshosts", "exhaustivelist", b"")
    write_pem(tmp_path / "tlshosts", f"{MX}.pem", good_ca.cert_pem.bytes())
    mx = tls_mx(good_ca)
    _, keys = await routed(nursery, mx, tlshosts=tmp_path / "tlshosts")
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert [m.tls for m in mx.messages] == ["TLSv1.3"]


async def test_notlshosts_means_clear_even_when_offered(
    nursery: trio.Nursery, good_ca: trustme.CA, tmp_path: Path
) -> None:
    write_pem(tmp_path / "notlshosts", MX, b"")
    mx = tls_mx(good_ca)
    _, keys = await routed(nursery, mx, notlshosts=tmp_path / "notlshosts")
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert [m.tls for m in mx.messages] == [None]
    assert b"STARTTLS" not in mx.commands


def dns_servers(keys: dict[str, object]) -> tuple[str, ...]:
    servers = keys["dns_servers"]
    assert isinstance(servers, tuple)
    return servers


async def test_qmail_control_directory_is_used(
    nursery: trio.Nursery, good_ca: trustme.CA, bad_ca: trustme.CA, tmp_path: Path
) -> None:
    write_pem(tmp_path / "control" / "tlshosts", f"{MX}.pem", good_ca.cert_pem.bytes())
    mx = tls_mx(bad_ca)
    _, keys = await routed(nursery, mx, qmail_control=str(tmp_path / "control"))
    # through the loader, which is where qmail_control is resolved into tlshosts
    keys.update(mode="outbound", listen=["127.0.0.1:0"], hostname="relay.example.test")
    keys.update(timeout_connect=5.0, timeout_handshake=5.0, dns_servers=list(dns_servers(keys)))
    profile = config_from_dict({"profile": {"out": keys}}).profiles["out"]
    assert profile.tlshosts == tmp_path / "control" / "tlshosts"
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")


async def test_tls_policy_table_encrypt_and_none(nursery: trio.Nursery, bad_ca: trustme.CA) -> None:
    mx = tls_mx(bad_ca, offer_starttls=False)
    _, keys = await routed(nursery, mx, tls_policy={".test": "encrypt"})
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.7.5 ")
    mx.offer_starttls = True
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.dot.startswith(b"250 ")  # encrypt: any certificate will do
    assert [m.tls for m in mx.messages] == ["TLSv1.3"]
    keys["tls_policy"] = {"example.test": "none"}
    with trio.fail_after(20):
        await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert [m.tls for m in mx.messages] == ["TLSv1.3", None]


async def test_tls_policy_verify_uses_the_trust_store(
    nursery: trio.Nursery, good_ca: trustme.CA, bad_ca: trustme.CA
) -> None:
    mx = tls_mx(good_ca)
    _, keys = await routed(nursery, mx, tls_policy={"example.test": "verify"})
    trusted = make_runtime(good_ca.cert_pem.bytes().decode())
    untrusted = make_runtime(bad_ca.cert_pem.bytes().decode())
    with trio.fail_after(20):
        refused = await relay_message(outbound_profile(**keys), untrusted, [RCPT])
        accepted = await relay_message(outbound_profile(**keys), trusted, [RCPT])
    assert refused.rcpt[0].startswith(b"451 4.7.5 ")
    assert accepted.dot.startswith(b"250 ")


async def test_remote_refusals_reach_qmail_exactly(nursery: trio.Nursery) -> None:
    mx = FakeMx(
        rcpt_replies={
            b"nobody@example.test": b"550-5.1.1 no such user\r\n550 5.1.1 really not\r\n",
            b"later@example.test": b"452 4.2.2 mailbox full\r\n",
        }
    )
    _, keys = await routed(nursery, mx)
    recipients = [b"nobody@example.test", b"later@example.test", RCPT]
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), recipients)
    assert result.rcpt == [
        b"550-5.1.1 no such user\r\n550 5.1.1 really not",
        b"452 4.2.2 mailbox full",
        b"250 2.1.5 ok",
    ]
    assert result.dot.startswith(b"250 ")
    assert mx.messages[0].recipients == [RCPT]


async def test_remote_4xx_at_the_final_dot_reaches_qmail(nursery: trio.Nursery) -> None:
    mx = FakeMx(dot_reply=b"451 4.3.0 queue trouble, try later\r\n")
    _, keys = await routed(nursery, mx)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.dot == b"451 4.3.0 queue trouble, try later"


async def test_remote_5xx_to_data_reaches_qmail(nursery: trio.Nursery) -> None:
    mx = FakeMx(data_reply=b"554 5.7.1 not from you\r\n")
    _, keys = await routed(nursery, mx)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.data == b"554 5.7.1 not from you"
    assert result.dot == b""


async def test_remote_refusing_mail_from_answers_each_rcpt(nursery: trio.Nursery) -> None:
    mx = FakeMx(mail_reply=b"553 5.1.8 bad sender domain\r\n")
    _, keys = await routed(nursery, mx)
    with trio.fail_after(20):
        result = await relay_message(
            outbound_profile(**keys), make_runtime(), [RCPT, b"carol@example.test"]
        )
    assert result.rcpt == [b"553 5.1.8 bad sender domain"] * 2
    assert result.data == b""


async def test_second_domain_in_one_transaction_is_deferred(nursery: trio.Nursery) -> None:
    mx = FakeMx()
    _, keys = await routed(nursery, mx)
    with trio.fail_after(20):
        result = await relay_message(
            outbound_profile(**keys), make_runtime(), [RCPT, b"dave@other.test"]
        )
    assert result.rcpt[0] == b"250 2.1.5 ok"
    assert result.rcpt[1].startswith(b"451 4.5.3 ")
    assert mx.messages[0].recipients == [RCPT]


async def test_dot_stuffing_passes_through_unchanged(nursery: trio.Nursery) -> None:
    mx = FakeMx()
    _, keys = await routed(nursery, mx)
    body = b"Subject: dots\n\n.\n..two\n.three\nend\n"
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT], body)
    assert result.dot.startswith(b"250 ")
    # the fake server keeps the stuffing: what qmail-remote sent is what it got
    assert mx.messages[0].body == b"Subject: dots\r\n\r\n..\r\n...two\r\n..three\r\nend\r\n"


async def test_mx_records_in_preference_order(nursery: trio.Nursery) -> None:
    best, backup = FakeMx(name="best"), FakeMx(name="backup")
    port = await listen_on_addresses(nursery, [(best, "127.0.0.2"), (backup, "127.0.0.3")])
    dns_ = DnsResponder()
    dns_.add("example.test", "MX", "20 backup.example.test.", "10 best.example.test.")
    dns_.add("best.example.test", "A", "127.0.0.2")
    dns_.add("backup.example.test", "A", "127.0.0.3")
    profile = outbound_profile(dns_servers=(await dns_.listen(nursery),))
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(smtp_port=port), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert (len(best.messages), len(backup.messages)) == (1, 0)
    assert ("example.test", "MX") in dns_.queries


async def test_unreachable_mx_falls_back_to_the_next(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backup = FakeMx(name="backup")
    port = await listen_on_addresses(nursery, [(backup, "127.0.0.3")])
    dns_ = DnsResponder()
    dns_.add("example.test", "MX", "10 dead.example.test.", "20 backup.example.test.")
    dns_.add("dead.example.test", "A", "127.0.0.2")  # nothing listens there
    dns_.add("backup.example.test", "A", "127.0.0.3")
    profile = outbound_profile(dns_servers=(await dns_.listen(nursery),))
    with trio.fail_after(20), caplog.at_level(logging.INFO, "tlsfront.outbound"):
        result = await relay_message(profile, make_runtime(smtp_port=port), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert len(backup.messages) == 1
    assert "dead.example.test[127.0.0.2]" in caplog.text


async def test_mx_with_4xx_greeting_falls_back_to_the_next(nursery: trio.Nursery) -> None:
    busy = FakeMx(greeting=b"421 4.3.2 too busy\r\n")
    backup = FakeMx(name="backup")
    port = await listen_on_addresses(nursery, [(busy, "127.0.0.2"), (backup, "127.0.0.3")])
    dns_ = DnsResponder()
    dns_.add("example.test", "MX", "10 busy.example.test.", "20 backup.example.test.")
    dns_.add("busy.example.test", "A", "127.0.0.2")
    dns_.add("backup.example.test", "A", "127.0.0.3")
    profile = outbound_profile(dns_servers=(await dns_.listen(nursery),))
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(smtp_port=port), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert (busy.connections, len(backup.messages)) == (1, 1)


async def test_all_mx_unreachable_is_a_4xx(nursery: trio.Nursery) -> None:
    dead = FakeMx()
    port = await dead.listen(nursery, "127.0.0.4")  # a free port on 127.0.0.2 and .3
    dns_ = DnsResponder()
    dns_.add("example.test", "MX", "10 a.example.test.", "20 b.example.test.")
    dns_.add("a.example.test", "A", "127.0.0.2")
    dns_.add("b.example.test", "A", "127.0.0.3")
    profile = outbound_profile(dns_servers=(await dns_.listen(nursery),))
    before = stats.outcomes[("deferred", "none")]
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(smtp_port=port), [RCPT])
    assert result.rcpt[0].startswith(b"451 4.4.0 ")
    assert b"b.example.test[127.0.0.3]" in result.rcpt[0]
    assert result.data == b""
    assert stats.outcomes[("deferred", "none")] == before + 1


async def test_no_mx_uses_the_a_record(nursery: trio.Nursery) -> None:
    mx = FakeMx()
    port = await listen_on_addresses(nursery, [(mx, "127.0.0.2")])
    dns_ = DnsResponder()
    dns_.add("example.test", "A", "127.0.0.2")
    profile = outbound_profile(dns_servers=(await dns_.listen(nursery),))
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(smtp_port=port), [RCPT])
    assert result.dot.startswith(b"250 ")
    assert len(mx.messages) == 1


async def test_dns_failures(nursery: trio.Nursery) -> None:
    dns_ = DnsResponder(servfail={"broken.test"})
    dns_.add("null.test", "MX", "0 .")
    profile = outbound_profile(dns_servers=(await dns_.listen(nursery),))
    with trio.fail_after(20):
        missing = await relay_message(profile, make_runtime(), [b"x@nowhere.test"])
        broken = await relay_message(profile, make_runtime(), [b"x@broken.test"])
        null = await relay_message(profile, make_runtime(), [b"x@null.test"])
    assert missing.rcpt[0].startswith(b"550 5.1.2 nowhere.test: no such domain")
    assert broken.rcpt[0].startswith(b"451 4.4.3 ")
    assert null.rcpt[0].startswith(b"550 5.1.2 null.test: does not accept mail")


async def test_routes_table_like_smtproutes(nursery: trio.Nursery) -> None:
    sub, default = FakeMx(name="sub"), FakeMx(name="default")
    sub_port, default_port = await sub.listen(nursery), await default.listen(nursery)
    routes = {".example.test": f"127.0.0.1:{sub_port}", "": f"[127.0.0.1]:{default_port}"}
    profile = outbound_profile(routes=routes)
    with trio.fail_after(20):
        await relay_message(profile, make_runtime(), [b"x@deep.example.test"])
        await relay_message(profile, make_runtime(), [b"x@example.org"])
    assert [m.recipients for m in sub.messages] == [[b"x@deep.example.test"]]
    assert [m.recipients for m in default.messages] == [[b"x@example.org"]]


async def test_client_outside_allow_from_is_refused() -> None:
    profile = outbound_profile(allow_from=("127.0.0.1/32",))
    with trio.fail_after(20):
        result = await relay_message(profile, make_runtime(), [RCPT], client_ip="192.0.2.7")
    assert result.greeting.startswith(b"554 5.7.1 ")
    assert result.mail == b""


async def test_client_certificate_presented_when_asked(
    nursery: trio.Nursery, good_ca: trustme.CA, tmp_path: Path
) -> None:
    client_ca = trustme.CA()
    clientcert = client_ca.issue_cert("relay.example.test", common_name="relay.example.test")
    pem = clientcert.private_key_pem.bytes() + clientcert.cert_chain_pems[0].bytes()
    path = write_pem(tmp_path, "clientcert.pem", pem)
    ctx = server_context(good_ca.issue_cert(MX), client_ca=client_ca)
    mx = FakeMx(tls=ctx)
    _, keys = await routed(nursery, mx, client_cert_file=path)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert result.dot.startswith(b"250 ")
    cert = mx.messages[0].client_cert
    assert cert is not None
    assert tuple(s for s in cert["subject"] if s[0][0] == "commonName") == (
        (("commonName", "relay.example.test"),),
    )


async def test_no_client_certificate_for_a_server_that_requires_one(
    nursery: trio.Nursery, good_ca: trustme.CA
) -> None:
    ctx = server_context(good_ca.issue_cert(MX), client_ca=trustme.CA())
    mx = FakeMx(tls=ctx)
    _, keys = await routed(nursery, mx)
    with trio.fail_after(20):
        result = await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    # the handshake fails on the server's side; opportunistic: delivered in clear
    assert result.dot.startswith(b"250 ")
    assert [m.tls for m in mx.messages] == [None]


async def test_qmail_remote_vanishing_mid_body_sends_no_final_dot(
    nursery: trio.Nursery,
) -> None:
    mx = FakeMx()
    _, keys = await routed(nursery, mx)
    client, server = trio.testing.memory_stream_pair()
    profile = outbound_profile(**keys)
    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            inner.start_soon(
                partial(serve_outbound, runtime=make_runtime()), server, "127.0.0.1", profile
            )
            for line in (b"HELO x", b"MAIL FROM:<a@b.test>", b"RCPT TO:<bob@example.test>"):
                await client.send_all(line + b"\r\n")
            await client.send_all(b"DATA\r\nSubject: half\r\n\r\nhalf a bo")
            buffered = b""
            while buffered.count(b"\r\n") < 5:
                buffered += await client.receive_some(4096)
            assert buffered.split(b"\r\n")[4].startswith(b"354")
            await client.aclose()
    assert mx.messages == []
    assert b"MAIL FROM:<a@b.test>" in mx.commands


async def test_bare_lf_in_the_body_is_refused_without_a_final_dot(
    nursery: trio.Nursery,
) -> None:
    mx = FakeMx()
    _, keys = await routed(nursery, mx)
    client, server = trio.testing.memory_stream_pair()
    profile = outbound_profile(**keys)
    script = (
        b"HELO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        b"Subject: smuggle\r\n\r\nx\n.\nMAIL FROM:<evil@b.test>\r\n.\r\nQUIT\r\n"
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            inner.start_soon(
                partial(serve_outbound, runtime=make_runtime()), server, "127.0.0.1", profile
            )
            await client.send_all(script)
            replies = b""
            while not replies.endswith(b"closing connection\r\n"):
                replies += await client.receive_some(4096)
    lines = replies.split(b"\r\n")
    assert lines[5].startswith(b"554 5.6.0 ")
    assert lines[6].startswith(b"221 ")
    assert mx.messages == []
    assert not any(b"evil" in c for c in mx.commands)


async def test_relay_over_real_tcp(nursery: trio.Nursery, good_ca: trustme.CA) -> None:
    mx = tls_mx(good_ca)
    _, keys = await routed(nursery, mx)
    profile = outbound_profile(**keys)

    async def handler(stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()
        await serve_outbound(stream, peer[0], profile, runtime=make_runtime())

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(20):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            result = await qmail_remote(stream, b"a@relay.example.test", [RCPT], b"hi\n")
    assert result.greeting.startswith(b"220 relay.example.test")
    assert result.dot.startswith(b"250 ")
    assert mx.messages[0].body == b"hi\r\n"


async def test_stats_count_outcomes_by_tls(nursery: trio.Nursery, good_ca: trustme.CA) -> None:
    mx = tls_mx(good_ca)
    _, keys = await routed(nursery, mx)
    before = stats.snapshot()["outcomes"].get("delivered:encrypted", 0)
    with trio.fail_after(20):
        await relay_message(outbound_profile(**keys), make_runtime(), [RCPT])
    assert stats.snapshot()["outcomes"]["delivered:encrypted"] == before + 1


async def test_two_transactions_in_one_session(nursery: trio.Nursery) -> None:
    mx = FakeMx()
    _, keys = await routed(nursery, mx)
    client, server = trio.testing.memory_stream_pair()
    profile = outbound_profile(**keys)
    script = b"EHLO x\r\n" + b"".join(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<%s@example.test>\r\nDATA\r\n" % name
        + b"Subject: %s\r\n\r\nbody\r\n.\r\n" % name
        for name in (b"one", b"two")
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            inner.start_soon(
                partial(serve_outbound, runtime=make_runtime()), server, "127.0.0.1", profile
            )
            for piece in (script[:40], script[40:]):
                await client.send_all(piece)
            await client.send_all(b"QUIT\r\n")
            replies = b""
            while not replies.endswith(b"closing connection\r\n"):
                replies += await client.receive_some(4096)
    codes = [line[:3] for line in replies.split(b"\r\n") if line]
    assert codes == [b"220", b"250", *[b"250", b"250", b"354", b"250"] * 2, b"221"]
    assert [m.recipients for m in mx.messages] == [[b"one@example.test"], [b"two@example.test"]]
    assert mx.connections == 2


async def test_body_pipelined_behind_a_refused_data_is_not_run(nursery: trio.Nursery) -> None:
    mx = FakeMx(data_reply=b"554 5.7.1 no data for you\r\n")
    _, keys = await routed(nursery, mx)
    client, server = trio.testing.memory_stream_pair()
    profile = outbound_profile(**keys)
    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            inner.start_soon(
                partial(serve_outbound, runtime=make_runtime()), server, "127.0.0.1", profile
            )
            await client.send_all(
                b"HELO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bob@example.test>\r\n"
            )
            replies = b""
            while replies.count(b"\r\n") < 4:
                replies += await client.receive_some(4096)
            await client.send_all(b"DATA\r\nRCPT TO:<evil@example.test>\r\n.\r\n")
            while chunk := await client.receive_some(4096):
                replies += chunk
    lines = replies.split(b"\r\n")
    assert lines[4] == b"554 5.7.1 no data for you"
    assert lines[5].startswith(b"421 4.5.0 ")
    assert not any(b"evil" in c for c in mx.commands)
