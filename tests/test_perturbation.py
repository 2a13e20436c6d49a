"""Score-CAM and Ablation-CAM: hand-derived values, closed forms, chunking, agreement."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from conftest import available_frameworks, native_input, require

import multicam as mc
from multicam import zoo
from multicam.backends import Backend, BoundModel, LayerGradients
from multicam.testing import assert_results_agree

PLAIN = {"relu": False, "normalize": False, "size": None, "warn": False}


# --- a tiny torch net computed independently in NumPy ----------------------------------
# conv 1x1, stride 2, 1 -> 2 channels (the layer) -> global average pool -> linear 2 -> 3.
CONV_W = np.array([1.0, -0.5])
CONV_B = np.array([0.1, 0.3])
FC_W = np.array([[0.7, -1.2, 0.4], [0.9, 0.5, -0.8]])  # (K, C)
FC_B = np.array([0.2, -0.1, 0.05])


def _tiny_torch() -> Any:
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 1, stride=2)
            self.fc = torch.nn.Linear(2, 3)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor(CONV_W).reshape(2, 1, 1, 1))
                self.conv.bias.copy_(torch.tensor(CONV_B))
                self.fc.weight.copy_(torch.tensor(FC_W.T))
                self.fc.bias.copy_(torch.tensor(FC_B))

        def forward(self, x: Any) -> Any:
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    return Tiny().eval()


def _tiny_layer(x: np.ndarray) -> np.ndarray:
    """(N, 2, h, w) conv output of the tiny net, in float64."""
    return CONV_W[None, :, None, None] * x[:, :, ::2, ::2] + CONV_B[None, :, None, None]


def _tiny_forward(x: np.ndarray) -> np.ndarray:
    return _tiny_layer(x).mean(axis=(2, 3)) @ FC_W + FC_B


def _bilinear_up(a: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling of (h, w) by an explicit loop."""
    h = a.shape[0]
    out = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            ci = min(max((i + 0.5) * h / size - 0.5, 0), h - 1)
            cj = min(max((j + 0.5) * h / size - 0.5, 0), h - 1)
            i0, j0 = int(np.floor(ci)), int(np.floor(cj))
            i1, j1 = min(i0 + 1, h - 1), min(j0 + 1, h - 1)
            fi, fj = ci - i0, cj - j0
            out[i, j] = (
                a[i0, j0] * (1 - fi) * (1 - fj)
                + a[i0, j1] * (1 - fi) * fj
                + a[i1, j0] * fi * (1 - fj)
                + a[i1, j1] * fi * fj
            )
    return out


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("weighting", ["softmax", "baseline"])
def test_score_cam_by_hand_on_the_tiny_net(weighting: str) -> None:
    require("torch")
    x = np.random.default_rng(0).normal(size=(2, 1, 6, 6)).astype(np.float32)
    classes = np.array([[0, 2], [1, 1]])
    a = _tiny_layer(x.astype(np.float64))  # (2, 2, 3, 3)
    expected_w = np.empty((2, 2, 2))
    for n in range(2):
        for t in range(2):
            c = classes[n, t]
            s = []
            for k in range(2):
                m = _bilinear_up(a[n, k], 6)
                m = (m - m.min()) / (m.max() - m.min())
                out = _tiny_forward((x[n : n + 1] * m).astype(np.float64))[0]
                s.append(out[c] if weighting == "softmax" else _softmax(out)[c])
            s_arr = np.array(s)
            if weighting == "softmax":
                expected_w[n, t] = _softmax(s_arr)
            else:
                base = _softmax(_tiny_forward(np.zeros_like(x[n : n + 1], np.float64))[0])[c]
                expected_w[n, t] = s_arr - base
    res = mc.ScoreCAM(_tiny_torch(), "conv", weighting=weighting)(x, targets=classes, **PLAIN)
    np.testing.assert_allclose(res.weights, expected_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        res.raw, np.einsum("ntk,nkhw->nthw", expected_w, a), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(res.targets, classes)


def test_ablation_cam_by_hand_on_the_tiny_net() -> None:
    require("torch")
    x = np.random.default_rng(1).normal(size=(3, 1, 4, 4)).astype(np.float32)
    a = _tiny_layer(x.astype(np.float64))
    y = _tiny_forward(x.astype(np.float64))  # (N, C)
    res = mc.AblationCAM(_tiny_torch(), "conv")(x, targets="all", **PLAIN)
    for k in range(2):
        ablated = a.copy()
        ablated[:, k] = 0
        y_k = ablated.mean(axis=(2, 3)) @ FC_W + FC_B
        np.testing.assert_allclose(res.weights[:, :, k], (y - y_k) / y, rtol=1e-4, atol=1e-6)


def test_ablation_cam_closed_form_on_the_gap_net(framework: str) -> None:
    """conv -> GAP -> linear: y_c - y_c^k = W[k, c] mean(A_k), so w_k is exact."""
    weights = zoo.init_weights("gap_cnn", 0)
    x = native_input(framework, zoo.example_input("gap_cnn", 2, seed=3))
    explainer = zoo.explainer(
        "gap_cnn", framework, "features.relu2", weights, method=mc.AblationCAM
    )
    res = explainer(x, targets="all", **PLAIN)
    means = res.activations.astype(np.float64).mean(axis=(2, 3))  # (N, K)
    drop = means[:, None, :] * weights["fc.kernel"].T[None]  # (N, C, K)
    expected = drop / res.scores.astype(np.float64)[:, :, None]
    np.testing.assert_allclose(res.weights, expected, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(
        res.raw, np.einsum("ntk,nkhw->nthw", res.weights, res.activations), rtol=1e-5, atol=1e-4
    )


def test_ablation_cam_zero_score_gives_zero_weights() -> None:
    require("torch")
    import torch

    model = _tiny_torch()
    with torch.no_grad():
        model.fc.weight[1] = 0.0
        model.fc.bias[1] = 0.0
    x = np.ones((1, 1, 4, 4), np.float32)
    res = mc.AblationCAM(model, "conv")(x, targets=1, **PLAIN)
    assert res.scores[0, 0] == 0
    np.testing.assert_array_equal(res.weights, 0)
    np.testing.assert_array_equal(res.raw, 0)


# --- chunking ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", [mc.ScoreCAM, mc.AblationCAM], ids=lambda m: m.__name__)
def test_results_do_not_depend_on_batch_size(method: type[mc.CAM]) -> None:
    require("torch")
    explainer = zoo.explainer("gap_cnn", "torch", "features.relu2", method=method)
    x = zoo.example_input("gap_cnn", 5, seed=2, layout="channels_first")  # N K = 40
    seen: list[int] = []
    name = "outputs" if method is mc.ScoreCAM else "outputs_from_layer"
    original = getattr(explainer.bound, name)

    def spy(inputs: Any, *rest: Any) -> Any:
        seen.append(len(inputs))
        return original(inputs, *rest)

    setattr(explainer.bound, name, spy)
    small = explainer(x, targets="all", batch_size=3, **PLAIN)
    assert seen and max(seen) <= 3 and sum(seen) == 5 * 8
    seen.clear()
    big = explainer(x, targets="all", batch_size=1000, **PLAIN)
    assert seen == [40]
    np.testing.assert_allclose(small.weights, big.weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(small.raw, big.raw, rtol=1e-5, atol=1e-6)
    with pytest.raises(mc.OptionError, match="batch_size"):
        explainer(x, batch_size=0)


# --- across backends -----------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [mc.ScoreCAM, functools.partial(mc.ScoreCAM, weighting="baseline"), mc.AblationCAM],
    ids=["ScoreCAM", "ScoreCAM-baseline", "AblationCAM"],
)
@pytest.mark.parametrize(
    ("arch", "layer"), [("gap_cnn", "features.relu1"), ("resnet_tiny", "block2.relu1")]
)
def test_every_backend_agrees(method: Any, arch: str, layer: str) -> None:
    weights = zoo.init_weights(arch, 1)
    inputs = zoo.example_input(arch, 2, seed=5)
    results = {
        framework: zoo.explainer(arch, framework, layer, weights, method=method)(
            native_input(framework, inputs), targets=[1, 3], warn=False
        )
        for framework in available_frameworks()
    }
    assert_results_agree(results)


def test_outputs_from_layer_with_the_real_activations_is_the_forward(framework: str) -> None:
    """Replacing the layer's output by itself changes nothing (skip connections included)."""
    explainer = zoo.explainer(
        "resnet_tiny", framework, "block2.relu1", zoo.init_weights("resnet_tiny", 1)
    )
    x = native_input(framework, zoo.example_input("resnet_tiny", 2, seed=4))
    res = explainer(x, targets=0, warn=False)
    bound = explainer.bound
    np.testing.assert_allclose(bound.outputs(x), res.outputs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        bound.outputs_from_layer(x, res.activations), res.outputs, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(mc.InputError, match="replacement activations"):
        bound.outputs_from_layer(x, res.activations[:, :, :1])
    with pytest.raises(mc.InputError, match="M = 2"):
        bound.outputs_from_layer(x, res.activations[:1])


# --- state, errors -------------------------------------------------------------------


def test_torch_model_is_unchanged_also_when_its_forward_raises() -> None:
    require("torch")
    import torch

    class Flaky(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 1)
            self.calls = 0

        def forward(self, x: Any) -> Any:
            self.calls += 1
            if self.calls > 1:
                raise ValueError("boom")
            return self.conv(x).mean(dim=(2, 3))

    x = np.ones((1, 1, 3, 3), np.float32)
    for method in (mc.ScoreCAM, mc.AblationCAM):
        model = Flaky().train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="boom") as info:
            method(model, "conv")(x, targets=0)
        assert any("multicam" in note for note in getattr(info.value, "__notes__", []))
        assert model.training and not model.conv._forward_hooks and not model._forward_hooks
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())

    model = zoo.build("gap_cnn", "torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = zoo.example_input("gap_cnn", 2, layout="channels_first")
    mc.AblationCAM(model, "features.relu2")(x, warn=False)
    mc.ScoreCAM(model, "features.relu2")(x, warn=False)
    assert not model.training and not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.is_grad_enabled()


def test_keras_layer_call_is_restored() -> None:
    require("keras")
    model = zoo.build("gap_cnn", "keras")
    layer = model.get_layer("features").get_layer("relu2")
    before = [w.copy() for w in model.get_weights()]
    x = zoo.example_input("gap_cnn", 2)
    mc.AblationCAM(model, "features/relu2")(x, warn=False)
    assert "call" not in vars(layer)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


class _GradientsOnly(BoundModel):
    backend = "toy"
    layout = "channels_first"
    layer_name = "toy"

    def gradients(self, inputs: Any, targets: mc.Targets) -> LayerGradients:
        raise AssertionError("not reached")


class _ToyBackend(Backend):
    name = "toy"
    extra = "toy"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return False

    def bind(self, model: Any, layer: Any, **options: Any) -> BoundModel:
        return _GradientsOnly()


def test_a_backend_lacking_the_capability_says_which() -> None:
    with pytest.raises(mc.BackendError, match=r"\(outputs\).*ScoreCAM"):
        mc.ScoreCAM(object(), backend=_ToyBackend())
    with pytest.raises(mc.BackendError, match=r"outputs_from_layer.*AblationCAM"):
        mc.AblationCAM(object(), backend=_ToyBackend())


def test_callable_targets_and_bad_options_are_refused() -> None:
    require("torch")
    x = np.ones((1, 1, 4, 4), np.float32)
    with pytest.raises(mc.TargetError, match="class targets"):
        mc.ScoreCAM(_tiny_torch(), "conv")(x, targets=lambda out: out[:, 0])
    with pytest.raises(mc.OptionError, match="weighting"):
        mc.ScoreCAM(_tiny_torch(), "conv", weighting="probability")
    with pytest.raises(mc.OptionError, match="batch_size"):
        mc.AblationCAM(_tiny_torch(), "conv", batch_size=True)
