"""PyTorch contenders: forward, eager floors, ``torch.compile`` floor, multicam, peers.

- ``forward``: ``model(x)`` under ``inference_mode``;
- ``floor`` (the denominator): the features half under ``no_grad``, then the head under
  autograd and one batched vector-Jacobian product (``is_grads_batched``) back to the layer;
  ``floor-loop``: the same with one backward per target; the faster of the two counts.
  Eager torch is PyTorch's usual fastest hand-written form on CPU;
- ``floor-compiled`` (reported beside it, ``--torch-compile ARCHS``): both halves through
  ``torch.compile`` (inductor, which needs a C++ compiler), one backward per target, the
  head run again for each (a compiled backward cannot be retained; the head is a pooling
  and a matrix product); compilation is the warm-up;
- ``multicam``: ``GradCAM(model, layer)(x, targets=classes)``; ``multicam-backend``
  (beside it): the backend's ``gradients`` alone, without the NumPy stage;
- peers where importable: Captum ``LayerGradCam`` + ``interpolate``, pytorch-grad-cam
  ``GradCAM``, torchcam ``GradCAM``, one call per target class.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import zoo
from .contenders import Case, Contenders, backend_only

__all__ = ["CONTENDERS", "TorchContenders"]


class TorchContenders(Contenders):
    """PyTorch's contenders; the input is handed over channels-first."""

    name = "torch"

    def __init__(
        self,
        arch: str,
        weights: dict[str, np.ndarray],
        layer: str,
        compile_floor: bool = False,
    ) -> None:
        super().__init__(arch, weights, layer)
        import torch

        from ..cam import GradCAM

        self.torch = torch
        self.model = zoo.build(self.arch, "torch", weights)
        self.features = zoo.build(self.features_arch, "torch", weights)
        self.head = zoo.build(self.head_arch, "torch", weights)
        self.explainer = GradCAM(self.model, zoo.layer_name(layer, "torch"))
        self.compile_floor = compile_floor
        self._compiled: tuple[Any, Any] | None = None
        self._peers: dict[str, Any] = {}

    def explain(self, x: np.ndarray, classes: np.ndarray) -> Any:
        return self.explainer(_channels_first(x), targets=classes, warn=False)

    def case(self, x: np.ndarray, classes: np.ndarray, peers: bool) -> Case:
        torch = self.torch
        xt = torch.from_numpy(_channels_first(x))
        n, t = classes.shape
        index = torch.from_numpy(classes)
        eye = torch.eye(t)[:, None, :].expand(t, n, t)

        def forward() -> Any:
            with torch.inference_mode():
                return self.model(xt)

        def floor(features: Any, head: Any, batched: bool | None) -> Callable[[], Any]:
            def run() -> Any:
                with torch.no_grad():
                    a = features(xt)
                a.requires_grad_(True)
                with torch.enable_grad():
                    scores = head(a).gather(1, index)
                    if t == 1:
                        grads = torch.autograd.grad(scores.sum(), a)[0][:, None]
                    elif batched is None:  # compiled backward graphs cannot be retained
                        rows = [torch.autograd.grad(scores[:, 0].sum(), a)[0]]
                        for i in range(1, t):
                            column = head(a).gather(1, index[:, i : i + 1]).sum()
                            rows.append(torch.autograd.grad(column, a)[0])
                        grads = torch.stack(rows, 1)
                    elif batched:
                        grads = torch.autograd.grad(
                            scores, a, grad_outputs=eye, is_grads_batched=True
                        )[0]
                    else:
                        grads = torch.stack(
                            [
                                torch.autograd.grad(scores[:, i].sum(), a, retain_graph=True)[0]
                                for i in range(t)
                            ],
                            1,
                        )
                return a.detach().numpy(), grads.numpy()

            return run

        out: Case = {
            "forward": ("forward", forward),
            "floor": ("floor", floor(self.features, self.head, True)),
            "multicam": ("multicam", lambda: self.explainer(xt, targets=classes, warn=False)),
            "multicam-backend": ("multicam-extra", backend_only(self.explainer, xt, classes)),
        }
        if t > 1:
            out["floor-loop"] = ("floor", floor(self.features, self.head, False))
        if self.compile_floor:
            if self._compiled is None:
                self._compiled = (torch.compile(self.features), torch.compile(self.head))
            out["floor-compiled"] = ("floor-extra", floor(*self._compiled, batched=None))
        if peers:
            out.update(self._peer_contenders(xt, classes, tuple(x.shape[1:-1])))
        return out

    def _peer_model(self, name: str) -> Any:
        # Each peer gets its own copy: peers leave hooks on the model they are given.
        if name not in self._peers:
            self._peers[name] = copy.deepcopy(self.model)
        return self._peers[name]

    def _peer_contenders(self, xt: Any, classes: np.ndarray, size: tuple[int, ...]) -> Case:
        torch = self.torch
        out: Case = {}
        columns = [classes[:, i].tolist() for i in range(classes.shape[1])]
        try:
            from captum.attr import LayerAttribution, LayerGradCam

            model = self._peer_model("captum")
            captum = LayerGradCam(model, model.get_submodule(self.layer))

            def run_captum() -> Any:
                return [
                    LayerAttribution.interpolate(
                        captum.attribute(xt, target=column, relu_attributions=True),
                        size,
                        interpolate_mode="bilinear",
                    )
                    for column in columns
                ]

            out["captum"] = ("peer", run_captum)
        except ImportError as exc:
            self.skipped["captum"] = f"not importable here: {exc}"
        try:
            from pytorch_grad_cam import GradCAM as PGCGradCAM  # type: ignore[import-not-found,unused-ignore]
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # type: ignore[import-not-found,unused-ignore]

            model = self._peer_model("pytorch-grad-cam")
            pgc = PGCGradCAM(model=model, target_layers=[model.get_submodule(self.layer)])

            def run_pgc() -> Any:
                return [
                    pgc(input_tensor=xt, targets=[ClassifierOutputTarget(c) for c in column])
                    for column in columns
                ]

            out["pytorch-grad-cam"] = ("peer", run_pgc)
        except ImportError as exc:
            self.skipped["pytorch-grad-cam"] = f"not importable here: {exc}"
        try:
            from torchcam.methods import GradCAM as TCGradCAM  # type: ignore[import-not-found,unused-ignore]

            model = self._peer_model("torchcam")
            extractor = TCGradCAM(model, target_layer=self.layer)

            def run_torchcam() -> Any:
                with torch.enable_grad():
                    scores = model(xt)
                    maps = []
                    for i, column in enumerate(columns):
                        (cam,) = extractor(
                            column, scores, retain_graph=i < len(columns) - 1, normalized=True
                        )
                        maps.append(
                            torch.nn.functional.interpolate(
                                cam[:, None], size=size, mode="bilinear", align_corners=False
                            )
                        )
                    model.zero_grad(set_to_none=True)
                return maps

            out["torchcam"] = ("peer", run_torchcam)
        except ImportError as exc:
            self.skipped["torchcam"] = f"not importable here: {exc}"
        return out


def _channels_first(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


CONTENDERS = TorchContenders
