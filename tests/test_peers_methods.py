"""FullGrad, ShapleyCAM and LeGrad against the peers' own code (pytorch-grad-cam, torchcam).

These run only where the peers import (the peers environment, ``benchmarks/
constraints-peers.txt``, with ``torchcam`` installed beside ``grad-cam``: both need
torchvision, which does not install beside the pinned torch of the default environment);
elsewhere they skip with the reason. The models are small torch networks of our own with
fixed weights, and the zoo's ``digits_cnn``.

Conventions, read from the peers' source, and how the comparisons compensate:

1. pytorch-grad-cam ``FullGrad`` normalises each channel as ``(x - min) / (max + 1e-7)``
   (``scale_cam_image``), multicam scale-free (a constant map is zeros, no epsilon). The
   ``1e-7`` is not negligible where a channel's bias-gradients are small (a 1e-4 channel
   maximum moves its map by 1e-3), so the test recomputes the sum with the peer's epsilon
   from multicam's ``tensor_gradients`` (equal to 1e-6) and compares multicam's own maps
   within 2e-3. It takes ``Conv2d`` and ``BatchNorm2d`` layers with a bias, as multicam
   does on these 2-D nets, with the same effective batch-norm bias.
2. pytorch-grad-cam ``FullGrad`` and ``ShapleyCAM`` crash the interpreter (a segmentation
   fault in torch's backward, torch 2.14.1) on the zoo's ``resnet_tiny``, whose residual
   blocks add in place; the comparisons use nets without in-place additions.
3. pytorch-grad-cam ``ShapleyCAM`` with ``ClassifierOutputReST`` is multicam's
   ``score="rest"``; with ``ClassifierOutputTarget`` its ``score="output"``, where the
   Hessian term vanishes on these ReLU nets and both equal Grad-CAM.
4. torchcam ``LeGrad`` differentiates each block's own score, ``score_projection`` of that
   block's output tokens; multicam differentiates the model's score at every attention
   layer. With the projection equal to the rest of the model (final norm and head on the
   class token), they are the same at the last block, which is compared. torchcam reads
   ``nn.MultiheadAttention`` through a ``self_attention`` child (multicam names the module
   itself), drops ``prefix_tokens=1`` keys as multicam drops the class token, and
   normalises ``(x - min) / (max + 1e-8)`` at the grid's size (multicam: ``size=None``).
5. pytorch-grad-cam normalises each layer's map before resizing it to the input, multicam
   after resizing; the other methods are compared on a net whose layers keep the input's
   8x8 resolution, where the orders agree, so what is compared is the method itself.
6. pytorch-grad-cam's Grad-CAM++ adds ``1e-6`` to the denominator of alpha and
   ``scale_cam_image`` adds ``1e-7`` to the maximum; the net's head is scaled up so that
   the gradients dwarf both. RefineCAM multiplies two Grad-CAM++ maps that agree to 2e-5
   (float32 round-off in alpha), so its product agrees to 1e-4. KPCA-CAM: the peer runs
   scikit-learn's KernelPCA on float32 activations, multicam in float64 (5e-5).
7. torchcam's ``CAM`` normalises the signed map without a ReLU: multicam's
   ``ClassActivationMap(...)(relu=False)``. torchcam's ``FinerCAM`` (``gamma=0.6``, the
   mean of the 3 closest classes) is multicam's ``weighting="mean", alpha=0.6``;
   pytorch-grad-cam's with one comparison class is ``references=1`` (a softmax weight of 1,
   differentiated or not). torchcam's ``ISCAM`` is multicam's (``path="cumulative"``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest
from test_capability_methods import _conv_bn_net, _x

import multicam as mc
from multicam import algebra, zoo
from multicam.targets import Targets

torch = pytest.importorskip("torch", reason="the peers comparisons run a torch model")

needs_pgc = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_grad_cam") is None,
    reason="pytorch-grad-cam (package grad-cam) is not installed: it needs torchvision, "
    "which installs only in the peers environment (benchmarks/constraints-peers.txt)",
)
needs_torchcam = pytest.mark.skipif(
    importlib.util.find_spec("torchcam") is None,
    reason="torchcam is not installed: it needs torchvision, which installs only in the "
    "peers environment (benchmarks/constraints-peers.txt)",
)


def _peer_normalize(maps: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's ``scale_cam_image`` without resizing, over the last two axes."""
    shifted = maps - maps.min(axis=(-2, -1), keepdims=True)
    return shifted / (1e-7 + shifted.max(axis=(-2, -1), keepdims=True))


@needs_pgc
def test_full_grad_equals_pytorch_grad_cam() -> None:
    from pytorch_grad_cam import FullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _conv_bn_net()
    x = _x((3, 3, 8, 8), seed=1)
    classes = [1, 2, 5]
    with FullGrad(model, []) as cam:
        theirs = cam(torch.from_numpy(x), [ClassifierOutputTarget(c) for c in classes])
    ours = mc.FullGrad(model)(x, targets=classes, warn=False)
    np.testing.assert_allclose(ours.maps[:, 0], theirs, atol=2e-3)  # convention 1

    bound = mc.FullGrad(model).bound
    biases = dict(bound.bias_layers())
    targets = Targets.parse(classes, 3)
    found = bound.tensor_gradients(x, targets, list(biases), input_gradients=True)
    assert found.inputs is not None and found.input_gradients is not None
    total = _peer_normalize(np.abs(found.inputs[:, None] * found.input_gradients)).sum(axis=2)
    for name, gradients in found.gradients.items():
        evidence = np.abs(biases[name][None, None, :, None, None] * gradients)
        term = _peer_normalize(evidence).sum(axis=2)
        total += algebra.resize(term, (8, 8), "linear")
    np.testing.assert_allclose(_peer_normalize(total[:, 0]), theirs, atol=1e-6)


@needs_pgc
@pytest.mark.parametrize("score", ["rest", "output"])
@pytest.mark.parametrize("arch", ["conv_bn", "digits_cnn"])
def test_shapley_cam_equals_pytorch_grad_cam(score: str, arch: str) -> None:
    from pytorch_grad_cam import ShapleyCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

    if arch == "conv_bn":
        model, layer = _conv_bn_net(), "2"
        x = _x((3, 3, 8, 8), seed=2)
    else:
        model = zoo.build("digits_cnn", "torch", zoo.init_weights("digits_cnn", 0)).eval()
        layer = "features.relu3"
        x = zoo.example_input("digits_cnn", 3, seed=2, layout="channels_first")
    classes = [1, 2, 3]
    target = ClassifierOutputReST if score == "rest" else ClassifierOutputTarget
    module = dict(model.named_modules())[layer]
    with ShapleyCAM(model, [module]) as cam:
        theirs = cam(torch.from_numpy(x), [target(c) for c in classes])
    ours = mc.ShapleyCAM(model, layer, score=score)(x, targets=classes, warn=False)
    np.testing.assert_allclose(ours.maps[:, 0], theirs, atol=1e-5)
    if score == "output":  # convention 3
        grad_cam = mc.GradCAM(model, layer)(x, targets=classes, warn=False)
        np.testing.assert_allclose(ours.maps, grad_cam.maps, atol=1e-6)


def _torchvision_like_vit() -> Any:
    """Blocks as torchvision's ViT: ``ln_1``, ``self_attention``, ``ln_2``, ``mlp``."""
    nn = torch.nn
    dim = 8

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(dim)
            self.self_attention = nn.MultiheadAttention(dim, 2, batch_first=True)
            self.ln_2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))

        def forward(self, x: Any) -> Any:
            y = self.ln_1(x)
            x = x + self.self_attention(y, y, y, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, dim, 2, stride=2)
            self.cls = nn.Parameter(torch.randn(1, 1, dim))
            self.blocks = nn.Sequential(Block(), Block())
            self.ln = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 5)

        def forward(self, x: Any) -> Any:
            tokens = self.embed(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
            return self.head(self.ln(self.blocks(tokens)[:, 0]))

    torch.manual_seed(1)
    net = Net().eval()
    with torch.no_grad():
        for block in net.blocks:
            block.self_attention.in_proj_weight.mul_(3.0)
    return net


@needs_torchcam
def test_le_grad_equals_torchcam_at_the_last_block() -> None:
    from torchcam.methods import LeGrad

    net = _torchvision_like_vit()
    x = _x((2, 3, 8, 8), seed=3)
    classes = [4, 1]

    def project(tokens: Any) -> Any:  # the rest of the model: convention 4
        return net.head(net.ln(tokens[:, 0]))

    with LeGrad(net, "blocks.1", score_projection=project) as extractor:
        scores = net(torch.from_numpy(x))
        theirs = extractor(classes, scores)[0].detach().numpy()
    ours = mc.LeGrad(net, ["blocks.1.self_attention"])(x, targets=classes, size=None, warn=False)
    np.testing.assert_allclose(ours.maps[:, 0], theirs, atol=1e-6)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


# --- the methods built earlier, on a net whose layers keep the input's resolution --------


def _full_resolution_net(head_scale: float = 100.0) -> Any:
    """conv -> ReLU -> conv -> ReLU -> GAP -> linear on 8x8: no resize anywhere.

    pytorch-grad-cam normalises each map before resizing it to the input, multicam after;
    at the input's resolution the two orders are the same, so the comparison is the
    methods' own.
    """
    torch.manual_seed(2)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    with torch.no_grad():  # gradients well above the peers' epsilons (convention 6)
        model[6].weight.mul_(head_scale)
    return model


def _pgc(method: Any, model: Any, layers: list[str], x: np.ndarray, targets: Any, **call: Any):
    modules = dict(model.named_modules())
    with method(model, [modules[name] for name in layers]) as cam:
        return cam(torch.from_numpy(x), targets, **call)


@needs_pgc
def test_fem_and_kpca_cam_equal_pytorch_grad_cam() -> None:
    from pytorch_grad_cam import FEM, KPCA_CAM

    model = _full_resolution_net()
    x = _x((3, 3, 8, 8), seed=4)
    for ours_class, theirs_class, atol in ((mc.FEM, FEM, 1e-6), (mc.KPCACAM, KPCA_CAM, 5e-5)):
        theirs = _pgc(theirs_class, model, ["3"], x, None)
        ours = ours_class(model, "3")(x, warn=False)
        np.testing.assert_allclose(ours.maps[:, 0], theirs, atol=atol)


@needs_pgc
def test_finer_cam_with_one_comparison_equals_pytorch_grad_cam() -> None:
    """One comparison class: the softmax weight is 1, differentiated or not (docstring)."""
    from pytorch_grad_cam import FinerCAM

    model = _full_resolution_net()
    x = _x((3, 3, 8, 8), seed=5)
    modules = dict(model.named_modules())
    with FinerCAM(model, [modules["3"]]) as cam:
        theirs = cam(torch.from_numpy(x), comparison_categories=[1], alpha=0.8)
    ours = mc.FinerCAM(model, "3", references=1, alpha=0.8)(x, warn=False)
    np.testing.assert_allclose(ours.maps[:, 0], theirs, atol=1e-5)


@needs_pgc
def test_refine_cam_equals_pytorch_grad_cam() -> None:
    from pytorch_grad_cam import RefineCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _full_resolution_net(head_scale=1000.0)
    x = _x((3, 3, 8, 8), seed=6)
    classes = [0, 3, 4]
    modules = dict(model.named_modules())
    refine = RefineCAM(model, [modules["1"], modules["3"]])
    theirs = refine(torch.from_numpy(x), [ClassifierOutputTarget(c) for c in classes])
    ours = mc.RefineCAM(model, ["1", "3"])(x, targets=classes, warn=False)
    np.testing.assert_allclose(ours.maps[:, 0], theirs, atol=1e-4)  # convention 6


def _torchcam(extractor: Any, x: np.ndarray, classes: list[int], **call: Any) -> np.ndarray:
    with extractor as cam:
        scores = cam.model(torch.from_numpy(x))
        maps = cam(classes, scores, **call)
    return maps[0].detach().numpy()


@needs_torchcam
def test_cam_and_finer_cam_equal_torchcam() -> None:
    from torchcam.methods import CAM, FinerCAM, GradCAM

    model = _full_resolution_net()
    x = _x((3, 3, 8, 8), seed=7)
    classes = [1, 4, 2]
    theirs = _torchcam(CAM(model, "3", fc_layer="6", input_shape=(3, 8, 8)), x, classes)
    ours = mc.ClassActivationMap(model, "3")(x, targets=classes, size=None, relu=False, warn=False)
    np.testing.assert_allclose(ours.maps[:, 0], theirs, atol=1e-5)  # convention 7

    finer = FinerCAM(model, "3", input_shape=(3, 8, 8), base_method=GradCAM)
    theirs = _torchcam(finer, x, classes)
    ours = mc.FinerCAM(model, "3", weighting="mean", alpha=0.6)(
        x, targets=classes, size=None, warn=False
    )
    np.testing.assert_allclose(ours.maps[:, 0], theirs, atol=1e-5)


@needs_torchcam
def test_is_cam_equals_torchcam() -> None:
    from torchcam.methods import ISCAM

    model = _full_resolution_net()
    x = _x((2, 3, 8, 8), seed=8)
    classes = [2, 0]
    theirs = _torchcam(ISCAM(model, "3", input_shape=(3, 8, 8)), x, classes)
    ours = mc.ISCAM(model, "3")(x, targets=classes, size=None, warn=False)
    np.testing.assert_allclose(ours.maps[:, 0], theirs, atol=1e-5)
