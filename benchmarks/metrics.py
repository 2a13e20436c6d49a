"""Speed of the metrics: deletion against the forward passes it needs.

``python -m benchmarks.metrics [--frameworks torch,keras,flax,nnx] [--arch digits_cnn]``

Deletion with ``steps`` steps on N images and T = 1 target needs ``N x (steps + 1)``
forward passes, ``N x (steps + 1) / batch_size`` batches. The floor runs exactly those
batches, built beforehand (the very inputs deletion builds), through the backend's plain
forward (``BoundModel.outputs``); ``metrics.deletion`` builds them itself from the map's
ranking, runs them and reads the scores. The goal: deletion <= 1.2x the floor, judged on
the median CPU time (the cost; see below). Each round
times the two interleaved (in shuffled order), after one warm-up call of each (JAX compiles
there): wall-clock best and median, and the median CPU time of the process (all threads),
which a machine shared with other jobs disturbs far less than wall-clock time.

Quantus (and pytorch-grad-cam's metrics) need torchvision, which does not install beside
this environment's pinned torch; the comparison with Quantus's deletion on the same work
belongs to the peers environment and is not run here.

Writes ``benchmarks/results/metrics.json`` and ``metrics.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

with contextlib.suppress(ImportError):
    import torch  # noqa: F401  (torch before TensorFlow in one process)

import numpy as np

from multicam import metrics, zoo
from multicam.metrics import _common, curves

GOAL = 1.2


def _inputs(arch: str, framework: str, n: int) -> np.ndarray:
    x = zoo.example_input(arch, n, seed=1)
    if arch == "digits_cnn":  # the real digits, tiled: maps and scores of a trained model
        from multicam import demo

        images = demo.load()[1]
        x = np.concatenate([images] * (n // len(images) + 1))[:n]
    return np.moveaxis(x, -1, 1) if zoo.native_layout(framework) == "channels_first" else x


def _weights(arch: str) -> dict[str, np.ndarray]:
    if arch == "digits_cnn":
        from multicam import demo

        return demo.load()[0]
    return zoo.init_weights(arch)


def _prebuilt(
    cam: Any, x: np.ndarray, result: Any, steps: int, batch_size: int
) -> list[np.ndarray]:
    """The batches deletion runs, built the way it builds them (outside the timing)."""
    model = _common.Model.of(cam, batch_size, False, "bench")
    maps = _common.input_maps(result, x, model.layout, "bench")
    ranks = _common.descending_ranks(maps)
    spatial = _common.spatial_shape(x, model.layout)
    counts = (np.arange(steps + 1) * int(np.prod(spatial))) // steps
    base = curves.baseline_batch(0.0, x, model.layout)
    shape = (len(x), 1, steps + 1)
    batches = []
    for items in _common.chunks(int(np.prod(shape)), batch_size):
        sample, target, step = np.unravel_index(items, shape)
        chosen = _common.first_k(ranks[sample, target], counts[step], spatial)
        chosen = _common.broadcast_over_channels(chosen, x.ndim, model.layout)
        batches.append(np.where(chosen, base[sample], x[sample]))
    return batches


def run_case(
    arch: str, framework: str, n: int, steps: int, batch_size: int, repeats: int
) -> dict[str, Any]:
    layer = zoo.ARCHITECTURES[arch].cam_layers[-1]
    cam = zoo.explainer(arch, framework, layer, _weights(arch))
    x = _inputs(arch, framework, n)
    result = cam(x, warn=False)
    batches = _prebuilt(cam, x, result, steps, batch_size)

    def floor() -> None:
        for batch in batches:
            cam.bound.outputs(batch)

    def deletion() -> None:
        metrics.deletion(cam, x, result, steps, batch_size=batch_size)

    contenders = {"forward passes (floor)": floor, "metrics.deletion": deletion}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for call in contenders.values():
        call()  # warm-up: compilation, caches
    for _ in range(repeats):
        order = list(contenders)
        random.shuffle(order)
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    ratio = best["metrics.deletion"] / best["forward passes (floor)"]
    return {
        "arch": arch,
        "framework": framework,
        "images": n,
        "steps": steps,
        "batch_size": batch_size,
        "batches": len(batches),
        "forward_passes": n * (steps + 1),
        "best_s": best,
        "median_s": median,
        "ratio_best": ratio,
        "ratio_median": median["metrics.deletion"] / median["forward passes (floor)"],
        "cpu_median_s": cpu_median,
        "ratio_cpu": cpu_median["metrics.deletion"] / cpu_median["forward passes (floor)"],
        "goal": GOAL,
        "met": cpu_median["metrics.deletion"] / cpu_median["forward passes (floor)"] <= GOAL,
    }


def _load() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return " / ".join(f"{value:.1f}" for value in os.getloadavg())
    return "unknown"


def _markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Metrics benchmark: deletion vs the forward passes it needs",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {_load()}; goal: deletion <= {GOAL}x the "
        "floor (the same batches through `BoundModel.outputs`), judged on the median CPU time.",
        "",
        "| arch | framework | N | steps | batch | batches | floor ms (best / median) "
        "| deletion ms (best / median) | ratio best | ratio median | ratio CPU | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        floor, deletion = "forward passes (floor)", "metrics.deletion"
        lines.append(
            f"| {row['arch']} | {row['framework']} | {row['images']} | {row['steps']} | "
            f"{row['batch_size']} | {row['batches']} | "
            f"{1e3 * row['best_s'][floor]:.1f} / {1e3 * row['median_s'][floor]:.1f} | "
            f"{1e3 * row['best_s'][deletion]:.1f} / {1e3 * row['median_s'][deletion]:.1f} | "
            f"{row['ratio_best']:.3f} | {row['ratio_median']:.3f} | {row['ratio_cpu']:.3f} | "
            f"{'yes' if row['met'] else 'NO'} |"
        )
    lines += ["", "Quantus: not run (needs torchvision; see the module docstring)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.metrics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--frameworks", default=None, help="comma-separated (default: installed)")
    parser.add_argument(
        "--arch", default="digits_cnn,resnet_tiny", help="comma-separated zoo archs"
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--name", default="metrics", help="output file stem")
    args = parser.parse_args(argv)
    frameworks = args.frameworks.split(",") if args.frameworks else zoo.installed_frameworks()
    rows = []
    for arch in args.arch.split(","):
        for framework in frameworks:
            row = run_case(arch, framework, args.images, args.steps, args.batch_size, args.repeats)
            rows.append(row)
            floor, deletion = row["best_s"].values()
            print(
                f"{arch:<12} {framework:<6} floor {1e3 * floor:8.1f} ms"
                f"  deletion {1e3 * deletion:8.1f} ms"
                f"  ratio {row['ratio_best']:.3f} (median {row['ratio_median']:.3f},"
                f" CPU {row['ratio_cpu']:.3f})"
                f"  {'met' if row['met'] else 'MISSED'}",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.metrics " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (out / f"{args.name}.md").write_text(_markdown(rows, command.strip()), encoding="utf-8")
    print(f"wrote {out / args.name}.json and .md")
    return 0 if all(row["met"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
