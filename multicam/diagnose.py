"""Why is my Grad-CAM blank? Findings about a result, each with the numbers behind it.

:func:`diagnose` reads a :class:`~multicam.cam.CAMResult` (NumPy only, no framework) and
reports, per sample and target, whether the ReLU'd map is blank and why: the signed range
of the raw map and its negative share, the signs of the channel weights and the channels
that contribute most (``raw = sum_k alpha_k A_k`` decomposed), what the map is without the
ReLU; and per batch: softmax outputs, saturated probabilities, a layer too coarse to
localise, dead activations or gradients, signed (pre-ReLU) activations. Every finding
carries its measurements and a suggestion tied to them; none is printed without its number.

Example:
    >>> res = mc.GradCAM(model, "features.relu4")(x, targets="all")  # doctest: +SKIP
    >>> print(res.diagnose())  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from .errors import MulticamWarning, TrainingModeWarning

if TYPE_CHECKING:
    from .cam import CAMResult

__all__ = [
    "BlankMapWarning",
    "Diagnosis",
    "Finding",
    "MapReport",
    "blank_maps",
    "diagnose",
    "warn_training",
]

Severity = Literal["blank", "warning", "info"]

#: A map whose positive part is at most this fraction of its largest |value| is "nearly
#: blank": after min-max normalisation what is left is dominated by round-off.
NEARLY_BLANK = 1e-2
#: Outputs whose rows lie in [0, 1] and sum to 1 within this are taken as probabilities.
SOFTMAX_TOL = 1e-3
#: A target probability at or above this (or at or below 1 - this) is saturated: its
#: slope p(1 - p) through the softmax or sigmoid is at most about 0.01.
SATURATED = 0.99
_FLAT_SLOPE = SATURATED * (1 - SATURATED)


class BlankMapWarning(MulticamWarning):
    """Some maps are blank after the ReLU; ``result.diagnose()`` explains why."""


@dataclass(frozen=True)
class Finding:
    """One measured observation about a result.

    Attributes:
        code: a stable identifier: ``blank``, ``nearly_blank``, ``mostly_negative``,
            ``softmax_outputs``, ``sigmoid_outputs``, ``saturated``, ``one_cell_layer``,
            ``coarse_layer``, ``dead_activations``, ``zero_gradients``,
            ``class_token_only``, ``signed_activations``, ``training_mode``,
            ``layout_guessed``, ``non_finite``.
        severity: ``"blank"`` (the map shows nothing), ``"warning"`` or ``"info"``.
        message: what was measured, with its numbers.
        suggestion: what to do about it.
        measured: the numbers themselves.
        sample: the sample index, or ``None`` for the whole batch.
        target: the target index t (column of ``res.maps``), or ``None``.
    """

    code: str
    severity: Severity
    message: str
    suggestion: str
    measured: dict[str, float] = field(default_factory=dict)
    sample: int | None = None
    target: int | None = None


@dataclass(frozen=True)
class MapReport:
    """Numbers about one map (one sample, one target).

    Attributes:
        sample: n.
        target: t.
        class_id: the class, or ``None`` for a callable target.
        score: the differentiated score.
        raw_min: smallest value of the signed map.
        raw_max: largest value of the signed map.
        negative_share: fraction of the signed map's values below zero.
        positive_weights: number of channels with a positive weight.
        negative_weights: number of channels with a negative weight.
        contributions: ``(K,)`` mean contribution of each channel, ``alpha_k mean(A_k)``;
            they sum to the mean of the signed map.
        blank: nothing is left after the ReLU (see :func:`blank_maps`).
    """

    sample: int
    target: int
    class_id: int | None
    score: float
    raw_min: float
    raw_max: float
    negative_share: float
    positive_weights: int
    negative_weights: int
    contributions: np.ndarray
    blank: bool


@dataclass(frozen=True)
class Diagnosis:
    """Findings about a result; ``print()`` it for a report.

    Attributes:
        layer: the explained layer.
        backend: the backend that computed it.
        layer_shape: the layer's spatial shape.
        maps: a :class:`MapReport` per (sample, target), row-major.
        findings: every :class:`Finding`, batch-level first.
    """

    layer: str
    backend: str
    layer_shape: tuple[int, ...]
    maps: list[MapReport]
    findings: list[Finding]

    @property
    def blank(self) -> np.ndarray:
        """``(N, T)`` bool: which maps are blank after the ReLU."""
        n = max(m.sample for m in self.maps) + 1
        return np.array([m.blank for m in self.maps]).reshape(n, -1)

    def codes(self, sample: int | None = None, target: int | None = None) -> set[str]:
        """The finding codes for one map (plus batch-level ones), or for all maps."""
        return {
            f.code
            for f in self.findings
            if sample is None
            or (f.sample in (None, sample) and (target is None or f.target in (None, target)))
        }

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.findings)

    def __str__(self) -> str:
        n_blank = sum(m.blank for m in self.maps)
        shape = "x".join(str(s) for s in self.layer_shape)
        lines = [
            f"Grad-CAM diagnosis: layer {self.layer!r} ({self.backend}), "
            f"{len(self.maps)} map{'s' if len(self.maps) != 1 else ''}, layer resolution {shape}",
            f"  blank after ReLU: {n_blank} of {len(self.maps)} maps",
        ]
        for finding in self.findings:
            if finding.sample is None:
                lines += _format(finding, "batch")
        for report in self.maps:
            own = [
                f for f in self.findings if f.sample == report.sample and f.target == report.target
            ]
            if not own:
                continue
            what = f"class {report.class_id}" if report.class_id is not None else "target"
            lines.append(
                f"sample {report.sample}, {what} (target column {report.target}, "
                f"score {report.score:.4g}):"
            )
            for finding in own:
                lines += _format(finding, None)
        if len(lines) == 2:
            lines.append("  nothing unusual: every map has positive evidence")
        return "\n".join(lines)


def _format(finding: Finding, scope: str | None) -> list[str]:
    label = {"blank": "BLANK", "warning": "WARNING", "info": "note"}[finding.severity]
    head = f"  [{scope}] " if scope else "  "
    return [f"{head}{label}: {finding.message}", f"{' ' * len(head)}-> {finding.suggestion}"]


def blank_maps(raw: np.ndarray) -> np.ndarray:
    """``(N, T)`` bool: maps with no positive value, so blank after the ReLU.

    Args:
        raw: ``(N, T, *S)`` signed maps.
    """
    return raw.reshape(*raw.shape[:2], -1).max(axis=-1) <= 0


def warn_if_blank(result: CAMResult, stacklevel: int = 3) -> None:
    """Warn with :class:`BlankMapWarning` when some maps are blank after the ReLU."""
    blank = blank_maps(result.raw)
    if not blank.any():
        return
    n, t = np.argwhere(blank)[0]
    what = f"class {result.targets[n, t]}" if result.targets is not None else "the target"
    warnings.warn(
        f"{int(blank.sum())} of {blank.size} Grad-CAM maps are blank after the ReLU (first: "
        f"sample {n}, {what}: the signed map lies in [{result.raw[n, t].min():.3g}, "
        f"{result.raw[n, t].max():.3g}]). print(result.diagnose()) tells why; pass "
        "warn=False to silence.",
        BlankMapWarning,
        stacklevel=stacklevel,
    )


#: How to leave training mode, per backend, for messages.
_EVAL_HINT = {
    "torch": "call model.eval() before explaining",
    "jax": "call model.eval() on an nnx module, or pass apply_kwargs={'train': False} "
    "(or your module's flag) for a linen one",
    "tensorflow": "nothing to do: Keras models are always called with training=False",
}


def warn_training(training: tuple[str, ...], backend: str, stacklevel: int = 3) -> None:
    """Warn (:class:`~multicam.errors.TrainingModeWarning`) about parts left in training mode.

    multicam explained them in inference mode; the warning says so and how to silence it.
    """
    if not training:
        return
    shown = ", ".join(training[:4]) + (
        f" and {len(training) - 4} more" if len(training) > 4 else ""
    )
    warnings.warn(
        f"the model was left in training mode ({shown}); multicam explained it in inference "
        "mode, as it predicts, and left its mode as it was. "
        f"{_EVAL_HINT.get(backend, 'switch the model to inference mode').capitalize()} "
        "to silence this warning (or pass warn=False).",
        TrainingModeWarning,
        stacklevel=stacklevel,
    )


def diagnose(result: CAMResult) -> Diagnosis:
    """Measure a result and explain it: see the module docstring.

    Args:
        result: a :class:`~multicam.cam.CAMResult`.

    Returns:
        A :class:`Diagnosis`.
    """
    raw = result.raw.astype(np.float64)
    n, t = raw.shape[:2]
    layer_shape = tuple(int(s) for s in raw.shape[2:])
    activations = result.activations.astype(np.float64)
    flat_activations = activations.reshape(n, activations.shape[1], -1)
    mean_activation = flat_activations.mean(axis=-1)  # (N, K)
    contributions = result.weights.astype(np.float64) * mean_activation[:, None, :]  # (N, T, K)
    flat_raw = raw.reshape(n, t, -1)
    blank = blank_maps(result.raw)

    findings: list[Finding] = []
    findings += _batch_findings(result, layer_shape, flat_activations)
    reports = []
    for i in range(n):
        for j in range(t):
            class_id = None if result.targets is None else int(result.targets[i, j])
            report = MapReport(
                sample=i,
                target=j,
                class_id=class_id,
                score=float(result.scores[i, j]),
                raw_min=float(flat_raw[i, j].min()),
                raw_max=float(flat_raw[i, j].max()),
                negative_share=float((flat_raw[i, j] < 0).mean()),
                positive_weights=int((result.weights[i, j] > 0).sum()),
                negative_weights=int((result.weights[i, j] < 0).sum()),
                contributions=contributions[i, j],
                blank=bool(blank[i, j]),
            )
            reports.append(report)
            findings += _map_findings(result, report, flat_activations[i])
    return Diagnosis(result.layer, result.backend, layer_shape, reports, findings)


def _batch_findings(
    result: CAMResult, layer_shape: tuple[int, ...], flat_activations: np.ndarray
) -> list[Finding]:
    findings: list[Finding] = []
    cells = int(np.prod(layer_shape))
    if cells == 1:
        findings.append(
            Finding(
                "one_cell_layer",
                "blank",
                f"the layer's output is {'x'.join(map(str, layer_shape))}: one value per "
                "channel, so every map is a single number and cannot localise anything",
                "choose an earlier layer that still has spatial extent (the last "
                "convolutional block before global pooling is the usual choice)",
                {"cells": 1.0},
            )
        )
    elif max(layer_shape) <= 3:
        output = result.maps.shape[2:]
        findings.append(
            Finding(
                "coarse_layer",
                "warning",
                f"the layer is only {'x'.join(map(str, layer_shape))}; upsampled to "
                f"{'x'.join(map(str, output))} each cell covers about "
                f"{'x'.join(str(round(o / s)) for o, s in zip(output, layer_shape, strict=True))}"
                " output pixels",
                "for finer maps choose an earlier layer with more cells",
                {"cells": float(cells)},
            )
        )
    negative = (flat_activations < 0).mean()
    if negative > 0:
        findings.append(
            Finding(
                "signed_activations",
                "info",
                f"{100 * negative:.0f}% of the layer's activations are negative (min "
                f"{flat_activations.min():.3g}): it is not the output of a ReLU, so a "
                "negative activation with a positive weight counts as evidence against",
                "Grad-CAM assumes non-negative activations: choose the output of the "
                "block's ReLU (e.g. the block itself rather than its last conv or norm)",
                {"negative_share": float(negative), "min": float(flat_activations.min())},
            )
        )
    if result.training:
        findings.append(
            Finding(
                "training_mode",
                "info",
                f"{len(result.training)} part{'s' if len(result.training) != 1 else ''} of the "
                f"model {'were' if len(result.training) != 1 else 'was'} left in training mode "
                f"({', '.join(result.training[:6])}"
                f"{', ...' if len(result.training) > 6 else ''}); multicam ran them in "
                "inference mode for this explanation (dropout off, batch statistics from the "
                "running averages) and left the model's mode as it was",
                _EVAL_HINT.get(result.backend, "switch the model to inference mode")
                + ", so that the model you evaluate is the one explained",
                {"modules": float(len(result.training))},
            )
        )
    if result.layer_layout != _native_layout(result.backend):
        findings.append(
            Finding(
                "layout_guessed",
                "info",
                f"the layer's output was read {result.layer_layout.replace('_', '-')}, not in "
                f"the {result.backend} layout, so its channels are its last axis",
                "if that is wrong, pass layer_layout= to the explainer",
            )
        )
    findings += _probability_findings(result)
    return findings


def _native_layout(backend: str) -> str:
    return "channels_first" if backend == "torch" else "channels_last"


def _probability_axis(outputs: np.ndarray) -> int | None:
    """The class axis along which ``outputs`` are softmax probabilities, if any."""
    if outputs.ndim < 2 or outputs.min() < 0 or outputs.max() > 1:
        return None
    for axis in dict.fromkeys((1, outputs.ndim - 1)):
        if outputs.shape[axis] > 1:
            deviation = np.abs(outputs.sum(axis=axis, dtype=np.float64) - 1).max()
            if deviation <= SOFTMAX_TOL:
                return axis
    return None


def _probability_findings(result: CAMResult) -> list[Finding]:
    """Softmax or sigmoid outputs, over any class axis, and their saturated targets."""
    outputs = result.outputs
    if outputs is None or outputs.ndim < 2 or outputs.size == 0:
        return []
    axis = _probability_axis(outputs)
    where = "" if outputs.ndim == 2 else f" at every position (class axis {axis})"
    if axis is not None:
        deviation = float(np.abs(outputs.sum(axis=axis, dtype=np.float64) - 1).max())
        kind = "softmax"
        finding = Finding(
            "softmax_outputs",
            "warning",
            f"the outputs {outputs.shape} lie in [0, 1] and sum to 1 over axis {axis}{where} "
            f"(largest deviation {deviation:.1g}): the model ends in a softmax, so the "
            "differentiated scores are probabilities, whose gradients are scaled by p(1 - p) "
            "and mix in every other class",
            "explain the logits instead: remove the final softmax (torch: drop the last "
            "module; Keras: rebuild with activation=None on the last layer) and explain "
            "that model, or differentiate the centred log-probability (see the README)",
            {"sum_deviation": deviation},
        )
    elif outputs.min() >= 0 and outputs.max() <= 1 and _looks_sigmoid(outputs):
        kind = "sigmoid"
        axis = 1 if _native_layout(result.backend) == "channels_first" else outputs.ndim - 1
        finding = Finding(
            "sigmoid_outputs",
            "warning",
            f"every output lies in [0, 1] (shape {outputs.shape}, range "
            f"[{outputs.min():.3g}, {outputs.max():.3g}]) without summing to 1: the model "
            "probably ends in a sigmoid, whose gradient is scaled by p(1 - p)",
            "explain the pre-sigmoid logits: remove the final sigmoid, or differentiate "
            "log(p / (1 - p)), the logit, with a callable target",
            {"min": float(outputs.min()), "max": float(outputs.max())},
        )
    else:
        return []
    return [finding, *_saturation(result, outputs, axis, kind)]


def _looks_sigmoid(outputs: np.ndarray) -> bool:
    """Outputs in [0, 1] of which at least 10% crowd its ends (p < 0.05 or p > 0.95).

    Logits happen to lie in [0, 1] now and then (a randomly initialised head); sigmoids
    of a trained model's logits pile up at 0 and 1. Only the latter is reported.
    """
    near_ends = (outputs < 0.05) | (outputs > 0.95)
    return bool(outputs.size > 1 and outputs.max() > outputs.min() and near_ends.mean() >= 0.1)


def _saturation(
    result: CAMResult, probabilities: np.ndarray, axis: int, kind: str
) -> list[Finding]:
    """Targets whose probability is saturated: class ids, regions, or (batch) callables."""
    findings = []
    request = result.request
    if request is not None and request.kind == "region":
        weights = request.output_weights(probabilities.shape, axis)  # (N, T, *out)
        n, t = weights.shape[:2]
        flat_w = weights.reshape(n, t, -1)
        flat_p = np.broadcast_to(probabilities[:, None], weights.shape).reshape(n, t, -1)
        for i in range(n):
            for j in range(t):
                inside = flat_w[i, j] > 0
                if not inside.any():
                    continue
                p = flat_p[i, j][inside]
                saturated = float((p * (1 - p) <= _FLAT_SLOPE).mean())
                slope = float((p * (1 - p)).mean())
                if saturated >= 0.5:
                    findings.append(
                        Finding(
                            "saturated",
                            "warning",
                            f"the region's class has probability >= {SATURATED} or <= "
                            f"{1 - SATURATED:.2g} at {100 * saturated:.0f}% of its "
                            f"{int(inside.sum())} positions "
                            f"(mean p(1 - p) = {slope:.2g}): through the {kind} the region's "
                            "score barely moves with the layer, so its gradients are tiny "
                            "and dominated by the other classes",
                            f"explain the logits (pre-{kind} output maps) of the region",
                            {"saturated_share": saturated, "slope": slope},
                            i,
                            j,
                        )
                    )
        return findings
    if result.targets is None or (request is not None and request.kind == "score"):
        top = probabilities.max(axis=axis) if kind == "softmax" else probabilities
        share = float((top >= SATURATED).mean())
        if share >= 0.5:
            findings.append(
                Finding(
                    "saturated",
                    "warning",
                    f"{100 * share:.0f}% of the {kind} outputs' "
                    f"{'top probabilities' if kind == 'softmax' else 'values'} are >= "
                    f"{SATURATED}: a score built on them has gradients scaled by p(1 - p)",
                    f"build the target function on the logits (pre-{kind}), or on "
                    "log-probabilities",
                    {"saturated_share": share},
                )
            )
        return findings
    if probabilities.ndim != 2:
        return findings
    chosen = np.take_along_axis(probabilities, result.targets, axis=1)
    for i, j in np.argwhere(chosen * (1 - chosen) <= _FLAT_SLOPE):
        p = float(chosen[i, j])
        slope = p * (1 - p)
        findings.append(
            Finding(
                "saturated",
                "warning",
                f"class {result.targets[i, j]} has probability {p:.6f}: its gradient "
                f"through the {kind} is at most p(1 - p) = {slope:.2g} per unit of logit, "
                f"so the gradients at the layer are tiny (largest "
                f"{np.abs(result.gradients[i, j]).max():.2g}) and dominated by the other "
                "classes",
                f"explain the logit (pre-{kind} score) of the class, not its probability",
                {"probability": p, "slope": slope},
                int(i),
                int(j),
            )
        )
    return findings


def _map_findings(
    result: CAMResult, report: MapReport, flat_activations: np.ndarray
) -> list[Finding]:
    i, j = report.sample, report.target
    findings: list[Finding] = []
    what = f"class {report.class_id}" if report.class_id is not None else "the target"
    if not flat_activations.any():
        findings.append(
            Finding(
                "dead_activations",
                "blank",
                f"all {flat_activations.size} activations of the layer are 0 for this "
                "sample: there is nothing for the weights to select",
                "the units of this layer are all off for this input: check the input's "
                "scale and preprocessing, or choose an earlier layer",
                {"activations": float(flat_activations.size)},
                i,
                j,
            )
        )
        return findings
    gradients = result.gradients[i, j]
    dropped = result.dropped_token_gradients
    if not gradients.any() and dropped is not None and dropped[i, j] > 0:
        findings.append(
            Finding(
                "class_token_only",
                "blank",
                f"all {gradients.size} gradients of {what} on this block's patch tokens are "
                f"0, while its dropped prefix (class) token gets gradient up to "
                f"{dropped[i, j]:.3g}: the head reads only the class token, and after this "
                "block no attention mixes the patch tokens into it, so they cannot change "
                "the score",
                "explain an earlier block (e.g. the one before the last, or the last block's "
                "first norm), whose patch tokens still feed the class token through attention",
                {"gradients": float(gradients.size), "prefix_gradient": float(dropped[i, j])},
                i,
                j,
            )
        )
        return findings
    if not gradients.any():
        findings.append(
            Finding(
                "zero_gradients",
                "blank",
                f"all {gradients.size} gradients of {what} at this layer are 0: its score "
                "does not change with the layer's output for this sample",
                "a ReLU or clamp between the layer and the output is off along every path "
                "for this class, or the target ignores the layer: choose a layer closer "
                "to the output, or another target",
                {"gradients": float(gradients.size)},
                i,
                j,
            )
        )
        return findings
    measured = {
        "raw_min": report.raw_min,
        "raw_max": report.raw_max,
        "negative_share": report.negative_share,
        "positive_weights": float(report.positive_weights),
        "negative_weights": float(report.negative_weights),
    }
    scale = max(abs(report.raw_min), abs(report.raw_max))
    decomposition = _decomposition(report)
    if report.blank:
        findings.append(
            Finding(
                "blank",
                "blank",
                f"every value of the signed map is <= 0 (range [{report.raw_min:.3g}, "
                f"{report.raw_max:.3g}], {100 * report.negative_share:.0f}% negative), so "
                f"the ReLU leaves nothing; {decomposition}",
                f"the layer holds only evidence against {what} under Grad-CAM's mean-"
                "gradient weights: look at the signed map (relu=False) to see where that "
                "evidence lies, try another layer (the evidence for a class often shows at an "
                "earlier one), or a method that weighs gradients per position",
                measured,
                i,
                j,
            )
        )
    elif report.raw_max <= NEARLY_BLANK * scale:
        findings.append(
            Finding(
                "nearly_blank",
                "warning",
                f"the positive part of the signed map is at most {report.raw_max:.3g}, "
                f"{100 * report.raw_max / scale:.2g}% of its largest |value| {scale:.3g}; "
                f"after normalisation the map shows a sliver; {decomposition}",
                "read the signed map (relu=False) or res.raw: most evidence here is "
                "against the class",
                measured,
                i,
                j,
            )
        )
    elif report.negative_share >= 0.9:
        findings.append(
            Finding(
                "mostly_negative",
                "info",
                f"{100 * report.negative_share:.0f}% of the signed map is negative "
                f"(range [{report.raw_min:.3g}, {report.raw_max:.3g}]); the ReLU'd map "
                "shows only the remaining positive cells",
                "compare with the signed map (relu=False) before trusting the highlight",
                measured,
                i,
                j,
            )
        )
    return findings


def _decomposition(report: MapReport) -> str:
    """The channel-weight signs and the largest mean contributions, as a clause."""
    contributions = report.contributions
    order = np.argsort(contributions)
    negative = [int(k) for k in order[:3] if contributions[k] < 0]
    positive = [int(k) for k in order[::-1][:3] if contributions[k] > 0]
    parts = [
        f"{report.positive_weights} channel weights are positive and "
        f"{report.negative_weights} negative; the mean contributions sum to "
        f"{contributions[contributions > 0].sum():+.3g} (positive) and "
        f"{contributions[contributions < 0].sum():+.3g} (negative)"
    ]
    if negative:
        parts.append(
            "largest against: " + ", ".join(f"ch {k} {contributions[k]:+.3g}" for k in negative)
        )
    if positive:
        parts.append(
            "largest for: " + ", ".join(f"ch {k} {contributions[k]:+.3g}" for k in positive)
        )
    return "; ".join(parts)
