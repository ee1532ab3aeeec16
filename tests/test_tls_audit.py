"""The TLS audit (threat `weak-tls`): testssl.sh and sslscan against the defaults.

tlsfront runs with the default TLS settings (no `min_tls_version`, no
`ciphers`) on a STARTTLS and an implicit-TLS profile, with an RSA and an
ECDSA certificate: with an RSA key, non-forward-secret (RSA key exchange)
suites would be possible if the defaults allowed them, so the audit sees them.

testssl.sh 3.0.8 runs the checks that concern the configuration: protocols
(-p), cipher categories (-s), forward secrecy (-f), server defaults (-S),
server preferences (-P) and every vulnerability check (-U). Left out are
the client simulations (-c, informational only) and the HTTP header checks
(-h, HTTP only); the two ports are scanned at once. That takes about a
minute here; the whole audit stays well under three.

Findings about the test certificate, not the TLS configuration, are left out
of the assertion by id, narrowly:

- `cert_revocation` (HIGH, "Neither CRL nor OCSP URI provided"): trustme's
  certificates name no CRL distribution point and no OCSP responder. That is
  the certificate a site gets from its CA, not something tlsfront configures.

Everything else would count: the certificate is made valid for 90 days (a
trustme default of a thousand years is itself a HIGH finding, cert_validityPeriod)
and its CA is handed to testssl (--add-ca), so the chain of trust is judged
as a client that knows the CA would judge it.

Run it yourself: docs/security.md.
"""

from __future__ import annotations

import datetime
import json
import ssl
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from OpenSSL import SSL
from support.front import need_tool, toml_str
from support.hostile import RecordingBackend

from tlsfront.tls.certs import load_server_credentials
from tlsfront.tls.context import ServerTLS, TLSSettings

CERTIFICATE_FINDINGS = frozenset({"cert_revocation"})
SEVERE = frozenset({"MEDIUM", "HIGH", "CRITICAL", "FATAL"})

PROFILES = """
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = [{rsa}, {ec}]
backend_connect = "{backend}"
max_per_ip = 500

[profile.smtps]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = [{rsa}, {ec}]
backend_connect = "{backend}"
max_per_ip = 500
"""


def audit_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """RSA and ECDSA server certificates valid for 90 days, and their CA."""
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    paths = []
    for name, key_type in (("rsa", trustme.KeyType.RSA), ("ec", trustme.KeyType.ECDSA)):
        leaf = ca.issue_cert(
            "localhost",
            "127.0.0.1",
            not_before=now - datetime.timedelta(days=1),
            not_after=now + datetime.timedelta(days=90),
            key_type=key_type,
        )
        path = directory / f"{name}.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(path))
        paths.append(path)
    ca_path = directory / "audit-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return paths[0], paths[1], ca_path


async def start_audited(start_front: Any, nursery: trio.Nursery, directory: Path) -> Any:
    rsa, ec, ca = audit_certificates(directory)
    backend = await RecordingBackend().start(nursery)
    front = await start_front(
        PROFILES.format(rsa=toml_str(rsa), ec=toml_str(ec), backend=backend.address)
    )
    return front, ca


async def run_testssl(port: int, *, starttls: bool, ca: Path, out: Path) -> list[dict[str, str]]:
    argv = [
        need_tool("testssl"),
        "--quiet",
        "--warnings",
        "off",
        "--nodns",
        "min",
        "--add-ca",
        str(ca),
        "--jsonfile",
        str(out),
        "-p",
        "-s",
        "-f",
        "-S",
        "-P",
        "-U",
    ]
    if starttls:
        argv += ["--starttls", "smtp"]
    argv.append(f"127.0.0.1:{port}")
    # Its exit status counts what it found; the JSON is the report.
    await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    findings: list[dict[str, str]] = json.loads(await trio.Path(out).read_text())
    return findings


async def run_sslscan(port: int, *, starttls: bool, out: Path) -> ET.Element:
    argv = [need_tool("sslscan"), "--no-colour", f"--xml={out}"]
    if starttls:
        argv.append("--starttls-smtp")
    argv.append(f"127.0.0.1:{port}")
    await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return ET.parse(out).getroot()


def severe(findings: list[dict[str, str]]) -> list[str]:
    return [
        f"{f['id']} {f['severity']}: {f['finding']}"
        for f in findings
        if f["severity"] in SEVERE and f["id"].split()[0] not in CERTIFICATE_FINDINGS
    ]


def by_id(findings: list[dict[str, str]]) -> dict[str, str]:
    return {f["id"]: f["finding"] for f in findings}


@pytest.mark.timeout(300)
async def test_testssl_and_sslscan_find_nothing_with_the_defaults(
    start_front: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    front, ca = await start_audited(start_front, nursery, tmp_path)
    results: dict[str, Any] = {}

    async def scan(name: str, profile: str, starttls: bool) -> None:
        port = front.port(profile)
        results[name] = await run_testssl(
            port, starttls=starttls, ca=ca, out=tmp_path / f"{name}.json"
        )
        results[name + "-sslscan"] = await run_sslscan(
            port, starttls=starttls, out=tmp_path / f"{name}.xml"
        )

    start = trio.current_time()
    with trio.fail_after(280):
        async with trio.open_nursery() as scans:
            scans.start_soon(scan, "starttls", "smtp", True)
            scans.start_soon(scan, "implicit", "smtps", False)
    took = trio.current_time() - start
    for name in ("starttls", "implicit"):
        findings = results[name]
        assert severe(findings) == [], name
        found = by_id(findings)
        # The scan did run, and saw what the defaults promise.
        assert found["SSLv2"] == found["SSLv3"] == "not offered"
        assert found["TLS1"] == found["TLS1_1"] == "not offered"
        assert found["TLS1_2"] == "offered"
        assert found["TLS1_3"].startswith("offered")
        assert found["cipherlist_NULL"] == found["cipherlist_aNULL"] == "not offered"
        assert found["cipherlist_3DES_IDEA"] == found["cipherlist_AVERAGE"] == "not offered"
        assert found["PFS"] == "offered"
        assert found["secure_client_renego"] == "not vulnerable"
        assert found["CRIME_TLS"].startswith("not vulnerable")
        # the certificates really were the test's, and only revocation is missing
        assert any(i.startswith("cert_revocation") for i in found)
        assert not any(f["severity"] == "FATAL" for f in findings)

        report = results[name + "-sslscan"]
        enabled = {
            (p.get("type"), p.get("version"))
            for p in report.iter("protocol")
            if p.get("enabled") == "1"
        }
        assert enabled == {("tls", "1.2"), ("tls", "1.3")}
        renegotiation = report.find(".//renegotiation")
        assert renegotiation is not None
        assert renegotiation.get("supported") == "0"
        assert all(h.get("vulnerable") == "0" for h in report.iter("heartbleed"))
        ciphers = [
            c.get("cipher", "") for c in report.iter("cipher") if c.get("sslversion") == "TLSv1.2"
        ]
        assert ciphers
        # forward secret (ECDHE) and AEAD (GCM, ChaCha20-Poly1305) only
        assert all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in ciphers)
        assert any(c.startswith("ECDHE-RSA-") for c in ciphers)  # the RSA key was seen
    assert took < 240


# ----------------------------------------------------------------------------
# The same promises, checked with Python's own TLS client (no tools needed)


def client(*, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers + ":@SECLEVEL=0")
    return context


async def handshake(port: int, context: ssl.SSLContext) -> str | None:
    """The cipher negotiated on the implicit-TLS port, or None when refused."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, context, server_hostname="localhost")
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError:
        return None
    finally:
        await tcp.aclose()
    cipher = tls.cipher()
    return None if cipher is None else str(cipher[0])


@pytest.mark.parametrize(
    ("version", "ciphers", "expected"),
    [
        (ssl.TLSVersion.TLSv1_3, None, "TLS_"),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-CHACHA20-POLY1305"),
        # refused: no forward secrecy (RSA key exchange), even with an AEAD
        (ssl.TLSVersion.TLSv1_2, "AES128-GCM-SHA256", None),
        # refused: forward secret, but CBC with a MAC, not an AEAD
        (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA", None),
        # refused: finite-field DHE without configured dhparams
        (ssl.TLSVersion.TLSv1_2, "DHE-RSA-AES128-GCM-SHA256", None),
        # refused: protocols before TLS 1.2
        (ssl.TLSVersion.TLSv1_1, "ALL", None),
        (ssl.TLSVersion.TLSv1, "ALL", None),
    ],
    ids=[
        "tls1.3",
        "ecdhe-rsa-gcm",
        "ecdhe-ecdsa-chacha",
        "rsa-kx-gcm",
        "ecdhe-cbc",
        "dhe",
        "tls1.1",
        "tls1.0",
    ],
)
async def test_default_protocols_and_ciphers(
    start_front: Any,
    nursery: trio.Nursery,
    tmp_path: Path,
    version: ssl.TLSVersion,
    ciphers: str | None,
    expected: str | None,
) -> None:
    front, _ = await start_audited(start_front, nursery, tmp_path)
    with trio.fail_after(30):
        negotiated = await handshake(front.port("smtps"), client(version=version, ciphers=ciphers))
    if expected is None:
        assert negotiated is None
    else:
        assert negotiated is not None
        assert negotiated.startswith(expected)


def offered(context: ssl.SSLContext) -> tuple[int, set[int]]:
    """The protocol version and the cipher suites of the ClientHello `context` sends."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16  # a handshake record
    assert hello[5] == 1  # a ClientHello
    version = int.from_bytes(hello[9:11], "big")
    at = 11 + 32  # past the version and the random
    at += 1 + hello[at]  # the session id
    length = int.from_bytes(hello[at : at + 2], "big")
    suites = {int.from_bytes(hello[i : i + 2], "big") for i in range(at + 2, at + 2 + length, 2)}
    return version, suites


TLS10, TLS11, TLS12 = 0x0301, 0x0302, 0x0303


@pytest.mark.parametrize(
    ("version", "ciphers", "hello_version", "suites"),
    [
        (ssl.TLSVersion.TLSv1_2, "AES128-GCM-SHA256", TLS12, {0x009C}),
        (
            ssl.TLSVersion.TLSv1_2,
            "ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA",
            TLS12,
            {0xC027, 0xC00A},
        ),
        (ssl.TLSVersion.TLSv1_2, "DHE-RSA-AES128-GCM-SHA256", TLS12, {0x009E}),
        (ssl.TLSVersion.TLSv1_1, "ALL", TLS11, {0xC013}),
        (ssl.TLSVersion.TLSv1, "ALL", TLS10, {0xC013}),
        (ssl.TLSVersion.TLSv1_1, "ECDHE-RSA-AES128-SHA", TLS11, {0xC013}),
        (ssl.TLSVersion.TLSv1, "ECDHE-RSA-AES128-SHA", TLS10, {0xC013}),
    ],
    ids=["rsa-kx-gcm", "ecdhe-cbc", "dhe", "tls1.1", "tls1.0", "legacy-tls1.1", "legacy-tls1.0"],
)
def test_the_refused_offers_are_really_made(
    version: ssl.TLSVersion, ciphers: str, hello_version: int, suites: set[int]
) -> None:
    """The positive control of the refusals above: this OpenSSL's client does
    send a ClientHello of that version with those suites (RSA key exchange,
    CBC, DHE), so a refusal is the server's and not a client that never
    offered them. Python's client caps the version it offers at
    `maximum_version`, so the hello's version is the old protocol itself."""
    got_version, got_suites = offered(client(version=version, ciphers=ciphers))
    assert got_version == hello_version
    assert suites <= got_suites


LEGACY_CIPHERS = """
[profile.legacy]
listen = ["127.0.0.1:0"]
tls = "implicit"
cert = [{rsa}, {ec}]
backend_connect = "{backend}"
ciphers = "ECDHE+AES:@SECLEVEL=0"
"""


@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        (ssl.TLSVersion.TLSv1, False),
        (ssl.TLSVersion.TLSv1_1, False),
        (ssl.TLSVersion.TLSv1_2, True),
    ],
    ids=["tls1.0", "tls1.1", "tls1.2"],
)
async def test_minimum_version_holds_with_older_ciphers(
    start_front: Any,
    nursery: trio.Nursery,
    tmp_path: Path,
    version: ssl.TLSVersion,
    accepted: bool,
) -> None:
    """A profile that allows CBC suites TLS 1.0 could use still speaks TLS 1.2
    at least: the minimum version is its own setting (min_tls_version)."""
    rsa, ec, _ = audit_certificates(tmp_path)
    backend = await RecordingBackend().start(nursery)
    front = await start_front(
        LEGACY_CIPHERS.format(rsa=toml_str(rsa), ec=toml_str(ec), backend=backend.address)
    )
    context = client(version=version, ciphers="ECDHE-RSA-AES128-SHA")
    with trio.fail_after(30):
        negotiated = await handshake(front.port("legacy"), context)
    assert negotiated == ("ECDHE-RSA-AES128-SHA" if accepted else None)


def test_no_renegotiation_no_compression(tmp_path: Path) -> None:
    """The options behind "no renegotiation, no compression".

    Neither shows in a scan here: OpenSSL 3 refuses client-initiated
    renegotiation and has no compression unless built with zlib. The options
    keep it so with any OpenSSL, so they are checked on the context itself.
    """
    rsa, ec, _ = audit_certificates(tmp_path)
    settings = TLSSettings(
        credentials=(load_server_credentials(rsa, None), load_server_credentials(ec, None))
    )
    assert settings.min_version == "TLSv1.2"
    assert settings.ciphers is None  # DEFAULT_CIPHERS
    context = ServerTLS(settings)._context
    options = context.set_options(0)  # adds nothing, returns what is set
    # (OP_NO_SSLv2 is 0 in OpenSSL 3: SSLv2 is gone from it altogether)
    for option in (
        "OP_NO_RENEGOTIATION",
        "OP_NO_COMPRESSION",
        "OP_NO_SSLv3",
        "OP_CIPHER_SERVER_PREFERENCE",
    ):
        assert options & getattr(SSL, option), option
