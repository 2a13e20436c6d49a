"""Deletion and insertion (Petsiuk et al., RISE, 2018): the score as pixels go or come.

The convention, fixed so that independent implementations agree exactly:

- Order: the positions of the input's spatial grid (flattened in C order, ``P`` of them)
  are ranked by ``result.maps`` (at the input's size), most relevant first; ties go to the
  lower flat index (a stable argsort of ``-map``).
- Step ``i = 0 .. steps``: the first ``(i * P) // steps`` ranked positions, every channel,
  take the baseline's values (deletion), or are revealed from the input on the baseline
  image (insertion). Step 0 of deletion is the input itself; its last step is the baseline.
- Score: the target's score as the explainer defines it, the same number as
  ``result.scores`` (the raw output, e.g. a logit), or with ``softmax=True`` its softmax
  probability over the output's class axis. One column per target of the result.
- AUC: the trapezoid rule over ``x = i / steps``:
  ``(s_0 / 2 + s_1 + ... + s_{steps-1} + s_steps / 2) / steps``.
- Baselines: a constant (default ``0.0``), ``"blur"`` (:func:`blur` with sigma 5 pixels,
  RISE's insertion start), or an array of the input's shape (or one sample's).

Every perturbed copy of every image goes through the model in chunks of ``batch_size``
(``N x T x (steps + 1)`` inputs); the result does not depend on ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, OptionError
from ._common import (
    Model,
    as_array,
    broadcast_over_channels,
    class_targets,
    descending_ranks,
    first_k,
    input_maps,
    spatial_shape,
    trapezoid,
)

__all__ = ["BLUR_SIGMA", "CurveResult", "blur", "deletion", "insertion"]

#: The Gaussian's standard deviation of ``baseline="blur"``, in pixels (RISE's insertion).
BLUR_SIGMA = 5.0

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CurveResult:
    """A deletion or insertion curve per map.

    Shapes: N samples, T targets, ``steps + 1`` points.

    Attributes:
        kind: ``"deletion"`` or ``"insertion"``.
        fractions: ``(steps + 1,)`` the x axis, ``i / steps``.
        scores: ``(N, T, steps + 1)`` float64 the target's score at each step.
        auc: ``(N, T)`` the area under each curve (trapezoid over ``fractions``).
        targets: ``(N, T)`` the class ids that were scored.
        counts: ``(steps + 1,)`` how many positions were deleted or inserted at each step,
            ``(i * P) // steps``.
        softmax: whether the scores are softmax probabilities.
    """

    kind: str
    fractions: np.ndarray
    scores: np.ndarray
    auc: np.ndarray
    targets: np.ndarray
    counts: np.ndarray
    softmax: bool

    @property
    def mean_auc(self) -> float:
        """The AUC averaged over samples and targets."""
        return float(self.auc.mean())

    @property
    def mean_curve(self) -> np.ndarray:
        """``(steps + 1,)`` the curve averaged over samples and targets."""
        return self.scores.reshape(-1, self.scores.shape[-1]).mean(axis=0)


def deletion(
    explainer: Any,
    inputs: Any,
    result: Any,
    steps: int = 16,
    baseline: float | str | np.ndarray = 0.0,
    batch_size: int | None = None,
    *,
    softmax: bool = False,
    progress: Progress | None = None,
) -> CurveResult:
    """Deletion: the target's score as the most relevant pixels are removed first.

    A faithful map makes the score fall fast: lower AUC is better. See the module
    docstring for the exact convention.

    Args:
        explainer: the explainer that made ``result`` (its model runs the perturbed inputs),
            or any multicam explainer of the same model.
        inputs: ``(N, ...)`` the batch that was explained, in the backend's layout.
        result: its result: ``maps`` ``(N, T, *S)`` at the input's size, class ``targets``.
        steps: how many steps from nothing deleted to everything deleted.
        baseline: what deleted pixels become: a constant, ``"blur"``, or an array of the
            input's shape (or one sample's shape).
        batch_size: perturbed inputs per forward pass (default: the explainer's
            ``batch_size`` if it has one, else 64).
        softmax: score softmax probabilities instead of the raw outputs.
        progress: called with (done, total) perturbed inputs after every chunk.

    Returns:
        A :class:`CurveResult`.

    Example:
        >>> cam = mc.GradCAM(model, "features.relu4")  # doctest: +SKIP
        >>> res = cam(x, targets=None)  # doctest: +SKIP
        >>> metrics.deletion(cam, x, res).auc.shape  # (N, T)  # doctest: +SKIP
    """
    return _curve(
        "deletion", explainer, inputs, result, steps, baseline, batch_size, softmax, progress
    )


def insertion(
    explainer: Any,
    inputs: Any,
    result: Any,
    steps: int = 16,
    baseline: float | str | np.ndarray = 0.0,
    batch_size: int | None = None,
    *,
    softmax: bool = False,
    progress: Progress | None = None,
) -> CurveResult:
    """Insertion: the score as the most relevant pixels are revealed first on the baseline.

    A faithful map makes the score rise fast: higher AUC is better. RISE starts from a
    blurred copy (``baseline="blur"``). Arguments as for :func:`deletion`.
    """
    return _curve(
        "insertion", explainer, inputs, result, steps, baseline, batch_size, softmax, progress
    )


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool | np.bool_) or not isinstance(steps, int | np.integer) or steps < 1:
        raise OptionError(f"steps={steps!r}: expected a positive int.")
    return int(steps)


def _curve(
    kind: str,
    explainer: Any,
    inputs: Any,
    result: Any,
    steps: int,
    baseline: float | str | np.ndarray,
    batch_size: int | None,
    softmax: bool,
    progress: Progress | None,
) -> CurveResult:
    steps = _check_steps(steps)
    model = Model.of(explainer, batch_size, softmax, kind)
    x = as_array(inputs)
    classes = class_targets(result, kind)
    maps = input_maps(result, x, model.layout, kind)
    base = baseline_batch(baseline, x, model.layout)
    n, t = classes.shape
    spatial = spatial_shape(x, model.layout)
    positions = int(np.prod(spatial))
    ranks = descending_ranks(maps)  # (N, T, P)
    counts = (np.arange(steps + 1) * positions) // steps
    shape = (n, t, steps + 1)
    # Deletion takes the baseline where a position is among the first k; insertion the input.
    first, rest = (base, x) if kind == "deletion" else (x, base)

    def build(items: np.ndarray) -> np.ndarray:
        sample, target, step = np.unravel_index(items, shape)
        chosen = first_k(ranks[sample, target], counts[step], spatial)
        chosen = broadcast_over_channels(chosen, x.ndim, model.layout)
        return np.where(chosen, first[sample], rest[sample])

    def wanted(items: np.ndarray) -> np.ndarray:
        sample, target, _ = np.unravel_index(items, shape)
        return classes[sample, target]

    scores = model.scores(n * t * (steps + 1), build, wanted, progress).reshape(shape)
    return CurveResult(
        kind=kind,
        fractions=np.arange(steps + 1) / steps,
        scores=scores,
        auc=trapezoid(scores, steps),
        targets=classes,
        counts=counts,
        softmax=model.softmax,
    )


def baseline_batch(baseline: float | str | np.ndarray, x: np.ndarray, layout: str) -> np.ndarray:
    """The baseline as an array of ``x``'s shape and dtype."""
    if isinstance(baseline, str):
        if baseline != "blur":
            raise OptionError(
                f"baseline={baseline!r}: expected a number, 'blur' or an array of the "
                "input's shape."
            )
        return blur(x, BLUR_SIGMA, layout).astype(x.dtype)
    if isinstance(baseline, bool | np.bool_):
        raise OptionError(f"baseline={baseline!r}: expected a number, 'blur' or an array.")
    array = np.asarray(baseline, dtype=x.dtype)
    if array.ndim == 0:
        if not np.isfinite(array):
            raise OptionError(f"baseline={baseline!r}: expected a finite number.")
        return np.full_like(x, array)
    if array.shape not in (x.shape, x.shape[1:]):
        raise InputError(
            f"a baseline array of shape {array.shape} does not fit the input {x.shape}: "
            "pass the input's shape or one sample's."
        )
    if not np.isfinite(array).all():
        raise InputError("the baseline holds NaN or Inf.")
    return np.ascontiguousarray(np.broadcast_to(array, x.shape))


def blur(inputs: Any, sigma: float = BLUR_SIGMA, layout: str = "channels_first") -> np.ndarray:
    """A Gaussian blur of every spatial axis, normalised at the borders.

    Each output pixel is the Gaussian-weighted mean (standard deviation ``sigma`` pixels,
    truncated at ``3 sigma``) of the input pixels that exist: near a border the weights of
    the pixels inside are renormalised, so the image is neither darkened (zero padding)
    nor mirrored. Channels are blurred separately.

    Args:
        inputs: ``(N, C, *S)`` (``layout="channels_first"``) or ``(N, *S, C)``.
        sigma: the Gaussian's standard deviation in pixels; 0 returns a copy.
        layout: where the channel axis is.

    Returns:
        A float64 array of the input's shape.
    """
    x = np.asarray(as_array(inputs), np.float64)
    if not np.isfinite(sigma) or sigma < 0:
        raise OptionError(f"sigma={sigma!r}: expected a number >= 0.")
    if layout not in ("channels_first", "channels_last"):
        raise OptionError(f"layout={layout!r}: expected 'channels_first' or 'channels_last'.")
    if x.ndim < 3:
        raise InputError(f"blur needs (N, C, *spatial) or (N, *spatial, C), got {x.shape}.")
    if sigma == 0:
        return x.copy()
    axes = range(2, x.ndim) if layout == "channels_first" else range(1, x.ndim - 1)
    for axis in axes:
        x = np.moveaxis(
            np.tensordot(x, _blur_matrix(x.shape[axis], sigma), ([axis], [1])), -1, axis
        )
    return x


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """``(size, size)``: row ``i`` holds the normalised Gaussian weights around ``i``."""
    radius = int(np.ceil(3 * sigma))
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    weights = np.where(np.abs(offsets) <= radius, np.exp(-0.5 * (offsets / sigma) ** 2), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)
