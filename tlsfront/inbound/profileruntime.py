"""What a profile needs at run time, built from its configuration.

A `ProfileRuntime` is made once per (re)load of the configuration and is
read-only afterwards: sessions in progress keep the one they started with,
new sessions take the newest. Files that change on their own, such as a
certificate renewed by an ACME client, are watched (`tlsfront.ops.watch`)
and re-read for new sessions without any reload.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tlsfront.auth.checkpassword import CheckpasswordVerifier
from tlsfront.auth.verifier import Verifier
from tlsfront.config import certtable
from tlsfront.config.schema import Profile
from tlsfront.inbound.backend import chosen_environment
from tlsfront.inbound.probe import LearnedFace
from tlsfront.inbound.relaypolicy import RelayPolicy
from tlsfront.ops.watch import FileWatch, watch_file
from tlsfront.qmail.tcprules import Rules
from tlsfront.tls.certs import load_crls, load_server_credentials, stale_crls
from tlsfront.tls.context import ServerTLS, TLSSettings
from tlsfront.tls.sni import DEFAULT


def tls_settings(profile: Profile) -> TLSSettings:
    by_name = {
        name: tuple(
            load_server_credentials(cert, key) for cert, key in zip(certs, keys, strict=True)
        )
        for name, (certs, keys) in certtable.entries(profile.cert, profile.key).items()
    }
    default = by_name.pop(DEFAULT)
    return TLSSettings(
        credentials=default,
        by_name=by_name,
        min_version=profile.min_tls_version,
        ciphers=profile.ciphers,
        ciphersuites=profile.ciphersuites,
        dhparams=profile.dhparams,
        client_cert=profile.client_cert,
        client_ca=profile.client_ca,
        client_crl=profile.client_crl,
    )


log = logging.getLogger("tlsfront")


def server_tls(profile: Profile) -> ServerTLS:
    """The profile's TLS context, built from its files; a stale CRL is a WARNING."""
    built = ServerTLS(tls_settings(profile))
    if profile.client_crl is not None and profile.client_cert != "none":
        now = datetime.datetime.now(datetime.UTC)
        for problem in stale_crls(load_crls(profile.client_crl), now):
            log.warning("profile %s: %s: %s", profile.name, profile.client_crl, problem)
    return built


def tls_files(profile: Profile) -> list[Path]:
    files = certtable.files(profile.cert, profile.key)
    files += [p for p in (profile.client_ca, profile.client_crl, profile.dhparams) if p]
    return files


def checkpassword(profile: Profile) -> Verifier | None:
    """The profile's checkpassword verifier; as its `user` when tlsfront runs as root."""
    argv = profile.auth_checkpassword
    if not argv:
        return None
    if profile.user is not None and os.geteuid() == 0:
        return CheckpasswordVerifier.as_user(argv, profile.user)
    return CheckpasswordVerifier(argv)


@dataclass
class ProfileRuntime:
    profile: Profile
    tls: FileWatch[ServerTLS] | None
    relay: RelayPolicy
    rules: FileWatch[Rules] | None  # tcprules
    # The backend's greeting and EHLO, for the backend on demand; None where
    # nothing can be learned ahead (a process per connection): backend at connect.
    face: LearnedFace | None
    # tlsfront's own AUTH with a checkpassword program (a Dovecot socket is
    # the server's: it needs a connection that outlives sessions)
    auth: Verifier | None
    # the base of every backend environment: env_inherit's variables (run),
    # or all that tlsfront inherited but what it owns (inetd)
    inherited: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls, profile: Profile, *, eager: bool = True, inherited: Mapping[str, str] | None = None
    ) -> ProfileRuntime:
        """Eager: load every file now and raise on the first error."""
        if inherited is None:
            inherited = chosen_environment(profile.env_inherit, os.environ)
        tls = None
        if profile.mode == "inbound" and profile.tls != "none":
            tls = FileWatch(
                f"profile {profile.name}: TLS",
                tls_files(profile),
                lambda: server_tls(profile),
            )
        rules = watch_file(f"profile {profile.name}: rules", profile.rules, Rules.load)
        face = LearnedFace(profile)
        auth = checkpassword(profile)
        runtime = cls(
            profile, tls, RelayPolicy.from_profile(profile), rules, face, auth, dict(inherited)
        )
        if eager:
            runtime.load_all()
        return runtime

    def restamp(self) -> None:
        """After giving up root: see FileWatch.restamp."""
        for watch in (self.tls, self.rules):
            if watch is not None:
                watch.restamp()
        self.relay.restamp()

    def load_all(self) -> None:
        if self.profile.mode == "outbound":
            # a credentials file open to others is refused before serving
            from tlsfront.outbound.credentials import profile_logins

            profile_logins(self.profile)
        if self.tls is not None:
            self.tls.load()
        if self.rules is not None:
            self.rules.load()
        self.relay.load()
