"""ROAD (Rong et al., 2022): remove and debias, with noisy linear imputation.

Removing pixels by setting them to a constant leaks the removed shape to the model (the
model sees the mask, not the missing evidence). ROAD fills removed pixels from their
neighbours instead, so that the mask itself carries little information, and scores the
model on the filled image.

The convention:

- Order: as deletion (:mod:`multicam.metrics.curves`): MoRF (most relevant first) ranks
  the positions by a stable argsort of ``-map``, LeRF (least relevant first) by a stable
  argsort of ``map``; ties go to the lower flat index in both.
- At percentile ``p`` the first ``floor(p * P / 100)`` positions of the order are removed
  (every channel).
- Imputation (noisy linear): every removed pixel becomes the weighted mean of its 8
  neighbours inside the image, weights 1/6 (edge neighbours) and 1/12 (diagonal ones),
  neighbours that are themselves removed included, so all removed pixels of a channel are
  the solution of one sparse linear system; then Gaussian noise of standard deviation
  ``noise`` (absolute, default 0.01) is added to each removed pixel and channel. The
  system is solved by conjugate gradients in float64 (relative residual below 1e-9). The
  noise comes from ``numpy.random.default_rng([seed, n, t, k, order])`` for sample ``n``,
  target ``t``, percentile ``k`` and order 0 (MoRF) or 1 (LeRF), so the result does not
  depend on ``batch_size`` or on the framework.
- Score: as deletion (raw output, or ``softmax=True`` probabilities).
- Summary: ``combined = mean over percentiles of (LeRF - MoRF) / 2``: large when removing
  the most relevant pixels hurts and removing the least relevant ones does not.

Compared with pytorch-grad-cam's ``ROADMostRelevantFirst(percentile=q)`` /
``ROADLeastRelevantFirst`` / ``ROADCombined`` (MIT, from the ROAD authors' code):

- its ``percentile=q`` thresholds the map at ``np.percentile(map, q)`` and keeps the
  pixels strictly below the threshold, so it removes ``100 - q`` percent: its MoRF at
  ``q`` is this MoRF at ``p = 100 - q``; the lists 10..90 are the same set.
- Count: with distinct map values its threshold removes ``1 + floor(p (P - 1) / 100)``
  pixels; this removes ``floor(p P / 100)``. The two agree when ``p P`` is a multiple of
  100 (e.g. a 10x10 or 20x20 image with p = 10, 20, ..., 90).
- Ties: its threshold removes every pixel tied at the threshold, so a map with many equal
  values (zeros after the ReLU) removes more or fewer than p percent (a blank map
  removes all or nothing); here ties are broken by position and the count is exact.
- Its metrics return ``score after - score before`` per image; ``combined`` here equals
  its ``ROADCombined`` (the before score cancels).
- Its noise is ``torch.randn`` (unseeded); with ``noise=0`` the imputed images are the
  same (tested against a transcription of its sparse system).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, OptionError
from ._common import (
    Model,
    as_array,
    ascending_ranks,
    class_targets,
    descending_ranks,
    first_k,
    input_maps,
    percent_counts,
    spatial_shape,
)

__all__ = ["DEFAULT_PERCENTILES", "RoadResult", "impute", "road"]

#: The percentiles of pytorch-grad-cam's ROAD averages and the ROAD paper's figures.
DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)

#: (offset, weight) of the 8 neighbours in the imputation (the ROAD authors' weights).
NEIGHBOURS = (
    ((-1, -1), 1 / 12),
    ((-1, 0), 1 / 6),
    ((-1, 1), 1 / 12),
    ((0, -1), 1 / 6),
    ((0, 1), 1 / 6),
    ((1, -1), 1 / 12),
    ((1, 0), 1 / 6),
    ((1, 1), 1 / 12),
)

_TOLERANCE = 1e-9


@dataclass(frozen=True)
class RoadResult:
    """ROAD scores per map.

    Shapes: N samples, T targets, K percentiles.

    Attributes:
        percentiles: ``(K,)`` percent of the positions removed.
        counts: ``(K,)`` how many positions that is, ``floor(p P / 100)``.
        original: ``(N, T)`` the score of the unperturbed input.
        morf: ``(N, T, K)`` the score with the most relevant ``p`` percent imputed.
        lerf: ``(N, T, K)`` the score with the least relevant ``p`` percent imputed.
        targets: ``(N, T)`` the class ids that were scored.
        softmax: whether the scores are softmax probabilities.
    """

    percentiles: np.ndarray
    counts: np.ndarray
    original: np.ndarray
    morf: np.ndarray
    lerf: np.ndarray
    targets: np.ndarray
    softmax: bool

    @property
    def combined(self) -> np.ndarray:
        """``(N, T)`` the mean over percentiles of ``(LeRF - MoRF) / 2``; higher is better."""
        return ((self.lerf - self.morf) / 2).mean(axis=-1)

    @property
    def mean_combined(self) -> float:
        """:attr:`combined` averaged over samples and targets."""
        return float(self.combined.mean())


def road(
    explainer: Any,
    inputs: Any,
    result: Any,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    noise: float = 0.01,
    seed: int = 0,
    batch_size: int | None = None,
    *,
    softmax: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> RoadResult:
    """ROAD in both orders (MoRF and LeRF) at each percentile; see the module docstring.

    Args:
        explainer: the explainer that made ``result`` (its model scores the imputed inputs).
        inputs: ``(N, ...)`` the batch that was explained, 2-D images in the backend's layout.
        result: its result: ``maps`` ``(N, T, H, W)`` at the input's size, class ``targets``.
        percentiles: percent of the positions to remove, each in [0, 100].
        noise: standard deviation of the noise added to imputed pixels (absolute).
        seed: seeds the noise.
        batch_size: imputed inputs per forward pass (default: the explainer's, else 64).
        softmax: score softmax probabilities instead of the raw outputs.
        progress: called with (done, total) imputed inputs after every chunk.

    Returns:
        A :class:`RoadResult`.
    """
    model = Model.of(explainer, batch_size, softmax, "road")
    x = as_array(inputs)
    classes = class_targets(result, "road")
    maps = input_maps(result, x, model.layout, "road")
    spatial = spatial_shape(x, model.layout)
    if len(spatial) != 2:
        raise InputError(f"road imputes 2-D images; the input has spatial dims {spatial}.")
    levels = np.asarray(percentiles, dtype=np.float64)
    if levels.ndim != 1 or levels.size == 0 or not ((levels >= 0) & (levels <= 100)).all():
        raise OptionError(f"percentiles={percentiles!r}: expected numbers in [0, 100].")
    if not np.isfinite(noise) or noise < 0:
        raise OptionError(f"noise={noise!r}: expected a number >= 0.")
    n, t = classes.shape
    counts = percent_counts(levels, int(np.prod(spatial)))
    orders = np.stack([descending_ranks(maps), ascending_ranks(maps)])  # (2, N, T, P)
    shape = (n, t, len(levels), 2)
    planar = np.moveaxis(x, -1, 1) if model.layout == "channels_last" else x

    def build(items: np.ndarray) -> np.ndarray:
        sample, target, level, order = np.unravel_index(items, shape)
        removed = first_k(orders[order, sample, target], counts[level], spatial)
        rngs = [
            np.random.default_rng([seed, int(a), int(b), int(c), int(d)])
            for a, b, c, d in zip(sample, target, level, order, strict=True)
        ]
        filled = impute(planar[sample], removed, noise, rngs)
        if model.layout == "channels_last":
            filled = np.moveaxis(filled, 1, -1)
        return filled.astype(x.dtype)

    def wanted(items: np.ndarray) -> np.ndarray:
        sample, target, _, _ = np.unravel_index(items, shape)
        return classes[sample, target]

    original = model.plain_scores(x, classes)
    scores = model.scores(int(np.prod(shape)), build, wanted, progress).reshape(shape)
    return RoadResult(
        percentiles=levels,
        counts=counts,
        original=original,
        morf=scores[..., 0],
        lerf=scores[..., 1],
        targets=classes,
        softmax=model.softmax,
    )


def impute(
    images: np.ndarray,
    removed: np.ndarray,
    noise: float = 0.0,
    rngs: Sequence[np.random.Generator] | None = None,
) -> np.ndarray:
    """Noisy linear imputation of the removed pixels of channels-first images.

    Args:
        images: ``(M, C, H, W)``.
        removed: ``(M, H, W)`` bool, the pixels to fill (every channel).
        noise: standard deviation of the Gaussian noise added to each filled pixel.
        rngs: one generator per image for the noise (default: a fresh unseeded one).

    Returns:
        ``(M, C, H, W)`` float64: the images with the removed pixels filled (see the module
        docstring).
    """
    values = np.asarray(images, np.float64)
    unknown = np.broadcast_to(np.asarray(removed, bool)[:, None], values.shape)
    known = np.where(unknown, 0.0, values)
    degree = _neighbour_sum(np.ones((1, 1, *values.shape[2:])))
    rhs = np.where(unknown, _neighbour_sum(known), 0.0)
    solution = _conjugate_gradients(rhs, unknown, degree)
    filled = np.where(unknown, solution, values)
    if noise > 0:
        generators = rngs if rngs is not None else [np.random.default_rng()] * len(values)
        draws = np.stack([g.standard_normal(values.shape[1:]) for g in generators])
        filled = filled + np.where(unknown, noise * draws, 0.0)
    return filled


def _neighbour_sum(values: np.ndarray) -> np.ndarray:
    """``sum_o w_o values[i + o]`` over the 8 neighbours, zero outside the image."""
    height, width = values.shape[-2:]
    padded = np.pad(values, [(0, 0)] * (values.ndim - 2) + [(1, 1), (1, 1)])
    total = np.zeros(values.shape, np.float64)
    for (dy, dx), weight in NEIGHBOURS:
        total += weight * padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
    return total


def _conjugate_gradients(rhs: np.ndarray, unknown: np.ndarray, degree: np.ndarray) -> np.ndarray:
    """Solve ``degree z - W z = rhs`` on the unknown pixels of every (image, channel).

    ``W`` sums the weighted unknown neighbours; the matrix is symmetric and, where a
    connected region of unknown pixels touches a known one, positive definite.
    """

    def apply(z: np.ndarray) -> np.ndarray:
        return np.where(unknown, degree * z - _neighbour_sum(z), 0.0)

    def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(axis=(-2, -1), keepdims=True)

    z = np.where(unknown, rhs / degree, 0.0)  # one Jacobi step as the first guess
    residual = rhs - apply(z)
    direction = residual.copy()
    rr = dot(residual, residual)
    scale = np.maximum(dot(rhs, rhs), 1e-300)
    limit = 10 * sum(rhs.shape[-2:]) + 100
    for _ in range(limit):
        # A converged system stops changing, so each system takes the same iterations
        # whatever else is in the chunk: the result does not depend on batch_size.
        active = rr > _TOLERANCE**2 * scale
        if not active.any():
            return z
        product = apply(direction)
        curvature = dot(direction, product)
        moving = active & (curvature > 0)
        step = np.where(moving, rr / np.where(moving, curvature, 1.0), 0.0)
        z = z + step * direction
        residual = residual - step * product
        rr_next = dot(residual, residual)
        beta = np.where(moving, rr_next / np.where(moving, rr, 1.0), 0.0)
        direction = np.where(moving, residual + beta * direction, direction)
        rr = np.where(moving, rr_next, rr)
    if not (rr <= 1e-6 * scale).all():
        warnings.warn(
            "ROAD's imputation did not converge for some images (every pixel removed?); "
            "their removed pixels are filled approximately.",
            RuntimeWarning,
            stacklevel=3,
        )
    return z
