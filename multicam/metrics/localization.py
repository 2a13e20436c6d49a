"""Localisation: does the map point at the annotated object? No model is run.

- Pointing game (Zhang et al., 2016): a hit when the map's maximum lies in the object's
  mask, or within ``tolerance`` pixels (Euclidean) of it (the paper uses 15 pixels at
  224x224). The maximum is the first in flat (C) order when several positions tie. A
  constant map (a blank one) points nowhere and counts as a miss.
- Energy-based pointing game (Wang et al., Score-CAM, 2020): the share of the map's mass
  inside the mask, ``sum(map * mask) / sum(map)``, for non-negative maps; 0 for an
  all-zero map.

Annotations are boolean masks of the maps' spatial shape (one for all, one per sample, or
one per sample and target), or boxes turned into masks by :func:`box_masks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, OptionError
from ._common import maps_of

__all__ = ["EnergyResult", "PointingResult", "box_masks", "energy_pointing_game", "pointing_game"]


@dataclass(frozen=True)
class PointingResult:
    """Pointing-game hits per map.

    Attributes:
        hits: ``(N, T)`` bool.
        points: ``(N, T, len(S))`` the index of each map's maximum.
        blank: ``(N, T)`` bool, maps that are constant (counted as misses).
    """

    hits: np.ndarray
    points: np.ndarray
    blank: np.ndarray

    @property
    def accuracy(self) -> float:
        """The fraction of hits."""
        return float(self.hits.mean())


@dataclass(frozen=True)
class EnergyResult:
    """Energy-based pointing game per map.

    Attributes:
        energy: ``(N, T)`` the share of each map's mass inside its mask, in [0, 1].
    """

    energy: np.ndarray

    @property
    def mean(self) -> float:
        """The mean share over samples and targets."""
        return float(self.energy.mean())


def box_masks(
    boxes: np.ndarray | Sequence[Any], shape: Sequence[int], batch_size: int | None = None
) -> np.ndarray:
    """Boolean masks ``(N, H, W)`` from boxes ``(x_min, y_min, x_max, y_max)`` in pixels.

    A box covers the pixels ``x_min <= x < x_max`` and ``y_min <= y < y_max`` (Python's
    slice convention; clipped to the image). ``x`` is the column, ``y`` the row.

    Args:
        boxes: ``(N, 4)``, one box per sample; or a sequence of N entries, each a box
            ``(4,)`` or several ``(B, 4)`` whose union is the mask.
        shape: ``(H, W)`` of the maps.
        batch_size: N, to check the count (optional).

    Example:
        >>> box_masks([(1, 0, 3, 2)], (3, 4)).astype(int)
        array([[[0, 1, 1, 0],
                [0, 1, 1, 0],
                [0, 0, 0, 0]]])
    """
    if len(shape) != 2:
        raise OptionError(f"boxes describe 2-D maps; the maps' spatial shape is {tuple(shape)}.")
    height, width = (int(s) for s in shape)
    per_sample = list(boxes)
    if batch_size is not None and len(per_sample) != batch_size:
        raise InputError(f"{len(per_sample)} box entries for {batch_size} samples.")
    masks = np.zeros((len(per_sample), height, width), bool)
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    for i, entry in enumerate(per_sample):
        entry = np.asarray(entry, np.float64).reshape(-1, 4) if len(entry) else np.zeros((0, 4))
        for x_min, y_min, x_max, y_max in entry:
            if x_max < x_min or y_max < y_min:
                raise InputError(
                    f"box {(x_min, y_min, x_max, y_max)} of sample {i}: expected "
                    "(x_min, y_min, x_max, y_max) with min <= max."
                )
            masks[i] |= (cols >= x_min) & (cols < x_max) & (rows >= y_min) & (rows < y_max)
    return masks


def _annotation(maps: np.ndarray, masks: Any, boxes: Any, metric: str) -> np.ndarray:
    """``(N, T, *S)`` bool masks broadcast to the maps."""
    if (masks is None) == (boxes is None):
        raise OptionError(f"{metric} takes masks= or boxes= (one of them).")
    if boxes is not None:
        masks = box_masks(boxes, maps.shape[2:], maps.shape[0])
    array = np.asarray(masks)
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise InputError(f"{metric}: masks must be boolean (or 0/1).")
        array = array.astype(bool)
    spatial = maps.shape[2:]
    if array.shape[array.ndim - len(spatial) :] != spatial:
        raise InputError(
            f"{metric}: masks of shape {array.shape} do not fit maps of spatial shape {spatial}."
        )
    if array.ndim == len(spatial) + 1:
        array = array[:, None]  # one per sample, for every target
    try:
        return np.broadcast_to(array, maps.shape)
    except ValueError as exc:
        raise InputError(
            f"{metric}: masks of shape {array.shape} do not broadcast to the maps {maps.shape}; "
            "pass (*S), (N, *S) or (N, T, *S)."
        ) from exc


def pointing_game(
    result: Any, masks: Any = None, *, boxes: Any = None, tolerance: float = 0.0
) -> PointingResult:
    """Whether each map's maximum falls on the object.

    Args:
        result: a result (its ``maps`` ``(N, T, *S)``) or the maps themselves.
        masks: bool ``(*S)``, ``(N, *S)`` or ``(N, T, *S)``, True on the object.
        boxes: instead of masks, see :func:`box_masks`.
        tolerance: a hit within this many pixels of the mask (Euclidean).

    Returns:
        A :class:`PointingResult`.
    """
    maps = maps_of(result)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise OptionError(f"tolerance={tolerance!r}: expected a number >= 0.")
    annotation = _annotation(maps, masks, boxes, "pointing_game")
    n, t = maps.shape[:2]
    spatial = maps.shape[2:]
    flat = maps.reshape(n, t, -1)
    blank = flat.max(axis=-1) == flat.min(axis=-1)
    top = flat.argmax(axis=-1)  # the first maximum in flat order
    points = np.stack(np.unravel_index(top, spatial), axis=-1)  # (N, T, D)
    if tolerance == 0:
        hits = np.take_along_axis(annotation.reshape(n, t, -1), top[..., None], -1)[..., 0]
    else:
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), -1)
        offsets = grid.reshape(1, 1, -1, len(spatial)) - points[:, :, None, :]
        near = (offsets.astype(np.float64) ** 2).sum(-1) <= tolerance**2
        hits = (near & annotation.reshape(n, t, -1)).any(-1)
    return PointingResult(hits=hits & ~blank, points=points, blank=blank)


def energy_pointing_game(result: Any, masks: Any = None, *, boxes: Any = None) -> EnergyResult:
    """The share of each map's mass inside the object's mask.

    Args:
        result: a result (its ``maps``, non-negative) or the maps themselves.
        masks: bool ``(*S)``, ``(N, *S)`` or ``(N, T, *S)``, True on the object.
        boxes: instead of masks, see :func:`box_masks`.

    Returns:
        An :class:`EnergyResult`.
    """
    maps = maps_of(result)
    if maps.min() < 0:
        raise OptionError(
            "the energy-based pointing game needs non-negative maps (explain with relu=True)."
        )
    annotation = _annotation(maps, masks, boxes, "energy_pointing_game")
    n, t = maps.shape[:2]
    total = maps.reshape(n, t, -1).sum(-1)
    inside = np.where(annotation, maps, 0.0).reshape(n, t, -1).sum(-1)
    return EnergyResult(energy=np.where(total > 0, inside / np.where(total > 0, total, 1), 0.0))
