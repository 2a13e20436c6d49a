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
