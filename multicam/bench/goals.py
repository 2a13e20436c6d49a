"""Issue 13's targets, evaluated from a run's timings.

- one target at most 1.3x the framework's floor (the fastest hand-written form: compiled
  for TensorFlow and JAX, eager for torch), on every network;
- on global-average-pooling heads, ten targets at most 1.5x one target;
- no new traces when only the classes change (TensorFlow and JAX);
- against the peers: one target at least as fast, ten maps at least 5x faster;
- the NumPy stage at most 10 % of the forward, and faster than pytorch-grad-cam's.
"""

from __future__ import annotations

from typing import Any

from .nets import GAP_HEAD

__all__ = ["evaluate", "floor", "index"]

Key = tuple[str, str, int, int, str]


def index(result: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    """The timings by ``(arch, framework, N, T, contender)``."""
    return {
        (t["arch"], t["framework"], t["batch"], t["targets"], t["contender"]): t
        for t in result["timings"]
    }


def floor(idx: dict[Key, dict[str, Any]], case: tuple[str, str, int, int]) -> float | None:
    """The best time of the case's fastest ``floor`` contender (the ratios' denominator)."""
    found = [
        timing["best"]
        for key, timing in idx.items()
        if key[:4] == case and timing["kind"] == "floor"
    ]
    return min(found) if found else None


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each with its measured value, its limit and whether it was met."""
    idx = index(result)
    goals: list[dict[str, Any]] = []
    cases = sorted({k[:4] for k in idx})

    def add(goal: str, case: str, value: float | None, limit: float, lower: bool) -> None:
        if value is None:
            return
        met = value <= limit if lower else value >= limit
        goals.append({"goal": goal, "case": case, "value": value, "limit": limit, "met": met})

    def peers(key: tuple[str, str, int, int]) -> list[tuple[str, dict[str, Any]]]:
        return [(k[4], v) for k, v in idx.items() if k[:4] == key and v["kind"] == "peer"]

    for arch, fw, n, t in cases:
        case = f"{arch} {fw} N={n} T={t}"
        ours = idx.get((arch, fw, n, t, "multicam"))
        if ours is None:
            continue
        best = floor(idx, (arch, fw, n, t))
        if t == 1:
            add(
                "one target <= 1.3x the floor",
                case,
                ours["best"] / best if best else None,
                1.3,
                True,
            )
            forward = idx.get((arch, fw, n, t, "forward"))
            if forward and forward.get("peak_mb") and ours.get("peak_mb") is not None:
                add(
                    "peak memory <= 1.3x an inference forward (T=1)",
                    case,
                    ours["peak_mb"] / max(forward["peak_mb"], 1e-9),
                    1.3,
                    True,
                )
            for name, peer in peers((arch, fw, n, t)):
                add(
                    f"one target: >= 1.0x the speed of {name}",
                    case,
                    peer["best"] / ours["best"],
                    1.0,
                    False,
                )
        if arch in GAP_HEAD and t == 10:
            # One target timed in the same rounds if it was, else in its own case.
            one = idx.get((arch, fw, n, t, "multicam-T1")) or idx.get((arch, fw, n, 1, "multicam"))
            if one:
                add("GAP head: T=10 <= 1.5x T=1", case, ours["best"] / one["best"], 1.5, True)
            for name, peer in peers((arch, fw, n, t)):
                add(
                    f"GAP head: ten maps >= 5x faster than {name}",
                    case,
                    peer["best"] / ours["best"],
                    5.0,
                    False,
                )
    stage = result.get("numpy_stage")
    if stage:
        mine = stage["results"]["multicam-numpy"]["best_s"]
        if stage.get("forward"):
            fwd = stage["forward"]
            add(
                "NumPy stage <= 10% of the ResNet-50 forward (same N)",
                f"N={stage['n']} torch forward N={fwd['batch']}",
                mine / fwd["best_s"] * stage["n"] / fwd["batch"],
                0.10,
                True,
            )
        peer = stage["results"].get("pytorch-grad-cam-postprocess")
        if peer:
            add(
                "NumPy stage faster than pytorch-grad-cam's post-processing",
                f"N={stage['n']}",
                peer["best_s"] / mine,
                1.0,
                False,
            )
    for record in result.get("retraces", []):
        add(
            "no new traces when only the classes change",
            f"{record['arch']} {record['framework']} N={record['batch']} T={record['targets']}",
            float(record["traces_after"] - record["traces_before"]),
            0.0,
            True,
        )
    return goals
