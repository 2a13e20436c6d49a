"""Turn what a user passes as ``targets=`` into the scores a backend differentiates.

A request is parsed once, before the forward pass (:meth:`Targets.parse`), and resolved into
class ids once the model's output shape, and for ``None`` its values, are known
(:meth:`Targets.class_ids`). Framework-free: backends call it with NumPy arrays or shapes.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import TargetError

__all__ = ["TargetLike", "Targets"]

TargetLike = int | Sequence[int] | np.ndarray | str | Callable[[Any], Any] | None
"""What ``targets=`` accepts: see :meth:`Targets.parse`."""


@dataclass(frozen=True)
class Targets:
    """A parsed target request for a batch of ``batch_size`` samples.

    Attributes:
        kind: ``"classes"`` (explicit class ids), ``"predicted"`` (arg-max of the output),
            ``"all"`` (every class) or ``"score"`` (a user function of the outputs).
        batch_size: N, the number of samples in the batch.
        classes: ``(N, T)`` int64 class ids when ``kind == "classes"``, else ``None``.
        score_fn: ``callable(outputs) -> (N,)`` scores when ``kind == "score"``, else ``None``.
    """

    kind: Literal["classes", "predicted", "all", "score"]
    batch_size: int
    classes: np.ndarray | None = None
    score_fn: Callable[[Any], Any] | None = None

    @classmethod
    def parse(cls, targets: TargetLike, batch_size: int) -> Targets:
        """Parse ``targets`` for a batch of ``batch_size`` samples.

        Args:
            targets: ``None`` for the predicted class; an ``int`` for one class for every
                sample; a sequence of N ints for one class per sample; an ``(N, T)`` array
                for T classes per sample; ``"all"`` for every class; or a callable taking
                the model's outputs (framework tensors) and returning one differentiable
                score per sample, shape ``(N,)``.
            batch_size: N.

        Raises:
            TargetError: the request does not fit the batch, e.g. a list of 3 classes for a
                batch of 4 (never truncated or broadcast silently).

        Example:
            >>> Targets.parse([3, 5], batch_size=2).classes.tolist()
            [[3], [5]]
        """
        if targets is None:
            return cls("predicted", batch_size)
        if isinstance(targets, str):
            if targets == "all":
                return cls("all", batch_size)
            raise TargetError(
                f"targets={targets!r} is not understood; the only string accepted is 'all'. "
                "Pass None for the predicted class, an int, a list of one int per sample, "
                "an (N, T) array of class ids, or a callable(outputs) -> (N,) scores."
            )
        if callable(targets) and not isinstance(targets, np.ndarray):
            return cls("score", batch_size, score_fn=targets)
        if isinstance(targets, bool | np.bool_):
            raise TargetError(f"targets={targets!r} is a bool; pass a class index (int).")
        if isinstance(targets, numbers.Integral):
            if not -(2**63) <= int(targets) < 2**63:
                raise TargetError(f"target class {int(targets)} is out of range.")
            classes = np.full((batch_size, 1), int(targets), dtype=np.int64)
            return cls("classes", batch_size, classes=_check_non_negative(classes))
        try:
            array = np.asarray(targets)
        except (TypeError, ValueError) as exc:  # ragged nested lists
            raise TargetError(
                "targets could not be read as an array of class ids; for several classes "
                "per sample pass an (N, T) array with the same T for every sample."
            ) from exc
        if array.dtype == object or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
            raise TargetError(
                f"targets must hold integer class ids, got dtype {array.dtype}. "
                "Convert with np.asarray(targets, dtype=int) if the values are whole numbers."
            )
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim != 2:
            raise TargetError(
                f"targets has shape {array.shape}; expected (N,) with one class per sample "
                f"or (N, T) with T classes per sample, with N = {batch_size}."
            )
        if array.shape[0] != batch_size:
            raise TargetError(
                f"got targets for {array.shape[0]} samples but the batch has {batch_size}; "
                "pass one entry per sample (targets are never truncated or repeated), "
                "or a single int for the same class on every sample."
            )
        if array.shape[1] == 0:
            raise TargetError("targets has T = 0 classes per sample; ask for at least one.")
        return cls("classes", batch_size, classes=_check_non_negative(array.astype(np.int64)))

    def class_ids(
        self, output_shape: Sequence[int], outputs: np.ndarray | None = None
    ) -> np.ndarray:
        """Resolve the request into class ids for a model whose output has ``output_shape``.

        Args:
            output_shape: shape of the model's output, ``(N, C)`` for class scores.
            outputs: the output values, needed only when ``kind == "predicted"``.

        Returns:
            ``(N, T)`` int64 class ids, each in ``[0, C)``.

        Raises:
            TargetError: the output is not ``(N, C)``, or a class id is out of range.
        """
        if self.kind == "score":
            raise TargetError("a callable target has no class ids")
        output_shape = tuple(int(d) for d in output_shape)
        if len(output_shape) != 2:
            raise TargetError(
                f"the model's output has shape {output_shape}, but class targets need "
                "(N, C) class scores. Pass a callable target that reduces the output to one "
                "score per sample, e.g. targets=lambda out: out[:, 3].sum(axis=(1, 2))."
            )
        num_classes = output_shape[1]
        if self.kind == "predicted":
            if outputs is None:
                raise TargetError("the predicted class needs the output values")
            return np.argmax(np.asarray(outputs), axis=1).astype(np.int64)[:, None]
        if self.kind == "all":
            return np.tile(np.arange(num_classes, dtype=np.int64), (self.batch_size, 1))
        assert self.classes is not None
        too_big = self.classes >= num_classes
        if too_big.any():
            bad = int(self.classes[too_big].max())
            raise TargetError(
                f"target class {bad} is out of range: the model has {num_classes} outputs, "
                f"so class ids run from 0 to {num_classes - 1}."
            )
        return self.classes


def _check_non_negative(classes: np.ndarray) -> np.ndarray:
    if (classes < 0).any():
        raise TargetError(
            f"target class {int(classes.min())} is negative; class ids start at 0 "
            "(negative indices are not counted from the end)."
        )
    return classes
