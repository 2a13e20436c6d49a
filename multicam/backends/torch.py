"""PyTorch backend: layer activations, their gradients and the target scores.

Any ``torch.nn.Module``; the layer is a dotted name from ``named_modules()`` or the module
object. A forward hook swaps the layer's output for a copy that derives from a detached
leaf tensor, so autograd records nothing below the layer (the forward up to it runs under
``no_grad``), no parameter receives a ``.grad``, and in-place operations after the layer
(``nn.ReLU(inplace=True)``, ``out += identity``) modify the copy, never the activations
multicam reports. All T targets share one forward pass and one batched vector-Jacobian
product (``is_grads_batched``).

Where the arrays go: :meth:`TorchBoundModel.gradients` hands them to the host as NumPy
(``.cpu().numpy()``, the default path); :meth:`TorchBoundModel.native_gradients`
(``algebra="native"``) keeps them as float32 tensors on the model's device, checked there
(:func:`multicam.xp.make_layer_gradients`), for the algebra of :mod:`multicam.xp`.

Training mode: multicam explains the model as it predicts. Every forward it runs uses
inference mode: modules the user left in training mode are switched to eval for the call
(their ``training`` flag set directly, one module at a time) and restored afterwards, also
when the forward raises; :attr:`LayerGradients.training` names the ones whose behaviour
depends on it (dropout, batch/instance norm). A model already fully in eval mode is not
touched. The model's hooks, ``requires_grad`` flags, ``.grad`` fields and buffers are as
they were afterwards, and so is the caller's input (the model runs on a copy of it).

Threads: the hook acts only for the thread that registered it (other threads' forwards of
the same model pass through it untouched), and grad mode is thread-local in torch, so
several threads may explain one eval-mode model at once and get the same maps as one after
another. Calls on a model left in training mode take a per-model lock while they hold it in
eval mode, so they run one at a time; a forward the user runs on that model in another
thread meanwhile sees it in eval mode.

Errors: when the forward fails inside torch itself (a shape or dtype check in a
``torch.nn`` layer), multicam raises :class:`~multicam.errors.InputError` ``from`` it, with
what it can tell about the input (rank, channels, layout, dtype, a spatial size the model
was not built for); an exception the user's own code raises propagates unchanged, with a
note.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
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
from ..targets import Targets, select_output
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

    def _as_tensor(self, inputs: Any, native: bool = False) -> torch.Tensor:
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
        if native and tensor.is_floating_point():
            # On the device: a finite sum means every value is finite; only otherwise is the
            # input copied to the host, for the NumPy path's message.
            if not bool(torch.isfinite(tensor.detach().sum(dtype=torch.float32))):
                check_finite_input(tensor.detach().float().cpu().numpy())
        elif tensor.is_floating_point():
            check_finite_input(tensor.detach().float().cpu().numpy())
        return tensor

    def _input_hint(self, x: torch.Tensor, error: BaseException | None = None) -> str:
        """What multicam can tell about an input the model rejected with ``error``."""
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
        if conv is not None:
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
        if x.ndim >= 3 and error is not None and _SPATIAL_ERRORS.search(str(error)):
            return (
                f"The error is one torch raises when feature maps have a size the model was "
                f"not built for: the model may need a fixed input spatial size (this input's "
                f"is {tuple(x.shape[2:])}), or one its downsampling divides evenly."
            )
        return ""

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
            # forward_errors computes the hint inside its ``except``: the error is current.
            hint=lambda: self._input_hint(x, sys.exc_info()[1]),
        )

    def gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        x = self._as_tensor(inputs)
        try:
            return self._gradients(x, targets, keep_saved=False)
        except _SavedTensorModified:
            # An in-place op after the layer overwrote a tensor autograd had saved for the
            # backward pass (which the model, run only for inference, never needed): run
            # again with every saved tensor copied when it is saved.
            return self._gradients(x, targets, keep_saved=True)

    def native_gradients(self, inputs: Any, targets: Targets) -> LayerGradients:
        """:meth:`gradients` as float32 ``torch.Tensor`` on the model's device.

        The native path (``algebra="native"``): only finiteness flags (and, for the
        predicted class, the ``(N, C)`` outputs) go to the host; ``targets`` stays NumPy.
        """
        x = self._as_tensor(inputs, native=True)
        try:
            return self._gradients(x, targets, keep_saved=False, native=True)
        except _SavedTensorModified:
            return self._gradients(x, targets, keep_saved=True, native=True)

    def on_accelerator(self, inputs: Any = None) -> bool:
        """Whether the model's parameters (or buffers, or else the input) are off the CPU."""
        reference: torch.Tensor | None = next(self.model.parameters(), None)
        if reference is None:
            reference = next(self.model.buffers(), None)
        if reference is None and isinstance(inputs, torch.Tensor):
            reference = inputs
        return reference is not None and reference.device.type not in ("cpu", "meta")

    def _gradients(
        self, x: torch.Tensor, targets: Targets, *, keep_saved: bool, native: bool = False
    ) -> LayerGradients:
        activations, outputs, training = self._forward_to_layer(x, keep_saved=keep_saved)
        outputs = _chosen_output(outputs, targets)
        with torch.enable_grad():
            scores, classes = _target_scores(outputs, targets)
            if not scores.requires_grad:
                raise self._independent()
            grads = _batched_vjp(scores, activations, keep_saved=keep_saved)
        if native:
            return native_layer_gradients(
                activations.detach(),
                grads.detach(),
                scores.detach(),
                classes,
                layout=self.layout,
                input_shape=tuple(x.shape),
                layer_name=self.layer_name,
                outputs=outputs.detach(),
                training=training,
            )
        return self._on_host(activations, grads, scores, classes, x, outputs, training)

    def _on_host(
        self,
        activations: torch.Tensor,
        grads: torch.Tensor,
        scores: torch.Tensor,
        classes: np.ndarray | None,
        x: torch.Tensor,
        outputs: torch.Tensor,
        training: tuple[str, ...],
        **fields: Any,
    ) -> LayerGradients:
        """:func:`make_layer_gradients` of tensors handed to the host as float32 NumPy."""

        def host(tensor: torch.Tensor) -> np.ndarray:
            return tensor.detach().float().cpu().numpy()

        return make_layer_gradients(
            host(activations),
            host(grads),
            host(scores),
            classes,
            layout=self.layout,
            input_shape=tuple(x.shape),
            layer_name=fields.pop("layer_name", self.layer_name),
            outputs=host(outputs),
            training=training,
            **fields,
        )

    def _independent(self) -> LayerError:
        return LayerError(
            f"the target scores do not depend on layer {self.layer_name!r}; choose a "
            "layer on the path from the input to the output."
        )

    def _forward_to_layer(
        self, x: torch.Tensor, *, keep_saved: bool
    ) -> tuple[torch.Tensor, Any, tuple[str, ...]]:
        """One forward that records the graph from the layer on.

        Returns:
            The layer's output as a leaf that requires grad, the model's outputs, and the
            modules switched out of training mode for the call.
        """
        captured: list[tuple[torch.Tensor, int]] = []

        owner = threading.get_ident()

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if threading.get_ident() != owner:
                return None  # another thread's forward of the same model: leave it alone
            _check_tensor_output(self.layer_name, output)
            # Record the graph from here on only: below the layer, no_grad holds.
            torch.set_grad_enabled(True)
            leaf = output.detach()
            if _aliases(output, args):
                # An in-place or pass-through layer: its output is its input's storage,
                # which the code around the layer may still modify in place.
                leaf = leaf.clone()
            leaf.requires_grad_(True)
            captured.append((leaf, leaf._version))
            # The rest of the model gets a copy: an in-place op after the layer (ReLU,
            # ``out += identity``) modifies the copy, not the leaf multicam reports (and a
            # leaf that requires grad could not be modified in place at all).
            return leaf.clone()

        handle = self.layer.register_forward_hook(hook)
        try:
            with self._forward(x, grad=False, keep_saved=keep_saved) as training:
                outputs = self.model(_private(x))
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
        activations, version = captured[0]
        if activations._version != version:
            raise LayerError(
                f"the output of layer {self.layer_name!r} was modified in place after the "
                "layer returned it (by a tensor the model keeps that shares its memory), so "
                "its activations cannot be read; choose the layer after that operation."
            )
        return activations, outputs, training

    def outputs(self, inputs: Any, output: int | str | None = None) -> np.ndarray:
        """The model's outputs for a batch (eval mode, ``no_grad``), as float32 NumPy."""
        x = self._as_tensor(inputs)
        return self._plain_forward(x, output)

    def outputs_from_layer(
        self, inputs: Any, activations: np.ndarray, output: int | str | None = None
    ) -> np.ndarray:
        """The outputs with the layer's output replaced by ``activations`` (M, K, *S).

        A forward hook (acting for this thread only, like :meth:`gradients`') returns a copy
        of the replacement, cast to the layer output's dtype and device (in-place ops after
        the layer modify the copy); it is removed afterwards. The model runs in eval mode.
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
            _check_tensor_output(self.layer_name, output)
            calls.append(tuple(output.shape))
            if tuple(output.shape) != replacement.shape:
                raise InputError(
                    f"the replacement activations have shape {replacement.shape} but layer "
                    f"{self.layer_name!r} outputs {tuple(output.shape)} on this input."
                )
            # A fresh tensor: in-place ops after the layer must not write into the caller's
            # array (torch.from_numpy would share its memory).
            return torch.tensor(replacement, device=output.device, dtype=output.dtype)

        handle = self.layer.register_forward_hook(hook)
        try:
            out = self._plain_forward(x, output)
        finally:
            handle.remove()
        if len(calls) != 1:
            raise LayerError(
                f"layer {self.layer_name!r} ran {len(calls)} times in one forward pass; its "
                "output can be replaced only in a layer that runs exactly once."
            )
        return out

    def _plain_forward(self, x: torch.Tensor, output: int | str | None = None) -> np.ndarray:
        """One forward in eval mode without gradients; framework errors become InputError."""
        with self._forward(x, grad=False):
            outputs = select_output(self.model(_private(x)), output)
        if not isinstance(outputs, torch.Tensor):
            raise TargetError(
                f"the chosen output is a {type(outputs).__name__}, not a tensor; choose a "
                "tensor output with output=."
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
        a TorchScript/compiled region) is not guided. The result counts the guided ReLU
        calls (``guided_relus``) and names the other nonlinearities on the differentiated
        path (``unguided_activations``: SiLU, GELU, Sigmoid, ...), which pass their ordinary
        gradients. The model is untouched: the interception is a torch function mode,
        active in this thread only for this forward, which runs in eval mode on a copy of
        the input (so the model may modify its input in place).
        """
        x = self._as_tensor(inputs)
        if not x.is_floating_point():
            raise InputError(
                f"guided backpropagation differentiates the input, which has dtype {x.dtype}; "
                "pass floating-point input."
            )
        x = x.detach().requires_grad_(True)
        try:
            return self._guided_gradients(x, targets, keep_saved=False)
        except _SavedTensorModified:  # as in gradients()
            return self._guided_gradients(x, targets, keep_saved=True)

    def _guided_gradients(
        self, x: torch.Tensor, targets: Targets, *, keep_saved: bool
    ) -> LayerGradients:
        guided = _GuidedReLUs()
        with self._forward(x, grad=True, keep_saved=keep_saved) as training, guided:
            outputs = self.model(x.clone())
        outputs = _chosen_output(outputs, targets)
        with torch.enable_grad():
            scores, classes = _target_scores(outputs, targets)
            if not scores.requires_grad:
                raise InputError("the target scores do not depend on the input.")
            grads = _batched_vjp(scores, x, keep_saved=keep_saved)
        return self._on_host(
            x,
            grads,
            scores,
            classes,
            x,
            outputs,
            training,
            layer_name="input",
            guided_relus=guided.guided_relus,
            unguided_activations=sorted(guided.unguided),
        )

    @contextlib.contextmanager
    def _forward(
        self, x: torch.Tensor, *, grad: bool, keep_saved: bool = False
    ) -> Iterator[tuple[str, ...]]:
        """Around one forward of the model on ``x``; yields :attr:`LayerGradients.training`.

        Eval mode (restored after), framework errors as :class:`InputError`, autograd
        recording on (``grad``) or off, outside any inference mode the caller is in, and
        with ``keep_saved`` a copy of every tensor autograd saves (the in-place retry).
        """
        with (
            self._inference() as training,
            self._forward_errors(x),
            torch.inference_mode(False),
            torch.enable_grad() if grad else torch.no_grad(),
            _copies_of_saved_tensors() if keep_saved else contextlib.nullcontext(),
        ):
            yield training

    def _inference(self) -> contextlib.AbstractContextManager[tuple[str, ...]]:
        """Run the model in eval mode inside; yields :attr:`LayerGradients.training`."""
        return _inference_mode(self.model)

    def parameter_layers(self) -> tuple[str, ...]:
        """The modules holding ``nn.Parameter``s of their own, in ``named_modules`` order."""
        return tuple(
            name
            for name, module in self.model.named_modules()
            if next(module.parameters(recurse=False), None) is not None
        )

    def randomized(self, layers: Sequence[str], redraw: Redraw) -> TorchBoundModel:
        """A deep copy of the model whose ``layers`` hold redrawn parameters (see base)."""
        names = check_parameter_layers(layers, self.parameter_layers())
        path = next(name for name, module in self.model.named_modules() if module is self.layer)
        clone = copy.deepcopy(self.model)
        modules = dict(clone.named_modules())
        with torch.no_grad():
            for name in names:
                module = modules[name]
                for key, parameter in module.named_parameters(recurse=False):
                    values = parameter.detach().float().cpu().numpy()
                    canonical, axes = _canonical_parameter(module, key, values.ndim)
                    if axes is not None:
                        values = np.transpose(values, axes)
                    new = np.asarray(redraw(name, canonical, values), np.float32)
                    if axes is not None:
                        new = np.transpose(new, np.argsort(axes))
                    parameter.copy_(torch.from_numpy(np.ascontiguousarray(new)))
        return TorchBoundModel(clone, modules[path])

    def bias_layers(self) -> tuple[tuple[str, np.ndarray], ...]:
        """Convolutions with a bias and batch norms with running statistics (see base).

        A batch norm without running statistics (``track_running_stats=False``) normalises
        with each batch's own statistics even in eval mode, so it has no fixed bias and is
        left out.
        """
        found = []
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.modules.conv._ConvNd) and module.bias is not None:
                found.append((name, module.bias.detach().float().cpu().numpy()))
            elif (
                isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                and module.running_mean is not None
                and module.running_var is not None
            ):
                mean = module.running_mean.detach().double().cpu().numpy()
                std = np.sqrt(module.running_var.detach().double().cpu().numpy() + module.eps)
                scale = 1.0 if module.weight is None else module.weight.detach().double().cpu()
                shift = 0.0 if module.bias is None else module.bias.detach().double().cpu()
                bias = np.asarray(shift, np.float64) - mean * np.asarray(scale, np.float64) / std
                found.append((name, np.broadcast_to(bias, mean.shape).astype(np.float32)))
        return tuple(found)

    def tensor_gradients(
        self,
        inputs: Any,
        targets: Targets,
        layers: Sequence[str],
        *,
        input_gradients: bool = False,
    ) -> TensorGradients:
        """Gradients at several modules' outputs in one pass (see base).

        Forward hooks record each module's output (the rest of the model gets a copy, so
        in-place operations after it leave the recorded tensor alone); an
        ``nn.MultiheadAttention`` module contributes its per-head attention probabilities,
        which it is asked for (``need_weights=True, average_attn_weights=False``) and whose
        product with the values is replayed so that its output depends on them (torch's
        returned weights are a view that its output does not use).
        """
        if isinstance(layers, str) or (not layers and not input_gradients):
            raise LayerError("tensor_gradients needs a non-empty sequence of layer names.")
        resolved = [_resolve_layer(self.model, layer) for layer in layers]
        names = [name for name, _ in resolved]
        if len(set(names)) != len(names):
            raise LayerError(f"layers {names} name a module more than once.")
        x = self._as_tensor(inputs)
        if input_gradients and not x.is_floating_point():
            raise InputError(
                f"input gradients need floating-point input; the input has dtype {x.dtype}."
            )
        try:
            return self._tensor_gradients(x, targets, resolved, input_gradients, keep_saved=False)
        except _SavedTensorModified:  # as in gradients()
            return self._tensor_gradients(x, targets, resolved, input_gradients, keep_saved=True)

    def _tensor_gradients(
        self,
        x: torch.Tensor,
        targets: Targets,
        resolved: list[tuple[str, torch.nn.Module]],
        input_gradients: bool,
        *,
        keep_saved: bool,
    ) -> TensorGradients:
        recorded: dict[str, list[torch.Tensor]] = {name: [] for name, _ in resolved}
        owner = threading.get_ident()
        handles = []

        def record(name: str, tensor: torch.Tensor) -> torch.Tensor:
            if not tensor.requires_grad:  # frozen parameters and an input without grad
                tensor = tensor.detach().requires_grad_(True)
            recorded[name].append(tensor)
            return tensor

        def output_hook(name: str) -> Any:
            def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
                if threading.get_ident() != owner:
                    return None
                _check_tensor_output(name, output)
                return record(name, output).clone()

            return hook

        def attention_hooks(name: str, module: torch.nn.MultiheadAttention) -> None:
            _check_attention(name, module)
            asked: list[tuple[bool, bool]] = []

            def before(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                if threading.get_ident() != owner:
                    return None
                given, options = list(args), dict(kwargs)
                asked.append(
                    (
                        bool(_argument(given, options, 4, "need_weights", True)),
                        bool(_argument(given, options, 6, "average_attn_weights", True)),
                    )
                )
                _set_argument(given, options, 4, "need_weights", True)
                _set_argument(given, options, 6, "average_attn_weights", False)
                return tuple(given), options

            def after(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
                if threading.get_ident() != owner:
                    return None
                probabilities = record(name, output[1])
                value = _argument(list(args), kwargs, 2, "value", None)
                replayed = _replay_attention(module, probabilities, value)
                need, average = asked.pop()
                weights = None if not need else probabilities.mean(1) if average else probabilities
                return replayed, weights

            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))

        # The model runs on a copy (it may modify its input in place); with input gradients
        # the copy is made from the leaf they are taken at, as in guided_gradients.
        x = x.detach().requires_grad_(True) if input_gradients else _private(x)
        try:
            for name, module in resolved:
                if isinstance(module, torch.nn.MultiheadAttention):
                    attention_hooks(name, module)
                else:
                    handles.append(module.register_forward_hook(output_hook(name)))
            with self._forward(x, grad=True, keep_saved=keep_saved) as training:
                outputs = self.model(x.clone() if input_gradients else x)
        finally:
            for handle in handles:
                handle.remove()
        for name, tensors in recorded.items():
            if len(tensors) != 1:
                raise LayerError(
                    f"layer {name!r} ran {len(tensors)} times in one forward pass; choose "
                    "modules that run exactly once."
                )
        outputs = _chosen_output(outputs, targets)
        wrt = [tensors[0] for tensors in recorded.values()] + ([x] if input_gradients else [])
        with torch.enable_grad():
            scores, classes = _target_scores(outputs, targets)
            if not scores.requires_grad:
                raise LayerError(
                    f"the target scores do not depend on the layers {list(recorded)}; choose "
                    "layers on the path from the input to the output."
                )
            grads = _batched_vjp_many(scores, wrt, keep_saved=keep_saved)
        unused = [name for name, grad in zip(recorded, grads, strict=False) if grad is None]
        if unused:  # as the other backends: no silent zeros for a layer off the path
            raise LayerError(
                f"the target scores do not depend on layers {unused!r}: their outputs are not "
                "used on the way to the model's outputs; name layers the scores depend on."
            )
        if input_gradients and grads[-1] is None:  # the layers depend on it, so never
            raise InputError("the target scores do not depend on the input.")
        arrays = [grad.detach().float().cpu().numpy() for grad in grads if grad is not None]
        values = {name: t[0].detach().float().cpu().numpy() for name, t in recorded.items()}
        gradients = dict(zip(recorded, arrays, strict=False))
        for name in recorded:
            check_finite(gradients[name], f"the gradients at layer {name!r}")
        score_array = scores.detach().float().cpu().numpy()
        check_finite(score_array, "the target scores")
        return TensorGradients(
            tensors=values,
            gradients=gradients,
            scores=score_array,
            targets=classes,
            layout=self.layout,
            inputs=x.detach().float().cpu().numpy() if input_gradients else None,
            input_gradients=arrays[-1] if input_gradients else None,
            outputs=outputs.detach().float().cpu().numpy(),
            training=training,
        )

    def hessian_vector_products(
        self, inputs: Any, targets: Targets
    ) -> tuple[LayerGradients, np.ndarray]:
        """Gradients at the layer and ``H a`` by double backward (see base)."""
        x = self._as_tensor(inputs)
        try:
            return self._hessian_vector_products(x, targets, keep_saved=False)
        except _SavedTensorModified:
            return self._hessian_vector_products(x, targets, keep_saved=True)

    def _hessian_vector_products(
        self, x: torch.Tensor, targets: Targets, *, keep_saved: bool
    ) -> tuple[LayerGradients, np.ndarray]:
        activations, outputs, training = self._forward_to_layer(x, keep_saved=keep_saved)
        outputs = _chosen_output(outputs, targets)
        grads, products = [], []
        with torch.enable_grad():
            scores, classes = _target_scores(outputs, targets)
            if not scores.requires_grad:
                raise self._independent()
            for t in range(scores.shape[1]):
                with _saved_tensor_errors(keep_saved):
                    (grad,) = torch.autograd.grad(
                        scores[:, t].sum(), activations, create_graph=True, retain_graph=True
                    )
                    product = None  # the score linear in the layer (no graph): H = 0
                    if grad.requires_grad:
                        (product,) = torch.autograd.grad(
                            grad,
                            activations,
                            grad_outputs=activations.detach(),
                            retain_graph=True,
                            allow_unused=True,
                        )
                grads.append(grad.detach())
                products.append(torch.zeros_like(grad) if product is None else product.detach())
        layer_gradients = self._on_host(
            activations, torch.stack(grads, 1), scores, classes, x, outputs, training
        )
        hvp = torch.stack(products, 1).float().cpu().numpy()
        check_finite(hvp, f"the Hessian-vector products at layer {self.layer_name!r}")
        return layer_gradients, hvp


def _check_tensor_output(layer_name: str, output: Any) -> None:
    """Refuse a hooked layer whose output is not one tensor (a tuple, a dict, None)."""
    if not isinstance(output, torch.Tensor):
        raise LayerError(
            f"layer {layer_name!r} returns {type(output).__name__}, not a tensor; choose a "
            "layer whose output is one (N, K, *spatial) tensor."
        )


def _argument(args: list[Any], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    """A call argument given by position or keyword (as ``nn.MultiheadAttention.forward``)."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _set_argument(
    args: list[Any], kwargs: dict[str, Any], index: int, name: str, value: Any
) -> None:
    if len(args) > index:
        args[index] = value
    else:
        kwargs[name] = value


def _check_attention(name: str, module: torch.nn.MultiheadAttention) -> None:
    """Refuse the attention variants whose output :func:`_replay_attention` cannot replay."""
    if module.bias_k is not None or module.add_zero_attn:
        raise LayerError(
            f"attention layer {name!r} adds key/value bias tokens (add_bias_kv or "
            "add_zero_attn), which multicam cannot replay; name the module whose output is "
            "the attention probabilities instead."
        )


def _replay_attention(
    module: torch.nn.MultiheadAttention, probabilities: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """The attention output recomputed from ``probabilities`` ``(N, heads, Q, K)``.

    torch returns the probabilities as a view its own output does not use; recomputing the
    output from them (value projection, weighted sum, output projection) puts them on the
    path to the scores, with the same values (in eval mode, where dropout is inactive).
    """
    if not module.batch_first:
        value = value.transpose(0, 1)
    batch, length, _ = value.shape
    dim = module.embed_dim
    packed = module._qkv_same_embed_dim
    weight = module.in_proj_weight[2 * dim :] if packed else module.v_proj_weight
    bias = None if module.in_proj_bias is None else module.in_proj_bias[2 * dim :]
    heads = module.num_heads
    values = torch.nn.functional.linear(value, weight, bias)
    values = values.reshape(batch, length, heads, dim // heads).transpose(1, 2)
    mixed = torch.matmul(probabilities, values).transpose(1, 2)
    out = module.out_proj(mixed.reshape(batch, probabilities.shape[2], dim))
    return out if module.batch_first else out.transpose(0, 1)


def _canonical_parameter(
    module: torch.nn.Module, name: str, ndim: int
) -> tuple[str, tuple[int, ...] | None]:
    """A parameter's canonical name, and the axes that put it in the canonical layout.

    Convolution weights ``(out, in, *k)`` become ``kernel`` ``(*k, in, out)``, linear
    weights ``(out, in)`` ``kernel`` ``(in, out)``, normalisation weights ``scale``.
    """
    if name == "weight":
        convolution = isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed
        if convolution and ndim >= 3:
            return "kernel", (*range(2, ndim), 1, 0)
        if isinstance(module, torch.nn.Linear) and ndim == 2:
            return "kernel", (1, 0)
        norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
        if isinstance(module, norms):
            return "scale", None
    return name, None


# Messages torch raises when a feature map has a spatial size the model was not built for:
# a kernel or pooling window larger than the map, a flattened map of the wrong length for
# a Linear or view, two branches (a skip connection, a concatenation) of different sizes.
_SPATIAL_ERRORS = re.compile(
    r"Kernel size can't be greater than actual input size"
    r"|Output size is too small"
    r"|mat1 and mat2 shapes cannot be multiplied"
    r"|shape '\[[-0-9, ]*\]' is invalid for input of size"
    r"|must match the size of tensor b \(\d+\) at non-singleton dimension [2-9]"
    r"|Sizes of tensors must match except in dimension 1"
)


def _aliases(output: torch.Tensor, args: Any) -> bool:
    """Whether ``output`` shares memory with one of the tensors a module was called with."""
    if output.layout != torch.strided:
        return False
    try:
        pointer = output.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage: assume it does
        return True
    return any(
        isinstance(arg, torch.Tensor)
        and arg.layout == torch.strided
        and arg.untyped_storage().data_ptr() == pointer
        for arg in args
    )


class _SavedTensorModified(Exception):
    """Internal: the backward found a saved tensor modified in place; retry with copies."""


def _copies_of_saved_tensors() -> contextlib.AbstractContextManager[None]:
    """Inside, autograd keeps a copy of each tensor it saves for the backward pass.

    The copy is made when the tensor is saved, so a later in-place op cannot invalidate it;
    it costs memory, so only the retry uses it.
    """
    return torch.autograd.graph.saved_tensors_hooks(_copy_saved, _unpack_saved)


def _copy_saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


def _unpack_saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _private(x: torch.Tensor) -> torch.Tensor:
    """A copy of the input for the forward.

    A model that modifies its input in place (``x.sub_(mean)``) must modify neither the
    caller's tensor or array nor the input of multicam's next pass.
    """
    return x.clone()


# One lock per model, held while a call keeps a training-mode model in eval mode.
_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()

# torch.nn modules whose forward depends on ``training`` (besides those with a ``dropout``
# probability > 0: MultiheadAttention, RNN/LSTM/GRU).
_TRAINING_DEPENDENT = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.modules.dropout._DropoutNd,
)


def _model_lock(model: torch.nn.Module) -> threading.RLock:
    with _LOCKS_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def _inference_mode(model: torch.nn.Module) -> Iterator[tuple[str, ...]]:
    """Run ``model`` in eval mode inside; yield the report of what was in training mode.

    Each module left in training mode gets ``training = False`` (set directly, so an
    overridden ``train()`` runs no side effects) and ``True`` back afterwards, also on an
    exception; a model already fully in eval mode is not touched. The per-model lock makes
    a second thread wait until the first has restored the flags, so it sees the model's
    true mode rather than the first call's temporary eval mode.
    """
    lock = _model_lock(model)
    with lock:
        switched = [module for module in model.modules() if module.training]
        if switched:
            try:
                for module in switched:
                    module.training = False
                yield _training_report(model, switched)
            finally:
                for module in switched:
                    module.training = True
            return
    yield ()  # eval mode already: no flag changes, no lock held during the forward


def _training_report(model: torch.nn.Module, switched: list[torch.nn.Module]) -> tuple[str, ...]:
    """What :attr:`LayerGradients.training` says about the ``switched`` modules.

    ``"name (Kind)"`` for each one whose behaviour depends on training mode, in
    ``named_modules`` order, then one entry counting those of the user's own classes (not
    torch's), whose forward multicam cannot see into.
    """
    ids = {id(module) for module in switched}
    named: list[str] = []
    others = 0
    for name, module in model.named_modules():
        if id(module) not in ids:
            continue
        kind = type(module).__name__
        if isinstance(module, _TRAINING_DEPENDENT) or (
            isinstance(module, (torch.nn.MultiheadAttention, torch.nn.RNNBase))
            and float(getattr(module, "dropout", 0.0)) > 0
        ):
            named.append(f"{name} ({kind})" if name else kind)
        elif not type(module).__module__.startswith("torch.") and _reads_training(type(module)):
            others += 1
    if others:
        modules = "module" if others == 1 else "modules"
        named.append(f"and {others} other {modules} in training mode")
    return tuple(named)


_READS_TRAINING: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _reads_training(cls: type) -> bool:
    """Whether a user's module class may behave differently in training mode.

    True when the source of any of its own (non-torch) classes mentions ``training``
    (``if self.training:``, stochastic depth, custom dropout), or cannot be read.
    """
    if cls not in _READS_TRAINING:
        _READS_TRAINING[cls] = _source_reads_training(cls)
    return _READS_TRAINING[cls]


def _source_reads_training(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch") or klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            return True
        if "training" in source:
            return True
    return False


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
    if targets.score == "rest":  # 2 z - logsumexp(z): the predicted class is unchanged
        outputs = 2 * outputs - torch.logsumexp(outputs, dim=1, keepdim=True)
    return outputs.gather(1, index), classes


def _batched_vjp(
    scores: torch.Tensor, activations: torch.Tensor, *, keep_saved: bool = True
) -> torch.Tensor:
    """``(N, T, *A)`` gradients of each target column of ``scores`` w.r.t. ``activations``.

    Samples are independent (eval-mode models), so the gradient of the column sum gives
    every sample's own gradient; the T columns go through one batched backward pass.

    Raises:
        _SavedTensorModified: an in-place op overwrote a tensor saved for the backward
            pass, and the forward did not copy saved tensors (``keep_saved=False``): the
            caller runs the forward again with :func:`_copies_of_saved_tensors`.
    """
    with _saved_tensor_errors(keep_saved):
        return _batched_vjp_once(scores, activations)


@contextlib.contextmanager
def _saved_tensor_errors(keep_saved: bool) -> Iterator[None]:
    """Inside, autograd's "modified by an inplace operation" becomes a retry or an error.

    Raises:
        _SavedTensorModified: without copies of the saved tensors (``keep_saved=False``):
            the caller runs the forward again with :func:`_copies_of_saved_tensors`.
        UnsupportedModelError: even with the copies.
    """
    try:
        yield
    except RuntimeError as exc:
        if "modified by an inplace operation" not in str(exc):
            raise
        if not keep_saved:
            raise _SavedTensorModified from exc
        raise UnsupportedModelError(
            "an in-place operation in the model modified a tensor that the gradients need, "
            "even with autograd's saved tensors copied; make that operation out-of-place "
            "(e.g. nn.ReLU(inplace=False)) or choose a later layer."
        ) from exc


def _batched_vjp_many(
    scores: torch.Tensor, tensors: list[torch.Tensor], *, keep_saved: bool
) -> list[torch.Tensor | None]:
    """``(N, T, *A_i)`` gradients of each target column w.r.t. each of ``tensors``.

    As :func:`_batched_vjp`, for several tensors in one backward pass; ``None`` for a
    tensor the scores do not depend on.
    """
    n_targets = scores.shape[1]
    grads: tuple[torch.Tensor | None, ...]
    with _saved_tensor_errors(keep_saved):
        if n_targets == 1:
            single = torch.autograd.grad(scores.sum(), tensors, allow_unused=True)
            grads = tuple(None if g is None else g.unsqueeze(1) for g in single)
        else:
            basis = torch.eye(n_targets, dtype=scores.dtype, device=scores.device)
            cotangents = basis[:, None, :].expand(n_targets, scores.shape[0], n_targets)
            try:
                batched = torch.autograd.grad(
                    scores,
                    tensors,
                    grad_outputs=cotangents,
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                )
                grads = tuple(None if g is None else g.movedim(0, 1) for g in batched)
            except RuntimeError as exc:
                if "modified by an inplace operation" in str(exc):
                    raise
                columns = [
                    torch.autograd.grad(
                        scores[:, t].sum(), tensors, retain_graph=True, allow_unused=True
                    )
                    for t in range(n_targets)
                ]
                grads = tuple(
                    None
                    if column[0] is None
                    else torch.stack([c for c in column if c is not None], 1)
                    for column in zip(*columns, strict=True)
                )
    return list(grads)


def _batched_vjp_once(scores: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
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
    it (modes are thread-local), including the ``F.relu`` inside ``nn.ReLU.forward``; while
    it handles one call it is inactive, so the torch functions that call makes are not seen
    again. For a ReLU-like call whose output requires grad, it registers a hook on that
    output tensor clamping the gradient flowing into it to >= 0; the ReLU's own backward
    then masks it by ``input > 0``: ``dx = 1[x > 0] * max(g, 0)``, the guided rule. In-place
    ReLUs work (the hook sits on the tensor's post-ReLU version). Nothing is registered on
    the model.

    It counts the guided calls (:attr:`guided_relus`) and collects the kinds of the other
    nonlinearities whose output requires grad (:attr:`unguided`), which keep their ordinary
    gradients.
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

    def __init__(self) -> None:
        super().__init__()
        self.guided_relus = 0
        self.unguided: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return out
        if _is_relu_call(func, args, kwargs, self._RELUS):
            out.register_hook(_clamp_negative_gradient)
            self.guided_relus += 1
        else:
            kind = _unguided_kind(func)
            if kind is not None:
                self.unguided.add(kind)
        return out


def _is_relu_call(func: Any, args: Any, kwargs: dict[str, Any], relus: frozenset[Any]) -> bool:
    if func in relus:
        return True
    if func in _HARDTANHS:
        min_val = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        return bool(min_val == 0)
    return False


_F = torch.nn.functional
_HARDTANHS = (_F.hardtanh, _F.hardtanh_)

# The nonlinearities guided backpropagation does not guide, by the torch functions that
# compute them (each nn module of these calls one), with the module's name.
_UNGUIDED_KINDS: dict[Any, str] = {
    function: kind
    for kind, functions in {
        "SiLU": (_F.silu,),
        "GELU": (_F.gelu,),
        "Sigmoid": (
            torch.sigmoid,
            torch.sigmoid_,
            torch.Tensor.sigmoid,
            torch.Tensor.sigmoid_,
            _F.sigmoid,
        ),
        "Tanh": (torch.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_, _F.tanh),
        "Hardswish": (_F.hardswish,),
        "Hardsigmoid": (_F.hardsigmoid,),
        "Hardtanh": _HARDTANHS,  # min_val=0 (ReLU6) is guided: _is_relu_call comes first
        "ELU": (_F.elu, _F.elu_),
        "SELU": (_F.selu, _F.selu_, torch.selu, torch.selu_),
        "CELU": (_F.celu, _F.celu_, torch.celu, torch.celu_),
        "LeakyReLU": (_F.leaky_relu, _F.leaky_relu_),
        "RReLU": (_F.rrelu, _F.rrelu_, torch.rrelu, torch.rrelu_),
        "PReLU": (_F.prelu, torch.prelu),
        "Mish": (_F.mish,),
        "Softplus": (_F.softplus,),
        "LogSigmoid": (_F.logsigmoid,),
        "Softsign": (_F.softsign,),
        "GLU": (_F.glu,),
    }.items()
    for function in functions
}


def _unguided_kind(func: Any) -> str | None:
    """The kind of nonlinearity ``func`` computes when guided backprop leaves it alone."""
    try:
        return _UNGUIDED_KINDS.get(func)
    except TypeError:  # an unhashable callable
        return None
