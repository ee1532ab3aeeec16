"""The SMTP wire layer both directions share: replies, command lines, the body.

The inbound side reads its backend, the outbound relay a remote server, with
the same `ReplyReader`; the outbound relay reads qmail-remote's commands and
body by the inbound side's rules. Every input also fed one byte at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tlsfront.smtp.body import BodyScanner
from tlsfront.smtp.command import address_domain, parse_command, parse_path, take_line
from tlsfront.smtp.errors import RemoteProtocolError
from tlsfront.smtp.reply import Reply
from tlsfront.smtp.replyreader import ReplyReader


def pieces(data: bytes, bytewise: bool) -> Iterator[bytes]:
    if bytewise:
        yield from (data[i : i + 1] for i in range(len(data)))
    else:
        yield data


def replies(data: bytes, bytewise: bool) -> list[Reply]:
    reader = ReplyReader()
    out = []
    for piece in pieces(data, bytewise):
        out += reader.feed(piece)
    return out


@pytest.mark.parametrize("bytewise", [False, True])
def test_replies_single_and_multi_line(bytewise: bool) -> None:
    data = b"220 mx ready\r\n250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n354\r\n"
    got = replies(data, bytewise)
    assert [r.code for r in got] == [220, 250, 354]
    assert got[1].lines == (b"mx", b"PIPELINING", b"STARTTLS")
    assert got[1].raw == b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
    assert got[2].raw == b"354\r\n"
    assert got[0].first_line == "220 mx ready"


@pytest.mark.parametrize(
    "bad",
    [
        b"25 short\r\n",
        b"abc text\r\n",
        b"250_x\r\n",
        b"199 too low\r\n",
        b"250-a\r\n251 b\r\n",
        b"250 bare lf\n",
        b"250 bare\rcr\r\n",
        b"250 " + b"x" * 5000 + b"\r\n",
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_malformed_replies(bad: bytes, bytewise: bool) -> None:
    with pytest.raises(RemoteProtocolError):
        replies(bad, bytewise)


def test_reply_line_count_is_bounded() -> None:
    with pytest.raises(RemoteProtocolError, match="too many lines"):
        replies(b"250-x\r\n" * 200, False)


def test_replies_before_a_failure_are_kept() -> None:
    """A 250 for a queued message is not lost to garbage behind it."""
    reader = ReplyReader()
    assert reader.feed(b"250 queued\r\ngarbage\r\n") == [Reply(250, (b"queued",))]
    assert reader.failure is not None
    assert reader.failure.text == "malformed reply line"
    with pytest.raises(RemoteProtocolError):
        reader.feed(b"221 bye\r\n")


def test_reply_reader_knows_a_partial_reply() -> None:
    reader = ReplyReader()
    assert reader.feed(b"220 go ahead\r\n250 injected") == [Reply(220, (b"go ahead",))]
    assert reader.partial
    assert reader.feed(b"\r\n") == [Reply(250, (b"injected",))]
    assert not reader.partial


def test_reply_make_and_printable_first_line() -> None:
    assert Reply.make(451, "4.4.0 try later").raw == b"451 4.4.0 try later\r\n"
    assert Reply.make(354).raw == b"354\r\n"
    assert Reply(550, (b"no\x1bsuch",)).first_line == "550 no?such"


def commands(data: bytes, bytewise: bool, buffer: bytearray) -> list[bytes]:
    lines = []
    for piece in pieces(data, bytewise):
        buffer += piece
        while (line := take_line(buffer, 512)) is not None:
            lines.append(parse_command(line).raw)
    return lines


@pytest.mark.parametrize("bytewise", [False, True])
def test_command_lines(bytewise: bool) -> None:
    buffer = bytearray()
    lines = commands(b"HELO x\r\nMAIL FROM:<a@b>\r\nDATA\r\nbody", bytewise, buffer)
    assert lines == [b"HELO x\r\n", b"MAIL FROM:<a@b>\r\n", b"DATA\r\n"]
    assert buffer == b"body"


@pytest.mark.parametrize("bad", [b"HELO x\n", b"HELO a\rb\r\n", b"HELO a\0b\r\n", b"x" * 600])
@pytest.mark.parametrize("bytewise", [False, True])
def test_command_lines_refused(bad: bytes, bytewise: bool) -> None:
    with pytest.raises(RemoteProtocolError):
        commands(bad, bytewise, bytearray())


def run_data(data: bytes, bytewise: bool) -> tuple[bytes, bool, bytes]:
    """The outbound relay's use of the body scanner: no line limit."""
    scanner = BodyScanner(max_line=None)
    forwarded, rest, done = b"", b"", False
    for piece in pieces(data, bytewise):
        if done:
            rest += piece
            continue
        chunk = scanner.feed(piece)
        forwarded += chunk.forward
        rest += chunk.rest
        done = chunk.done
    return forwarded, done, rest


@pytest.mark.parametrize("bytewise", [False, True])
def test_data_body_until_the_terminator(bytewise: bool) -> None:
    body = b"Subject: x\r\n\r\n..stuffed\r\nend\r\n.\r\nQUIT\r\n"
    forwarded, done, rest = run_data(body, bytewise)
    assert done
    assert forwarded == b"Subject: x\r\n\r\n..stuffed\r\nend\r\n.\r\n"
    assert rest == b"QUIT\r\n"


@pytest.mark.parametrize("bytewise", [False, True])
def test_empty_body(bytewise: bool) -> None:
    assert run_data(b".\r\nQUIT\r\n", bytewise) == (b".\r\n", True, b"QUIT\r\n")


@pytest.mark.parametrize("bytewise", [False, True])
def test_incomplete_body_is_not_done(bytewise: bool) -> None:
    forwarded, done, _ = run_data(b"line\r\n.\r", bytewise)
    assert not done
    assert forwarded == b"line\r\n."  # the last CR waits for the byte after it


@pytest.mark.parametrize(
    "smuggle",
    [
        b"a\n.\nMAIL",
        b"a\r.\rMAIL",
        b"a\r\n.\nMAIL",
        b"a\n.\r\nMAIL",
        b"a\r\n.\rMAIL",
        b"a\rb\r\n",
        b"\n",
        b"a\0b\r\n",
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_bare_cr_or_lf_in_the_body_is_refused(smuggle: bytes, bytewise: bool) -> None:
    scanner = BodyScanner(max_line=None)
    forwarded = bytearray()

    def feed_all() -> None:
        for piece in pieces(smuggle + b"\r\n.\r\n", bytewise):
            forwarded.extend(scanner.feed(piece).forward)

    with pytest.raises(RemoteProtocolError):
        feed_all()
    # nothing that ends a line other than CRLF was passed on
    assert b"\n" not in bytes(forwarded).replace(b"\r\n", b"")
    assert b"\r" not in bytes(forwarded).replace(b"\r\n", b"")


@pytest.mark.parametrize("cut", range(18))
def test_after_a_refusal_the_scanner_finds_the_end(cut: int) -> None:
    """A refused body is read to its end, so the reply comes after the final dot."""
    data = b"x\ny\r\nz\r\n.\r\nQUIT\r\n"
    scanner = BodyScanner(max_line=None)
    refused, done, forwarded, rest = False, False, b"", b""
    for piece in (data[:cut], data[cut:]):
        if done:
            rest += piece
            continue
        try:
            result = scanner.feed(piece)
        except RemoteProtocolError:
            refused = True
            result = scanner.feed(b"")  # what the failed feed held
        forwarded += result.forward if refused else b""
        done, rest = result.done, rest + result.rest
    assert refused
    assert done
    assert forwarded == b""
    assert rest == b"QUIT\r\n"


LONG = 3 * 65536  # a line longer than any chunk


@pytest.mark.parametrize("dot", [b"", b"."])
def test_no_line_limit_without_one(dot: bytes) -> None:
    """A line far beyond any limit is passed on as it comes, never held."""
    line = dot + b"y" * LONG + b"\r\n"
    scanner = BodyScanner(max_line=None)
    forwarded = b""
    for start in range(0, len(line), 4096):
        result = scanner.feed(line[start : start + 4096])
        forwarded += result.forward
        assert len(line[: start + 4096]) - len(forwarded) <= 1  # at most a CR held
    result = scanner.feed(b".\r\n")
    assert result.done
    assert forwarded + result.forward == line + b".\r\n"


def test_a_long_line_split_at_its_cr_is_still_checked() -> None:
    scanner = BodyScanner(max_line=None)
    scanner.feed(b"y" * (LONG + 10) + b"\r")
    with pytest.raises(RemoteProtocolError):
        scanner.feed(b"z\r\n.\r\n")


def test_parse_path() -> None:
    assert parse_path(b"FROM:<a@b.test>", b"FROM") == b"a@b.test"
    assert parse_path(b"from: <>", b"FROM") == b""
    assert parse_path(b"TO:<@relay.test:c@d.test>", b"TO") == b"c@d.test"
    for bad in (b"FROM a@b", b"FROM:a@b", b"FROM:<a@b", b"FROM:<a@b> SIZE=10", b"TO:<a b@c>"):
        with pytest.raises(RemoteProtocolError):
            parse_path(bad, b"FROM" if bad.startswith(b"FROM") else b"TO")


def test_address_domain() -> None:
    assert address_domain(b"bob@Example.TEST.") == "example.test"
    assert address_domain(b"a@b@c.test") == "c.test"
    assert address_domain(b"postmaster") is None
    assert address_domain(b"x@") is None
    assert address_domain("x@bücher.test".encode()) == "xn--bcher-kva.test"


def test_parse_command() -> None:
    command = parse_command(b"rcpt TO:<a@b>\r\n")
    assert (command.verb, command.args) == ("RCPT", b"TO:<a@b>")
    assert parse_command(b"QUIT\r\n").args == b""
