"""The metrics of :mod:`multicam.metrics`: independent computations, closed cases, agreement.

- Deletion and insertion are checked exactly against a loop written here, on a linear
  model computed in integers (so no summation order can change a bit), and on the closed
  case: for a linear model with a zero baseline, the map equal to the true evidence
  ``W_c * x`` deletes (and inserts) in the best possible order, so no other map has a
  lower deletion AUC or a higher insertion AUC.
- ROAD's imputation is checked against a transcription of pytorch-grad-cam's sparse system
  (``pytorch_grad_cam/metrics/road.py``, ``NoisyLinearImputer``, solved with SciPy). Its
  conventions differ in these ways, all written down in :mod:`multicam.metrics.road`:
  (1) its ``percentile=q`` removes ``100 - q`` percent (here ``p`` removes ``p``);
  (2) its threshold removes ``1 + floor(p (P - 1) / 100)`` pixels of a map with distinct
  values, this ``floor(p P / 100)``: equal when ``p P`` is a multiple of 100, which the
  test uses; (3) ties at its threshold are all removed (here broken by position);
  (4) its noise is unseeded ``torch.randn`` (compared here with ``noise=0``); (5) its
  metrics return ``after - before`` (``ROADCombined`` = ``combined`` here).
- Confidence change is checked against torchcam's formulas (``ClassificationMetric``):
  it divides by ``p + 1e-7`` (here by ``p``) and explains its own predicted class;
  pytorch-grad-cam's ``DropInConfidence`` does not divide by ``p`` at all.
- pytorch-grad-cam, torchcam and Quantus themselves need torchvision, which does not
  install beside the pinned torch of this environment: the comparisons against the
  packages belong to the peers environment (``nox -s peers-bench``).
- Agreement: the same metric on the same net with the same weights and the same maps
  agrees across torch, Keras, linen and nnx within 1e-4 (Hypothesis); the randomisation
  test draws the same random weights in every framework.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import numpy as np
import pytest
from conftest import _explainer, available_frameworks, explain, native_input, require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multicam as mc
from multicam import metrics, zoo
from multicam.backends import Backend, BoundModel, LayerGradients
from multicam.backends.base import make_layer_gradients
from multicam.errors import BackendError, InputError, LayerError, OptionError, TargetError
from multicam.metrics import _common

# --- a linear model computed in integers -----------------------------------------------------


@dataclasses.dataclass
class Linear:
    """``outputs[n, k] = sum_chw weights[k, c, h, w] x[n, c, h, w] + bias[k]``."""

    weights: np.ndarray  # (K, C, H, W)
    bias: np.ndarray  # (K,)


class LinearBound(BoundModel):
    """The linear model explained at its input (the layer is the input itself)."""

    backend = "numpy-linear"
    layout = "channels_first"

    def __init__(self, model: Linear) -> None:
        self.model = model
        self.layer_name = "input"
        self.calls: list[int] = []

    def outputs(self, inputs: Any, output: Any = None) -> np.ndarray:
        x = np.asarray(inputs, np.float64)
        self.calls.append(len(x))
        return np.einsum("nchw,kchw->nk", x, self.model.weights) + self.model.bias

    def gradients(self, inputs: Any, targets: mc.Targets) -> LayerGradients:
        x = np.asarray(inputs, np.float64)
        outputs = np.einsum("nchw,kchw->nk", x, self.model.weights) + self.model.bias
        classes = targets.class_ids(outputs.shape, outputs)
        return make_layer_gradients(
            x,
            self.model.weights[classes],
            np.take_along_axis(outputs, classes, axis=1),
            classes,
            layout=self.layout,
            input_shape=x.shape,
            layer_name=self.layer_name,
            outputs=outputs,
        )


class LinearBackend(Backend):
    name = "numpy-linear"
    extra = "none"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return False

    def bind(self, model: Any, layer: Any, **options: Any) -> LinearBound:
        return LinearBound(model)


def _linear_case(n: int = 3, seed: int = 0) -> tuple[Linear, np.ndarray]:
    rng = np.random.default_rng(seed)
    model = Linear(
        rng.integers(-5, 6, (4, 2, 6, 5)).astype(np.float64),
        rng.integers(-3, 4, 4).astype(np.float64),
    )
    return model, rng.integers(0, 10, (n, 2, 6, 5)).astype(np.float64)


def _linear_score(model: Linear, image: np.ndarray, k: int) -> float:
    return float((model.weights[k] * image).sum() + model.bias[k])


def _result(maps: np.ndarray, targets: np.ndarray) -> Any:
    return types.SimpleNamespace(maps=maps, targets=targets)


# --- deletion and insertion --------------------------------------------------------------------


def _loop_curve(
    kind: str,
    model: Linear,
    x: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    steps: int,
    base: np.ndarray,
) -> np.ndarray:
    """The convention of the module docstring, one image and one step at a time."""
    n, t = targets.shape
    height, width = x.shape[2:]
    positions = height * width
    scores = np.empty((n, t, steps + 1))
    for i in range(n):
        for j in range(t):
            flat = maps[i, j].ravel()
            order = sorted(range(positions), key=lambda p: (-flat[p], p))
            for step in range(steps + 1):
                image = x[i].copy() if kind == "deletion" else base[i].copy()
                for p in order[: (step * positions) // steps]:
                    row, col = divmod(p, width)
                    source = base[i] if kind == "deletion" else x[i]
                    image[:, row, col] = source[:, row, col]
                scores[i, j, step] = _linear_score(model, image, targets[i, j])
    return scores


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
@pytest.mark.parametrize("steps", [1, 5, 16])
def test_curves_equal_an_independent_loop_exactly(kind: str, steps: int) -> None:
    model, x = _linear_case()
    rng = np.random.default_rng(steps)
    maps = np.round(rng.uniform(0, 1, (3, 2, 6, 5)) * 4) / 4  # many ties: the tie rule counts
    targets = np.array([[0, 3], [1, 1], [2, 0]])
    base = rng.integers(0, 10, x.shape).astype(np.float64)
    cam = mc.GradCAM(model, "input", backend=LinearBackend())
    function = metrics.deletion if kind == "deletion" else metrics.insertion
    curve = function(cam, x, _result(maps, targets), steps, base, batch_size=7)
    expected = _loop_curve(kind, model, x, maps, targets, steps, base)
    np.testing.assert_array_equal(curve.scores, expected)
    trapezoid = (expected[..., :-1] + expected[..., 1:]).sum(-1) / (2 * steps)
    np.testing.assert_allclose(curve.auc, trapezoid, rtol=1e-12)
    np.testing.assert_array_equal(curve.fractions, np.arange(steps + 1) / steps)
    np.testing.assert_array_equal(curve.counts, (np.arange(steps + 1) * 30) // steps)
    assert curve.kind == kind and curve.targets.tolist() == targets.tolist()


def test_curves_run_in_chunks_of_batch_size_and_do_not_depend_on_it() -> None:
    model, x = _linear_case(n=5)
    maps = np.random.default_rng(1).uniform(size=(5, 2, 6, 5))
    targets = np.array([[0, 1]] * 5)
    cam = mc.GradCAM(model, "input", backend=LinearBackend())
    bound = cam.bound
    assert isinstance(bound, LinearBound)
    runs = {}
    for batch_size in (1, 8, 64, 1000):
        bound.calls.clear()
        runs[batch_size] = metrics.deletion(
            cam, x, _result(maps, targets), 8, batch_size=batch_size
        )
        total = 5 * 2 * 9
        assert sum(bound.calls) == total
        assert len(bound.calls) == -(-total // batch_size)  # all images together, in chunks
    for run in runs.values():
        np.testing.assert_array_equal(run.scores, runs[1].scores)


def test_the_true_evidence_of_a_linear_model_ranks_first() -> None:
    """Closed case: with a zero baseline, deleting the positions of largest evidence first
    minimises the remaining score at every step, so no map does better."""
    model, x = _linear_case(n=4, seed=3)
    cam = mc.HiResCAM(model, "input", backend=LinearBackend())
    res = cam(x, targets=2, relu=False, normalize=False, warn=False)
    evidence = (model.weights[2] * x).sum(axis=1)  # (N, H, W): W_c * x summed over channels
    np.testing.assert_allclose(res.maps[:, 0], evidence, rtol=1e-6)
    best_del = metrics.deletion(cam, x, res, steps=30)
    best_ins = metrics.insertion(cam, x, res, steps=30)
    # The deletion curve in closed form: the score minus the k largest contributions.
    ordered = np.sort(evidence.reshape(4, -1), axis=1)[:, ::-1]
    removed = np.concatenate([np.zeros((4, 1)), np.cumsum(ordered, axis=1)], axis=1)
    total = evidence.reshape(4, -1).sum(1, keepdims=True) + model.bias[2]
    np.testing.assert_allclose(best_del.scores[:, 0], total - removed, rtol=1e-9, atol=1e-9)
    rng = np.random.default_rng(0)
    others = [
        cam(x, targets=2, warn=False),
        mc.GradCAM(model, "input", backend=LinearBackend())(x, targets=2, warn=False),
    ]
    others += [_result(rng.uniform(size=res.maps.shape), res.targets) for _ in range(20)]
    for other in others:
        deletion = metrics.deletion(cam, x, other, steps=30)
        insertion = metrics.insertion(cam, x, other, steps=30)
        assert (deletion.scores >= best_del.scores - 1e-9).all()
        assert (insertion.scores <= best_ins.scores + 1e-9).all()
        assert (deletion.auc >= best_del.auc - 1e-9).all()
        assert (insertion.auc <= best_ins.auc + 1e-9).all()


def test_curve_scores_are_the_results_scores_or_probabilities(framework: str) -> None:
    arch, layer = "gap_cnn", "features.relu2"
    inputs = zoo.example_input(arch, 3, seed=4)
    res = explain(framework, arch, 0, layer, inputs, targets=[[1, 4], [0, 2], [3, 3]], warn=False)
    cam = _explainer(framework, arch, 0, layer)
    native = native_input(framework, inputs)
    curve = metrics.deletion(cam, native, res, steps=4)
    np.testing.assert_allclose(curve.scores[..., 0], res.scores, rtol=1e-5, atol=1e-6)
    probabilities = metrics.deletion(cam, native, res, steps=4, softmax=True)
    assert res.outputs is not None
    expected = _common.softmax(res.outputs, 1)
    np.testing.assert_allclose(
        probabilities.scores[..., 0], np.take_along_axis(expected, res.targets, 1), atol=1e-6
    )
    assert probabilities.softmax and not curve.softmax


def test_baselines_constant_blur_and_array() -> None:
    model, x = _linear_case(n=2)
    maps = np.random.default_rng(2).uniform(size=(2, 1, 6, 5))
    targets = np.array([[1], [3]])
    cam = mc.GradCAM(model, "input", backend=LinearBackend())
    res = _result(maps, targets)
    # Everything deleted: the last step scores the baseline itself.
    for baseline, image in [
        (2.5, np.full_like(x, 2.5)),
        ("blur", _loop_blur(x, metrics.curves.BLUR_SIGMA)),
        (x[::-1].copy(), x[::-1]),
        (x[0], np.broadcast_to(x[0], x.shape)),
    ]:
        curve = metrics.deletion(cam, x, res, 4, baseline)
        expected = [_linear_score(model, image[i], targets[i, 0]) for i in range(2)]
        np.testing.assert_allclose(curve.scores[:, 0, -1], expected, rtol=1e-9)
        start = metrics.insertion(cam, x, res, 4, baseline).scores[:, 0, 0]
        np.testing.assert_allclose(start, expected, rtol=1e-9)
    for bad, error in [
        ("mean", OptionError),
        (np.zeros((3, 3)), InputError),
        (np.nan, OptionError),
    ]:
        with pytest.raises(error):
            metrics.deletion(cam, x, res, 4, bad)


def _loop_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised Gaussian blur of (N, C, H, W), one output pixel at a time."""
    radius = int(np.ceil(3 * sigma))
    out = np.empty_like(x)
    height, width = x.shape[2:]
    for r in range(height):
        for c in range(width):
            rows = [i for i in range(height) if abs(i - r) <= radius]
            cols = [j for j in range(width) if abs(j - c) <= radius]
            gr = np.exp(-0.5 * ((np.array(rows) - r) / sigma) ** 2)
            gc = np.exp(-0.5 * ((np.array(cols) - c) / sigma) ** 2)
            weights = np.outer(gr / gr.sum(), gc / gc.sum())
            out[:, :, r, c] = (x[:, :, rows][:, :, :, cols] * weights).sum(axis=(2, 3))
    return out


def test_blur_is_separable_normalised_and_layout_aware() -> None:
    x = np.random.default_rng(0).uniform(size=(2, 3, 9, 7))
    np.testing.assert_allclose(metrics.blur(x, 1.5), _loop_blur(x, 1.5), rtol=1e-12)
    last = metrics.blur(np.moveaxis(x, 1, -1), 1.5, layout="channels_last")
    np.testing.assert_allclose(np.moveaxis(last, -1, 1), _loop_blur(x, 1.5), rtol=1e-12)
    np.testing.assert_allclose(metrics.blur(np.ones((1, 1, 5, 5)), 3.0), 1.0)  # no darkening
    np.testing.assert_array_equal(metrics.blur(x, 0.0), x)


def test_curve_errors_say_what_to_do() -> None:
    model, x = _linear_case(n=2)
    cam = mc.GradCAM(model, "input", backend=LinearBackend())
    good = _result(np.zeros((2, 1, 6, 5)), np.array([[0], [1]]))
    with pytest.raises(InputError, match="size='input'"):
        metrics.deletion(cam, x, _result(np.zeros((2, 1, 3, 5)), good.targets))
    with pytest.raises(TargetError, match="class ids"):
        metrics.insertion(cam, x, _result(good.maps, None))
    with pytest.raises(TargetError, match="do not fit"):
        metrics.deletion(cam, x, _result(good.maps, np.array([[0], [9]])))
    for steps in (0, 2.5, True):
        with pytest.raises(OptionError, match="steps"):
            metrics.deletion(cam, x, good, steps)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="batch_size"):
        metrics.deletion(cam, x, good, batch_size=0)
    with pytest.raises(OptionError, match="explainer"):
        metrics.deletion(object(), x, good)


def test_curves_refuse_a_backend_without_a_forward_pass() -> None:
    class NoForward(LinearBound):
        outputs = BoundModel.outputs  # type: ignore[assignment]

    model, x = _linear_case(n=1)
    bound = NoForward(model)
    with pytest.raises(BackendError, match="no plain forward pass"):
        metrics.deletion(bound, x, _result(np.zeros((1, 1, 6, 5)), np.array([[0]])))


# --- ROAD --------------------------------------------------------------------------------------


def _pgc_impute(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's ``NoisyLinearImputer`` with noise 0, transcribed (SciPy)."""
    sparse = pytest.importorskip("scipy.sparse")
    linalg = pytest.importorskip("scipy.sparse.linalg")
    weights = [
        ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
        ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
    ]  # fmt: skip
    mask = keep.astype(np.float64)
    height, width = mask.shape
    flat_mask = mask.ravel()
    flat_image = image.reshape(image.shape[0], -1)
    indices = np.argwhere(flat_mask == 0).ravel()
    to_variable = np.zeros(len(flat_mask), dtype=int)
    to_variable[indices] = np.arange(len(indices))
    system = sparse.lil_matrix((len(indices), len(indices)))
    rhs = np.zeros((len(indices), image.shape[0]))
    neighbours = np.ones(len(indices))
    for (d0, d1), weight in weights:
        c1 = indices % width + d1
        c0 = indices // width + d0
        valid = ~((c0 < 0) | (c1 < 0) | (c0 >= height) | (c1 >= width))
        coords = (indices + d0 * width + d1)[valid]
        ids = np.argwhere(valid).ravel()
        known = flat_mask[coords] > 0.5
        rhs[ids[known], :] -= weight * flat_image[:, coords[known]].T
        system[ids[~known], to_variable[coords[~known]]] = weight
        neighbours[np.argwhere(~valid).ravel()] -= weight
    system[np.arange(len(indices)), np.arange(len(indices))] = -neighbours
    solution = linalg.spsolve(sparse.csc_matrix(system), rhs)
    filled = flat_image.copy()
    filled[:, indices] = np.asarray(solution).reshape(len(indices), -1).T
    return filled.reshape(image.shape)


def test_imputation_equals_pytorch_grad_cams_sparse_system() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(3, 2, 10, 10))
    removed = rng.uniform(size=(3, 10, 10)) < np.array([0.2, 0.6, 0.9])[:, None, None]
    removed[0, :3, :4] = True  # a hole touching two borders
    ours = metrics.impute(images, removed)
    for i in range(3):
        np.testing.assert_allclose(ours[i], _pgc_impute(images[i], ~removed[i]), atol=1e-8)
    np.testing.assert_array_equal(
        ours[~np.broadcast_to(removed[:, None], ours.shape)],
        images[~np.broadcast_to(removed[:, None], ours.shape)],
    )


def test_road_removes_what_pytorch_grad_cams_threshold_removes_where_counts_match() -> None:
    """pytorch-grad-cam's MoRF at percentile q keeps ``map < np.percentile(map, q)``; with
    distinct values and p * P a multiple of 100 it removes this MoRF's p = 100 - q."""
    rng = np.random.default_rng(1)
    maps = rng.permutation(100).reshape(1, 1, 10, 10).astype(np.float64)
    for p in (10, 30, 50, 90):
        count = _common.percent_counts(np.array([p]), 100)[0]
        ours = _common.first_k(_common.descending_ranks(maps)[0], np.array([count]), (10, 10))
        theirs = ~(maps[0, 0] < np.percentile(maps[0, 0], 100 - p))
        np.testing.assert_array_equal(ours[0], theirs)
        lerf = _common.first_k(_common.ascending_ranks(maps)[0], np.array([count]), (10, 10))
        inverted = 1 - maps[0, 0] / 99  # its LeRF thresholds 1 - map
        np.testing.assert_array_equal(lerf[0], ~(inverted < np.percentile(inverted, 100 - p)))


def test_road_scores_equal_imputed_images_scored_independently() -> None:
    model, x = _linear_case(n=2)
    maps = np.random.default_rng(3).uniform(size=(2, 2, 6, 5))
    targets = np.array([[0, 2], [3, 1]])
    cam = mc.GradCAM(model, "input", backend=LinearBackend())
    res = _result(maps, targets)
    road = metrics.road(cam, x, res, percentiles=(20, 50), noise=0.0, batch_size=3)
    for i in range(2):
        for j in range(2):
            flat = maps[i, j].ravel()
            most = sorted(range(30), key=lambda q: (-flat[q], q))
            least = sorted(range(30), key=lambda q: (flat[q], q))
            for k, p in enumerate((20, 50)):
                for scores, ranked in ((road.morf, most), (road.lerf, least)):
                    removed = np.zeros(30, bool)
                    removed[ranked[: p * 30 // 100]] = True
                    filled = _pgc_impute(x[i], ~removed.reshape(6, 5))
                    assert scores[i, j, k] == pytest.approx(
                        _linear_score(model, filled, targets[i, j]), rel=1e-7, abs=1e-7
                    )
    np.testing.assert_array_equal(road.counts, [6, 15])
    np.testing.assert_allclose(
        road.original, [[_linear_score(model, x[i], c) for c in targets[i]] for i in range(2)]
    )
    np.testing.assert_allclose(road.combined, ((road.lerf - road.morf) / 2).mean(-1))


def test_road_noise_is_seeded_and_independent_of_batching() -> None:
    model, x = _linear_case(n=3)
    maps = np.random.default_rng(4).uniform(size=(3, 1, 6, 5))
    res = _result(maps, np.array([[0], [1], [2]]))
    cam = mc.GradCAM(model, "input", backend=LinearBackend())
    small = metrics.road(cam, x, res, noise=0.5, seed=7, batch_size=2)
    large = metrics.road(cam, x, res, noise=0.5, seed=7, batch_size=100)
    np.testing.assert_array_equal(small.morf, large.morf)
    np.testing.assert_array_equal(small.lerf, large.lerf)
    other = metrics.road(cam, x, res, noise=0.5, seed=8)
    assert not np.array_equal(other.morf, small.morf)
    quiet = metrics.road(cam, x, res, noise=0.0)
    assert np.abs(quiet.morf - small.morf).max() > 0


def test_road_prefers_the_true_evidence_of_a_linear_model() -> None:
    model, x = _linear_case(n=4, seed=5)
    cam = mc.HiResCAM(model, "input", backend=LinearBackend())
    evidence = cam(x, targets=1, relu=False, normalize=False, warn=False)
    reverse = _result(-evidence.maps, evidence.targets)
    good = metrics.road(cam, x, evidence, noise=0.0)
    bad = metrics.road(cam, x, reverse, noise=0.0)
    assert good.mean_combined > 0 > bad.mean_combined
    assert (good.morf.mean((0, 1)) < good.lerf.mean((0, 1))).all()


def test_road_errors() -> None:
    model, x = _linear_case(n=1)
    cam = mc.GradCAM(model, "input", backend=LinearBackend())
    res = _result(np.zeros((1, 1, 6, 5)), np.array([[0]]))
    for bad in ([], [120], [[10]]):
        with pytest.raises(OptionError, match="percentiles"):
            metrics.road(cam, x, res, percentiles=bad)
    with pytest.raises(OptionError, match="noise"):
        metrics.road(cam, x, res, noise=-1)


# --- confidence change -------------------------------------------------------------------------


def test_confidence_change_equals_torchcams_formulas() -> None:
    require("torch")
    import torch

    weights, images, _ = __import__("multicam.demo", fromlist=["load"]).load()
    model = zoo.build("digits_cnn", "torch", weights)
    x = np.moveaxis(images, -1, 1)
    cam = mc.GradCAM(model, "features.relu3")
    res = cam(x, warn=False)
    change = metrics.confidence_change(cam, x, res, batch_size=4)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), -1).numpy()
        masked = torch.softmax(model(torch.from_numpy(x * res.maps[:, :1])), -1).numpy()
    assert res.targets is not None
    p = np.take_along_axis(probs, res.targets, 1)
    o = np.take_along_axis(masked, res.targets, 1)
    np.testing.assert_allclose(change.original, p, rtol=1e-5)
    np.testing.assert_allclose(change.masked, o, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(change.drop, np.maximum(p - o, 0) / (p + 1e-7), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(change.increase, p < o)
    assert change.average_drop == pytest.approx(change.drop.mean())
    assert change.increase_rate == pytest.approx((p < o).mean())


def test_confidence_change_on_the_linear_model_and_its_errors() -> None:
    model, x = _linear_case(n=2)
    model.bias[:] = 500.0  # positive scores, so the drop can divide by them
    maps = np.random.default_rng(0).uniform(size=(2, 2, 6, 5))
    targets = np.array([[0, 1], [2, 3]])
    cam = mc.GradCAM(model, "input", backend=LinearBackend())
    change = metrics.confidence_change(cam, x, _result(maps, targets), softmax=False)
    for i in range(2):
        for j in range(2):
            y = _linear_score(model, x[i], targets[i, j])
            o = _linear_score(model, x[i] * maps[i, j], targets[i, j])
            assert change.drop[i, j] == pytest.approx(max(y - o, 0) / y, rel=1e-12)
            assert change.increase[i, j] == (o > y)
    with pytest.raises(OptionError, match=r"\[0, 1\]"):
        metrics.confidence_change(cam, x, _result(maps * 2, targets))
    model.bias[:] = -500.0
    with pytest.raises(TargetError, match="softmax=True"):
        metrics.confidence_change(cam, x, _result(maps, targets), softmax=False)


# --- localisation ------------------------------------------------------------------------------


def test_pointing_game_and_energy_by_hand() -> None:
    maps = np.zeros((3, 2, 4, 5))
    maps[0, 0, 1, 2] = 1.0  # peak at (1, 2)
    maps[0, 1, 3, 4] = 1.0  # peak at (3, 4)
    maps[1, 0] = 0.5
    maps[1, 0, 0, 0] = maps[1, 0, 2, 2] = 1.0  # tie: the first in flat order, (0, 0)
    maps[1, 1] = 0.0  # blank: a miss
    maps[2, :, 2, 1] = 0.25
    maps[2, :, 0, 4] = 0.75
    masks = np.zeros((3, 4, 5), bool)
    masks[0, :2, 1:3] = True
    masks[1, 2, 2] = True
    masks[2, 2, 1] = True
    pointing = metrics.pointing_game(_result(maps, None), masks)
    np.testing.assert_array_equal(pointing.hits, [[True, False], [False, False], [False, False]])
    np.testing.assert_array_equal(pointing.points[1, 0], [0, 0])
    np.testing.assert_array_equal(pointing.blank, [[False, False], [False, True], [False, False]])
    assert pointing.accuracy == pytest.approx(1 / 6)
    tolerant = metrics.pointing_game(maps, masks, tolerance=2.9)  # (0, 0) to (2, 2) is 2.83
    # Within 2.9 pixels: (3, 4) -> (1, 2) and (0, 0) -> (2, 2) are both 2.83 away.
    np.testing.assert_array_equal(tolerant.hits[:2], [[True, True], [True, False]])
    energy = metrics.energy_pointing_game(maps, masks)
    total = maps[1, 0].sum()
    np.testing.assert_allclose(
        energy.energy, [[1.0, 0.0], [1.0 / total, 0.0], [0.25, 0.25]], rtol=1e-12
    )
    boxes = [(1, 0, 3, 2), [(2, 2, 3, 3)], np.array([[1, 2, 2, 3], [0, 0, 0, 0]])]
    np.testing.assert_array_equal(metrics.box_masks(boxes, (4, 5)), masks)
    by_box = metrics.pointing_game(maps, boxes=boxes)
    np.testing.assert_array_equal(by_box.hits, pointing.hits)
    per_target = np.broadcast_to(masks[:, None], maps.shape)
    np.testing.assert_array_equal(metrics.pointing_game(maps, per_target).hits, pointing.hits)


def test_localisation_errors() -> None:
    maps = np.zeros((2, 1, 4, 4))
    with pytest.raises(OptionError, match="masks= or boxes="):
        metrics.pointing_game(maps)
    with pytest.raises(InputError, match="do not fit"):
        metrics.pointing_game(maps, np.zeros((2, 3, 3), bool))
    with pytest.raises(OptionError, match="non-negative"):
        metrics.energy_pointing_game(maps - 1, np.zeros((4, 4), bool))
    with pytest.raises(InputError, match="min <= max"):
        metrics.box_masks([(3, 0, 1, 2)], (4, 4))
    with pytest.raises(InputError, match="3 box entries for 2"):
        metrics.pointing_game(maps, boxes=[(0, 0, 1, 1)] * 3)


# --- Spearman and the randomisation test -------------------------------------------------------


def test_spearman_equals_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = np.round(rng.uniform(size=(6, 40)) * 5)  # heavy ties
    b = np.round(rng.uniform(size=(6, 40)) * 3) + a
    ours = metrics.spearman(a, b)
    for i in range(6):
        assert ours[i] == pytest.approx(stats.spearmanr(a[i], b[i]).statistic, abs=1e-12)
    np.testing.assert_allclose(metrics.spearman(a, a), 1.0)
    np.testing.assert_allclose(metrics.spearman(a, -a), -1.0)
    constant = np.zeros(40)
    assert metrics.spearman(constant, a[0]) == 0.0  # undefined: taken as 0
    assert metrics.spearman(constant, constant) == 1.0  # two blank maps: identical


def _parameters(framework: str, model: Any) -> dict[str, np.ndarray]:
    """Every parameter and statistic of a zoo model, as NumPy."""
    if framework == "torch":
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if framework == "keras":
        return {v.path: np.array(v.numpy()) for v in model.weights}
    import jax

    if framework == "flax":
        leaves = jax.tree_util.tree_leaves_with_path(model[1])
    else:
        from flax import nnx

        leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))

    def array(leaf: Any) -> np.ndarray:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # nnx Dropout's RNG
            leaf = jax.random.key_data(leaf)
        return np.array(leaf)

    return {jax.tree_util.keystr(path): array(leaf) for path, leaf in leaves}


def test_randomization_leaves_the_users_model_untouched(framework: str) -> None:
    weights, images, _ = __import__("multicam.demo", fromlist=["load"]).load()
    built = zoo.build("digits_cnn", framework, weights)
    before = _parameters(framework, built)
    model, options = (built[0], {"variables": built[1]}) if framework == "flax" else (built, {})
    cam = mc.GradCAM(model, zoo.layer_name("features.relu3", framework), **options)
    x = native_input(framework, images[:3])
    reference = cam(x, targets=[0, 1, 2], warn=False)
    result = metrics.randomization_test(cam, x, [0, 1, 2])
    names = [zoo.layer_name(n, framework) for n in ("classifier.dense3", "features.conv1")]
    assert result.layers[0] == names[0] and result.layers[-1] == names[1]
    assert result.similarity.shape == (7, 3, 1)
    after = _parameters(framework, built)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    again = cam(x, targets=[0, 1, 2], warn=False)
    np.testing.assert_array_equal(again.raw, reference.raw)
    randomized = cam.bound.randomized(names[:1], lambda layer, name, v: np.zeros_like(v))
    outputs = randomized.outputs(x)
    np.testing.assert_allclose(outputs, 0.0, atol=1e-7)  # the last dense layer zeroed: only there
    assert np.abs(cam.bound.outputs(x)).max() > 1


def test_eigencam_survives_randomising_the_layers_above_it() -> None:
    """Closed case: Eigen-CAM's map depends only on the activations of its layer, so
    randomising the layers above it leaves the map as it was (similarity exactly 1), and
    the method is flagged; randomising the layers below changes it."""
    require("torch")
    weights, images, _ = __import__("multicam.demo", fromlist=["load"]).load()
    model = zoo.build("digits_cnn", "torch", weights)
    x = np.moveaxis(images[:4], -1, 1)
    cam = mc.EigenCAM(model, "features.relu2")
    above = ["classifier.dense3", "classifier.dense2", "classifier.dense1", "features.conv4",
             "features.conv3"]  # fmt: skip
    surviving = metrics.randomization_test(cam, x, layers=above, signed=True)
    np.testing.assert_allclose(surviving.similarity, 1.0, rtol=1e-12)
    assert surviving.flagged and "FLAGGED" in str(surviving)
    full = metrics.randomization_test(cam, x, signed=True)
    np.testing.assert_allclose(full.similarity[:5], 1.0, rtol=1e-12)
    assert (full.similarity[5:] < 1 - 1e-3).all()
    gradcam = metrics.randomization_test(mc.GradCAM(model, "features.relu3"), x)
    assert not gradcam.flagged and "passes" in str(gradcam)


def test_randomization_errors() -> None:
    model, x = _linear_case(n=1)
    cam = mc.GradCAM(model, "input", backend=LinearBackend())
    with pytest.raises(BackendError, match="randomised copy"):
        metrics.randomization_test(cam, x)
    with pytest.raises(OptionError, match="explainer"):
        metrics.randomization_test(object(), x)
    require("torch")
    torch_cam = zoo.explainer("gap_cnn", "torch", "features.relu2")
    inputs = zoo.example_input("gap_cnn", 1, layout="channels_first")
    with pytest.raises(LayerError, match=r"features\.conv1"):
        metrics.randomization_test(torch_cam, inputs, layers=["features.relu1"])
    with pytest.raises(LayerError):
        torch_cam.bound.randomized(["nope"], lambda layer, name, values: values)


def test_redraw_keeps_mean_and_scale_and_constants() -> None:
    values = np.random.default_rng(0).normal(3.0, 2.0, (64, 64)).astype(np.float32)
    new = metrics.redraw(0, 1, "kernel", values)
    assert new.dtype == np.float32 and new.shape == values.shape
    assert new.mean() == pytest.approx(3.0, abs=0.1) and new.std() == pytest.approx(2.0, rel=0.05)
    assert abs(np.corrcoef(new.ravel(), values.ravel())[0, 1]) < 0.05
    np.testing.assert_array_equal(metrics.redraw(0, 1, "kernel", values), new)  # seeded
    assert not np.array_equal(metrics.redraw(0, 2, "kernel", values), new)
    ones = np.ones(5, np.float32)
    assert metrics.redraw(0, 1, "scale", ones) is ones


# --- agreement across frameworks ---------------------------------------------------------------

SEQUENTIAL = ["digits_cnn", "gap_cnn"]


@st.composite
def metric_cases(draw: st.DrawFn) -> dict:
    arch = draw(st.sampled_from(["gap_cnn", "digits_cnn", "resnet_tiny"]))
    spec = zoo.ARCHITECTURES[arch]
    return {
        "arch": arch,
        "seed": draw(st.integers(0, 1)),
        "input_seed": draw(st.integers(0, 2**16)),
        "layer": draw(st.sampled_from(spec.cam_layers[-2:])),
        "metric": draw(st.sampled_from(["deletion", "insertion", "road", "confidence"])),
        "steps": draw(st.sampled_from([4, 7])),
        "baseline": draw(st.sampled_from([0.0, "blur", 0.5])),
        "softmax": draw(st.booleans()),
    }


def _run_metric(case: dict, framework: str, res: Any, inputs: np.ndarray) -> np.ndarray:
    cam = _explainer(framework, case["arch"], case["seed"], case["layer"])
    x = native_input(framework, inputs)
    if case["metric"] in ("deletion", "insertion"):
        function = getattr(metrics, case["metric"])
        return function(
            cam, x, res, case["steps"], case["baseline"], 16, softmax=case["softmax"]
        ).scores
    if case["metric"] == "road":
        road = metrics.road(cam, x, res, (25, 50), seed=1, batch_size=16, softmax=case["softmax"])
        return np.concatenate([road.morf, road.lerf], -1)
    return metrics.confidence_change(cam, x, res, 16).masked


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metric_cases())
def test_every_metric_agrees_across_frameworks(case: dict) -> None:
    frameworks = available_frameworks()
    inputs = zoo.example_input(case["arch"], 2, seed=case["input_seed"])
    # One set of maps for every framework: the metrics are compared, not the maps.
    res = explain(frameworks[0], case["arch"], case["seed"], case["layer"], inputs,
                  targets=[[0, 1], [2, 0]], warn=False)  # fmt: skip
    scores = {f: _run_metric(case, f, res, inputs) for f in frameworks}
    reference = scores[frameworks[0]]
    scale = max(1.0, float(np.abs(reference).max()))
    for framework, values in scores.items():
        np.testing.assert_allclose(
            values, reference, rtol=1e-4, atol=1e-4 * scale,
            err_msg=f"{case['metric']}: {frameworks[0]} and {framework} disagree",
        )  # fmt: skip


@pytest.mark.parametrize("arch", SEQUENTIAL)
def test_randomization_agrees_across_frameworks(arch: str) -> None:
    """The same random weights in every framework: the similarities agree."""
    frameworks = available_frameworks()
    inputs = zoo.example_input(arch, 2, seed=3)
    layer = zoo.ARCHITECTURES[arch].cam_layers[-1]
    results = {}
    for framework in frameworks:
        cam = _explainer(framework, arch, 0, layer)
        results[framework] = metrics.randomization_test(
            cam, native_input(framework, inputs), [1, 0], signed=True
        )
    reference = results[frameworks[0]]
    for framework, result in results.items():
        assert len(result.layers) == len(reference.layers)
        np.testing.assert_allclose(
            result.similarity, reference.similarity, atol=1e-4,
            err_msg=f"{frameworks[0]} and {framework} disagree",
        )  # fmt: skip


def test_energy_and_pointing_need_no_model() -> None:
    inputs = zoo.example_input("gap_cnn", 2)
    require("torch")
    res = explain("torch", "gap_cnn", 0, "features.relu2", inputs, targets="all", warn=False)
    masks = np.zeros((2, 12, 12), bool)
    masks[:, 3:9, 3:9] = True
    energy = metrics.energy_pointing_game(res, masks)
    assert energy.energy.shape == (2, 5)
    manual = (res.maps * masks[:, None]).sum((2, 3)) / res.maps.sum((2, 3))
    np.testing.assert_allclose(energy.energy, manual, rtol=1e-6)


def test_keras_randomized_copies_clone_or_map_and_never_assign() -> None:
    """Functional models are cloned; a subclassed model Keras cannot rebuild from its
    config is randomised through a StatelessScope: in both the user's model is untouched."""
    require("keras")
    import keras

    functional = zoo.build("gap_cnn", "keras")
    cam = mc.GradCAM(functional, "features/relu2")
    zeroed = cam.bound.randomized(["fc"], lambda layer, name, values: np.zeros_like(values))
    assert getattr(zeroed, "model", None) is not functional  # a clone

    class Sub(keras.Model):  # no get_config: cannot be cloned
        def __init__(self) -> None:
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3, name="conv")
            self.relu = keras.layers.ReLU(name="relu")
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.fc = keras.layers.Dense(3, name="fc")

        def call(self, x: Any) -> Any:
            return self.fc(self.pool(self.relu(self.conv(x))))

    model = Sub()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
    model(x)
    before = [np.array(v.numpy()) for v in model.weights]
    sub_cam = mc.GradCAM(model, "relu")
    assert sub_cam.bound.parameter_layers() == ("conv", "fc")
    mapped = sub_cam.bound.randomized(["fc"], lambda layer, name, values: np.zeros_like(values))
    assert getattr(mapped, "model", None) is model  # not copied: mapped
    np.testing.assert_allclose(mapped.outputs(x), 0.0, atol=1e-7)
    assert np.abs(sub_cam.bound.outputs(x)).max() > 0
    result = metrics.randomization_test(sub_cam, x, [0, 1], signed=True)
    assert result.layers == ("fc", "conv") and result.similarity.shape == (2, 2, 1)
    for old, variable in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(variable.numpy(), old)


@pytest.mark.parametrize("module", ["curves", "road", "confidence", "localization", "sanity"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    failures, _ = doctest.testmod(importlib.import_module(f"multicam.metrics.{module}"))
    assert failures == 0
