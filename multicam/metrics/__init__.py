"""Which map to trust: faithfulness metrics, localisation and sanity checks.

Framework-free, like :mod:`multicam.algebra`: every metric builds its perturbed inputs in
NumPy and scores them with the backend's forward capability
(:meth:`~multicam.backends.BoundModel.outputs`), in chunks of ``batch_size`` (all perturbed
copies of all images, never one image at a time), so the same metric works for every
backend and every method, and gives the same numbers for the same network with the same
weights in torch, Keras, linen and nnx.

- :func:`deletion`, :func:`insertion` (Petsiuk et al., RISE, 2018): the score as the most
  relevant pixels are removed from the input or revealed on a baseline
  (:mod:`multicam.metrics.curves` fixes the convention).
- :func:`road` (Rong et al., 2022): remove and debias, noisy linear imputation, MoRF and
  LeRF (:mod:`multicam.metrics.road`, with the differences to pytorch-grad-cam).
- :func:`confidence_change` (Chattopadhay et al., 2018): average drop and increase in
  confidence on the map-masked input.
- :func:`pointing_game`, :func:`energy_pointing_game`: localisation against masks or boxes.
- :func:`randomization_test` (Adebayo et al., 2018): cascading parameter randomisation
  on a copy of the model, with Spearman similarity; methods whose maps survive are flagged.

Example:
    >>> import multicam as mc  # doctest: +SKIP
    >>> from multicam import metrics  # doctest: +SKIP
    >>> cam = mc.GradCAM(model, "features.relu3")  # doctest: +SKIP
    >>> res = cam(x)  # doctest: +SKIP
    >>> metrics.deletion(cam, x, res, softmax=True).auc.mean()  # lower is better  # doctest: +SKIP
"""

from __future__ import annotations

from .confidence import ConfidenceResult, confidence_change
from .curves import CurveResult, blur, deletion, insertion
from .localization import (
    EnergyResult,
    PointingResult,
    box_masks,
    energy_pointing_game,
    pointing_game,
)
from .road import RoadResult, impute, road
from .sanity import RandomizationResult, randomization_test, redraw, spearman

__all__ = [
    "ConfidenceResult",
    "CurveResult",
    "EnergyResult",
    "PointingResult",
    "RandomizationResult",
    "RoadResult",
    "blur",
    "box_masks",
    "confidence_change",
    "deletion",
    "energy_pointing_game",
    "impute",
    "insertion",
    "pointing_game",
    "randomization_test",
    "redraw",
    "road",
    "spearman",
]
