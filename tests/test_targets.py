"""Parsing and resolving ``targets=``: every form, and every misuse a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from multicam import TargetError, Targets


def test_forms() -> None:
    assert Targets.parse(None, 3).kind == "predicted"
    assert Targets.parse("all", 3).kind == "all"
    assert Targets.parse(lambda out: out[:, 0], 3).kind == "score"
    np.testing.assert_array_equal(Targets.parse(4, 3).classes, [[4], [4], [4]])
    np.testing.assert_array_equal(Targets.parse(np.int64(4), 2).classes, [[4], [4]])
    np.testing.assert_array_equal(Targets.parse([1, 2, 3], 3).classes, [[1], [2], [3]])
    np.testing.assert_array_equal(Targets.parse([[1, 2], [3, 4]], 2).classes, [[1, 2], [3, 4]])


def test_resolution() -> None:
    outputs = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0]])
    assert Targets.parse(None, 2).class_ids(outputs.shape, outputs).tolist() == [[1], [0]]
    assert Targets.parse("all", 2).class_ids(outputs.shape).tolist() == [[0, 1, 2]] * 2
    assert Targets.parse([2, 0], 2).class_ids(outputs.shape).tolist() == [[2], [0]]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([1, 2], "got targets for 2 samples but the batch has 3"),
        ([1, 2, 3, 4], "got targets for 4 samples but the batch has 3"),
        (-1, "negative"),
        ("predicted", "only string accepted is 'all'"),
        (1.5, "integer class ids"),
        (True, "bool"),
        (np.zeros((3, 0), int), "T = 0"),
        (np.zeros((3, 1, 1), int), "expected (N,)"),
        ([[1, 2], [3]], "could not be read"),
    ],
)
def test_misuse_is_a_clear_error(targets: object, message: str) -> None:
    with pytest.raises(TargetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Targets.parse(targets, 3)  # type: ignore[arg-type]


def test_out_of_range_names_the_valid_range() -> None:
    with pytest.raises(TargetError, match=r"class 10 is out of range: the model has 10 outputs"):
        Targets.parse(10, 2).class_ids((2, 10))


def test_non_class_output_suggests_a_callable() -> None:
    with pytest.raises(TargetError, match="callable target"):
        Targets.parse(1, 2).class_ids((2, 3, 8, 8))
