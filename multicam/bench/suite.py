"""The run: every network, framework, batch size N and number of targets T; the command.

For each case the framework's contenders (:mod:`.torch`, :mod:`.tensorflow`, :mod:`.jax`)
are timed side by side (:func:`~multicam.bench.timing.time_interleaved`), with, for T > 1,
multicam on the first target alone (``multicam-T1``), so that T targets over one target is
a ratio of the same rounds; then, where multicam compiles (TensorFlow, JAX), one more call
with other classes at the same shapes counts the traces it adds (it must add none).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import zoo
from .contenders import available_frameworks, make
from .goals import evaluate
from .nets import LAYERS, architecture, classes
from .report import text, write
from .stage import numpy_stage, torch_forward
from .timing import Timing, peak_memory_mb, time_interleaved

__all__ = ["BATCHES", "main", "run"]

_PACKAGES = (
    "numpy",
    "torch",
    "tensorflow",
    "keras",
    "jax",
    "jaxlib",
    "flax",
    "captum",
    "grad-cam",
    "torchcam",
    "tf-keras-vis",
    "torchvision",
    "opencv-python-headless",
    "opencv-python",
)
#: Default batch sizes per network (``batches=`` overrides them for every network).
BATCHES = {"gap64": (32,), "digits_cnn": (1, 8), "resnet50": (1, 8)}


def run(
    archs: Sequence[str] = ("gap64", "digits_cnn", "resnet50"),
    frameworks: Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    targets: Sequence[int] = (1, 10, 100),
    repeats: int = 5,
    peers: bool = True,
    peer_targets: int = 10,
    memory: bool = False,
    nojit_batches: Sequence[int] = (1,),
    torch_compile: Sequence[str] = ("gap64",),
    numpy_stage_n: int = 64,
    forward_n: int | None = 64,
    budget_s: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the suite; return everything measured as a JSON-ready dict.

    Args:
        archs: networks: ``"gap64"`` (issue 13's GAP net) or zoo architectures
            (``"digits_cnn"``, ``"resnet50"``).
        frameworks: subset of ``torch``, ``keras``, ``flax``; default all installed.
            ``flax`` also runs ``flax-nojit`` at the batch sizes in ``nojit_batches``.
        batches: batch sizes N for every network; default :data:`BATCHES` per network.
        targets: numbers of target classes per image T (capped at the model's classes).
        repeats: timed rounds after the warm-up; best and median are reported.
        peers: also time the peers that are importable.
        peer_targets: the largest T a peer is timed at (a peer needs T calls).
        memory: sample peak memory (one extra call per contender).
        nojit_batches: batch sizes at which JAX also runs without jit.
        torch_compile: networks on which torch's floor is also timed through
            ``torch.compile`` (minutes of compilation on a small CPU).
        numpy_stage_n: N of the NumPy-stage timing (K=2048, 7x7 -> 224x224); 0 skips it.
        forward_n: the ResNet-50 torch forward batch the NumPy stage is compared with;
            ``None`` skips it.
        budget_s: stop starting new cases after this many seconds.
        log: progress lines.
    """
    started = time.perf_counter()
    if frameworks is None:
        frameworks = available_frameworks()
    if "torch" in frameworks or importlib.util.find_spec("torch") is not None:
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401  (torch before TensorFlow)
    plan = list(frameworks)
    if "flax" in plan and nojit_batches:
        plan.append("flax-nojit")
    timings: list[Timing] = []
    skipped: dict[str, str] = {}
    retraces: list[dict[str, Any]] = []
    cut: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in archs:
            spec = architecture(arch)
            layer = LAYERS.get(arch, spec.cam_layers[-1])
            weights = zoo.init_weights(spec, seed=0)
            for framework in plan:
                options = {"compile_floor": arch in torch_compile} if framework == "torch" else {}
                contenders = make(framework, arch, weights, layer, **options)
                if framework == "flax-nojit":
                    fw_batches: Sequence[int] = nojit_batches
                else:
                    fw_batches = batches or BATCHES.get(arch, (1,))
                for n in fw_batches:
                    x = zoo.example_input(spec, n, seed=1)
                    for t in targets:
                        if t > spec.num_classes:
                            cut.append(f"{arch}: T={t} > {spec.num_classes} classes")
                            continue
                        if budget_s is not None and time.perf_counter() - started > budget_s:
                            cut.append(f"{arch} {framework} N={n} T={t}: over the time budget")
                            continue
                        ids = classes(n, t, spec.num_classes)
                        case = contenders.case(x, ids, peers and t <= peer_targets)
                        if t > 1:  # T targets over one target, timed in the same rounds
                            first = ids[:, :1].copy()
                            case["multicam-T1"] = (
                                "multicam-extra",
                                functools.partial(contenders.explain, x, first),
                            )
                        failed: dict[str, str] = {}
                        times, warmup = time_interleaved(
                            {name: fn for name, (_, fn) in case.items()}, repeats, failures=failed
                        )
                        for name in failed:
                            if case[name][0] not in ("peer", "floor-extra"):
                                raise RuntimeError(f"{framework} {name}: {failed[name]}")
                            skipped[f"{arch} {framework}:{name}"] = failed[name]
                            del case[name]
                        before = contenders.trace_count()
                        if before is not None:
                            contenders.explain(x, classes(n, t, spec.num_classes, shift=1))
                            retraces.append(
                                {
                                    "arch": arch,
                                    "framework": framework,
                                    "batch": n,
                                    "targets": t,
                                    "traces_before": before,
                                    "traces_after": contenders.trace_count(),
                                }
                            )
                        for name, (kind, fn) in case.items():
                            peak = peak_memory_mb(fn) if memory else None
                            timings.append(
                                Timing(
                                    arch,
                                    framework,
                                    n,
                                    t,
                                    name,
                                    kind,
                                    times[name],
                                    warmup[name],
                                    peak,
                                )
                            )
                        best = {name: min(ts) for name, ts in times.items()}
                        log(
                            f"{arch:<10} {framework:<10} N={n:<3} T={t:<3} "
                            + "  ".join(f"{k} {1e3 * v:.1f}ms" for k, v in best.items())
                        )
                skipped.update(
                    {f"{arch} {framework}:{k}": v for k, v in contenders.skipped.items()}
                )
                del contenders
        stage = None
        if numpy_stage_n:
            stage = numpy_stage(numpy_stage_n, 2048, (7, 7), (224, 224), max(repeats, 3))
            skipped.update(stage["skipped"])
            if forward_n and "torch" in frameworks:
                stage["forward"] = torch_forward(forward_n, max(1, min(repeats, 2)))
            log(
                f"numpy stage N={numpy_stage_n}: "
                + ", ".join(f"{k} {1e3 * r['best_s']:.1f}ms" for k, r in stage["results"].items())
            )
    if peers:
        for peer, module in [
            ("captum", "captum"),
            ("pytorch-grad-cam", "pytorch_grad_cam"),
            ("torchcam", "torchcam"),
            ("tf-keras-vis", "tf_keras_vis"),
        ]:
            if importlib.util.find_spec(module) is None and not any(
                k.endswith(peer) for k in skipped
            ):
                skipped[peer] = "not installed in this environment"
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": _machine(),
        "versions": _versions(),
        "settings": {
            "archs": list(archs),
            "layers": {a: LAYERS.get(a) for a in archs},
            "frameworks": plan,
            "batches": list(batches) if batches else {a: list(BATCHES.get(a, (1,))) for a in archs},
            "targets": list(targets),
            "repeats": repeats,
            "peer_targets": peer_targets,
            "nojit_batches": list(nojit_batches),
            "torch_compile": list(torch_compile),
            "warmup": "one call per contender and case before timing, excluded, reported",
            "timing": "interleaved rounds in shuffled order; best-of-N and median",
            "floors": "TensorFlow tf.function, JAX jax.jit, torch eager (torch.compile beside)",
            "memory": "peak RSS growth during one extra call, sampled every ~0.2 ms",
            "threads": {"torch": _torch_threads()},
        },
        "timings": [dict(dataclasses.asdict(t), best=t.best, median=t.median) for t in timings],
        "numpy_stage": stage,
        "retraces": retraces,
        "skipped": skipped,
        "cut": cut,
        "elapsed_s": time.perf_counter() - started,
    }
    result["goals"] = evaluate(result)
    return result


def _torch_threads() -> int | None:
    if "torch" not in sys.modules:
        return None
    return int(sys.modules["torch"].get_num_threads())


def _versions() -> dict[str, str]:
    found = {}
    for package in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    found["python"] = platform.python_version()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        found["multicam"] = importlib.metadata.version("multicam-xai")
    return found


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf")
        else None,
        "gpu": "none used (CPU builds)",
    }


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    """``multicam bench``: run the suite, print the table, write JSON, Markdown and a plot."""
    from . import __doc__ as description

    parser = argparse.ArgumentParser(
        prog="multicam bench",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--arch",
        default="gap64,digits_cnn,resnet50",
        help="comma-separated networks (default gap64,digits_cnn,resnet50)",
    )
    parser.add_argument("--frameworks", default=None, help="comma-separated: torch,keras,flax")
    parser.add_argument(
        "--batches",
        default="",
        help="batch sizes for every network (default per network: gap64 32, others 1,8)",
    )
    parser.add_argument(
        "--targets", default="1,10,100", help="targets per image (default 1,10,100)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--peer-targets", type=int, default=10, help="largest T for peers")
    parser.add_argument("--no-peers", action="store_true", help="skip the peers")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="sample peak RSS during a call (coarse; benchmarks/memory.py measures it properly)",
    )
    parser.add_argument("--nojit-batches", default="1", help="batches for JAX without jit")
    parser.add_argument(
        "--torch-compile", default="gap64", help="networks with a torch.compile floor"
    )
    parser.add_argument("--numpy-n", type=int, default=64, help="NumPy stage N (0 skips)")
    parser.add_argument(
        "--forward-n", type=int, default=64, help="forward N for the NumPy ratio (0 skips)"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds; later cases are cut")
    parser.add_argument("--quick", action="store_true", help="tiny: digits_cnn, N=1, T=1, 1 round")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--name", default="bench", help="output file stem")
    args = parser.parse_args(argv)
    frameworks = args.frameworks.split(",") if args.frameworks else available_frameworks()
    missing = [f for f in frameworks if f not in available_frameworks()]
    if missing:
        parser.error(f"not installed: {missing}; installed: {available_frameworks()}")
    if args.quick:
        options: dict[str, Any] = dict(
            archs=["digits_cnn"],
            batches=[1],
            targets=[1],
            repeats=1,
            peer_targets=1,
            memory=False,
            nojit_batches=[],
            torch_compile=[],
            numpy_stage_n=2,
            forward_n=None,
        )
    else:
        options = dict(
            archs=_names(args.arch),
            batches=_ints(args.batches) or None,
            targets=_ints(args.targets),
            repeats=args.repeats,
            peer_targets=args.peer_targets,
            memory=args.memory,
            nojit_batches=_ints(args.nojit_batches),
            torch_compile=_names(args.torch_compile),
            numpy_stage_n=args.numpy_n,
            forward_n=args.forward_n or None,
        )
    result = run(frameworks=frameworks, peers=not args.no_peers, budget_s=args.budget, **options)
    paths = write(result, Path(args.out), args.name)
    print()
    print(text(result), end="")
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
