"""The contract between multicam's NumPy core and a framework backend.

A backend's only job is to hand back, as NumPy arrays, the activations of one layer, the
gradients of the target scores with respect to them, and the scores themselves
(:class:`LayerGradients`). Everything else (pooling, weighting, ReLU, resizing,
normalising) happens in :mod:`multicam.algebra`. This module imports no framework.

A backend is two small classes:

- a :class:`Backend` that recognises its models (:meth:`Backend.accepts`, which must not
  import its framework unless the model could be one of its own) and binds a model to a
  layer (:meth:`Backend.bind`);
- the :class:`BoundModel` that bind returns: it resolves the layer once, then computes
  :meth:`BoundModel.gradients` for any number of batches.

Third-party backends subclass both and register the :class:`Backend` subclass under the
``multicam.backends`` entry-point group; :func:`multicam.testing.check_backend` proves
that a new backend agrees with the reference implementation.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from ..errors import (
    BackendError,
    InputError,
    LayerError,
    MulticamError,
    NonFiniteError,
    TargetError,
    nearest_names,
)
from ..targets import Targets

__all__ = [
    "Backend",
    "BoundModel",
    "LayerGradients",
    "Layout",
    "Redraw",
    "TensorGradients",
    "canonical_arrays",
    "check_finite",
    "check_parameter_layers",
    "forward_error",
    "input_spatial_shape",
    "make_layer_gradients",
    "raised_inside",
    "replacement_activations",
]

Layout = Literal["channels_first", "channels_last"]

#: ``(layer, canonical parameter name, values) -> new values``: see
#: :meth:`BoundModel.randomized`.
Redraw = Callable[[str, str, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LayerGradients:
    """What a backend returns for one batch; always channels-first, always float32.

    Attributes:
        activations: ``(N, K, *S)`` the layer's output.
        gradients: ``(N, T, K, *S)`` d score[n, t] / d activations[n].
        scores: ``(N, T)`` the differentiated target scores.
        targets: ``(N, T)`` int64 class ids, or ``None`` for a callable target.
        input_spatial_shape: the input's spatial dims ``S_in`` (for ``size="input"``), or
            ``None`` when the input has no spatial layout the layer's can be matched to.
        outputs: the model's outputs, e.g. ``(N, C)`` logits or probabilities, when the
            backend provides them (diagnostics use them to spot softmax heads).
        training: the parts of the model (module or layer names, with their kind, e.g.
            ``"features.bn1 (BatchNorm2d)"``) that the user left in training mode and that
            the backend ran in inference mode for this call (then restored); empty when the
            model was already in inference mode.
        guided_relus: guided backpropagation only: how many ReLU calls the forward pass
            guided; ``None`` for ordinary gradients.
        unguided_activations: guided backpropagation only: the kinds of other
            nonlinearities the forward pass ran through, which guided backpropagation
            cannot guide (e.g. ``("SiLU", "GELU")``), sorted, each once.
    """

    activations: np.ndarray
    gradients: np.ndarray
    scores: np.ndarray
    targets: np.ndarray | None
    input_spatial_shape: tuple[int, ...] | None
    outputs: np.ndarray | None = None
    training: tuple[str, ...] = ()
    guided_relus: int | None = None
    unguided_activations: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorGradients:
    """Gradients of the target scores w.r.t. several tensors of one forward pass.

    What :meth:`BoundModel.tensor_gradients` returns (FullGrad's bias gradients, LeGrad's
    attention gradients). Unlike :class:`LayerGradients`, every tensor keeps the layout
    the framework gives it (batch first): a convolution's output is ``(N, K, *S)`` in torch
    and ``(N, *S, K)`` in Keras and Flax (see ``layout``); attention probabilities are
    ``(N, heads, Q, K)`` everywhere.

    Attributes:
        tensors: by layer name, in the order asked for: the layer's output, or for an
            attention layer its per-head attention probabilities; float32 NumPy.
        gradients: by layer name: ``(N, T, *tensor.shape[1:])`` d score[n, t] / d tensor[n].
        scores: ``(N, T)`` the differentiated target scores.
        targets: ``(N, T)`` int64 class ids, or ``None`` for a callable target.
        layout: where the channel axis of the input and of convolution outputs sits.
        inputs: ``(N, ...)`` the input batch as float32 NumPy (native layout) when input
            gradients were asked for, else ``None``.
        input_gradients: ``(N, T, ...)`` d score / d input when asked for, else ``None``.
        outputs: the model's outputs, e.g. ``(N, C)``, when the backend provides them.
        training: as :attr:`LayerGradients.training`.
    """

    tensors: dict[str, np.ndarray]
    gradients: dict[str, np.ndarray]
    scores: np.ndarray
    targets: np.ndarray | None
    layout: Layout
    inputs: np.ndarray | None = None
    input_gradients: np.ndarray | None = None
    outputs: np.ndarray | None = None
    training: tuple[str, ...] = ()


class BoundModel(abc.ABC):
    """A model bound to one layer by a backend; computes :class:`LayerGradients`."""

    #: The backend's registry name, e.g. ``"torch"``.
    backend: ClassVar[str]
    #: Where the channel axis of the model's inputs and activations sits.
    layout: Layout
    #: A readable name of the bound layer, for messages and results.
    layer_name: str

    @abc.abstractmethod
    def gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        """Run one forward pass and one batched backward pass to the layer.

        Args:
            inputs: a batch in the backend's native layout, as a NumPy array or a tensor of
                the backend's framework.
            targets: the parsed target request; its ``batch_size`` is the batch's N.

        Returns:
            The layer's activations, the gradients of every target score with respect to
            them, and the scores, as channels-first float32 NumPy arrays.
        """

    # Optional capabilities. A backend that has one overrides it; the base says clearly
    # which method needs what the backend lacks.

    def outputs(self, inputs: Any, output: int | str | None = None) -> np.ndarray:
        """The model's outputs for a batch, without gradients (Score-CAM's masked passes).

        Args:
            inputs: a batch in the backend's native layout, NumPy or a framework tensor.
            output: for a model with several outputs (tuple, list, dict), the index or key
                of the one to return (:func:`multicam.targets.select_output`).

        Returns:
            The outputs as float32 NumPy, e.g. ``(N, C)``.
        """
        raise self._lacks("a plain forward pass (outputs)", "ScoreCAM")

    def outputs_from_layer(
        self, inputs: Any, activations: np.ndarray, output: int | str | None = None
    ) -> np.ndarray:
        """The model's outputs when the layer's output is replaced by ``activations``.

        Everything below the layer still runs on ``inputs`` (skip connections from below
        see the real input); only the layer's output is swapped (Ablation-CAM).

        Args:
            inputs: ``(M, ...)`` a batch in the backend's native layout.
            activations: ``(M, K, *S)`` channels-first float32, the replacement.
            output: as for :meth:`outputs`.

        Returns:
            The outputs as float32 NumPy, e.g. ``(M, C)``.
        """
        raise self._lacks("a forward pass from the layer on (outputs_from_layer)", "AblationCAM")

    def guided_gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        """Guided Backpropagation (Springenberg et al., 2015) at the input.

        The gradient of each target score with respect to the input, where every ReLU's
        backward pass lets through only positive gradients at positive inputs. The model is
        unchanged afterwards.

        Returns:
            :class:`LayerGradients` whose ``activations`` are the input ``(N, C, *S)`` and
            ``gradients`` the guided gradients ``(N, T, C, *S)``, channels-first.
        """
        raise self._lacks("guided backpropagation (guided_gradients)", "GuidedBackprop")

    def parameter_layers(self) -> tuple[str, ...]:
        """The layers that hold trainable parameters of their own, in the model's order.

        The order is the one the model defines its layers in (torch ``named_modules``,
        Keras ``layers`` with nested models expanded, linen's ``params`` tree, nnx
        attributes in assignment order); names are those :meth:`randomized` takes.
        Statistics and buffers (BatchNorm's running mean) are not parameters.
        """
        raise self._lacks("a randomised copy of its model (parameter_layers)", "randomization_test")

    def randomized(self, layers: Sequence[str], redraw: Redraw) -> BoundModel:
        """A copy of the model, bound to the same layer, with new parameters in ``layers``.

        The model itself is never modified (the sanity check of
        :func:`multicam.metrics.randomization_test`). Each trainable parameter tensor of
        each layer in ``layers`` becomes ``redraw(layer, name, values)``: ``name`` is the
        parameter's canonical name (``"kernel"`` for convolution and dense weights,
        ``"bias"``, ``"scale"`` for normalisation weights, else the framework's own) and
        ``values`` a float32 NumPy array in the canonical layout, convolution kernels
        ``(*k, in, out)`` and dense kernels ``(in, out)`` (Keras's and Flax's; torch's are
        transposed), so that one ``redraw`` makes the same network in every framework.

        Args:
            layers: names from :meth:`parameter_layers`.
            redraw: ``(layer, name, values) -> new values`` of the same shape.

        Raises:
            LayerError: a name that is not in :meth:`parameter_layers`.
        """
        raise self._lacks("a randomised copy of its model (randomized)", "randomization_test")

    def bias_layers(self) -> tuple[tuple[str, np.ndarray], ...]:
        """The layers that add a bias per channel at every spatial position (FullGrad).

        Convolutions of any rank with a bias, and batch normalisations, in the model's
        order (as :meth:`parameter_layers`), each with its bias ``(K,)`` as float32 NumPy
        (FullGrad keeps those whose output turns out to have spatial dims). A batch
        normalisation's bias is its effective bias in inference mode,
        ``beta - mean * gamma / sqrt(var + eps)`` (``gamma = 1`` and ``beta = 0`` where the
        layer has none), so that its output is ``scale * x + bias``.
        Names are those :meth:`tensor_gradients` takes.
        """
        raise self._lacks("the biases of its layers (bias_layers)", "FullGrad")

    def tensor_gradients(
        self,
        inputs: Any,
        targets: Targets,
        layers: Sequence[str],
        *,
        input_gradients: bool = False,
    ) -> TensorGradients:
        """Gradients of the target scores w.r.t. the tensors of several layers, in one pass.

        One forward and one batched backward pass, in inference mode. The tensor of a
        layer is its output, except for a framework's multi-head attention layer (torch
        ``nn.MultiheadAttention``, Keras ``MultiHeadAttention``, Flax linen
        ``MultiHeadDotProductAttention`` and nnx ``MultiHeadAttention``), whose tensor is
        its per-head attention probabilities ``(N, heads, Q, K)`` (after the softmax,
        before dropout). The model is unchanged afterwards (hooks removed, call options restored).

        Args:
            inputs: a batch in the backend's native layout, NumPy or a framework tensor.
            targets: the parsed target request.
            layers: layer names (as ``layer=`` takes them) or, for FullGrad, the names
                from :meth:`bias_layers`; each must run exactly once per forward pass.
                Empty only with ``input_gradients=True`` (a model without bias layers).
            input_gradients: also return the input and d score / d input.

        Raises:
            LayerError: a layer that does not exist (with the nearest names), does not run
                exactly once, or on which the scores do not depend; ``layers`` given as one
                string, empty without ``input_gradients``, or naming a layer twice.
        """
        raise self._lacks("gradients at several layers (tensor_gradients)", "FullGrad and LeGrad")

    def hessian_vector_products(
        self, inputs: Any, targets: Targets
    ) -> tuple[LayerGradients, np.ndarray]:
        """The gradients at the bound layer and the Hessian-vector products ``H a`` (ShapleyCAM).

        For each target score ``s = score[n, t]`` and the layer's activations ``a = A[n]``,
        ``H a`` is the Hessian of ``s`` w.r.t. ``a`` applied to ``a`` itself:
        ``sum_j d2 s / (d a_i d a_j) * a_j``, i.e. the directional derivative of the
        gradient along the activations (forward-over-reverse, or double backward).

        Returns:
            The :class:`LayerGradients` of :meth:`gradients` (channels-first) and ``(N, T,
            K, *S)`` float32 Hessian-vector products in the same layout as its gradients.
        """
        raise self._lacks("Hessian-vector products (hessian_vector_products)", "ShapleyCAM")

    def _lacks(self, capability: str, method: str) -> BackendError:
        return BackendError(
            f"the {self.backend!r} backend cannot compute {capability}, which {method} "
            "needs; use a gradient-based method such as GradCAM with this backend."
        )

    def batch_size(self, inputs: Any) -> int:
        """The number of samples N in ``inputs`` (its leading dimension)."""
        shape = getattr(inputs, "shape", None)
        if shape is None:
            shape = np.shape(inputs)
        if len(shape) == 0:
            raise InputError(
                "the input is a scalar; pass a batch whose first dimension is the number "
                "of samples, e.g. x[None] for a single sample."
            )
        return int(shape[0])


class Backend(abc.ABC):
    """Recognises a framework's models and binds them to a layer."""

    #: Registry name, used in ``backend=`` and in messages.
    name: ClassVar[str]
    #: The ``pip install 'multicam-xai[EXTRA]'`` extra that installs the framework.
    extra: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def accepts(cls, model: Any) -> bool:
        """Whether ``model`` is one of this backend's models.

        Implementations look at ``sys.modules`` first and never import their framework
        to answer: a model of a framework the user has not imported cannot be one.
        """

    @abc.abstractmethod
    def bind(self, model: Any, layer: Any, **options: Any) -> BoundModel:
        """Bind ``model`` to ``layer``, resolving and validating the layer once.

        Raises:
            LayerError: the layer does not exist (the message names the nearest valid
                names) or is ambiguous.
            UnsupportedModelError: the model is of a kind this backend cannot explain.
        """


#: The gradients whose finiteness check :func:`make_layer_gradients` left to its caller, with
#: what to call them, inside :func:`deferred_gradient_checks`; ``None`` outside.
_DEFERRED: contextvars.ContextVar[list[tuple[np.ndarray, str]] | None] = contextvars.ContextVar(
    "multicam_deferred_gradient_checks", default=None
)


@contextlib.contextmanager
def deferred_gradient_checks() -> Iterator[list[tuple[np.ndarray, str]]]:
    """Inside, :func:`make_layer_gradients` leaves the gradients' NaN/Inf check to the caller.

    For a caller that reads every gradient anyway, e.g. to average them over space: a NaN
    or Inf anywhere in them makes its result non-finite, so checking that small result
    (:func:`check_deferred`) spares a pass over all the gradients (21 MB at N=32, T=10,
    K=64, 16x16). The yielded list collects ``(gradients, what)``; the caller must pass it
    to :func:`check_deferred`, which raises the same :class:`NonFiniteError` as
    :func:`make_layer_gradients` would have.
    """
    pending: list[tuple[np.ndarray, str]] = []
    token = _DEFERRED.set(pending)
    try:
        yield pending
    finally:
        _DEFERRED.reset(token)


def check_deferred(pending: list[tuple[np.ndarray, str]], pooled: Any = None) -> None:
    """The checks :func:`deferred_gradient_checks` collected.

    Args:
        pending: the list it yielded; emptied.
        pooled: an array in which any NaN or Inf of the gradients shows (their sums or means
            over space, every value of the gradients taking part), or ``None``. When it is
            finite, so are the gradients, and they are not scanned; otherwise (or without
            it) each one is, and the first holding NaN or Inf raises.

    Raises:
        NonFiniteError: NaN or Inf in the gradients, named as :func:`make_layer_gradients`
            names them.
    """
    checks, pending[:] = list(pending), []
    if pooled is not None and _all_finite(np.asarray(pooled)):
        return
    for array, what in checks:
        _check_finite(array, what)


def make_layer_gradients(
    activations: Any,
    gradients: Any,
    scores: Any,
    targets: np.ndarray | None,
    *,
    layout: Layout,
    input_shape: Sequence[int],
    layer_name: str,
    outputs: Any = None,
    training: Sequence[str] = (),
    guided_relus: int | None = None,
    unguided_activations: Sequence[str] = (),
) -> LayerGradients:
    """Validate a backend's raw arrays and put them in the canonical layout.

    Args:
        activations: ``(N, *S, K)`` or ``(N, K, *S)`` per ``layout``, NumPy-convertible.
        gradients: ``(N, T, *S, K)`` or ``(N, T, K, *S)`` per ``layout``.
        scores: ``(N, T)``.
        targets: ``(N, T)`` class ids or ``None``.
        layout: where the channel axis is in ``activations``, ``gradients`` and the input.
        input_shape: the full shape of the input batch.
        layer_name: for messages.
        outputs: the model's outputs, NumPy-convertible, or ``None``.
        training: see :class:`LayerGradients`.
        guided_relus: see :class:`LayerGradients`.
        unguided_activations: see :class:`LayerGradients`.

    Raises:
        LayerError: the layer's output has no spatial dims.
        NonFiniteError: NaN or Inf in the activations, gradients or scores.
    """
    activations, gradients, scores = canonical_arrays(
        np.asarray(activations, dtype=np.float32),
        np.asarray(gradients, dtype=np.float32),
        np.asarray(scores, dtype=np.float32),
        layout=layout,
        layer_name=layer_name,
        moveaxis=np.moveaxis,
    )
    _check_finite(activations, f"the activations of layer {layer_name!r}")
    _check_finite(scores, "the target scores")
    deferred = _DEFERRED.get()
    if deferred is None:
        _check_finite(gradients, f"the gradients at layer {layer_name!r}")
    else:  # the caller checks them (see deferred_gradient_checks)
        deferred.append((gradients, f"the gradients at layer {layer_name!r}"))
    return LayerGradients(
        activations,
        gradients,
        scores,
        targets,
        input_spatial_shape(input_shape, layout),
        None if outputs is None else np.asarray(outputs, dtype=np.float32),
        tuple(training),
        guided_relus,
        tuple(sorted(set(unguided_activations))),
    )


def canonical_arrays(
    activations: Any,
    gradients: Any,
    scores: Any,
    *,
    layout: str,
    layer_name: str,
    moveaxis: Callable[[Any, int, int], Any],
) -> tuple[Any, Any, Any]:
    """Check the shapes of a backend's arrays and put their channels first.

    The framework-free part of :func:`make_layer_gradients`, shared with its on-device
    twin :func:`multicam.xp.make_layer_gradients`: ``moveaxis`` is the arrays' own
    namespace's.

    Returns:
        ``(N, K, *S)`` activations, ``(N, T, K, *S)`` gradients, ``(N, T)`` scores.

    Raises:
        LayerError: the layer's output has no spatial dims.
        TargetError: the scores are not one per sample (a target function's output).
    """
    if activations.ndim < 3:
        raise LayerError(
            f"layer {layer_name!r} outputs shape {tuple(activations.shape)}, which has no "
            "spatial dimensions; Grad-CAM needs a layer whose output is (N, K, *spatial) such "
            "as a convolution or pooling layer (for a transformer block, reshape its tokens)."
        )
    if layout == "channels_last":
        activations = moveaxis(activations, -1, 1)
        gradients = moveaxis(gradients, -1, 2)
    n = activations.shape[0]
    if scores.ndim == 1:
        scores = scores[:, None]
    per_sample = tuple(gradients.shape[:1]) + tuple(gradients.shape[2:])
    if scores.shape[0] != n or per_sample != tuple(activations.shape):
        raise TargetError(
            f"a target score function returned shape {tuple(scores.shape)} for a batch of "
            f"{n}; it must return one score per sample, shape (N,)."
        )
    return activations, gradients, scores


def input_spatial_shape(input_shape: Sequence[int], layout: str) -> tuple[int, ...] | None:
    """The spatial dims of an input batch of ``input_shape`` in ``layout``, or None."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) < 3:
        return None
    return shape[2:] if layout == "channels_first" else shape[1:-1]


def raised_inside(exc: BaseException, packages: Sequence[str]) -> bool:
    """Whether the innermost Python frame of ``exc``'s traceback is in one of ``packages``.

    Tells a framework rejecting what it was given (a shape or dtype check inside
    ``torch.nn.functional``, ``flax``, ``keras``) from an exception the user's own code
    raised (its innermost frame is the user's).
    """
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    module = str(last.tb_frame.f_globals.get("__name__", ""))
    return module.split(".", 1)[0] in packages


@contextlib.contextmanager
def forward_errors(
    *,
    packages: Sequence[str],
    framework: str,
    input_shape: Sequence[int],
    input_dtype: Any,
    expected: str,
    note: str,
    hint: Callable[[], str] = lambda: "",
) -> Iterator[None]:
    """Run a model's forward pass inside: how its failures reach the user.

    A failure inside the framework becomes an :class:`InputError` raised ``from`` the
    original (see :func:`forward_error`); an exception from the user's own code propagates
    unchanged in type, with ``note`` added; multicam's own errors pass through as they are.

    Args:
        packages: the framework's top-level packages (see :func:`forward_error`).
        framework: its name for the message.
        input_shape: the shape of the input as given to the model.
        input_dtype: its dtype.
        expected: what the framework's models take.
        note: the note added to an exception from the user's code.
        hint: computes a more specific diagnosis, only when there is an error.
    """
    try:
        yield
    except MulticamError:
        raise
    except Exception as exc:
        error = forward_error(
            exc,
            packages=packages,
            framework=framework,
            input_shape=input_shape,
            input_dtype=input_dtype,
            expected=expected,
            hint=hint(),
        )
        if error is not None:
            raise error from exc
        exc.add_note(note)
        raise


def forward_error(
    exc: Exception,
    *,
    packages: Sequence[str],
    framework: str,
    input_shape: Sequence[int],
    input_dtype: Any,
    expected: str,
    hint: str = "",
) -> InputError | None:
    """The :class:`InputError` for a model's forward that failed inside its framework.

    Returns ``None`` when the exception was raised by the user's own code (or is already a
    multicam error): the caller then re-raises the original, with a note, unchanged in type.
    Otherwise the caller raises the returned error ``from exc``, so the framework's own
    exception stays reachable as ``__cause__``.

    Args:
        exc: what the forward raised.
        packages: the framework's top-level packages, e.g. ``("torch",)``.
        framework: its name for the message.
        input_shape: the shape of the input as given to the model.
        input_dtype: its dtype.
        expected: what the framework's models take, e.g. ``"channels-first input (N, C,
            *spatial)"``.
        hint: a more specific diagnosis, when the backend has one.
    """
    if isinstance(exc, MulticamError) or not raised_inside(exc, packages):
        return None
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(first_line) > 300:
        first_line = first_line[:297] + "..."
    shape = tuple(int(d) for d in input_shape)
    return InputError(
        f"the model's forward failed inside {framework} on an input of shape {shape} and "
        f"dtype {input_dtype}: {type(exc).__name__}: {first_line.rstrip('.')}. "
        f"{framework} models take {expected}.{' ' + hint if hint else ''} If the input is "
        "right, the model itself fails on it: see the exception this one was raised from."
    )


def check_finite_input(inputs: np.ndarray) -> None:
    """Raise :class:`NonFiniteError` if the input batch holds NaN or Inf."""
    _check_finite(inputs, "the input")


def check_finite(array: np.ndarray, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if ``array`` holds NaN or Inf."""
    _check_finite(array, what)


#: Arrays at least this large are first checked by one summing pass (see :func:`_all_finite`).
_SUM_CHECK_SIZE = 1 << 14


def _all_finite(array: np.ndarray) -> bool:
    """Whether every value of a float array is finite.

    A NaN or Inf anywhere makes the sum of all values NaN or Inf (``inf - inf`` is NaN), so a
    finite sum proves every value finite. ``einsum``'s sum reads the array once with SIMD
    accumulators and allocates nothing: at 5 M float32 values (21 MB of gradients) it takes
    half the time of ``np.isfinite(array).all()``, which writes and reads a boolean array.
    Only a non-finite sum (a non-finite value, or finite values whose float32 sum
    overflows) falls back to the element-wise test, which decides.
    """
    if array.size >= _SUM_CHECK_SIZE and array.dtype in (np.float32, np.float64):
        dense = _dense_view(array)
        if dense is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                if np.isfinite(np.einsum("i->", dense)):
                    return True
    return bool(np.isfinite(array).all())


def _dense_view(array: np.ndarray) -> np.ndarray | None:
    """``array``'s values as a 1-D view, when its memory is dense in some axis order.

    E.g. the ``(N, T, ...)`` view of ``(T, N, ...)`` gradients; ``None`` for a strided view.
    """
    if any(stride < 0 for stride in array.strides):
        return None
    order = sorted(range(array.ndim), key=lambda axis: array.strides[axis], reverse=True)
    expected = array.itemsize
    for axis in reversed(order):
        if array.shape[axis] != 1 and array.strides[axis] != expected:
            return None
        expected *= array.shape[axis]
    return array.transpose(order).reshape(-1)


def _check_finite(array: np.ndarray, what: str) -> None:
    if array.dtype.kind not in "fc" or _all_finite(array):
        return
    bad = ~np.isfinite(array)
    samples = sorted({int(i) for i in np.nonzero(bad.reshape(bad.shape[0], -1).any(1))[0]})
    raise NonFiniteError(
        f"NaN/Inf in {what}: {int(np.isnan(array).sum())} NaN and "
        f"{int(np.isinf(array).sum())} Inf values (samples {samples[:10]}). "
        "Check the input for NaN/Inf; if the input is finite, the model overflows: "
        "compute in float32, or lower the logits' scale."
    )


def replacement_activations(
    activations: Any, batch_size: int, layer_name: str, layout: Layout
) -> np.ndarray:
    """Check replacement activations for ``outputs_from_layer``; return them natively laid out.

    Args:
        activations: ``(M, K, *S)`` channels-first, NumPy-convertible.
        batch_size: M, the number of input samples they replace the layer's output for.
        layer_name: for messages.
        layout: the backend's layout; channels-last moves K to the end.

    Returns:
        A C-contiguous float32 array, ``(M, K, *S)`` or ``(M, *S, K)`` per ``layout``.

    Raises:
        InputError: not ``(M, K, *S)`` with M = ``batch_size``.
        NonFiniteError: NaN or Inf in them.
    """
    array = np.asarray(activations, dtype=np.float32)
    if array.ndim < 3 or array.shape[0] != batch_size:
        raise InputError(
            f"replacement activations for layer {layer_name!r} have shape {array.shape}; "
            f"expected channels-first (M, K, *spatial) with M = {batch_size}, one per input."
        )
    _check_finite(array, f"the replacement activations for layer {layer_name!r}")
    if layout == "channels_last":
        array = np.moveaxis(array, 1, -1)
    return np.ascontiguousarray(array)


#: Nonlinearities guided backpropagation cannot guide, by their normalised function or
#: class name (lower case, no underscores), as the kinds reported in
#: ``LayerGradients.unguided_activations``.
UNGUIDED_KINDS = {
    "silu": "SiLU",
    "swish": "SiLU",
    "gelu": "GELU",
    "elu": "ELU",
    "selu": "ELU",
    "celu": "ELU",
    "leakyrelu": "LeakyReLU",
    "prelu": "LeakyReLU",
    "sigmoid": "Sigmoid",
    "logistic": "Sigmoid",
    "hardsigmoid": "Sigmoid",
    "logsigmoid": "Sigmoid",
    "tanh": "Tanh",
    "hardtanh": "Tanh",
    "softplus": "Softplus",
    "hardsilu": "Hardswish",
    "hardswish": "Hardswish",
    "mish": "Mish",
}


def nonlinearity_kind(name: str) -> str | None:
    """The reported kind of a nonlinearity named ``name`` (``"swish"``, ``"Gelu"``), or None."""
    return UNGUIDED_KINDS.get(name.lower().replace("_", ""))


def check_parameter_layers(layers: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    """``layers`` as a tuple, or :class:`LayerError` naming those that hold no parameters."""
    names = tuple(layers)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise LayerError(
            f"layers {unknown!r} hold no parameters of their own; the layers that do: "
            f"{nearest_names(str(unknown[0]), known)}."
        )
    return names
