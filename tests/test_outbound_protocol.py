"""The outbound relay's sans-I/O byte handling, whole and one byte at a time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tlsfront.outbound.protocol import (
    DataReader,
    LineReader,
    Reply,
    ReplyReader,
    SmtpSyntaxError,
    address_domain,
    parse_path,
    split_command,
)


def pieces(data: bytes, bytewise: bool) -> Iterator[bytes]:
    if bytewise:
        yield from (data[i : i + 1] for i in range(len(data)))
    else:
        yield data


def replies(data: bytes, bytewise: bool) -> list[Reply]:
    reader = ReplyReader()
    out = []
    for piece in pieces(data, bytewise):
        reader.receive_data(piece)
        while (reply := reader.next_reply()) is not None:
            out.append(reply)
    return out


@pytest.mark.parametrize("bytewise", [False, True])
def test_replies_single_and_multi_line(bytewise: bool) -> None:
    data = b"220 mx ready\r\n250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n354\r\n"
    got = replies(data, bytewise)
    assert [r.code for r in got] == [220, 250, 354]
    assert got[1].lines == (b"mx", b"PIPELINING", b"STARTTLS")
    assert got[1].encode() == b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
    assert got[2].encode() == b"354\r\n"
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
    with pytest.raises(SmtpSyntaxError):
        replies(bad, bytewise)


def test_reply_line_count_is_bounded() -> None:
    with pytest.raises(SmtpSyntaxError):
        replies(b"250-x\r\n" * 200, False)


def test_reply_reader_reports_buffered_bytes() -> None:
    reader = ReplyReader()
    reader.receive_data(b"220 go ahead\r\n250 injected")
    assert reader.next_reply() == Reply(220, (b"go ahead",))
    assert not reader.idle
    assert reader.buffered == b"250 injected"


def test_reply_make_and_printable_first_line() -> None:
    assert Reply.make(451, "4.4.0 try later").encode() == b"451 4.4.0 try later\r\n"
    assert Reply(550, (b"no\x1bsuch",)).first_line == "550 no?such"


@pytest.mark.parametrize("bytewise", [False, True])
def test_line_reader(bytewise: bool) -> None:
    reader = LineReader(512)
    lines = []
    for piece in pieces(b"HELO x\r\nMAIL FROM:<a@b>\r\nDATA\r\nbody", bytewise):
        reader.receive_data(piece)
        while (line := reader.next_line()) is not None:
            lines.append(line)
    assert lines == [b"HELO x", b"MAIL FROM:<a@b>", b"DATA"]
    assert reader.take_buffer() == b"body"


@pytest.mark.parametrize("bad", [b"HELO x\n", b"HELO a\rb\r\n", b"HELO a\0b\r\n", b"x" * 600])
@pytest.mark.parametrize("bytewise", [False, True])
def test_line_reader_refuses(bad: bytes, bytewise: bool) -> None:
    def read_all() -> None:
        reader = LineReader(512)
        for piece in pieces(bad, bytewise):
            reader.receive_data(piece)
            while reader.next_line() is not None:
                pass

    with pytest.raises(SmtpSyntaxError):
        read_all()


def run_data(data: bytes, bytewise: bool) -> tuple[bytes, bool, bytes]:
    reader = DataReader()
    forwarded, rest = b"", b""
    for piece in pieces(data, bytewise):
        if reader.done:
            rest += piece
            continue
        chunk = reader.feed(piece)
        forwarded += chunk.forward
        rest += chunk.rest
    return forwarded, reader.done, rest


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
    assert forwarded == b"line\r\n."  # the trailing CR waits for its LF


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
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_bare_cr_or_lf_in_the_body_is_refused(smuggle: bytes, bytewise: bool) -> None:
    reader = DataReader()
    forwarded = bytearray()

    def feed_all() -> None:
        for piece in pieces(smuggle + b"\r\n.\r\n", bytewise):
            forwarded.extend(reader.feed(piece).forward)

    with pytest.raises(SmtpSyntaxError):
        feed_all()
    # nothing that ends a line other than CRLF was passed on
    assert b"\n" not in bytes(forwarded).replace(b"\r\n", b"")
    assert b"\r" not in bytes(forwarded).replace(b"\r\n", b"")


def test_lenient_reader_finds_the_end_after_a_refusal() -> None:
    reader = DataReader(strict=False)
    chunk = reader.feed(b"x\ny\r\n.\r\nQUIT\r\n")
    assert chunk.done
    assert chunk.rest == b"QUIT\r\n"


def test_parse_path() -> None:
    assert parse_path(b"FROM:<a@b.test>", b"FROM") == b"a@b.test"
    assert parse_path(b"from: <>", b"FROM") == b""
    assert parse_path(b"TO:<@relay.test:c@d.test>", b"TO") == b"c@d.test"
    for bad in (b"FROM a@b", b"FROM:a@b", b"FROM:<a@b", b"FROM:<a@b> SIZE=10", b"TO:<a b@c>"):
        with pytest.raises(SmtpSyntaxError):
            parse_path(bad, b"FROM" if bad.startswith(b"FROM") else b"TO")


def test_address_domain() -> None:
    assert address_domain(b"bob@Example.TEST.") == "example.test"
    assert address_domain(b"a@b@c.test") == "c.test"
    assert address_domain(b"postmaster") is None
    assert address_domain(b"x@") is None
    assert address_domain("x@bücher.test".encode()) == "xn--bcher-kva.test"


def test_split_command() -> None:
    assert split_command(b"rcpt TO:<a@b>") == ("RCPT", b"TO:<a@b>")
    assert split_command(b"QUIT") == ("QUIT", b"")
