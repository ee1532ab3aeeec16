"""The `tlsfront` command: run, inetd, check, import-qmail, cert."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from tlsfront import __version__
from tlsfront.config import Config, ConfigError, find_config, load_config

log = logging.getLogger("tlsfront")


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger("tlsfront")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def load(path: str | None) -> Config:
    """The configuration named, or the system one, or the embedded default."""
    found = find_config(Path(path) if path else None)
    if found is not None:
        return load_config(found)
    from tlsfront.defaults import embedded_config, ensure_default_files

    config = embedded_config()
    ensure_default_files(config)
    log.info(
        "no configuration file: serving the embedded default (state in %s)",
        config.settings.state_dir,
    )
    return config


async def _serve(config: Config, config_arg: str | None) -> None:
    from tlsfront.server import Server, StartupError

    server = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        server.reload(load(config_arg))
                        log.info("reloaded the configuration")
                    except (ConfigError, StartupError) as exc:
                        log.error("reload failed, keeping the running configuration: %s", exc)
                    continue
                log.info("stopping on %s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                return


def cmd_run(args: argparse.Namespace) -> int:
    from tlsfront.server import StartupError

    try:
        config = load(args.config)
        setup_logging(config.settings.log_level)
        trio.run(_serve, config, args.config)
    except (ConfigError, StartupError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def cmd_inetd(args: argparse.Namespace) -> int:
    from tlsfront.inetd import serve_inetd

    try:
        config = load(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    setup_logging(config.settings.log_level)
    if args.profile not in config.profiles:
        log.error(
            "no profile %r in the configuration (have: %s)",
            args.profile,
            ", ".join(config.profiles),
        )
        return 1
    return trio.run(serve_inetd, config.profiles[args.profile], dict(os.environ))


def cmd_check(args: argparse.Namespace) -> int:
    from tlsfront.check import run_check

    return run_check(args.config)


def cmd_import_qmail(args: argparse.Namespace) -> int:
    from tlsfront.importqmail import render_config
    from tlsfront.qmail import QmailControlError
    from tlsfront.tcprules import RulesError

    try:
        sys.stdout.write(
            render_config(
                Path(args.control), Path(args.rules) if args.rules else None, smtps=args.smtps
            )
        )
    except (QmailControlError, RulesError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsfront",
        description="A TLS front end for an unmodified qmail-smtpd.",
    )
    parser.add_argument("--version", action="version", version=f"tlsfront {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="configuration file (default: /etc/tlsfront/tlsfront.toml, "
            "else the embedded default)",
        )

    p = sub.add_parser("run", help="serve every profile in the foreground")
    config_option(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inetd", help="serve one connection on stdin/stdout")
    p.add_argument("-p", "--profile", required=True, help="the profile to serve it with")
    config_option(p)
    p.set_defaults(func=cmd_inetd)

    p = sub.add_parser("check", help="validate the configuration and every file it names")
    config_option(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "import-qmail", help="print a configuration equivalent to a qmail-tls installation"
    )
    p.add_argument(
        "--control",
        default="/var/qmail/control",
        metavar="DIR",
        help="qmail control directory (default: %(default)s)",
    )
    p.add_argument("--rules", metavar="FILE", help="tcprules source file, e.g. /etc/tcp.smtp")
    p.add_argument("--smtps", action="store_true", help="also a profile for port 465")
    p.set_defaults(func=cmd_import_qmail)

    from tlsfront.certtool import add_cert_parser

    add_cert_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
