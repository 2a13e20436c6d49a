"""The TensorFlow backend: Keras 3 models on the TensorFlow backend.

Its one job is to return, as NumPy arrays, the output of one layer of a Keras model, the
gradients of the target scores with respect to that output, and the scores
(:class:`~multicam.backends.base.LayerGradients`); all Grad-CAM algebra lives in
:mod:`multicam.algebra`.

Mechanism: for the duration of one forward pass, the bound layer instance's ``call`` (or
that of an operation of a functional graph that is not a Layer, such as the ``Add`` of
``x + skip``, chosen by name, object or KerasTensor) is shadowed by a wrapper that records
its output and ``watch``-es it on a ``tf.GradientTape(watch_accessed_variables=False)``.
Nothing upstream of the layer is recorded, no variable is differentiated, and because the
model is simply called, layers inside nested models, Sequential, Functional and subclassed
models all work (no rebuilt "sub-model", hence no "Graph disconnected" error). The
original ``call`` is restored in a ``finally``, so the model is exactly as before, also
when its forward raises; no trainable flag and no global TensorFlow or Keras setting is
touched. Every forward runs with ``training=False``: the model is explained as it predicts
(Dropout off, BatchNorm on its moving statistics); Keras' training flag is per call, so
nothing is switched and nothing is reported in ``LayerGradients.training``.

Compiled path (the default): that forward, the layer's capture and the gradients of the T
target scores are traced into one ``tf.function`` (no AutoGraph, no XLA), which TensorFlow
traces once per input signature (shape and dtype) and number of targets; class ids are a
tensor argument, and the predicted class and ``"all"`` are computed inside, so new classes
at the same shapes run the same graph. The shadowing wrapper is installed only while a
function is traced; running a traced graph calls no Python and touches no attribute of
the model. The traced functions belong to the model (shared by every explainer of it, held
weakly), so a new explainer on a model already explained reuses them. Guided
backpropagation, :meth:`~TensorFlowBoundModel.outputs` and
:meth:`~TensorFlowBoundModel.outputs_from_layer` are compiled alike. A target function
(``targets=callable``) is compiled from its second use with the same function object (a
lambda written inside a loop is a new object each time and runs eagerly); ``Region``
targets run eagerly. When a call fails on the compiled path, multicam runs it eagerly:
if the eager run fails too, its error is the one raised (so errors are exactly those of
the eager path); if it succeeds, the model cannot be traced (Python control flow on
tensor values, ``.numpy()`` inside ``call``, a ``call`` that is itself a ``tf.function``)
and that computation stays eager from then on. Which path ran is logged at DEBUG level on
the ``multicam.backends.tensorflow`` logger and kept in
:attr:`TensorFlowBoundModel.last_path` (with :attr:`~TensorFlowBoundModel.eager_reason`);
:attr:`TensorFlowBoundModel.trace_count` counts the traces. ``compile=False`` (an option
of every explainer, e.g. ``mc.GradCAM(model, layer, compile=False)``) always runs eagerly.
A traced graph does not see later changes to the model's Python structure (a replaced
activation, a flag read in ``call``), exactly like Keras' own ``predict``; variables'
values are read at every call.

Several layers and second derivatives run eagerly: ``tensor_gradients`` (FullGrad, LeGrad)
shadows every layer it is asked for in one forward and differentiates all of them in one
backward pass per target (a ``MultiHeadAttention`` contributes its attention
probabilities, asked for with ``return_attention_scores=True``);
``hessian_vector_products`` (ShapleyCAM) watches the bound layer on two nested tapes.
``Targets.score == "rest"`` (ShapleyCAM's residual-softmax score) is part of the
compiled functions' cache key, so it runs compiled like the plain scores.

Threads: the shadowing wrapper is installed once per layer for as long as any thread is
explaining it (reference-counted under a lock) and records only for the threads that are
explaining (a thread-local slot; TensorFlow's tapes are thread-local too); any other call
of the layer goes straight to the original ``call``. A traced function runs no Python at
all, and TensorFlow traces one function in one thread at a time. So several threads may
explain one model at once and get the same maps as one after another.

Errors: inputs whose shape does not fit the model's declared input, and non-numeric
inputs, raise :class:`~multicam.errors.InputError` before the model runs; a forward that
fails inside Keras or TensorFlow raises :class:`~multicam.errors.InputError` ``from`` the
framework's exception; an exception the user's own code raises propagates unchanged, with
a note.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

from ..errors import (
    BackendError,
    InputError,
    LayerError,
    TargetError,
    UnsupportedModelError,
    nearest_names,
)
from ..targets import Targets, select_output
from .base import (
    Backend,
    BoundModel,
    LayerGradients,
    Layout,
    Redraw,
    TensorGradients,
    check_finite,
    check_finite_input,
    check_parameter_layers,
    forward_errors,
    make_layer_gradients,
    nonlinearity_kind,
    replacement_activations,
)

__all__ = ["TensorFlowBackend", "TensorFlowBoundModel"]

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")
_C = TypeVar("_C")
_MISSING = object()
#: The layer attributes Keras' ``Operation.__call__`` may dispatch to.
_CALL_ATTRIBUTES = ("call", "quantized_call")
#: From this many targets on, one vectorised batch Jacobian (pfor) beats one backward pass
#: per target; below it pfor's tracing costs more than it saves (benchmarks/RESULTS.md:
#: digits CNN T=10, 167 ms vs 62 ms; ResNet-50 T=10, 405 vs 332 ms; T=100, 433 vs 975 ms).
_PFOR_FROM_TARGETS = 16
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class TensorFlowBackend(Backend):
    """Recognises Keras 3 models (``keras.Model`` or any ``keras.layers.Layer``)."""

    name: ClassVar[str] = "tensorflow"
    extra: ClassVar[str] = "tensorflow"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        """Whether ``model`` is a Keras 3 layer or model; never imports Keras to answer."""
        keras = sys.modules.get("keras")
        if keras is None:
            return False
        layer_cls = getattr(getattr(keras, "layers", None), "Layer", None)
        return isinstance(layer_cls, type) and isinstance(model, layer_cls)

    def bind(self, model: Any, layer: Any, **options: Any) -> TensorFlowBoundModel:
        """Bind a Keras model to one of its layers.

        Args:
            model: a Keras 3 model (Functional, Sequential or subclassed) or layer, running
                on the TensorFlow backend.
            layer: the layer's name, its path through nested models (``"block2/conv1"``),
                a unique bare name of a nested layer, or the layer object itself; in a
                functional model also any node of its graph that is not a Layer: the name
                of an operation in ``model.operations`` (``"add_17"``, a residual sum
                ``x + skip``), the operation object, or a ``KerasTensor`` of the graph
                (the ``y`` of ``y = x + skip``).
            **options: ``layout`` (``"channels_last"`` or ``"channels_first"``) overrides
                the layout read from the layer's ``data_format``; ``compile=False`` runs
                every call eagerly instead of in a traced ``tf.function`` (default
                ``True``: compiled, eager where the model cannot be traced).

        Raises:
            UnsupportedModelError: not a Keras 3 model, or Keras runs on another backend.
            LayerError: the layer does not exist (the message names the nearest valid
                paths) or its bare name is ambiguous.
        """
        import keras

        if not isinstance(model, keras.layers.Layer):
            raise UnsupportedModelError(
                f"the 'tensorflow' backend explains Keras 3 models; got "
                f"{type(model).__module__}.{type(model).__qualname__}."
            )
        if keras.backend.backend() != "tensorflow":
            raise UnsupportedModelError(
                f"this Keras model runs on the {keras.backend.backend()!r} Keras backend; "
                "the 'tensorflow' backend needs KERAS_BACKEND=tensorflow (set it before "
                "importing keras)."
            )
        unknown = set(options) - {"layout", "compile"}
        if unknown:
            raise BackendError(
                f"the 'tensorflow' backend got unknown options {sorted(unknown)}; "
                "it accepts: layout, compile."
            )
        compile = options.get("compile", True)
        if not isinstance(compile, bool):
            raise BackendError(f"compile={compile!r}: pass True or False.")
        named = list(_named_layers(model))
        path, target, index = _resolve_layer(model, layer, named)
        layout = options.get("layout") or _layout_of(target, named)
        if layout not in ("channels_last", "channels_first"):
            raise BackendError(
                f"layout={layout!r} is not understood; use 'channels_last' or 'channels_first'."
            )
        return TensorFlowBoundModel(model, target, path, layout, index, compile)


class TensorFlowBoundModel(BoundModel):
    """A Keras model bound to one layer; see :class:`TensorFlowBackend`.

    Attributes:
        compile: whether calls use the compiled path (the ``compile=`` option).
        last_path: ``"compiled"`` or ``"eager"``: the path the latest call took (of any
            thread), ``None`` before the first call.
        eager_reason: why the latest call ran eagerly (``"compile=False"``, ``"Region
            targets run eagerly"``, the exception that tracing raised, ...), else ``None``.
        trace_count: how many times this model's compiled functions were traced.
    """

    backend: ClassVar[str] = "tensorflow"

    def __init__(
        self,
        model: Any,
        layer: Any,
        layer_name: str,
        layout: Layout,
        output_index: int | None = None,
        compile: bool = True,
    ) -> None:
        """Store the resolved layer; use :meth:`TensorFlowBackend.bind` to make one.

        ``layer`` is a Layer or any other Keras operation of the model's graph;
        ``output_index`` picks one output of an operation that returns several (a
        ``KerasTensor`` chosen as the layer says which); ``compile=False`` runs every
        call eagerly.
        """
        self.model = model
        self.layer = layer
        self.layer_name = layer_name
        self.layout = layout
        self.output_index = output_index
        self.compile = compile
        self.last_path: str | None = None
        self.eager_reason: str | None = None

    @property
    def trace_count(self) -> int:
        """How many times this model's compiled functions were traced (all explainers)."""
        return _functions_of(self.model).trace_count

    def gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        """Run one forward pass and one batched backward pass to the bound layer.

        Compiled (one ``tf.function`` per input signature and number of targets) unless
        ``compile=False``, the targets are :class:`~multicam.targets.Region` s, or the model
        cannot be traced; see the module's docstring.

        Args:
            inputs: a batch in the model's layout (NHWC unless the layer is channels-first),
                a NumPy array or a ``tf.Tensor``.
            targets: the parsed target request.

        Returns:
            Channels-first float32 activations ``(N, K, *S)``, gradients ``(N, T, K, *S)``
            and scores ``(N, T)``.

        Raises:
            InputError: the input's shape does not fit the model's declared input.
            NonFiniteError: NaN or Inf in the input, activations, gradients or scores.
            LayerError: the layer was not called exactly once, or the scores do not depend
                on its output.
            TargetError: the targets do not fit the output, or the model has several
                outputs.
        """
        x = self._prepare_inputs(inputs)
        return self._compiled_or_eager(
            "gradients",
            self._function("gradients", targets),
            lambda function: _numpy(function(x, _class_tensor(targets))),
            lambda arrays: make_layer_gradients(
                arrays["activations"],
                arrays["gradients"],
                arrays["scores"],
                _class_ids(targets, arrays),
                layout=self.layout,
                input_shape=_input_shape(x),
                layer_name=self.layer_name,
                outputs=arrays["outputs"],
            ),
            functools.partial(self._eager_gradients, x, targets),
        )

    def _eager_gradients(self, x: Any, targets: Targets) -> LayerGradients:
        """:meth:`gradients` run eagerly."""
        import tensorflow as tf

        input_shape = _input_shape(x)
        record = _Record(self.output_index)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            outputs = self._recording_forward(
                x, [(self.layer, record)], tape, f"layer {self.layer_name!r}"
            )
            activations = self._recorded_activations(record)
            outputs, scores, class_ids, columns = self._scores(outputs, targets)
        try:
            gradients = self._backward(tape, scores, columns, activations)
        finally:
            del tape
        return self._from_tape(activations, gradients, scores, class_ids, input_shape, outputs)

    def _from_tape(
        self,
        activations: Any,
        gradients: Any,
        scores: Any,
        class_ids: np.ndarray | None,
        input_shape: tuple[int, ...],
        outputs: Any,
        **fields: Any,
    ) -> LayerGradients:
        """:func:`make_layer_gradients` of eager tensors, handed back as float32 NumPy."""
        import tensorflow as tf

        def host(tensor: Any) -> np.ndarray:
            return tf.cast(tensor, tf.float32).numpy()

        return make_layer_gradients(
            host(activations),
            host(gradients),
            host(scores),
            class_ids,
            layout=self.layout,
            input_shape=input_shape,
            layer_name=fields.pop("layer_name", self.layer_name),
            outputs=host(outputs),
            **fields,
        )

    def outputs(self, inputs: Any, output: int | str | None = None) -> np.ndarray:
        """The model's outputs for a batch (``training=False``), as float32 NumPy.

        ``output`` chooses one of several outputs (see ``select_output``). Compiled like
        :meth:`gradients`.
        """
        x = self._prepare_inputs(inputs)
        return self._compiled_or_eager(
            "outputs",
            self._function("outputs", None, output),
            lambda function: function(x).numpy(),
            _checked_outputs,
            functools.partial(self._plain_forward, x, None, output),
        )

    def outputs_from_layer(
        self, inputs: Any, activations: np.ndarray, output: int | str | None = None
    ) -> np.ndarray:
        """The outputs with the layer's output replaced by ``activations`` (M, K, *S).

        The same shadowing wrapper as :meth:`gradients` returns the replacement instead of
        the layer's output (for this thread only); the layer's ``call`` is restored after.
        Compiled like :meth:`gradients`, the replacement a tensor argument.
        """
        import tensorflow as tf

        x = self._prepare_inputs(inputs)
        n = int(tf.nest.flatten(x)[0].shape[0])
        replacement = replacement_activations(activations, n, self.layer_name, self.layout)
        return self._compiled_or_eager(
            "outputs_from_layer",
            self._function("outputs_from_layer", None, output),
            lambda function: function(x, tf.convert_to_tensor(replacement)).numpy(),
            _checked_outputs,
            functools.partial(self._eager_outputs_from_layer, x, replacement, output),
        )

    def _eager_outputs_from_layer(
        self, x: Any, replacement: np.ndarray, output: int | str | None
    ) -> np.ndarray:
        """:meth:`outputs_from_layer` run eagerly."""
        import tensorflow as tf

        replace = _replacer(tf.convert_to_tensor(replacement), self.layer_name)
        record = _ReplacingRecord(replace, self.output_index)
        out = self._plain_forward(x, record, output)
        self._recorded_activations(record)  # the layer ran exactly once
        return out

    def _plain_forward(
        self, x: Any, record: _Record | None, output: int | str | None = None
    ) -> np.ndarray:
        """One eager forward, swapping the layer's output if ``record`` says so; float32."""
        import tensorflow as tf

        first = tf.nest.flatten(x)[0]
        restore = None if record is None else _install(self.layer, record, _NoTape())
        try:
            with self._forward_errors(
                tuple(int(d) for d in first.shape),
                first.dtype.name,
                "(raised by the model's own forward pass run by multicam; the model has been "
                "restored unchanged)",
            ):
                outputs = self.model(x, training=False)
        finally:
            if restore is not None:
                restore()
        result = tf.cast(_chosen_tensor(outputs, output), tf.float32).numpy()
        check_finite(result, "the model's outputs")
        return result

    def guided_gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        """Guided backpropagation to the input (single-input models).

        For one forward pass, every ReLU layer (``keras.layers.ReLU`` without a negative
        slope), every ReLU operation of a functional graph (``keras.ops.relu`` on a
        KerasTensor) and every layer whose ``activation`` is a ReLU
        (``Conv2D(activation="relu")``, ``Dense``, ``Activation("relu")``; ``relu`` or
        ``relu6`` of Keras or ``tf.nn``) has its ``call`` or ``activation`` shadowed by a
        wrapper that passes the output through a ``tf.custom_gradient`` gate: identity
        forward, backward ``max(dy, 0)``; the ReLU's own backward then masks by
        ``input > 0``. The gate acts only for the thread that is explaining; the attributes
        are restored in a ``finally``. A ReLU written inline in a subclassed model's
        ``call`` (``tf.nn.relu(x)``, ``keras.ops.relu(x)``) is not guided. Compiled like
        :meth:`gradients` (the wrappers are installed only while tracing; the gates are
        part of the traced graph).

        The result reports ``guided_relus``, how many ReLU calls the forward gated, and
        ``unguided_activations``, the kinds of the other nonlinearities that ran (layers'
        ``activation`` such as ``"swish"``/``"gelu"``, layers and graph operations such as
        ``ELU``, ``LeakyReLU``, ``keras.ops.silu``), which guided backpropagation passes
        through ungated; inline ones in a subclassed model's ``call`` are not seen.
        """
        import tensorflow as tf

        x = self._prepare_inputs(inputs)
        _check_differentiable_input(x, "guided backpropagation")
        return self._compiled_or_eager(
            "guided_gradients",
            self._function("guided", targets),
            lambda function: _numpy(function(x, _class_tensor(targets))),
            lambda arrays: make_layer_gradients(
                tf.cast(x, tf.float32).numpy(),
                arrays["gradients"],
                arrays["scores"],
                _class_ids(targets, arrays),
                layout=self.layout,
                input_shape=_input_shape(x),
                layer_name="input",
                outputs=arrays["outputs"],
                guided_relus=int(arrays["relus"]),
                unguided_activations=[kind.decode() for kind in arrays["kinds"]],
            ),
            functools.partial(self._eager_guided_gradients, x, targets),
        )

    def _eager_guided_gradients(self, x: Any, targets: Targets) -> LayerGradients:
        """:meth:`guided_gradients` run eagerly."""
        import tensorflow as tf

        input_shape = _input_shape(x)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            tape.watch(x)
            restore, stats = _install_guided(self.model)
            try:
                with self._forward_errors(
                    input_shape,
                    x.dtype.name,
                    "(raised by the model's own forward pass during guided backpropagation; "
                    "the model has been restored unchanged)",
                ):
                    outputs = self.model(x, training=False)
            finally:
                restore()
            outputs, scores, class_ids, columns = self._scores(outputs, targets)
        try:
            gradients = self._backward(tape, scores, columns, x)
        finally:
            del tape
        return self._from_tape(
            x,
            gradients,
            scores,
            class_ids,
            input_shape,
            outputs,
            layer_name="input",
            guided_relus=stats.relus,
            unguided_activations=sorted(stats.kinds),
        )

    # --- several layers, second derivatives ----------------------------------------------

    def tensor_gradients(
        self,
        inputs: Any,
        targets: Targets,
        layers: Sequence[str],
        *,
        input_gradients: bool = False,
    ) -> TensorGradients:
        """Gradients of the target scores w.r.t. the outputs of several layers, in one pass.

        One eager forward (``training=False``) records the output of every layer in
        ``layers`` (each shadowed by the recording wrapper of :meth:`gradients`, all removed
        after the forward, also when it raises); then one backward pass per target column
        differentiates all of them at once (for more than 16 targets, pfor's batch Jacobian
        per tensor). A ``keras.layers.MultiHeadAttention`` contributes its attention
        probabilities instead of its output: it runs with ``return_attention_scores=True``
        (which also avoids Keras' fused kernel, which never materialises them), and the
        model gets only the attention output, as it asked.

        Args:
            inputs: a batch in the model's layout, a NumPy array or a ``tf.Tensor``.
            targets: the parsed target request.
            layers: layer names, paths or objects, as ``layer=`` takes them (e.g. the names
                of :meth:`bias_layers`), each once; may be empty with ``input_gradients``.
            input_gradients: also return the input and d score / d input.

        Returns:
            :class:`TensorGradients` keyed by each layer's resolved path, in the order asked
            for; tensors ``(N, ...)`` and gradients ``(N, T, ...)`` in Keras' own layout
            (channels-last for the zoo's models), attention probabilities
            ``(N, heads, Q, K)``; float32.

        Raises:
            LayerError: a layer that does not exist (with the nearest names), named twice,
                not called exactly once by the forward, that returns no single tensor, or on
                whose output the scores do not depend; an attention layer built with
                ``flash_attention=True``.
            InputError: ``input_gradients`` for a model with several or non-float inputs.
            TargetError: the targets do not fit the outputs.
        """
        import tensorflow as tf

        taps = self._tensor_taps(layers, input_gradients)
        x = self._prepare_inputs(inputs)
        if input_gradients:
            _check_differentiable_input(x, "input_gradients=True")
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            if input_gradients:
                tape.watch(x)
            what = "layers " + ", ".join(repr(path) for path, _, _ in taps)
            outputs = self._recording_forward(
                x, [(layer, record) for _, layer, record in taps], tape, what
            )
            tensors = {
                path: _recorded_output(record, path, traced=False) for path, _, record in taps
            }
            outputs, scores, class_ids, columns = self._scores(outputs, targets)
        sources = list(tensors.values()) + ([x] if input_gradients else [])
        try:
            gradients = _backward_all(tape, scores, columns, sources, list(tensors))
        finally:
            del tape
        self._ran("eager", "tensor_gradients", "tensor_gradients runs eagerly")
        return TensorGradients(
            {
                path: _float32(tensor, f"the output of layer {path!r}")
                for path, tensor in tensors.items()
            },
            {
                path: _float32(gradient, f"the gradients at layer {path!r}")
                for path, gradient in zip(tensors, gradients, strict=False)
            },
            _float32(scores, "the target scores"),
            class_ids,
            self.layout,
            _float32(x, "the input") if input_gradients else None,
            _float32(gradients[-1], "the gradients at the input") if input_gradients else None,
            _float32(outputs, "the model's outputs"),
        )

    def _tensor_taps(
        self, layers: Sequence[str], input_gradients: bool
    ) -> list[tuple[str, Any, _Record]]:
        """``(path, layer, record)`` for each layer of :meth:`tensor_gradients`.

        Resolved as :meth:`TensorFlowBackend.bind` resolves ``layer=``; a multi-head
        attention layer gets an :class:`_AttentionRecord`. A layer named twice (also under
        two spellings) is an error, as in the other backends: the result is keyed by it.
        """
        import keras

        if isinstance(layers, str) or (not layers and not input_gradients):
            raise LayerError("tensor_gradients needs a non-empty sequence of layer names.")
        named = list(_named_layers(self.model))
        taps: list[tuple[str, Any, _Record]] = []
        seen: dict[int, str] = {}
        for name in layers:
            path, layer, index = _resolve_layer(self.model, name, named)
            if id(layer) in seen:
                raise LayerError(
                    f"layers {list(layers)!r} name layer {seen[id(layer)]!r} more than once "
                    f"(also as {path!r}); tensor_gradients records each layer once."
                )
            seen[id(layer)] = path
            if isinstance(layer, keras.layers.MultiHeadAttention) and index is None:
                if getattr(layer, "_flash_attention", False):
                    raise LayerError(
                        f"attention layer {path!r} uses flash attention, which never "
                        "materialises the attention probabilities; build it with "
                        "flash_attention=False (or keras.config.disable_flash_attention())."
                    )
                taps.append((path, layer, _AttentionRecord()))
            else:
                taps.append((path, layer, _Record(index)))
        return taps

    def hessian_vector_products(
        self, inputs: Any, targets: Targets
    ) -> tuple[LayerGradients, np.ndarray]:
        """The gradients at the bound layer and the Hessian-vector products ``H a``.

        Double backward on nested tapes, eagerly: one forward watches the layer's output
        ``a`` on both; the inner tape gives each target's gradient ``g_t = d s_t / d a``
        (recorded by the outer tape), and the outer one ``d (g_t . a) / d a`` with ``a``
        held fixed, i.e. ``H_t a`` (``output_gradients=a``). Samples are independent, so
        the scores are summed over the batch. A score linear in ``a`` (a ReLU network's
        logits: a ReLU's second derivative is 0) gives zeros, not an error.

        Args:
            inputs: a batch in the model's layout, a NumPy array or a ``tf.Tensor``.
            targets: the parsed target request.

        Returns:
            The :class:`LayerGradients` of :meth:`gradients` and ``(N, T, K, *S)``
            channels-first float32 Hessian-vector products.

        Raises:
            As :meth:`gradients`.
        """
        import tensorflow as tf

        x = self._prepare_inputs(inputs)
        record = _Record(self.output_index)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as outer:
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as inner:
                outputs = self._recording_forward(
                    x, [(self.layer, record)], _Tapes(outer, inner), f"layer {self.layer_name!r}"
                )
                activations = self._recorded_activations(record)
                outputs, scores, class_ids, columns = self._scores(outputs, targets)
            rows = [inner.gradient(column, activations) for column in columns]
        try:
            if any(row is None for row in rows):
                raise _disconnected(self.layer_name)
            products = [
                outer.gradient(
                    row,
                    activations,
                    output_gradients=activations,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                for row in rows
            ]
        finally:
            del outer, inner
        self._ran("eager", "hessian_vector_products", "Hessian-vector products run eagerly")
        result = self._from_tape(
            activations, tf.stack(rows, axis=1), scores, class_ids, _input_shape(x), outputs
        )
        hvp = _float32(
            tf.stack(products, axis=1), f"the Hessian-vector products at layer {self.layer_name!r}"
        )
        if self.layout == "channels_last":
            hvp = np.ascontiguousarray(np.moveaxis(hvp, -1, 2))
        return result, hvp

    # --- which path runs ----------------------------------------------------------------

    def _function(
        self, kind: str, targets: Targets | None, output: int | str | None = None
    ) -> tuple[Any, tuple[Any, ...] | None, str]:
        """The compiled function for this call, its cache key, or why the call runs eagerly.

        ``kind`` is ``"gradients"``, ``"guided"``, ``"outputs"`` or
        ``"outputs_from_layer"``; the last two take ``output`` instead of ``targets``.
        """
        if not self.compile:
            return None, None, "compile=False"
        scope = _keras_scope()
        if scope:
            return None, None, f"called inside a {scope}, whose variable values are not traced"
        if targets is None:
            return _functions_of(self.model).get(self, kind, None, output, None)
        if targets.kind == "region":
            return None, None, "Region targets run eagerly"
        return _functions_of(self.model).get(
            self, kind, targets.kind, targets.output, targets.score_fn, targets.score
        )

    def _compiled_or_eager(
        self,
        what: str,
        found: tuple[Any, tuple[Any, ...] | None, str],
        call: Callable[[Any], _C],
        finish: Callable[[_C], _T],
        eager: Callable[[], _T],
    ) -> _T:
        """``finish(call(function))`` if :meth:`_function` found one (``found``), else ``eager()``.

        A compiled call that raises runs eagerly instead and stays eager from then on
        (:meth:`_after_failure`); which path ran is recorded (:meth:`_ran`) under ``what``.
        ``finish`` (the checks and the hand-back) runs after, so its errors are the user's.
        """
        function, key, reason = found
        if function is None:
            return self._eager(what, reason, eager)
        try:
            result = call(function)
        except Exception as exc:
            return self._after_failure(what, key, exc, eager)
        self._ran("compiled", what)
        return finish(result)

    def _eager(self, what: str, reason: str, run: Callable[[], _T]) -> _T:
        result = run()
        self._ran("eager", what, reason)
        return result

    def _after_failure(
        self, what: str, key: tuple[Any, ...] | None, exc: Exception, run: Callable[[], _T]
    ) -> _T:
        """The compiled function raised ``exc``: run eagerly; if that works, stay eager.

        An error of the eager run is the one the user gets (the compiled path's errors are
        never shown), so errors are exactly those of the eager path.
        """
        result = run()
        summary = f"{type(exc).__name__}: {_first_line(exc)}"
        reason = f"the model could not be traced ({summary}); eager from now on"
        if key is not None:
            _functions_of(self.model).refuse(key, reason)
        self._ran("eager", what, reason)
        return result

    def _ran(self, path: str, what: str, reason: str | None = None) -> None:
        self.last_path = path
        self.eager_reason = reason
        if _LOG.isEnabledFor(logging.DEBUG):
            _LOG.debug(
                "multicam: %s of layer %r ran %s%s",
                what,
                self.layer_name,
                path,
                f" ({reason})" if reason else "",
            )

    def _forward_errors(
        self, input_shape: Sequence[int], input_dtype: str, note: str
    ) -> contextlib.AbstractContextManager[None]:
        """How a failure of the model's forward reaches the user."""
        layout = "N, C, *spatial" if self.layout == "channels_first" else "N, *spatial, C"
        return forward_errors(
            packages=("keras", "tensorflow", "tf_keras"),
            framework="Keras/TensorFlow",
            input_shape=tuple(input_shape),
            input_dtype=input_dtype,
            expected=f"input in the layout of their layers' data_format, here {self.layout} "
            f"({layout})",
            note=note,
        )

    def _prepare_inputs(self, inputs: Any) -> Any:
        """Check the input's finiteness and shape; return it as tensor(s)."""
        import tensorflow as tf

        declared = _declared_input(self.model)
        if isinstance(inputs, list | tuple) and len(inputs) == 1:
            inputs = inputs[0]  # Keras' spelling of a single input
        elif isinstance(inputs, list | tuple) and declared is not None:
            inputs = _as_array(inputs)  # nested lists of numbers for a single-input model
        if isinstance(inputs, list | tuple | dict):  # a multi-input model
            leaves = [_as_array(leaf) for leaf in tf.nest.flatten(inputs)]
            for leaf in leaves:
                check_finite_input(leaf)
            return tf.nest.map_structure(tf.convert_to_tensor, inputs)
        array = inputs.numpy() if isinstance(inputs, tf.Tensor) else _as_array(inputs)
        if array.ndim == 0:
            self.batch_size(array)  # raises the scalar InputError
        check_finite_input(array)
        if declared is not None:
            shape, dtype = declared
            self._check_shape(tuple(array.shape), shape)
            if array.dtype.kind == "f" and dtype in _FLOAT_DTYPES:
                return tf.cast(tf.convert_to_tensor(inputs), dtype)
        return tf.convert_to_tensor(inputs)

    def _check_shape(self, got: tuple[int, ...], want: tuple[int | None, ...]) -> None:
        """Raise :class:`InputError` if ``got`` does not fit the declared ``want``."""

        def fits(shape: tuple[int, ...]) -> bool:
            return len(shape) == len(want) and all(
                w is None or int(w) == g for g, w in zip(shape, want, strict=True)
            )

        want = (None, *want[1:])  # a model built on one batch may declare its size
        if fits(got):
            return
        declared = "(N, " + ", ".join(str(w) for w in want[1:]) + ")"
        message = f"the input has shape {got} but the model expects {declared}."
        if len(got) == len(want) - 1 and fits((1, *got)):
            hint = " It looks like a single sample without its batch dimension: pass x[None]."
        elif len(got) >= 3 and fits((got[0], *got[2:], got[1])):
            hint = (
                " It looks like a channels-first (NCHW) batch given to a channels-last (NHWC) "
                "model: transpose it with np.moveaxis(x, 1, -1)."
            )
        elif len(got) >= 3 and fits((got[0], got[-1], *got[1:-1])):
            hint = (
                " It looks like a channels-last (NHWC) batch given to a channels-first (NCHW) "
                "model: transpose it with np.moveaxis(x, -1, 1)."
            )
        elif len(got) != len(want):
            hint = f" The rank differs: got {len(got)} dims, expected {len(want)}."
        else:
            hint = " Resize or reshape the input to the model's input shape."
        raise InputError(message + hint)

    def _recording_forward(
        self, x: Any, taps: Sequence[tuple[Any, _Record]], tape: Any, what: str
    ) -> Any:
        """One eager forward (``training=False``) recording each tap's layer onto ``tape``.

        Args:
            x: the prepared input.
            taps: ``(layer, record)`` pairs: each layer's output goes to its record and is
                watched on ``tape`` (anything with ``watch``); the wrappers are removed
                after the forward, also when it raises.
            tape: the tape(s) the recorded outputs are watched on.
            what: what is recorded, for the note on the user's own exceptions.

        Returns:
            The model's outputs, as it returned them.
        """
        import tensorflow as tf

        with contextlib.ExitStack() as installed:
            for layer, record in taps:
                installed.callback(_install(layer, record, tape))
            with self._forward_errors(
                _input_shape(x),
                tf.nest.flatten(x)[0].dtype.name,
                f"(raised by the model's own forward pass while multicam recorded {what}; "
                "the model has been restored unchanged)",
            ):
                return self.model(x, training=False)

    def _scores(self, outputs: Any, targets: Targets) -> tuple[Any, Any, Any, list[Any]]:
        """The chosen output, its ``(N, T)`` target scores, class ids and score columns.

        Called inside the tape, so the scores are differentiable; the columns ``(N,)`` are
        the per-target scores, recorded now for the fallback of :func:`_backward` (cheap).
        """
        import tensorflow as tf

        outputs = self._single_output(targets.select_output(outputs))
        scores, class_ids = _target_scores(outputs, targets, self.layout)
        columns = tf.unstack(scores, axis=1) if scores.shape[1] > 1 else [scores]
        return outputs, scores, class_ids, columns

    def _recorded_activations(self, record: _Record) -> Any:
        """The bound layer's output from this eager forward, checked to be called once."""
        return _recorded_output(record, self.layer_name, traced=False)

    def _single_output(self, outputs: Any) -> Any:
        """The chosen output (see ``Targets.select_output``) as one tensor."""
        return _chosen_tensor(outputs, None)

    def _backward(self, tape: Any, scores: Any, columns: list[Any], activations: Any) -> Any:
        """``(N, T, *layer_shape)`` gradients of ``scores`` (N, T); see :func:`_backward`."""
        return _backward(tape, scores, columns, activations, self.layer_name)

    def parameter_layers(self) -> tuple[str, ...]:
        """Paths of the layers that created trainable variables, in the model's order."""
        return tuple(path for path, layer in _named_layers(self.model) if _own_parameters(layer))

    def bias_layers(self) -> tuple[tuple[str, np.ndarray], ...]:
        """Convolutions with a bias and batch normalisations, with their biases ``(K,)``.

        Walks the model as :meth:`parameter_layers` does (nested models expanded, the same
        paths, which :meth:`tensor_gradients` takes). Convolutions are Keras' convolution
        layers of any rank (and subclasses of their bases): plain, transposed, depthwise
        and separable. A ``BatchNormalization``'s bias is its inference-mode one,
        ``beta - moving_mean * gamma / sqrt(moving_variance + epsilon)`` (``gamma = 1``
        without ``scale``, ``beta = 0`` without ``center``), computed in float64.
        """
        import keras

        convolutions = _convolution_classes()
        found: list[tuple[str, np.ndarray]] = []
        for path, layer in _named_layers(self.model):
            if isinstance(layer, keras.layers.BatchNormalization):
                found.append((path, _batch_norm_bias(layer)))
            elif isinstance(layer, convolutions) and getattr(layer, "use_bias", False):
                bias = getattr(layer, "bias", None)
                if bias is not None:
                    found.append((path, np.asarray(bias, dtype=np.float32)))
        return tuple(found)

    def randomized(self, layers: Sequence[str], redraw: Redraw) -> TensorFlowBoundModel:
        """A copy of the model whose ``layers`` hold redrawn variables (see base).

        A functional or Sequential model (or a subclassed one Keras can rebuild from its
        config) is cloned (``keras.models.clone_model``) and the clone gets the weights
        and the new values; the user's model is never touched. A model Keras cannot clone
        is not copied: its variables are mapped to the new values in a
        ``keras.StatelessScope`` around every pass of the copy (thread-local; nothing is
        assigned).
        """
        import tensorflow as tf

        names = check_parameter_layers(layers, self.parameter_layers())
        named = dict(_named_layers(self.model))
        new_values: dict[int, Any] = {}
        for name in names:
            for variable in _own_parameters(named[name]):
                key = str(variable.name).rsplit("/", 1)[-1]
                values = np.asarray(variable.numpy(), np.float32)
                canonical = {"gamma": "scale", "beta": "bias"}.get(key, key)
                new = np.asarray(redraw(name, canonical, values))
                new_values[id(variable)] = tf.convert_to_tensor(new, dtype=variable.dtype)
        clone = _clone(self.model)
        if clone is not None:
            try:
                path, layer, index = _resolve_layer(
                    clone, self.layer_name, list(_named_layers(clone))
                )
            except LayerError:
                clone = None
        if clone is None:
            mapping = [(v, new_values[id(v)]) for v in self.model.weights if id(v) in new_values]
            return _RandomizedTensorFlowBoundModel(self, mapping)
        for original, copied in zip(self.model.weights, clone.weights, strict=True):
            if id(original) in new_values:
                copied.assign(new_values[id(original)])
        return TensorFlowBoundModel(clone, layer, path, self.layout, index, self.compile)


def _clone(model: Any) -> Any:
    """A clone of ``model`` with its weights, or ``None`` when Keras cannot clone it."""
    import keras

    try:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
    except Exception:  # e.g. a subclassed model without a usable get_config
        return None
    same = len(clone.weights) == len(model.weights) and all(
        tuple(a.shape) == tuple(b.shape) for a, b in zip(clone.weights, model.weights, strict=True)
    )
    return clone if same else None


class _RandomizedTensorFlowBoundModel(TensorFlowBoundModel):
    """A bound model whose passes read some variables from a mapping (see ``randomized``).

    The mapping applies to the model's Python forward; a pass that ran a graph traced
    outside the scope would read the variables themselves.
    """

    def __init__(self, bound: TensorFlowBoundModel, mapping: list[tuple[Any, Any]]) -> None:
        super().__init__(
            bound.model,
            bound.layer,
            bound.layer_name,
            bound.layout,
            bound.output_index,
            bound.compile,
        )
        self._mapping = mapping

    def _scope(self) -> Any:
        import keras

        return keras.StatelessScope(state_mapping=self._mapping)

    def gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        with self._scope():
            return super().gradients(inputs, targets)

    def outputs(self, inputs: Any, output: int | str | None = None) -> np.ndarray:
        with self._scope():
            return super().outputs(inputs, output)

    def outputs_from_layer(
        self, inputs: Any, activations: np.ndarray, output: int | str | None = None
    ) -> np.ndarray:
        with self._scope():
            return super().outputs_from_layer(inputs, activations, output)

    def guided_gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        with self._scope():
            return super().guided_gradients(inputs, targets)

    def bias_layers(self) -> tuple[tuple[str, np.ndarray], ...]:
        with self._scope():
            return super().bias_layers()

    def tensor_gradients(
        self,
        inputs: Any,
        targets: Targets,
        layers: Sequence[str],
        *,
        input_gradients: bool = False,
    ) -> TensorGradients:
        with self._scope():
            return super().tensor_gradients(
                inputs, targets, layers, input_gradients=input_gradients
            )

    def hessian_vector_products(
        self, inputs: Any, targets: Targets
    ) -> tuple[LayerGradients, np.ndarray]:
        with self._scope():
            return super().hessian_vector_products(inputs, targets)


def _convolution_classes() -> tuple[type, ...]:
    """Keras' convolution layer classes: every rank, transposed, depthwise, separable."""
    import keras

    names = (
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
    )
    classes: list[type] = [
        getattr(keras.layers, name) for name in names if hasattr(keras.layers, name)
    ]
    try:  # their bases, so that a user's own convolution built on them counts too
        from keras.src.layers.convolutional import (
            base_conv,
            base_conv_transpose,
            base_depthwise_conv,
            base_separable_conv,
        )
    except ImportError:
        return tuple(classes)
    return (
        *classes,
        base_conv.BaseConv,
        base_conv_transpose.BaseConvTranspose,
        base_depthwise_conv.BaseDepthwiseConv,
        base_separable_conv.BaseSeparableConv,
    )


def _batch_norm_bias(layer: Any) -> np.ndarray:
    """A ``BatchNormalization``'s bias in inference mode: its output is ``scale * x + bias``."""

    def values(variable: Any) -> np.ndarray:
        return np.asarray(variable, dtype=np.float64)

    mean = values(layer.moving_mean)
    gamma = values(layer.gamma) if layer.scale else np.ones_like(mean)
    beta = values(layer.beta) if layer.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(values(layer.moving_variance) + float(layer.epsilon))
    return (beta - mean * scale).astype(np.float32)


def _own_parameters(layer: Any) -> list[Any]:
    """The trainable variables ``layer`` created itself (not its sub-layers'), in order."""
    return list(getattr(layer, "_trainable_variables", None) or [])


def _as_array(inputs: Any) -> np.ndarray:
    """``inputs`` as a NumPy array of numbers, or an :class:`InputError`."""
    try:
        array = np.asarray(inputs)
    except (TypeError, ValueError) as exc:
        raise InputError(
            "the input could not be read as an array (ragged nested lists?); pass a NumPy "
            "array or a tensor of shape (N, ...)."
        ) from exc
    if array.dtype.kind not in "biuf" and array.dtype.name != "bfloat16":
        raise InputError(
            f"the input has dtype {array.dtype}; pass real numbers (float32 for most models)."
        )
    return array


class _Record:
    """What the wrapped ``call`` saw during one forward.

    ``index`` picks one element of an operation that returns a list or tuple.
    """

    def __init__(self, index: int | None = None) -> None:
        self.calls = 0
        self.depth = 0
        self.index = index
        self.output: Any = None

    def arguments(
        self, method: Any, args: tuple[Any, ...], kwargs: dict[str, Any], tape: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments the layer's outermost call runs with: the caller's own."""
        return args, kwargs

    def returned(self, output: Any) -> Any:
        """What the layer's outermost call hands on to the model: its own output."""
        return output


class _AttentionRecord(_Record):
    """Records a ``keras.layers.MultiHeadAttention``'s attention probabilities.

    Its call runs with ``return_attention_scores=True``, which also makes Keras compute
    the probabilities explicitly (its fused dot-product kernel never materialises them);
    the probabilities ``(N, heads, Q, K)`` are recorded (element 1 of the pair), and the
    model gets what it asked for: the attention output alone unless it asked for scores.
    The layer's inputs are watched before it runs: the probabilities are consumed inside
    the layer, so only a tape that records the call itself connects them to its output.
    """

    def __init__(self) -> None:
        super().__init__(index=1)
        self.asked = False

    def arguments(
        self, method: Any, args: tuple[Any, ...], kwargs: dict[str, Any], tape: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        import tensorflow as tf

        try:
            bound = inspect.signature(method).bind(*args, **kwargs)
        except (TypeError, ValueError):  # the call fails as it would without multicam
            return args, kwargs
        for name in ("query", "value", "key"):
            for leaf in tf.nest.flatten(bound.arguments.get(name)):
                if isinstance(leaf, tf.Tensor) and leaf.dtype.is_floating:
                    tape.watch(leaf)
        self.asked = bool(bound.arguments.get("return_attention_scores", False))
        if "return_attention_scores" not in bound.signature.parameters:  # call(**kwargs)
            self.asked = bool(kwargs.get("return_attention_scores", False))
            return args, {**kwargs, "return_attention_scores": True}
        bound.arguments["return_attention_scores"] = True
        return bound.args, bound.kwargs

    def returned(self, output: Any) -> Any:
        if self.asked or not isinstance(output, list | tuple):
            return output
        return output[0]


class _ReplacingRecord(_Record):
    """A record whose layer output is swapped for ``replace(output)`` (outputs_from_layer)."""

    def __init__(self, replace: Any, index: int | None = None) -> None:
        super().__init__(index)
        self.replace = replace


class _NoTape:
    """Stands in for the tape when nothing is differentiated."""

    def watch(self, tensor: Any) -> None:
        pass


class _Tapes:
    """Watches a recorded tensor on several nested tapes (second derivatives)."""

    def __init__(self, *tapes: Any) -> None:
        self.tapes = tapes

    def watch(self, tensor: Any) -> None:
        for tape in self.tapes:
            tape.watch(tensor)


_TAPS_LOCK = threading.Lock()
#: id(layer) -> its tap, while at least one thread explains the layer.
_TAPS: dict[int, _LayerTap] = {}


class _LayerTap:
    """The recording wrappers shadowing one layer's call methods, shared by all threads.

    Installed by the first thread that explains the layer and removed by the last one
    (``users`` counts them, under ``_TAPS_LOCK``); each thread records only its own calls.
    """

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.users = 0
        self.local = threading.local()
        self.saved: list[tuple[str, Any]] = []

    def wrap(self, method: Any) -> Any:
        local = self.local

        def recording_call(*args: Any, **kwargs: Any) -> Any:
            active = getattr(local, "active", None)
            if active is None:  # a call from a thread that is not explaining this layer
                return method(*args, **kwargs)
            record, tape = active
            if record.depth == 0:
                args, kwargs = record.arguments(method, args, kwargs, tape)
            record.depth += 1
            try:
                output = method(*args, **kwargs)
            finally:
                record.depth -= 1
            if record.depth == 0:
                record.calls += 1
                if record.calls == 1:
                    chosen = output
                    index = record.index
                    if index is not None and isinstance(output, list | tuple):
                        chosen = output[index]
                    if not isinstance(chosen, list | tuple | dict):
                        tape.watch(chosen)
                    record.output = chosen
                    replace = getattr(record, "replace", None)
                    if replace is not None:  # outputs_from_layer: swap the output
                        if chosen is output:
                            return replace(output)
                        items = list(output)
                        items[index] = replace(chosen)
                        return tuple(items) if isinstance(output, tuple) else items
                return record.returned(output)
            return output

        return recording_call

    def shadow(self) -> None:
        try:
            for attribute in _CALL_ATTRIBUTES:
                method = getattr(self.layer, attribute, None)
                if method is None:
                    continue
                self.saved.append((attribute, self.layer.__dict__.get(attribute, _MISSING)))
                object.__setattr__(self.layer, attribute, self.wrap(method))
        except BaseException:
            _restore(self.layer, self.saved)
            raise


def _install(layer: Any, record: _Record, tape: Any) -> Any:
    """Record ``layer``'s output in this thread onto ``tape``; return the undo function."""
    with _TAPS_LOCK:
        tap = _TAPS.get(id(layer))
        if tap is None or tap.layer is not layer:
            tap = _LayerTap(layer)
            tap.shadow()
            _TAPS[id(layer)] = tap
        tap.users += 1
    previous = getattr(tap.local, "active", None)
    tap.local.active = (record, tape)

    def undo() -> None:
        tap.local.active = previous
        with _TAPS_LOCK:
            tap.users -= 1
            if tap.users == 0:
                _restore(layer, tap.saved)
                if _TAPS.get(id(layer)) is tap:
                    del _TAPS[id(layer)]

    return undo


# --- the compiled path ----------------------------------------------------------------

#: Kinds of compiled function whose graph depends on the bound layer (and its output index).
_LAYER_KINDS = ("gradients", "outputs_from_layer")


class _Functions:
    """The compiled functions of one model, shared by every bound model of it.

    Keyed by what shapes the graph: the kind of computation, the layer and its output
    index (for kinds that capture a layer), the target mode, the class score
    (``Targets.score``), the output choice and, for a target function, the function object
    (held weakly). TensorFlow keys each function's
    traces by the input signature, including the ``(N, T)`` shape of the class ids. A key
    whose call failed compiled and worked eagerly maps to the reason, and runs eagerly.
    The model and the target functions are held weakly; see :func:`_functions_of`.
    """

    def __init__(self, model: Any) -> None:
        self.model = weakref.ref(model)
        self.trace_count = 0
        self._lock = threading.Lock()
        self._table: dict[tuple[Any, ...], Any] = {}
        #: a target function -> its own table (empty after its first, eager, call).
        self._by_function: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Any]] = (
            weakref.WeakKeyDictionary()
        )
        #: id -> layer, so that an id in a key cannot be reused while the model lives.
        self._layers: dict[int, Any] = {}

    def get(
        self,
        bound: TensorFlowBoundModel,
        kind: str,
        mode: str | None,
        output: int | str | None,
        score_fn: Callable[[Any], Any] | None,
        score: str = "output",
    ) -> tuple[Any, tuple[Any, ...] | None, str]:
        """``(function, key, "")``, or ``(None, key or None, why the call runs eagerly)``.

        ``score`` is ``Targets.score``: the class scores a gradients graph picks from.
        """
        layer = (id(bound.layer), bound.output_index) if kind in _LAYER_KINDS else None
        key = (kind, layer, mode, output, score)
        with self._lock:
            table = self._table
            if score_fn is not None:
                try:
                    found = self._by_function.get(score_fn)
                    if found is None:
                        self._by_function[score_fn] = {}
                        return (
                            None,
                            None,
                            (
                                "first call with this target function (compiled from its second "
                                "call on)"
                            ),
                        )
                except TypeError:  # not hashable or not weakly referenceable
                    return None, None, "a target function that cannot be weakly referenced"
                table = found
            entry = table.get(key)
            if entry is None:
                if layer is not None:
                    self._layers[id(bound.layer)] = bound.layer
                entry = table[key] = self._compile(bound, kind, mode, output, score_fn, score)
        if isinstance(entry, str):
            return None, (*key, score_fn), entry
        return entry, (*key, score_fn), ""

    def refuse(self, key: tuple[Any, ...], reason: str) -> None:
        """Run ``key`` eagerly from now on, saying ``reason``."""
        *rest, score_fn = key
        with self._lock:
            table = self._table if score_fn is None else self._by_function.get(score_fn)
            if table is not None:
                table[tuple(rest)] = reason

    def counted(self) -> None:
        """Count one trace (called while tracing)."""
        with self._lock:
            self.trace_count += 1

    def _compile(
        self,
        bound: TensorFlowBoundModel,
        kind: str,
        mode: str | None,
        output: int | str | None,
        score_fn: Callable[[Any], Any] | None,
        score: str,
    ) -> Any:
        import tensorflow as tf

        traced: Callable[..., Any]
        this = weakref.ref(self)
        if kind in ("gradients", "guided"):
            assert mode is not None
            traced = _traced_gradients(
                this,
                None if kind == "guided" else bound.layer,
                bound.layer_name,
                bound.output_index,
                mode,
                output,
                None if score_fn is None else weakref.ref(score_fn),
                score,
            )
        elif kind == "outputs":
            traced = _traced_outputs(this, output)
        else:
            traced = _traced_outputs_from_layer(
                this, bound.layer, bound.layer_name, bound.output_index, output
            )
        # No AutoGraph: Keras does not convert a model's call either, so a model traces
        # here exactly when it traces under Keras' own compiled predict.
        function = tf.function(traced, autograph=False, reduce_retracing=False)
        # A new input shape, mode or output choice traces by design; TensorFlow's warning
        # about frequent retracing would send the user to code they did not write.
        function._omit_frequent_tracing_warning = True
        return function


_FUNCTIONS_LOCK = threading.Lock()
#: id(model) -> its compiled functions, while the model lives.
_FUNCTIONS: dict[int, _Functions] = {}


def _functions_of(model: Any) -> _Functions:
    """The compiled functions of ``model``, created on first use, dropped with the model."""
    with _FUNCTIONS_LOCK:
        functions = _FUNCTIONS.get(id(model))
        if functions is None or functions.model() is not model:
            functions = _FUNCTIONS[id(model)] = _Functions(model)
            weakref.finalize(model, _forget_functions, id(model), weakref.ref(functions))
        return functions


def _forget_functions(model_id: int, functions: weakref.ref[_Functions]) -> None:
    with _FUNCTIONS_LOCK:
        if _FUNCTIONS.get(model_id) is functions():
            del _FUNCTIONS[model_id]


def _traced_gradients(
    functions: weakref.ref[_Functions],
    layer: Any,
    layer_name: str,
    index: int | None,
    mode: str,
    output: int | str | None,
    score_fn: weakref.ref[Callable[[Any], Any]] | None,
    score: str = "output",
) -> Callable[[Any, Any], dict[str, Any]]:
    """What a compiled (guided, if ``layer`` is None) gradients function traces.

    The traced graph returns float32 ``gradients`` (N, T, ...), ``scores`` (N, T),
    ``outputs``, and ``activations`` (the layer's output), ``ids`` (the class ids it
    chose, for the predicted class and ``"all"``), or for guided backpropagation ``relus``
    and ``kinds`` (the ReLUs it guided and the other nonlinearities' kinds: constants of
    the trace). ``score`` is ``Targets.score`` (see :func:`_class_scores`). Any failure
    raises; the caller then runs the call eagerly.
    """
    import tensorflow as tf

    def trace(x: Any, classes: Any) -> dict[str, Any]:
        owner = functions()
        model = None if owner is None else owner.model()
        assert owner is not None and model is not None  # the caller holds both
        owner.counted()
        record = _Record(index)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            if layer is None:
                tape.watch(x)
                restore, stats = _install_guided(model)
            else:
                restore = _install(layer, record, tape)
            try:
                outputs = model(x, training=False)
            finally:
                restore()
            source = x if layer is None else _recorded_output(record, layer_name, traced=True)
            outputs = _chosen_tensor(outputs, output)
            scores, ids = _traced_scores(outputs, mode, classes, score_fn, score)
            columns = tf.unstack(scores, axis=1) if scores.shape[1] > 1 else [scores]
        gradients = _backward(tape, scores, columns, source, layer_name)
        result = {
            "gradients": tf.cast(gradients, tf.float32),
            "scores": tf.cast(scores, tf.float32),
            "outputs": tf.cast(outputs, tf.float32),
        }
        if ids is not None:
            result["ids"] = ids
        if layer is None:
            result["relus"] = tf.constant(stats.relus, tf.int64)
            result["kinds"] = tf.constant(sorted(stats.kinds), tf.string, shape=(len(stats.kinds),))
        else:
            result["activations"] = tf.cast(source, tf.float32)
        return result

    return trace


def _traced_outputs(
    functions: weakref.ref[_Functions], output: int | str | None
) -> Callable[[Any], Any]:
    """What a compiled :meth:`TensorFlowBoundModel.outputs` traces: float32 outputs."""
    import tensorflow as tf

    def trace(x: Any) -> Any:
        owner = functions()
        model = None if owner is None else owner.model()
        assert owner is not None and model is not None
        owner.counted()
        return tf.cast(_chosen_tensor(model(x, training=False), output), tf.float32)

    return trace


def _traced_outputs_from_layer(
    functions: weakref.ref[_Functions],
    layer: Any,
    layer_name: str,
    index: int | None,
    output: int | str | None,
) -> Callable[[Any, Any], Any]:
    """What a compiled ``outputs_from_layer`` traces: the replacement is an argument."""
    import tensorflow as tf

    def trace(x: Any, replacement: Any) -> Any:
        owner = functions()
        model = None if owner is None else owner.model()
        assert owner is not None and model is not None
        owner.counted()
        record = _ReplacingRecord(_replacer(replacement, layer_name), index)
        restore = _install(layer, record, _NoTape())
        try:
            outputs = model(x, training=False)
        finally:
            restore()
        _recorded_output(record, layer_name, traced=True)  # the layer ran exactly once
        return tf.cast(_chosen_tensor(outputs, output), tf.float32)

    return trace


def _traced_scores(
    outputs: Any,
    mode: str,
    classes: Any,
    score_fn: weakref.ref[Callable[[Any], Any]] | None,
    score: str = "output",
) -> tuple[Any, Any]:
    """``(N, T)`` scores and, for the predicted class and ``"all"``, the class ids chosen.

    Explicit class ids are clipped to the output's classes so that the graph never fails
    on them; the caller validates them against the output's shape afterwards (the
    TargetError of the eager path). ``score`` is ``Targets.score`` (see
    :func:`_class_scores`); the predicted class is the arg-max of the raw outputs.
    """
    import tensorflow as tf

    n = outputs.shape[0]
    if mode == "score" and score != "output":
        raise TargetError(f"score={score!r} needs class targets, not a target function")
    if mode == "score":
        fn = None if score_fn is None else score_fn()
        assert fn is not None  # the caller holds the target function
        scores = tf.convert_to_tensor(fn(outputs))
        if tuple(scores.shape) != (n,):
            raise TargetError(f"the target function returned shape {tuple(scores.shape)}")
        return scores[:, None], None
    if outputs.shape.rank != 2:
        raise TargetError(f"class targets need (N, C) outputs, got {tuple(outputs.shape)}")
    num_classes = int(outputs.shape[1])
    ids = None
    if mode == "predicted":
        ids = tf.argmax(outputs, axis=1, output_type=tf.int64)[:, None]
        chosen = ids
    elif mode == "all":
        ids = tf.tile(tf.range(num_classes, dtype=tf.int64)[None], [tf.shape(outputs)[0], 1])
        chosen = ids
    else:
        chosen = tf.clip_by_value(classes, 0, num_classes - 1)
    return tf.gather(_class_scores(outputs, score), chosen, axis=1, batch_dims=1), ids


def _class_tensor(targets: Targets) -> Any:
    """The class ids a compiled gradients function takes: ``(N, T)`` int64, or None."""
    if targets.kind != "classes":
        return None
    import tensorflow as tf

    return tf.constant(targets.classes, tf.int64)


def _class_ids(targets: Targets, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The ``(N, T)`` class ids of a compiled call, validated as on the eager path."""
    if targets.kind == "score":
        return None
    if targets.kind == "classes":
        return targets.class_ids(arrays["outputs"].shape)  # TargetError if out of range
    return arrays["ids"].astype(np.int64)


def _numpy(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    """The traced function's results as read-only NumPy views of their buffers.

    No copy: ten targets' gradients are tens of MB (JAX's results are read-only views too).
    """
    return {name: np.asarray(tensor) for name, tensor in tensors.items()}


def _input_shape(x: Any) -> tuple[int, ...]:
    """The shape of the (first) input tensor."""
    import tensorflow as tf

    return tuple(int(d) for d in tf.nest.flatten(x)[0].shape)


def _keras_scope() -> str | None:
    """A Keras scope that makes a traced graph wrong (it maps variables), if one is active.

    Inside a ``keras.StatelessScope`` (e.g. a randomised copy of the model, see
    ``randomized``) variables read values from the scope, which a trace would freeze into
    a graph shared with calls outside it.
    """
    try:  # Keras exports the scopes but not these queries
        from keras.src import backend as keras_backend
    except ImportError:
        return "Keras scope that multicam cannot query"
    for name, query in (
        ("keras.StatelessScope", "in_stateless_scope"),
        ("keras.SymbolicScope", "in_symbolic_scope"),
    ):
        active = getattr(keras_backend, query, None)
        if active is None or active():
            return name
    return None


def _first_line(exc: BaseException) -> str:
    line = (str(exc).strip().splitlines() or [""])[0]
    return line if len(line) <= 200 else line[:197] + "..."


# --- shared by both paths -------------------------------------------------------------


def _recorded_output(record: _Record, layer_name: str, *, traced: bool) -> Any:
    """The bound layer's output from one forward, checked to be called once.

    ``traced``: the forward ran while a ``tf.function`` was traced, so the output must be
    a tensor of the graph being traced (not of a ``tf.function`` inside the model).
    """
    import tensorflow as tf

    if record.calls == 0:
        raise LayerError(
            f"layer {layer_name!r} was not called during the model's forward pass, "
            "so it has no activations: choose a layer the forward actually uses (a "
            "model whose call runs inside tf.function is not supported; call it eagerly)."
        )
    if record.calls > 1:
        raise LayerError(
            f"layer {layer_name!r} was called {record.calls} times in one forward "
            "pass (a shared or reused layer), so its activations are ambiguous; choose a "
            "layer that is called exactly once, e.g. the one right after it."
        )
    output = record.output
    if not isinstance(output, tf.Tensor) or isinstance(output, tf.SparseTensor):
        raise LayerError(
            f"layer {layer_name!r} returned {type(output).__name__}, not a single "
            "dense tensor; choose a layer with one tensor output."
        )
    if traced:
        graph = getattr(output, "graph", None)
        inside = graph is not None and graph is tf.compat.v1.get_default_graph()
    else:
        inside = tf.executing_eagerly() and hasattr(output, "numpy")
    if not inside:
        raise BackendError(
            f"layer {layer_name!r} ran inside a traced tf.function; multicam needs "
            "the model to run eagerly."
        )
    return output


def _chosen_tensor(outputs: Any, output: int | str | None) -> Any:
    """The chosen one of a model's outputs (see ``select_output``) as one tensor."""
    import tensorflow as tf

    outputs = select_output(outputs, output)
    if isinstance(outputs, list | tuple | dict):
        raise TargetError(
            f"the chosen output is a {type(outputs).__name__}, not a tensor; choose a "
            "tensor output with output=."
        )
    return tf.convert_to_tensor(outputs)


def _replacer(replacement: Any, layer_name: str) -> Callable[[Any], Any]:
    """``outputs_from_layer``'s swap: the layer's output for ``replacement`` (same shape)."""
    import tensorflow as tf

    def replace(output: Any) -> Any:
        if not isinstance(output, tf.Tensor) or tuple(output.shape) != tuple(replacement.shape):
            shape = tuple(output.shape) if isinstance(output, tf.Tensor) else output
            raise InputError(
                f"the replacement activations have shape {tuple(replacement.shape)} but "
                f"layer {layer_name!r} outputs {shape} on this input."
            )
        return tf.cast(replacement, output.dtype)

    return replace


def _backward(tape: Any, scores: Any, columns: list[Any], activations: Any, layer_name: str) -> Any:
    """``(N, T, *layer_shape)`` gradients of ``scores`` (N, T) w.r.t. the activations.

    Every tensor differentiated here was computed inside the tape: ``scores`` and its
    per-target ``columns`` (N,). Up to 16 targets, one backward per target over the same
    tape (the forward pass is shared); above, pfor's vectorised batch Jacobian, falling
    back to the loop where pfor cannot vectorise an op.
    """
    import tensorflow as tf

    if len(columns) == 1:
        gradients = tape.gradient(scores, activations)
        if gradients is None:
            raise _disconnected(layer_name)
        return gradients[:, None]
    if len(columns) > _PFOR_FROM_TARGETS:
        try:
            gradients = tape.batch_jacobian(scores, activations, experimental_use_pfor=True)
        except Exception:  # pfor cannot vectorise some op: one backward per target
            gradients = None
        if gradients is not None:
            return gradients
    rows = [tape.gradient(column, activations) for column in columns]
    if any(row is None for row in rows):
        raise _disconnected(layer_name)
    return tf.stack(rows, axis=1)


def _backward_all(
    tape: Any, scores: Any, columns: list[Any], sources: list[Any], layer_names: list[str]
) -> list[Any]:
    """``(N, T, *source_shape)`` gradients of ``scores`` (N, T) w.r.t. each of ``sources``.

    Like :func:`_backward`, for several tensors of one forward: up to 16 targets, one
    backward pass per target differentiates all of them at once; above, pfor's batch
    Jacobian per tensor. ``layer_names`` name the sources in order; a source beyond them
    is the model's input.
    """
    import tensorflow as tf

    names = [*layer_names, *(["the input"] * (len(sources) - len(layer_names)))]
    if len(columns) > _PFOR_FROM_TARGETS:
        return [
            _backward(tape, scores, columns, source, name)
            for source, name in zip(sources, names, strict=True)
        ]
    rows = [tape.gradient(column, sources) for column in columns]
    for i, name in enumerate(names):
        if rows[0][i] is None:
            if i >= len(layer_names):
                raise InputError(
                    "the target scores do not depend on the input, so there are no input "
                    "gradients; check the target (a callable target must use the outputs)."
                )
            raise _disconnected(name)
    return [tf.stack([row[i] for row in rows], axis=1) for i in range(len(sources))]


def _checked_outputs(outputs: np.ndarray) -> np.ndarray:
    """The model's outputs, or :class:`NonFiniteError` if they hold NaN or Inf."""
    check_finite(outputs, "the model's outputs")
    return outputs


def _float32(tensor: Any, what: str) -> np.ndarray:
    """``tensor`` as float32 NumPy, or :class:`NonFiniteError` naming ``what``."""
    import tensorflow as tf

    array = tf.cast(tensor, tf.float32).numpy()
    check_finite(array, what)
    return array


def _check_differentiable_input(x: Any, what: str) -> None:
    """Raise :class:`InputError` unless ``x`` is one floating-point tensor ``what`` can use."""
    import tensorflow as tf

    if not isinstance(x, tf.Tensor):
        raise InputError(
            f"{what} differentiates one input tensor; this model takes several inputs."
        )
    if not x.dtype.is_floating:
        raise InputError(
            f"{what} differentiates the input, which has dtype {x.dtype.name}; pass "
            "floating-point input."
        )


def _disconnected(layer_name: str) -> LayerError:
    return LayerError(
        f"the target scores do not depend on the output of layer {layer_name!r}; "
        "choose a layer on the path to the model's output (and a target function that "
        "uses the outputs)."
    )


def _restore(layer: Any, saved: list[tuple[str, Any]]) -> None:
    for attribute, original in reversed(saved):
        if original is _MISSING:
            object.__delattr__(layer, attribute)
        else:
            object.__setattr__(layer, attribute, original)


def _children(layer: Any) -> list[Any]:
    """The direct sub-layers of ``layer``, without input layers.

    For a functional model, every operation of its graph in topological order: its
    Layers and the operations that are not Layers (``x + skip``, ``keras.ops.*`` on
    KerasTensors).
    """
    import keras

    operations = getattr(layer, "operations", None) if isinstance(layer, keras.Model) else None
    if isinstance(operations, list):  # a functional model: its graph's operations
        children = operations
    elif isinstance(layer, keras.Model):
        children = list(layer.layers)
    elif not isinstance(layer, keras.layers.Layer):  # an operation that is not a Layer
        children = []
    else:
        try:
            children = list(layer._flatten_layers(include_self=False, recursive=False))
        except (AttributeError, TypeError):
            children = []
    return [child for child in children if not isinstance(child, keras.layers.InputLayer)]


def _named_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """``(path, layer)`` for every layer under ``model``, parents before children.

    Includes the operations of functional models that are not Layers (see
    :func:`_children`), so they can be chosen by name like layers.
    """
    seen: set[int] = {id(model)}

    def walk(layer: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + child.name
            yield path, child
            yield from walk(child, path + "/")

    yield from walk(model, "")


def _resolve_layer(
    model: Any, layer: Any, named: list[tuple[str, Any]]
) -> tuple[str, Any, int | None]:
    """Find ``layer`` among ``named``: its path, the layer or operation, its output index.

    ``layer`` is a path, a bare name, a Layer, an operation of a functional graph, or a
    ``KerasTensor`` (the output of one of those; the index picks it when the operation
    returns several).
    """
    import keras

    paths = [path for path, _ in named]
    index = None
    if isinstance(layer, keras.KerasTensor):
        layer, index = _tensor_operation(layer, paths)
    if isinstance(layer, keras.Operation):
        for path, candidate in named:
            if candidate is layer:
                return _indexed(path, candidate, index)
        name = str(getattr(layer, "name", ""))
        if layer is model:
            raise LayerError(
                "the chosen layer is the model itself, whose output has no spatial "
                "dimensions; choose one of its layers, e.g. " + nearest_names(name, paths)
            )
        kind = "layer" if isinstance(layer, keras.layers.Layer) else "operation"
        raise LayerError(
            f"the {kind} object {name!r} is not part of this model (not one of its layers "
            f"nor an operation of its graph). Layers and operations of the model include: "
            f"{nearest_names(name, paths)}."
        )
    if not isinstance(layer, str):
        raise LayerError(
            f"layer must be a layer or operation name, a path such as 'block2/conv1', a "
            f"Keras layer or operation object, or a KerasTensor of the model's graph; got "
            f"{type(layer).__name__}."
        )
    for candidate in (layer, layer.replace(".", "/")):
        exact = [(path, obj) for path, obj in named if path == candidate]
        if len(exact) == 1:
            return exact[0][0], exact[0][1], None
        if len(exact) > 1:
            raise LayerError(
                f"layer name {layer!r} names {len(exact)} different layers or operations of "
                "the model; pass the layer object, or a KerasTensor of its output, instead."
            )
    leaf = layer.replace(".", "/").rsplit("/", 1)[-1] if "/" not in layer else None
    if leaf is not None:
        matches = [(path, obj) for path, obj in named if path.rsplit("/", 1)[-1] == leaf]
        if len(matches) == 1:
            return matches[0][0], matches[0][1], None
        if len(matches) > 1:
            raise LayerError(
                f"layer name {layer!r} is ambiguous: it matches "
                + ", ".join(repr(path) for path, _ in matches)
                + "; pass the full path."
            )
    if not paths:
        raise LayerError(
            f"no layer {layer!r}: the model has no named sub-layers (Keras tracks layers "
            "assigned as attributes of a subclassed model)."
        )
    raise LayerError(
        f"no layer {layer!r} in model {getattr(model, 'name', '')!r} (neither a layer nor "
        f"an operation of its graph, such as a residual 'add'); nested layers are addressed "
        f"by path, e.g. 'block2/conv1'. Did you mean: {nearest_names(layer, paths)}?"
    )


def _tensor_operation(tensor: Any, paths: list[str]) -> tuple[Any, int | None]:
    """The operation that computed a ``KerasTensor`` and which of its outputs it is."""
    import keras

    history = getattr(tensor, "_keras_history", None)
    name = str(getattr(tensor, "name", ""))
    if history is None:
        raise LayerError(
            f"the KerasTensor {name!r} was not computed by a layer or operation of a "
            "functional graph (it has no Keras history); pass a KerasTensor returned by a "
            "layer or operation of the model, or a layer name such as " + nearest_names(name, paths)
        )
    operation, node_index, tensor_index = history
    if isinstance(operation, keras.layers.InputLayer):
        raise LayerError(
            f"the KerasTensor {name!r} is an input of the model, not the output of one of "
            "its layers; choose a layer's output (guided backpropagation explains the input "
            "itself)."
        )
    try:
        outputs = operation._inbound_nodes[node_index].outputs
    except (AttributeError, IndexError, TypeError):
        outputs = (tensor,)
    return operation, (int(tensor_index) if len(outputs) > 1 else None)


def _indexed(path: str, operation: Any, index: int | None) -> tuple[str, Any, int | None]:
    """The resolved layer; an output of a several-output operation is named ``path[i]``."""
    return (path if index is None else f"{path}[{index}]"), operation, index


def _layout_of(layer: Any, named: list[tuple[str, Any]]) -> Layout:
    """The channel layout of ``layer``'s output, from the nearest ``data_format``."""
    import keras

    own = getattr(layer, "data_format", None)
    if own in ("channels_last", "channels_first"):
        return own
    formats = [(path, getattr(obj, "data_format", None)) for path, obj in named]
    index = next(i for i, (_, obj) in enumerate(named) if obj is layer)
    prefix = named[index][0] + "/"
    inside = [fmt for path, fmt in formats if path.startswith(prefix)]
    before = [fmt for _, fmt in reversed(formats[:index])]
    for fmt in [*reversed(inside), *before]:
        if fmt in ("channels_last", "channels_first"):
            return fmt
    return keras.config.image_data_format()


def _declared_input(model: Any) -> tuple[tuple[int | None, ...], Any] | None:
    """The shape and dtype of the model's single declared input, if it has one."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not isinstance(inputs, list | tuple) or len(inputs) != 1:
        return None
    shape = getattr(inputs[0], "shape", None)
    if shape is None:
        return None
    return tuple(None if d is None else int(d) for d in shape), getattr(inputs[0], "dtype", None)


# --- guided backpropagation -----------------------------------------------------------

_GUIDED_LOCK = threading.Lock()
_GUIDED_LOCAL = threading.local()
#: (id(layer), attribute) -> [layer, saved attribute, users, wrapper], while installed.
_GUIDED_PATCHES: dict[tuple[int, str], list[Any]] = {}


def _target_scores(outputs: Any, targets: Targets, layout: Layout) -> tuple[Any, Any]:
    """``(N, T)`` scores of ``outputs`` for ``targets`` and their class ids (or None).

    Called inside the gradient tape, so the scores are differentiable.
    """
    import tensorflow as tf

    n = int(outputs.shape[0])
    if targets.kind in ("score", "region") and targets.score == "rest":
        what = "a callable target" if targets.kind == "score" else "mc.Region targets"
        raise TargetError(
            f"score='rest' is a score of (N, C) class outputs; {what} cannot use it: "
            "pass class targets (None, ints, 'all'), or compute the score in the callable."
        )
    if targets.kind == "score":
        assert targets.score_fn is not None
        scores = tf.convert_to_tensor(targets.score_fn(outputs))
        if tuple(scores.shape) != (n,):
            raise TargetError(
                f"the target score function returned shape {tuple(scores.shape)} for a batch "
                f"of {n}; it must return one score per sample, shape ({n},)."
            )
        return scores[:, None], None
    if targets.kind == "region":
        class_axis = 1 if layout == "channels_first" else -1
        weights = targets.output_weights(tuple(outputs.shape), class_axis)
        weighted = outputs[:, None] * tf.cast(weights, outputs.dtype)
        scores = tf.reduce_sum(tf.reshape(weighted, (*weights.shape[:2], -1)), -1)
        return scores, targets.class_ids(tuple(outputs.shape))
    values = tf.cast(outputs, tf.float32).numpy()
    class_ids = targets.class_ids(tuple(outputs.shape), values)
    scores = _class_scores(outputs, targets.score)
    return tf.gather(scores, class_ids, axis=1, batch_dims=1), class_ids


def _class_scores(outputs: Any, score: str) -> Any:
    """The ``(N, C)`` class scores the targets pick from: the outputs, or ShapleyCAM's.

    ``score == "rest"``: ``2 z - logsumexp(z)`` over the classes of ``(N, C)`` outputs
    ``z`` (see :func:`multicam.targets.rest_scores`); its arg-max is the outputs' own, so
    the predicted class is taken from the raw outputs. Differentiable; also traced.
    """
    import tensorflow as tf

    if score == "output":
        return outputs
    if score != "rest":
        raise TargetError(f"score={score!r} is not understood; use 'output' or 'rest'.")
    if outputs.shape.rank != 2:
        raise TargetError(
            f"score='rest' needs (N, C) class scores; the model's output has shape "
            f"{tuple(outputs.shape)}."
        )
    return 2 * outputs - tf.reduce_logsumexp(outputs, axis=1, keepdims=True)


def _guided_gate(y: Any) -> Any:
    """Identity forward; backward lets only positive gradients through."""
    import tensorflow as tf

    @tf.custom_gradient
    def gate(y: Any) -> Any:
        def grad(dy: Any) -> Any:
            return tf.nn.relu(dy)

        return tf.identity(y), grad

    return gate(y)


class _GuidedStats:
    """What one guided forward ran through: ReLUs guided, other nonlinearities' kinds."""

    def __init__(self) -> None:
        self.relus = 0
        self.kinds: set[str] = set()


def _guided_wrap(method: Any, kind: str | None) -> Any:
    """``method`` gated (``kind`` None: a ReLU), or noted as an unguided ``kind``.

    Acts only for the thread whose guided forward is running (its ``_GUIDED_LOCAL.stats``).
    """
    import tensorflow as tf

    def guided(*args: Any, **kwargs: Any) -> Any:
        out = method(*args, **kwargs)
        stats = getattr(_GUIDED_LOCAL, "stats", None)
        if stats is None:
            return out
        if kind is not None:
            stats.kinds.add(kind)
        elif isinstance(out, tf.Tensor):
            stats.relus += 1
            return _guided_gate(out)
        return out

    return guided


def _relu_functions() -> set[int]:
    import keras
    import tensorflow as tf

    return {
        id(f)
        for f in (
            keras.activations.relu,
            keras.activations.relu6,
            keras.ops.relu,
            keras.ops.relu6,
            tf.nn.relu,
            tf.nn.relu6,
        )
    }


def _guided_sites(model: Any) -> list[tuple[Any, str, str | None]]:
    """``(layer, attribute, kind)`` to shadow: kind None for a ReLU to guide.

    ReLUs: ``keras.layers.ReLU`` without a negative slope, a ``relu``/``relu6``
    ``activation`` attribute (Dense, Conv, Activation), and ReLU operations of functional
    graphs (``keras.ops.relu`` on a KerasTensor). Other nonlinearities (by their
    ``activation`` function's or their class's name) are only noted when they run.
    """
    import keras

    relus = _relu_functions()
    sites: list[tuple[Any, str, str | None]] = []
    for layer in [model, *(layer for _, layer in _named_layers(model))]:
        activation = layer.__dict__.get("activation")  # a property (LSTM) is not patched
        if isinstance(layer, keras.layers.Layer) and callable(activation):
            if id(activation) in relus:
                sites.append((layer, "activation", None))
            elif kind := nonlinearity_kind(getattr(activation, "__name__", "")):
                sites.append((layer, "activation", kind))
            continue
        name = type(layer).__name__.lower()
        ours = type(layer).__module__.split(".", 1)[0] == "keras"
        if ours and name in ("relu", "relu6"):  # keras.layers.ReLU, ReLU operations
            slope = getattr(layer, "negative_slope", 0)
            kind = "LeakyReLU" if float(slope or 0) else None
            sites.append((layer, "call", kind))
        elif kind := nonlinearity_kind(name):  # also a user's own GELU layer: noted only
            sites.append((layer, "call", kind))
    return sites


def _install_guided(model: Any) -> tuple[Any, _GuidedStats]:
    """Shadow the ReLUs of ``model`` with guided ones for this thread.

    Returns the undo function and the statistics the forward fills in.
    """
    found = _guided_sites(model)
    installed: list[tuple[int, str]] = []

    def release() -> None:  # under _GUIDED_LOCK
        for key in reversed(installed):
            entry = _GUIDED_PATCHES[key]
            entry[2] -= 1
            if entry[2] == 0:
                layer, saved, _, wrapper = entry
                if layer.__dict__.get(key[1]) is wrapper:  # still ours: put it back
                    _restore(layer, [(key[1], saved)])
                del _GUIDED_PATCHES[key]
        installed.clear()

    with _GUIDED_LOCK:
        try:
            for layer, attribute, kind in found:
                key = (id(layer), attribute)
                entry = _GUIDED_PATCHES.get(key)
                if entry is None or entry[0] is not layer:
                    saved = layer.__dict__.get(attribute, _MISSING)
                    wrapper = _guided_wrap(getattr(layer, attribute), kind)
                    object.__setattr__(layer, attribute, wrapper)
                    entry = _GUIDED_PATCHES[key] = [layer, saved, 0, wrapper]
                entry[2] += 1
                installed.append(key)
        except BaseException:
            release()
            raise
    stats = _GuidedStats()
    previous = getattr(_GUIDED_LOCAL, "stats", None)
    _GUIDED_LOCAL.stats = stats

    def undo() -> None:
        _GUIDED_LOCAL.stats = previous
        with _GUIDED_LOCK:
            release()

    return undo, stats
