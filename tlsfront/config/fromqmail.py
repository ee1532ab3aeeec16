"""What a qmail control directory (`qmail_control`) gives a profile.

This is the one place that decides which control files stand in for which
keys, for both modes, as the qmail-tls patch would have used them:

    inbound:  servercert.pem -> cert, clientca.pem -> client_ca,
              clientcrl.pem -> client_crl, tlsclients -> relay_clients
              (only with a CA; then client_cert = "request"),
              tlsserverciphers or $TLSCIPHERS -> ciphers,
              dh2048.pem / dh1024.pem -> dhparams, databytes -> max_message_size
    outbound: tlshosts/ -> tlshosts, notlshosts/ -> notlshosts,
              clientcert.pem -> client_cert_file, smtproutes -> smtproutes
              (its `domain:relay:port user password` lines give credentials)
    both:     me -> hostname

The values sit just below the table that names the directory (see
`tlsfront.config.build`); the outbound relay and the TLS engine read only
the finished Profile.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tlsfront.config.checks import hostname
from tlsfront.config.errors import Bad, ConfigError
from tlsfront.config.schema import Mode
from tlsfront.qmail.control import QmailControl

# key -> (value, the control file it came from)
ControlValues = dict[str, tuple[Any, Path]]


def control_values(qc: QmailControl, mode: Mode, environ: Mapping[str, str]) -> ControlValues:
    """The profile keys the control directory `qc` sets for a profile of `mode`."""
    out: ControlValues = {}

    def put(name: str, value: Any, file: Path | None) -> None:
        if value is not None and file is not None:
            out[name] = (value, file)

    d = qc.directory
    if mode == "outbound":
        put("tlshosts", qc.tlshosts, qc.tlshosts)
        put("notlshosts", qc.notlshosts, qc.notlshosts)
        put("client_cert_file", qc.clientcert, qc.clientcert)
        put("smtproutes", qc.smtproutes, qc.smtproutes)
        return out
    put("cert", (qc.servercert,) if qc.servercert else None, qc.servercert)
    put("client_ca", qc.clientca, qc.clientca)
    put("client_crl", qc.clientcrl, qc.clientcrl)
    if qc.clientca is not None:  # the patch ignores tlsclients without a CA
        put("relay_clients", qc.tlsclients, qc.tlsclients)
    if qc.clientca is not None and qc.tlsclients is not None:
        put("client_cert", "request", qc.tlsclients)  # the patch then asks for one
    from_env = bool(environ.get("TLSCIPHERS"))
    put("ciphers", qc.ciphers, Path("$TLSCIPHERS") if from_env else d / "tlsserverciphers")
    put("dhparams", qc.dhparams, qc.dhparams)
    if qc.databytes is not None and qc.databytes < 0:
        raise ConfigError("must not be negative", path=d / "databytes")
    put("max_message_size", qc.databytes, d / "databytes")
    return out


def control_hostname(qc: QmailControl) -> str | None:
    """The host name in control/me, checked; None when there is none."""
    if qc.me is None:
        return None
    try:
        return hostname(qc.me)
    except Bad as exc:
        raise ConfigError(exc.message, path=qc.directory / "me", line=1) from None
