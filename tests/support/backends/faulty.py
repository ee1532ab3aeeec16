"""Test backend: a qmail-smtpd stand-in that misbehaves in one chosen way.

Run as ``python tests/support/backends/faulty.py --mode MODE [--delay SECONDS]``.
Where a mode behaves normally it is the bundled sink accepting every
recipient and discarding messages. Each fault is announced on stderr as a line
``faulty: MODE: EVENT`` just before it happens, so a test can wait for the
event instead of for time.

- ``exit-before-greeting``: exits 1 at once, writing nothing.
- ``421-at-connect``: writes ``421 service unavailable`` and exits 0.
- ``hang-after-data``: normal until DATA; reads the body and never answers the
  final dot (sleeps until killed).
- ``die-after-dot``: reads the body, exits 1 without replying to the final dot.
- ``half-reply``: after the final dot writes ``250 o`` without CRLF, exits 0.
- ``slow-reply``: every reply (the greeting too) is delayed by ``--delay``.
- ``flood-output``: after the greeting writes ``250-xxx...`` lines without end,
  not waiting for any command, until the reader goes away.
- ``endless-line``: after the greeting writes one line of 1 MiB without an LF
  (a reply line far past the limit), then sleeps until killed.
- ``greeting-554``: greets ``554 blocked`` (as rblsmtpd or a tcprules refusal
  would), answers ``553`` to every command and ``221`` to QUIT.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tlsfront import sink

MODES = (
    "exit-before-greeting",
    "421-at-connect",
    "hang-after-data",
    "die-after-dot",
    "half-reply",
    "slow-reply",
    "flood-output",
    "endless-line",
    "greeting-554",
)


def announce(mode: str, event: str) -> None:
    sys.stderr.write(f"faulty: {mode}: {event}\n")
    sys.stderr.flush()


def write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


class _Discard:
    def write(self, data: bytes) -> None:
        pass

    def commit(self) -> str:
        return "discarded"

    def abort(self) -> None:
        pass


class DiscardStore:
    def begin(self, sender: bytes) -> sink.Delivery:
        return _Discard()


class FaultySession(sink.SinkSession):
    def __init__(self, mode: str, delay: float) -> None:
        super().__init__(sink.Config(), DiscardStore())
        self.mode = mode
        self.delay = delay

    def reply(self, line: bytes) -> None:
        if self.mode == "slow-reply":
            time.sleep(self.delay)
            super().reply(line)
            self.flush()
        else:
            super().reply(line)

    def finish_message(
        self,
        delivery: sink.Delivery,
        envelope: sink.Envelope,
        hops: int,
        oversize: bool,
        failed: bool,
    ) -> None:
        if self.mode == "hang-after-data":
            self.flush()
            announce(self.mode, "hanging")
            while True:
                time.sleep(3600)
        if self.mode == "die-after-dot":
            announce(self.mode, "dying")
            raise sink.SessionEnd(1)
        if self.mode == "half-reply":
            self.flush()
            announce(self.mode, "half reply")
            write_all(b"250 o")
            raise sink.SessionEnd(0)
        super().finish_message(delivery, envelope, hops, oversize, failed)


def flood() -> int:
    write_all(b"220 flood.invalid ESMTP\r\n")
    announce("flood-output", "flooding")
    chunk = (b"250-" + b"x" * 70 + b"\r\n") * 1000
    try:
        while True:
            write_all(chunk)
    except OSError:
        return 0


def endless_line() -> int:
    write_all(b"220 endless.invalid ESMTP\r\n")
    announce("endless-line", "writing")
    try:
        write_all(b"250 " + b"x" * (1 << 20))
    except OSError:
        return 0
    while True:
        time.sleep(3600)


def blocked() -> int:
    write_all(b"554 blocked\r\n")
    while True:
        line = sys.stdin.buffer.readline(sink.LINE_LIMIT)
        if not line:
            return 0
        if line.split(b" ", 1)[0].strip().lower() == b"quit":
            write_all(b"221 blocked.invalid\r\n")
            return 0
        write_all(b"553 sorry, blocked (#5.7.1)\r\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faulty.py")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--delay", type=float, default=5.0, help="slow-reply: seconds per reply")
    args = parser.parse_args(argv)
    mode: str = args.mode
    if mode == "exit-before-greeting":
        announce(mode, "exiting")
        return 1
    if mode == "421-at-connect":
        write_all(b"421 service unavailable\r\n")
        return 0
    if mode == "flood-output":
        return flood()
    if mode == "endless-line":
        return endless_line()
    if mode == "greeting-554":
        return blocked()
    return FaultySession(mode, args.delay).run()


if __name__ == "__main__":
    sys.exit(main())
