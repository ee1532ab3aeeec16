"""tlsfront.smtp.body: the DATA body scanner against a slow reference.

The scanner's checks are built from whole-chunk C-level passes for speed
(translate, count, one regular expression), with what a chunk leaves open
carried to the next as a few numbers. The reference below does the same
job byte by byte over everything received so far, with no state carried
between feeds: at each feed it finds the first end of data, then judges
all the body before it in the order the scanner promises: NUL, bare CR/LF,
then line length (where a line's leading transparency dot does not count),
then size. A last CR is judged (and passed on) only once the byte after it
has come. For any input cut into any chunks, both must agree on every
result and on the error (its reply code) at the same feed.
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

    def __init__(self, max_line: int | None, max_size: int = 0) -> None:
        self.max_line = max_line
        self.max_size = max_size
        self.seen = b""  # every byte fed
        self.sent = 0  # how many of them were passed on
        self.refused = False

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        self.seen += data
        seen = self.seen
        # the DATA line's CRLF comes before the body: a first line of "." ends it
        wire = b"\r\n" + seen
        cut = -1
        for i in range(len(wire) - 4):
            if wire[i : i + 5] == b"\r\n.\r\n":
                cut = i + 5 - 2
                break
        if self.refused:  # only the end matters now
            return (b"", True, seen[cut:]) if cut >= 0 else (b"", False, b"")
        if cut >= 0:
            body, end = seen[: cut - 3], cut  # the lines up to the dot
        else:
            end = len(seen) - (seen[-1:] == b"\r")  # a last CR waits for the next byte
            body = seen[:end]
        try:
            self.check(body)
            if self.max_size and end > self.max_size:
                raise RemoteProtocolError(552, "5.3.4", "too big")
        except RemoteProtocolError:
            self.refused = True
            raise
        forward, self.sent = seen[self.sent : end], end
        return forward, cut >= 0, seen[cut:] if cut >= 0 else b""

    def check(self, lines: bytes) -> None:
        bad = RemoteProtocolError(550, "5.5.2", "bare CR, bare LF or NUL")
        if 0 in lines:
            raise bad
        for i, b in enumerate(lines):
            if b == 0x0D and lines[i + 1 : i + 2] != b"\n":
                raise bad
            if b == 0x0A and (i == 0 or lines[i - 1] != 0x0D):
                raise bad
        if self.max_line is None:
            return
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
    """Each feed's result, and the reply code of an error; after an error, the
    feeds go on (the first with b"") as a server that answers at the end does."""
    results: list[tuple[bytes, bool, bytes] | int] = []
    todo = list(chunks)
    while todo:
        try:
            result = scanner.feed(todo.pop(0))
        except RemoteProtocolError as exc:
            results.append(exc.code)
            todo.insert(0, b"")
            continue
        if isinstance(result, BodyResult):
            results.append((result.forward, result.done, result.rest))
            done = result.done
        else:
            results.append(result)
            done = result[1]
        if done:
            break
    return results


def errors(results: list[tuple[bytes, bool, bytes] | int]) -> list[int]:
    return [r for r in results if isinstance(r, int)]


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
@given(
    chunks=chunked(),
    max_line=st.one_of(st.none(), st.integers(3, 24)),
    max_size=st.sampled_from([0, 40, 200]),
)
def test_agrees_with_the_reference(
    chunks: list[bytes], max_line: int | None, max_size: int
) -> None:
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
    assert errors(outcome(BodyScanner(1000), [*chunks, b".\r\n"])) == [code]


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
        assert errors(got) == ([] if text == 998 else [500])
        last = got[-1]
        assert isinstance(last, tuple)
        assert last[1]  # the end of data was found (after a refusal too)
