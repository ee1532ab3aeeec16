"""Running test programs as `nobody`, for the tests that start tlsfront as root.

What nobody runs must be readable by nobody: a directory under /tmp (the
test's own tmp_path is root's alone), and a Python nobody can start:
`sys.executable` when it can, else the system's python3 with this tree and
its dependencies on PYTHONPATH.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
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
from importlib import metadata
from pathlib import Path

import trio

import tlsfront

TREE = Path(tlsfront.__file__).resolve().parent.parent
NOBODY = pwd.getpwnam("nobody")


def _can_import(python: list[str], env: dict[str, str]) -> bool:
    """Whether nobody can start `python` and import tlsfront with `env`."""
    try:
        probe = subprocess.run(
            [*python, "-c", "import trio, tlsfront, OpenSSL, dns, prometheus_client"],
            user=NOBODY.pw_uid,
            group=NOBODY.pw_gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            check=False,
        )
    except PermissionError:  # it cannot even start it
        return False
    return probe.returncode == 0


def _runtime_distributions() -> set[str]:
    """tlsfront's run-time dependencies, with theirs, by distribution name."""
    seen: set[str] = set()
    todo = ["tlsfront"]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        with contextlib.suppress(metadata.PackageNotFoundError):
            for requirement in metadata.requires(name) or []:
                if "extra ==" in requirement:
                    continue
                match = re.match(r"[A-Za-z0-9_.-]+", requirement)
                if match:
                    todo.append(match.group(0))
    return seen


def _mirror(root: Path) -> None:
    """Copy this tree's tlsfront and test backends, and the installed run-time
    dependencies, to `root`: for a clone in a directory nobody may enter."""
    shutil.copytree(
        TREE / "tlsfront", root / "tlsfront", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(
        TREE / "tests" / "support" / "backends",
        root / "tests" / "support" / "backends",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    wanted = _runtime_distributions() - {"tlsfront"}
    for dist in metadata.distributions():
        if re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower() not in wanted:
            continue
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if "__pycache__" in file.parts or not source.is_file():
                continue
            target = root / "site" / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@functools.cache
def nobody_runtime() -> tuple[list[str], dict[str, str], Path]:
    """A Python argv prefix nobody can run, the PYTHONPATH it needs, and the
    capture backend script it can read.

    `sys.executable` and this tree when nobody can reach them; else the
    system's python3 with this tree and its dependencies on PYTHONPATH; else
    (a clone under a directory only root may enter) a copy of what is needed
    in a directory under /tmp, removed when the tests end.
    """
    capture = TREE / "tests" / "support" / "backends" / "capture.py"
    if _can_import([sys.executable], {}):
        return [sys.executable], {}, capture
    system = shutil.which("python3", path="/usr/bin:/bin")
    assert system is not None
    env = {"PYTHONPATH": f"{TREE}:{sysconfig.get_paths()['purelib']}"}
    if _can_import([system], env):
        return [system], env, capture
    root = Path(tempfile.mkdtemp(prefix="tlsfront-nobody-tree-"))
    atexit.register(shutil.rmtree, root, True)
    _mirror(root)
    env = {"PYTHONPATH": f"{root}:{root / 'site'}"}
    assert _can_import([system], env), "nobody cannot import the copied tree"
    return [system], env, root / "tests" / "support" / "backends" / "capture.py"


def nobody_python() -> tuple[list[str], dict[str, str]]:
    """A Python argv prefix nobody can run, and the PYTHONPATH it needs."""
    python, env, _ = nobody_runtime()
    return python, env


def nobody_capture() -> Path:
    """The capture backend's script, at a path nobody can read."""
    return nobody_runtime()[2]


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
