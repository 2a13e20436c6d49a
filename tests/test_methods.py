"""The Grad-CAM family: hand-derived values, closed forms, agreement on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import available_frameworks, native_input, require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multicam as mc
from multicam import zoo
from multicam.testing import assert_results_agree

METHODS = [
    mc.GradCAM,
    mc.GradCAMPlusPlus,
    mc.XGradCAM,
    mc.LayerCAM,
    mc.HiResCAM,
    mc.GradCAMElementWise,
    mc.EigenCAM,
]

# The one-conv net of test_torch_backend (Captum's BasicModel_ConvNet_One_Conv) at conv1:
#   A0 = [[-5, 4], [31, 40]]    A1 = [[-30, -21], [6, 15]]    (sums 70 and -30)
#   g0 = [[0, 1], [1, 1]]       g1 = [[0, 0], [-1, -1]]       (score 54)
A0 = np.array([[-5.0, 4.0], [31.0, 40.0]])
A1 = np.array([[-30.0, -21.0], [6.0, 15.0]])
GOLDEN = {
    # sum_k g_k A_k: [[0, 4], [31, 40]] + [[0, 0], [-6, -15]]
    mc.HiResCAM: [[0.0, 4.0], [25.0, 25.0]],
    # sum_k relu(g_k) A_k: channel 1 has no positive gradient
    mc.LayerCAM: [[0.0, 4.0], [31.0, 40.0]],
    # sum_k relu(g_k A_k): channel 1's products are all <= 0
    mc.GradCAMElementWise: [[0.0, 4.0], [31.0, 40.0]],
    # w0 = sum(A0 g0) / sum(A0) = 75 / 70, w1 = sum(A1 g1) / sum(A1) = -21 / -30 = 0.7
    mc.XGradCAM: (75 / 70 * A0 + 0.7 * A1).tolist(),
    # alpha = g^2 / (2 g^2 + sum(A) g^3): channel 0 where g = 1: 1 / 72, so w0 = 3 / 72;
    # channel 1: relu(g) = 0, so w1 = 0
    mc.GradCAMPlusPlus: (3 / 72 * A0).tolist(),
    # centred rows (positions) all lie on (1, 1): v = (1, 1) / sqrt(2), projection sum 40 > 0
    mc.EigenCAM: ((A0 + A1) / np.sqrt(2)).tolist(),
}


@pytest.mark.parametrize("method", list(GOLDEN), ids=lambda m: m.__name__)
def test_hand_derived_values_on_the_one_conv_net(method: type[mc.CAM]) -> None:
    require("torch")
    from test_torch_backend import OneConvNet

    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    res = method(OneConvNet(), "conv1")(x, targets=0, relu=False, normalize=False, size=None)
    np.testing.assert_allclose(res.raw[0, 0], GOLDEN[method], rtol=1e-6, atol=1e-6)


def test_gradcam_plus_plus_general_weights_by_hand() -> None:
    """Y = S^3 / 6: f' = S^2 / 2, f'' = S, f''' = 1 at S = 54."""
    require("torch")
    from test_torch_backend import OneConvNet

    def cubic(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return scores**2 / 2, scores, np.ones_like(scores)

    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    explainer = mc.GradCAMPlusPlus(OneConvNet(), "conv1", output_function=cubic)
    res = explainer(x, targets=0, relu=False, normalize=False, size=None)
    # channel 0 where g = 1: alpha = 54 / (2 * 54 + 70 * 1) = 54 / 178, relu(f' g) = 1458
    expected = 3 * (54 / 178) * 1458 * A0
    np.testing.assert_allclose(res.raw[0, 0], expected, rtol=1e-5)
    with pytest.raises(mc.OptionError, match="output_function="):
        mc.GradCAMPlusPlus(OneConvNet(), "conv1", output_function="softmax")


def test_closed_forms_on_the_gap_net(framework: str) -> None:
    """conv -> GAP -> linear: g_k = W[k, c] / hw everywhere, so every method has a form."""
    weights = zoo.init_weights("gap_cnn", 0)
    x = native_input(framework, zoo.example_input("gap_cnn", 2, seed=3))
    kernel = weights["fc.kernel"].astype(np.float64)  # (K, C)

    def run(method: type[mc.CAM]) -> mc.CAMResult:
        explainer = zoo.explainer("gap_cnn", framework, "features.relu2", weights, method=method)
        return explainer(x, targets="all", relu=False, normalize=False, size=None, warn=False)

    grad = run(mc.GradCAM)
    a = grad.activations.astype(np.float64)  # (N, K, h, w)
    g = kernel.T[None, :, :, None, None] / 144  # (1, C, K, 1, 1)
    closed = {
        mc.HiResCAM: grad.raw,
        mc.XGradCAM: grad.raw,
        mc.LayerCAM: (np.maximum(g, 0) * a[:, None]).sum(2),
        mc.GradCAMElementWise: np.maximum(g * a[:, None], 0).sum(2),
    }
    totals = a.sum(axis=(2, 3))[:, None, :]  # (N, 1, K)
    alpha_sum = 144 * np.maximum(g[..., 0, 0], 0) / (2 + totals * g[..., 0, 0])
    closed[mc.GradCAMPlusPlus] = np.einsum("nck,nkhw->nchw", alpha_sum, a)
    for method, expected in closed.items():
        np.testing.assert_allclose(
            run(method).raw, expected, rtol=1e-4, atol=1e-6, err_msg=method.__name__
        )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(METHODS),
    st.sampled_from(["digits_cnn", "resnet_tiny", "conv1d_net"]),
    st.integers(0, 2**16),
    st.data(),
)
def test_every_method_agrees_across_backends(
    method: type[mc.CAM], arch: str, input_seed: int, data: st.DataObject
) -> None:
    layers = zoo.ARCHITECTURES[arch].cam_layers
    if method is mc.GradCAMPlusPlus:  # ill-conditioned on signed activations: see its doc
        layers = tuple(layer for layer in layers if "conv" not in layer)
    layer = data.draw(st.sampled_from(layers))
    inputs = zoo.example_input(arch, 2, seed=input_seed)
    weights = zoo.init_weights(arch, 1)
    results = {
        framework: zoo.explainer(arch, framework, layer, weights, method=method)(
            native_input(framework, inputs), targets="all", warn=False
        )
        for framework in available_frameworks()
    }
    assert_results_agree(results)


def test_eigen_cam_is_the_same_for_every_target() -> None:
    require("torch")
    explainer = zoo.explainer("digits_cnn", "torch", "features.relu4", method=mc.EigenCAM)
    res = explainer(zoo.example_input("digits_cnn", 2, layout="channels_first"), targets="all")
    np.testing.assert_array_equal(res.raw, np.broadcast_to(res.raw[:, :1], res.raw.shape))
    np.testing.assert_allclose(np.linalg.norm(res.weights, axis=2), 1.0, rtol=1e-5)


def test_eigen_smooth_of_one_channel_is_the_weighted_map() -> None:
    """With K = 1 the first principal axis is the channel itself: nothing to smooth."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 1, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2)
    )
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    plain = mc.GradCAM(net, "1")(x, targets=[0, 1], relu=False, normalize=False, size=None)
    smooth = mc.GradCAM(net, "1")(
        x, targets=[0, 1], relu=False, normalize=False, size=None, eigen_smooth=True
    )
    np.testing.assert_allclose(smooth.raw, plain.raw, rtol=1e-5, atol=1e-7)
    with pytest.raises(mc.OptionError, match="channel-weight methods"):
        mc.LayerCAM(net, "1")(x, eigen_smooth=True)


def test_aug_smooth_is_the_mean_over_flips_and_scales() -> None:
    require("torch")
    explainer = zoo.explainer("digits_cnn", "torch", "features.relu4")
    x = zoo.example_input("digits_cnn", 2, layout="channels_first")
    res = explainer(x, targets=[3, 7], relu=False, normalize=False, size=None, aug_smooth=True)
    raws = []
    for flip in (False, True):
        for scale in (0.9, 1.0, 1.1):
            variant = np.ascontiguousarray((np.flip(x, -1) if flip else x) * np.float32(scale))
            raw = explainer(variant, targets=[3, 7], relu=False, normalize=False, size=None).raw
            raws.append(np.flip(raw, -1) if flip else raw)
    np.testing.assert_allclose(res.raw, np.mean(raws, axis=0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("smooth", ["eigen_smooth", "aug_smooth"])
def test_smoothing_agrees_across_backends(smooth: str) -> None:
    inputs = zoo.example_input("digits_cnn", 2, seed=5)
    results = {
        framework: zoo.explainer("digits_cnn", framework, "features.relu4")(
            native_input(framework, inputs), targets=[4, 9], warn=False, **{smooth: True}
        )
        for framework in available_frameworks()
    }
    assert_results_agree(results)


def test_multi_layer_fusion_is_the_mean_of_normalised_maps() -> None:
    require("torch")
    model = zoo.build("digits_cnn", "torch")
    x = zoo.example_input("digits_cnn", 2, layout="channels_first")
    layers = ["features.relu3", "features.relu4"]
    fused = mc.MultiLayerCAM(model, layers)(x, warn=False)
    singles = [mc.GradCAM(model, layer)(x, targets=fused.targets, warn=False) for layer in layers]
    mean = np.mean([single.maps for single in singles], axis=0)
    expected = mc.algebra.normalize(mean, 2)
    np.testing.assert_allclose(fused.maps, expected, atol=1e-6)
    assert list(fused.layers) == layers
    biggest = mc.MultiLayerCAM(model, layers, combine="max")(x, targets=fused.targets, warn=False)
    np.testing.assert_allclose(
        biggest.maps, mc.algebra.normalize(np.max([s.maps for s in singles], axis=0), 2), atol=1e-6
    )
    with pytest.raises(mc.OptionError, match="two or more layers"):
        mc.MultiLayerCAM(model, "features.relu4")
    with pytest.raises(mc.OptionError, match="combine="):
        mc.MultiLayerCAM(model, layers, combine="sum")
