"""Delivery into a Maildir, and reading one back.

A message is written under ``tmp/`` and renamed into ``new/`` only when whole;
:class:`MessageStore` and :class:`Delivery` are what the session asks of any store.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import BinaryIO, Protocol


class Delivery(Protocol):
    def write(self, data: bytes) -> None: ...
    def commit(self) -> str: ...
    def abort(self) -> None: ...


class MessageStore(Protocol):
    def begin(self, sender: bytes) -> Delivery: ...


def _maildir_hostname() -> str:
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


class _MaildirDelivery:
    def __init__(self, root: Path, name: str, file: BinaryIO) -> None:
        self._root = root
        self.name = name
        self._file = file
        self._open = True

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> str:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.rename(self._root / "tmp" / self.name, self._root / "new" / self.name)
        self._open = False
        return self.name

    def abort(self) -> None:
        if not self._open:
            return
        self._open = False
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._root / "tmp" / self.name)


class Maildir:
    """Delivery into a Maildir: written under tmp/, renamed into new/ when whole."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._count = 0

    def begin(self, sender: bytes) -> Delivery:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, exist_ok=True)
        self._count += 1
        now = time.time()
        name = (
            f"{int(now)}.M{int(now % 1 * 1_000_000):06d}P{os.getpid()}Q{self._count}"
            f".{_maildir_hostname()}"
        )
        fd = os.open(self.path / "tmp" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        delivery = _MaildirDelivery(self.path, name, os.fdopen(fd, "wb"))
        try:
            delivery.write(b"Return-Path: <" + sender + b">\n")
        except OSError:
            delivery.abort()
            raise
        return delivery


def read_maildir(path: Path | str) -> list[bytes]:
    """The messages in a Maildir's new/, sorted by file name ([] if there is none)."""
    new = Path(path) / "new"
    try:
        names = sorted(n for n in os.listdir(new) if not n.startswith("."))
    except FileNotFoundError:
        return []
    return [(new / n).read_bytes() for n in names]
