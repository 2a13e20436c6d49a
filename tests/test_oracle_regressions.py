"""Cases where a backend and the NumPy oracle once disagreed, kept as explicit examples.

``resnet_tiny``, weights seed 0, input seed 1921, layer ``stem_relu``: block1's output ReLU
at (row 10, col 12, channel 6) adds 1.1442058 (the skip) and -1.1442053 (bn2). In float64
that is +5.6e-7 (about 5 float32 ulps of the summands), so the oracle's gate is open; in
float32 TensorFlow gets exactly 0.0 (gate closed: the gradient stops there) and torch
3.6e-7 (open). Neither is wrong, so the TensorFlow gradient differed from the oracle's by
1.3e-2 relative. Not oneDNN (``TF_ENABLE_ONEDNN_OPTS=0`` and a plain ``tf.GradientTape``
give the same), not padding (activations and scores agree to 2e-7), not multicam's backend.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import explain, require

from multicam import zoo
from multicam.testing import check_against_oracle, relu_kinks
from multicam.zoo import numpy as zoo_numpy

ARCH, LAYER, UNIT = "resnet_tiny", "stem_relu", (0, 10, 12, 6)


def _case() -> tuple[dict[str, np.ndarray], np.ndarray]:
    return zoo.init_weights(ARCH, 0), zoo.example_input(ARCH, 1, seed=1921)


def test_the_kink_is_found_and_is_float32_round_off() -> None:
    weights, inputs = _case()
    _, outputs = zoo_numpy.forward(ARCH, weights, inputs)
    skip, body = outputs["stem_relu"][UNIT], outputs["block1.bn2"][UNIT]
    assert 0 < skip + body < 8 * np.spacing(np.float32(skip))
    kinks = relu_kinks(ARCH, weights, inputs, LAYER)
    assert kinks[0][:2] == ("block1", UNIT)
    # Nothing at or before the CAM layer counts: its own ReLU is replaced, not differentiated.
    assert not any(name == "stem_relu" for name, _, _ in relu_kinks(ARCH, weights, inputs, LAYER))
    assert relu_kinks(ARCH, weights, inputs, "block2") == []


def test_oracle_gates_force_either_side() -> None:
    weights, inputs = _case()
    pre: dict[str, np.ndarray] = {}
    _, outputs = zoo_numpy.forward(ARCH, weights, inputs, pre_relu=pre)
    gate = np.full(outputs["block1"].shape, np.nan)
    gate[UNIT] = 0.0
    _, closed_outputs = zoo_numpy.forward(ARCH, weights, inputs, gates={"block1": gate})
    assert closed_outputs["block1"][UNIT] == 0.0
    untouched = np.ones(gate.shape, bool)
    untouched[UNIT] = False
    np.testing.assert_array_equal(closed_outputs["block1"][untouched], outputs["block1"][untouched])
    # Open: a negative pre-activation passes through unchanged.
    gate_relu = np.full(outputs["block1.relu1"].shape, np.nan)
    negative = np.unravel_index(np.argmin(pre["block1.relu1"]), gate_relu.shape)
    gate_relu[negative] = 1.0
    _, opened = zoo_numpy.forward(ARCH, weights, inputs, gates={"block1.relu1": gate_relu})
    assert opened["block1.relu1"][negative] == pre["block1.relu1"][negative] < 0


@pytest.mark.parametrize("framework", ["keras", "torch", "flax"])
def test_either_side_of_the_kink_passes_the_oracle(framework: str) -> None:
    require(framework)
    weights, inputs = _case()
    result = explain(
        framework, ARCH, 0, LAYER, inputs, targets=None, relu=False, normalize=False, size=None
    )
    errors = check_against_oracle(result, ARCH, weights, inputs, LAYER)
    assert errors["gradients"] < 1e-5


def test_kinks_do_not_excuse_real_errors() -> None:
    require("torch")
    weights, inputs = _case()
    result = explain("torch", ARCH, 0, LAYER, inputs, targets=None, relu=False, size=None)
    check_against_oracle(result, ARCH, weights, inputs, LAYER)
    scaled = dataclasses.replace(result, gradients=result.gradients * 1.01)
    with pytest.raises(AssertionError, match="gradients differ"):
        check_against_oracle(scaled, ARCH, weights, inputs, LAYER)
    # A wrong patch like the kink's footprint (5x5 around one block1 unit), away from it.
    gradients = result.gradients.copy()
    gradients[0, 0, 6, 1:6, 1:6] = 0
    assert np.abs(result.gradients[0, 0, 6, 1:6, 1:6]).max() > 0
    with pytest.raises(AssertionError, match="gradients differ"):
        check_against_oracle(
            dataclasses.replace(result, gradients=gradients), ARCH, weights, inputs, LAYER
        )
