"""Test queue program: takes a message as qmail-queue does, and records it.

Run as ``python tests/support/backends/queue.py DIR`` (a test names it in
QMAILQUEUE through a small script). It reads the message on descriptor 0 and
the envelope (`F<from>\\0T<to>\\0...\\0`) on descriptor 1, as qmail-smtpd
hands them to qmail-queue, and writes ``DIR/queued-<pid>.json``: the message
(latin-1), the sender, the recipients, and the account it ran as.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    directory = Path(sys.argv[1])
    message = sys.stdin.buffer.read()
    envelope = b""
    while chunk := os.read(1, 65536):
        envelope += chunk
    fields = envelope.split(b"\0")
    sender = fields[0][1:].decode("latin-1") if fields and fields[0][:1] == b"F" else None
    recipients = [f[1:].decode("latin-1") for f in fields[1:] if f[:1] == b"T"]
    record = {
        "message": message.decode("latin-1"),
        "from": sender,
        "to": recipients,
        "ids": {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()},
    }
    (directory / f"queued-{os.getpid()}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
