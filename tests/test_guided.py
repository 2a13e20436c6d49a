"""Guided Backpropagation and Guided Grad-CAM: definition, Captum, backends, state."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import available_frameworks, native_input, require

import multicam as mc
from multicam import zoo
from multicam.backends.base import BoundModel
from multicam.targets import Targets

ARCHS = ("digits_cnn", "resnet_tiny", "conv1d_net")


def _torch_net(inplace: bool = False):
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
            self.relu1 = nn.ReLU(inplace=inplace)
            self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
            self.relu2 = nn.ReLU(inplace=inplace)
            self.fc = nn.Linear(5 * 36, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.relu1(self.conv1(x))
            b = self.relu2(self.conv2(a))
            return self.fc(b.flatten(1))

    return Net().eval()


def _by_hand(net, x: np.ndarray, cls: int) -> np.ndarray:
    """Guided backprop written out layer by layer: conv VJPs via autograd, ReLUs in NumPy."""
    import torch

    xt = torch.from_numpy(x).requires_grad_(True)
    z1 = net.conv1(xt)
    a1 = torch.relu(z1).detach().requires_grad_(True)
    z2 = net.conv2(a1)
    a2 = torch.relu(z2).detach().requires_grad_(True)
    out = net.fc(a2.flatten(1))
    (g,) = torch.autograd.grad(out[:, cls].sum(), a2)
    g = g.numpy() * (z2.detach().numpy() > 0) * (g.numpy() > 0)  # guided ReLU 2
    (g,) = torch.autograd.grad(z2, a1, torch.from_numpy(g))
    g = g.numpy() * (z1.detach().numpy() > 0) * (g.numpy() > 0)  # guided ReLU 1
    (g,) = torch.autograd.grad(z1, xt, torch.from_numpy(g))
    return g.numpy()


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_matches_definition(inplace: bool) -> None:
    require("torch")
    net = _torch_net(inplace)
    x = np.random.default_rng(0).normal(size=(3, 2, 6, 6)).astype(np.float32)
    res = mc.GuidedBackprop(net)(x, targets=[[0, 2], [1, 0], [2, 1]], normalize=False)
    assert res.raw.shape == (3, 2, 2, 6, 6)
    for t in range(2):
        for n in range(3):
            want = _by_hand(net, x[[n]], int(res.targets[n, t]))[0]
            np.testing.assert_allclose(res.raw[n, t], want, rtol=1e-5, atol=1e-7)
    assert res.maps.shape == (3, 2, 6, 6)
    np.testing.assert_allclose(res.maps, np.abs(res.raw).max(axis=2), rtol=1e-6)


def test_torch_functional_relu_is_guided() -> None:
    require("torch")
    import torch
    from torch import nn

    class Functional(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.nn.functional.relu(self.inner.conv1(x))
            b = self.inner.conv2(a).relu()
            return self.inner.fc(b.flatten(1))

    net = _torch_net()
    x = np.random.default_rng(1).normal(size=(2, 2, 6, 6)).astype(np.float32)
    a = mc.GuidedBackprop(net)(x, targets=1, normalize=False).raw
    b = mc.GuidedBackprop(Functional(net).eval())(x, targets=1, normalize=False).raw
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_torch_matches_captum() -> None:
    require("torch")
    captum = pytest.importorskip("captum.attr")
    import torch

    model = zoo.build("digits_cnn", "torch")
    x = zoo.example_input("digits_cnn", 3, layout="channels_first")
    target = [4, 1, 7]
    xt = torch.from_numpy(x)
    gb = captum.GuidedBackprop(model).attribute(xt, target=target).detach().numpy()
    res = mc.GuidedBackprop(model)(x, targets=target, reduce="none", normalize=False)
    np.testing.assert_allclose(res.raw[:, 0], gb, rtol=1e-5, atol=1e-8)
    layer = model.features.relu3  # 15x15 -> 28x28: a non-integer scale factor
    ggc = captum.GuidedGradCam(model, layer).attribute(xt, target=target).detach().numpy()
    explainer = mc.GuidedGradCAM(model, "features.relu3")
    res = explainer(
        x, targets=target, reduce="none", normalize=False, interpolation="nearest-floor"
    )
    np.testing.assert_allclose(res.maps[:, 0], ggc, rtol=1e-5, atol=1e-8)
    bilinear = explainer(x, targets=target, reduce="none", normalize=False)
    assert not np.allclose(bilinear.raw, res.raw)  # the default differs from Captum's


@pytest.mark.parametrize("arch", ARCHS)
def test_backends_agree(arch: str) -> None:
    frameworks = available_frameworks()
    weights = zoo.init_weights(arch, seed=1)
    x = zoo.example_input(arch, 2, seed=2)
    layer = zoo.ARCHITECTURES[arch].cam_layers[-1]
    targets = [[1, 0], [3, 2]]
    results = {}
    for framework in frameworks:
        gb = zoo.explainer(arch, framework, layer, weights, method=mc.GuidedBackprop)
        ggc = zoo.explainer(arch, framework, layer, weights, method=mc.GuidedGradCAM)
        xn = native_input(framework, x)
        results[framework] = (
            gb(xn, targets=targets, reduce="none", normalize=False).raw,
            ggc(xn, targets=targets).maps,
        )
    reference = results[frameworks[0]]
    assert reference[0].shape == (2, 2, x.shape[-1], *x.shape[1:-1])  # channels-first
    assert np.abs(reference[0]).max() > 0
    for framework, (raw, maps) in results.items():
        scale = np.abs(reference[0]).max()
        np.testing.assert_allclose(raw, reference[0], atol=1e-5 * scale, err_msg=framework)
        np.testing.assert_allclose(maps, reference[1], atol=1e-4, err_msg=framework)


def test_guided_gradcam_formula() -> None:
    require("torch")
    model = zoo.build("gap_cnn", "torch")
    x = zoo.example_input("gap_cnn", 2, layout="channels_first")
    cam = mc.GradCAM(model, "features.relu2")(x, targets=[1, 2], normalize=False)
    gb = mc.GuidedBackprop(model)(x, targets=[1, 2], reduce="none", normalize=False)
    res = mc.GuidedGradCAM(model, "features.relu2")(x, targets=[1, 2], reduce="sum_abs")
    np.testing.assert_allclose(res.cam, cam.maps, rtol=1e-6)
    np.testing.assert_allclose(res.raw, gb.raw * cam.maps[:, :, None], rtol=1e-5, atol=1e-9)
    want = np.abs(res.raw).sum(2)
    want /= want.reshape(2, 1, -1).max(-1)[..., None, None]
    np.testing.assert_allclose(res.maps, want, rtol=1e-5)
    assert res.maps.max() == pytest.approx(1.0)


def test_torch_model_unchanged() -> None:
    require("torch")
    model = _torch_net(inplace=True)
    model.conv1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x = np.random.default_rng(0).normal(size=(2, 2, 6, 6)).astype(np.float32)
    mc.GuidedGradCAM(model, "relu1")(x, targets="all")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    import torch

    assert not torch.overrides._get_current_function_mode_stack()


def test_keras_model_unchanged() -> None:
    require("keras")
    import keras

    keras.utils.set_random_seed(0)  # unseeded, the ReLUs were sometimes all dead
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.ReLU(name="relu")(keras.layers.Conv2D(3, 3, name="conv2")(h))
    h = keras.layers.Activation("relu", name="act")(h)
    out = keras.layers.Dense(3, activation="relu", name="dense")(keras.layers.Flatten()(h))
    out = keras.layers.Dense(2, name="head")(out)
    model = keras.Model(inputs, out)
    before = {layer.name: dict(vars(layer)) for layer in model.layers}
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 2)).astype(np.float32)
    res = mc.GuidedBackprop(model)(x, targets=[0, 1], normalize=False)
    for layer in model.layers:
        assert "call" not in vars(layer)
        for key in ("activation", "call"):
            assert vars(layer).get(key) is before[layer.name].get(key)
    assert model.get_layer("conv").activation is keras.activations.relu
    # every ReLU here is guided: no negative gradient flows through a ReLU into conv's
    # output, so the result differs from the plain input gradient
    import tensorflow as tf

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        s = tf.gather(model(xt), [[0], [1]], axis=1, batch_dims=1)
    plain = np.moveaxis(tape.gradient(s, xt).numpy(), -1, 1)
    assert np.abs(plain).max() > 0  # the seeded model's ReLUs let the targets through
    assert not np.allclose(res.raw[:, 0], plain)


def test_keras_restored_when_forward_raises() -> None:
    require("keras")
    import keras

    class Boom(keras.layers.Layer):
        armed = False

        def call(self, x):
            if self.armed:
                raise RuntimeError("boom")
            return x

    inputs = keras.Input((4, 4, 1))
    h = keras.layers.Conv2D(2, 3, activation="relu", name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    conv = model.get_layer("conv")
    explainer = mc.GuidedBackprop(model)
    boom = Boom()
    model2 = keras.Sequential([keras.Input((4, 4, 1)), conv, boom])
    boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        mc.GuidedBackprop(model2, layer="conv")(np.ones((1, 4, 4, 1), np.float32))
    assert conv.activation is keras.activations.relu
    assert "activation" in vars(conv) and vars(conv)["activation"] is keras.activations.relu
    explainer(np.ones((1, 4, 4, 1), np.float32), targets=0)


@pytest.mark.parametrize("framework", ["flax", "nnx"])
def test_jax_relu_restored(framework: str) -> None:
    require(framework)
    import flax.linen
    import jax
    from flax import nnx

    relu = jax.nn.relu
    explainer = zoo.explainer("conv1d_net", framework, "features.relu2", method=mc.GuidedBackprop)
    x = zoo.example_input("conv1d_net", 2)
    explainer(x, targets=1)
    assert jax.nn.relu is relu and flax.linen.relu is relu and nnx.relu is relu
    with pytest.raises(mc.TargetError):
        explainer(x, targets=99)
    assert jax.nn.relu is relu and flax.linen.relu is relu and nnx.relu is relu


def test_backend_without_capability() -> None:
    require("torch")

    class Plain(BoundModel):
        backend = "plain"
        layout = "channels_first"
        layer_name = "x"

        def gradients(self, inputs, targets):
            raise AssertionError

    with pytest.raises(mc.BackendError, match="guided backpropagation"):
        Plain().guided_gradients(np.zeros((1, 1, 2, 2)), Targets.parse(0, 1))
    model = zoo.build("gap_cnn", "torch")
    explainer = mc.GuidedBackprop(model)
    explainer.bound = Plain()
    with pytest.raises(mc.BackendError, match="GuidedBackprop"):
        explainer(np.zeros((1, 3, 12, 12), np.float32))


def test_options_checked() -> None:
    require("torch")
    model = zoo.build("gap_cnn", "torch")
    x = zoo.example_input("gap_cnn", 1, layout="channels_first")
    with pytest.raises(mc.OptionError):
        mc.GuidedBackprop(model)(x, reduce="mean")
    with pytest.raises(mc.OptionError):
        mc.GuidedGradCAM(model, "features.relu2")(x, interpolation="cubic")
    with pytest.raises(mc.LayerError):
        mc.GuidedGradCAM(model, None)
