"""multicam.metrics against the peers' own code: pytorch-grad-cam 1.5.x and Quantus 0.6.

These run only where the peers import (the peers environment, ``benchmarks/
constraints-peers.txt``: they need torchvision, which does not install beside the pinned
torch of the default environment); elsewhere they skip with the reason; the Keras checks
also need ``tensorflow-cpu`` there (torch is imported first, as TensorFlow requires). The
torch model is a small CNN of our own with fixed weights (drawn from ``default_rng(0)``);
the Keras models are the zoo's ``gap_cnn`` (``init_weights(seed=0)``, beside its torch
twin with the same weights) and ``digits_cnn`` with the demo's trained weights; each is
explained by multicam's Grad-CAM. The maps given to every metric are the Grad-CAM maps made
strictly distinct (their rank over the image, ``rank / (P - 1)``, ties between equal
Grad-CAM values, e.g. a blank map, broken by a fixed random draw), so no metric's tie rule
matters.

Conventions compensated, read from the peers' source:

pytorch-grad-cam (``pytorch_grad_cam/metrics/road.py``, ``perturbation_confidence.py``,
``cam_mult_image.py``):

1. ``ROADMostRelevantFirst(percentile=q)`` removes the pixels at or above
   ``np.percentile(map, q)``, i.e. ``100 - q`` percent: its MoRF at ``q`` is multicam's
   MoRF at ``p = 100 - q``; its LeRF thresholds ``1 - map`` the same way, so its LeRF at
   ``q`` is multicam's LeRF at ``p = 100 - q``.
2. Counts: its threshold removes ``1 + floor(p (P - 1) / 100)`` of ``P`` distinct values,
   multicam ``floor(p P / 100)``; equal here because ``P = 100`` (10x10 images).
3. Ties at its threshold are all removed (multicam breaks them by position); the maps here
   have none.
4. Its noise is unseeded ``torch.randn``; the exact comparison composes its own classes
   (``PerturbationConfidenceMetric(RemoveMostRelevantFirst(q, NoisyLinearImputer(noise=0)))``)
   against multicam's ``noise=0``; with noise (its ``ROADCombined``, multicam's
   ``noise=0.01``) the two agree only statistically (tolerance below).
5. It solves the imputation with ``spsolve`` and casts to float32; multicam uses conjugate
   gradients in float64 and casts to the input's dtype: scores agree within 1e-4.
6. Its metrics return ``after - before`` per image (``morf - original`` here);
   ``ROADCombined`` equals multicam's ``combined``.
7. Its imputer turns a 3-row mask into a grey image (``mask.size()[0] == 3``); the images
   here are not 3 pixels high.
8. Confidence: ``CamMultImageConfidenceChange`` returns ``O - Y`` (``masked - original``),
   ``DropInConfidence`` ``max(0, Y - O)`` without dividing by ``Y`` (multicam's
   ``drop * original``), ``IncreaseInConfidence`` ``float32(O > Y)`` (multicam's
   ``increase``); its scores are its targets' (``ClassifierOutputSoftmaxTarget`` for
   multicam's ``softmax=True``). Its scores are float32: within 1e-6.

Quantus 0.6 (``quantus/metrics/faithfulness/pixel_flipping.py``,
``quantus/functions/perturb_func.py``, ``quantus/helpers/utils.py``):

9. ``PixelFlipping`` is deletion: it broadcasts the map to the input's shape and ranks the
   ``C x H x W`` elements by ``np.argsort(-a)`` (not stable; equal elements are the C
   channels of one position, adjacent in the order), so ``features_in_step = C * P /
   steps`` deletes ``P / steps`` whole positions per step, as multicam's
   ``(i * P) // steps`` does when ``steps`` divides ``P`` (16x16 images, 16 steps). Its
   check asserts that ``features_in_step`` divides ``H x W`` (not ``C x H x W``), so ``C``
   must divide ``P / steps``: the Quantus case has 2 channels.
10. Its curve omits the unperturbed input: its ``n`` points are multicam's steps
    ``1 .. steps``. Its default baseline ``"black"`` is the minimum of the (partly
    perturbed) image; ``perturb_baseline=0.0`` is multicam's ``baseline=0.0``.
11. It scores softmax probabilities by default (``softmax=True``); compared with both.
12. Its AUC (``return_auc_per_sample``) is ``np.trapz(curve, dx=1)`` over its curve:
    ``steps * auc - (s_0 + s_1) / 2`` in multicam's terms. It calls ``np.trapz``, which
    NumPy 2.4 removed: under NumPy >= 2.4 the tests give it ``np.trapezoid`` (the same
    function, NumPy 2's name) for the call (fixture ``quantus_trapz``).
13. ``normalise=True`` (default) rescales the map and ``abs`` takes its absolute value;
    both are turned off (neither changes the order of these non-negative maps).
14. Quantus's ROAD metric scores whether the argmax stays the target (an accuracy), not
    the target's score, so it is not compared; its imputation
    (``noisy_linear_imputation``, ``spsolve``) is, against ``metrics.impute`` with
    ``noise=0`` (within 1e-9).

Quantus 0.6 on a Keras 3 model (``quantus/helpers/model/tf_model.py``,
``quantus/metrics/base.py``, ``quantus/metrics/faithfulness/region_perturbation.py``),
Keras 3.15 on TensorFlow 2.21. Quantus's own ``tensorflow`` extra asks for
``tensorflow<2.16``, ``keras<3`` and ``numpy<2``; installed without it beside Keras 3 it
runs (a ``keras.Model`` is a ``tf.keras.Model`` there, so ``get_wrapped_model`` picks its
``TensorFlowModel``), with these differences:

15. Layout: ``x_batch`` goes in channels-last with ``channel_first=False`` (inferred from
    the shape if ``None``); Quantus moves it to channels-first for all its own work and
    back to channels-last (``shape_input``) before each ``model.predict``. So ``a_batch`` is
    given channels-first, ``(N, 1, H, W)`` (multicam's ``result.maps`` as they are, not
    ``(N, H, W, 1)``), and the ranking is over the channels-first ``C x H x W`` flattening,
    as on torch (conventions 9 and 10 hold unchanged; the ``gap_cnn`` case, 3 channels and
    12x12 images, uses 12 steps: ``features_in_step = 36`` divides 144). Its scores come
    from ``Model.predict`` (``verbose=0``, inference mode) in float32: within 1e-5.
16. Scores: ``TensorFlowModel`` decides logits or probabilities by rebuilding the model's
    top, reading ``model.layers[-1]``: with ``softmax=True`` it stacks a ``Softmax`` layer
    on ``layers[-1].output`` unless that layer is a ``Softmax`` or has a softmax
    ``activation``; with ``softmax=False`` it removes such a softmax (a separate layer, or
    the last ``Dense``'s activation, rebuilt linear). Both paths read
    ``layers[-1].activation``, so a model whose last layer is a nested model (the zoo's
    ``digits_cnn`` ends in the ``classifier`` Sequential) raises ``AttributeError:
    'Sequential' object has no attribute 'activation'`` on every metric. A linear
    ``Activation`` layer on top (``keras.Model(m.input, Activation("linear")(m.output))``,
    the same function) is enough; multicam needs no such change.
17. Cross-framework: on the torch twin (same weights, NCHW, ``channel_first=True``)
    multicam's deletion and Quantus's PixelFlipping equal the Keras curves within 1e-5.
18. ``RegionPerturbation(patch_size=1)`` is deletion with ``steps = P``: each 1x1 patch is
    the ``C`` elements of one position, ranked by their sum (``C x map``: the same order),
    descending for ``order="morf"`` and ascending for ``"lerf"`` (multicam's deletion ranked
    by ``1 - map``); its ``regions_evaluation`` points are the drops ``s_0 - s_i``,
    ``i = 1 .. regions_evaluation`` (multicam's curve, the unperturbed score minus step
    ``i``). Its default ``perturb_baseline`` is ``"black"`` as in 10, set to 0.0; its
    edge padding to a multiple of ``patch_size`` is none at 1.
"""

from __future__ import annotations

import importlib.util
import types
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

import multicam as mc
from multicam import metrics

torch = pytest.importorskip("torch", reason="the peers comparisons run a torch model")

HAS_PGC = importlib.util.find_spec("pytorch_grad_cam") is not None
HAS_QUANTUS = importlib.util.find_spec("quantus") is not None
needs_pgc = pytest.mark.skipif(
    not HAS_PGC,
    reason="pytorch-grad-cam (package grad-cam) is not installed: it needs torchvision, "
    "which installs only in the peers environment (benchmarks/constraints-peers.txt)",
)
HAS_KERAS = all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "keras"))
needs_keras = pytest.mark.skipif(
    not HAS_KERAS,
    reason="TensorFlow and Keras 3 are not installed beside Quantus (the peers environment "
    "installs tensorflow-cpu)",
)
needs_quantus = pytest.mark.skipif(
    not HAS_QUANTUS,
    reason="quantus is not installed: it installs only in the peers environment "
    "(benchmarks/constraints-peers.txt)",
)

CHANNELS = 3
CLASSES = 5


def small_cnn(channels: int = CHANNELS) -> Any:
    """conv(channels->4) relu conv(4->6) relu GAP linear(6->5), weights from default_rng(0)."""
    nn = torch.nn
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(channels, 4, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(4, 6, 3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, CLASSES),
        )
    )
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.from_numpy(rng.normal(0, 0.5, tuple(param.shape))))
    return model.float().eval()


def case(
    n: int, size: int, seed: int = 1, channels: int = CHANNELS
) -> tuple[Any, np.ndarray, Any, Any]:
    """(model, inputs, explainer, result with strictly distinct maps in [0, 1])."""
    model = small_cnn(channels)
    x = np.random.default_rng(seed).uniform(0, 1, (n, channels, size, size)).astype(np.float32)
    cam = mc.GradCAM(model, "relu2")
    return model, x, cam, distinct(cam(x), seed + 1)


def distinct(res: Any, seed: int) -> Any:
    """``res``'s maps made strictly distinct: their rank / (P - 1), ties broken at random."""
    maps = np.asarray(res.maps, np.float64)  # (N, T, H, W)
    h, w = maps.shape[-2:]
    jitter = np.random.default_rng(seed).permutation(h * w).reshape(h, w)
    flat = (maps + 1e-9 * jitter).reshape(*maps.shape[:2], -1)
    ranks = np.argsort(np.argsort(flat, axis=-1, kind="stable"), axis=-1, kind="stable")
    maps = (ranks / (h * w - 1)).reshape(maps.shape)
    assert all(len(np.unique(m)) == h * w for m in maps.reshape(-1, h * w))
    return types.SimpleNamespace(maps=maps, targets=np.asarray(res.targets))


def _targets(result: Any, softmax: bool) -> list[Any]:
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputSoftmaxTarget,
        ClassifierOutputTarget,
    )

    kind = ClassifierOutputSoftmaxTarget if softmax else ClassifierOutputTarget
    return [kind(int(c)) for c in np.asarray(result.targets)[:, 0]]


# --- pytorch-grad-cam ------------------------------------------------------------------------


@needs_pgc
@pytest.mark.parametrize("softmax", [False, True])
def test_road_equals_pytorch_grad_cams_without_noise(softmax: bool) -> None:
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    model, x, cam, result = case(4, 10)
    ours = metrics.road(cam, x, result, noise=0.0, softmax=softmax)
    cams = np.asarray(result.maps, np.float32)[:, 0]
    tensor = torch.from_numpy(x)
    targets = _targets(result, softmax)
    for k, p in enumerate(ours.percentiles):
        q = int(100 - p)
        assert ours.counts[k] == 1 + int(p * 99 // 100)  # convention 2: the counts agree
        for removal, column in (
            (RemoveMostRelevantFirst, ours.morf),
            (RemoveLeastRelevantFirst, ours.lerf),
        ):
            metric = PerturbationConfidenceMetric(removal(q, NoisyLinearImputer(noise=0.0)))
            theirs = metric(tensor, cams, targets, model)
            np.testing.assert_allclose(
                column[:, 0, k] - ours.original[:, 0], theirs, atol=1e-4, rtol=0
            )


@needs_pgc
def test_road_combined_matches_pytorch_grad_cams_with_noise() -> None:
    """With noise 0.01 the draws differ (convention 4): equal within 0.05 of the logit range."""
    from pytorch_grad_cam.metrics.road import ROADCombined

    model, x, cam, result = case(4, 10)
    ours = metrics.road(cam, x, result, noise=0.01, seed=3)
    torch.manual_seed(0)
    theirs = ROADCombined()(
        torch.from_numpy(x),
        np.asarray(result.maps, np.float32)[:, 0],
        _targets(result, False),
        model,
    )
    clean = metrics.road(cam, x, result, noise=0.0)
    spread = float(np.ptp(np.concatenate([clean.morf.ravel(), clean.lerf.ravel()])))
    np.testing.assert_allclose(ours.combined[:, 0], theirs, atol=0.05 * spread, rtol=0)


@needs_pgc
@pytest.mark.parametrize("softmax", [True, False])
def test_confidence_change_equals_pytorch_grad_cams(softmax: bool) -> None:
    from pytorch_grad_cam.metrics.cam_mult_image import (
        CamMultImageConfidenceChange,
        DropInConfidence,
        IncreaseInConfidence,
    )

    model, x, cam, _ = case(6, 12)
    result = cam(x)  # the Grad-CAM maps themselves, normalised to [0, 1]
    if not softmax:
        logits = model(torch.from_numpy(x)).detach().numpy()
        if (np.take_along_axis(logits, np.asarray(result.targets), 1) <= 0).any():
            pytest.skip("a raw score <= 0: the average drop divides by it")
    ours = metrics.confidence_change(cam, x, result, softmax=softmax)
    cams = np.asarray(result.maps, np.float32)[:, 0]
    args = (torch.from_numpy(x), cams, _targets(result, softmax), model)
    change = CamMultImageConfidenceChange()(*args)
    np.testing.assert_allclose(ours.masked[:, 0] - ours.original[:, 0], change, atol=1e-6)
    np.testing.assert_allclose(
        ours.drop[:, 0] * ours.original[:, 0], DropInConfidence()(*args), atol=1e-6
    )
    np.testing.assert_array_equal(ours.increase[:, 0], IncreaseInConfidence()(*args) > 0)
    assert ours.drop.max() > 0  # the case is not trivial


# --- Quantus -----------------------------------------------------------------------------------


@pytest.fixture
def quantus_trapz(monkeypatch: pytest.MonkeyPatch) -> None:
    """Convention 12: Quantus 0.6's AUC calls ``np.trapz``; under NumPy >= 2.4 it gets
    ``np.trapezoid``, the same function under its NumPy 2 name."""
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


@needs_quantus
@pytest.mark.parametrize("softmax", [False, True])
def test_deletion_equals_quantus_pixel_flipping(softmax: bool, quantus_trapz: None) -> None:
    import quantus

    steps, size, channels = 16, 16, 2  # convention 9: features_in_step must divide H x W
    model, x, cam, result = case(5, size, channels=channels)
    ours = metrics.deletion(cam, x, result, steps=steps, baseline=0.0, softmax=softmax)
    common = dict(
        features_in_step=channels * size * size // steps,
        perturb_baseline=0.0,
        normalise=False,
        abs=False,
        disable_warnings=True,
        display_progressbar=False,
    )
    call = dict(
        model=model,
        x_batch=x,
        y_batch=np.asarray(result.targets)[:, 0],
        a_batch=np.asarray(result.maps, np.float32),  # (N, 1, H, W), broadcast over C
        softmax=softmax,
        device="cpu",
        channel_first=True,
    )
    curve = np.asarray(quantus.PixelFlipping(**common)(**call))
    assert curve.shape == (len(x), steps)
    np.testing.assert_allclose(ours.scores[:, 0, 1:], curve, atol=1e-5, rtol=1e-5)
    auc = np.asarray(quantus.PixelFlipping(**common, return_auc_per_sample=True)(**call))
    s = ours.scores[:, 0]
    np.testing.assert_allclose(steps * ours.auc[:, 0] - (s[:, 0] + s[:, 1]) / 2, auc, atol=1e-4)


@needs_quantus
def test_road_imputation_equals_quantus_noisy_linear_imputation() -> None:
    from quantus.functions.perturb_func import noisy_linear_imputation

    rng = np.random.default_rng(4)
    image = rng.uniform(0, 1, (CHANNELS, 9, 11))
    for fraction in (0.1, 0.5, 0.9):
        removed = rng.permutation(99) < int(fraction * 99)
        ours = metrics.impute(image[None], removed.reshape(1, 9, 11), noise=0.0)[0]
        theirs = noisy_linear_imputation(image, np.flatnonzero(removed), noise=0.0)
        np.testing.assert_allclose(ours, theirs, atol=1e-9, rtol=0)
        assert not np.allclose(ours, image)


# --- Quantus on a Keras 3 model --------------------------------------------------------------


def _keras_gap_case() -> tuple[Any, Any, np.ndarray, np.ndarray, Any, Any, Any]:
    """The zoo's gap_cnn in Keras and in torch with the same weights, 5 images, one target each.

    Returns (keras model, torch model, NHWC inputs, NCHW inputs, Keras explainer, torch
    explainer, result with distinct maps from the Keras Grad-CAM).
    """
    from multicam import zoo

    weights = zoo.init_weights("gap_cnn", seed=0)
    keras_model = zoo.build("gap_cnn", "keras", weights)
    torch_model = zoo.build("gap_cnn", "torch", weights)
    x = np.random.default_rng(1).uniform(0, 1, (5, 12, 12, 3)).astype(np.float32)
    xt = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    keras_cam = mc.GradCAM(keras_model, "features/relu2")
    torch_cam = mc.GradCAM(torch_model, "features.relu2")
    # One class per image, so that y_batch matters; sample 2's map for class 2 is blank
    # (its ranking is the random tie break), which the metrics do not care about.
    result = distinct(keras_cam(x, [0, 1, 2, 3, 4], warn=False), 2)
    return keras_model, torch_model, x, xt, keras_cam, torch_cam, result


def _quantus_options(**extra: Any) -> dict[str, Any]:
    return dict(
        perturb_baseline=0.0,
        normalise=False,
        abs=False,
        disable_warnings=True,
        display_progressbar=False,
        **extra,
    )


@needs_quantus
@needs_keras
@pytest.mark.parametrize("softmax", [False, True])
def test_deletion_equals_quantus_pixel_flipping_on_keras(
    softmax: bool, quantus_trapz: None
) -> None:
    """Conventions 15-17: Quantus's TensorFlowModel on a Keras 3 model, NHWC inputs."""
    import quantus

    keras_model, torch_model, x, xt, keras_cam, torch_cam, result = _keras_gap_case()
    steps, channels, positions = 12, 3, 12 * 12  # convention 9: 3 * 144 / 12 = 36 divides 144
    ours = metrics.deletion(keras_cam, x, result, steps=steps, baseline=0.0, softmax=softmax)
    common = _quantus_options(features_in_step=channels * positions // steps)
    call = dict(
        model=keras_model,
        x_batch=x,  # (N, H, W, C)
        y_batch=np.asarray(result.targets)[:, 0],
        a_batch=np.asarray(result.maps, np.float32),  # (N, 1, H, W): convention 15
        softmax=softmax,
        channel_first=False,
    )
    wrapped = quantus.helpers.utils.get_wrapped_model(keras_model, False, softmax)
    assert isinstance(wrapped, quantus.helpers.model.tf_model.TensorFlowModel)
    metric = quantus.PixelFlipping(**common)
    curve = np.asarray(metric(**call))
    assert curve.shape == (len(x), steps)
    np.testing.assert_allclose(ours.scores[:, 0, 1:], curve, atol=1e-5, rtol=1e-5)
    assert np.ptp(curve, axis=1).min() > 1e-3  # the curves move: deletion changes the scores

    auc = np.asarray(quantus.PixelFlipping(**common, return_auc_per_sample=True)(**call))
    s = ours.scores[:, 0]
    np.testing.assert_allclose(steps * ours.auc[:, 0] - (s[:, 0] + s[:, 1]) / 2, auc, atol=1e-4)

    # The torch twin (same weights, NCHW): multicam's curve and Quantus's agree with Keras's.
    twin = metrics.deletion(torch_cam, xt, result, steps=steps, baseline=0.0, softmax=softmax)
    np.testing.assert_allclose(twin.scores, ours.scores, atol=1e-5, rtol=1e-5)
    torch_curve = np.asarray(
        metric(**dict(call, model=torch_model, x_batch=xt, channel_first=True, device="cpu"))
    )
    np.testing.assert_allclose(torch_curve, curve, atol=1e-5, rtol=1e-5)


@needs_quantus
@needs_keras
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_deletion_one_position_per_step_equals_quantus_region_perturbation_on_keras(
    order: str,
) -> None:
    """Convention 18: RegionPerturbation with 1x1 patches is deletion with ``steps = P``."""
    import quantus

    keras_model, _, x, _, keras_cam, _, result = _keras_gap_case()
    positions, regions = 12 * 12, 48
    # Least relevant first is multicam's deletion ranked by the reversed map; Quantus gets
    # the map itself and reverses the order.
    ranked = 1.0 - result.maps if order == "lerf" else result.maps
    ranking = types.SimpleNamespace(maps=ranked, targets=result.targets)
    ours = metrics.deletion(keras_cam, x, ranking, steps=positions, baseline=0.0)
    drop = ours.scores[:, 0, :1] - ours.scores[:, 0, 1 : regions + 1]
    theirs = quantus.RegionPerturbation(
        **_quantus_options(patch_size=1, order=order, regions_evaluation=regions)
    )(
        model=keras_model,
        x_batch=x,
        y_batch=np.asarray(result.targets)[:, 0],
        a_batch=np.asarray(result.maps, np.float32),
        softmax=False,
        channel_first=False,
    )
    theirs = np.asarray(theirs)
    assert theirs.shape == (len(x), regions)
    np.testing.assert_allclose(drop, theirs, atol=1e-5, rtol=1e-5)
    assert np.abs(theirs).max() > 1e-3


@needs_quantus
@needs_keras
def test_quantus_needs_a_top_layer_with_an_activation_on_keras() -> None:
    """Convention 16: the zoo's digits_cnn ends in a nested Sequential, which Quantus 0.6's
    TensorFlowModel cannot read (``model.layers[-1].activation``); a linear Activation layer
    on top (the same function) is enough, and then PixelFlipping equals deletion."""
    import keras
    import quantus

    from multicam import demo, zoo

    weights, images, _ = demo.load()
    model = zoo.build("digits_cnn", "keras", weights)
    cam = mc.GradCAM(model, "features/relu3")
    result = distinct(cam(images), 3)  # the 10 demo digits, each its predicted class
    steps = 16
    call = dict(
        x_batch=images,
        y_batch=np.asarray(result.targets)[:, 0],
        a_batch=np.asarray(result.maps, np.float32),
        channel_first=False,
    )
    metric = quantus.PixelFlipping(**_quantus_options(features_in_step=28 * 28 // steps))
    for softmax in (False, True):  # both of its model-rebuilding paths read the attribute
        with pytest.raises(
            AttributeError, match="'Sequential' object has no attribute 'activation'"
        ):
            metric(model=model, softmax=softmax, **call)

    shim = keras.Model(model.input, keras.layers.Activation("linear")(model.output))
    for softmax in (False, True):
        ours = metrics.deletion(cam, images, result, steps=steps, baseline=0.0, softmax=softmax)
        curve = np.asarray(metric(model=shim, softmax=softmax, **call))
        np.testing.assert_allclose(ours.scores[:, 0, 1:], curve, atol=1e-5, rtol=1e-5)
