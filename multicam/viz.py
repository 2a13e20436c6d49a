"""Pictures of maps: colour them, lay them over images, grid them, save PNGs.

Array functions (:func:`colorize`, :func:`overlay`, :func:`signed`) return ``uint8`` RGB
arrays for notebooks and further processing. :func:`explanation` draws what a person wants
to see of a result: each input beside its ReLU'd and signed maps with colourbars, the
predicted class framed, blank maps labelled with their signed range, and optionally a
table (e.g. how closely backends agree). :func:`grid` lays out ready-made RGB cells. Both
return a matplotlib figure and save it when given a path. ReLU'd maps use a sequential
colormap; signed maps a diverging one centred on zero, so that evidence for a class (red)
and against it (blue) stay apart.

Needs ``pip install 'multicam-xai[viz]'`` (matplotlib, Pillow); imported only when called.
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

__all__ = ["colorize", "explanation", "grid", "overlay", "signed"]


def _matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BackendNotInstalledError(
            f"pictures need matplotlib ({exc}); install it with pip install 'multicam-xai[viz]'"
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


_PREDICTED = "#1a9641"  # green frame: the predicted class
_BLANK = "#d7191c"  # red label: a blank map


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb @ np.array([0.299, 0.587, 0.114]), np.float64)


def _wrap(text: str, width_in: float, fontsize: float, minimum: int = 20) -> str:
    """``text`` wrapped to fit ``width_in`` inches at ``fontsize`` points, line by line."""
    import textwrap

    chars = max(int(width_in * 72 / (0.6 * fontsize)), minimum)
    return "\n".join(textwrap.fill(part, chars) for part in text.split("\n"))


def explanation(
    images: Sequence[np.ndarray],
    maps: np.ndarray,
    raw: np.ndarray,
    targets: np.ndarray | Sequence[Sequence[int]],
    *,
    predicted: Sequence[int] | np.ndarray | None = None,
    blank: np.ndarray | None = None,
    image_labels: Sequence[str] = (),
    class_names: Sequence[str] | None = None,
    title: str = "",
    table: tuple[Sequence[str], Sequence[Sequence[str]]] | None = None,
    table_title: str = "",
    notes: str = "",
    path: str | Path | None = None,
    cell: float | None = None,
    dpi: int = 100,
    alpha: float = 0.5,
) -> Figure:
    """Each input beside its ReLU'd and signed maps, with colourbars, marks and a table.

    Per input two rows: Grad-CAM after the ReLU (normalised to [0, 1], laid over the
    input), and the signed map before the ReLU (red: evidence for the class, blue:
    against; one symmetric colour range per input, so its classes compare). The predicted
    class is framed in green; a blank map (no positive value, nothing left after the ReLU)
    is labelled BLANK in red with its signed range.

    Args:
        images: ``N`` images ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``, channels last.
        maps: ``(N, T, h, w)`` normalised maps, e.g. ``res.maps``.
        raw: ``(N, T, h', w')`` signed maps, e.g. ``res.raw``; resized to the image.
        targets: ``(N, T)`` class ids, e.g. ``res.targets``.
        predicted: per input the predicted class (framed), or None.
        blank: ``(N, T)`` bool, e.g. ``res.diagnose().blank``; default: maps whose
            signed values are all <= 0.
        image_labels: a caption under each input.
        class_names: names of the class ids; default ``"class <id>"``.
        title: the figure's title.
        table: ``(header, rows)`` of strings drawn under the maps (e.g. agreement).
        table_title: a line above the table.
        notes: a paragraph at the bottom; default a key to the picture.
        path: where to save a PNG; nothing is saved when ``None``.
        cell: inches per map; default from the number of targets.
        dpi: resolution of the saved PNG.
        alpha: weight of the ReLU'd map over the image.

    Returns:
        The matplotlib figure.
    """
    plt = _matplotlib()
    from matplotlib.gridspec import GridSpecFromSubplotSpec

    maps = np.asarray(maps, np.float64)
    raw = np.asarray(raw, np.float64)
    target_ids = np.asarray(targets)
    if maps.ndim != 4 or raw.ndim != 4 or maps.shape[:2] != raw.shape[:2]:
        raise InputError(
            f"maps {maps.shape} and raw {raw.shape} must both be (N, T, H, W) with the same "
            "N and T, e.g. res.maps and res.raw of a 2-D result."
        )
    n, t = maps.shape[:2]
    if len(images) != n or target_ids.shape != (n, t):
        raise InputError(
            f"{len(images)} images and targets of shape {target_ids.shape} do not fit maps "
            f"of shape {maps.shape}: pass one image per sample and (N, T) targets."
        )
    rgbs = [_image_rgb(image) for image in images]
    if blank is None:
        blank = raw.reshape(n, t, -1).max(axis=-1) <= 0
    blank = np.asarray(blank, bool)

    def name(c: int) -> str:
        return str(class_names[c]) if class_names is not None else f"class {c}"

    shared = bool((target_ids == target_ids[:1]).all())
    single = t == 1  # one map per input: input, ReLU'd and signed side by side
    size = cell or (2.4 if t <= 2 else 1.7 if t <= 4 else 1.15)
    if single:
        width = 3 * size + 1.6
        rows_height = n * (size + 0.55)
    else:
        width = size * (t + 1.3) + 1.3
        rows_height = n * (2 * size + (0.2 if shared else 0.45)) + (0.45 if shared else 0.0)
    if notes == "":
        upper, lower = ("Middle", "Right") if single else ("Upper row", "Lower row")
        notes = (
            f"{upper}: Grad-CAM after the ReLU, normalised to [0, 1], over the input. "
            f"{lower}: the signed map before the ReLU (red: evidence for the class, blue: "
            "against). Green frame: the predicted class. BLANK: no positive value, so "
            "the ReLU leaves nothing; its signed range is printed under it."
        )
    notes = _wrap(notes, width - 0.4, 8) if notes else ""
    notes_height = 0.1 + (0.16 * (notes.count("\n") + 1) if notes else 0)
    table_height = 0.0
    if table is not None:
        table_height = 0.2 + 0.2 * (table_title.count("\n") + 1) + 0.24 * (len(table[1]) + 1)
    title_height = 0.55 if title else 0.1
    figure = plt.figure(
        figsize=(width, title_height + rows_height + table_height + notes_height),
        dpi=dpi,
        layout="constrained",
    )
    if title:
        figure.suptitle(_wrap(title, width - 0.2, 11), fontsize=11, fontweight="bold")
    heights = [rows_height] + ([table_height] if table is not None else []) + [notes_height]
    parts = figure.subfigures(len(heights), 1, height_ratios=heights)
    top = parts[0]
    outer = top.add_gridspec(n, 1)
    for i in range(n):
        if single:
            inner = GridSpecFromSubplotSpec(
                1, 5, subplot_spec=outer[i], width_ratios=[1.0, 1.0, 0.07, 1.0, 0.07]
            )
            image_spec, bar_specs = inner[0, 0], (inner[0, 2], inner[0, 4])
            cell_specs = [(inner[0, 1], inner[0, 3])]
        else:
            inner = GridSpecFromSubplotSpec(
                2, t + 2, subplot_spec=outer[i], width_ratios=[1.3] + [1.0] * t + [0.07]
            )
            image_spec, bar_specs = inner[:, 0], (inner[0, t + 1], inner[1, t + 1])
            cell_specs = [(inner[0, j + 1], inner[1, j + 1]) for j in range(t)]
        image_ax = top.add_subplot(image_spec)
        image_ax.imshow(rgbs[i])
        image_ax.set_xticks([])
        image_ax.set_yticks([])
        if i == 0 or single:
            image_ax.set_title("input", fontsize=9)
        if i < len(image_labels):
            column = size * (1.0 if single else 1.3)
            image_ax.set_xlabel(_wrap(image_labels[i], column, 8, minimum=8), fontsize=8)
        limit = max(float(np.abs(raw[i]).max()), 1e-12)
        shape = rgbs[i].shape[:2]
        relu_image = signed_image = None
        for j, (relu_spec, signed_spec) in enumerate(cell_specs):
            c = int(target_ids[i, j])
            is_predicted = predicted is not None and c == int(predicted[i])
            relu_ax = top.add_subplot(relu_spec)
            signed_ax = top.add_subplot(signed_spec)
            relu_ax.imshow(rgbs[i])
            relu_image = relu_ax.imshow(
                _fit(maps[i, j], shape), cmap="jet", vmin=0, vmax=1, alpha=alpha
            )
            signed_ax.imshow(_grey(rgbs[i]), cmap="gray", vmin=0, vmax=1)
            signed_image = signed_ax.imshow(
                _fit(raw[i, j], shape), cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.85
            )
            if single:
                mark = " (predicted)" if is_predicted else ""
                colour = _PREDICTED if is_predicted else "black"
                relu_ax.set_title(f"{name(c)}{mark}: ReLU'd", fontsize=9, color=colour)
                signed_ax.set_title(f"{name(c)}: signed", fontsize=9, color=colour)
            else:
                if i == 0 or not shared:
                    relu_ax.set_title(name(c), fontsize=9)
                if j == 0:
                    relu_ax.set_ylabel("ReLU'd", fontsize=8)
                    signed_ax.set_ylabel("signed", fontsize=8)
            for ax in (relu_ax, signed_ax):
                ax.set_xticks([])
                ax.set_yticks([])
                if is_predicted:
                    for spine in ax.spines.values():
                        spine.set_edgecolor(_PREDICTED)
                        spine.set_linewidth(3)
            if blank[i, j]:
                relu_ax.text(
                    0.5,
                    0.5,
                    "BLANK",
                    color="white",
                    fontsize=8 if size < 1.5 else 12,
                    fontweight="bold",
                    ha="center",
                    va="center",
                    transform=relu_ax.transAxes,
                    bbox={"facecolor": _BLANK, "edgecolor": "none", "pad": 1.5},
                )
                low, high = float(raw[i, j].min()), float(raw[i, j].max())
                span = f"{low:.2g} to {high:.2g}"
                signed_ax.set_xlabel(
                    span if size < 1.5 else f"all \u2264 0: {span}",
                    fontsize=8 if size < 1.5 else 9,
                    color=_BLANK,
                    labelpad=1,
                )
        bar = top.colorbar(relu_image, cax=top.add_subplot(bar_specs[0]), ticks=[0, 0.5, 1])
        bar.ax.tick_params(labelsize=7)
        bar = top.colorbar(
            signed_image, cax=top.add_subplot(bar_specs[1]), ticks=[-limit, 0, limit]
        )
        bar.ax.set_yticklabels([f"{-limit:.2g}", "0", f"{limit:.2g}"])
        bar.ax.tick_params(labelsize=7)
    if table is not None:
        header, rows = table
        table_ax = parts[1].add_subplot()
        table_ax.axis("off")
        if table_title:
            table_ax.set_title(table_title, fontsize=9, loc="left")
        drawn = table_ax.table(
            cellText=[list(row) for row in rows] or [[""] * len(header)],
            colLabels=list(header),
            loc="upper center",
            cellLoc="center",
        )
        drawn.auto_set_font_size(False)
        drawn.set_fontsize(8)
        drawn.auto_set_column_width(list(range(len(header))))
        for (row, _), table_cell in drawn.get_celld().items():
            table_cell.set_height(1.0 / (len(rows) + 1.5))
            if row == 0:
                table_cell.set_text_props(fontweight="bold")
            text = table_cell.get_text().get_text()
            if text == "agree":
                table_cell.get_text().set_color(_PREDICTED)
            elif text.startswith("DISAGREE"):
                table_cell.get_text().set_color(_BLANK)
    if notes:
        parts[-1].text(0.01, 0.95, notes, fontsize=8, va="top", ha="left", color="0.25")
    if path is not None:
        figure.savefig(path, dpi=dpi)
    return figure
