"""The C allocator's thresholds for a server that moves large messages.

A large message passes through tlsfront as 256 KiB chunks of plaintext
(`tlsfront.tls.incoming`), a new bytes object each, freed once the backend
has it. With glibc's defaults each of them costs fresh pages from the
kernel: an allocation of more than 128 KiB is an mmap of its own, and one
that comes from the heap is given back when it is freed at the heap's top
(more than 128 KiB free there is trimmed), so the next one takes 64 page
faults, each a page the kernel zeroes. That was about a tenth of the CPU
time per MB of a bulk transfer.

`keep_large_buffers` asks glibc to serve allocations of up to 1 MiB from
the heap and to give memory back only beyond 8 MiB free at its top: the
chunks then reuse the same pages. A server holds a few chunks per busy
session at a time, so this keeps no more memory than the sessions use;
an idle server keeps at most those 8 MiB.
"""

from __future__ import annotations

import ctypes

__all__ = ["keep_large_buffers"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 8 << 20

_done = False


def keep_large_buffers() -> bool:
    """Set the thresholds (see the module doc), once. False where there is no mallopt."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # no mallopt (macOS); musl's does nothing
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _done
