"""`tlsfront cert ca|server|client`: test certificates that really work with tlsfront."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.front import Front, need_tool, toml_str

from tlsfront.tls.certs import load_server_credentials


async def run(argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )


async def tlsfront_cert(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await run([sys.executable, "-m", "tlsfront", "cert", *args])


def certs_in(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


@pytest.fixture
async def made(tmp_path: Path) -> Path:
    """A CA, a server certificate for localhost and a client certificate, by the CLI."""
    directory = tmp_path / "pki"
    for args in (
        ("ca",),
        ("server", "--name", "localhost"),
        ("client", "--email", "Alice@example.net"),
    ):
        result = await tlsfront_cert(*args, "--dir", str(directory))
        assert result.returncode == 0, result.stdout + result.stderr
    return directory


async def test_ca(made: Path) -> None:
    (ca,) = certs_in(made / "ca.pem")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    ca.verify_directly_issued_by(ca)
    assert stat.S_IMODE((made / "ca.key").stat().st_mode) == 0o600


async def test_server_certificate(made: Path) -> None:
    path = made / "server.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the key
    creds = load_server_credentials(path, None)  # qmail servercert.pem style: key + chain
    leaf, ca = creds.chain
    assert isinstance(creds.key, ec.EllipticCurvePrivateKey)
    leaf.verify_directly_issued_by(ca)
    assert ca == certs_in(made / "ca.pem")[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


async def test_client_certificate(made: Path) -> None:
    path = made / "client-Alice@example.net.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    leaf, ca = certs_in(path)
    leaf.verify_directly_issued_by(ca)
    emails = leaf.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
    assert [e.value for e in emails] == ["Alice@example.net"]  # what the qmail patch reads
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["Alice@example.net"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


async def test_server_and_client_need_a_ca(tmp_path: Path) -> None:
    result = await tlsfront_cert("server", "--dir", str(tmp_path))
    assert result.returncode == 1
    assert b"tlsfront cert ca" in result.stdout
    assert not (tmp_path / "server.pem").exists()


async def test_client_needs_an_address(made: Path) -> None:
    result = await tlsfront_cert("client", "--dir", str(made), "--email", "alice")
    assert result.returncode == 1
    assert b"--email user@domain" in result.stdout


@pytest.mark.interop
async def test_made_certificates_relay_through_tlsfront(
    start_front: Any, made: Path, tmp_path: Path
) -> None:
    """The quick start of docs/client-certificates.md, end to end."""
    clients = tmp_path / "tlsclients"
    clients.write_text("alice@example.net\n")
    front: Front = await start_front(
        f"""
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {toml_str(made / "server.pem")}
backend = {{backend}}
client_cert = "request"
client_ca = {toml_str(made / "ca.pem")}
relay_clients = {toml_str(clients)}
"""
    )
    client = made / "client-Alice@example.net.pem"
    port = str(front.port("smtp"))
    swaks = [need_tool("swaks"), "--server", "127.0.0.1", "--port", port, "--tls",
             "--tls-cert", str(client), "--tls-key", str(client),
             "--from", "alice@example.net", "--to", "someone@relay.test"]  # fmt: skip
    result = await run(swaks)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "~> RCPT TO:<someone@relay.test>\n<~  250 " in out
    # the same file as -cert and -key; the server certificate verifies
    # against the made CA, for the name localhost
    openssl = [need_tool("openssl"), "s_client", "-starttls", "smtp", "-quiet",
               "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
               "-verify_hostname", "localhost", "-CAfile", str(made / "ca.pem"),
               "-verify_return_error", "-cert", str(client), "-key", str(client)]  # fmt: skip
    dialogue = b"EHLO o.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@relay.test>\r\nQUIT\r\n"
    check = await run(openssl, dialogue)
    assert b"verify return:1" in check.stderr
    assert check.stdout.endswith(b"250 ok\r\n250 ok\r\n221 front.example.org\r\n")
    after_tls = front.sessions()  # one backend each, started at MAIL inside TLS
    assert len(after_tls) == 2  # swaks, openssl
    for tls in after_tls:
        assert tls["env"]["RELAYCLIENT"] == ""
        assert tls["env"]["SSL_CLIENT_S_DN_Email"] == "Alice@example.net"
