"""Diagnose finds the cause on constructed cases, one per finding, with its numbers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import native_input

import multicam as mc
from multicam import zoo
from multicam.diagnose import BlankMapWarning


def _against_class_zero(seed: int = 0) -> dict[str, np.ndarray]:
    """gap_cnn weights where every channel counts against class 0.

    The layer features.relu2 is a ReLU output (A >= 0) and d logit_0 / dA_k = W[k, 0] / hw,
    so with W[:, 0] < 0 the signed map sum_k alpha_k A_k is <= 0 everywhere: blank.
    """
    weights = zoo.init_weights("gap_cnn", seed)
    weights["fc.kernel"][:, 0] = -np.abs(weights["fc.kernel"][:, 0]) - 0.1
    return weights


def test_all_negative_map_is_blank_on_every_backend(framework: str) -> None:
    weights = _against_class_zero()
    model = zoo.explainer("gap_cnn", framework, "features.relu2", weights)
    x = native_input(framework, zoo.example_input("gap_cnn", 2, seed=4))
    with pytest.warns(BlankMapWarning, match=r"2 of 4 Grad-CAM maps are blank"):
        res = model(x, targets=[[0, 1], [0, 1]])
    diagnosis = res.diagnose()
    np.testing.assert_array_equal(diagnosis.blank[:, 0], True)
    assert "blank" in diagnosis.codes(0, 0)
    finding = next(f for f in diagnosis if f.code == "blank" and f.sample == 0)
    assert finding.measured["raw_max"] <= 0
    assert finding.measured["negative_weights"] == 8 and finding.measured["positive_weights"] == 0
    assert f"{finding.measured['raw_min']:.3g}" in finding.message
    np.testing.assert_array_equal(res.maps[:, 0], 0.0)  # blank, not NaN
    report = str(diagnosis)
    assert "BLANK" in report and "8 negative" in report and "relu=False" in report


def test_warning_can_be_silenced() -> None:
    explainer = zoo.explainer("gap_cnn", "torch", "features.relu2", _against_class_zero())
    x = zoo.example_input("gap_cnn", 1, layout="channels_first")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explainer(x, targets=0, warn=False)
        explainer(x, targets=0, relu=False)  # a signed map is never blank


torch = pytest.importorskip("torch")
nn = torch.nn


def _head_net(softmax: bool, logit_scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    fc = nn.Linear(4, 3)
    with torch.no_grad():
        fc.weight.mul_(logit_scale)
    layers.append(fc)
    if softmax:
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers).eval()


def test_softmax_head_and_saturation_are_found() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    net = _head_net(softmax=True, logit_scale=200.0)
    res = mc.GradCAM(net, "1")(x, warn=False)
    codes = res.diagnose().codes()
    assert "softmax_outputs" in codes and "saturated" in codes
    saturated = next(f for f in res.diagnose() if f.code == "saturated")
    assert saturated.measured["probability"] >= 0.99
    assert saturated.measured["slope"] == pytest.approx(
        saturated.measured["probability"] * (1 - saturated.measured["probability"])
    )
    # The same network without the softmax: logits, no finding about probabilities.
    plain = mc.GradCAM(_head_net(softmax=False, logit_scale=200.0), "1")(x, warn=False)
    assert not {"softmax_outputs", "saturated"} & plain.diagnose().codes()


def test_one_cell_layer_is_found() -> None:
    x = np.ones((1, 3, 8, 8), np.float32)
    res = mc.GradCAM(_head_net(softmax=False), "2")(x, size=(8, 8), warn=False)
    finding = next(f for f in res.diagnose() if f.code == "one_cell_layer")
    assert finding.measured["cells"] == 1.0 and "1x1" in finding.message


def test_coarse_layer_states_the_cell_size() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(18, 2))
    res = mc.GradCAM(net, "1")(np.ones((1, 1, 12, 12), np.float32), warn=False)
    finding = next(f for f in res.diagnose() if f.code == "coarse_layer")
    assert "3x3" in finding.message and "12x12" in finding.message and "4x4" in finding.message


def test_dead_activations_and_zero_gradients_are_found() -> None:
    net = _head_net(softmax=False)
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every unit of the ReLU is off
    res = mc.GradCAM(net, "1")(np.zeros((1, 3, 8, 8), np.float32), warn=False)
    assert "dead_activations" in res.diagnose().codes(0, 0)

    net = _head_net(softmax=False)
    with torch.no_grad():
        net[4].weight[2].zero_()  # class 2 ignores every channel
    res = mc.GradCAM(net, "1")(np.ones((1, 3, 8, 8), np.float32), targets=2, warn=False)
    assert "zero_gradients" in res.diagnose().codes(0, 0)


def test_signed_activations_are_noted() -> None:
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    res = mc.GradCAM(_head_net(softmax=False), "0")(x, warn=False)  # the conv, before ReLU
    finding = next(f for f in res.diagnose() if f.code == "signed_activations")
    assert 0 < finding.measured["negative_share"] < 1


def test_healthy_maps_report_nothing_unusual() -> None:
    weights = zoo.init_weights("gap_cnn", 0)
    weights["fc.kernel"][:, 1] = np.abs(weights["fc.kernel"][:, 1]) + 0.1  # all for class 1
    res = zoo.explainer("gap_cnn", "torch", "features.relu2", weights)(
        zoo.example_input("gap_cnn", 1, layout="channels_first"), targets=1
    )
    assert not res.diagnose().findings
    assert "nothing unusual" in str(res.diagnose())
