"""The peers' other methods (multicam.methods): hand-derived values, closed forms, agreement.

Peer conventions, read from their source (pytorch-grad-cam 1.5.x ``pytorch_grad_cam/``,
torchcam ``torchcam/methods/``, SESS's authors' ``sess.py``), and how multicam differs;
pytorch-grad-cam and torchcam need torchvision, which does not install beside the pinned
torch here, so the comparisons below are against hand derivations of these conventions,
and against scikit-learn where the peer calls it; the live comparisons with the peers
themselves run in the peers environment (``test_peers_methods.py``):

- CAM (torchcam ``CAM``): ``fc.weight[class_idx] @ A``, no ``1 / hw``: multicam's
  ``ClassActivationMap`` without ``head_weights`` sums the gradients, which on a GAP +
  linear head are ``W[k, c] / hw`` everywhere: the same numbers.
- EigenGradCAM (pgc): ``get_2d_projection(grads * activations)``, centred projection with
  the SVD's arbitrary sign; multicam: uncentred projection on the same axis, sign fixed
  (as its EigenCAM).
- KPCA_CAM (pgc): ``KernelPCA(n_components=1, kernel="sigmoid", gamma=None)`` on the
  centred ``(P, K)`` matrix; multicam computes the same in NumPy (checked against
  scikit-learn below).
- FEM (pgc): ``w_k = mean([A_k > mean_k + k std_k])``, ``k = 2``; the same.
- FinerCAM (pgc ``FinerWeightedTarget``): ``sum_m p_m (s_c - alpha s_m) / sum_m p_m`` over
  the classes ranked 1-3 by ``|s_j - s_c|``, softmax ``p`` differentiated; multicam holds
  ``p`` constant (equal for one comparison class, tested below against the explicit
  difference). torchcam ``FinerCAM``: ``s_c - 0.6 mean_m s_m``, multicam's
  ``weighting="mean", alpha=0.6``.
- DeepFeatureFactorization (pgc ``dff``): channels x (N P) shifted by each channel's
  minimum, ``NMF(init="random", random_state=0)`` (coordinate descent); multicam: the same
  initialisation and scikit-learn's multiplicative-update solver (checked below).
- SSCAM / ISCAM (torchcam): Score-CAM weights ``softmax_k(mean_i (Y(M_ik) - Y(X)))``;
  the ``- Y(X)`` cancels in the softmax; SSCAM ``M_ik = (H_k + N(0, 2^2)) x``, 35 samples;
  ISCAM ``M_ik = (sum_{p<=i} p / N) H_k x``, 10 samples. multicam: the same formulas,
  NumPy noise from ``default_rng([seed, n, k])``, masks normalised after upsampling.
- Smooth Grad-CAM++ (torchcam ``SmoothGradCAMpp``): ``alpha = mean g^2 / (2 mean g^2 +
  sum A mean g^3)``, 4 samples, std 0.3, then ``relu`` of the *last* noisy gradient and the
  last noisy activations; multicam: ``relu(mean g)`` and the clean activations (the
  paper's formula).
- SobelCAM (pgc ``sobel_cam``): OpenCV 3x3 Sobel on the uint8 grey image,
  ``(|Gx| + |Gy|) / 2`` after ``convertScaleAbs``; multicam: the same on the float input,
  no rounding or saturation.
- RandomCAM (pgc): ``np.random.uniform(-1, 1, (N, K))`` unseeded; multicam: ``(N, T, K)``
  from ``default_rng(seed)``.
- RefineCAM (pgc, torchcam): product of min-max normalised per-layer maps, normalised.
- SESS (authors): patches at several scales, probability-weighted, mean of values above
  ``theta``, Gaussian blur; the same steps, scales as factors of the input.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from conftest import available_frameworks, native_input, require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multicam as mc
from multicam import methods as mm
from multicam import zoo
from multicam.testing import assert_results_agree
from multicam.zoo import numpy as zoo_numpy

PLAIN = {"relu": False, "normalize": False, "size": None, "warn": False}

# Captum's one-conv net (tests/test_torch_backend.py) at conv1, input x[i, j] = 4 i + j:
#   A0 = [[-5, 4], [31, 40]]    A1 = [[-30, -21], [6, 15]] = A0 - 25
#   g0 = [[0, 1], [1, 1]]       g1 = [[0, 0], [-1, -1]]      (score of class 0: 54)
A0 = np.array([[-5.0, 4.0], [31.0, 40.0]])
A1 = A0 - 25
G0 = np.array([[0.0, 1.0], [1.0, 1.0]])
G1 = np.array([[0.0, 0.0], [-1.0, -1.0]])
X_ONE_CONV = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)


def _one_conv(method: Any, **options: Any) -> mc.CAMResult:
    require("torch")
    from test_torch_backend import OneConvNet

    return method(OneConvNet(), "conv1", **options)(X_ONE_CONV, targets=0, **PLAIN)


def _sigmoid(v: float) -> float:
    return float(1 / (1 + np.exp(-v)))


# --- hand-derived values -----------------------------------------------------------------


def test_class_activation_map_by_hand() -> None:
    # w_k = sum of g_k: w0 = 3, w1 = -2, so raw = 3 A0 - 2 A1 = A0 + 50
    res = _one_conv(mm.ClassActivationMap)
    np.testing.assert_allclose(res.weights[0, 0], [3.0, -2.0])
    np.testing.assert_allclose(res.raw[0, 0], A0 + 50, rtol=1e-6)
    # head_weights=: the columns of a (K, C) kernel, here W[:, 0] = (2, -1)
    head = np.array([[2.0, 0.0], [-1.0, 1.0]])
    res = _one_conv(mm.ClassActivationMap, head_weights=head)
    np.testing.assert_allclose(res.raw[0, 0], 2 * A0 - A1, rtol=1e-6)
    with pytest.raises(mc.OptionError, match="transpose"):
        _one_conv(mm.ClassActivationMap, head_weights=np.ones((3, 4)))
    with pytest.raises(mc.OptionError, match=r"\(K, C\)"):
        _one_conv(mm.ClassActivationMap, head_weights=np.ones(3))


def test_eigen_grad_cam_by_hand() -> None:
    # Products P0 = g0 A0 = [[0, 4], [31, 40]], P1 = g1 A1 = [[0, 0], [-6, -15]]; the
    # positions (P0, P1) = (0, 0), (4, 0), (31, -6), (40, -15) have mean (18.75, -5.25);
    # the centred scatter matrix [[a, b], [b, c]] has a = 1170.75, b = -392.25,
    # c = 150.75; its top eigenvector is (b, lambda - a) with
    # lambda = (a + c) / 2 + sqrt(((a - c) / 2)^2 + b^2). map = v0 P0 + v1 P1, the sign
    # making its sum positive.
    a, b, c = 1170.75, -392.25, 150.75
    lam = (a + c) / 2 + np.sqrt(((a - c) / 2) ** 2 + b**2)
    v = np.array([b, lam - a]) / np.hypot(b, lam - a)
    p0, p1 = G0 * A0, G1 * A1
    expected = v[0] * p0 + v[1] * p1
    expected *= np.sign(expected.sum())
    res = _one_conv(mm.EigenGradCAM)
    np.testing.assert_allclose(res.raw[0, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(np.abs(res.weights[0, 0]), np.abs(v * [0.75, -0.5]), rtol=1e-5)


def test_fem_by_hand() -> None:
    # A0: mean 17.5, population std sqrt(344.25) = 18.55; k = 0.5: threshold 26.78, passed
    # by 31 and 40, so w0 = 2 / 4; A1 = A0 - 25 passes at the same places: w1 = 1 / 2.
    # raw = (A0 + A1) / 2 = A0 - 12.5, the same for every target.
    res = _one_conv(mm.FEM, k=0.5)
    np.testing.assert_allclose(res.weights[0, 0], [0.5, 0.5])
    np.testing.assert_allclose(res.raw[0, 0], A0 - 12.5, rtol=1e-6)
    # k = 2: threshold 54.6, above every value: all weights 0
    np.testing.assert_array_equal(_one_conv(mm.FEM).weights, 0)
    with pytest.raises(mc.OptionError, match="k="):
        _one_conv(mm.FEM, k=-1)


def test_random_cam_draws_its_weights_from_numpy() -> None:
    # the weights are default_rng(seed).uniform(-1, 1, (N, T, K)), the map their sum
    w = np.random.default_rng(7).uniform(-1, 1, (1, 1, 2))
    res = _one_conv(mm.RandomCAM, seed=7)
    np.testing.assert_allclose(res.weights, w, rtol=1e-6)
    np.testing.assert_allclose(res.raw[0, 0], w[0, 0, 0] * A0 + w[0, 0, 1] * A1, rtol=1e-5)
    fresh = [_one_conv(mm.RandomCAM, seed=None).weights for _ in range(2)]
    assert not np.array_equal(*fresh)


def _identity_1d(length_head: bool = False) -> Any:
    """conv1d 1x1 (weight 1, bias 0: the layer is the input) -> mean -> linear (1, -1)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 1, 1)
            self.fc = torch.nn.Linear(1, 2)
            with torch.no_grad():
                self.conv.weight.fill_(1.0)
                self.conv.bias.zero_()
                self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
                self.fc.bias.zero_()

        def forward(self, x: Any) -> Any:
            return self.fc(self.conv(x).mean(dim=2))

    return Net().eval()


def test_kpca_cam_by_hand_and_against_scikit_learn() -> None:
    require("torch")
    # One channel, activations [0, 1, 5]: centred [-2, -1, 3]. The linear kernel's centred
    # matrix is c c^T, top eigenpair (|c|^2, c / |c|), projection sqrt(lambda) v = c; its
    # largest entry (3) is already positive.
    x = np.array([[[0.0, 1.0, 5.0]]], np.float32)
    explainer = mm.KPCACAM(_identity_1d(), "conv", kernel="linear")
    np.testing.assert_allclose(explainer(x, targets=0, **PLAIN).raw[0, 0], [-2, -1, 3], atol=1e-6)
    # pytorch-grad-cam calls KernelPCA(n_components=1, kernel=...) on the centred (P, K)
    # matrix: the same numbers, sign included, for every kernel
    decomposition = pytest.importorskip("sklearn.decomposition")
    activations = np.random.default_rng(0).normal(size=(2, 5, 6, 6))
    for kernel in ("sigmoid", "rbf", "poly", "cosine", "linear"):
        ours = mm.kernel_pca_projection(activations, kernel)
        for n in range(2):
            rows = activations[n].reshape(5, -1).T
            rows = rows - rows.mean(axis=0)
            theirs = decomposition.KernelPCA(n_components=1, kernel=kernel).fit_transform(rows)
            np.testing.assert_allclose(
                ours[n].ravel(), theirs[:, 0], rtol=1e-4, atol=1e-6, err_msg=kernel
            )


def test_sobel_cam_by_hand() -> None:
    # x[i, j] = 4 i + j: inside, Gx = (1 + 2 + 1) * (x[j+1] - x[j-1]) = 4 * 2 = 8 and
    # Gy = 4 * 8 = 32. Reflect-101 borders mirror column 1 onto column -1, so Gx = 0 on the
    # first and last column (and Gy on the first and last row): map = (Gx_j + Gy_i) / 2.
    gx, gy = np.array([0, 8, 8, 0]), np.array([0, 32, 32, 0])
    expected = (gx[None, :] + gy[:, None]) / 2
    res = _one_conv(mm.SobelCAM)
    np.testing.assert_allclose(res.raw[0, 0], expected)
    np.testing.assert_array_equal(res.weights, 0)
    # three channels: the luma 0.299 R + 0.587 G + 0.114 B, here R = x, G = B = 0
    import torch
    from test_torch_backend import OneConvNet

    rgb = np.concatenate([X_ONE_CONV, np.zeros_like(X_ONE_CONV), np.zeros_like(X_ONE_CONV)], 1)
    model = OneConvNet()
    model.conv1 = torch.nn.Conv2d(3, 2, 3)
    res = mm.SobelCAM(model, "conv1")(rgb, targets=0, **PLAIN)
    np.testing.assert_allclose(res.raw[0, 0], 0.299 * expected, rtol=1e-6)
    with pytest.raises(mc.OptionError, match="eigen_smooth"):
        mm.SobelCAM(model, "conv1")(rgb, eigen_smooth=True)


def test_smooth_grad_cam_plus_plus_by_hand() -> None:
    require("torch")
    # The 1-D identity net with a ReLU after the layer: score_0 = mean(relu(A)), so
    # g_j = [A_j > 0] / 2 on a copy. Input [0.1, -0.1] (sum of A = 0) plus noise e_d:
    # with f_j the share of copies where x_j + e_dj > 0, D_p = f_j / 2^p and
    # alpha = D2 / (2 D2 + 0 * D3) = 1/2 wherever f_j > 0, so
    # w = sum_j alpha relu(D1) = (f_0 + f_1) / 4 and raw = w A.
    import torch

    net = _identity_1d()
    model = torch.nn.Sequential()
    model.add_module("conv", net.conv)
    model.add_module("relu", torch.nn.ReLU())
    model.add_module("pool", torch.nn.AdaptiveAvgPool1d(1))
    model.add_module("flat", torch.nn.Flatten())
    model.add_module("fc", net.fc)
    x = np.array([[[0.1, -0.1]]], np.float32)
    # the noise: default_rng(seed).standard_normal((D, N, *S, C)) * std, channels-last
    noise = np.random.default_rng(3).standard_normal((6, 1, 2, 1)).astype(np.float32)
    noisy = x[0, 0] + np.float32(0.5) * noise[:, 0, :, 0]  # (D, 2)
    f = (noisy > 0).mean(axis=0)
    explainer = mm.SmoothGradCAMPlusPlus(model, "conv", num_samples=6, std=0.5, seed=3)
    res = explainer(x, targets=0, **PLAIN)
    np.testing.assert_allclose(res.weights[0, 0, 0], f.sum() / 4, rtol=1e-6)
    np.testing.assert_allclose(res.raw[0, 0], f.sum() / 4 * x[0, 0], rtol=1e-6)
    # std = 0: every copy is the input, so the map is Grad-CAM++'s
    still = mm.SmoothGradCAMPlusPlus(model, "conv", std=0.0)(x, targets=0, **PLAIN)
    plain = mc.GradCAMPlusPlus(model, "conv")(x, targets=0, **PLAIN)
    np.testing.assert_allclose(still.raw, plain.raw, rtol=1e-6)


def _masks(x: np.ndarray) -> np.ndarray:
    """Score-CAM's masks of the tiny net: (N, K, 6, 6), upsampled then normalised."""
    from test_perturbation import _bilinear_up, _tiny_layer

    a = _tiny_layer(x.astype(np.float64))
    masks = np.empty((*a.shape[:2], 6, 6))
    for n in range(a.shape[0]):
        for k in range(a.shape[1]):
            m = _bilinear_up(a[n, k], 6)
            masks[n, k] = (m - m.min()) / (m.max() - m.min())
    return masks


@pytest.mark.parametrize("path", ["cumulative", "linear"])
def test_is_cam_by_hand_on_the_tiny_net(path: str) -> None:
    # The tiny net of test_perturbation (conv 1x1 stride 2 -> GAP -> linear) is affine in
    # its input, so the mean over the path of Y(x * c_i H_k) is Y(x * mean(c) H_k):
    # cumulative c_i = i (i + 1) / (2 D), mean (D + 1)(D + 2) / (6 D); linear c_i = i / D,
    # mean (D + 1) / (2 D). Weights: softmax over k of those target logits.
    require("torch")
    from test_perturbation import _softmax, _tiny_forward, _tiny_layer, _tiny_torch

    d = 4
    scale = (d + 1) * (d + 2) / (6 * d) if path == "cumulative" else (d + 1) / (2 * d)
    x = np.random.default_rng(0).normal(size=(2, 1, 6, 6)).astype(np.float32)
    masks = _masks(x)
    classes = np.array([[0, 2], [1, 1]])
    expected = np.empty((2, 2, 2))
    for n in range(2):
        logits = np.stack(
            [_tiny_forward(x[n : n + 1] * scale * masks[n, k])[0] for k in range(2)]
        )  # (K, C)
        expected[n] = _softmax(logits[:, classes[n]].T)
    res = mm.ISCAM(_tiny_torch(), "conv", num_samples=d, path=path)(x, targets=classes, **PLAIN)
    np.testing.assert_allclose(res.weights, expected, rtol=1e-5)
    a = _tiny_layer(x.astype(np.float64))
    np.testing.assert_allclose(res.raw, np.einsum("ntk,nkhw->nthw", expected, a), rtol=1e-5)


def test_ss_cam_by_hand_on_the_tiny_net() -> None:
    # The net is affine, so the mean over noisy masks of Y(x * (H + e_d)) is
    # Y(x * (H + mean_d e_d)); the noise of (sample n, channel k) is
    # default_rng([seed, n, k]).standard_normal((D, 6, 6)) * std.
    require("torch")
    from test_perturbation import _softmax, _tiny_forward, _tiny_torch

    d, std, seed = 3, 0.7, 11
    x = np.random.default_rng(1).normal(size=(2, 1, 6, 6)).astype(np.float32)
    masks = _masks(x)
    expected = np.empty((2, 1, 2))
    for n in range(2):
        scores = []
        for k in range(2):
            noise = np.random.default_rng([seed, n, k]).standard_normal((d, 6, 6)) * std
            mask = masks[n, k] + noise.astype(np.float32).mean(axis=0)
            scores.append(_tiny_forward(x[n : n + 1] * mask)[0, 2])
        expected[n, 0] = _softmax(np.array(scores))
    explainer = mm.SSCAM(_tiny_torch(), "conv", num_samples=d, std=std, seed=seed)
    res = explainer(x, targets=2, **PLAIN)
    np.testing.assert_allclose(res.weights, expected, rtol=1e-4)
    # noise and results do not depend on how the masked passes are chunked
    again = explainer(x, targets=2, batch_size=2, **PLAIN)
    np.testing.assert_allclose(again.weights, res.weights, rtol=1e-6)


def test_deep_feature_factorization_by_hand() -> None:
    # Shifted by each channel's minimum (-5 and -30), both channels are [0, 9, 36, 45]:
    # a rank-1 matrix, which one NMF component reproduces, H proportional to it; the
    # normalised concept map is [0, 0.2, 0.8, 1].
    require("torch")
    from test_torch_backend import OneConvNet

    explainer = mm.DeepFeatureFactorization(OneConvNet(), "conv1", concepts=1, max_iter=500)
    res = explainer(X_ONE_CONV, size=None, warn=False)
    assert isinstance(res, mm.ConceptResult) and res.targets is None
    np.testing.assert_allclose(res.maps[0, 0].ravel(), [0, 0.2, 0.8, 1], atol=1e-4)
    assert res.concepts is not None and res.concepts.shape == (2, 1)
    # the concept vectors less the offsets, times H, give the shifted activations back
    shifted_w = res.concepts[:, 0] - np.array([-5.0, -30.0])
    np.testing.assert_allclose(
        np.outer(shifted_w, res.raw[0, 0].ravel())[0], [0, 9, 36, 45], atol=1e-2
    )
    head = mm.DeepFeatureFactorization(OneConvNet(), "conv1", concepts=1, head=lambda c: c * 2)
    assert head(X_ONE_CONV, warn=False).concept_outputs.shape == (1, 2)
    with pytest.raises(mc.OptionError, match="aug_smooth"):
        explainer(X_ONE_CONV, aug_smooth=True)


def test_nmf_is_scikit_learns_multiplicative_update() -> None:
    """Same initialisation (init='random', RandomState) and W-then-H update order."""
    decomposition = pytest.importorskip("sklearn.decomposition")
    matrix = np.abs(np.random.default_rng(2).normal(size=(6, 20)))
    w, h = mm.nmf(matrix, 3, max_iter=30, seed=0)
    model = decomposition.NMF(3, init="random", random_state=0, solver="mu", max_iter=30, tol=0)
    theirs_w = model.fit_transform(matrix)
    np.testing.assert_allclose(w, theirs_w, rtol=1e-6)
    np.testing.assert_allclose(h, model.components_, rtol=1e-6)


def test_sess_by_hand_on_a_1d_net() -> None:
    # The 1-D identity net: logits (m, -m), m the mean of the patch, so the probability of
    # class 0 is sigmoid(2 m) and Grad-CAM's map of a patch is A / L, normalised [0, 1]
    # on an increasing patch. Input [1, 2, 3, 4], windows of 2 every 2:
    #   scale 1: patches [1, 2] (m 1.5) and [3, 4] (m 3.5) -> [0, 1] at pixels (0, 1), (2, 3)
    #   scale 2: the input resized to [1, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75, 4], patches
    #            of means 1.125, 2, 3, 3.875 -> [0, 1], each resized back onto pixel q as
    #            (0 + 1) / 2 (the 8 -> 4 half-pixel average of pixels 2q and 2q + 1)
    # each times p / max p, max p = sigmoid(7.75); the mean of the positive values per
    # pixel, no blur.
    require("torch")
    s = _sigmoid
    top = s(7.75)
    expected = np.array(
        [
            s(2.25) / 2 / top,
            (s(3) / top + s(4) / 2 / top) / 2,
            s(6) / 2 / top,
            (s(7) / top + s(7.75) / 2 / top) / 2,
        ]
    )
    x = np.array([[[1.0, 2.0, 3.0, 4.0]]], np.float32)
    sess = mm.SESS(_identity_1d(), "conv", scales=(1, 2), window=2, smooth=None)
    res = sess(x, targets=0, **PLAIN)
    np.testing.assert_allclose(res.raw[0, 0], expected, rtol=1e-5)
    assert type(sess).__name__ == "SESS[GradCAM]" and isinstance(sess, mc.GradCAM)
    # pre_filter=0.5 drops the 3 least likely of 6 patches (sigmoid 2.25, 3, 4)
    pruned = mm.SESS(_identity_1d(), "conv", scales=(1, 2), window=2, smooth=None, pre_filter=0.5)
    expected_pruned = [0.0, 0.0, expected[2], expected[3]]
    np.testing.assert_allclose(pruned(x, targets=0, **PLAIN).raw[0, 0], expected_pruned, rtol=1e-5)
    # max pooling keeps the larger of the two values at pixels 1 and 3
    biggest = mm.SESS(_identity_1d(), "conv", scales=(1, 2), window=2, smooth=None, pool="max")
    expected_max = [expected[0], s(3) / top, expected[2], s(7) / top]
    np.testing.assert_allclose(biggest(x, targets=0, **PLAIN).raw[0, 0], expected_max, rtol=1e-5)


def test_gaussian_blur_is_opencvs_kernel() -> None:
    # sigma 1: radius 1, weights exp(-1/2), 1, exp(-1/2) normalised; a unit impulse in the
    # middle of 5 pixels spreads into them, and reflect-101 folds the edge back in.
    edge = np.exp(-0.5) / (1 + 2 * np.exp(-0.5))
    centre = 1 / (1 + 2 * np.exp(-0.5))
    impulse = np.array([[0.0, 0.0, 1.0, 0.0, 0.0]])
    np.testing.assert_allclose(mm.gaussian_blur(impulse, 1.0, 1)[0], [0, edge, centre, edge, 0])
    at_edge = mm.gaussian_blur(np.array([[1.0, 0.0, 0.0]]), 1.0, 1)[0]
    np.testing.assert_allclose(at_edge, [centre, edge, 0.0])  # x[-1] is x[1] = 0


# --- closed forms on the GAP net, every backend ------------------------------------------


def test_cam_is_the_head_weights_on_the_gap_net(framework: str) -> None:
    """conv -> GAP -> linear: sum of dS_c/dA_k = W[k, c], so CAM = hw Grad-CAM = W A."""
    weights = zoo.init_weights("gap_cnn", 0)
    x = native_input(framework, zoo.example_input("gap_cnn", 2, seed=3))

    def run(method: Any) -> mc.CAMResult:
        explainer = zoo.explainer("gap_cnn", framework, "features.relu2", weights, method=method)
        return explainer(x, targets="all", **PLAIN)

    cam = run(mm.ClassActivationMap)
    kernel = weights["fc.kernel"].astype(np.float64)
    expected = np.einsum("kc,nkhw->nchw", kernel, cam.activations.astype(np.float64))
    np.testing.assert_allclose(cam.raw, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cam.raw, 144 * run(mc.GradCAM).raw, rtol=1e-4, atol=1e-5)
    given_head = run(functools.partial(mm.ClassActivationMap, head_weights=kernel))
    np.testing.assert_allclose(given_head.raw, expected, rtol=1e-5, atol=1e-5)


def test_finer_cam_closed_form_on_the_gap_net(framework: str) -> None:
    """g = (W[:, c] - alpha sum_m p_m W[:, m]) / hw, m the 3 logits closest to s_c."""
    weights = zoo.init_weights("gap_cnn", 0)
    inputs = zoo.example_input("gap_cnn", 2, seed=3)
    logits, _ = zoo_numpy.forward("gap_cnn", weights, inputs)
    kernel = weights["fc.kernel"].astype(np.float64)  # (K, C)
    classes = np.array([[0, 3], [4, 1]])
    method = functools.partial(mm.FinerCAM, alpha=0.8)
    explainer = zoo.explainer("gap_cnn", framework, "features.relu2", weights, method=method)
    res = explainer(native_input(framework, inputs), targets=classes, **PLAIN)
    for n in range(2):
        for t in range(2):
            c = classes[n, t]
            distance = np.abs(logits[n] - logits[n, c])
            distance[c] = np.inf
            similar = np.argsort(distance, kind="stable")[:3]
            p = np.exp(logits[n, similar] - logits[n].max())
            p /= p.sum()
            direction = kernel[:, c] - 0.8 * kernel[:, similar] @ p
            np.testing.assert_allclose(res.weights[n, t], direction / 144, rtol=1e-4, atol=1e-7)
            score = logits[n, c] - 0.8 * logits[n, similar] @ p
            np.testing.assert_allclose(res.scores[n, t], score, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(res.targets, classes)


def test_finer_cam_with_one_reference_is_the_difference_of_scores() -> None:
    """With one comparison class the softmax weight is 1 whether differentiated or not:
    pytorch-grad-cam's FinerWeightedTarget then explains s_c - alpha s_m exactly."""
    require("torch")
    model = zoo.build("digits_cnn", "torch")
    x = zoo.example_input("digits_cnn", 2, seed=4, layout="channels_first")
    logits = mm.FinerCAM(model, "features.relu3").bound.outputs(x)
    c = logits.argmax(axis=1)
    distance = np.abs(logits - logits[np.arange(2), c][:, None])
    distance[np.arange(2), c] = np.inf
    m = distance.argmin(axis=1)

    def difference(out: Any) -> Any:
        rows = np.arange(2)
        return out[rows, c] - 0.5 * out[rows, m]

    finer = mm.FinerCAM(model, "features.relu3", references=1, alpha=0.5)(x, **PLAIN)
    explicit = mc.GradCAM(model, "features.relu3")(x, targets=difference, **PLAIN)
    np.testing.assert_allclose(finer.raw, explicit.raw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(finer.scores, explicit.scores, rtol=1e-6)
    # explicit comparison classes, and the mean weighting (torchcam's with alpha=0.6)
    fixed = mm.FinerCAM(model, "features.relu3", compare_to=[m[0]], alpha=0.5)
    np.testing.assert_allclose(fixed(x[:1], **PLAIN).raw, finer.raw[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(mc.TargetError, match="compared with itself"):
        fixed(x[:1], targets=int(m[0]))
    with pytest.raises(mc.TargetError, match="class targets"):
        mm.FinerCAM(model, "features.relu3")(x, targets=difference)
    with pytest.raises(mc.OptionError, match="method=ScoreCAM"):
        mm.FinerCAM(model, "features.relu3", method=mc.ScoreCAM)
    with pytest.raises(mc.OptionError, match="meta-method"):
        mm.SESS(model, "features.relu3", method=mm.FinerCAM)


def test_smooth_grad_cam_plus_plus_is_grad_cam_plus_plus_on_the_gap_net() -> None:
    """At relu2 of the GAP net the gradients are W / hw whatever the input: noise changes
    nothing, so every seed gives Grad-CAM++'s map."""
    require("torch")
    model = zoo.build("gap_cnn", "torch")
    x = zoo.example_input("gap_cnn", 2, seed=1, layout="channels_first")
    smooth = mm.SmoothGradCAMPlusPlus(model, "features.relu2", std=1.0, seed=5)
    plain = mc.GradCAMPlusPlus(model, "features.relu2")
    np.testing.assert_allclose(
        smooth(x, targets="all", **PLAIN).raw, plain(x, targets="all", **PLAIN).raw, rtol=1e-5
    )


def test_sess_of_one_whole_patch_is_the_base_map() -> None:
    """One scale, the window the input: the fused map is the base map, normalised."""
    require("torch")
    model = zoo.build("digits_cnn", "torch")
    x = zoo.example_input("digits_cnn", 2, seed=2, layout="channels_first")
    for method in (mc.GradCAM, mc.LayerCAM):
        sess = mm.SESS(model, "features.relu4", method=method, scales=(1.0,), smooth=None)
        res = sess(x, targets=[3, 5], size=None, normalize=False, warn=False)
        base = method(model, "features.relu4")(x, targets=[3, 5], warn=False)
        np.testing.assert_allclose(res.raw, base.maps, atol=1e-6)
        np.testing.assert_array_equal(res.targets, base.targets)


def test_refine_cam_is_the_product_of_normalised_maps() -> None:
    require("torch")
    model = zoo.build("digits_cnn", "torch")
    x = zoo.example_input("digits_cnn", 2, layout="channels_first")
    layers = ["features.relu2", "features.relu4"]
    refined = mm.RefineCAM(model, layers)(x, warn=False)
    singles = [
        mc.GradCAMPlusPlus(model, layer)(x, targets=refined.targets, warn=False) for layer in layers
    ]
    product = singles[0].maps.astype(np.float64) * singles[1].maps
    np.testing.assert_allclose(refined.maps, mc.algebra.normalize(product, 2), atol=1e-6)
    assert refined.combine == "product" and list(refined.layers) == layers


# --- every backend, the same maps ----------------------------------------------------------

AGREEING = {
    "ClassActivationMap": mm.ClassActivationMap,
    "EigenGradCAM": mm.EigenGradCAM,
    "FEM": mm.FEM,
    "KPCACAM": mm.KPCACAM,
    "RandomCAM": mm.RandomCAM,
    "SobelCAM": mm.SobelCAM,
    "SmoothGradCAMPlusPlus": mm.SmoothGradCAMPlusPlus,
    "SSCAM": functools.partial(mm.SSCAM, num_samples=2),
    "ISCAM": functools.partial(mm.ISCAM, num_samples=2),
    "DeepFeatureFactorization": functools.partial(mm.DeepFeatureFactorization, concepts=3),
    "FinerCAM": mm.FinerCAM,
    "FinerCAM[LayerCAM]": functools.partial(mm.FinerCAM, method=mc.LayerCAM),
    "SESS": functools.partial(mm.SESS, scales=(1.0, 1.5), smooth=1.0),
    "ShapleyCAM": mm.ShapleyCAM,
    "ShapleyCAM[output]": functools.partial(mm.ShapleyCAM, score="output"),
    "FullGrad": mm.FullGrad,  # ignores the layer: input and every bias layer
}


@functools.lru_cache(maxsize=16)
def _model(framework: str, arch: str) -> Any:
    return zoo.build(arch, framework, zoo.init_weights(arch, 1))


def _explainer(framework: str, arch: str, layer: str, name: str) -> Any:
    """``AGREEING[name]`` on a model built once per framework and architecture."""
    model, options = _model(framework, arch), {}
    if framework == "flax":
        model, options["variables"] = model
    return AGREEING[name](model, zoo.layer_name(layer, framework), **options)


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(AGREEING)),
    st.sampled_from(["gap_cnn", "digits_cnn", "conv1d_net"]),
    st.integers(0, 2**16),
    st.data(),
)
def test_every_method_agrees_across_backends(
    name: str, arch: str, input_seed: int, data: st.DataObject
) -> None:
    relus = [layer for layer in zoo.ARCHITECTURES[arch].cam_layers if "relu" in layer]
    layer = data.draw(st.sampled_from(relus))
    inputs = zoo.example_input(arch, 2, seed=input_seed)
    targets = None if name.startswith("DeepFeature") else [1, 2]
    results = {
        framework: _explainer(framework, arch, layer, name)(
            native_input(framework, inputs), targets=targets, warn=False
        )
        for framework in available_frameworks()
    }
    assert_results_agree(results)


def test_class_targets_only_where_scores_are_read() -> None:
    require("torch")
    model = zoo.build("gap_cnn", "torch")
    x = zoo.example_input("gap_cnn", 1, layout="channels_first")
    score = lambda out: out[:, 0]  # noqa: E731
    for method in (mm.SESS, mm.SSCAM, mm.ISCAM):
        with pytest.raises(mc.TargetError, match="class targets"):
            method(model, "features.relu2")(x, targets=score)
    with pytest.raises(mc.TargetError, match="class targets"):
        mm.ClassActivationMap(model, "features.relu2", head_weights=np.ones((8, 5)))(
            x, targets=score
        )
    # the gradient form takes any target
    assert mm.ClassActivationMap(model, "features.relu2")(x, targets=score).raw.shape[1] == 1
    with pytest.raises(mc.OptionError, match="window"):
        mm.SESS(model, "features.relu2", window=20)(x, targets=0)
    with pytest.raises(mc.OptionError, match="eigen_smooth"):
        mm.KPCACAM(model, "features.relu2")(x, eigen_smooth=True)
    with pytest.raises(mc.OptionError, match="scales"):
        mm.SESS(model, "features.relu2", scales=(0.5,))
