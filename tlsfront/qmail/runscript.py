"""Running a daemontools/runit run script to see what it would start.

Theory of operation. A run script is shell: backticks (`id -u qmaild`,
`head -1 /var/qmail/control/me`), variables, envdir directories, programs
found through a PATH the script sets itself. Rather than reading the shell,
`tlsfront import-qmail --run` runs it, with `sh`, as supervise or runsv would
(in the script's own directory, stdin from /dev/null), under a timeout, with
the programs of the chain that leads to tcpserver replaced by stand-ins
(standin.py): each records its argv and environment and execs the rest of the
chain as the real one would, until tcpserver, which records and exits 0.
Everything else in the script (id, head, cat, env, real backticks) runs for
real, so the values tcpserver sees are the ones the real script would give it
on this machine.

How the stand-ins take the place of the real programs: the script's text is
run (`sh -c TEXT SCRIPT`, so that $0 is still its name) with every word
naming one of them, bare (`tcpserver`) or with a directory
(`/usr/local/bin/tcpserver`), rewritten to the absolute path of a stand-in
(the script file itself is left alone); a PATH set by the script cannot then
lead around them. The stand-ins are small sh wrappers in a scratch directory,
one per spelling found (so that the spelling can be given back where it ends
up in the backend's argv), also put first on PATH for names the rewriting did
not see. They name the record
file themselves: a script that clears its environment (`env -`) still leaves
a record. No mount, no privileges.

The script's own side effects before its final exec (a mkdir, a chown) do
happen: it is run for real.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the programs replaced by stand-ins: those that exec a child, and the servers
STANDINS = (
    "tcpserver",
    "tcpsvd",
    "softlimit",
    "setuidgid",
    "envuidgid",
    "envdir",
    "fghack",
    "pgrphack",
    "chpst",
)
SERVERS = ("tcpserver", "tcpsvd")
TIMEOUT = 20.0  # seconds the script may take to reach tcpserver
# the environment the script starts with, as svscan's leaves it
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin"

_WORD = re.compile(r"(?<![\w./$-])((?:/[\w.+-]+)*/)?(" + "|".join(STANDINS) + r")(?![\w./-])")
_STANDIN_SOURCE = Path(__file__).with_name("standin.py")


class RunScriptError(Exception):
    """The run script could not be run, or it never started tcpserver."""


@dataclass(frozen=True)
class Step:
    """One stand-in's record: a program of the chain as the script ran it."""

    program: str  # which stand-in: "softlimit", "tcpserver", ...
    argv: tuple[str, ...]  # as the script gave it, spellings restored
    env: Mapping[str, str]  # the environment it was started with
    cwd: str
    notes: tuple[str, ...]
    limits: Mapping[str, str]
    account: str | None


@dataclass(frozen=True)
class Evaluation:
    """What running the script showed."""

    script: Path
    steps: tuple[Step, ...]  # in the order they ran; the last is the server
    start_env: Mapping[str, str]  # the environment the script was started with
    stderr: str  # what the script and its commands wrote
    text: str  # the script itself

    @property
    def server(self) -> Step:
        return self.steps[-1]


def base_environment(standins: Path) -> dict[str, str]:
    """The environment a supervised run script starts with: PATH only."""
    return {"PATH": f"{standins}:{BASE_PATH}"}


def _rewrite(text: str, standins: Path, spellings: dict[str, str]) -> str:
    """`text` with every program word naming a stand-in's path; `spellings` filled."""
    by_word: dict[str, str] = {}

    def sub(match: re.Match[str]) -> str:
        word = match.group(0)
        if word not in by_word:
            directory = standins / f"w{len(by_word)}"
            by_word[word] = str(directory / match.group(2))
            spellings[by_word[word]] = word
        return by_word[word]

    return _WORD.sub(sub, text)


def _wrapper(path: Path, name: str, log: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-S", "-E", str(_STANDIN_SOURCE), str(log), name]
    path.write_text("#!/bin/sh\nexec " + shlex.join(command) + ' "$@"\n')
    path.chmod(0o755)


def _restore(words: list[str], spellings: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(spellings.get(word, word) for word in words)


def evaluate(script: Path, timeout: float = TIMEOUT) -> Evaluation:
    """Run `script` with stand-ins until it starts tcpserver; RunScriptError if it
    cannot be read, times out, or ends without starting a server."""
    try:
        text = script.read_text(errors="surrogateescape")
    except OSError as exc:
        raise RunScriptError(f"{script}: cannot read it: {exc.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="tlsfront-run-") as scratch:
        root = Path(scratch)
        log = root / "records"
        standins = root / "bin"
        spellings: dict[str, str] = {}
        rewritten = _rewrite(text, standins, spellings)
        for path in spellings:
            _wrapper(Path(path), Path(path).name, log)
        for name in STANDINS:
            _wrapper(standins / name, name, log)
        env = base_environment(standins)
        proc = subprocess.Popen(
            ["sh", "-c", rewritten, str(script)],  # $0 is the script's own name
            cwd=script.absolute().parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RunScriptError(
                f"{script}: still running after {timeout:g} s without starting tcpserver "
                "(it was stopped)"
            ) from None
        finally:
            if proc.poll() is None:  # pragma: no cover - only after an exception
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        records = _read(log)
    said = output.decode(errors="replace")
    steps = tuple(_step(record, spellings, str(standins)) for record in records)
    if not steps or steps[-1].program not in SERVERS:
        chain = " -> ".join(step.program for step in steps) or "nothing"
        raise RunScriptError(
            f"{script}: it ran {chain} and never started tcpserver (exit status "
            f"{proc.returncode}); its output: {said.strip()[-500:] or '(none)'}"
        )
    return Evaluation(script, steps, {"PATH": BASE_PATH}, said, text)


def _read(log: Path) -> list[dict[str, Any]]:
    try:
        lines = log.read_text(errors="surrogateescape").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _step(record: Mapping[str, Any], spellings: Mapping[str, str], standins: str) -> Step:
    env = dict(record["env"])
    if "PATH" in env:  # without the stand-ins' directories
        env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not p.startswith(standins))
    return Step(
        program=record["program"],
        argv=_restore(list(record["argv"]), spellings),
        env=env,
        cwd=record["cwd"],
        notes=tuple(record["notes"]),
        limits=dict(record["limits"]),
        account=record["account"],
    )
