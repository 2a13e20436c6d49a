"""The TensorFlow backend's compiled path: the eager path's numbers, errors and guarantees.

Every call traces its forward, layer capture and backward into one ``tf.function`` per
input signature and number of targets; class ids are a tensor argument, so new classes
never retrace (counted with ``trace_count``). A model that cannot be traced runs eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

with contextlib.suppress(ImportError):
    import torch  # noqa: F401  (torch before TensorFlow in one process)

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import multicam as mc  # noqa: E402
from multicam import zoo  # noqa: E402
from multicam.backends import tensorflow as tf_backend  # noqa: E402
from multicam.errors import InputError, TargetError  # noqa: E402

N = 3
FIELDS = ("activations", "gradients", "scores", "weights", "raw", "maps")


def fresh(arch: str) -> Any:
    """A new Keras zoo model (its own compiled functions, trace count 0)."""
    return zoo.build(arch, "keras", zoo.init_weights(arch, 0))


def layer_of(arch: str) -> str:
    return zoo.layer_name(zoo.ARCHITECTURES[arch].cam_layers[-1], "keras")


def assert_same(compiled: Any, eager: Any, fields: tuple[str, ...] = FIELDS) -> None:
    """Equal up to float32 round-off of a differently scheduled graph (relative 1e-5)."""
    for field in fields:
        got, want = getattr(compiled, field), getattr(eager, field)
        if want is None:
            assert got is None, field
            continue
        scale = max(float(np.abs(want).max()), 1e-30)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=field)


def score_difference(outputs: Any) -> Any:
    return outputs[:, 2] - outputs[:, 0]


@pytest.mark.parametrize("arch", ["digits_cnn", "resnet_tiny"])
def test_compiled_gives_the_eager_numbers_for_every_kind_of_target(arch: str) -> None:
    model = fresh(arch)
    x = zoo.example_input(arch, N, seed=3)
    compiled = mc.GradCAM(model, layer_of(arch))
    eager = mc.GradCAM(model, layer_of(arch), compile=False)
    requests: list[Any] = [None, 2, "all", np.array([[0, 1], [2, 0], [1, 1]]), score_difference]
    for targets in requests:
        want = eager(x, targets=targets, warn=False)
        assert eager.bound.last_path == "eager"
        assert eager.bound.eager_reason == "compile=False"
        if callable(targets):  # a target function compiles from its second use
            compiled(x, targets=targets, warn=False)
            assert compiled.bound.last_path == "eager"
        got = compiled(x, targets=targets, warn=False)
        assert compiled.bound.last_path == "compiled", compiled.bound.eager_reason
        assert_same(got, want)
        if want.targets is None:
            assert got.targets is None
        else:
            np.testing.assert_array_equal(got.targets, want.targets)


def test_new_classes_never_retrace_and_each_signature_traces_once() -> None:
    model = fresh("gap_cnn")
    x = zoo.example_input("gap_cnn", N, seed=1)
    cam = mc.GradCAM(model, layer_of("gap_cnn"))
    rng = np.random.default_rng(0)
    first = cam(x, targets=rng.integers(0, 5, (N, 2)), warn=False)
    assert cam.bound.trace_count == 1
    for _ in range(5):  # other classes, same shapes: the same graph
        other = cam(x, targets=rng.integers(0, 5, (N, 2)), warn=False)
        assert cam.bound.last_path == "compiled"
    assert cam.bound.trace_count == 1
    assert not np.array_equal(other.targets, first.targets)
    cam(x, targets=[1, 2, 3], warn=False)  # T = 1: a new target count
    cam(x, targets=4, warn=False)  # same (N, 1) shape
    assert cam.bound.trace_count == 2
    cam(x[:2], targets=[1, 2], warn=False)  # a new input signature
    cam(x, targets=None, warn=False)  # the predicted class: computed in the graph
    cam(x + 1, targets=None, warn=False)
    assert cam.bound.trace_count == 4
    # A new explainer on the same model reuses the model's compiled functions.
    again = mc.GradCAM(model, layer_of("gap_cnn"))
    again(x, targets=rng.integers(0, 5, (N, 2)), warn=False)
    assert again.bound.trace_count == cam.bound.trace_count == 4


class Branching(keras.Model):
    """A subclassed model with Python control flow on a tensor's value: not traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3, name="conv")
        self.act = keras.layers.ReLU(name="act")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x: Any) -> Any:
        h = self.act(self.conv(x))
        if tf.reduce_sum(h) > 0:  # a Python bool of a tensor: fails while tracing
            h = h * 2.0
        return self.head(self.pool(h))


def test_an_untraceable_model_runs_eagerly_once_found_out(caplog: Any) -> None:
    model = Branching()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 2)).astype(np.float32)
    model(x)
    cam = mc.GradCAM(model, "act")
    with caplog.at_level(logging.DEBUG, logger="multicam.backends.tensorflow"):
        got = cam(x, targets=[0, 2], warn=False)
    assert cam.bound.last_path == "eager"
    assert "could not be traced" in str(cam.bound.eager_reason)
    assert "OperatorNotAllowedInGraphError" in str(cam.bound.eager_reason)
    assert any("ran eager" in r.getMessage() for r in caplog.records)
    assert_same(got, mc.GradCAM(model, "act", compile=False)(x, targets=[0, 2], warn=False))
    traces = cam.bound.trace_count
    cam(x, targets=[1, 1], warn=False)  # not traced again
    assert cam.bound.trace_count == traces and cam.bound.last_path == "eager"


def test_errors_are_the_eager_paths() -> None:
    model = fresh("gap_cnn")
    x = zoo.example_input("gap_cnn", N)
    cam = mc.GradCAM(model, layer_of("gap_cnn"))
    cam(x, targets=1, warn=False)
    traces = cam.bound.trace_count
    with pytest.raises(TargetError, match="class 7 is out of range"):
        cam(x, targets=7, warn=False)  # runs compiled; the ids are checked afterwards
    assert cam.bound.trace_count == traces

    def whole_output(outputs: Any) -> Any:
        return outputs

    with pytest.raises(TargetError, match="one score per sample"):
        cam(x, targets=whole_output, warn=False)  # first use of the function: eager
    with pytest.raises(TargetError, match="one score per sample"):
        cam(x, targets=whole_output, warn=False)  # compiled: its trace fails, then eager
    assert cam.bound.trace_count == traces + 1
    with pytest.raises(InputError, match="expects"):
        cam(x[:, :6], targets=1, warn=False)
    cam(x, targets=2, warn=False)  # none of these made the model eager
    assert cam.bound.last_path == "compiled"


def test_region_targets_and_compile_false_run_eagerly(caplog: Any) -> None:
    model = zoo.build("seg_fcn", "keras", zoo.init_weights("seg_fcn", 0))
    x = zoo.example_input("seg_fcn", 2)
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:7] = True
    cam = mc.GradCAM(model, "features/relu2")
    with caplog.at_level(logging.DEBUG, logger="multicam.backends.tensorflow"):
        cam(x, targets=mc.Region(1, mask), warn=False)
    assert cam.bound.last_path == "eager"
    assert cam.bound.eager_reason == "Region targets run eagerly"
    assert any("Region targets run eagerly" in r.getMessage() for r in caplog.records)
    with pytest.raises(mc.errors.BackendError, match="compile"):
        mc.GradCAM(model, "features/relu2", compile="yes")


def test_guided_backprop_and_forward_passes_are_compiled_alike() -> None:
    model = fresh("digits_cnn")
    x = zoo.example_input("digits_cnn", N, seed=2)
    compiled, eager = mc.GuidedBackprop(model), mc.GuidedBackprop(model, compile=False)
    for targets in (None, np.array([[1, 4], [0, 9], [3, 3]])):
        want = eager(x, targets=targets, warn=False)
        got = compiled(x, targets=targets, warn=False)
        assert compiled.bound.last_path == "compiled"
        assert_same(got, want, ("guided", "scores", "maps"))
        assert got.guided_relus == want.guided_relus > 0
        assert got.unguided_activations == want.unguided_activations
    layer = layer_of("digits_cnn")
    for method in (mc.ScoreCAM, mc.AblationCAM):  # outputs() and outputs_from_layer()
        fast, slow = method(model, layer, batch_size=16), method(model, layer, compile=False)
        assert_same(fast(x, targets=[1, 2, 3], warn=False), slow(x, targets=[1, 2, 3], warn=False))
        assert fast.bound.last_path == "compiled" and slow.bound.last_path == "eager"


def test_model_is_untouched_and_nothing_is_left_installed() -> None:
    model = fresh("resnet_tiny")
    x = zoo.example_input("resnet_tiny", N)
    weights = [w.numpy().copy() for w in model.weights]
    calls = {id(layer): vars(layer).get("call") for layer in model._flatten_layers()}
    cam = mc.GradCAM(model, "block2")
    for targets in (None, "all", [0, 1, 2]):
        cam(x, targets=targets, warn=False)
    mc.GuidedBackprop(model)(x, warn=False)
    mc.AblationCAM(model, "block2")(x, targets=1, warn=False)
    assert tf_backend._TAPS == {} and tf_backend._GUIDED_PATCHES == {}
    assert {id(layer): vars(layer).get("call") for layer in model._flatten_layers()} == calls
    for before, after in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())


def test_threads_tracing_at_once_get_the_serial_answers() -> None:
    model = fresh("digits_cnn")
    layer = layer_of("digits_cnn")
    batches = [zoo.example_input("digits_cnn", 2, seed) for seed in range(4)]
    requests: list[Any] = [None, "all", [3, 4], np.array([[1, 2, 5], [3, 4, 0]])]
    eager = mc.GradCAM(model, layer, compile=False)
    serial = [eager(x, targets=t, warn=False).maps for x, t in zip(batches, requests, strict=True)]
    cam = mc.GradCAM(model, layer)  # nothing traced yet: the threads trace concurrently
    results: list[Any] = [None] * 4
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def job(index: int) -> Callable[[], None]:
        def run() -> None:
            try:
                barrier.wait()
                results[index] = [
                    cam(batches[index], targets=requests[index], warn=False).maps for _ in range(3)
                ]
            except BaseException as exc:  # reported to the main thread
                errors.append(exc)

        return run

    threads = [threading.Thread(target=job(i)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for want, got in zip(serial, results, strict=True):
        for maps in got:
            np.testing.assert_allclose(maps, want, atol=1e-5)
    assert tf_backend._TAPS == {}


def test_a_stateless_scope_runs_eagerly_and_leaves_the_traces_alone() -> None:
    """Variables mapped by a ``keras.StatelessScope`` (the metrics' randomised copies)."""
    model = fresh("gap_cnn")
    x = zoo.example_input("gap_cnn", N)
    cam = mc.GradCAM(model, layer_of("gap_cnn"))
    before = cam(x, targets=1, warn=False)
    kernel = model.get_layer("fc").kernel
    with keras.StatelessScope(state_mapping=[(kernel, -kernel.value)]):
        flipped = cam(x, targets=1, warn=False)
    assert cam.bound.last_path == "eager" and "StatelessScope" in str(cam.bound.eager_reason)
    np.testing.assert_allclose(flipped.raw, -before.raw, rtol=1e-5, atol=1e-7)
    after = cam(x, targets=1, warn=False)  # the compiled graph saw nothing of the scope
    assert cam.bound.last_path == "compiled"
    np.testing.assert_array_equal(after.raw, before.raw)
