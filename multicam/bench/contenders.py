"""What every framework's contenders share: the base class and the registry.

Each framework's module (:mod:`.torch`, :mod:`.tensorflow`, :mod:`.jax`) defines one
:class:`Contenders` subclass that builds the network, its two halves and multicam's
explainer once, and returns, per case, the named callables to time with their kind (see
:class:`~multicam.bench.timing.Timing`). Every floor hands back its activations and
gradients as NumPy arrays, as multicam does.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

from .nets import architecture, split

__all__ = ["Contenders", "available_frameworks", "backend_only", "make"]

#: Benchmark framework -> the packages it needs; ``flax-nojit`` is ``flax`` without jit.
NEEDS = {"torch": ("torch",), "keras": ("tensorflow", "keras"), "flax": ("jax", "flax")}
#: Benchmark framework -> the module of :mod:`multicam.bench` with its contenders.
MODULES = {"torch": "torch", "keras": "tensorflow", "flax": "jax", "flax-nojit": "jax"}

Case = dict[str, tuple[str, Callable[[], Any]]]
"""Contender name -> (kind, zero-argument callable)."""


class Contenders:
    """One framework's contenders on one network; subclasses fill in :meth:`case`."""

    name = ""

    def __init__(self, arch: str, weights: dict[str, np.ndarray], layer: str) -> None:
        self.arch = architecture(arch)
        self.weights = weights
        self.layer = layer
        self.features_arch, self.head_arch = split(self.arch, layer)
        #: contender -> why it was not timed (not importable, fails here).
        self.skipped: dict[str, str] = {}

    def case(self, x: np.ndarray, classes: np.ndarray, peers: bool) -> Case:
        """The contenders for one batch ``x`` (N, *S, C) and ``(N, T)`` ``classes``."""
        raise NotImplementedError

    def trace_count(self) -> int | None:
        """How many times multicam's explainer traced (compiled), or None if it never does."""
        return None

    def explain(self, x: np.ndarray, classes: np.ndarray) -> Any:
        """One multicam call (the no-retrace check calls it with other classes)."""
        raise NotImplementedError


def backend_only(explainer: Any, inputs: Any, classes: np.ndarray) -> Callable[[], Any]:
    """The backend alone, ``bound.gradients``: multicam without its NumPy stage.

    The ``multicam-backend`` contender: what the backend adds to the floor (input checks,
    the arrays' hand-back and their validation), apart from pooling, weighting, resizing
    and normalising the maps.
    """
    from ..targets import Targets

    targets = Targets.parse(classes, int(classes.shape[0]))
    return lambda: explainer.bound.gradients(inputs, targets)


def available_frameworks() -> list[str]:
    """Benchmark frameworks whose packages are installed (found without importing them)."""
    return [
        name
        for name, modules in NEEDS.items()
        if all(importlib.util.find_spec(m) is not None for m in modules)
    ]


def make(
    framework: str, arch: str, weights: dict[str, np.ndarray], layer: str, **options: Any
) -> Contenders:
    """The contenders of ``framework`` (``torch``, ``keras``, ``flax``, ``flax-nojit``).

    ``options`` go to the framework's class (torch: ``compile_floor``).
    """
    if framework not in MODULES:
        raise KeyError(f"unknown benchmark framework {framework!r}; known: {sorted(MODULES)}")
    module = importlib.import_module(f"{__package__}.{MODULES[framework]}")
    if framework.startswith("flax"):
        options["jit"] = framework == "flax"
    contenders: Contenders = module.CONTENDERS(arch, weights, layer, **options)
    return contenders
