"""Configuration texts and helpers shared by the configuration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlsfront.config.errors import ConfigError
from tlsfront.config.files import load_config
from tlsfront.config.schema import Config

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
ENV: dict[str, str] = {"HOME": "/home/alice"}  # never the test runner's environment

MINIMAL = """\
[profile.smtp]
listen = ["127.0.0.1:2525"]
cert = "cert.pem"
backend = ["/bin/cat"]
"""


def write(tmp_path: Path, text: str, name: str = "tlsfront.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), ENV if environ is None else environ)


def fails(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, environ)
    return info.value


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line of `text` that starts with `needle`."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(needle):
            return n
    raise AssertionError(f"{needle!r} not in text")


def assert_at(err: ConfigError, path: Path, line: int, table: str | None, key: str | None) -> None:
    assert (err.path, err.line, err.table, err.key) == (path, line, table, key), str(err)
    head = f"{path}:{line}: "
    if table:
        head += f"[{table}]"
        head += f" key '{key}': " if key else ": "
    assert str(err).startswith(head), str(err)


def make_control(tmp_path: Path) -> Path:
    """A qmail-tls style control directory (contents do not matter to config)."""
    d = tmp_path / "control"
    d.mkdir()
    for name in ("servercert.pem", "clientca.pem", "clientcrl.pem", "dh2048.pem"):
        (d / name).write_text("-----BEGIN X-----\n")
    (d / "tlsclients").write_text("alice@example.com\n")
    (d / "tlsserverciphers").write_text("HIGH:!aNULL\n")
    (d / "me").write_text("mx.example.net\n")
    (d / "databytes").write_text("20000000\n")
    (d / "clientcert.pem").write_text("x\n")
    (d / "tlshosts").mkdir()
    (d / "notlshosts").mkdir()
    return d
