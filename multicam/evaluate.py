"""``mc.evaluate`` and ``multicam evaluate``: which method and layer to trust for a model.

:func:`evaluate` explains one batch with every method at every layer, scores each with the
metrics of :mod:`multicam.metrics`, and ranks them by faithfulness: the insertion AUC minus
the deletion AUC (Petsiuk et al., 2018), on the same scores (softmax probabilities by
default). The :class:`Evaluation` it returns prints as a table, converts to Markdown, plain
records or a pandas DataFrame (if pandas is installed), draws the deletion and insertion
curves, and recommends a method and layer: the most faithful one whose maps are not blank
and, when the sanity check ran, not flagged by it.

``multicam evaluate`` runs it on the demo's digits CNN (no arguments) or on a saved model
and images (as ``multicam explain`` takes them), prints the ranking and the
recommendation, and writes a PNG of the curves. The command-line parser is added by
:func:`add_cli_parser` and run by :func:`run_cli`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import metrics as metrics_module
from .cam import (
    CAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from .errors import BackendNotInstalledError, MulticamError, OptionError
from .methods import (
    FEM,
    ISCAM,
    KPCACAM,
    SSCAM,
    ClassActivationMap,
    EigenGradCAM,
    FinerCAM,
    RandomCAM,
    ShapleyCAM,
    SmoothGradCAMPlusPlus,
    SobelCAM,
)
from .metrics.curves import CurveResult
from .metrics.road import DEFAULT_PERCENTILES
from .perturbation import AblationCAM, ScoreCAM
from .viz import _matplotlib

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_METRICS",
    "METHODS",
    "METRICS",
    "Evaluation",
    "EvaluationRow",
    "add_cli_parser",
    "evaluate",
    "run_cli",
]

#: Method names :func:`evaluate` accepts, and their classes.
METHODS: dict[str, type[CAM]] = {
    "GradCAM": GradCAM,
    "GradCAM++": GradCAMPlusPlus,
    "XGradCAM": XGradCAM,
    "LayerCAM": LayerCAM,
    "HiResCAM": HiResCAM,
    "GradCAMElementWise": GradCAMElementWise,
    "ScoreCAM": ScoreCAM,
    "AblationCAM": AblationCAM,
    # the peers' methods that explain one layer (multicam.methods)
    "CAM": ClassActivationMap,
    "EigenGradCAM": EigenGradCAM,
    "ShapleyCAM": ShapleyCAM,
    "FinerCAM": FinerCAM,
    "SmoothGradCAM++": SmoothGradCAMPlusPlus,
    "SSCAM": SSCAM,
    "ISCAM": ISCAM,
    "KPCACAM": KPCACAM,
    "FEM": FEM,
    # baselines: a method should beat these
    "SobelCAM": SobelCAM,
    "RandomCAM": RandomCAM,
}
DEFAULT_METHODS = ("GradCAM", "GradCAM++", "XGradCAM", "LayerCAM", "HiResCAM", "ScoreCAM")

#: Metric names :func:`evaluate` accepts.
METRICS = ("deletion", "insertion", "road", "confidence", "randomization", "pointing", "energy")
DEFAULT_METRICS = ("deletion", "insertion", "road", "confidence")
#: The metrics ``multicam evaluate`` offers (the pointing games need annotations).
CLI_METRICS = ("deletion", "insertion", "road", "confidence", "randomization")


@dataclass(frozen=True)
class EvaluationRow:
    """One method at one layer, scored. ``None`` where a metric was not run.

    Attributes:
        method: the method's name.
        layer: the layer's name.
        faithfulness: insertion AUC minus deletion AUC (higher is better), or with only
            one of them, ``-deletion`` or ``insertion``; the ranking key.
        deletion: mean deletion AUC (lower is better).
        insertion: mean insertion AUC (higher is better).
        road: mean ROAD ``(LeRF - MoRF) / 2`` over the percentiles (higher is better).
        average_drop: Average Drop, a fraction (lower is better).
        increase: Increase in Confidence, a fraction (higher is better).
        pointing: pointing-game accuracy (higher is better).
        energy: mean energy-based pointing game (higher is better).
        randomization: mean Spearman similarity with every layer randomised (lower is
            better: the maps depend on the model).
        flagged: the maps survive randomisation (``None`` when it did not run).
        blank: the fraction of maps that are blank (constant, e.g. nothing after ReLU).
        seconds: the time the method and its metrics took.
    """

    method: str
    layer: str
    faithfulness: float
    deletion: float | None = None
    insertion: float | None = None
    road: float | None = None
    average_drop: float | None = None
    increase: float | None = None
    pointing: float | None = None
    energy: float | None = None
    randomization: float | None = None
    flagged: bool | None = None
    blank: float = 0.0
    seconds: float = 0.0


# (record key, header, format, what "better" is)
_COLUMNS = (
    ("faithfulness", "ins - del", "{:+.3f}"),
    ("deletion", "deletion AUC", "{:.3f}"),
    ("insertion", "insertion AUC", "{:.3f}"),
    ("road", "ROAD", "{:+.3f}"),
    ("average_drop", "avg drop", "{:.3f}"),
    ("increase", "increase", "{:.2f}"),
    ("pointing", "pointing", "{:.2f}"),
    ("energy", "energy", "{:.3f}"),
    ("randomization", "random. sim.", "{:+.2f}"),
    ("blank", "blank", "{:.0%}"),
    ("seconds", "s", "{:.1f}"),
)


@dataclass
class Evaluation:
    """Every method at every layer, ranked by faithfulness.

    Attributes:
        rows: the :class:`EvaluationRow` of each method and layer, most faithful first.
        curves: ``(method, layer) -> {"deletion": CurveResult, "insertion": CurveResult}``.
        sanity: ``(method, layer) -> RandomizationResult`` when the sanity check ran.
        targets: ``(N, T)`` the class ids every method explained.
        softmax: whether scores are softmax probabilities.
        steps: deletion and insertion steps.
        metrics: the metrics that ran.
    """

    rows: list[EvaluationRow]
    curves: dict[tuple[str, str], dict[str, CurveResult]] = field(default_factory=dict)
    sanity: dict[tuple[str, str], Any] = field(default_factory=dict)
    targets: np.ndarray | None = None
    softmax: bool = True
    steps: int = 16
    metrics: tuple[str, ...] = DEFAULT_METRICS

    def records(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (rank first), e.g. for JSON."""
        return [{"rank": rank, **asdict(row)} for rank, row in enumerate(self.rows, 1)]

    def _columns(self) -> list[tuple[str, str, str]]:
        present = [
            column
            for column in _COLUMNS
            if any(getattr(row, column[0]) is not None for row in self.rows)
        ]
        return present

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        columns = self._columns()
        header = ["rank", "method", "layer", *(title for _, title, _ in columns)]
        if any(row.flagged is not None for row in self.rows):
            header.append("sanity")
        body = []
        for rank, row in enumerate(self.rows, 1):
            cells = [str(rank), row.method, row.layer]
            for key, _, form in columns:
                value = getattr(row, key)
                cells.append("" if value is None or _nan(value) else form.format(value))
            if len(header) > len(cells):
                cells.append({None: "", True: "FLAGGED", False: "ok"}[row.flagged])
            body.append(cells)
        return header, body

    def __str__(self) -> str:
        header, body = self._cells()
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        numeric = [i == 0 or i > 2 for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if num else c.ljust(w)
                for c, w, num in zip(cells, widths, numeric, strict=True)
            ).rstrip()

        scores = "softmax probabilities" if self.softmax else "raw outputs"
        return "\n".join(
            [
                f"ranked by faithfulness (insertion AUC - deletion AUC; scores: {scores})",
                line(header),
                *(line(cells) for cells in body),
            ]
        )

    def to_markdown(self) -> str:
        """The table as GitHub Markdown."""
        header, body = self._cells()
        align = ["---:" if i == 0 or i > 2 else "---" for i in range(len(header))]
        rows = [header, align, *body]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)

    def to_pandas(self) -> Any:
        """The records as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas  # type: ignore[import-untyped]
        except ImportError as exc:
            raise BackendNotInstalledError(
                f"to_pandas needs pandas ({exc}); pip install pandas, or use records()."
            ) from exc
        return pandas.DataFrame.from_records(self.records())

    @property
    def recommendation(self) -> EvaluationRow:
        """The most faithful row whose maps are not blank and that the sanity check passed.

        When every row has blank maps or is flagged, the most faithful among those with the
        fewest blank maps that are not flagged (or, failing that, any).
        """
        trusted = [row for row in self.rows if not row.flagged]
        clean = [row for row in trusted if row.blank == 0]
        pool = clean or sorted(trusted, key=lambda r: r.blank) or self.rows
        return pool[0]

    def explain_recommendation(self) -> str:
        """Why :attr:`recommendation` was chosen, in a few sentences."""
        best = self.recommendation
        parts = [f"{best.method} at layer {best.layer!r}"]
        if best.deletion is not None and best.insertion is not None:
            parts.append(
                f"is the most faithful of the {len(self.rows)} candidates that"
                if best is self.rows[0]
                else "is the most faithful of the candidates that"
            )
            parts.append(
                "keep every map non-blank"
                + (" and pass the sanity check" if best.flagged is False else "")
                + f": insertion AUC {best.insertion:.3f} - deletion AUC {best.deletion:.3f} "
                f"= {best.faithfulness:+.3f}"
            )
        else:
            parts.append(f"ranks first by faithfulness ({best.faithfulness:+.3f})")
        text = " ".join(parts) + "."
        runner = next((row for row in self.rows if row is not best), None)
        if runner is not None:
            text += (
                f" Next: {runner.method} at {runner.layer!r} ({runner.faithfulness:+.3f}"
                + (f", {runner.blank:.0%} blank" if runner.blank else "")
                + (", FLAGGED by the sanity check" if runner.flagged else "")
                + ")."
            )
        if best.road is not None and best.road > 0:
            text += f" ROAD agrees: {best.road:+.3f} (LeRF above MoRF)."
        if best.randomization is not None:
            threshold = _threshold(self)
            text += (
                f" With every layer randomised its maps keep a Spearman similarity of only "
                f"{best.randomization:+.2f} to the trained model's (below {threshold:g}): "
                "they depend on what the model learned."
            )
        blanks = [row for row in self.rows if row.blank > 0]
        if blanks:
            worst = max(blanks, key=lambda row: row.blank)
            text += (
                f" {len(blanks)} of {len(self.rows)} candidates leave maps blank (most: "
                f"{worst.method} at {worst.layer!r}, {worst.blank:.0%}): there the layer "
                "holds only evidence against the class under that method's weights."
            )
        flagged = [row for row in self.rows if row.flagged]
        if flagged:
            names = ", ".join(f"{r.method} at {r.layer!r}" for r in flagged[:3])
            text += f" Flagged by the sanity check (maps survive randomisation): {names}."
        return text

    def plot(self, path: str | Path | None = None, title: str | None = None) -> Figure:
        """Deletion and insertion curves (mean over the batch) and the ranking.

        Args:
            path: where to save a PNG (optional).
            title: the figure's title.

        Returns:
            The matplotlib figure.
        """
        plt = _matplotlib()
        methods = list(dict.fromkeys(row.method for row in self.rows))
        layers = list(dict.fromkeys(row.layer for row in self.rows))
        colours = plt.get_cmap("tab10")
        styles = ["-", "--", ":", "-."]
        figure = plt.figure(figsize=(15, 5.6), layout="constrained")
        grid = figure.add_gridspec(1, 3, width_ratios=[1, 1, 1.05])
        kinds = [kind for kind in ("deletion", "insertion") if kind in self.metrics]
        for panel, kind in enumerate(kinds):
            axes = figure.add_subplot(grid[0, panel])
            for row in self.rows:
                curve = self.curves.get((row.method, row.layer), {}).get(kind)
                if curve is None:
                    continue
                colour = colours(methods.index(row.method) % 10)
                style = styles[layers.index(row.layer) % len(styles)]
                axes.plot(
                    curve.fractions,
                    curve.mean_curve,
                    style,
                    color=colour,
                    linewidth=1.6,
                    label=f"{row.method} @ {_short(row.layer)}: {curve.mean_auc:.3f}",
                )
            better = "lower" if kind == "deletion" else "higher"
            verb = "deleted" if kind == "deletion" else "inserted"
            axes.set_title(f"{kind.capitalize()} (AUC in legend; {better} is better)")
            axes.set_xlabel(f"fraction of pixels {verb}, most relevant first")
            axes.set_ylabel("target probability" if self.softmax else "target score")
            axes.set_xlim(0, 1)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=7, loc="upper right" if kind == "deletion" else "lower right")
        bars = figure.add_subplot(grid[0, 2])
        names = [f"{row.method} @ {_short(row.layer)}" for row in self.rows]
        values = [row.faithfulness for row in self.rows]
        best = self.recommendation
        colors = [
            "tab:green" if row is best else ("tab:red" if row.blank or row.flagged else "tab:blue")
            for row in self.rows
        ]
        positions = np.arange(len(self.rows))[::-1]
        bars.barh(positions, values, color=colors)
        bars.set_yticks(positions, names, fontsize=8)
        for position, row in zip(positions, self.rows, strict=True):
            notes = []
            if row.blank:
                notes.append(f"{row.blank:.0%} blank")
            if row.flagged:
                notes.append("fails sanity")
            if notes:
                bars.text(
                    row.faithfulness, position, "  " + ", ".join(notes), va="center", fontsize=7
                )
        bars.axvline(0, color="black", linewidth=0.8)
        bars.set_xlabel("higher is more faithful")
        bars.set_title(
            "Ranking: insertion AUC - deletion AUC\n(green: recommended;\nred: blank maps or "
            "fails the sanity check)",
            fontsize=10,
        )
        bars.grid(axis="x", alpha=0.3)
        if title:
            figure.suptitle(title, fontsize=12)
        if path is not None:
            figure.savefig(path, dpi=110)
        return figure


def _threshold(evaluation: Evaluation) -> float:
    """The sanity check's threshold in ``evaluation`` (its default when it did not run)."""
    for sanity in evaluation.sanity.values():
        return float(sanity.threshold)
    return 0.5


def _short(layer: str) -> str:
    """A layer name short enough for a legend: its last two parts."""
    for separator in ("/", "."):
        if separator in layer:
            return separator.join(layer.split(separator)[-2:])
    return layer


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _method(method: str | type[CAM]) -> tuple[str, type[CAM]]:
    if isinstance(method, str):
        if method not in METHODS:
            raise OptionError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
        return method, METHODS[method]
    if isinstance(method, type) and issubclass(method, CAM):
        names = {cls: name for name, cls in METHODS.items()}
        return names.get(method, method.__name__), method
    raise OptionError(f"method {method!r}: expected a name such as 'GradCAM' or a CAM class.")


def evaluate(
    model: Any,
    inputs: Any,
    targets: Any = None,
    *,
    layers: Sequence[Any],
    methods: Sequence[str | type[CAM]] = DEFAULT_METHODS,
    metrics: Sequence[str] = DEFAULT_METRICS,
    backend: Any = None,
    steps: int = 16,
    baseline: float | str | np.ndarray = 0.0,
    softmax: bool = True,
    batch_size: int = 64,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    masks: Any = None,
    boxes: Any = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> Evaluation:
    """Score every method at every layer and rank them by faithfulness.

    Args:
        model: as for :class:`~multicam.GradCAM` (with ``variables=`` in ``options`` for
            linen).
        inputs: ``(N, ...)`` a batch in the backend's layout.
        targets: as for an explainer; resolved once (``None``: the predicted class) and
            used for every method and layer.
        layers: the layers to compare (names or objects, as explainers take them).
        methods: names from :data:`METHODS` or CAM classes.
        metrics: names from :data:`METRICS`: ``deletion``, ``insertion``, ``road``,
            ``confidence``, ``randomization`` (the sanity check: one explanation per
            parameterised layer), ``pointing`` and ``energy`` (need ``masks`` or ``boxes``).
        backend: as for an explainer.
        steps: deletion and insertion steps.
        baseline: deletion and insertion baseline (a number, ``"blur"``, an array).
        softmax: score softmax probabilities (default), else the raw outputs (confidence
            change always uses probabilities).
        batch_size: perturbed inputs per forward pass.
        percentiles: ROAD's percentiles.
        masks: for the pointing games, see :func:`multicam.metrics.pointing_game`.
        boxes: for the pointing games, instead of masks.
        seed: ROAD's noise and the randomisation.
        progress: called with a line of text as each method and layer starts.
        **options: passed to every explainer's constructor.

    Returns:
        An :class:`Evaluation`.

    Example:
        >>> layers = ["features.relu3", "features.relu4"]  # doctest: +SKIP
        >>> ev = mc.evaluate(model, x, layers=layers)  # doctest: +SKIP
        >>> print(ev)  # doctest: +SKIP
        >>> ev.plot("curves.png")  # doctest: +SKIP
    """
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise OptionError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}.")
    if not layers or isinstance(layers, str):
        raise OptionError("layers= takes a list of one or more layers, e.g. ['features.7'].")
    chosen = [_method(method) for method in methods]
    if not chosen:
        raise OptionError("methods= is empty; pass at least one method.")
    if ("pointing" in metrics or "energy" in metrics) and masks is None and boxes is None:
        raise OptionError("the pointing games need masks= or boxes= (the objects' locations).")
    wanted = tuple(dict.fromkeys(metrics))
    rows: list[EvaluationRow] = []
    evaluation = Evaluation(rows=rows, softmax=softmax, steps=steps, metrics=wanted)
    fixed = targets
    total = len(chosen) * len(layers)
    for index, (layer, (name, cls)) in enumerate(
        ((layer, method) for layer in layers for method in chosen), 1
    ):
        started = time.perf_counter()
        extra: dict[str, Any] = {}
        if issubclass(cls, ScoreCAM | AblationCAM):
            extra["batch_size"] = batch_size
        explainer = cls(model, layer, backend=backend, **extra, **options)
        layer_name = explainer.layer
        if progress is not None:
            progress(f"[{index}/{total}] {name} at {layer_name!r}: {', '.join(wanted)}")
        result = explainer(inputs, fixed, warn=False)
        if fixed is None or isinstance(fixed, str):
            fixed = result.targets if result.targets is not None else fixed
            evaluation.targets = result.targets
        elif evaluation.targets is None:
            evaluation.targets = result.targets
        row = _score(
            explainer,
            inputs,
            result,
            fixed,
            wanted,
            evaluation,
            name,
            layer_name,
            steps=steps,
            baseline=baseline,
            softmax=softmax,
            batch_size=batch_size,
            percentiles=percentiles,
            masks=masks,
            boxes=boxes,
            seed=seed,
        )
        rows.append(_replace(row, seconds=time.perf_counter() - started))
    rows.sort(key=lambda row: -row.faithfulness if not _nan(row.faithfulness) else math.inf)
    return evaluation


def _replace(row: EvaluationRow, **changes: Any) -> EvaluationRow:
    return EvaluationRow(**{**asdict(row), **changes})


def _score(
    explainer: CAM,
    inputs: Any,
    result: Any,
    targets: Any,
    wanted: tuple[str, ...],
    evaluation: Evaluation,
    name: str,
    layer: str,
    *,
    steps: int,
    baseline: float | str | np.ndarray,
    softmax: bool,
    batch_size: int,
    percentiles: Sequence[float],
    masks: Any,
    boxes: Any,
    seed: int,
) -> EvaluationRow:
    """One method at one layer: every metric in ``wanted``."""
    m = metrics_module
    values: dict[str, Any] = {}
    curves: dict[str, CurveResult] = {}
    for kind, function in (("deletion", m.deletion), ("insertion", m.insertion)):
        if kind in wanted:
            curves[kind] = function(
                explainer, inputs, result, steps, baseline, batch_size, softmax=softmax
            )
            values[kind] = curves[kind].mean_auc
    evaluation.curves[(name, layer)] = curves
    if "road" in wanted:
        values["road"] = m.road(
            explainer,
            inputs,
            result,
            percentiles,
            seed=seed,
            batch_size=batch_size,
            softmax=softmax,
        ).mean_combined
    if "confidence" in wanted:
        change = m.confidence_change(explainer, inputs, result, batch_size)
        values["average_drop"], values["increase"] = change.average_drop, change.increase_rate
    if "pointing" in wanted:
        values["pointing"] = m.pointing_game(result, masks, boxes=boxes).accuracy
    if "energy" in wanted:
        values["energy"] = m.energy_pointing_game(result, masks, boxes=boxes).mean
    if "randomization" in wanted:
        sanity = m.randomization_test(explainer, inputs, targets, seed=seed)
        evaluation.sanity[(name, layer)] = sanity
        values["randomization"], values["flagged"] = sanity.final, sanity.flagged
    maps = np.asarray(result.maps)
    flat = maps.reshape(*maps.shape[:2], -1)
    blank = float((flat.max(-1) == flat.min(-1)).mean())
    if "deletion" in values and "insertion" in values:
        faithfulness = values["insertion"] - values["deletion"]
    elif "deletion" in values:
        faithfulness = -values["deletion"]
    elif "insertion" in values:
        faithfulness = values["insertion"]
    elif "road" in values:
        faithfulness = values["road"]
    else:
        faithfulness = math.nan
    return EvaluationRow(
        method=name, layer=layer, faithfulness=float(faithfulness), blank=blank, **values
    )


# --- the command line ------------------------------------------------------------------------

DEMO_LAYERS = ("features.relu3", "features.relu4")

EPILOG = """\
examples:
  multicam evaluate                                   the demo's digits CNN, all 10 digits
  multicam evaluate --metrics deletion,insertion      faster: no ROAD, no sanity check
  multicam evaluate digits.keras four.png nine.png --layers features/relu3,features/relu4
  multicam evaluate net.pt cat.png --layers layer3,layer4 --import mynets.py --target 281

Faithfulness: insertion AUC - deletion AUC (Petsiuk et al. 2018), on softmax
probabilities unless --logits. The recommendation is the most faithful method and layer
whose maps are not blank (and, with the randomization metric, that passes the sanity
check)."""


def add_cli_parser(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add the ``evaluate`` command to a ``multicam`` subparsers object; return its parser."""
    parser = subparsers.add_parser(
        "evaluate",
        parents=list(parents),
        help="which method and layer to trust: faithfulness metrics, ranking, curves",
        description="Explain a batch with every method at every layer, score each with "
        "deletion, insertion, ROAD and confidence change (optionally the randomisation "
        "sanity check and, with masks, the pointing games), rank them by faithfulness, "
        "recommend one, and write a PNG of the curves. Without MODEL: the demo's trained "
        "digits CNN on its ten example digits. MODEL is what multicam explain takes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="model file, or MODULE:FUNCTION with --flax")
    parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--layers", help="comma-separated layers to compare (required with MODEL)")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)} (default %(default)s)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated, from {', '.join(CLI_METRICS)} (default: "
        f"{','.join(DEFAULT_METRICS)}, and randomization for the demo; the sanity check "
        "explains the batch once per parameterised layer)",
    )
    parser.add_argument(
        "--target", type=int, default=None, help="class id (default: the predicted class)"
    )
    parser.add_argument("--steps", type=int, default=16, help="deletion/insertion steps")
    parser.add_argument(
        "--baseline", default="0", help="deletion/insertion baseline: a number or 'blur'"
    )
    parser.add_argument(
        "--logits", action="store_true", help="score raw outputs instead of probabilities"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass")
    parser.add_argument(
        "--framework",
        default=None,
        help="the demo's framework: torch, keras, flax or nnx (default: the first installed)",
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE_OR_FILE.py",
        help="import a module or run a .py file first (as multicam explain)",
    )
    parser.add_argument("--flax", action="store_true", help="MODEL is a Flax MODULE:FUNCTION")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize images")
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), help="read images as 1 or 3 channels"
    )
    parser.add_argument(
        "--out", default="multicam-evaluate.png", help="PNG to write (default %(default)s)"
    )
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    return parser


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``multicam evaluate`` with parsed arguments; return the exit status."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.metrics is None:
        chosen = (*DEFAULT_METRICS, "randomization") if args.model is None else DEFAULT_METRICS
    else:
        chosen = tuple(args.metrics.split(","))
    wanted = [m.strip() for m in chosen if m.strip()]
    bad = [m for m in wanted if m not in CLI_METRICS]
    if bad:
        raise MulticamError(f"--metrics: unknown here {bad}; choose from {', '.join(CLI_METRICS)}")
    try:
        baseline: float | str = float(args.baseline)
    except ValueError:
        baseline = args.baseline
    if args.model is None:
        model, batch, layers, options, what, digits = _demo_model(args)
    else:
        model, batch, layers, options, what = _user_model(args)
        digits = None
    _say(
        f"multicam evaluate: {len(methods)} methods x {len(layers)} layers on {what}; "
        f"metrics {', '.join(wanted)}"
    )
    started = time.perf_counter()
    evaluation = evaluate(
        model,
        batch,
        args.target,
        layers=layers,
        methods=methods,
        metrics=wanted,
        steps=args.steps,
        baseline=baseline,
        softmax=not args.logits,
        batch_size=args.batch_size,
        progress=_say,
        **options,
    )
    _say(f"done in {time.perf_counter() - started:.1f} s\n")
    _say(str(evaluation))
    _say()
    best = evaluation.recommendation
    _say(f"recommended: {best.method} at layer {best.layer!r}")
    _say("  " + evaluation.explain_recommendation())
    if digits is not None:
        _say(_blank_digits(evaluation, model, batch, layers, options, digits))
    title = f"multicam evaluate: {what}"
    evaluation.plot(args.out, title=title)
    _say(f"\nwrote {Path(args.out).resolve()}: deletion and insertion curves and the ranking")
    if args.markdown:
        Path(args.markdown).write_text(evaluation.to_markdown() + "\n", encoding="utf-8")
        _say(f"wrote {Path(args.markdown).resolve()}")
    return 0


def _demo_model(
    args: argparse.Namespace,
) -> tuple[Any, np.ndarray, list[str], dict[str, Any], str, np.ndarray]:
    from . import demo, zoo

    installed = zoo.installed_frameworks()
    framework = args.framework or (installed[0] if installed else None)
    if framework is None:
        raise MulticamError("no framework is installed; pip install 'multicam-xai[torch]'")
    if framework not in zoo.FRAMEWORKS:
        raise MulticamError(f"--framework {framework!r}: choose from {', '.join(zoo.FRAMEWORKS)}")
    if framework not in installed:
        raise MulticamError(f"--framework {framework}: not installed")
    if args.layers:
        raise MulticamError(
            "--layers applies to a MODEL; the demo compares the last two conv blocks"
        )
    if "torch" in installed:
        import torch  # noqa: F401  (torch must be imported before TensorFlow)
    weights, images, labels = demo.load()
    model = zoo.build("digits_cnn", framework, weights)
    options: dict[str, Any] = {}
    if framework == "flax":
        model, options["variables"] = model
    batch = (
        np.moveaxis(images, -1, 1) if zoo.native_layout(framework) == "channels_first" else images
    )
    layers = [zoo.layer_name(layer, framework) for layer in DEMO_LAYERS]
    what = f"the demo's digits CNN ({framework}), digits {' '.join(map(str, labels))}"
    return model, batch, layers, options, what, labels


def _blank_digits(
    evaluation: Evaluation,
    model: Any,
    batch: np.ndarray,
    layers: Sequence[str],
    options: dict[str, Any],
    labels: np.ndarray,
) -> str:
    """Which digits Grad-CAM leaves blank at each layer, and what the recommendation shows."""
    lines = ["\nthe blank digits (multicam demo): Grad-CAM of the predicted class"]
    best = evaluation.recommendation
    for layer in layers:
        result = GradCAM(model, layer, **options)(batch, evaluation.targets, warn=False)
        flat = result.maps.reshape(len(batch), -1)
        blank = [int(labels[i]) for i in np.flatnonzero(flat.max(-1) == flat.min(-1))]
        lines.append(
            f"  at {layer!r}: blank for digits {', '.join(map(str, blank))}"
            if blank
            else f"  at {layer!r}: no blank map"
        )
    cls = METHODS.get(best.method, GradCAM)
    chosen = cls(model, best.layer, **options)(batch, evaluation.targets, warn=False)
    flat = chosen.maps.reshape(len(batch), -1)
    empty = int((flat.max(-1) == flat.min(-1)).sum())
    lines.append(
        f"  {best.method} at {best.layer!r} leaves {empty} of {len(batch)} maps blank"
        + (" and explains every digit" if empty == 0 else "")
    )
    return "\n".join(lines)


def _user_model(args: argparse.Namespace) -> tuple[Any, np.ndarray, list[str], dict[str, Any], str]:
    from PIL import Image

    from .cli import _load_model, _model_input, _on_path, _read_image, import_user_module

    if not args.images:
        raise MulticamError("pass one or more IMAGE files after MODEL")
    if not args.layers:
        raise MulticamError("pass the layers to compare with --layers, e.g. --layers layer3,layer4")
    layers = [layer.strip() for layer in args.layers.split(",") if layer.strip()]
    if "torch" in sys.modules or Path(args.model).suffix in (".pt", ".pth"):
        import torch  # noqa: F401  (torch must be imported before TensorFlow)
    user_modules = [import_user_module(spec) for spec in args.imports or ()]
    if not args.flax:
        _on_path(Path.cwd())
    model, options = _load_model(args.model, args.flax, user_modules)
    probe = GradCAM(model, layers[0], **options)
    channels_first = probe.bound.layout == "channels_first"
    declared_size, declared_channels = _model_input(model, channels_first)
    size = args.size or declared_size
    channels = args.channels or declared_channels or 3
    arrays = []
    for source in args.images:
        image = _read_image(source, channels)
        if size:
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(image, np.float32) / 255.0
        arrays.append(array[..., None] if array.ndim == 2 else array)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise MulticamError(
            f"the images have different sizes {sorted(shapes)}; pass --size H W to resize them"
        )
    batch = np.stack(arrays)
    if channels_first:
        batch = np.moveaxis(batch, -1, 1)
    what = f"{Path(args.model).name}, {len(arrays)} image(s)"
    return model, batch, layers, options, what
