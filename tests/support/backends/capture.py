"""Test backend: the bundled sink, recording each session for the test to read.

Run as ``python tests/support/backends/capture.py --dir DIR [sink options]``. It speaks
exactly like ``python -m tlsfront.sink`` (same options; ``--maildir`` defaults
to ``DIR/Maildir``) and keeps ``DIR/session-<pid>-<n>.json`` up to date:

- ``env``: the whole environment it was started with
- ``stdin`` / ``stdout``: every byte read and written (base64)
- ``messages``: raw DATA bodies that reached their final dot, as received,
  before unstuffing, terminator included (base64)
- ``partial``: the raw body of a DATA that ended without its dot, else null
- ``envelopes``: ``{"from": ..., "to": [...], "complete": bool}`` per DATA
  body (latin-1 text; recipients as the sink took them, ``RELAYCLIENT``
  appended)
- ``exit``: the exit code, null while the session runs
- ``pid``, ``argv``, ``started`` (time.time_ns() at start)
- ``ids``: ``{"uid": ..., "gid": ..., "groups": [...]}``, the account it ran as
- ``queued``: with ``--qmailqueue``, the exit codes of ``$QMAILQUEUE`` when it
  is set: each complete message is also handed to that program as qmail-smtpd hands it to
  qmail-queue (the message on descriptor 0, the envelope on descriptor 1)

The file is rewritten (atomically) before each write of replies, at the end
of each body, and at exit (SIGTERM included): a client that has read a reply
finds it, and all input that led to it, in the record.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from tlsfront import sink


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(data).decode("ascii")


class Recorder:
    """One session's JSON file."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            path = directory / f"session-{os.getpid()}-{n}.json"
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                break
            except FileExistsError:
                n += 1
        self.path = path
        self.stdin = bytearray()
        self.stdout = bytearray()
        self.body = bytearray()
        self.messages: list[bytes] = []
        self.partial: bytes | None = None
        self.envelopes: list[dict[str, Any]] = []
        self.exit: int | None = None
        self.queued: list[int] = []
        self.started = time.time_ns()
        self.save()

    def save(self) -> None:
        record = {
            "pid": os.getpid(),
            "started": self.started,
            "argv": sys.argv,
            "env": dict(os.environ),
            "ids": {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()},
            "queued": self.queued,
            "stdin": _b64(self.stdin),
            "stdout": _b64(self.stdout),
            "messages": [_b64(m) for m in self.messages],
            "partial": None if self.partial is None else _b64(self.partial),
            "envelopes": self.envelopes,
            "exit": self.exit,
        }
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.path)


class CaptureSession(sink.SinkSession):
    def __init__(
        self,
        recorder: Recorder,
        config: sink.Config,
        store: sink.MessageStore,
        qmailqueue: bool = False,
    ) -> None:
        super().__init__(config, store)
        self.recorder = recorder
        self.qmailqueue = qmailqueue

    def read_input(self) -> bytes:
        data = super().read_input()
        self.recorder.stdin += data
        return data

    def write_output(self, data: bytes) -> None:
        # saved before it is written: a client that has read a reply can rely
        # on the record holding it
        self.recorder.stdout += data
        self.recorder.save()
        super().write_output(data)

    def body_chunk(self, raw: bytes) -> None:
        self.recorder.body += raw

    def body_end(self, envelope: sink.Envelope, complete: bool) -> None:
        rec = self.recorder
        body = bytes(rec.body)
        rec.body.clear()
        if complete:
            rec.messages.append(body)
            queue = os.environ.get("QMAILQUEUE")
            if queue and self.qmailqueue:
                rec.queued.append(_queue(queue, body, envelope))
        else:
            rec.partial = body
        rec.envelopes.append(
            {
                "from": envelope.sender.decode("latin-1"),
                "to": [r.decode("latin-1") for r in envelope.recipients],
                "complete": complete,
            }
        )
        rec.save()


def _queue(program: str, body: bytes, envelope: sink.Envelope) -> int:
    """qmail-queue's interface: the message on 0, `F<from>\0T<to>\0...\0` on 1."""
    envelope_bytes = b"F" + envelope.sender + b"\0"
    envelope_bytes += b"".join(b"T" + r + b"\0" for r in envelope.recipients) + b"\0"
    read_env, write_env = os.pipe()
    process = subprocess.Popen([program], stdin=subprocess.PIPE, stdout=read_env)
    os.close(read_env)
    assert process.stdin is not None
    with os.fdopen(write_env, "wb") as out:
        out.write(envelope_bytes)
    process.stdin.write(body)
    process.stdin.close()
    return process.wait()


def _terminate(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = sink.build_parser(prog="capture.py", maildir_required=False)
    parser.add_argument("--dir", type=Path, required=True, help="where session files go")
    parser.add_argument("--qmailqueue", action="store_true", help="queue through $QMAILQUEUE too")
    args = parser.parse_args(argv)
    recorder = Recorder(args.dir)
    signal.signal(signal.SIGTERM, _terminate)
    code = 1
    try:
        try:
            config = sink.config_from_args(args)
        except sink.ControlError as exc:
            return sink.control_failure("capture.py", exc)
        maildir = args.maildir if args.maildir is not None else args.dir / "Maildir"
        code = CaptureSession(recorder, config, sink.Maildir(maildir), args.qmailqueue).run()
        return code
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        raise
    finally:
        recorder.exit = code
        recorder.save()


if __name__ == "__main__":
    sys.exit(main())
