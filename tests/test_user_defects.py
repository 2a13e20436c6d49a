"""Defects users hit on real models (issue 9), each rebuilt as a small model of its own.

Every test here failed before its fix: small-scale maps normalised to zeros, per-pixel
softmax heads not recognised, channels-last torch layers read as channels-first, token
layers given the wrong advice, class-token-only heads blamed on a ReLU, guided methods
refusing ``warn=``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from hypothesis import given
from hypothesis import strategies as st

import multicam as mc
from multicam import algebra

ROOT = Path(__file__).resolve().parents[1]


# --- 1. Normalisation is scale-free ---------------------------------------------------------


@given(exponent=st.integers(-30, 30), seed=st.integers(0, 2**16))
def test_normalize_does_not_depend_on_the_scale(exponent: int, seed: int) -> None:
    maps = np.random.default_rng(seed).standard_normal((2, 3, 5, 4)).astype(np.float32)
    maps = np.maximum(maps, 0)  # ReLU'd, as the explainers normalise them
    reference = algebra.normalize(maps, 2)
    scaled = algebra.normalize(maps * np.float32(10.0**exponent), 2)
    np.testing.assert_allclose(scaled, reference, atol=2e-6)
    np.testing.assert_allclose(reference.reshape(6, -1).max(-1), 1, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_normalize_small_maps_of_any_dtype(dtype: type) -> None:
    smallest_normal = max(float(np.finfo(dtype).tiny), float(np.finfo(np.float32).tiny))
    maps = np.arange(12, dtype=np.float64).reshape(1, 1, 3, 4) * smallest_normal * 2**10
    maps = maps.astype(dtype)
    out = algebra.normalize(maps, 2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), np.arange(12) / 11, atol=1e-3)


def test_normalize_subnormal_range_gives_no_inf() -> None:
    maps = np.array([[[[0.0, 1e-40], [2e-40, 4e-40]]]], np.float32)
    out = algebra.normalize(maps, 2)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.ravel(), [0, 0.25, 0.5, 1.0], atol=1e-2)


def test_only_truly_constant_maps_become_zeros() -> None:
    flat = np.full((1, 1, 4, 4), 1e-13, np.float32)
    flat[0, 0, 0, 0] = np.nextafter(np.float32(1e-13), np.float32(1))  # one ulp: constant
    assert not algebra.normalize(flat, 2).any()
    assert not algebra.normalize(np.zeros((1, 1, 3, 3), np.float32), 2).any()
    tiny = np.zeros((1, 1, 2, 2), np.float32)
    tiny[0, 0, 1, 1] = 1e-13  # a real, tiny positive cell
    assert algebra.normalize(tiny, 2)[0, 0, 1, 1] == pytest.approx(1.0)


def _scaled_torch_model(scale: float):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * scale

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    return nn.Sequential(
        body, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5), Scale()
    ).eval()


@pytest.mark.parametrize("exponent", [-30, -13, 0, 13, 30])
def test_gradcam_maps_do_not_depend_on_the_scores_scale(exponent: int) -> None:
    """Random-init MobileNetV2 has activations near 1e-13: its maps must not vanish."""
    require("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    reference = mc.GradCAM(_scaled_torch_model(1.0), "1")(x, targets=[1, 2], warn=False)
    scaled = mc.GradCAM(_scaled_torch_model(10.0**exponent), "1")(x, targets=[1, 2], warn=False)
    np.testing.assert_allclose(scaled.maps, reference.maps, atol=1e-4)
    np.testing.assert_allclose(scaled.maps.reshape(2, -1).max(-1), 1, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_give_the_float32_maps(dtype: str) -> None:
    require("torch")
    import torch

    model = _scaled_torch_model(1.0)
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)
    reference = mc.GradCAM(model, "1")(x, targets=1, warn=False).maps
    half = model.to(getattr(torch, dtype))
    maps = mc.GradCAM(half, "1")(torch.from_numpy(x).to(half[-2].weight.dtype), targets=1).maps
    assert maps.dtype == np.float32
    np.testing.assert_allclose(maps.reshape(2, -1).max(-1), 1, atol=1e-6)
    np.testing.assert_allclose(maps, reference, atol=0.1)


# --- 3. Per-pixel softmax and sigmoid heads ---------------------------------------------------


def _segmenter(head: str):  # type: ignore[no-untyped-def]
    """A 2-class segmentation net ending in a per-pixel softmax/sigmoid, saturated."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 2, 1),
        nn.Upsample(scale_factor=1),
    ]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model[2].weight.mul_(40)  # confident logits: saturated probabilities
    if head == "softmax":
        model.append(nn.Softmax(dim=1))
    else:
        model.append(nn.Sigmoid())
    return model.eval()


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_segmentation_softmax_or_sigmoid_is_recognised_with_region_targets(head: str) -> None:
    require("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    res = mc.GradCAM(_segmenter(head), "1")(x, targets=mc.Region(1, mask), warn=False)
    diagnosis = res.diagnose()
    assert f"{head}_outputs" in diagnosis.codes()
    saturated = [f for f in diagnosis if f.code == "saturated"]
    assert saturated and all(f.sample is not None for f in saturated)
    assert "nothing unusual" not in str(diagnosis)


def test_saturated_softmax_is_reported_for_callable_targets() -> None:
    require("torch")
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
        nn.Softmax(dim=1),
    ).eval()
    with torch.no_grad():
        model[4].weight.mul_(500)
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    res = mc.GradCAM(model, "1")(x, targets=lambda p: p[:, 0], warn=False)
    codes = res.diagnose().codes()
    assert {"softmax_outputs", "saturated"} <= codes


# --- 5. Channels-last layers in torch models --------------------------------------------------


def _swin_like(channels_last: bool):  # type: ignore[no-untyped-def]
    """Patch embedding to (N, H, W, C) then a LayerNorm + MLP stage (as Swin's), and a head.

    ``channels_last=False`` builds the same function with channels-first intermediates,
    the reference the channels-last layer's map must equal.
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    embed = nn.Conv2d(3, 12, 4, stride=4)
    norm = nn.LayerNorm(12)
    mlp = nn.Linear(12, 12)
    head = nn.Linear(12, 5)

    class Stage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.mlp = norm, mlp

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, H, W, C)
            return torch.relu(self.mlp(self.norm(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.stage, self.head = embed, Stage(), head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.stage(self.embed(x).permute(0, 2, 3, 1))
            if not channels_last:
                z = z.permute(0, 3, 1, 2).contiguous()
                z = Identity()(z)
                return self.head(z.mean((2, 3)))
            return self.head(z.mean((1, 2)))

    class Identity(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    net = Net().eval()
    if not channels_last:  # hook point for the reference: the permuted stage output

        class Reference(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed, self.stage, self.head = embed, Stage(), head
                self.out = Identity()

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                z = self.stage(self.embed(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                return self.head(self.out(z).mean((2, 3)))

        return Reference().eval(), "out"
    return net, "stage"


def test_channels_last_torch_layer_is_detected_and_said() -> None:
    require("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    reference_model, reference_layer = _swin_like(channels_last=False)
    reference = mc.GradCAM(reference_model, reference_layer)(x, targets=[1, 3], warn=False)
    model, layer = _swin_like(channels_last=True)
    with pytest.warns(mc.errors.LayoutWarning, match="layer_layout='channels_last'"):
        res = mc.GradCAM(model, layer)(x, targets=[1, 3])
    assert res.layer_layout == "channels_last"
    assert res.activations.shape == (2, 12, 7, 7)
    np.testing.assert_allclose(res.raw, reference.raw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.maps, reference.maps, atol=1e-5)
    assert "layout_guessed" in res.diagnose().codes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", mc.errors.LayoutWarning)
        stated = mc.GradCAM(model, layer, layer_layout="channels_last")(x, targets=[1, 3])
        as_grid = mc.GradCAM(model, layer, reshape=(7, 7))(x, targets=[1, 3])
    np.testing.assert_allclose(stated.maps, reference.maps, atol=1e-5)
    np.testing.assert_allclose(as_grid.maps, reference.maps, atol=1e-5)


def test_ordinary_layers_are_not_relaid_out() -> None:
    """A channels-first layer whose shape could fool a naive test (K == H) stays as is."""
    require("torch")
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 32)).astype(np.float32)
    model(__import__("torch").from_numpy(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", mc.errors.LayoutWarning)
        res = mc.GradCAM(model.eval(), "1")(x, targets=0, warn=False)
    assert res.layer_layout == "channels_first"
    assert res.activations.shape == (1, 16, 16, 32)


def test_layer_layout_option_is_checked() -> None:
    require("torch")
    from torch import nn

    with pytest.raises(mc.OptionError, match="layer_layout"):
        mc.GradCAM(nn.Sequential(nn.Conv2d(1, 1, 1)), "0", layer_layout="nhwc")


# --- 9. Token layers --------------------------------------------------------------------------


def _vit_like(read_class_token_only: bool):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.mlp = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return x + torch.relu(self.mlp(x))

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 4, stride=4)
            self.cls = nn.Parameter(torch.randn(1, 1, 16))
            self.blocks = nn.Sequential(Block(), Block())
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
            tokens = self.blocks(tokens)
            return self.head(tokens[:, 0] if read_class_token_only else tokens.mean(1))

    return ViT().eval()


def test_token_layer_without_reshape_names_reshape() -> None:
    require("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with pytest.raises(mc.LayerError, match=r"reshape=\(4, 4\)") as info:
        mc.GradCAM(_vit_like(False), "blocks.1")(x, targets=1)
    assert "size=None" not in str(info.value)
    res = mc.GradCAM(_vit_like(False), "blocks.1", reshape=(4, 4))(x, targets=1, warn=False)
    assert res.maps.shape == (2, 1, 16, 16)


def test_class_token_head_blames_the_class_token_not_a_relu() -> None:
    require("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    explainer = mc.GradCAM(_vit_like(True), "blocks.1", reshape=(4, 4))
    with pytest.warns(mc.diagnose.BlankMapWarning):
        res = explainer(x, targets=1)
    diagnosis = res.diagnose()
    assert "class_token_only" in diagnosis.codes()
    assert "zero_gradients" not in diagnosis.codes()
    assert "earlier block" in str(diagnosis)
    earlier = mc.GradCAM(_vit_like(True), "blocks.0", reshape=(4, 4))(x, targets=1, warn=False)
    assert "class_token_only" not in earlier.diagnose().codes()


# --- 10. Every method takes the common call options -------------------------------------------


@pytest.mark.parametrize(
    "method", [mc.GuidedBackprop, mc.GuidedGradCAM, mc.ScoreCAM, mc.AblationCAM, mc.GradCAM]
)
def test_every_method_takes_warn(method: type) -> None:
    require("torch")
    from multicam import zoo

    model = zoo.build("gap_cnn", "torch")
    x = zoo.example_input("gap_cnn", layout="channels_first")
    res = method(model, "features.relu2")(x, targets=1, warn=False)
    assert np.isfinite(res.maps).all()


# --- 14. The distribution name ----------------------------------------------------------------


def test_distribution_name_is_not_taken_and_used_everywhere() -> None:
    """``multicam`` on the public index is an unrelated webcam package."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "multicam-xai"
    texts = [ROOT / "README.md", ROOT / "docs" / "errors.md", *ROOT.glob("multicam/**/*.py")]
    for path in texts:
        assert "install 'multicam[" not in path.read_text(), path
        assert "install multicam " not in path.read_text(), path


# --- 2. Training mode: explained in inference mode, said, diagnosed ---------------------------


def test_training_mode_is_warned_and_diagnosed_torch() -> None:
    require("torch")
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    reference = mc.GradCAM(model.eval(), "2")(x, targets=1, warn=False)
    model.train()
    with pytest.warns(mc.errors.TrainingModeWarning, match=r"1 \(BatchNorm2d\).*model.eval"):
        res = mc.GradCAM(model, "2")(x, targets=1)
    assert model.training and model[1].training
    assert res.training == ("1 (BatchNorm2d)", "3 (Dropout)")
    np.testing.assert_array_equal(res.maps, reference.maps)
    assert "training_mode" in res.diagnose().codes()
    assert "training_mode" not in reference.diagnose().codes()


def test_a_plain_model_without_mode_dependent_layers_is_not_warned_about() -> None:
    require("torch")
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.head(self.conv(x).relu().mean((2, 3)))

    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mc.errors.TrainingModeWarning)
        res = mc.GradCAM(Net(), "conv")(x, targets=0, warn=True)  # train() by default
    assert res.training == ()


# --- 7. Guided backprop says what it cannot guide ---------------------------------------------


@pytest.mark.parametrize(("activation", "kind"), [("SiLU", "SiLU"), ("GELU", "GELU")])
def test_guided_backprop_on_smooth_activations_warns(activation: str, kind: str) -> None:
    require("torch")
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        getattr(nn, activation)(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with pytest.warns(mc.errors.GuidedWarning, match=f"no ReLU.*{kind}.*plain input gradient"):
        res = mc.GuidedBackprop(model)(x, targets=1)
    assert res.guided_relus == 0 and res.unguided_activations == (kind,)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mc.errors.GuidedWarning)
        mc.GuidedBackprop(model)(x, targets=1, warn=False)
    model[1] = nn.ReLU()
    with warnings.catch_warnings():
        warnings.simplefilter("error", mc.errors.GuidedWarning)
        relu = mc.GuidedBackprop(model)(x, targets=1)
    assert relu.guided_relus == 1 and relu.unguided_activations == ()


# --- 6. Score-CAM and Ablation-CAM follow output= ---------------------------------------------


def _dict_output_model():  # type: ignore[no-untyped-def]
    """A model returning a one-key dict, as a Hugging Face ``ImageClassifierOutput`` does."""
    require("torch")
    import torch
    from torch import nn

    class HFLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.head(self.features(x).mean((2, 3)))}

    class Plain(nn.Module):
        def __init__(self, inner: HFLike) -> None:
            super().__init__()
            self.features, self.head = inner.features, inner.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean((2, 3)))

    hf = HFLike().eval()
    return hf, Plain(hf).eval()


@pytest.mark.parametrize("method", [mc.ScoreCAM, mc.AblationCAM])
@pytest.mark.parametrize("output", [None, "logits"])
def test_perturbation_methods_follow_output(method: type, output: str | None) -> None:
    hf, plain = _dict_output_model()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = method(plain, "features.1")(x, targets=[1, 2], warn=False)
    got = method(hf, "features.1", output=output)(x, targets=[1, 2], warn=False)
    np.testing.assert_allclose(got.maps, want.maps, atol=1e-6)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-5, atol=1e-7)


def test_logits_that_happen_to_lie_in_0_1_are_not_called_sigmoid() -> None:
    require("torch")
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    model(__import__("torch").from_numpy(x))
    with __import__("torch").no_grad():
        model[3].weight.zero_()
        model[3].bias.copy_(__import__("torch").tensor([0.1, 0.2, 0.25]))
    res = mc.GradCAM(model.eval(), "1")(x, targets=0, warn=False)
    assert "sigmoid_outputs" not in res.diagnose().codes()
