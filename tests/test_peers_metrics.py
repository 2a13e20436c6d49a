"""multicam.metrics against the peers' own code: pytorch-grad-cam 1.5.x and Quantus 0.6.

These run only where the peers import (the peers environment, ``benchmarks/
constraints-peers.txt``: they need torchvision, which does not install beside the pinned
torch of the default environment); elsewhere they skip with the reason. The model is a
small torch CNN of our own with fixed weights (drawn from ``default_rng(0)``), explained by
multicam's Grad-CAM; the maps given to every metric are the Grad-CAM maps made strictly
distinct (their rank over the image, ``rank / (P - 1)``, ties between equal Grad-CAM values
broken by a fixed random draw), so no metric's tie rule matters.

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
    NumPy 2.4 removed: with NumPy >= 2.4 the AUC check skips after the curves compare.
13. ``normalise=True`` (default) rescales the map and ``abs`` takes its absolute value;
    both are turned off (neither changes the order of these non-negative maps).
14. Quantus's ROAD metric scores whether the argmax stays the target (an accuracy), not
    the target's score, so it is not compared; its imputation
    (``noisy_linear_imputation``, ``spsolve``) is, against ``metrics.impute`` with
    ``noise=0`` (within 1e-9).
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
    res = cam(x)
    maps = np.asarray(res.maps, np.float64)  # (N, T, H, W)
    jitter = np.random.default_rng(seed + 1).permutation(size * size).reshape(size, size)
    flat = (maps + 1e-9 * jitter).reshape(*maps.shape[:2], -1)
    ranks = np.argsort(np.argsort(flat, axis=-1, kind="stable"), axis=-1, kind="stable")
    distinct = (ranks / (size * size - 1)).reshape(maps.shape)
    assert all(len(np.unique(m)) == size * size for m in distinct.reshape(-1, size * size))
    result = types.SimpleNamespace(maps=distinct, targets=np.asarray(res.targets))
    return model, x, cam, result


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


@needs_quantus
@pytest.mark.parametrize("softmax", [False, True])
def test_deletion_equals_quantus_pixel_flipping(softmax: bool) -> None:
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
    if not hasattr(np, "trapz"):  # convention 12
        pytest.skip("Quantus 0.6's AUC calls np.trapz, removed in NumPy 2.4 (curves compared)")
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
