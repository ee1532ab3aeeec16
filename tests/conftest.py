"""Fixtures shared by the integration tests: certificates, a running tlsfront."""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tlsfront.config import Config, load_config
from tlsfront.server import Server

BACKENDS = Path(__file__).parent / "backends"
CAPTURE = BACKENDS / "capture.py"
FAULTY = BACKENDS / "faulty.py"


def need_tool(name: str) -> str:
    """The path of an outside client; skipped locally without it, an error in CI."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def other_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Path:
    """servercert.pem (qmail style: key and chain in one file) and the CA."""
    directory = tmp_path_factory.mktemp("tls")
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    server.private_key_and_cert_chain_pem.write_to_path(str(directory / "servercert.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return directory


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def toml_str(value: object) -> str:
    return json.dumps(str(value))


@dataclass
class Front:
    """A tlsfront server running in the test's nursery."""

    server: Server
    config: Config
    capture: Path

    def port(self, profile: str) -> int:
        return self.server.addresses[profile][0].port

    def sessions(self) -> list[dict[str, Any]]:
        """What each backend session recorded, in start order."""
        records = []
        for path in self.capture.glob("session-*.json"):
            records.append(json.loads(path.read_text()))
        records.sort(key=lambda r: r["started"])
        for record in records:
            for key in ("stdin", "stdout", "partial"):
                if record.get(key) is not None:
                    record[key] = base64.b64decode(record[key])
            record["messages"] = [base64.b64decode(m) for m in record["messages"]]
        return records

    def maildir(self) -> list[bytes]:
        new = self.capture / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def capture_backend(capture: Path, *extra: str) -> str:
    argv = [
        sys.executable,
        str(CAPTURE),
        "--dir",
        str(capture),
        "--rcpthost",
        "example.org",
        *extra,
    ]
    return "[" + ", ".join(toml_str(a) for a in argv) + "]"


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tlsfront.toml"
    path.write_text(body)
    return path


@pytest.fixture
async def start_front(nursery: trio.Nursery, tmp_path: Path, tls_dir: Path) -> Any:
    """`await start_front(profiles_toml)`: load a config, serve it, return a Front.

    The TOML may use {cert}, {ca}, {backend} and {capture}: the server
    certificate, the CA, a capture backend command and its directory.
    """
    capture = tmp_path / "capture"
    capture.mkdir()

    async def start(profiles: str, defaults: str = "") -> Front:
        text = ('[defaults]\nhostname = "front.example.org"\n' + defaults + "\n" + profiles).format(
            cert=toml_str(tls_dir / "servercert.pem"),
            ca=toml_str(tls_dir / "ca.pem"),
            backend=capture_backend(capture),
            capture=toml_str(capture),
        )
        config = load_config(write_config(tmp_path, text))
        server = await nursery.start(Server(config).run)
        return Front(server, config, capture)

    return start


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """tlsfront's own environment holds a stray RELAYCLIENT (THREATS row 8)."""
    monkeypatch.setenv("RELAYCLIENT", "")
    monkeypatch.setenv("TCPREMOTEIP", "10.66.66.66")
