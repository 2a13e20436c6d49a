"""Conformance checks: does a backend explain the reference networks correctly?

Two kinds of evidence, both framework-free:

- :func:`check_against_oracle` compares one result with the float64 NumPy reference of
  :mod:`multicam.zoo.numpy`: activations and scores exactly (to float32 round-off), and the
  gradients by central finite differences along a random direction (on ``gap_cnn`` also
  against the closed form ``W[k, c] / (h w)``), either side of a ReLU kink accepted only
  for units within float32 round-off of it (:func:`relu_kinks`).
- :func:`assert_results_agree` compares results from several backends pairwise and names
  the pair that disagrees.

:func:`check_backend` runs both over every reference architecture and layer; a third-party
backend passes it to prove it agrees with the built-in ones::

    from multicam.testing import check_backend
    check_backend(my_build, backend=MyBackend(), framework_layer_name=my_names)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import zoo
from .backends import Backend
from .cam import CAMResult, GradCAM
from .zoo import numpy as zoo_numpy

__all__ = [
    "Agreement",
    "agreement_report",
    "assert_results_agree",
    "check_against_oracle",
    "check_backend",
    "informative",
    "relu_kinks",
]

RAW_RTOL = 1e-4
MAPS_ATOL = 1e-4


@dataclass(frozen=True)
class Agreement:
    """Largest differences seen between two results.

    Attributes:
        pair: the two results' names.
        raw: max |raw_a - raw_b| relative to the largest |raw| of the same map.
        maps: max |maps_a - maps_b| over informative maps (see :func:`informative`).
    """

    pair: tuple[str, str]
    raw: float
    maps: float


def informative(result: CAMResult, floor: float = 1e-2) -> np.ndarray:
    """``(N, T)`` mask of maps whose normalised values are numerically meaningful.

    Min-max normalisation divides by the map's range; when the ReLU leaves only a sliver
    of positive values (range below ``floor`` times the largest |raw|), that division
    magnifies float32 round-off into O(1) differences. Such maps are compared raw only.
    """
    spatial = tuple(range(2, result.raw.ndim))
    scale = np.abs(result.raw).max(axis=spatial)
    shown = np.maximum(result.raw, 0) if result.maps.min() >= 0 else result.raw
    span = shown.max(axis=spatial) - shown.min(axis=spatial)
    return span > floor * np.maximum(scale, np.finfo(np.float32).tiny)


def _agreement(name_a: str, a: CAMResult, name_b: str, b: CAMResult) -> Agreement:
    spatial = tuple(range(2, a.raw.ndim))
    scale = np.maximum(np.abs(a.raw).max(axis=spatial, keepdims=True), 1e-12)
    raw = float((np.abs(a.raw - b.raw) / scale).max())
    mask = informative(a) & informative(b)
    maps = float(np.abs(a.maps - b.maps)[mask].max()) if mask.any() else 0.0
    return Agreement((name_a, name_b), raw, maps)


def assert_results_agree(
    results: Mapping[str, CAMResult], *, raw_rtol: float = RAW_RTOL, maps_atol: float = MAPS_ATOL
) -> list[Agreement]:
    """Check every pair of results; raise ``AssertionError`` naming the first that differs.

    Args:
        results: ``{name: result}`` for the same model, weights, input and targets.
        raw_rtol: tolerance on raw maps, relative to each map's largest |value|.
        maps_atol: tolerance on normalised maps (informative maps only).

    Returns:
        The :class:`Agreement` of every pair, for reporting.
    """
    agreements = []
    for (name_a, a), (name_b, b) in itertools.combinations(results.items(), 2):
        if a.maps.shape != b.maps.shape:
            raise AssertionError(f"{name_a} vs {name_b}: maps {a.maps.shape} vs {b.maps.shape}")
        if a.targets is not None and b.targets is not None:
            np.testing.assert_array_equal(
                a.targets, b.targets, err_msg=f"{name_a} vs {name_b}: different targets"
            )
        agreement = _agreement(name_a, a, name_b, b)
        if agreement.raw > raw_rtol or agreement.maps > maps_atol:
            raise AssertionError(
                f"{name_a} and {name_b} disagree: raw maps differ by {agreement.raw:.3g} "
                f"(relative, tolerance {raw_rtol:g}), normalised maps by {agreement.maps:.3g} "
                f"(tolerance {maps_atol:g}) on layer {a.layer!r}"
            )
        agreements.append(agreement)
    return agreements


def agreement_report(results: Mapping[str, CAMResult]) -> tuple[bool, list[str]]:
    """Compare every pair of results, for printing.

    Returns:
        Whether all pairs agree (:func:`assert_results_agree`'s tolerances), and one line
        per pair: ``"a ~ b: raw 1.0e-06, maps 2.0e-06: agree"`` or ``"a ~ b: DISAGREE: ..."``.
    """
    ok, lines = True, []
    for (name_a, a), (name_b, b) in itertools.combinations(results.items(), 2):
        try:
            (agreement,) = assert_results_agree({name_a: a, name_b: b})
            verdict = f"raw {agreement.raw:.1e}, maps {agreement.maps:.1e}: agree"
        except AssertionError as exc:
            ok, verdict = False, f"DISAGREE: {exc}"
        lines.append(f"{name_a} ~ {name_b}: {verdict}")
    return ok, lines


def check_against_oracle(
    result: CAMResult,
    arch: str,
    weights: dict[str, np.ndarray],
    inputs: np.ndarray,
    layer: str,
    *,
    rtol: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Compare a result with the float64 NumPy reference network.

    Args:
        result: a Grad-CAM result for ``arch`` with ``weights`` on ``inputs``.
        arch: a :data:`multicam.zoo.ARCHITECTURES` name.
        weights: the weights the model was built with.
        inputs: the channels-last input batch ``(N, *S, C)``.
        layer: the canonical (dotted) layer name.
        rtol: tolerance relative to each quantity's scale; finite differences get 10x.
        seed: for the random finite-difference direction.

    The gradients may take either side of a kink at the ReLU units :func:`relu_kinks`
    finds (float32 round-off decides the side); everywhere else they must match the oracle.

    Returns:
        The relative errors seen: ``activations``, ``scores``, ``gradients``.

    Raises:
        AssertionError: naming the quantity that disagrees and by how much.
    """
    logits, outputs = zoo_numpy.forward(arch, weights, inputs)
    expected_activations = np.moveaxis(outputs[layer], -1, 1)
    errors = {"activations": _relative(result.activations, expected_activations)}
    if result.targets is None:
        raise ValueError("the oracle needs class targets, not a callable")
    expected_scores = np.take_along_axis(logits, result.targets, axis=1)
    errors["scores"] = _relative(result.scores, expected_scores)

    # Central differences of every target score along one random direction V. A step that
    # straddles a ReLU kink gives a wrong quotient, so three steps are tried and each
    # (sample, target) keeps its closest; float64 keeps even the smallest step accurate.
    rng = np.random.default_rng(seed)
    layer_output = outputs[layer]
    direction = rng.normal(size=layer_output.shape)
    direction_cf = np.moveaxis(direction, -1, 1)  # (N, K, *S)
    targets = result.targets
    n, t = targets.shape
    analytic = (result.gradients.reshape(n, t, -1) * direction_cf.reshape(n, 1, -1)).sum(-1)
    scale = max(float(np.abs(layer_output).max()), 1.0)

    def misses(gates: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Closest |analytic - finite| per (sample, target) over three steps; last quotient."""
        found, finite = [], np.zeros(0)
        for step in (1e-6 * scale, 1e-8 * scale, 1e-10 * scale):
            up, _ = zoo_numpy.forward(
                arch, weights, inputs, {layer: layer_output + step * direction}, gates=gates
            )
            down, _ = zoo_numpy.forward(
                arch, weights, inputs, {layer: layer_output - step * direction}, gates=gates
            )
            finite = np.take_along_axis((up - down) / (2 * step), targets, axis=1)
            found.append(np.abs(analytic - finite))
        return np.min(found, axis=0), finite

    miss, finite = misses()
    gradient_scale = max(np.abs(finite).max(), 1e-12)
    if miss.max() / gradient_scale > 10 * rtol:
        # A float32 backend may put a ReLU unit whose pre-activation is within round-off of
        # 0 on either side of its kink (see relu_kinks): both gradients are right, so the
        # other side's is accepted too, for those units only.
        for gates in _kink_alternatives(arch, weights, inputs, layer):
            miss = np.minimum(miss, misses(gates)[0])
    errors["gradients"] = float(miss.max() / gradient_scale)
    if arch == "gap_cnn" and layer == "features.relu2":
        exact = zoo_numpy.gap_cnn_gradients(weights, result.targets, result.raw.shape[2:])
        errors["gradients"] = max(errors["gradients"], _relative(result.gradients, exact))
    for quantity, error in errors.items():
        limit = 10 * rtol if quantity == "gradients" else rtol
        if error > limit:
            raise AssertionError(
                f"{result.backend} backend vs NumPy oracle on {arch} layer {layer!r}: "
                f"{quantity} differ by {error:.3g} (relative, tolerance {limit:g})"
            )
    return errors


KINK_RTOL = 1e-5
"""A ReLU unit is at a kink when its float64 pre-activation is within this of 0, relative to
the largest |pre-activation| of its layer in the same sample (float32 round-off is ~1e-7)."""

MAX_KINKS = 6
"""At most this many kink units per sample (the closest to 0) get their other side tried."""


def relu_kinks(
    arch: str,
    weights: dict[str, np.ndarray],
    inputs: np.ndarray,
    layer: str,
    rtol: float = KINK_RTOL,
) -> list[tuple[str, tuple[int, ...], float]]:
    """ReLU units after ``layer`` whose float64 pre-activation is within round-off of 0.

    A float32 backend may put such a unit on either side of its kink (e.g. 1.1442058 -
    1.1442053 is 0.0 in TensorFlow, 3.6e-7 in torch), opening or closing its gate: both
    gradients are right, so backends may disagree there. Each unit is ``(relu_name,
    (sample, *position, channel), pre_activation)``, the ReLU of a residual block named
    after the block; closest to 0 (relative to its layer's largest |pre-activation| in the
    same sample) first.
    """
    pre: dict[str, np.ndarray] = {}
    _, outputs = zoo_numpy.forward(arch, weights, inputs, pre_relu=pre)
    order = list(outputs)
    after = set(order[order.index(layer) + 1 :])
    found: list[tuple[float, str, tuple[int, ...], float]] = []
    for name, values in pre.items():
        if name not in after:
            continue
        for sample, sample_values in enumerate(values):
            bound = rtol * max(float(np.abs(sample_values).max()), 1e-300)
            for unit in zip(*np.nonzero(np.abs(sample_values) <= bound), strict=True):
                value = float(sample_values[unit])
                found.append((abs(value) / bound, name, (sample, *map(int, unit)), value))
    return [(name, unit, value) for _, name, unit, value in sorted(found)]


def _kink_alternatives(
    arch: str, weights: dict[str, np.ndarray], inputs: np.ndarray, layer: str
) -> list[dict[str, np.ndarray]]:
    """Oracle ``gates`` putting the :func:`relu_kinks` on their other side.

    Every combination of flips, per sample of the :data:`MAX_KINKS` closest to 0 at most.
    """
    per_sample: list[list[tuple[str, tuple[int, ...], float]]] = [[] for _ in inputs]
    for name, unit, value in relu_kinks(arch, weights, inputs, layer):
        if len(per_sample[unit[0]]) < MAX_KINKS:
            per_sample[unit[0]].append((name, unit, value))
    if not any(per_sample):
        return []
    _, outputs = zoo_numpy.forward(arch, weights, inputs)
    alternatives = []
    for flips in range(1, 2 ** max(map(len, per_sample))):
        gates: dict[str, np.ndarray] = {}
        for units in per_sample:
            for bit, (name, unit, value) in enumerate(units):
                if flips >> bit & 1:
                    gate = gates.setdefault(name, np.full(outputs[name].shape, np.nan))
                    gate[unit] = 0.0 if value > 0 else 1.0  # the oracle's other side
        alternatives.append(gates)
    return alternatives


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / scale)


def check_backend(
    build: Callable[[str, dict[str, np.ndarray]], Any],
    *,
    backend: str | Backend | None = None,
    layer_name: Callable[[str], Any] = lambda name: name,
    layout: str = "channels_last",
    architectures: Iterable[str] = tuple(zoo.ARCHITECTURES),
    seeds: Iterable[int] = (0, 1),
    bind_options: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Prove a backend right on every reference network and layer.

    Args:
        build: ``build(arch_name, weights) -> model`` in the backend's framework, built
            from :mod:`multicam.zoo` specs (see ``multicam/zoo/torch.py`` for an example).
        backend: the backend (name or instance); default: detected from the model.
        layer_name: the framework's name for a canonical dotted layer name.
        layout: the backend's input layout, ``"channels_last"`` or ``"channels_first"``.
        architectures: which reference networks to run.
        seeds: weight and input seeds.
        bind_options: ``model -> options`` for the explainer (e.g. Flax ``variables``).

    Returns:
        The largest relative error seen per quantity.
    """
    worst: dict[str, float] = {}
    for arch, seed in itertools.product(architectures, seeds):
        weights = zoo.init_weights(arch, seed)
        inputs = zoo.example_input(arch, batch_size=2, seed=seed)
        native = np.moveaxis(inputs, -1, 1) if layout == "channels_first" else inputs
        model = build(arch, weights)
        options = bind_options(model) if bind_options else {}
        for layer in zoo.ARCHITECTURES[arch].cam_layers:
            explainer = GradCAM(model, layer_name(layer), backend=backend, **options)
            result = explainer(native, targets="all", size=None)
            for quantity, error in check_against_oracle(
                result, arch, weights, inputs, layer, seed=seed
            ).items():
                worst[quantity] = max(worst.get(quantity, 0.0), error)
    return worst
