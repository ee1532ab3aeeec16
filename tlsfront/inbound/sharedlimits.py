"""Connection limits that hold for all the worker processes of one server.

Theory of operation
-------------------
With `workers = N`, every worker accepts on the same listening sockets, and
`max_connections` and `max_per_ip` must count the whole server's
connections, not one worker's. The parent makes one `SharedLimits` before
it forks: a shared anonymous memory map, which every worker inherits (a
worker started again after a death too), and a file to lock.

The map holds one row of counters per profile (connections in progress)
and a hash table of client addresses, each slot a (profile, address) key
and its connections in progress. Every counter is kept per worker process,
in a column of its own: a connection is admitted when, under the lock,
the sums over the columns are below the limits, and then counted in the
admitting process's column. The parent gives each worker it starts a
column no living worker has (there are more columns than workers, for the
old workers still finishing their sessions after a reload by
replacement), records which column serves which worker index
(`set_current`, read by the metrics endpoint), and zeroes a column when
its process has ended (`forget_worker`): a worker that dies takes its
connections with it (the kernel closes them), so a crash never leaves
phantom connections behind.

The table is open addressing with linear probing; a slot whose counters
all fall to zero is removed by shifting the slots after it back (no
tombstones, so probe chains stay short for as long as the server runs).
The hash is keyed with a secret made at start, so that a client cannot
choose addresses that collide. The table has room for twice the sum of
the profiles' `max_connections` at start (every address in it has a
connection in progress); a table full after a reload raised the limits
refuses the connection as over the limit.

The lock is a POSIX record lock (`fcntl.lockf`) on an unlinked temporary
file: the kernel drops it when its holder dies, so a worker killed while
holding it cannot stop the others. Each worker is one thread (one trio
loop), and the critical section never waits, so the lock is held for a
few microseconds per connection.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import mmap
import os
import struct
import tempfile
from collections.abc import Sequence

__all__ = ["SharedLimits"]

_MAX_SLOTS = 1 << 20
# A slot: hash (0: empty), profile, address family (4 or 6), packed address;
# then one unsigned 32-bit counter per worker.
_KEY = struct.Struct("<QBB16s")
_EMPTY = 0


def _slots_for(capacity: int) -> int:
    slots = 64
    while slots < 2 * capacity and slots < _MAX_SLOTS:
        slots *= 2
    return slots


class SharedLimits:
    """Connections in progress per profile and per (profile, client address),
    counted per worker in memory shared by all of them."""

    def __init__(
        self, profiles: Sequence[str], workers: int, capacity: int, columns: int | None = None
    ) -> None:
        """`workers`: worker indexes; `columns`: worker processes alive at once at most."""
        self.profiles = {name: index for index, name in enumerate(profiles)}
        self.workers = workers
        self.columns = columns or workers
        self.worker = 0  # which column this process counts in; set in each worker
        self._counts = struct.Struct(f"<{self.columns}I")
        self._current = struct.Struct(f"<{workers}I")
        self._slot_size = _KEY.size + self._counts.size
        self._rows = self._current.size + len(profiles) * self._counts.size
        self._slots = _slots_for(capacity)
        self._mask = self._slots - 1
        self._map = mmap.mmap(-1, self._rows + self._slots * self._slot_size)
        self._secret = os.urandom(16)
        with tempfile.TemporaryFile(prefix="tlsfront-limits-") as lockfile:
            self._lock_fd = os.dup(lockfile.fileno())  # unlinked: gone with the last holder
        os.set_inheritable(self._lock_fd, False)  # workers get it by fork, backends never

    # -- locking -------------------------------------------------------------

    def _lock(self) -> None:
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)

    # -- the counters --------------------------------------------------------

    def _row(self, profile: int) -> int:
        return self._current.size + profile * self._counts.size

    def _total(self, offset: int) -> int:
        return sum(self._counts.unpack_from(self._map, offset))

    def _add(self, offset: int, column: int, delta: int) -> None:
        place = offset + 4 * column
        (value,) = struct.unpack_from("<I", self._map, place)
        struct.pack_into("<I", self._map, place, max(0, value + delta))

    # -- the address table ---------------------------------------------------

    def _key(self, profile: int, ip: str) -> tuple[int, bytes]:
        family: int
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
            family, packed = address.version, address.packed
        except ValueError:
            family, packed = 0, hashlib.blake2b(ip.encode(), digest_size=16).digest()
        key = _KEY.pack(0, profile, family, packed)[8:]
        digest = hashlib.blake2b(key, digest_size=8, key=self._secret).digest()
        return int.from_bytes(digest, "little") or 1, key

    def _slot(self, index: int) -> int:
        return self._rows + index * self._slot_size

    def _find(self, hashed: int, key: bytes, insert: bool) -> int | None:
        """The offset of the key's slot; with `insert`, a new one if absent
        (None when the table is full)."""
        index = hashed & self._mask
        for _ in range(self._slots):
            offset = self._slot(index)
            found = struct.unpack_from("<Q", self._map, offset)[0]
            if found == _EMPTY:
                if not insert:
                    return None
                self._map[offset : offset + _KEY.size] = struct.pack("<Q", hashed) + key
                return offset
            if found == hashed and self._map[offset + 8 : offset + _KEY.size] == key:
                return offset
            index = (index + 1) & self._mask
        return None

    def _remove(self, offset: int) -> None:
        """Empty the slot at `offset`, shifting back the slots its removal would strand."""
        hole = (offset - self._rows) // self._slot_size
        index = hole
        while True:
            index = (index + 1) & self._mask
            place = self._slot(index)
            hashed = struct.unpack_from("<Q", self._map, place)[0]
            if hashed == _EMPTY:
                break
            home = hashed & self._mask
            # The entry at `index` may fill the hole unless its home lies
            # cyclically within (hole, index].
            if (hole < index and hole < home <= index) or (
                hole > index and (home > hole or home <= index)
            ):
                continue
            source, target = self._slot(index), self._slot(hole)
            self._map[target : target + self._slot_size] = self._map[
                source : source + self._slot_size
            ]
            hole = index
        target = self._slot(hole)
        self._map[target : target + self._slot_size] = bytes(self._slot_size)

    # -- what the server calls -----------------------------------------------

    def admit(self, profile: str, ip: str, max_connections: int, max_per_ip: int) -> str | None:
        """Count one more connection, or say why not (the limits of the whole server)."""
        row = self._row(self.profiles[profile])
        hashed, key = self._key(self.profiles[profile], ip)
        self._lock()
        try:
            if max_connections and self._total(row) >= max_connections:
                return "too many connections"
            slot = self._find(hashed, key, insert=True)
            if slot is None:
                return "too many connections"
            counts = slot + _KEY.size
            if max_per_ip and self._total(counts) >= max_per_ip:
                return f"too many connections from {ip}"
            self._add(counts, self.worker, 1)
            self._add(row, self.worker, 1)
            return None
        finally:
            self._unlock()

    def release(self, profile: str, ip: str) -> None:
        row = self._row(self.profiles[profile])
        hashed, key = self._key(self.profiles[profile], ip)
        self._lock()
        try:
            self._add(row, self.worker, -1)
            slot = self._find(hashed, key, insert=False)
            if slot is not None:
                counts = slot + _KEY.size
                self._add(counts, self.worker, -1)
                if not self._total(counts):
                    self._remove(slot)
        finally:
            self._unlock()

    def active(self, profile: str) -> int:
        """Connections in progress in the whole server."""
        return self._total(self._row(self.profiles[profile]))

    def from_ip(self, profile: str, ip: str) -> int:
        hashed, key = self._key(self.profiles[profile], ip)
        slot = self._find(hashed, key, insert=False)
        return 0 if slot is None else self._total(slot + _KEY.size)

    def set_current(self, index: int, column: int) -> None:
        """Worker `index` now counts in `column` (the parent, as it starts one)."""
        struct.pack_into("<I", self._map, 4 * index, column)

    def current(self) -> list[int]:
        """The column of each worker index's current process."""
        return list(self._current.unpack_from(self._map, 0))

    def forget_worker(self, worker: int) -> None:
        """Zero the counters of column `worker`, whose process has ended
        (the connections of one that died died with it)."""
        self._lock()
        try:
            for profile in self.profiles.values():
                row = self._row(profile)
                struct.pack_into("<I", self._map, row + 4 * worker, 0)
            index = 0
            while index < self._slots:
                offset = self._slot(index)
                if struct.unpack_from("<Q", self._map, offset)[0] != _EMPTY:
                    counts = offset + _KEY.size
                    struct.pack_into("<I", self._map, counts + 4 * worker, 0)
                    if not self._total(counts):
                        self._remove(offset)
                        continue  # another entry may have moved into this slot
                index += 1
        finally:
            self._unlock()
