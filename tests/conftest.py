"""Shared fixtures: one parametrised ``framework`` fixture over every way to build a model.

Locally a missing framework skips its tests. When ``MULTICAM_REQUIRE_BACKENDS`` names a
backend (nox and CI set it), a missing framework for it is an error instead, so a broken
install cannot pass as a run of skips.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

# torch must be imported before TensorFlow when a process uses both.
with contextlib.suppress(ImportError):
    import torch  # noqa: F401

import multicam as mc
from multicam import zoo

# CI runs the same examples every time: a failure there is reproducible, never flaky.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REQUIRED = {name for name in os.environ.get("MULTICAM_REQUIRE_BACKENDS", "").split(",") if name}

# zoo framework -> (multicam backend, modules it needs)
FRAMEWORKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("torch", ("torch",)),
    "keras": ("tensorflow", ("tensorflow", "keras")),
    "flax": ("jax", ("jax", "flax")),
    "nnx": ("jax", ("jax", "flax")),
}


@functools.cache
def missing(framework: str) -> str | None:
    """Why ``framework`` cannot run here, or None if it can."""
    for module in FRAMEWORKS[framework][1]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} is not importable ({exc})"
    return None


def require(framework: str) -> None:
    """Skip (or fail, if the environment requires it) when ``framework`` is missing."""
    reason = missing(framework)
    if reason is None:
        return
    if FRAMEWORKS[framework][0] in REQUIRED:
        pytest.fail(f"MULTICAM_REQUIRE_BACKENDS requires {framework}, but {reason}")
    pytest.skip(reason)


def available_frameworks() -> list[str]:
    """The frameworks that can run here; a required but missing one fails the caller."""
    for framework in FRAMEWORKS:
        if missing(framework) and FRAMEWORKS[framework][0] in REQUIRED:
            pytest.fail(f"MULTICAM_REQUIRE_BACKENDS requires {framework}: {missing(framework)}")
    return [framework for framework in FRAMEWORKS if not missing(framework)]


@pytest.fixture(params=list(FRAMEWORKS), ids=list(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> str:
    require(request.param)
    return request.param


def native_input(framework: str, inputs: np.ndarray) -> np.ndarray:
    """The channels-last batch in ``framework``'s own layout."""
    return np.moveaxis(inputs, -1, 1) if framework == "torch" else inputs


@functools.lru_cache(maxsize=64)
def _explainer(framework: str, arch: str, seed: int, layer: str) -> mc.GradCAM:
    return zoo.explainer(arch, framework, layer, zoo.init_weights(arch, seed))


def explain(
    framework: str, arch: str, seed: int, layer: str, inputs: np.ndarray, **call: Any
) -> mc.CAMResult:
    """Grad-CAM of zoo ``arch`` (weights from ``seed``) at canonical ``layer``.

    ``inputs`` is channels-last; explainers are cached so property tests stay fast.
    """
    return _explainer(framework, arch, seed, layer)(native_input(framework, inputs), **call)


@pytest.fixture(autouse=True)
def _seed_frameworks() -> None:
    """Seed every imported framework before each test.

    Randomly built models are then the same on every run, so no test depends on an unlucky
    initialisation. Imports nothing.
    """
    np.random.seed(0)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)
    if "keras" in sys.modules:
        sys.modules["keras"].utils.set_random_seed(0)
