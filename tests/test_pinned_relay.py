"""Relay by pinned certificate (`relay_fingerprints`), end to end.

A pinned certificate needs no CA, but its fingerprint alone is not enough:
it must be within its validity dates and not revoked by `client_crl`. Each
case runs a real STARTTLS session with the certificate and asks the capture
backend (the qmail-smtpd stand-in) for a foreign recipient: only the valid
pinned certificates start the backend with RELAYCLIENT.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from support.front import Front, toml_str
from support.hostile import Client, SessionLog, code, session_log
from support.tls_certs import NOW, Issued, crl_pem, issue, make_crl

from tlsfront.tls.certs import fingerprint_sha256

READY = b"220 2.0.0 Ready to start TLS\r\n"
REFUSED = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
WEEK = datetime.timedelta(days=7)

PROFILE = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {{cert}}
backend = {{backend}}
client_cert = "request"
client_ca = {{ca}}
client_crl = {crl}
relay_fingerprints = ["{fingerprint}"]
"""

CASES = ["self-signed", "from the CA", "expired", "not yet valid", "revoked"]


def pinned(case: str, ca: trustme.CA) -> Issued:
    if case == "self-signed":
        return issue(None)
    if case == "expired":
        return issue(None, not_before=NOW - 2 * WEEK, not_after=NOW - WEEK)
    if case == "not yet valid":
        return issue(None, not_before=NOW + WEEK, not_after=NOW + 2 * WEEK)
    return issue(ca)  # "from the CA" and "revoked" (its serial is in the CRL)


@pytest.fixture
def log() -> Any:
    with session_log() as handler:
        yield handler


@pytest.mark.parametrize("case", CASES)
async def test_pinned_certificate_relays_only_while_valid(
    start_front: Any,
    tmp_path: Path,
    ca: trustme.CA,
    clean_environ: None,
    log: SessionLog,
    case: str,
) -> None:
    cert = pinned(case, ca)
    revoked = [cert.cert] if case == "revoked" else [issue(ca).cert]
    crl = tmp_path / "clientcrl.pem"
    crl.write_bytes(crl_pem(make_crl(ca, revoked)))
    front: Front = await start_front(
        PROFILE.format(crl=toml_str(crl), fingerprint=fingerprint_sha256(cert.cert))
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    cert.load_into(context, tmp_path, "client")
    with trio.fail_after(30):
        client = await Client.connect(front.port("smtp"))
        assert code(await client.reply()) == 220
        assert await client.command(b"STARTTLS") == READY
        await client.starttls(context)
        assert code(await client.command(b"EHLO client.example")) == 250
        assert await client.command(b"MAIL FROM:<a@example.net>") == b"250 ok\r\n"
        reply = await client.command(b"RCPT TO:<x@elsewhere.example>")
        assert code(await client.command(b"QUIT")) == 221
        await client.aclose()
        await log.wait_ends(1)
    (tls,) = front.sessions()  # one backend, started at MAIL inside TLS
    if case in ("self-signed", "from the CA"):
        assert reply == b"250 ok\r\n"
        assert tls["env"]["RELAYCLIENT"] == ""
    else:
        assert reply == REFUSED
        assert "RELAYCLIENT" not in tls["env"]
