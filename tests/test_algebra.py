"""Properties of the NumPy algebra, and its resize against each framework's own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from multicam import algebra

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
HUGE = float(np.float32(1e30))


@st.composite
def layer_arrays(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n, t, k = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    activations = draw(hnp.arrays(np.float32, (n, k, *spatial), elements=finite))
    gradients = draw(hnp.arrays(np.float32, (n, t, k, *spatial), elements=finite))
    return activations, gradients


@given(layer_arrays())
def test_weighted_sum_is_the_einsum_of_the_definition(
    arrays: tuple[np.ndarray, np.ndarray],
) -> None:
    activations, gradients = arrays
    weights = algebra.channel_weights(gradients)
    spatial_axes = tuple(range(3, gradients.ndim))
    np.testing.assert_allclose(weights, gradients.mean(axis=spatial_axes), rtol=1e-5, atol=1e-3)
    expected = np.einsum("ntk,nk...->nt...", weights.astype(np.float64), activations)
    np.testing.assert_allclose(
        algebra.weighted_sum(activations, weights), expected, rtol=1e-4, atol=1e-2
    )


@given(layer_arrays(), st.floats(-3, 3), st.floats(-3, 3))
def test_cam_is_linear_in_the_gradients(
    arrays: tuple[np.ndarray, np.ndarray], a: float, b: float
) -> None:
    activations, gradients = arrays
    other = gradients[::-1].copy() if gradients.shape[0] > 1 else gradients * 0.5

    def cam(grads: np.ndarray) -> np.ndarray:
        return algebra.weighted_sum(activations, algebra.channel_weights(grads)).astype(np.float64)

    combined = cam((a * gradients.astype(np.float64) + b * other).astype(np.float32))
    scale = np.abs(activations).max() * np.abs(gradients).max() * activations.shape[1] + 1
    np.testing.assert_allclose(combined, a * cam(gradients) + b * cam(other), atol=1e-4 * scale)


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=5), elements=finite))
def test_relu_is_non_negative_and_keeps_positives(maps: np.ndarray) -> None:
    out = algebra.relu(maps)
    assert (out >= 0).all()
    np.testing.assert_array_equal(out[maps > 0], maps[maps > 0])


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=5), elements=finite))
def test_normalized_maps_lie_in_unit_interval(maps: np.ndarray) -> None:
    spatial = maps.ndim - 2
    out = algebra.normalize(maps, spatial)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    flat = out.reshape(*out.shape[:2], -1)
    ranges = np.ptp(maps.reshape(*maps.shape[:2], -1), axis=-1)
    wide = ranges > 1e-3
    np.testing.assert_allclose(flat.max(-1)[wide], 1.0, atol=1e-6)
    np.testing.assert_allclose(flat.min(-1)[wide], 0.0, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_constant_maps_normalise_to_zeros_not_nan(value: float) -> None:
    out = algebra.normalize(np.full((2, 3, 4, 4), value, np.float32), 2)
    np.testing.assert_array_equal(out, 0.0)


def test_interpolation_rows_sum_to_one() -> None:
    for method in ("linear", "nearest"):
        for src, dst in [(1, 5), (7, 3), (4, 9), (9, 4), (5, 5)]:
            matrix = algebra.interpolation_matrix(src, dst, method)
            np.testing.assert_allclose(matrix.sum(1), 1.0)


def test_resize_golden_values() -> None:
    np.testing.assert_allclose(algebra.resize(np.array([[0.0, 1.0]]), (4,)), [[0, 0.25, 0.75, 1]])
    np.testing.assert_allclose(
        algebra.resize(np.array([[0.0, 1.0]]), (3,), align_corners=True), [[0, 0.5, 1]]
    )
    np.testing.assert_allclose(
        algebra.resize(np.array([[1.0, 2.0, 3.0]]), (6,), "nearest"), [[1, 1, 2, 2, 3, 3]]
    )


shapes_2d = st.tuples(st.integers(1, 9), st.integers(1, 9))


def _framework(name: str) -> object:
    return pytest.importorskip(name)


@settings(max_examples=30, deadline=None)
@given(shapes_2d, shapes_2d, st.sampled_from(["linear", "nearest"]), st.booleans(), st.data())
def test_resize_matches_torch(
    src: tuple[int, int],
    dst: tuple[int, int],
    method: str,
    align_corners: bool,
    data: st.DataObject,
) -> None:
    torch = _framework("torch")
    if method == "nearest":
        align_corners = False
    maps = data.draw(hnp.arrays(np.float32, (2, 3, *src), elements=finite))
    mode = "bilinear" if method == "linear" else "nearest-exact"
    kwargs = {"align_corners": align_corners} if method == "linear" else {}
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(maps), size=dst, mode=mode, **kwargs
    )
    actual = algebra.resize(maps, dst, method, align_corners)  # type: ignore[arg-type]
    np.testing.assert_allclose(actual, expected.numpy(), atol=1e-5 * (1 + np.abs(maps).max()))


@settings(max_examples=20, deadline=None)
@given(shapes_2d, shapes_2d, st.sampled_from(["linear", "nearest"]), st.data())
def test_resize_matches_tensorflow(
    src: tuple[int, int], dst: tuple[int, int], method: str, data: st.DataObject
) -> None:
    tf = _framework("tensorflow")
    maps = data.draw(hnp.arrays(np.float32, (2, *src, 3), elements=finite))  # NHWC
    expected = tf.image.resize(maps, dst, method="bilinear" if method == "linear" else "nearest")
    actual = algebra.resize(np.moveaxis(maps, -1, 1), dst, method)  # type: ignore[arg-type]
    np.testing.assert_allclose(
        np.moveaxis(actual, 1, -1), expected.numpy(), atol=1e-5 * (1 + np.abs(maps).max())
    )


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_resize_matches_jax_when_upsampling(data: st.DataObject) -> None:
    jax = _framework("jax")
    dims = data.draw(st.integers(1, 3))
    src = data.draw(st.tuples(*[st.integers(1, 5)] * dims))
    dst = tuple(
        s * f + e
        for s, f, e in zip(
            src,
            data.draw(st.tuples(*[st.integers(1, 3)] * dims)),
            data.draw(st.tuples(*[st.integers(0, 2)] * dims)),
            strict=True,
        )
    )
    maps = data.draw(hnp.arrays(np.float32, (2, *src), elements=finite))
    for method in ("linear", "nearest"):
        expected = jax.image.resize(maps, (2, *dst), method=method)
        actual = algebra.resize(maps, dst, method)  # type: ignore[arg-type]
        np.testing.assert_allclose(
            actual, np.asarray(expected), atol=1e-5 * (1 + np.abs(maps).max()), err_msg=method
        )


# --- the fast paths of the NumPy stage: same numbers as the plain definitions ---------------


@st.composite
def channels_last_arrays(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Activations and gradients in channels-last memory, seen channels-first (Keras, Flax)."""
    activations, gradients = draw(layer_arrays())
    as_last_a = np.ascontiguousarray(np.moveaxis(activations, 1, -1))
    as_last_g = np.ascontiguousarray(np.moveaxis(gradients, 2, -1))
    return np.moveaxis(as_last_a, -1, 1), np.moveaxis(as_last_g, -1, 2)


@given(channels_last_arrays())
def test_strided_layouts_give_the_contiguous_results(
    arrays: tuple[np.ndarray, np.ndarray],
) -> None:
    activations, gradients = arrays
    weights = algebra.channel_weights(gradients)
    contiguous = algebra.channel_weights(np.ascontiguousarray(gradients))
    spatial_axes = tuple(range(3, gradients.ndim))
    exact = gradients.astype(np.float64).mean(axis=spatial_axes)
    scale = 1 + np.abs(gradients).max()
    assert weights.dtype == np.float32 and weights.shape == gradients.shape[:3]
    np.testing.assert_allclose(weights, exact, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(weights, contiguous, rtol=1e-5, atol=1e-6 * scale)
    summed = algebra.weighted_sum(activations, weights)
    expected = algebra.weighted_sum(np.ascontiguousarray(activations), weights)
    assert summed.dtype == np.float32 and summed.flags.c_contiguous
    np.testing.assert_allclose(
        summed, expected, rtol=1e-5, atol=1e-5 * (1 + np.abs(expected).max())
    )


def test_channel_weights_are_accurate_on_large_maps() -> None:
    rng = np.random.default_rng(0)
    gradients = rng.standard_normal((2, 3, 8, 56, 56)).astype(np.float32) + 10
    exact = gradients.astype(np.float64).mean(axis=(3, 4))
    strided = np.moveaxis(np.ascontiguousarray(np.moveaxis(gradients, 2, -1)), -1, 2)
    for grads in (gradients, strided):
        np.testing.assert_allclose(algebra.channel_weights(grads), exact, rtol=1e-6)


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=5), elements=finite))
def test_normalize_in_place_equals_a_new_array(maps: np.ndarray) -> None:
    spatial = maps.ndim - 2
    fresh = algebra.normalize(maps, spatial)
    copy = maps.copy()
    in_place = algebra.normalize(copy, spatial, out=copy)
    assert in_place is copy
    np.testing.assert_array_equal(in_place, fresh)


@settings(max_examples=200)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=3, max_dims=4, min_side=1, max_side=6),
        elements=st.floats(-HUGE, HUGE, allow_nan=False, width=32),
    )
)
def test_normalize_needs_no_clip(maps: np.ndarray) -> None:
    """Every quotient lies in [0, 1] and the maximum of a wide map is exactly 1."""
    spatial = maps.ndim - 2
    out = algebra.normalize(maps, spatial)
    assert (out >= 0).all() and (out <= 1).all()
    flat = maps.reshape(*maps.shape[:2], -1).astype(np.float64)
    span, top = np.ptp(flat, axis=-1), np.abs(flat).max(axis=-1)
    wide = span > algebra.CONSTANT_RTOL * top
    assert (out.reshape(*out.shape[:2], -1).max(axis=-1)[wide] == 1.0).all()


@given(
    st.integers(1, 3),
    st.integers(1, 5),
    st.lists(st.integers(1, 6), min_size=2, max_size=3),
    st.sampled_from(["channels_first", "channels_last"]),
)
def test_layout_guess_reads_the_swapped_shape_without_moving_data(
    n: int, k: int, spatial: list[int], native: str
) -> None:
    from multicam.backends.base import LayerGradients
    from multicam.cam import _swapped_shape, swap_layout

    activations = np.zeros((n, k, *spatial), np.float32)
    gradients = np.zeros((n, 1, k, *spatial), np.float32)
    layer = LayerGradients(activations, gradients, np.zeros((n, 1), np.float32), None, None)
    moved = swap_layout(layer, native).activations.shape
    assert _swapped_shape(activations.shape, native) == moved
