"""ResNet-50 Grad-CAM on a GPU: multicam's native algebra against Captum, at 1 and 10 targets.

One command, prepared for a CUDA machine (issue 13, item 4)::

    python -m benchmarks.gpu_resnet50            # cuda, batch 64, 224x224, layer4

and a smoke test anywhere: ``python -m benchmarks.gpu_resnet50 --device cpu --batch 2``.

The network is the zoo's ResNet-50 (``multicam.zoo``, bottleneck blocks [3, 4, 6, 3],
25.6 M parameters, random weights), explained at ``layer4`` (7x7x2048); maps are resized to
224x224 on the device. Contenders, each timed per call with ``torch.cuda.synchronize()``
before and after, interleaved in shuffled rounds after warm-up calls:

- ``multicam-native``: ``GradCAM(model, "layer4", algebra="native")``, the default call
  (ReLU, bilinear resize to the input, per-map min-max normalisation, blank-map check):
  one forward, one batched backward for all T targets, the algebra on the GPU; the maps
  stay there as a tensor.
- ``multicam-numpy``: the default ``algebra="numpy"``: the gradients go to the host and
  the NumPy algebra runs on the CPU (what ``native`` saves).
- ``captum``: ``LayerGradCam(model, model.layer4).attribute(x, target, relu_attributions=
  True)`` + ``LayerAttribution.interpolate(..., (224, 224), "bilinear")`` on the device, one
  call per target (Captum takes one target per sample), maps concatenated.

Goals: ``multicam-native`` within 1.1x of Captum at T=1 and at least 5x faster at T=10
(best of the rounds). Before timing, the native maps (ReLU, resized, not normalised) are
compared with Captum's: their largest difference relative to the largest value is printed.

Robust by design: a contender that fails (out of memory, a missing package) is reported
with its error and dropped; the rounds stop when ``--budget`` seconds are spent (default
150 s; model building and warm-up come before). Prints device name, versions, every timing
and a JSON summary, and writes it to ``$OUT/gpu_resnet50.json`` when ``$OUT`` is set (or to
``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAYER = "layer4"
ARCH = "resnet50"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def _commit() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        return out.stdout.strip() or None
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and versions, printed first and written into the JSON."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "multicam_commit": _commit(),
    }
    for package in ("captum", "array_api_compat"):
        try:
            info[package] = __import__(package).__version__
        except Exception as exc:
            info[package] = f"not importable: {_error(exc)}"
    return info


def build_model(device: torch.device) -> torch.nn.Module:
    from multicam import zoo

    model = zoo.build(ARCH, "torch", zoo.init_weights(ARCH, seed=0))
    return model.to(device).eval()


def contenders(
    model: torch.nn.Module, x: torch.Tensor, classes: np.ndarray, size: int
) -> dict[str, Callable[[], Any]]:
    """``{name: call}`` for one target count; a contender that cannot be built is an error."""
    import multicam as mc

    found: dict[str, Callable[[], Any]] = {}
    native = mc.GradCAM(model, LAYER, algebra="native")
    reference = mc.GradCAM(model, LAYER)
    found["multicam-native"] = lambda: native(x, targets=classes).maps
    found["multicam-numpy"] = lambda: reference(x, targets=classes).maps

    from captum.attr import LayerAttribution, LayerGradCam

    gradcam = LayerGradCam(model, model.get_submodule(LAYER))
    columns = [torch.as_tensor(classes[:, t], device=x.device) for t in range(classes.shape[1])]

    def captum() -> torch.Tensor:
        maps = []
        for target in columns:  # Captum explains one target per sample and call
            attribution = gradcam.attribute(x, target=target, relu_attributions=True)
            maps.append(LayerAttribution.interpolate(attribution, (size, size), "bilinear"))
        return torch.cat(maps, 1)

    found["captum"] = captum
    return found


def agreement(
    model: torch.nn.Module, x: torch.Tensor, classes: np.ndarray, size: int
) -> dict[str, Any]:
    """The native maps (ReLU, resized, not normalised) against Captum's, and their type."""
    from captum.attr import LayerAttribution, LayerGradCam

    import multicam as mc

    res = mc.GradCAM(model, LAYER, algebra="native")(x, targets=classes, normalize=False)
    gradcam = LayerGradCam(model, model.get_submodule(LAYER))
    maps = []
    for t in range(classes.shape[1]):
        target = torch.as_tensor(classes[:, t], device=x.device)
        attribution = gradcam.attribute(x, target=target, relu_attributions=True)
        maps.append(LayerAttribution.interpolate(attribution, (size, size), "bilinear"))
    theirs = torch.cat(maps, 1)
    ours = res.maps
    scale = float(theirs.abs().max())
    return {
        "maps_type": f"{type(ours).__module__}.{type(ours).__name__}",
        "maps_device": str(getattr(ours, "device", "host")),
        "maps_shape": list(ours.shape),
        "max_abs_diff_relative": float((ours - theirs).abs().max()) / scale if scale else 0.0,
    }


def time_rounds(
    calls: dict[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    repeats: int,
    deadline: float,
    errors: dict[str, str],
) -> tuple[dict[str, list[float]], dict[str, float | None]]:
    """Warm up, record one call's peak memory, then time shuffled rounds until the deadline."""
    peaks: dict[str, float | None] = {}
    for name, call in list(calls.items()):
        try:
            for _ in range(warmup):
                call()
                _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                call()
                _sync(device)
                peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            else:
                peaks[name] = None
        except Exception as exc:
            errors[name] = _error(exc)
            traceback.print_exc()
            del calls[name]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    rng = random.Random(0)
    for _ in range(repeats):
        if time.perf_counter() > deadline and all(times[name] for name in order):
            break
        rng.shuffle(order)
        for name in list(order):
            try:
                _sync(device)
                start = time.perf_counter()
                out = calls[name]()
                _sync(device)
                times[name].append(time.perf_counter() - start)
                del out
            except Exception as exc:
                errors[name] = _error(exc)
                order.remove(name)
    return {name: ts for name, ts in times.items() if ts}, peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--targets", default="1,10", help="target counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds at most")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per contender")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the rounds")
    parser.add_argument("--json", default="", help="also write the summary here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    warnings.simplefilter("ignore")  # blank-map warnings on random weights, every round
    device = torch.device(args.device)
    summary: dict[str, Any] = {
        "benchmark": "gpu_resnet50",
        "settings": {
            "arch": ARCH,
            "layer": LAYER,
            "batch": args.batch,
            "size": args.size,
            "targets": args.targets,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "budget_s": args.budget,
            "timing": "per call, synchronised before and after, shuffled interleaved rounds",
        },
        "errors": {},
        "results": {},
    }
    status = 0
    try:
        summary["environment"] = environment(device)
        print("environment:", json.dumps(summary["environment"]), flush=True)
        model = build_model(device)
        generator = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
        counts = [int(t) for t in args.targets.split(",") if t]
        deadline = time.perf_counter() + args.budget
        for index, t in enumerate(counts):
            classes = (np.arange(args.batch)[:, None] * 37 + np.arange(t)[None, :] * 101) % 1000
            key = f"T={t}"
            errors: dict[str, str] = {}
            try:
                summary.setdefault("agreement", {})[key] = agreement(model, x, classes, args.size)
                print(f"{key:>5} agreement {summary['agreement'][key]}", flush=True)
            except Exception as exc:
                errors["agreement"] = _error(exc)
                traceback.print_exc()
            try:
                calls = contenders(model, x, classes, args.size)
            except Exception as exc:
                errors["setup"] = _error(exc)
                traceback.print_exc()
                calls = {}
            # Share what is left of the budget among the target counts still to run.
            share = (deadline - time.perf_counter()) / (len(counts) - index)
            times, peaks = time_rounds(
                calls,
                device,
                args.warmup,
                args.repeats,
                time.perf_counter() + max(share, 0.0),
                errors,
            )
            summary["errors"].update({f"{key} {name}": e for name, e in errors.items()})
            summary["results"][key] = {
                name: {
                    "best_s": min(ts),
                    "median_s": statistics.median(ts),
                    "rounds": len(ts),
                    "times_s": ts,
                    "peak_mb": peaks.get(name),
                }
                for name, ts in times.items()
            }
            for name, ts in times.items():
                print(
                    f"{key:>5} {name:<16} best {min(ts) * 1e3:9.2f} ms  median "
                    f"{statistics.median(ts) * 1e3:9.2f} ms  rounds {len(ts):2d}  all "
                    + " ".join(f"{s * 1e3:.2f}" for s in ts),
                    flush=True,
                )
            for name, error in errors.items():
                print(f"{key:>5} {name:<16} ERROR {error}", flush=True)
        summary["ratios"] = ratios(summary["results"])
    except Exception as exc:
        summary["errors"]["fatal"] = _error(exc)
        traceback.print_exc()
        status = 1
    summary["wall_s"] = time.perf_counter() - started
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    paths = [args.json] if args.json else []
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "gpu_resnet50.json"))
    for path in paths:
        Path(path).write_text(text)
    return status


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Captum's best time over multicam-native's, per T, and the goals."""
    found: dict[str, Any] = {}
    for key, by_name in results.items():
        native, captum = by_name.get("multicam-native"), by_name.get("captum")
        numpy_path = by_name.get("multicam-numpy")
        if native and captum:
            found[f"{key} captum/native"] = captum["best_s"] / native["best_s"]
        if native and numpy_path:
            found[f"{key} numpy/native"] = numpy_path["best_s"] / native["best_s"]
    one, ten = found.get("T=1 captum/native"), found.get("T=10 captum/native")
    if one is not None:
        found["goal T=1: native within 1.1x of captum"] = bool(1 / one <= 1.1)
    if ten is not None:
        found["goal T=10: native >= 5x faster than captum"] = bool(ten >= 5)
    return found


if __name__ == "__main__":
    sys.exit(main())
