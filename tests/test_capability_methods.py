"""FullGrad, ShapleyCAM and LeGrad: the methods on the optional backend capabilities.

Each is checked against an independent computation written here (torch autograd code that
does not go through multicam's backend), on a closed case whose answer is known, and
across torch, Keras, linen and nnx on the same zoo network with the same weights. The
live comparisons with pytorch-grad-cam and torchcam are in ``test_peers_methods.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from conftest import available_frameworks, native_input, require

import multicam as mc
from multicam import algebra, zoo
from multicam.targets import Targets, rest_scores
from multicam.testing import assert_results_agree

PLAIN = {"relu": False, "normalize": False, "size": None, "warn": False}


def _torch() -> Any:
    require("torch")
    import torch

    return torch


def _conv_bn_net(seed: int = 0) -> Any:
    """conv(bias) -> BN -> ReLU -> conv(bias) -> ReLU -> GAP -> linear, eval mode."""
    torch = _torch()
    torch.manual_seed(seed)
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


# --- FullGrad ---------------------------------------------------------------------------


def test_full_grad_on_a_linear_model_is_input_times_weights() -> None:
    """No bias layer with spatial dims: the map is sum_c norm(|x_c W_t,c|) (closed form)."""
    torch = _torch()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 5 * 5, 3)).eval()
    x = _x((2, 2, 5, 5))
    result = mc.FullGrad(model)(x, targets="all", normalize=False, warn=False)
    kernel = model[1].weight.detach().numpy().reshape(3, 2, 5, 5)
    evidence = np.abs(x[:, None] * kernel[None])  # (N, T, C, H, W)
    expected = algebra.normalize(evidence.astype(np.float32), 2).sum(axis=2)
    np.testing.assert_allclose(result.raw, expected, rtol=1e-5, atol=1e-6)
    assert result.layer == "input" and result.activations.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(result.gradients[0, 1], kernel[1], rtol=1e-6)


def test_full_grad_by_hand_with_autograd() -> None:
    """The bias terms from gradients taken with torch hooks here, BN bias by its formula."""
    torch = _torch()
    model = _conv_bn_net()
    x = _x((2, 3, 8, 8), seed=1)
    bn = model[1]
    bn_bias = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    biases = {"0": model[0].bias.detach(), "1": bn_bias, "3": model[3].bias.detach()}
    bound = mc.FullGrad(model).bound
    assert [name for name, _ in bound.bias_layers()] == ["0", "1", "3"]
    for name, bias in bound.bias_layers():
        np.testing.assert_allclose(bias, biases[name].numpy(), rtol=1e-6, atol=1e-7)

    outputs: dict[str, Any] = {}
    hooks = [
        model[int(name)].register_forward_hook(
            lambda m, a, out, name=name: outputs.__setitem__(name, out)
        )
        for name in biases
    ]
    xt = torch.from_numpy(x).requires_grad_(True)
    score = model(xt)[:, 4].sum()
    for hook in hooks:
        hook.remove()
    grads = torch.autograd.grad(score, [xt, *outputs.values()])
    expected = algebra.normalize(np.abs(x * grads[0].numpy()), 2).sum(axis=1)
    for bias, grad in zip(biases.values(), grads[1:], strict=True):
        term = algebra.normalize(np.abs(bias.numpy()[:, None, None] * grad.numpy()), 2).sum(1)
        expected += algebra.resize(term[:, None], (8, 8), "linear")[:, 0]
    result = mc.FullGrad(model)(x, targets=4, normalize=False, warn=False)
    np.testing.assert_allclose(result.raw[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert not any(m._forward_hooks for m in model.modules())  # the model is as it was
    assert all(p.grad is None for p in model.parameters())


def test_full_grad_options_and_errors() -> None:
    model = _conv_bn_net()
    x = _x((1, 3, 8, 8))
    result = mc.FullGrad(model)(x, targets=[[1, 2]])
    assert result.maps.shape == (1, 2, 8, 8) and result.maps.max() == pytest.approx(1.0)
    assert result.weights.shape == (1, 2, 3) and not result.weights.any()
    with pytest.raises(mc.OptionError, match="eigen_smooth"):
        mc.FullGrad(model)(x, eigen_smooth=True)
    flat = _torch().nn.Linear(4, 2)
    with pytest.raises(mc.InputError, match="spatial"):
        mc.FullGrad(flat)(_x((1, 4)), targets=0)


# --- ShapleyCAM ------------------------------------------------------------------------


def test_shapley_cam_weights_by_hand_with_autograd() -> None:
    """w = mean(g - H a / 2) with g and H a from torch.autograd.functional here (ReST)."""
    torch = _torch()
    model = _conv_bn_net(seed=2)
    x = _x((2, 3, 8, 8), seed=2)
    features, head = model[:3], model[3:]
    activations = features(torch.from_numpy(x)).detach()
    classes = [1, 5]

    def rest(a: Any) -> Any:
        z = head(a)
        picked = z[torch.arange(2), classes]
        return (2 * picked - torch.logsumexp(z, dim=1)).sum()

    g = torch.autograd.functional.vjp(rest, activations)[1]
    hvp = torch.autograd.functional.hvp(rest, activations, activations)[1]
    expected = (g - 0.5 * hvp).mean(dim=(2, 3)).numpy()
    result = mc.ShapleyCAM(model, "2")(x, targets=classes, **PLAIN)
    np.testing.assert_allclose(result.weights[:, 0], expected, rtol=1e-4, atol=1e-6)
    logits = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(result.scores[:, 0], rest_scores(logits)[[0, 1], classes], rtol=1e-5)
    # the curvature term is not vacuous here
    assert np.abs(hvp.numpy()).max() > 1e-3 * np.abs(g.numpy()).max()


def test_shapley_cam_on_raw_logits_of_a_relu_net_is_grad_cam() -> None:
    """Logits piecewise linear in the layer: H a = 0, so the weights are Grad-CAM's."""
    model = _conv_bn_net(seed=3)
    x = _x((2, 3, 8, 8), seed=3)
    shapley = mc.ShapleyCAM(model, "2", score="output")(x, targets="all", **PLAIN)
    grad_cam = mc.GradCAM(model, "2")(x, targets="all", **PLAIN)
    np.testing.assert_allclose(shapley.weights, grad_cam.weights, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(shapley.scores, grad_cam.scores)


def test_hessian_vector_products_are_the_gradients_derivative() -> None:
    """H a = d/de grad(a + e a) at e = 0, by central differences in float64."""
    torch = _torch()
    model = _conv_bn_net(seed=4).double()
    x = _x((1, 3, 8, 8), seed=4).astype(np.float64)
    bound = mc.GradCAM(model, "2").bound
    targets = Targets.parse([[3, 0]], 1)
    targets = Targets("classes", 1, classes=targets.classes, score="rest")
    layer_gradients, products = bound.hessian_vector_products(x, targets)
    head = model[3:]
    a = torch.from_numpy(layer_gradients.activations.astype(np.float64))

    def gradient(a: Any, t: int) -> Any:
        a = a.clone().requires_grad_(True)
        z = head(a)
        score = 2 * z[0, [3, 0][t]] - torch.logsumexp(z, dim=1)[0]
        return torch.autograd.grad(score, a)[0]

    step = 1e-5
    for t in range(2):
        numeric = (gradient(a * (1 + step), t) - gradient(a * (1 - step), t)) / (2 * step)
        np.testing.assert_allclose(products[0, t], numeric[0].numpy(), rtol=1e-3, atol=1e-6)


def test_shapley_cam_refuses_rest_for_callable_targets() -> None:
    model = _conv_bn_net()
    with pytest.raises(mc.TargetError, match="rest"):
        mc.ShapleyCAM(model, "2")(_x((1, 3, 8, 8)), targets=lambda out: out[:, 0])
    with pytest.raises(mc.OptionError, match="score"):
        mc.ShapleyCAM(model, "2", score="softmax")


# --- LeGrad ----------------------------------------------------------------------------


def _attention_net(explicit: bool, seed: int = 0) -> Any:
    """patches -> [cls] + tokens -> 2 self-attention blocks -> cls token -> head.

    ``explicit=True`` writes the attention out with an ``nn.Softmax`` module per block;
    ``False`` uses ``nn.MultiheadAttention`` with the same weights.
    """
    torch = _torch()
    nn = torch.nn
    dim, heads = 8, 2

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.softmax = nn.Softmax(dim=-1)

        def forward(self, x: Any) -> Any:
            if not explicit:
                return self.mha(x, x, x, need_weights=False)[0]
            n, length, _ = x.shape
            qkv = nn.functional.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias)
            q, k, v = qkv.reshape(n, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            probabilities = self.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5)
            mixed = (probabilities @ v).transpose(1, 2).reshape(n, length, dim)
            return self.mha.out_proj(mixed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, dim, 2, stride=2)
            self.cls = nn.Parameter(torch.randn(1, 1, dim))
            self.blocks = nn.ModuleList([Attention(), Attention()])
            self.head = nn.Linear(dim, 4)

        def forward(self, x: Any) -> Any:
            tokens = self.embed(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
            for block in self.blocks:
                tokens = tokens + block(tokens)
            return self.head(tokens[:, 0])

    torch.manual_seed(seed)
    net = Net().eval()
    with torch.no_grad():
        for block in net.blocks:
            block.mha.in_proj_weight.mul_(3.0)  # peaked attention
    return net


def test_le_grad_by_hand_with_autograd() -> None:
    torch = _torch()
    net = _attention_net(explicit=True)
    x = _x((2, 3, 8, 8), seed=5)
    probabilities: list[Any] = []
    hooks = [
        block.softmax.register_forward_hook(lambda m, a, out: probabilities.append(out))
        for block in net.blocks
    ]
    logits = net(torch.from_numpy(x))
    for hook in hooks:
        hook.remove()
    grads = torch.autograd.grad(logits[:, 2].sum(), probabilities)
    relevance = np.mean([g.clamp(min=0).mean(dim=(1, 2)).numpy() for g in grads], axis=0)
    expected = relevance[:, 1:].reshape(2, 4, 4)
    layers = ["blocks.0.softmax", "blocks.1.softmax"]
    result = mc.LeGrad(net, layers)(x, targets=2, **PLAIN)
    np.testing.assert_allclose(result.raw[:, 0], expected, rtol=1e-5, atol=1e-8)
    assert result.layer == "blocks.0.softmax, blocks.1.softmax"
    maps = mc.LeGrad(net, layers, reshape=(4, 4))(x, targets=2, warn=False).maps
    assert maps.shape == (2, 1, 8, 8) and np.isclose(maps.max(), 1.0)
    assert not any(m._forward_hooks for m in net.modules())


def test_le_grad_reads_multihead_attention_modules_like_their_softmax() -> None:
    """nn.MultiheadAttention's own probabilities give the explicit model's LeGrad."""
    x = _x((2, 3, 8, 8), seed=6)
    explicit = mc.LeGrad(_attention_net(True), ["blocks.0.softmax", "blocks.1.softmax"])
    module = _attention_net(False)
    torch_mha = mc.LeGrad(module, ["blocks.0.mha", "blocks.1.mha"])
    a = explicit(x, targets="all", **PLAIN)
    b = torch_mha(x, targets="all", **PLAIN)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.raw, b.raw, rtol=1e-4, atol=1e-7)
    logits = module(_torch().from_numpy(x)).detach().numpy()  # the replay is the output
    np.testing.assert_allclose(b.scores, logits, rtol=1e-5, atol=1e-6)


def test_le_grad_errors() -> None:
    net = _attention_net(True)
    x = _x((1, 3, 8, 8))
    with pytest.raises(mc.OptionError, match="attention layers"):
        mc.LeGrad(net, "blocks.0.softmax")
    with pytest.raises(mc.OptionError, match="not self-attention"):
        mc.LeGrad(net, ["embed"])(x, targets=0)
    with pytest.raises(mc.OptionError, match="reshape"):
        mc.LeGrad(net, ["blocks.0.softmax"], reshape=(3, 3))(x, targets=0)
    with pytest.raises(mc.LayerError, match="nearest"):
        mc.LeGrad(net, ["blocks.0.softmaks"])(x, targets=0)


# --- every backend, same network, same weights ------------------------------------------


@functools.lru_cache(maxsize=8)
def _model(framework: str, arch: str) -> Any:
    return zoo.build(arch, framework, zoo.init_weights(arch, 1))


def _explain(method: Any, framework: str, arch: str, layer: Any, inputs: np.ndarray, **call: Any):
    model, options = _model(framework, arch), {}
    if framework == "flax":
        model, options["variables"] = model
    if isinstance(layer, list):
        layer = [zoo.layer_name(name, framework) for name in layer]
    elif layer is not None:
        layer = zoo.layer_name(layer, framework)
    explainer = method(model, layer, **options)
    return explainer(native_input(framework, inputs), warn=False, **call)


@pytest.mark.parametrize("seed", [0, 1])
def test_full_grad_agrees_across_backends(seed: int) -> None:
    inputs = zoo.example_input("resnet_tiny", 2, seed=seed)
    results = {
        framework: _explain(mc.FullGrad, framework, "resnet_tiny", None, inputs, targets=[1, 3])
        for framework in available_frameworks()
    }
    assert_results_agree(results)


@pytest.mark.parametrize(
    ("arch", "layer"), [("resnet_tiny", "block2"), ("digits_cnn", "features.relu3")]
)
def test_shapley_cam_agrees_across_backends(arch: str, layer: str) -> None:
    inputs = zoo.example_input(arch, 2, seed=7)
    results = {
        framework: _explain(mc.ShapleyCAM, framework, arch, layer, inputs, targets=[[1, 2], [0, 4]])
        for framework in available_frameworks()
    }
    assert_results_agree(results)


def test_le_grad_agrees_across_backends() -> None:
    inputs = zoo.example_input("tiny_vit", 2, seed=8)
    layers = ["blocks.0.attn.softmax", "blocks.1.attn.softmax"]
    results = {
        framework: _explain(mc.LeGrad, framework, "tiny_vit", layers, inputs, targets=[2, 7])
        for framework in available_frameworks()
    }
    assert_results_agree(results)


def test_shapley_cam_closed_form_on_the_gap_net(framework: str) -> None:
    """conv -> GAP -> linear, ReST score, derived by hand.

    With ``abar`` the spatial mean of A (K,), ``z = W^T abar + b`` and ``p = softmax(z)``:
    ``s = 2 z_c - logsumexp(z)``, so ``g = (2 W[:, c] - W p) / P`` at every position, and
    ``d^2 s / dA dA' = -W (diag p - p p^T) W^T / P^2`` for every pair of positions, so
    ``H A = -W (diag p - p p^T) W^T abar / P`` everywhere: the weights are
    ``(2 W[:, c] - W p + W (diag p - p p^T) W^T abar / 2) / P``.
    """
    weights = zoo.init_weights("gap_cnn", 0)
    x = native_input(framework, zoo.example_input("gap_cnn", 2, seed=5))
    explainer = zoo.explainer("gap_cnn", framework, "features.relu2", weights, method=mc.ShapleyCAM)
    result = explainer(x, targets=[[1, 3], [0, 4]], **PLAIN)
    kernel = weights["fc.kernel"].astype(np.float64)  # (K, C)
    bias = weights["fc.bias"].astype(np.float64)
    positions = int(np.prod(result.activations.shape[2:]))
    abar = result.activations.astype(np.float64).reshape(2, kernel.shape[0], -1).mean(-1)
    for n, classes in enumerate(([1, 3], [0, 4])):
        z = abar[n] @ kernel + bias
        p = np.exp(z - z.max())
        p /= p.sum()
        covariance = np.diag(p) - np.outer(p, p)
        curvature = kernel @ covariance @ kernel.T @ abar[n] / 2
        for t, c in enumerate(classes):
            expected = (2 * kernel[:, c] - kernel @ p + curvature) / positions
            np.testing.assert_allclose(result.weights[n, t], expected, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(
            result.scores[n], 2 * z[classes] - np.log(np.exp(z).sum()), rtol=1e-5
        )


def test_a_layer_returning_a_tuple_is_refused_by_name() -> None:
    torch = _torch()

    class Pair(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return x, x

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.pair = Pair()
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: Any) -> Any:
            a, _ = self.pair(self.conv(x))
            return self.head(a.mean(dim=(2, 3)))

    net = Net().eval()
    x = _x((1, 3, 4, 4))
    for explain in (mc.GradCAM(net, "pair"), mc.ShapleyCAM(net, "pair"), mc.LeGrad(net, ["pair"])):
        with pytest.raises(mc.LayerError, match="'pair' returns tuple, not a tensor"):
            explain(x, targets=0)
    assert not any(m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("method", [mc.FullGrad, mc.ShapleyCAM])
def test_in_place_relus_and_additions_give_the_out_of_place_maps(method: Any) -> None:
    """A ResNet-style block (``out += identity``, ``ReLU(inplace=True)``), as its twin."""
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, inplace: bool) -> None:
            super().__init__()
            self.inplace = inplace
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=inplace)

        def forward(self, x: Any) -> Any:
            out = self.bn(self.conv(x))
            if self.inplace:
                out += x
            else:
                out = out + x
            return self.relu(out)

    def net(inplace: bool) -> Any:
        torch.manual_seed(9)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=inplace),
            Block(inplace),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        ).eval()
        with torch.no_grad():
            model[2].bn.running_var.uniform_(0.5, 2)
        return model

    x = _x((2, 3, 6, 6), seed=10)
    twin = method(net(False), "2.bn")(x, targets="all", **PLAIN)
    result = method(net(True), "2.bn")(x, targets="all", **PLAIN)
    np.testing.assert_allclose(result.raw, twin.raw, rtol=1e-5, atol=1e-6)


def test_le_grad_infers_a_square_grid_only_from_a_square_input() -> None:
    """16 patches of a 4x16 input are a 2x8 grid, not 4x4: no guess, a question."""
    net = _attention_net(True)
    layers = ["blocks.0.softmax", "blocks.1.softmax"]
    wide = _x((1, 3, 4, 16))  # 2x8 patches: 17 tokens, which a 4x4 grid would also fit
    with pytest.raises(mc.OptionError, match=r"not a square image.*reshape=\(h, w\)"):
        mc.LeGrad(net, layers)(wide, targets=0)
    result = mc.LeGrad(net, layers, reshape=(2, 8))(wide, targets=0, **PLAIN)
    assert result.raw.shape == (1, 1, 2, 8)


def test_a_layer_the_scores_do_not_use_is_named_not_zeroed() -> None:
    """As on Keras and JAX: a layer off the path to the output is an error, not zeros."""
    torch = _torch()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.aux = torch.nn.Conv2d(4, 2, 1)  # runs, but nothing uses its output
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x: Any) -> Any:
            a = self.conv(x)
            self.aux(a)
            return self.head(a.mean(dim=(2, 3)))

    net = Net().eval()
    bound = mc.GradCAM(net, "conv").bound
    with pytest.raises(mc.LayerError, match=r"do not depend on layers \['aux'\]"):
        bound.tensor_gradients(_x((1, 3, 4, 4)), Targets.parse(0, 1), ["conv", "aux"])
    found = bound.tensor_gradients(_x((1, 3, 4, 4)), Targets.parse(0, 1), ["conv"])
    assert found.gradients["conv"].shape == (1, 1, 4, 4, 4)


def test_full_grad_leaves_the_callers_input_alone_when_the_model_writes_into_it() -> None:
    torch = _torch()

    class Scaling(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return x.mul_(2.0)  # in place, as some preprocessing layers do

    model = torch.nn.Sequential(Scaling(), _conv_bn_net())
    x = _x((1, 3, 8, 8))
    before = x.copy()
    tensor = torch.from_numpy(x.copy())
    mc.FullGrad(model)(x, targets=0, warn=False)
    mc.FullGrad(model)(tensor, targets=0, warn=False)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(tensor.numpy(), before)
