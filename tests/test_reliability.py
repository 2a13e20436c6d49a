"""Reliability on every backend: state left as it was, no leaks, exceptions, numerics,
determinism and threads.

Everything runs on the digits CNN (or the small gap CNN) with batch sizes of 1 to 4, so
the whole file stays well under a minute and a half on two CPU cores.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

# torch must be imported before TensorFlow when a process uses both.
with contextlib.suppress(ImportError):
    import torch

from conftest import native_input, require

import multicam as mc
from multicam import zoo
from multicam.errors import InputError, MulticamError, NonFiniteError, TargetError

ARCH = "digits_cnn"
LAYER = "features.relu4"


class Boom(Exception):
    """The user's own exception, raised by a forward part-way through."""


# ------------------------------------------------------------------------------ helpers


def build(framework: str, arch: str = ARCH, weights: dict[str, np.ndarray] | None = None) -> Any:
    """``(model, options)`` for zoo ``arch`` in ``framework``."""
    model = zoo.build(arch, framework, weights)
    if framework == "flax":
        model, variables = model
        return model, {"variables": variables}
    return model, {}


def explainer(
    framework: str, arch: str = ARCH, layer: str = LAYER, weights: Any = None
) -> mc.GradCAM:
    model, options = build(framework, arch, weights)
    return mc.GradCAM(model, zoo.layer_name(layer, framework), **options)


def inputs(framework: str, n: int = 2, seed: int = 0, arch: str = ARCH) -> np.ndarray:
    return native_input(framework, zoo.example_input(arch, n, seed))


def call(cam: mc.GradCAM, x: Any, targets: Any = None, **options: Any) -> mc.CAMResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # blank-map warnings of random weights
        return cam(x, targets=targets, **options)


def global_settings() -> dict[str, Any]:
    """Every process-wide setting a backend could be tempted to change."""
    settings: dict[str, Any] = {"numpy_err": np.geterr()}
    if "torch" in globals():
        settings.update(
            torch_grad=torch.is_grad_enabled(),
            torch_inference=torch.is_inference_mode_enabled(),
            torch_dtype=torch.get_default_dtype(),
            torch_deterministic=torch.are_deterministic_algorithms_enabled(),
            torch_anomaly=torch.is_anomaly_enabled(),
        )
    import sys

    if "tensorflow" in sys.modules:
        import keras
        import tensorflow as tf

        settings.update(
            tf_device_policy=tf.config.experimental.get_device_policy(),
            tf_eager=tf.executing_eagerly(),
            tf_run_functions_eagerly=tf.config.functions_run_eagerly(),
            keras_floatx=keras.config.floatx(),
            keras_policy=keras.config.dtype_policy().name,
            keras_data_format=keras.config.image_data_format(),
        )
    if "jax" in sys.modules:
        import jax

        settings.update(
            jax_x64=jax.config.jax_enable_x64,
            jax_precision=jax.config.jax_default_matmul_precision,
            jax_debug_nans=jax.config.jax_debug_nans,
            jax_disable_jit=jax.config.jax_disable_jit,
        )
    return settings


def model_state(framework: str, model: Any, options: dict[str, Any]) -> Any:
    """Everything about the model a call must leave as it was, as comparable values."""
    if framework == "torch":
        return {
            "training": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()],
            "hooks": [
                (
                    len(m._forward_hooks),
                    len(m._forward_pre_hooks),
                    len(m._backward_hooks),
                    len(getattr(m, "_forward_hooks_with_kwargs", {})),
                )
                for m in model.modules()
            ],
            "global_hooks": len(torch.nn.modules.module._global_forward_hooks),
        }
    if framework == "keras":
        from multicam.backends import tensorflow as tf_backend

        layers = list(model._flatten_layers(include_self=True, recursive=True))
        return {
            "flags": [(layer.name, layer.trainable, sorted(vars(layer))) for layer in layers],
            "weights": [(w.path, w.trainable, w.numpy().copy()) for w in model.weights],
            "taps": dict(tf_backend._TAPS),
        }
    import jax

    if framework == "flax":
        tree = options["variables"]
        return {
            "leaves": [np.array(leaf) for leaf in jax.tree.leaves(tree)],
            "ids": jax.tree.map(id, tree),
        }
    from flax import nnx

    def as_numpy(leaf: Any) -> np.ndarray:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.array(leaf)

    return {
        "leaves": [as_numpy(leaf) for leaf in jax.tree.leaves(nnx.state(model))],
        "children": dict(vars(model)),
    }


def assert_same(before: Any, after: Any, path: str = "") -> None:
    if isinstance(before, dict):
        assert before.keys() == after.keys(), path
        for key in before:
            assert_same(before[key], after[key], f"{path}.{key}")
    elif isinstance(before, list | tuple):
        assert len(before) == len(after), path
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif "torch" in globals() and isinstance(before, torch.Tensor):
        assert torch.equal(before, after), path
    elif isinstance(before, np.ndarray):
        np.testing.assert_array_equal(before, after, err_msg=path)
    else:
        assert before == after, path


def failing_model(framework: str, error: BaseException) -> tuple[Any, dict[str, Any], str, Any]:
    """A small model whose forward runs the layer, then raises ``error`` while ``fail``.

    Returns ``(model, options, layer, switch)``; ``switch(False)`` makes it work.
    """
    x_shape = (1, 8, 8, 2)
    if framework == "torch":
        from torch import nn

        class Failing(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(2, 4, 3)
                self.fc = nn.Linear(4, 3)
                self.fail = True

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h = torch.relu(self.conv(x))
                if self.fail:
                    raise error
                return self.fc(h.mean((2, 3)))

        model = Failing()
        model.fc.weight.requires_grad_(False)
        model.fc.bias.grad = torch.ones(3)  # a .grad the user had must stay as it was
        return model, {}, "conv", lambda on: setattr(model, "fail", on)
    if framework == "keras":
        import keras

        class FailingKeras(keras.Model):
            def __init__(self) -> None:
                super().__init__()
                self.conv = keras.layers.Conv2D(4, 3, name="conv")
                self.pool = keras.layers.GlobalAveragePooling2D()
                self.head = keras.layers.Dense(3, name="head")
                self.fail = True

            def call(self, x: Any) -> Any:
                h = keras.ops.relu(self.conv(x))
                if self.fail:
                    raise error
                return self.head(self.pool(h))

        model = FailingKeras()
        model.fail = False
        model(np.zeros(x_shape, np.float32))
        model.fail = True
        model.head.trainable = False
        return model, {}, "conv", lambda on: setattr(model, "fail", on)
    import jax
    import jax.numpy as jnp

    if framework == "flax":
        import flax.linen as nn

        state = {"fail": True}

        class FailingLinen(nn.Module):
            @nn.compact
            def __call__(self, x: Any) -> Any:
                h = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="conv")(x))
                if state["fail"]:
                    raise error
                return nn.Dense(3)(h.mean((1, 2)))

        module = FailingLinen()
        state["fail"] = False
        variables = module.init(jax.random.PRNGKey(0), jnp.zeros(x_shape))
        state["fail"] = True
        return module, {"variables": variables}, "conv", lambda on: state.update(fail=on)
    from flax import nnx

    class FailingNnx(nnx.Module):
        def __init__(self) -> None:
            rngs = nnx.Rngs(0)
            self.conv = nnx.Conv(2, 4, (3, 3), padding="VALID", rngs=rngs)
            self.head = nnx.Linear(4, 3, rngs=rngs)
            self.fail = True

        def __call__(self, x: Any) -> Any:
            h = nnx.relu(self.conv(x))
            if self.fail:
                raise error
            return self.head(h.mean((1, 2)))

    model = FailingNnx()
    return model, {}, "conv", lambda on: setattr(model, "fail", on)


# -------------------------------------------------------------------------------- state


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_state_is_left_as_it_was_after_success_and_after_every_error(
    framework: str, train: bool
) -> None:
    if train and framework != "torch":
        pytest.skip("train/eval mode is a torch notion")
    model, options = build(framework)
    layer = zoo.layer_name(LAYER, framework)
    if framework == "torch":
        model.train(train)
        params = list(model.parameters())
        params[0].requires_grad_(False)
        params[-1].grad = torch.full_like(params[-1], 0.5)
    elif framework == "keras":
        model.get_layer("classifier").trainable = False
    cam = mc.GradCAM(model, layer, **options)
    x = inputs(framework, 2)
    bad_rank = x[..., 0] if framework != "torch" else x[:, 0]
    nan = x.copy()
    nan.flat[5] = np.nan
    settings = global_settings()
    before = model_state(framework, model, options)
    # successful calls, with every kind of target, then every kind of failure
    call(cam, x)
    call(cam, x, "all")
    call(cam, x, lambda out: out[:, 1] * 2)
    for bad, error in (
        ((x, 10), TargetError),
        ((x, [1, 2, 3]), TargetError),
        ((x, lambda out: out), TargetError),
        ((bad_rank, None), InputError),
        ((nan, None), NonFiniteError),
        ((x[:0], None), InputError),
    ):
        with pytest.raises(error):
            call(cam, *bad)
        assert_same(before, model_state(framework, model, options))
    assert global_settings() == settings
    result = call(cam, x)
    assert np.isfinite(result.maps).all()


def test_forward_raising_part_way_leaves_everything_and_propagates(framework: str) -> None:
    error = Boom("the user's forward failed for its own reasons")
    model, options, layer, switch = failing_model(framework, error)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 2)).astype(np.float32)
    x = native_input(framework, x)
    cam = mc.GradCAM(model, layer, **options)
    settings = global_settings()
    before = model_state(framework, model, options)
    for _ in range(2):
        with pytest.raises(Boom) as info:
            call(cam, x, "all")
        if framework == "keras":
            # Keras' own call wrapper re-raises a copy of the same type with the layer's
            # context added to the message, exactly as calling the model directly does.
            assert "for its own reasons" in str(info.value)
        else:
            assert info.value is error  # the very exception, not a copy or a wrapper
        notes = getattr(info.value, "__notes__", [])
        assert any("multicam" in note for note in notes), notes
        assert_same(before, model_state(framework, model, options))
        assert global_settings() == settings
        error.__notes__ = []  # type: ignore[attr-defined]
    switch(False)
    result = call(cam, x, "all")
    assert result.maps.shape == (2, 3, 8, 8) and np.isfinite(result.maps).all()
    switch(True)
    assert_same(before, model_state(framework, model, options))


def test_framework_rejecting_the_input_is_an_input_error_with_its_cause(framework: str) -> None:
    cam = explainer(framework)
    x = inputs(framework, 2)
    channels_wrong = np.moveaxis(x, 1, -1) if framework == "torch" else np.moveaxis(x, -1, 1)
    small = native_input(framework, np.ones((1, 6, 6, 1), np.float32))
    for bad in (channels_wrong, small):
        with pytest.raises(InputError) as info:
            call(cam, bad)
        message = str(info.value)
        assert str(tuple(bad.shape)) in message
        if framework != "keras":  # Keras is checked against its declared input first
            assert info.value.__cause__ is not None  # the framework's own exception
            assert not isinstance(info.value.__cause__, MulticamError)
    with pytest.raises(InputError, match="moveaxis"):
        call(cam, channels_wrong)


# ------------------------------------------------------------------------------- leaks


def _rss() -> int:
    import psutil

    gc.collect()
    return int(psutil.Process().memory_info().rss)


#: Resident memory 1,000 explanations may add after a warm-up; see docs/errors.md.
RSS_BOUND = 10 * 2**20


def test_thousand_explanations_do_not_grow_memory(framework: str) -> None:
    pytest.importorskip("psutil")
    cam = explainer(framework)
    x = inputs(framework, 1)
    if framework == "torch":  # one thread is faster for batch 1, and immune to contention
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        _thousand_explanations(framework, cam, x)
    finally:
        if framework == "torch":
            torch.set_num_threads(threads)


def _thousand_explanations(framework: str, cam: mc.GradCAM, x: np.ndarray) -> None:
    for i in range(100):  # warm-up: compilation caches, allocator pools
        call(cam, x, i % 10)
    start = _rss()
    for i in range(1000):
        call(cam, x, i % 10)
    growth = _rss() - start
    print(f"{framework}: RSS grew by {growth / 2**20:.2f} MiB over 1,000 explanations")
    assert growth < RSS_BOUND, f"{growth / 2**20:.1f} MiB"


def test_explainers_and_models_can_be_dropped_and_collected(framework: str) -> None:
    cam = explainer(framework)
    model_ref = weakref.ref(getattr(cam.bound, "model", None) or cam.bound.module)  # type: ignore[attr-defined]
    call(cam, inputs(framework, 2), "all")
    cam_ref = weakref.ref(cam)
    del cam
    gc.collect()
    assert cam_ref() is None
    if framework != "keras":  # Keras keeps its own global registry of built models
        assert model_ref() is None


# ----------------------------------------------------------------------------- numerics


def low_precision(framework: str, dtype: str, weights: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """``(explainer, input cast)`` of the digits CNN computing in ``dtype``."""
    if framework == "torch":
        model, _ = build("torch", ARCH, weights)
        model = model.to(getattr(torch, dtype))
        return mc.GradCAM(model, LAYER), lambda x: torch.from_numpy(x).to(getattr(torch, dtype))
    if framework == "keras":
        from multicam.zoo import keras as keras_zoo

        model = keras_zoo.build(zoo.ARCHITECTURES[ARCH], weights, dtype=dtype)
        return mc.GradCAM(model, zoo.layer_name(LAYER, "keras")), lambda x: x
    import jax
    import jax.numpy as jnp

    jdtype = getattr(jnp, dtype)
    if framework == "flax":
        module, variables = zoo.build(ARCH, "flax", weights)
        variables = jax.tree.map(lambda v: jnp.asarray(v, jdtype), variables)
        cam = mc.GradCAM(module, zoo.layer_name(LAYER, "flax"), variables=variables)
        return cam, lambda x: jnp.asarray(x, jdtype)
    from flax import nnx

    model = zoo.build(ARCH, "nnx", weights)
    nnx.update(model, jax.tree.map(lambda v: jnp.asarray(v, jdtype), nnx.state(model, nnx.Param)))
    return mc.GradCAM(model, LAYER), lambda x: jnp.asarray(x, jdtype)


#: Largest and mean absolute difference between a low-precision model's normalised maps and
#: the float32 model's (maps are in [0, 1]); stated in docs/errors.md.
LOW_PRECISION_ATOL = {"float16": (0.01, 0.002), "bfloat16": (0.15, 0.02)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_models_give_float32_maps_close_to_the_float32_model(
    framework: str, dtype: str
) -> None:
    weights = zoo.init_weights(ARCH, 0)
    x = inputs(framework, 4)
    targets = np.array([[1, 3], [2, 7], [0, 9], [5, 4]])
    reference = call(explainer(framework, weights=weights), x, targets, relu=False)
    cam, cast = low_precision(framework, dtype, weights)
    result = call(cam, cast(x), targets, relu=False)
    assert result.maps.dtype == np.float32 and result.raw.dtype == np.float32
    difference = np.abs(result.maps - reference.maps)
    worst, mean = float(difference.max()), float(difference.mean())
    print(f"{framework} {dtype}: |maps - float32 maps| max {worst:.4f}, mean {mean:.4f}")
    assert worst <= LOW_PRECISION_ATOL[dtype][0]
    assert mean <= LOW_PRECISION_ATOL[dtype][1]


def scaled_weights(scale: float) -> dict[str, np.ndarray]:
    weights = zoo.init_weights(ARCH, 0)
    for key in ("classifier.dense3.kernel", "classifier.dense3.bias"):
        weights[key] = weights[key] * np.float32(scale)
    return weights


def test_extreme_logits_give_finite_maps_equal_to_unscaled_ones(framework: str) -> None:
    x = inputs(framework, 3)
    reference = call(explainer(framework, weights=scaled_weights(1.0)), x, "all")
    cam = explainer(framework, weights=scaled_weights(1e4))
    result = call(cam, x, "all")
    assert np.abs(result.scores).max() > 1e3  # logits of order 1e4
    assert np.isfinite(result.maps).all() and np.isfinite(result.raw).all()
    # Grad-CAM is invariant to scaling the last layer: the normalised maps are the same.
    np.testing.assert_allclose(result.maps, reference.maps, atol=1e-4)


def test_overflowing_half_precision_logits_are_a_non_finite_error() -> None:
    require("torch")
    model, _ = build("torch", ARCH, scaled_weights(1e6))
    cam = mc.GradCAM(model.half(), LAYER)
    with pytest.raises(NonFiniteError, match="float32"):
        call(cam, torch.from_numpy(inputs("torch", 2)).half(), "all")


# -------------------------------------------------------------------------- determinism


def test_the_same_call_twice_is_bit_identical(framework: str) -> None:
    cam = explainer(framework)
    x = inputs(framework, 3)
    first = call(cam, x, "all")
    second = call(cam, x, "all")
    third = call(explainer(framework), x, "all")  # a fresh explainer on a fresh model
    for other in (second, third):
        for field in ("maps", "raw", "weights", "scores", "activations", "gradients"):
            np.testing.assert_array_equal(getattr(first, field), getattr(other, field), field)


# --------------------------------------------------------------------------- concurrency


def run_threads(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run ``jobs`` at once, one thread each, started together; re-raise the first error."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def worker(index: int) -> None:
        try:
            barrier.wait()
            results[index] = jobs[index]()
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def test_threads_sharing_one_model_get_the_serial_answers(framework: str) -> None:
    model, options = build(framework)
    layer = zoo.layer_name(LAYER, framework)
    cams = [mc.GradCAM(model, layer, **options) for _ in range(2)]  # two explainers, one model
    batches = [inputs(framework, 2, seed) for seed in range(4)]
    targets = [None, "all", [3, 4], np.array([[1, 2], [3, 4]])]
    serial = [call(cams[0], x, t).maps for x, t in zip(batches, targets, strict=True)]
    settings = global_settings()
    before = model_state(framework, model, options)

    def job(index: int) -> Callable[[], list[np.ndarray]]:
        cam = cams[index % 2]
        x, t = batches[index], targets[index]
        return lambda: [call(cam, x, t).maps for _ in range(8)]

    for index, maps in enumerate(run_threads([job(i) for i in range(4)])):
        for got in maps:
            np.testing.assert_array_equal(got, serial[index])
    assert_same(before, model_state(framework, model, options))
    assert global_settings() == settings


def test_plain_forwards_in_other_threads_are_not_disturbed() -> None:
    """A thread running the model normally while another explains it sees plain outputs."""
    require("torch")
    model, _ = build("torch")
    x = torch.from_numpy(inputs("torch", 2))
    expected = model(x)
    cam = mc.GradCAM(model, LAYER)

    def forwards() -> None:
        for _ in range(200):
            out = model(x)
            assert out.requires_grad and out.grad_fn is not None  # the graph reaches params
            assert torch.equal(out, expected)

    def explanations() -> None:
        for _ in range(200):
            call(cam, x.numpy(), "all")

    run_threads([forwards, explanations])


def test_keras_layer_called_from_another_thread_is_not_recorded() -> None:
    require("keras")
    import keras

    from multicam.backends import tensorflow as tf_backend

    model, _ = build("keras")
    x = inputs("keras", 2)
    cam = mc.GradCAM(model, zoo.layer_name(LAYER, "keras"))
    expected = np.asarray(model(x))
    reference = call(cam, x, "all").maps

    def forwards() -> None:
        for _ in range(10):
            np.testing.assert_array_equal(np.asarray(model(x)), expected)

    def explanations() -> None:
        for _ in range(10):
            np.testing.assert_array_equal(call(cam, x, "all").maps, reference)

    run_threads([forwards, explanations, explanations])
    assert tf_backend._TAPS == {}
    layer = model.get_layer("features").get_layer("relu4")
    assert "call" not in vars(layer) and isinstance(layer, keras.layers.Layer)
