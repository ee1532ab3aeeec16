"""Rules across keys, run on a finished Profile of each mode.

A rule is (key, broken, message): when `broken(profile)` holds, the profile
is refused at the line of `key` (or of the table that set it). The message
may name `{p}` (the profile), `{n_key}` and `{n_cert}`.
"""

from __future__ import annotations

from collections.abc import Callable

from tlsfront.config.account import AccountError, resolve_account
from tlsfront.config.certtable import keys_mismatch
from tlsfront.config.schema import Mode, Profile

Rule = tuple[str, Callable[[Profile], bool], str]

# No rule wants `listen` or `systemd`: a profile with neither is served
# only through `tlsfront inetd -p NAME`, and `tlsfront run` skips it.


def _unknown_numeric_user(p: Profile) -> bool:
    if p.user is None or p.group is not None:
        return False
    try:
        resolve_account(p.user, None)
    except AccountError:
        return True
    return False


# user/group: the account of backends (inbound), and of workers (both)
ACCOUNT_RULES: tuple[Rule, ...] = (
    ("group", lambda p: p.group is not None and p.user is None, "needs user as well"),
    ("user", _unknown_numeric_user, "{p.user!r} is not in the user database: give group as well"),
)
INBOUND_RULES: tuple[Rule, ...] = (
    *ACCOUNT_RULES,
    (
        "backend",
        lambda p: not p.backend and p.backend_connect is None,
        'needs backend = ["/var/qmail/bin/qmail-smtpd"] or backend_connect = "host:port"',
    ),
    (
        "backend_connect",
        lambda p: bool(p.backend) and p.backend_connect is not None,
        "and backend are both set: a profile has one backend",
    ),
    (
        "cert",
        lambda p: p.tls != "none" and not p.cert,
        "tls = {p.tls!r} needs a certificate: set cert (a qmail servercert.pem works"
        " alone) or qmail_control to a directory with servercert.pem",
    ),
    (
        "key",
        keys_mismatch,
        "does not match cert: give a table with the names of cert and one key per"
        " certificate under each, or none when each cert file holds its key",
    ),
    (
        "key",
        lambda p: bool(p.key) and len(p.key) != len(p.cert),
        "has {n_key} entries but cert has {n_cert}: give one key per cert, or none"
        " when each cert file holds its key",
    ),
    ("require_tls", lambda p: p.require_tls and p.tls == "none", "needs TLS, but tls = 'none'"),
    (
        "require_auth",
        lambda p: p.require_auth and not (p.auth_checkpassword or p.auth_dovecot),
        "needs auth_checkpassword or auth_dovecot",
    ),
    (
        "auth_dovecot",
        lambda p: bool(p.auth_checkpassword and p.auth_dovecot),
        "one verifier a profile: auth_checkpassword or auth_dovecot",
    ),
    (
        "auth_checkpassword",
        lambda p: len(p.auth_checkpassword) == 1,
        "needs the program to run on success too, as qmail's checkpassword does",
    ),
    (
        "client_cert",
        lambda p: p.client_cert != "none" and p.tls == "none",
        "{p.client_cert!r} needs TLS, but tls = 'none'",
    ),
    (
        "client_cert",
        lambda p: p.client_cert == "require" and p.client_ca is None,
        "'require' needs client_ca, the CA bundle to verify client certificates with",
    ),
    (
        "relay_clients",
        lambda p: p.relay_clients is not None and p.client_ca is None,
        "needs client_ca: addresses are trusted only from certificates verified against it",
    ),
    *(
        (
            name,
            lambda p, name=name: p.client_cert == "none" and bool(getattr(p, name)),
            'would never be used: set client_cert = "request"',
        )
        for name in ("relay_clients", "relay_fingerprints", "relay_fingerprints_file")
    ),
    *(
        (
            name,
            lambda p, name=name: getattr(p, name) is not None and p.backend_connect is None,
            "works only with backend_connect (an exec backend gets RELAYCLIENT instead)",
        )
        for name in (
            "relay_backend_connect",
            "source_address",
            "relay_source_address",
            "backend_rules",
        )
    ),
    (
        "relay_backend_connect",
        lambda p: (
            p.relay_backend_connect is not None and p.relay_backend_connect == p.backend_connect
        ),
        "equals backend_connect: relaying and other sessions would be indistinguishable",
    ),
    (
        "relay_source_address",
        lambda p: p.relay_source_address is not None and p.relay_source_address == p.source_address,
        "equals source_address: relaying and other sessions would be indistinguishable",
    ),
    (
        "proxy_protocol",
        lambda p: p.proxy_protocol and not p.proxy_trusted,
        "needs proxy_trusted: otherwise any client could claim any address",
    ),
)
OUTBOUND_RULES: tuple[Rule, ...] = ACCOUNT_RULES

RULES: dict[Mode, tuple[Rule, ...]] = {"inbound": INBOUND_RULES, "outbound": OUTBOUND_RULES}
