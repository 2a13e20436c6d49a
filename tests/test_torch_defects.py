"""PyTorch backend defects: in-place ops after the layer, training mode, guided backprop.

Each in-place model has an out-of-place twin with the same weights; multicam must give the
twin's activations, gradients, scores and maps (the activations are the layer's output
before the in-place op after it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import multicam as mc  # noqa: E402
from multicam.backends.base import LayerGradients  # noqa: E402
from multicam.backends.torch import TorchBackend, TorchBoundModel  # noqa: E402
from multicam.targets import Targets  # noqa: E402


def _bind(model: nn.Module, layer: str) -> TorchBoundModel:
    return TorchBackend().bind(model, layer)


def _gradients(model: nn.Module, layer: str, x: np.ndarray, targets: Any = "all") -> LayerGradients:
    return _bind(model, layer).gradients(x, Targets.parse(targets, len(x)))


def _guided(model: nn.Module, x: np.ndarray, targets: Any = "all") -> LayerGradients:
    layer = next(name for name, _ in model.named_modules() if name)
    return _bind(model, layer).guided_gradients(x, Targets.parse(targets, len(x)))


def _input(shape: tuple[int, ...] = (2, 3, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _twins(build: Callable[[bool], nn.Module]) -> tuple[nn.Module, nn.Module]:
    """The in-place model and its out-of-place twin, same weights and BN statistics."""
    torch.manual_seed(0)
    inplace = build(True)
    with torch.no_grad():  # non-trivial BN statistics, so BN outputs are not just normalised
        for module in inplace.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    twin = build(False)
    twin.load_state_dict(inplace.state_dict())
    return inplace.eval(), twin.eval()


# ---------------------------------------------------------------- models with in-place ops


class VGGLike(nn.Module):
    """vgg's ``features.18`` (conv, then ``ReLU(inplace=True)``) and mobilenet_v2's
    ``features.18.1`` (BN, then ``ReLU6(inplace=True)``)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU6(inplace)),
        )
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class DenseNetLike(nn.Module):
    """densenet121: ``features`` ends in ``norm5``; forward applies ``F.relu(inplace=True)``."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 4, 3, padding=1))
        self.features.add_module("norm5", nn.BatchNorm2d(4))
        self.classifier = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=self.inplace)
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


class BasicBlock(nn.Module):
    """torchvision's resnet BasicBlock: ``out += identity`` right after ``bn2``."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.inplace:
            out += identity
        else:
            out = out + identity
        return self.relu(out)


class ResNetLike(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer4 = nn.Sequential(BasicBlock(inplace), BasicBlock(inplace))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer4(self.conv1(x)).mean((2, 3)))


class MethodReLU(nn.Module):
    """``x.relu_()`` after the layer."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = h.relu_() if self.inplace else h.relu()
        return self.fc(h.mean((2, 3)))


class SavedThenModified(nn.Module):
    """An inference-only pattern: ``a`` is saved by ``conv`` for backward, then ReLU'd in
    place; autograd refuses to backpropagate unless the saved tensor was copied."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.layer = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.layer(x)
        b = self.conv(a)
        a = a.relu_() if self.inplace else a.relu()
        return self.fc((b + a).mean((2, 3)))


IN_PLACE_CASES = [
    (VGGLike, "features.0"),  # conv, then nn.ReLU(inplace=True)
    (VGGLike, "features.2.1"),  # BN, then nn.ReLU6(inplace=True)
    (DenseNetLike, "features"),  # then F.relu(inplace=True)
    (DenseNetLike, "features.norm5"),
    (ResNetLike, "layer4.1.bn2"),  # then out += identity
    (ResNetLike, "layer4.0.bn2"),
    (MethodReLU, "conv"),  # then x.relu_()
    (SavedThenModified, "layer"),
]


@pytest.mark.parametrize(("build", "layer"), IN_PLACE_CASES)
def test_in_place_op_after_the_layer_gives_the_out_of_place_twins_gradients(
    build: Callable[[bool], nn.Module], layer: str
) -> None:
    model, twin = _twins(build)
    x = _input()
    ours = _gradients(model, layer, x)
    want = _gradients(twin, layer, x)
    np.testing.assert_allclose(ours.activations, want.activations, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.gradients, want.gradients, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.scores, want.scores, rtol=1e-6, atol=1e-6)
    # The layer's true output, from before the in-place ReLU / addition changed it.
    assert (ours.activations < 0).any()
    maps = mc.GradCAM(model, layer)(x, targets=[0, 2], normalize=False)
    np.testing.assert_allclose(
        maps.raw, mc.GradCAM(twin, layer)(x, targets=[0, 2], normalize=False).raw, atol=1e-5
    )


def test_activations_are_the_layer_output_before_the_in_place_relu() -> None:
    model, _ = _twins(VGGLike)
    x = _input()
    with torch.no_grad():
        want = model.features[0](torch.from_numpy(x)).numpy()  # before features.1 ReLUs it
    np.testing.assert_allclose(_gradients(model, "features.0", x).activations, want, atol=1e-6)


@pytest.mark.parametrize(("build", "layer"), IN_PLACE_CASES)
def test_ablation_cam_with_an_in_place_op_after_the_layer(
    build: Callable[[bool], nn.Module], layer: str
) -> None:
    model, twin = _twins(build)
    x = _input()
    ours = mc.AblationCAM(model, layer)(x, targets=1, warn=False)
    want = mc.AblationCAM(twin, layer)(x, targets=1, warn=False)
    np.testing.assert_allclose(ours.raw, want.raw, rtol=1e-5, atol=1e-5)


def test_outputs_from_layer_leaves_the_callers_activations_alone() -> None:
    model, twin = _twins(VGGLike)
    x = _input()
    replacement = _input((2, 4, 8, 8), seed=1)
    before = replacement.copy()
    out = _bind(model, "features.0").outputs_from_layer(x, replacement)
    np.testing.assert_array_equal(replacement, before)  # not ReLU'd in place
    np.testing.assert_allclose(
        out, _bind(twin, "features.0").outputs_from_layer(x, replacement), atol=1e-6
    )


@pytest.mark.parametrize("build", [VGGLike, DenseNetLike, ResNetLike, SavedThenModified])
def test_guided_methods_with_in_place_ops(build: Callable[[bool], nn.Module]) -> None:
    model, twin = _twins(build)
    x = _input()
    ours, want = _guided(model, x), _guided(twin, x)
    np.testing.assert_allclose(ours.gradients, want.gradients, rtol=1e-5, atol=1e-6)
    assert ours.guided_relus == want.guided_relus
    layer = IN_PLACE_CASES[[b for b, _ in IN_PLACE_CASES].index(build)][1]
    np.testing.assert_allclose(
        mc.GuidedGradCAM(model, layer)(x, targets=0).raw,
        mc.GuidedGradCAM(twin, layer)(x, targets=0).raw,
        rtol=1e-5,
        atol=1e-6,
    )


class ModifiesItsInput(nn.Module):
    """Normalises its input in place, as some preprocessing wrappers do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.5).mul_(2.0)
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


class Plain(ModifiesItsInput):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_model_that_modifies_its_input_in_place_leaves_the_callers_input_alone(
    as_tensor: bool,
) -> None:
    model = ModifiesItsInput().eval()
    x = _input()
    given = torch.from_numpy(x.copy()) if as_tensor else x.copy()
    first = mc.GradCAM(model, "conv")(given, targets=0)
    np.testing.assert_array_equal(np.asarray(given), x)
    second = mc.GradCAM(model, "conv")(given, targets=0)
    np.testing.assert_array_equal(first.raw, second.raw)
    mc.ScoreCAM(model, "conv")(given, targets=0, warn=False)
    guided = mc.GuidedBackprop(model)(given, targets=0, normalize=False)
    np.testing.assert_array_equal(np.asarray(given), x)
    # d/dx of f(2 (x - 0.5)) is 2 f'(.): compare with the same model on pre-normalised input
    plain = Plain().eval()
    plain.load_state_dict(model.state_dict())
    want = mc.GuidedBackprop(plain)((x - 0.5) * 2.0, targets=0, normalize=False)
    np.testing.assert_allclose(guided.raw, 2.0 * want.raw, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ input hints


class FixedSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def test_a_spatial_size_problem_is_named_when_torch_says_so() -> None:
    with pytest.raises(mc.InputError, match=r"fixed input spatial size.*\(10, 10\)"):
        mc.GradCAM(FixedSize(), "conv")(_input((2, 3, 10, 10)))
    with pytest.raises(mc.InputError, match="fixed input spatial size"):
        mc.GradCAM(FixedSize(), "conv")(_input((1, 3, 2, 2)))
    small = nn.Sequential(nn.Conv2d(3, 4, 5), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(mc.InputError, match=r"Kernel size.*fixed input spatial size.*\(3, 3\)"):
        mc.GradCAM(small, "0")(_input((1, 3, 3, 3)))


def test_no_spatial_size_claim_without_evidence() -> None:
    class WrongDtypeHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3, dtype=torch.float64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    with pytest.raises(mc.InputError) as info:
        mc.GradCAM(WrongDtypeHead(), "conv")(_input())
    assert "spatial size" not in str(info.value)
    assert "see the exception this one was raised from" in str(info.value)


# ----------------------------------------------------------------------- training mode


class TrainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv1", nn.Conv2d(3, 6, 3, padding=1))
        self.features.add_module("bn1", nn.BatchNorm2d(6))
        self.features.add_module("relu1", nn.ReLU())
        self.features.add_module("conv2", nn.Conv2d(6, 6, 3, padding=1))
        self.drop = nn.Dropout(p=0.5)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x).mean((2, 3))))


def _train_net() -> nn.Module:
    torch.manual_seed(0)
    model = TrainNet()
    with torch.no_grad():
        model.features.bn1.running_mean.uniform_(-0.5, 0.5)
        model.features.bn1.running_var.uniform_(0.5, 2.0)
    return model


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_training_mode_model_is_explained_in_eval_mode() -> None:
    model = _train_net()
    x = _input()
    want = mc.GradCAM(model.eval(), "features.conv2")(x, targets="all")
    model.train()
    buffers = _buffers(model)
    first = mc.GradCAM(model, "features.conv2")(x, targets="all", warn=False)
    second = mc.GradCAM(model, "features.conv2")(x, targets="all", warn=False)
    np.testing.assert_array_equal(first.raw, second.raw)
    np.testing.assert_allclose(first.raw, want.raw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(first.maps, want.maps, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert all(_flags(model))


def test_training_report_names_the_modules_that_depend_on_it() -> None:
    model = _train_net().train()
    report = _gradients(model, "features.conv2", _input()).training
    # TrainNet itself is a user class whose source never reads `training`: not counted.
    assert report == ("features.bn1 (BatchNorm2d)", "drop (Dropout)")
    assert _gradients(model.eval(), "features.conv2", _input()).training == ()
    assert _guided(model.train(), _input()).training == report


def test_mixed_training_flags_are_restored_exactly() -> None:
    model = _train_net().eval()
    model.features.bn1.train()
    model.drop.train()
    model.features.relu1.train()
    flags = _flags(model)
    buffers = _buffers(model)
    bound = _bind(model, "features.conv2")
    x = _input()
    result = bound.gradients(x, Targets.parse(0, 2))
    assert result.training == ("features.bn1 (BatchNorm2d)", "drop (Dropout)")
    want = _gradients(_train_net().eval(), "features.conv2", x, 0)
    np.testing.assert_allclose(result.gradients, want.gradients, rtol=1e-6, atol=1e-7)
    for run in (
        lambda: bound.outputs(x),
        lambda: bound.outputs_from_layer(x, result.activations),
        lambda: bound.guided_gradients(x, Targets.parse(0, 2)),
    ):
        run()
        assert _flags(model) == flags
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    np.testing.assert_allclose(
        bound.outputs(x), _bind(_train_net().eval(), "fc").outputs(x), rtol=1e-6, atol=1e-7
    )


def test_score_and_ablation_cam_run_a_training_mode_model_in_eval_mode() -> None:
    x = _input()
    for method in (mc.ScoreCAM, mc.AblationCAM):
        want = method(_train_net().eval(), "features.conv2")(x, targets=1, warn=False)
        model = _train_net().train()
        buffers = _buffers(model)
        got = method(model, "features.conv2")(x, targets=1, warn=False)
        np.testing.assert_allclose(got.raw, want.raw, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
        assert all(_flags(model))


def test_training_flags_are_restored_when_the_forward_raises() -> None:
    class Raises(TrainNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.features(x)
            seen.append(self.drop.training or self.features.bn1.training)
            raise RuntimeError("boom after the layer")

    seen: list[bool] = []
    model = Raises()
    model.train()
    model.fc.eval()
    flags = _flags(model)
    bound = _bind(model, "features.conv2")
    for run in (
        lambda: bound.gradients(_input(), Targets.parse(0, 2)),
        lambda: bound.outputs(_input()),
        lambda: bound.outputs_from_layer(_input(), np.zeros((2, 6, 8, 8), np.float32)),
        lambda: bound.guided_gradients(_input(), Targets.parse(0, 2)),
    ):
        with pytest.raises(RuntimeError, match="boom after the layer"):
            run()
        assert _flags(model) == flags
    assert seen == [False] * 4  # the forward itself ran in eval mode


class Watched(nn.Module):
    """Records every assignment to its ``training`` flag."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.sets: list[bool] = []

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "training" and "sets" in self.__dict__:
            self.sets.append(value)
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_an_eval_mode_model_is_not_touched() -> None:
    model = Watched().eval()
    model.sets.clear()
    bound = _bind(model, "conv")
    result = bound.gradients(_input(), Targets.parse(0, 2))
    bound.outputs(_input())
    bound.outputs_from_layer(_input(), result.activations)
    bound.guided_gradients(_input(), Targets.parse(0, 2))
    assert model.sets == [] and result.training == ()

    model.train()
    model.sets.clear()
    assert bound.gradients(_input(), Targets.parse(0, 2)).training == (
        "and 1 other module in training mode",
    )
    assert model.sets == [False, True] and model.training


def test_threads_explaining_a_training_mode_model_get_eval_mode_maps() -> None:
    x = _input()
    want = mc.GradCAM(_train_net().eval(), "features.conv2")(x, targets="all").raw
    model = _train_net().train()
    cam = mc.GradCAM(model, "features.conv2")
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(cam(x, targets="all", warn=False).raw)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 20
    for raw in results:
        np.testing.assert_allclose(raw, want, rtol=1e-6, atol=1e-7)
    assert all(_flags(model))


# ------------------------------------------------------------- guided on non-ReLU nets


class EfficientNetLike(nn.Module):
    """An MBConv block: expand 1x1, depthwise 3x3, project 1x1, each with BN and SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.SiLU(True))
        self.depthwise = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.SiLU()
        )
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.project(self.depthwise(self.expand(h)))
        return self.fc(h.mean((2, 3)))


class ConvNeXtLike(nn.Module):
    """A ConvNeXt block: depthwise 7x7, LayerNorm (channels last), Linear, GELU, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.dwconv = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.pwconv1 = nn.Linear(8, 32)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(32, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.pwconv2(self.act(self.pwconv1(h))).permute(0, 3, 1, 2)
        return self.head((x + h).mean((2, 3)))


class ReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU6(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(self.relu1(self.conv1(x))))
        h = self.relu2(h).relu_()
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize(
    ("build", "relus", "unguided"),
    [
        (EfficientNetLike, 0, ("SiLU",)),
        (ConvNeXtLike, 0, ("GELU",)),
        (ReLUNet, 4, ()),
    ],
)
def test_guided_gradients_count_relus_and_name_other_nonlinearities(
    build: Callable[[], nn.Module], relus: int, unguided: tuple[str, ...]
) -> None:
    torch.manual_seed(0)
    model, x = build().eval(), _input((2, 3, 16, 16))
    result = _guided(model, x)
    assert result.guided_relus == relus
    assert result.unguided_activations == unguided
    assert _gradients(model, "stem" if relus == 0 else "conv1", x).guided_relus is None


ACTIVATIONS: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
    ("SiLU", F.silu),
    ("SiLU", lambda t: F.silu(t, inplace=True)),
    ("SiLU", nn.SiLU()),
    ("GELU", F.gelu),
    ("GELU", lambda t: F.gelu(t, approximate="tanh")),
    ("Sigmoid", torch.sigmoid),
    ("Sigmoid", lambda t: t.sigmoid()),
    ("Sigmoid", lambda t: t.sigmoid_()),
    ("Sigmoid", nn.Sigmoid()),
    ("Tanh", torch.tanh),
    ("Tanh", lambda t: t.tanh_()),
    ("Tanh", nn.Tanh()),
    ("Hardswish", F.hardswish),
    ("Hardswish", nn.Hardswish(inplace=True)),
    ("ELU", F.elu),
    ("ELU", nn.ELU(inplace=True)),
    ("LeakyReLU", F.leaky_relu),
    ("LeakyReLU", nn.LeakyReLU(0.1, inplace=True)),
    ("Mish", F.mish),
    ("Mish", nn.Mish(inplace=True)),
    ("Softplus", F.softplus),
    ("Softplus", nn.Softplus()),
    ("Hardtanh", nn.Hardtanh()),
]


@pytest.mark.parametrize(("kind", "activation"), ACTIVATIONS)
def test_each_unguided_nonlinearity_is_named(
    kind: str, activation: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(activation(self.conv(x)).mean((2, 3)))

    result = _guided(Net().eval(), _input())
    assert result.unguided_activations == (kind,)
    assert result.guided_relus == 0


def test_nonlinearities_off_the_differentiated_path_are_not_named() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("gate", torch.linspace(-1, 1, 4))
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate = torch.sigmoid(self.gate)[:, None, None]  # a buffer: no grad
            return self.fc((F.relu(self.conv(x)) * gate).mean((2, 3)))

    result = _guided(Gated().eval(), _input())
    assert result.unguided_activations == ()
    assert result.guided_relus == 1


def test_training_report_counts_user_modules_that_read_their_mode() -> None:
    class StochasticDepth(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 0.5 if self.training else x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), StochasticDepth(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    report = _gradients(model.train(), "0", torch.zeros(1, 3, 8, 8)).training
    assert report == ("and 1 other module in training mode",)
