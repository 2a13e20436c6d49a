"""Tests of the TensorFlow/Keras backend and the Keras zoo builder."""

from __future__ import annotations

import contextlib
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
from multicam.backends import backend_for  # noqa: E402
from multicam.backends.tensorflow import TensorFlowBackend, _named_layers  # noqa: E402
from multicam.errors import (  # noqa: E402
    InputError,
    LayerError,
    NonFiniteError,
    TargetError,
)
from multicam.targets import Targets  # noqa: E402
from multicam.zoo import keras as keras_zoo  # noqa: E402

BACKEND = TensorFlowBackend()
N = 2


@functools.cache
def keras_model(arch: str, seed: int = 0) -> Any:
    return zoo.build(arch, "keras", zoo.init_weights(arch, seed))


def grads(model: Any, layer: Any, x: Any, targets: Any = None, **options: Any) -> Any:
    n = int(np.shape(x)[0])
    return BACKEND.bind(model, layer, **options).gradients(x, Targets.parse(targets, n))


def model_state(model: Any) -> list[tuple[Any, ...]]:
    """What must be identical before and after a call: call attributes, flags, weights."""
    state = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        state.append(
            (
                layer.name,
                "call" in layer.__dict__,
                "quantized_call" in layer.__dict__,
                type(layer).call is layer.call.__func__,
                layer.trainable,
                [w.trainable for w in layer.weights],
            )
        )
    weights = [w.numpy() for w in model.weights]
    return [*state, *(w.tobytes() for w in weights)]


# ---------------------------------------------------------------------------- zoo builder


@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_zoo_logits_match_torch(arch: str) -> None:
    if "torch" not in globals():
        pytest.skip("torch is not installed")
    weights = zoo.init_weights(arch, seed=3)
    x = zoo.example_input(arch, batch_size=3, seed=1)
    logits = np.asarray(zoo.build(arch, "keras", weights)(x, training=False))
    with torch.no_grad():
        expected = zoo.build(arch, "torch", weights)(torch.from_numpy(np.moveaxis(x, -1, 1).copy()))
    assert logits.shape == (3, zoo.ARCHITECTURES[arch].num_classes)
    np.testing.assert_allclose(logits, expected.numpy(), atol=2e-5, rtol=0)


def test_zoo_layer_paths() -> None:
    model = keras_model("resnet_tiny")
    paths = {path for path, _ in _named_layers(model)}
    for canonical in zoo.ARCHITECTURES["resnet_tiny"].cam_layers:
        assert zoo.layer_name(canonical, "keras") in paths
    assert isinstance(model.get_layer("block2"), keras.Model)
    assert isinstance(keras_model("digits_cnn").get_layer("features"), keras.Sequential)


# ----------------------------------------------------------------------- agreement


def split_reference(model: Any, stage: str, layer: str, x: np.ndarray, class_ids: np.ndarray):
    """Hand-written Grad-CAM gradients: run the model layer by layer, watch at the split."""
    top = [lay for lay in model.layers if not isinstance(lay, keras.layers.InputLayer)]
    flat: list[Any] = []
    for lay in top:
        flat.extend(lay.layers if lay.name == stage else [lay])
    members = model.get_layer(stage).layers
    index = next(i for i, lay in enumerate(flat) if lay.name == layer and lay in members)
    h = tf.convert_to_tensor(x)
    for lay in flat[: index + 1]:
        h = lay(h, training=False)
    activations = h
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(activations)
        out = activations
        for lay in flat[index + 1 :]:
            out = lay(out, training=False)
        scores = tf.gather(out, class_ids, axis=1, batch_dims=1)
        columns = tf.unstack(scores, axis=1)
    rows = [tape.gradient(column, activations) for column in columns]
    return activations.numpy(), np.stack([r.numpy() for r in rows], axis=1), scores.numpy()


@pytest.mark.parametrize(
    ("arch", "layer"),
    [
        ("digits_cnn", "relu4"),
        ("digits_cnn", "conv2"),
        ("gap_cnn", "relu1"),
        ("conv1d_net", "conv2"),
    ],
)
@pytest.mark.parametrize("targets", [None, 1, "all"])
def test_gradients_match_hand_written_tape(arch: str, layer: str, targets: Any) -> None:
    model = keras_model(arch)
    x = zoo.example_input(arch, N, seed=5)
    result = grads(model, f"features/{layer}", x, targets)
    acts, expected, scores = split_reference(model, "features", layer, x, result.targets)
    np.testing.assert_allclose(result.activations, np.moveaxis(acts, -1, 1), atol=1e-6)
    np.testing.assert_allclose(result.gradients, np.moveaxis(expected, -1, 2), atol=1e-7)
    np.testing.assert_allclose(result.scores, scores, atol=1e-6)
    assert result.gradients.dtype == np.float32
    assert result.input_spatial_shape == zoo.ARCHITECTURES[arch].input_shape[:-1]


@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_gradients_match_torch_backend(arch: str) -> None:
    if "torch" not in globals():
        pytest.skip("torch is not installed")
    torch_backend = pytest.importorskip("multicam.backends.torch")
    weights = zoo.init_weights(arch, seed=1)
    keras_net = zoo.build(arch, "keras", weights)
    torch_net = zoo.build(arch, "torch", weights)
    x = zoo.example_input(arch, N, seed=2)
    for canonical in zoo.ARCHITECTURES[arch].cam_layers:
        for targets in (None, "all"):
            ours = grads(keras_net, zoo.layer_name(canonical, "keras"), x, targets)
            theirs = (
                torch_backend.TorchBackend()
                .bind(torch_net, canonical)
                .gradients(np.moveaxis(x, -1, 1), Targets.parse(targets, N))
            )
            np.testing.assert_array_equal(ours.targets, theirs.targets)
            np.testing.assert_allclose(ours.activations, theirs.activations, atol=2e-5)
            np.testing.assert_allclose(ours.gradients, theirs.gradients, atol=1e-6)
            np.testing.assert_allclose(ours.scores, theirs.scores, atol=2e-5)
            assert ours.input_spatial_shape == theirs.input_spatial_shape


def test_nested_model_as_layer_matches_analytic_gradient() -> None:
    # resnet_tiny ends in block2 -> global average pool -> fc, so
    # d score_c / d block2[n, h, w, k] = fc.kernel[k, c] / (h * w) exactly.
    model = keras_model("resnet_tiny")
    x = zoo.example_input("resnet_tiny", N)
    result = grads(model, "block2", x, "all")
    kernel = model.get_layer("fc").get_weights()[0]  # (K, C)
    k, h, w = result.activations.shape[1:]
    expected = np.broadcast_to((kernel.T / (h * w))[None, :, :, None, None], (N, 5, k, h, w))
    np.testing.assert_allclose(result.gradients, expected, rtol=1e-5, atol=1e-8)
    h = tf.convert_to_tensor(x)
    for name in ("stem_conv_pad", "stem_conv", "stem_bn", "stem_relu", "block1", "block2"):
        h = model.get_layer(name)(h, training=False)
    np.testing.assert_allclose(result.activations, np.moveaxis(h.numpy(), -1, 1), atol=1e-5)


def test_layer_inside_nested_functional_model_no_graph_disconnected() -> None:
    model = keras_model("resnet_tiny")
    x = zoo.example_input("resnet_tiny", N)
    by_path = grads(model, "block2/conv1", x, 2)
    by_object = grads(model, model.get_layer("block2").get_layer("conv1"), x, 2)
    by_dots = grads(model, "block2.conv1", x, 2)
    for other in (by_object, by_dots):
        np.testing.assert_array_equal(by_path.gradients, other.gradients)
    assert by_path.gradients.shape == (N, 1, 16, 8, 8)
    assert np.abs(by_path.gradients).max() > 0


def test_unique_bare_name_resolves_and_ambiguous_is_an_error() -> None:
    model = keras_model("digits_cnn")
    bound = BACKEND.bind(model, "relu4")
    assert bound.layer_name == "features/relu4"
    with pytest.raises(LayerError, match=r"ambiguous.*block1/conv1"):
        BACKEND.bind(keras_model("resnet_tiny"), "conv1")


def test_unknown_layer_names_nearest_paths() -> None:
    with pytest.raises(LayerError, match="features/relu4") as info:
        BACKEND.bind(keras_model("digits_cnn"), "features/relu9")
    assert "did you mean" in str(info.value).lower()
    with pytest.raises(LayerError, match="not part of this model"):
        BACKEND.bind(keras_model("digits_cnn"), keras.layers.ReLU(name="stray"))
    with pytest.raises(LayerError):
        BACKEND.bind(keras_model("digits_cnn"), 3)


# ------------------------------------------------------------------- subclassed models


class Subclassed(keras.Model):
    def __init__(self, reuse: bool = False, skip: bool = False, fail: bool = False) -> None:
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3, name="conv")
        self.act = keras.layers.ReLU(name="act")
        self.unused = keras.layers.Conv2D(4, 1, name="unused")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.head = keras.layers.Dense(3, name="head")
        self.reuse, self.skip, self.fail = reuse, skip, fail
        self.forwards = 0

    def build(self, input_shape: Any) -> None:
        self.unused.build((None, 6, 6, 4))

    def call(self, x: Any) -> Any:
        self.forwards += 1
        h = self.act(self.conv(x))
        if self.reuse:
            h = self.act(h)
        if self.fail:
            raise RuntimeError("user forward exploded")
        return self.head(self.pool(h))


def subclassed(**kwargs: Any) -> Any:
    model = Subclassed(**kwargs)
    model(np.zeros((1, 8, 8, 2), np.float32))
    return model


def test_subclassed_model_matches_reference() -> None:
    model = subclassed()
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 2)).astype(np.float32)
    result = grads(model, "act", x, [0, 2, 1])
    a = model.act(model.conv(x))
    with tf.GradientTape() as tape:
        tape.watch(a)
        out = model.head(model.pool(a))
        score = tf.gather(out, [[0], [2], [1]], axis=1, batch_dims=1)
    expected = tape.gradient(score, a).numpy()
    np.testing.assert_allclose(result.gradients[:, 0], np.moveaxis(expected, -1, 1), atol=1e-7)
    assert result.targets.tolist() == [[0], [2], [1]]


def test_many_targets_use_one_forward_and_match_single_calls() -> None:
    model = subclassed()
    x = np.random.default_rng(1).normal(size=(N, 8, 8, 2)).astype(np.float32)
    before = model.forwards
    many = grads(model, "conv", x, np.array([[2, 0, 1], [1, 1, 0]]))
    assert model.forwards == before + 1
    for t in range(3):
        single = grads(model, "conv", x, many.targets[:, t])
        np.testing.assert_allclose(many.gradients[:, t], single.gradients[:, 0], atol=1e-7)
        np.testing.assert_allclose(many.scores[:, t], single.scores[:, 0], atol=1e-7)


def test_score_function_target() -> None:
    model = keras_model("gap_cnn")
    x = zoo.example_input("gap_cnn", N)
    by_fn = grads(model, "features/relu2", x, lambda out: out[:, 3] - out[:, 1])
    by_ids = grads(model, "features/relu2", x, np.array([[3, 1]] * N))
    np.testing.assert_allclose(
        by_fn.gradients[:, 0], by_ids.gradients[:, 0] - by_ids.gradients[:, 1], atol=1e-7
    )
    assert by_fn.targets is None
    with pytest.raises(TargetError, match="one score per sample"):
        grads(model, "features/relu2", x, lambda out: out)


def test_layer_called_twice_or_never_is_a_layer_error() -> None:
    x = np.zeros((1, 8, 8, 2), np.float32)
    model = subclassed(reuse=True)
    with pytest.raises(LayerError, match="called 2 times"):
        grads(model, "act", x)
    with pytest.raises(LayerError, match="not called"):
        grads(subclassed(), "unused", x)


def test_model_unchanged_after_call_and_after_raising_forward() -> None:
    model = keras_model("resnet_tiny")
    x = zoo.example_input("resnet_tiny", N)
    before = model_state(model)
    grads(model, "block2/relu1", x, "all")
    grads(model, "block2", x)
    assert model_state(model) == before

    failing = subclassed()
    failing.conv.trainable = False
    before = model_state(failing)
    failing.fail = True
    with pytest.raises(RuntimeError, match="user forward exploded") as info:
        grads(failing, "conv", np.zeros((1, 8, 8, 2), np.float32))
    assert any("multicam" in note for note in getattr(info.value, "__notes__", []))
    assert model_state(failing) == before
    failing.fail = False
    result = grads(failing, "conv", np.zeros((1, 8, 8, 2), np.float32))
    assert result.gradients.shape == (1, 1, 4, 6, 6)


# ------------------------------------------------------------------------------ inputs


def test_input_layout_and_rank_errors() -> None:
    model = keras_model("digits_cnn")
    x = zoo.example_input("digits_cnn", N)
    with pytest.raises(InputError, match=r"np\.moveaxis\(x, 1, -1\)") as info:
        grads(model, "features/relu4", np.moveaxis(x, -1, 1))
    assert "(2, 1, 28, 28)" in str(info.value) and "(N, 28, 28, 1)" in str(info.value)
    with pytest.raises(InputError, match=r"x\[None\]"):
        BACKEND.bind(model, "features/relu4").gradients(x[0], Targets.parse(None, 28))
    with pytest.raises(InputError, match="rank"):
        grads(model, "features/relu4", x[..., 0])


def test_non_finite_input() -> None:
    x = zoo.example_input("gap_cnn", N)
    x[1, 2, 3, 0] = np.nan
    with pytest.raises(NonFiniteError, match="input"):
        grads(keras_model("gap_cnn"), "features/relu2", x)


def test_tensor_input_and_float64_input() -> None:
    model = keras_model("gap_cnn")
    x = zoo.example_input("gap_cnn", N)
    reference = grads(model, "features/conv2", x, 1)
    for other in (tf.constant(x), x.astype(np.float64)):
        result = grads(model, "features/conv2", other, 1)
        np.testing.assert_allclose(result.gradients, reference.gradients, atol=1e-7)


def test_channels_first_layer() -> None:
    inputs = keras.Input((3, 8, 8))
    h = keras.layers.Conv2D(4, 3, data_format="channels_first", name="conv")(inputs)
    h = keras.layers.ReLU(name="relu")(h)
    h = keras.layers.GlobalAveragePooling2D(data_format="channels_first")(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    bound = BACKEND.bind(model, "relu")
    assert bound.layout == "channels_first"
    result = bound.gradients(np.ones((N, 3, 8, 8), np.float32), Targets.parse(0, N))
    assert result.activations.shape == (N, 4, 6, 6)
    assert result.input_spatial_shape == (8, 8)


@pytest.mark.parametrize("dtype", ["float16", "mixed_float16"])
def test_low_precision_model_gives_float32_close_to_float32_model(dtype: str) -> None:
    weights = zoo.init_weights("gap_cnn", 0)
    arch = zoo.ARCHITECTURES["gap_cnn"]
    low = keras_zoo.build(arch, weights, dtype=dtype)
    x = zoo.example_input("gap_cnn", N)
    result = grads(low, "features/relu2", x, "all")
    reference = grads(keras_model("gap_cnn"), "features/relu2", x, "all")
    for field in ("activations", "gradients", "scores"):
        ours, theirs = getattr(result, field), getattr(reference, field)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=2e-2 * np.abs(theirs).max())


# ------------------------------------------------------------------- model kinds, registry


def test_multi_output_model_is_a_target_error() -> None:
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, [keras.layers.Dense(3)(pooled), keras.layers.Dense(2)(pooled)])
    with pytest.raises(TargetError, match=r"returns 2 outputs .*output="):
        grads(model, "conv", np.ones((1, 8, 8, 2), np.float32))
    bound = TensorFlowBackend().bind(model, "conv")
    second = bound.gradients(np.ones((1, 8, 8, 2), np.float32), Targets.parse(1, 1, output=1))
    assert second.outputs is not None and second.outputs.shape == (1, 2)
    assert "call" not in model.get_layer("conv").__dict__


def test_sequential_model() -> None:
    model = keras.Sequential(
        [
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )
    model(np.zeros((1, 6, 6, 1), np.float32))
    result = grads(model, "relu", np.ones((N, 6, 6, 1), np.float32), "all")
    assert result.gradients.shape == (N, 4, 3, 4, 4)


def test_accepts_and_registry() -> None:
    model = keras_model("gap_cnn")
    assert TensorFlowBackend.accepts(model)
    assert TensorFlowBackend.accepts(keras.layers.Dense(2))
    assert not TensorFlowBackend.accepts(np.zeros(3))
    assert not TensorFlowBackend.accepts(object())
    if "torch" in globals():
        assert not TensorFlowBackend.accepts(torch.nn.Linear(2, 2))
    assert isinstance(backend_for(model), TensorFlowBackend)
    assert TensorFlowBackend.name == "tensorflow" and TensorFlowBackend.extra == "tensorflow"
