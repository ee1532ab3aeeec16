"""ConfigError, the error a configuration is refused with; `Bad`, a value that does not fit."""

from __future__ import annotations

from pathlib import Path


class ConfigError(Exception):
    """A configuration that cannot be used; str() is "FILE:LINE: [TABLE] key 'KEY': MESSAGE"."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        line: int | None = None,
        table: str | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.table = table
        self.key = key
        where = str(path) if path is not None else "<config>"
        if line is not None:
            where += f":{line}"
        what = f"[{table}]" if table else ""
        if key:
            what = f"{what} key '{key}'".lstrip()
        super().__init__(f"{where}: {what}: {message}" if what else f"{where}: {message}")


class Bad(Exception):
    """A value that does not fit; `sub` names the part of it (a table key).

    Converters and checks raise it without knowing where the value stands;
    the builder turns it into a ConfigError with file, line and key.
    """

    def __init__(self, message: str, sub: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.sub = sub
