"""Loading a configuration: the file found, read, parsed and built, or refused.

`tomllib` turns the text into dicts; `tlsfront.config.build` checks and
freezes them. tomllib reports no positions for keys, so `KeyLines` scans the
(already valid) text once and maps every table and dotted key path to its
first line; each ConfigError names the file, that line, the table and the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tlsfront.config.build import Builder
from tlsfront.config.errors import ConfigError
from tlsfront.config.schema import Config
from tlsfront.config.tomllines import KeyLines

SYSTEM_CONFIG = Path("/etc/tlsfront/tlsfront.toml")

_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def parse_config(
    text: str, path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Parse and check TOML `text`; `path` names it in errors and anchors relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line: int | None = None
        match = _AT_LINE.search(message)
        if match:
            line = int(match[1])
            message = f"{message[: match.start()]} (column {match[2]})"
        elif message.endswith("(at end of document)"):
            line = text.count("\n") + 1
        raise ConfigError(f"TOML syntax: {message}", path=path, line=line) from exc
    return Builder(data, path, KeyLines(text), environ).build()


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and check the configuration file at `path`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path=path) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError("is not UTF-8 text", path=path, line=line) from exc
    return parse_config(text, path, environ)


def config_from_dict(
    data: Mapping[str, Any], path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Check a configuration given as the dicts tomllib would produce (no line numbers)."""
    return Builder(data, path, None, environ).build()


def find_config(explicit: Path | None) -> Path | None:
    """The file to load: `explicit`, else SYSTEM_CONFIG if it exists, else None (embedded)."""
    if explicit is not None:
        return explicit
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def load_chosen(explicit: str | Path | None) -> Config | None:
    """The configuration file named on the command line, else the system one.

    None when neither is given nor exists: the caller serves (or reports) the
    embedded default. Raises ConfigError when the file does not load.
    """
    path = find_config(Path(explicit) if explicit else None)
    return None if path is None else load_config(path)
