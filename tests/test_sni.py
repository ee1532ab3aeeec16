"""Certificates by server name (SNI): the TOML table, the choice, `check`, real clients.

Two hosted names and the default: "mail.example.org" with an RSA and an
ECDSA certificate, "*.example.net" with one ECDSA certificate, and the
default ("localhost"). Which certificate a client received is read from
the certificate itself (its names and key type), as openssl s_client and
swaks hand it over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.front import Front, need_tool, toml_str
from support.hostile import SessionLog, session_log

from tlsfront.config.errors import ConfigError
from tlsfront.config.files import parse_config
from tlsfront.inbound.profileruntime import ProfileRuntime, tls_settings
from tlsfront.ops import watch
from tlsfront.ops.check import check_config
from tlsfront.tls import sni
from tlsfront.tls.certs import load_server_credentials
from tlsfront.tls.context import ServerTLS, TLSConfigError


@dataclass
class Hosted:
    org_rsa: Path
    org_ecdsa: Path
    net: Path
    other: Path  # valid for a name the table does not give it

    def table(self, default: str) -> str:
        return (
            f'{{ default = {default}, "mail.example.org" = '
            f"[{toml_str(self.org_rsa)}, {toml_str(self.org_ecdsa)}], "
            f'"*.example.net" = {toml_str(self.net)} }}'
        )


@pytest.fixture
def hosted(tmp_path: Path, ca: trustme.CA) -> Hosted:
    def leaf(name: str, *identities: str, key_type: trustme.KeyType) -> Path:
        path = tmp_path / f"{name}.pem"
        cert = ca.issue_cert(*identities, key_type=key_type)
        cert.private_key_and_cert_chain_pem.write_to_path(str(path))
        return path

    return Hosted(
        org_rsa=leaf("org-rsa", "mail.example.org", key_type=trustme.KeyType.RSA),
        org_ecdsa=leaf("org-ecdsa", "mail.example.org", key_type=trustme.KeyType.ECDSA),
        net=leaf("net", "*.example.net", key_type=trustme.KeyType.ECDSA),
        other=leaf("other", "mx.elsewhere.example", key_type=trustme.KeyType.ECDSA),
    )


@pytest.fixture
def log() -> Any:
    with session_log() as handler:
        yield handler


def profile_text(cert: str, extra: str = "", backend: str = '["/bin/cat"]') -> str:
    return f"""
[profile.smtp]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert = {cert}
backend = {backend}
{extra}"""


async def hosted_front(start_front: Any, hosted: Hosted) -> Front:
    """The three entries, the default the test suite's own certificate."""
    table = hosted.table("CERT").replace("{", "{{").replace("}", "}}").replace("CERT", "{cert}")
    front: Front = await start_front(profile_text(table, backend="{backend}"))
    return front


# ---------------------------------------------------------------------------
# Names and the choice


def test_server_names_are_host_names_or_nothing() -> None:
    assert sni.server_name(b"Mail.Example.ORG.") == "mail.example.org"
    for bad in (b"", b"a b", b"x\x00y", b"-a.example", b"a..b", b"\xff", "é.example".encode()):
        assert sni.server_name(bad) is None, bad
    assert sni.server_name(None) is None


def test_table_names() -> None:
    assert sni.table_name("default") == "default"
    assert sni.table_name("*.Example.NET") == "*.example.net"
    assert sni.table_name("MAIL.example.org") == "mail.example.org"
    for bad in ("*.net", "*example.net", "a.*.example.net", "**.example.net", "x y"):
        assert sni.table_name(bad) is None, bad


def test_choose_exact_then_wildcard_then_default() -> None:
    names = {"mail.example.org": 1, "*.example.net": 2, "example.net": 3}
    assert sni.choose(names, "mail.example.org") == "mail.example.org"
    assert sni.choose(names, "smtp.example.net") == "*.example.net"
    assert sni.choose(names, "example.net") == "example.net"  # not the wildcard's
    assert sni.choose(names, "a.b.example.net") == "default"  # one label only
    assert sni.choose(names, "other.example.org") == "default"
    assert sni.choose(names, None) == "default"


# ---------------------------------------------------------------------------
# The TOML shape


def test_cert_table_loads(hosted: Hosted, tls_dir: Path) -> None:
    config = parse_config(profile_text(hosted.table(toml_str(tls_dir / "servercert.pem"))))
    profile = config.profiles["smtp"]
    assert profile.cert == {
        "default": (tls_dir / "servercert.pem",),
        "mail.example.org": (hosted.org_rsa, hosted.org_ecdsa),
        "*.example.net": (hosted.net,),
    }
    settings = tls_settings(profile)
    assert len(settings.credentials) == 1
    assert {n: len(c) for n, c in settings.by_name.items()} == {
        "mail.example.org": 2,
        "*.example.net": 1,
    }


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ('{ "mail.example.org" = "a.pem" }', None, 'needs a "default" entry'),
        ('{ default = "a.pem", "*.org" = "b.pem" }', None, "'*.org': not a server name"),
        ('{ default = "a.pem", "a b" = "b.pem" }', None, "'a b': not a server name"),
        ('{ default = "a.pem", "A.example" = "b", "a.example" = "c" }', None, "given twice"),
        ('{ default = "a.pem", "x.example" = 5 }', None, "'x.example': must be a string"),
        ('{ default = "a.pem", "x.example" = "b.pem" }', '"k.pem"', "does not match cert"),
        (
            '{ default = "a.pem", "x.example" = ["b.pem", "c.pem"] }',
            '{ default = "k.pem", "x.example" = "l.pem" }',
            "does not match cert",
        ),
        ("5", None, "must be a string, a list or a table by server name"),
    ],
)
def test_cert_table_errors(cert: str, key: str | None, message: str) -> None:
    extra = f"key = {key}\n" if key else ""
    with pytest.raises(ConfigError) as info:
        parse_config(profile_text(cert, extra))
    assert message in str(info.value)


def test_keys_by_the_same_names(tmp_path: Path, ca: trustme.CA) -> None:
    files = {}
    for name in ("default", "x.example"):
        leaf = ca.issue_cert("x.example" if name != "default" else "localhost")
        files[name] = (tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        leaf.cert_chain_pems[0].write_to_path(str(files[name][0]))
        leaf.private_key_pem.write_to_path(str(files[name][1]))
    cert = "{ " + ", ".join(f'"{n}" = {toml_str(c)}' for n, (c, _) in files.items()) + " }"
    key = "{ " + ", ".join(f'"{n}" = {toml_str(k)}' for n, (_, k) in files.items()) + " }"
    profile = parse_config(profile_text(cert, f"key = {key}\n")).profiles["smtp"]
    settings = tls_settings(profile)
    assert settings.credentials[0].key_path == files["default"][1]
    assert settings.by_name["x.example"][0].key_path == files["x.example"][1]


# ---------------------------------------------------------------------------
# check: each name covered by its certificate


def test_check_verifies_each_name_is_covered(hosted: Hosted, tls_dir: Path, tmp_path: Path) -> None:
    default = toml_str(tls_dir / "servercert.pem")
    good = parse_config(profile_text(hosted.table(default)))
    report = check_config(good)
    assert not report.errors, report.render()
    notes = "\n".join(report.notes)
    assert "server name mail.example.org" in notes
    assert "covers *.example.net" in notes
    wrong = hosted.table(default).replace(toml_str(hosted.net), toml_str(hosted.other))
    wrong = wrong.replace('"*.example.net"', '"smtp.example.net"')
    report = check_config(parse_config(profile_text(wrong)))
    (error,) = report.errors
    assert "server name smtp.example.net" in error
    assert "not valid for smtp.example.net (it is for mx.elsewhere.example)" in error
    # a certificate for one name does not cover a wildcard entry
    narrow = hosted.table(default).replace(toml_str(hosted.net), toml_str(hosted.org_ecdsa))
    narrow = narrow.replace('"*.example.net"', '"*.example.org"')
    (error,) = check_config(parse_config(profile_text(narrow))).errors
    assert "not valid for *.example.org" in error


def test_a_broken_name_entry_names_the_name(hosted: Hosted, tls_dir: Path) -> None:
    settings = tls_settings(
        parse_config(profile_text(hosted.table(toml_str(tls_dir / "servercert.pem")))).profiles[
            "smtp"
        ]
    )
    two_rsa = (*settings.by_name["mail.example.org"], load_server_credentials(hosted.org_rsa, None))
    broken = type(settings)(credentials=settings.credentials, by_name={"mail.example.org": two_rsa})
    with pytest.raises(TLSConfigError, match=r"server name mail\.example\.org: .*a second RSA"):
        ServerTLS(broken)


# ---------------------------------------------------------------------------
# Real clients: openssl s_client -servername and swaks --tls-sni

PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def received(output: bytes) -> x509.Certificate:
    """The first certificate in a client's output: the server's leaf (swaks
    prefixes its lines with "=== ")."""
    match = PEM.search(output.replace(b"=== ", b""))
    assert match is not None, output.decode(errors="replace")
    return x509.load_pem_x509_certificate(match.group(0))


def names(cert: x509.Certificate) -> list[str]:
    return sni.names_of(cert)


async def run(argv: list[str], stdin: bytes = b"") -> bytes:
    with trio.fail_after(30):
        result = await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    return bytes(result.stdout) + bytes(result.stderr)


async def s_client(port: int, servername: str | None, *extra: str) -> x509.Certificate:
    argv = [need_tool("openssl"), "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}"]
    argv += ["-servername", servername] if servername else ["-noservername"]
    return received(await run([*argv, *extra], stdin=b"QUIT\r\n"))


CASES = [
    ("mail.example.org", "mail.example.org", ["mail.example.org"]),
    ("smtp.example.net", "*.example.net", ["*.example.net"]),
    ("unknown.example.com", "default", ["localhost"]),
    (None, "default", ["localhost"]),
]


@pytest.mark.interop
async def test_openssl_s_client_gets_the_certificate_for_its_name(
    start_front: Any, hosted: Hosted, log: SessionLog
) -> None:
    front = await hosted_front(start_front, hosted)
    port = front.port("smtp")
    for sent, _, expected in CASES:
        cert = await s_client(port, sent)
        assert set(names(cert)) == set(expected), (sent, names(cert))
    # RSA and ECDSA for the same name, each chosen by what the client accepts
    rsa_cert = await s_client(
        port, "mail.example.org", "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"
    )
    ec_cert = await s_client(
        port, "mail.example.org", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    assert isinstance(rsa_cert.public_key(), rsa.RSAPublicKey)
    assert isinstance(ec_cert.public_key(), ec.EllipticCurvePublicKey)
    assert names(rsa_cert) == names(ec_cert) == ["mail.example.org"]
    with trio.fail_after(10):
        await log.wait_ends(len(CASES) + 2)
    for (_, entry, _), line in zip(CASES, log.ends, strict=False):
        assert f" sni={entry} " in line, line


@pytest.mark.interop
async def test_swaks_tls_sni_gets_the_certificate_for_its_name(
    start_front: Any, hosted: Hosted, log: SessionLog
) -> None:
    """Also SSL_TLS_SNI: the backend learns the name the client asked for."""
    front = await hosted_front(start_front, hosted)
    for sent, _, expected in CASES:
        argv = [
            *("swaks", "--server", "127.0.0.1", "--port", str(front.port("smtp"))),
            *("--tls", "--tls-get-peer-cert", "--to", "rcpt@example.org"),
            *("--from", "a@example.net", "--helo", "swaks.example.net"),
        ]
        argv[0] = need_tool("swaks")
        if sent is not None:
            argv += ["--tls-sni", sent]
        output = await run(argv)
        assert b"<~  250 ok" in output, output.decode(errors="replace")
        cert = received(output)
        assert set(names(cert)) == set(expected), (sent, names(cert))
    with trio.fail_after(10):
        await log.wait_ends(len(CASES))
    for (_, entry, _), line in zip(CASES, log.ends, strict=True):
        assert f" sni={entry} " in line, line
    after_tls = [s for s in front.sessions() if "SSL_PROTOCOL" in s["env"]]
    assert [s["env"].get("SSL_TLS_SNI") for s in after_tls] == [sent for sent, _, _ in CASES]


def test_a_renewed_name_certificate_is_taken_for_new_sessions(
    hosted: Hosted, tls_dir: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file of the table is watched, as a plain cert is: an ACME client
    renewing one name's certificate needs no reload."""
    monkeypatch.setattr(watch, "RECHECK_SECONDS", 0.0)
    text = profile_text(hosted.table(toml_str(tls_dir / "servercert.pem")))
    runtime = ProfileRuntime.build(parse_config(text).profiles["smtp"])
    assert runtime.tls is not None
    first = runtime.tls.get()
    assert first is not None
    staged = hosted.net.with_suffix(".new")
    ca.issue_cert("*.example.net").private_key_and_cert_chain_pem.write_to_path(str(staged))
    staged.replace(hosted.net)  # a new file renamed in place
    second = runtime.tls.get()
    assert second is not None
    assert second is not first
    old_leaf = first.settings.by_name["*.example.net"][0].chain[0]
    new_leaf = second.settings.by_name["*.example.net"][0].chain[0]
    assert new_leaf != old_leaf
    assert new_leaf == load_server_credentials(hosted.net, None).chain[0]
