"""The results as Markdown, terminal text, JSON and a plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .goals import floor, index

__all__ = ["done_rows", "markdown", "plot", "text", "write"]

TIMING_HEADER = (
    "arch",
    "framework",
    "N",
    "T",
    "contender",
    "kind",
    "best ms/batch",
    "median ms/batch",
    "best ms/image",
    "x floor",
    "warm-up ms",
    "peak MiB",
)
GOAL_HEADER = ("goal", "case", "measured", "limit", "met")
DONE_HEADER = (
    "net",
    "N",
    "framework",
    "floor T=1 ms",
    "multicam T=1 ms",
    "x floor",
    "floor T=10 ms",
    "multicam T=10 ms",
    "x floor",
    "multicam T=10 / T=1",
    "new traces",
)


def _timing_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per contender and case, in :data:`TIMING_HEADER`'s columns."""
    idx = index(result)
    rows = []
    for t in result["timings"]:
        best = floor(idx, (t["arch"], t["framework"], t["batch"], t["targets"]))
        rows.append(
            [
                t["arch"],
                t["framework"],
                str(t["batch"]),
                str(t["targets"]),
                t["contender"],
                t["kind"],
                f"{1e3 * t['best']:.1f}",
                f"{1e3 * t['median']:.1f}",
                f"{1e3 * t['best'] / t['batch']:.1f}",
                f"{t['best'] / best:.2f}" if best else "",
                f"{1e3 * t['warmup_s']:.0f}",
                "" if t["peak_mb"] is None else f"{t['peak_mb']:.0f}",
            ]
        )
    return rows


def done_rows(result: dict[str, Any]) -> list[list[str]]:
    """Issue 13's summary: per network, N and framework, T = 1 and 10 against the floor."""
    idx = index(result)
    traces = {(r["arch"], r["framework"], r["batch"]): r for r in result.get("retraces", [])}
    rows = []
    for arch, fw, n in sorted({k[:3] for k in idx}, key=lambda c: (c[0], c[2], c[1])):
        cells = [arch, str(n), fw]
        ours = {}
        for t in (1, 10):
            mine = idx.get((arch, fw, n, t, "multicam"))
            best = floor(idx, (arch, fw, n, t))
            ours[t] = mine["best"] if mine else None
            cells += [
                f"{1e3 * best:.1f}" if best else "",
                f"{1e3 * mine['best']:.1f}" if mine else "",
                f"{mine['best'] / best:.2f}" if mine and best else "",
            ]
        one, ten = ours[1], ours[10]
        same_rounds = idx.get((arch, fw, n, 10, "multicam-T1"))
        if same_rounds:  # T=1 timed in the T=10 case's rounds: the ratio of one run
            one = same_rounds["best"]
        cells.append(f"{ten / one:.2f}" if one and ten else "")
        record = traces.get((arch, fw, n))
        cells.append(
            "" if record is None else str(record["traces_after"] - record["traces_before"])
        )
        if any(cells[3:10]):
            rows.append(cells)
    return rows


def _goal_rows(result: dict[str, Any], missed: str) -> list[list[str]]:
    return [
        [
            g["goal"],
            g["case"],
            f"{g['value']:.3g}",
            f"{g['limit']:g}",
            "met" if g["met"] else missed,
        ]
        for g in result["goals"]
    ]


def _stage_lines(result: dict[str, Any], bullet: str) -> list[str]:
    """The NumPy stage's timings, one line each."""
    stage = result.get("numpy_stage")
    if not stage:
        return []
    lines = [
        f"NumPy stage alone, N={stage['n']}, K={stage['k']}, "
        f"{'x'.join(map(str, stage['spatial']))} -> {'x'.join(map(str, stage['size']))}, "
        "one target:"
    ]
    lines += [
        f"{bullet}{name}: best {1e3 * r['best_s']:.1f} ms, median {1e3 * r['median_s']:.1f} ms"
        for name, r in stage["results"].items()
    ]
    if stage.get("forward"):
        fwd = stage["forward"]
        lines.append(
            f"{bullet}torch ResNet-50 inference forward, N={fwd['batch']}: "
            f"best {1e3 * fwd['best_s']:.0f} ms"
        )
    return lines


def _retrace_lines(result: dict[str, Any], bullet: str) -> list[str]:
    if not result.get("retraces"):
        return []
    return [
        "Traces of multicam's compiled functions before/after a call with other classes "
        "(same shapes):"
    ] + [
        f"{bullet}{r['arch']} {r['framework']} N={r['batch']} T={r['targets']}: "
        f"{r['traces_before']} -> {r['traces_after']}"
        for r in result["retraces"]
    ]


def _pipe_table(header: Sequence[str], rows: list[list[str]], text: Sequence[str]) -> list[str]:
    """A compact Markdown table; columns named in ``text`` are left-aligned, others right."""
    rule = "|" + "|".join("---" if h in text else "---:" for h in header) + "|"
    lines = ["| " + " | ".join(row) + " |" for row in [list(header), *rows]]
    return [lines[0], rule, *lines[1:]]


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown: settings, the summary, every timing, the goals."""
    machine = result["machine"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; elapsed {result['elapsed_s']:.0f} s  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['affinity']} usable), "
        f"{machine['memory_gb']} GB, {machine['platform']}; {machine['gpu']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "  ",
        "Settings: "
        + "; ".join(f"{k}: {v}" for k, v in result["settings"].items() if k != "threads")
        + f"; torch threads {result['settings']['threads']['torch']}",
        "",
    ]
    done = done_rows(result)
    if done:
        lines += ["Best ms per batch; x floor: over the framework's floor.", ""]
        lines += [*_pipe_table(DONE_HEADER, done, ("net", "framework")), ""]
    lines += _pipe_table(
        TIMING_HEADER, _timing_rows(result), ("arch", "framework", "contender", "kind")
    )
    for extra in (_stage_lines(result, "- "), _retrace_lines(result, "- ")):
        if extra:
            lines += ["", extra[0], "", *extra[1:]]
    lines.append("")
    lines += _pipe_table(GOAL_HEADER, _goal_rows(result, "**missed**"), ("goal", "case", "met"))
    if result["skipped"]:
        lines += ["", "Not measured:"] + [f"- {k}: {v}" for k, v in result["skipped"].items()]
    if result["cut"]:
        lines += ["", "Cut:"] + [f"- {c}" for c in result["cut"]]
    return "\n".join(lines) + "\n"


def text(result: dict[str, Any]) -> str:
    """The results for a terminal: aligned tables; the full settings are in the files."""
    from ..cli import format_table

    settings = result["settings"]
    machine = result["machine"]
    lines = [
        f"multicam bench: {', '.join(settings['archs'])} on {', '.join(settings['frameworks'])}; "
        f"N {settings['batches']}, T {settings['targets']}; best of {settings['repeats']} "
        f"timed round(s) after a warm-up call; {result['elapsed_s']:.0f} s",
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['affinity']} usable), "
        f"{machine['memory_gb']} GB; {machine['gpu']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        "time per batch in ms; x floor: relative to the framework's fastest hand-written "
        "forward + backward (compiled for TensorFlow and JAX)",
    ]
    lines += format_table(TIMING_HEADER, _timing_rows(result))
    for extra in (_stage_lines(result, "  "), _retrace_lines(result, "  ")):
        if extra:
            lines += ["", *extra]
    if result["goals"]:
        lines += ["", "goals:"]
        lines += format_table(GOAL_HEADER, _goal_rows(result, "MISSED"))
    if result["skipped"]:
        lines += ["", "not measured:"] + [f"  {k}: {v}" for k, v in result["skipped"].items()]
    if result["cut"]:
        lines += ["", "cut:"] + [f"  {c}" for c in result["cut"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """Bar chart of time / floor per contender and case; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    idx = index(result)
    cases = sorted({k[:4] for k in idx})
    archs = sorted({c[0] for c in cases})
    fig, axes = plt.subplots(len(archs), 1, figsize=(14, 4.5 * len(archs)), squeeze=False)
    for ax, arch in zip(axes[:, 0], archs, strict=True):
        arch_cases = [c for c in cases if c[0] == arch]
        names = sorted({k[4] for k, v in idx.items() if k[0] == arch and v["kind"] != "floor"})
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            values = []
            for case in arch_cases:
                best = floor(idx, case)
                entry = idx.get((*case, name))
                values.append(entry["best"] / best if entry and best else np.nan)
            ax.bar(np.arange(len(arch_cases)) + j * width, values, width, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.3, color="r", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(arch_cases)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{c[1]}\nN={c[2]} T={c[3]}" for c in arch_cases], fontsize=7)
        ax.set_ylabel("best time / floor")
        ax.set_title(f"{arch}: time relative to the framework's fastest hand-written floor")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` (if matplotlib) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    paths["md"].write_text(markdown(result))
    png = out_dir / f"{name}.png"
    if plot(result, png):
        paths["png"] = png
    return paths
