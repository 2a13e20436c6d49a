"""PyTorch backend: golden values, Captum equality, state left untouched, clear errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import multicam as mc  # noqa: E402
from multicam import zoo  # noqa: E402


class OneConvNet(nn.Module):
    """Captum's ``BasicModel_ConvNet_One_Conv``, rebuilt: conv 3x3 (ones) -> ReLU -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, 1)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(8, 4)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            self.conv1.weight.fill_(1.0)
            self.conv1.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc1.weight.copy_(torch.cat([torch.ones(4, 5), -torch.ones(4, 3)], dim=1))
            self.fc1.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.fc1(self.relu1(self.conv1(x)).view(-1, 8)))


# Derivation, input x[i, j] = 4 i + j on a 4x4 grid:
#   each 3x3 window sums to 36 a + 9 b + 45 -> conv1 = [[45, 54], [81, 90]] + bias
#   channel 0: [[-5, 4], [31, 40]]    channel 1: [[-30, -21], [6, 15]]
#   score 0 = sum(relu(ch0)) + relu(ch1)[0, 0] - the other three of relu(ch1) = 54 > 0
#   at conv1: d/d ch0 = [[0, 1], [1, 1]] (mean 0.75), d/d ch1 = [[0, 0], [-1, -1]] (mean -0.5)
#      -> 0.75 ch0 - 0.5 ch1 = [[11.25, 13.5], [20.25, 22.5]]
#   at relu1: d/d ch0 = 1 everywhere (mean 1), d/d ch1 = [[1, -1], [-1, -1]] (mean -0.5)
#      -> relu(ch0) - 0.5 relu(ch1) = [[0, 4], [28, 32.5]]
GOLDEN = {
    "conv1": [[11.25, 13.5], [20.25, 22.5]],
    "relu1": [[0.0, 4.0], [28.0, 32.5]],
}


@pytest.mark.parametrize("layer", sorted(GOLDEN))
def test_golden_values_of_the_one_conv_net(layer: str) -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    res = mc.GradCAM(OneConvNet(), layer)(x, targets=0, relu=False, normalize=False, size=None)
    np.testing.assert_allclose(res.raw[0, 0], GOLDEN[layer], rtol=1e-6)
    np.testing.assert_allclose(res.maps, res.raw)
    np.testing.assert_allclose(res.scores, [[54.0]])


@pytest.mark.parametrize("arch", ["digits_cnn", "resnet_tiny", "conv1d_net"])
def test_equals_captum_layer_grad_cam(arch: str) -> None:
    captum_layer = pytest.importorskip("captum.attr").LayerGradCam
    model = zoo.build(arch, "torch", zoo.init_weights(arch, 3))
    x = zoo.example_input(arch, 3, seed=3, layout="channels_first")
    for layer in zoo.ARCHITECTURES[arch].cam_layers:
        ours = mc.GradCAM(model, layer)(
            x, targets=[1, 0, 2], relu=False, normalize=False, size=None
        )
        theirs = captum_layer(model, model.get_submodule(layer)).attribute(
            torch.from_numpy(x), target=[1, 0, 2], relu_attributions=False
        )
        np.testing.assert_allclose(
            ours.maps[:, 0], theirs[:, 0].detach().numpy(), rtol=1e-5, atol=1e-6
        )


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [p.grad for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "params": [p.detach().clone() for p in model.parameters()],
        "grad_mode": torch.is_grad_enabled(),
    }


def _assert_same_state(before: dict[str, object], after: dict[str, object]) -> None:
    for key in ("training", "requires_grad", "hooks", "grad_mode"):
        assert before[key] == after[key], key
    assert all(g is None for g in after["grad"])  # type: ignore[union-attr]
    for a, b in zip(before["params"], after["params"], strict=True):  # type: ignore[call-overload]
        assert torch.equal(a, b)


@pytest.mark.parametrize("train_mode", [False, True])
def test_model_state_is_left_as_it_was(train_mode: bool) -> None:
    model = zoo.build("resnet_tiny", "torch").train(train_mode)
    model.get_submodule("fc").weight.requires_grad_(False)
    before = _state(model)
    mc.GradCAM(model, "block2")(zoo.example_input("resnet_tiny", layout="channels_first"), "all")
    _assert_same_state(before, _state(model))


def test_model_state_is_left_as_it_was_when_forward_raises() -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.conv(x)
            raise RuntimeError("boom in the head")

    model = Failing()
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom in the head") as info:
        mc.GradCAM(model, "conv")(np.zeros((1, 3, 8, 8), np.float32))
    assert any("multicam" in note for note in info.value.__notes__)
    _assert_same_state(before, _state(model))


def test_no_parameter_gradients_and_nothing_below_the_layer_is_differentiated() -> None:
    model = zoo.build("digits_cnn", "torch")
    calls: list[str] = []
    for name, module in model.named_modules():
        if name:
            module.register_full_backward_hook(lambda m, gi, go, name=name: calls.append(name))
    warnings.simplefilter("ignore", UserWarning)  # "no inputs require gradients": by design
    mc.GradCAM(model, "features.relu3")(zoo.example_input("digits_cnn", layout="channels_first"))
    assert calls, "the head should be differentiated"
    below = {
        "features.conv1",
        "features.relu1",
        "features.conv2",
        "features.relu2",
        "features.conv3",
    }
    assert not below & set(calls)
    assert all(p.grad is None for p in model.parameters())


def test_many_targets_equal_separate_calls_with_one_forward() -> None:
    model = zoo.build("digits_cnn", "torch")
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    x = zoo.example_input("digits_cnn", 2, layout="channels_first")
    cam = mc.GradCAM(model, "features.relu4")
    together = cam(x, targets=[[1, 7, 3], [0, 0, 9]])
    assert len(forwards) == 1
    for t, column in enumerate([[1, 0], [7, 0], [3, 9]]):
        alone = cam(x, targets=column)
        np.testing.assert_allclose(together.raw[:, t], alone.raw[:, 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(together.maps[:, t], alone.maps[:, 0], atol=1e-6)


def test_layer_by_object_and_tensor_input() -> None:
    model = zoo.build("gap_cnn", "torch")
    x = zoo.example_input("gap_cnn", layout="channels_first")
    by_name = mc.GradCAM(model, "features.relu2")(x, 1)
    by_object = mc.GradCAM(model, model.features.relu2)(torch.from_numpy(x), 1)
    assert by_object.layer == "features.relu2"
    np.testing.assert_allclose(by_name.maps, by_object.maps, atol=1e-6)


def test_callable_target() -> None:
    model = zoo.build("gap_cnn", "torch")
    x = zoo.example_input("gap_cnn", layout="channels_first")
    res = mc.GradCAM(model, "features.relu2")(x, targets=lambda out: out[:, 2] - out[:, 0])
    a = mc.GradCAM(model, "features.relu2")(x, targets=[[2, 0], [2, 0]], normalize=False)
    np.testing.assert_allclose(res.raw[:, 0], a.raw[:, 0] - a.raw[:, 1], rtol=1e-5, atol=1e-6)
    assert res.targets is None


def test_half_precision_model_gives_float32_maps() -> None:
    model = zoo.build("gap_cnn", "torch")
    x = zoo.example_input("gap_cnn", layout="channels_first")
    full = mc.GradCAM(model, "features.relu2")(x, 1)
    half = mc.GradCAM(model.to(torch.bfloat16), "features.relu2")(x, 1)
    assert half.maps.dtype == np.float32
    np.testing.assert_allclose(half.maps, full.maps, atol=0.05)


def test_errors_are_clear() -> None:
    model = zoo.build("digits_cnn", "torch")
    x = zoo.example_input("digits_cnn", 2, layout="channels_first")
    with pytest.raises(mc.LayerError, match=r"features\.relu4"):
        mc.GradCAM(model, "features.relu5")
    with pytest.raises(mc.LayerError, match="no spatial dimensions"):
        mc.GradCAM(model, "classifier.dense1")(x)
    with pytest.raises(mc.LayerError, match="not part of the model"):
        mc.GradCAM(model, nn.ReLU())
    with pytest.raises(mc.TargetError, match="out of range"):
        mc.GradCAM(model, "features.relu4")(x, targets=10)
    with pytest.raises(mc.TargetError, match="3 samples but the batch has 2"):
        mc.GradCAM(model, "features.relu4")(x, targets=[1, 2, 3])
    with pytest.raises(mc.InputError, match="empty"):
        mc.GradCAM(model, "features.relu4")(x[:0])
    bad = x.copy()
    bad[1, 0, 3, 3] = np.nan
    with pytest.raises(mc.NonFiniteError, match=r"samples \[1\]"):
        mc.GradCAM(model, "features.relu4")(bad)
    with pytest.raises(mc.InputError, match=r"channels-first.*np\.moveaxis\(x, -1, 1\)") as info:
        mc.GradCAM(model, "features.relu4")(np.moveaxis(x, 1, -1))  # NHWC given to torch
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own, still reachable
    with pytest.raises(mc.OptionError, match="interpolation"):
        mc.GradCAM(model, "features.relu4")(x, interpolation="bicubic")
    with pytest.raises(mc.OptionError, match="2 spatial dims"):
        mc.GradCAM(model, "features.relu4")(x, size=(3, 4, 5))


def test_shared_layer_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x)).mean((2, 3))

    with pytest.raises(mc.LayerError, match="ran 2 times"):
        mc.GradCAM(Twice(), "conv")(np.ones((1, 3, 5, 5), np.float32))
