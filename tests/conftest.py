"""Fixtures shared by the integration tests: certificates, a running tlsfront."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from support.front import Front, capture_backend, toml_str, write_config

from tlsfront.config.files import load_config
from tlsfront.inbound.server import Server


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
    """tlsfront's own environment holds a stray RELAYCLIENT (threat `cert-open-relay`)."""
    monkeypatch.setenv("RELAYCLIENT", "")
    monkeypatch.setenv("TCPREMOTEIP", "10.66.66.66")
