"""The JAX/Flax backend: linen, nnx and function pairs, cross-checked with torch and jax.vjp."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytest.importorskip("flax")

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from multicam import zoo
from multicam.backends.jax import JaxBackend
from multicam.errors import (
    BackendError,
    InputError,
    LayerError,
    MulticamError,
    NonFiniteError,
    TargetError,
)
from multicam.targets import Targets
from multicam.zoo.flax import LinenSequence

BACKEND = JaxBackend()
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TORCH_BACKEND = importlib.util.find_spec("multicam.backends.torch") is not None


@pytest.fixture(scope="module")
def linen_models():
    return {name: zoo.build(name, "flax") for name in zoo.ARCHITECTURES}


@pytest.fixture(scope="module")
def nnx_models():
    return {name: zoo.build(name, "nnx") for name in zoo.ARCHITECTURES}


def _grads(model, layer, x, targets, **options):
    bound = BACKEND.bind(model, layer, **options)
    return bound.gradients(x, Targets.parse(targets, x.shape[0]))


def _tree_copy(tree):
    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), tree)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))


# --- the zoo ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_zoo_logits_match_torch(arch, linen_models, nnx_models):
    torch = pytest.importorskip("torch")
    x = zoo.example_input(arch)
    with torch.no_grad():
        expected = zoo.build(arch, "torch")(torch.from_numpy(np.moveaxis(x, -1, 1).copy()))
    expected = expected.numpy()
    module, variables = linen_models[arch]
    linen_out = np.asarray(module.apply(variables, x))
    nnx_out = np.asarray(nnx_models[arch](jnp.asarray(x)))
    np.testing.assert_allclose(linen_out, expected, atol=2e-5, rtol=0)
    np.testing.assert_allclose(nnx_out, expected, atol=2e-5, rtol=0)


# --- agreement with references ------------------------------------------------------------


def test_linen_perturbation_matches_hand_written_vjp(linen_models):
    module, variables = linen_models["digits_cnn"]
    x = zoo.example_input("digits_cnn", batch_size=3)
    classes = np.array([[1, 7], [0, 3], [9, 9]])
    result = _grads(module, "features/relu4", x, classes, variables=variables)

    # Reference: the gradient w.r.t. flax's own zero perturbation equals the gradient w.r.t.
    # the value; the activations are relu(conv4) from capture_intermediates.
    _, state = module.apply(variables, x, mutable=["perturbations"])
    zeros = state["perturbations"]

    def logits(perturbations):
        return module.apply({**variables, "perturbations": perturbations}, x)

    out, vjp_fn = jax.vjp(logits, zeros)
    expected_grads = []
    for t in range(classes.shape[1]):
        cotangent = jax.nn.one_hot(classes[:, t], out.shape[1])
        (grad,) = vjp_fn(cotangent)
        expected_grads.append(np.asarray(grad["features"]["relu4"]))
    expected_grads = np.moveaxis(np.stack(expected_grads, 1), -1, 2)
    _, inter = module.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    conv4 = inter["intermediates"]["features"]["conv4"]["__call__"][0]
    expected_acts = np.moveaxis(np.asarray(jax.nn.relu(conv4)), -1, 1)

    np.testing.assert_allclose(result.activations, expected_acts, atol=1e-6)
    np.testing.assert_allclose(result.gradients, expected_grads, atol=1e-6)
    np.testing.assert_allclose(
        result.scores, np.take_along_axis(np.asarray(out), classes, 1), atol=1e-6
    )
    assert result.targets.dtype == np.int64
    np.testing.assert_array_equal(result.targets, classes)
    assert result.input_spatial_shape == (28, 28)


CROSS_LAYERS = [
    ("digits_cnn", "features.relu4"),
    ("resnet_tiny", "block2"),
    ("resnet_tiny", "block2.relu1"),
    ("conv1d_net", "features.conv2"),
]


@pytest.mark.skipif(not (HAS_TORCH and HAS_TORCH_BACKEND), reason="needs the torch backend")
@pytest.mark.parametrize(("arch", "canonical"), CROSS_LAYERS)
def test_linen_and_nnx_match_torch_backend(arch, canonical, linen_models, nnx_models):
    import torch

    from multicam.backends.torch import TorchBackend

    x = zoo.example_input(arch, batch_size=2)
    targets = np.array([[0, 2], [3, 1]])
    torch_model = zoo.build(arch, "torch")
    expected = (
        TorchBackend()
        .bind(torch_model, canonical)
        .gradients(torch.from_numpy(np.moveaxis(x, -1, 1).copy()), Targets.parse(targets, 2))
    )
    module, variables = linen_models[arch]
    linen = _grads(module, zoo.layer_name(canonical, "flax"), x, targets, variables=variables)
    via_nnx = _grads(nnx_models[arch], zoo.layer_name(canonical, "nnx"), x, targets)
    for got in (linen, via_nnx):
        np.testing.assert_allclose(got.activations, expected.activations, atol=1e-5)
        np.testing.assert_allclose(got.gradients, expected.gradients, atol=1e-5)
        np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
        np.testing.assert_array_equal(got.targets, expected.targets)


def test_linen_module_path_and_nnx_attribute_path_agree(linen_models, nnx_models):
    module, variables = linen_models["resnet_tiny"]
    x = zoo.example_input("resnet_tiny")
    linen = _grads(module, "block1/conv2", x, None, variables=variables)
    via_nnx = _grads(nnx_models["resnet_tiny"], "block1.conv2", x, None)
    assert linen.activations.shape == (2, 8, 16, 16)
    assert linen.gradients.shape == (2, 1, 8, 16, 16)
    np.testing.assert_allclose(linen.gradients, via_nnx.gradients, atol=1e-6)
    np.testing.assert_array_equal(linen.targets, via_nnx.targets)
    logits = np.asarray(module.apply(variables, x))
    np.testing.assert_array_equal(linen.targets[:, 0], logits.argmax(1))
    np.testing.assert_allclose(linen.scores[:, 0], logits.max(1), atol=1e-6)


def test_function_pair_matches_closed_form(linen_models):
    # gap_cnn: score_c = mean_hw(A) @ W + b, so d score_c / dA_k = W[k, c] / (h w) exactly.
    _, variables = linen_models["gap_cnn"]
    params = variables["params"]
    features_module = LinenSequence(zoo.ARCHITECTURES["gap_cnn"].layers[0].layers)
    w = jnp.asarray(params["fc"]["kernel"])

    def features(x):
        return features_module.apply({"params": params["features"]}, x)

    def head(a):
        return a.mean(axis=(1, 2)) @ w + params["fc"]["bias"]

    x = jnp.asarray(zoo.example_input("gap_cnn"))
    result = _grads((features, head), None, x, "all")
    assert result.gradients.shape == (2, 5, 8, 12, 12)
    expected = np.broadcast_to(np.asarray(w).T[None, :, :, None, None] / 144, (2, 5, 8, 12, 12))
    np.testing.assert_allclose(result.gradients, expected, atol=1e-7)
    np.testing.assert_array_equal(result.targets, np.tile(np.arange(5), (2, 1)))
    np.testing.assert_allclose(result.activations, np.moveaxis(features(x), -1, 1), atol=1e-6)


# --- batching and compilation -------------------------------------------------------------


def test_several_targets_equal_separate_calls(nnx_models):
    model = nnx_models["digits_cnn"]
    x = zoo.example_input("digits_cnn", batch_size=2)
    bound = BACKEND.bind(model, "features.relu3")
    classes = np.array([[4, 1, 8], [2, 2, 5]])
    together = bound.gradients(x, Targets.parse(classes, 2))
    for t in range(3):
        alone = bound.gradients(x, Targets.parse(classes[:, t], 2))
        np.testing.assert_allclose(together.gradients[:, t], alone.gradients[:, 0], atol=1e-6)
        np.testing.assert_allclose(together.scores[:, t], alone.scores[:, 0], atol=1e-6)


def test_changing_target_classes_does_not_recompile(linen_models):
    module, variables = linen_models["gap_cnn"]
    bound = BACKEND.bind(module, "features/relu2", variables=variables)
    x = zoo.example_input("gap_cnn")
    first = bound.gradients(x, Targets.parse([0, 1], 2))
    second = bound.gradients(jnp.asarray(x), Targets.parse([4, 3], 2))
    assert bound.trace_count == 1
    assert not np.allclose(first.gradients, second.gradients)

    traces = []

    def features(x):
        traces.append(1)
        return x * 2.0

    def head(a):
        return a.sum(axis=(1, 2))

    pair = BACKEND.bind((features, head), None)
    for classes in ([0, 1], [2, 1], [1, 0]):
        pair.gradients(x, Targets.parse(classes, 2))
    assert len(traces) == 1


def test_nnx_does_not_recompile_and_predicted_is_argmax(nnx_models):
    model = nnx_models["conv1d_net"]
    bound = BACKEND.bind(model, "features.relu1")
    x = zoo.example_input("conv1d_net", batch_size=3)
    for classes in ([0, 1, 2], [3, 3, 3]):
        bound.gradients(x, Targets.parse(classes, 3))
    assert bound.trace_count == 1
    result = bound.gradients(x, Targets.parse(None, 3))
    np.testing.assert_array_equal(result.targets[:, 0], np.asarray(model(x)).argmax(1))
    assert result.input_spatial_shape == (64,)


# --- errors ---------------------------------------------------------------------------------


def test_unknown_layer_names_nearest(linen_models, nnx_models):
    module, variables = linen_models["digits_cnn"]
    x = zoo.example_input("digits_cnn")
    with pytest.raises(LayerError, match="features/relu4"):
        _grads(module, "features/relu44", x, 0, variables=variables)
    with pytest.raises(LayerError, match=r"features\.relu4"):
        BACKEND.bind(nnx_models["digits_cnn"], "features.relu44")
    with pytest.raises(LayerError, match="layer=None"):
        BACKEND.bind((lambda x: x, lambda a: a), "conv")


class _Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(3, (3, 3), name="shared")
        x = conv(conv(x))
        return x.mean(axis=(1, 2))


def test_layer_called_twice_raises():
    module = _Twice()
    x = np.ones((1, 6, 6, 3), np.float32)
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(LayerError, match="2 times"):
        _grads(module, "shared", x, 0, variables=variables)


class _TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        return x.mean(axis=(1, 2)), x.max(axis=(1, 2))


def test_multi_output_model_raises_target_error():
    module = _TwoHeads()
    x = np.ones((2, 6, 6, 3), np.float32)
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(TargetError, match=r"returns 2 outputs .*output="):
        _grads(module, "conv", x, 0, variables=variables)
    bound = BACKEND.bind(module, "conv", variables=variables)
    second = bound.gradients(x, Targets.parse(0, 2, output=1))
    assert second.outputs is not None and second.outputs.shape[0] == 2


def test_score_function_and_its_shape_check(linen_models):
    module, variables = linen_models["gap_cnn"]
    x = zoo.example_input("gap_cnn")
    bound = BACKEND.bind(module, "features/conv2", variables=variables)
    by_score = bound.gradients(x, Targets.parse(lambda out: out[:, 2] - out[:, 0], 2))
    by_class = bound.gradients(x, Targets.parse(np.array([[2, 0], [2, 0]]), 2))
    assert by_score.targets is None
    np.testing.assert_allclose(
        by_score.gradients[:, 0], by_class.gradients[:, 0] - by_class.gradients[:, 1], atol=1e-6
    )
    with pytest.raises(TargetError, match=r"\(2,\)"):
        bound.gradients(x, Targets.parse(lambda out: out, 2))
    with pytest.raises(TargetError, match="out of range"):
        bound.gradients(x, Targets.parse(5, 2))


def test_nan_input_raises(linen_models):
    module, variables = linen_models["gap_cnn"]
    x = zoo.example_input("gap_cnn")
    x[1, 2, 3, 0] = np.nan
    bound = BACKEND.bind(module, "features/relu2", variables=variables)
    with pytest.raises(NonFiniteError):
        bound.gradients(x, Targets.parse(0, 2))
    with pytest.raises(NonFiniteError):
        bound.gradients(jnp.asarray(x), Targets.parse(0, 2))


def test_linen_needs_variables_and_rejects_unknown_options(linen_models):
    module, variables = linen_models["gap_cnn"]
    with pytest.raises(BackendError, match="variables"):
        BACKEND.bind(module, "features/conv1")
    with pytest.raises(BackendError, match="options"):
        BACKEND.bind(module, "features/conv1", variables=variables, colour="red")


# --- the user's state -------------------------------------------------------------------------


def test_state_unchanged_after_call_and_after_raising_forward(linen_models, nnx_models):
    module, variables = linen_models["resnet_tiny"]
    before = _tree_copy(variables)
    model = nnx_models["resnet_tiny"]
    nnx_before = _tree_copy(nnx.state(model))
    children_before = dict(vars(model))
    x64 = jax.config.jax_enable_x64
    x = zoo.example_input("resnet_tiny")
    wrong = np.ones((2, 16, 16, 5), np.float32)  # 5 channels instead of 3
    for bound in (
        BACKEND.bind(module, "block2/relu1", variables=variables),
        BACKEND.bind(model, "block2.relu1"),
    ):
        bound.gradients(x, Targets.parse("all", 2))
        with pytest.raises(InputError, match="channels-last") as info:
            bound.gradients(wrong, Targets.parse(0, 2))
        # rejected inside Flax: an InputError chained from the framework's own exception
        assert not isinstance(info.value.__cause__, MulticamError | type(None))
    _assert_tree_equal(variables, before)
    _assert_tree_equal(nnx.state(model), nnx_before)
    assert dict(vars(model)) == children_before
    assert type(model.block2.relu1).__name__ == "NnxReLU"
    assert jax.config.jax_enable_x64 == x64


def test_bfloat16_model_gives_float32_maps_close_to_float32(linen_models):
    module, variables = linen_models["gap_cnn"]
    x = zoo.example_input("gap_cnn")
    reference = _grads(module, "features/relu2", x, [1, 3], variables=variables)
    bf16 = jax.tree.map(lambda v: jnp.asarray(v, jnp.bfloat16), variables)
    result = _grads(module, "features/relu2", jnp.asarray(x, jnp.bfloat16), [1, 3], variables=bf16)
    for got, want in (
        (result.activations, reference.activations),
        (result.gradients, reference.gradients),
        (result.scores, reference.scores),
    ):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_accepts():
    module, _ = zoo.build("gap_cnn", "flax")
    assert JaxBackend.accepts(module)
    assert JaxBackend.accepts(zoo.build("gap_cnn", "nnx"))
    assert not JaxBackend.accepts((lambda x: x, lambda a: a))
    assert not JaxBackend.accepts(object())
