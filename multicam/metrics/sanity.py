"""Sanity checks (Adebayo et al., 2018): do the maps depend on what the model learned?

Cascading model-parameter randomisation: the model's parameterised layers are randomised
one after another, from the output layer down, each on top of the previous ones, and the
method's maps on the randomised model are compared with the maps on the trained one. A
map that explains the model must change once the model is destroyed; a method whose maps
survive (stay rank-correlated with the original) shows the input, not the model, and is
flagged.

The convention:

- Layers: those that hold trainable parameters, in the order the model defines them
  (the backend's :meth:`~multicam.backends.BoundModel.parameter_layers`: torch
  ``named_modules``, Keras ``layers`` with nested models expanded, linen's ``params``
  tree, nnx attributes in assignment order), randomised last first, cumulatively; or the
  order given as ``layers=``.
- Randomisation, on a copy (the user's model is never modified): every trainable
  parameter tensor of a randomised layer is redrawn from a normal distribution with the
  tensor's own mean and standard deviation (its scale kept, its learned arrangement
  destroyed); a constant tensor (standard deviation 0) is kept. Buffers and statistics
  (BatchNorm's running mean and variance) are kept. The draw comes from
  ``numpy.random.default_rng([seed, position, crc32(name)])``, ``position`` the layer's
  place in the cascade (0 nearest the output) and ``name`` the parameter's canonical name
  (``kernel``, ``bias``, ``scale``), in the canonical layout (convolution kernels
  ``(*k, in, out)``, dense kernels ``(in, out)``): the same network gets the same random
  weights in torch, Keras, linen and nnx.
- Targets: the classes explained on the trained model (``targets=None``: its predicted
  class) are explained at every step.
- Similarity: Spearman's rank correlation (ties get their average rank) between the
  original and the randomised map of each sample and target, over all positions: of
  ``maps`` (ReLU'd, normalised; the default) or of the signed ``raw`` maps
  (``signed=True``). Where one of the two maps is constant (a blank map) the correlation
  is undefined and taken as 0; where both are, as 1.
- Flag: a method is flagged when the mean similarity with every layer randomised is at
  least ``threshold`` (default 0.5).
"""

from __future__ import annotations

import copy
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends import BoundModel
from ..errors import BackendError, LayerError, OptionError

__all__ = ["RandomizationResult", "randomization_test", "redraw", "spearman"]


@dataclass(frozen=True)
class RandomizationResult:
    """The similarity of the maps as the model is randomised, layer by layer.

    Shapes: L steps (randomised layers), N samples, T targets.

    Attributes:
        layers: ``(L,)`` the layer randomised at each step (on top of the earlier ones),
            nearest the output first.
        similarity: ``(L, N, T)`` Spearman's rank correlation between the original map and
            the map after each step; the last row has every layer randomised.
        targets: ``(N, T)`` the explained classes, or ``None`` for a callable target.
        threshold: the mean final similarity from which the method is flagged.
        method: the explainer's class name.
    """

    layers: tuple[str, ...]
    similarity: np.ndarray
    targets: np.ndarray | None
    threshold: float
    method: str

    @property
    def final(self) -> float:
        """The mean similarity with every layer randomised."""
        return float(self.similarity[-1].mean())

    @property
    def flagged(self) -> bool:
        """Whether the maps survive randomisation (mean final similarity >= threshold)."""
        return self.final >= self.threshold

    def __str__(self) -> str:
        lines = [f"randomisation test of {self.method}: mean Spearman similarity to the original"]
        for layer, row in zip(self.layers, self.similarity, strict=True):
            lines.append(f"  + {layer:<30} {row.mean():+.3f}")
        verdict = (
            f"FLAGGED: the maps survive randomisation (final {self.final:+.3f} >= "
            f"{self.threshold:g}): they show the input more than the model"
            if self.flagged
            else f"passes: the maps change as the model is randomised (final {self.final:+.3f})"
        )
        return "\n".join([*lines, "  " + verdict])


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of ``a`` and ``b`` along the last axis.

    Ties get their average rank (as ``scipy.stats.spearmanr``). Where one row is constant
    the correlation is undefined and returned as 0; where both are, as 1.

    Args:
        a: ``(..., P)``.
        b: ``(..., P)``, the same shape.

    Returns:
        ``(...)`` float64 in [-1, 1].

    Example:
        >>> float(spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])))
        0.8
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise OptionError(f"spearman needs equal shapes, got {a.shape} and {b.shape}.")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    na, nb = (ra**2).sum(-1), (rb**2).sum(-1)
    constant_a, constant_b = na <= 0, nb <= 0
    corr = (ra * rb).sum(-1) / np.sqrt(np.where(constant_a | constant_b, 1.0, na * nb))
    corr = np.where(constant_a | constant_b, 0.0, np.clip(corr, -1.0, 1.0))
    return np.where(constant_a & constant_b, 1.0, corr)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..P along the last axis, ties sharing their average rank."""
    count = values.shape[-1]
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    positions = np.broadcast_to(np.arange(count), values.shape)
    change = ordered[..., 1:] != ordered[..., :-1]
    true = np.ones((*values.shape[:-1], 1), bool)
    starts = np.concatenate([true, change], axis=-1)
    ends = np.concatenate([change, true], axis=-1)
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=-1)
    last = np.minimum.accumulate(np.where(ends, positions, count)[..., ::-1], axis=-1)[..., ::-1]
    ranks = np.empty(values.shape, np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=-1)
    return ranks


def redraw(seed: int, position: int, name: str, values: np.ndarray) -> np.ndarray:
    """One parameter tensor redrawn: normal with the tensor's mean and standard deviation.

    Args:
        seed: the test's seed.
        position: the layer's place in the cascade, 0 nearest the output.
        name: the parameter's canonical name (``kernel``, ``bias``, ``scale``, ...).
        values: the tensor, in the canonical layout.

    Returns:
        The new tensor, same shape and dtype; ``values`` itself when it is constant.
    """
    array = np.asarray(values)
    std = float(array.std(dtype=np.float64))
    if not std > 0:
        return array
    rng = np.random.default_rng([seed, position, zlib.crc32(name.encode())])
    mean = float(array.mean(dtype=np.float64))
    return rng.normal(mean, std, array.shape).astype(array.dtype)


def _with_bound(explainer: Any, bound: BoundModel) -> Any:
    """A shallow copy of ``explainer`` that explains ``bound`` instead."""
    clone = copy.copy(explainer)
    clone.bound = bound
    if isinstance(getattr(clone, "_call", None), threading.local):
        clone._call = threading.local()  # a perturbation method's per-call state
    return clone


def _compared(result: Any, signed: bool) -> np.ndarray:
    values = np.asarray(result.raw if signed else result.maps, np.float64)
    return values.reshape(*values.shape[:2], -1)


def randomization_test(
    explainer: Any,
    inputs: Any,
    targets: Any = None,
    *,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    threshold: float = 0.5,
    signed: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    **call: Any,
) -> RandomizationResult:
    """Cascading parameter randomisation; see the module docstring.

    Args:
        explainer: a multicam explainer (``GradCAM``, ``ScoreCAM``, ``GuidedBackprop``...).
        inputs: ``(N, ...)`` a batch in the backend's layout.
        targets: as for the explainer; fixed on the trained model for every step.
        layers: the layers to randomise, in order (default: every parameterised layer,
            the output layer first).
        seed: seeds the random parameters.
        threshold: the mean final similarity from which the method is flagged.
        signed: compare the signed ``raw`` maps instead of ``maps``.
        progress: called with (step, steps, layer) before each step.
        **call: options of the explainer's call (``relu=``, ``size=``, ...).

    Returns:
        A :class:`RandomizationResult`.

    Raises:
        BackendError: the backend cannot make a randomised copy of its model.
        LayerError: a name in ``layers`` holds no parameters.
    """
    bound = getattr(explainer, "bound", None)
    if not isinstance(bound, BoundModel):
        raise OptionError(
            f"randomization_test takes a multicam explainer with one model (e.g. "
            f"mc.GradCAM(model, layer)), got {type(explainer).__name__}."
        )
    for capability in ("parameter_layers", "randomized"):
        if getattr(type(bound), capability) is getattr(BoundModel, capability):
            raise BackendError(
                f"the {bound.backend!r} backend cannot make a randomised copy of its model "
                f"({capability}), which randomization_test needs."
            )
    available = tuple(bound.parameter_layers())
    cascade = tuple(reversed(available)) if layers is None else tuple(layers)
    unknown = [name for name in cascade if name not in available]
    if unknown or not cascade or len(set(cascade)) != len(cascade):
        raise LayerError(
            f"layers={list(cascade)!r}: expected distinct names of layers that hold "
            f"parameters, from: {list(available)}."
        )
    call.setdefault("warn", False)
    original = explainer(inputs, targets, **call)
    fixed = targets if original.targets is None else original.targets
    reference = _compared(original, signed)
    position = {name: i for i, name in enumerate(cascade)}

    def new_values(layer: str, name: str, values: np.ndarray) -> np.ndarray:
        return redraw(seed, position[layer], name, values)

    similarity = np.empty((len(cascade), *reference.shape[:2]), np.float64)
    for step in range(len(cascade)):
        if progress is not None:
            progress(step + 1, len(cascade), cascade[step])
        randomized = bound.randomized(cascade[: step + 1], new_values)
        result = _with_bound(explainer, randomized)(inputs, fixed, **call)
        similarity[step] = spearman(reference, _compared(result, signed))
    return RandomizationResult(
        layers=cascade,
        similarity=similarity,
        targets=original.targets,
        threshold=float(threshold),
        method=type(explainer).__name__,
    )
