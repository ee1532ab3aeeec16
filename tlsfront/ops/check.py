"""`tlsfront check`: the configuration and every file it names, with a report.

Errors make the exit status 1; warnings (a certificate expiring within 21
days, a rules line that makes a TCP backend an open relay) do not.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tlsfront.config import certtable
from tlsfront.config.errors import ConfigError
from tlsfront.config.files import load_chosen
from tlsfront.config.schema import Config, Profile
from tlsfront.net.address import split_host_port
from tlsfront.ops.privileges import profile_account
from tlsfront.tls.certs import (
    CertError,
    load_ca_bundle,
    load_crls,
    load_server_credentials,
    stale_crls,
)
from tlsfront.tls.context import issued_by_trusted_root, non_forward_secret
from tlsfront.tls.sni import DEFAULT, covers, names_of

if TYPE_CHECKING:
    from cryptography import x509

    from tlsfront.qmail.tcprules import Rules

EXPIRY_WARNING = datetime.timedelta(days=21)


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        lines = [f"ok: {n}" for n in self.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"error: {e}" for e in self.errors]
        verdict = "FAILED" if self.errors else "OK"
        lines.append(f"{verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(lines) + "\n"


def _check_certs(profile: Profile, report: Report, now: datetime.datetime) -> None:
    table = isinstance(profile.cert, Mapping)
    for name, (certs, keys) in certtable.entries(profile.cert, profile.key).items():
        for cert, key in zip(certs, keys, strict=True):
            where = f"profile {profile.name}: {name}: {cert}" if table else None
            leaf = _check_cert(profile, report, now, cert, key, where)
            if leaf is None or name == DEFAULT:
                continue
            # a client that verifies the name it asked for must find it covered
            where = f"profile {profile.name}: server name {name}: {cert}"
            if covers(leaf, name):
                report.note(f"{where}: covers {name}")
            else:
                its = ", ".join(names_of(leaf)) or "no name"
                report.error(f"{where}: not valid for {name} (it is for {its})")


def _check_cert(
    profile: Profile,
    report: Report,
    now: datetime.datetime,
    cert: Path,
    key: Path | None,
    where: str | None,
) -> x509.Certificate | None:
    """One certificate file: loads with its key, dates, chain order; its leaf."""
    try:
        creds = load_server_credentials(cert, key)
    except CertError as exc:
        report.error(f"profile {profile.name}: {exc}")
        return None
    leaf = creds.chain[0]
    left = leaf.not_valid_after_utc - now
    where = where or f"profile {profile.name}: {cert}"
    if left < datetime.timedelta(0):
        report.error(f"{where}: certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    elif left < EXPIRY_WARNING:
        report.warn(f"{where}: certificate expires in {left.days} days")
    else:
        report.note(f"{where}: key matches, valid until {leaf.not_valid_after_utc:%Y-%m-%d}")
    for child, parent in zip(creds.chain, creds.chain[1:], strict=False):
        if child.issuer != parent.subject:
            report.warn(
                f"{where}: chain out of order: {child.subject.rfc4514_string()} "
                f"is not issued by {parent.subject.rfc4514_string()}"
            )
    lone = len(creds.chain) == 1 and leaf.issuer != leaf.subject
    if lone and not issued_by_trusted_root(leaf):  # a root's own leaf needs none
        report.warn(
            f"{where}: no intermediate certificates in the file, and its issuer"
            f" ({leaf.issuer.rfc4514_string()}) is not a root this host trusts;"
            " clients may not be able to build the chain"
        )
    return leaf


def _check_ciphers(profile: Profile, report: Report) -> None:
    if profile.ciphers is None:
        return
    weak = non_forward_secret(profile.ciphers)
    if weak:
        shown = ", ".join(weak[:4]) + (", ..." if len(weak) > 4 else "")
        report.warn(
            f"profile {profile.name}: ciphers enables {len(weak)} TLS 1.2 suite(s) without"
            f" forward secrecy ({shown}): whoever gets the server key later can read"
            " recorded sessions; add ':!kRSA:!aNULL' or drop the key (a legacy"
            " tlsserverciphers is taken as it is)"
        )


def _check_client_files(profile: Profile, report: Report, now: datetime.datetime) -> None:
    from tlsfront.inbound.relaypolicy import RelayListError, read_fingerprints, read_relay_clients

    if profile.client_ca is not None:
        try:
            report.note(
                f"profile {profile.name}: client_ca holds "
                f"{len(load_ca_bundle(profile.client_ca))} certificate(s)"
            )
        except CertError as exc:
            report.error(f"profile {profile.name}: {exc}")
    if profile.client_crl is not None:
        try:
            crls = load_crls(profile.client_crl)
        except CertError as exc:
            report.error(f"profile {profile.name}: {exc}")
        else:
            # it refuses every certificate relay; unused without client_cert
            say = report.error if profile.client_cert != "none" else report.warn
            for problem in stale_crls(crls, now):
                say(f"profile {profile.name}: {profile.client_crl}: {problem}")
    try:
        if profile.relay_clients is not None:
            n = len(read_relay_clients(profile.relay_clients))
            report.note(f"profile {profile.name}: relay_clients lists {n} address(es)")
        if profile.relay_fingerprints_file is not None:
            read_fingerprints(profile.relay_fingerprints_file)
    except (OSError, RelayListError) as exc:
        report.error(f"profile {profile.name}: {exc}")


def _check_backend(profile: Profile, report: Report) -> None:
    if not profile.backend:
        return
    program = profile.backend[0]
    found = shutil.which(program) if "/" not in program else program
    if found is None or not os.path.isfile(found):
        report.error(f"profile {profile.name}: backend program {program} not found")
    elif not os.access(found, os.X_OK):
        report.error(f"profile {profile.name}: backend program {program} is not executable")
    else:
        report.note(f"profile {profile.name}: backend {found}")
    if "RELAYCLIENT" in profile.env:
        report.warn(f"profile {profile.name}: env sets RELAYCLIENT: every client may relay")
    _check_account(profile, report)


def _check_account(profile: Profile, report: Report) -> None:
    """The account backends run as: root is what tcpserver -u/-g existed to avoid."""
    account = profile_account(profile)
    if account is not None and not account.is_root:
        report.note(f"profile {profile.name}: backends run as {account.name}")
        return
    who = "root" if account is not None else "tlsfront's own account (root when started as root)"
    if profile.allow_root_backend:
        report.note(f"profile {profile.name}: backends run as {who} (allow_root_backend = true)")
    else:
        report.warn(
            f"profile {profile.name}: backends would run as {who}; `tlsfront run` as "
            'root refuses that: set user = "qmaild" and group = "nofiles" (tcpserver '
            "-u/-g), or allow_root_backend = true"
        )


def _load_rules(path: Path, profile: Profile, report: Report) -> Rules | None:
    from tlsfront.qmail.tcprules import Rules, RulesError

    try:
        rules = Rules.load(path)
    except (OSError, RulesError) as exc:
        report.error(f"profile {profile.name}: {exc}")
        return None
    for warning in rules.warnings:
        report.warn(f"profile {profile.name}: {warning}")
    return rules


def _check_rules(profile: Profile, report: Report) -> Rules | None:
    if profile.rules is None:
        return None
    rules = _load_rules(profile.rules, profile, report)
    if rules is None:
        return None
    report.note(f"profile {profile.name}: rules {profile.rules} read")
    from tlsfront.inbound.remotehost import needs_host

    if needs_host(rules) and not profile.remote_host_lookup:
        report.warn(
            f"profile {profile.name}: rules have host name (=host) keys, but"
            " remote_host_lookup = false: they never match (as with tcpserver -H)"
        )
    elif needs_host(rules):
        report.note(
            f"profile {profile.name}: rules have host name (=host) keys: they match the"
            " client's name only when it points back to its address, as with tcpserver -p"
        )
    return rules


def backend_sources(profile: Profile) -> list[str]:
    """The addresses tlsfront connects to `backend_connect` from, for sessions
    that may not relay; empty when the system picks one that cannot be known."""
    if profile.source_address is not None:
        return [profile.source_address]
    if profile.backend_connect is None:
        return []
    host, _ = split_host_port(profile.backend_connect)
    if host == "localhost":
        return ["127.0.0.1", "::1"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return []
    if address.is_loopback:  # Linux answers from 127.0.0.1 whatever 127.x is called
        return ["127.0.0.1"] if address.version == 4 else ["::1"]
    return []


def check_tcp_backend(
    profile: Profile,
    report: Report,
    own_rules: Rules | None,
    backend_rules: Path | None = None,
) -> None:
    """threat `env-spoofing`: a TCP backend that lets every session tlsfront forwards relay.

    `backend_rules` is the tcprules source of the backend's own tcpserver.
    Without it, the profile's own `rules` stand in: they are tlsfront's rules,
    not the backend's, but a host often gives both tcpservers one file.
    """
    if profile.backend_connect is None:
        return
    where = f"profile {profile.name}"
    target = profile.backend_connect
    split = profile.relay_backend_connect is not None or profile.relay_source_address is not None
    by_rule = own_rules is not None and any(r.allow and "RELAYCLIENT" in r.env for r in own_rules)
    if not split and (profile.client_cert != "none" or by_rule):
        report.warn(
            f"{where}: sessions allowed to relay reach the TCP backend {target} as every"
            " other session does, so it cannot let them relay: set relay_backend_connect"
            " or relay_source_address"
        )
    if "RELAYCLIENT" in profile.env:
        report.warn(
            f"{where}: env sets RELAYCLIENT: every session is sent the relay way: every"
            " client may relay"
        )
    names = set(profile.env) | {n for r in own_rules or () for n in r.env}
    if passed_over := sorted(names - {"RELAYCLIENT"}):
        report.warn(
            f"{where}: {', '.join(passed_over)} never reach a TCP backend:"
            " over TCP only RELAYCLIENT travels (by the address used)"
        )
    sources = backend_sources(profile)
    if not sources:
        report.warn(
            f"{where}: cannot tell which address tlsfront connects to {target} from: set"
            " source_address, and make sure the backend's tcprules do not grant"
            " RELAYCLIENT to it"
        )
        return
    if backend_rules is not None:
        rules = _load_rules(backend_rules, profile, report)
        named = "the backend's rules"
    else:
        rules, named = own_rules, "rules"
    if rules is None:
        return
    for source in sources:
        hosts = [None, "localhost"] if ipaddress.ip_address(source).is_loopback else [None]
        granted = next(
            (g for h in hosts if (g := rules.relay_granted(source, h)) is not None), None
        )
        if granted is None:
            continue
        text = (
            f"{where}: {named} line {granted.source} grants RELAYCLIENT to {source}, the address"
            f" tlsfront connects to the TCP backend {target} from for sessions that may"
            " not relay"
        )
        if backend_rules is None:
            text += (
                ". These are tlsfront's own rules; if the backend's tcpserver reads them"
                " too (-x with the same file compiled), every client may relay through"
                " tlsfront: an open relay"
            )
        else:
            text += ": every client may relay through tlsfront: an open relay"
        report.warn(
            text + f". Remove RELAYCLIENT for {source} at the backend and let authorized"
            " sessions use relay_backend_connect or relay_source_address"
        )


def _check_handoff(config: Config, report: Report) -> None:
    """The handoff socket's path and account (tlsfront.inbound.handoff)."""
    from tlsfront.inbound.handoff import HandoffError, handoff_uid

    path = config.settings.handoff_socket
    if path is None:
        return
    if len(os.fsencode(path)) > 107:
        report.error(f"handoff_socket {path}: longer than a UNIX socket path may be (107 bytes)")
    default = None
    if os.geteuid() == 0:  # the workers become the profiles' account, if they name one
        from tlsfront.ops.privileges import PrivilegeError, serving_account

        try:
            account = serving_account(config.profiles.values())
        except PrivilegeError:
            account = None  # said by the account checks
        default = account.uid if account is not None else None
    try:
        uid = handoff_uid(config.settings.handoff_user, default)
    except HandoffError as exc:
        report.error(str(exc))
        return
    report.note(f"handoff socket {path} for uid {uid}")


def check_route_credentials(profile: Profile, report: Report) -> None:
    """The credentials files: private, well formed; which routes log in."""
    from tlsfront.outbound.credentials import CredentialsError, describe_logins

    try:
        notes = describe_logins(profile)
    except CredentialsError as exc:
        report.error(f"profile {profile.name}: {exc}")
        return
    for note in notes:
        report.note(f"profile {profile.name}: {note}")


def check_config(config: Config, now: datetime.datetime | None = None) -> Report:
    report = Report()
    now = now or datetime.datetime.now(datetime.UTC)
    _check_handoff(config, report)
    for profile in config.profiles.values():
        if not profile.listen and profile.systemd is None:
            report.note(
                f"profile {profile.name}: no listen or systemd: served only through"
                f" tlsfront inetd -p {profile.name}"
            )
        if profile.mode == "outbound":
            check_route_credentials(profile, report)
        if profile.mode != "inbound":
            continue
        _check_certs(profile, report, now)
        _check_ciphers(profile, report)
        _check_client_files(profile, report, now)
        _check_backend(profile, report)
        own_rules = _check_rules(profile, report)
        # the backend tcpserver's own rules file, once the configuration names it
        backend_rules = profile.backend_rules
        check_tcp_backend(profile, report, own_rules, backend_rules)
    return report


def run_check(config_path: str | None) -> int:
    try:
        config = load_chosen(config_path)
    except ConfigError as exc:
        print(f"error: {exc}")
        print("FAILED: the configuration does not load")
        return 1
    if config is None:
        print("no configuration file: `tlsfront run` would serve the embedded default")
        return 0
    report = check_config(config)
    print(f"configuration: {config.path}")
    print(report.render(), end="")
    return 1 if report.errors else 0
