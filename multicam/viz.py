"""Pictures of maps: colour them, lay them over images, grid them, save PNGs.

Array functions (:func:`colorize`, :func:`overlay`, :func:`signed`) return ``uint8`` RGB
arrays for notebooks and further processing; :func:`grid` returns a matplotlib figure and
saves it when given a path. ReLU'd maps use a sequential colormap; signed maps a diverging
one centred on zero, so that evidence for a class (red) and against it (blue) stay apart.

Needs ``pip install 'multicam[viz]'`` (matplotlib, Pillow); imported only when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import algebra
from .errors import BackendNotInstalledError, InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["colorize", "grid", "overlay", "signed"]


def _matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BackendNotInstalledError(
            f"pictures need matplotlib ({exc}); install it with pip install 'multicam[viz]'"
        ) from exc
    return plt


def colorize(
    values: np.ndarray, cmap: str = "jet", vmin: float = 0.0, vmax: float = 1.0
) -> np.ndarray:
    """Map ``values`` (any shape) through a colormap to ``uint8`` RGB ``(*shape, 3)``."""
    plt = _matplotlib()
    scaled = (np.asarray(values, np.float64) - vmin) / max(vmax - vmin, 1e-12)
    rgba = plt.get_cmap(cmap)(np.clip(scaled, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _image_rgb(image: np.ndarray) -> np.ndarray:
    """An ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` image as float RGB in [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise InputError(
            f"an image of shape {image.shape} cannot be shown; pass (H, W), (H, W, 1) or "
            "(H, W, 3), channels last."
        )
    image = image[..., :3].astype(np.float64)
    if image.max() > 1.0:
        image = image / 255.0
    return np.clip(image, 0, 1)


def _fit(cam_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    cam_map = np.asarray(cam_map, np.float32)
    if cam_map.ndim != 2:
        raise InputError(f"a map to draw must be 2-D (H, W), got shape {cam_map.shape}.")
    return cam_map if cam_map.shape == shape else algebra.resize(cam_map, shape)


def overlay(
    image: np.ndarray, cam_map: np.ndarray, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """Blend a ``[0, 1]`` map over an image; the map is resized to the image if needed.

    Args:
        image: ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``, floats in [0, 1] or 0-255.
        cam_map: ``(h, w)`` values in [0, 1], e.g. ``res.maps[n, t]``.
        alpha: weight of the map.
        cmap: a matplotlib colormap name.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    rgb = _image_rgb(image)
    heat = colorize(_fit(cam_map, rgb.shape[:2]), cmap).astype(np.float64) / 255
    blend = (1 - alpha) * rgb + alpha * heat
    return (blend * 255).round().astype(np.uint8)


def signed(raw_map: np.ndarray, cmap: str = "RdBu_r", limit: float | None = None) -> np.ndarray:
    """Colour a signed map with a diverging colormap centred on zero.

    Args:
        raw_map: ``(h, w)`` signed values, e.g. ``res.raw[n, t]``.
        cmap: a diverging matplotlib colormap; zero maps to its centre.
        limit: the |value| shown at full colour; default the map's largest |value|.

    Returns:
        ``(h, w, 3)`` uint8 RGB.
    """
    raw_map = np.asarray(raw_map, np.float64)
    if limit is None:
        limit = float(np.abs(raw_map).max())
    limit = max(limit, 1e-12)
    return colorize(raw_map, cmap, -limit, limit)


def grid(
    images: Sequence[np.ndarray],
    maps: Sequence[Sequence[np.ndarray]],
    *,
    row_labels: Sequence[str] = (),
    col_labels: Sequence[str] = (),
    marks: Sequence[Sequence[str]] = (),
    path: str | Path | None = None,
    cell: float = 1.1,
    dpi: int = 80,
) -> Figure:
    """A figure with one row per image: the image, then its RGB map cells.

    Args:
        images: one image per row (shown in the first column).
        maps: per row, the RGB cells to show (from :func:`overlay` or :func:`signed`).
        row_labels: a label per row.
        col_labels: a title per map column.
        marks: per row and cell, a short text drawn on the cell (e.g. ``"blank"``).
        path: where to save a PNG; nothing is saved when ``None``.
        cell: inches per cell.
        dpi: resolution of the saved PNG.

    Returns:
        The matplotlib figure.
    """
    plt = _matplotlib()
    rows = len(images)
    cols = 1 + max((len(r) for r in maps), default=0)
    figure, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(_image_rgb(images[r]))
        if r < len(row_labels):
            axes[r, 0].set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")
        for c, cell_rgb in enumerate(maps[r]):
            axes[r, c + 1].imshow(cell_rgb)
            if r < len(marks) and c < len(marks[r]) and marks[r][c]:
                axes[r, c + 1].text(
                    0.5,
                    0.5,
                    marks[r][c],
                    color="red",
                    fontsize=7,
                    ha="center",
                    va="center",
                    transform=axes[r, c + 1].transAxes,
                    fontweight="bold",
                )
        for c in range(cols):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0 and 0 < c <= len(col_labels):
                axes[r, c].set_title(col_labels[c - 1], fontsize=8)
    figure.tight_layout(pad=0.3)
    if path is not None:
        figure.savefig(path, dpi=dpi)
    return figure
