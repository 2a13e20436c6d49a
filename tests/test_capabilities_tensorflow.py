"""The TensorFlow backend's optional capabilities: bias layers, gradients at several
tensors (FullGrad, LeGrad), Hessian-vector products and the residual-softmax score
(ShapleyCAM), each checked against a computation written here."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import numpy as np
import pytest

# torch must be imported before TensorFlow when a process uses both.
with contextlib.suppress(ImportError):
    import torch

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from multicam import zoo  # noqa: E402
from multicam.backends.base import BoundModel  # noqa: E402
from multicam.backends.tensorflow import _TAPS, TensorFlowBackend  # noqa: E402
from multicam.errors import LayerError, TargetError  # noqa: E402
from multicam.targets import Region, Targets, rest_scores  # noqa: E402

BACKEND = TensorFlowBackend()
N = 2


@functools.cache
def keras_model(arch: str, seed: int = 0) -> Any:
    return zoo.build(arch, "keras", zoo.init_weights(arch, seed))


def rest(targets: Any, n: int = N) -> Targets:
    return dataclasses.replace(Targets.parse(targets, n), score="rest")


def model_state(model: Any) -> list[Any]:
    """What must be identical before and after a call: call attributes and weights."""
    state: list[Any] = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        state.append(
            (
                layer.name,
                sorted(key for key in ("call", "quantized_call") if key in layer.__dict__),
                type(layer).call is layer.call.__func__,
            )
        )
    return [*state, *(w.numpy().tobytes() for w in model.weights)]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def gap_cnn_by_hand(x: np.ndarray, watched: tuple[str, ...], targets: Any) -> dict[str, Any]:
    """gap_cnn's forward written layer by layer with its own GradientTape.

    Returns each watched tensor (Keras layout) and its gradients ``(N, T, ...)`` for the
    target ``targets(logits) -> (N, T)``, plus ``"x"`` and its gradients.
    """
    model = keras_model("gap_cnn")
    x = tf.constant(x)
    seen: dict[str, Any] = {}
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        h = x
        for layer in model.get_layer("features").layers:
            h = layer(h, training=False)
            if f"features/{layer.name}" in watched:
                tape.watch(h)
                seen[f"features/{layer.name}"] = h
        logits = model.get_layer("fc")(model.get_layer("pool")(h))
        scores = targets(logits)
        columns = [scores[:, t] for t in range(scores.shape[1])]
    seen["x"] = x
    result = {}
    for name, tensor in seen.items():
        rows = [tape.gradient(column, tensor) for column in columns]
        result[name] = (tensor.numpy(), np.stack([row.numpy() for row in rows], axis=1))
    result["scores"] = scores.numpy()
    result["logits"] = logits.numpy()
    return result


# ------------------------------------------------------------------------- bias layers


def test_bias_layers_are_the_conv_biases_and_batchnorm_inference_biases() -> None:
    weights = zoo.init_weights("resnet_tiny", 0)
    bound = BACKEND.bind(keras_model("resnet_tiny"), "block2")
    found = dict(bound.bias_layers())
    expected = {}
    for key in weights:
        name, param = key.rsplit(".", 1)
        if param != "bias" or name == "fc":  # the dense head is not a bias layer
            continue
        if f"{name}.mean" in weights:  # BatchNorm
            scale = weights[f"{name}.scale"].astype(np.float64)
            std = np.sqrt(weights[f"{name}.var"].astype(np.float64) + zoo.BN_EPS)
            expected[name] = weights[key] - weights[f"{name}.mean"] * scale / std
        else:
            expected[name] = weights[key]
    assert set(found) == {zoo.layer_name(name, "keras") for name in expected}
    for name, bias in expected.items():
        got = found[zoo.layer_name(name, "keras")]
        assert got.dtype == np.float32 and got.shape == bias.shape
        np.testing.assert_allclose(got, bias, rtol=1e-6, atol=1e-7)
    # The model's order, the walk and the names of parameter_layers.
    order = list(bound.parameter_layers())
    assert [name for name, _ in bound.bias_layers()] == [n for n in order if n in found]


def test_bias_layers_cover_every_convolution_kind_and_nested_models() -> None:
    rng = np.random.default_rng(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, name="c2d")(inputs)
    h = keras.layers.DepthwiseConv2D(3, name="dw")(h)
    h = keras.layers.SeparableConv2D(5, 1, name="sep")(h)
    h = keras.layers.Conv2DTranspose(4, 2, name="tr")(h)
    h = keras.layers.Conv2D(4, 1, use_bias=False, name="nobias")(h)
    h = keras.layers.BatchNormalization(center=False, scale=False, name="bn_plain")(h)
    inner = keras.Sequential(
        [
            keras.Input(tuple(h.shape[1:])),
            keras.layers.Conv2D(2, 1, name="inner_conv"),
            keras.layers.BatchNormalization(epsilon=0.01, name="inner_bn"),
        ],
        name="inner",
    )
    h = inner(h)
    outputs = keras.layers.Dense(2, name="fc")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if layer.weights and not isinstance(layer, keras.Model):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape) for w in layer.get_weights()])
    found = BACKEND.bind(model, "c2d").bias_layers()
    names = [name for name, _ in found]
    assert names == ["c2d", "dw", "sep", "tr", "bn_plain", "inner/inner_conv", "inner/inner_bn"]
    values = dict(found)
    for name in ("c2d", "dw", "sep", "tr"):
        np.testing.assert_array_equal(values[name], model.get_layer(name).bias.numpy())
    plain = model.get_layer("bn_plain")
    mean, var = plain.moving_mean.numpy(), plain.moving_variance.numpy()
    np.testing.assert_allclose(values["bn_plain"], -mean / np.sqrt(var + 1e-3), rtol=1e-6)
    bn = inner.get_layer("inner_bn")
    gamma, beta, mean, var = (v.numpy().astype(np.float64) for v in bn.weights)
    np.testing.assert_allclose(
        values["inner/inner_bn"], beta - mean * gamma / np.sqrt(var + 0.01), rtol=1e-6
    )


# -------------------------------------------------------------------- tensor gradients

GAP_LAYERS = ("features/conv1", "features/relu1", "features/relu2")


@pytest.mark.parametrize(
    ("targets", "pick"),
    [
        (None, lambda z: tf.gather(z, tf.argmax(z, 1)[:, None], axis=1, batch_dims=1)),
        ([[1, 3], [4, 0]], lambda z: tf.gather(z, [[1, 3], [4, 0]], axis=1, batch_dims=1)),
        ("all", lambda z: z),
        (lambda z: z[:, 2] - z[:, 0], lambda z: (z[:, 2] - z[:, 0])[:, None]),
    ],
    ids=["predicted", "classes", "all", "callable"],
)
def test_tensor_gradients_match_a_hand_written_tape(targets: Any, pick: Any) -> None:
    x = zoo.example_input("gap_cnn", N, seed=1)
    model = keras_model("gap_cnn")
    before = model_state(model)
    bound = BACKEND.bind(model, "features/relu2")
    traces = bound.trace_count
    # Names as layer= takes them: a path, a unique bare name, a layer object.
    asked = ["features/conv1", "relu1", model.get_layer("features").get_layer("relu2")]
    result = bound.tensor_gradients(x, Targets.parse(targets, N), asked, input_gradients=True)
    expected = gap_cnn_by_hand(x, GAP_LAYERS, pick)
    assert list(result.tensors) == list(GAP_LAYERS) == list(result.gradients)
    assert result.layout == "channels_last"
    for name in GAP_LAYERS:
        tensor, gradients = expected[name]
        assert result.tensors[name].dtype == np.float32
        np.testing.assert_allclose(result.tensors[name], tensor, rtol=1e-5, atol=1e-6)
        assert result.gradients[name].shape == gradients.shape
        np.testing.assert_allclose(result.gradients[name], gradients, rtol=1e-4, atol=1e-6)
    assert result.inputs is not None and result.input_gradients is not None
    np.testing.assert_array_equal(result.inputs, x)
    np.testing.assert_allclose(result.input_gradients, expected["x"][1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.scores, expected["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.outputs, expected["logits"], rtol=1e-5, atol=1e-6)
    if callable(targets):
        assert result.targets is None
    else:
        assert result.targets is not None and result.targets.shape == result.scores.shape
    assert model_state(model) == before and not _TAPS
    assert bound.trace_count == traces  # eager: nothing traced


def test_tensor_gradients_region_targets() -> None:
    model = keras_model("seg_fcn")
    x = zoo.example_input("seg_fcn", N, seed=2)
    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:8] = True
    bound = BACKEND.bind(model, "features/relu2")
    result = bound.tensor_gradients(x, Targets.parse(Region(1, mask), N), ["features/relu2"])
    with tf.GradientTape() as tape:
        h = tf.constant(x)
        for layer in model.get_layer("features").layers:
            h = layer(h, training=False)
        tape.watch(h)
        out = model.get_layer("classifier")(h)
        score = tf.reduce_sum(out[..., 1] * mask, axis=(1, 2))
    np.testing.assert_allclose(result.scores[:, 0], score.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        result.gradients["features/relu2"][:, 0], tape.gradient(score, h).numpy(), atol=1e-6
    )


def test_tensor_gradients_at_the_bias_layers_complete_a_relu_network() -> None:
    """FullGrad's completeness, which ties the biases and the gradients together.

    resnet_tiny is piecewise linear in its input and biases jointly (ReLU, convolution,
    inference BatchNorm, pooling, dense), so each score is
    ``x . d s/d x + sum over bias layers of b . d s/d (layer output) + fc.bias[c]``.
    """
    model = keras_model("resnet_tiny")
    bound = BACKEND.bind(model, "block2")
    biases = bound.bias_layers()
    x = zoo.example_input("resnet_tiny", N, seed=3)
    result = bound.tensor_gradients(
        x, Targets.parse("all", N), [name for name, _ in biases], input_gradients=True
    )
    assert result.input_gradients is not None
    t = result.scores.shape[1]
    total = np.einsum(
        "ni,nti->nt", x.reshape(N, -1), result.input_gradients.reshape(N, t, -1)
    ).astype(np.float64)
    for name, bias in biases:
        assert result.tensors[name].shape[-1] == bias.shape[0]  # channels-last
        gradients = result.gradients[name].astype(np.float64).reshape(N, t, -1, bias.shape[0])
        total += np.einsum("ntsk,k->nt", gradients, bias.astype(np.float64))
    total += zoo.init_weights("resnet_tiny", 0)["fc.bias"][None, :]
    np.testing.assert_allclose(total, result.scores, rtol=1e-4, atol=1e-5)


def test_tensor_gradients_agree_with_the_torch_backend() -> None:
    if "torch" not in globals():
        pytest.skip("torch is not installed")
    from multicam.backends.torch import TorchBackend

    weights = zoo.init_weights("resnet_tiny", 4)
    x = zoo.example_input("resnet_tiny", N, seed=5)
    canonical = ["stem_conv", "block1.bn1", "block2.conv1", "block2"]
    torch_bound = TorchBackend().bind(zoo.build("resnet_tiny", "torch", weights), "block2")
    if type(torch_bound).tensor_gradients is BoundModel.tensor_gradients:
        pytest.skip("the torch backend has no tensor_gradients yet")
    expected = torch_bound.tensor_gradients(
        torch.from_numpy(np.moveaxis(x, -1, 1).copy()),
        Targets.parse("all", N),
        [zoo.layer_name(name, "torch") for name in canonical],
    )
    got = BACKEND.bind(zoo.build("resnet_tiny", "keras", weights), "block2").tensor_gradients(
        x, Targets.parse("all", N), [zoo.layer_name(name, "keras") for name in canonical]
    )
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-4, atol=1e-5)
    for name in canonical:
        keras_name, torch_name = zoo.layer_name(name, "keras"), zoo.layer_name(name, "torch")
        np.testing.assert_allclose(
            np.moveaxis(got.tensors[keras_name], -1, 1),
            expected.tensors[torch_name],
            rtol=1e-4,
            atol=1e-5,
        )
        np.testing.assert_allclose(
            np.moveaxis(got.gradients[keras_name], -1, 2),
            expected.gradients[torch_name],
            rtol=1e-4,
            atol=1e-5,
        )


def test_tensor_gradients_many_targets_use_the_batch_jacobian() -> None:
    """More than 16 targets take pfor's batch Jacobian per tensor: same gradients."""
    x = zoo.example_input("gap_cnn", N, seed=6)
    classes = np.tile(np.arange(5), (N, 4))[:, :17]  # T = 17
    bound = BACKEND.bind(keras_model("gap_cnn"), "features/relu2")
    result = bound.tensor_gradients(x, Targets.parse(classes, N), list(GAP_LAYERS))
    expected = gap_cnn_by_hand(x, GAP_LAYERS, lambda z: tf.gather(z, classes, axis=1, batch_dims=1))
    for name in GAP_LAYERS:
        np.testing.assert_allclose(result.gradients[name], expected[name][1], rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------- attention


def attention_model() -> Any:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8))
    attended = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(attended)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(pooled))


def test_attention_layer_gives_its_probabilities_and_their_gradients() -> None:
    model = attention_model()
    before = model_state(model)
    x = np.random.default_rng(0).normal(size=(N, 6, 8)).astype(np.float32)
    bound = BACKEND.bind(model, "mha")
    result = bound.tensor_gradients(x, Targets.parse([[0, 2], [1, 1]], N), ["mha", "pool"])
    probabilities = result.tensors["mha"]
    assert probabilities.shape == (N, 2, 6, 6)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    assert result.gradients["mha"].shape == (N, 2, 2, 6, 6)
    assert result.tensors["pool"].shape == (N, 8)
    # By hand: the layer's own probabilities, watched, and the rest of it written out.
    mha = model.get_layer("mha")
    with tf.GradientTape(persistent=True) as tape:
        _, expected = mha(x, x, return_attention_scores=True)
        tape.watch(expected)
        context = tf.einsum("bhqk,bkhd->bqhd", expected, mha._value_dense(x))
        logits = model.get_layer("fc")(model.get_layer("pool")(mha._output_dense(context)))
        scores = tf.gather(logits, [[0, 2], [1, 1]], axis=1, batch_dims=1)
        columns = [scores[:, 0], scores[:, 1]]
    np.testing.assert_allclose(probabilities, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.outputs, model(x).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.scores, scores.numpy(), rtol=1e-4, atol=1e-5)
    gradients = np.stack([tape.gradient(c, expected).numpy() for c in columns], axis=1)
    np.testing.assert_allclose(result.gradients["mha"], gradients, rtol=1e-4, atol=1e-6)
    assert model_state(model) == before and not _TAPS


def test_attention_layer_whose_caller_asks_for_scores_keeps_them() -> None:
    class Peek(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
            self.fc = keras.layers.Dense(3, name="fc")

        def call(self, x: Any) -> Any:
            out, probabilities = self.mha(x, x, return_attention_scores=True)
            direct = keras.ops.sum(probabilities[:, 0, 0, :2], axis=-1, keepdims=True)
            return self.fc(keras.ops.mean(out, axis=1)) + direct

    model = Peek()
    x = np.random.default_rng(1).normal(size=(N, 5, 8)).astype(np.float32)
    expected = model(x).numpy()
    result = BACKEND.bind(model, "mha").tensor_gradients(x, Targets.parse(0, N), ["mha"])
    np.testing.assert_allclose(result.outputs, expected, rtol=1e-4, atol=1e-5)
    # The direct term adds exactly 1 to the gradient at [head 0, query 0, keys 0 and 1].
    assert result.gradients["mha"].shape == (N, 1, 2, 5, 5)
    assert np.all(result.gradients["mha"][:, 0, 0, 0, :2] > 0.5)
    assert "call" not in model.mha.__dict__


def test_flash_attention_layer_is_refused() -> None:
    inputs = keras.Input((4, 8))
    attended = keras.layers.MultiHeadAttention(2, 4, name="mha", flash_attention=True)(
        inputs, inputs
    )
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(attended)))
    x = np.zeros((N, 4, 8), np.float32)
    with pytest.raises(LayerError, match="flash attention"):
        BACKEND.bind(model, "mha").tensor_gradients(x, Targets.parse(0, N), ["mha"])


# ------------------------------------------------------------ Hessian-vector products


def test_hvp_is_zero_where_the_score_is_piecewise_linear_in_the_layer() -> None:
    """gap_cnn's logits are linear in relu2's output and piecewise linear in conv2's."""
    x = zoo.example_input("gap_cnn", N, seed=7)
    model = keras_model("gap_cnn")
    before = model_state(model)
    for layer in ("features/relu2", "features/conv2"):
        bound = BACKEND.bind(model, layer)
        layer_gradients, hvp = bound.hessian_vector_products(x, Targets.parse("all", N))
        expected = bound.gradients(x, Targets.parse("all", N))
        np.testing.assert_allclose(layer_gradients.gradients, expected.gradients, atol=1e-6)
        np.testing.assert_allclose(layer_gradients.activations, expected.activations, atol=1e-6)
        assert hvp.shape == expected.gradients.shape and hvp.dtype == np.float32
        assert not hvp.any()
    assert model_state(model) == before and not _TAPS


def test_hvp_of_the_rest_score_matches_its_closed_form() -> None:
    """At relu2, ``z = mean(a) W + b``, so ``H a = -M^T (diag p - p p^T) (z - b)``.

    ``M^T v`` puts ``W v / (h w)`` at every position; ``2 z_c`` adds nothing to the
    Hessian, so every target has the same product.
    """
    weights = zoo.init_weights("gap_cnn", 0)
    x = zoo.example_input("gap_cnn", N, seed=8)
    bound = BACKEND.bind(keras_model("gap_cnn"), "features/relu2")
    layer_gradients, hvp = bound.hessian_vector_products(x, rest("all"))
    z = layer_gradients.outputs.astype(np.float64)
    p = softmax(z)
    linear = z - weights["fc.bias"]
    v = p * linear - p * (p * linear).sum(1, keepdims=True)
    _, k, h, w = layer_gradients.activations.shape
    expected = -(v @ weights["fc.kernel"].T.astype(np.float64)) / (h * w)  # (N, K)
    assert hvp.shape == (N, 5, k, h, w)
    np.testing.assert_allclose(
        hvp, np.broadcast_to(expected[:, None, :, None, None], hvp.shape), rtol=1e-4, atol=1e-7
    )
    assert np.abs(hvp).max() > 1e-3  # not the zero of the plain output score
    np.testing.assert_allclose(layer_gradients.scores, rest_scores(z), rtol=1e-5)


def smooth_model() -> tuple[Any, list[Any]]:
    """A float64 conv net with smooth nonlinearities; the layers after ``conv1``."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((7, 7, 2), dtype="float64")
    conv1 = keras.layers.Conv2D(4, 3, name="conv1", dtype="float64")
    tail = [
        keras.layers.Activation("tanh", dtype="float64"),
        keras.layers.Conv2D(5, 3, activation="softplus", name="conv2", dtype="float64"),
        keras.layers.GlobalAveragePooling2D(dtype="float64"),
        keras.layers.Dense(3, name="fc", dtype="float64"),
    ]
    h = conv1(inputs)
    for layer in tail:
        h = layer(h)
    return keras.Model(inputs, h), tail


def test_hvp_matches_central_differences_of_the_gradient() -> None:
    model, tail = smooth_model()
    x = np.random.default_rng(9).normal(size=(N, 7, 7, 2))
    bound = BACKEND.bind(model, "conv1")
    layer_gradients, hvp = bound.hessian_vector_products(x, Targets.parse("all", N))
    a = model.get_layer("conv1")(tf.constant(x))  # float64
    np.testing.assert_allclose(
        layer_gradients.activations, np.moveaxis(a.numpy(), -1, 1), rtol=1e-6, atol=1e-6
    )

    def gradient(at: Any) -> np.ndarray:
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(at)
            h = at
            for layer in tail:
                h = layer(h)
            columns = [h[:, t] for t in range(3)]
        return np.stack([tape.gradient(c, at).numpy() for c in columns], axis=1)

    eps = 1e-4
    expected = (gradient(a + eps * a) - gradient(a - eps * a)) / (2 * eps)
    expected = np.moveaxis(expected, -1, 2)  # channels-first, as the backend returns it
    assert np.abs(expected).max() > 1e-2
    np.testing.assert_allclose(hvp, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(
        layer_gradients.gradients, np.moveaxis(gradient(a), -1, 2), rtol=1e-5, atol=1e-8
    )


# ---------------------------------------------------------------- score="rest" targets


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_rest_scores_and_their_gradients(compile: bool) -> None:
    """``d rest_c = 2 d z_c - sum_j p_j d z_j``: from the plain output gradients."""
    x = zoo.example_input("gap_cnn", N, seed=10)
    bound = BACKEND.bind(keras_model("gap_cnn"), "features/relu2", compile=compile)
    plain = bound.gradients(x, Targets.parse("all", N))
    traces = bound.trace_count
    residual = bound.gradients(x, rest("all"))
    assert bound.last_path == ("compiled" if compile else "eager")
    p = softmax(plain.outputs.astype(np.float64))
    expected = 2 * plain.gradients - np.einsum("nj,nj...->n...", p, plain.gradients)[:, None]
    np.testing.assert_allclose(residual.scores, rest_scores(plain.outputs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(residual.gradients, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(residual.outputs, plain.outputs)  # raw outputs
    if compile:  # its own traced graph (the cache key has the score) ...
        assert bound.trace_count == traces + 1
    # ... which the plain score does not reuse; the predicted class is the outputs' own.
    again = bound.gradients(x, Targets.parse("all", N))
    np.testing.assert_array_equal(again.scores, plain.scores)
    predicted = bound.gradients(x, rest(None))
    np.testing.assert_array_equal(predicted.targets[:, 0], plain.outputs.argmax(1))
    np.testing.assert_allclose(
        predicted.scores[:, 0], residual.scores[np.arange(N), predicted.targets[:, 0]], rtol=1e-5
    )
    chosen = bound.gradients(x, rest([[3], [1]]))
    np.testing.assert_allclose(chosen.scores[:, 0], residual.scores[[0, 1], [3, 1]], rtol=1e-5)


def test_rest_is_refused_for_callable_region_and_map_outputs() -> None:
    x = zoo.example_input("gap_cnn", N)
    bound = BACKEND.bind(keras_model("gap_cnn"), "features/relu2")
    score = lambda z: z[:, 0]  # noqa: E731
    for _ in range(2):  # the second call of a target function takes the compiled path
        with pytest.raises(TargetError, match="rest"):
            bound.gradients(x, rest(score))
    seg = BACKEND.bind(keras_model("seg_fcn"), "features/relu2")
    y = zoo.example_input("seg_fcn", N)
    with pytest.raises(TargetError, match="rest"):
        seg.gradients(y, rest(Region(0, np.ones((10, 10), bool))))
    with pytest.raises(TargetError):
        seg.hessian_vector_products(y, rest(None))
    with pytest.raises(TargetError, match="rest"):
        seg.tensor_gradients(y, rest(Region(0, np.ones((10, 10), bool))), ["features/relu1"])


# ---------------------------------------------------------------------------- errors


def shared_model() -> Any:
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    hidden = shared(shared(inputs))
    first = keras.layers.Dense(3, name="first")(hidden)
    second = keras.layers.Dense(2, name="second")(keras.layers.Dense(4, name="branch")(inputs))
    return keras.Model(inputs, [first, second])


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        (["first", "brnch"], "Did you mean.*branch"),
        (["shared"], "called 2 times"),
        (["first", "branch"], "do not depend on the output of layer 'branch'"),
        ("first", "sequence of layer names"),
        ([], "sequence of layer names"),
        (["first", "first"], "more than once"),
    ],
    ids=["unknown", "runs-twice", "disconnected", "bare-string", "empty", "twice"],
)
def test_tensor_gradients_errors_leave_the_model_unchanged(layers: Any, match: str) -> None:
    model = shared_model()
    before = model_state(model)
    x = np.ones((N, 4), np.float32)
    bound = BACKEND.bind(model, "first")
    with pytest.raises(LayerError, match=match):
        bound.tensor_gradients(x, Targets.parse(0, N, output=0), layers)
    assert model_state(model) == before and not _TAPS
    # and it still works afterwards
    result = bound.tensor_gradients(x, Targets.parse(0, N, output=0), ["first"])
    np.testing.assert_allclose(result.outputs, model(x)[0].numpy(), rtol=1e-6)


def test_hvp_disconnected_layer_and_randomized_copy() -> None:
    model = shared_model()
    x = np.ones((N, 4), np.float32)
    with pytest.raises(LayerError, match="do not depend"):
        BACKEND.bind(model, "branch").hessian_vector_products(x, Targets.parse(0, N, output=0))
    assert not _TAPS
    # A randomised copy (FullGrad's sanity check) has its own biases.
    bound = BACKEND.bind(keras_model("resnet_tiny"), "block2")
    copy = bound.randomized(["stem_bn"], lambda layer, name, values: values + 1.0)
    original, redrawn = dict(bound.bias_layers()), dict(copy.bias_layers())
    assert not np.allclose(original["stem_bn"], redrawn["stem_bn"])
    np.testing.assert_array_equal(original["stem_conv"], redrawn["stem_conv"])


def test_randomized_copy_that_keras_cannot_clone_reads_its_new_values() -> None:
    """A subclassed model without a config is copied as a variable mapping (a scope)."""

    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.conv = keras.layers.Conv2D(3, 3, name="conv")
            self.norm = keras.layers.BatchNormalization(name="norm")
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.fc = keras.layers.Dense(2, name="fc")

        def call(self, x: Any) -> Any:
            return self.fc(self.pool(keras.ops.tanh(self.norm(self.conv(x)))))

        def get_config(self) -> dict[str, Any]:
            raise NotImplementedError

    model = Net()
    x = np.random.default_rng(2).normal(size=(N, 6, 6, 2)).astype(np.float32)
    model(x)
    bound = BACKEND.bind(model, "conv")
    copy = bound.randomized(["conv"], lambda layer, name, values: values + 0.5)
    assert type(copy).__name__ == "_RandomizedTensorFlowBoundModel"
    np.testing.assert_allclose(
        dict(copy.bias_layers())["conv"], dict(bound.bias_layers())["conv"] + 0.5
    )
    targets = Targets.parse(0, N)
    original = bound.tensor_gradients(x, targets, ["conv"])
    redrawn = copy.tensor_gradients(x, targets, ["conv"])
    # Kernel and bias + 0.5: the output gains 0.5 * (1 + the sum of its 3x3x2 window).
    window = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2)).sum((-1, -2, -3))
    np.testing.assert_allclose(
        redrawn.tensors["conv"],
        original.tensors["conv"] + 0.5 * (1 + window)[..., None],
        rtol=1e-5,
        atol=1e-5,
    )
    layer_gradients, _ = copy.hessian_vector_products(x, targets)
    np.testing.assert_allclose(
        np.moveaxis(layer_gradients.activations, 1, -1), redrawn.tensors["conv"], rtol=1e-5
    )
