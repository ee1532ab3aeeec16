"""The soak's backend: the bundled sink, recording each queued message by its id.

Run per session by tlsfront as
``python -m bench.soak.backend --queue DIR --rcpthost example.org``. It speaks
exactly as the bundled sink does, but instead of a Maildir it keeps, for each
message it answers ``250`` to, one small JSON file in ``DIR``:
``{"id": ..., "sha256": ..., "size": ..., "pid": ...}``. The id is the value
of the message's ``X-Soak-Id`` header; the digest and size are those of the
message from that header to its end, as the sink stores it (unstuffed, LF line
endings), so the trace headers put in front of it by tlsfront and by the sink
do not count. The file appears (by rename) before the ``250`` is written:
a client that read ``250`` can rely on finding it.

A recipient whose local part is ``die`` makes the backend exit with status 3
in the middle of that message's body, before its final dot is processed: the
soak's stand-in for a qmail-smtpd that crashes while receiving.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from pathlib import Path

from tlsfront import sink

MARKER = b"\nX-Soak-Id: "
# The trace headers in front of the marker are far shorter than this.
PREFIX_LIMIT = 64 * 1024
DIE_STATUS = 3


class _Recording:
    """One message: the prefix is searched for the id, the rest is hashed."""

    def __init__(self, queue: Path, number: int) -> None:
        self.queue = queue
        self.number = number
        self.head = bytearray()
        self.digest: hashlib._Hash | None = None
        self.size = 0
        self.id: str | None = None

    def write(self, data: bytes) -> None:
        if self.digest is not None:
            self.digest.update(data)
            self.size += len(data)
            return
        self.head += data
        at = self.head.find(MARKER)
        if at < 0:
            if len(self.head) > PREFIX_LIMIT:  # no id: hashed whole, reported as such
                self._start(bytes(self.head), None)
            return
        rest = bytes(self.head[at + 1 :])
        end = rest.find(b"\n")
        if end < 0 and len(rest) < 200:
            return  # the id line is not whole yet
        ident = rest[len(MARKER) - 1 : end if end >= 0 else None].decode("ascii", "replace")
        self._start(rest, ident.strip())

    def _start(self, data: bytes, ident: str | None) -> None:
        self.id = ident
        self.digest = hashlib.sha256(data)
        self.size = len(data)
        self.head.clear()

    def commit(self) -> str:
        if self.digest is None:
            self._start(bytes(self.head), None)
        assert self.digest is not None
        record = {"id": self.id, "sha256": self.digest.hexdigest(), "size": self.size}
        record["pid"] = os.getpid()
        # pid and a random part: pids wrap around in a long soak, and a record
        # written over by a later process would read as a lost message
        name = f"{os.getpid()}-{self.number}-{secrets.token_hex(8)}.json"
        tmp = self.queue / ("." + name)
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.queue / name)
        return name

    def abort(self) -> None:
        pass


class RecordingStore:
    def __init__(self, queue: Path) -> None:
        self.queue = queue
        self.count = 0

    def begin(self, sender: bytes) -> sink.Delivery:
        self.count += 1
        return _Recording(self.queue, self.count)


class SoakSession(sink.SinkSession):
    """The sink, plus the ``die@`` recipient that kills it mid-body."""

    doomed = False

    def smtp_rcpt(self, arg: bytes) -> None:
        if arg.lower().lstrip().startswith((b"to:<die@", b"to: <die@")):
            self.doomed = True
        super().smtp_rcpt(arg)

    def body_chunk(self, raw: bytes) -> None:
        if self.doomed:
            os._exit(DIE_STATUS)


def main(argv: list[str] | None = None) -> int:
    parser = sink.build_parser(prog="python -m bench.soak.backend", maildir_required=False)
    parser.add_argument("--queue", type=Path, required=True, help="where message records go")
    args = parser.parse_args(argv)
    try:
        config = sink.config_from_args(args)
    except sink.ControlError as exc:
        return sink.control_failure("bench.soak.backend", exc)
    args.queue.mkdir(parents=True, exist_ok=True)
    return SoakSession(config, RecordingStore(args.queue)).run()


if __name__ == "__main__":
    sys.exit(main())
