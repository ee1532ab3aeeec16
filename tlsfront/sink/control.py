"""The sink's controls: the options standing for qmail-smtpd's control files.

:class:`Config` is what qmail-smtpd would read from its control directory;
the command line (``--hostname``, ``--rcpthosts``, ``--databytes``, ...) fills it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT = 1200.0


@dataclass(frozen=True)
class Config:
    """What qmail-smtpd would read from control files."""

    hostname: str | None = None
    rcpthosts: frozenset[bytes] | None = None
    databytes: int = 0
    timeout: float = DEFAULT_TIMEOUT


class ControlError(Exception):
    """A file named on the command line cannot be read."""


def read_rcpthosts(path: Path) -> frozenset[bytes]:
    """An rcpthosts file: one domain a line, ``#`` comments and blank lines skipped."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from exc
    hosts = set()
    for line in raw.split(b"\n"):
        line = line.rstrip(b" \t\r")
        if line and not line.startswith(b"#"):
            hosts.add(line.lower())
    return frozenset(hosts)


def build_parser(
    prog: str | None = None, *, maildir_required: bool = True
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m tlsfront.sink",
        description="A qmail-smtpd-compatible SMTP receiver on stdin/stdout "
        "that delivers into a Maildir.",
    )
    parser.add_argument(
        "--maildir", type=Path, required=maildir_required, help="Maildir to deliver into"
    )
    parser.add_argument("--rcpthosts", type=Path, help="file of accepted domains, as qmail's")
    parser.add_argument(
        "--rcpthost",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="an accepted domain (.example.com: its subdomains); repeatable",
    )
    parser.add_argument("--hostname", help="greeting name (default: $TCPLOCALHOST)")
    parser.add_argument(
        "--databytes", type=int, default=0, help="size limit in bytes; 0: none ($DATABYTES wins)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for each read"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config the parsed options describe; ControlError if a file is unreadable."""
    rcpthosts: frozenset[bytes] | None = None
    if args.rcpthosts is not None or args.rcpthost:
        hosts = {os.fsencode(h).lower() for h in args.rcpthost}
        if args.rcpthosts is not None:
            hosts |= read_rcpthosts(args.rcpthosts)
        rcpthosts = frozenset(hosts)
    return Config(
        hostname=args.hostname,
        rcpthosts=rcpthosts,
        databytes=max(0, args.databytes),
        timeout=args.timeout,
    )


def control_failure(prog: str, exc: ControlError) -> int:
    """What qmail-smtpd does when it cannot read its controls."""
    print(f"{prog}: {exc}", file=sys.stderr)
    with contextlib.suppress(OSError):
        os.write(1, b"421 unable to read controls (#4.3.0)\r\n")
    return 1
