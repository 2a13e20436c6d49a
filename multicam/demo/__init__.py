"""``multicam demo``: the blank-map story on a trained digits CNN, in every framework.

The demo loads the shipped weights of the blank-map report's CNN (trained by
:mod:`multicam.demo.train` on scikit-learn's bundled digits), builds the same network with
the same weights in every installed framework, computes Grad-CAM for all ten classes on a
few digits on every backend, and prints how closely the backends agree, how long each
took (after a warm-up call), and the diagnosis (which maps are blank and why). It writes a
PNG: the digits x classes of one backend, ReLU'd and signed, with the predicted class framed
and blank maps labelled, and a table of how closely every pair of backends agrees.
"""

from __future__ import annotations

import functools
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from .. import zoo
from ..cam import CAMResult
from ..testing import MAPS_ATOL, RAW_RTOL

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
    stream: TextIO | None = None,
) -> dict[str, CAMResult]:
    """Run the demo and write the PNG to ``out``.

    Args:
        out: where to write the PNG.
        frameworks: subset of :data:`multicam.zoo.FRAMEWORKS`; default: all installed.
        digits: which example digits (0-9) to explain.
        repeats: timed calls per backend after one warm-up call; the best is reported.
        stream: where to print; default: ``sys.stdout`` at the time of the call.

    Returns:
        The result of each framework.
    """
    from ..cli import AGREEMENT_HEADER, agreement_table, format_table, timed

    def say(text: str = "", end: str = "\n") -> None:
        print(text, file=stream or sys.stdout, flush=True, end=end)

    frameworks = list(frameworks or zoo.installed_frameworks())
    if "torch" in frameworks:
        import torch  # noqa: F401  (torch must be imported before TensorFlow)
    weights, images, labels = load()
    x = images[list(digits)]
    say(f"multicam demo: Grad-CAM of all 10 classes at layer {LAYER!r} of the digits CNN")
    say(f"digits {list(digits)}; frameworks {', '.join(frameworks)}; the same weights everywhere")

    results: dict[str, CAMResult] = {}
    rows = []
    for step, framework in enumerate(frameworks, 1):
        say(f"[{step}/{len(frameworks)}] {framework}: building the model and compiling ...", end="")
        started = time.perf_counter()
        explainer = zoo.explainer("digits_cnn", framework, LAYER, weights)
        native = np.moveaxis(x, -1, 1) if zoo.native_layout(framework) == "channels_first" else x
        build = time.perf_counter() - started
        # One warm-up call first (tracing, compilation, caches), then the timed calls.
        results[framework], warmup, best = timed(
            functools.partial(explainer, native, targets="all", warn=False), repeats
        )
        say(f" {build + warmup:.1f} s")
        rows.append(
            [
                framework,
                results[framework].backend,
                f"{1e3 * best:.2f}",
                f"{1e3 * (build + warmup):.0f}",
            ]
        )

    say(
        f"\ntime per batch ({len(digits)} digits x 10 classes), best of {repeats} "
        "after a warm-up call:"
    )
    for line in format_table(["framework", "backend", "ms / batch", "setup ms"], rows):
        say(line)

    names = list(results)
    agreed, pairs = agreement_table(results)
    say(
        f"\nagreement between backends (tolerances: raw {RAW_RTOL:g} relative, "
        f"normalised {MAPS_ATOL:g} absolute):"
    )
    if len(names) < 2:
        say("  only one framework installed: nothing to compare")
    else:
        for line in format_table(AGREEMENT_HEADER, pairs):
            say(line)

    reference = results[names[0]]
    diagnosis = reference.diagnose()
    assert reference.outputs is not None
    probabilities = _softmax(reference.outputs)
    predicted = probabilities.argmax(axis=1)
    holds = "the backends agree, so it holds for all" if agreed else "the backends DISAGREE"
    say(f"\ndiagnosis ({names[0]}; {holds}):")
    table = []
    for row, digit in enumerate(digits):
        blank = [int(c) for c in np.flatnonzero(diagnosis.blank[row])]
        flag = "<- the predicted class is blank" if predicted[row] in blank else ""
        table.append(
            [
                labels[digit],
                predicted[row],
                f"{probabilities[row, predicted[row]]:.3f}",
                ", ".join(map(str, blank)) or "none",
                flag,
            ]
        )
    for line in format_table(["digit", "predicted", "p", "blank after ReLU", ""], table):
        say(line)
    for row in range(len(digits)):
        for finding in diagnosis.findings:
            if (
                finding.sample == row
                and finding.target == predicted[row]
                and finding.severity == "blank"
            ):
                say(f"\nwhy is the map of digit {labels[digits[row]]} blank for its own class?")
                say(textwrap.fill(finding.message, 96, initial_indent="  ", subsequent_indent="  "))
                say(
                    textwrap.fill(
                        finding.suggestion, 96, initial_indent="  -> ", subsequent_indent="     "
                    )
                )

    _picture(out, x, labels[list(digits)], results, diagnosis.blank, probabilities, pairs, rows)
    say(
        f"\nwrote {Path(out).resolve()}: the digits x 10 classes from {names[0]}, ReLU'd and "
        "signed, and the agreement table"
    )
    return results


def _picture(
    out: str | Path,
    x: np.ndarray,
    labels: np.ndarray,
    results: dict[str, CAMResult],
    blank: np.ndarray,
    probabilities: np.ndarray,
    pairs: list[list[str]],
    timings: list[list[str]],
) -> None:
    """One backend's grid (they agree), and the agreement of every pair as a table."""
    from .. import viz
    from ..cli import AGREEMENT_HEADER

    names = list(results)
    reference = results[names[0]]
    assert reference.targets is not None
    predicted = probabilities.argmax(axis=1)
    times = ", ".join(f"{row[0]} {row[2]} ms" for row in timings)
    if len(names) > 1:
        table = (list(AGREEMENT_HEADER), pairs)
        tolerance = f"{RAW_RTOL:.0e}".replace("e-0", "e-")
        table_title = (
            f"How closely the backends agree (tolerance {tolerance}); the maps above are from "
            f"{names[0]}.\nTime per batch after a warm-up call: {times}"
        )
    else:
        table, table_title = None, ""
    viz.explanation(
        list(x),
        reference.maps,
        reference.raw,
        reference.targets,
        predicted=predicted,
        blank=blank,
        image_labels=[
            f"digit {label}\npredicted {predicted[i]} (p {probabilities[i, predicted[i]]:.2f})"
            for i, label in enumerate(labels)
        ],
        title=f"multicam demo: Grad-CAM of the digits CNN at layer {LAYER!r}, all 10 classes "
        f"({', '.join(names)})",
        table=table,
        table_title=table_title,
        path=out,
    )
