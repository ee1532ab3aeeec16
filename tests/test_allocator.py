"""The allocator's thresholds: 256 KiB chunks of a large message reuse their pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHUNK = 256 * 1024  # a chunk of plaintext in bulk (tlsfront.tls.incoming.RECEIVE)
PAGES = CHUNK // 4096

# In a fresh interpreter: page faults while, 200 times, three chunks are
# made (as the TLS stream copies its plaintext out) and freed, as in busy
# sessions, where a chunk in hand and those waiting for the backend come
# and go together.
PROGRAM = """
import resource, sys
from tlsfront.ops.allocator import keep_large_buffers
if sys.argv[1] == "tuned":
    assert keep_large_buffers()
    assert keep_large_buffers()  # once is enough; again is harmless
view = memoryview(bytearray(b"x" * CHUNK))
def rounds(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        held = [bytes(view) for _ in range(3)]
        del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
rounds(10)  # the heap grows to hold them
print(rounds(200))
""".replace("CHUNK", str(CHUNK))


def faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_chunks_reuse_their_pages() -> None:
    # glibc's defaults: memory freed at the heap's top goes back to the
    # kernel, so each round takes fresh pages, zeroed by the kernel.
    assert faults("default") > 200 * PAGES
    assert faults("tuned") < 5 * PAGES
