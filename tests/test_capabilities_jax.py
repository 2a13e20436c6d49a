"""The JAX backend's optional capabilities: bias_layers, tensor_gradients, Hessian-vector
products and the residual-softmax target (score="rest"), against independent computations.

References are written here: biases from the weight dict, gradients from flax's own
perturbations and plain ``jax.grad``, Hessian-vector products from ``jax.hessian`` and the
closed form of a linear head, attention gradients from the attention written out by hand.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

pytest.importorskip("flax")

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from multicam import zoo
from multicam.backends.base import BoundModel
from multicam.backends.jax import JaxBackend
from multicam.errors import BackendError, InputError, LayerError, TargetError
from multicam.targets import Region, Targets, rest_scores

BACKEND = JaxBackend()
WEIGHTS = zoo.init_weights("resnet_tiny", seed=1)


@pytest.fixture(scope="module")
def linen_bound():
    module, variables = zoo.build("resnet_tiny", "flax", WEIGHTS)
    return BACKEND.bind(module, "block2", variables=variables)


@pytest.fixture(scope="module")
def nnx_bound():
    return BACKEND.bind(zoo.build("resnet_tiny", "nnx", WEIGHTS), "block2")


def _targets(targets, n, score="output"):
    return dataclasses.replace(Targets.parse(targets, n), score=score)


def _expected_biases(weights, eps=zoo.BN_EPS):
    """(canonical name, bias) of the convolutions and BatchNorms of resnet_tiny, in order."""
    expected = []
    for name, layer in zoo.iter_layers(zoo.ARCHITECTURES["resnet_tiny"].layers):
        if isinstance(layer, zoo.Conv):
            expected.append((name, weights[f"{name}.bias"]))
        elif isinstance(layer, zoo.BatchNorm):
            w = {
                p: weights[f"{name}.{p}"].astype(np.float64)
                for p in ("scale", "bias", "mean", "var")
            }
            expected.append((name, w["bias"] - w["mean"] * w["scale"] / np.sqrt(w["var"] + eps)))
    return expected


# --- bias_layers ------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["flax", "nnx"])
def test_bias_layers_match_weight_dict(framework, linen_bound, nnx_bound):
    bound = linen_bound if framework == "flax" else nnx_bound
    found = bound.bias_layers()
    expected = _expected_biases(WEIGHTS)
    assert [name for name, _ in found] == [zoo.layer_name(n, framework) for n, _ in expected]
    for (_, bias), (_, reference) in zip(found, expected, strict=True):
        assert bias.dtype == np.float32 and bias.shape == reference.shape
        np.testing.assert_allclose(bias, reference, rtol=1e-6, atol=1e-7)
    # Same names and order as parameter_layers, minus the dense layer (no spatial bias).
    assert [name for name, _ in found] == [n for n in bound.parameter_layers() if n != "fc"]


def test_bias_layers_without_scale_own_epsilon_and_no_bias():
    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), use_bias=False, name="plain")(x)
            x = nn.BatchNorm(use_running_average=True, epsilon=1e-2, use_scale=False, name="bn")(x)
            return nn.Conv(2, (1, 1), name="out")(x).mean(axis=(1, 2))

    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
    module = Linen()
    variables = module.init(jax.random.key(0), x)
    stats = {"mean": jnp.linspace(-1, 1, 4), "var": jnp.linspace(0.5, 2, 4)}
    variables = {**variables, "batch_stats": {"bn": stats}}
    bias = np.asarray(variables["params"]["bn"]["bias"]) + 0.3
    variables["params"] = {**variables["params"], "bn": {"bias": jnp.asarray(bias)}}
    bound = BACKEND.bind(module, "bn", variables=variables)
    bound.gradients(x, Targets.parse(0, 2))  # the trace tells the module's own epsilon
    found = dict(bound.bias_layers())
    assert list(found) == ["bn", "out"]  # the conv without a bias is not one
    mean, var = np.asarray(stats["mean"]), np.asarray(stats["var"])
    np.testing.assert_allclose(found["bn"], bias - mean / np.sqrt(var + 1e-2), rtol=1e-6)
    np.testing.assert_allclose(found["out"], variables["params"]["out"]["bias"])

    class Nnx(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.plain = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(4, use_scale=False, epsilon=1e-2, rngs=rngs)
            self.bn.mean.set_value(stats["mean"])
            self.bn.var.set_value(stats["var"])
            self.bn.bias.set_value(jnp.asarray(bias))

        def __call__(self, x):
            return self.bn(self.plain(x))

    found = dict(BACKEND.bind(Nnx(), "bn").bias_layers())
    assert list(found) == ["bn"]
    np.testing.assert_allclose(found["bn"], bias - mean / np.sqrt(var + 1e-2), rtol=1e-6)


# --- tensor_gradients ---------------------------------------------------------------------


def test_tensor_gradients_match_flax_perturbations_and_jax_grad(linen_bound):
    module, variables = linen_bound.module, linen_bound.variables
    x = zoo.example_input("resnet_tiny", batch_size=2)
    classes = np.array([[1, 3], [4, 0]])
    relus = ["stem_relu", "block1/relu1", "block2/relu1"]
    result = linen_bound.tensor_gradients(
        x, Targets.parse(classes, 2), [*relus, "block1"], input_gradients=True
    )
    assert list(result.tensors) == [*relus, "block1"] and result.layout == "channels_last"

    # Reference: flax's own zero perturbations of the perturbed values, and jax.grad at x.
    _, state = module.apply(variables, x, mutable=["perturbations"])
    zeros = state["perturbations"]

    def logits(perturbations, x):
        return module.apply({**variables, "perturbations": perturbations}, x)

    out = np.asarray(module.apply(variables, x))
    np.testing.assert_allclose(result.outputs, out, atol=1e-6)
    np.testing.assert_allclose(result.scores, np.take_along_axis(out, classes, 1), atol=1e-6)
    np.testing.assert_array_equal(result.targets, classes)

    @jax.jit
    @functools.partial(jax.grad, argnums=(0, 1))
    def reference(perturbations, x, column):
        return jnp.take_along_axis(logits(perturbations, x), column, 1).sum()

    for t in range(2):
        by_perturbation, by_input = reference(zeros, x, classes[:, t : t + 1])
        for name in relus:
            parent, leaf = name.rsplit("/", 1) if "/" in name else (None, name)
            tree = by_perturbation if parent is None else by_perturbation[parent]
            np.testing.assert_allclose(result.gradients[name][:, t], tree[leaf], atol=1e-6)
        np.testing.assert_allclose(result.input_gradients[:, t], by_input, atol=1e-6)
    np.testing.assert_array_equal(result.inputs, x)
    # A module path: the same as gradients() at that layer (a replacement, not a delta).
    single = BACKEND.bind(module, "block1", variables=variables).gradients(
        x, Targets.parse(classes, 2)
    )
    np.testing.assert_allclose(np.moveaxis(result.tensors["block1"], -1, 1), single.activations)
    np.testing.assert_allclose(
        np.moveaxis(result.gradients["block1"], -1, 2), single.gradients, atol=1e-6
    )


@pytest.mark.parametrize("targets", [None, "callable"])
def test_linen_and_nnx_agree_on_every_bias_layer(targets, linen_bound, nnx_bound):
    x = zoo.example_input("resnet_tiny", batch_size=2, seed=3)
    if targets == "callable":
        targets = lambda out: out[:, 2] - jnp.log(jnp.exp(out).sum(1))  # noqa: E731
    names = [name for name, _ in linen_bound.bias_layers()]
    linen = linen_bound.tensor_gradients(x, Targets.parse(targets, 2), names)
    via_nnx = nnx_bound.tensor_gradients(
        x, Targets.parse(targets, 2), [name.replace("/", ".") for name in names]
    )
    assert linen.input_gradients is None and linen.inputs is None
    for name in names:
        other = name.replace("/", ".")
        np.testing.assert_allclose(linen.tensors[name], via_nnx.tensors[other], atol=1e-5)
        np.testing.assert_allclose(linen.gradients[name], via_nnx.gradients[other], atol=1e-5)
        assert linen.gradients[name].shape == (
            2,
            linen.scores.shape[1],
            *linen.tensors[name].shape[1:],
        )
    np.testing.assert_allclose(linen.scores, via_nnx.scores, atol=1e-5)
    if targets is None:
        np.testing.assert_array_equal(linen.targets, np.argmax(linen.outputs, 1)[:, None])


def test_matches_torch_backend_on_the_same_network(nnx_bound):
    pytest.importorskip("torch")
    from multicam.backends.torch import TorchBackend

    bound = TorchBackend().bind(zoo.build("resnet_tiny", "torch", WEIGHTS), "block2")
    if type(bound).tensor_gradients is BoundModel.tensor_gradients:
        pytest.skip("the torch backend has no tensor_gradients yet")
    x = zoo.example_input("resnet_tiny", batch_size=2, seed=5)
    names = ["stem_bn", "block1.conv2", "block2.down_bn"]
    expected = bound.tensor_gradients(
        np.moveaxis(x, -1, 1).copy(), Targets.parse([[0, 2], [1, 1]], 2), names
    )
    result = nnx_bound.tensor_gradients(x, Targets.parse([[0, 2], [1, 1]], 2), names)
    for name in names:
        np.testing.assert_allclose(
            result.gradients[name], np.moveaxis(expected.gradients[name], 2, -1), atol=2e-5
        )
    np.testing.assert_allclose(result.scores, expected.scores, atol=2e-5)


def test_region_targets_match_gradients_at_the_layer():
    module, variables = zoo.build("seg_fcn", "flax")
    x = zoo.example_input("seg_fcn", batch_size=2)
    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:8] = True
    targets = Targets.parse([Region(1, mask), Region(2, ~mask)], 2)
    bound = BACKEND.bind(module, "features/relu1", variables=variables)
    result = bound.tensor_gradients(x, targets, ["features/relu1", "features/conv2"])
    single = bound.gradients(x, targets)
    np.testing.assert_allclose(
        np.moveaxis(result.gradients["features/relu1"], -1, 2), single.gradients, atol=1e-6
    )
    np.testing.assert_allclose(result.scores, single.scores, atol=1e-6)
    np.testing.assert_array_equal(result.targets, [[1, 2], [1, 2]])


def test_model_unchanged_and_compiled_once(linen_bound):
    weights = zoo.init_weights("resnet_tiny", seed=2)
    model = zoo.build("resnet_tiny", "nnx", weights)
    before = jax.tree.map(lambda leaf: np.array(leaf, copy=True), nnx.state(model))
    bound = BACKEND.bind(model, "block2")
    x = zoo.example_input("resnet_tiny", batch_size=1)
    bound.tensor_gradients(x, Targets.parse(0, 1), ["block1.conv1", "block1"])
    bound.tensor_gradients(x, Targets.parse(3, 1), ["block1.conv1", "block1"])  # no retrace
    bound.hessian_vector_products(x, Targets.parse(0, 1))
    assert bound._tensor_jitted._cache_size() == 1
    assert type(model.block1) is type(model.block2) and type(model.block1.conv1) is nnx.Conv
    after = nnx.state(model)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    variables = jax.tree.map(lambda leaf: np.array(leaf, copy=True), linen_bound.variables)
    linen_bound.tensor_gradients(x, Targets.parse(0, 1), ["stem_conv"])
    for a, b in zip(
        jax.tree.leaves(variables), jax.tree.leaves(linen_bound.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)


# --- attention ----------------------------------------------------------------------------

HEADS, DIM, TOKENS = 2, 8, 5


def _attention_reference(params, x, w_out, target):
    """Scores and d score / d probabilities of the attention written out by hand.

    ``params``: the query/key/value/out kernels ``(D, H, d)`` / ``(H, d, D)`` and biases.
    """

    def heads(name):
        return jnp.einsum("nld,dhe->nlhe", x, params[name]["kernel"]) + params[name]["bias"]

    q, k, v = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("nqhe,nkhe->nhqk", q, k) / np.sqrt(DIM // HEADS)
    probs = jax.nn.softmax(logits, axis=-1)

    def score(probs):
        mixed = jnp.einsum("nhqk,nkhe->nqhe", probs, v)
        out = jnp.einsum("nqhe,hed->nqd", mixed, params["out"]["kernel"]) + params["out"]["bias"]
        return (out.mean(1) @ w_out)[:, target]

    s, vjp_fn = jax.vjp(score, probs)
    return probs, s, vjp_fn(jnp.ones_like(s))[0]


def test_linen_attention_named_directly_gives_probability_gradients():
    w_out = np.random.default_rng(1).normal(size=(DIM, 3)).astype(np.float32)

    class Block(nn.Module):
        attention_fn: object = nn.dot_product_attention

        @nn.compact
        def __call__(self, x):
            y = nn.MultiHeadDotProductAttention(HEADS, attention_fn=self.attention_fn, name="attn")(
                x
            )
            return y.mean(1) @ w_out

    x = np.random.default_rng(0).normal(size=(2, TOKENS, DIM)).astype(np.float32)
    module = Block()
    variables = module.init(jax.random.key(0), x)
    bound = BACKEND.bind(module, "attn", variables=variables)
    result = bound.tensor_gradients(x, Targets.parse(1, 2), ["attn"], input_gradients=True)
    probs, s, grads = _attention_reference(variables["params"]["attn"], x, w_out, 1)
    assert result.tensors["attn"].shape == (2, HEADS, TOKENS, TOKENS)
    np.testing.assert_allclose(result.tensors["attn"], probs, atol=1e-6)
    np.testing.assert_allclose(result.scores[:, 0], s, atol=1e-5)
    np.testing.assert_allclose(result.gradients["attn"][:, 0], grads, atol=1e-5)
    by_input = jax.jit(jax.grad(lambda x: module.apply(variables, x)[:, 1].sum()))(x)
    np.testing.assert_allclose(result.input_gradients[:, 0], by_input, atol=1e-5)

    def custom(query, key, value, **kwargs):
        return nn.dot_product_attention(query, key, value, **kwargs)

    module = Block(attention_fn=custom)
    bound = BACKEND.bind(module, "attn", variables=variables)
    with pytest.raises(LayerError, match="submodule whose output is the attention probabilities"):
        bound.tensor_gradients(x, Targets.parse(1, 2), ["attn"])


class _NnxProbs(nnx.Module):
    """A softmax module: its output is the attention probabilities."""

    def __call__(self, logits):
        return jax.nn.softmax(logits, axis=-1)


class _NnxBlock(nnx.Module):
    def __init__(self, w_out):
        self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=nnx.Rngs(0))
        self.probs = _NnxProbs()
        self.w_out = nnx.Param(jnp.asarray(w_out))

    def __call__(self, x):
        # The attention runs twice: once as nnx's module, once written out around
        # self.probs, so that both ways of naming the probabilities can be checked.
        a = self.attn
        q = a.query(x)
        k = a.key(x)
        logits = jnp.einsum("nqhe,nkhe->nhqk", q, k) / np.sqrt(DIM // HEADS)
        mixed = jnp.einsum("nhqk,nkhe->nqhe", self.probs(logits), a.value(x))
        written = a.out(mixed)
        return (self.attn(x).mean(1) + written.mean(1)) @ self.w_out[...]


def test_nnx_attention_module_and_probability_submodule():
    w_out = np.random.default_rng(1).normal(size=(DIM, 3)).astype(np.float32)
    model = _NnxBlock(w_out)
    x = np.random.default_rng(0).normal(size=(2, TOKENS, DIM)).astype(np.float32)
    bound = BACKEND.bind(model, "attn")
    result = bound.tensor_gradients(x, Targets.parse(2, 2), ["attn", "probs"])
    params = {
        name: {
            "kernel": getattr(model.attn, name).kernel[...],
            "bias": getattr(model.attn, name).bias[...],
        }
        for name in ("query", "key", "value", "out")
    }
    probs, _, grads = _attention_reference(params, x, w_out, 2)
    for name in ("attn", "probs"):  # the score is linear in each: the same gradients
        np.testing.assert_allclose(result.tensors[name], probs, atol=1e-6)
        np.testing.assert_allclose(result.gradients[name][:, 0], grads, atol=1e-5)
    assert model.attn.attention_fn is nnx.dot_product_attention  # the module is unchanged


# --- Hessian-vector products ----------------------------------------------------------------


def test_hvp_matches_jax_hessian_on_a_function_pair():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(12, 4)).astype(np.float32))

    def features(x):
        return jnp.tanh(x)

    def head(a):
        return jnp.sin(a.reshape(a.shape[0], -1)) @ w + (a**2).sum((1, 2, 3))[:, None]

    x = rng.normal(size=(2, 2, 3, 2)).astype(np.float32)
    bound = BACKEND.bind((features, head), None)
    targets = Targets.parse([[0, 3], [2, 2]], 2)
    layer_gradients, hvp = bound.hessian_vector_products(x, targets)
    a = np.tanh(x)
    assert hvp.shape == (2, 2, 2, 2, 3) and hvp.dtype == np.float32  # (N, T, K, *S)
    np.testing.assert_allclose(layer_gradients.gradients, bound.gradients(x, targets).gradients)
    hessian = jax.jit(jax.hessian(lambda a, c: head(a[None])[0, c]))
    for n in range(2):
        for t, c in enumerate(targets.classes[n]):
            expected = np.tensordot(np.asarray(hessian(jnp.asarray(a[n]), c)), a[n], axes=3)
            np.testing.assert_allclose(hvp[n, t], np.moveaxis(expected, -1, 0), atol=1e-5)


@pytest.mark.parametrize("layer", ["block2", "stem_relu"])
def test_hvp_is_zero_where_the_logits_are_piecewise_linear(layer, nnx_bound):
    x = zoo.example_input("resnet_tiny", batch_size=2)
    bound = BACKEND.bind(nnx_bound.model, layer)
    layer_gradients, hvp = bound.hessian_vector_products(x, Targets.parse("all", 2))
    reference = bound.gradients(x, Targets.parse("all", 2))
    np.testing.assert_allclose(layer_gradients.gradients, reference.gradients, atol=1e-6)
    np.testing.assert_array_equal(layer_gradients.targets, reference.targets)
    assert hvp.shape == reference.gradients.shape
    np.testing.assert_allclose(hvp, 0, atol=1e-6)


def _gap_dense(bound):
    """resnet_tiny's head after block2, as a matrix: mean over space, then fc."""
    params = bound.variables["params"]["fc"]
    return np.asarray(params["kernel"], np.float64), np.asarray(params["bias"], np.float64)


@pytest.mark.parametrize("framework", ["flax", "nnx"])
def test_rest_score_closed_form_and_nonzero_hvp(framework, linen_bound, nnx_bound):
    bound = linen_bound if framework == "flax" else nnx_bound
    x = zoo.example_input("resnet_tiny", batch_size=2, seed=7)
    classes = np.array([[0, 4], [2, 2]])
    plain = bound.gradients(x, Targets.parse(classes, 2))
    rest, hvp = bound.hessian_vector_products(x, _targets(classes, 2, "rest"))
    np.testing.assert_allclose(rest.outputs, plain.outputs)  # outputs stay raw
    np.testing.assert_allclose(
        rest.scores, np.take_along_axis(rest_scores(plain.outputs), classes, 1), atol=1e-5
    )
    # After block2 the logits are z = W^T mean(a) + b: s = 2 z_c - logsumexp(z) has
    # gradient M^T (2 e_c - p) and Hessian-vector product -M^T (diag p - p p^T) M a.
    kernel, bias = _gap_dense(linen_bound)
    a = plain.activations.astype(np.float64)  # (N, K, h, w)
    hw = a.shape[2] * a.shape[3]
    u = a.mean((2, 3)) @ kernel  # M a = z - b
    p = np.exp(u + bias - (u + bias).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for n in range(2):
        for t, c in enumerate(classes[n]):
            grad = kernel @ (2 * np.eye(5)[c] - p[n]) / hw
            product = -kernel @ (p[n] * u[n] - p[n] * (p[n] @ u[n])) / hw
            for value, closed_form in ((rest.gradients[n, t], grad), (hvp[n, t], product)):
                expected = np.broadcast_to(closed_form[:, None, None], a[n].shape)
                np.testing.assert_allclose(value, expected, atol=1e-6)
    assert np.abs(hvp).max() > 1e-4


def test_rest_gradients_predicted_class_and_no_stale_compilation(linen_bound):
    x = zoo.example_input("resnet_tiny", batch_size=3, seed=11)
    bound = BACKEND.bind(linen_bound.module, "block2/relu1", variables=linen_bound.variables)
    plain = bound.gradients(x, Targets.parse(None, 3))
    rest = bound.gradients(x, _targets(None, 3, "rest"))
    again = bound.gradients(x, Targets.parse(None, 3))
    assert bound.trace_count == 2  # one compilation per score kind, each reused
    np.testing.assert_array_equal(rest.targets, np.argmax(plain.outputs, 1)[:, None])
    np.testing.assert_array_equal(again.scores, plain.scores)
    np.testing.assert_allclose(
        rest.scores, np.take_along_axis(rest_scores(plain.outputs), rest.targets, 1), atol=1e-5
    )

    # Reference: jax.grad of 2 z_c - logsumexp(z) at the perturbed value.
    module, variables = bound.module, bound.variables
    _, state = module.apply(variables, x, mutable=["perturbations"])

    def score(perturbations):
        z = module.apply({**variables, "perturbations": perturbations}, x)
        r = 2 * z - jax.nn.logsumexp(z, axis=1, keepdims=True)
        return jnp.take_along_axis(r, jnp.asarray(rest.targets), 1).sum()

    expected = jax.jit(jax.grad(score))(state["perturbations"])["block2"]["relu1"]
    np.testing.assert_allclose(rest.gradients[:, 0], np.moveaxis(expected, -1, 1), atol=1e-6)
    tensors = bound.tensor_gradients(x, _targets(None, 3, "rest"), ["block2/relu1"])
    np.testing.assert_allclose(tensors.gradients["block2/relu1"][:, 0], expected, atol=1e-6)


# --- errors -----------------------------------------------------------------------------------


def test_rest_needs_class_targets_and_class_scores():
    module, variables = zoo.build("seg_fcn", "flax")
    bound = BACKEND.bind(module, "features/relu1", variables=variables)
    x = zoo.example_input("seg_fcn", batch_size=1)
    with pytest.raises(TargetError, match="rest"):
        bound.gradients(x, _targets(lambda out: out.sum((1, 2, 3)), 1, "rest"))
    with pytest.raises(TargetError, match="rest"):
        bound.hessian_vector_products(x, _targets(Region(0, np.ones((10, 10))), 1, "rest"))
    with pytest.raises(TargetError, match=r"score='rest' needs \(N, C\)"):
        bound.tensor_gradients(x, _targets("all", 1, "rest"), ["features/conv1"])


def test_function_pair_has_no_layers():
    bound = BACKEND.bind((jnp.tanh, lambda a: a.sum((1, 2))), None)
    with pytest.raises(BackendError, match="has no layers"):
        bound.bias_layers()
    with pytest.raises(BackendError, match="has no layers"):
        bound.tensor_gradients(np.ones((1, 3, 2), np.float32), Targets.parse(0, 1), ["a"])


def test_layer_errors(linen_bound, nnx_bound):
    x = zoo.example_input("resnet_tiny", batch_size=1)
    with pytest.raises(LayerError, match="block1/conv3"):
        linen_bound.tensor_gradients(x, Targets.parse(0, 1), ["block1/conv1", "block1/conv3"])
    with pytest.raises(LayerError, match=r"block1\.conv3"):
        nnx_bound.tensor_gradients(x, Targets.parse(0, 1), ["block1.conv3"])
    with pytest.raises(LayerError, match="at least one"):
        nnx_bound.tensor_gradients(x, Targets.parse(0, 1), [])
    with pytest.raises(InputError, match="floating-point"):
        nnx_bound.tensor_gradients(
            x.astype(np.int32), Targets.parse(0, 1), ["block1"], input_gradients=True
        )

    class Unused(nn.Module):
        @nn.compact
        def __call__(self, x):
            nn.Dense(3, name="ignored")(x)  # computed, then thrown away
            shared = nn.Dense(2, name="shared")
            return shared(nn.Dense(2, name="used")(x)) + shared(x[:, :2])

    x = np.ones((2, 4), np.float32)
    module = Unused()
    variables = module.init(jax.random.key(0), x)
    bound = BACKEND.bind(module, "used", variables=variables)
    with pytest.raises(LayerError, match=r"do not depend on layers \['ignored'\]"):
        bound.tensor_gradients(x, Targets.parse(0, 2), ["used", "ignored"])
    with pytest.raises(LayerError, match="ran 2 times"):
        bound.tensor_gradients(x, Targets.parse(0, 2), ["shared"])
    result = bound.tensor_gradients(x, Targets.parse(1, 2), ["used"])
    kernel = variables["params"]["shared"]["kernel"]
    np.testing.assert_allclose(
        result.gradients["used"][:, 0], np.broadcast_to(kernel[:, 1], (2, 2))
    )
