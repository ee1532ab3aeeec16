"""Run tlsfront for the benchmark and say where it listens.

    python -m bench.front CONFIG      prints {"PROFILE": PORT, ...}, serves until killed

The same `Server` that `tlsfront run` serves, with ports chosen by the
kernel (listen = "127.0.0.1:0") and reported on standard output, so the
benchmark never guesses a free port.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import trio

from tlsfront.cli import setup_logging
from tlsfront.config.files import load_config
from tlsfront.inbound.server import Server


async def serve(path: str) -> None:
    config = load_config(Path(path))
    setup_logging(config.settings.log_level)
    server = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        ports = {name: addresses[0].port for name, addresses in server.addresses.items()}
        print(json.dumps(ports), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


def main() -> int:
    trio.run(serve, sys.argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
