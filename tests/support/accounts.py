"""Running test programs as `nobody`, for the tests that start tlsfront as root.

What nobody runs must be readable by nobody: a directory under /tmp (the
test's own tmp_path is root's alone), and a Python nobody can start:
`sys.executable` when it can, else the system's python3 with this tree and
its dependencies on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

import tlsfront

TREE = Path(tlsfront.__file__).resolve().parent.parent
NOBODY = pwd.getpwnam("nobody")


def nobody_python() -> tuple[list[str], dict[str, str]]:
    """A Python argv prefix nobody can run, and the PYTHONPATH it needs."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import trio, tlsfront"],
            user=NOBODY.pw_uid,
            group=NOBODY.pw_gid,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            check=False,
        )
    except PermissionError:  # it cannot even start it
        pass
    else:
        if probe.returncode == 0:
            return [sys.executable], {}
    system = shutil.which("python3", path="/usr/bin:/bin")
    assert system is not None
    return [system], {"PYTHONPATH": f"{TREE}:{sysconfig.get_paths()['purelib']}"}


@contextmanager
def shared_directory() -> Iterator[Path]:
    """A directory everyone can reach, holding `capture/`, which nobody may write."""
    directory = Path(tempfile.mkdtemp(prefix="tlsfront-nobody-"))
    directory.chmod(0o755)
    capture = directory / "capture"
    capture.mkdir()
    os.chown(capture, NOBODY.pw_uid, NOBODY.pw_gid)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


class StreamLog:
    """What a process writes on one stream, collected as it comes."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.text = ""
        self._more = trio.Event()

    async def collect(self) -> None:
        async for chunk in self.stream:
            self.text += chunk.decode()
            self._more.set()
            self._more = trio.Event()

    async def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """Until the text holds `count` matches (woken by each chunk)."""
        with trio.fail_after(30):
            while len(found := list(re.finditer(pattern, self.text))) < count:
                await self._more.wait()
        return found


def kill_group(process: trio.Process) -> None:
    """SIGKILL to the process group `process` leads (started with
    start_new_session): a worker left behind by a failed test would serve on."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
