"""`tlsfront import-qmail`: a commented tlsfront.toml equivalent to a qmail-tls host.

The configuration names the control directory (`qmail_control`), so tlsfront
reads the same files the patch read, whenever it starts; only what the files
cannot say is written out: where to listen, which TLS mode, the backend, the
tcprules file, and values that came from somewhere else (TLSCIPHERS in the
environment). Every choice carries a comment saying why.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from tlsfront.qmail.control import QmailControl, QmailControlError, read_control
from tlsfront.qmail.tcprules import Rule, Rules, RulesError
from tlsfront.qmail.tcpserverargs import TLS_MEMORY, Service

_BARE = re.compile(r"[A-Za-z0-9_-]+")
# FileDescriptorName of the socket units shipped in systemd/, by profile
SYSTEMD_SOCKETS = {
    "smtp": "tlsfront.socket",
    "submission": "tlsfront-submission.socket",
    "smtps": "tlsfront-smtps.socket",
}

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"


def toml_string(value: str) -> str:
    """`value` as a TOML basic string; ValueError if it holds a lone surrogate.

    Lone surrogates are how Python carries bytes that are not UTF-8 in file
    names and environment variables; TOML has no way to write them.
    """
    out = ['"']
    for char in value:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"{value!r} is not valid UTF-8")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _comment_safe(text: str) -> str:
    """`text` with anything a TOML comment may not hold written as an escape."""
    return "".join(
        char if char.isprintable() or char == "\t" else repr(char)[1:-1] for char in text
    )


class _Out:
    """The lines of the file being written."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def comment(self, *lines: str) -> None:
        self.lines.extend(f"# {_comment_safe(line)}".rstrip() for line in lines)

    def key(
        self, name: str, value: str | bool | int | Sequence[str], *, commented: bool = False
    ) -> None:
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, str):
            text = toml_string(value)
        else:
            text = "[" + ", ".join(toml_string(item) for item in value) + "]"
        self.lines.append(f"{'# ' if commented else ''}{name} = {text}")

    def blank(self) -> None:
        self.lines.append("")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _path_text(path: Path) -> str:
    """An absolute path for the file; QmailControlError if TOML cannot hold it."""
    text = str(path.absolute())
    try:
        toml_string(text)
    except ValueError:
        raise QmailControlError(path, "cannot be named in TOML: the name is not UTF-8") from None
    return text


def _rules_source(rules: Path) -> tuple[Path, list[str]]:
    """The tcprules source to name, with a note when the compiled .cdb was given."""
    if rules.suffix != ".cdb":
        return rules, []
    source = rules.with_suffix("")
    if source.is_file():
        return source, [f"{_path_text(rules)} is compiled; its source {_path_text(source)} is used"]
    raise RulesError(
        str(rules),
        None,
        "is the compiled form: name the source tcprules reads (e.g. /etc/tcp.smtp)",
    )


def _defaults(
    out: _Out,
    qc: QmailControl,
    backend: Sequence[str],
    environ: Mapping[str, str],
    service: Service | None,
) -> None:
    d = qc.directory
    out.blank()
    out.lines.append("[defaults]")
    out.comment(
        "tlsfront reads the qmail-tls patch's files from this directory at every start,",
        "as the patch did; a key set in this file wins over the file. Found here:",
    )
    found = {
        "servercert.pem": (qc.servercert, "server key and certificate, in one file"),
        "clientca.pem": (qc.clientca, "CA that client certificates are verified against"),
        "clientcrl.pem": (qc.clientcrl, "revoked client certificates"),
        "tlsclients": (qc.tlsclients, "e-mail addresses whose certificates may relay"),
        "tlsserverciphers": (
            d / "tlsserverciphers" if (d / "tlsserverciphers").exists() else None,
            "OpenSSL cipher list for TLS 1.2 and older",
        ),
        "dh2048.pem/dh1024.pem": (qc.dhparams, "DH parameters"),
    }
    for name, (path, what) in found.items():
        out.comment(f"  {name:22} {'yes' if path else 'no '}  {what}")
    if qc.databytes is not None:
        out.comment(f"  databytes              {qc.databytes}  the message size limit, kept")
    out.key("qmail_control", _path_text(d))
    if qc.me is not None:
        out.comment("control/me: the name in tlsfront's Received header")
        out.key("hostname", qc.me)
    else:
        out.comment("no control/me: the host name comes from the system")
    if service is None:
        out.comment(
            "The program run for each session, connected by pipes, with the environment",
            "tcpserver gave it. If the run script ran a chain (rblsmtpd ... qmail-smtpd,",
            "qmail-smtpd with a checkpassword program), write that whole command here.",
        )
    else:
        out.comment("The chain the run script gave tcpserver, run for each session.")
    out.key("backend", list(backend))
    _ciphers(out, qc, environ)
    if service is not None:
        _service_defaults(out, service)
    if service is None or (service.user is None and service.group is None):
        _qmail_account(out)


def _qmail_account(out: _Out) -> None:
    """qmaild:nofiles, the account of qmail's own smtpd run script, when this host has it."""
    try:
        pwd.getpwnam("qmaild")
    except KeyError:
        out.comment(
            "No qmaild account here: set user (and group) to the account qmail-smtpd",
            "ran as (tcpserver -u/-g); started as root, `tlsfront run` refuses to run",
            "backends as root.",
        )
        return
    out.comment("The account qmail-smtpd runs as, as tcpserver -u/-g ran it in qmail's run script.")
    out.key("user", "qmaild")
    try:
        grp.getgrnam("nofiles")
    except KeyError:
        return
    out.key("group", "nofiles")


def _key(name: str) -> str:
    """`name` as a TOML key."""
    return name if _BARE.fullmatch(name) else toml_string(name)


def _service_defaults(out: _Out, service: Service) -> None:
    """The run script's environment, account, look-ups and limits."""
    env = {k: v for k, v in service.env.items() if k not in ("TLSCIPHERS", "SMTPS")}
    if env:
        out.comment("Exported by the run script; given to every backend as tcpserver gave it.")
        out.lines.append(
            "env = {" + ", ".join(f"{_key(k)} = {toml_string(v)}" for k, v in env.items()) + "}"
        )
    if "SMTPS" in service.env:
        out.comment("SMTPS is set by the run script: implicit TLS is a profile (--smtps).")
    if service.user is not None or service.group is not None:
        out.comment("The account tcpserver ran qmail-smtpd as (-u/-g, setuidgid, envuidgid).")
        if service.user is not None:
            out.key("user", service.user)
        if service.group is not None:
            out.key("group", service.group)
    if service.remote_host_lookup is False:
        out.comment("tcpserver -H: no TCPREMOTEHOST look-up.")
        out.key("remote_host_lookup", False)
    if service.remote_host_paranoid:
        out.comment("tcpserver -p: TCPREMOTEHOST only when the name maps back to the address.")
        out.key("remote_host_paranoid", True)
    if service.memory_limit is not None:
        out.comment(
            f"The run script limited memory (softlimit -m {service.memory_limit}). If you keep",
            f"a limit in front of tlsfront, give it at least {TLS_MEMORY // 1_000_000} MB: TLS",
            "does not start with less (libssl fails to map its segments, or it crashes).",
        )


def _ciphers(out: _Out, qc: QmailControl, environ: Mapping[str, str]) -> None:
    from_env = environ.get("TLSCIPHERS")
    if from_env:
        try:
            toml_string(from_env)
        except ValueError:
            raise QmailControlError(Path("$TLSCIPHERS"), "is not valid UTF-8") from None
        out.comment(
            "TLSCIPHERS is set where this was made; in the patch it wins over",
            "control/tlsserverciphers, so it is written here (tlsfront's own",
            "environment may not have it).",
        )
        out.key("ciphers", from_env)
        return
    # Otherwise control/tlsserverciphers is read through qmail_control.


def _by_line(rules: Sequence[Rule]) -> list[str]:
    """Rules grouped by their line: a range shows as "first..last"."""
    lines: dict[str, list[Rule]] = {}
    for rule in rules:
        lines.setdefault(rule.source, []).append(rule)
    shown = []
    for group in lines.values():
        first, last = f'"{group[0].key}"', f'"{group[-1].key}"'
        shown.append(first if len(group) == 1 else f"{first}..{last}")
    return shown


def _rules_notes(out: _Out, rules: Rules) -> None:
    every = list(rules)
    relay = _by_line([rule for rule in every if rule.allow and "RELAYCLIENT" in rule.env])
    denied = _by_line([rule for rule in every if not rule.allow])
    out.comment(
        f"tcprules: {len({rule.source for rule in every})} rule lines, applied per client",
        "as tcpserver applied the .cdb: 'deny' closes the connection before any SMTP,",
        "the variables go to qmail-smtpd.",
    )
    for what, keys in (("RELAYCLIENT (relay by IP) for", relay), ("deny for", denied)):
        for start in range(0, len(keys), 5):
            out.comment(f"{what if start == 0 else '  '} {', '.join(keys[start : start + 5])}")
    why = {
        "TLSCIPHERS": "rule variables reach only qmail-smtpd; tlsfront's list is `ciphers`",
        "SMTPS": "a patched qmail-smtpd would start TLS on tlsfront's pipe: remove it",
    }
    for name, reason in why.items():
        setters = [rule.source for rule in rules if name in rule.env]
        if setters:
            out.comment(f"{name} is set by {', '.join(setters[:3])}:", f"  {reason}")
    for warning in rules.warnings:
        out.comment(f"note: {warning}")


def _inbound(
    out: _Out,
    name: str,
    port: int,
    tls: str,
    qc: QmailControl,
    rules: str | None,
    *,
    commented: bool = False,
    systemd: bool = False,
    service: Service | None = None,
) -> None:
    """The keys of one inbound profile."""

    def key(name: str, value: str | bool | int | Sequence[str]) -> None:
        out.key(name, value, commented=commented)

    out.lines.append(f"{'# ' if commented else ''}[profile.{name}]")
    listen = service.listen if service is not None and service.listen else [f"0.0.0.0:{port}"]
    unit = SYSTEMD_SOCKETS[name]
    if systemd:
        if not commented:
            out.comment(f"sockets from systemd's {unit} (or listen, instead of it):")
        key("systemd", name)
        out.key("listen", listen, commented=True)
    else:
        key("listen", listen)
        if not commented:
            out.comment(f"or, with systemd's {unit} (import-qmail --systemd):")
        out.key("systemd", name, commented=True)
    if service is not None:
        if service.max_connections is not None:
            key("max_connections", service.max_connections)
        if service.hostname is not None and service.hostname != qc.me:
            if not commented:
                out.comment("tcpserver -l: the local name qmail-smtpd saw in TCPLOCALHOST.")
            key("hostname", service.hostname)
    key("tls", tls)
    if tls == "none":
        if rules is not None:
            key("rules", rules)
        return
    if qc.clientca is not None and qc.tlsclients is not None:
        if not commented:
            out.comment(
                "clientca.pem and tlsclients exist: the patch asked for a client certificate",
                "by renegotiating once a client without relay rights gave RCPT TO for a",
                "foreign domain, and let it relay if the certificate's address was listed.",
                "tlsfront asks in the handshake instead (never failing it over a",
                'certificate) and starts qmail-smtpd with RELAYCLIENT="" the same way.',
            )
        key("client_cert", "request")
    elif (qc.clientca is None) != (qc.tlsclients is None) and not commented:
        have, lack = (
            ("clientca.pem", "tlsclients")
            if qc.tlsclients is None
            else ("tlsclients", "clientca.pem")
        )
        out.comment(
            f"{have} without {lack}: the patch never asked for a client certificate,",
            "and neither does this profile.",
        )
    if rules is not None:
        key("rules", rules)


def render_config(
    control: Path,
    rules: Path | None = None,
    smtps: bool = False,
    backend: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    service: Service | None = None,
    systemd: bool = False,
) -> str:
    """A commented tlsfront.toml doing what the qmail-tls setup in `control` did.

    `rules` is the tcprules source (a compiled .cdb is swapped for its source
    beside it); `smtps` adds an implicit-TLS profile on 465. `service` is what
    a run script's tcpserver was asked to do (import-qmail --run): its listen
    address, backend chain, environment, account, rules and limits are used,
    and what it could not translate is written as comments. The backend is
    otherwise qmail-smtpd in the qmail home, the parent of `control`.
    `systemd` takes the sockets from the shipped socket units instead of
    listening. Raises QmailControlError for control files that cannot be read,
    RulesError for a rules file that tcprules would refuse.
    """
    if service is not None:
        environ = service.server_env
    environ = os.environ if environ is None else environ
    qc = read_control(control, environ)
    if backend is None:
        if service is not None and service.backend:
            backend = service.backend
        else:
            backend = [_path_text(control.absolute().parent / "bin" / "qmail-smtpd")]
    out = _Out()
    out.comment(
        "tlsfront configuration written by `tlsfront import-qmail` from the qmail",
        f"control directory {toml_string(_path_text(control))}. Check it with",
        "`tlsfront check -c FILE`, then let tlsfront listen where qmail-smtpd did.",
    )
    rules_text: str | None = None
    parsed: Rules | None = None
    notes: list[str] = []
    if rules is None and service is not None and service.rules is not None:
        rules = _service_rules(service)
    if rules is not None:
        source, notes = _rules_source(rules)
        parsed = Rules.load(source)
        rules_text = _path_text(source)
    if service is not None:
        _service_header(out, service)
    _defaults(out, qc, backend, environ, service)

    out.blank()
    out.comment('Port 25, where tcpserver ran qmail-smtpd. Add "[::]:25" for IPv6.')
    if qc.servercert is None:
        out.comment(
            "control/servercert.pem was not found, so the patch offered no STARTTLS",
            "here and neither does this profile. Put the key and certificate there",
            '(one PEM file) and set tls = "starttls" to offer it.',
        )
        _inbound(out, "smtp", 25, "none", qc, rules_text, systemd=systemd, service=service)
    else:
        out.comment("control/servercert.pem exists: STARTTLS is offered, as the patch did.")
        _inbound(out, "smtp", 25, "starttls", qc, rules_text, systemd=systemd, service=service)
    if parsed is not None:
        out.comment(*notes)
        _rules_notes(out, parsed)

    out.blank()
    out.comment(
        "Port 587 for your own users, TLS required before MAIL (the patch had no such",
        "service). Uncomment to use; relaying then comes from client certificates.",
    )
    _inbound(out, "submission", 587, "starttls", qc, None, commented=True, systemd=systemd)
    out.key("require_tls", True, commented=True)

    out.blank()
    if not smtps:
        out.comment("Port 465 (TLS from the first byte) was not asked for: --smtps adds it.")
        _inbound(out, "smtps", 465, "implicit", qc, rules_text, commented=True, systemd=systemd)
    elif qc.servercert is None:
        out.comment(
            "Port 465 was asked for, but it needs control/servercert.pem, which is",
            "missing; uncomment once it is there.",
        )
        _inbound(out, "smtps", 465, "implicit", qc, rules_text, commented=True, systemd=systemd)
    else:
        out.comment(
            "Port 465: TLS from the first byte (what SMTPS=1 made the patched",
            "qmail-smtpd do), then the same qmail-smtpd and rules as port 25.",
        )
        _inbound(out, "smtps", 465, "implicit", qc, rules_text, systemd=systemd)
    return out.text()


def _service_rules(service: Service) -> Path | None:
    """The tcprules source of the run script's -x FILE.cdb, or None (said why)."""
    assert service.rules is not None
    rules = service.rules
    if rules.suffix == ".cdb" and not rules.with_suffix("").is_file():
        service.untranslated.append(
            f"-x {rules}: its source {rules.with_suffix('')} is not there; "
            "set rules to the file tcprules compiled it from"
        )
        return None
    if rules.suffix != ".cdb" and not rules.is_file():
        service.untranslated.append(f"-x {rules}: no such file")
        return None
    if service.rules_optional:
        service.notes.append("-X: tcpserver allowed every client when the .cdb was missing")
    return rules


def _service_header(out: _Out, service: Service) -> None:
    out.blank()
    out.comment("From the run script (import-qmail --run):")
    for note in service.notes:
        out.comment(f"  {note}")
    if service.untranslated:
        out.comment("COULD NOT TRANSLATE (set these by hand, or decide they do not matter):")
        for problem in service.untranslated:
            out.comment(f"  - {problem}")
