"""`tlsfront check`: the configuration and every file it names, with a report.

Errors make the exit status 1; warnings (a certificate expiring within 21
days, a rules line that makes a TCP backend an open relay) do not.
"""

from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tlsfront.certs import CertError, load_ca_bundle, load_crls, load_server_credentials
from tlsfront.config import Config, ConfigError, Profile, find_config, load_config

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
    keys: list[Path | None] = list(profile.key) or [None] * len(profile.cert)
    for cert, key in zip(profile.cert, keys, strict=True):
        try:
            creds = load_server_credentials(cert, key)
        except CertError as exc:
            report.error(f"profile {profile.name}: {exc}")
            continue
        leaf = creds.chain[0]
        left = leaf.not_valid_after_utc - now
        where = f"profile {profile.name}: {cert}"
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
        if len(creds.chain) == 1 and leaf.issuer != leaf.subject:
            report.warn(
                f"{where}: no intermediate certificates in the file; clients may "
                "not be able to build the chain"
            )


def _check_client_files(profile: Profile, report: Report) -> None:
    from tlsfront.relay import RelayListError, read_fingerprints, read_relay_clients

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
            load_crls(profile.client_crl)
        except CertError as exc:
            report.error(f"profile {profile.name}: {exc}")
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


def _check_rules(profile: Profile, report: Report) -> None:
    if profile.rules is None:
        return
    from tlsfront.tcprules import Rules, RulesError

    try:
        Rules.load(profile.rules)
        report.note(f"profile {profile.name}: rules {profile.rules} read")
    except (OSError, RulesError) as exc:
        report.error(f"profile {profile.name}: {exc}")


def check_config(config: Config, now: datetime.datetime | None = None) -> Report:
    report = Report()
    now = now or datetime.datetime.now(datetime.UTC)
    for profile in config.profiles.values():
        if profile.mode != "inbound":
            continue
        _check_certs(profile, report, now)
        _check_client_files(profile, report)
        _check_backend(profile, report)
        _check_rules(profile, report)
    return report


def run_check(config_path: str | None) -> int:
    path = find_config(Path(config_path) if config_path else None)
    if path is None:
        print("no configuration file: `tlsfront run` would serve the embedded default")
        return 0
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}")
        print("FAILED: the configuration does not load")
        return 1
    report = check_config(config)
    print(f"configuration: {path}")
    print(report.render(), end="")
    return 1 if report.errors else 0
