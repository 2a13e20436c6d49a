"""JAX/Flax backend: layer activations, their gradients and the target scores.

Its one job is to return, as NumPy arrays, the activations of one layer of a JAX model,
the gradients of the target scores with respect to them, and the scores (or, for
``algebra="native"``, :meth:`JaxBoundModel.native_gradients`: the same as float32 JAX
arrays on their device, for :mod:`multicam.xp`). Three kinds of model:

- a Flax linen module with its ``variables=``; the layer is a module path such as
  ``"features/conv3"`` (that submodule's ``__call__`` output, caught with
  ``nn.intercept_methods``) or a value the model marks with ``self.perturb(name, x)``
  (``"features/relu4"``: perturbation ``relu4`` of module ``features``);
- a Flax nnx module; the layer is a dotted attribute path such as ``"features.relu4"``;
- a ``(features, head)`` pair of functions, ``features(x) -> A`` and ``head(A) -> outputs``,
  with ``layer=None`` and ``backend="jax"``.

Mechanism: one jitted function computes ``A`` (the model run with the layer's output
recorded), then ``outputs, vjp = jax.vjp(head_from_layer, A)`` where ``head_from_layer``
runs the model with the layer's output replaced by ``A`` (XLA removes the dead computation
below the layer; skip connections from below still see the real input), and ``jax.vmap``
of ``vjp`` over T one-hot cotangents: one forward pass and one batched backward pass per
call, whatever T, and nothing below the layer is differentiated. The compiled function is
cached per bound model and input shape; class ids are an array argument, so new target
classes at the same shapes do not recompile, and the arg-max for the predicted class runs
inside it.

Optional capabilities: :meth:`JaxBoundModel.hessian_vector_products` (ShapleyCAM:
forward-over-reverse on the head, for all three kinds), ``bias_layers`` and
:meth:`JaxBoundModel.tensor_gradients` (FullGrad, LeGrad: every named layer's output, or a
multi-head attention's per-head probabilities, passes on ``tensor + delta`` with zero
deltas as arguments, and one batched ``jax.vjp`` w.r.t. the deltas gives all the gradients;
linen and nnx only). ``Targets.score == "rest"`` differentiates ``2 z - logsumexp(z)`` of
the ``(N, C)`` outputs; the score kind is a static argument, so each kind compiles once.

Constraints: the global JAX configuration is never changed (no ``jax_enable_x64``); the
user's variables and nnx module are never mutated (nnx runs on a merged copy of its split
state); results are float32 whatever the model computes in; inputs are channels-last.

Training mode: the model is explained as it predicts. An nnx module left in train mode
(``deterministic=False``, ``use_running_average=False``) runs with those switched on the
copy; a linen ``__call__`` argument ``train``/``training`` defaulting to True, or
``deterministic``/``use_running_average`` defaulting to False, is passed its inference
value unless ``apply_kwargs`` sets it. What was switched is reported in
``LayerGradients.training``.

Threads: the computation is a pure function of the model's state and the input, so
several threads may explain one model at once. Errors: a forward that fails inside
JAX/Flax (e.g. parameters whose shapes do not fit the input) raises
:class:`~multicam.errors.InputError` ``from`` the framework's exception; an exception raised
by the user's own code propagates unchanged, with a note.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import sys
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import (
    BackendError,
    InputError,
    LayerError,
    TargetError,
    UnsupportedModelError,
    nearest_names,
)
from ..targets import Region, Targets, select_output
from ..xp import make_layer_gradients as native_layer_gradients
from .base import (
    Backend,
    BoundModel,
    LayerGradients,
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

__all__ = [
    "FunctionPairBoundModel",
    "JaxBackend",
    "JaxBoundModel",
    "LinenBoundModel",
    "NnxBoundModel",
]


def _linen_module_class() -> type | None:
    module = sys.modules.get("flax.linen")
    return getattr(module, "Module", None)


def _nnx_module_class() -> type | None:
    module = sys.modules.get("flax.nnx")
    return getattr(module, "Module", None)


class JaxBackend(Backend):
    """Explains Flax linen and nnx modules, and ``(features, head)`` pairs of JAX functions.

    Inputs are channels-last, e.g. NHWC.
    """

    name = "jax"
    extra = "jax"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        if "flax" not in sys.modules and "jax" not in sys.modules:
            return False
        return any(
            module_class is not None and isinstance(model, module_class)
            for module_class in (_linen_module_class(), _nnx_module_class())
        )

    def bind(self, model: Any, layer: Any, **options: Any) -> JaxBoundModel:
        """Bind ``model`` to ``layer``.

        Args:
            model: a linen module, an nnx module, or a ``(features, head)`` pair.
            layer: a linen module path or perturbation path (``"features/relu4"``), an nnx
                attribute path (``"features.relu4"``), or ``None`` for a function pair.
            **options: ``variables`` (required for linen: the dict passed to ``apply``) and
                ``apply_kwargs`` (linen only: extra keyword arguments for ``apply``, e.g.
                ``{"train": False}``).

        Raises:
            LayerError: the layer does not exist (the message names the nearest paths).
            BackendError: an option is missing, unknown or does not fit the model.
            UnsupportedModelError: the model is none of the three kinds.
        """
        variables = options.pop("variables", None)
        apply_kwargs = options.pop("apply_kwargs", None)
        if options:
            raise BackendError(
                f"the jax backend takes the options variables= and apply_kwargs=, got "
                f"{sorted(options)}."
            )
        linen_module = _linen_module_class()
        nnx_module = _nnx_module_class()
        if linen_module is not None and isinstance(model, linen_module):
            if variables is None:
                raise BackendError(
                    "a Flax linen module needs its variables: pass variables=... (the dict "
                    "from module.init, with 'params' and any other collections)."
                )
            return LinenBoundModel(model, layer, variables, dict(apply_kwargs or {}))
        if variables is not None or apply_kwargs is not None:
            raise BackendError(
                "variables= and apply_kwargs= are for Flax linen modules only; an nnx module "
                "holds its own state and a (features, head) pair closes over its parameters."
            )
        if nnx_module is not None and isinstance(model, nnx_module):
            return NnxBoundModel(model, layer)
        if isinstance(model, tuple | list) and len(model) == 2 and all(map(callable, model)):
            return FunctionPairBoundModel(model[0], model[1], layer)
        raise UnsupportedModelError(
            f"the jax backend explains Flax linen modules (with variables=), Flax nnx modules "
            f"and (features, head) pairs of JAX functions, got {type(model).__module__}."
            f"{type(model).__qualname__}."
        )


class _ById:
    """Hashes and compares a callable by identity, so that jit can take it as static."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ById) and other.fn is self.fn


class JaxBoundModel(BoundModel):
    """A JAX model bound to one layer; subclasses say how to run it.

    A subclass implements :meth:`_arguments` (the dynamic pytree and the hashable static
    part the jitted function takes, and what it switched to inference mode),
    :meth:`_features` (the layer's output) and
    :meth:`_head` (the model's output with the layer's output replaced); for
    :meth:`tensor_gradients`, also :meth:`_tensor_names` and :meth:`_tapped` (the model run
    with several layers' tensors recorded and shifted by deltas).

    Attributes:
        trace_count: how many times the jitted computation was traced (compiled); for
            tests and diagnostics.
    """

    backend = "jax"
    layout = "channels_last"

    def __init__(self, layer_name: str) -> None:
        self.layer_name = layer_name
        self.trace_count = 0
        self._jitted = jax.jit(self._compute, static_argnames=_STATIC_ARGUMENTS)

    # --- to implement ---------------------------------------------------------------

    def _arguments(self) -> tuple[Any, Hashable, tuple[str, ...]]:
        """The model's dynamic state, its hashable static part, and what they switched.

        The dynamic state is a pytree of arrays; the last item names the parts of the
        model left in training mode that these run in inference mode
        (``LayerGradients.training``).
        """
        return None, None, ()

    def _features(self, dynamic: Any, static: Any, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _head(self, dynamic: Any, static: Any, x: jax.Array, a: jax.Array) -> Any:
        raise NotImplementedError

    def _tensor_names(self, layers: Sequence[str]) -> tuple[str, ...]:
        """``layers`` resolved to the names :meth:`_tapped` takes (duplicates dropped).

        Raises:
            LayerError: a name that is not a layer of the model.
        """
        raise self._lacks("gradients at several layers (tensor_gradients)", "FullGrad and LeGrad")

    def _tapped(
        self,
        dynamic: Any,
        static: Any,
        x: jax.Array,
        names: tuple[str, ...],
        deltas: Mapping[str, jax.Array] | None,
    ) -> tuple[Any, dict[str, Any]]:
        """The model's outputs, and the tensor of each layer in ``names`` as it ran.

        With ``deltas``, each layer passes on ``tensor + deltas[name]`` instead of its
        tensor (a layer's output, or a multi-head attention's per-head probabilities), so
        that the gradient w.r.t. the zero deltas is the gradient w.r.t. the tensors.

        Raises:
            LayerError: a layer that did not run exactly once.
        """
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------

    def _prepare(self, inputs: Any) -> jax.Array | np.ndarray:
        if isinstance(inputs, jax.Array):
            x: Any = inputs
        else:
            x = np.asarray(inputs)
            if not (x.dtype.kind in "biuf" or jnp.issubdtype(x.dtype, jnp.floating)):
                raise InputError(f"the input has dtype {x.dtype}; pass numbers.")
            if x.dtype == np.float64:
                x = x.astype(np.float32)  # what JAX computes in without x64
        if x.ndim < 2:
            raise InputError(
                f"the input has shape {tuple(x.shape)}; pass a batch (N, *spatial, C), "
                "e.g. x[None] for a single sample."
            )
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            check_finite_input(x)
        elif jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.isfinite(x).all()):
            check_finite_input(np.asarray(x, dtype=np.float32))
        return x

    def _forward_errors(self, x: Any, during: str = "") -> contextlib.AbstractContextManager[None]:
        """How a failure of the model's forward on ``x`` reaches the user."""
        shape = tuple(x.shape)
        return forward_errors(
            packages=("jax", "jaxlib", "flax"),
            framework="JAX/Flax",
            input_shape=shape,
            input_dtype=x.dtype,
            expected="channels-last input (N, *spatial, C), e.g. NHWC for 2-D convolutions",
            note=f"multicam: raised by the model's forward on an input of shape {shape}"
            f"{during}; JAX/Flax models take channels-last input (N, *spatial, C), e.g. NHWC "
            "for 2-D convolutions.",
            hint=lambda: _layout_hint(shape),
        )

    def gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        return self._gradients(inputs, targets, native=False)

    def native_gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        """:meth:`gradients` as float32 ``jax.Array`` on the computation's device.

        The native path (``algebra="native"``): only finiteness flags (and, for the
        predicted class, the ``(N, C)`` outputs) go to the host; ``targets`` stays NumPy.
        """
        return self._gradients(inputs, targets, native=True)

    def on_accelerator(self, inputs: Any = None) -> bool:
        """Whether the model's arrays (or else the input, or JAX's default) are off the CPU."""
        leaves = [
            leaf
            for leaf in jax.tree_util.tree_leaves(self._arguments()[0])
            if isinstance(leaf, jax.Array)
        ]
        if leaves:
            platforms = {device.platform for device in leaves[0].devices()}
        elif isinstance(inputs, jax.Array):
            platforms = {device.platform for device in inputs.devices()}
        else:
            platforms = {jax.default_backend()}
        return platforms != {"cpu"}

    def _gradients(self, inputs: Any, targets: Targets, *, native: bool) -> LayerGradients:
        x = self._prepare(inputs)
        classes, masks, score_fn = _target_arguments(targets)
        dynamic, static, training = self._arguments()
        with self._forward_errors(x):
            activations, grads, scores, outputs, traced_ids = self._jitted(
                dynamic,
                x,
                classes,
                masks,
                mode=targets.kind,
                score_fn=score_fn,
                score=targets.score,
                static=static,
                output=targets.output,
            )
        return (native_layer_gradients if native else make_layer_gradients)(
            activations,
            grads,
            scores,
            _class_ids(targets, outputs, traced_ids),
            layout=self.layout,
            input_shape=tuple(x.shape),
            layer_name=self.layer_name,
            outputs=outputs,
            training=training,
        )

    def outputs(self, inputs: Any, output: int | str | None = None) -> np.ndarray:
        """The model's outputs for a batch (jitted, cached per shape), as float32 NumPy.

        ``output`` chooses one of several outputs (see ``select_output``).
        """
        x = self._prepare(inputs)
        return self._run_forward(x, None, output)

    def outputs_from_layer(
        self, inputs: Any, activations: np.ndarray, output: int | str | None = None
    ) -> np.ndarray:
        """The outputs with the layer's output replaced by ``activations`` (M, K, *S).

        Runs :meth:`_head` (jitted, cached per shape); everything below the layer sees
        ``inputs``.
        """
        x = self._prepare(inputs)
        a = replacement_activations(activations, int(x.shape[0]), self.layer_name, self.layout)
        return self._run_forward(x, a, output)

    @functools.cached_property
    def _forward_jitted(self) -> Callable[..., Any]:
        return jax.jit(self._forward, static_argnames=("static", "output"))

    def _run_forward(
        self, x: Any, a: np.ndarray | None, output: int | str | None = None
    ) -> np.ndarray:
        dynamic, static, _ = self._arguments()
        with self._forward_errors(x):
            out = self._forward_jitted(dynamic, x, a, static=static, output=output)
        result = np.asarray(out, dtype=np.float32)
        check_finite(result, "the model's outputs")
        return result

    def _forward(
        self,
        dynamic: Any,
        x: jax.Array,
        a: jax.Array | None,
        *,
        static: Any,
        output: int | str | None = None,
    ) -> Any:
        """Traced under jit: the outputs, with the layer's output replaced by ``a`` if given."""
        real = self._features(dynamic, static, x)  # dead code below the layer when replaced
        if not isinstance(real, jax.Array):
            raise LayerError(
                f"layer {self.layer_name!r} returns {type(real).__name__}, not an array; "
                "choose a layer whose output is one (N, *spatial, K) array."
            )
        if a is None:
            a = real
        elif a.shape != real.shape:
            raise InputError(
                f"the replacement activations have shape {tuple(a.shape)} (channels-last) but "
                f"layer {self.layer_name!r} outputs {tuple(real.shape)} on this input."
            )
        out = select_output(self._head(dynamic, static, x, a.astype(real.dtype)), output)
        if not isinstance(out, jax.Array):
            raise TargetError(
                f"the chosen output is a {type(out).__name__}, not an array; choose an "
                "array output with output=."
            )
        return out.astype(jnp.float32)

    def guided_gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        """Guided backpropagation to the input.

        While the computation is traced, the ``relu`` attributes of ``jax.nn``,
        ``flax.linen`` and ``flax.nnx`` (the same function) are a dispatcher that, for the
        thread explaining only, is a ``jax.custom_vjp`` guided ReLU (backward
        ``g * (x > 0) * (g > 0)``); they are restored in a ``finally``. Compiled once per
        input shape and target kind (class ids and Region masks are arguments). A ReLU the
        model captured under another name before the call (``from jax.nn import relu``, a
        ``functools.partial``, ``jnp.maximum(x, 0)``) is not guided.

        The result reports ``guided_relus``, how many ReLU calls the forward guided, and
        ``unguided_activations``, the kinds of the other nonlinearities in the traced forward
        (``jax.nn.silu``, ``gelu``, ``elu``, ``sigmoid``, ``jnp.tanh``, ...: read from its
        jaxpr, so also those captured under another name), which pass gradients ungated.
        """
        x = self._prepare(inputs)
        _check_floating(x, "guided backpropagation")
        classes, masks, score_fn = _target_arguments(targets)
        dynamic, static, training = self._arguments()
        with self._forward_errors(x, " during guided backpropagation"), _guided_relus():
            grads, scores, outputs, traced_ids, relus, kinds = self._guided_jitted(
                dynamic,
                x,
                classes,
                masks,
                mode=targets.kind,
                score_fn=score_fn,
                score=targets.score,
                static=static,
                output=targets.output,
            )
        return make_layer_gradients(
            np.asarray(x, dtype=np.float32),
            grads,
            scores,
            _class_ids(targets, outputs, traced_ids),
            layout=self.layout,
            input_shape=tuple(x.shape),
            layer_name="input",
            outputs=outputs,
            training=training,
            guided_relus=int(relus),
            unguided_activations=_kinds_of_mask(int(kinds)),
        )

    @functools.cached_property
    def _guided_jitted(self) -> Callable[..., Any]:
        return jax.jit(self._guided_compute, static_argnames=_STATIC_ARGUMENTS)

    def _guided_forward(self, dynamic: Any, static: Any, x: jax.Array) -> Any:
        """The model's outputs; subclasses that can run the whole model directly do so."""
        return self._head(dynamic, static, x, self._features(dynamic, static, x))

    def _guided_compute(
        self,
        dynamic: Any,
        x: jax.Array,
        classes: jax.Array | None,
        masks: jax.Array | None,
        *,
        mode: str,
        score_fn: _ById | None,
        score: str,
        static: Any,
        output: int | str | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array, jax.Array]:
        """Guided gradients (N, T, *x), scores (N, T), outputs, class ids (if computed).

        Then the number of ReLUs guided and a bit mask of the unguided nonlinearities'
        kinds: constants of the trace, so a cached compilation still reports them.
        """
        forward = functools.partial(self._guided_forward, dynamic, static)
        relus, kinds = _forward_nonlinearities(forward, x)
        scored = _scorer(
            lambda x: (forward(x), None),
            mode=mode,
            score_fn=score_fn,
            score=score,
            output=output,
            n=x.shape[0],
        )
        (grads,), scores, out, _, ids, _ = _batched_vjp(scored, (x,), classes, masks, mode=mode)
        return (
            grads,
            scores,
            out.astype(jnp.float32),
            ids,
            jnp.asarray(relus, jnp.int32),
            jnp.asarray(_mask_of_kinds(kinds), jnp.int32),
        )

    def _activations(self, dynamic: Any, static: Any, x: jax.Array) -> jax.Array:
        """Traced: the layer's output, which must be one array."""
        a = self._features(dynamic, static, x)
        if not isinstance(a, jax.Array):
            raise LayerError(
                f"layer {self.layer_name!r} returns {type(a).__name__}, not an array; choose "
                "a layer whose output is one (N, *spatial, K) array."
            )
        return a

    def _layer_scorer(
        self,
        dynamic: Any,
        static: Any,
        x: jax.Array,
        *,
        mode: str,
        score_fn: _ById | None,
        score: str,
        output: int | str | None,
        n: int,
    ) -> Callable[[jax.Array], tuple[jax.Array, tuple[jax.Array, None]]]:
        """Traced: ``a -> (differentiated, (outputs, None))`` of the head (see :func:`_scorer`)."""
        return _scorer(
            lambda a: (self._head(dynamic, static, x, a), None),
            mode=mode,
            score_fn=score_fn,
            score=score,
            output=output,
            n=n,
        )

    def _compute(
        self,
        dynamic: Any,
        x: jax.Array,
        classes: jax.Array | None,
        masks: jax.Array | None,
        *,
        mode: str,
        score_fn: _ById | None,
        score: str,
        static: Any,
        output: int | str | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """Traced under jit: activations, (N, T, ...) gradients, (N, T) scores, outputs, ids.

        The outputs are a callable target's (N,) scores for ``mode="score"``.
        """
        self.trace_count += 1
        a = self._activations(dynamic, static, x)
        scored = self._layer_scorer(
            dynamic,
            static,
            x,
            mode=mode,
            score_fn=score_fn,
            score=score,
            output=output,
            n=a.shape[0],
        )
        (grads,), scores, out, y, ids, _ = _batched_vjp(scored, (a,), classes, masks, mode=mode)
        return a.astype(jnp.float32), grads, scores, y if mode == "score" else out, ids

    # --- Hessian-vector products (ShapleyCAM) -------------------------------------------

    def hessian_vector_products(
        self, inputs: Any, targets: Targets
    ) -> tuple[LayerGradients, np.ndarray]:
        """The gradients at the layer and the Hessian-vector products ``H a`` (see base).

        Forward-over-reverse on the head ``a -> score``: for each target's cotangent, the
        gradient ``a -> d score / d a`` is differentiated forward along ``a`` itself
        (``jax.jvp``), whose primal is the gradient; ``jax.vmap`` over the T targets, so
        one compiled function (cached per input shape and target kind, like
        :meth:`gradients`) gives both. For a score that is piecewise linear in the layer
        (logits through ReLUs and dense layers) the products are zero.

        Returns:
            The :class:`LayerGradients` of :meth:`gradients` and ``(N, T, K, *S)`` float32
            Hessian-vector products, channels-first.
        """
        x = self._prepare(inputs)
        classes, masks, score_fn = _target_arguments(targets)
        dynamic, static, training = self._arguments()
        with self._forward_errors(x, " computing Hessian-vector products"):
            activations, grads, hvps, scores, outputs, traced_ids = self._hvp_jitted(
                dynamic,
                x,
                classes,
                masks,
                mode=targets.kind,
                score_fn=score_fn,
                score=targets.score,
                static=static,
                output=targets.output,
            )
        layer_gradients = make_layer_gradients(
            activations,
            grads,
            scores,
            _class_ids(targets, outputs, traced_ids),
            layout=self.layout,
            input_shape=tuple(x.shape),
            layer_name=self.layer_name,
            outputs=outputs,
            training=training,
        )
        products = np.moveaxis(np.asarray(hvps, dtype=np.float32), -1, 2)  # like the gradients
        check_finite(products, f"the Hessian-vector products at layer {self.layer_name!r}")
        return layer_gradients, products

    @functools.cached_property
    def _hvp_jitted(self) -> Callable[..., Any]:
        return jax.jit(self._hvp_compute, static_argnames=_STATIC_ARGUMENTS)

    def _hvp_compute(
        self,
        dynamic: Any,
        x: jax.Array,
        classes: jax.Array | None,
        masks: jax.Array | None,
        *,
        mode: str,
        score_fn: _ById | None,
        score: str,
        static: Any,
        output: int | str | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """Traced under jit: activations, gradients and H a (N, T, *A), scores, outputs, ids."""
        a = self._activations(dynamic, static, x)
        scored = self._layer_scorer(
            dynamic,
            static,
            x,
            mode=mode,
            score_fn=score_fn,
            score=score,
            output=output,
            n=a.shape[0],
        )
        y, (out, _) = scored(a)
        # The cotangents depend on the outputs (the predicted class) only as constants.
        cotangents, scores, ids = _score_cotangents(out, y, classes, masks, mode=mode)

        def gradient(a: jax.Array, cotangent: jax.Array) -> jax.Array:
            _, vjp_fn = jax.vjp(lambda a: scored(a)[0], a)
            return vjp_fn(cotangent)[0]

        def along_activations(cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
            return jax.jvp(lambda a: gradient(a, cotangent), (a,), (a,))

        grads, hvps = jax.vmap(along_activations)(cotangents)  # (T, N, *A) each
        return (
            a.astype(jnp.float32),
            jnp.moveaxis(grads, 0, 1).astype(jnp.float32),
            jnp.moveaxis(hvps, 0, 1).astype(jnp.float32),
            scores.astype(jnp.float32),
            y if mode == "score" else out,
            ids,
        )

    # --- gradients at several layers (FullGrad, LeGrad) ----------------------------------

    def tensor_gradients(
        self,
        inputs: Any,
        targets: Targets,
        layers: Sequence[str],
        *,
        input_gradients: bool = False,
    ) -> TensorGradients:
        """Gradients of the target scores w.r.t. several layers' tensors, in one pass.

        Each named layer's tensor ``t`` (its output; a Flax multi-head attention's per-head
        probabilities ``(N, heads, Q, K)``) is passed on as ``t + delta`` with ``delta = 0``
        an argument, and one ``jax.vjp`` w.r.t. the deltas (and the input, if asked), batched
        over the T targets with ``jax.vmap``, gives every gradient. Inference mode as
        :meth:`gradients`; compiled once per input shape, layers and target kind. Tensors
        keep Flax's layout (channels-last).

        Args:
            inputs: a batch, channels-last, NumPy or a ``jax.Array``.
            targets: the parsed target request.
            layers: layer names as ``layer=`` takes them (or from :meth:`bias_layers`).
            input_gradients: also return the input and d score / d input.

        Raises:
            LayerError: a layer that does not exist, does not run exactly once, does not
                output one array, or on which the scores do not depend.
            BackendError: a model without layers (a ``(features, head)`` pair).
        """
        names = self._tensor_names(layers)
        if not names:
            raise LayerError("tensor_gradients needs at least one layer name; got none.")
        x = self._prepare(inputs)
        if input_gradients:
            _check_floating(x, "input gradients")
        classes, masks, score_fn = _target_arguments(targets)
        dynamic, static, training = self._arguments()
        with self._forward_errors(x, " computing gradients at several layers"):
            tensors, grads, x_grads, scores, outputs, traced_ids = self._tensor_jitted(
                dynamic,
                x,
                classes,
                masks,
                names=names,
                input_gradients=input_gradients,
                mode=targets.kind,
                score_fn=score_fn,
                score=targets.score,
                static=static,
                output=targets.output,
            )
        class_ids = _class_ids(targets, outputs, traced_ids)
        tensors = {name: np.asarray(tensors[name], dtype=np.float32) for name in names}
        grads = {name: np.asarray(grads[name], dtype=np.float32) for name in names}
        scores = np.asarray(scores, dtype=np.float32)
        check_finite(scores, "the target scores")
        for name in names:
            check_finite(tensors[name], f"the tensor of layer {name!r}")
            check_finite(grads[name], f"the gradients at layer {name!r}")
        input_array = x_grads_array = None
        if input_gradients:
            input_array = np.asarray(x, dtype=np.float32)
            x_grads_array = np.asarray(x_grads, dtype=np.float32)
            check_finite(x_grads_array, "the gradients at the input")
        return TensorGradients(
            tensors,
            grads,
            scores,
            class_ids,
            self.layout,
            input_array,
            x_grads_array,
            np.asarray(outputs, dtype=np.float32),
            training,
        )

    @functools.cached_property
    def _tensor_jitted(self) -> Callable[..., Any]:
        return jax.jit(
            self._tensor_compute,
            static_argnames=(*_STATIC_ARGUMENTS, "names", "input_gradients"),
        )

    def _tensor_compute(
        self,
        dynamic: Any,
        x: jax.Array,
        classes: jax.Array | None,
        masks: jax.Array | None,
        *,
        names: tuple[str, ...],
        input_gradients: bool,
        mode: str,
        score_fn: _ById | None,
        score: str,
        static: Any,
        output: int | str | None,
    ) -> tuple[
        dict[str, jax.Array],
        dict[str, jax.Array],
        jax.Array | None,
        jax.Array,
        jax.Array,
        jax.Array | None,
    ]:
        """Traced under jit: tensors, their gradients, the input's, scores, outputs, ids.

        Gradients are ``(N, T, ...)``; the outputs are the model's, also for a callable
        target; class ids are those the trace computed.
        """
        shapes = jax.eval_shape(lambda x: self._tapped(dynamic, static, x, names, None)[1], x)
        for name, shape in shapes.items():
            if not isinstance(shape, jax.ShapeDtypeStruct) or shape.ndim < 1:
                raise LayerError(
                    f"layer {name!r} outputs {type(shape).__name__}, not one array; name a "
                    "layer whose output is one array, (N, ...)."
                )
        deltas = {name: jnp.zeros(shapes[name].shape, shapes[name].dtype) for name in names}

        def run(x: jax.Array, deltas: dict[str, jax.Array]) -> tuple[Any, dict[str, Any]]:
            return self._tapped(dynamic, static, x, names, deltas)

        scored = _scorer(
            run, mode=mode, score_fn=score_fn, score=score, output=output, n=x.shape[0]
        )
        unused = _unused_arguments(lambda deltas: scored(x, deltas)[0], shapes)
        if unused:
            raise LayerError(
                f"the target scores do not depend on layers {unused!r}: their outputs are "
                "not used on the way to the model's outputs; name layers the scores "
                "depend on."
            )
        primals: tuple[Any, ...]
        if input_gradients:
            differentiated, primals = scored, (x, deltas)
        else:  # the input is a constant
            differentiated, primals = functools.partial(scored, x), (deltas,)
        grads, scores, out, _, ids, tensors = _batched_vjp(
            differentiated, primals, classes, masks, mode=mode
        )
        x_grads = grads[0] if input_gradients else None
        return tensors, grads[-1], x_grads, scores, out, ids


#: The static arguments of the jitted computations: the target kind, a callable target,
#: the class-score kind ("output"/"rest"), the model's static part, the output choice.
_STATIC_ARGUMENTS = ("mode", "score_fn", "score", "static", "output")


def _target_arguments(
    targets: Targets,
) -> tuple[np.ndarray | None, np.ndarray | None, _ById | None]:
    """The jitted functions' target arguments: class ids, Region masks, a callable target.

    Class ids and masks are dynamic arrays, so new classes or masks of the same shape do
    not recompile; a callable is static, compared by identity.

    Returns:
        ``(N, T)`` int32 class ids (explicit or the Regions'), the Regions' float32 masks
        ``(T, *S)`` or ``(T, N, *S)``, and the callable target.

    Raises:
        TargetError: ``score="rest"`` with a callable or Region target, or Region masks of
            different shapes.
    """
    if targets.score not in ("output", "rest"):
        raise TargetError(f"score={targets.score!r} is not understood; use 'output' or 'rest'.")
    if targets.score == "rest" and targets.kind in ("score", "region"):
        what = "a callable target" if targets.kind == "score" else "mc.Region targets"
        raise TargetError(
            f"score='rest' (2 z_c - logsumexp(z) over (N, C) class scores) needs class "
            f"targets, not {what}; pass class ids, None or 'all', or compute the residual "
            "in your own callable target."
        )
    classes = masks = None
    if targets.kind == "classes":
        assert targets.classes is not None
        classes = np.asarray(targets.classes, dtype=np.int32)
    if targets.kind == "region":
        classes = np.asarray(targets.class_ids(()), dtype=np.int32)
        arrays = [np.asarray(region.mask, np.float32) for region in targets.regions]
        rank = max(mask.ndim for mask in arrays)  # mixed S and (N, *S): lift S to (N, *S)
        arrays = [
            np.broadcast_to(m, (targets.batch_size, *m.shape)) if m.ndim < rank else m
            for m in arrays
        ]
        if len({m.shape for m in arrays}) > 1:
            raise TargetError(
                f"the Region masks have different shapes {[m.shape for m in arrays]}; "
                "give every target the same spatial shape."
            )
        masks = np.stack(arrays)  # (T, *S) or (T, N, *S)
    score_fn = None
    if targets.kind == "score":
        assert targets.score_fn is not None
        score_fn = _ById(targets.score_fn)
    return classes, masks, score_fn


def _class_ids(targets: Targets, outputs: Any, traced: Any) -> np.ndarray | None:
    """The ``(N, T)`` int64 class ids of a result, validated against the outputs' shape.

    Explicit classes and Regions are checked here (an out-of-range class, a mask that does
    not fit the output raise :class:`TargetError`); the predicted and all classes come
    from the trace (``traced``); a callable target has none.
    """
    shape = tuple(outputs.shape)
    if targets.kind == "region":
        targets.output_weights(shape, -1)
        return targets.class_ids(shape)
    if targets.kind == "classes":
        return targets.class_ids(shape)
    return None if traced is None else np.asarray(traced, dtype=np.int64)


def _check_floating(x: Any, what: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(
            f"{what} differentiates the input, which has dtype {x.dtype}; pass "
            "floating-point input."
        )


def _scorer(
    fn: Callable[..., tuple[Any, Any]],
    *,
    mode: str,
    score_fn: _ById | None,
    score: str,
    output: int | str | None,
    n: int,
) -> Callable[..., tuple[jax.Array, tuple[jax.Array, Any]]]:
    """``fn`` (``primals -> (model outputs, aux)``) as ``primals -> (y, (outputs, aux))``.

    ``y`` is what is differentiated (:func:`_differentiated`); the chosen output and
    ``aux`` ride along as auxiliary values of ``jax.vjp``.
    """

    def scored(*primals: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        outputs, aux = fn(*primals)
        out = select_output(outputs, output)
        if not isinstance(out, jax.Array):
            raise TargetError(
                f"the chosen output is a {type(out).__name__}, not an array; choose an "
                "array output with output=."
            )
        return _differentiated(out, mode=mode, score_fn=score_fn, score=score, n=n), (out, aux)

    return scored


def _differentiated(
    out: jax.Array, *, mode: str, score_fn: _ById | None, score: str, n: int
) -> jax.Array:
    """What the target scores are linear in: their cotangents pick the scores from it.

    A callable target's ``(N,)`` scores; for class targets with ``score="rest"`` the
    residual-softmax scores ``2 z - logsumexp(z)`` of the ``(N, C)`` outputs ``z``
    (in at least float32, as :func:`multicam.targets.rest_scores`); else the outputs.
    """
    if mode == "score":
        assert score_fn is not None
        s = score_fn.fn(out)
        if not isinstance(s, jax.Array) or s.shape != (n,):
            shape = s.shape if isinstance(s, jax.Array) else type(s).__name__
            raise TargetError(
                f"the target function returned {shape}; it must return an array of one "
                f"score per sample, shape ({n},)."
            )
        return s
    if score == "rest":
        if out.ndim != 2:
            raise TargetError(
                f"score='rest' needs (N, C) class scores; the model's output has shape "
                f"{tuple(out.shape)}."
            )
        z = out.astype(jnp.promote_types(out.dtype, jnp.float32))
        return 2 * z - jax.nn.logsumexp(z, axis=1, keepdims=True)
    return out


def _score_cotangents(
    out: jax.Array,
    y: jax.Array,
    classes: jax.Array | None,
    masks: jax.Array | None,
    *,
    mode: str,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The cotangents ``(T, *y.shape)`` that pick the T target scores from ``y``.

    ``score[n, t] = sum(y[n] * cotangents[t, n])``; the predicted class is the arg-max of
    the raw outputs ``out``. Returns the cotangents, the ``(N, T)`` scores and the class
    ids the trace computed (predicted, all, the Regions'), else ``None``.
    """
    n = out.shape[0]
    if mode == "score":
        return jnp.ones((1, *y.shape), y.dtype), y[:, None], None
    if mode == "region":  # channels-last output maps (N, *S, C)
        assert classes is not None and masks is not None
        if out.ndim < 3:
            Targets("region", n, regions=(Region(0, None),)).output_weights(out.shape, -1)
        spatial = out.shape[1:-1]
        if masks.shape[1:] not in (spatial, (n, *spatial)):
            raise TargetError(
                f"the Region mask has shape {masks.shape[1:]}, but the model's output "
                f"{tuple(out.shape)} has spatial shape {spatial}: pass a mask of shape "
                f"{spatial} (all samples) or {(n, *spatial)} (one per sample)."
            )
        region_masks = jnp.broadcast_to(
            masks.reshape(masks.shape[0], -1, *spatial), (masks.shape[0], n, *spatial)
        )
        onehot = jax.nn.one_hot(classes, out.shape[-1], dtype=y.dtype)  # (N, T, C)
        extra = (None,) * len(spatial)
        weights = (jnp.moveaxis(region_masks, 0, 1)[..., None] * onehot[:, :, *extra, :]).astype(
            y.dtype
        )  # (N, T, *S, C)
        scores = (y[:, None] * weights).reshape(n, weights.shape[1], -1).sum(-1)
        return jnp.moveaxis(weights, 1, 0), scores, classes
    if out.ndim != 2:
        Targets("all", n).class_ids(out.shape)  # raises the TargetError for (N, C)
    num_classes = out.shape[1]
    ids = classes
    if mode == "predicted":
        ids = jnp.argmax(out, axis=1)[:, None]
    elif mode == "all":
        ids = jnp.broadcast_to(jnp.arange(num_classes), (n, num_classes))
    assert ids is not None
    scores = jnp.take_along_axis(y, ids, axis=1)
    cotangents = jax.nn.one_hot(ids.T, num_classes, dtype=y.dtype)  # (T, N, C)
    return cotangents, scores, None if mode == "classes" else ids


def _batched_vjp(
    scored: Callable[..., tuple[jax.Array, tuple[jax.Array, Any]]],
    primals: tuple[Any, ...],
    classes: jax.Array | None,
    masks: jax.Array | None,
    *,
    mode: str,
) -> tuple[tuple[Any, ...], jax.Array, jax.Array, jax.Array, jax.Array | None, Any]:
    """One forward and one backward pass, ``jax.vmap``-ed over the T targets' cotangents.

    Returns:
        The gradients w.r.t. each primal (pytrees of ``(N, T, ...)`` float32 leaves), the
        ``(N, T)`` float32 scores, the chosen outputs, what was differentiated, the class
        ids the trace computed, and ``scored``'s auxiliary value.
    """
    y, vjp_fn, (out, aux) = jax.vjp(scored, *primals, has_aux=True)
    cotangents, scores, ids = _score_cotangents(out, y, classes, masks, mode=mode)
    grads = jax.vmap(vjp_fn)(cotangents)  # leaves (T, N, ...)
    grads = jax.tree.map(lambda g: jnp.moveaxis(g, 0, 1).astype(jnp.float32), grads)
    return tuple(grads), scores.astype(jnp.float32), out, y, ids, aux


def _unused_arguments(fn: Callable[[Any], Any], shapes: Mapping[str, Any]) -> list[str]:
    """The keys of ``shapes`` whose arrays ``fn(dict)`` does not depend on.

    Reads ``fn``'s jaxpr backwards from its outputs; an equation whose result is used
    counts all its inputs as used (so a nested call is never looked into: some unused
    arguments may go unnoticed, no used one is reported).
    """
    from jax.extend.core import Literal

    closed = jax.make_jaxpr(fn)(dict(shapes))
    jaxpr = closed.jaxpr
    live = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, Literal))
    leaves, _ = jax.tree_util.tree_flatten_with_path(dict(shapes))  # jaxpr.invars' order
    return [
        path[0].key for (path, _), var in zip(leaves, jaxpr.invars, strict=True) if var not in live
    ]


def _tapped_attention(
    original: Callable[..., Any],
    default: Callable[..., Any],
    weights_fn: Callable[..., Any],
    hit: Callable[[jax.Array], jax.Array],
    name: str,
) -> Callable[..., Any]:
    """An ``attention_fn`` that computes flax's attention with its probabilities tapped.

    The probabilities from Flax's own ``dot_product_attention_weights`` (softmax; its
    dropout is off in inference mode) go through ``hit`` before they weight the values.
    It has ``original``'s signature, which the linen module reads to choose the keyword
    arguments it passes.

    Raises:
        LayerError: the module has a custom ``attention_fn``, whose probabilities multicam
            cannot reach.
    """
    if original is not default:
        raise LayerError(
            f"layer {name!r} is a multi-head attention with a custom attention_fn "
            f"({getattr(original, '__name__', original)!r}); multicam reaches the per-head "
            "probabilities of flax's own dot_product_attention only. Name a submodule "
            "whose output is the attention probabilities (N, heads, Q, K) instead."
        )
    accepted = inspect.signature(weights_fn).parameters

    @functools.wraps(original)
    def attention(query: jax.Array, key: jax.Array, value: jax.Array, **kwargs: Any) -> Any:
        value_einsum = kwargs.pop("attn_weights_value_einsum", None)
        if "qk_attn_weights_einsum" in kwargs:  # linen's name for the weights' einsum
            kwargs["einsum"] = kwargs.pop("qk_attn_weights_einsum")
        weights = weights_fn(query, key, **{k: v for k, v in kwargs.items() if k in accepted})
        weights = hit(weights)
        if value_einsum is None:
            value_einsum = functools.partial(jnp.einsum, precision=kwargs.get("precision"))
        return value_einsum("...hqk,...khd->...qhd", weights, value.astype(weights.dtype))

    return attention


def _layout_hint(shape: tuple[int, ...]) -> str:
    """A guess at a channels-first batch, from its shape alone."""
    if len(shape) >= 4 and shape[1] <= 4 < min(shape[2:]) and shape[-1] > 4:
        return (
            "It looks like a channels-first (NCHW) batch: transpose it with np.moveaxis(x, 1, -1)."
        )
    return ""


def _check_hits(layer_name: str, hits: int, candidates: Callable[[], list[str]]) -> None:
    if hits == 0:
        raise LayerError(
            f"the model has no layer {layer_name!r} that runs in its forward pass; nearest "
            f"paths: {nearest_names(layer_name, candidates())}."
        )
    if hits > 1:
        raise LayerError(
            f"layer {layer_name!r} ran {hits} times in one forward pass; Grad-CAM needs a "
            "layer that runs exactly once (choose another layer, or a module that is not "
            "shared)."
        )


# --- linen ---------------------------------------------------------------------------


class _LinenTap:
    """A method interceptor that records or replaces one layer's output during ``apply``.

    It also notes the ``epsilon`` of every ``nn.BatchNorm`` that runs (``epsilons``, by
    module path): linen creates compact submodules only while applying, so this is where
    :meth:`LinenBoundModel.bias_layers` learns them.
    """

    def __init__(self, path: tuple[str, ...], replacement: jax.Array | None = None) -> None:
        self.path = path
        self.replacement = replacement
        self.hits = 0
        self.captured: Any = None
        self.modules: set[tuple[str, ...]] = set()
        self.perturbations: set[tuple[str, ...]] = set()
        self.epsilons: dict[tuple[str, ...], float] = {}

    def names(self) -> list[str]:
        return sorted("/".join(p) for p in self.modules | self.perturbations if p)

    def _hit(self, value: Any) -> Any:
        self.hits += 1
        if self.replacement is None:
            self.captured = value
            return value
        return self.replacement

    def _catch(self, path: tuple[str, ...], value: Any) -> Any:
        """A module's output or a perturbed value at ``path``, as the model goes on with it."""
        return self._hit(value) if path == self.path else value

    def _perturb(
        self, module: Any, name: str, value: Any, collection: str = "perturbations"
    ) -> Any:
        value = type(module).perturb(module, name, value, collection)
        path = (*module.path, name)
        self.perturbations.add(path)
        return self._catch(path, value)

    def __call__(self, next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        import flax.linen as nn

        module = context.module
        path = tuple(module.path)
        self.modules.add(path)
        if isinstance(module, nn.BatchNorm):
            self.epsilons[path] = float(module.epsilon)
        # Route this (bound, per-apply) module's self.perturb through the tap; the user's
        # unbound module is never touched.
        installed = "perturb" not in vars(module)
        if installed:
            object.__setattr__(module, "perturb", functools.partial(self._perturb, module))
        try:
            out = next_fun(*args, **kwargs)
        finally:
            if installed:
                object.__delattr__(module, "perturb")
        if context.method_name == "__call__":
            out = self._catch(path, out)
        return out


class _LinenTensorTap(_LinenTap):
    """Records the tensors of several layers and passes on ``tensor + delta`` for each.

    A layer's tensor is its ``__call__`` output or perturbed value; for an
    ``nn.MultiHeadDotProductAttention`` its per-head probabilities, reached by swapping the
    (bound, per-apply) module's ``attention_fn`` for the call (see :func:`_tapped_attention`).
    """

    def __init__(self, deltas: Mapping[tuple[str, ...], jax.Array | None]) -> None:
        super().__init__(())
        self.deltas = dict(deltas)
        self.hits_at = dict.fromkeys(self.deltas, 0)
        self.captured_at: dict[tuple[str, ...], Any] = {}
        self.attention: set[tuple[str, ...]] = set()

    def _record(self, path: tuple[str, ...], value: Any) -> Any:
        self.hits_at[path] += 1
        self.captured_at[path] = value
        delta = self.deltas[path]
        return value if delta is None else value + delta

    def _catch(self, path: tuple[str, ...], value: Any) -> Any:
        if path not in self.deltas or path in self.attention:
            return value
        return self._record(path, value)

    def __call__(self, next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        import flax.linen as nn

        module = context.module
        path = tuple(module.path)
        if not (
            context.method_name == "__call__"
            and path in self.deltas
            and isinstance(module, nn.MultiHeadDotProductAttention)
        ):
            return super().__call__(next_fun, args, kwargs, context)
        self.attention.add(path)
        original = module.attention_fn
        tapped = _tapped_attention(
            original,
            nn.dot_product_attention,
            nn.dot_product_attention_weights,
            functools.partial(self._record, path),
            "/".join(path),
        )
        object.__setattr__(module, "attention_fn", tapped)
        try:
            return super().__call__(next_fun, args, kwargs, context)
        finally:
            object.__setattr__(module, "attention_fn", original)


#: ``__call__`` arguments that switch a linen module between training and inference, and
#: their inference values.
_LINEN_INFERENCE = {
    "train": False,
    "training": False,
    "deterministic": True,
    "use_running_average": True,
}


def _linen_inference_kwargs(
    module: Any, apply_kwargs: dict[str, Any]
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``apply_kwargs`` with inference values for defaulted training-mode arguments.

    See :class:`LinenBoundModel`; also returns what was set, for ``training``.
    """
    method = apply_kwargs.get("method")
    if method is None:
        method = type(module).__call__
    elif isinstance(method, str):
        method = getattr(type(module), method, None)
    try:
        parameters = inspect.signature(method).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):  # not introspectable: apply as given
        return dict(apply_kwargs), ()
    kwargs = dict(apply_kwargs)
    training = []
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for name, value in _LINEN_INFERENCE.items():
        parameter = parameters.get(name)
        if parameter is None or name in kwargs or parameter.kind not in keyword:
            continue
        if parameter.default is (not value):
            kwargs[name] = value
            training.append(f"apply({name}={value}) ({name} defaulted to {not value})")
    return kwargs, tuple(training)


@contextlib.contextmanager
def _linen_scope_errors(
    outer: contextlib.AbstractContextManager[None], training: tuple[str, ...]
) -> Iterator[None]:
    """``outer`` (the forward's errors), with flax's training-mode scope errors explained."""
    from flax import errors

    with outer:
        try:
            yield
        except (errors.ModifyScopeVariableError, errors.InvalidRngError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if isinstance(exc, errors.ModifyScopeVariableError):
                what = (
                    "tries to update a variable collection, which a module does in training "
                    "mode (BatchNorm computing batch statistics)"
                )
            else:
                what = "asks for a PRNG key, which a module does in training mode (Dropout)"
            done = f" (multicam already set {', '.join(training)})" if training else ""
            raise InputError(
                f"the model's forward {what}: {type(exc).__name__}: {first}. multicam "
                "explains the model in inference mode and never updates its variables, but "
                f"could not switch this module to it from its __call__ signature{done}: pass "
                'apply_kwargs={"train": False} (or the argument your module takes, e.g. '
                '{"deterministic": True} or {"use_running_average": True}) to the '
                "explainer, or build the module with its inference settings."
            ) from exc


class LinenBoundModel(JaxBoundModel):
    """A Flax linen module with its variables, bound to a module or perturbation path.

    Which paths exist is known only once the forward is traced (parameterless modules and
    perturbations leave no trace in ``variables``), so an unknown path raises
    :class:`LayerError` on the first call of :meth:`gradients`, not in ``bind``.

    Inference mode: a ``train``/``training`` argument of the applied method that defaults
    to True, or a ``deterministic``/``use_running_average`` one that defaults to False, and
    that ``apply_kwargs`` does not set, is passed its inference value (reported in
    ``LayerGradients.training``). A forward that still updates a variable collection or
    asks for a PRNG key (training mode switched some other way) raises
    :class:`~multicam.errors.InputError` naming ``apply_kwargs``.
    """

    def __init__(
        self, module: Any, layer: Any, variables: Any, apply_kwargs: dict[str, Any]
    ) -> None:
        if not isinstance(layer, str) or not layer.strip("/"):
            raise LayerError(
                f"for a Flax linen module, layer must be a module path such as "
                f"'features/conv3' or a perturbation path such as 'features/relu4', got "
                f"{layer!r}."
            )
        super().__init__(layer)
        self.module = module
        self.variables = variables
        self.apply_kwargs, self.training = _linen_inference_kwargs(module, apply_kwargs)
        self.path = tuple(layer.strip("/").split("/"))
        #: The epsilon of each BatchNorm (by module path) seen in a traced forward.
        self._epsilons: dict[tuple[str, ...], float] = {}

    def _arguments(self) -> tuple[Any, Hashable, tuple[str, ...]]:
        return self.variables, None, self.training

    def _forward_errors(self, x: Any, during: str = "") -> contextlib.AbstractContextManager[None]:
        return _linen_scope_errors(super()._forward_errors(x, during), self.training)

    def _run(self, variables: Any, x: jax.Array, tap: _LinenTap) -> Any:
        import flax.linen as nn

        with nn.intercept_methods(tap):
            out = self.module.apply(variables, x, **self.apply_kwargs)
        self._epsilons.update(tap.epsilons)
        return out

    def _features(self, dynamic: Any, static: Any, x: jax.Array) -> jax.Array:
        tap = _LinenTap(self.path)
        self._run(dynamic, x, tap)
        _check_hits(self.layer_name, tap.hits, tap.names)
        return tap.captured

    def _guided_forward(self, dynamic: Any, static: Any, x: jax.Array) -> Any:
        return self.module.apply(dynamic, x, **self.apply_kwargs)

    def _head(self, dynamic: Any, static: Any, x: jax.Array, a: jax.Array) -> Any:
        tap = _LinenTap(self.path, replacement=a)
        out = self._run(dynamic, x, tap)
        _check_hits(self.layer_name, tap.hits, tap.names)
        return out

    def _tensor_names(self, layers: Sequence[str]) -> tuple[str, ...]:
        """Module or perturbation paths without surrounding slashes; checked when traced."""
        names = []
        for layer in layers:
            if not isinstance(layer, str) or not layer.strip("/"):
                raise LayerError(
                    f"for a Flax linen module, layers are module or perturbation paths such "
                    f"as 'features/conv3', got {layer!r}."
                )
            names.append(layer.strip("/"))
        return tuple(dict.fromkeys(names))

    def _tapped(
        self,
        dynamic: Any,
        static: Any,
        x: jax.Array,
        names: tuple[str, ...],
        deltas: Mapping[str, jax.Array] | None,
    ) -> tuple[Any, dict[str, Any]]:
        paths = {name: tuple(name.split("/")) for name in names}
        tap = _LinenTensorTap(
            {path: None if deltas is None else deltas[name] for name, path in paths.items()}
        )
        out = self._run(dynamic, x, tap)
        for name, path in paths.items():
            _check_hits(name, tap.hits_at[path], tap.names)
        return out, {name: tap.captured_at[path] for name, path in paths.items()}

    def parameter_layers(self) -> tuple[str, ...]:
        """Module paths of ``variables["params"]`` holding arrays, in the tree's order."""
        params = self.variables.get("params", {}) if isinstance(self.variables, Mapping) else {}
        return tuple("/".join(path) for path in _linen_scopes(params) if path)

    def bias_layers(self) -> tuple[tuple[str, np.ndarray], ...]:
        """Convolutions with a bias and batch normalisations, read from ``variables``.

        Compact linen submodules exist only while the model is applied, so the layers are
        recognised by their variables: a BatchNorm by its ``batch_stats`` ``mean`` and
        ``var`` (``(K,)``; ``scale``/``bias`` params where it has them), a convolution
        (``nn.Conv``, ``nn.ConvTranspose``, any rank) by a ``kernel`` ``(*k, in, K)`` of
        rank 3 or more and a ``bias`` ``(K,)``; dense kernels are rank 2. In the order of
        :meth:`parameter_layers` (a BatchNorm without params after them). A BatchNorm's
        epsilon is the module's own once a forward of this bound model has been traced
        (any call), else linen's default (``nn.BatchNorm.epsilon``).

        Returns:
            ``(module path, (K,) float32 bias)`` pairs; see :meth:`BoundModel.bias_layers`.
        """
        import flax.linen as nn

        variables = self.variables if isinstance(self.variables, Mapping) else {}
        params = variables.get("params", {})
        stats = variables.get("batch_stats", {})
        paths = list(dict.fromkeys([*_linen_scopes(params), *_linen_scopes(stats)]))
        found = []
        for path in paths:
            if not path:
                continue
            own = _linen_subtree(params, path)
            stat = _linen_subtree(stats, path)
            kernel: tuple[int, ...] = np.shape(own["kernel"]) if "kernel" in own else ()
            bias = _vector(own.get("bias"))
            if _vector(stat.get("mean")) is not None and _vector(stat.get("var")) is not None:
                epsilon = self._epsilons.get(path, float(nn.BatchNorm.epsilon))
                found.append(
                    (
                        "/".join(path),
                        _batch_norm_bias(
                            own.get("scale"), bias, stat["mean"], stat["var"], epsilon
                        ),
                    )
                )
            elif bias is not None and len(kernel) >= 3 and bias.shape[0] == kernel[-1]:
                found.append(("/".join(path), bias))
        return tuple(found)

    def randomized(self, layers: Sequence[str], redraw: Redraw) -> LinenBoundModel:
        """New variables with ``layers``' params redrawn (see base); the old are kept.

        A shallow copy of this bound model shares its jitted functions: the variables are
        their argument, so nothing is compiled again.
        """
        names = check_parameter_layers(layers, self.parameter_layers())
        params = self.variables["params"]
        for name in names:

            def update(key: str, leaf: Any, name: str = name) -> Any:
                new = redraw(name, key, np.asarray(leaf, np.float32))
                return jnp.asarray(new, dtype=jnp.asarray(leaf).dtype)

            params = _replaced(params, tuple(name.split("/")), update)
        randomized = copy.copy(self)
        randomized.variables = {**dict(self.variables), "params": params}
        return randomized


def _linen_scopes(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the sub-dicts of ``params`` that hold arrays themselves, in insertion order."""
    found = [prefix] if any(not isinstance(v, Mapping) for v in params.values()) else []
    for key, value in params.items():
        if isinstance(value, Mapping):
            found.extend(_linen_scopes(value, (*prefix, str(key))))
    return found


def _linen_subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
    """The sub-dict of ``tree`` at ``path``, or an empty one."""
    for part in path:
        tree = tree.get(part, {}) if isinstance(tree, Mapping) else {}
    return tree if isinstance(tree, Mapping) else {}


def _vector(value: Any) -> np.ndarray | None:
    """``value`` as a ``(K,)`` float32 NumPy array, or ``None`` if it is not one."""
    if value is None or np.ndim(value) != 1:
        return None
    return np.asarray(value, dtype=np.float32)


def _batch_norm_bias(scale: Any, bias: Any, mean: Any, var: Any, epsilon: float) -> np.ndarray:
    """A batch normalisation's effective inference bias ``bias - mean * scale / sqrt(var + eps)``.

    ``scale`` and ``bias`` may be ``None`` (1 and 0); computed in float64, returned float32.
    """
    mean = np.asarray(mean, dtype=np.float64)
    gamma = np.ones_like(mean) if scale is None else np.asarray(scale, dtype=np.float64)
    beta = np.zeros_like(mean) if bias is None else np.asarray(bias, dtype=np.float64)
    std = np.sqrt(np.asarray(var, dtype=np.float64) + epsilon)
    return (beta - mean * gamma / std).astype(np.float32)


def _replaced(
    tree: Mapping[str, Any], path: tuple[str, ...], update: Callable[[str, Any], Any]
) -> dict[str, Any]:
    """A copy of ``tree`` whose arrays directly under ``path`` are ``update(key, array)``."""
    copied = dict(tree)
    if path:
        copied[path[0]] = _replaced(tree[path[0]], path[1:], update)
        return copied
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            copied[key] = update(str(key), value)
    return copied


# --- nnx -----------------------------------------------------------------------------


class _NnxTap:
    """Stands in for the layer's module on the merged copy; records or replaces its output.

    With a ``delta`` it passes on ``output + delta`` (:meth:`JaxBoundModel._tapped`);
    :meth:`record` is also what a tapped attention function calls with its probabilities.
    """

    def __init__(
        self, inner: Any, replacement: jax.Array | None, delta: jax.Array | None = None
    ) -> None:
        self.inner = inner
        self.replacement = replacement
        self.delta = delta
        self.hits = 0
        self.captured: Any = None

    def record(self, value: Any) -> Any:
        self.hits += 1
        self.captured = value
        return value if self.delta is None else value + self.delta

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        if self.replacement is None:
            return self.record(out)
        self.hits += 1
        return self.replacement

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)


def _get_child(parent: Any, part: str) -> Any:
    if part.isascii() and part.isdigit() and not hasattr(parent, part):
        return parent[int(part)]
    return getattr(parent, part)


def _untapped(node: Any) -> Any:
    """The module a tap stands in for (taps of nested layers are installed on it)."""
    return node.inner if isinstance(node, _NnxTap) else node


def _nnx_node(model: Any, layer: str) -> tuple[Any, Any]:
    """``(parent, module)`` at the dotted attribute path ``layer``, looking through taps.

    Raises:
        LayerError: no callable at that path (the message names the nearest paths).
    """
    parent = node = model
    try:
        for part in layer.split("."):
            parent, node = node, _untapped(_get_child(node, part))
    except (AttributeError, IndexError, KeyError, TypeError):
        node = None
    if node is None or not callable(node):
        raise LayerError(
            f"the model has no layer {layer!r}; nearest attribute paths of its "
            f"submodules: {nearest_names(layer, _nnx_module_paths(model))}."
        )
    return parent, node


def _set_child(parent: Any, part: str, value: Any) -> None:
    if part.isascii() and part.isdigit() and not hasattr(parent, part):
        parent[int(part)] = value
    else:
        setattr(parent, part, value)


#: nnx module attributes that put a module in training mode, and their inference values
#: (what ``Module.eval()`` sets).
_NNX_INFERENCE = {"deterministic": True, "use_running_average": True}


def _nnx_training_paths(model: Any) -> dict[tuple[Any, ...], Any]:
    """The modules of ``model`` (path -> module) left in training mode."""
    from flax import nnx

    return {
        tuple(path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module)
        and any(getattr(node, name, None) is (not value) for name, value in _NNX_INFERENCE.items())
    }


def _nnx_path_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) if path else "<model>"


def _nnx_module_paths(model: Any) -> list[str]:
    from flax import nnx

    return sorted(
        ".".join(str(p) for p in path)
        for path, node in nnx.iter_graph(model)
        if path and isinstance(node, nnx.Module)
    )


class NnxBoundModel(JaxBoundModel):
    """A Flax nnx module bound to a dotted attribute path."""

    def __init__(self, model: Any, layer: Any) -> None:
        if not isinstance(layer, str) or not layer:
            raise LayerError(
                f"for a Flax nnx module, layer must be a dotted attribute path such as "
                f"'features.relu4', got {layer!r}."
            )
        super().__init__(layer)
        self.model = model
        self.parts = tuple(layer.split("."))
        _nnx_node(model, layer)

    def _arguments(self) -> tuple[Any, Hashable, tuple[str, ...]]:
        """The split state of the model, in eval mode if the user left it in train mode.

        Modules with ``deterministic=False`` (Dropout) or ``use_running_average=False``
        (BatchNorm) are switched on a merged copy, never on the user's module, and
        reported as ``"path (Kind)"``.
        """
        from flax import nnx

        graphdef, state = nnx.split(self.model)
        switched = _nnx_training_paths(self.model)
        if switched:
            copy = nnx.merge(graphdef, state)  # a copy: the user's module is never touched
            for module in _nnx_training_paths(copy).values():
                for name, value in _NNX_INFERENCE.items():
                    if getattr(module, name, None) is (not value):
                        setattr(module, name, value)
            graphdef, state = nnx.split(copy)
        training = tuple(
            f"{_nnx_path_name(path)} ({type(module).__name__})" for path, module in switched.items()
        )
        return state, graphdef, training

    def _run(self, state: Any, graphdef: Any, x: jax.Array, replacement: Any) -> Any:
        from flax import nnx

        model = nnx.merge(graphdef, state)  # a copy: the user's module is never touched
        parent, node = _nnx_node(model, self.layer_name)
        tap = _NnxTap(node, replacement)
        _set_child(parent, self.parts[-1], tap)
        out = model(x)
        _check_hits(self.layer_name, tap.hits, lambda: _nnx_module_paths(self.model))
        return out, tap.captured

    def _features(self, dynamic: Any, static: Any, x: jax.Array) -> jax.Array:
        return self._run(dynamic, static, x, None)[1]

    def _head(self, dynamic: Any, static: Any, x: jax.Array, a: jax.Array) -> Any:
        return self._run(dynamic, static, x, a)[0]

    def _guided_forward(self, dynamic: Any, static: Any, x: jax.Array) -> Any:
        from flax import nnx

        return nnx.merge(static, dynamic)(x)  # a copy: the user's module is never touched

    def _tensor_names(self, layers: Sequence[str]) -> tuple[str, ...]:
        """Dotted attribute paths of callables of the model (checked now)."""
        for layer in layers:
            if not isinstance(layer, str) or not layer:
                raise LayerError(
                    f"for a Flax nnx module, layers are dotted attribute paths such as "
                    f"'features.relu4', got {layer!r}."
                )
            _nnx_node(self.model, layer)
        return tuple(dict.fromkeys(layers))

    def _tapped(
        self,
        dynamic: Any,
        static: Any,
        x: jax.Array,
        names: tuple[str, ...],
        deltas: Mapping[str, jax.Array] | None,
    ) -> tuple[Any, dict[str, Any]]:
        from flax import nnx
        from flax.nnx.nn import attention

        model = nnx.merge(static, dynamic)  # a copy: the user's module is never touched
        taps = {}
        for name in names:
            parent, node = _nnx_node(model, name)
            tap = _NnxTap(node, None, None if deltas is None else deltas[name])
            if isinstance(node, nnx.MultiHeadAttention):  # its per-head probabilities
                node.attention_fn = _tapped_attention(
                    node.attention_fn,
                    attention.dot_product_attention,
                    attention.dot_product_attention_weights,
                    tap.record,
                    name,
                )
            else:
                _set_child(parent, name.rsplit(".", 1)[-1], tap)
            taps[name] = tap
        out = model(x)
        for name, tap in taps.items():
            _check_hits(name, tap.hits, lambda: _nnx_module_paths(self.model))
        return out, {name: tap.captured for name, tap in taps.items()}

    def parameter_layers(self) -> tuple[str, ...]:
        """Attribute paths of the modules holding ``nnx.Param``s, in assignment order."""
        return tuple(path for path, _ in _nnx_parameter_modules(self.model) if path)

    def bias_layers(self) -> tuple[tuple[str, np.ndarray], ...]:
        """``nnx.Conv``/``nnx.ConvTranspose`` with a bias and ``nnx.BatchNorm``, in order.

        The order and names of :meth:`parameter_layers` (assignment order); a BatchNorm's
        bias is its effective inference bias with its own ``epsilon``.
        """
        from flax import nnx

        def value(variable: Any) -> Any:
            return None if variable is None else variable.get_value()

        found = []
        for path, module in _nnx_parameter_modules(self.model, _nnx_adds_bias):
            if not path:
                continue
            if isinstance(module, nnx.BatchNorm):
                bias = _batch_norm_bias(
                    value(module.scale),
                    value(module.bias),
                    value(module.mean),
                    value(module.var),
                    float(module.epsilon),
                )
            else:
                bias = np.asarray(value(module.bias), dtype=np.float32)
            found.append((path, bias))
        return tuple(found)

    def randomized(self, layers: Sequence[str], redraw: Redraw) -> NnxBoundModel:
        """A deep copy of the module whose ``layers`` hold redrawn ``Param``s (see base).

        A deep copy, because ``nnx.merge(*nnx.split(model))`` shares the model's Variable
        objects. A shallow copy of this bound model shares its jitted functions (the state
        is their argument), so nothing is compiled again.
        """
        from flax import nnx

        names = check_parameter_layers(layers, self.parameter_layers())
        clone = copy.deepcopy(self.model)
        modules = dict(_nnx_parameter_modules(clone))
        for name in names:
            for key, variable in list(vars(modules[name]).items()):
                if isinstance(variable, nnx.Param):
                    leaf = variable.get_value()
                    new = redraw(name, key, np.asarray(leaf, np.float32))
                    variable.set_value(jnp.asarray(new, dtype=leaf.dtype))
        randomized = copy.copy(self)
        randomized.model = clone
        return randomized


def _nnx_adds_bias(module: Any) -> bool:
    """Whether an nnx module adds a bias per channel: a convolution with one, a BatchNorm."""
    from flax import nnx

    if isinstance(module, nnx.BatchNorm):
        return True
    return isinstance(module, nnx.Conv | nnx.ConvTranspose) and module.bias is not None


def _nnx_holds_params(module: Any) -> bool:
    from flax import nnx

    return any(isinstance(v, nnx.Param) for k, v in vars(module).items() if not k.startswith("_"))


def _nnx_parameter_modules(
    model: Any, keep: Callable[[Any], bool] = _nnx_holds_params
) -> list[tuple[str, Any]]:
    """``(attribute path, module)`` of the modules ``keep`` selects, in assignment order.

    By default the modules holding ``Param``s.

    ``nnx.iter_graph`` sorts attributes by name; this walks them in the order the model
    assigned them, which for sequential models is the order they run in.
    """
    from flax import nnx

    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def walk(node: Any, path: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, nnx.Module):
            items = [(k, v) for k, v in vars(node).items() if not k.startswith("_")]
            if keep(node):
                found.append((path, node))
        elif isinstance(node, list | tuple | nnx.List):
            items = [(str(i), v) for i, v in enumerate(node)]
        elif isinstance(node, dict):
            items = [(str(k), v) for k, v in node.items()]
        else:
            return
        for key, value in items:
            if isinstance(value, nnx.Module | list | tuple | dict | nnx.List):
                walk(value, f"{path}.{key}" if path else key)

    walk(model, "")
    return found


# --- function pair -------------------------------------------------------------------


class FunctionPairBoundModel(JaxBoundModel):
    """A ``(features, head)`` pair: ``features(x) -> A``, ``head(A) -> outputs``."""

    def __init__(
        self, features: Callable[[Any], Any], head: Callable[[Any], Any], layer: Any
    ) -> None:
        if layer is not None:
            raise LayerError(
                f"a (features, head) pair is split at its layer already; pass layer=None, "
                f"got {layer!r}."
            )
        super().__init__(getattr(features, "__name__", "features"))
        self.features = features
        self.head = head

    def _features(self, dynamic: Any, static: Any, x: jax.Array) -> jax.Array:
        return self.features(x)

    def _no_layers(self, capability: str, method: str) -> BackendError:
        return BackendError(
            f"a (features, head) pair of functions has no layers, so the jax backend cannot "
            f"compute {capability}, which {method} needs; explain a Flax linen or nnx "
            "module instead, or use a method that needs only the split point (GradCAM)."
        )

    def bias_layers(self) -> tuple[tuple[str, np.ndarray], ...]:
        """Raises :class:`BackendError`: a function pair has no layers."""
        raise self._no_layers("the biases of its layers (bias_layers)", "FullGrad")

    def _tensor_names(self, layers: Sequence[str]) -> tuple[str, ...]:
        raise self._no_layers(
            "gradients at several layers (tensor_gradients)", "FullGrad and LeGrad"
        )

    def _head(self, dynamic: Any, static: Any, x: jax.Array, a: jax.Array) -> Any:
        return self.head(a)


# --- guided backpropagation -----------------------------------------------------------

_GUIDED_LOCK = threading.Lock()
_GUIDED_LOCAL = threading.local()
#: While any thread computes guided gradients: [users, [(module, original relu)]].
_GUIDED_STATE: list[Any] = [0, []]
#: The modules whose ``relu`` attribute models look up.
_RELU_MODULES = (
    "jax.nn",
    "flax.linen",
    "flax.linen.activation",
    "flax.nnx",
    "flax.nnx.nn.activations",
)


@jax.custom_vjp
def _guided_relu(x: jax.Array) -> jax.Array:
    return jnp.maximum(x, 0)


def _guided_relu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.maximum(x, 0), x


def _guided_relu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


_guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)
_ORIGINAL_RELU = jax.nn.relu


def _relu_dispatch(x: Any) -> Any:
    """``jax.nn.relu`` while patched: guided for the explaining thread, else the original."""
    if getattr(_GUIDED_LOCAL, "depth", 0):
        counter = getattr(_GUIDED_LOCAL, "counter", None)
        if counter is not None:
            counter[0] += 1
        return _guided_relu(x)
    return _ORIGINAL_RELU(x)


#: The kinds ``LayerGradients.unguided_activations`` may report, one bit each.
_KINDS = ("ELU", "GELU", "Hardswish", "LeakyReLU", "Mish", "SiLU", "Sigmoid", "Softplus", "Tanh")
#: Primitives that are a nonlinearity of their own, or part of one (GELU's erf).
_NONLINEAR_PRIMITIVES = {"tanh": "Tanh", "logistic": "Sigmoid", "erf": None, "erfc": None}


def _mask_of_kinds(kinds: set[str]) -> int:
    return sum(1 << i for i, kind in enumerate(_KINDS) if kind in kinds)


def _kinds_of_mask(mask: int) -> tuple[str, ...]:
    return tuple(kind for i, kind in enumerate(_KINDS) if mask >> i & 1)


def _forward_nonlinearities(forward: Callable[[Any], Any], x: Any) -> tuple[int, set[str]]:
    """How many ReLUs ``forward`` guides, and the kinds of its other nonlinearities.

    Traces ``forward`` once more to a jaxpr (under the guided-ReLU patch, whose
    dispatcher counts its calls) and reads the nonlinearities from it: calls of jitted
    ``jax.nn`` activations by name (``silu``, ``elu``, ``softplus``, ...), and ``tanh``,
    ``logistic`` and ``erf`` primitives, named by the activation function they were
    traced in (``gelu``, ``sigmoid``) or else by themselves.
    """
    counter = [0]
    previous = getattr(_GUIDED_LOCAL, "counter", None)
    _GUIDED_LOCAL.counter = counter
    try:
        closed = jax.make_jaxpr(forward)(x)
    finally:
        _GUIDED_LOCAL.counter = previous
    kinds: set[str] = set()
    _jaxpr_nonlinearities(closed.jaxpr, kinds)
    return counter[0], kinds


def _jaxpr_nonlinearities(jaxpr: Any, kinds: set[str]) -> None:
    for eqn in jaxpr.eqns:
        primitive = eqn.primitive.name
        name = eqn.params.get("name")
        kind = nonlinearity_kind(name) if isinstance(name, str) else None
        if kind is not None:  # a jitted activation: jax.nn.silu, elu, softplus, ...
            kinds.add(kind)
            continue
        if primitive in _NONLINEAR_PRIMITIVES:
            kind = _traced_in(eqn) or _NONLINEAR_PRIMITIVES[primitive]
            if kind is not None:
                kinds.add(kind)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    _jaxpr_nonlinearities(inner, kinds)


def _traced_in(eqn: Any) -> str | None:
    """The kind of the innermost activation function ``eqn`` was traced in, if any."""
    traceback = getattr(eqn.source_info, "traceback", None)
    for frame in getattr(traceback, "frames", None) or ():
        kind = nonlinearity_kind(str(frame.function_name).rsplit(".", 1)[-1])
        if kind is not None:
            return kind
    return None


@contextlib.contextmanager
def _guided_relus() -> Iterator[None]:
    """Patch the ``relu`` attributes (reference-counted across threads); always undone."""
    with _GUIDED_LOCK:
        if _GUIDED_STATE[0] == 0:
            patched = []
            try:
                for name in _RELU_MODULES:
                    module = sys.modules.get(name)
                    if module is not None and getattr(module, "relu", None) is _ORIGINAL_RELU:
                        module.relu = _relu_dispatch  # type: ignore[attr-defined]
                        patched.append((module, _ORIGINAL_RELU))
            except BaseException:
                for module, original in reversed(patched):
                    module.relu = original
                raise
            _GUIDED_STATE[1] = patched
        _GUIDED_STATE[0] += 1
    _GUIDED_LOCAL.depth = getattr(_GUIDED_LOCAL, "depth", 0) + 1
    try:
        yield
    finally:
        _GUIDED_LOCAL.depth -= 1
        with _GUIDED_LOCK:
            _GUIDED_STATE[0] -= 1
            if _GUIDED_STATE[0] == 0:
                for module, original in reversed(_GUIDED_STATE[1]):
                    module.relu = original
                _GUIDED_STATE[1] = []
