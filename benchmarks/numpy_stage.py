"""The NumPy stage at many maps: ten targets against one, on every backend.

The network of issue 13: conv -> conv -> conv -> global average pool -> dense, batch 32,
64x64x3 input, the layer ``features.relu3`` at 16x16 with 64 channels, 10 classes. For
each backend (torch, Keras, Flax linen) it times, interleaved in shuffled rounds:

- ``full``: the whole call ``GradCAM(model, layer)(x, targets=...)`` (default options:
  ReLU, resize to 64x64, normalise, blank-map check) at T = 1 and T = 10;
- ``stage``: the same call with the backend replaced by a replay of the arrays it handed
  back (native layout, NumPy), so only multicam's NumPy work is timed: the checks of
  ``make_layer_gradients``, the layout guess, pooling, weighted sum, ReLU, resize,
  normalise, the blank-map check.

Goal: ``full`` at T = 10 at most 1.5x ``full`` at T = 1 on every backend.

``--compare NAME`` also times the same contenders with another copy of multicam imported
as ``NAME`` (e.g. the last commit, to measure a change), interleaved with this one. The
copy's dotted module strings (the backend registry, the zoo's builders) must name it::

    mkdir -p /tmp/old && git archive HEAD multicam | tar -x -C /tmp/old
    mv /tmp/old/multicam /tmp/old/multicam_old
    sed -i 's/"multicam\\.backends\\./"multicam_old.backends./' \\
        /tmp/old/multicam_old/backends/__init__.py
    sed -i 's/f"multicam\\.zoo\\./f"multicam_old.zoo./' /tmp/old/multicam_old/zoo/__init__.py
    PYTHONPATH=/tmp/old python -m benchmarks.numpy_stage --compare multicam_old

Run: ``python -m benchmarks.numpy_stage [--frameworks torch,keras,flax] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import platform
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

with contextlib.suppress(ImportError):
    import torch  # noqa: F401  (torch before TensorFlow in one process)

import numpy as np

from multicam.bench.timing import time_interleaved

BATCH = 32
CLASSES = 10
LAYER = "features.relu3"


class _Replay:
    """A bound model that hands back recorded arrays: times multicam's NumPy work only."""

    def __init__(self, bound: Any, pkg: ModuleType, x: Any, targets: Any) -> None:
        from_backend = bound.gradients(x, targets)
        self._make = importlib.import_module(f"{pkg.__name__}.backends.base").make_layer_gradients
        self.layout = bound.layout
        self.layer_name = bound.layer_name
        self.backend = bound.backend
        activations, gradients = from_backend.activations, from_backend.gradients
        if self.layout == "channels_last":  # as the framework returned them
            activations = np.moveaxis(activations, 1, -1)
            gradients = np.moveaxis(gradients, 2, -1)
        self._arrays = (np.ascontiguousarray(activations), np.ascontiguousarray(gradients))
        self._rest = from_backend
        self._input_shape = tuple(np.shape(x))

    def batch_size(self, inputs: Any) -> int:
        return int(np.shape(inputs)[0])

    def gradients(self, inputs: Any, targets: Any) -> Any:
        return self._make(
            *self._arrays,
            self._rest.scores,
            self._rest.targets,
            layout=self.layout,
            input_shape=self._input_shape,
            layer_name=self.layer_name,
            outputs=self._rest.outputs,
        )


def contenders(
    pkg: ModuleType, frameworks: list[str], tag: str = ""
) -> dict[str, Callable[[], Any]]:
    """``{name: call}`` for each framework, T in (1, 10), full call and NumPy stage."""
    zoo = importlib.import_module(f"{pkg.__name__}.zoo")
    targets_mod = importlib.import_module(f"{pkg.__name__}.targets")
    arch = importlib.import_module(f"{pkg.__name__}.bench.nets").gap64()  # issue 13's net
    weights = zoo.init_weights(arch, seed=0)
    found: dict[str, Callable[[], Any]] = {}
    for framework in frameworks:
        explainer = zoo.explainer(arch, framework, LAYER, weights)
        x = zoo.example_input(arch, BATCH, seed=1, layout=zoo.native_layout(framework))
        for t in (1, 10):
            classes = (np.arange(BATCH)[:, None] + np.arange(t)[None, :]) % CLASSES
            replay = copy.copy(explainer)
            replay.bound = _Replay(
                explainer.bound, pkg, x, targets_mod.Targets.parse(classes, BATCH)
            )
            found[f"{framework} T={t} full{tag}"] = _call(explainer, x, classes)
            found[f"{framework} T={t} stage{tag}"] = _call(replay, x, classes)
    return found


def _call(explainer: Any, x: Any, classes: np.ndarray) -> Callable[[], Any]:
    def call() -> Any:
        return explainer(x, targets=classes)

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default="torch,keras,flax")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compare", default="", help="another multicam copy's import name")
    parser.add_argument("--json", default="", help="write the timings here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # blank-map warnings on random weights: not timed twice
    frameworks = [f for f in args.frameworks.split(",") if f]
    import multicam

    calls = contenders(multicam, frameworks)
    if args.compare:
        calls.update(contenders(importlib.import_module(args.compare), frameworks, " (old)"))
    for call in calls.values():  # a second warm-up (the suite's timer does one)
        call()
    times, _ = time_interleaved(calls, args.repeats)
    best = {name: min(ts) for name, ts in times.items()}
    print(
        f"NumPy stage at many maps: batch {BATCH}, 64x64 -> {LAYER} 16x16x64, "
        f"best of {args.repeats} interleaved rounds, ms; {platform.node()}, "
        f"{os.cpu_count()} CPUs, numpy {np.__version__}"
    )
    tags = ["", " (old)"] if args.compare else [""]
    print(f"{'framework':<10}{'':>7}{'T=1':>9}{'T=10':>9}{'T10/T1':>8}")
    for framework in frameworks:
        for tag in tags:
            for kind in ("full", "stage"):
                one = best[f"{framework} T=1 {kind}{tag}"] * 1e3
                ten = best[f"{framework} T=10 {kind}{tag}"] * 1e3
                label = f"{kind}{tag}"
                print(f"{framework:<10}{label:>7}{one:9.2f}{ten:9.2f}{ten / one:8.2f}")
    if args.compare:
        print("new / old (best):")
        for name in (n for n in best if not n.endswith(" (old)")):
            print(f"  {name:<22}{best[name] / best[name + ' (old)']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"best_s": best, "times_s": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
