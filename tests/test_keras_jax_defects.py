"""Keras and JAX backend defects: graph operations as layers, training mode, guided reports.

- Keras: any node of a functional graph can be the layer (operations such as ``x + skip``
  that are not Layers, by name, object or KerasTensor), as in keras.io's Grad-CAM recipe.
- Training mode: multicam explains the model in inference mode; nnx and linen modules left
  in training mode are switched (on a copy / through ``apply``) and reported.
- Guided backpropagation reports how many ReLUs it guided and which other nonlinearities
  it could not guide.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest

# torch must be imported before TensorFlow when a process uses both.
with contextlib.suppress(ImportError):
    import torch  # noqa: F401

import multicam as mc
from multicam import zoo
from multicam.errors import InputError, LayerError
from multicam.targets import Targets


def _relu_count(layers: tuple[Any, ...]) -> int:
    """The ReLU calls of a zoo architecture's forward (a residual block ends in one)."""
    count = 0
    for layer in layers:
        if isinstance(layer, zoo.ReLU):
            count += 1
        elif isinstance(layer, zoo.Stage):
            count += _relu_count(layer.layers)
        elif isinstance(layer, zoo.Residual):
            count += _relu_count(layer.body) + _relu_count(layer.shortcut) + 1
    return count


# =========================================================================== Keras

keras_only = pytest.mark.usefixtures("_keras")


@pytest.fixture(scope="module")
def _keras() -> None:
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("needs KERAS_BACKEND=tensorflow")


def _tf_backend() -> Any:
    from multicam.backends.tensorflow import TensorFlowBackend

    return TensorFlowBackend()


def _tape_gradcam(model: Any, node: Any, x: np.ndarray, class_id: int) -> np.ndarray:
    """keras.io's Grad-CAM recipe on any graph node: (N, H, W), ReLU'd, not normalised."""
    import keras
    import tensorflow as tf

    grad_model = keras.Model(model.input, [node, model.output])
    with tf.GradientTape() as tape:
        activations, predictions = grad_model(x, training=False)
        score = predictions[:, class_id]
    grads = tape.gradient(score, activations)
    weights = tf.reduce_mean(grads, axis=(1, 2))
    cam = tf.einsum("nhwk,nk->nhw", activations, weights)
    return np.maximum(cam.numpy(), 0)


def _ops_state(model: Any) -> list[tuple[str, bool, bool]]:
    """Whether any layer or operation of the graph keeps a shadowing attribute."""
    from multicam.backends.tensorflow import _named_layers

    return [
        (path, "call" in vars(op), "activation" in vars(op) and op.activation is not None)
        for path, op in _named_layers(model)
    ]


def _residual_model(seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """conv -> (conv + skip) -> relu -> GAP -> dense, the sum an operation, not a Layer."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="c1")(inp)
    skip = keras.layers.Conv2D(6, 1, name="skip")(inp)
    total = x + skip
    out = keras.layers.ReLU(name="relu")(total)
    out = keras.layers.GlobalAveragePooling2D(name="gap")(out)
    out = keras.layers.Dense(4, name="dense")(out)
    return keras.Model(inp, out, name="residual"), {"sum": total}


@keras_only
def test_convnext_residual_add_matches_the_gradient_tape_recipe() -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(64, 64, 3))
    adds = [op for op in model.operations if not isinstance(op, keras.layers.Layer)]
    add = adds[14]  # the residual sum ending stage 2 (depths 3, 3, 9, 3): 4x4x384
    assert type(add).__name__ == "Add"
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    expected = _tape_gradcam(model, add.output, x, class_id=3)
    assert expected.shape == (2, 4, 4) and expected.max() > 0
    for layer in (add.name, add, add.output):
        result = mc.GradCAM(model, layer=layer)(x, 3, size=None, normalize=False, warn=False)
        assert result.maps.shape == (2, 1, 4, 4)
        np.testing.assert_allclose(
            result.maps[:, 0], expected, rtol=1e-4, atol=1e-6 * expected.max()
        )
    assert "call" not in vars(add)


@keras_only
def test_keras_tensor_and_operation_name_and_object_are_the_same_layer() -> None:
    import tensorflow as tf

    model, nodes = _residual_model()
    total = nodes["sum"]
    op = total._keras_history.operation
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype(np.float32)
    targets = Targets.parse(np.array([[0, 2], [1, 3], [3, 0]]), 3)
    before = _ops_state(model)
    results = [
        _tf_backend().bind(model, layer).gradients(x, targets) for layer in (total, op, op.name)
    ]
    assert _ops_state(model) == before

    # Reference: the sum's value and the gradients of the logits at it, by hand.
    c1, skip, relu, gap, dense = (
        model.get_layer(n) for n in ("c1", "skip", "relu", "gap", "dense")
    )
    with tf.GradientTape(persistent=True) as tape:
        a = c1(x) + skip(x)
        tape.watch(a)
        logits = dense(gap(relu(a)))
        cols = [tf.gather(logits, targets.classes[:, t], axis=1, batch_dims=1) for t in range(2)]
    grads = np.stack([tape.gradient(c, a).numpy() for c in cols], 1)
    for result in results:
        np.testing.assert_allclose(result.activations, np.moveaxis(a.numpy(), -1, 1), atol=1e-5)
        np.testing.assert_allclose(result.gradients, np.moveaxis(grads, -1, 2), atol=1e-5)
        assert result.training == ()
    assert _tf_backend().bind(model, total).layer_name == op.name


@keras_only
def test_operations_inside_a_nested_functional_model_by_path() -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(2)
    inner_in = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inner_in)
    y = keras.ops.add(x, inner_in)  # an operation
    z = keras.layers.Add(name="add_layer")([y, x])  # a Layer
    w = keras.ops.relu(z)
    inner = keras.Model(inner_in, w, name="inner")
    inp = keras.Input((8, 8, 3))
    pre = keras.layers.Conv2D(4, 1, name="pre")
    head = keras.Sequential(
        [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)], name="head"
    )
    model = keras.Model(inp, head(inner(pre(inp))), name="outer")
    op = y._keras_history.operation
    x_in = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)

    # By hand: the inner model cut at y, the rest run on top.
    cut = keras.Model(inner_in, [y, w])
    with tf.GradientTape() as tape:
        y_val, w_val = cut(pre(x_in))
        score = tf.reduce_sum(head(w_val)[:, 1])
    expected = tape.gradient(score, y_val).numpy()

    for layer in (f"inner/{op.name}", op.name, op, y):
        result = _tf_backend().bind(model, layer).gradients(x_in, Targets.parse(1, 2))
        np.testing.assert_allclose(result.activations, np.moveaxis(y_val.numpy(), -1, 1), atol=1e-5)
        np.testing.assert_allclose(result.gradients[:, 0], np.moveaxis(expected, -1, 1), atol=1e-5)
    assert _tf_backend().bind(model, op).layer_name == f"inner/{op.name}"
    assert _tf_backend().bind(model, "inner/add_layer").layer_name == "inner/add_layer"


@keras_only
def test_operation_output_replaced_for_ablation() -> None:
    model, nodes = _residual_model(seed=3)
    bound = _tf_backend().bind(model, nodes["sum"])
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype(np.float32)
    real = bound.gradients(x, Targets.parse(0, 2)).activations
    np.testing.assert_allclose(
        bound.outputs_from_layer(x, real), model(x, training=False).numpy(), atol=1e-5
    )
    zero = bound.outputs_from_layer(x, np.zeros_like(real))
    np.testing.assert_allclose(zero, model.get_layer("dense")(np.zeros((2, 6))).numpy(), atol=1e-6)
    assert "call" not in vars(nodes["sum"]._keras_history.operation)


@keras_only
def test_one_output_of_a_several_output_operation() -> None:
    import keras

    keras.utils.set_random_seed(4)
    inp = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    first, second = keras.ops.split(x, 2, axis=-1)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(first * 2.0 + second))
    model = keras.Model(inp, out)
    x_in = np.random.default_rng(4).normal(size=(2, 6, 6, 3)).astype(np.float32)
    bound = _tf_backend().bind(model, second)
    result = bound.gradients(x_in, Targets.parse(0, 2))
    conv = model.get_layer("conv")(x_in).numpy()
    np.testing.assert_allclose(result.activations, np.moveaxis(conv[..., 4:], -1, 1), atol=1e-5)
    dense = model.layers[-1].kernel.numpy()[:, 0] / 36  # d logit_0 / d second, per position
    np.testing.assert_allclose(result.gradients[0, 0, :, 0, 0], dense, atol=1e-6)
    assert bound.layer_name.endswith("[1]")
    replaced = bound.outputs_from_layer(x_in, result.activations)
    np.testing.assert_allclose(replaced, model(x_in).numpy(), atol=1e-5)


@keras_only
def test_did_you_mean_names_operations_and_bad_nodes_are_layer_errors() -> None:
    import keras

    model, nodes = _residual_model(seed=5)
    name = nodes["sum"]._keras_history.operation.name
    with pytest.raises(LayerError, match=repr(name)):
        _tf_backend().bind(model, name + "x")
    with pytest.raises(LayerError, match="is an input of the model"):
        _tf_backend().bind(model, model.inputs[0])
    _, other_nodes = _residual_model(seed=6)
    with pytest.raises(LayerError, match="not part of this model"):
        _tf_backend().bind(model, other_nodes["sum"])
    with pytest.raises(LayerError, match="not computed by a layer or operation"):
        _tf_backend().bind(model, keras.KerasTensor((None, 8, 8, 6)))


@keras_only
def test_every_keras_call_runs_in_inference_mode() -> None:
    import keras

    keras.utils.set_random_seed(7)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Dropout(0.9, name="drop")(x)
    out = keras.layers.Dense(4, name="dense")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    x_in = np.random.default_rng(7).normal(size=(2, 8, 8, 3)).astype(np.float32)
    in_training = model(x_in, training=True).numpy()  # also moves BN's statistics
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full(6, 0.5, np.float32))
    bn.moving_variance.assign(np.full(6, 4.0, np.float32))
    expected = model(x_in, training=False).numpy()
    assert not np.allclose(in_training, expected, atol=1e-3)
    weights = [w.numpy().copy() for w in model.weights]

    bound = _tf_backend().bind(model, "relu")
    result = bound.gradients(x_in, Targets.parse(None, 2))
    np.testing.assert_allclose(result.outputs, expected, atol=1e-5)
    assert result.training == ()
    np.testing.assert_allclose(bound.outputs(x_in), expected, atol=1e-5)
    np.testing.assert_allclose(
        bound.outputs_from_layer(x_in, result.activations), expected, atol=1e-5
    )
    guided = bound.guided_gradients(x_in, Targets.parse(None, 2))
    np.testing.assert_allclose(guided.outputs, expected, atol=1e-5)
    assert guided.training == ()
    for before, after in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())


def _keras_block(activation: str) -> Any:
    """An EfficientNet-like block without squeeze-excite: conv, depthwise, BN, activation."""
    import keras

    keras.utils.set_random_seed(8)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation=activation, name="expand")(inp)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation(activation, name="act")(x)
    x = keras.layers.Conv2D(4, 1, name="project")(x)
    out = keras.layers.Dense(3, name="dense")(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inp, out)


@keras_only
@pytest.mark.parametrize(
    ("activation", "kinds"), [("swish", ("SiLU",)), ("silu", ("SiLU",)), ("gelu", ("GELU",))]
)
def test_keras_guided_reports_unguided_nonlinearities(activation: str, kinds: tuple[str]) -> None:
    model = _keras_block(activation)
    x = np.random.default_rng(8).normal(size=(2, 8, 8, 3)).astype(np.float32)
    before = _ops_state(model)
    result = _tf_backend().bind(model, "project").guided_gradients(x, Targets.parse(None, 2))
    assert result.guided_relus == 0
    assert result.unguided_activations == kinds
    assert _ops_state(model) == before


@keras_only
def test_keras_guided_reports_layers_and_graph_operations() -> None:
    import keras

    keras.utils.set_random_seed(9)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    a = keras.layers.LeakyReLU(name="leaky")(x)
    b = keras.layers.ELU(name="elu")(x)
    c = keras.ops.silu(x)
    d = keras.layers.ReLU(negative_slope=0.1, name="slope")(x)
    e = keras.ops.relu(x)  # a ReLU operation: guided
    out = keras.layers.Dense(3, activation="sigmoid")(
        keras.layers.GlobalAveragePooling2D()(a + b + c + d + e)
    )
    model = keras.Model(inp, out)
    x_in = np.random.default_rng(9).normal(size=(2, 8, 8, 3)).astype(np.float32)
    result = _tf_backend().bind(model, "conv").guided_gradients(x_in, Targets.parse(0, 2))
    assert result.guided_relus == 1
    assert result.unguided_activations == ("ELU", "LeakyReLU", "SiLU", "Sigmoid")
    assert all(not shadowed for _, shadowed, _ in _ops_state(model))


@keras_only
def test_keras_relu_operation_is_guided_like_a_relu_layer() -> None:
    import keras

    def build(relu: Any) -> Any:
        keras.utils.set_random_seed(10)
        inp = keras.Input((6, 6, 2))
        x = keras.layers.Conv2D(5, 3, padding="same", name="conv")(inp)
        x = keras.layers.Conv2D(5, 3, padding="same", name="conv2")(relu(x))
        out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(relu(x)))
        return keras.Model(inp, out)

    x = np.random.default_rng(10).normal(size=(2, 6, 6, 2)).astype(np.float32)
    targets = Targets.parse(1, 2)
    by_op = _tf_backend().bind(build(keras.ops.relu), "conv").guided_gradients(x, targets)
    by_layer = _tf_backend().bind(build(keras.layers.ReLU()), "conv")
    expected = by_layer.guided_gradients(x, targets)
    np.testing.assert_allclose(by_op.gradients, expected.gradients, atol=1e-6)
    assert by_op.guided_relus == 2
    assert expected.guided_relus == 2  # one layer called twice: two ReLU calls
    assert by_op.unguided_activations == expected.unguided_activations == ()


@keras_only
@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_keras_zoo_guided_counts_its_relus(arch: str) -> None:
    model = zoo.build(arch, "keras", zoo.init_weights(arch, 0))
    x = zoo.example_input(arch, batch_size=2)
    layer = zoo.layer_name(zoo.ARCHITECTURES[arch].cam_layers[0], "keras")
    result = _tf_backend().bind(model, layer).guided_gradients(x, Targets.parse(None, 2))
    assert result.guided_relus == _relu_count(zoo.ARCHITECTURES[arch].layers)
    assert result.unguided_activations == ()


# ============================================================================== JAX


@pytest.fixture(scope="module")
def flax_modules() -> Any:
    pytest.importorskip("flax")
    import flax.linen as nn
    from flax import nnx

    return nn, nnx


def _jax_backend() -> Any:
    from multicam.backends.jax import JaxBackend

    return JaxBackend()


def _nnx_net(nnx: Any, seed: int = 0) -> Any:
    import jax

    class Net(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.block = nnx.List([nnx.Dropout(0.5, rngs=rngs)])
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            a = jax.nn.relu(self.bn(self.conv(x)))
            return self.head(self.block[0](a).mean((1, 2)))

    net = Net(nnx.Rngs(seed))
    net.bn.mean.value = jax.numpy.full((4,), 0.3)
    net.bn.var.value = jax.numpy.full((4,), 2.0)
    return net


def _nnx_snapshot(nnx: Any, model: Any) -> list[Any]:
    import jax

    modes = [
        (path, getattr(m, "deterministic", None), getattr(m, "use_running_average", None))
        for path, m in nnx.iter_graph(model)
        if isinstance(m, nnx.Module)
    ]
    leaves = [
        np.array(
            jax.random.key_data(leaf)
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            else leaf,
            copy=True,
        )
        for leaf in jax.tree.leaves(nnx.state(model))
    ]
    return [modes, leaves]


def _assert_same(a: list[Any], b: list[Any]) -> None:
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)


def test_nnx_left_in_train_mode_is_explained_in_eval_mode(flax_modules: Any) -> None:
    _, nnx = flax_modules
    model = _nnx_net(nnx)
    model.train()
    reference = nnx.clone(model)
    reference.eval()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    targets = Targets.parse(np.array([[0, 2], [1, 1]]), 2)
    before = _nnx_snapshot(nnx, model)

    bound = _jax_backend().bind(model, "conv")
    result = bound.gradients(x, targets)
    traces = bound.trace_count
    expected = _jax_backend().bind(reference, "conv").gradients(x, targets)
    np.testing.assert_allclose(result.gradients, expected.gradients, atol=1e-6)
    np.testing.assert_allclose(result.outputs, np.asarray(reference(x)), atol=1e-5)
    assert result.training == ("block.0 (Dropout)", "bn (BatchNorm)")
    assert expected.training == ()
    np.testing.assert_allclose(bound.outputs(x), expected.outputs, atol=1e-5)
    np.testing.assert_allclose(
        bound.outputs_from_layer(x, result.activations), expected.outputs, atol=1e-5
    )
    guided = bound.guided_gradients(x, targets)
    np.testing.assert_allclose(
        guided.gradients,
        _jax_backend().bind(reference, "conv").guided_gradients(x, targets).gradients,
        atol=1e-6,
    )
    assert guided.training == result.training
    _assert_same(_nnx_snapshot(nnx, model), before)
    assert model.block[0].deterministic is False and model.bn.use_running_average is False

    # Switched to eval by the user: the same compiled function, nothing reported.
    model.eval()
    again = bound.gradients(x, targets)
    np.testing.assert_allclose(again.gradients, result.gradients, atol=1e-6)
    assert again.training == ()
    assert bound.trace_count == traces


def _linen_net(nn: Any, dropout: bool = False) -> Any:
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool = True) -> Any:
            x = nn.Conv(4, (3, 3), name="conv")(x)
            x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
            x = nn.relu(x)
            if dropout:
                x = nn.Dropout(0.5, deterministic=not train)(x)
            return nn.Dense(3, name="head")(x.mean((1, 2)))

    return Net()


def test_linen_train_default_is_set_to_inference_and_reported(flax_modules: Any) -> None:
    import jax

    nn, _ = flax_modules
    module = _linen_net(nn, dropout=True)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = module.init(jax.random.key(0), x, train=False)
    variables = jax.tree.map(lambda v: v + 0.1, variables)  # non-trivial running stats
    copy = jax.tree.map(lambda v: np.array(v, copy=True), variables)
    targets = Targets.parse(None, 2)

    bound = _jax_backend().bind(module, "conv", variables=variables)
    result = bound.gradients(x, targets)
    explicit = _jax_backend().bind(
        module, "conv", variables=variables, apply_kwargs={"train": False}
    )
    expected = explicit.gradients(x, targets)
    np.testing.assert_allclose(result.gradients, expected.gradients, atol=1e-6)
    np.testing.assert_allclose(
        result.outputs, np.asarray(module.apply(variables, x, train=False)), atol=1e-5
    )
    assert result.training == ("apply(train=False) (train defaulted to True)",)
    assert expected.training == ()
    guided = bound.guided_gradients(x, targets)
    assert guided.training == result.training
    np.testing.assert_allclose(
        guided.gradients, explicit.guided_gradients(x, targets).gradients, atol=1e-6
    )
    np.testing.assert_allclose(bound.outputs(x), expected.outputs, atol=1e-5)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(copy), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_linen_deterministic_default_false_is_set(flax_modules: Any) -> None:
    import jax

    nn, _ = flax_modules

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any, deterministic: bool = False) -> Any:
            x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
            x = nn.Dropout(0.5, deterministic=deterministic)(x)
            return nn.Dense(3)(x.mean((1, 2)))

    module = Net()
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = module.init(jax.random.key(0), x, deterministic=True)
    result = (
        _jax_backend().bind(module, "conv", variables=variables).gradients(x, Targets.parse(0, 2))
    )
    assert result.training == ("apply(deterministic=True) (deterministic defaulted to False)",)
    np.testing.assert_allclose(
        result.outputs, np.asarray(module.apply(variables, x, deterministic=True)), atol=1e-5
    )


def test_linen_training_switched_elsewhere_is_a_clear_input_error(flax_modules: Any) -> None:
    import flax
    import jax

    nn, _ = flax_modules

    class BatchStats(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.Conv(4, (3, 3), name="conv")(x)
            x = nn.BatchNorm(use_running_average=False, name="bn")(x)
            return nn.Dense(3)(x.mean((1, 2)))

    class Drops(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.Dropout(0.5, deterministic=False)(nn.Conv(4, (3, 3), name="conv")(x))
            return nn.Dense(3)(x.mean((1, 2)))

    x = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype(np.float32)
    cases = [
        (BatchStats(), flax.errors.ModifyScopeVariableError, "variable collection"),
        (Drops(), flax.errors.InvalidRngError, "PRNG key"),
    ]
    for module, cause, what in cases:
        init_rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        variables = module.init(init_rngs, x)
        if "batch_stats" in variables:
            variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        bound = _jax_backend().bind(module, "conv", variables=variables)
        for method, args in (
            (bound.gradients, (x, Targets.parse(0, 2))),
            (bound.outputs, (x,)),
            (bound.guided_gradients, (x, Targets.parse(0, 2))),
        ):
            with pytest.raises(InputError, match=what) as info:
                method(*args)
            assert 'apply_kwargs={"train": False}' in str(info.value)
            assert "channels-last" not in str(info.value)
            assert isinstance(info.value.__cause__, cause)


def _jax_block(nn: Any, activation: Any) -> tuple[Any, Any]:
    """An EfficientNet-like linen block without squeeze-excite."""
    import jax

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = activation(nn.Conv(8, (3, 3), name="expand")(x))
            x = nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(x)
            x = activation(nn.BatchNorm(use_running_average=True, name="bn")(x))
            x = nn.Conv(4, (1, 1), name="project")(x)
            return nn.Dense(3)(x.mean((1, 2)))

    module = Block()
    variables = module.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
    return module, variables


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("silu", ("SiLU",)),
        ("swish", ("SiLU",)),
        ("gelu", ("GELU",)),
        ("gelu_exact", ("GELU",)),
        ("elu", ("ELU",)),
        ("sigmoid", ("Sigmoid",)),
        ("tanh", ("Tanh",)),
        ("leaky_relu", ("LeakyReLU",)),
        ("softplus", ("Softplus",)),
        ("hard_swish", ("Hardswish",)),
        ("relu", ()),
    ],
)
def test_jax_guided_reports_unguided_nonlinearities(
    flax_modules: Any, name: str, kinds: tuple[str, ...]
) -> None:
    nn, _ = flax_modules
    activation = {
        "gelu_exact": lambda x: nn.gelu(x, approximate=False),
        "relu": lambda x: nn.relu(x),
    }.get(name) or getattr(nn, name)
    module, variables = _jax_block(nn, activation)
    bound = _jax_backend().bind(module, "project", variables=variables)
    x = np.random.default_rng(4).normal(size=(2, 8, 8, 3)).astype(np.float32)
    for _ in range(2):  # the second call reuses the compiled function
        result = bound.guided_gradients(x, Targets.parse(None, 2))
        assert result.unguided_activations == kinds
        assert result.guided_relus == (2 if name == "relu" else 0)


def test_jax_guided_reports_nnx_and_function_pairs(flax_modules: Any) -> None:
    import jax

    _, nnx = flax_modules

    class Net(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            a = nnx.gelu(self.conv(x))
            return self.head(jax.nn.relu(a).mean((1, 2)))

    x = np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype(np.float32)
    result = _jax_backend().bind(Net(nnx.Rngs(0)), "conv").guided_gradients(x, Targets.parse(0, 2))
    assert (result.guided_relus, result.unguided_activations) == (1, ("GELU",))

    w = np.random.default_rng(6).normal(size=(3, 4)).astype(np.float32)
    pair = (lambda v: jax.nn.silu(v), lambda a: jax.numpy.tanh(a.mean((1, 2))) @ w)
    result = _jax_backend().bind(pair, None).guided_gradients(x, Targets.parse(0, 2))
    assert (result.guided_relus, result.unguided_activations) == (0, ("SiLU", "Tanh"))


@pytest.mark.parametrize("framework", ["flax", "nnx"])
@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_jax_zoo_guided_counts_its_relus(flax_modules: Any, framework: str, arch: str) -> None:
    built = zoo.build(arch, framework)
    x = zoo.example_input(arch, batch_size=2)
    layer = zoo.layer_name(zoo.ARCHITECTURES[arch].cam_layers[0], framework)
    if framework == "flax":
        module, variables = built
        bound = _jax_backend().bind(module, layer, variables=variables)
    else:
        bound = _jax_backend().bind(built, layer)
    result = bound.guided_gradients(x, Targets.parse(None, 2))
    assert result.guided_relus == _relu_count(zoo.ARCHITECTURES[arch].layers)
    assert result.unguided_activations == ()
    assert result.training == ()


# ================================================= perturbation methods follow output=


@keras_only
@pytest.mark.parametrize("method", [mc.ScoreCAM, mc.AblationCAM])
@pytest.mark.parametrize("output", [0, "logits"])
def test_keras_perturbation_methods_follow_output(method: type, output: Any) -> None:
    import keras

    keras.utils.set_random_seed(11)
    inp = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="conv")(inp)
    logits = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(features))
    aux = keras.layers.Dense(2)(keras.layers.GlobalMaxPooling2D()(features))
    plain = keras.Model(inp, logits)
    outputs = [logits, aux] if output == 0 else {"logits": logits, "aux": aux}
    several = keras.Model(inp, outputs)
    x = np.random.default_rng(11).normal(size=(2, 8, 8, 3)).astype(np.float32)
    want = method(plain, "conv")(x, targets=[1, 2], warn=False)
    got = method(several, "conv", output=output)(x, targets=[1, 2], warn=False)
    np.testing.assert_allclose(got.maps, want.maps, atol=1e-6)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", [mc.ScoreCAM, mc.AblationCAM])
def test_jax_perturbation_methods_follow_output(flax_modules: Any, method: type) -> None:
    import jax

    nn, _ = flax_modules

    class Net(nn.Module):
        several: bool

        @nn.compact
        def __call__(self, x: Any) -> Any:
            a = nn.relu(nn.Conv(5, (3, 3), name="conv")(x))
            logits = nn.Dense(4, name="head")(a.mean((1, 2)))
            return {"logits": logits, "aux": a.max((1, 2))} if self.several else logits

    x = np.random.default_rng(12).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = Net(False).init(jax.random.key(0), x)
    want = method(Net(False), "conv", variables=variables)(x, targets=[1, 2], warn=False)
    got = method(Net(True), "conv", variables=variables, output="logits")(
        x, targets=[1, 2], warn=False
    )
    np.testing.assert_allclose(got.maps, want.maps, atol=1e-6)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-5, atol=1e-7)
