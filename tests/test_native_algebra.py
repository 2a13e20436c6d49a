"""The native algebra (``algebra="native"``, :mod:`multicam.xp`) against the NumPy reference.

Every function of :mod:`multicam.xp` on NumPy, torch and JAX arrays equals its namesake in
:mod:`multicam.algebra`; every explainer with ``algebra="native"`` gives the maps of the
default path, as framework arrays on the model's device, on CPU torch, Flax linen and nnx.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest
from conftest import require
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import multicam as mc
from multicam import algebra, zoo
from multicam import xp as native
from multicam.diagnose import BlankMapWarning

if os.environ.get("MULTICAM_REQUIRE_BACKENDS"):  # nox and CI install it: never skip there
    import array_api_compat  # noqa: F401
else:
    pytest.importorskip("array_api_compat")

# No subnormals: XLA flushes them to zero, NumPy and torch on the CPU do not.
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)
NAMESPACES = ["numpy", "torch", "jax"]
METHODS = [
    mc.GradCAM,
    mc.GradCAMPlusPlus,
    mc.XGradCAM,
    mc.HiResCAM,
    mc.LayerCAM,
    mc.GradCAMElementWise,
    mc.EigenCAM,
]
FIELDS = ("maps", "raw", "weights", "scores", "activations", "gradients", "outputs")


def _convert(name: str) -> Any:
    if name == "numpy":
        return lambda a: a
    module = pytest.importorskip(name)
    return module.from_numpy if name == "torch" else module.numpy.asarray


def _close(actual: Any, expected: np.ndarray, what: str = "", rtol: float = 1e-5) -> None:
    got = native.to_numpy(actual)
    assert isinstance(got, np.ndarray) and got.dtype == expected.dtype, what
    scale = 1.0 + float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=1e-6 * scale, err_msg=what)


@st.composite
def layer_arrays(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n, t, k = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    activations = draw(hnp.arrays(np.float32, (n, k, *spatial), elements=finite))
    gradients = draw(hnp.arrays(np.float32, (n, t, k, *spatial), elements=finite))
    return activations, gradients


# --- the functions ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMESPACES)
@settings(max_examples=25, deadline=None)
@given(arrays=layer_arrays(), data=st.data())
def test_every_function_equals_the_reference(
    name: str, arrays: tuple[np.ndarray, np.ndarray], data: st.DataObject
) -> None:
    convert = _convert(name)
    activations, gradients = arrays
    a, g = convert(activations), convert(gradients)
    spatial = activations.ndim - 2
    weights = algebra.channel_weights(gradients)
    _close(native.channel_weights(g), weights, "channel_weights")
    raw = algebra.weighted_sum(activations, weights)
    _close(native.weighted_sum(a, convert(weights)), raw, "weighted_sum", rtol=1e-4)
    _close(native.relu(convert(raw)), algebra.relu(raw), "relu")
    size = data.draw(st.tuples(*[st.integers(1, 7)] * spatial))
    method = data.draw(st.sampled_from(["linear", "nearest"]))
    corners = method == "linear" and data.draw(st.booleans())
    resized = algebra.resize(raw, size, method, corners)  # type: ignore[arg-type]
    _close(native.resize(convert(raw), size, method, corners), resized, "resize")
    _close(native.normalize(convert(resized), spatial), algebra.normalize(resized, spatial))
    for rule in ("hirescam", "layercam", "gradcam_elementwise"):
        expected = algebra.elementwise_map(activations, gradients, rule)
        _close(native.elementwise_map(a, g, rule), expected, rule, rtol=1e-4)
    _close(
        native.xgradcam_weights(convert(np.abs(activations)), g),
        algebra.xgradcam_weights(np.abs(activations), gradients),
        "xgradcam",
        rtol=1e-4,
    )
    _close(
        native.gradcam_plus_plus_weights(convert(np.abs(activations)), g),
        algebra.gradcam_plus_plus_weights(np.abs(activations), gradients),
        "gradcam++",
        rtol=1e-4,
    )
    peak = raw.reshape(*raw.shape[:2], -1).max(-1)
    decided = np.abs(peak) > 1e-30  # XLA flushes subnormals to zero
    assert (native.blank_maps(convert(raw)) == (peak <= 0))[decided].all()


@pytest.mark.parametrize("name", NAMESPACES)
def test_normalisation_is_scale_free_and_flat_maps_are_zeros(name: str) -> None:
    convert = _convert(name)
    rng = np.random.default_rng(0)
    maps = rng.random((2, 3, 5, 5), dtype=np.float32)
    maps[0, 1] = 3.0  # flat
    maps[1, 2] = 0.0  # blank
    for scale in (1e-13, 1.0, 1e13):
        scaled = (maps * np.float32(scale)).astype(np.float32)
        expected = algebra.normalize(scaled, 2)
        got = native.to_numpy(native.normalize(convert(scaled), 2))
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert got[0, 1].max() == 0 and got[1, 2].max() == 0
        assert got.min() >= 0 and got.max() <= 1
        assert got[0, 0].max() == 1.0 or name == "jax"  # XLA's CPU division: within an ulp


@pytest.mark.parametrize("name", NAMESPACES)
def test_principal_axes_equal_the_reference(name: str) -> None:
    convert = _convert(name)
    rng = np.random.default_rng(1)
    activations = rng.random((2, 4, 6, 5), dtype=np.float32)
    weights = rng.standard_normal((2, 3, 4)).astype(np.float32)
    rtol = 1e-5 if name != "jax" else 1e-3  # JAX without x64 decomposes in float32
    _close(
        native.principal_axis(convert(activations)),
        algebra.principal_axis(activations),
        rtol=rtol,
    )
    _close(
        native.eigen_smooth(convert(activations), convert(weights)),
        algebra.eigen_smooth(activations, weights),
        rtol=rtol,
    )


def test_non_finite_arrays_raise_the_reference_message() -> None:
    torch = pytest.importorskip("torch")
    bad = np.ones((2, 3), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(mc.NonFiniteError) as reference:
        mc.backends.base.check_finite(bad, "the things")
    with pytest.raises(mc.NonFiniteError) as on_device:
        native.check_finite({"the things": torch.from_numpy(bad)})
    assert str(on_device.value) == str(reference.value)
    huge = np.full((4,), 3e38, np.float32)  # finite, but its sum overflows
    native.check_finite({"huge": torch.from_numpy(huge)})


def test_import_multicam_imports_no_array_api_compat() -> None:
    code = "import sys, multicam; print('array_api_compat' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_array_api_compat_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    require("torch")
    monkeypatch.setitem(sys.modules, "array_api_compat", None)
    model = zoo.build("gap_cnn", "torch")
    with pytest.raises(mc.BackendNotInstalledError, match="pip install array-api-compat"):
        mc.GradCAM(model, "features.relu2", algebra="native")
    x = zoo.example_input("gap_cnn", layout="channels_first")
    res = mc.GradCAM(model, "features.relu2", algebra="auto")(x, targets=1)
    assert isinstance(res.maps, np.ndarray)


# --- the explainers -----------------------------------------------------------------------


def _explainers(framework: str, arch: str, layer: str, cls: type, **kwargs: Any) -> tuple:
    model = zoo.build(arch, framework)
    options: dict[str, Any] = {}
    if framework == "flax":
        model, options["variables"] = model
    name = zoo.layer_name(layer, framework)
    return cls(model, name, **options, **kwargs), cls(
        model, name, algebra="native", **options, **kwargs
    )


def _assert_same_result(reference: mc.CAMResult, result: mc.CAMResult, kind: type) -> None:
    assert not result.is_numpy and isinstance(result.maps, kind)
    assert result.targets is None or isinstance(result.targets, np.ndarray)
    np.testing.assert_array_equal(result.targets, reference.targets)
    for field in FIELDS:
        expected = getattr(reference, field)
        if expected is not None:
            assert isinstance(getattr(result, field), kind), field
            _close(getattr(result, field), expected, field, rtol=1e-4)
    as_numpy = result.to_numpy()
    assert as_numpy.is_numpy and as_numpy.to_numpy() is as_numpy


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("framework", ["torch", "flax", "nnx"])
def test_native_explainers_give_the_reference_maps(framework: str, cls: type) -> None:
    require(framework)
    kind = sys.modules["torch"].Tensor if framework == "torch" else sys.modules["jax"].Array
    reference, explainer = _explainers(framework, "resnet_tiny", "block2", cls)
    x = zoo.example_input("resnet_tiny", 3, layout=zoo.native_layout(framework))
    targets = np.array([[0, 1], [2, 3], [4, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference(x, targets=targets)
        result = explainer(x, targets=targets)
    _assert_same_result(expected, result, kind)


@pytest.mark.parametrize(
    "call",
    [
        {"relu": False, "normalize": False, "size": None},
        {"size": (5, 7), "interpolation": "nearest"},
        {"align_corners": True},
        {"eigen_smooth": True},
        {"aug_smooth": True},
        {"targets": None},
        {"targets": "all"},
    ],
    ids=lambda c: ",".join(c),
)
def test_native_call_options_give_the_reference_maps(call: dict[str, Any]) -> None:
    require("torch")
    torch = sys.modules["torch"]
    reference, explainer = _explainers("torch", "digits_cnn", "features.relu3", mc.GradCAM)
    x = zoo.example_input("digits_cnn", 2, layout="channels_first")
    call = {"targets": [3, 7], **call}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same_result(reference(x, **call), explainer(x, **call), torch.Tensor)


def test_native_torch_tensor_inputs_and_callable_targets() -> None:
    require("torch")
    torch = sys.modules["torch"]
    reference, explainer = _explainers("torch", "gap_cnn", "features.relu2", mc.GradCAMPlusPlus)
    x = torch.from_numpy(zoo.example_input("gap_cnn", 3, layout="channels_first"))

    def score(outputs: Any) -> Any:
        return outputs[:, 1] - outputs[:, 2]

    _assert_same_result(reference(x, targets=score), explainer(x, targets=score), torch.Tensor)

    def cubic(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert isinstance(scores, np.ndarray)  # the user's function sees NumPy on both paths
        return 3 * scores**2, 6 * scores, np.full_like(scores, 6.0)

    reference, explainer = _explainers(
        "torch", "gap_cnn", "features.relu2", mc.GradCAMPlusPlus, output_function=cubic
    )
    _assert_same_result(reference(x, targets=2), explainer(x, targets=2), torch.Tensor)


def test_native_region_targets() -> None:
    require("torch")
    torch = sys.modules["torch"]
    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:8] = True
    reference, explainer = _explainers("torch", "seg_fcn", "features.relu1", mc.GradCAM)
    x = zoo.example_input("seg_fcn", 2, layout="channels_first")
    targets = [mc.Region(1, mask), mc.Region(2, ~mask)]
    _assert_same_result(reference(x, targets=targets), explainer(x, targets=targets), torch.Tensor)


def test_native_token_grids_and_channels_last_layers() -> None:
    require("torch")
    torch = sys.modules["torch"]
    nn = torch.nn

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patchify = nn.Conv2d(3, 6, 2, stride=2)
            self.cls = nn.Parameter(torch.randn(1, 1, 6))
            self.block = nn.Sequential(nn.Linear(6, 6), nn.GELU())
            self.head = nn.Linear(6, 4)

        def forward(self, x: Any) -> Any:
            tokens = self.patchify(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
            return self.head(self.block(tokens).mean(1))

    class Last(nn.Module):  # a stage returning (N, H, W, C), as Swin does in torch
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
            self.stage = nn.Identity()
            self.head = nn.Linear(5, 4)

        def forward(self, x: Any) -> Any:
            return self.head(self.stage(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))

    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    for model, layer, options in [
        (Tokens().eval(), "block", {"reshape": (4, 4)}),
        (Last().eval(), "stage", {"layer_layout": "channels_last"}),
    ]:
        reference = mc.GradCAM(model, layer, **options)(x, targets=[1, 3], warn=False)
        result = mc.GradCAM(model, layer, algebra="native", **options)(
            x, targets=[1, 3], warn=False
        )
        _assert_same_result(reference, result, torch.Tensor)
        if reference.dropped_token_gradients is not None:
            _close(result.dropped_token_gradients, reference.dropped_token_gradients)


def test_native_multilayer_fusion() -> None:
    require("torch")
    torch = sys.modules["torch"]
    model = zoo.build("digits_cnn", "torch")
    x = zoo.example_input("digits_cnn", 2, layout="channels_first")
    layers = ["features.relu3", "features.relu4"]
    for combine in ("mean", "max"):
        reference = mc.MultiLayerCAM(model, layers, combine=combine)(x, targets=4, warn=False)
        fused = mc.MultiLayerCAM(model, layers, combine=combine, algebra="native")(
            x, targets=4, warn=False
        )
        assert isinstance(fused.maps, torch.Tensor)
        _close(fused.maps, reference.maps, combine)


def test_native_blank_maps_warn_and_diagnose_alike() -> None:
    require("torch")
    from multicam import demo

    weights, images, _ = demo.load()
    model = zoo.build("digits_cnn", "torch", weights)
    x = np.moveaxis(images[[5]], -1, 1)
    with pytest.warns(BlankMapWarning) as reference_warnings:
        reference = mc.GradCAM(model, "features.relu4")(x, targets=5)
    with pytest.warns(BlankMapWarning) as native_warnings:
        result = mc.GradCAM(model, "features.relu4", algebra="native")(x, targets=5)
    assert str(native_warnings[0].message) == str(reference_warnings[0].message)
    assert native_warnings[0].filename == reference_warnings[0].filename == __file__
    assert str(result.diagnose()) == str(reference.diagnose())


def test_non_finite_activations_raise_on_the_native_path() -> None:
    require("torch")
    torch = sys.modules["torch"]

    class Exp(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return x.exp()

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), Exp(), torch.nn.Flatten(2), torch.nn.Flatten(1)
    ).eval()
    x = np.zeros((1, 3, 6, 6), np.float32)
    x[0, :, 2, 2] = 200.0  # exp overflows at the layer, in one position
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    with pytest.raises(mc.NonFiniteError, match="activations of layer '1'") as reference:
        mc.GradCAM(model, "1")(x, targets=0)
    with pytest.raises(mc.NonFiniteError) as on_device:
        mc.GradCAM(model, "1", algebra="native")(x, targets=0)
    assert str(on_device.value) == str(reference.value)
    nan_input = np.zeros((1, 3, 6, 6), np.float32)
    nan_input[0, 1, 2, 3] = np.nan
    with pytest.raises(mc.NonFiniteError, match="in the input") as reference:
        mc.GradCAM(model, "1")(nan_input, targets=0)
    with pytest.raises(mc.NonFiniteError) as on_device:
        mc.GradCAM(model, "1", algebra="native")(nan_input, targets=0)
    assert str(on_device.value) == str(reference.value)


# --- choosing the path --------------------------------------------------------------------


def test_auto_is_numpy_on_the_cpu_and_native_on_an_accelerator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require("torch")
    torch = sys.modules["torch"]
    model = zoo.build("gap_cnn", "torch")
    x = zoo.example_input("gap_cnn", 2, layout="channels_first")
    explainer = mc.GradCAM(model, "features.relu2", algebra="auto")
    assert not explainer.bound.on_accelerator(x)  # type: ignore[attr-defined]
    assert isinstance(explainer(x, targets=1).maps, np.ndarray)
    monkeypatch.setattr(type(explainer.bound), "on_accelerator", lambda self, inputs: True)
    assert isinstance(explainer(x, targets=1).maps, torch.Tensor)
    # Methods without a native path stay on NumPy under "auto".
    score_cam = mc.ScoreCAM(model, "features.relu2", algebra="auto")
    assert isinstance(score_cam(x, targets=1).maps, np.ndarray)


def test_unsupported_choices_are_refused() -> None:
    require("torch")
    model = zoo.build("gap_cnn", "torch")
    with pytest.raises(mc.OptionError, match="expected 'numpy'"):
        mc.GradCAM(model, "features.relu2", algebra="gpu")
    with pytest.raises(mc.OptionError, match="ScoreCAM computes its weights in NumPy"):
        mc.ScoreCAM(model, "features.relu2", algebra="native")


def test_tensorflow_has_no_native_path() -> None:
    require("keras")
    model = zoo.build("gap_cnn", "keras")
    with pytest.raises(mc.OptionError, match="the torch and jax backends have a native path"):
        mc.GradCAM(model, "features/relu2", algebra="native")
    x = zoo.example_input("gap_cnn", 2)
    res = mc.GradCAM(model, "features/relu2", algebra="auto")(x, targets=1)
    assert isinstance(res.maps, np.ndarray)


def test_subclasses_that_compute_in_numpy_keep_the_numpy_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require("torch")
    torch = sys.modules["torch"]

    class MaxGradCAM(mc.GradCAM):  # a user's method, in NumPy
        def channel_weights(self, layer_gradients: Any) -> np.ndarray:
            g = layer_gradients.gradients
            return g.reshape(*g.shape[:3], -1).max(axis=-1)

    class Scaled(mc.GradCAM):  # declares its override array-generic
        native_algebra = True

        def channel_weights(self, layer_gradients: Any) -> Any:
            return 2 * super().channel_weights(layer_gradients)

    model = zoo.build("gap_cnn", "torch")
    x = zoo.example_input("gap_cnn", 2, layout="channels_first")
    with pytest.raises(mc.OptionError, match="MaxGradCAM computes its weights in NumPy"):
        MaxGradCAM(model, "features.relu2", algebra="native")
    explainer = MaxGradCAM(model, "features.relu2", algebra="auto")
    monkeypatch.setattr(type(explainer.bound), "on_accelerator", lambda self, inputs: True)
    assert isinstance(explainer(x, targets=1).maps, np.ndarray)
    scaled = Scaled(model, "features.relu2", algebra="native")(x, targets=1)
    assert isinstance(scaled.maps, torch.Tensor)
    _close(scaled.weights, 2 * mc.GradCAM(model, "features.relu2")(x, targets=1).weights)
