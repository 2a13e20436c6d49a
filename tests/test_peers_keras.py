"""Cross-checks against tf-keras-vis, an independent Keras implementation.

Every difference in convention is written down and compensated here, not hidden behind a
loose tolerance:

- ``Gradcam``: the same definition (mean gradients, weighted sum, ReLU): compared as is.
- ``GradcamPlusPlus``: tf-keras-vis keeps the factor ``exp(S)`` in ``relu(dY/dA)`` and
  divides each channel's ``alpha`` by its spatial sum (the official Grad-CAM++ code does
  so); multicam follows the paper's weights without that division. Compensated by
  rescaling multicam's weights channel by channel.
- ``Scorecam``: tf-keras-vis weighs channel k by the softmax probability of the class on
  the masked input; multicam's ``weighting="baseline"`` subtracts the probability on an
  all-zero input, a constant per target, so the maps differ by that constant times
  ``sum_k A_k``. tf-keras-vis upsamples masks with corner-aligned ``scipy.ndimage.zoom``;
  the check uses a layer at the input's resolution, where no upsampling happens.

tf-keras-vis replaces a layer that is not convolutional by the conv layer before it unless
``seek_penultimate_conv_layer=False``, which the checks pass. It cannot handle nested
Keras 3 models, so the network here is flat.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tf_keras_vis")
keras = pytest.importorskip("keras")
from tf_keras_vis.gradcam import Gradcam  # noqa: E402
from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus  # noqa: E402
from tf_keras_vis.scorecam import Scorecam  # noqa: E402
from tf_keras_vis.utils.scores import CategoricalScore  # noqa: E402

import multicam as mc  # noqa: E402

CLASSES = [1, 3]


@pytest.fixture(scope="module")
def flat_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", name="conv1")(inputs)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", strides=2, name="conv2")(h)
    h = keras.layers.ReLU(name="relu2")(h)
    outputs = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype(np.float32)


def _theirs(tool: object, layer: str, x: np.ndarray) -> np.ndarray:
    cam = tool(  # type: ignore[operator]
        CategoricalScore(CLASSES),
        x,
        penultimate_layer=layer,
        expand_cam=False,
        normalize_cam=False,
        seek_penultimate_conv_layer=False,
    )
    return np.asarray(cam)


def test_gradcam_equals_tf_keras_vis(flat_model: keras.Model, x: np.ndarray) -> None:
    theirs = _theirs(Gradcam(flat_model, clone=True), "relu2", x)
    ours = mc.GradCAM(flat_model, "relu2")(x, CLASSES, normalize=False, size=None, warn=False)
    np.testing.assert_allclose(ours.maps[:, 0], theirs, rtol=1e-5, atol=1e-6)


def test_gradcam_plus_plus_equals_tf_keras_vis_after_compensation(
    flat_model: keras.Model, x: np.ndarray
) -> None:
    theirs = _theirs(GradcamPlusPlus(flat_model, clone=True), "relu2", x)
    res = mc.GradCAMPlusPlus(flat_model, "relu2")(
        x, CLASSES, relu=False, normalize=False, size=None, warn=False
    )
    g = res.gradients[:, 0].astype(np.float64)  # (N, K, h, w)
    a = res.activations.astype(np.float64)
    totals = a.sum(axis=(2, 3), keepdims=True)
    denominator = 2 * g**2 + totals * g**3
    alpha = np.divide(g**2, denominator, out=np.zeros_like(g), where=g**2 != 0)
    alpha_sums = alpha.sum(axis=(2, 3))
    alpha_sums[alpha_sums == 0] = 1.0
    weights = res.weights[:, 0] * np.exp(res.scores[:, :1]) / alpha_sums  # (N, K)
    compensated = np.maximum(np.einsum("nk,nkhw->nhw", weights, a), 0)
    np.testing.assert_allclose(compensated, theirs, rtol=1e-4, atol=1e-6)


def test_scorecam_equals_tf_keras_vis_after_compensation(
    flat_model: keras.Model, x: np.ndarray
) -> None:
    theirs = _theirs(Scorecam(flat_model, clone=True), "relu1", x)  # 12x12: no upsampling
    explainer = mc.ScoreCAM(flat_model, "relu1", weighting="baseline")
    res = explainer(x, CLASSES, relu=False, normalize=False, size=None, warn=False)
    logits = explainer.bound.outputs(np.zeros_like(x[:1]))[0]
    p_zero = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    baseline = p_zero[CLASSES][:, None, None] * res.activations.sum(axis=1)
    compensated = np.maximum(res.raw[:, 0] + baseline, 0)
    np.testing.assert_allclose(compensated, theirs, rtol=1e-4, atol=1e-5)
