"""Hypothesis drives the public API with hostile inputs on every backend.

Every case ends in a correct result (finite float32 maps of the right shape, in [0, 1])
or a :class:`~multicam.MulticamError` with a message that says what to do; never an
exception from deep inside a framework, never NaN. Segmentation-mask targets do not exist
yet, so masks of the wrong shape are not fuzzed.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
from conftest import native_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multicam as mc
from multicam import zoo

ARCH = "digits_cnn"
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE_VALUES = [0.0, 1.0, -1.0, 1e30, -1e30, 1e-40, 3e38, np.nan, np.inf, -np.inf, 65504.0]
DTYPES = ["float32", "float64", "float16", "int32", "int64", "uint8", "bool", "complex64", "<U1"]


@functools.cache
def explainer(framework: str, layer: str = "features.relu4") -> mc.GradCAM:
    model = zoo.build(ARCH, framework)
    options: dict[str, Any] = {}
    if framework == "flax":
        model, options["variables"] = model
    return mc.GradCAM(model, zoo.layer_name(layer, framework), **options)


@st.composite
def hostile_inputs(draw: st.DrawFn, framework: str) -> np.ndarray:
    """Batches of the right shape with hostile values or dtypes, or of the wrong shape."""
    if draw(st.booleans()):
        n = draw(st.integers(0, 3))
        shape = native_input(framework, np.zeros((n, 28, 28, 1))).shape
    else:
        rank = draw(st.integers(0, 5))
        shape = tuple(draw(st.lists(st.integers(0, 30), min_size=rank, max_size=rank)))
    base = np.random.default_rng(draw(st.integers(0, 2**16))).random(shape)
    if shape and np.prod(shape) and draw(st.booleans()):
        flat = base.reshape(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(HOSTILE_VALUES))
    if draw(st.booleans()):
        base = base * draw(st.sampled_from([1e-38, 1e-20, 1e20, 1e38]))
    dtype = draw(st.sampled_from(DTYPES))
    with np.errstate(all="ignore"):
        return base.astype(dtype) if dtype != "<U1" else base.astype(str)


hostile_targets = st.one_of(
    st.none(),
    st.just("all"),
    st.sampled_from(["foo", "", "ALL"]),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-2, 12),
    st.lists(st.integers(-1, 11), max_size=5),
    st.lists(st.floats(allow_nan=True), min_size=1, max_size=3),
    st.tuples(st.integers(0, 4), st.integers(0, 3)).map(
        lambda shape: np.random.default_rng(shape[0]).integers(-1, 12, shape)
    ),
    st.sampled_from(
        [
            lambda out: out[:, 0],
            lambda out: out,
            lambda out: out[0, 0],
            lambda out: 3.0,
            lambda out: None,
        ]
    ),
)

hostile_options = st.fixed_dictionaries(
    {},
    optional={
        "size": st.one_of(
            st.none(),
            st.sampled_from(["input", "output", (7, 7), (0, 5), (3,), (3, 3, 3), -2, 0, 5]),
        ),
        "interpolation": st.sampled_from(["bilinear", "nearest", "cubic", "", "trilinear"]),
        "relu": st.sampled_from([True, False, None, "yes", 1]),
        "normalize": st.sampled_from([True, False, 0]),
        "align_corners": st.booleans(),
        "eps": st.sampled_from([1e-8, 0.0, -1.0, np.nan, np.inf, 1e30, "x"]),
    },
)


def check_outcome(run: Any) -> mc.CAMResult | None:
    """Run ``run()``: a sound result, or a multicam error with a helpful message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run()
    except mc.MulticamError as exc:
        message = str(exc)
        assert len(message) > 30, message
        return None
    assert result.maps.dtype == np.float32
    assert np.isfinite(result.maps).all(), "NaN or Inf in the maps"
    assert np.isfinite(result.raw).all()
    assert result.maps.shape[:2] == result.scores.shape
    return result


@SETTINGS
@given(data=st.data())
def test_hostile_inputs_and_targets(framework: str, data: st.DataObject) -> None:
    x = data.draw(hostile_inputs(framework))
    targets = data.draw(hostile_targets)
    cam = explainer(framework)
    result = check_outcome(lambda: cam(x, targets=targets))
    if result is not None:
        assert result.maps.shape[0] == x.shape[0]
        assert result.maps.min() >= 0 and result.maps.max() <= 1


@SETTINGS
@given(data=st.data())
def test_hostile_options(framework: str, data: st.DataObject) -> None:
    x = native_input(framework, zoo.example_input(ARCH, 2, data.draw(st.integers(0, 5))))
    options = data.draw(hostile_options)
    result = check_outcome(lambda: explainer(framework)(x, **options))
    if result is not None and options.get("normalize", True):
        assert result.maps.min() >= 0 and result.maps.max() <= 1


@SETTINGS
@given(
    layer=st.one_of(
        st.sampled_from(
            [
                "features.relu4",
                "features.conv1",
                "features",
                "classifier.dense3",
                "classifier.flatten",
                "classifier",
                "nope",
                "features.relu9",
                "",
                ".",
                "features..relu4",
            ]
        ),
        st.text(max_size=12),
        st.integers(),
        st.none(),
    )
)
def test_hostile_layers(framework: str, layer: Any) -> None:
    x = native_input(framework, zoo.example_input(ARCH, 1))
    name = zoo.layer_name(layer, framework) if isinstance(layer, str) else layer

    def run() -> mc.CAMResult:
        model = zoo.build(ARCH, framework) if framework != "flax" else None
        if framework == "flax":
            module, variables = zoo.build(ARCH, "flax")
            return mc.GradCAM(module, name, variables=variables)(x)
        return mc.GradCAM(model, name)(x)

    result = check_outcome(run)
    if result is not None:
        assert result.maps.shape == (1, 1, 28, 28)
