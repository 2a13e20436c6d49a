"""The public explainers: bind a model to a layer once, explain batches with a call.

An explainer asks its backend for :class:`~multicam.backends.LayerGradients` and hands
them to :mod:`multicam.algebra`; it holds no framework code. A method is a subclass that
says how channel weights come from the gradients (:meth:`CAM.channel_weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from . import algebra, xp
from .backends import Backend, BoundModel, LayerGradients, resolve_backend
from .backends.base import check_deferred, check_finite, deferred_gradient_checks
from .diagnose import Diagnosis, diagnose, warn_if_blank, warn_training
from .errors import InputError, LayerError, LayoutWarning, OptionError
from .targets import TargetLike, Targets

__all__ = [
    "CAM",
    "CAMResult",
    "EigenCAM",
    "FusedResult",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "MultiLayerCAM",
    "TokenGrid",
    "XGradCAM",
]

_INTERPOLATIONS = ("bilinear", "linear", "trilinear", "nearest")
_LAYER_LAYOUTS = ("auto", "channels_first", "channels_last")
_ALGEBRAS = ("numpy", "native", "auto")
_ARRAY_FIELDS = (
    "maps",
    "raw",
    "weights",
    "scores",
    "activations",
    "gradients",
    "outputs",
    "dropped_token_gradients",
)


def _ops(array: Any) -> ModuleType:
    """The algebra for ``array``: :mod:`multicam.algebra` for NumPy, else :mod:`multicam.xp`.

    The first is the reference; the second computes the same functions on any array-API
    namespace (a framework's own arrays).
    """
    return algebra if isinstance(array, np.ndarray) else xp


def _moveaxis(array: Any, source: int, destination: int) -> Any:
    """``array`` with an axis moved: C-contiguous NumPy, or the framework's own array."""
    if isinstance(array, np.ndarray):
        return np.ascontiguousarray(np.moveaxis(array, source, destination))
    return xp.namespace(array).moveaxis(array, source, destination)


def _reshape(array: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(array, np.ndarray):
        return array.reshape(shape)
    return xp.namespace(array).reshape(array, shape)


@dataclass(frozen=True)
class _Pass:
    """One explained forward/backward pass, as the algebra left it."""

    layer_gradients: LayerGradients
    weights: np.ndarray
    raw: np.ndarray
    layer_layout: str
    dropped: np.ndarray | None = None


@dataclass(frozen=True)
class CAMResult:
    """The maps for one batch, with everything they were computed from.

    Shapes: N samples, T targets per sample, K channels, ``S`` the layer's spatial dims,
    ``S_out`` the output size.

    Array types: NumPy arrays by default (``algebra="numpy"``). When the explainer ran
    with ``algebra="native"`` (or ``"auto"`` on an accelerator), ``maps``, ``raw``,
    ``weights``, ``scores``, ``activations``, ``gradients``, ``outputs`` and
    ``dropped_token_gradients`` are the framework's own arrays (``torch.Tensor``,
    ``jax.Array``) on the model's device; ``targets`` is NumPy either way.
    :meth:`to_numpy` copies them all to the host.

    Attributes:
        maps: ``(N, T, *S_out)`` float32: ReLU'd (unless ``relu=False``), resized,
            normalised to [0, 1] per map (unless ``normalize=False``).
        raw: ``(N, T, *S)`` float32 signed weighted sum, before ReLU, resizing or
            normalising.
        weights: ``(N, T, K)`` channel weights.
        scores: ``(N, T)`` the target scores that were differentiated.
        targets: ``(N, T)`` int64 class ids, or ``None`` for a callable target.
        activations: ``(N, K, *S)`` the layer's output.
        gradients: ``(N, T, K, *S)`` d scores / d activations.
        layer: the layer's name.
        backend: the backend's name.
        outputs: the model's outputs, e.g. ``(N, C)``, when the backend provides them.
        training: the parts of the model that were left in training mode and were run in
            inference mode for this call (see :attr:`LayerGradients.training`); empty when
            the model was in inference mode.
        layer_layout: where the layer's channel axis was read: ``"channels_first"`` or
            ``"channels_last"`` (its output as the layer returned it).
        request: the parsed target request (class ids, a region, or a score function).
        dropped_token_gradients: for a token layer explained with ``reshape=``: ``(N, T)``
            the largest absolute gradient on the dropped prefix (class/register) tokens;
            ``None`` otherwise.
    """

    maps: np.ndarray
    raw: np.ndarray
    weights: np.ndarray
    scores: np.ndarray
    targets: np.ndarray | None
    activations: np.ndarray
    gradients: np.ndarray
    layer: str
    backend: str
    outputs: np.ndarray | None = None
    training: tuple[str, ...] = ()
    layer_layout: str = "channels_first"
    request: Targets | None = None
    dropped_token_gradients: np.ndarray | None = None

    @property
    def is_numpy(self) -> bool:
        """Whether the arrays are NumPy (``False`` for a native-algebra result)."""
        return isinstance(self.maps, np.ndarray)

    def to_numpy(self) -> CAMResult:
        """This result with every array as NumPy on the host (itself when already so)."""
        if self.is_numpy:
            return self
        return dataclasses.replace(
            self, **{name: xp.to_numpy(getattr(self, name)) for name in _ARRAY_FIELDS}
        )

    def diagnose(self) -> Diagnosis:
        """Explain what the maps show, and why a map is blank, with the numbers behind it.

        Returns:
            A :class:`~multicam.diagnose.Diagnosis`; ``print()`` it for a report.
        """
        return diagnose(self.to_numpy())


@dataclass(frozen=True)
class TokenGrid:
    """How a transformer layer's tokens ``(N, L, D)`` form a spatial grid.

    Attributes:
        shape: the grid of patch tokens, e.g. ``(14, 14)``.
        prefix_tokens: tokens before the patches (1 for a class token, more for register
            tokens), dropped; ``None`` infers 0 or 1 from ``L``.

    Example:
        >>> TokenGrid.of((14, 14)).shape
        (14, 14)
    """

    shape: tuple[int, ...]
    prefix_tokens: int | None = None

    @classmethod
    def of(cls, reshape: TokenGrid | Sequence[int]) -> TokenGrid:
        """A :class:`TokenGrid` from itself or from a grid shape."""
        if isinstance(reshape, TokenGrid):
            return reshape
        shape = tuple(reshape)
        if not shape or not all(isinstance(s, int | np.integer) and s > 0 for s in shape):
            raise OptionError(f"reshape={reshape!r}: expected a grid shape such as (14, 14).")
        return cls(tuple(int(s) for s in shape))

    def apply(self, layer_gradients: LayerGradients, layout: str) -> LayerGradients:
        """Turn token activations and gradients into channels-first grids ``(N, D, *grid)``.

        A layer whose output already has the grid's rank (e.g. a Swin stage returning
        ``(N, H, W, C)``) is read as channels-last when ``(H, W)`` is the grid.
        """
        return self.split(layer_gradients, layout)[0]

    def split(
        self, layer_gradients: LayerGradients, layout: str
    ) -> tuple[LayerGradients, np.ndarray | None]:
        """:meth:`apply`, and ``(N, T)`` the largest |gradient| on the dropped prefix tokens.

        The second value is ``None`` when no token was dropped.
        """
        activations, gradients = layer_gradients.activations, layer_gradients.gradients
        if activations.ndim == len(self.shape) + 2:  # already a grid: which axis is D?
            if activations.shape[2:] == self.shape:
                return layer_gradients, None
            as_last = swap_layout(layer_gradients, layout)
            if as_last.activations.shape[2:] == self.shape:
                return as_last, None
            raise OptionError(
                f"reshape={self.shape}: the layer's output already has {len(self.shape)} "
                f"spatial dims (shape {_native_shape(activations, layout)} as the layer "
                f"returned it), and neither its leading nor its trailing dims are "
                f"{self.shape}; drop reshape= or pass layer_layout=."
            )
        if activations.ndim != 3:
            raise OptionError(
                f"reshape= expects a token sequence (N, L, D); the layer's output has "
                f"{activations.ndim} dims (shape {_native_shape(activations, layout)})."
            )
        if layout == "channels_last":  # the backend moved D forward: (N, D, L) -> (N, L, D)
            activations = _moveaxis(activations, 1, -1)
            gradients = _moveaxis(gradients, 2, -1)
        tokens = activations.shape[1]
        cells = int(np.prod(self.shape))
        prefix = self.prefix_tokens
        if prefix is None:
            prefix = tokens - cells if tokens - cells in (0, 1) else -1
        if prefix < 0 or tokens - prefix != cells:
            raise OptionError(
                f"the layer has {tokens} tokens, which do not form a {self.shape} grid "
                f"({cells} patch tokens) after {max(prefix, 0)} prefix tokens; pass "
                "reshape=TokenGrid(shape, prefix_tokens=...) with the right grid."
            )
        n, t = gradients.shape[:2]
        grid_a = _reshape(activations[:, prefix:], (n, *self.shape, -1))
        grid_g = _reshape(gradients[:, :, prefix:], (n, t, *self.shape, -1))
        dropped = None
        if prefix:
            if isinstance(gradients, np.ndarray):
                dropped = np.abs(gradients[:, :, :prefix]).reshape(n, t, -1).max(axis=-1)
            else:
                ns = xp.namespace(gradients)
                dropped = ns.max(ns.reshape(ns.abs(gradients[:, :, :prefix]), (n, t, -1)), axis=-1)
        return (
            dataclasses.replace(
                layer_gradients,
                activations=_moveaxis(grid_a, -1, 1),
                gradients=_moveaxis(grid_g, -1, 2),
            ),
            dropped,
        )


def _native_shape(activations: np.ndarray, layout: str) -> tuple[int, ...]:
    """The shape of the layer's output as the layer returned it (before channels-first)."""
    shape = activations.shape
    if layout == "channels_last":
        return (shape[0], *shape[2:], shape[1])
    return tuple(shape)


def swap_layout(layer_gradients: LayerGradients, native: str) -> LayerGradients:
    """Re-read a layer's output with its channel axis at the other end.

    A backend puts the channel axis of every layer at ``native``'s place; a layer whose
    output has it at the other end (a Swin block's ``(N, H, W, C)`` in torch) was read
    wrongly. This undoes that reading: the result is channels-first again, with the true
    channel axis.

    Args:
        layer_gradients: channels-first as the backend read them.
        native: the backend's layout.
    """
    activations, gradients = layer_gradients.activations, layer_gradients.gradients
    if native == "channels_first":  # read (N, H, W, C) as K=H: the true K is last
        activations, gradients = _moveaxis(activations, -1, 1), _moveaxis(gradients, -1, 2)
    else:  # moved (N, K, h, w)'s last axis forward: (N, w, K, h); undo
        activations, gradients = _moveaxis(activations, 1, -1), _moveaxis(gradients, 2, -1)
    return dataclasses.replace(layer_gradients, activations=activations, gradients=gradients)


def _consistent(spatial: Sequence[int], input_spatial: Sequence[int]) -> bool:
    """Whether a layer's spatial shape is the input's, downsampled alike on every axis."""
    if len(spatial) != len(input_spatial) or min(spatial) < 1:
        return False
    strides = [i / s for i, s in zip(input_spatial, spatial, strict=True)]
    return max(strides) <= 1.5 * min(strides) and min(strides) >= 0.5


def guess_layer_layout(layer_gradients: LayerGradients, native: str) -> tuple[str, str | None]:
    """Where a layer's channel axis most likely is, and why, when it is not ``native``.

    A backend reads every layer in its framework's layout. Some layers break it (a Swin
    block in torch returns ``(N, H, W, C)``). The evidence is the input's shape: the true
    spatial dims are the input's, each downsampled by about the same stride. When the
    native reading fails that test and the other one passes, the other is likely right.

    Returns:
        ``(layout, reason)``: ``reason`` is ``None`` when the native reading stands.
    """
    activations = layer_gradients.activations
    input_spatial = layer_gradients.input_spatial_shape
    if activations.ndim < 4 or input_spatial is None or len(input_spatial) != activations.ndim - 2:
        return native, None
    other = "channels_last" if native == "channels_first" else "channels_first"
    native_spatial = activations.shape[2:]
    if _consistent(native_spatial, input_spatial):
        return native, None
    swapped = _swapped_shape(activations.shape, native)
    other_spatial = swapped[2:]
    if not _consistent(other_spatial, input_spatial):
        return native, None
    shape = _native_shape(activations, native)
    reason = (
        f"its output {shape} read {native.replace('_', '-')} would give "
        f"{activations.shape[1]} channels on a {'x'.join(map(str, native_spatial))} grid, "
        f"which does not match the input's {'x'.join(map(str, input_spatial))}; read "
        f"{other.replace('_', '-')} it is a {'x'.join(map(str, other_spatial))} grid of "
        f"{swapped[1]} channels"
    )
    return other, reason


def _swapped_shape(shape: Sequence[int], native: str) -> tuple[int, ...]:
    """The activations' shape after :func:`swap_layout`, without moving any data."""
    n, k, *spatial = shape
    if native == "channels_first":  # (N, K, *S) -> (N, S[-1], K, *S[:-1])
        return (n, spatial[-1], k, *spatial[:-1])
    return (n, spatial[0], *spatial[1:], k)  # (N, K, *S) -> (N, S[0], *S[1:], K)


def _token_hint(activations: np.ndarray, layout: str, input_spatial: Sequence[int]) -> str:
    """A ``reshape=`` suggestion for a token sequence ``(N, L, D)``, or ``""``."""
    native = _native_shape(activations, layout)
    tokens = native[1]
    ratio = input_spatial[0] / input_spatial[1] if len(input_spatial) == 2 else 1.0
    for prefix in range(0, 9):
        cells = tokens - prefix
        if cells < 1:
            break
        for h in range(1, cells + 1):
            if cells % h == 0 and abs(h / (cells // h) - ratio) < 1e-9:
                grid = (h, cells // h)
                if prefix in (0, 1):
                    return (
                        f" e.g. reshape={grid} ({tokens} = {cells} patch tokens + {prefix} prefix)"
                    )
                return (
                    f" e.g. reshape=mc.TokenGrid({grid}, prefix_tokens={prefix}) "
                    f"({tokens} = {cells} patch tokens + {prefix} prefix tokens)"
                )
    return ""


class CAM:
    """Base of the class-activation-map explainers; subclasses define channel weights.

    Args:
        model: a ``torch.nn.Module``, a Keras 3 model, a Flax linen module (with
            ``variables=``) or nnx module, or a ``(features, head)`` pair of JAX functions
            (with ``backend="jax"``).
        layer: the layer to explain: a name or path (``"features.7"`` in torch,
            ``"block2/conv1"`` in Keras and linen) or the layer object itself.
        backend: ``"torch"``, ``"tensorflow"``, ``"jax"``, a registered third-party name,
            or a :class:`~multicam.backends.Backend`; default: chosen from the model's type.
        output: for a model with several outputs (tuple, list or dict), the index or key
            of the one to explain.
        reshape: for a transformer layer whose output is a token sequence ``(N, L, D)``
            (batch first), the grid its patch tokens form: ``(h, w)`` (a leading class
            token, when ``L = h w + 1``, is dropped) or a :class:`TokenGrid`.
        layer_layout: where the layer's output keeps its channels: ``"auto"`` (default:
            the framework's layout, unless the input's shape shows otherwise, which is
            then said in a :class:`~multicam.errors.LayoutWarning`), ``"channels_first"``
            ``(N, C, *S)`` or ``"channels_last"`` ``(N, *S, C)`` (e.g. a Swin block in
            torch).
        algebra: where the maps are computed. ``"numpy"`` (default, the reference): the
            backend hands activations and gradients to the host and
            :mod:`multicam.algebra` computes in NumPy; every array of the result is NumPy.
            ``"native"``: :mod:`multicam.xp` computes on the framework's own arrays, on
            the model's device (torch and JAX backends; needs ``array-api-compat``); the
            result's arrays are then ``torch.Tensor`` / ``jax.Array`` on that device (see
            :class:`CAMResult`). ``"auto"``: native when the model's parameters are on an
            accelerator (a GPU) and the method and backend support it, else NumPy.
            Both give the same maps to float32 round-off.
        **options: passed to the backend, e.g. ``variables=`` for Flax linen.

    Raises:
        UnsupportedModelError: no backend recognises the model.
        BackendNotInstalledError: the requested backend's framework is missing, or
            ``algebra="native"`` without ``array-api-compat``.
        LayerError: the layer does not exist (the message lists the nearest names).
        OptionError: ``algebra="native"`` for a method or backend without a native path.
    """

    #: Whether the class's own numerical methods compute with :mod:`multicam.xp` on a
    #: framework's arrays (``algebra="native"``). The built-in gradient methods set it; a
    #: subclass that overrides ``channel_weights``, ``combine``, ``_signed``,
    #: ``_augmented`` or ``__call__`` without setting it again has no native path.
    native_algebra: ClassVar[bool] = False

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        backend: str | Backend | None = None,
        output: int | str | None = None,
        reshape: TokenGrid | Sequence[int] | None = None,
        layer_layout: str = "auto",
        algebra: str = "numpy",
        **options: Any,
    ) -> None:
        if layer_layout not in _LAYER_LAYOUTS:
            raise OptionError(f"layer_layout={layer_layout!r}: expected one of {_LAYER_LAYOUTS}.")
        if algebra not in _ALGEBRAS:
            raise OptionError(
                f"algebra={algebra!r}: expected 'numpy' (the default: NumPy on the host), "
                "'native' (the framework's own arrays on the model's device) or 'auto' "
                "(native on an accelerator)."
            )
        self.output = output
        self.reshape = None if reshape is None else TokenGrid.of(reshape)
        self.layer_layout = layer_layout
        self.algebra = algebra
        self.bound: BoundModel = resolve_backend(model, backend).bind(model, layer, **options)
        if algebra == "native":
            if not _supports_native(type(self)):
                raise OptionError(
                    f"algebra='native': {type(self).__name__} computes its weights in NumPy; "
                    "use algebra='numpy' (or 'auto'), or a gradient method such as GradCAM."
                )
            if getattr(self.bound, "native_gradients", None) is None:
                raise OptionError(
                    f"algebra='native': the {self.backend!r} backend hands back NumPy arrays "
                    "only; the torch and jax backends have a native path. Use "
                    "algebra='numpy' (or 'auto')."
                )
            xp.namespace(np.zeros(1))  # array-api-compat missing: say so now, not per call

    def _native(self, inputs: Any) -> bool:
        """Whether this call computes on the framework's arrays (see ``algebra=``)."""
        if self.algebra != "auto":
            return self.algebra == "native"
        on_accelerator = getattr(self.bound, "on_accelerator", None)
        if not _supports_native(type(self)) or on_accelerator is None:
            return False
        if not on_accelerator(inputs):
            return False
        try:
            xp.namespace(np.zeros(1))
        except ImportError:  # auto without array-api-compat: the NumPy path
            return False
        return True

    @property
    def backend(self) -> str:
        """The name of the backend that computes the gradients."""
        return self.bound.backend

    @property
    def layer(self) -> str:
        """The name of the explained layer."""
        return self.bound.layer_name

    def channel_weights(self, layer_gradients: LayerGradients) -> np.ndarray:
        """``(N, T, K)`` channel weights from the layer's activations and gradients."""
        raise NotImplementedError

    def combine(self, layer_gradients: LayerGradients) -> tuple[np.ndarray, np.ndarray]:
        """The method's channel weights ``(N, T, K)`` and signed map ``(N, T, *S)``.

        The default is the weighted sum of the activation maps by :meth:`channel_weights`;
        methods that weigh every position on its own override this.
        """
        weights = self.channel_weights(layer_gradients)
        return weights, _ops(weights).weighted_sum(layer_gradients.activations, weights)

    def __call__(
        self,
        inputs: Any,
        targets: TargetLike = None,
        *,
        relu: bool = True,
        normalize: bool = True,
        size: str | int | Sequence[int] | None = "input",
        interpolation: str = "bilinear",
        align_corners: bool = False,
        eps: float = algebra.CONSTANT_RTOL,
        warn: bool = True,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
    ) -> CAMResult:
        """Explain a batch.

        Args:
            inputs: ``(N, ...)`` batch in the backend's layout (NCHW for torch, NHWC for
                Keras and Flax), as a NumPy array or a framework tensor.
            targets: ``None`` for the predicted class; an int for the same class on every
                sample; N ints for one class per sample; an ``(N, T)`` array for T classes
                per sample; ``"all"`` for every class; or a callable ``outputs -> (N,)``
                differentiable scores.
            relu: keep only positive evidence (as in the Grad-CAM paper).
            normalize: min-max normalise each map to [0, 1], after resizing; a constant
                map becomes all zeros.
            size: ``"input"`` for the input's spatial size, ``None`` for the layer's own,
                or an explicit shape (an int for the same length on every axis).
            interpolation: ``"bilinear"`` (``"linear"``, ``"trilinear"``: the same rule in
                any number of dims) or ``"nearest"``; see :mod:`multicam.algebra`.
            align_corners: linear interpolation mapping corner pixels onto each other.
            eps: relative tolerance of the normalisation: a map whose range is at most
                ``eps`` times its largest absolute value is constant and becomes zeros
                (default: 4 float32 ulps). Scale-free: maps near 1e-13 normalise like
                maps near 1.
            warn: warn (:class:`~multicam.diagnose.BlankMapWarning`) when a map is blank
                after the ReLU; ``result.diagnose()`` says why.
            eigen_smooth: replace the weighted sum by the first principal component of the
                weighted activation maps (:func:`multicam.algebra.eigen_smooth`); for
                channel-weight methods only.
            aug_smooth: average the signed map over six versions of the input (as is and
                flipped left-right, each scaled by 0.9, 1.0 and 1.1), flipping the maps of
                flipped inputs back, then rectify, resize and normalise the average. Six
                forward passes; NumPy inputs (or tensors convertible with ``np.asarray``).

        Returns:
            A :class:`CAMResult`.
        """
        if interpolation not in _INTERPOLATIONS:
            raise OptionError(
                f"interpolation={interpolation!r} is not supported; choose one of "
                f"{_INTERPOLATIONS}."
            )
        if align_corners and interpolation == "nearest":
            raise OptionError("align_corners=True applies to linear interpolation only.")
        _check_options(relu=relu, normalize=normalize, align_corners=align_corners, eps=eps)
        n = self.bound.batch_size(inputs)
        if n == 0:
            raise InputError("the input batch is empty (N = 0); pass at least one sample.")
        _check_options(eigen_smooth=eigen_smooth, aug_smooth=aug_smooth)
        if eigen_smooth and isinstance(self, _ElementWise):
            raise OptionError(
                f"eigen_smooth applies to channel-weight methods; {type(self).__name__} "
                "weighs every position on its own."
            )
        parsed = Targets.parse(targets, n, output=self.output)
        native = self._native(inputs)
        if aug_smooth:
            explained = self._augmented(inputs, parsed, eigen_smooth, warn, native)
        else:
            explained = self._signed(inputs, parsed, eigen_smooth, warn, native)
        layer_gradients, weights, raw = explained.layer_gradients, explained.weights, explained.raw
        ops = _ops(raw)
        maps = ops.relu(raw) if relu else raw
        out_size = self._output_size(size, layer_gradients)
        if out_size is not None:
            maps = ops.resize(maps, out_size, interpolation, align_corners)
        if ops is algebra:
            check_finite(raw, "the weighted sums of the activation maps")
            if normalize:
                # In place on the maps the ReLU or the resize just made: one pass over them
                # and one allocation fewer.
                owned = not np.may_share_memory(maps, raw)
                maps = algebra.normalize(maps, raw.ndim - 2, eps, out=maps if owned else None)
        else:
            xp.check_finite({"the weighted sums of the activation maps": raw})
            if normalize:
                maps = xp.normalize(maps, raw.ndim - 2, eps)
        result = CAMResult(
            maps=maps,
            raw=raw,
            weights=weights,
            scores=layer_gradients.scores,
            targets=layer_gradients.targets,
            activations=layer_gradients.activations,
            gradients=layer_gradients.gradients,
            layer=self.layer,
            backend=self.backend,
            outputs=layer_gradients.outputs,
            training=layer_gradients.training,
            layer_layout=explained.layer_layout,
            request=parsed,
            dropped_token_gradients=explained.dropped,
        )
        if warn:
            warn_training(result.training, result.backend)
            if relu and ops is algebra:
                warn_if_blank(result)
            elif relu and xp.blank_maps(raw).any():  # only (N, T) flags left the device
                warn_if_blank(dataclasses.replace(result, raw=xp.to_numpy(raw)))
        return result

    def _signed(
        self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool, native: bool = False
    ) -> _Pass:
        """One backend call: the layer gradients, channel weights and signed map."""
        if native:
            layer_gradients = self.bound.native_gradients(inputs, targets)  # type: ignore[attr-defined]
            layer_gradients, layer_layout, dropped = self._to_grid(layer_gradients, warn)
            weights, raw = self.combine(layer_gradients)
        else:
            # Grad-CAM's weights are the gradients' spatial means: a NaN or Inf anywhere in
            # the gradients makes its weight non-finite, so the backend's scan of all the
            # gradients for NaN/Inf is left to the (N, T, K) weights (at T=10 on gap64,
            # one pass over 21 MB fewer); only non-finite weights scan the gradients, for
            # the backend's own message.
            cls = type(self)
            pooled = (
                self.reshape is None
                and cls.channel_weights is GradCAM.channel_weights
                and cls.combine is CAM.combine
            )
            checks: contextlib.AbstractContextManager[list[tuple[np.ndarray, str]]] = (
                deferred_gradient_checks() if pooled else contextlib.nullcontext([])
            )
            with checks as pending:
                layer_gradients = self.bound.gradients(inputs, targets)
            try:
                layer_gradients, layer_layout, dropped = self._to_grid(layer_gradients, warn)
                weights, raw = self.combine(layer_gradients)
            except BaseException:
                check_deferred(pending)  # NaN/Inf in the gradients is told first, as before
                raise
            check_deferred(pending, weights)
        if eigen_smooth:
            raw = _ops(raw).eigen_smooth(layer_gradients.activations, weights)
        return _Pass(layer_gradients, weights, raw, layer_layout, dropped)

    def _to_grid(
        self, layer_gradients: LayerGradients, warn: bool
    ) -> tuple[LayerGradients, str, np.ndarray | None]:
        """Channels-first activation grids from whatever the layer returned.

        Applies ``reshape=`` to token sequences, ``layer_layout=`` (or the guessed layout)
        to grids, and refuses a token sequence explained as if it were a 1-D signal.
        """
        native = self.bound.layout
        if self.reshape is not None:
            before = layer_gradients.activations.shape
            grid, dropped = self.reshape.split(layer_gradients, native)
            swapped = grid.activations.ndim == len(before) and grid.activations.shape != before
            layout = native if not swapped else _other(native)
            return grid, layout, dropped
        activations = layer_gradients.activations
        input_spatial = layer_gradients.input_spatial_shape
        if activations.ndim == 3 and input_spatial is not None and len(input_spatial) >= 2:
            raise LayerError(
                f"layer {self.layer!r} outputs {_native_shape(activations, native)}, a "
                f"sequence of tokens, not a {len(input_spatial)}-D grid like the input "
                f"{tuple(input_spatial)}: a transformer block. Say how its tokens form a grid"
                f" with reshape=(h, w) or reshape=mc.TokenGrid(...)"
                f"{_token_hint(activations, native, input_spatial)}; a leading class token "
                "is dropped."
            )
        if self.layer_layout == "auto":
            layout, reason = guess_layer_layout(layer_gradients, native)
            if reason is not None and warn:
                warnings.warn(
                    f"layer {self.layer!r} looks {layout.replace('_', '-')}: {reason}. "
                    f"multicam reads it {layout.replace('_', '-')}; pass "
                    f"layer_layout={layout!r} to say so and silence this warning (or "
                    f"layer_layout={native!r} to keep the {self.backend} layout).",
                    LayoutWarning,
                    stacklevel=4,
                )
        else:
            layout = self.layer_layout
        if layout != native:
            if activations.ndim < 4:
                raise OptionError(
                    f"layer_layout={layout!r} applies to a layer with spatial dims; layer "
                    f"{self.layer!r} outputs {_native_shape(activations, native)}."
                )
            layer_gradients = swap_layout(layer_gradients, native)
        return layer_gradients, layout, None

    def _augmented(
        self, inputs: Any, targets: Targets, eigen_smooth: bool, warn: bool, native: bool = False
    ) -> _Pass:
        """Test-time augmentation: the mean signed map over flips and brightness scales."""
        array = np.asarray(inputs.detach().cpu() if hasattr(inputs, "detach") else inputs)
        width_axis = -1 if self.bound.layout == "channels_first" else -2
        if targets.kind in ("predicted", "all"):  # fix the classes once, from the plain input
            plain = self._signed(array, targets, eigen_smooth, warn, native).layer_gradients
            assert plain.targets is not None
            targets = Targets.parse(plain.targets, targets.batch_size, output=self.output)
        passes: list[_Pass] = []
        for flip in (False, True):
            for scale in (0.9, 1.0, 1.1):
                variant = np.flip(array, axis=width_axis) if flip else array
                explained = self._signed(
                    np.ascontiguousarray(variant * np.asarray(scale, array.dtype)),
                    targets,
                    eigen_smooth,
                    warn and not passes,  # one layout warning, not six
                    native,
                )
                raw = explained.raw
                if flip and native:
                    raw = xp.namespace(raw).flip(raw, axis=-1)
                elif flip:
                    raw = np.flip(raw, -1)
                passes.append(dataclasses.replace(explained, raw=raw))
        plain_pass = passes[1]  # unflipped, unscaled
        if native:
            return dataclasses.replace(
                plain_pass,
                weights=xp.mean_of([p.weights for p in passes]),
                raw=xp.mean_of([p.raw for p in passes]),
            )
        weights = np.stack([p.weights for p in passes]).mean(axis=0, dtype=np.float64)
        raw = np.stack([p.raw for p in passes]).mean(axis=0, dtype=np.float64)
        return dataclasses.replace(
            plain_pass, weights=weights.astype(np.float32), raw=raw.astype(np.float32)
        )

    def _output_size(
        self, size: str | int | Sequence[int] | None, layer_gradients: LayerGradients
    ) -> tuple[int, ...] | None:
        spatial = layer_gradients.activations.shape[2:]
        if size is None:
            return None
        if isinstance(size, str):
            if size != "input":
                raise OptionError(f"size={size!r}: expected 'input', None or a shape.")
            input_spatial = layer_gradients.input_spatial_shape
            if input_spatial is None or len(input_spatial) != len(spatial):
                raise InputError(
                    f"size='input' needs an input with as many spatial dims as the layer's "
                    f"output {spatial}; pass size=None for the layer's resolution or an "
                    "explicit shape."
                )
            return layer_gradients.input_spatial_shape
        shape = (size,) * len(spatial) if isinstance(size, int) else tuple(size)
        if len(shape) != len(spatial) or not all(
            isinstance(s, int | np.integer) and s > 0 for s in shape
        ):
            raise OptionError(
                f"size={size!r} does not fit the layer's {len(spatial)} spatial dims "
                f"{spatial}; pass {len(spatial)} positive ints."
            )
        return tuple(int(s) for s in shape)


_NUMERICAL = ("channel_weights", "combine", "_signed", "_augmented", "__call__")


_NATIVE_SUPPORT: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _supports_native(cls: type[CAM]) -> bool:
    """Whether every numerical method ``cls`` runs comes from a class with a native path.

    The methods ``CAM`` defines are array-generic; any other class defining one must set
    ``native_algebra = True`` itself, so a subclass that overrides one in NumPy (and does
    not say otherwise) falls back to the NumPy path instead of failing on tensors.
    """
    if cls not in _NATIVE_SUPPORT:
        owners = [next(k for k in cls.__mro__ if name in vars(k)) for name in _NUMERICAL]
        _NATIVE_SUPPORT[cls] = cls.native_algebra and all(
            owner is CAM or vars(owner).get("native_algebra", False) for owner in owners
        )
    return _NATIVE_SUPPORT[cls]


def _other(layout: str) -> str:
    return "channels_last" if layout == "channels_first" else "channels_first"


def _check_options(**options: Any) -> None:
    """Raise :class:`OptionError` for a flag that is not a bool or an eps that is not >= 0."""
    for name, value in options.items():
        if name == "eps":
            if (
                isinstance(value, bool | np.bool_)
                or not isinstance(value, int | float | np.integer | np.floating)
                or not np.isfinite(value)
                or value < 0
            ):
                raise OptionError(
                    f"eps={value!r}: expected a finite number >= 0 (a relative tolerance, "
                    f"default {algebra.CONSTANT_RTOL:.3g})."
                )
        elif not isinstance(value, bool | np.bool_):
            raise OptionError(f"{name}={value!r}: expected True or False.")


class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al., 2017): channel weights are the spatial mean gradients.

    ``map = ReLU(sum_k alpha_k A_k)`` with ``alpha_k = mean over space of d score / d A_k``.

    Example:
        >>> import multicam as mc
        >>> from multicam import zoo
        >>> model = zoo.build("gap_cnn", "torch")
        >>> x = zoo.example_input("gap_cnn", layout="channels_first")
        >>> res = mc.GradCAM(model, layer="features.relu2")(x, targets=3)
        >>> res.maps.shape
        (2, 1, 12, 12)
    """

    native_algebra = True

    def channel_weights(self, layer_gradients: LayerGradients) -> np.ndarray:
        return _ops(layer_gradients.gradients).channel_weights(layer_gradients.gradients, "mean")


class GradCAMPlusPlus(CAM):
    """Grad-CAM++ (Chattopadhay et al., 2018): pixel-weighted positive gradients.

    ``w_k = sum_ij alpha_k^ij relu(dY/dA_k^ij)``, ``alpha = Y'' / (2 Y'' + sum_ab A_k^ab Y''')``
    for a smooth output ``Y = f(S)`` of the target score ``S``; a ReLU network is piecewise
    linear in the activations, so ``Y^(m) = f^(m)(S) g^m`` with ``g = dS/dA``.

    Args:
        model, layer, backend, **options: as for :class:`CAM`.
        output_function: ``"exp"`` (default): the paper's ``Y = exp(S)``, for which ``exp(S)``
            cancels in ``alpha`` (``alpha = g^2 / (2 g^2 + sum A g^3)``, the formula every
            public implementation uses), and the weights use ``relu(g)``; or a callable
            ``f(scores) -> (f', f'', f''')``, each ``(N, T)``, for the paper's general
            weights with another output function (then ``relu(f'(S) g)`` is used).

    The paper assumes non-negative activations (a post-ReLU layer). On a layer with
    negative channel sums ``S_k`` the denominator ``g^2 (2 + S_k g)`` vanishes at
    ``g = -2 / S_k``, and round-off in the gradients is magnified without bound there:
    choose a post-ReLU layer (``diagnose`` reports signed activations).
    """

    native_algebra = True

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        output_function: str
        | Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]] = "exp",
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        if output_function != "exp" and not callable(output_function):
            raise OptionError(
                f"output_function={output_function!r}: expected 'exp' or a callable "
                "returning the derivatives (f1, f2, f3) of Y = f(S)."
            )
        self.output_function = output_function
        super().__init__(model, layer, backend=backend, **options)

    def channel_weights(self, layer_gradients: LayerGradients) -> np.ndarray:
        activations, gradients = layer_gradients.activations, layer_gradients.gradients
        ops = _ops(gradients)
        if self.output_function == "exp":
            return ops.gradcam_plus_plus_weights(activations, gradients)
        assert callable(self.output_function)
        spatial = (1,) * (gradients.ndim - 3)
        derivatives = [  # the output function sees NumPy scores on either path
            np.asarray(d, np.float64).reshape(*gradients.shape[:2], 1, *spatial)
            for d in self.output_function(xp.to_numpy(layer_gradients.scores))
        ]
        if ops is xp:
            return xp.general_weights_from_derivatives(activations, gradients, derivatives)
        g = gradients.astype(np.float64)
        first, second, third = (d * g**power for power, d in enumerate(derivatives, 1))
        return algebra.gradcam_plus_plus_general_weights(activations, first, second, third)


class XGradCAM(CAM):
    """XGrad-CAM (Fu et al., 2020): gradients averaged with the activations as weights.

    ``w_k = sum_ij A_k^ij dS/dA_k^ij / sum_ab A_k^ab``; a channel summing to 0 weighs 0.
    """

    native_algebra = True

    def channel_weights(self, layer_gradients: LayerGradients) -> np.ndarray:
        activations, gradients = layer_gradients.activations, layer_gradients.gradients
        return _ops(gradients).xgradcam_weights(activations, gradients)


class _ElementWise(CAM):
    """A method that weighs every position by its own gradient.

    See :func:`multicam.algebra.elementwise_map`. ``res.weights`` reports the spatial mean
    of the per-position weights, for reading only: the map is not their weighted sum.
    """

    rule: str
    #: Whether ``res.weights`` averages ``relu(g)`` (LayerCAM) rather than ``g``.
    positive_weights: ClassVar[bool] = False
    native_algebra = True

    def combine(self, layer_gradients: LayerGradients) -> tuple[np.ndarray, np.ndarray]:
        gradients = layer_gradients.gradients
        ops = _ops(gradients)
        raw = ops.elementwise_map(layer_gradients.activations, gradients, self.rule)
        weights = ops.channel_weights(ops.relu(gradients) if self.positive_weights else gradients)
        return weights, raw


class HiResCAM(_ElementWise):
    """HiResCAM (Draelos & Carin, 2020): ``sum_k dS/dA_k * A_k`` position by position.

    On a conv -> global-average-pool -> linear head it equals Grad-CAM exactly.
    """

    rule = "hirescam"


class LayerCAM(_ElementWise):
    """LayerCAM (Jiang et al., 2021): ``sum_k relu(dS/dA_k) * A_k`` position by position.

    ``res.weights`` is the spatial mean of ``relu(dS/dA)``.
    """

    rule = "layercam"
    positive_weights = True


class GradCAMElementWise(_ElementWise):
    """Grad-CAM element-wise (as in pytorch-grad-cam): ``sum_k relu(dS/dA_k * A_k)``."""

    rule = "gradcam_elementwise"


class EigenCAM(CAM):
    """Eigen-CAM (Muhammad & Yeasin, 2020): activations on their first principal axis.

    The axis (:func:`multicam.algebra.principal_axis`) gives the channel weights.
    Independent of the target: every target gets the same map. Needs no gradients, though
    the backend still computes them today.
    """

    native_algebra = True

    def channel_weights(self, layer_gradients: LayerGradients) -> np.ndarray:
        activations = layer_gradients.activations
        axis = _ops(activations).principal_axis(activations)
        n, t = layer_gradients.scores.shape
        if not isinstance(axis, np.ndarray):
            ns = xp.namespace(axis)
            return ns.asarray(ns.broadcast_to(axis[:, None, :], (n, t, axis.shape[1])), copy=True)
        return np.broadcast_to(axis[:, None], (n, t, axis.shape[1])).copy()


@dataclass(frozen=True)
class FusedResult:
    """Several layers' maps fused into one (see :class:`MultiLayerCAM`).

    Attributes:
        maps: ``(N, T, *S_out)`` float32 fused maps: NumPy, or the framework's own array on
            the model's device for ``algebra="native"`` (as :class:`CAMResult`).
        layers: each layer's own :class:`CAMResult`, by layer name, in the order given.
        scores: ``(N, T)`` the target scores (the same at every layer).
        targets: ``(N, T)`` class ids, or ``None`` for a callable target.
        combine: the rule used, ``"mean"`` or ``"max"``.
    """

    maps: np.ndarray
    layers: dict[str, CAMResult]
    scores: np.ndarray
    targets: np.ndarray | None
    combine: str


class MultiLayerCAM:
    """One method at several layers, fused by a documented rule.

    Each layer's map is computed with ``method`` and the call's options, rectified (unless
    ``relu=False``), resized to the common output size, and min-max normalised per map so
    that layers of different scale weigh the same; the fused map is their mean
    (``combine="mean"``, as in pytorch-grad-cam's multi-layer use) or their element-wise
    maximum (``combine="max"``), normalised again when ``normalize=True``. The classes for
    ``targets=None`` or ``"all"`` are fixed once, so every layer explains the same ones.
    One forward pass per layer.

    Args:
        model: as for :class:`CAM`.
        layers: two or more layers of the model.
        method: the explainer class, default :class:`GradCAM`.
        combine: ``"mean"`` or ``"max"``.
        backend, output, reshape, **options: as for :class:`CAM`.

    Example:
        >>> fused = MultiLayerCAM(model, ["features.relu3", "features.relu4"])  # doctest: +SKIP
        >>> fused(x, targets=4).maps.shape  # (N, 1, H, W)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        layers: Sequence[Any],
        *,
        method: type[CAM] = GradCAM,
        combine: str = "mean",
        backend: str | Backend | None = None,
        output: int | str | None = None,
        **options: Any,
    ) -> None:
        if combine not in ("mean", "max"):
            raise OptionError(f"combine={combine!r}: expected 'mean' or 'max'.")
        if isinstance(layers, str) or len(layers) < 2:
            raise OptionError("MultiLayerCAM needs a sequence of two or more layers.")
        self.combine = combine
        self.explainers = [
            method(model, layer, backend=backend, output=output, **options) for layer in layers
        ]

    def __call__(
        self,
        inputs: Any,
        targets: TargetLike = None,
        *,
        size: str | int | Sequence[int] = "input",
        normalize: bool = True,
        **call: Any,
    ) -> FusedResult:
        """Explain a batch at every layer and fuse; options as for :meth:`CAM.__call__`."""
        if size is None:
            raise OptionError("MultiLayerCAM needs a common output size: 'input' or a shape.")
        first = self.explainers[0](inputs, targets, size=size, normalize=True, **call)
        if first.targets is not None and (targets is None or isinstance(targets, str)):
            targets = first.targets  # None and "all" resolved once, for every layer
        results = {first.layer: first}
        for explainer in self.explainers[1:]:
            result = explainer(inputs, targets, size=size, normalize=True, **call)
            results[result.layer] = result
        maps = [result.maps for result in results.values()]
        if not isinstance(maps[0], np.ndarray):  # native: fuse on the device
            ns = xp.namespace(*maps)
            stacked = ns.stack(maps)
            fused = ns.mean(stacked, axis=0) if self.combine == "mean" else ns.max(stacked, axis=0)
            if normalize:
                fused = xp.normalize(fused, fused.ndim - 2)
            return FusedResult(fused, results, first.scores, first.targets, self.combine)
        stacked = np.stack(maps)
        fused = stacked.mean(axis=0) if self.combine == "mean" else stacked.max(axis=0)
        if normalize:
            fused = algebra.normalize(fused, fused.ndim - 2)
        return FusedResult(
            fused.astype(np.float32), results, first.scores, first.targets, self.combine
        )
