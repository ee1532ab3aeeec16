"""Where each table and key stands in a TOML text, for error messages.

tomllib reports no positions for keys; a configuration error must still name
the line. This scans text that tomllib has already accepted.
"""

from __future__ import annotations

import contextlib
import re
import tomllib


class KeyLines:
    """First line of every table header and (dotted) key path in valid TOML text.

    A scanner, not a parser: it relies on tomllib having accepted the text, and
    only skips strings, arrays and inline tables well enough to see keys.
    """

    _BARE = re.compile(r"[A-Za-z0-9_-]+")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, ...], int] = {}
        self._t = text
        self._i = 0
        self._line = 1
        # on a surprise, what was mapped so far still helps
        with contextlib.suppress(IndexError, ValueError, tomllib.TOMLDecodeError):
            self._document()

    def find(self, path: tuple[str, ...]) -> int | None:
        """The line of `path`, else of its longest prefix that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def _record(self, path: tuple[str, ...]) -> None:
        for n in range(1, len(path) + 1):
            self.lines.setdefault(path[:n], self._line)

    def _peek(self, n: int = 1) -> str:
        return self._t[self._i : self._i + n]

    def _blank(self, newlines: bool) -> bool:
        """Skip white space and comments (and newlines); True if text remains."""
        t = self._t
        while self._i < len(t):
            c = t[self._i]
            if c in " \t\r":
                self._i += 1
            elif c == "\n" and newlines:
                self._line += 1
                self._i += 1
            elif c == "#":
                while self._i < len(t) and t[self._i] != "\n":
                    self._i += 1
            else:
                return True
        return False

    def _document(self) -> None:
        table: tuple[str, ...] = ()
        while self._blank(newlines=True):
            if self._peek() == "[":
                self._i += 2 if self._peek(2) == "[[" else 1
                table = self._key()
                self._record(table)
                self._blank(newlines=False)
                while self._peek() == "]":
                    self._i += 1
            else:
                path = table + self._key()
                self._record(path)
                self._equals()
                self._value(path)

    def _key(self) -> tuple[str, ...]:
        parts = []
        while True:
            self._blank(newlines=False)
            c = self._peek()
            if c in "\"'":
                start = self._i
                self._string()
                parts.append(tomllib.loads("k = " + self._t[start : self._i])["k"])
            else:
                match = self._BARE.match(self._t, self._i)
                if match is None:
                    raise ValueError("no key")
                parts.append(match.group())
                self._i = match.end()
            self._blank(newlines=False)
            if self._peek() != ".":
                return tuple(parts)
            self._i += 1

    def _equals(self) -> None:
        self._blank(newlines=False)
        if self._peek() != "=":
            raise ValueError("no '='")
        self._i += 1

    def _string(self) -> None:
        t = self._t
        quote = t[self._i]
        triple = self._peek(3) == quote * 3
        self._i += 3 if triple else 1
        while True:
            c = t[self._i]
            if c == "\\" and quote == '"':
                if t[self._i + 1] == "\n":
                    self._line += 1
                self._i += 2
            elif triple and self._peek(3) == quote * 3:
                self._i += 3
                for _ in range(2):  # a closing """ may follow up to two quotes
                    if self._peek() == quote:
                        self._i += 1
                return
            elif c == quote and not triple:
                self._i += 1
                return
            else:
                if c == "\n":
                    self._line += 1
                self._i += 1

    def _value(self, path: tuple[str, ...]) -> None:
        self._blank(newlines=False)
        c = self._peek()
        if c in "\"'":
            self._string()
        elif c == "[":
            self._i += 1
            while self._blank(newlines=True) and self._peek() != "]":
                self._value(path)
                self._blank(newlines=True)
                if self._peek() == ",":
                    self._i += 1
            self._i += 1
        elif c == "{":
            self._i += 1
            while self._blank(newlines=True) and self._peek() != "}":
                key = path + self._key()
                self._record(key)
                self._equals()
                self._value(key)
                self._blank(newlines=True)
                if self._peek() == ",":
                    self._i += 1
            self._i += 1
        else:
            while self._i < len(self._t) and self._t[self._i] not in ",]}\n#":
                self._i += 1
