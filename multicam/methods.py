"""The peers' other CAM methods (pytorch-grad-cam 1.5, torchcam 0.5) on every backend.

One job: the methods that users of pytorch-grad-cam and torchcam know and that
:mod:`multicam.cam` and :mod:`multicam.perturbation` lack, each with GradCAM's
constructor (``model, layer, *, backend, output, reshape, layer_layout, **options``), call
(``inputs, targets, relu, normalize, size, ...``) and :class:`~multicam.cam.CAMResult`
(:class:`RefineCAM`, a multi-layer method, returns :class:`~multicam.cam.FusedResult`
like :class:`~multicam.cam.MultiLayerCAM`). Like :mod:`multicam.cam` it holds no
framework code: every method is NumPy over what a backend hands back (``gradients``, and
the optional ``outputs`` for the methods that need plain forward passes).

Constraints and conventions, the same on every backend:

- Randomness (the noise of :class:`SmoothGradCAMPlusPlus` and :class:`SSCAM`, the weights
  of :class:`RandomCAM`, the initialisation of :class:`DeepFeatureFactorization`) is drawn
  by NumPy from ``seed``, never by a framework, so the same seed gives the same maps on
  torch, Keras, linen and nnx.
- Methods whose map is not a weighted sum of the layer's channels (:class:`KPCACAM`,
  :class:`SobelCAM`, :class:`SESS`) report ``res.weights`` as zeros ``(N, T, K)``: they
  have no channel weights. They refuse ``eigen_smooth``, which needs channel weights.
- Methods that read class scores (:class:`FinerCAM`, :class:`SESS`, :class:`SSCAM`,
  :class:`ISCAM`, ``ClassActivationMap(head_weights=...)``) take class targets only
  (``None``, an int, N ints, an ``(N, T)`` array, ``"all"``).
- Every method's difference from its peer implementations is written in its docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import algebra
from .backends import Backend, LayerGradients, resolve_backend
from .backends.base import input_spatial_shape
from .cam import (
    CAM,
    CAMResult,
    EigenCAM,
    FusedResult,
    GradCAM,
    GradCAMPlusPlus,
    MultiLayerCAM,
    TokenGrid,
    _ElementWise,
    _Pass,
)
from .errors import InputError, OptionError, TargetError
from .guided import _any_layer
from .perturbation import ScoreCAM, _as_numpy, _check_batch_size, _Perturbation, _softmax
from .targets import TargetLike, Targets

__all__ = [
    "ClassActivationMap",
    "ConceptResult",
    "DeepFeatureFactorization",
    "EigenGradCAM",
    "FEM",
    "FinerCAM",
    "FullGrad",
    "ISCAM",
    "KPCACAM",
    "LeGrad",
    "RandomCAM",
    "RefineCAM",
    "SESS",
    "SSCAM",
    "ShapleyCAM",
    "SmoothGradCAMPlusPlus",
    "SobelCAM",
]

_CLASS_KINDS = ("classes", "predicted", "all")


def _require_classes(method: str, targets: Targets) -> None:
    if targets.kind not in _CLASS_KINDS:
        raise TargetError(
            f"{method} takes class targets (None, an int, N ints, an (N, T) array or 'all'), "
            f"not a {targets.kind!r} target: it reads class scores off the model's outputs. "
            "Use a gradient-based method such as GradCAM for callable or region targets."
        )


def _fixed_classes(targets: Targets, layer_gradients: LayerGradients, output: Any) -> Targets:
    """The request with ``None`` and ``"all"`` resolved to the class ids a pass chose."""
    if targets.kind in ("predicted", "all") and layer_gradients.targets is not None:
        return Targets.parse(layer_gradients.targets, targets.batch_size, output=output)
    return targets


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < 1:
        raise OptionError(f"{name}={value!r}: expected a positive int.")
    return int(value)


def _non_negative(name: str, value: Any) -> float:
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not np.isfinite(value)
        or value < 0
    ):
        raise OptionError(f"{name}={value!r}: expected a finite number >= 0.")
    return float(value)


def _no_channel_weights(layer_gradients: LayerGradients) -> np.ndarray:
    """``(N, T, K)`` zeros: the ``res.weights`` of a map that is no weighted sum."""
    n, t = layer_gradients.scores.shape
    return np.zeros((n, t, layer_gradients.activations.shape[1]), np.float32)


def _per_target(maps: np.ndarray, t: int) -> np.ndarray:
    """``(N, *S)`` maps repeated for T targets: ``(N, T, *S)`` float32."""
    return np.ascontiguousarray(np.broadcast_to(maps[:, None], (maps.shape[0], t, *maps.shape[1:])))


def _channel_axis(layout: str, ndim: int) -> int:
    return 1 if layout == "channels_first" else ndim - 1


# --- Closed-form methods on one pass ----------------------------------------------------


class ClassActivationMap(CAM):
    """CAM (Zhou et al., 2016): the classifier's weights on a global-average-pool head.

    ``map_c = sum_k W[k, c] A_k`` for a head ``score_c = sum_k W[k, c] mean(A_k) + b_c``.
    ``CAM`` is the base class of every explainer, hence the longer name.

    Without ``head_weights`` the weights come from the gradients: ``w_k = sum over space of
    dS/dA_k``, which on a GAP + linear head is ``h w * W[k, c] / (h w) = W[k, c]`` exactly,
    so the map is the paper's CAM, ``h w`` times Grad-CAM's. On any other head it is still
    ``h w`` times Grad-CAM (CAM is defined for GAP heads only), and it takes every kind of
    target. With ``head_weights`` (torchcam's way) the weights are read off the matrix.

    Args:
        model, layer, backend, **options: as for :class:`~multicam.GradCAM`.
        head_weights: ``(K, C)`` the head's kernel (Keras's and Flax's layout; for a torch
            ``nn.Linear`` pass ``fc.weight.detach().numpy().T``); class targets only.

    Peers: torchcam's ``CAM`` reads ``fc.weight[class_idx]`` (the same numbers as
    ``head_weights``); pytorch-grad-cam has no CAM.

    Example:
        >>> import multicam as mc  # doctest: +SKIP
        >>> res = mc.ClassActivationMap(model, "layer4")(x, targets=3)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        head_weights: Any = None,
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        if head_weights is not None:
            head_weights = np.asarray(_as_numpy(head_weights), np.float32)
            if head_weights.ndim != 2:
                raise OptionError(
                    f"head_weights has shape {head_weights.shape}; expected the (K, C) kernel "
                    "of the linear head (K channels of the layer, C classes)."
                )
        self.head_weights = head_weights
        super().__init__(model, layer, backend=backend, **options)

    def channel_weights(self, layer_gradients: LayerGradients) -> np.ndarray:
        gradients = layer_gradients.gradients
        n, t, k = gradients.shape[:3]
        if self.head_weights is None:
            sums = gradients.reshape(n, t, k, -1).sum(axis=-1, dtype=np.float64)
            return sums.astype(np.float32)
        classes = layer_gradients.targets
        if classes is None:
            raise TargetError("ClassActivationMap(head_weights=...) needs class targets.")
        rows, columns = self.head_weights.shape
        if rows != k:
            raise OptionError(
                f"head_weights has {rows} rows but layer {self.layer!r} has {k} channels; "
                f"pass the (K, C) kernel (a torch nn.Linear's weight is (C, K): transpose it)."
            )
        if classes.max() >= columns:
            raise TargetError(
                f"target class {int(classes.max())} is out of range: head_weights has "
                f"{columns} columns (classes)."
            )
        return np.ascontiguousarray(self.head_weights[:, classes].transpose(1, 2, 0))


class EigenGradCAM(_ElementWise):
    """Eigen-Grad-CAM: the first principal component of the products ``dS/dA_k * A_k``.

    Per sample and target, the ``(P, K)`` matrix of ``g_k A_k`` (positions x channels) is
    decomposed like :func:`multicam.algebra.principal_axis` and the (uncentred) products are
    projected on its first axis ``v``: ``map = sum_k v_k g_k A_k``, the sign fixed so that
    the map sums to a non-negative value. ``res.weights`` reports ``v_k mean(g_k)``, the
    spatial mean of the per-position weights of ``A_k``.

    Peer: pytorch-grad-cam's ``EigenGradCAM`` projects the centred matrix (the map less its
    mean along ``v``, a constant per map) and keeps the SVD's arbitrary sign; multicam
    projects uncentred as its :class:`~multicam.EigenCAM` does, with a fixed sign.
    """

    native_algebra = False

    def combine(self, layer_gradients: LayerGradients) -> tuple[np.ndarray, np.ndarray]:
        activations, gradients = layer_gradients.activations, layer_gradients.gradients
        n, t, k = gradients.shape[:3]
        spatial = gradients.shape[3:]
        products = (gradients * activations[:, None]).reshape(n * t, k, *spatial)
        axis = algebra.principal_axis(products).astype(np.float64)  # (N T, K)
        flat = products.reshape(n * t, k, -1).astype(np.float64)
        raw = np.einsum("bk,bkp->bp", axis, flat).reshape(n, t, *spatial)
        weights = axis.reshape(n, t, k) * algebra.channel_weights(gradients)
        return weights.astype(np.float32), raw.astype(np.float32)


class FEM(CAM):
    """FEM (Fuad et al., 2020): channels weighted by how often they pass a k-sigma threshold.

    Per sample and channel, ``th_k = mean(A_k) + k std(A_k)`` over space (population
    standard deviation), ``w_k = mean over space of [A_k > th_k]`` and
    ``map = sum_k w_k A_k``. Independent of the target: every target gets the same map.

    Args:
        model, layer, backend, **options: as for :class:`~multicam.GradCAM`.
        k: the number of standard deviations (default 2).

    Peer: pytorch-grad-cam's ``FEM`` (the only public implementation), the same formula;
    multicam computes the statistics in float64 (pytorch-grad-cam in the activations'
    float32), which can move a position lying on the threshold to the other side.
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        k: float = 2.0,
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        self.k = _non_negative("k", k)
        super().__init__(model, layer, backend=backend, **options)

    def channel_weights(self, layer_gradients: LayerGradients) -> np.ndarray:
        activations = layer_gradients.activations
        n, k = activations.shape[:2]
        flat = activations.reshape(n, k, -1).astype(np.float64)
        threshold = flat.mean(axis=-1, keepdims=True) + self.k * flat.std(axis=-1, keepdims=True)
        shares = (flat > threshold).mean(axis=-1)  # (N, K)
        return _per_target(shares.astype(np.float32), layer_gradients.scores.shape[1])


class RandomCAM(CAM):
    """Random-CAM: channel weights drawn uniformly from [-1, 1], a baseline for metrics.

    ``w = default_rng(seed).uniform(-1, 1, (N, T, K))``, ``map = sum_k w_k A_k``: the same
    weights for the same seed and shapes, on every backend. ``seed=None`` draws fresh
    weights on every call.

    Peer: pytorch-grad-cam's ``RandomCAM`` draws ``(N, K)`` weights from NumPy's global
    generator, unseeded.
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        seed: int | None = 0,
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        self.seed = seed
        super().__init__(model, layer, backend=backend, **options)

    def channel_weights(self, layer_gradients: LayerGradients) -> np.ndarray:
        n, t = layer_gradients.scores.shape
        k = layer_gradients.activations.shape[1]
        rng = np.random.default_rng(self.seed)
        return rng.uniform(-1.0, 1.0, size=(n, t, k)).astype(np.float32)


class _MapMethod(CAM):
    """A method whose map is not a weighted sum of channels: no ``eigen_smooth``."""

    def _signed(
        self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool, native: bool = False
    ) -> _Pass:
        if eigen_smooth:
            raise OptionError(
                f"eigen_smooth applies to channel-weight methods; {type(self).__name__}'s map "
                "is not a weighted sum of the layer's channels."
            )
        return super()._signed(inputs, targets, eigen_smooth, warn)


_KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")


def kernel_pca_projection(
    activations: np.ndarray,
    kernel: str = "sigmoid",
    gamma: float | None = None,
    coef0: float = 1.0,
    degree: int = 3,
) -> np.ndarray:
    """Each sample's positions on the first kernel principal component (KPCA-CAM).

    Per sample, the ``(P, K)`` matrix of positions x channels is centred over positions
    (as pytorch-grad-cam does before scikit-learn's ``KernelPCA``); the ``(P, P)`` kernel
    matrix ``k(x_i, x_j)`` is centred in feature space and its top eigenpair
    ``(lambda, v)`` gives the projection ``sqrt(lambda) v``, with the sign that makes the
    entry of largest magnitude positive (scikit-learn's ``svd_flip`` rule).

    Kernels (scikit-learn's definitions): ``linear`` ``x.y``; ``poly``
    ``(gamma x.y + coef0)^degree``; ``sigmoid`` ``tanh(gamma x.y + coef0)``; ``rbf``
    ``exp(-gamma |x - y|^2)``; ``cosine`` ``x.y / (|x| |y|)``. ``gamma=None`` is ``1 / K``.
    Cost: one ``P x P`` symmetric eigendecomposition per sample.

    Args:
        activations: ``(N, K, *S)``.
        kernel: one of the kernels above.
        gamma: the kernel's scale (``None``: ``1 / K``).
        coef0: the constant of ``poly`` and ``sigmoid``.
        degree: the power of ``poly``.

    Returns:
        ``(N, *S)`` float32.
    """
    if kernel not in _KERNELS:
        raise OptionError(f"kernel={kernel!r}: expected one of {_KERNELS}.")
    n, k = activations.shape[:2]
    spatial = activations.shape[2:]
    x = activations.reshape(n, k, -1).transpose(0, 2, 1).astype(np.float64)  # (N, P, K)
    x = x - x.mean(axis=1, keepdims=True)
    g = 1.0 / k if gamma is None else float(gamma)
    dot = x @ x.transpose(0, 2, 1)
    if kernel == "linear":
        matrix = dot
    elif kernel == "poly":
        matrix = (g * dot + coef0) ** degree
    elif kernel == "sigmoid":
        matrix = np.tanh(g * dot + coef0)
    elif kernel == "rbf":
        squares = np.einsum("npk,npk->np", x, x)
        distances = np.maximum(squares[:, :, None] + squares[:, None, :] - 2 * dot, 0.0)
        matrix = np.exp(-g * distances)
    else:
        norms = np.sqrt(np.einsum("npk,npk->np", x, x))
        outer = norms[:, :, None] * norms[:, None, :]
        matrix = np.divide(dot, outer, out=np.zeros_like(dot), where=outer > 0)
    matrix = (
        matrix
        - matrix.mean(axis=1, keepdims=True)
        - matrix.mean(axis=2, keepdims=True)
        + matrix.mean(axis=(1, 2), keepdims=True)
    )
    values, vectors = np.linalg.eigh(matrix)
    projection = vectors[:, :, -1] * np.sqrt(np.maximum(values[:, -1:], 0.0))
    largest = np.take_along_axis(projection, np.abs(projection).argmax(axis=1)[:, None], axis=1)
    projection = projection * np.where(largest < 0, -1.0, 1.0)
    return projection.reshape(n, *spatial).astype(np.float32)


class KPCACAM(_MapMethod):
    """KPCA-CAM (Karmani et al., 2024): activations on their first kernel principal component.

    The map is :func:`kernel_pca_projection` of the layer's activations. Independent of the
    target: every target gets the same map. ``res.weights`` is zeros (the map is no
    weighted sum of channels).

    Args:
        model, layer, backend, **options: as for :class:`~multicam.GradCAM`.
        kernel: ``"sigmoid"`` (default, as pytorch-grad-cam), ``"rbf"``, ``"poly"``,
            ``"linear"`` (plain PCA of the centred activations) or ``"cosine"``.
        gamma, coef0, degree: the kernel's parameters (scikit-learn's defaults).

    Peer: pytorch-grad-cam's ``KPCA_CAM`` (scikit-learn's ``KernelPCA(n_components=1)``
    on the centred activations): the same projection, to float64 round-off, and the same
    sign rule.
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        kernel: str = "sigmoid",
        gamma: float | None = None,
        coef0: float = 1.0,
        degree: int = 3,
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        if kernel not in _KERNELS:
            raise OptionError(f"kernel={kernel!r}: expected one of {_KERNELS}.")
        if gamma is not None:
            gamma = _non_negative("gamma", gamma)
        self.kernel, self.gamma, self.coef0 = kernel, gamma, float(coef0)
        self.degree = _positive_int("degree", degree)
        super().__init__(model, layer, backend=backend, **options)

    def combine(self, layer_gradients: LayerGradients) -> tuple[np.ndarray, np.ndarray]:
        projection = kernel_pca_projection(
            layer_gradients.activations, self.kernel, self.gamma, self.coef0, self.degree
        )
        raw = _per_target(projection, layer_gradients.scores.shape[1])
        return _no_channel_weights(layer_gradients), raw


# --- Methods that look at the input -------------------------------------------------------

#: OpenCV's ``COLOR_RGB2GRAY`` weights, as pytorch-grad-cam's ``sobel_cam`` uses.
_LUMA = np.array([0.299, 0.587, 0.114])


def sobel_magnitude(images: np.ndarray) -> np.ndarray:
    """The mean absolute Sobel derivative over the spatial axes of ``(N, *S)`` images.

    Along each axis the derivative ``[-1, 0, 1]`` is combined with the smoothing
    ``[1, 2, 1]`` along every other axis (the 3x3 Sobel operator in 2-D; a central
    difference in 1-D); borders reflect without repeating the edge (OpenCV's default,
    ``BORDER_REFLECT_101``). The result is ``mean_axis |d_axis|``: in 2-D
    ``(|G_x| + |G_y|) / 2``.

    Returns:
        ``(N, *S)`` float64.
    """
    dims = images.ndim - 1
    padded = np.pad(images.astype(np.float64), [(0, 0)] + [(1, 1)] * dims, mode="reflect")
    total = np.zeros(images.shape, np.float64)
    for derivative_axis in range(1, dims + 1):
        out = padded
        for axis in range(1, dims + 1):
            length = out.shape[axis]
            low = np.take(out, np.arange(0, length - 2), axis=axis)
            mid = np.take(out, np.arange(1, length - 1), axis=axis)
            high = np.take(out, np.arange(2, length), axis=axis)
            out = high - low if axis == derivative_axis else low + 2 * mid + high
        total += np.abs(out)
    return total / dims


class SobelCAM(_MapMethod):
    """Sobel-CAM: the input's edge magnitude, a model-free baseline for metrics.

    The input is reduced to one channel (the luma ``0.299 R + 0.587 G + 0.114 B`` for 3
    channels, the channel mean otherwise) and the map is its :func:`sobel_magnitude`, at the
    input's resolution, the same for every target. The model still runs once, so that the
    result has the scores, targets, activations and gradients of the request;
    ``res.weights`` is zeros.

    Peer: pytorch-grad-cam's ``sobel_cam(img)`` on a uint8 RGB image: OpenCV's 3x3 Sobel
    with ``convertScaleAbs``, which rounds and saturates ``|G|`` at 255 before averaging.
    multicam works on the float input, without rounding or saturation.
    """

    def combine(self, layer_gradients: LayerGradients) -> tuple[np.ndarray, np.ndarray]:
        n, t = layer_gradients.scores.shape
        return _no_channel_weights(layer_gradients), np.zeros((n, t, 1), np.float32)

    def _signed(
        self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool, native: bool = False
    ) -> _Pass:
        explained = super()._signed(inputs, targets, eigen_smooth, warn)
        x = _as_numpy(inputs)
        if x.ndim < 3:
            raise InputError(
                f"SobelCAM needs an input with spatial dims, (N, C, *S) or (N, *S, C); got "
                f"shape {x.shape}."
            )
        channels = np.moveaxis(x, _channel_axis(self.bound.layout, x.ndim), 1)
        if channels.shape[1] == 3:
            gray = np.einsum("nc...,c->n...", channels.astype(np.float64), _LUMA)
        else:
            gray = channels.mean(axis=1, dtype=np.float64)
        edges = sobel_magnitude(gray).astype(np.float32)
        raw = _per_target(edges, explained.layer_gradients.scores.shape[1])
        return dataclasses.replace(explained, raw=raw)


def _noise(seed: Any, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


class SmoothGradCAMPlusPlus(GradCAMPlusPlus):
    """Smooth Grad-CAM++ (Omeiza et al., 2019): Grad-CAM++ with noise-averaged derivatives.

    The model runs on the input and on ``num_samples`` noisy copies ``x + e_d``,
    ``e_d ~ N(0, std^2)`` element-wise, drawn by NumPy from ``seed`` in channels-last order
    (moved to the backend's layout), so every backend sees the same noise. With ``g_d`` the
    gradients on copy ``d`` and ``D_p = mean_d g_d^p``:
    ``alpha = D_2 / (2 D_2 + sum_ab A^ab D_3)`` (0 where the denominator is 0) and
    ``w_k = sum_ij alpha relu(D_1)``, ``map = sum_k w_k A_k``, with ``A`` the clean input's
    activations (the paper's formula with ``Y = exp(S)``, whose factor ``exp(S_d)`` is
    dropped as in every implementation). The class of ``targets=None`` is the clean input's
    prediction. ``res.gradients`` and ``res.scores`` are the clean pass's.

    Args:
        model, layer, backend, **options: as for :class:`~multicam.GradCAM`.
        num_samples: noisy copies (default 4, torchcam's).
        std: the noise's standard deviation in input units (default 0.3, torchcam's).
        seed: NumPy seed of the noise; ``None`` draws fresh noise on every call.

    Peer: torchcam's ``SmoothGradCAMpp`` (torch's generator, so its noise differs) averages
    ``g^2`` and ``g^3`` the same way but multiplies ``alpha`` by ``relu`` of the last noisy
    copy's gradients (not their mean) and sums the last noisy copy's activations.
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        num_samples: int = 4,
        std: float = 0.3,
        seed: int | None = 0,
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        self.num_samples = _positive_int("num_samples", num_samples)
        self.std = _non_negative("std", std)
        self.seed = seed
        super().__init__(model, layer, backend=backend, **options)

    native_algebra = False

    def _signed(
        self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool, native: bool = False
    ) -> _Pass:
        clean = super()._signed(inputs, targets, False, warn)
        targets = _fixed_classes(targets, clean.layer_gradients, self.output)
        x = _as_numpy(inputs)
        shape = (self.num_samples, *x.shape)
        if x.ndim >= 3 and self.bound.layout == "channels_first":  # draw channels-last
            noise = np.moveaxis(
                _noise(self.seed, (*shape[:2], *x.shape[2:], x.shape[1]), 1.0), -1, 2
            )
        else:
            noise = _noise(self.seed, shape, 1.0)
        moments = [np.zeros(clean.layer_gradients.gradients.shape, np.float64) for _ in range(3)]
        for d in range(self.num_samples):
            noisy = (x + np.float32(self.std) * noise[d]).astype(x.dtype, copy=False)
            gradients = super()._signed(noisy, targets, False, False).layer_gradients.gradients
            g = gradients.astype(np.float64)
            for power, moment in enumerate(moments, 1):
                moment += g**power
        first, second, third = (moment / self.num_samples for moment in moments)
        activations = clean.layer_gradients.activations
        weights = algebra.gradcam_plus_plus_general_weights(activations, first, second, third)
        if eigen_smooth:
            raw = algebra.eigen_smooth(activations, weights)
        else:
            raw = algebra.weighted_sum(activations, weights)
        return dataclasses.replace(clean, weights=weights, raw=raw)


# --- Score-CAM relatives --------------------------------------------------------------------


class _SmoothedScoreCAM(ScoreCAM):
    """Score-CAM whose channel score is the mean over ``num_samples`` variants of the mask.

    Subclasses set ``num_samples`` and override :meth:`ScoreCAM._variants`; the masked
    passes, their chunking and the weighting are Score-CAM's own.
    """


class SSCAM(_SmoothedScoreCAM):
    """SS-CAM (Wang et al., 2020): Score-CAM with noise added to the masks.

    As :class:`~multicam.ScoreCAM` (masks ``H_k``: the activation map resized to the input
    and min-max normalised), but channel ``k``'s score is the mean over ``num_samples``
    noisy masks ``H_k + e``, ``e ~ N(0, std^2)`` per input position, of the target's
    output on ``x * (H_k + e)``. The noise of (sample ``n``, channel ``k``) is drawn by
    NumPy's ``default_rng([seed, n, k])``: the same on every backend and for every
    ``batch_size``. Weights as Score-CAM's ``weighting`` (default: softmax over channels).

    Args:
        model, layer, backend, batch_size, weighting, **options: as for ScoreCAM.
        num_samples: noisy masks per channel (default 35, torchcam's).
        std: the noise's standard deviation (default 2.0, torchcam's, on masks in [0, 1]).
        seed: NumPy seed (an int).

    Peer: torchcam's ``SSCAM`` (torch's generator) subtracts the clean input's logits
    before the softmax, which a softmax over channels ignores, and normalises each
    activation map before upsampling it (multicam: after, as its ScoreCAM).
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        num_samples: int = 35,
        std: float = 2.0,
        seed: int = 0,
        batch_size: int = 32,
        weighting: str = "softmax",
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        self.num_samples = _positive_int("num_samples", num_samples)
        self.std = _non_negative("std", std)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise OptionError(f"seed={seed!r}: expected an int >= 0.")
        self.seed = int(seed)
        super().__init__(
            model, layer, batch_size=batch_size, weighting=weighting, backend=backend, **options
        )

    def _variants(self, masks: np.ndarray, samples: np.ndarray, channels: np.ndarray) -> np.ndarray:
        shape = (self.num_samples, *masks.shape[1:])
        noise = np.stack(
            [
                _noise([self.seed, int(n), int(k)], shape, self.std)
                for n, k in zip(samples, channels, strict=True)
            ]
        )
        return masks[:, None] + noise


class ISCAM(_SmoothedScoreCAM):
    """IS-CAM (Naidu et al., 2020): Score-CAM with the mask integrated along a path.

    As :class:`~multicam.ScoreCAM`, but channel ``k``'s score is the mean over
    ``i = 1..num_samples`` of the target's output on ``x * c_i H_k``:

    - ``path="cumulative"`` (default): ``c_i = sum_{p <= i} p / num_samples``, torchcam's
      coefficients (its docstring's transcription of the paper's sum);
    - ``path="linear"``: ``c_i = i / num_samples``, the Riemann sum of the path integral
      from the zero input to ``x * H_k`` that the paper motivates IS-CAM with.

    Args:
        model, layer, backend, batch_size, weighting, **options: as for ScoreCAM.
        num_samples: points on the path (default 10, torchcam's).
        path: ``"cumulative"`` or ``"linear"``.

    Peer: torchcam's ``ISCAM``, with ``path="cumulative"`` and the mask conventions noted
    on :class:`SSCAM`.
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        num_samples: int = 10,
        path: str = "cumulative",
        batch_size: int = 32,
        weighting: str = "softmax",
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        self.num_samples = _positive_int("num_samples", num_samples)
        if path not in ("cumulative", "linear"):
            raise OptionError(f"path={path!r}: expected 'cumulative' or 'linear'.")
        self.path = path
        super().__init__(
            model, layer, batch_size=batch_size, weighting=weighting, backend=backend, **options
        )

    @property
    def coefficients(self) -> np.ndarray:
        """``(num_samples,)`` the scale ``c_i`` of the mask at each point of the path."""
        steps = np.arange(1, self.num_samples + 1) / self.num_samples
        return np.cumsum(steps) if self.path == "cumulative" else steps

    def _variants(self, masks: np.ndarray, samples: np.ndarray, channels: np.ndarray) -> np.ndarray:
        scale = self.coefficients.astype(np.float32).reshape(-1, *([1] * (masks.ndim - 1)))
        return masks[:, None] * scale


# --- Non-negative factorisation -------------------------------------------------------------


def nmf(
    matrix: np.ndarray, components: int, *, max_iter: int = 200, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative ``matrix ~ W H`` by multiplicative updates (Lee & Seung, 2001).

    The initialisation is scikit-learn's ``init="random"`` with ``random_state=seed``
    (``|N(0, 1)| sqrt(mean / r)`` from ``RandomState(seed)``, ``H`` first), and each
    iteration updates ``W`` then ``H`` as scikit-learn's ``solver="mu"`` does (Frobenius
    loss, a zero denominator replaced by float32's eps), for exactly ``max_iter``
    iterations.

    Args:
        matrix: ``(M, P)`` non-negative.
        components: ``r``.
        max_iter: the number of iterations.
        seed: the ``RandomState`` seed of the initialisation.

    Returns:
        ``W`` ``(M, r)`` and ``H`` ``(r, P)``, float64.
    """
    x = matrix.astype(np.float64)
    rows, columns = x.shape
    rng = np.random.RandomState(seed)
    scale = np.sqrt(max(x.mean(), 0.0) / components)
    h = np.abs(scale * rng.standard_normal(size=(components, columns)))
    w = np.abs(scale * rng.standard_normal(size=(rows, components)))
    tiny = float(np.finfo(np.float32).eps)
    for _ in range(max_iter):
        denominator = w @ (h @ h.T)
        denominator[denominator == 0] = tiny
        w *= (x @ h.T) / denominator
        denominator = (w.T @ w) @ h
        denominator[denominator == 0] = tiny
        h *= (w.T @ x) / denominator
    return w, h


@dataclass(frozen=True)
class ConceptResult(CAMResult):
    """The result of :class:`DeepFeatureFactorization`: one map per concept.

    The target axis holds the ``r`` concepts: ``maps`` and ``raw`` are ``(N, r, *S)``,
    ``weights`` ``(N, r, K)`` (each concept's channel vector, the same for every sample),
    ``scores`` ``(N, r)`` each concept's mean presence in the sample (the spatial mean of
    its raw map), ``targets`` ``None``. ``gradients`` are those of the request's targets,
    which the factorisation does not use.

    Attributes:
        concepts: ``(K, r)`` the concepts' channel vectors (``W`` plus the channel offsets).
        concept_outputs: ``(r, C)`` what ``head`` made of each concept, or ``None``.
    """

    concepts: np.ndarray | None = None
    concept_outputs: np.ndarray | None = None


class DeepFeatureFactorization(_MapMethod):
    """Deep Feature Factorization (Collins et al., 2018): concept maps by NMF.

    The batch's activations, channels x (samples x positions), are shifted per channel to
    be non-negative (less each channel's minimum over the batch) and factorised by
    :func:`nmf` into ``W`` ``(K, r)`` and ``H`` ``(r, N P)``; concept ``j``'s map in sample
    ``n`` is ``H[j]`` at that sample's positions. The factorisation is joint over the batch,
    so a concept means the same in every sample (and depends on the batch). The call
    returns a :class:`ConceptResult` whose target axis holds the concepts; ``targets=`` only
    chooses what the (unused) gradients are of.

    Args:
        model, layer, backend, **options: as for :class:`~multicam.GradCAM`.
        concepts: ``r`` (default 5).
        head: optional ``(r, K) -> (r, C)`` NumPy function applied to the concepts' channel
            vectors (e.g. the model's classifier), kept in ``res.concept_outputs``.
        max_iter: NMF iterations (default 200).
        seed: NMF initialisation seed.

    Peer: pytorch-grad-cam's ``DeepFeatureFactorization`` and ``dff``: the same shift and
    layout, factorised by scikit-learn's ``NMF(init="random", random_state=0)`` with its
    default coordinate-descent solver (multicam: the multiplicative-update solver from the
    same initialisation, so the factors differ where NMF has several local minima); its
    ``computation_on_concepts`` gets a torch tensor, multicam's ``head`` a NumPy array.
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        concepts: int = 5,
        head: Callable[[np.ndarray], Any] | None = None,
        max_iter: int = 200,
        seed: int = 0,
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        self.concepts = _positive_int("concepts", concepts)
        self.max_iter = _positive_int("max_iter", max_iter)
        self.head, self.seed = head, seed
        super().__init__(model, layer, backend=backend, **options)

    def combine(self, layer_gradients: LayerGradients) -> tuple[np.ndarray, np.ndarray]:
        activations = layer_gradients.activations
        n, k = activations.shape[:2]
        spatial = activations.shape[2:]
        by_channel = np.moveaxis(activations, 1, 0).reshape(k, -1).astype(np.float64)
        offset = by_channel.min(axis=1, keepdims=True)
        w, h = nmf(by_channel - offset, self.concepts, max_iter=self.max_iter, seed=self.seed)
        concepts = w + offset  # (K, r)
        raw = np.moveaxis(h.reshape(self.concepts, n, *spatial), 1, 0)
        weights = np.broadcast_to(concepts.T[None], (n, self.concepts, k))
        return weights.astype(np.float32), raw.astype(np.float32)

    def __call__(self, inputs: Any, targets: TargetLike = None, **options: Any) -> ConceptResult:
        """Factorise a batch's activations; options as for :meth:`CAM.__call__`.

        Raises:
            OptionError: ``aug_smooth`` or ``eigen_smooth`` (each pass would factorise
                anew, so the concepts of different passes do not correspond).
        """
        if options.get("aug_smooth"):
            raise OptionError(
                "aug_smooth does not apply to DeepFeatureFactorization: each augmented pass "
                "would find other concepts."
            )
        result = super().__call__(inputs, targets, **options)
        concepts = np.ascontiguousarray(result.weights[0].T)
        spatial = tuple(range(2, result.raw.ndim))
        presence = result.raw.mean(axis=spatial, dtype=np.float64).astype(np.float32)
        outputs = None
        if self.head is not None:
            outputs = np.asarray(_as_numpy(self.head(concepts.T.copy())), np.float32)
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(CAMResult)}
        fields.update(scores=presence, targets=None)
        return ConceptResult(**fields, concepts=concepts, concept_outputs=outputs)


# --- Meta-methods: a base method, changed --------------------------------------------------


_COMBINED: dict[tuple[type, type], type] = {}


def _combined(meta: type, base: type) -> type:
    """The class of a meta-method over ``base``: ``meta`` first, ``base`` after it."""
    key = (meta, base)
    if key not in _COMBINED:
        _COMBINED[key] = type(
            f"{meta.__name__}[{base.__name__}]",
            (meta, base),
            {"__module__": meta.__module__, "__doc__": meta.__doc__, "_meta_base": base},
        )
    return _COMBINED[key]


class _MetaMethod(CAM):
    """A method built on a base method (``method=``): its instances derive from both.

    ``Meta(model, layer, method=Base, **options)`` is an instance of ``Meta[Base]``, a
    class with ``Meta`` before ``Base`` in its MRO: the meta-method's ``_signed`` changes
    what the base computes on, and the base's ``combine`` (its weights), its options
    (e.g. GradCAMPlusPlus's ``output_function``) and its checks apply unchanged.
    """

    default_method: ClassVar[type[CAM]] = GradCAM
    #: Base methods that make no sense under this meta-method.
    refused: ClassVar[tuple[type, ...]] = ()
    native_algebra = False

    def __new__(cls, *args: Any, method: type[CAM] | None = None, **options: Any) -> Any:
        if "_meta_base" in cls.__dict__:  # already combined (copy, pickle)
            return object.__new__(cls)
        base = cls.default_method if method is None else method
        if not (isinstance(base, type) and issubclass(base, CAM)) or issubclass(base, _MetaMethod):
            raise OptionError(
                f"method={method!r}: expected a multicam method class such as mc.GradCAM "
                "(not a meta-method such as FinerCAM or SESS)."
            )
        if issubclass(base, cls.refused):
            raise OptionError(
                f"method={base.__name__}: {cls.__name__} needs a method whose map follows "
                "the target's gradients, such as GradCAM, GradCAMPlusPlus, XGradCAM, "
                "LayerCAM or HiResCAM."
            )
        return object.__new__(_combined(cls, base))


class FinerCAM(_MetaMethod):
    """Finer-CAM (Zhang et al., 2025): the target's evidence against similar classes.

    The base method (``method=``, default GradCAM) explains the score difference
    ``S = s_c - alpha sum_m p_m s_m`` instead of ``s_c``, where ``m`` runs over the
    ``references`` classes whose logits are closest to ``s_c`` (``|s_m - s_c|`` smallest,
    the target excluded, ties to the lower class id), or over ``compare_to``, and
    ``p_m`` are their weights: ``weighting="softmax"`` (default) their softmax
    probabilities over all classes, renormalised to sum to 1 and held constant (not
    differentiated); ``weighting="mean"`` ``1 / M``. Its gradients are the same combination
    of per-class gradients, ``g_c - alpha sum_m p_m g_m``: one forward pass for the logits,
    then one backward pass for the T (1 + M) classes together. ``res.scores`` and
    ``res.gradients`` are the difference's; ``res.targets`` the target classes.

    Args:
        model, layer, backend, **options: as for :class:`~multicam.GradCAM`, plus the base
            method's own options.
        method: the base method, a gradient method (default GradCAM).
        alpha: the weight of the comparison (default 1).
        references: how many similar classes (default 3; at most C - 1).
        compare_to: explicit comparison class ids (the same for every sample), instead of
            the most similar ones.
        weighting: ``"softmax"`` or ``"mean"``.

    Needs the backend's plain forward pass (``outputs``).

    Peers: pytorch-grad-cam's ``FinerCAM`` (its ``FinerWeightedTarget``: softmax weights,
    ``alpha=1``, comparisons ranked 1-3 by ``|s_j - s_c|``) is ``weighting="softmax"``,
    except that it differentiates through the softmax weights (equal when M = 1); torchcam's
    ``FinerCAM`` (``gamma=0.6``, mean of the 3 closest) is ``weighting="mean", alpha=0.6``.
    """

    refused = (_Perturbation, EigenCAM, FEM, RandomCAM, _MapMethod, SmoothGradCAMPlusPlus)

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        method: type[CAM] | None = None,
        alpha: float = 1.0,
        references: int = 3,
        compare_to: int | Sequence[int] | None = None,
        weighting: str = "softmax",
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        if weighting not in ("softmax", "mean"):
            raise OptionError(f"weighting={weighting!r}: expected 'softmax' or 'mean'.")
        self.alpha = _non_negative("alpha", alpha)
        self.references = _positive_int("references", references)
        self.compare_to = None
        if compare_to is not None:
            ids = np.atleast_1d(np.asarray(compare_to))
            if ids.ndim != 1 or ids.dtype.kind not in "iu" or (ids < 0).any() or not ids.size:
                raise OptionError(f"compare_to={compare_to!r}: expected class ids (ints >= 0).")
            if len(set(ids.tolist())) != ids.size:
                raise OptionError(f"compare_to={compare_to!r} repeats a class.")
            self.compare_to = ids.astype(np.int64)
        self.weighting = weighting
        super().__init__(model, layer, backend=backend, **options)

    def _comparisons(self, logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``(N, T, M)`` the comparison classes of each target."""
        num_classes = logits.shape[1]
        if self.compare_to is not None:
            if self.compare_to.max() >= num_classes:
                raise TargetError(
                    f"compare_to class {int(self.compare_to.max())} is out of range: the "
                    f"model has {num_classes} outputs."
                )
            if np.isin(classes, self.compare_to).any():
                raise TargetError(
                    "a target class is among compare_to; a class cannot be compared with itself."
                )
            return np.broadcast_to(self.compare_to, (*classes.shape, self.compare_to.size))
        if num_classes < 2:
            raise TargetError("FinerCAM needs a model with at least two classes.")
        m = min(self.references, num_classes - 1)
        target_logits = np.take_along_axis(logits, classes, axis=1)  # (N, T)
        distances = np.abs(logits[:, None, :] - target_logits[:, :, None])  # (N, T, C)
        np.put_along_axis(distances, classes[:, :, None], np.inf, axis=2)
        return np.argsort(distances, axis=2, kind="stable")[:, :, :m]

    def _signed(
        self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool, native: bool = False
    ) -> _Pass:
        _require_classes(type(self).__name__, targets)
        logits = np.asarray(self.bound.outputs(inputs, self.output), np.float64)
        classes = targets.class_ids(logits.shape, logits)
        n, t = classes.shape
        compared = self._comparisons(logits, classes)  # (N, T, M)
        m = compared.shape[2]
        if self.weighting == "softmax":
            probabilities = np.take_along_axis(_softmax(logits, 1)[:, None, :], compared, axis=2)
            total = probabilities.sum(axis=2, keepdims=True)  # 0 only if all underflowed
            mix = np.where(total > 0, probabilities / np.where(total > 0, total, 1.0), 1.0 / m)
        else:
            mix = np.full(compared.shape, 1.0 / m)
        mix = self.alpha * mix
        request = Targets.parse(
            np.concatenate([classes, compared.reshape(n, t * m)], axis=1), n, output=self.output
        )
        base = super()._signed(inputs, request, False, warn)
        every = base.layer_gradients
        gradients = every.gradients.astype(np.float64)
        shape = gradients.shape[2:]
        compared_gradients = gradients[:, t:].reshape(n, t, m, *shape)
        difference = gradients[:, :t] - np.einsum("ntm,ntm...->nt...", mix, compared_gradients)
        scores = every.scores.astype(np.float64)
        compared_scores = scores[:, t:].reshape(n, t, m)
        finer = dataclasses.replace(
            every,
            gradients=difference.astype(np.float32),
            scores=(scores[:, :t] - (mix * compared_scores).sum(axis=2)).astype(np.float32),
            targets=classes,
        )
        weights, raw = self.combine(finer)
        if eigen_smooth:
            raw = algebra.eigen_smooth(finer.activations, weights)
        return dataclasses.replace(base, layer_gradients=finer, weights=weights, raw=raw)


def _window_starts(length: int, window: int, step: int) -> list[int]:
    """Where windows of ``window`` start along an axis of ``length``.

    Every ``step``, and one flush with the end so that the whole axis is covered.
    """
    starts = list(range(0, length - window + 1, step))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _apply_axes(maps: np.ndarray, matrices: Sequence[np.ndarray]) -> np.ndarray:
    """``maps`` ``(..., *S)`` with matrix ``j`` ``(S'_j, S_j)`` applied along spatial axis j."""
    out = maps
    first = maps.ndim - len(matrices)
    for offset, matrix in enumerate(matrices):
        axis = first + offset
        out = np.moveaxis(np.moveaxis(out, axis, -1) @ matrix.T, -1, axis)
    return out


def gaussian_blur(maps: np.ndarray, sigma: float, spatial_dims: int) -> np.ndarray:
    """Separable Gaussian blur of the trailing ``spatial_dims`` axes.

    The kernel has radius ``ceil(sigma)`` (OpenCV's ``GaussianBlur(ksize=11, sigma=5)``
    at ``sigma = 5``), weights ``exp(-i^2 / (2 sigma^2))`` normalised to sum 1; borders
    reflect without repeating the edge (``BORDER_REFLECT_101``).
    """
    radius = int(np.ceil(sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = maps.astype(np.float64)
    for axis in range(maps.ndim - spatial_dims, maps.ndim):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        length = out.shape[axis]
        out = sum(
            weight * np.take(padded, np.arange(i, i + length), axis=axis)
            for i, weight in enumerate(kernel)
        )
    return out


class SESS(_MetaMethod):
    """SESS (Tursun et al., 2022): a base method on patches at several scales, fused.

    For each scale factor ``s`` in ``scales`` (each >= 1) the input is resized (bilinear,
    half-pixel centres) by ``s`` along every spatial axis, and windows of ``window``
    (default: the input's own size) slide over it every ``step`` (default ``window``: side
    by side), plus one flush with the far end. Per sample and target:

    1. every patch's target probability ``p`` (softmax of the outputs) is computed; with
       ``pre_filter=f``, the fraction ``f`` of patches with the lowest ``p`` is dropped;
    2. the base method (``method=``, default GradCAM) explains each kept patch: its map,
       ReLU'd, resized to the patch and min-max normalised, times ``p / max p`` (the max
       over all patches);
    3. each weighted patch map is placed on a zero canvas of its scaled input, which is
       resized back to the input; the fused map is, per pixel, the mean of the canvases'
       values above ``theta`` (``pool="mean"``, 0 where none is) or their maximum
       (``pool="max"``);
    4. ``smooth=sigma`` blurs it with :func:`gaussian_blur` (``None``: no blur).

    ``res.raw`` is the fused map at the input's resolution; ``res.weights`` is zeros;
    ``scores``, ``activations`` and ``gradients`` are the base method's on the whole input,
    whose prediction is the class of ``targets=None``.

    Args:
        model, layer, backend, **options: as for :class:`~multicam.GradCAM`, plus the base
            method's own options.
        method: the base method (default GradCAM).
        scales: scale factors (default ``(1.0, 1.5, 2.0)``).
        window, step: ints (every axis) or one per spatial axis.
        pre_filter: the fraction of least likely patches to skip, in [0, 1).
        theta: the mean-pooling threshold (default 0).
        pool: ``"mean"`` or ``"max"``.
        smooth: the blur's sigma in pixels (default 5.0), or ``None``.
        patches_per_pass: the most patches in one forward or backward pass (default 32).

    Peer: the authors' code (``sess.py``, class ``SESS``): the same steps; its defaults are
    224-pixel windows, ``step=224``, scales 224 to 928 pixels in steps of 64 (factors
    ``1 + 64 i / 224``), ``pre_filter_ratio=0``, ``theta=0``, mean pooling, an 11x11
    Gaussian blur of sigma 5. Its scales resize the shorter side (with torchvision's
    antialiasing); multicam scales every axis by the factor.
    """

    refused = (_MapMethod,)

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        method: type[CAM] | None = None,
        scales: Sequence[float] = (1.0, 1.5, 2.0),
        window: int | Sequence[int] | None = None,
        step: int | Sequence[int] | None = None,
        pre_filter: float = 0.0,
        theta: float = 0.0,
        pool: str = "mean",
        smooth: float | None = 5.0,
        patches_per_pass: int = 32,
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        factors = [float(s) for s in np.atleast_1d(np.asarray(scales, dtype=np.float64))]
        if not factors or any(not np.isfinite(s) or s < 1 for s in factors):
            raise OptionError(f"scales={scales!r}: expected scale factors >= 1.")
        if not 0 <= pre_filter < 1:
            raise OptionError(f"pre_filter={pre_filter!r}: expected a fraction in [0, 1).")
        if pool not in ("mean", "max"):
            raise OptionError(f"pool={pool!r}: expected 'mean' or 'max'.")
        if smooth is not None and (not np.isfinite(smooth) or smooth <= 0):
            raise OptionError(f"smooth={smooth!r}: expected a sigma > 0 or None.")
        self.scales, self.window, self.step = factors, window, step
        self.pre_filter, self.theta = float(pre_filter), _non_negative("theta", theta)
        self.pool, self.smooth = pool, smooth
        self.patches_per_pass = _check_batch_size(patches_per_pass)
        super().__init__(model, layer, backend=backend, **options)

    def _lengths(
        self, value: int | Sequence[int] | None, default: Sequence[int], name: str
    ) -> tuple[int, ...]:
        if value is None:
            return tuple(default)
        lengths = (value,) * len(default) if isinstance(value, int | np.integer) else tuple(value)
        if len(lengths) != len(default) or not all(
            isinstance(v, int | np.integer) and v > 0 for v in lengths
        ):
            raise OptionError(
                f"{name}={value!r}: expected a positive int or {len(default)} of them."
            )
        return tuple(int(v) for v in lengths)

    def _patches(
        self, x: np.ndarray
    ) -> tuple[list[np.ndarray], list[tuple[int, tuple[int, ...]]], tuple[int, ...]]:
        """The scaled inputs (channels-first) and every patch as (scale, window starts)."""
        spatial = x.shape[2:]
        window = self._lengths(self.window, spatial, "window")
        step = self._lengths(self.step, window, "step")
        scaled, patches = [], []
        for index, factor in enumerate(self.scales):
            size = tuple(round(s * factor) for s in spatial)
            if any(s < w for s, w in zip(size, window, strict=True)):
                raise OptionError(
                    f"window={window} does not fit the input {spatial} scaled by {factor} "
                    f"({size}); choose a smaller window or larger scales."
                )
            scaled.append(algebra.resize(x, size, "linear"))
            starts = [_window_starts(s, w, st) for s, w, st in zip(size, window, step, strict=True)]
            for corner in np.ndindex(*[len(a) for a in starts]):
                patches.append((index, tuple(a[i] for a, i in zip(starts, corner, strict=True))))
        return scaled, patches, window

    def _crop(
        self,
        scaled: list[np.ndarray],
        patch: tuple[int, tuple[int, ...]],
        samples: np.ndarray,
        window: tuple[int, ...],
    ) -> np.ndarray:
        index, corner = patch
        region = tuple(slice(c, c + w) for c, w in zip(corner, window, strict=True))
        return scaled[index][(samples, slice(None), *region)]  # type: ignore[arg-type]

    def _to_layout(self, patches: np.ndarray) -> np.ndarray:
        """Channels-first patches in the backend's layout."""
        if self.bound.layout == "channels_first":
            return np.ascontiguousarray(patches)
        return np.ascontiguousarray(np.moveaxis(patches, 1, -1))

    def _parts(self, count: int) -> Iterator[slice]:
        for start in range(0, count, self.patches_per_pass):
            yield slice(start, min(start + self.patches_per_pass, count))

    def _signed(
        self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool, native: bool = False
    ) -> _Pass:
        _require_classes(type(self).__name__, targets)
        whole = self._base_signed(inputs, targets, eigen_smooth, warn)
        classes = whole.layer_gradients.targets
        assert classes is not None
        x = _as_numpy(inputs)
        if x.ndim < 3:
            raise InputError(f"SESS needs an input with spatial dims; got shape {x.shape}.")
        if self.bound.layout == "channels_last":
            x = np.moveaxis(x, -1, 1)
        n, t = classes.shape
        spatial = x.shape[2:]
        scaled, patches, window = self._patches(x)
        count = len(patches)
        pairs = [(i, p) for i in range(n) for p in range(count)]  # (sample, patch)

        # 1. every patch's target probability, (N, P, T)
        probabilities = np.empty((n, count, t), np.float64)
        for part in self._parts(len(pairs)):
            batch = [pairs[i] for i in range(part.start, part.stop)]
            crops = np.concatenate(
                [self._crop(scaled, patches[p], np.array([i]), window) for i, p in batch]
            )
            outputs = self.bound.outputs(self._to_layout(crops.astype(x.dtype)), self.output)
            if outputs.ndim != 2:
                raise TargetError(f"SESS needs (N, C) class scores; got shape {outputs.shape}.")
            chosen = np.take_along_axis(_softmax(outputs, 1), classes[[i for i, _ in batch]], 1)
            for row, (i, p) in enumerate(batch):
                probabilities[i, p] = chosen[row]
        order = np.argsort(np.argsort(probabilities, axis=1, kind="stable"), axis=1)
        kept = order >= int(count * self.pre_filter)  # (N, P, T)
        most = probabilities.max(axis=1, keepdims=True)  # 0 only if every p underflowed
        relative = np.divide(probabilities, most, out=np.zeros_like(probabilities), where=most > 0)

        # 2-3. the base method on every kept patch, pooled on the input's grid
        resize_back = [
            [algebra.interpolation_matrix(round(s * factor), s, "linear") for s in spatial]
            for factor in self.scales
        ]
        total = np.zeros((n, t, *spatial), np.float64)
        hits = np.zeros((n, t, *spatial), np.float64)
        needed = [(i, p) for i, p in pairs if kept[i, p].any()]
        for part in self._parts(len(needed)):
            batch = needed[part]
            rows = np.array([i for i, _ in batch])
            crops = np.concatenate(
                [self._crop(scaled, patches[p], np.array([i]), window) for i, p in batch]
            )
            request = Targets.parse(classes[rows], len(batch), output=self.output)
            raw = self._base_signed(
                self._to_layout(crops.astype(x.dtype)), request, eigen_smooth, False
            ).raw
            maps = algebra.resize(algebra.relu(raw), window, "linear")
            maps = algebra.normalize(maps, len(window)).astype(np.float64)
            for row, (i, p) in enumerate(batch):
                index, corner = patches[p]
                scale = (relative[i, p] * kept[i, p]).reshape(t, *([1] * len(window)))
                weighted = maps[row] * scale
                matrices = [
                    m[:, c : c + w]
                    for m, c, w in zip(resize_back[index], corner, window, strict=True)
                ]
                canvas = _apply_axes(weighted, matrices)  # (T, *S)
                if self.pool == "max":
                    np.maximum(total[i], canvas, out=total[i])
                else:
                    above = canvas > self.theta
                    total[i] += np.where(above, canvas, 0.0)
                    hits[i] += above
        fused = (
            total
            if self.pool == "max"
            else np.divide(total, hits, out=np.zeros_like(total), where=hits > 0)
        )
        if self.smooth is not None:
            fused = gaussian_blur(fused, self.smooth, len(spatial))
        return dataclasses.replace(
            whole,
            weights=_no_channel_weights(whole.layer_gradients),
            raw=fused.astype(np.float32),
        )

    def _base_signed(self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool) -> _Pass:
        """The base method's pass on ``inputs`` (a perturbation base masks those inputs)."""
        local = getattr(self, "_call", None)  # a perturbation base's per-call context
        context = getattr(local, "context", None)
        if local is None or context is None:
            return super()._signed(inputs, targets, eigen_smooth, warn)
        local.context = (inputs, context[1])
        try:
            return super()._signed(inputs, targets, eigen_smooth, warn)
        finally:
            local.context = context


# --- Several layers -----------------------------------------------------------------------


class RefineCAM(MultiLayerCAM):
    """RefineCAM ("How to Evaluate and Refine your CAM", arXiv 2605.14641): layers multiplied.

    Each layer's map is computed with ``method`` (default GradCAMPlusPlus), rectified
    (unless ``relu=False``), resized to the common output size and min-max normalised; the
    refined map is their element-wise product, normalised again when ``normalize=True``:
    deep layers' coarse localisation gates early layers' fine but noisy detail. Returns a
    :class:`~multicam.cam.FusedResult` (``combine="product"``), like
    :class:`~multicam.cam.MultiLayerCAM`.

    Args:
        model, backend, output, **options: as for :class:`~multicam.cam.MultiLayerCAM`.
        layers: two or more layers.
        method: the explainer class (default GradCAMPlusPlus, as both peers).

    Peers: pytorch-grad-cam's ``RefineCAM`` (product of per-layer maps each min-max
    normalised and resized to the input, then min-max normalised) and torchcam's
    ``RefineCAM`` (the same, resized to the largest layer's shape unless given one): the
    same rule; multicam resizes to ``size`` (default the input).
    """

    def __init__(
        self,
        model: Any,
        layers: Sequence[Any],
        *,
        method: type[CAM] = GradCAMPlusPlus,
        backend: str | Backend | None = None,
        output: int | str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, layers, method=method, backend=backend, output=output, **options)
        self.combine = "product"

    def __call__(
        self,
        inputs: Any,
        targets: TargetLike = None,
        *,
        size: str | int | Sequence[int] = "input",
        normalize: bool = True,
        **call: Any,
    ) -> FusedResult:
        """Explain a batch at every layer and multiply; options as for MultiLayerCAM."""
        fused = super().__call__(inputs, targets, size=size, normalize=False, **call)
        stacked = np.stack([result.maps for result in fused.layers.values()])
        product = stacked.prod(axis=0, dtype=np.float64).astype(np.float32)
        if normalize:
            product = algebra.normalize(product, product.ndim - 2)
        return dataclasses.replace(fused, maps=product)


# --- Methods that need the optional second-order and multi-layer capabilities -----------


def _channels_first(array: np.ndarray, layout: str, leading: int) -> np.ndarray:
    """``array`` with its channel axis (last in ``channels_last``) at ``leading``."""
    return array if layout == "channels_first" else np.moveaxis(array, -1, leading)


def _rectified_channel_sum(
    evidence: np.ndarray, size: Sequence[int], spatial_dims: int
) -> np.ndarray:
    """FullGrad's per-layer term: ``(N, T, K, *s)`` -> ``(N, T, *size)``.

    Each channel's ``|evidence|`` min-max normalised on its own (a constant channel
    becomes zeros), summed over the channels, then resized to ``size`` bilinearly: the
    resize is linear, so summing first equals pytorch-grad-cam's resize-then-sum, once.
    """
    rectified = algebra.normalize(np.abs(evidence, dtype=np.float32), spatial_dims)
    summed = rectified.sum(axis=2, dtype=np.float32)
    if tuple(summed.shape[2:]) != tuple(size):
        summed = algebra.resize(summed, size, "linear", align_corners=False)
    return summed.astype(np.float32)


class FullGrad(_MapMethod):
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019): input- and bias-gradients of every layer.

    The full-gradient decomposition writes a ReLU network's output as the input-gradient
    times the input plus, for every layer with a bias, the bias times the gradient at that
    layer's output. The saliency map of target t sums, at the input's resolution,

    - ``|x * d s_t / d x|``, each input channel min-max normalised, summed over channels;
    - for every convolution with a bias and every batch normalisation (its effective
      inference bias ``beta - mean gamma / sqrt(var + eps)``), ``|b_k * d s_t / d A_k|``,
      each channel k min-max normalised at the layer's resolution, summed over channels,
      resized bilinearly (``align_corners=False``) to the input's size.

    ``res.maps`` is that sum min-max normalised; ``res.raw`` the sum; ``res.layer`` is
    ``"input"``, ``res.activations`` the input (channels-first) and ``res.gradients`` its
    gradients; ``res.weights`` zeros ``(N, T, C)``. Layers whose output has no spatial dims
    (a batch norm after a dense layer) carry no map and are left out. One forward pass and
    one backward pass to every bias layer and the input; needs the backend's optional
    ``bias_layers`` and ``tensor_gradients`` capabilities (torch, Keras, Flax).

    Args:
        model: as for :class:`~multicam.cam.CAM`.
        layer: not needed; ignored except to bind the backend (any layer works).
        backend, output, **options: as for :class:`~multicam.cam.CAM`.

    Peer: pytorch-grad-cam's ``FullGrad`` (``Conv2d`` and ``BatchNorm2d`` with a bias, the
    same effective batch-norm bias, per-channel normalisation ``(x - min) / (max + 1e-7)``
    before a cv2 resize). multicam takes convolutions of every rank, normalises
    scale-free (:func:`multicam.algebra.normalize`) and sums each layer's channels before
    one resize (equal, resizing being linear). On a linear model (no bias layers) the map
    is ``|x * w_t|`` per channel, normalised and summed.
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        backend: str | Backend | None = None,
        output: int | str | None = None,
        **options: Any,
    ) -> None:
        if layer is None:  # any layer binds: the gradients are taken at every bias layer
            layer = _any_layer(resolve_backend(model, backend), model, options)
        super().__init__(model, layer, backend=backend, output=output, **options)

    @property
    def layer(self) -> str:
        """``"input"``: FullGrad's map lives at the input's resolution."""
        return "input"

    def _signed(
        self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool, native: bool = False
    ) -> _Pass:
        if eigen_smooth:
            raise OptionError("FullGrad's map is not a weighted sum of channels: no eigen_smooth.")
        names = [name for name, _ in self.bound.bias_layers()]
        found = self.bound.tensor_gradients(inputs, targets, names, input_gradients=True)
        # Read the biases after the pass: linen creates its compact submodules, and so
        # learns a batch norm's own epsilon, only when the model runs.
        biases = dict(self.bound.bias_layers())
        assert found.inputs is not None and found.input_gradients is not None
        layout = found.layout
        x = _channels_first(found.inputs, layout, 1)
        dx = _channels_first(found.input_gradients, layout, 2)
        size = tuple(x.shape[2:])
        spatial_dims = len(size)
        if spatial_dims == 0:
            raise InputError(
                f"FullGrad maps the input's spatial dims; the input has shape {x.shape}."
            )
        raw = _rectified_channel_sum(x[:, None] * dx, size, spatial_dims)
        for name, tensor in found.tensors.items():
            if tensor.ndim < 3:
                continue  # no spatial dims: no map (a batch norm after a dense layer)
            gradients = _channels_first(found.gradients[name], layout, 2)
            shape = (1, 1, -1) + (1,) * (tensor.ndim - 2)
            bias = biases[name].reshape(shape)
            if gradients.shape[2] != biases[name].shape[0]:
                raise InputError(
                    f"layer {name!r} has {biases[name].shape[0]} biases but its output "
                    f"{tensor.shape} has {gradients.shape[2]} channels in the "
                    f"{layout.replace('_', '-')} layout."
                )
            raw += _rectified_channel_sum(bias * gradients, size, spatial_dims)
        layer_gradients = LayerGradients(
            activations=x.astype(np.float32),
            gradients=dx.astype(np.float32),
            scores=found.scores,
            targets=found.targets,
            input_spatial_shape=size,
            outputs=found.outputs,
            training=found.training,
        )
        weights = _no_channel_weights(layer_gradients)
        return _Pass(layer_gradients, weights, raw, "channels_first")


class ShapleyCAM(CAM):
    """ShapleyCAM (Cai, "CAMs as Shapley value-based explainers", arXiv 2501.06261).

    Grad-CAM's channel weights are a first-order estimate of each channel's Shapley value;
    ShapleyCAM adds the second-order term: with ``g = d s / d A`` and the Hessian-vector
    product ``H A = (d^2 s / d A^2) A``, the weight of channel k is the spatial mean of
    ``g - H A / 2`` over channel k, and the map is the weighted sum of the activation maps,
    as Grad-CAM's. Where the score is piecewise linear in the layer (logits behind ReLUs,
    max-pooling and dense layers) ``H A`` vanishes and ShapleyCAM is Grad-CAM; the paper
    differentiates the residual-softmax target ReST, ``2 z_c - logsumexp(z)`` (the logit
    minus the cross-entropy), which is curved, and so does multicam by default.

    Args:
        model, layer, backend, output, reshape, layer_layout, **options: as for
            :class:`~multicam.cam.CAM`.
        score: ``"rest"`` (default, the paper's target; ``res.scores`` are then ReST
            values) or ``"output"`` (the model's outputs as they are, pytorch-grad-cam's
            default ``ClassifierOutputTarget``). Class targets only with ``"rest"``.

    Needs the backend's optional ``hessian_vector_products`` (torch: double backward;
    Keras: nested tapes; JAX: forward-over-reverse). ``res.gradients`` are the plain
    gradients ``g``.

    Peer: pytorch-grad-cam's ``ShapleyCAM`` (the same weights: ``mean(g - 0.5 * hvp)``
    from ``torch.autograd.grad(grads, activations, grad_outputs=activations)``), with its
    ``ClassifierOutputReST`` target for ``score="rest"``.
    """

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        score: str = "rest",
        backend: str | Backend | None = None,
        output: int | str | None = None,
        reshape: Any = None,
        layer_layout: str = "auto",
        **options: Any,
    ) -> None:
        if score not in ("rest", "output"):
            raise OptionError(f"score={score!r}: expected 'rest' (the paper's) or 'output'.")
        self.score = score
        super().__init__(
            model,
            layer,
            backend=backend,
            output=output,
            reshape=reshape,
            layer_layout=layer_layout,
            **options,
        )

    def _signed(
        self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool, native: bool = False
    ) -> _Pass:
        targets = dataclasses.replace(targets, score="rest" if self.score == "rest" else "output")
        layer_gradients, products = self.bound.hessian_vector_products(inputs, targets)
        grid, layer_layout, dropped = self._to_grid(layer_gradients, warn)
        # The same reshaping for H A: layout and token grid are decided by the activations.
        curvature, _, _ = self._to_grid(
            dataclasses.replace(layer_gradients, gradients=products), warn=False
        )
        spatial = tuple(range(3, grid.gradients.ndim))
        shapley = grid.gradients - 0.5 * curvature.gradients
        weights = shapley.mean(axis=spatial, dtype=np.float64).astype(np.float32)
        raw = algebra.weighted_sum(grid.activations, weights)
        if eigen_smooth:
            raw = algebra.eigen_smooth(grid.activations, weights)
        return _Pass(grid, weights, raw, layer_layout, dropped)


class LeGrad(CAM):
    """LeGrad (Bousselham et al., arXiv 2404.03214): gradients of a ViT's attention maps.

    For every attention layer l with probabilities ``A_l`` ``(N, heads, Q, K)``, the
    relevance of key token j is the mean over heads and queries of
    ``ReLU(d s / d A_l)[..., j]``; the map is the mean over the layers, its patch tokens
    laid on the grid (the prefix tokens, e.g. the class token, dropped). One forward and
    one backward pass for all layers (the backend's optional ``tensor_gradients``).

    Args:
        model: as for :class:`~multicam.cam.CAM`.
        layers: the attention layers, in any order: a module or layer whose output is the
            attention probabilities (a softmax module in the block), or the framework's
            multi-head attention layer itself (torch ``nn.MultiheadAttention``, Keras
            ``MultiHeadAttention``, Flax linen ``MultiHeadDotProductAttention`` and nnx
            ``MultiHeadAttention`` with their default attention function), whose per-head
            probabilities multicam asks it for.
        reshape: the patch grid ``(h, w)`` or a :class:`~multicam.cam.TokenGrid` (with
            ``prefix_tokens``); ``None`` infers a square grid after 0 or 1 prefix token,
            for a square input only (otherwise it asks for ``reshape=``).
        backend, output, **options: as for :class:`~multicam.cam.CAM`.

    ``res.activations`` ``(N, 1, h, w)`` is the attention each patch receives (mean over
    layers, heads and queries), ``res.gradients`` ``(N, T, 1, h, w)`` the relevance (the
    signed map before resizing); ``res.weights`` are ones ``(N, T, 1)``.

    Peer: torchcam's ``LeGrad`` differentiates each block's own score (the head applied
    to that block's tokens through ``score_projection``), where multicam differentiates the
    model's score at every layer; they agree on the last block, and at every block when
    torchcam's projection is the rest of the network. torchcam needs
    ``nn.MultiheadAttention`` blocks; multicam takes any layer that outputs probabilities.
    """

    def __init__(
        self,
        model: Any,
        layers: Sequence[Any],
        *,
        backend: str | Backend | None = None,
        output: int | str | None = None,
        reshape: TokenGrid | Sequence[int] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise OptionError(
                "LeGrad needs a sequence of attention layers, e.g. "
                "[f'blocks.{i}.attn.softmax' for i in range(depth)]."
            )
        self.layers = list(layers)
        super().__init__(
            model, self.layers[0], backend=backend, output=output, reshape=reshape, **options
        )

    @property
    def layer(self) -> str:
        """The attention layers, comma-separated."""
        return ", ".join(str(layer) for layer in self.layers)

    def _grid(
        self, tokens: int, input_spatial: tuple[int, ...] | None
    ) -> tuple[tuple[int, ...], int]:
        """The patch grid and the number of prefix tokens for ``tokens`` keys.

        Without ``reshape=`` the grid is inferred only where the input shows it: a square
        grid for a square 2-D input; anything else asks for ``reshape=``.
        """
        if self.reshape is not None:
            cells = int(np.prod(self.reshape.shape))
            prefix = self.reshape.prefix_tokens
            if prefix is None:  # as TokenGrid: a class token or none
                prefix = tokens - cells if tokens - cells in (0, 1) else -1
            if prefix < 0 or prefix + cells != tokens:
                raise OptionError(
                    f"reshape={self.reshape.shape}: the attention has {tokens} key tokens, "
                    f"which is not {cells} patches plus 0 or 1 class token (for more prefix "
                    "tokens pass mc.TokenGrid(shape, prefix_tokens=p))."
                )
            return self.reshape.shape, prefix
        advice = "pass reshape=(h, w) (or mc.TokenGrid((h, w), prefix_tokens=p))"
        if input_spatial is None or len(input_spatial) != 2 or len(set(input_spatial)) != 1:
            raise OptionError(
                f"the attention has {tokens} key tokens and the input's spatial shape "
                f"{input_spatial} is not a square image, so the patch grid cannot be "
                f"inferred; {advice}."
            )
        for prefix in (1, 0):
            side = round(float(np.sqrt(tokens - prefix)))
            if side * side == tokens - prefix and side > 0:
                return (side, side), prefix
        raise OptionError(
            f"the attention has {tokens} key tokens, no square grid after 0 or 1 prefix "
            f"token; {advice}."
        )

    def _signed(
        self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool, native: bool = False
    ) -> _Pass:
        if eigen_smooth:
            raise OptionError("LeGrad's map is not a weighted sum of channels: no eigen_smooth.")
        found = self.bound.tensor_gradients(inputs, targets, self.layers)
        relevances, attention = [], []
        for name, probabilities in found.tensors.items():
            if (
                probabilities.ndim != 4
                or probabilities.shape[-1] != probabilities.shape[-2]
                or not np.allclose(probabilities.sum(axis=-1), 1.0, atol=1e-3)
            ):
                raise OptionError(
                    f"layer {name!r} outputs {probabilities.shape}, not self-attention "
                    "probabilities (N, heads, tokens, tokens) that sum to 1 over the keys; "
                    "name the softmax of each "
                    "attention block (or the attention layer itself)."
                )
            positive = np.maximum(found.gradients[name], 0, dtype=np.float32)
            relevances.append(positive.mean(axis=(2, 3), dtype=np.float64))
            attention.append(probabilities.mean(axis=(1, 2), dtype=np.float64))
        tokens = relevances[0].shape[-1]
        if any(relevance.shape[-1] != tokens for relevance in relevances):
            raise OptionError("the attention layers have different numbers of tokens.")
        input_spatial = input_spatial_shape(_as_numpy(inputs).shape, self.bound.layout)
        shape, prefix = self._grid(tokens, input_spatial)
        n, t = found.scores.shape
        relevance = np.mean(relevances, axis=0)[..., prefix:].reshape(n, t, 1, *shape)
        received = np.mean(attention, axis=0)[..., prefix:].reshape(n, 1, *shape)
        layer_gradients = LayerGradients(
            activations=received.astype(np.float32),
            gradients=relevance.astype(np.float32),
            scores=found.scores,
            targets=found.targets,
            input_spatial_shape=input_spatial,
            outputs=found.outputs,
            training=found.training,
        )
        raw = relevance[:, :, 0].astype(np.float32)
        return _Pass(layer_gradients, np.ones((n, t, 1), np.float32), raw, "channels_first")
