"""A real qmail-smtpd as the backend of the tests, and a queue program that records.

The binary is netqmail 1.06's qmail-smtpd, unmodified, built so that it reads
`control/` relative to its working directory. CI places it at
`shared/qmail/qmail-smtpd` in the directory that holds the repository's
clone; `TLSFRONT_QMAIL_SMTPD` names another location. Without it the tests
skip, unless `CI` is set: then its absence is a failure.

`QmailHome` makes the working directory (control/me, control/rcpthosts,
optionally control/databytes) and a queue program standing in for
qmail-queue: it reads the message on fd 0 and the envelope on fd 1
(`F<sender>\\0T<rcpt>\\0...\\0`), writes both to the queue directory and
exits 0. A message is only recorded once the envelope is complete, the point
at which qmail-queue would commit it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV_VAR = "TLSFRONT_QMAIL_SMTPD"
ME = "mx.test.example"
LOCAL = "local.test.example"
RELAY_REFUSED = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"

QUEUE_PROGRAM = """#!{python}
import os, sys, time
message = sys.stdin.buffer.read()
envelope = os.fdopen(1, "rb", closefd=False).read()
fields = envelope.split(b"\\0")
if not envelope.endswith(b"\\0\\0") or not fields[0].startswith(b"F"):
    sys.exit(91)  # qmail-queue: envelope format error
name = "%d-%d" % (time.time_ns(), os.getpid())
directory = {directory!r}
with open(os.path.join(directory, name + ".env"), "wb") as f:
    f.write(envelope)
tmp = os.path.join(directory, name + ".tmp")
with open(tmp, "wb") as f:
    f.write(message)
os.rename(tmp, os.path.join(directory, name + ".msg"))
"""


def qmail_smtpd_path() -> Path:
    """Where the real qmail-smtpd is expected (see the module doc)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    repository = Path(__file__).resolve().parents[2]
    return repository.parent / "shared" / "qmail" / "qmail-smtpd"


def need_qmail_smtpd() -> Path:
    """The binary; skipped without it on a user's clone, a failure in CI."""
    path = qmail_smtpd_path()
    if not os.access(path, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"the real qmail-smtpd is not at {path} (set {ENV_VAR})")
        pytest.skip(f"the real qmail-smtpd is not at {path} (set {ENV_VAR})")
    return path


@dataclass
class Queued:
    """One message as the queue program received it."""

    sender: bytes
    recipients: list[bytes]
    message: bytes


@dataclass
class QmailHome:
    home: Path
    queue: Path
    binary: Path

    @classmethod
    def make(
        cls,
        directory: Path,
        *,
        rcpthosts: tuple[str, ...] = (LOCAL,),
        databytes: int | None = None,
    ) -> QmailHome:
        home = directory / "qmail"
        control = home / "control"
        control.mkdir(parents=True)
        (control / "me").write_text(ME + "\n")
        (control / "rcpthosts").write_text("".join(h + "\n" for h in rcpthosts))
        if databytes is not None:
            (control / "databytes").write_text(f"{databytes}\n")
        queue = directory / "queue"
        queue.mkdir()
        program = home / "queue-program"
        program.write_text(QUEUE_PROGRAM.format(python=sys.executable, directory=str(queue)))
        program.chmod(0o755)
        return cls(home, queue, need_qmail_smtpd())

    @property
    def queue_program(self) -> Path:
        return self.home / "queue-program"

    def argv(self) -> list[str]:
        """qmail-smtpd run in its home, as a backend or as tcpserver's program."""
        return ["/bin/sh", "-c", f'cd "{self.home}" && exec "{self.binary}"']

    def env(self) -> dict[str, str]:
        return {"QMAILQUEUE": str(self.queue_program)}

    def profile_keys(self) -> str:
        """The `backend` and `env` lines of a tlsfront profile."""
        env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in self.env().items())
        return f"backend = {json.dumps(self.argv())}\nenv = {{ {env} }}\n"

    def queued(self) -> list[Queued]:
        """Every message committed to the queue, oldest first."""
        out = []
        for path in sorted(self.queue.glob("*.msg"), key=lambda p: p.name):
            envelope = path.with_suffix(".env").read_bytes()
            fields = envelope.split(b"\0")
            out.append(
                Queued(
                    sender=fields[0][1:],
                    recipients=[f[1:] for f in fields[1:] if f.startswith(b"T")],
                    message=path.read_bytes(),
                )
            )
        return out
