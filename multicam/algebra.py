"""The Grad-CAM algebra in pure NumPy: pool, weigh, rectify, resize, normalise.

This module imports no framework and never loops over images: every function is
vectorised over the batch N, the targets T and the channels K, for any number of spatial
dims S (1-D signals, 2-D images, 3-D volumes). The canonical layout is channels-first:
activations ``(N, K, *S)``, gradients ``(N, T, K, *S)``, maps ``(N, T, *S)``.

Resizing follows one convention, written down so results can be compared across
frameworks: ``"linear"`` (alias ``"bilinear"``, ``"trilinear"``) samples at half-pixel
centres and clamps at the borders, which equals
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` everywhere,
``tf.image.resize(method="bilinear")`` everywhere, and ``jax.image.resize(method="linear")``
when upsampling (JAX antialiases when downsampling; multicam does not).
``"nearest"`` samples the source pixel whose half-pixel cell holds the target centre
(torch's ``"nearest-exact"``, TensorFlow's and JAX's ``"nearest"``).
``align_corners=True`` maps the corner pixels' centres onto each other instead
(``torch``'s ``align_corners=True``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "channel_weights",
    "interpolation_matrix",
    "normalize",
    "relu",
    "resize",
    "weighted_sum",
]

Interpolation = Literal["linear", "bilinear", "trilinear", "nearest"]
_LINEAR = ("linear", "bilinear", "trilinear")


def channel_weights(gradients: np.ndarray, pooling: Literal["mean"] = "mean") -> np.ndarray:
    """Pool gradients over space into one weight per target and channel.

    Args:
        gradients: ``(N, T, K, *S)`` d score / d activations.
        pooling: ``"mean"`` (Grad-CAM: global average of the gradients).

    Returns:
        ``(N, T, K)`` float32 channel weights alpha.

    Example:
        >>> channel_weights(np.ones((1, 1, 2, 3, 3))).tolist()
        [[[1.0, 1.0]]]
    """
    if pooling != "mean":
        raise ValueError(f"unknown pooling {pooling!r}; expected 'mean'")
    n, t, k = gradients.shape[:3]
    flat = gradients.reshape(n, t, k, -1).astype(np.float32, copy=False)
    positions = flat.shape[3]
    if positions == 1 or flat.strides[3] == flat.itemsize:
        # Contiguous spatial axis (channels-first, whatever the order of N and T in memory,
        # e.g. torch's (T, N, ...) batched gradients seen as (N, T, ...)): einsum's
        # single-threaded SIMD sum reads the gradients once, in place. At 21 MB of
        # gradients (N=32, T=10, K=64, 16x16) 0.47 ms against 0.86 ms for the BLAS
        # matrix-vector product below and 1.1 ms for sum(-1); as accurate (1.2e-7 relative
        # to a float64 sum, like BLAS).
        sums = np.einsum("ntkp->ntk", flat)
    else:
        # Strided spatial axis (channels-last memory seen channels-first, from Keras or
        # Flax, where NumPy's mean and einsum take their slow paths): matrix-vector
        # products with a vector of ones, BLAS reads the gradients once, in place, 1.9x
        # faster than mean().
        sums = np.matmul(flat, np.ones(positions, np.float32))
    return np.divide(sums, np.float32(positions), dtype=np.float32)


def weighted_sum(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum of the activation maps weighted per target: ``sum_k weights[n,t,k] * A[n,k]``.

    Args:
        activations: ``(N, K, *S)``.
        weights: ``(N, T, K)``.

    Returns:
        ``(N, T, *S)`` float32 signed map.
    """
    n, k = activations.shape[:2]
    t = weights.shape[1]
    spatial = activations.shape[2:]
    flat = activations.reshape(n, k, -1).astype(np.float32, copy=False)
    weights = weights.astype(np.float32, copy=False)
    if k > 1 and flat.shape[2] > 1 and flat.strides[1] == flat.itemsize:
        # Channels-last memory seen channels-first (Keras, Flax): (N, P, K) @ (N, K, T)
        # reads the activations in place and transposes only the small (N, P, T) result,
        # 2x faster than NumPy's matmul on the strided (N, K, P) view.
        by_position = np.matmul(flat.transpose(0, 2, 1), weights.transpose(0, 2, 1).copy())
        return np.ascontiguousarray(by_position.transpose(0, 2, 1)).reshape(n, t, *spatial)
    # One batched matrix product (N, T, K) @ (N, K, P): BLAS does the work.
    return np.matmul(weights, flat).reshape(n, t, *spatial)


def relu(maps: np.ndarray) -> np.ndarray:
    """Keep the positive evidence: ``max(maps, 0)``."""
    return np.maximum(maps, 0, dtype=np.float32)


def interpolation_matrix(
    in_size: int,
    out_size: int,
    method: Interpolation = "linear",
    align_corners: bool = False,
) -> np.ndarray:
    """The ``(out_size, in_size)`` matrix that resizes one axis.

    Args:
        in_size: source length along the axis.
        out_size: target length.
        method: ``"linear"`` (``"bilinear"``, ``"trilinear"``) or ``"nearest"``.
        align_corners: map corner pixel centres onto each other (linear only).

    Returns:
        float64 matrix ``M`` with ``resized = M @ source`` along that axis; rows sum to 1.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"cannot resize an axis of length {in_size} to {out_size}")
    dst = np.arange(out_size, dtype=np.float64)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    if method == "nearest":
        if align_corners:
            raise ValueError("align_corners=True applies to linear interpolation only")
        nearest = np.floor((dst + 0.5) * (in_size / out_size)).astype(np.int64)
        matrix[rows, np.minimum(nearest, in_size - 1)] = 1.0
        return matrix
    if method not in _LINEAR:
        raise ValueError(f"unknown interpolation {method!r}; expected 'linear' or 'nearest'")
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        src = np.clip((dst + 0.5) * (in_size / out_size) - 0.5, 0.0, None)
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = src - lower
    np.add.at(matrix, (rows, lower), 1.0 - frac)
    np.add.at(matrix, (rows, upper), frac)
    return matrix


@functools.lru_cache(maxsize=256)
def _float32_matrix(in_size: int, out_size: int, method: str, align_corners: bool) -> np.ndarray:
    """A cached, read-only float32 :func:`interpolation_matrix` (calls repeat the shapes)."""
    matrix = interpolation_matrix(in_size, out_size, method, align_corners).astype(np.float32)  # type: ignore[arg-type]
    matrix.flags.writeable = False
    return matrix


@functools.lru_cache(maxsize=256)
def _float32_matrix_t(in_size: int, out_size: int, method: str, align_corners: bool) -> np.ndarray:
    """The transpose of :func:`_float32_matrix`, C-contiguous and cached.

    ``(..., s) @ (s, t)`` then runs as plain BLAS; on the transposed view NumPy's matmul is
    1.5x slower.
    """
    matrix = np.ascontiguousarray(_float32_matrix(in_size, out_size, method, align_corners).T)
    matrix.flags.writeable = False
    return matrix


def resize(
    maps: np.ndarray,
    size: Sequence[int],
    method: Interpolation = "linear",
    align_corners: bool = False,
) -> np.ndarray:
    """Resize the trailing ``len(size)`` axes of ``maps`` to ``size``.

    Separable: one small matrix product per spatial axis, batched over all leading axes.

    Args:
        maps: ``(..., *S)``, e.g. ``(N, T, H, W)``.
        size: the target ``S_out``, same length as ``S``.
        method: ``"linear"`` (``"bilinear"``, ``"trilinear"``) or ``"nearest"``.
        align_corners: see :func:`interpolation_matrix`.

    Returns:
        ``(..., *S_out)`` float32.

    Example:
        >>> resize(np.array([[0.0, 1.0]]), (4,)).tolist()
        [[0.0, 0.25, 0.75, 1.0]]
    """
    size = tuple(int(s) for s in size)
    ndim = len(size)
    if ndim == 0 or ndim > maps.ndim:
        raise ValueError(f"size {size} does not fit maps of shape {maps.shape}")
    out = maps.astype(np.float32, copy=False)
    for axis, target in zip(range(maps.ndim - ndim, maps.ndim), size, strict=True):
        source = out.shape[axis]
        if source == target:
            continue
        matrix = _float32_matrix(source, target, method, align_corners)
        if axis == out.ndim - 1:  # (..., s) @ (s, t)
            # The contiguous transpose: 1.5x faster than ``out @ matrix.T`` (320 maps,
            # 64x16 -> 64x64). Kept a batch of small products, not one product of all rows
            # (20 % faster alone): OpenBLAS runs a large product on every core and its
            # threads then spin for a while, taking the cores from the framework's own
            # threads in the next call (measured: 2.5 ms more for the next torch forward on
            # 2 cores); each small product runs on one thread.
            out = out @ _float32_matrix_t(source, target, method, align_corners)
        elif axis == out.ndim - 2:  # (t, s) @ (..., s, w)
            out = matrix @ out
        else:  # move the axis last, multiply, move it back
            out = np.moveaxis(np.moveaxis(out, axis, -1) @ matrix.T, -1, axis)
    return np.ascontiguousarray(out)


#: Default relative tolerance of :func:`normalize`: a map whose range is at most this
#: fraction of its largest absolute value is constant up to float32 round-off (4 ulps).
CONSTANT_RTOL = float(4 * np.finfo(np.float32).eps)


def normalize(
    maps: np.ndarray,
    spatial_dims: int,
    eps: float = CONSTANT_RTOL,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Min-max normalise each map to ``[0, 1]`` over its trailing ``spatial_dims`` axes.

    Scale-free: ``normalize(c * maps) == normalize(maps)`` for every ``c > 0`` from 1e-30 to
    1e30 (Grad-CAM is homogeneous in the activations' scale, and a randomly initialised
    network can have activations near 1e-13). A map is constant, and becomes all zeros
    (never NaN), only when its range is at most ``eps`` times its own largest absolute
    value: all zero after the ReLU, or flat within a few float32 ulps.

    Args:
        maps: ``(..., *S)``.
        spatial_dims: ``len(S)``.
        eps: relative tolerance: a range at most ``eps * max|map|`` counts as constant.
        out: where to write the result, a float32 array of the same shape; ``out=maps``
            normalises a float32 ``maps`` in place, saving one pass over memory and one
            allocation. Default: a new array.

    Returns:
        float32 array of the same shape, each map in ``[0, 1]`` (``out`` when given).

    Example:
        >>> m = np.array([[0.0, 1e-13], [2e-13, 4e-13]])
        >>> normalize(m, 2).tolist()
        [[0.0, 0.25], [0.5, 1.0]]
        >>> normalize(np.full((2, 2), 3.0), 2).tolist()
        [[0.0, 0.0], [0.0, 0.0]]
    """
    axes = tuple(range(maps.ndim - spatial_dims, maps.ndim))
    low = maps.min(axis=axes, keepdims=True).astype(np.float64)
    high = maps.max(axis=axes, keepdims=True).astype(np.float64)
    span = high - low
    magnitude = np.maximum(np.abs(low), np.abs(high))
    wide = span > eps * magnitude
    # Divide rather than multiply by a reciprocal: exact at the ends (the maximum maps to
    # 1.0), and no overflow for a subnormal span. Flat maps divide by 1, then become zeros.
    # The divisor is high - low rounded once in float32, like every x - low: rounding is
    # monotonic, so 0 <= fl(x - low) <= fl(high - low) and each quotient lies in [0, 1]
    # without a clip (one pass fewer over the output).
    low32, high32 = low.astype(np.float32), high.astype(np.float32)
    divisor = np.where(wide, np.subtract(high32, low32, dtype=np.float32), np.float32(1.0))
    shifted = low32 != 0
    maps_count = shifted.size
    if maps_count > 1 and not shifted.all() and maps.flags.c_contiguous and maps.size:
        # Most maps' minimum is 0 after the ReLU (9 in 10 on gap64), and x - 0 is x: those
        # are only divided, one pass fewer over them; the others are taken out first (``out``
        # may be ``maps``) and shifted as below, so every value is the same as there.
        rows = np.flatnonzero(shifted)
        flat = maps.reshape(maps_count, -1)
        taken = flat[rows]
        out = np.divide(maps, divisor, out=out, dtype=np.float32)
        if rows.size:
            low_rows = low32.reshape(maps_count, 1)[rows]
            divisor_rows = divisor.reshape(maps_count, 1)[rows]
            moved = np.subtract(taken, low_rows, dtype=np.float32)
            out.reshape(maps_count, -1)[rows] = np.divide(moved, divisor_rows, out=moved)
    else:
        out = np.subtract(maps, low32, out=out, dtype=np.float32)
        np.divide(out, divisor, out=out)
    if not wide.all():
        out *= wide
    return out


# --- The gradient-weighted relatives of Grad-CAM -------------------------------------------
# Each takes activations (N, K, *S) and gradients (N, T, K, *S) and returns (N, T, K)
# channel weights or an (N, T, *S) signed map; none loops over samples or targets.


def _spatial_sum(array: np.ndarray, start: int) -> np.ndarray:
    """Sum over the axes from ``start`` on (the spatial ones), in float64."""
    return array.reshape(*array.shape[:start], -1).sum(axis=-1, dtype=np.float64)


def xgradcam_weights(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """XGrad-CAM (Fu et al., 2020): gradients averaged with the activations as weights.

    ``w_k = sum_ij (A_k^ij / sum_ab A_k^ab) dS/dA_k^ij``; a channel whose activations sum
    to zero gets weight 0.

    Returns:
        ``(N, T, K)`` float32.
    """
    totals = _spatial_sum(activations, 2)  # (N, K)
    weighted = _spatial_sum(gradients * activations[:, None], 3)  # (N, T, K)
    safe = np.where(totals == 0, 1.0, totals)[:, None, :]
    return np.where(totals[:, None, :] == 0, 0.0, weighted / safe).astype(np.float32)


def gradcam_plus_plus_weights(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM++ (Chattopadhay et al., 2018), exponential-output form.

    The paper's weights are ``w_k = sum_ij alpha_k^ij relu(dY/dA_k^ij)`` with
    ``alpha = d2Y / (2 d2Y + sum_ab A_k^ab d3Y)`` for the network output ``Y``. With
    ``Y = exp(S)`` (the paper's choice, eq. 17-19) the higher derivatives are powers of the
    first, ``exp(S)`` cancels, and ``alpha = g^2 / (2 g^2 + sum_ab A_k^ab g^3)`` with
    ``g = dS/dA``; positions where the denominator is 0 get ``alpha = 0``. Like every public
    implementation, the weights use ``relu(g)`` for ``relu(dY/dA) = exp(S) relu(g)``: the
    dropped factor ``exp(S) > 0`` scales each target's map without changing its shape.
    :func:`gradcam_plus_plus_general_weights` takes the derivatives of any ``Y``.

    Returns:
        ``(N, T, K)`` float32.
    """
    g = gradients.astype(np.float64)
    return gradcam_plus_plus_general_weights(activations, g, g**2, g**3)


def gradcam_plus_plus_general_weights(
    activations: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    third: np.ndarray,
) -> np.ndarray:
    """Grad-CAM++ with the paper's general weights, from explicit derivatives of ``Y``.

    ``alpha_k^ij = second / (2 second + (sum_ab A_k^ab) third)`` (0 where the denominator
    is 0), ``w_k = sum_ij alpha_k^ij relu(first)``, where ``first``, ``second`` and
    ``third`` are ``dY/dA``, ``d2Y/dA2`` and ``d3Y/dA3`` element-wise (the paper's
    eq. 10), all ``(N, T, K, *S)``.

    Returns:
        ``(N, T, K)`` float32.
    """
    totals = _spatial_sum(activations, 2)[:, None, :]  # (N, 1, K)
    totals = totals.reshape(*totals.shape, *([1] * (first.ndim - 3)))
    denominator = 2 * second + totals * third
    alpha = np.divide(
        second,
        denominator,
        out=np.zeros(np.broadcast_shapes(second.shape, denominator.shape)),
        where=denominator != 0,
    )
    return _spatial_sum(alpha * np.maximum(first, 0), 3).astype(np.float32)


def elementwise_map(activations: np.ndarray, gradients: np.ndarray, rule: str) -> np.ndarray:
    """Maps that weigh every position by its own gradient, not the channel mean.

    Args:
        activations: ``(N, K, *S)``.
        gradients: ``(N, T, K, *S)``.
        rule: ``"hirescam"`` (Draelos & Carin, 2020): ``sum_k g_k * A_k``;
            ``"layercam"`` (Jiang et al., 2021): ``sum_k relu(g_k) * A_k``;
            ``"gradcam_elementwise"``: ``sum_k relu(g_k * A_k)``.

    Returns:
        ``(N, T, *S)`` float32 signed map (``layercam`` and ``gradcam_elementwise`` are
        non-negative whenever the activations are).
    """
    products = {
        "hirescam": lambda: gradients * activations[:, None],
        "layercam": lambda: np.maximum(gradients, 0) * activations[:, None],
        "gradcam_elementwise": lambda: np.maximum(gradients * activations[:, None], 0),
    }
    if rule not in products:
        raise ValueError(f"unknown rule {rule!r}; expected one of {sorted(products)}")
    return products[rule]().sum(axis=2, dtype=np.float64).astype(np.float32)


def principal_axis(activations: np.ndarray) -> np.ndarray:
    """Eigen-CAM's weights (Muhammad & Yeasin, 2020): the first principal axis over channels.

    Per sample, the ``(P, K)`` matrix of positions x channels is centred over positions and
    decomposed by SVD; the weights are its first right singular vector, so the Eigen-CAM map
    ``sum_k v_k A_k`` is the (uncentred) activations projected on that axis. The SVD's sign
    is arbitrary; it is fixed so that the map sums to a non-negative value, which makes the
    result the same in every framework and run.

    Returns:
        ``(N, K)`` float32 unit vectors.
    """
    flat = activations.reshape(*activations.shape[:2], -1).transpose(0, 2, 1)  # (N, P, K)
    flat = flat.astype(np.float64)
    _, _, vt = np.linalg.svd(flat - flat.mean(axis=1, keepdims=True), full_matrices=False)
    axis = vt[:, 0, :]
    total = np.einsum("npk,nk->n", flat, axis)
    return (axis * np.where(total < 0, -1.0, 1.0)[:, None]).astype(np.float32)


def eigen_smooth(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Eigen smoothing (as in pytorch-grad-cam): weighted maps along their first axis.

    Instead of summing the weighted activation maps ``w_k A_k``, per sample and target
    their ``(P, K)`` matrix is decomposed like :func:`principal_axis` and projected on its
    first axis; the sign is chosen to agree with the plain weighted sum (their dot product
    is non-negative).

    Args:
        activations: ``(N, K, *S)``.
        weights: ``(N, T, K)``.

    Returns:
        ``(N, T, *S)`` float32.
    """
    n, k = activations.shape[:2]
    t = weights.shape[1]
    spatial = activations.shape[2:]
    flat = activations.reshape(n, 1, k, -1).astype(np.float64) * weights[..., None]
    flat = flat.reshape(n * t, k, -1).transpose(0, 2, 1)  # (N T, P, K)
    _, _, vt = np.linalg.svd(flat - flat.mean(axis=1, keepdims=True), full_matrices=False)
    projection = np.einsum("bpk,bk->bp", flat, vt[:, 0, :])
    plain = flat.sum(axis=2)
    sign = np.where((projection * plain).sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    return (projection * sign).reshape(n, t, *spatial).astype(np.float32)
