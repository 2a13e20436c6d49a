"""PyTorch backend: layer activations, their gradients and the target scores.

Any ``torch.nn.Module``; the layer is a dotted name from ``named_modules()`` or the module
object. A forward hook swaps the layer's output for a detached leaf tensor, so autograd
records nothing below the layer (the forward up to it runs under ``no_grad``) and no
parameter receives a ``.grad``. All T targets share one forward pass and one batched
vector-Jacobian product (``is_grads_batched``). The model runs in whatever train/eval mode
the user left it in; its mode, hooks, ``requires_grad`` flags and ``.grad`` fields are as
they were afterwards, also when its forward raises.

Threads: the hook acts only for the thread that registered it (other threads' forwards of
the same model pass through it untouched), and grad mode is thread-local in torch, so
several threads may explain one model at once and get the same maps as one after another.

Errors: when the forward fails inside torch itself (a shape or dtype check in a
``torch.nn`` layer), multicam raises :class:`~multicam.errors.InputError` ``from`` it, with
what it can tell about the input (rank, channels, layout, dtype); an exception the user's
own code raises propagates unchanged, with a note.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any

import numpy as np
import torch

from ..errors import (
    BackendError,
    InputError,
    LayerError,
    TargetError,
    UnsupportedModelError,
    nearest_names,
)
from ..targets import Targets
from .base import (
    Backend,
    BoundModel,
    LayerGradients,
    check_finite,
    check_finite_input,
    forward_errors,
    make_layer_gradients,
    replacement_activations,
)

__all__ = ["TorchBackend", "TorchBoundModel"]


class TorchBackend(Backend):
    """Explains ``torch.nn.Module`` models (channels-first input, e.g. NCHW)."""

    name = "torch"
    extra = "torch"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return "torch" in sys.modules and isinstance(model, torch.nn.Module)

    def bind(self, model: Any, layer: Any, **options: Any) -> TorchBoundModel:
        if options:
            raise BackendError(
                f"the torch backend takes no options, got {sorted(options)}; "
                "options such as variables= belong to the jax backend."
            )
        if not isinstance(model, torch.nn.Module):
            raise BackendError(
                f"the torch backend explains torch.nn.Module models, got {type(model)!r}."
            )
        if isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedModelError(
                "TorchScript modules do not support forward hooks, so no layer's "
                "activations can be read; explain the Python model instead (save it with "
                "torch.save(model) and load it with torch.load(path, weights_only=False))."
            )
        return TorchBoundModel(model, layer)


def _resolve_layer(model: torch.nn.Module, layer: Any) -> tuple[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    if isinstance(layer, torch.nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name or type(model).__name__, module
        raise LayerError(
            f"the layer module {type(layer).__name__} is not part of the model; pass a "
            "submodule of the model, or its dotted name from model.named_modules()."
        )
    if not isinstance(layer, str):
        raise LayerError(
            f"layer must be a dotted module name or a torch.nn.Module, got {type(layer)!r}."
        )
    if layer not in modules:
        names = [name for name in modules if name]
        raise LayerError(
            f"the model has no layer {layer!r}; nearest names from named_modules(): "
            f"{nearest_names(layer, names)}."
        )
    return layer, modules[layer]


class TorchBoundModel(BoundModel):
    """A ``torch.nn.Module`` bound to one of its layers."""

    backend = "torch"
    layout = "channels_first"

    def __init__(self, model: torch.nn.Module, layer: Any) -> None:
        self.model = model
        self.layer_name, self.layer = _resolve_layer(model, layer)

    def _as_tensor(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            tensor = inputs
        else:
            array = np.asarray(inputs)
            if array.dtype.kind not in "biuf":
                raise InputError(f"the input has dtype {array.dtype}; pass numbers.")
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            reference = next(self.model.parameters(), None)
            if reference is not None:
                dtype = reference.dtype if tensor.is_floating_point() else tensor.dtype
                tensor = tensor.to(device=reference.device, dtype=dtype)
        if tensor.ndim < 2:
            raise InputError(
                f"the input has shape {tuple(tensor.shape)}; pass a batch (N, C, *spatial), "
                "e.g. x[None] for a single sample."
            )
        if tensor.is_floating_point():
            check_finite_input(tensor.detach().float().cpu().numpy())
        return tensor

    def _input_hint(self, x: torch.Tensor) -> str:
        """What multicam can tell about an input the model rejected."""
        reference = next(self.model.parameters(), None)
        if reference is not None and reference.is_floating_point() and not x.is_floating_point():
            return (
                f"The input has dtype {x.dtype} but the model computes in {reference.dtype}: "
                "pass floating-point input, e.g. x.astype(np.float32)."
            )
        conv = next(
            (m for m in self.model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)),
            None,
        )
        if conv is None:
            return ""
        rank = len(conv.kernel_size) + 2
        want = f"(N, {conv.in_channels}, " + ", ".join("*" * (rank - 2)) + ")"
        if x.ndim != rank:
            extra = " (a single sample? pass x[None])" if x.ndim == rank - 1 else ""
            return f"Its first convolution expects a batch of rank {rank}, {want}{extra}."
        if x.shape[1] != conv.in_channels:
            if x.shape[-1] == conv.in_channels:
                return (
                    f"It looks like a channels-last batch given to a channels-first model "
                    f"expecting {want}: transpose it with np.moveaxis(x, -1, 1)."
                )
            return (
                f"It has {x.shape[1]} channels but its first convolution expects "
                f"{conv.in_channels}, {want}."
            )
        return "Check the input's spatial size: the model may need a fixed one."

    def _forward_errors(self, x: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """How a failure of the model's forward on ``x`` reaches the user."""
        return forward_errors(
            packages=("torch",),
            framework="torch",
            input_shape=tuple(x.shape),
            input_dtype=x.dtype,
            expected="channels-first input (N, C, *spatial)",
            note=f"multicam: raised by the model's forward on an input of shape "
            f"{tuple(x.shape)}; torch models take channels-first input (N, C, *spatial).",
            hint=lambda: self._input_hint(x),
        )

    def gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        x = self._as_tensor(inputs)
        captured: list[torch.Tensor] = []

        owner = threading.get_ident()

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if threading.get_ident() != owner:
                return None  # another thread's forward of the same model: leave it alone
            if not isinstance(output, torch.Tensor):
                raise LayerError(
                    f"layer {self.layer_name!r} returns {type(output).__name__}, not a tensor;"
                    " choose a layer whose output is one (N, K, *spatial) tensor."
                )
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            # Record the graph from here on only: below the layer, no_grad holds.
            torch.set_grad_enabled(True)
            return leaf

        handle = self.layer.register_forward_hook(hook)
        try:
            with self._forward_errors(x), torch.inference_mode(False), torch.no_grad():
                outputs = self.model(x)
        finally:
            handle.remove()
        if not captured and isinstance(self.model, torch.fx.GraphModule):
            raise LayerError(
                f"layer {self.layer_name!r} never ran as a module: in a traced graph (e.g. "
                "from torch.export) layers are inlined into functions, so multicam cannot "
                "observe them; explain the original Python model instead."
            )
        if len(captured) != 1:
            raise LayerError(
                f"layer {self.layer_name!r} ran {len(captured)} times in one forward pass; "
                "Grad-CAM needs a layer that runs exactly once (choose another layer, or "
                "a module that is not shared)."
            )
        activations = captured[0]
        outputs = _chosen_output(outputs, targets)
        with torch.enable_grad():
            scores, classes = _target_scores(outputs, targets)
            if not scores.requires_grad:
                raise LayerError(
                    f"the target scores do not depend on layer {self.layer_name!r}; choose a "
                    "layer on the path from the input to the output."
                )
            grads = _batched_vjp(scores, activations)
        return make_layer_gradients(
            activations.detach().float().cpu().numpy(),
            grads.detach().float().cpu().numpy(),
            scores.detach().float().cpu().numpy(),
            classes,
            layout=self.layout,
            input_shape=tuple(x.shape),
            layer_name=self.layer_name,
            outputs=outputs.detach().float().cpu().numpy(),
        )

    def outputs(self, inputs: Any) -> np.ndarray:
        """The model's outputs for a batch under ``no_grad``, as float32 NumPy."""
        x = self._as_tensor(inputs)
        return self._plain_forward(x)

    def outputs_from_layer(self, inputs: Any, activations: np.ndarray) -> np.ndarray:
        """The outputs with the layer's output replaced by ``activations`` (M, K, *S).

        A forward hook (acting for this thread only, like :meth:`gradients`') returns the
        replacement, cast to the layer output's dtype and device; it is removed afterwards.
        """
        x = self._as_tensor(inputs)
        replacement = replacement_activations(
            activations, int(x.shape[0]), self.layer_name, self.layout
        )
        calls: list[tuple[int, ...]] = []
        owner = threading.get_ident()

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            if not isinstance(output, torch.Tensor):
                raise LayerError(
                    f"layer {self.layer_name!r} returns {type(output).__name__}, not a tensor;"
                    " choose a layer whose output is one (N, K, *spatial) tensor."
                )
            calls.append(tuple(output.shape))
            if tuple(output.shape) != replacement.shape:
                raise InputError(
                    f"the replacement activations have shape {replacement.shape} but layer "
                    f"{self.layer_name!r} outputs {tuple(output.shape)} on this input."
                )
            return torch.from_numpy(replacement).to(device=output.device, dtype=output.dtype)

        handle = self.layer.register_forward_hook(hook)
        try:
            out = self._plain_forward(x)
        finally:
            handle.remove()
        if len(calls) != 1:
            raise LayerError(
                f"layer {self.layer_name!r} ran {len(calls)} times in one forward pass; its "
                "output can be replaced only in a layer that runs exactly once."
            )
        return out

    def _plain_forward(self, x: torch.Tensor) -> np.ndarray:
        """One forward without gradients; framework errors become :class:`InputError`."""
        with self._forward_errors(x), torch.inference_mode(False), torch.no_grad():
            outputs = self.model(x)
        if not isinstance(outputs, torch.Tensor):
            raise TargetError(
                f"the model returned {type(outputs).__name__}; models with several outputs "
                "are not supported yet: wrap the model so that it returns one tensor."
            )
        result = outputs.detach().float().cpu().numpy()
        check_finite(result, "the model's outputs")
        return result

    def guided_gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        """Guided backpropagation to the input: see :class:`_GuidedReLUs` for the mechanism.

        Every ReLU the forward runs through ``torch.relu``/``F.relu``/``Tensor.relu`` (and
        their in-place forms; ``nn.ReLU`` modules call ``F.relu``), ``F.relu6`` and
        ``F.hardtanh`` with ``min_val=0`` (``nn.ReLU6``) gets a gradient hook on its output
        that clamps the incoming gradient to >= 0; the ReLU's own backward then zeroes it at
        non-positive inputs. A ReLU computed another way (``clamp(min=0)``, ``x * (x > 0)``,
        a TorchScript/compiled region) is not guided. The model is untouched: the
        interception is a torch function mode, active in this thread only for this forward.
        """
        x = self._as_tensor(inputs)
        if not x.is_floating_point():
            raise InputError(
                f"guided backpropagation differentiates the input, which has dtype {x.dtype}; "
                "pass floating-point input."
            )
        x = x.detach().requires_grad_(True)
        guided = _GuidedReLUs()
        with self._forward_errors(x), torch.inference_mode(False), torch.enable_grad(), guided:
            outputs = self.model(x)
        outputs = _chosen_output(outputs, targets)
        with torch.enable_grad():
            scores, classes = _target_scores(outputs, targets)
            if not scores.requires_grad:
                raise InputError("the target scores do not depend on the input.")
            grads = _batched_vjp(scores, x)
        return make_layer_gradients(
            x.detach().float().cpu().numpy(),
            grads.detach().float().cpu().numpy(),
            scores.detach().float().cpu().numpy(),
            classes,
            layout=self.layout,
            input_shape=tuple(x.shape),
            layer_name="input",
            outputs=outputs.detach().float().cpu().numpy(),
        )


def _chosen_output(outputs: Any, targets: Targets) -> torch.Tensor:
    """The output ``targets`` asks for (see ``Targets.select_output``), as one tensor."""
    chosen = targets.select_output(outputs)
    if not isinstance(chosen, torch.Tensor):
        raise TargetError(
            f"the chosen output is a {type(chosen).__name__}, not a tensor; choose a "
            "tensor output with output=."
        )
    return chosen


def _target_scores(
    outputs: torch.Tensor, targets: Targets
) -> tuple[torch.Tensor, np.ndarray | None]:
    """``(N, T)`` scores to differentiate, and their class ids (None for a callable)."""
    if targets.kind == "score":
        assert targets.score_fn is not None
        scores = targets.score_fn(outputs)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (outputs.shape[0],):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
            raise TargetError(
                f"the target function returned {shape}; it must return a tensor of one "
                f"score per sample, shape ({outputs.shape[0]},)."
            )
        return scores[:, None], None
    if targets.kind == "region":  # channels-first output maps: classes on axis 1
        weights = torch.from_numpy(targets.output_weights(tuple(outputs.shape), 1))
        weights = weights.to(device=outputs.device, dtype=outputs.dtype)
        scores = (outputs[:, None] * weights).flatten(2).sum(-1)
        return scores, targets.class_ids(tuple(outputs.shape))
    values = outputs.detach().float().cpu().numpy() if targets.kind == "predicted" else None
    classes = targets.class_ids(tuple(outputs.shape), values)
    index = torch.from_numpy(classes).to(outputs.device)
    return outputs.gather(1, index), classes


def _batched_vjp(scores: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``(N, T, *A)`` gradients of each target column of ``scores`` w.r.t. ``activations``.

    Samples are independent (eval-mode models), so the gradient of the column sum gives
    every sample's own gradient; the T columns go through one batched backward pass.
    """
    n_targets = scores.shape[1]
    if n_targets == 1:
        (grads,) = torch.autograd.grad(scores.sum(), activations)
        return grads.unsqueeze(1)
    basis = torch.eye(n_targets, dtype=scores.dtype, device=scores.device)
    cotangents = basis[:, None, :].expand(n_targets, scores.shape[0], n_targets)
    try:
        (grads,) = torch.autograd.grad(
            scores,
            activations,
            grad_outputs=cotangents,
            is_grads_batched=True,
            retain_graph=True,
        )
    except RuntimeError:
        # Some ops have no batching rule; one backward per target still shares the forward.
        grads = torch.stack(
            [
                torch.autograd.grad(scores[:, t].sum(), activations, retain_graph=True)[0]
                for t in range(n_targets)
            ]
        )
    return grads.movedim(0, 1)


def _clamp_negative_gradient(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


class _GuidedReLUs(torch.overrides.TorchFunctionMode):
    """Makes every ReLU called in its ``with`` block (this thread only) a guided one.

    A torch function mode sees each call of a torch function in the thread that entered
    it (modes are thread-local), including the ``F.relu`` inside ``nn.ReLU.forward``. For
    a ReLU-like call whose output requires grad, it registers a hook on that output tensor
    clamping the gradient flowing into it to >= 0; the ReLU's own backward then masks it by
    ``input > 0``: ``dx = 1[x > 0] * max(g, 0)``, the guided rule. In-place ReLUs work (the
    hook sits on the tensor's post-ReLU version). Nothing is registered on the model.
    """

    _RELUS = frozenset(
        {
            torch.relu,
            torch.relu_,
            torch.Tensor.relu,
            torch.Tensor.relu_,
            torch.nn.functional.relu,
            torch.nn.functional.relu_,
            torch.nn.functional.relu6,
        }
    )

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (
            _is_relu_call(func, args, kwargs, self._RELUS)
            and isinstance(out, torch.Tensor)
            and out.requires_grad
        ):
            out.register_hook(_clamp_negative_gradient)
        return out


def _is_relu_call(func: Any, args: Any, kwargs: dict[str, Any], relus: frozenset[Any]) -> bool:
    if func in relus:
        return True
    if func in (torch.nn.functional.hardtanh, torch.nn.functional.hardtanh_):
        min_val = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        return bool(min_val == 0)
    return False
