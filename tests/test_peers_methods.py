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
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

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


def _conv_bn_net() -> Any:
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 6),
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    return model


def _x(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


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
