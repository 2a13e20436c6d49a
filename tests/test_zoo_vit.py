"""The zoo's vision transformer ``tiny_vit``: every framework against the NumPy oracle.

The same weights give the same logits and the same attention probabilities (the output of
the ``blocks.<i>.attn.softmax`` layers, which LeGrad differentiates) in PyTorch, Keras,
Flax linen and Flax nnx, caught with the framework's own mechanism (a torch forward hook,
linen's ``capture_intermediates``) and through multicam's backends; gradients are checked
by float64 central differences of the oracle, and Grad-CAM maps of token layers
(``reshape=(4, 4)``) agree across frameworks.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
from conftest import available_frameworks, native_input, require

import multicam as mc
from multicam import zoo
from multicam.diagnose import BlankMapWarning
from multicam.testing import assert_results_agree
from multicam.zoo import numpy as zoo_numpy

ARCH = "tiny_vit"
SEED = 1
SOFTMAX = "blocks.1.attn.softmax"


@functools.cache
def _weights() -> dict[str, np.ndarray]:
    return zoo.init_weights(ARCH, SEED)


@functools.cache
def _inputs() -> np.ndarray:
    return zoo.example_input(ARCH, 3, seed=2)


@functools.cache
def _oracle() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return zoo_numpy.forward(ARCH, _weights(), _inputs())


@functools.cache
def _explain(framework: str, layer: str) -> mc.CAMResult:
    """Grad-CAM of every class at canonical ``layer``, cached.

    A token layer is read on the 4x4 grid; the softmax as it is, ``(N, heads, Q, K)``
    (channels-first, so that no framework moves its last axis).
    """
    options = (
        {"layer_layout": "channels_first"} if layer.endswith("softmax") else {"reshape": (4, 4)}
    )
    explainer = zoo.explainer(ARCH, framework, layer, _weights(), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BlankMapWarning)
        return explainer(native_input(framework, _inputs()), targets="all", size=None)


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def _along(gradients: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``(N, T)`` directional derivatives from ``(N, T, ...)`` gradients, ``(N, ...)`` direction."""
    n, t = gradients.shape[:2]
    return (gradients.reshape(n, t, -1) * direction.reshape(n, 1, -1)).sum(-1)


def _finite_difference(layer: str, direction: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``(N, T)`` d logit[n, targets[n, t]] / d layer along ``direction``, float64."""
    _, outputs = _oracle()
    step = 1e-6 * max(float(np.abs(outputs[layer]).max()), 1.0)
    up, _ = zoo_numpy.forward(
        ARCH, _weights(), _inputs(), {layer: outputs[layer] + step * direction}
    )
    down, _ = zoo_numpy.forward(
        ARCH, _weights(), _inputs(), {layer: outputs[layer] - step * direction}
    )
    return np.take_along_axis((up - down) / (2 * step), targets, axis=1)


def test_registered_apart_from_the_cnns() -> None:
    spec = zoo.TRANSFORMER_ARCHITECTURES[ARCH]
    assert ARCH not in zoo.ARCHITECTURES  # whose tests expect spatial layers
    assert spec.token_grid == (4, 4) and spec.input_shape == (16, 16, 3)
    names = [name for name, _ in zoo.iter_layers(spec.layers)]
    for canonical in ("blocks.0", "blocks.1", SOFTMAX, "blocks.0.mlp.act", "norm", "head"):
        assert canonical in names
    assert zoo.layer_name(SOFTMAX, "keras") == "blocks/1/attn/softmax"
    assert set(_weights()) >= {"tokens.cls_token", "tokens.pos_embed", "blocks.0.attn.qkv.kernel"}


def test_oracle_attention_is_peaked_and_logits_are_order_one() -> None:
    logits, outputs = _oracle()
    assert outputs["tokens"].shape == (3, 17, 16) and outputs["blocks.1"].shape == (3, 17, 16)
    for block in ("0", "1"):
        probs = outputs[f"blocks.{block}.attn.softmax"]
        assert probs.shape == (3, 2, 17, 17)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
        entropy = -(probs * np.log(probs)).sum(-1).mean() / math.log(17)
        assert 0.1 < entropy < 0.7  # far from uniform (1), not one-hot (0)
    assert 0.3 < logits.std() < 5


@functools.cache
def _sensitive_weights() -> dict[str, np.ndarray]:
    """Weights under which the layer norms' eps and the GELU's form show in the logits.

    Tokens 1000x smaller make the first layer norms' variance ~1e-6, so eps 1e-6 (flax's
    default) or 1e-3 (Keras') instead of 1e-5 moves the logits by 40% or more; ``fc2``
    kernels 10x larger make the tanh GELU (flax's default) move them by 2e-4, float32
    round-off by under 1e-6.
    """
    weights = dict(_weights())
    for key in ("patch_embed.kernel", "patch_embed.bias", "tokens.cls_token", "tokens.pos_embed"):
        weights[key] = weights[key] * np.float32(1e-3)
    for block in ("0", "1"):
        key = f"blocks.{block}.mlp.fc2.kernel"
        weights[key] = weights[key] * np.float32(10)
    return weights


def _native_attention(framework: str, model: object, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(logits, probabilities at SOFTMAX)`` caught by the framework itself, or logits only."""
    if framework == "torch":
        import torch

        assert isinstance(model, torch.nn.Module)
        caught: list[np.ndarray] = []
        softmax = model.get_submodule(SOFTMAX)
        assert isinstance(softmax, torch.nn.Softmax)
        handle = softmax.register_forward_hook(lambda m, i, o: caught.append(o.numpy()))
        try:
            with torch.no_grad():
                logits = model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        finally:
            handle.remove()
        return logits, caught[0]
    if framework == "flax":
        module, variables = model  # type: ignore[misc]
        logits, state = module.apply(variables, x, capture_intermediates=True)
        node = state["intermediates"]
        for part in SOFTMAX.split("."):
            node = node[part]
        return np.asarray(logits), np.asarray(node["__call__"][0])
    return (np.asarray(model(x)),)  # type: ignore[operator]


def test_logits_and_attention_equal_the_oracle(framework: str) -> None:
    logits, outputs = _oracle()
    model = zoo.build(ARCH, framework, _weights())
    caught = _native_attention(framework, model, native_input(framework, _inputs()))
    assert _relative(caught[0], logits) < 1e-4
    if len(caught) > 1:  # torch forward hook, linen capture_intermediates
        assert _relative(caught[1], outputs[SOFTMAX]) < 1e-4
    # multicam's backend at the softmax layer: the probabilities and d logit / d them
    result = _explain(framework, SOFTMAX)
    assert result.activations.shape == (3, 2, 17, 17)
    assert _relative(result.activations, outputs[SOFTMAX]) < 1e-4
    assert _relative(result.scores, logits) < 1e-4
    direction = np.random.default_rng(0).normal(size=outputs[SOFTMAX].shape)
    analytic = _along(result.gradients, direction)
    assert _relative(analytic, _finite_difference(SOFTMAX, direction, result.targets)) < 1e-4


def test_layer_norm_eps_and_exact_gelu(framework: str) -> None:
    weights = _sensitive_weights()
    expected, _ = zoo_numpy.forward(ARCH, weights, _inputs())
    model = zoo.build(ARCH, framework, weights)
    (logits, *_) = _native_attention(framework, model, native_input(framework, _inputs()))
    assert _relative(logits, expected) < 3e-5


@pytest.mark.parametrize("layer", ["blocks.1.norm1", "blocks.1"])
def test_token_grad_cam_agrees_with_the_oracle_and_across_frameworks(layer: str) -> None:
    frameworks = available_frameworks()
    for framework in frameworks:
        require(framework)
    _, outputs = _oracle()
    tokens = outputs[layer]  # (N, 17, D): class token, then the 4x4 grid row-major
    grid = np.moveaxis(tokens[:, 1:].reshape(3, 4, 4, -1), -1, 1)
    direction = np.random.default_rng(1).normal(size=tokens.shape)
    direction[:, 0] = 0  # the class token is dropped from the maps' gradients
    direction_grid = np.moveaxis(direction[:, 1:].reshape(3, 4, 4, -1), -1, 1)
    results = {}
    for framework in frameworks:
        result = _explain(framework, layer)
        assert result.maps.shape == (3, 10, 4, 4)
        assert _relative(result.activations, grid) < 1e-4
        finite = _finite_difference(layer, direction, result.targets)
        if layer == "blocks.1":
            # After the last block only the class token reaches the head (layer norm acts
            # per token): the patch tokens' gradients, hence the maps, are exactly zero.
            assert np.abs(finite).max() < 1e-8
            assert not result.gradients.any() and not result.raw.any()
            assert result.dropped_token_gradients is not None
            assert (result.dropped_token_gradients > 0).all()
        else:
            assert _relative(_along(result.gradients, direction_grid), finite) < 1e-4
            assert np.abs(result.raw).max() > 0
        results[framework] = result
    assert_results_agree(results)


def test_attention_gradients_agree_across_frameworks() -> None:
    results = {framework: _explain(framework, SOFTMAX) for framework in available_frameworks()}
    first = next(iter(results.values()))
    scale = np.abs(first.gradients).max()
    for framework, result in results.items():
        np.testing.assert_allclose(
            result.gradients, first.gradients, atol=1e-4 * scale, err_msg=framework
        )
