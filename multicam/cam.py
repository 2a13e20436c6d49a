"""The public explainers: bind a model to a layer once, explain batches with a call.

An explainer asks its backend for :class:`~multicam.backends.LayerGradients` and hands
them to :mod:`multicam.algebra`; it holds no framework code. A method is a subclass that
says how channel weights come from the gradients (:meth:`CAM.channel_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import algebra
from .backends import Backend, BoundModel, LayerGradients, backend_for, get_backend
from .backends.base import check_finite
from .diagnose import Diagnosis, diagnose, warn_if_blank
from .errors import InputError, OptionError
from .targets import TargetLike, Targets

__all__ = ["CAM", "CAMResult", "GradCAM"]

_INTERPOLATIONS = ("bilinear", "linear", "trilinear", "nearest")


@dataclass(frozen=True)
class CAMResult:
    """The maps for one batch, with everything they were computed from.

    Shapes: N samples, T targets per sample, K channels, ``S`` the layer's spatial dims,
    ``S_out`` the output size.

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

    def diagnose(self) -> Diagnosis:
        """Explain what the maps show, and why a map is blank, with the numbers behind it.

        Returns:
            A :class:`~multicam.diagnose.Diagnosis`; ``print()`` it for a report.
        """
        return diagnose(self)


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
        **options: passed to the backend, e.g. ``variables=`` for Flax linen.

    Raises:
        UnsupportedModelError: no backend recognises the model.
        BackendNotInstalledError: the requested backend's framework is missing.
        LayerError: the layer does not exist (the message lists the nearest names).
    """

    def __init__(
        self, model: Any, layer: Any = None, *, backend: str | Backend | None = None, **options: Any
    ) -> None:
        if backend is None:
            chosen = backend_for(model)
        elif isinstance(backend, str):
            chosen = get_backend(backend)
        else:
            chosen = backend
        self.bound: BoundModel = chosen.bind(model, layer, **options)

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
        eps: float = 1e-8,
        warn: bool = True,
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
            eps: maps whose range is at most ``eps`` normalise to zeros.
            warn: warn (:class:`~multicam.diagnose.BlankMapWarning`) when a map is blank
                after the ReLU; ``result.diagnose()`` says why.

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
        layer_gradients = self.bound.gradients(inputs, Targets.parse(targets, n))
        weights = self.channel_weights(layer_gradients)
        raw = algebra.weighted_sum(layer_gradients.activations, weights)
        maps = algebra.relu(raw) if relu else raw
        out_size = self._output_size(size, layer_gradients)
        if out_size is not None:
            maps = algebra.resize(maps, out_size, interpolation, align_corners)  # type: ignore[arg-type]
        check_finite(raw, "the weighted sums of the activation maps")
        if normalize:
            maps = algebra.normalize(maps, raw.ndim - 2, eps)
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
        )
        if warn and relu:
            warn_if_blank(result)
        return result

    def _output_size(
        self, size: str | int | Sequence[int] | None, layer_gradients: LayerGradients
    ) -> tuple[int, ...] | None:
        spatial = layer_gradients.activations.shape[2:]
        if size is None:
            return None
        if isinstance(size, str):
            if size != "input":
                raise OptionError(f"size={size!r}: expected 'input', None or a shape.")
            if layer_gradients.input_spatial_shape is None:
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
                raise OptionError(f"eps={value!r}: expected a finite number >= 0 (default 1e-8).")
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

    def channel_weights(self, layer_gradients: LayerGradients) -> np.ndarray:
        return algebra.channel_weights(layer_gradients.gradients, "mean")
