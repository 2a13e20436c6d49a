"""Throughput and peak memory of ``explain_dataset``: the local engine against Ray.

``python -m benchmarks.dataset [--rows 4096] [--targets 1,10] [--workers 2] [--name dataset]``

Throughput: for each network and T, each engine explains all rows into a fresh store
(one target chunk of T). ``first write`` is the time to the first stored batch (building
the model; for Ray also starting the actors and the probe task); ``steady`` the images per
second from the first stored batch to the last; ``end to end`` all rows over the call.
The local engine runs torch on all cores in one process; Ray runs ``--workers`` actors
with one CPU (one torch thread) each. Both read the same ``.npy`` file (a memory map, read
by file reads).

Memory: each case in a fresh process, its peak resident set size (``VmHWM``): the same
run on ``rows`` and ``16 * rows`` images, and ResNet-50 with ``targets="all"`` (1000
classes) as one explainer call against ``explain_dataset`` with a 256 MB budget.

Results: ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

with contextlib.suppress(ImportError):
    import torch  # torch before TensorFlow

from multicam import dataset, demo, zoo

LAYERS = {"digits_cnn": "features.relu3", "resnet50": "layer4"}


def build(arch: str) -> Any:
    """The torch model: the demo's trained weights for the digits CNN, else seeded ones."""
    weights = demo.load()[0] if arch == "digits_cnn" else zoo.init_weights(arch, 0)
    return zoo.build(arch, "torch", weights)


def rows_of(arch: str, n: int) -> np.ndarray:
    """``(n, C, H, W)`` inputs: noisy shipped digits, or normal noise for ResNet-50."""
    rng = np.random.default_rng(0)
    if arch == "digits_cnn":
        images = demo.load()[1]
        x = np.concatenate([images] * (n // len(images) + 1))[:n]
        x = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    else:
        x = rng.normal(size=(n, *zoo._architecture(arch).input_shape)).astype(np.float32)
    return np.moveaxis(x, -1, 1).copy()


def timed_run(
    arch: str, source: Path, out: Path, engine: str, targets: Any, **options: Any
) -> dict[str, float]:
    """One call into a fresh store; its times, from the driver's store writes."""
    shutil.rmtree(out, ignore_errors=True)
    writes: list[tuple[float, int]] = []
    original = dataset._Store.write

    def write(store: Any, out: Any) -> tuple[int, int]:
        done = original(store, out)
        writes.append((time.perf_counter(), done[0]))
        return done

    dataset._Store.write = write  # type: ignore[method-assign]
    started = time.perf_counter()
    try:
        result = dataset.explain_dataset(
            functools.partial(build, arch),
            LAYERS[arch],
            source,
            out,
            targets=targets,
            engine=engine,
            progress=False,
            **options,
        )
    finally:
        dataset._Store.write = original  # type: ignore[method-assign]
    total = time.perf_counter() - started
    assert result.store.attrs["complete"], "incomplete store"
    # one target chunk: each write is one batch of rows with all its targets; the rows
    # written after the first write, over the time between the first and the last
    first, last = writes[0][0], writes[-1][0]
    later = sum(rows for _, rows in writes[1:])
    unit_rows = sum(rows for _, rows in writes) / len(writes)
    return {
        "total_s": total,
        "first_write_s": first - started,
        "steady_img_s": later / (last - first) if last > first else float("nan"),
        "write_s": result.write_seconds,
        "rows_per_write": unit_rows,
    }


def throughput(
    arch: str, rows: int, batch: int, targets: list[int], workers: int, folder: Path, log: Any
) -> list[dict[str, Any]]:
    source = folder / f"{arch}-{rows}.npy"
    np.save(source, rows_of(arch, rows))
    size = None if arch == "resnet50" else "input"  # 7x7 maps for ResNet-50
    records = []
    for t in targets:
        request: Any = None if t == 1 else np.tile(np.arange(t), (rows, 1))
        for engine in ("local", "ray"):
            extra = {"concurrency": workers} if engine == "ray" else {}
            times = timed_run(
                arch, source, folder / "f.zarr", engine, request, batch_size=batch,
                target_chunk=t, size=size, **extra,
            )  # fmt: skip
            record = {
                "arch": arch,
                "layer": LAYERS[arch],
                "targets": t,
                "engine": engine if engine == "local" else f"ray x{workers}",
                "rows": rows,
                "batch_size": batch,
                "first_write_s": round(times["first_write_s"], 2),
                "total_s": round(times["total_s"], 2),
                "end_to_end_img_s": round(rows / times["total_s"], 1),
                "steady_img_s": round(times["steady_img_s"], 1),
                "write_s": round(times["write_s"], 2),
                "store_mb": round(_size(folder / "f.zarr") / 1e6, 1),
            }
            records.append(record)
            log(json.dumps(record))
    return records


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


PEAK = r"""
import json, sys, time
import numpy as np
import torch
sys.path.insert(0, sys.argv[1])
from benchmarks.dataset import build, LAYERS
import multicam as mc
from multicam import dataset
arch, source, out, mode = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
started = time.perf_counter()
if mode == "one-call":  # the explainer on the whole input, as one call
    x = np.load(source)
    res = mc.GradCAM(build(arch), LAYERS[arch])(x, "all", size=None, warn=False)
    shape = list(res.maps.shape)
else:
    options = json.loads(mode)
    res = dataset.explain_dataset(build_partial := __import__("functools").partial(build, arch),
                                  LAYERS[arch], source, out, progress=False, **options)
    shape = list(res.maps.shape)
# VmHWM: the peak of this address space (ru_maxrss would keep the parent's across exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_mb": hwm / 1024,
                  "seconds": time.perf_counter() - started, "maps": shape}))
"""


def peak(arch: str, source: Path, out: Path, mode: str) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    run = subprocess.run(
        [sys.executable, "-c", PEAK, str(Path(__file__).parent.parent), arch, str(source),
         str(out), mode],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if run.returncode:
        raise RuntimeError(run.stderr[-3000:])
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def memory(rows: int, folder: Path, log: Any, resnet_images: int) -> list[dict[str, Any]]:
    records = []
    options = json.dumps({"targets": "all", "batch_size": 32, "dtype": "float32"})
    for n in (rows, 16 * rows):
        source = folder / f"mem-{n}.npy"
        np.save(source, rows_of("digits_cnn", n))
        measured = peak("digits_cnn", source, folder / "mem.zarr", options)
        record = {"case": f"digits_cnn T=10, {n} images, batch 32", **measured}
        records.append(record)
        log(json.dumps(record))
    if resnet_images:
        source = folder / "r50.npy"
        np.save(source, rows_of("resnet50", resnet_images))
        for label, mode in (
            (f"ResNet-50 targets='all', {resnet_images} images, one explainer call", "one-call"),
            (
                f"ResNet-50 targets='all', {resnet_images} images, explain_dataset batch 2, "
                "memory_budget 256 MB",
                json.dumps(
                    {"targets": "all", "batch_size": 2, "memory_budget": 256 * 2**20, "size": None}
                ),
            ),
        ):
            measured = peak("resnet50", source, folder / "r50.zarr", mode)
            record = {"case": label, **measured}
            records.append(record)
            log(json.dumps(record))
    return records


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# explain_dataset: local engine vs Ray",
        "",
        f"{result['machine']}. Command: `{result['command']}`.",
        "",
        "| network | T | engine | rows | first write s | total s | end to end img/s | "
        "steady img/s | driver write s | driver maps/s | store MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["throughput"]:
        maps_per_s = r["rows"] * r["targets"] / max(r["write_s"], 1e-9)
        lines.append(
            f"| {r['arch']} ({r['layer']}) | {r['targets']} | {r['engine']} | {r['rows']} | "
            f"{r['first_write_s']} | {r['total_s']} | {r['end_to_end_img_s']} | "
            f"{r['steady_img_s']} | {r['write_s']} | {maps_per_s:.0f} | {r['store_mb']} |"
        )
    lines += [
        "",
        "`first write`: time to the first stored batch (model built; for Ray, actors and the "
        "probe task started). `steady`: images per second from the first stored batch to the "
        "last. `driver write`: time the writer (this process) spent writing the store.",
        "",
        "| memory case | peak RSS MB | seconds | maps |",
        "|---|---|---|---|",
    ]
    for r in result["memory"]:
        lines.append(
            f"| {r['case']} | {r['peak_mb']:.0f} | {r['seconds']:.1f} | {tuple(r['maps'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="digits CNN images")
    parser.add_argument("--resnet-rows", type=int, default=64, help="ResNet-50 images (0: skip)")
    parser.add_argument("--targets", default="1,10")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-rows", type=int, default=256)
    parser.add_argument("--resnet-memory-images", type=int, default=2)
    parser.add_argument("--name", default="dataset")
    parser.add_argument("--quick", action="store_true", help="a tiny run, to try the script")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.resnet_rows, args.memory_rows, args.resnet_memory_images = 64, 0, 32, 0
    targets = [int(t) for t in args.targets.split(",")]

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    log = functools.partial(print, flush=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = throughput("digits_cnn", args.rows, 32, targets, args.workers, folder, log)
        if args.resnet_rows:
            records += throughput(
                "resnet50", args.resnet_rows, 8, targets, args.workers, folder, log
            )
        ray.shutdown()
        memory_records = memory(args.memory_rows, folder, log, args.resnet_memory_images)
    load = os.getloadavg()
    result = {
        "machine": (
            f"{started}: {os.cpu_count()} CPU cores, no "
            f"GPU, Python {platform.python_version()}, torch {torch.__version__}, ray "
            f"{ray.__version__}; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
            f"{load[2]:.1f} (1 / 5 / 15 min: other jobs shared the cores)"
        ),
        "command": "python -m benchmarks.dataset " + " ".join(argv or sys.argv[1:]),
        "throughput": records,
        "memory": memory_records,
    }
    out = Path(__file__).parent / "results"
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    log(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
