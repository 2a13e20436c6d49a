"""``multicam demo``: the blank-map story on a trained digits CNN, in every framework.

The demo loads the shipped weights of the blank-map report's CNN (trained by
:mod:`multicam.demo.train` on scikit-learn's bundled digits), builds the same network with
the same weights in every installed framework, computes Grad-CAM for all ten classes on a
few digits on every backend, and prints how closely the backends agree, how long each
took, and the diagnosis (which maps are blank and why). It writes a PNG grid of digits x
classes x backends, ReLU'd and signed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from .. import zoo
from ..cam import CAMResult
from ..testing import agreement_report

__all__ = ["LAYER", "load", "run"]

WEIGHTS = Path(__file__).with_name("digits_cnn.npz")
LAYER = "features.relu4"


def load() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The demo's weights, its example digits ``(10, 28, 28, 1)`` in [0, 1], and labels."""
    with np.load(WEIGHTS) as archive:
        weights = {
            key.split("/", 1)[1]: archive[key].astype(np.float32)
            for key in archive.files
            if key.startswith("weights/")
        }
        images = archive["images"].astype(np.float32) / 255.0
        labels = archive["labels"]
    return weights, images, labels


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def run(
    out: str | Path = "multicam-demo.png",
    frameworks: Sequence[str] | None = None,
    digits: Sequence[int] = (4, 5, 8, 9),
    repeats: int = 3,
    stream: TextIO = sys.stdout,
) -> dict[str, CAMResult]:
    """Run the demo and write the PNG grid to ``out``.

    Args:
        out: where to write the PNG.
        frameworks: subset of :data:`multicam.zoo.FRAMEWORKS`; default: all installed.
        digits: which example digits (0-9) to explain.
        repeats: timed calls per backend after one warm-up call; the best is reported.
        stream: where to print.

    Returns:
        The result of each framework.
    """

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    frameworks = list(frameworks or zoo.installed_frameworks())
    if "torch" in frameworks:
        import torch  # noqa: F401  (torch must be imported before TensorFlow)
    weights, images, labels = load()
    x = images[list(digits)]
    say(f"multicam demo: Grad-CAM of all 10 classes at layer {LAYER!r} of the digits CNN")
    say(f"digits {list(digits)}, frameworks {', '.join(frameworks)}; same weights everywhere")

    results: dict[str, CAMResult] = {}
    timings: dict[str, float] = {}
    for step, framework in enumerate(frameworks, 1):
        say(f"[{step}/{len(frameworks)}] {framework}: building the model and compiling ...")
        started = time.perf_counter()
        explainer = zoo.explainer("digits_cnn", framework, LAYER, weights)
        native = np.moveaxis(x, -1, 1) if zoo.native_layout(framework) == "channels_first" else x
        explainer(native, targets="all", warn=False)  # warm-up: tracing, compilation
        setup = time.perf_counter() - started
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            results[framework] = explainer(native, targets="all", warn=False)
            best = min(best, time.perf_counter() - start)
        timings[framework] = best
        say(f"      ready in {setup:.1f} s; {1e3 * best:.2f} ms per batch (best of {repeats})")

    say("\nagreement between backends (raw maps relative, normalised maps absolute):")
    names = list(results)
    if len(names) < 2:
        say("  only one framework installed: nothing to compare")
    for line in agreement_report(results)[1]:
        say(f"  {line}")

    reference = results[names[0]]
    diagnosis = reference.diagnose()
    assert reference.outputs is not None
    probabilities = _softmax(reference.outputs)
    predicted = probabilities.argmax(axis=1)
    say(f"\ndiagnosis ({names[0]}; the backends agree, so it holds for all):")
    say("  digit  predicted (p)     blank after ReLU")
    for row, digit in enumerate(digits):
        blank = [int(c) for c in np.flatnonzero(diagnosis.blank[row])]
        flag = "  <- the predicted class is blank" if predicted[row] in blank else ""
        say(
            f"  {labels[digit]:>5}  {predicted[row]} ({probabilities[row, predicted[row]]:.3f})"
            f"     {blank or 'none'}{flag}"
        )
    for row in range(len(digits)):
        for finding in diagnosis.findings:
            if (
                finding.sample == row
                and finding.target == predicted[row]
                and finding.severity == "blank"
            ):
                say(f"\nwhy is the map of digit {labels[digits[row]]} blank for its own class?")
                say(f"  {finding.message}")
                say(f"  -> {finding.suggestion}")

    _picture(out, x, labels[list(digits)], results, diagnosis.blank)
    say(f"\nwrote {Path(out).resolve()}: digits x classes x backends; rows ReLU'd, then signed")
    return results


def _picture(
    out: str | Path,
    x: np.ndarray,
    labels: np.ndarray,
    results: dict[str, CAMResult],
    blank: np.ndarray,
) -> None:
    from .. import viz

    rows, cells, row_labels, marks = [], [], [], []
    for framework, result in results.items():
        for i, label in enumerate(labels):
            limit = float(np.abs(result.raw[i]).max())
            relu_cells = [viz.overlay(x[i], result.maps[i, c]) for c in range(10)]
            signed_cells = [viz.signed(result.raw[i, c], limit=limit) for c in range(10)]
            rows += [x[i], x[i]]
            cells += [relu_cells, signed_cells]
            row_labels += [f"{framework}\n{label}: ReLU", f"{framework}\n{label}: signed"]
            marks += [["blank" if b else "" for b in blank[i]], [""] * 10]
    viz.grid(
        rows,
        cells,
        row_labels=row_labels,
        col_labels=[f"class {c}" for c in range(10)],
        marks=marks,
        path=out,
    )
