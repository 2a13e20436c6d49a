"""Pictures: colours, overlays and the signed colormap's centre."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from multicam import InputError, viz


def test_overlay_shape_and_range() -> None:
    image = np.random.default_rng(0).uniform(size=(28, 28, 1))
    out = viz.overlay(image, np.linspace(0, 1, 81).reshape(9, 9), alpha=0.4)
    assert out.shape == (28, 28, 3) and out.dtype == np.uint8
    assert viz.overlay(np.zeros((4, 4)), np.zeros((4, 4)), alpha=0.0).max() == 0  # alpha 0: image


def test_signed_maps_zero_to_the_centre_colour() -> None:
    values = np.array([[-2.0, 0.0, 2.0]])
    colours = viz.signed(values).astype(int)
    centre = viz.colorize(np.array([0.5]), "RdBu_r")[0].astype(int)
    np.testing.assert_array_equal(colours[0, 1], centre)
    assert colours[0, 0, 2] > colours[0, 0, 0]  # negative: blue
    assert colours[0, 2, 0] > colours[0, 2, 2]  # positive: red


def test_grid_saves_a_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cell = viz.signed(np.random.default_rng(0).normal(size=(5, 5)))
    figure = viz.grid(
        [np.ones((5, 5))], [[cell, cell]], col_labels=["a", "b"], path=tmp_path / "g.png"
    )
    assert (tmp_path / "g.png").stat().st_size > 1000
    assert len(figure.axes) == 3


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(InputError, match="cannot be shown"):
        viz.overlay(np.zeros((2, 2, 2, 2)), np.zeros((2, 2)))
    with pytest.raises(InputError, match="must be 2-D"):
        viz.overlay(np.zeros((4, 4)), np.zeros((1, 4, 4)))


def _maps(n: int, t: int, size: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(n, t, size // 2, size // 2))
    raw[0, t // 2] = -np.abs(raw[0, t // 2]) - 0.01  # blank: every value negative
    shown = np.maximum(raw, 0)
    span = shown.reshape(n, t, -1).max(-1)[..., None, None]
    maps = np.where(span > 0, shown / np.maximum(span, 1e-12), 0)
    return rng.uniform(size=(n, size, size, 3)), maps, raw


def _texts(figure) -> list:  # type: ignore[no-untyped-def]
    from matplotlib.text import Text

    figure.canvas.draw()
    drawn = [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return [t for t in drawn if t.axes is None or t.axes.axison]


def test_explanation_marks_blank_maps_the_predicted_class_and_has_colourbars() -> None:
    images, maps, raw = _maps(2, 3)
    targets = np.array([[0, 1, 2], [0, 1, 2]])
    figure = viz.explanation(list(images), maps, raw, targets, predicted=[2, 0])
    texts = [t.get_text() for t in _texts(figure)]
    assert texts.count("BLANK") == 1
    low, high = raw[0, 1].min(), raw[0, 1].max()  # t // 2 == 1
    assert f"{low:.2g} to {high:.2g}" in " ".join(texts)  # the signed range of the blank map
    # per input: the image, T ReLU'd and T signed maps, and two colourbars
    assert len(figure.axes) == 2 * (1 + 2 * 3 + 2)
    framed = [ax for ax in figure.axes if ax.spines["top"].get_edgecolor()[:3] != (0.0, 0.0, 0.0)]
    assert len(framed) == 2 * 2  # the predicted class's two cells, per input
    assert [t for t in texts if t.startswith("class ")] == ["class 0", "class 1", "class 2"]


@pytest.mark.parametrize("t", [1, 3, 10])
def test_explanation_texts_are_inside_the_picture_and_apart(t: int) -> None:
    images, maps, raw = _maps(2, t, size=28)
    figure = viz.explanation(
        list(images),
        maps,
        raw,
        np.tile(np.arange(t), (2, 1)),
        predicted=[0, 0],
        image_labels=["a_rather_long_file_name.png\npredicted: class 0\n(p 0.97)"] * 2,
        title="Grad-CAM of all classes at layer 'features.relu4' of a model with a long name",
        table=(["backends", "max rel. diff", "verdict"], [["torch ~ keras", "1e-06", "agree"]]),
        table_title="How closely the backends agree",
    )
    figure.canvas.draw()
    drawn = figure.get_tightbbox()  # everything drawn, in inches: nothing is cut
    width, height = figure.get_size_inches()
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01, drawn
    assert drawn.x1 <= width + 0.01 and drawn.y1 <= height + 0.01, drawn
    titles = [ax.title for ax in figure.axes if ax.get_title()] + [figure._suptitle]
    title_boxes = [title.get_window_extent() for title in titles if title is not None]
    for i, a in enumerate(title_boxes):
        for b in title_boxes[i + 1 :]:
            assert not a.overlaps(b)
    cells = [c for ax in figure.axes for table in ax.tables for c in table.get_celld().values()]
    assert "agree" in [cell.get_text().get_text() for cell in cells]
    assert figure.get_size_inches()[0] * figure.dpi >= 600  # readable at normal size


def test_explanation_rejects_shapes_that_do_not_fit() -> None:
    images, maps, raw = _maps(2, 3)
    with pytest.raises(InputError, match="same"):
        viz.explanation(list(images), maps, raw[:1], np.zeros((2, 3), int))
    with pytest.raises(InputError, match="do not fit"):
        viz.explanation(list(images[:1]), maps, raw, np.zeros((2, 3), int))
