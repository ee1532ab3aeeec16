"""The bundled sink, run as a real process: `python -m tlsfront.sink`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
import trio
from support.stdio_peer import Peer

from tlsfront.sink import DataDecoder, StrayNewline, rcpthost_allowed, read_maildir

SINK = [sys.executable, "-m", "tlsfront.sink"]
LIMIT = 20  # seconds for any one process


def sink_env(**extra: str) -> dict[str, str]:
    """A tcpserver-like environment, nothing inherited (no stray RELAYCLIENT)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TCPLOCALHOST": "mx.test",
        "TCPREMOTEIP": "192.0.2.7",
    }
    env.update(extra)
    return env


def run_sink(
    maildir: Path, script: bytes, *args: str, env: dict[str, str] | None = None
) -> tuple[list[bytes], int]:
    """One whole session from a script; the reply lines and the exit code."""
    done = subprocess.run(
        [*SINK, "--maildir", str(maildir), *args],
        input=script,
        capture_output=True,
        env=sink_env() if env is None else env,
        timeout=LIMIT,
        check=False,
    )
    assert done.stdout.endswith(b"\r\n") or not done.stdout
    return done.stdout.split(b"\r\n")[:-1], done.returncode


def envelope(rcpt: bytes = b"RCPT TO:<rcpt@example.com>\r\n") -> bytes:
    return b"EHLO client.test\r\nMAIL FROM:<sender@example.net>\r\n" + rcpt + b"DATA\r\n"


@asynccontextmanager
async def spawn(args: list[str], env: dict[str, str]) -> AsyncIterator[Peer]:
    proc = await trio.lowlevel.open_process(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        yield Peer(proc)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    await stream.aclose()
            await proc.wait()


def assert_undelivered(maildir: Path) -> None:
    assert read_maildir(maildir) == []
    if (maildir / "tmp").exists():
        assert os.listdir(maildir / "tmp") == []


RECEIVED = re.compile(
    rb"Received: from unknown \(HELO client\.test\) \(192\.0\.2\.7\)\n"
    rb"  by mx\.test with SMTP; (\d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000)\n"
)


async def test_full_session_delivers_one_message(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    with trio.fail_after(LIMIT):
        async with spawn([*SINK, "--maildir", str(maildir)], sink_env()) as peer:
            assert await peer.reply() == [b"220 mx.test ESMTP"]
            await peer.send(b"EHLO client.test\r\n")
            assert await peer.reply() == [b"250-mx.test", b"250-PIPELINING", b"250 8BITMIME"]
            await peer.send(b"MAIL FROM:<sender@example.net>\r\n")
            assert await peer.reply() == [b"250 ok"]
            await peer.send(b"RCPT TO:<rcpt@example.com>\r\n")
            assert await peer.reply() == [b"250 ok"]
            await peer.send(b"DATA\r\n")
            assert await peer.reply() == [b"354 go ahead"]
            await peer.send(b"Subject: hello\r\n\r\nbody line\r\n.\r\n")
            (accepted,) = await peer.reply()
            assert re.fullmatch(rb"250 ok \d+ qp \d+", accepted)
            await peer.send(b"QUIT\r\n")
            assert await peer.reply() == [b"221 mx.test"]
            assert await peer.rest() == b""
            assert await peer.proc.wait() == 0

    (message,) = read_maildir(maildir)
    head, _, rest = message.partition(b"\n")
    assert head == b"Return-Path: <sender@example.net>"
    m = RECEIVED.match(rest)
    assert m is not None, rest
    when = parsedate_to_datetime(m.group(1).decode()).replace(tzinfo=UTC)  # -0000: UTC
    assert abs((datetime.now(UTC) - when).total_seconds()) < 300
    assert rest[m.end() :] == b"Subject: hello\n\nbody line\n"
    assert sorted(os.listdir(maildir)) == ["cur", "new", "tmp"]
    assert os.listdir(maildir / "tmp") == []
    (name,) = os.listdir(maildir / "new")
    assert re.fullmatch(r"\d+\.M\d{6}P\d+Q1\..+", name)


@pytest.mark.parametrize(
    ("extra", "helo", "expected"),
    [
        ({}, b"client.test", b"from unknown (HELO client.test) (192.0.2.7)"),
        ({"TCPREMOTEHOST": "client.test"}, b"CLIENT.test", b"from client.test (192.0.2.7)"),
        (
            {"TCPREMOTEHOST": "real.test", "TCPREMOTEINFO": "joe"},
            b"client.test",
            b"from real.test (HELO client.test) (joe@192.0.2.7)",
        ),
        ({}, b"a b<c>(d)\0evil", b"from unknown (HELO a?b?c??d?) (192.0.2.7)"),
        ({}, None, b"from unknown (192.0.2.7)"),
    ],
)
def test_received_line_as_qmail_writes_it(
    tmp_path: Path, extra: dict[str, str], helo: bytes | None, expected: bytes
) -> None:
    hello = b"" if helo is None else b"HELO " + helo + b"\r\n"
    script = hello + b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n"
    _, code = run_sink(tmp_path, script, env=sink_env(**extra))
    assert code == 0
    (message,) = read_maildir(tmp_path)
    assert message.split(b"\n")[1] == b"Received: " + expected
    assert message.split(b"\n")[2].startswith(b"  by mx.test with SMTP; ")


def test_received_by_falls_back_to_local_ip_then_unknown(tmp_path: Path) -> None:
    script = envelope() + b"x\r\n.\r\n"
    env = sink_env(TCPLOCALIP="192.0.2.1")
    del env["TCPLOCALHOST"]
    replies, _ = run_sink(tmp_path / "a", script, "--hostname", "named.test", env=env)
    assert replies[0] == b"220 named.test ESMTP"
    assert read_maildir(tmp_path / "a")[0].split(b"\n")[2].startswith(b"  by 192.0.2.1 with")
    del env["TCPLOCALIP"]
    del env["TCPREMOTEIP"]
    replies, _ = run_sink(tmp_path / "b", script, env=env)
    assert replies[0] == b"220 unknown ESMTP"
    lines = read_maildir(tmp_path / "b")[0].split(b"\n")
    assert lines[1] == b"Received: from unknown (HELO client.test) (unknown)"
    assert lines[2].startswith(b"  by unknown with SMTP; ")


NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"


@pytest.mark.parametrize("relayclient", [None, ""])
def test_relay_needs_relayclient(tmp_path: Path, relayclient: str | None) -> None:
    extra = {} if relayclient is None else {"RELAYCLIENT": relayclient}
    script = envelope(b"RCPT TO:<x@elsewhere.test>\r\nRCPT TO:<y@example.com>\r\n")
    script += b"hi\r\n.\r\nQUIT\r\n"
    replies, code = run_sink(tmp_path, script, "--rcpthost", "example.com", env=sink_env(**extra))
    assert code == 0
    expected = b"250 ok" if relayclient is not None else NOGATEWAY
    assert replies[5:8] == [expected, b"250 ok", b"354 go ahead"]
    assert len(read_maildir(tmp_path)) == 1


def test_relay_refused_means_no_recipient(tmp_path: Path) -> None:
    replies, code = run_sink(
        tmp_path, envelope(b"RCPT TO:<x@elsewhere.test>\r\n"), "--rcpthost", "example.com"
    )
    assert replies[5:7] == [NOGATEWAY, b"503 RCPT first (#5.5.1)"]
    assert code == 1  # EOF without QUIT, as qmail's die_read


def test_rcpthosts_file_and_subdomain_rule(tmp_path: Path) -> None:
    rcpthosts = tmp_path / "rcpthosts"
    rcpthosts.write_text("# accepted domains\n\n.Example.COM  \nexample.org\n")
    addresses = {
        b"a@sub.example.com": True,
        b"a@deep.sub.EXAMPLE.com": True,
        b"a@example.com": False,  # only its subdomains are listed
        b"a@notexample.com": False,
        b"a@example.org": True,
        b"a@EXAMPLE.ORG": True,
        b"a@sub.example.org": False,
        b"a@example.org.evil": False,
        b"postmaster": True,  # no domain: local
        b'"a@b"@example.org': True,
        b"a@": False,
    }
    script = b"MAIL FROM:<s@example.net>\r\n" + b"".join(
        b"RCPT TO:<" + a + b">\r\n" for a in addresses
    )
    replies, _ = run_sink(tmp_path / "md", script, "--rcpthosts", str(rcpthosts))
    got = dict(zip(addresses, [r == b"250 ok" for r in replies[2:]], strict=True))
    assert got == addresses
    assert all(r in (b"250 ok", NOGATEWAY) for r in replies[2:])


def test_rcpthost_allowed_without_list_accepts_all() -> None:
    assert rcpthost_allowed(b"a@anywhere.test", None)
    assert not rcpthost_allowed(b"a@anywhere.test", frozenset())
    assert rcpthost_allowed(b"local", frozenset())
    assert rcpthost_allowed(b"a@x.y.test", frozenset({b".y.test"}))


def test_missing_rcpthosts_file_is_a_control_failure(tmp_path: Path) -> None:
    replies, code = run_sink(tmp_path, b"QUIT\r\n", "--rcpthosts", str(tmp_path / "nope"))
    assert (replies, code) == ([b"421 unable to read controls (#4.3.0)"], 1)


def test_dot_unstuffing_and_line_endings(tmp_path: Path) -> None:
    body = b"..leading\r\n.x\r\n...\r\nmid.dle\r\nbare\rcr\r\n\r\n.\r\n"
    replies, code = run_sink(tmp_path, envelope() + body + b"QUIT\r\n")
    assert code == 0
    assert replies[-2].startswith(b"250 ok ")
    (message,) = read_maildir(tmp_path)
    assert message.endswith(b" -0000\n.leading\nx\n..\nmid.dle\nbare\rcr\n\n")


def test_eof_mid_data_delivers_nothing(tmp_path: Path) -> None:
    replies, code = run_sink(tmp_path, envelope() + b"Subject: half\r\n\r\nsome of it\r\n")
    assert replies[-1] == b"354 go ahead"
    assert code != 0
    assert_undelivered(tmp_path)


def test_eof_inside_the_terminator(tmp_path: Path) -> None:
    _, code = run_sink(tmp_path, envelope() + b"text\r\n.\r")
    assert code != 0
    assert_undelivered(tmp_path)


@pytest.mark.parametrize(
    "body",
    [b"a\nb\r\n.\r\n", b"x\r\n.\n", b"x\n.\r\n", b"x\r\n\n.\r\n", b".\n", b"\n"],
)
def test_bare_lf_in_data_is_refused(tmp_path: Path, body: bytes) -> None:
    script = envelope() + body + b"MAIL FROM:<b@c>\r\nRCPT TO:<d@e>\r\nDATA\r\nx\r\n.\r\n"
    replies, code = run_sink(tmp_path, script)
    assert replies[-2:] == [b"354 go ahead", b"451 See http://pobox.com/~djb/docs/smtplf.html."]
    assert code == 1
    assert_undelivered(tmp_path)


@pytest.mark.parametrize(
    ("args", "extra"),
    [(["--databytes", "20"], {}), (["--databytes", "5000"], {"DATABYTES": "20"})],
)
def test_databytes_limit(tmp_path: Path, args: list[str], extra: dict[str, str]) -> None:
    exact = b"x" * 19 + b"\r\n"  # 20 bytes stored: x * 19 + LF
    over = b"x" * 20 + b"\r\n"
    script = envelope() + over + b".\r\n" + envelope() + exact + b".\r\nQUIT\r\n"
    replies, code = run_sink(tmp_path, script, *args, env=sink_env(**extra))
    assert code == 0
    assert replies[7] == b"552 sorry, that message size exceeds my databytes limit (#5.3.4)"
    assert replies[14].startswith(b"250 ok ")
    (message,) = read_maildir(tmp_path)
    assert message.endswith(b"\n" + b"x" * 19 + b"\n")
    assert os.listdir(tmp_path / "tmp") == []


async def test_pipelined_group_gets_replies_in_order(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    args = [*SINK, "--maildir", str(maildir), "--rcpthost", "example.com"]
    with trio.fail_after(LIMIT):
        async with spawn(args, sink_env()) as peer:
            await peer.send(
                b"EHLO client.test\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<a@example.com>\r\n"
                b"RCPT TO:<b@elsewhere.test>\r\nNOOP\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
            )
            # the replies come while the input stays open: no wait for more input
            replies = [await peer.reply() for _ in range(8)]
            assert replies == [
                [b"220 mx.test ESMTP"],
                [b"250-mx.test", b"250-PIPELINING", b"250 8BITMIME"],
                [b"250 ok"],
                [b"250 ok"],
                [NOGATEWAY],
                [b"250 ok"],
                [b"250 ok"],
                [b"354 go ahead"],
            ]
            await peer.send(b"hi\r\n.\r\nRSET\r\nMAIL FROM:<>\r\nRCPT TO:<x@example.com>\r\n")
            assert (await peer.reply())[0].startswith(b"250 ok ")
            following = [await peer.reply() for _ in range(3)]
            assert following == [[b"250 flushed"], [b"250 ok"], [b"250 ok"]]
            await peer.stdin.aclose()
            assert await peer.rest() == b""
            assert await peer.proc.wait() == 1
    assert len(read_maildir(maildir)) == 1


async def test_session_written_one_byte_at_a_time(tmp_path: Path) -> None:
    script = envelope() + b"Subject: slow\r\n\r\n..one\r\nbyte\r\n.\r\nQUIT\r\n"
    with trio.fail_after(LIMIT):
        async with spawn([*SINK, "--maildir", str(tmp_path / "a")], sink_env()) as peer:
            for i in range(len(script)):
                await peer.send(script[i : i + 1])
            out = await peer.rest()
            assert await peer.proc.wait() == 0
    whole, code = run_sink(tmp_path / "b", script)
    assert code == 0
    expected = b"".join(line + b"\r\n" for line in whole)
    assert re.sub(rb"\d+ qp \d+", b"", out) == re.sub(rb"\d+ qp \d+", b"", expected)
    assert out.endswith(b"221 mx.test\r\n")
    (a,) = read_maildir(tmp_path / "a")
    (b,) = read_maildir(tmp_path / "b")
    assert (
        a.split(b"\n")[3:] == b.split(b"\n")[3:] == [b"Subject: slow", b"", b".one", b"byte", b""]
    )


def test_commands_and_their_replies(tmp_path: Path) -> None:
    long_address = b"a" * 900
    script = (
        b"RCPT TO:<a@b>\r\n"
        b"DATA\r\n"
        b"helo client.test\r\n"
        b"MAIL FROM:<a@b>\r\n"
        b"DATA\r\n"
        b"STARTTLS\r\n"
        b"AUTH PLAIN AGFAYg==\r\n"
        b"BDAT 10 LAST\r\n"
        b"NOOP\r\n"
        b"VRFY a\r\n"
        b"HELP\r\n"
        b"MAIL FROM:<" + long_address + b">\r\n"
        b"RSET\r\n"
        b"RCPT TO:<a@b>\r\n"
        b"ehlo lf.only\n"
        b"QUIT\r\n"
        b"NOOP\r\n"
    )
    replies, code = run_sink(tmp_path, script)
    assert code == 0
    assert replies == [
        b"220 mx.test ESMTP",
        b"503 MAIL first (#5.5.1)",
        b"503 MAIL first (#5.5.1)",
        b"250 mx.test",
        b"250 ok",
        b"503 RCPT first (#5.5.1)",
        b"502 unimplemented (#5.5.1)",
        b"502 unimplemented (#5.5.1)",
        b"502 unimplemented (#5.5.1)",
        b"250 ok",
        b"252 send some mail, i'll try my best",
        b"214 qmail home page: http://pobox.com/~djb/qmail.html",
        b"555 syntax error (#5.5.4)",
        b"250 flushed",
        b"503 MAIL first (#5.5.1)",
        b"250-mx.test",
        b"250-PIPELINING",
        b"250 8BITMIME",
        b"221 mx.test",
    ]


def test_several_messages_in_one_session(tmp_path: Path) -> None:
    script = (
        envelope() + b"Subject: one\r\n\r\n.\r\n"
        b"RCPT TO:<r@example.com>\r\n"
        b"MAIL FROM:<>\r\nRCPT TO:<r@example.com>\r\nDATA\r\nSubject: two\r\n\r\n.\r\nQUIT\r\n"
    )
    replies, code = run_sink(tmp_path, script)
    assert code == 0
    assert replies[8] == b"503 MAIL first (#5.5.1)"  # DATA ends the transaction
    one, two = read_maildir(tmp_path)
    assert one.startswith(b"Return-Path: <sender@example.net>\n")
    assert one.endswith(b"\nSubject: one\n\n")
    assert two.startswith(b"Return-Path: <>\n")
    assert two.endswith(b"\nSubject: two\n\n")


def test_read_maildir_skips_tmp_and_dotfiles(tmp_path: Path) -> None:
    assert read_maildir(tmp_path / "none") == []
    for sub in ("tmp", "new", "cur"):
        (tmp_path / sub).mkdir()
    (tmp_path / "new" / "2.b").write_bytes(b"second")
    (tmp_path / "new" / "1.a").write_bytes(b"first")
    (tmp_path / "new" / ".hidden").write_bytes(b"no")
    (tmp_path / "tmp" / "0.c").write_bytes(b"no")
    assert read_maildir(tmp_path) == [b"first", b"second"]


def test_too_many_hops_is_refused(tmp_path: Path) -> None:
    looping = b"Received: from x by y\r\n" * 50 + b"Delivered-To: z\r\n" * 50
    assert looping.count(b"\r\n") == 100
    script = envelope() + looping + b"\r\nbody\r\n.\r\n" + envelope() + looping.partition(b"\n")[2]
    replies, _ = run_sink(tmp_path, script + b"\r\nbody\r\n.\r\nQUIT\r\n")
    assert replies[7] == b"554 too many hops, this message is looping (#5.4.6)"
    assert replies[14].startswith(b"250 ok ")  # 99 hops pass
    assert len(read_maildir(tmp_path)) == 1


def test_endless_command_line_is_refused(tmp_path: Path) -> None:
    replies, code = run_sink(tmp_path, b"EHLO " + b"a" * (1 << 20))
    assert replies == [b"220 mx.test ESMTP", b"500 sorry, that line is too long (#5.5.2)"]
    assert code == 1


async def test_idle_client_times_out(tmp_path: Path) -> None:
    args = [*SINK, "--maildir", str(tmp_path), "--timeout", "0.1"]
    with trio.fail_after(LIMIT):
        async with spawn(args, sink_env()) as peer:  # stdin stays open, never written
            assert await peer.rest() == b"220 mx.test ESMTP\r\n451 timeout (#4.4.2)\r\n"
            assert await peer.proc.wait() == 1


# the decoder on its own, each input also fed one byte at a time


def decode(data: bytes, step: int) -> tuple[bytes, int, bool]:
    decoder = DataDecoder()
    text, used, done = b"", 0, False
    while used < len(data) and not done:
        t, n, done = decoder.feed(data[used : used + step])
        text += t
        used += n
    return text, used, done


@pytest.mark.parametrize(
    ("raw", "text", "rest"),
    [
        (b".\r\n", b"", b""),
        (b"a\r\n.\r\nQUIT\r\n", b"a\n", b"QUIT\r\n"),
        (b"..\r\n.\r\n", b".\n", b""),
        (b".a\r\n.b.\r\n.\r\n", b"a\nb.\n", b""),
        (b"a\rb\r\r\n.\r\n", b"a\rb\r\n", b""),
        (b".\rx\r\n.\r\n", b".\rx\n", b""),
        (b".\r\r\n.\r\n", b".\r\n", b""),
        (b"x\r.\r\n.\r\n", b"x\r.\n", b""),
        (b"\0.\r\n.\r\n", b"\0.\n", b""),
    ],
)
@pytest.mark.parametrize("step", [1, 2, 1 << 16])
def test_decoder(raw: bytes, text: bytes, rest: bytes, step: int) -> None:
    got, used, done = decode(raw, step)
    assert (got, raw[used:], done) == (text, rest, True)


@pytest.mark.parametrize("raw", [b"\n", b"a\n", b".\n", b"a\r\n.\n", b"a\r\n\n"])
@pytest.mark.parametrize("step", [1, 1 << 16])
def test_decoder_bare_lf(raw: bytes, step: int) -> None:
    with pytest.raises(StrayNewline):
        decode(raw + b"\r\n.\r\n", step)


def test_decoder_counts_hops_in_the_header_only() -> None:
    decoder = DataDecoder()
    raw = b"Received: a\r\nDELIVERED-to: b\r\nreceivedX\r\nX-Received: c\r\n\r\nReceived: d\r\n"
    for i in range(len(raw)):
        decoder.feed(raw[i : i + 1])
    assert decoder.hops == 3
