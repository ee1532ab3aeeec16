"""The `tlsfront` command: run, inetd, check, import-qmail, cert."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import trio

from tlsfront import __version__
from tlsfront.config.errors import ConfigError
from tlsfront.config.files import load_chosen
from tlsfront.config.schema import Config
from tlsfront.ops import logs
from tlsfront.ops.systemd import SystemdError

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from prometheus_client.registry import Collector

    from tlsfront.config.account import Account
    from tlsfront.inbound.handoff import HandoffSocket
    from tlsfront.inbound.server import Server
    from tlsfront.ops.metrics_endpoint import Gatherer
    from tlsfront.ops.systemd import Notifier, PassedSocket
    from tlsfront.ops.workers import WorkerMain, WorkerPlace

log = logging.getLogger("tlsfront")

# How often STATUS= is refreshed (when it changed) under systemd.
STATUS_EVERY = 5.0


# `run --log-stdout`: logs go to standard output (multilog, svlogd), reloads included
_log_stream: IO[str] | None = None


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    logs.setup(level, fmt, _log_stream)


def load(path: str | None) -> Config:
    """The configuration named, or the system one, or the embedded default."""
    config = load_chosen(path)
    if config is not None:
        return config
    from tlsfront.config.embedded import embedded_config, ensure_default_files

    config = embedded_config()
    ensure_default_files(config)
    log.info(
        "no configuration file: serving the embedded default (state in %s)",
        config.settings.state_dir,
    )
    return config


def _startup_errors(exc: BaseException) -> list[BaseException] | None:
    """The errors inside `exc` (an exception group from a nursery, maybe) when
    all of them are start-up errors that deserve a line, not a traceback."""
    from tlsfront.inbound.handoff import HandoffError
    from tlsfront.inbound.server import StartupError
    from tlsfront.ops.privileges import PrivilegeError

    if isinstance(exc, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in exc.exceptions:
            errors = _startup_errors(inner)
            if errors is None:
                return None
            found += errors
        return found
    if isinstance(exc, ConfigError | StartupError | SystemdError | PrivilegeError | HandoffError):
        return [exc]
    return None


async def _reload(server: Server, config_arg: str | None, notifier: Notifier) -> None:
    """SIGHUP: the configuration and every file it names, read again."""
    from tlsfront.inbound.server import StartupError
    from tlsfront.ops import counters
    from tlsfront.ops.privileges import PrivilegeError
    from tlsfront.ops.systemd import session_status

    notifier.reloading()
    old = server.config.settings
    status = ""
    try:
        config = load(config_arg)
        _check_privileges(config)
        await server.reload(config)
    except (ConfigError, StartupError, PrivilegeError) as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        counters.RELOADS.labels("failed").inc()
        status = "reload failed, old configuration serving; "
    except Exception:
        log.exception("reload failed, keeping the running configuration")
        counters.RELOADS.labels("failed").inc()
        status = "reload failed, old configuration serving; "
    else:
        new = config.settings
        setup_logging(new.log_level, new.log_format)
        for key in ("metrics_listen", "workers", "handoff_socket", "handoff_user"):
            if getattr(old, key) != getattr(new, key):
                log.warning("reload: %s changed: restart to apply", key)
        log.info("reloaded the configuration%s", f" from {config.path}" if config.path else "")
        counters.RELOADS.labels("ok").inc()
    notifier.ready(status + session_status(server.session_counts()))


async def _heartbeat(server: Server, notifier: Notifier, watchdog: float | None) -> None:
    """STATUS= with the live session counts, and WATCHDOG=1 when asked for."""
    from tlsfront.ops.systemd import session_status

    step = min(watchdog, STATUS_EVERY) if watchdog else STATUS_EVERY
    last = ""
    while True:
        status = session_status(server.session_counts(), server.stopping)
        if status != last:
            notifier.status(status)
            last = status
        if watchdog:
            notifier.watchdog()
        await trio.sleep(step)


async def _serve(
    config: Config,
    config_arg: str | None,
    passed: list[PassedSocket],
    sockets: Mapping[str, Sequence[socket.socket]] | None = None,
    place: WorkerPlace | None = None,
    account: Account | None = None,
    replacement: bool = False,
    handoff: HandoffSocket | None = None,
) -> None:
    """One server process: all of it, or one of `workers` (then on `sockets`, at `place`).

    `account`: the worker gives up root for it once its keys are read.
    `replacement`: a worker started by a reload, whose metrics port its
    predecessor may still hold for a while.
    `handoff`: the bound handoff socket, when `handoff_socket` is set.
    """
    from tlsfront.inbound.server import Server
    from tlsfront.ops.metrics_endpoint import serve_metrics
    from tlsfront.ops.systemd import (
        Notifier,
        listeners_by_profile,
        session_status,
        watchdog_interval,
    )

    notifier = Notifier.from_environ()
    watchdog = watchdog_interval()
    if sockets is None:
        listeners = listeners_by_profile(config, passed)
    else:
        listeners = {
            name: [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
            for name, socks in sockets.items()
        }
    server = Server(config, place.limits if place else None)  # every key read
    if account is not None:
        from tlsfront.ops.privileges import drop_to

        drop_to(account)
        for profile_server in server.profiles.values():
            profile_server.runtime.restamp()
    acceptors = []
    if handoff is not None:
        from functools import partial

        from tlsfront.inbound.handoff import serve_handoff

        acceptors.append(partial(serve_handoff, server, handoff))
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_server(task_status: trio.TaskStatus[Server]) -> None:
                await server.run(listeners, acceptors=acceptors, task_status=task_status)
                nursery.cancel_scope.cancel()  # stopped: metrics and signals too

            await nursery.start(run_server)
            listen = config.settings.metrics_listen
            summed: Gatherer | None = None
            if listen and place is not None:
                # every worker tells its figures; worker 0 serves their sum
                from tlsfront.ops.metrics_endpoint import exposed
                from tlsfront.ops.workermetrics import gather, serve_worker_figures

                limits = place.limits
                own = exposed(server)
                await nursery.start(serve_worker_figures, place.tag, limits.worker, own)
                summed = functools.partial(
                    _gather_current, gather, place.tag, limits.current, limits.worker
                )
            if listen and (place is None or place.index == 0):
                if replacement:
                    nursery.start_soon(_metrics_when_free, listen, server, summed)
                else:
                    await nursery.start(serve_metrics, listen, server, summed)
            notifier.ready(session_status(server.session_counts()))
            if notifier.enabled:
                nursery.start_soon(_heartbeat, server, notifier, watchdog)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    await _reload(server, config_arg, notifier)
                elif server.stopping:
                    log.warning("%s again: stopping now", name)
                    nursery.cancel_scope.cancel()
                else:
                    log.info(
                        "stopping on %s (shutdown_grace %gs)",
                        name,
                        server.config.settings.shutdown_grace,
                    )
                    notifier.stopping(session_status(server.session_counts(), stopping=True))
                    server.stop()
    notifier.close()


async def _gather_current(
    gather: Callable[[int, list[int], int, Collector], Awaitable[Collector]],
    tag: int,
    current: Callable[[], list[int]],
    mine: int,
    own: Collector,
) -> Collector:
    """The sum over the current workers, whose columns are read at each scrape."""
    return await gather(tag, current(), mine, own)


async def _metrics_when_free(address: str, server: Server, summed: Gatherer | None) -> None:
    """The metrics endpoint of a worker started by a reload: its port is taken
    until the worker it replaces has finished, so it is tried once a second."""
    from tlsfront.inbound.server import StartupError
    from tlsfront.ops.metrics_endpoint import serve_metrics

    while True:
        try:
            await serve_metrics(address, server, summed)
        except StartupError:
            await trio.sleep(1.0)


def _check_privileges(config: Config) -> Account | None:
    """Refuse root backends as root; the account workers drop to, if any."""
    from tlsfront.ops.privileges import check_accounts, root_backend_problem, serving_account

    if os.geteuid() != 0:
        check_accounts(config.profiles.values())
        return None
    problem = root_backend_problem(config)
    if problem is not None:
        raise ConfigError(problem, path=config.path)
    account = serving_account(config.profiles.values())
    if account is None:
        log.warning(
            "serving as root: the profiles name no single account (user, group) "
            "for the workers to become"
        )
    return account


def cmd_run(args: argparse.Namespace) -> int:
    from tlsfront.inbound.handoff import HandoffSocket
    from tlsfront.inbound.server import check_something_listens
    from tlsfront.ops.systemd import passed_sockets

    handoff: HandoffSocket | None = None
    global _log_stream
    if args.log_stdout:
        _log_stream = sys.stdout
    try:
        passed = passed_sockets()
        config = load(args.config)
        settings = config.settings
        setup_logging(settings.log_level, settings.log_format)
        check_something_listens(config)
        account = _check_privileges(config)
        count = settings.workers or os.cpu_count() or 1
        if count > 1 or account is not None:
            return _run_workers(config, args.config, passed, count, account)
        handoff = HandoffSocket.bind(settings)
        trio.run(_serve, config, args.config, passed, None, None, None, False, handoff)
    except BaseException as exc:
        errors = _startup_errors(exc)
        if errors is None:
            raise
        for error in errors:
            log.error("%s", error)
        return 1
    finally:
        if handoff is not None:
            handoff.close()
    return 0


def _run_workers(
    config: Config,
    config_arg: str | None,
    passed: list[PassedSocket],
    count: int,
    account: Account | None = None,
) -> int:
    """`workers` processes on shared sockets (tlsfront.ops.workers).

    With `account` (started as root) the workers give it up after start-up
    and a reload replaces them (tlsfront.ops.privileges).
    """
    from tlsfront.inbound.handoff import HandoffSocket
    from tlsfront.inbound.server import build_runtimes
    from tlsfront.ops.workers import Reloader, Supervisor, WorkerPlace, open_sockets, shared_limits

    build_runtimes(config)  # a broken configuration is refused before any fork
    sockets = open_sockets(config, passed)
    limits = shared_limits(config, count)  # the Supervisor sets each worker's column
    tag = os.getpid()
    # every worker accepts on it; by default the account they serve as may hand over
    handoff = HandoffSocket.bind(config.settings, account.uid if account else None)

    def main_for(config: Config, account: Account | None, replacement: bool) -> WorkerMain:
        def worker_main(index: int, sockets: Mapping[str, Sequence[socket.socket]]) -> int:
            place = WorkerPlace(index, tag, limits)
            trio.run(_serve, config, config_arg, [], sockets, place, account, replacement, handoff)
            return 0

        return worker_main

    reloader: Reloader | None = None
    if account is not None:
        reloader = functools.partial(_replacement, config, config_arg, main_for)
        log.info("starting %d workers as %s", count, account.name)
    else:
        log.info("starting %d workers", count)
    try:
        return Supervisor(count, sockets, main_for(config, account, False), reloader, limits).run()
    finally:
        if handoff is not None:
            handoff.close()


def _replacement(
    running: Config,
    config_arg: str | None,
    main_for: Callable[[Config, Account | None, bool], WorkerMain],
) -> WorkerMain | None:
    """SIGHUP in the root parent: the configuration and every key read again."""
    from tlsfront.inbound.server import StartupError, build_runtimes

    try:
        config = load(config_arg)
        for name, profile in config.profiles.items():
            old = running.profiles.get(name)
            if old is None or (old.listen, old.systemd) != (profile.listen, profile.systemd):
                raise StartupError(f"profile {name}: added, or listen changed: restart to apply")
        if set(running.profiles) != set(config.profiles):
            raise StartupError("profiles removed: restart to apply")
        account = _check_privileges(config)
        build_runtimes(config)
    except Exception as exc:
        log.error("reload failed, keeping the running workers: %s", exc)
        return None
    setup_logging(config.settings.log_level, config.settings.log_format)
    log.info("reloaded the configuration%s", f" from {config.path}" if config.path else "")
    return main_for(config, account, True)


def cmd_inetd(args: argparse.Namespace) -> int:
    from tlsfront.inbound.inetd import serve_inetd
    from tlsfront.ops.systemd import passed_sockets, take_connection

    try:
        # systemd Accept=yes without StandardInput=socket: the connection is fd 3
        fd = take_connection(passed_sockets())
        if fd is not None:
            os.dup2(fd, 0)
            os.close(fd)
        config = load(args.config)
    except (ConfigError, SystemdError) as exc:
        log.error("%s", exc)
        return 1
    setup_logging(config.settings.log_level, config.settings.log_format)
    if args.profile not in config.profiles:
        log.error(
            "no profile %r in the configuration (have: %s)",
            args.profile,
            ", ".join(config.profiles),
        )
        return 1
    from tlsfront.ops.privileges import PrivilegeError, check_accounts, profile_account

    profile = config.profiles[args.profile]
    account = None
    try:
        if os.geteuid() == 0:
            account = profile_account(profile)
        else:
            check_accounts([profile])
    except PrivilegeError as exc:
        log.error("%s", exc)
        return 1
    return trio.run(serve_inetd, profile, dict(os.environ), account)


def cmd_check(args: argparse.Namespace) -> int:
    from tlsfront.ops.check import run_check

    status = run_check(args.config)
    if args.units is None:
        return status
    return max(status, _check_units(args.config, Path(args.units)))


def _check_units(config_arg: str | None, directory: Path) -> int:
    """`check --units DIR`: the unit files against the configuration."""
    from tlsfront.ops.systemd import check_units

    try:
        config = load_chosen(config_arg)
    except ConfigError:
        return 1  # run_check has said why
    if config is None:
        print("no configuration file: no profile to check the units against")
        return 0
    if not directory.is_dir():
        print(f"error: {directory} is not a directory of unit files")
        return 1
    errors, warnings = check_units(config, directory)
    print(f"systemd units: {directory}")
    for warning in warnings:
        print(f"warning: {warning}")
    for error in errors:
        print(f"error: {error}")
    verdict = "FAILED" if errors else "OK"
    print(f"{verdict}: {len(errors)} error(s), {len(warnings)} warning(s)")
    return 1 if errors else 0


def cmd_import_qmail(args: argparse.Namespace) -> int:
    from tlsfront.qmail.control import QmailControlError
    from tlsfront.qmail.importqmail import render_config
    from tlsfront.qmail.runscript import RunScriptError, evaluate
    from tlsfront.qmail.tcprules import RulesError
    from tlsfront.qmail.tcpserverargs import Service, implied_control, translate

    service: Service | None = None
    control = Path(args.control) if args.control else None
    try:
        if args.run:
            evaluation = evaluate(Path(args.run))
            service = translate(evaluation)
            if control is None:
                control = implied_control(evaluation, service)
        text = render_config(
            control or Path("/var/qmail/control"),
            Path(args.rules) if args.rules else None,
            smtps=args.smtps,
            service=service,
            systemd=args.systemd,
        )
    except (QmailControlError, RulesError, RunScriptError) as exc:
        log.error("%s", exc)
        return 1
    sys.stdout.write(text)
    if service is not None:
        for problem in service.untranslated:
            log.warning("could not translate: %s", problem)
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
    p.add_argument(
        "--log-stdout",
        action="store_true",
        help="log to standard output instead of standard error (for multilog, svlogd)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inetd", help="serve one connection on stdin/stdout")
    p.add_argument("-p", "--profile", required=True, help="the profile to serve it with")
    config_option(p)
    p.set_defaults(func=cmd_inetd)

    p = sub.add_parser("check", help="validate the configuration and every file it names")
    config_option(p)
    p.add_argument(
        "--units",
        metavar="DIR",
        help="also check the systemd unit files in DIR against the configuration "
        "(e.g. /etc/systemd/system)",
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "import-qmail", help="print a configuration equivalent to a qmail-tls installation"
    )
    p.add_argument(
        "--control",
        metavar="DIR",
        help="qmail control directory (default: the one the run script implies, "
        "else /var/qmail/control)",
    )
    p.add_argument(
        "--run",
        metavar="FILE",
        help="the daemontools/runit run script of the smtpd service: it is run with "
        "stand-ins up to tcpserver, and its tcpserver, chain, environment and account "
        "are translated",
    )
    p.add_argument(
        "--systemd",
        action="store_true",
        help="take the sockets from the shipped systemd socket units instead of listen",
    )
    p.add_argument("--rules", metavar="FILE", help="tcprules source file, e.g. /etc/tcp.smtp")
    p.add_argument("--smtps", action="store_true", help="also a profile for port 465")
    p.set_defaults(func=cmd_import_qmail)

    from tlsfront.tls.certtool import add_cert_parser

    add_cert_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
