"""Turn what a user passes as ``targets=`` into the scores a backend differentiates.

A request is parsed once, before the forward pass (:meth:`Targets.parse`), and resolved into
class ids once the model's output shape, and for ``None`` its values, are known
(:meth:`Targets.class_ids`). Framework-free: backends call it with NumPy arrays or shapes.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import TargetError

__all__ = ["Region", "TargetLike", "Targets", "rest_scores"]


@dataclass(frozen=True, eq=False)
class Region:
    """A segmentation target (Seg-Grad-CAM, Vinogradova et al., arXiv 2002.11434).

    The score is the sum of class ``class_id``'s output over the pixels of ``mask``
    (weighted by the mask's values if it is not boolean), for models whose output is a map
    of class scores, ``(N, C, *S)`` channels-first or ``(N, *S, C)`` channels-last.

    Attributes:
        class_id: the class whose scores are summed.
        mask: ``S`` for the same pixels in every sample, or ``(N, *S)`` per sample.

    Example:
        >>> mask = np.zeros((4, 4), bool); mask[:2, :2] = True
        >>> Region(1, mask).class_id
        1
    """

    class_id: int
    mask: Any


TargetLike = (
    int | Sequence[int] | np.ndarray | str | Callable[[Any], Any] | Region | Sequence[Region] | None
)
"""What ``targets=`` accepts: see :meth:`Targets.parse`."""


@dataclass(frozen=True)
class Targets:
    """A parsed target request for a batch of ``batch_size`` samples.

    Attributes:
        kind: ``"classes"`` (explicit class ids), ``"predicted"`` (arg-max of the output),
            ``"all"`` (every class), ``"score"`` (a user function of the outputs) or
            ``"region"`` (:class:`Region` targets, one per target column).
        batch_size: N, the number of samples in the batch.
        classes: ``(N, T)`` int64 class ids when ``kind == "classes"``, else ``None``.
        score_fn: ``callable(outputs) -> (N,)`` scores when ``kind == "score"``, else ``None``.
        regions: the :class:`Region` of each target column when ``kind == "region"``.
        output: which output of a multi-output model to explain (an index or a key), or
            ``None`` for a model with one output; see :meth:`select_output`.
        score: what the class scores are: ``"output"`` (default), the model's outputs as
            they are; ``"rest"``, the residual-softmax target of ShapleyCAM (Cai 2024),
            ``2 z_c - logsumexp(z)`` over the ``(N, C)`` outputs ``z`` (the logit minus
            the cross-entropy of class c), which backends compute from the outputs before
            picking the classes (:func:`rest_scores` is the NumPy reference).
    """

    kind: Literal["classes", "predicted", "all", "score", "region"]
    batch_size: int
    classes: np.ndarray | None = None
    score_fn: Callable[[Any], Any] | None = None
    regions: tuple[Region, ...] = ()
    output: int | str | None = None
    score: Literal["output", "rest"] = "output"

    def __post_init__(self) -> None:
        if self.score not in ("output", "rest"):
            raise TargetError(f"score={self.score!r}: expected 'output' or 'rest'.")
        if self.score == "rest" and self.kind in ("score", "region"):
            raise TargetError(
                "score='rest' is computed from (N, C) class scores; it applies to class "
                "targets (None, ints, 'all'), not to "
                f"{'a callable target' if self.kind == 'score' else 'Region targets'}."
            )

    @classmethod
    def parse(
        cls, targets: TargetLike, batch_size: int, output: int | str | None = None
    ) -> Targets:
        """Parse ``targets`` for a batch of ``batch_size`` samples.

        Args:
            targets: ``None`` for the predicted class; an ``int`` for one class for every
                sample; a sequence of N ints for one class per sample; an ``(N, T)`` array
                for T classes per sample; ``"all"`` for every class; or a callable taking
                the model's outputs (framework tensors) and returning one differentiable
                score per sample, shape ``(N,)``; or a :class:`Region` (a list of them for
                several target columns) for segmentation outputs.
            batch_size: N.
            output: for models with several outputs, the index or key of the one to
                explain.

        Raises:
            TargetError: the request does not fit the batch, e.g. a list of 3 classes for a
                batch of 4 (never truncated or broadcast silently).

        Example:
            >>> Targets.parse([3, 5], batch_size=2).classes.tolist()
            [[3], [5]]
        """
        parsed = cls._parse(targets, batch_size)
        return parsed if output is None else dataclasses.replace(parsed, output=output)

    @classmethod
    def _parse(cls, targets: TargetLike, batch_size: int) -> Targets:
        if isinstance(targets, Region) or (
            isinstance(targets, list | tuple)
            and targets
            and all(isinstance(t, Region) for t in targets)
        ):
            regions = (targets,) if isinstance(targets, Region) else tuple(targets)
            for region in regions:
                if isinstance(region.class_id, bool) or not isinstance(
                    region.class_id, numbers.Integral
                ):
                    raise TargetError(f"Region class_id must be an int, got {region.class_id!r}.")
                _check_non_negative(np.array([[region.class_id]]))
            return cls("region", batch_size, regions=regions)
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
        if self.kind == "region":
            ids = np.array([[region.class_id for region in self.regions]], dtype=np.int64)
            return np.repeat(ids, self.batch_size, axis=0)
        if len(output_shape) != 2:
            raise TargetError(
                f"the model's output has shape {output_shape}, but class targets need "
                "(N, C) class scores. For a segmentation output pass mc.Region(class_id, "
                "mask); otherwise a callable target that reduces the output to one score per "
                "sample, e.g. targets=lambda out: out[:, 3].sum(axis=(1, 2))."
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

    def output_weights(self, output_shape: Sequence[int], class_axis: int) -> np.ndarray:
        """The weights ``W`` with ``score[n, t] = sum(outputs[n] * W[n, t])`` for regions.

        Args:
            output_shape: the model's output shape, ``(N, C, *S)`` or ``(N, *S, C)``.
            class_axis: 1 for channels-first outputs, -1 for channels-last.

        Returns:
            ``(N, T, *output_shape[1:])`` float32: each region's mask on its class channel.

        Raises:
            TargetError: a mask does not fit the output's spatial shape (both are named),
                or a class id is out of range.
        """
        output_shape = tuple(int(d) for d in output_shape)
        if len(output_shape) < 3:
            raise TargetError(
                f"mc.Region needs an output map (N, C, *spatial) or (N, *spatial, C); the "
                f"model's output has shape {output_shape}. Use class targets instead."
            )
        n = output_shape[0]
        axis = class_axis % len(output_shape)
        spatial = output_shape[1:axis] + output_shape[axis + 1 :]
        num_classes = output_shape[axis]
        weights = np.zeros((n, len(self.regions), *output_shape[1:]), np.float32)
        for t, region in enumerate(self.regions):
            if region.class_id >= num_classes:
                raise TargetError(
                    f"Region class {region.class_id} is out of range: the output has "
                    f"{num_classes} classes along axis {axis} (shape {output_shape})."
                )
            mask = np.asarray(region.mask, dtype=np.float32)
            if mask.shape not in (spatial, (n, *spatial)):
                raise TargetError(
                    f"the Region mask has shape {mask.shape}, but the model's output "
                    f"{output_shape} has spatial shape {spatial}: pass a mask of shape "
                    f"{spatial} (all samples) or {(n, *spatial)} (one per sample)."
                )
            mask = np.broadcast_to(mask, (n, *spatial))
            # Put the mask on the class channel: index the class axis of W[:, t].
            index: list[Any] = [slice(None)] * len(output_shape)
            index[axis] = region.class_id
            weights[:, t][tuple(index)] = mask
        return weights

    def select_output(self, outputs: Any) -> Any:
        """The one output to explain, from a model that may return several.

        See :func:`select_output`; the choice is this request's ``output``.
        """
        return select_output(outputs, self.output)


def rest_scores(outputs: np.ndarray) -> np.ndarray:
    """``(N, C)`` residual-softmax scores ``2 z - logsumexp(z)`` of ``(N, C)`` outputs ``z``.

    The NumPy reference of ``Targets.score == "rest"``; its ranking of the classes is the
    outputs' own (``rest_c - rest_j = 2 (z_c - z_j)``), so the predicted class is the same.
    """
    z = np.asarray(outputs, dtype=np.float64)
    if z.ndim != 2:
        raise TargetError(
            f"score='rest' needs (N, C) class scores; the model's output has shape {z.shape}."
        )
    top = z.max(axis=1, keepdims=True)
    logsumexp = top + np.log(np.exp(z - top).sum(axis=1, keepdims=True))
    return (2 * z - logsumexp).astype(np.float32)


def select_output(outputs: Any, output: int | str | None) -> Any:
    """The one output to explain, from a model that may return several.

    Args:
        outputs: what the model returned: a tensor, or a tuple, list or dict of them (a
            Hugging Face ``ModelOutput`` is a dict).
        output: the index or key of the one to explain; ``None`` when there is one.

    Raises:
        TargetError: several outputs and no ``output=`` choice, or a choice that does not
            exist (the message lists what does).
    """
    several = isinstance(outputs, list | tuple | dict)
    if not several:
        if output not in (None, 0):
            raise TargetError(
                f"output={output!r} was given, but the model returns a single output; drop output=."
            )
        return outputs
    keys = list(outputs) if isinstance(outputs, dict) else list(range(len(outputs)))
    if output is None:
        if len(keys) == 1:
            return outputs[keys[0]]
        raise TargetError(
            f"the model returns {len(keys)} outputs ({type(outputs).__name__} with keys "
            f"{keys}); choose the one to explain with output=<key>, e.g. "
            f"mc.GradCAM(model, layer, output={keys[0]!r})."
        )
    if output not in keys:
        raise TargetError(f"output={output!r} is not one of the model's outputs: {keys}.")
    return outputs[output]


def _check_non_negative(classes: np.ndarray) -> np.ndarray:
    if (classes < 0).any():
        raise TargetError(
            f"target class {int(classes.min())} is negative; class ids start at 0 "
            "(negative indices are not counted from the end)."
        )
    return classes
