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
    :meth:`_head` (the model's output with the layer's output replaced).

    Attributes:
        trace_count: how many times the jitted computation was traced (compiled); for
            tests and diagnostics.
    """

    backend = "jax"
    layout = "channels_last"

    def __init__(self, layer_name: str) -> None:
        self.layer_name = layer_name
        self.trace_count = 0
        self._jitted = jax.jit(
            self._compute, static_argnames=("mode", "score_fn", "static", "output")
        )

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
        classes, score_fn = _target_arguments(targets)
        masks = None
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
        dynamic, static, training = self._arguments()
        with self._forward_errors(x):
            activations, grads, scores, outputs, class_ids = self._jitted(
                dynamic,
                x,
                classes,
                masks,
                mode=targets.kind,
                score_fn=score_fn,
                static=static,
                output=targets.output,
            )
        if targets.kind == "region":  # validates classes and masks against the output
            targets.output_weights(tuple(outputs.shape), -1)
            class_ids = targets.class_ids(tuple(outputs.shape))
        elif targets.kind == "classes":
            class_ids = targets.class_ids(tuple(outputs.shape))  # validates the range
        elif class_ids is not None:
            class_ids = np.asarray(class_ids, dtype=np.int64)
        return (native_layer_gradients if native else make_layer_gradients)(
            activations,
            grads,
            scores,
            class_ids,
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
        input shape and target kind (class ids are an argument). A ReLU the model captured
        under another name before the call (``from jax.nn import relu``, a ``functools.partial``,
        ``jnp.maximum(x, 0)``) is not guided.

        The result reports ``guided_relus``, how many ReLU calls the forward guided, and
        ``unguided_activations``, the kinds of the other nonlinearities in the traced forward
        (``jax.nn.silu``, ``gelu``, ``elu``, ``sigmoid``, ``jnp.tanh``, ...: read from its
        jaxpr, so also those captured under another name), which pass gradients ungated.
        """
        x = self._prepare(inputs)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise InputError(
                f"guided backpropagation differentiates the input, which has dtype {x.dtype}; "
                "pass floating-point input."
            )
        classes, score_fn = _target_arguments(targets)
        dynamic, static, training = self._arguments()
        with self._forward_errors(x, " during guided backpropagation"), _guided_relus():
            if targets.kind == "region":  # masks are constants of the trace: no cache
                result = self._guided_compute(
                    dynamic,
                    jnp.asarray(x),
                    None,
                    mode="region",
                    score_fn=None,
                    static=static,
                    output=targets.output,
                    region=targets,
                )
            else:
                result = self._guided_jitted(
                    dynamic,
                    x,
                    classes,
                    mode=targets.kind,
                    score_fn=score_fn,
                    static=static,
                    output=targets.output,
                )
        grads, scores, outputs, traced_ids, relus, kinds = result
        class_ids: np.ndarray | None = None
        if targets.kind in ("classes", "region"):
            class_ids = targets.class_ids(tuple(outputs.shape))  # validates the range
        elif traced_ids is not None:
            class_ids = np.asarray(traced_ids, dtype=np.int64)
        return make_layer_gradients(
            np.asarray(x, dtype=np.float32),
            grads,
            scores,
            class_ids,
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
        return jax.jit(
            self._guided_compute, static_argnames=("mode", "score_fn", "static", "output")
        )

    def _guided_forward(self, dynamic: Any, static: Any, x: jax.Array) -> Any:
        """The model's outputs; subclasses that can run the whole model directly do so."""
        return self._head(dynamic, static, x, self._features(dynamic, static, x))

    def _guided_compute(
        self,
        dynamic: Any,
        x: jax.Array,
        classes: jax.Array | None,
        *,
        mode: str,
        score_fn: _ById | None,
        static: Any,
        output: int | str | None,
        region: Targets | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array, jax.Array]:
        """Guided gradients (N, T, *x), scores (N, T), outputs, class ids (if computed).

        Then the number of ReLUs guided and a bit mask of the unguided nonlinearities'
        kinds: constants of the trace, so a cached compilation still reports them.
        """
        n = x.shape[0]
        selector = Targets("all", n, output=output)
        relus, kinds = _forward_nonlinearities(
            functools.partial(self._guided_forward, dynamic, static), x
        )

        def scored(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array | None]]:
            out = selector.select_output(self._guided_forward(dynamic, static, x))
            if not isinstance(out, jax.Array):
                raise TargetError(
                    f"the chosen output is a {type(out).__name__}, not an array; choose an "
                    "array output with output=."
                )
            ids = None
            if mode == "score":
                assert score_fn is not None
                s = score_fn.fn(out)
                if not isinstance(s, jax.Array) or s.shape != (n,):
                    shape = s.shape if isinstance(s, jax.Array) else type(s).__name__
                    raise TargetError(
                        f"the target function returned {shape}; it must return an array of "
                        f"one score per sample, shape ({n},)."
                    )
                return s[:, None], (out, None)
            if mode == "region":
                assert region is not None
                weights = jnp.asarray(region.output_weights(tuple(out.shape), -1), out.dtype)
                s = (out[:, None] * weights).reshape(n, weights.shape[1], -1).sum(-1)
                return s, (out, None)
            if out.ndim != 2:
                Targets("all", n).class_ids(out.shape)  # raises the TargetError for (N, C)
            if mode == "predicted":
                ids = jax.lax.stop_gradient(jnp.argmax(out, axis=1))[:, None]
            elif mode == "all":
                ids = jnp.broadcast_to(jnp.arange(out.shape[1]), (n, out.shape[1]))
            else:
                assert classes is not None
                ids = classes
            return jnp.take_along_axis(out, ids, axis=1), (out, ids)

        s, vjp_fn, (out, ids) = jax.vjp(scored, x, has_aux=True)
        t = s.shape[1]
        cotangents = jnp.broadcast_to(jnp.eye(t, dtype=s.dtype)[:, None, :], (t, n, t))
        (grads,) = jax.vmap(vjp_fn)(cotangents)  # (T, N, *x)
        return (
            jnp.moveaxis(grads, 0, 1).astype(jnp.float32),
            s.astype(jnp.float32),
            out.astype(jnp.float32),
            None if mode == "classes" else ids,
            jnp.asarray(relus, jnp.int32),
            jnp.asarray(_mask_of_kinds(kinds), jnp.int32),
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
        static: Any,
        output: int | str | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """Traced under jit: activations, (N, T, ...) gradients, (N, T) scores, outputs, ids."""
        self.trace_count += 1
        a = self._features(dynamic, static, x)
        if not isinstance(a, jax.Array):
            raise LayerError(
                f"layer {self.layer_name!r} returns {type(a).__name__}, not an array; choose "
                "a layer whose output is one (N, *spatial, K) array."
            )

        selector = Targets("all", a.shape[0], output=output)

        def head(a: jax.Array) -> jax.Array:
            out = selector.select_output(self._head(dynamic, static, x, a))
            if not isinstance(out, jax.Array):
                raise TargetError(
                    f"the chosen output is a {type(out).__name__}, not an array; choose an "
                    "array output with output=."
                )
            return out

        n = a.shape[0]
        if mode == "score":
            assert score_fn is not None

            def scored(a: jax.Array) -> jax.Array:
                s = score_fn.fn(head(a))
                if not isinstance(s, jax.Array) or s.shape != (n,):
                    shape = s.shape if isinstance(s, jax.Array) else type(s).__name__
                    raise TargetError(
                        f"the target function returned {shape}; it must return an array of "
                        f"one score per sample, shape ({n},)."
                    )
                return s

            s, vjp_fn = jax.vjp(scored, a)
            (g,) = vjp_fn(jnp.ones_like(s))
            return (
                a.astype(jnp.float32),
                g[:, None].astype(jnp.float32),
                s[:, None].astype(jnp.float32),
                s,
                None,
            )
        out, vjp_fn = jax.vjp(head, a)
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
            onehot = jax.nn.one_hot(classes, out.shape[-1], dtype=out.dtype)  # (N, T, C)
            extra = (None,) * len(spatial)
            weights = (
                jnp.moveaxis(region_masks, 0, 1)[..., None] * onehot[:, :, *extra, :]
            ).astype(out.dtype)  # (N, T, *S, C)
            scores = (out[:, None] * weights).reshape(n, weights.shape[1], -1).sum(-1)
            (grads,) = jax.vmap(vjp_fn)(jnp.moveaxis(weights, 1, 0))
            return (
                a.astype(jnp.float32),
                jnp.moveaxis(grads, 0, 1).astype(jnp.float32),
                scores.astype(jnp.float32),
                out,
                classes,
            )
        if out.ndim != 2:
            Targets("all", n).class_ids(out.shape)  # raises the TargetError for (N, C)
        num_classes = out.shape[1]
        if mode == "predicted":
            classes = jnp.argmax(out, axis=1)[:, None]
        elif mode == "all":
            classes = jnp.broadcast_to(jnp.arange(num_classes), (n, num_classes))
        assert classes is not None
        scores = jnp.take_along_axis(out, classes, axis=1)
        cotangents = jax.nn.one_hot(classes.T, num_classes, dtype=out.dtype)  # (T, N, C)
        (grads,) = jax.vmap(vjp_fn)(cotangents)  # (T, N, *A)
        return (
            a.astype(jnp.float32),
            jnp.moveaxis(grads, 0, 1).astype(jnp.float32),
            scores.astype(jnp.float32),
            out,
            None if mode == "classes" else classes,
        )


def _target_arguments(targets: Targets) -> tuple[np.ndarray | None, _ById | None]:
    """The jitted functions' target arguments: explicit class ids and a callable target.

    Class ids are a dynamic array, so new classes do not recompile; a callable is static,
    compared by identity.
    """
    classes = None
    if targets.kind == "classes":
        assert targets.classes is not None
        classes = np.asarray(targets.classes, dtype=np.int32)
    score_fn = None
    if targets.kind == "score":
        assert targets.score_fn is not None
        score_fn = _ById(targets.score_fn)
    return classes, score_fn


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
    """A method interceptor that records or replaces one layer's output during ``apply``."""

    def __init__(self, path: tuple[str, ...], replacement: jax.Array | None = None) -> None:
        self.path = path
        self.replacement = replacement
        self.hits = 0
        self.captured: Any = None
        self.modules: set[tuple[str, ...]] = set()
        self.perturbations: set[tuple[str, ...]] = set()

    def names(self) -> list[str]:
        return sorted("/".join(p) for p in self.modules | self.perturbations if p)

    def _hit(self, value: Any) -> Any:
        self.hits += 1
        if self.replacement is None:
            self.captured = value
            return value
        return self.replacement

    def _perturb(
        self, module: Any, name: str, value: Any, collection: str = "perturbations"
    ) -> Any:
        value = type(module).perturb(module, name, value, collection)
        path = (*module.path, name)
        self.perturbations.add(path)
        return self._hit(value) if path == self.path else value

    def __call__(self, next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        path = tuple(module.path)
        self.modules.add(path)
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
        if context.method_name == "__call__" and path == self.path:
            out = self._hit(out)
        return out


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

    def _arguments(self) -> tuple[Any, Hashable, tuple[str, ...]]:
        return self.variables, None, self.training

    def _forward_errors(self, x: Any, during: str = "") -> contextlib.AbstractContextManager[None]:
        return _linen_scope_errors(super()._forward_errors(x, during), self.training)

    def _run(self, variables: Any, x: jax.Array, tap: _LinenTap) -> Any:
        import flax.linen as nn

        with nn.intercept_methods(tap):
            return self.module.apply(variables, x, **self.apply_kwargs)

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

    def parameter_layers(self) -> tuple[str, ...]:
        """Module paths of ``variables["params"]`` holding arrays, in the tree's order."""
        params = self.variables.get("params", {}) if isinstance(self.variables, Mapping) else {}
        return tuple("/".join(path) for path in _linen_scopes(params) if path)

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
    """Stands in for the layer's module on the merged copy; records or replaces its output."""

    def __init__(self, inner: Any, replacement: jax.Array | None) -> None:
        self.inner = inner
        self.replacement = replacement
        self.hits = 0
        self.captured: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        self.hits += 1
        if self.replacement is None:
            self.captured = out
            return out
        return self.replacement

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)


def _get_child(parent: Any, part: str) -> Any:
    if part.isascii() and part.isdigit() and not hasattr(parent, part):
        return parent[int(part)]
    return getattr(parent, part)


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
        node = model
        try:
            for part in self.parts:
                node = _get_child(node, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            node = None
        if node is None or not callable(node):
            raise LayerError(
                f"the model has no layer {layer!r}; nearest attribute paths of its "
                f"submodules: {nearest_names(layer, _nnx_module_paths(model))}."
            )

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
        parent = model
        for part in self.parts[:-1]:
            parent = _get_child(parent, part)
        tap = _NnxTap(_get_child(parent, self.parts[-1]), replacement)
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

    def parameter_layers(self) -> tuple[str, ...]:
        """Attribute paths of the modules holding ``nnx.Param``s, in assignment order."""
        return tuple(path for path, _ in _nnx_parameter_modules(self.model) if path)

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


def _nnx_parameter_modules(model: Any) -> list[tuple[str, Any]]:
    """``(attribute path, module)`` of the modules holding ``Param``s, in assignment order.

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
            if any(isinstance(v, nnx.Param) for _, v in items):
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
