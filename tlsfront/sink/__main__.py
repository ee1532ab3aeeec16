"""The program: ``python -m tlsfront.sink --maildir DIR [options]``, one session on stdin/stdout."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tlsfront.sink.control import ControlError, build_parser, config_from_args, control_failure
from tlsfront.sink.maildir import Maildir
from tlsfront.sink.session import SinkSession


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ControlError as exc:
        return control_failure("tlsfront.sink", exc)
    return SinkSession(config, Maildir(args.maildir)).run()


if __name__ == "__main__":
    sys.exit(main())
