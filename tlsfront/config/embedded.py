"""The embedded configuration: what `tlsfront run` serves when no config file exists.

STARTTLS on 127.0.0.1:2525 and implicit TLS on 127.0.0.1:4650, in front of
qmail-smtpd when it is installed, else in front of the bundled sink, so a
first message can go through within a minute. It sits above the loader and
builds its `Config` with the same code as a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tlsfront.config.files import config_from_dict
from tlsfront.config.machine import (
    default_account,
    default_backend,
    default_hostname,
    default_state_dir,
    default_tls_files,
)
from tlsfront.config.schema import Config
from tlsfront.tls.certs import make_self_signed

SMTP_LISTEN = "127.0.0.1:2525"
SMTPS_LISTEN = "127.0.0.1:4650"


def ensure_default_files(config: Config) -> None:
    """Make the embedded default's self-signed certificate if it is missing."""
    cert, key = default_tls_files(config.settings.state_dir)
    if not (cert.exists() and key.exists()):
        make_self_signed(config.settings.hostname, cert, key)


def embedded_config(
    state_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """The configuration served when no file exists .

    Built as the dicts tomllib would return and checked by the same code as a
    file, so it obeys every rule a file does; dicts rather than TOML text so
    that paths (sys.executable, $HOME) need no quoting.
    """
    state = default_state_dir(environ) if state_dir is None else state_dir
    hostname = default_hostname()
    cert, key = default_tls_files(state)  # made by ensure_default_files
    tls_files = {"cert": str(cert), "key": str(key)}
    backend = default_backend(state, hostname)
    data: dict[str, Any] = {
        "defaults": {"hostname": hostname, "state_dir": str(state), **default_account(backend)},
        "profile": {
            "smtp": {"listen": [SMTP_LISTEN], "tls": "starttls", "backend": backend, **tls_files},
            "smtps": {"listen": [SMTPS_LISTEN], "tls": "implicit", "backend": backend, **tls_files},
        },
    }
    return config_from_dict(data, None, environ)
