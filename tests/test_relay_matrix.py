"""Relay by client certificate, black-box: real clients against a running tlsfront.

Threats `cert-open-relay`, `foreign-client-cert`, `bare-cr-lf-nul`. Every case is
run on a STARTTLS and an implicit-TLS profile with swaks, openssl s_client and
smtplib. The backend is the capture backend (qmail-smtpd's rules: `--rcpthost
example.org`), so a RCPT to another domain gets qmail's 553 unless tlsfront
started it with RELAYCLIENT.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID
from support.front import Front, need_tool, toml_str
from support.tls_certs import DAY, NOW, Issued, crl_pem, issue, make_crl

import tlsfront.ops.watch
from tlsfront.tls.certs import fingerprint_sha256

LOCAL = "postmaster@example.org"
RELAYED = "someone@relay.test"
SENDER = "sender@example.net"
REFUSED = "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
BODY = "Subject: relay test\r\n\r\nhello\r\n"
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# ------------------------------------------------------------- certificates


@dataclass
class Pki:
    """The client CA, its CRL, the lists, and one certificate per case."""

    directory: Path
    ca: trustme.CA
    certs: dict[str, Issued] = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        return self.directory / "clientca.pem"

    @property
    def crl_file(self) -> Path:
        return self.directory / "clientcrl.pem"

    @property
    def clients_file(self) -> Path:
        return self.directory / "tlsclients"

    @property
    def fingerprints_file(self) -> Path:
        return self.directory / "relay_clientcerts"

    def files(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.crt", self.directory / f"{name}.key"

    def add(self, name: str, leaf: Issued) -> None:
        self.certs[name] = leaf
        leaf.write(self.directory, name)

    def fingerprint(self, name: str) -> str:
        return fingerprint_sha256(self.certs[name].cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, other_ca: trustme.CA) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"), trustme.CA(organization_name="Client CA"))
    ca = pki.ca
    listed = ["alice@example.net"]
    pki.add("alice", issue(ca, common_name="alice", subject_emails=listed))
    pki.add("bob", issue(ca, common_name="bob", san_emails=["bob@example.net"]))
    pki.add("carol", issue(ca, common_name="carol", subject_emails=["Carol@Example.NET"]))
    pki.add("mallory", issue(ca, common_name="mallory", subject_emails=["mallory@example.net"]))
    # listed address, but no relaying: the certificate does not verify
    pki.add("stranger", issue(other_ca, common_name="stranger", subject_emails=listed))
    pki.add("selfsigned", issue(None, common_name="selfsigned", subject_emails=listed))
    pki.add(
        "expired",
        issue(
            ca,
            common_name="expired",
            subject_emails=listed,
            not_before=NOW - 30 * DAY,
            not_after=NOW - DAY,
        ),
    )
    pki.add(
        "early",
        issue(
            ca,
            common_name="early",
            subject_emails=listed,
            not_before=NOW + DAY,
            not_after=NOW + 30 * DAY,
        ),
    )
    pki.add("revoked", issue(ca, common_name="revoked", subject_emails=listed))
    # pinned by fingerprint: self-signed, no address (a sending MTA's own certificate)
    partner = "mx.partner.example"
    pki.add("pinned", issue(None, common_name=partner, dns_names=[partner]))
    pki.add("pinned2", issue(None, common_name="mx2.partner.example"))
    # threat `bare-cr-lf-nul`
    pki.add("evil", issue(ca, common_name="x\r\nX-Evil: 1", san_emails=listed))

    pki.ca_file.write_bytes(ca.cert_pem.bytes())
    pki.crl_file.write_bytes(crl_pem(make_crl(ca, [pki.certs["revoked"].cert])))
    pki.clients_file.write_text(
        "# addresses allowed to relay\nalice@example.net\nBOB@example.net\n\ncArol@example.net\n"
    )
    pki.fingerprints_file.write_text(f"{pki.fingerprint('pinned2')} mx2.partner.example\n")
    return pki


def profiles(
    pki: Pki,
    *,
    fingerprints_file: bool = False,
    client_cert: str = "request",
    ca_file: Path | None = None,
    crl_file: Path | None = None,
    clients_file: Path | None = None,
) -> str:
    """A STARTTLS profile `smtp` and an implicit-TLS profile `smtps`, alike."""
    if fingerprints_file:
        prints = f"relay_fingerprints = {toml_str(pki.fingerprints_file)}"
    else:
        prints = f'relay_fingerprints = ["{pki.fingerprint("pinned")}"]'
    common = (
        "cert = {cert}\nbackend = {backend}\n"
        f'client_cert = "{client_cert}"\n'
        f"client_ca = {toml_str(ca_file or pki.ca_file)}\n"
        f"client_crl = {toml_str(crl_file or pki.crl_file)}\n"
        f"relay_clients = {toml_str(clients_file or pki.clients_file)}\n"
        f"{prints}\n"
        # openssl s_client writes its whole stdin at once, the body before the
        # 354: what this matrix tests is relaying, not the pipelining rule
        "pipelining_strict = false\n"
    )
    return (
        '[profile.smtp]\nlisten = ["127.0.0.1:0"]\ntls = "starttls"\n'
        + common
        + '\n[profile.smtps]\nlisten = ["127.0.0.1:0"]\ntls = "implicit"\n'
        + common
    )


# ------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    cert: str | None  # a Pki certificate, None: the client shows none
    relay: bool
    verify: str  # SSL_CLIENT_VERIFY
    status: str  # Anonymous / Untrusted / Trusted / Verified
    reason: str | None = None  # "no valid cert for gatewaying: REASON"
    by: str | None = None  # what authorized relaying; "fingerprint": the certificate's
    fingerprints_file: bool = False


NOT_SIGNED = "not signed by client_ca"
CASES = {
    "subject email": Case("alice", True, "SUCCESS", "Verified", by="alice@example.net"),
    "SAN only": Case("bob", True, "SUCCESS", "Verified", by="bob@example.net"),
    "mixed case": Case("carol", True, "SUCCESS", "Verified", by="Carol@Example.NET"),
    "unlisted": Case(
        "mallory", False, "SUCCESS", "Trusted", "address not listed: mallory@example.net"
    ),
    "other CA": Case(
        "stranger",
        False,
        "FAILED:unable to get local issuer certificate",
        "Untrusted",
        f"{NOT_SIGNED} (unable to get local issuer certificate)",
    ),
    "self-signed": Case(
        "selfsigned",
        False,
        "FAILED:self-signed certificate",
        "Untrusted",
        f"{NOT_SIGNED} (self-signed certificate)",
    ),
    "expired": Case("expired", False, "FAILED:certificate has expired", "Untrusted", "expired"),
    "not yet valid": Case(
        "early", False, "FAILED:certificate is not yet valid", "Untrusted", "not yet valid"
    ),
    "revoked": Case("revoked", False, "FAILED:certificate revoked", "Untrusted", "revoked"),
    "fingerprint": Case(
        "pinned", True, "FAILED:self-signed certificate", "Verified", by="fingerprint"
    ),
    "fingerprint file": Case(
        "pinned2",
        True,
        "FAILED:self-signed certificate",
        "Verified",
        by="fingerprint",
        fingerprints_file=True,
    ),
    "no certificate": Case(None, False, "NONE", "Anonymous"),
}
PROFILES = ["smtp", "smtps"]


@dataclass
class Outcome:
    """The replies a client got: to RCPT RELAYED, to RCPT LOCAL, to the final dot."""

    relay: int
    local: int
    data: int
    transcript: str = ""


async def run(argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )


# ------------------------------------------------------------------ clients


async def via_swaks(front: Front, profile: str, files: tuple[Path, Path] | None) -> Outcome:
    argv = [
        need_tool("swaks"), "--server", "127.0.0.1", "--port", str(front.port(profile)),
        "--tls" if profile == "smtp" else "--tls-on-connect",
        "--helo", "swaks.example.net", "--from", SENDER, "--to", f"{RELAYED},{LOCAL}",
        "--body", "hello", "--header", "Subject: relay test",
    ]  # fmt: skip
    if files is not None:
        argv += ["--tls-cert", str(files[0]), "--tls-key", str(files[1])]
    result = await run(argv)
    out = result.stdout.decode(errors="replace")
    assert "<~" in out, out + result.stderr.decode(errors="replace")  # TLS was up
    rcpt = dict(re.findall(r"~> RCPT TO:<([^>]*)>\n<~\*? +(\d{3})", out))
    data = re.search(r"~> \.\n<~\*? +(\d{3})", out)
    return Outcome(int(rcpt[RELAYED]), int(rcpt[LOCAL]), int(data[1]) if data else 0, out)


async def via_openssl(front: Front, profile: str, files: tuple[Path, Path] | None) -> Outcome:
    argv = [need_tool("openssl"), "s_client", "-quiet", "-connect",
            f"127.0.0.1:{front.port(profile)}", "-servername", "localhost"]  # fmt: skip
    if profile == "smtp":
        argv += ["-starttls", "smtp"]
    if files is not None:
        argv += ["-cert", str(files[0]), "-key", str(files[1])]
    dialogue = (
        f"EHLO openssl.example.net\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RELAYED}>\r\n"
        f"RCPT TO:<{LOCAL}>\r\nDATA\r\n{BODY}.\r\nQUIT\r\n"
    )
    result = await run(argv, dialogue.encode())
    out = result.stdout.decode(errors="replace")
    finals = [int(line[:3]) for line in out.splitlines() if re.match(r"\d{3} ", line)]
    assert finals[-3:] == [354, 250, 221], out + result.stderr.decode(errors="replace")
    return Outcome(finals[-5], finals[-4], finals[-2], out)


def smtplib_dialogue(port: int, implicit: bool, context: ssl.SSLContext) -> Outcome:
    smtp: smtplib.SMTP
    if implicit:
        smtp = smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=context)
    else:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=20)
    with smtp:
        if not implicit:
            smtp.starttls(context=context)
        smtp.ehlo("smtplib.example.net")
        smtp.mail(SENDER)
        relay, _ = smtp.rcpt(RELAYED)
        local, _ = smtp.rcpt(LOCAL)
        data, _ = smtp.data(BODY.encode())
    return Outcome(relay, local, data)


def smtplib_context(files: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the server's certificate is not what is tested
    if files is not None:
        context.load_cert_chain(*files)
    return context


async def via_smtplib(front: Front, profile: str, files: tuple[Path, Path] | None) -> Outcome:
    context = smtplib_context(files)
    port = front.port(profile)
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(
            lambda: smtplib_dialogue(port, profile == "smtps", context)
        )


Client = Callable[[Front, str, tuple[Path, Path] | None], Awaitable[Outcome]]
CLIENTS: dict[str, Client] = {
    "swaks": via_swaks,
    "openssl": via_openssl,
    "smtplib": via_smtplib,
}


# ------------------------------------------------------------- assertions


def issuer_name(cert: x509.Certificate) -> str:
    cns = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.issuer.rfc4514_string()


def received_header(body: bytes) -> bytes:
    """The first header field of a message as the backend got it, unfolded lines kept."""
    lines = body.split(b"\r\n")
    end = next(i for i, line in enumerate(lines[1:], 1) if not line.startswith(b"\t"))
    return b"\r\n".join(lines[:end])


def check_env(env: dict[str, str], case: Case, leaf: Issued | None) -> None:
    assert ("RELAYCLIENT" in env) is case.relay
    if case.relay:
        assert env["RELAYCLIENT"] == ""
    assert env["SSL_CLIENT_VERIFY"] == case.verify
    assert env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["SSL_PROTOCOL"].startswith("TLSv1.")
    for key, value in env.items():
        if key != "SSL_CLIENT_CERT":
            assert not CONTROL.search(value), (key, value)
    if leaf is None:
        assert not [k for k in env if k.startswith("SSL_CLIENT_") and k != "SSL_CLIENT_VERIFY"]
        return
    cert = leaf.cert
    names = {NameOID.EMAIL_ADDRESS: "emailAddress"}
    assert env["SSL_CLIENT_S_DN"] == cert.subject.rfc4514_string(names)
    assert env["SSL_CLIENT_I_DN"] == cert.issuer.rfc4514_string(names)
    assert int(env["SSL_CLIENT_M_SERIAL"], 16) == cert.serial_number
    assert env["SSL_CLIENT_V_END"].endswith(f"{cert.not_valid_after_utc:%H:%M:%S %Y} GMT")
    assert env["SSL_CLIENT_V_START"].startswith(f"{cert.not_valid_before_utc:%b} ")
    assert x509.load_pem_x509_certificate(env["SSL_CLIENT_CERT"].encode()) == cert
    assert env["SSL_CLIENT_FINGERPRINT"] == fingerprint_sha256(cert)
    subject_emails = cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
    if subject_emails:
        assert env["SSL_CLIENT_S_DN_Email"] == subject_emails[0].value
    else:
        assert "SSL_CLIENT_S_DN_Email" not in env


def check_trace(body: bytes, case: Case, leaf: Issued | None) -> None:
    header = received_header(body).decode("ascii")
    assert header.startswith("Received: from ")
    assert "with ESMTPS" in header
    if leaf is None:
        assert "Client CN" not in header
        assert "(cert " not in header
        return
    cn = str(leaf.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    verdict = "verified OK" if case.verify == "SUCCESS" else "not verified"
    expected = f'\t(Client CN "{cn}", Issuer "{issuer_name(leaf.cert)}" ({verdict}))'
    lines = [line.removesuffix(";") for line in header.split("\r\n")]
    assert expected in lines, header
    by = fingerprint_sha256(leaf.cert) if case.by == "fingerprint" else case.by
    if case.relay:
        assert lines[-2:] == [f"\t(cert {by})", lines[-1]], header  # then the date
    else:
        assert "(cert " not in header


def check(front: Front, case: Case, pki: Pki, outcome: Outcome) -> None:
    assert outcome.relay == (250 if case.relay else 553), outcome.transcript
    # mail for a local domain is accepted whatever the certificate
    assert (outcome.local, outcome.data) == (250, 250), outcome.transcript
    if not case.relay and outcome.transcript:
        assert REFUSED in outcome.transcript
    *before_tls, tls = front.sessions()
    for plain in before_tls:  # the STARTTLS profile's plaintext phase
        assert "RELAYCLIENT" not in plain["env"]
        assert "SSL_CLIENT_VERIFY" not in plain["env"]
    leaf = pki.certs[case.cert] if case.cert else None
    check_env(tls["env"], case, leaf)
    (envelope,) = tls["envelopes"]
    assert envelope["to"] == ([RELAYED, LOCAL] if case.relay else [LOCAL])
    (body,) = tls["messages"]
    check_trace(body, case, leaf)


# ------------------------------------------------------------------ the matrix


@pytest.mark.interop
@pytest.mark.parametrize("client", ["swaks", "openssl"])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", list(CASES))
async def test_matrix_real_clients(
    start_front: Any, pki: Pki, name: str, profile: str, client: str, clean_environ: None
) -> None:
    case = CASES[name]
    front: Front = await start_front(profiles(pki, fingerprints_file=case.fingerprints_file))
    files = pki.files(case.cert) if case.cert else None
    outcome = await CLIENTS[client](front, profile, files)
    check(front, case, pki, outcome)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", list(CASES))
async def test_matrix_smtplib_and_log(
    start_front: Any, pki: Pki, name: str, profile: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlsfront.inbound.session")
    case = CASES[name]
    front: Front = await start_front(profiles(pki, fingerprints_file=case.fingerprints_file))
    files = pki.files(case.cert) if case.cert else None
    check(front, case, pki, await via_smtplib(front, profile, files))
    # the log says who it was and why (Postfix and the qmail patch's words)
    lines = [r.getMessage() for r in caplog.records if r.name == "tlsfront.inbound.session"]
    established = [line for line in lines if "TLS connection established" in line]
    assert len(established) == 1
    assert re.fullmatch(
        rf"{case.status} TLS connection established from unknown\[127\.0\.0\.1\]: "
        r"TLSv1\.3 with cipher TLS_\w+ \(\d+/\d+ bits\)",
        established[0],
    ), established[0]
    gatewaying = [line for line in lines if "no valid cert for gatewaying" in line]
    allowed = [line for line in lines if "relaying allowed for cert" in line]
    if case.relay:
        assert (len(allowed), gatewaying) == (1, [])
    elif case.cert is None:
        assert (allowed, gatewaying) == ([], [])
    else:
        assert allowed == []
        assert gatewaying == [f"unknown[127.0.0.1]: no valid cert for gatewaying: {case.reason}"]


# --------------------------------------------------- the rows named elsewhere


async def test_stray_relayclient_in_tlsfronts_environment(
    start_front: Any, pki: Pki, clean_environ: None
) -> None:
    """Threat `cert-open-relay`: tlsfront started with RELAYCLIENT= never relays
    an anonymous client."""
    assert os.environ["RELAYCLIENT"] == ""
    front: Front = await start_front(profiles(pki))
    port = front.port("smtp")

    def plaintext() -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
            smtp.ehlo("plain.example.net")
            smtp.mail(SENDER)
            return smtp.rcpt(RELAYED)[0]

    with trio.fail_after(30):
        assert await trio.to_thread.run_sync(plaintext) == 553
    for cert in (None, "mallory", "stranger"):
        files = pki.files(cert) if cert else None
        assert (await via_smtplib(front, "smtp", files)).relay == 553
        assert (await via_smtplib(front, "smtps", files)).relay == 553
    assert (await via_smtplib(front, "smtps", pki.files("alice"))).relay == 250
    sessions = front.sessions()
    assert len(sessions) == 1 + 3 * 2 + 1  # one backend a session, started at MAIL
    relaying = [s for s in sessions if "RELAYCLIENT" in s["env"]]
    assert [s["env"].get("SSL_CLIENT_S_DN_CN") for s in relaying] == ["alice"]
    assert {s["env"]["TCPREMOTEIP"] for s in sessions} == {"127.0.0.1"}


@pytest.mark.interop
async def test_request_profile_gives_tls_to_an_unrelated_certificate(
    start_front: Any, other_ca: trustme.CA, tmp_path: Path, pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Threat `foreign-client-cert`: a sending MTA's own certificate, from a CA
    nobody here knows."""
    caplog.set_level(logging.INFO, logger="tlsfront.inbound.session")
    mta = issue(other_ca, common_name="mx.sender.example", dns_names=["mx.sender.example"],
                eku=None)  # fmt: skip
    files = mta.write(tmp_path, "mta")
    front: Front = await start_front(profiles(pki))
    outcome = await via_openssl(front, "smtp", files)
    assert (outcome.relay, outcome.local, outcome.data) == (553, 250, 250)
    tls = front.sessions()[-1]
    assert tls["env"]["SSL_CLIENT_S_DN_CN"] == "mx.sender.example"
    assert tls["env"]["SSL_CLIENT_VERIFY"] == "FAILED:unable to get local issuer certificate"
    assert any(
        r.getMessage().startswith("Untrusted TLS connection established from unknown[127.0.0.1]")
        for r in caplog.records
    )


def require_dialogue(port: int, context: ssl.SSLContext) -> int:
    """RCPT RELAYED's reply; raises when TLS does not come up."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.starttls(context=context)
        # TLS 1.3: the client's handshake ends before the server has judged
        # its certificate; a refusal shows on the first read.
        smtp.ehlo("smtplib.example.net")
        smtp.mail(SENDER)
        return smtp.rcpt(RELAYED)[0]


@pytest.mark.parametrize("cert", [None, "stranger", "expired", "revoked"])
async def test_require_profile_refuses_the_handshake(
    start_front: Any, pki: Pki, cert: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tlsfront.inbound.session")
    front: Front = await start_front(profiles(pki, client_cert="require"))
    context = smtplib_context(pki.files(cert) if cert else None)
    port = front.port("smtp")
    with trio.fail_after(30), pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected)):
        await trio.to_thread.run_sync(lambda: require_dialogue(port, context))
    # no backend at all: none before STARTTLS (nothing needed one), none after
    # the failed handshake
    assert front.sessions() == []
    messages = [r.getMessage() for r in caplog.records]
    failed = [m for m in messages if m.startswith("TLS handshake failed from [127.0.0.1]")]
    assert len(failed) == 1
    expected = "certificate required" if cert is None else "peer certificate rejected"
    assert expected in failed[0]


async def test_require_profile_with_a_valid_certificate(start_front: Any, pki: Pki) -> None:
    front: Front = await start_front(profiles(pki, client_cert="require"))
    context = smtplib_context(pki.files("alice"))
    port = front.port("smtp")
    with trio.fail_after(30):
        assert await trio.to_thread.run_sync(lambda: require_dialogue(port, context)) == 250
    assert "RELAYCLIENT" in front.sessions()[-1]["env"]


@pytest.mark.interop
@pytest.mark.parametrize("client", ["swaks", "openssl"])
async def test_cn_with_crlf_reaches_no_env_and_no_header(
    start_front: Any, pki: Pki, client: str
) -> None:
    """threat `bare-cr-lf-nul`: client certificate CN `x\\r\\nX-Evil: 1`."""
    front: Front = await start_front(profiles(pki))
    outcome = await CLIENTS[client](front, "smtp", pki.files("evil"))
    assert (outcome.relay, outcome.local, outcome.data) == (250, 250, 250)
    tls = front.sessions()[-1]
    env = tls["env"]
    assert env["SSL_CLIENT_S_DN_CN"] == "xX-Evil: 1"
    for key, value in env.items():
        if key != "SSL_CLIENT_CERT":
            assert not CONTROL.search(value), key
    (body,) = tls["messages"]
    header = received_header(body)
    issuer = issuer_name(pki.certs["evil"].cert).encode()
    # CR and LF become "?" in the header: visible, and no new line
    assert b'\t(Client CN "x??X-Evil: 1", Issuer "' + issuer + b'" (verified OK))' in header
    head = body.split(b"\r\n\r\n", 1)[0]
    assert not [line for line in head.split(b"\r\n") if line.lstrip().startswith(b"X-Evil")]
    assert b"\r" not in head.replace(b"\r\n", b"")
    assert b"\n" not in head.replace(b"\r\n", b"")


# ------------------------------------------------- changes without restart


@pytest.fixture
def recheck_always(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tlsfront.ops.watch, "RECHECK_SECONDS", 0)


def replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def relay_code(front: Front, files: tuple[Path, Path]) -> int:
    return int((await via_smtplib(front, "smtp", files)).relay)


async def test_changed_relay_clients_take_effect(
    start_front: Any, pki: Pki, tmp_path: Path, recheck_always: None
) -> None:
    clients = tmp_path / "tlsclients"
    clients.write_text("alice@example.net\n")
    front: Front = await start_front(profiles(pki, clients_file=clients))
    alice, mallory = pki.files("alice"), pki.files("mallory")
    assert (await relay_code(front, alice), await relay_code(front, mallory)) == (250, 553)
    replace(clients, b"mallory@example.net\n")
    assert (await relay_code(front, alice), await relay_code(front, mallory)) == (553, 250)
    clients.unlink()
    assert (await relay_code(front, alice), await relay_code(front, mallory)) == (553, 553)


async def test_changed_client_ca_takes_effect(
    start_front: Any, pki: Pki, other_ca: trustme.CA, tmp_path: Path, recheck_always: None
) -> None:
    ca_file, crl_file = tmp_path / "clientca.pem", tmp_path / "clientcrl.pem"
    ca_file.write_bytes(pki.ca.cert_pem.bytes())
    crl_file.write_bytes(crl_pem(make_crl(pki.ca), make_crl(other_ca)))
    front: Front = await start_front(profiles(pki, ca_file=ca_file, crl_file=crl_file))
    alice, stranger = pki.files("alice"), pki.files("stranger")
    assert (await relay_code(front, alice), await relay_code(front, stranger)) == (250, 553)
    # the admin trusts the other CA as well
    replace(ca_file, pki.ca.cert_pem.bytes() + other_ca.cert_pem.bytes())
    assert (await relay_code(front, alice), await relay_code(front, stranger)) == (250, 250)
    # ... and then only the other one
    replace(ca_file, other_ca.cert_pem.bytes())
    assert (await relay_code(front, alice), await relay_code(front, stranger)) == (553, 250)


async def test_changed_client_crl_takes_effect(
    start_front: Any, pki: Pki, tmp_path: Path, recheck_always: None
) -> None:
    crl_file = tmp_path / "clientcrl.pem"
    crl_file.write_bytes(crl_pem(make_crl(pki.ca)))
    front: Front = await start_front(profiles(pki, crl_file=crl_file))
    alice, bob = pki.files("alice"), pki.files("bob")
    assert (await relay_code(front, alice), await relay_code(front, bob)) == (250, 250)
    replace(crl_file, crl_pem(make_crl(pki.ca, [pki.certs["alice"].cert])))
    assert (await relay_code(front, alice), await relay_code(front, bob)) == (553, 250)
    *_, alice_tls = (s for s in front.sessions() if s["env"].get("SSL_CLIENT_S_DN_CN") == "alice")
    assert alice_tls["env"]["SSL_CLIENT_VERIFY"] == "FAILED:certificate revoked"
