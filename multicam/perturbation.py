"""Gradient-free CAM methods: channel weights from the model's response to perturbations.

One job: weigh a layer's activation maps by how the target score reacts when the input is
masked by a channel (:class:`ScoreCAM`) or when a channel is zeroed (:class:`AblationCAM`),
using the backends' optional capabilities ``outputs`` and ``outputs_from_layer``
(:class:`~multicam.backends.BoundModel`). Like :mod:`multicam.cam`, it holds no framework
code: masks and ablated activations are built in NumPy and handed to the backend.

Constraints:

- N samples x K channels perturbed passes are run in chunks of at most ``batch_size``
  samples (constructor or call option), so memory stays bounded whatever N x K; the result
  does not depend on ``batch_size``.
- The activations and class ids come from one ``bound.gradients`` call (the gradients it
  also computes are unused by the weights; they are kept in ``result.gradients``).
- Targets: class ids only (``None``, an int, N ints, an ``(N, T)`` array, ``"all"``); a
  callable or region target raises :class:`~multicam.errors.TargetError`, because its
  score cannot be read off the plain NumPy outputs of the perturbed passes. The explained
  output (the only one, or the one ``output=`` chooses, e.g. a Hugging Face model's
  ``"logits"``) must be ``(N, C)``.
- ``inputs`` must be one array (NumPy or a framework tensor) in the backend's layout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import algebra
from .backends import Backend, BoundModel, LayerGradients
from .cam import CAM, CAMResult
from .errors import InputError, OptionError, TargetError
from .targets import TargetLike, Targets

__all__ = ["AblationCAM", "ScoreCAM"]

_CLASS_KINDS = ("classes", "predicted", "all")


class _Perturbation(CAM):
    """A CAM whose weights come from extra forward passes in chunks of ``batch_size``."""

    #: The optional :class:`BoundModel` capability the method needs.
    capability: str = ""
    #: How :meth:`BoundModel._lacks` describes it.
    capability_text: str = ""

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        batch_size: int = 32,
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        self.batch_size = _check_batch_size(batch_size)
        super().__init__(model, layer, backend=backend, **options)
        if getattr(type(self.bound), self.capability) is getattr(BoundModel, self.capability):
            raise self.bound._lacks(self.capability_text, type(self).__name__)
        self._call = threading.local()

    def __call__(
        self,
        inputs: Any,
        targets: TargetLike = None,
        *,
        batch_size: int | None = None,
        **options: Any,
    ) -> CAMResult:
        """Explain a batch; as :meth:`CAM.__call__`, plus ``batch_size``.

        Args:
            inputs: ``(N, ...)`` one batch in the backend's layout.
            targets: class targets, see the module docstring.
            batch_size: the most samples in one perturbed forward pass (default: the
                constructor's).
            **options: as for :meth:`CAM.__call__` (``relu``, ``normalize``, ``size``, ...),
                except ``aug_smooth``.

        Raises:
            TargetError: a callable or region target (see the module docstring).
            OptionError: ``aug_smooth=True``, or the explainer has a ``reshape``.
        """
        if options.get("aug_smooth"):
            raise OptionError(
                f"aug_smooth is not supported by {type(self).__name__}: its perturbed passes "
                "are already many forward passes per sample; call it on augmented inputs "
                "yourself if needed."
            )
        if getattr(self, "reshape", None) is not None:
            raise OptionError(
                f"{type(self).__name__} perturbs the layer's own output, so it does not "
                "support reshape= (token sequences); use a gradient-based method."
            )
        chunk = self.batch_size if batch_size is None else _check_batch_size(batch_size)
        kind = Targets.parse(targets, self.bound.batch_size(inputs)).kind
        if kind not in _CLASS_KINDS:
            raise TargetError(
                f"{type(self).__name__} takes class targets (None, an int, N ints, an (N, T) "
                f"array or 'all'), not a {kind!r} target: its scores are read off the "
                "outputs of perturbed forward passes. Use a gradient-based method such as "
                "GradCAM for callable targets."
            )
        self._call.context = (inputs, chunk)
        try:
            return super().__call__(inputs, targets, **options)
        finally:
            del self._call.context

    def combine(self, layer_gradients: LayerGradients) -> tuple[np.ndarray, np.ndarray]:
        inputs, chunk = self._call.context
        x = _as_numpy(inputs)
        if layer_gradients.targets is None:  # guarded in __call__
            raise TargetError(f"{type(self).__name__} needs class targets.")
        weights = self.perturbation_weights(x, layer_gradients, chunk)
        return weights, algebra.weighted_sum(layer_gradients.activations, weights)

    def perturbation_weights(
        self, x: np.ndarray, layer_gradients: LayerGradients, batch_size: int
    ) -> np.ndarray:
        """``(N, T, K)`` channel weights from the perturbed passes."""
        raise NotImplementedError

    def _target_scores(self, outputs: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``(M, T)`` scores of ``classes`` (M, T) in ``outputs`` (M, C)."""
        if outputs.ndim != 2 or outputs.shape[0] != classes.shape[0]:
            raise TargetError(
                f"{type(self).__name__} needs (N, C) class scores, but the model returned "
                f"shape {outputs.shape} for {classes.shape[0]} samples."
            )
        return np.take_along_axis(outputs, classes, axis=1)


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool | np.bool_) or not isinstance(batch_size, int | np.integer):
        raise OptionError(f"batch_size={batch_size!r}: expected a positive int.")
    if batch_size < 1:
        raise OptionError(f"batch_size={batch_size!r}: expected a positive int.")
    return int(batch_size)


def _as_numpy(inputs: Any) -> np.ndarray:
    """The input batch as a float NumPy array, whatever framework tensor it is."""
    if hasattr(inputs, "detach"):  # torch
        inputs = inputs.detach().cpu().numpy()
    elif hasattr(inputs, "numpy") and callable(inputs.numpy):  # tf.Tensor
        inputs = inputs.numpy()
    try:
        x = np.asarray(inputs)
    except (TypeError, ValueError) as exc:
        raise InputError("the input could not be read as one array; pass (N, ...).") from exc
    if x.dtype.kind not in "biuf":
        raise InputError(f"the input has dtype {x.dtype}; pass numbers.")
    return x if x.dtype.kind == "f" else x.astype(np.float32)


def _chunks(n: int, k: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(sample ids, channel ids)`` of the N x K (sample, channel) pairs, in chunks."""
    for start in range(0, n * k, batch_size):
        flat = np.arange(start, min(start + batch_size, n * k))
        yield flat // k, flat % k


def _softmax(values: np.ndarray, axis: int) -> np.ndarray:
    shifted = values.astype(np.float64) - values.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


class ScoreCAM(_Perturbation):
    """Score-CAM (Wang et al., 2020): channels weighted by the score of the masked input.

    For sample ``x`` and channel ``k``, the mask ``H_k`` is the activation map ``A_k``
    resized to the input (bilinear, half-pixel centres) and min-max normalised to [0, 1]
    (a constant map gives an all-zero mask); the model runs on ``x * H_k`` (broadcast over
    the input's channels), in chunks of at most ``batch_size`` masked inputs. With
    ``S_k`` the target's output on ``x * H_k``:

    - ``weighting="softmax"`` (default): ``w_k = exp(S_k) / sum_j exp(S_j)``, a softmax over
      the channels of the raw target scores (logits): the convention of pytorch-grad-cam's
      ``ScoreCAM`` (and of Algorithm 1 of the paper).
    - ``weighting="baseline"``: the paper's channel-wise Increase of Confidence,
      ``w_k = p(x * H_k) - p(0)``, where ``p`` is the softmax probability of the target
      class over the outputs (which must be logits) and ``0`` the all-zero input.

    ``raw = sum_k w_k A_k``.

    Args:
        model, layer, backend, **options: as for :class:`~multicam.GradCAM`.
        batch_size: the most masked inputs in one forward pass (also a call option).
        weighting: ``"softmax"`` or ``"baseline"``.

    Raises:
        BackendError: the backend has no plain forward pass (``BoundModel.outputs``).
    """

    capability = "outputs"
    capability_text = "a plain forward pass (outputs)"

    def __init__(
        self,
        model: Any,
        layer: Any = None,
        *,
        batch_size: int = 32,
        weighting: str = "softmax",
        backend: str | Backend | None = None,
        **options: Any,
    ) -> None:
        if weighting not in ("softmax", "baseline"):
            raise OptionError(f"weighting={weighting!r}: expected 'softmax' or 'baseline'.")
        self.weighting = weighting
        super().__init__(model, layer, batch_size=batch_size, backend=backend, **options)

    #: How many variants of each mask the channel's score averages over (1: the mask);
    #: the smoothed Score-CAMs of :mod:`multicam.methods` override it and :meth:`_variants`.
    num_samples: int = 1

    def _variants(self, masks: np.ndarray, samples: np.ndarray, channels: np.ndarray) -> np.ndarray:
        """``(M, D, *S)`` variants of the ``(M, *S)`` masks of (sample, channel) pairs."""
        return masks[:, None]

    def perturbation_weights(
        self, x: np.ndarray, layer_gradients: LayerGradients, batch_size: int
    ) -> np.ndarray:
        activations = layer_gradients.activations
        classes = layer_gradients.targets
        assert classes is not None
        size = layer_gradients.input_spatial_shape
        if size is None:
            raise InputError(
                f"{type(self).__name__} masks the input with the layer's maps, so the input "
                f"needs as many spatial dims as the layer's output {activations.shape[2:]}; "
                f"got input shape {x.shape}."
            )
        n, k = activations.shape[:2]
        d = self.num_samples
        channel_axis = 1 if self.bound.layout == "channels_first" else x.ndim - 1
        scores = np.zeros((n, k, classes.shape[1]), np.float64)
        # (sample, channel) pairs per chunk, each with its d variants: at most batch_size
        # masked inputs per forward pass.
        for samples, channels in _chunks(n, k, max(1, batch_size // d)):
            masks = algebra.resize(activations[samples, channels], size, "linear")
            masks = algebra.normalize(masks, len(size))
            variants = self._variants(masks, samples, channels)  # (M, D, *S)
            rows = np.repeat(np.arange(len(samples)), d)
            variants = variants.reshape(len(samples) * d, *size)
            for first in range(0, len(rows), batch_size):
                part = slice(first, first + batch_size)
                masked = x[samples[rows[part]]] * np.expand_dims(variants[part], channel_axis)
                outputs = self.bound.outputs(masked.astype(x.dtype, copy=False), self.output)
                if self.weighting == "baseline":
                    outputs = _softmax(outputs, 1)
                chosen = self._target_scores(outputs, classes[samples[rows[part]]])
                np.add.at(scores, (samples[rows[part]], channels[rows[part]]), chosen)
        scores = np.moveaxis(scores / d, 1, 2)  # (N, T, K)
        if self.weighting == "softmax":
            return _softmax(scores, 2).astype(np.float32)
        baseline = np.empty(classes.shape, np.float64)
        for start in range(0, n, batch_size):
            rows_ = slice(start, start + batch_size)
            outputs = self.bound.outputs(np.zeros_like(x[rows_]), self.output)
            baseline[rows_] = self._target_scores(_softmax(outputs, 1), classes[rows_])
        return (scores - baseline[:, :, None]).astype(np.float32)


class AblationCAM(_Perturbation):
    """Ablation-CAM (Desai & Ramaswamy, 2020): the score's relative drop without a channel.

    ``w_k = (y_c - y_c^k) / y_c``, where ``y_c`` is the target score and ``y_c^k`` the
    target score with channel ``k`` of the layer's output set to zero (everything below
    the layer runs on the real input; ``BoundModel.outputs_from_layer``), as in the paper
    and pytorch-grad-cam's ``AblationCAM``. ``raw = sum_k w_k A_k``. Ablated passes run in
    chunks of at most ``batch_size`` (sample, channel) pairs.

    Where ``y_c == 0`` exactly the ratio is undefined: those weights are 0 (an all-zero
    map), never NaN or Inf. A negative ``y_c`` flips the weights' signs, as the formula
    says.

    Args:
        model, layer, backend, **options: as for :class:`~multicam.GradCAM`.
        batch_size: the most ablated samples in one forward pass (also a call option).

    Raises:
        BackendError: the backend cannot replace the layer's output
            (``BoundModel.outputs_from_layer``).
    """

    capability = "outputs_from_layer"
    capability_text = "a forward pass from the layer on (outputs_from_layer)"

    def perturbation_weights(
        self, x: np.ndarray, layer_gradients: LayerGradients, batch_size: int
    ) -> np.ndarray:
        activations = layer_gradients.activations
        classes = layer_gradients.targets
        assert classes is not None
        n, k = activations.shape[:2]
        ablated = np.empty((n, k, classes.shape[1]), np.float64)
        for samples, channels in _chunks(n, k, batch_size):
            replaced = activations[samples].copy()
            replaced[np.arange(len(samples)), channels] = 0.0
            outputs = self.bound.outputs_from_layer(x[samples], replaced, self.output)
            ablated[samples, channels] = self._target_scores(outputs, classes[samples])
        score = layer_gradients.scores.astype(np.float64)[:, :, None]  # (N, T, 1)
        drop = score - np.moveaxis(ablated, 1, 2)
        zero = score == 0
        weights = np.where(zero, 0.0, drop / np.where(zero, 1.0, score))
        return weights.astype(np.float32)
