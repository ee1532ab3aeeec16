"""tlsfront.smtp.body: the DATA body scanner against a slow reference.

The scanner's checks are built from whole-buffer `bytes` passes for speed
(translate, shifted comparison, memrchr walks). The reference below does
the same job line by line and byte by byte, in the order the scanner
promises: end of data first, then NUL, bare CR/LF, line length (where a
line's leading transparency dot does not count). For any
input cut into any chunks, both must agree on every result and on the
error (its reply code) at the same feed.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsfront.smtp.body import BodyResult, BodyScanner
from tlsfront.smtp.errors import RemoteProtocolError


class Reference:
    """BodyScanner's contract, written for clarity rather than speed."""

    def __init__(self, max_line: int, max_size: int = 0) -> None:
        self.max_line = max_line
        self.max_size = max_size
        self.held = b""
        self.size = 0

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        data = self.held + data
        cut = -1
        if data[:3] == b".\r\n":
            cut = 3
        else:
            for i in range(len(data) - 4):
                if data[i : i + 5] == b"\r\n.\r\n":
                    cut = i + 5
                    break
        if cut >= 0:
            self.check(data[: cut - 3])
            self.held = b""
            self.count(cut)
            return data[:cut], True, data[cut:]
        last = max((i for i, b in enumerate(data) if b == 0x0A), default=-1)
        complete, self.held = data[: last + 1], data[last + 1 :]
        if len(self.held) - self.held.startswith(b".") >= self.max_line:
            raise RemoteProtocolError(500, "5.5.2", "line too long")
        self.check(complete)
        self.count(len(complete))
        return complete, False, b""

    def count(self, n: int) -> None:
        self.size += n
        if self.max_size and self.size > self.max_size:
            raise RemoteProtocolError(552, "5.3.4", "too big")

    def check(self, lines: bytes) -> None:
        bad = RemoteProtocolError(550, "5.5.2", "bare CR, bare LF or NUL")
        if 0 in lines:
            raise bad
        for i, b in enumerate(lines):
            if b == 0x0D and lines[i + 1 : i + 2] != b"\n":
                raise bad
            if b == 0x0A and (i == 0 or lines[i - 1] != 0x0D):
                raise bad
        run, line_start = 0, True
        for b in lines:
            if b == 0x0A:
                run, line_start = 0, True
                continue
            if not (line_start and b == 0x2E):  # the transparency dot is not counted
                run += 1
            line_start = False
            if run >= self.max_line:
                raise RemoteProtocolError(500, "5.5.2", "line too long")


def outcome(
    scanner: BodyScanner | Reference, chunks: list[bytes]
) -> list[tuple[bytes, bool, bytes] | int]:
    """Each feed's result, and the reply code of the error that ended it."""
    results: list[tuple[bytes, bool, bytes] | int] = []
    for chunk in chunks:
        try:
            result = scanner.feed(chunk)
        except RemoteProtocolError as exc:
            results.append(exc.code)
            break
        if isinstance(result, BodyResult):
            results.append((result.forward, result.done, result.rest))
            done = result.done
        else:
            results.append(result)
            done = result[1]
        if done:
            break
    return results


# Pieces that make ends of data, fake ends, bare CR/LF and NUL likely.
PIECES = st.sampled_from(
    [b"a", b"xyz", b".", b"..", b"\r", b"\n", b"\r\n", b"\0", b"\r\n.\r\n", b".\r\n", b"\n.\n"]
)


@st.composite
def chunked(draw: st.DrawFn) -> list[bytes]:
    data = b"".join(draw(st.lists(PIECES, max_size=60)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=1500, deadline=None)
@given(chunks=chunked(), max_line=st.integers(3, 24), max_size=st.sampled_from([0, 40, 200]))
def test_agrees_with_the_reference(chunks: list[bytes], max_line: int, max_size: int) -> None:
    expected = outcome(Reference(max_line, max_size), chunks)
    assert outcome(BodyScanner(max_line, max_size), chunks) == expected


@st.composite
def long_lines(draw: st.DrawFn) -> tuple[bytes, int]:
    """CRLF lines around the limit, so the line-length walk meets every boundary."""
    limit = draw(st.integers(3, 40))
    lengths = draw(st.lists(st.integers(0, limit + 1), min_size=1, max_size=40))
    dots = draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    lines = (b"." * dot + b"x" * n + b"\r\n" for n, dot in zip(lengths, dots, strict=True))
    return b"".join(lines), limit


@settings(max_examples=800, deadline=None)
@given(case=long_lines(), cut=st.integers(0, 2000))
def test_line_limits_agree(case: tuple[bytes, int], cut: int) -> None:
    data, limit = case
    chunks = [data[:cut], data[cut:], b".\r\n"]
    expected = outcome(Reference(limit), chunks)
    assert outcome(BodyScanner(limit), chunks) == expected


LINE = b"X" * 76 + b"\r\n"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (b"bare\nLF\r\n", 550),
        (b"bare\rCR\r\n", 550),
        (b"LF before CR\n\r\n", 550),
        (b"NUL\0\r\n", 550),
        (b"\n.\n", 550),
        (b"y" * 1000 + b"\r\n", 500),
    ],
)
@pytest.mark.parametrize("where", [0, 700, 16_000, 65_000])
def test_big_chunks_refuse_a_bad_line_anywhere(bad: bytes, code: int, where: int) -> None:
    """One bad line among 64 KiB of good ones, as a bulk message arrives."""
    good = LINE * (70_000 // len(LINE))
    at = where - where % len(LINE)
    data = good[:at] + bad + good[at:]
    chunks = [data[start : start + 65_536] for start in range(0, len(data), 65_536)]
    assert outcome(BodyScanner(1000), [*chunks, b".\r\n"])[-1] == code


def test_big_clean_body_passes_untouched() -> None:
    body = (LINE * 2000).replace(b"XXXX", b"X.XX", 100)
    scanner = BodyScanner(1000)
    forwarded = b""
    data = body + b".\r\nQUIT\r\n"
    for start in range(0, len(data), 65_536):
        result = scanner.feed(data[start : start + 65_536])
        forwarded += result.forward
    assert result.done
    assert forwarded == body + b".\r\n"
    assert result.rest == b"QUIT\r\n"
    assert scanner.size == len(forwarded)


@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("text", [998, 999])
def test_rfc_5321_line_limit_does_not_count_the_transparency_dot(dot: bool, text: int) -> None:
    """A 998-octet line is legal, also when it starts with "." and is stuffed to 999."""
    line = (b"." if dot else b"x") + b"y" * (text - 1)
    wire = (b"." + line if dot else line) + b"\r\n"
    data = b"Subject: x\r\n\r\n" + wire + b".\r\n"
    for cut in range(len(data) + 1):
        got = outcome(BodyScanner(1000), [data[:cut], data[cut:]])
        assert got == outcome(Reference(1000), [data[:cut], data[cut:]])
        if text == 998:
            last = got[-1]
            assert isinstance(last, tuple)
            assert last[1]  # the end of data was found, nothing refused
        else:
            assert got[-1] == 500
