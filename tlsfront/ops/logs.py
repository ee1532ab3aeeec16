"""Log output: plain text lines (the default) or one JSON object a line.

Text is what journald, multilog and a terminal want: `LEVEL message`, one
event to a line (control characters in a message are escaped, so nothing a
client sends can start a line of its own). Under systemd, when stderr is
the journal (`JOURNAL_STREAM` names it), each line also starts with the
syslog priority `<N>`, which journald strips and records, so `journalctl
-p warning` works. JSON is for log shippers: `time`, `level`, `logger`,
`message`, plus the structured fields of the few events that have them
(the session end line, a TLS handshake), passed with `extra=fields(...)`.

Nothing here ever logs message content or key material: the events carry
addresses, names and counts only.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import IO, Any

FIELDS_ATTR = "tlsfront_fields"

# syslog priorities, for journald's <N> prefix
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def fields(event: str, values: Mapping[str, object] | None = None) -> dict[str, Any]:
    """`extra=` for a log call that carries structured fields (shown in JSON)."""
    return {FIELDS_ATTR: {"event": event, **(values or {})}}


class TextFormatter(logging.Formatter):
    def __init__(self, syslog_prefix: bool = False) -> None:
        super().__init__()
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {_escape(record.getMessage())}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.syslog_prefix:
            line = f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        data: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, FIELDS_ATTR, None)
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                data.setdefault(key, value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


def stderr_is_journal(stream: IO[str] | None = None) -> bool:
    """Whether `stream` (stderr) is the journal stream systemd set up."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Send tlsfront's logs to `stream` (stderr) in the chosen format."""
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    formatter: logging.Formatter = (
        JSONFormatter() if fmt == "json" else TextFormatter(stderr_is_journal(out))
    )
    handler.setFormatter(formatter)
    root = logging.getLogger("tlsfront")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
