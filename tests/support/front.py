"""A tlsfront server in a test's nursery, and the paths of the stand-in backends."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tlsfront.config.schema import Config
from tlsfront.inbound.server import Server

BACKENDS = Path(__file__).parent / "backends"
CAPTURE = BACKENDS / "capture.py"
FAULTY = BACKENDS / "faulty.py"


def need_tool(name: str) -> str:
    """The path of an outside client; skipped locally without it, an error in CI."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed")
    return path


def toml_str(value: object) -> str:
    return json.dumps(str(value))


@dataclass
class Front:
    """A tlsfront server running in the test's nursery."""

    server: Server
    config: Config
    capture: Path

    def port(self, profile: str) -> int:
        return self.server.addresses[profile][0].port

    def sessions(self) -> list[dict[str, Any]]:
        """What each client's backend session recorded, in start order.

        The probe that learns the backend's face is left out: an exec'd one
        by its client, 127.0.0.1 port 0, one reached over TCP (whose tcpserver sets the
        real port) by what it says, the tests' host name. `started()` counts
        every backend start.
        """
        return [r for r in self.started() if not is_probe(r)]

    def started(self) -> list[dict[str, Any]]:
        """Every backend session's record, the probes' included, in start order."""
        records = []
        for path in self.capture.glob("session-*.json"):
            records.append(json.loads(path.read_text()))
        records.sort(key=lambda r: r["started"])
        for record in records:
            for key in ("stdin", "stdout", "partial"):
                if record.get(key) is not None:
                    record[key] = base64.b64decode(record[key])
            record["messages"] = [base64.b64decode(m) for m in record["messages"]]
        return records

    def maildir(self) -> list[bytes]:
        new = self.capture / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


PROBE_INPUT = b"EHLO front.example.org\r\nQUIT\r\n"  # the tests' hostname


def is_probe(record: dict[str, Any]) -> bool:
    env = record["env"]
    local_client = (env.get("TCPREMOTEIP"), env.get("TCPREMOTEPORT")) == ("127.0.0.1", "0")
    return bool(local_client or record["stdin"] == PROBE_INPUT)


def capture_backend(capture: Path, *extra: str) -> str:
    argv = [
        sys.executable,
        str(CAPTURE),
        "--dir",
        str(capture),
        "--rcpthost",
        "example.org",
        *extra,
    ]
    return "[" + ", ".join(toml_str(a) for a in argv) + "]"


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tlsfront.toml"
    path.write_text(body)
    return path
