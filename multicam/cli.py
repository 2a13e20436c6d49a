"""The ``multicam`` command line.

``multicam compare`` builds the reference networks in every installed framework with the
same weights, computes Grad-CAM for every class on each, and prints how closely the
backends agree with the exact NumPy oracle and with each other, and how long each took.
It exits non-zero when any pair disagrees beyond the tolerances of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import zoo
from .cam import CAMResult, GradCAM
from .testing import MAPS_ATOL, RAW_RTOL, assert_results_agree, check_against_oracle

_NEEDS = {
    "torch": ("torch",),
    "keras": ("tensorflow", "keras"),
    "flax": ("flax",),
    "nnx": ("flax",),
}


def installed_frameworks() -> list[str]:
    """Zoo frameworks whose packages are installed (found without importing them)."""
    return [
        name
        for name, modules in _NEEDS.items()
        if all(importlib.util.find_spec(module) is not None for module in modules)
    ]


def _explainer(framework: str, arch: str, weights: dict[str, np.ndarray], layer: str) -> GradCAM:
    model = zoo.build(arch, framework, weights)
    options: dict[str, Any] = {}
    if framework == "flax":
        model, options["variables"] = model
    return GradCAM(model, zoo.layer_name(layer, framework), **options)


def _timed(explainer: GradCAM, inputs: np.ndarray, repeats: int) -> tuple[CAMResult, float]:
    result = explainer(inputs, targets="all")  # warm-up: tracing, compilation, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = explainer(inputs, targets="all")
        best = min(best, time.perf_counter() - start)
    return result, best


def compare(
    archs: Sequence[str], frameworks: Sequence[str], batch: int, seed: int, repeats: int
) -> bool:
    """Print the agreement and timing tables; return whether everything agreed."""
    if "torch" in frameworks:
        import torch  # noqa: F401  (torch must be imported before TensorFlow)
    print(f"frameworks: {', '.join(frameworks)}; batch {batch}, weight seed {seed}, all classes")
    print(f"tolerances: raw maps {RAW_RTOL:g} relative, normalised maps {MAPS_ATOL:g} absolute")
    ok = True
    for arch in archs:
        spec = zoo.ARCHITECTURES[arch]
        layer = spec.cam_layers[-1]
        weights = zoo.init_weights(arch, seed)
        inputs = zoo.example_input(arch, batch, seed=seed)
        print(f"\n{arch} ({spec.description}); layer {layer!r}")
        print(f"  {'framework':<10}{'backend':<12}{'ms / batch':>12}{'oracle err':>14}")
        results: dict[str, CAMResult] = {}
        for framework in frameworks:
            native = np.moveaxis(inputs, -1, 1) if framework == "torch" else inputs
            result, seconds = _timed(_explainer(framework, arch, weights, layer), native, repeats)
            errors = check_against_oracle(result, arch, weights, inputs, layer, rtol=1.0)
            results[framework] = result
            print(
                f"  {framework:<10}{result.backend:<12}{1e3 * seconds:>12.2f}"
                f"{max(errors.values()):>14.2e}"
            )
        for (name_a, a), (name_b, b) in itertools.combinations(results.items(), 2):
            try:
                (agreement,) = assert_results_agree({name_a: a, name_b: b})
                verdict = f"raw {agreement.raw:.1e}, maps {agreement.maps:.1e}: agree"
            except AssertionError as exc:
                ok, verdict = False, f"DISAGREE: {exc}"
            print(f"  {name_a} ~ {name_b}: {verdict}")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``multicam`` console script."""
    parser = argparse.ArgumentParser(
        prog="multicam", description="Grad-CAM with one API for PyTorch, Keras and Flax."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cmp = commands.add_parser(
        "compare",
        help="the same reference networks in every installed framework: agreement and speed",
        description=__doc__,
    )
    cmp.add_argument("--arch", choices=[*zoo.ARCHITECTURES, "all"], default="all")
    cmp.add_argument(
        "--frameworks", default=None, help=f"comma-separated subset of {', '.join(_NEEDS)}"
    )
    cmp.add_argument("--batch", type=int, default=4, help="samples per batch (default 4)")
    cmp.add_argument("--seed", type=int, default=0, help="weights and input seed")
    cmp.add_argument("--repeats", type=int, default=3, help="timed repeats, best is shown")
    args = parser.parse_args(argv)

    available = installed_frameworks()
    frameworks = args.frameworks.split(",") if args.frameworks else available
    unknown = [f for f in frameworks if f not in _NEEDS]
    if unknown:
        parser.error(f"unknown frameworks {unknown}; choose from {', '.join(_NEEDS)}")
    absent = [f for f in frameworks if f not in available]
    if absent:
        parser.error(
            f"not installed: {', '.join(absent)}; install with pip install 'multicam[all]'"
        )
    if not frameworks:
        parser.error("no framework is installed; pip install 'multicam[all]'")
    archs = list(zoo.ARCHITECTURES) if args.arch == "all" else [args.arch]
    return 0 if compare(archs, frameworks, args.batch, args.seed, args.repeats) else 1


if __name__ == "__main__":
    sys.exit(main())
