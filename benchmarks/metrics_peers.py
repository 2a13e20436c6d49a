"""Speed of deletion against Quantus's PixelFlipping on the same work, in one process.

``/work/peers-venv/bin/python -m benchmarks.metrics_peers [--repeats 7]`` (the peers
environment: Quantus needs torchvision, see ``benchmarks/constraints-peers.txt``).

The work: a small torch CNN (fixed weights from ``default_rng(0)``), 64 single-channel
32x32 images, one Grad-CAM map each (computed once, outside the timing), deletion with 16
steps to a zero baseline, raw scores, batches of 64. multicam's ``metrics.deletion`` runs
``64 x 17`` inputs (step 0 included) in 17 batches; Quantus's ``PixelFlipping``
(``features_in_step = P / 16``, ``perturb_baseline=0.0``, ``normalise=False``,
``softmax=False``) runs 16 batches of 64 (it omits the unperturbed input). Both curves are
checked equal on steps 1..16 before timing. Each round times the two in shuffled order,
after one warm-up call of each; reported: wall-clock best and median, and the median CPU
time of the process (all threads).

Writes ``benchmarks/results/metrics-peers.json`` and ``metrics-peers.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

import multicam as mc
from multicam import metrics

N, SIZE, STEPS, BATCH = 64, 32, 16, 64


def small_cnn() -> torch.nn.Module:
    nn = torch.nn
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(32, 10),
        )
    )
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.from_numpy(rng.normal(0, 0.3, tuple(param.shape))))
    return model.float().eval()


def _load() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    import quantus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/metrics-peers")
    args = parser.parse_args(argv)

    model = small_cnn()
    x = np.random.default_rng(1).uniform(0, 1, (N, 1, SIZE, SIZE)).astype(np.float32)
    cam = mc.GradCAM(model, "relu2")
    result = cam(x)
    targets = np.asarray(result.targets)[:, 0]
    a_batch = np.asarray(result.maps, np.float32)
    pixel_flipping = quantus.PixelFlipping(
        features_in_step=SIZE * SIZE // STEPS,
        perturb_baseline=0.0,
        normalise=False,
        abs=False,
        disable_warnings=True,
        display_progressbar=False,
    )

    def ours() -> np.ndarray:
        return metrics.deletion(cam, x, result, steps=STEPS, batch_size=BATCH).scores[:, 0]

    def theirs() -> np.ndarray:
        return np.asarray(
            pixel_flipping(
                model=model,
                x_batch=x,
                y_batch=targets,
                a_batch=a_batch,
                softmax=False,
                device="cpu",
                channel_first=True,
                batch_size=BATCH,
            )
        )

    mine, peer = ours(), theirs()  # warm-up, and the same work
    max_diff = float(np.abs(mine[:, 1:] - peer).max())
    # Ties in the map (zeros after the ReLU) are ordered differently (Quantus's argsort is
    # not stable), which can change single points; report the difference, not hide it.
    calls = {"multicam": ours, "quantus": theirs}
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.repeats):
        order = list(calls)
        random.shuffle(order)
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            calls[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    rows = [
        {
            "impl": name,
            "wall_best_ms": 1e3 * min(wall[name]),
            "wall_median_ms": 1e3 * statistics.median(wall[name]),
            "cpu_median_ms": 1e3 * statistics.median(cpu[name]),
        }
        for name in calls
    ]
    ratio = rows[1]["wall_best_ms"] / rows[0]["wall_best_ms"]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python "
        f"{platform.python_version()}, torch {torch.__version__} (threads "
        f"{torch.get_num_threads()}), quantus {quantus.__version__}, numpy {np.__version__}, "
        f"load average {_load()}"
    )
    command = "python -m benchmarks.metrics_peers " + " ".join(argv or sys.argv[1:])
    data = {
        "command": command.strip(),
        "machine": machine,
        "work": {"images": N, "size": [1, SIZE, SIZE], "steps": STEPS, "batch_size": BATCH},
        "repeats": args.repeats,
        "max_abs_curve_difference": max_diff,
        "quantus_over_multicam_wall_best": ratio,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# Deletion: multicam vs Quantus PixelFlipping on the same work",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {machine}.",
        "",
        f"Work: {N} images 1x{SIZE}x{SIZE}, small torch CNN, {STEPS} steps to a zero "
        f"baseline, raw scores, batch {BATCH}; multicam runs 17 batches (step 0 included), "
        f"Quantus 16. Interleaved, shuffled, best of {args.repeats} after a warm-up. "
        f"Max |curve difference| on steps 1..16: {max_diff:.3g}.",
        "",
        "| impl | wall best ms | wall median ms | CPU median ms |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['impl']} | {r['wall_best_ms']:.1f} | {r['wall_median_ms']:.1f} | "
            f"{r['cpu_median_ms']:.1f} |"
            for r in rows
        ),
        "",
        f"Quantus / multicam (wall best): {ratio:.2f}x.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
