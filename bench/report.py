"""The benchmark's report: results.json, results.md (tables, targets) and sessions.png."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]

PEERS = ("nginx", "stunnel")
# The rows of the table: (what, unit, better: "higher"/"lower",
# the peer the goal is set against, goal as a ratio tlsfront / that peer).
TARGETS = (
    ("full STARTTLS sessions/s at saturation", "sessions/s", "higher", "stunnel", 1.0),
    ("server CPU per STARTTLS session", "µs", "lower", "stunnel", 1.0),
    ("bulk, large messages", "MB/s", "higher", "nginx", 0.9),
    ("server CPU per MB in bulk", "µs", "lower", "nginx", round(1 / 0.9, 2)),
    ("memory per idle TLS session (after the post-TLS EHLO)", "kB", "lower", "nginx", 1.0),
    ("p99 session latency, 32 concurrent, STARTTLS", "ms", "lower", "nginx", 1.0),
)


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def _pick(measures: list[Row], **where: Any) -> list[Row]:
    return [m for m in measures if all(m[k] == v for k, v in where.items())]


def _mode_of(measures: list[Row], name: str) -> str:
    """STARTTLS where the server has it; stunnel has implicit TLS only."""
    has = {m["mode"] for m in measures if m["target"] == name}
    return "starttls" if "starttls" in has else "implicit"


def target_figures(measures: list[Row], idle: list[Row]) -> list[tuple[tuple[Any, ...], Row]]:
    """For each row of TARGETS: the figure of each server measured (0.0: not measured)."""

    def top(name: str) -> Row | None:
        # the point of most sessions/s: saturation, and the capacity of one
        # core, fair even where the load generator's core is the limit
        rows = _pick(measures, phase="sweep", target=name, mode=_mode_of(measures, name))
        return max(rows, key=lambda r: r["sessions_s"], default=None)

    def best(name: str) -> float:
        row = top(name)
        return row["sessions_s"] if row else 0.0

    def cpu(name: str) -> float:
        row = top(name)
        return row["server_cpu_ms"] * 1000 if row else 0.0

    def bulk_row(name: str) -> Row | None:
        return max(
            _pick(measures, phase="bulk", target=name), key=lambda r: r["mb_s"], default=None
        )

    def bulk(name: str) -> float:
        row = bulk_row(name)
        return row["mb_s"] if row else 0.0

    def cpu_per_mb(name: str) -> float:
        row = bulk_row(name)
        return row["server_cpu_share"] / row["mb_s"] * 1e6 if row and row["mb_s"] else 0.0

    def memory(name: str) -> float:
        rows = [i for i in idle if i["target"] == name]
        return rows[0]["per_session"] / 1024 if rows else 0.0

    def p99(name: str) -> float:
        mode = _mode_of(measures, name)
        rows = _pick(measures, phase="sweep", target=name, mode=mode, concurrency=32)
        return rows[0]["p99_ms"] if rows else 0.0

    out = []
    names = ("tlsfront", *PEERS)
    for target, fn in zip(TARGETS, (best, cpu, bulk, cpu_per_mb, memory, p99), strict=True):
        out.append((target, {name: fn(name) for name in names}))
    return out


def target_lines(measures: list[Row], idle: list[Row]) -> list[str]:
    """The issue's table, every row with its goal and whether this run met it."""
    rows = []
    for (what, unit, better, peer, goal), values in target_figures(measures, idle):
        ours = values["tlsfront"]
        peers = {name: values[name] for name in PEERS if values[name]}
        cells = [what]
        for name in PEERS:
            value = values[name]
            note = " (implicit)" if name == "stunnel" and "STARTTLS" in what and value else ""
            cells.append(f"{_fv(value)} {unit}{note}" if value else "-")
        cells.append(f"{_fv(ours)} {unit}" if ours else "-")
        if ours and peers:
            pick = max if better == "higher" else min
            best_peer = pick(peers, key=lambda n: peers[n])
            cells.append(f"{ours / peers[best_peer]:.2f} ({best_peer})")
        else:
            cells.append("-")
        sign = "≥" if better == "higher" else "≤"
        cells.append(f"{sign} {goal} x {peer}")
        if ours and values[peer]:
            ratio = ours / values[peer]
            met = ratio >= goal if better == "higher" else ratio <= goal
            cells += [f"{ratio:.2f}", "yes" if met else "**no**"]
        else:
            cells += ["-", "-"]
        rows.append(cells)
    header = ["per core", *PEERS, "tlsfront", "tlsfront / best peer", "goal", "ratio", "met"]
    return _table(header, rows)


def _fv(value: float) -> str:
    return _f(value, 2 if value < 10 else 1 if value < 1000 else 0)


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
    lines += ["## Targets: the issue's table, same run", ""]
    lines += target_lines(measures, idle)
    lines += [
        "stunnel has no server-side STARTTLS here: its STARTTLS rows are its implicit-TLS "
        "figures. Peers run in their leanest configuration (nginx without "
        "`ssl_session_cache`). Memory: the sum of VmRSS over the server's processes with "
        "N sessions held, minus before, over N.",
        "",
    ]

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
