"""The benchmark's report: results.json, results.md (tables, targets) and sessions.png."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]

# (what, unit, better: "higher"/"lower", goal as a ratio tlsfront/nginx)
TARGETS = (
    ("full STARTTLS sessions/s at saturation", "sessions/s", "higher", 1.0),
    ("server CPU per STARTTLS session at saturation", "ms", "lower", 1.0),
    ("bulk throughput, large messages (STARTTLS)", "MB/s", "higher", 0.9),
    ("memory per idle TLS session", "kB", "lower", 1.0),
    ("p99 session latency at 32 concurrent (STARTTLS)", "ms", "lower", 1.0),
)


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def _pick(measures: list[Row], **where: Any) -> list[Row]:
    return [m for m in measures if all(m[k] == v for k, v in where.items())]


def target_figures(
    measures: list[Row], idle: list[Row]
) -> list[tuple[tuple[str, str, str, float], float, float]]:
    """(target, tlsfront, nginx) for each target both were measured for."""
    out = []

    def best(name: str) -> float:
        rows = _pick(measures, phase="sweep", target=name, mode="starttls")
        return max((r["sessions_s"] for r in rows), default=0.0)

    def cpu(name: str) -> float:
        # the point of most sessions/s: the capacity of one core, fair even
        # where the load generator's core, not the server's, is the limit
        rows = _pick(measures, phase="sweep", target=name, mode="starttls")
        top = max(rows, key=lambda r: r["sessions_s"], default=None)
        return top["server_cpu_ms"] if top else 0.0

    def bulk(name: str) -> float:
        rows = _pick(measures, phase="bulk", target=name)
        return max((r["mb_s"] for r in rows), default=0.0)

    def memory(name: str) -> float:
        rows = [i for i in idle if i["target"] == name]
        return rows[0]["per_session"] / 1024 if rows else 0.0

    def p99(name: str) -> float:
        rows = _pick(measures, phase="sweep", target=name, mode="starttls", concurrency=32)
        return rows[0]["p99_ms"] if rows else 0.0

    for target, fn in zip(TARGETS, (best, cpu, bulk, memory, p99), strict=True):
        ours, theirs = fn("tlsfront"), fn("nginx")
        if ours and theirs:
            out.append((target, ours, theirs))
    return out


def markdown(measures: list[Row], idle: list[Row], settings: dict[str, Any]) -> str:
    s = settings
    lines = ["# tlsfront benchmark results", ""]
    lines += [f"- machine: {s['machine']}"]
    lines += [f"- {name}: {version}" for name, version in s["versions"].items()]
    lines += [
        f"- servers pinned to core(s) {s['server_cores']}, load generator, sink and "
        f"nginx's auth_http responder to core(s) {s['client_cores']}",
        f"- {s['duration']} s measured per point after {s['warmup']} s of warm-up; "
        f"{s['size']}-byte messages, one per session unless stated; tlsfront log_level "
        f"{s['log_level']!r}",
        f"- command: `{s['command']}`",
        "",
    ]
    figures = target_figures(measures, idle)
    if figures:
        lines += ["## Targets: tlsfront against nginx, same run", ""]
        rows = []
        for (what, unit, better, goal), ours, theirs in figures:
            ratio = ours / theirs
            digits = 2 if max(ours, theirs) < 10 else 1
            met = ratio >= goal if better == "higher" else ratio <= goal
            sign = "≥" if better == "higher" else "≤"
            rows.append(
                [
                    what,
                    f"{_f(ours, digits)} {unit}",
                    f"{_f(theirs, digits)} {unit}",
                    f"{ratio:.2f}",
                    f"{sign} {goal}",
                    "yes" if met else "**no**",
                ]
            )
        lines += _table(["target", "tlsfront", "nginx", "ratio", "goal", "met"], rows)

    header = [
        "concurrency",
        "target",
        "sessions/s",
        "msgs/s",
        "MB/s",
        "p50 ms",
        "p99 ms",
        "server CPU ms/session",
        "server core",
        "client core",
        "errors",
    ]

    def rows_of(selected: list[Row]) -> list[list[str]]:
        return [
            [
                str(m["concurrency"]),
                m["target"],
                _f(m["sessions_s"]),
                _f(m["messages_s"]),
                _f(m["mb_s"], 2),
                _f(m["p50_ms"]),
                _f(m["p99_ms"]),
                _f(m["server_cpu_ms"], 2),
                f"{m['server_cpu_share']:.0%}",
                f"{m['client_cpu_share']:.0%}",
                str(m["errors"]),
            ]
            for m in selected
        ]

    plain = _pick(measures, phase="sweep", mode="plain")
    for mode in ("starttls", "implicit"):
        selected = _pick(measures, phase="sweep", mode=mode)
        if not selected:
            continue
        lines += [f"## Full sessions, {'STARTTLS' if mode == 'starttls' else 'implicit TLS'}", ""]
        merged = sorted(selected + plain, key=lambda m: (m["concurrency"], m["target"]))
        lines += _table(header, rows_of(merged))
    lines += [
        "`plaintext` is the client talking straight to the sink (no proxy, no TLS); "
        "its server CPU column is the sink's.",
        "",
    ]
    for phase, title in (("resumed", "Resumed TLS sessions"), ("bulk", "Bulk: large messages")):
        selected = _pick(measures, phase=phase)
        if selected:
            m0 = selected[0]
            lines += [
                f"## {title}",
                "",
                f"{m0['size']}-byte messages, {m0['messages']} per session, "
                f"concurrency {m0['concurrency']}.",
                "",
            ]
            rows = rows_of(selected)
            for row, m in zip(rows, selected, strict=True):
                row[1] = f"{m['target']} ({m['mode']})"
                if phase == "resumed":
                    row[-1] += f" (resumed {m['resumed_share']:.0%})"
            lines += _table(header, rows)
    if idle:
        lines += [
            "## Memory per idle TLS session",
            "",
            "RSS of the server's processes with N sessions idle after TLS and EHLO, "
            "minus before, over N.",
            "",
        ]
        lines += _table(
            ["target", "mode", "N", "RSS before MiB", "RSS after MiB", "kB per session"],
            [
                [
                    i["target"],
                    i["mode"],
                    str(i["sessions"]),
                    _f(i["rss_before"] / 2**20),
                    _f(i["rss_after"] / 2**20),
                    _f(i["per_session"] / 1024),
                ]
                for i in idle
            ],
        )
    execs = _pick(measures, phase="exec")
    if execs:
        lines += [
            "## Exec backend: a program started per session",
            "",
            "Server CPU includes the programs it started. Ratios are sessions/s "
            "against tcpserver with the same program, in the same round.",
            "",
        ]
        rows = []
        base: dict[str, float] = {}
        for m in execs:
            program = m["target"].split("+", 1)[1]
            if m["target"].startswith("tcpserver"):
                base[program] = m["sessions_s"]
            ref = base.get(program, 0.0)
            rows.append(
                [
                    m["target"],
                    m["mode"],
                    str(m["concurrency"]),
                    _f(m["sessions_s"]),
                    _f(m["p99_ms"]),
                    _f(m["server_cpu_ms"], 2),
                    f"{m['client_cpu_share']:.0%}",
                    f"{m['sessions_s'] / ref:.2f}" if ref else "-",
                ]
            )
        lines += _table(
            [
                "server+program",
                "mode",
                "concurrency",
                "sessions/s",
                "p99 ms",
                "server CPU ms/session",
                "client core",
                "ratio",
            ],
            rows,
        )
    return "\n".join(lines)


def plot(measures: list[Row], path: Path) -> bool:
    try:  # optional (the `bench` extra); imported by name so type checks need not have it
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return False
    modes = [m for m in ("starttls", "implicit") if _pick(measures, phase="sweep", mode=m)]
    if not modes:
        return False
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        selected = _pick(measures, phase="sweep", mode=mode)
        for name in sorted({m["target"] for m in selected}):
            points = sorted(
                (m["concurrency"], m["sessions_s"]) for m in selected if m["target"] == name
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("full sessions/s")
        ax.set_title("STARTTLS" if mode == "starttls" else "implicit TLS")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(
    out: Path, *, measures: list[Row], idle: list[Row], settings: dict[str, Any]
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"settings": settings, "measures": measures, "idle": idle}, indent=1)
    )
    text = markdown(measures, idle, settings)
    if plot(measures, out / "sessions.png"):
        text += "\n![sessions/s against concurrency](sessions.png)\n"
    path = out / "results.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    """Re-render a report from a results.json: python -m bench.report DIR."""
    import sys

    out = Path((argv or sys.argv[1:])[0])
    data = json.loads((out / "results.json").read_text())
    write_report(out, measures=data["measures"], idle=data["idle"], settings=data["settings"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
