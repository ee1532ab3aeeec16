"""Where a server's instructions go: callgrind's counts summed by shared object.

`python -m bench.instructions` counts a server's instructions per session;
this splits that count by the object that executed them (the Python
interpreter, OpenSSL, libc, nginx itself...), read from the callgrind output
with `callgrind_annotate`. For tlsfront the interpreter's share is
everything written in Python (tlsfront, trio, pyOpenSSL's wrappers); for
nginx the server's own share is its binary and modules.
"""

from __future__ import annotations

import glob
import re
import subprocess
from collections import Counter
from pathlib import Path

# A cost line of `callgrind_annotate --inclusive=no`: "1,234 (5.6%)  file:function [object]";
# a function inlined from a header has no "[object]", only its file.
_LINE = re.compile(
    r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(?P<file>\S*?):\S.*?(?: \[(?P<object>[^\]]*)\])?\s*$"
)
_TOTAL = re.compile(r"^\s*([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS")

_PYTHON = "Python interpreter (tlsfront, trio, pyOpenSSL's Python code)"
# Shared objects by what they are, first match wins.
_COMPONENTS = (
    ("libpython", _PYTHON),
    ("/Python-3.", _PYTHON),  # the interpreter's own sources, inlined
    ("_rust.abi3", "OpenSSL (as bundled by cryptography)"),
    ("libcrypto", "OpenSSL (libcrypto)"),
    ("libssl", "OpenSSL (libssl)"),
    ("_cffi_backend", "cffi (calls from Python into OpenSSL)"),
    ("libc.so", "libc"),
    ("ngx_", "nginx (modules)"),
    ("nginx", "nginx"),
)
OTHER = "other"


def component(where: str) -> str:
    """What a shared object (or, for inlined code, a source file) belongs to."""
    for key, label in _COMPONENTS:
        if key in (where if key.startswith("/") else where.rsplit("/", 1)[-1]):
            return label
    return OTHER


def breakdown(out: Path, sessions: float) -> dict[str, float]:
    """Instructions per session by component, from the callgrind files `out*`.

    Empty when callgrind_annotate is missing or the files hold no counts.
    """
    counts: Counter[str] = Counter()
    total = 0
    for name in sorted(glob.glob(str(out) + "*")):
        try:
            text = subprocess.run(
                ["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return {}
        for line in text.splitlines():
            if match := _TOTAL.match(line):
                total += int(match[1].replace(",", ""))
            elif match := _LINE.match(line):
                where = match["object"] or match["file"]
                counts[component(where)] += int(match[1].replace(",", ""))
    if not total or sessions <= 0:
        return {}
    counts[OTHER] += total - sum(counts.values())  # lines below the annotator's precision
    return {label: n / sessions for label, n in counts.most_common() if n > 0}


def markdown(breakdowns: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    """One table per (server, mode): millions of instructions per session, and shares."""
    lines: list[str] = []
    for (server, mode), parts in breakdowns.items():
        if not parts:
            continue
        whole = sum(parts.values())
        lines += [
            f"### {server}, {mode}: where the instructions go",
            "",
            "| component | M instructions / session | share |",
            "|---|---|---|",
        ]
        lines += [
            f"| {label} | {n / 1e6:.2f} | {100 * n / whole:.0f} % |" for label, n in parts.items()
        ]
        lines.append("")
    return lines
