"""What every metric shares: the model's scores of perturbed inputs, in chunks, and ranks.

Framework-free: perturbed inputs are built in NumPy and handed to the backend's forward
capability (:meth:`~multicam.backends.BoundModel.outputs`); the scores are read off its
NumPy outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends import BoundModel
from ..errors import BackendError, InputError, OptionError, TargetError
from ..perturbation import _as_numpy as as_array
from ..perturbation import _check_batch_size as check_batch_size

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Model",
    "as_array",
    "check_batch_size",
    "descending_ranks",
    "input_maps",
    "maps_of",
    "softmax",
]

#: Perturbed inputs in one forward pass when neither the call nor the explainer says.
DEFAULT_BATCH_SIZE = 64


def softmax(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """A float64 softmax, shifted by the maximum so that it never overflows."""
    shifted = values.astype(np.float64) - values.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def maps_of(result: Any) -> np.ndarray:
    """``(N, T, *S)`` float64 maps of a result (anything with ``.maps``) or an array."""
    maps = np.asarray(getattr(result, "maps", result), dtype=np.float64)
    if maps.ndim < 3:
        raise InputError(
            f"maps of shape {maps.shape}: expected (N, T, *spatial), e.g. a result's .maps."
        )
    if not np.isfinite(maps).all():
        raise InputError("the maps hold NaN or Inf; pass finite maps.")
    return maps


@dataclass(frozen=True)
class Model:
    """An explainer's model as the metrics use it: a forward pass and its target scores.

    Attributes:
        bound: the explainer's :class:`~multicam.backends.BoundModel`.
        output: which of several outputs is explained (the explainer's ``output=``).
        batch_size: perturbed inputs per forward pass.
        softmax: read probabilities (a softmax over the outputs' class axis) instead of the
            raw outputs.
    """

    bound: BoundModel
    output: int | str | None
    batch_size: int
    softmax: bool

    @classmethod
    def of(cls, explainer: Any, batch_size: int | None, softmax: bool, metric: str) -> Model:
        """The model of ``explainer`` (a multicam explainer, or a ``BoundModel``)."""
        if isinstance(explainer, BoundModel):
            bound, output = explainer, None
        else:
            inner = getattr(explainer, "explainers", None)  # MultiLayerCAM
            source = inner[0] if inner else explainer
            found = getattr(source, "bound", None)
            output = getattr(source, "output", None)
            if not isinstance(found, BoundModel):
                raise OptionError(
                    f"{metric} takes a multicam explainer (e.g. mc.GradCAM(model, layer)), "
                    f"got {type(explainer).__name__}."
                )
            bound = found
            if batch_size is None:
                batch_size = getattr(source, "batch_size", None)
        if type(bound).outputs is BoundModel.outputs:
            raise BackendError(
                f"the {bound.backend!r} backend has no plain forward pass (outputs), which "
                f"{metric} needs to score perturbed inputs."
            )
        if not isinstance(softmax, bool | np.bool_):
            raise OptionError(f"softmax={softmax!r}: expected True or False.")
        size = DEFAULT_BATCH_SIZE if batch_size is None else check_batch_size(batch_size)
        return cls(bound, output, size, bool(softmax))

    @property
    def layout(self) -> str:
        """Where the channel axis of the model's inputs is."""
        return self.bound.layout

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """``(M, C)`` float64 outputs (probabilities with ``softmax``) of one chunk."""
        if self.output is None:
            outputs = self.bound.outputs(inputs)
        else:
            outputs = self.bound.outputs(inputs, self.output)
        outputs = np.asarray(outputs)
        if outputs.ndim != 2 or outputs.shape[0] != inputs.shape[0]:
            raise TargetError(
                f"the metrics read class scores off (N, C) outputs, but the model returned "
                f"shape {outputs.shape} for {inputs.shape[0]} inputs."
            )
        return softmax(outputs, 1) if self.softmax else outputs.astype(np.float64)

    def plain_scores(self, inputs: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``(N, T)`` the scores of ``classes`` on the unperturbed inputs, in chunks."""
        rows = [self.forward(inputs[items]) for items in chunks(len(inputs), self.batch_size)]
        outputs = np.concatenate(rows)
        if classes.min() < 0 or classes.max() >= outputs.shape[1]:
            raise TargetError(
                f"class ids {sorted(set(classes.ravel().tolist()))[:10]} do not fit the "
                f"model's {outputs.shape[1]} outputs."
            )
        return np.take_along_axis(outputs, classes, axis=1)

    def scores(
        self,
        count: int,
        build: Callable[[np.ndarray], np.ndarray],
        classes: Callable[[np.ndarray], np.ndarray],
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """``(count,)`` target scores of ``count`` perturbed inputs, ``batch_size`` at a time.

        Args:
            count: how many perturbed inputs there are.
            build: item ids ``(M,)`` -> their perturbed inputs ``(M, ...)``.
            classes: item ids ``(M,)`` -> the class id to read for each.
            progress: called with (done, count) after every chunk.
        """
        scores = np.empty(count, np.float64)
        for items in chunks(count, self.batch_size):
            outputs = self.forward(build(items))
            wanted = classes(items)
            if wanted.min() < 0 or wanted.max() >= outputs.shape[1]:
                raise TargetError(
                    f"class ids {sorted(set(wanted.tolist()))[:10]} do not fit the model's "
                    f"{outputs.shape[1]} outputs."
                )
            scores[items] = outputs[np.arange(len(items)), wanted]
            if progress is not None:
                progress(int(items[-1]) + 1, count)
        return scores


def chunks(count: int, size: int) -> Iterator[np.ndarray]:
    """Item ids ``0 .. count-1`` in consecutive chunks of at most ``size``."""
    for start in range(0, count, size):
        yield np.arange(start, min(start + size, count))


def class_targets(result: Any, metric: str) -> np.ndarray:
    """``(N, T)`` int64 class ids of a result; :class:`TargetError` for score functions."""
    targets = getattr(result, "targets", None)
    if targets is None:
        raise TargetError(
            f"{metric} reads class scores off the model's outputs, so it needs a result "
            "explained for class ids (None, an int, N ints, an (N, T) array or 'all'), not "
            "a callable or region target."
        )
    return np.asarray(targets, dtype=np.int64)


def spatial_shape(inputs: np.ndarray, layout: str) -> tuple[int, ...]:
    """The spatial dims of a batch in ``layout``."""
    return tuple(inputs.shape[2:] if layout == "channels_first" else inputs.shape[1:-1])


def channel_axis(inputs: np.ndarray, layout: str) -> int:
    """Where the channel axis of a batch in ``layout`` is."""
    return 1 if layout == "channels_first" else inputs.ndim - 1


def input_maps(result: Any, inputs: np.ndarray, layout: str, metric: str) -> np.ndarray:
    """``(N, T, *S)`` float64 maps of ``result``, checked against the input's size."""
    maps = maps_of(result)
    if inputs.ndim < 3:
        raise InputError(
            f"{metric} perturbs the input where the maps point, so the input needs spatial "
            f"dims; got shape {inputs.shape}."
        )
    spatial = spatial_shape(inputs, layout)
    if maps.shape[0] != inputs.shape[0] or maps.shape[2:] != spatial:
        raise InputError(
            f"{metric}: the maps have shape {maps.shape} but the input batch has {inputs.shape[0]}"
            f" samples of spatial size {spatial}; explain with size='input' (the default) on "
            "the same batch."
        )
    return maps


def descending_ranks(maps: np.ndarray) -> np.ndarray:
    """``(N, T, P)`` where each position stands in the order of its map, most relevant first.

    The order is a stable argsort of ``-map`` over the flattened spatial positions (C
    order): ties go to the lower flat index. ``rank < k`` selects the first ``k``.
    """
    flat = maps.reshape(*maps.shape[:2], -1)
    order = np.argsort(-flat, axis=-1, kind="stable")
    return inverse_permutation(order)


def ascending_ranks(maps: np.ndarray) -> np.ndarray:
    """As :func:`descending_ranks`, least relevant first (a stable argsort of ``map``)."""
    flat = maps.reshape(*maps.shape[:2], -1)
    return inverse_permutation(np.argsort(flat, axis=-1, kind="stable"))


def inverse_permutation(order: np.ndarray) -> np.ndarray:
    """The inverse of every permutation along the last axis."""
    ranks = np.empty_like(order)
    positions = np.broadcast_to(np.arange(order.shape[-1]), order.shape)
    np.put_along_axis(ranks, order, positions, axis=-1)
    return ranks


def first_k(ranks: np.ndarray, counts: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    """``(M, *S)`` bool: the first ``counts[m]`` positions of each ranking ``ranks[m]``."""
    return (ranks < counts[:, None]).reshape(len(counts), *spatial)


def broadcast_over_channels(mask: np.ndarray, ndim: int, layout: str) -> np.ndarray:
    """A spatial ``(M, *S)`` array with a unit channel axis where ``layout`` puts it."""
    return np.expand_dims(mask, 1 if layout == "channels_first" else ndim - 1)


def trapezoid(curves: np.ndarray, steps: int) -> np.ndarray:
    """The trapezoid rule over ``i / steps``, ``i = 0 .. steps``, along the last axis."""
    inner = curves[..., 1:-1].sum(axis=-1)
    return (0.5 * (curves[..., 0] + curves[..., -1]) + inner) / steps


def percent_counts(percentiles: np.ndarray, positions: int) -> np.ndarray:
    """How many positions ``p`` percent of ``positions`` is: ``floor(p * P / 100)``."""
    return np.array([math.floor(p * positions / 100 + 1e-9) for p in percentiles], np.int64)
