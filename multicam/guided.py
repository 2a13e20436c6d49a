"""Guided Backpropagation and Guided Grad-CAM: pixel-resolution explanations at the input.

One job: turn a backend's guided gradients (:meth:`~multicam.backends.BoundModel.
guided_gradients`, the gradient of each target score with respect to the input with every
ReLU's backward pass letting through only positive gradients at positive inputs,
Springenberg et al. 2015) into maps, and multiply them by an upsampled Grad-CAM map for
Guided Grad-CAM (Selvaraju et al. 2017). Like :mod:`multicam.cam` it holds no framework
code: the backends compute, the NumPy here combines.

Constraints: the backend must implement ``guided_gradients`` (torch, tensorflow and jax
do; another raises :class:`~multicam.errors.BackendError`); the model is unchanged after
every call; which ReLUs are guided depends on the backend (see each backend's
``guided_gradients``): a ReLU computed in a way the backend cannot see is differentiated
plainly.

Shapes (N samples, T targets, C input channels, ``S`` the input's spatial dims):

- ``res.raw``: ``(N, T, C, *S)`` signed, before any reduction: the guided gradient
  (Guided Backprop), or ``guided * cam`` (Guided Grad-CAM).
- ``res.maps``: ``raw`` reduced over the channel axis (default ``reduce="max_abs"``:
  ``max_c |raw|``, the usual saliency picture), then, with ``normalize=True``, divided by
  its largest absolute value per map, so ``max_abs``/``sum_abs`` maps lie in [0, 1] and
  signed ones (``"sum"``, ``"none"``) in [-1, 1] with zero kept at zero; a map whose largest
  absolute value is at most ``eps`` becomes zeros.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import algebra
from .backends import Backend, BoundModel, resolve_backend
from .backends.base import LayerGradients, check_finite
from .diagnose import BlankMapWarning, blank_maps, warn_training
from .errors import GuidedWarning, InputError, LayerError, OptionError
from .targets import TargetLike, Targets

__all__ = ["GuidedBackprop", "GuidedGradCAM", "GuidedResult"]

_REDUCTIONS = ("max_abs", "sum_abs", "sum", "none")
_INTERPOLATIONS = ("bilinear", "linear", "trilinear", "nearest", "nearest-floor")


@dataclass(frozen=True)
class GuidedResult:
    """The maps for one batch, with what they were computed from.

    Attributes:
        maps: ``(N, T, *S)`` float32 (``(N, T, C, *S)`` with ``reduce="none"``): ``raw``
            reduced over channels and normalised (see the module docstring).
        raw: ``(N, T, C, *S)`` float32 signed: the guided gradient, or for Guided Grad-CAM
            ``guided * cam[:, :, None]``.
        guided: ``(N, T, C, *S)`` the guided gradients, channels-first.
        cam: ``(N, T, *S)`` the ReLU'd Grad-CAM map resized to the input (not normalised),
            for Guided Grad-CAM; ``None`` for Guided Backprop.
        scores: ``(N, T)`` the target scores.
        targets: ``(N, T)`` int64 class ids, or ``None`` for a callable target.
        layer: the Grad-CAM layer's name (Guided Grad-CAM), else ``"input"``.
        backend: the backend's name.
        outputs: the model's outputs, e.g. ``(N, C)``, when the backend provides them.
        guided_relus: how many ReLU calls the guided pass guided (0: the result is the
            plain input gradient).
        unguided_activations: the other nonlinearities on the path (e.g. ``("SiLU",)``),
            which guided backpropagation leaves as they are.
        training: parts of the model left in training mode, run in inference mode.
    """

    maps: np.ndarray
    raw: np.ndarray
    guided: np.ndarray
    cam: np.ndarray | None
    scores: np.ndarray
    targets: np.ndarray | None
    layer: str
    backend: str
    outputs: np.ndarray | None = None
    guided_relus: int | None = None
    unguided_activations: tuple[str, ...] = ()
    training: tuple[str, ...] = ()


class GuidedBackprop:
    """Guided Backpropagation (Springenberg et al., 2015).

    ``raw[n, t] = d~ score[n, t] / d x[n]``, where ``d~`` is backpropagation with every ReLU's
    backward replaced by ``g -> g * (x > 0) * (g > 0)``; ``maps`` per the module docstring.
    With ``reduce="none", normalize=False`` the torch result equals Captum's
    ``GuidedBackprop(model).attribute(x, target)`` (tested).

    Args:
        model: as for :class:`~multicam.GradCAM`.
        layer: not needed (the gradients are taken at the input); ``None`` binds the model
            to a layer chosen for the backend's sake only. Any layer of the model works.
        backend: as for :class:`~multicam.GradCAM`.
        **options: passed to the backend, e.g. ``variables=`` for Flax linen.
    """

    def __init__(
        self, model: Any, layer: Any = None, *, backend: str | Backend | None = None, **options: Any
    ) -> None:
        self.bound: BoundModel = _bind(model, layer, backend, options, need_layer=False)

    @property
    def backend(self) -> str:
        """The name of the backend that computes the gradients."""
        return self.bound.backend

    def __call__(
        self,
        inputs: Any,
        targets: TargetLike = None,
        *,
        reduce: str = "max_abs",
        normalize: bool = True,
        eps: float = 0.0,
        warn: bool = True,
    ) -> GuidedResult:
        """Explain a batch.

        Args:
            inputs: ``(N, ...)`` batch in the backend's layout (NCHW for torch, NHWC for
                Keras and Flax), as a NumPy array or a framework tensor.
            targets: as for :class:`~multicam.GradCAM`.
            reduce: how ``maps`` collapses the channel axis: ``"max_abs"`` (default),
                ``"sum_abs"``, ``"sum"`` (signed) or ``"none"`` (keep ``(N, T, C, *S)``).
            normalize: divide each map by its largest absolute value.
            eps: maps whose largest absolute value is at most ``eps`` normalise to zeros
                (default 0: only all-zero maps, whatever the gradients' scale).
            warn: warn (:class:`~multicam.errors.GuidedWarning`) when the forward pass ran
                through nonlinearities that cannot be guided, or guided no ReLU at all, and
                (:class:`~multicam.errors.TrainingModeWarning`) when the model was left in
                training mode.
        """
        _check(reduce=reduce, normalize=normalize, eps=eps, warn=warn)
        parsed = _parse_targets(self.bound, inputs, targets)
        guided = self.bound.guided_gradients(inputs, parsed)
        return _result(
            guided.gradients, guided, None, "input", self.backend, reduce, normalize, eps, warn
        )


class GuidedGradCAM:
    """Guided Grad-CAM (Selvaraju et al., 2017): Guided Backprop times upsampled Grad-CAM.

    ``raw[n, t, c] = guided[n, t, c] * cam[n, t]`` with
    ``cam = resize(ReLU(sum_k alpha_k A_k), S_in)``, ``alpha_k`` the spatial mean gradient
    of the score at the layer (Grad-CAM), resized by ``interpolation`` (default bilinear,
    as in the paper), not normalised before the product. Two forward passes: one for
    Grad-CAM, one for the guided gradients (their targets are the first pass's classes).

    Captum: its ``GuidedGradCam(model, layer).attribute(x, target)`` is
    ``guided_backprop * LayerAttribution.interpolate(LayerGradCam(relu_attributions=True),
    S_in, "nearest")``, where ``"nearest"`` is torch's legacy nearest (source index
    ``floor(dst * in / out)``). ``interpolation="nearest-floor", reduce="none",
    normalize=False`` reproduces it (tested); multicam's ``"nearest"`` is
    ``"nearest-exact"`` (the same for integer scale factors).

    Args:
        model, backend, **options: as for :class:`~multicam.GradCAM`.
        layer: the Grad-CAM layer (required).
    """

    def __init__(
        self, model: Any, layer: Any, *, backend: str | Backend | None = None, **options: Any
    ) -> None:
        self.bound: BoundModel = _bind(model, layer, backend, options, need_layer=True)

    @property
    def backend(self) -> str:
        """The name of the backend that computes the gradients."""
        return self.bound.backend

    @property
    def layer(self) -> str:
        """The name of the Grad-CAM layer."""
        return self.bound.layer_name

    def __call__(
        self,
        inputs: Any,
        targets: TargetLike = None,
        *,
        reduce: str = "max_abs",
        normalize: bool = True,
        interpolation: str = "bilinear",
        align_corners: bool = False,
        eps: float = 0.0,
        warn: bool = True,
    ) -> GuidedResult:
        """Explain a batch.

        Args:
            inputs: as for :class:`~multicam.GradCAM`.
            targets: as for :class:`~multicam.GradCAM`.
            reduce: as for :class:`GuidedBackprop`.
            normalize: as for :class:`GuidedBackprop`.
            eps: as for :class:`GuidedBackprop`.
            warn: as for :class:`GuidedBackprop`, and
                :class:`~multicam.diagnose.BlankMapWarning` when a Grad-CAM map is blank.
            interpolation: how the Grad-CAM map is resized to the input: ``"bilinear"``
                (``"linear"``, ``"trilinear"``), ``"nearest"`` (nearest-exact), or
                ``"nearest-floor"`` (torch's legacy ``"nearest"``, Captum's default).
            align_corners: linear interpolation mapping corner pixels onto each other.
        """
        if interpolation not in _INTERPOLATIONS:
            raise OptionError(
                f"interpolation={interpolation!r} is not supported; choose one of "
                f"{_INTERPOLATIONS}."
            )
        if align_corners and interpolation.startswith("nearest"):
            raise OptionError("align_corners=True applies to linear interpolation only.")
        _check(reduce=reduce, normalize=normalize, eps=eps, align_corners=align_corners, warn=warn)
        parsed = _parse_targets(self.bound, inputs, targets)
        layer = self.bound.gradients(inputs, parsed)
        weights = algebra.channel_weights(layer.gradients, "mean")
        cam = algebra.relu(algebra.weighted_sum(layer.activations, weights))
        check_finite(cam, "the Grad-CAM maps")
        if parsed.kind in ("predicted", "all") and layer.targets is not None:
            # The same classes in the guided pass, whatever ties the arg-max breaks there.
            parsed = dataclasses.replace(parsed, kind="classes", classes=layer.targets)
        guided = self.bound.guided_gradients(inputs, parsed)
        size = guided.activations.shape[2:]
        if len(size) != cam.ndim - 2:
            raise InputError(
                f"the layer's output has {cam.ndim - 2} spatial dims but the input "
                f"{len(size)}; Guided Grad-CAM needs a layer with the input's spatial rank."
            )
        if interpolation == "nearest-floor":
            cam = _resize_nearest_floor(cam, size)
        else:
            cam = algebra.resize(cam, size, interpolation, align_corners)  # type: ignore[arg-type]
        raw = guided.gradients * cam[:, :, None]
        if warn and layer.targets is not None and blank_maps(cam).any():
            blank = blank_maps(cam)
            warnings.warn(
                f"{int(blank.sum())} of {blank.size} Grad-CAM maps at layer {self.layer!r} are "
                "blank after the ReLU, so their Guided Grad-CAM maps are zero; "
                f"mc.GradCAM(model, {self.layer!r})(x, targets).diagnose() tells why; pass "
                "warn=False to silence.",
                BlankMapWarning,
                stacklevel=2,
            )
        return _result(raw, guided, cam, self.layer, self.backend, reduce, normalize, eps, warn)


def _bind(
    model: Any, layer: Any, backend: str | Backend | None, options: dict[str, Any], need_layer: bool
) -> BoundModel:
    chosen = resolve_backend(model, backend)
    if layer is None:
        if need_layer:
            raise LayerError("Guided Grad-CAM needs the Grad-CAM layer: pass layer=.")
        layer = _any_layer(chosen, model, options)
    return chosen.bind(model, layer, **options)


def _any_layer(backend: Backend, model: Any, options: dict[str, Any]) -> Any:
    """Some valid layer for ``bind`` when the method needs none (gradients at the input)."""
    if backend.name == "torch":
        return model  # the model itself is a module of itself
    if backend.name == "tensorflow":
        from .backends.tensorflow import _named_layers

        named = list(_named_layers(model))
        if named:
            return named[0][0]
    if backend.name == "jax":
        if "variables" in options:  # linen: the path is only looked up by Grad-CAM passes
            return "input"
        from .backends.jax import _nnx_module_paths

        if isinstance(model, tuple | list):
            return None
        paths = _nnx_module_paths(model)
        if paths:
            return paths[0]
    raise LayerError(
        f"the {backend.name!r} backend needs a layer to bind to: pass any layer of the "
        "model as layer= (guided gradients are taken at the input whatever it is)."
    )


def _parse_targets(bound: BoundModel, inputs: Any, targets: TargetLike) -> Targets:
    n = bound.batch_size(inputs)
    if n == 0:
        raise InputError("the input batch is empty (N = 0); pass at least one sample.")
    return Targets.parse(targets, n)


def _check(**options: Any) -> None:
    reduce = options.pop("reduce")
    if reduce not in _REDUCTIONS:
        raise OptionError(f"reduce={reduce!r} is not supported; choose one of {_REDUCTIONS}.")
    eps = options.pop("eps")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise OptionError(f"eps={eps!r}: expected a finite number >= 0 (default 0).")
    for name, value in options.items():
        if not isinstance(value, bool | np.bool_):
            raise OptionError(f"{name}={value!r}: expected True or False.")


def _reduce(raw: np.ndarray, reduce: str) -> np.ndarray:
    if reduce == "max_abs":
        return np.abs(raw).max(axis=2)
    if reduce == "sum_abs":
        return np.abs(raw).sum(axis=2)
    if reduce == "sum":
        return raw.sum(axis=2)
    return raw.copy()


def _normalize(maps: np.ndarray, eps: float) -> np.ndarray:
    """Each ``maps[n, t]`` divided by its largest absolute value; tiny ones become 0."""
    flat = np.abs(maps.reshape(*maps.shape[:2], -1))
    scale = flat.max(axis=-1) if flat.shape[-1] else np.zeros(maps.shape[:2], np.float32)
    scale = scale.reshape(*maps.shape[:2], *(1,) * (maps.ndim - 2))
    safe = np.where(scale > eps, scale, 1.0)
    return np.where(scale > eps, maps / safe, 0.0).astype(np.float32)


def _result(
    raw: np.ndarray,
    guided: LayerGradients,
    cam: np.ndarray | None,
    layer: str,
    backend: str,
    reduce: str,
    normalize: bool,
    eps: float,
    warn: bool,
) -> GuidedResult:
    raw = raw.astype(np.float32, copy=False)
    maps = _reduce(raw, reduce)
    if normalize:
        maps = _normalize(maps, eps)
    if warn:
        warn_training(guided.training, backend, stacklevel=4)
        _warn_unguided(guided.guided_relus, guided.unguided_activations)
    return GuidedResult(
        maps=maps.astype(np.float32, copy=False),
        raw=raw,
        guided=guided.gradients,
        cam=cam,
        scores=guided.scores,
        targets=guided.targets,
        layer=layer,
        backend=backend,
        outputs=guided.outputs,
        guided_relus=guided.guided_relus,
        unguided_activations=guided.unguided_activations,
        training=guided.training,
    )


def _warn_unguided(guided_relus: int | None, unguided: tuple[str, ...]) -> None:
    """Say when a guided map is (partly) a plain gradient: see :class:`GuidedWarning`."""
    if guided_relus is None or (guided_relus and not unguided):
        return
    if not guided_relus:
        what = (
            "no ReLU on the path from the input to the output"
            + (f" (its nonlinearities are {', '.join(unguided)})" if unguided else "")
            + ", so this map is the plain input gradient, not a guided one"
        )
    else:
        what = (
            f"{guided_relus} ReLU calls were guided, but the path also runs through "
            f"{', '.join(unguided)}, whose backward passes negative gradients as they are; "
            "the map is only partly guided"
        )
    warnings.warn(
        f"guided backpropagation guides ReLUs only, and found {what}. Read it as a "
        "gradient saliency map, or use GradCAM; pass warn=False to silence.",
        GuidedWarning,
        stacklevel=4,
    )


def _resize_nearest_floor(maps: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Torch's legacy ``mode="nearest"``: source index ``min(floor(dst * in / out), in - 1)``.

    The scale is computed in float32, as torch does on CPU.
    """
    out = maps.astype(np.float32, copy=False)
    ndim = len(size)
    for axis, target in zip(range(maps.ndim - ndim, maps.ndim), size, strict=True):
        source = out.shape[axis]
        scale = np.float32(source) / np.float32(target)
        index = np.floor(np.arange(target, dtype=np.float32) * scale).astype(np.int64)
        out = np.take(out, np.minimum(index, source - 1), axis=axis)
    return out
