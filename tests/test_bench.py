"""The benchmark harness, run for a few seconds: it must measure, not just run.

Only tlsfront and the plaintext baseline (nginx and stunnel are not part of
the test suite's requirements); the figures are not checked, the plumbing is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--targets",
        "tlsfront",
        "--modes",
        "starttls,implicit",
        "--concurrency",
        "2",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--idle",
        "20",
        "--resume",
        "2",
        "--bulk-size",
        "65536",
        "--bulk-messages",
        "2",
        "--bulk-concurrency",
        "2",
        "--exec",
        "",
        "--out",
        str(out),
    ]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    data = json.loads((out / "results.json").read_text())
    measures = data["measures"]
    seen = {(m["phase"], m["target"], m["mode"]) for m in measures}
    assert seen == {
        ("sweep", "plaintext", "plain"),
        ("sweep", "tlsfront", "starttls"),
        ("sweep", "tlsfront", "implicit"),
        ("resumed", "tlsfront", "starttls"),
        ("resumed", "tlsfront", "implicit"),
        ("bulk", "plaintext", "plain"),
        ("bulk", "tlsfront", "starttls"),
    }
    for m in measures:
        assert m["sessions"] > 0, m
        assert m["errors"] == 0, m
        assert m["p50_ms"] > 0
        if m["target"] == "tlsfront":
            assert m["server_cpu_ms"] > 0  # read from /proc: the server did the work
        if m["phase"] == "resumed":
            assert m["resumed_share"] > 0.5  # session tickets really resumed
        if m["phase"] == "bulk":
            assert m["mb_s"] > 0
    (idle,) = data["idle"]
    assert idle["target"] == "tlsfront"
    assert idle["sessions"] == 20
    assert idle["rss_after"] > idle["rss_before"]
    report = (out / "results.md").read_text()
    assert "## Full sessions, STARTTLS" in report
    assert "## Memory per idle TLS session" in report
