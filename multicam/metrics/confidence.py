"""Confidence change (Chattopadhay et al., Grad-CAM++, 2018): the map as a soft mask.

The explanation map ``E`` (``result.maps``, in [0, 1], at the input's size) multiplies the
input, every channel: ``x * E``. With ``Y`` the target's score on ``x`` and ``O`` on
``x * E``:

- drop ``= max(0, Y - O) / Y``; the paper's Average Drop is its mean, times 100 for
  percent (lower is better);
- increase ``= O > Y``; the paper's Increase in Confidence (also "rate of increase") is
  its mean, times 100 for percent (higher is better).

Scores are softmax probabilities by default (``softmax=True``, "confidence" in the paper
and torchcam's ``ClassificationMetric`` with a softmax); ``softmax=False`` uses the raw
outputs, which must then be positive where the drop divides by them.

Peers: torchcam's ``ClassificationMetric`` divides by ``Y + 1e-7`` (here by ``Y``; the
difference is below 1e-7 relative for probabilities above 1e-3) and explains its own
predicted class. pytorch-grad-cam's ``DropInConfidence`` returns ``max(0, Y - O)`` without
dividing by ``Y`` (``drop * original`` here) and ``IncreaseInConfidence`` the same
indicator ``O > Y``, on its targets' raw outputs unless a softmax target is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OptionError, TargetError
from ._common import (
    Model,
    as_array,
    broadcast_over_channels,
    class_targets,
    input_maps,
)

__all__ = ["ConfidenceResult", "confidence_change"]


@dataclass(frozen=True)
class ConfidenceResult:
    """Confidence change per map.

    Attributes:
        original: ``(N, T)`` ``Y``, the score on the input.
        masked: ``(N, T)`` ``O``, the score on the input times the map.
        drop: ``(N, T)`` ``max(0, Y - O) / Y``.
        increase: ``(N, T)`` bool ``O > Y``.
        targets: ``(N, T)`` the class ids that were scored.
        softmax: whether the scores are softmax probabilities.
    """

    original: np.ndarray
    masked: np.ndarray
    drop: np.ndarray
    increase: np.ndarray
    targets: np.ndarray
    softmax: bool

    @property
    def average_drop(self) -> float:
        """The mean drop over samples and targets (a fraction; x100 for the paper's %)."""
        return float(self.drop.mean())

    @property
    def increase_rate(self) -> float:
        """The fraction of maps whose masked input scores higher (the paper's x100)."""
        return float(self.increase.mean())


def confidence_change(
    explainer: Any,
    inputs: Any,
    result: Any,
    batch_size: int | None = None,
    *,
    softmax: bool = True,
) -> ConfidenceResult:
    """Average drop and increase in confidence on the map-masked input.

    Args:
        explainer: the explainer that made ``result`` (its model scores the masked inputs).
        inputs: ``(N, ...)`` the batch that was explained, in the backend's layout.
        result: its result: ``maps`` in [0, 1] at the input's size, class ``targets``.
        batch_size: inputs per forward pass (default: the explainer's, else 64).
        softmax: score softmax probabilities (default) instead of the raw outputs.

    Returns:
        A :class:`ConfidenceResult`.

    Raises:
        OptionError: maps outside [0, 1] (explain with ``normalize=True``).
        TargetError: a score ``Y <= 0`` to divide by (use ``softmax=True``).
    """
    model = Model.of(explainer, batch_size, softmax, "confidence_change")
    x = as_array(inputs)
    classes = class_targets(result, "confidence_change")
    maps = input_maps(result, x, model.layout, "confidence_change")
    if maps.min() < 0 or maps.max() > 1 + 1e-6:
        raise OptionError(
            f"confidence_change multiplies the input by the map, which must lie in [0, 1]; "
            f"these lie in [{maps.min():.3g}, {maps.max():.3g}]: explain with "
            "normalize=True (the default)."
        )
    n, t = classes.shape
    original = model.plain_scores(x, classes)
    if (original <= 0).any():
        raise TargetError(
            "the average drop divides by the target's score, and some scores are <= 0 "
            f"(min {original.min():.4g}); use softmax=True to score probabilities."
        )

    def build(items: np.ndarray) -> np.ndarray:
        sample, target = np.unravel_index(items, (n, t))
        weights = broadcast_over_channels(maps[sample, target], x.ndim, model.layout)
        return (x[sample] * weights).astype(x.dtype)

    def wanted(items: np.ndarray) -> np.ndarray:
        sample, target = np.unravel_index(items, (n, t))
        return classes[sample, target]

    masked = model.scores(n * t, build, wanted).reshape(n, t)
    return ConfidenceResult(
        original=original,
        masked=masked,
        drop=np.maximum(original - masked, 0.0) / original,
        increase=masked > original,
        targets=classes,
        softmax=model.softmax,
    )
