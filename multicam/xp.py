"""The Grad-CAM algebra on the framework's own arrays, wherever they live.

:mod:`multicam.algebra` is the reference: NumPy, tuned for the CPU. This module computes
the same functions, with the same names and arguments (``normalize`` has no ``out=``:
arrays here may be immutable), written once against the Python
array API standard through ``array-api-compat`` (which gives torch, JAX, CuPy and NumPy
the standard's namespace), so that ``algebra="native"`` keeps a model's activations,
gradients and maps on its accelerator: nothing crosses to the host but a few flags
(finiteness, and the ``(N, T)`` blank-map flags). Every function agrees with its
namesake in :mod:`multicam.algebra` to float32 round-off (``tests/test_native_algebra.py``).

Precision follows the reference: statistics and accumulations that it computes in float64
are computed in float64 where the namespace has it on the array's device, else in float32
(JAX without ``jax_enable_x64``, torch on Apple's MPS). XLA flushes subnormal floats to
zero, so JAX maps can differ from NumPy's where values fall below 1.2e-38.

``array-api-compat`` is imported on first use, never by ``import multicam``; the ``torch``
and ``jax`` extras install it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import algebra
from .algebra import CONSTANT_RTOL
from .backends.base import LayerGradients, canonical_arrays, input_spatial_shape
from .backends.base import check_finite as check_finite_numpy
from .errors import BackendNotInstalledError

__all__ = [
    "CONSTANT_RTOL",
    "blank_maps",
    "channel_weights",
    "check_finite",
    "eigen_smooth",
    "elementwise_map",
    "gradcam_plus_plus_general_weights",
    "gradcam_plus_plus_weights",
    "is_numpy",
    "general_weights_from_derivatives",
    "make_layer_gradients",
    "mean_of",
    "namespace",
    "normalize",
    "principal_axis",
    "relu",
    "resize",
    "to_numpy",
    "weighted_sum",
    "xgradcam_weights",
]


def _compat() -> Any:
    try:
        import array_api_compat
    except ImportError as exc:
        raise BackendNotInstalledError(
            "algebra='native' computes on the framework's own arrays through "
            "array-api-compat, which is not installed: pip install array-api-compat (the "
            "'multicam-xai[torch]' and '[jax]' extras include it), or use algebra='numpy'."
        ) from exc
    return array_api_compat


def namespace(*arrays: Any) -> Any:
    """The array-API namespace of ``arrays`` (e.g. ``array_api_compat.torch``)."""
    return _compat().array_namespace(*arrays)


def is_numpy(array: Any) -> bool:
    """Whether ``array`` is a NumPy array (the reference path), found without importing."""
    return isinstance(array, np.ndarray)


def to_numpy(array: Any) -> Any:
    """``array`` as a NumPy array on the host; NumPy arrays and ``None`` pass unchanged."""
    if array is None or isinstance(array, np.ndarray):
        return array
    compat = _compat()
    if compat.is_torch_array(array):
        return array.detach().cpu().numpy()
    if compat.is_cupy_array(array):
        return array.get()
    return np.asarray(array)


def _device(array: Any) -> Any:
    return _compat().device(array)


_FLOAT64: dict[tuple[str, str], bool] = {}


def _wide_dtype(xp: Any, device: Any) -> Any:
    """float64 where the namespace computes it on ``device``, else float32."""
    key = (xp.__name__, str(device))
    if key not in _FLOAT64:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # JAX warns, and truncates, without x64
                probe = xp.astype(xp.zeros(1, dtype=xp.float32, device=device), xp.float64)
            _FLOAT64[key] = probe.dtype == xp.float64
        except (TypeError, RuntimeError, ValueError):  # e.g. torch on MPS
            _FLOAT64[key] = False
    return xp.float64 if _FLOAT64[key] else xp.float32


def _float32(xp: Any, array: Any) -> Any:
    return array if array.dtype == xp.float32 else xp.astype(array, xp.float32)


def _sum(xp: Any, array: Any, axis: Any, dtype: Any) -> Any:
    """Sum in ``dtype`` (float64 accumulation where available, as the reference does)."""
    if dtype == xp.float32:
        return xp.sum(array, axis=axis, dtype=xp.float32)
    return xp.sum(xp.astype(array, dtype), axis=axis)


# --- the algebra, as in multicam.algebra -----------------------------------------------------


def channel_weights(gradients: Any, pooling: str = "mean") -> Any:
    """``(N, T, K)`` float32 spatial mean of ``gradients`` ``(N, T, K, *S)``."""
    if pooling != "mean":
        raise ValueError(f"unknown pooling {pooling!r}; expected 'mean'")
    xp = namespace(gradients)
    n, t, k = gradients.shape[:3]
    flat = xp.reshape(_float32(xp, gradients), (n, t, k, -1))
    return xp.mean(flat, axis=3)


def weighted_sum(activations: Any, weights: Any) -> Any:
    """``(N, T, *S)`` float32 ``sum_k weights[n, t, k] * activations[n, k]``."""
    xp = namespace(activations, weights)
    n, k = activations.shape[:2]
    flat = xp.reshape(_float32(xp, activations), (n, k, -1))
    summed = xp.matmul(_float32(xp, weights), flat)
    return xp.reshape(summed, (n, weights.shape[1], *activations.shape[2:]))


def relu(maps: Any) -> Any:
    """``max(maps, 0)`` in float32."""
    xp = namespace(maps)
    return xp.clip(_float32(xp, maps), min=0.0)


_MATRICES: dict[tuple[Any, ...], Any] = {}


def _matrix(xp: Any, device: Any, source: int, target: int, method: str, corners: bool) -> Any:
    """:func:`multicam.algebra.interpolation_matrix`, transposed, on ``device`` (cached)."""
    key = (xp.__name__, str(device), source, target, method, corners)
    matrix = _MATRICES.get(key)
    if matrix is None:
        if len(_MATRICES) > 256:
            _MATRICES.clear()
        host = algebra._float32_matrix(source, target, method, corners)
        matrix = _MATRICES[key] = xp.asarray(host.T.copy(), device=device)
    return matrix


def resize(
    maps: Any,
    size: Sequence[int],
    method: str = "linear",
    align_corners: bool = False,
) -> Any:
    """Resize the trailing ``len(size)`` axes to ``size``, as :func:`multicam.algebra.resize`."""
    xp = namespace(maps)
    size = tuple(int(s) for s in size)
    ndim = len(size)
    if ndim == 0 or ndim > maps.ndim:
        raise ValueError(f"size {size} does not fit maps of shape {tuple(maps.shape)}")
    device = _device(maps)
    out = _float32(xp, maps)
    for axis, target in zip(range(maps.ndim - ndim, maps.ndim), size, strict=True):
        source = out.shape[axis]
        if source == target:
            continue
        transposed = _matrix(xp, device, source, target, method, align_corners)  # (s, t)
        if axis == out.ndim - 1:  # (..., s) @ (s, t)
            out = xp.matmul(out, transposed)
        elif axis == out.ndim - 2:  # (t, s) @ (..., s, w)
            out = xp.matmul(xp.permute_dims(transposed, (1, 0)), out)
        else:  # move the axis last, multiply, move it back
            out = xp.moveaxis(xp.matmul(xp.moveaxis(out, axis, -1), transposed), -1, axis)
    return out


def normalize(maps: Any, spatial_dims: int, eps: float = CONSTANT_RTOL) -> Any:
    """Min-max normalise each map to ``[0, 1]``, as :func:`multicam.algebra.normalize`."""
    xp = namespace(maps)
    maps = _float32(xp, maps)
    shape = tuple(maps.shape)
    lead = shape[: maps.ndim - spatial_dims]
    flat = xp.reshape(maps, (*lead, -1))
    low = xp.min(flat, axis=-1, keepdims=True)
    high = xp.max(flat, axis=-1, keepdims=True)
    wide_dtype = _wide_dtype(xp, _device(maps))
    low_w, high_w = xp.astype(low, wide_dtype), xp.astype(high, wide_dtype)
    magnitude = xp.maximum(xp.abs(low_w), xp.abs(high_w))
    wide = (high_w - low_w) > eps * magnitude
    # As the reference: divide by high - low rounded once in float32; flat maps become
    # zeros. The clip costs one pass the reference does without: its proof that every
    # quotient lies in [0, 1] needs IEEE division, which an accelerator's compiler may
    # relax (XLA's CPU backend divides to within an ulp).
    divisor = xp.where(wide, high - low, xp.ones_like(high))
    out = xp.where(wide, (flat - low) / divisor, xp.zeros_like(flat))
    return xp.reshape(xp.clip(out, 0.0, 1.0), shape)


def blank_maps(raw: Any) -> np.ndarray:
    """``(N, T)`` NumPy bool: maps with no positive value (one small copy to the host)."""
    xp = namespace(raw)
    peak = xp.max(xp.reshape(raw, (*raw.shape[:2], -1)), axis=-1)
    return np.asarray(to_numpy(peak <= 0), dtype=bool)


def check_finite(arrays: dict[str, Any]) -> None:
    """Raise :class:`~multicam.errors.NonFiniteError` if an array holds NaN or Inf.

    ``{what: array}``; one reduction per array on its device and one transfer of the flags:
    a sum is finite only when every term is (NaN and Inf propagate through sums), so only
    an array whose sum is not finite (or overflows) is checked element by element, on the
    host, for the reference's message.
    """
    items = [(what, a) for what, a in arrays.items() if _is_real_float(a)]
    if not items:
        return
    xp = namespace(*(a for _, a in items))
    sums = xp.stack([xp.sum(_float32(xp, xp.reshape(a, (-1,)))) for _, a in items])
    finite = np.asarray(to_numpy(xp.isfinite(sums)), dtype=bool)
    for (what, array), ok in zip(items, finite, strict=True):
        if not ok:
            check_finite_numpy(np.asarray(to_numpy(array), dtype=np.float32), what)


def _is_real_float(array: Any) -> bool:
    """Whether ``array`` holds real floating-point numbers."""
    xp = namespace(array)
    return bool(xp.isdtype(array.dtype, "real floating"))


# --- the relatives, as in multicam.algebra -------------------------------------------------


def _spatial_sum(xp: Any, array: Any, start: int, dtype: Any) -> Any:
    flat = xp.reshape(array, (*array.shape[:start], -1))
    return _sum(xp, flat, -1, dtype)


def xgradcam_weights(activations: Any, gradients: Any) -> Any:
    """XGrad-CAM's ``(N, T, K)`` weights, as :func:`multicam.algebra.xgradcam_weights`."""
    xp = namespace(activations, gradients)
    wide = _wide_dtype(xp, _device(gradients))
    totals = _spatial_sum(xp, activations, 2, wide)  # (N, K)
    weighted = _spatial_sum(xp, gradients * activations[:, None, ...], 3, wide)  # (N, T, K)
    zero = totals == 0
    safe = xp.where(zero, 1.0, totals)[:, None, :]
    return xp.astype(xp.where(zero[:, None, :], 0.0, weighted / safe), xp.float32)


def gradcam_plus_plus_weights(activations: Any, gradients: Any) -> Any:
    """Grad-CAM++ (``Y = exp(S)``), as :func:`multicam.algebra.gradcam_plus_plus_weights`."""
    xp = namespace(activations, gradients)
    g = xp.astype(gradients, _wide_dtype(xp, _device(gradients)))
    return gradcam_plus_plus_general_weights(activations, g, g**2, g**3)


def gradcam_plus_plus_general_weights(activations: Any, first: Any, second: Any, third: Any) -> Any:
    """Grad-CAM++'s general weights, as in :mod:`multicam.algebra`; ``(N, T, K)`` float32."""
    xp = namespace(activations, first, second, third)
    wide = _wide_dtype(xp, _device(first))
    totals = _spatial_sum(xp, activations, 2, wide)[:, None, :]  # (N, 1, K)
    totals = xp.reshape(totals, (*totals.shape, *([1] * (first.ndim - 3))))
    second, third = xp.astype(second, wide), xp.astype(third, wide)
    denominator = 2 * second + totals * third
    nonzero = denominator != 0
    alpha = xp.where(nonzero, second / xp.where(nonzero, denominator, 1.0), 0.0)
    positive = xp.clip(xp.astype(first, wide), min=0.0)
    return xp.astype(_spatial_sum(xp, alpha * positive, 3, wide), xp.float32)


def general_weights_from_derivatives(
    activations: Any, gradients: Any, derivatives: Sequence[np.ndarray]
) -> Any:
    """Grad-CAM++ general weights from the NumPy derivatives (f1, f2, f3) of ``Y = f(S)``.

    Each derivative is ``(N, T, 1, *1)`` float64 NumPy (what the output function returned,
    reshaped); they go to the gradients' device, as in ``GradCAMPlusPlus.channel_weights``.
    """
    xp = namespace(activations, gradients)
    device = _device(gradients)
    wide = _wide_dtype(xp, device)
    g = xp.astype(gradients, wide)
    first, second, third = (
        xp.asarray(np.asarray(d, np.float64), dtype=wide, device=device) * g**power
        for power, d in enumerate(derivatives, 1)
    )
    return gradcam_plus_plus_general_weights(activations, first, second, third)


def mean_of(arrays: Sequence[Any]) -> Any:
    """The float32 mean of equally shaped arrays, accumulated as the reference does."""
    xp = namespace(*arrays)
    stacked = xp.stack(list(arrays))
    wide = _wide_dtype(xp, _device(stacked))
    return xp.astype(xp.mean(xp.astype(stacked, wide), axis=0), xp.float32)


def elementwise_map(activations: Any, gradients: Any, rule: str) -> Any:
    """HiResCAM, LayerCAM, element-wise Grad-CAM maps, as in :mod:`multicam.algebra`."""
    xp = namespace(activations, gradients)
    expanded = activations[:, None, ...]
    if rule == "hirescam":
        products = gradients * expanded
    elif rule == "layercam":
        products = xp.clip(gradients, min=0.0) * expanded
    elif rule == "gradcam_elementwise":
        products = xp.clip(gradients * expanded, min=0.0)
    else:
        raise ValueError(
            f"unknown rule {rule!r}; expected one of "
            "['gradcam_elementwise', 'hirescam', 'layercam']"
        )
    wide = _wide_dtype(xp, _device(gradients))
    return xp.astype(_sum(xp, products, 2, wide), xp.float32)


def _first_axis(xp: Any, flat: Any) -> Any:
    """``(B, K)``: the first right singular vector of each centred ``(B, P, K)`` matrix."""
    centred = flat - xp.mean(flat, axis=1, keepdims=True)
    vt = xp.linalg.svd(centred, full_matrices=False)[2]
    return vt[:, 0, :]


def principal_axis(activations: Any) -> Any:
    """Eigen-CAM's ``(N, K)`` weights, as :func:`multicam.algebra.principal_axis`."""
    xp = namespace(activations)
    n, k = activations.shape[:2]
    wide = _wide_dtype(xp, _device(activations))
    flat = xp.permute_dims(xp.astype(xp.reshape(activations, (n, k, -1)), wide), (0, 2, 1))
    axis = _first_axis(xp, flat)
    total = xp.sum(flat * axis[:, None, :], axis=(1, 2))
    sign = xp.where(total < 0, -1.0, 1.0)
    return xp.astype(axis * sign[:, None], xp.float32)


def eigen_smooth(activations: Any, weights: Any) -> Any:
    """Eigen smoothing, as :func:`multicam.algebra.eigen_smooth`; ``(N, T, *S)`` float32."""
    xp = namespace(activations, weights)
    n, k = activations.shape[:2]
    t = weights.shape[1]
    wide = _wide_dtype(xp, _device(activations))
    flat = (
        xp.reshape(xp.astype(activations, wide), (n, 1, k, -1))
        * xp.astype(weights, wide)[..., None]
    )
    flat = xp.permute_dims(xp.reshape(flat, (n * t, k, -1)), (0, 2, 1))  # (N T, P, K)
    axis = _first_axis(xp, flat)
    projection = xp.sum(flat * axis[:, None, :], axis=2)
    plain = xp.sum(flat, axis=2)
    sign = xp.where(xp.sum(projection * plain, axis=1, keepdims=True) < 0, -1.0, 1.0)
    return xp.astype(xp.reshape(projection * sign, (n, t, *activations.shape[2:])), xp.float32)


# --- what a backend hands back ----------------------------------------------------------------


def make_layer_gradients(
    activations: Any,
    gradients: Any,
    scores: Any,
    targets: np.ndarray | None,
    *,
    layout: str,
    input_shape: Sequence[int],
    layer_name: str,
    outputs: Any = None,
    training: Sequence[str] = (),
) -> LayerGradients:
    """:func:`multicam.backends.base.make_layer_gradients` without leaving the device.

    The same checks and messages; the arrays stay the framework's, float32, on their
    device, channels-first (a view where the framework allows).
    """
    xp = namespace(activations, gradients, scores)
    activations, gradients, scores = canonical_arrays(
        _float32(xp, activations),
        _float32(xp, gradients),
        _float32(xp, scores),
        layout=layout,
        layer_name=layer_name,
        moveaxis=xp.moveaxis,
    )
    check_finite(
        {
            f"the activations of layer {layer_name!r}": activations,
            "the target scores": scores,
            f"the gradients at layer {layer_name!r}": gradients,
        }
    )
    return LayerGradients(
        activations,
        gradients,
        scores,
        targets,
        input_spatial_shape(input_shape, layout),
        None if outputs is None else _float32(xp, outputs),
        tuple(training),
    )
