"""``mc.evaluate`` and ``multicam evaluate``: ranking, table, plot, recommendation, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require
from test_metrics import LinearBackend, _linear_case

import multicam as mc
from multicam import demo, zoo
from multicam.errors import MulticamError, OptionError
from multicam.evaluate import Evaluation, EvaluationRow, add_cli_parser, evaluate, run_cli


def test_the_true_evidence_ranks_first_on_a_linear_model() -> None:
    """Closed case: on a linear model explained at its input, HiResCAM's map is the true
    evidence ``W_c * x``, the best deletion and insertion order (see test_metrics)."""
    model, x = _linear_case(n=4, seed=2)
    evaluation = evaluate(
        model,
        x,
        [[1], [2], [0], [3]],
        layers=["input"],
        methods=["GradCAM", "HiResCAM", "XGradCAM"],
        metrics=["deletion", "insertion"],
        backend=LinearBackend(),
        softmax=False,
    )
    assert evaluation.rows[0].method == "HiResCAM"
    faithfulness = [row.faithfulness for row in evaluation.rows]
    assert faithfulness == sorted(faithfulness, reverse=True)
    best = evaluation.rows[0]
    assert best.faithfulness == pytest.approx(best.insertion - best.deletion)  # type: ignore[operator]
    assert best.road is None and best.average_drop is None
    assert evaluation.targets is not None and evaluation.targets.tolist() == [[1], [2], [0], [3]]


@pytest.fixture(scope="module")
def digits_evaluation() -> Evaluation:
    require("torch")
    weights, images, _ = demo.load()
    model = zoo.build("digits_cnn", "torch", weights)
    lines: list[str] = []
    evaluation = evaluate(
        model,
        np.moveaxis(images, -1, 1),
        layers=["features.relu3", "features.relu4"],
        methods=["GradCAM", "LayerCAM"],
        metrics=["deletion", "insertion", "road", "confidence", "randomization"],
        steps=8,
        progress=lines.append,
    )
    assert lines[0].startswith("[1/4] GradCAM at 'features.relu3'") and len(lines) == 4
    return evaluation


def test_evaluation_table_records_markdown_and_recommendation(
    digits_evaluation: Evaluation,
) -> None:
    evaluation = digits_evaluation
    assert len(evaluation.rows) == 4
    records = evaluation.records()
    assert [r["rank"] for r in records] == [1, 2, 3, 4]
    json.dumps(records)  # plain values
    for row in evaluation.rows:
        assert row.deletion is not None and row.insertion is not None
        assert 0 <= row.deletion <= 1 and 0 <= row.insertion <= 1  # probabilities
        assert row.randomization is not None and row.flagged is not None
        assert row.seconds > 0
        assert set(evaluation.curves[(row.method, row.layer)]) == {"deletion", "insertion"}
    # Grad-CAM leaves digits 5 and 8 blank at the last block (the demo's story).
    blank = {(r.method, r.layer): r.blank for r in evaluation.rows}
    assert blank[("GradCAM", "features.relu4")] == pytest.approx(0.2)
    best = evaluation.recommendation
    assert best.blank == 0 and not best.flagged
    text = str(evaluation)
    assert "ins - del" in text and "random. sim." in text and "sanity" in text
    assert text.splitlines()[2].split()[1:3] == [
        evaluation.rows[0].method,
        evaluation.rows[0].layer,
    ]
    markdown = evaluation.to_markdown().splitlines()
    assert markdown[0].startswith("| rank | method | layer |") and len(markdown) == 6
    assert markdown[1].startswith("| ---: | --- | --- |")
    why = evaluation.explain_recommendation()
    assert best.method in why and "blank" in why and "Spearman" in why


def test_evaluation_to_pandas(digits_evaluation: Evaluation) -> None:
    pandas = pytest.importorskip("pandas")
    frame = digits_evaluation.to_pandas()
    assert isinstance(frame, pandas.DataFrame)
    assert list(frame["rank"]) == [1, 2, 3, 4]


def test_evaluation_plot_writes_a_png(digits_evaluation: Evaluation, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    figure = digits_evaluation.plot(path, title="digits")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure.axes) == 3


def test_recommendation_avoids_blank_and_flagged_rows() -> None:
    rows = [
        EvaluationRow("A", "l1", 0.9, blank=0.5),
        EvaluationRow("B", "l1", 0.8, flagged=True),
        EvaluationRow("C", "l2", 0.7, flagged=False),
    ]
    assert Evaluation(rows).recommendation.method == "C"
    only_blank = [
        EvaluationRow("A", "l1", 0.9, blank=0.5),
        EvaluationRow("B", "l1", 0.8, blank=0.1),
    ]
    assert Evaluation(only_blank).recommendation.method == "B"


def test_evaluate_errors() -> None:
    model, x = _linear_case(n=1)
    options: dict[str, Any] = {"backend": LinearBackend(), "layers": ["input"]}
    with pytest.raises(OptionError, match="unknown metrics"):
        evaluate(model, x, metrics=["faithfulness"], **options)
    with pytest.raises(OptionError, match="unknown method"):
        evaluate(model, x, methods=["GradCam"], **options)
    with pytest.raises(OptionError, match="masks= or boxes="):
        evaluate(model, x, metrics=["pointing"], **options)
    with pytest.raises(OptionError, match="layers="):
        evaluate(model, x, layers="input", backend=LinearBackend())  # type: ignore[arg-type]


def test_evaluate_takes_classes_and_pointing_masks() -> None:
    model, x = _linear_case(n=2)
    masks = np.zeros((2, 6, 5), bool)
    masks[:, 2:4, 1:3] = True
    evaluation = evaluate(
        model,
        x,
        [0, 1],
        layers=["input"],
        methods=[mc.LayerCAM, "GradCAM"],
        metrics=["insertion", "pointing", "energy"],
        backend=LinearBackend(),
        masks=masks,
        softmax=False,
    )
    names = {row.method for row in evaluation.rows}
    assert names == {"LayerCAM", "GradCAM"}
    for row in evaluation.rows:
        assert row.deletion is None and row.faithfulness == row.insertion
        assert row.pointing is not None and row.energy is not None


# --- the command line --------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="multicam")
    commands = parser.add_subparsers(dest="command")
    add_cli_parser(commands)
    return parser.parse_args(["evaluate", *argv])


def test_cli_on_the_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require("torch")
    out, table = tmp_path / "eval.png", tmp_path / "eval.md"
    args = _parse(
        ["--methods", "GradCAM,HiResCAM", "--metrics", "deletion,insertion", "--steps", "8",
         "--framework", "torch", "--out", str(out), "--markdown", str(table)]
    )  # fmt: skip
    pytest.importorskip("matplotlib")
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    assert "[1/4] GradCAM at 'features.relu3'" in printed
    assert "recommended: " in printed and "ranked by faithfulness" in printed
    assert "at 'features.relu4': blank for digits 5, 8" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert table.read_text().startswith("| rank | method | layer |")


def test_cli_on_a_saved_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require("torch")
    import torch
    from PIL import Image

    weights, images, _ = demo.load()
    path = tmp_path / "digits.pt"
    torch.save(zoo.build("digits_cnn", "torch", weights), path)
    files = []
    for digit in (4, 9):
        files.append(tmp_path / f"{digit}.png")
        Image.fromarray((images[digit, :, :, 0] * 255).astype(np.uint8)).save(files[-1])
    args = _parse(
        [str(path), *map(str, files), "--layers", "features.relu3,features.relu4",
         "--methods", "LayerCAM", "--metrics", "deletion,insertion", "--steps", "4",
         "--channels", "1", "--out", str(tmp_path / "user.png")]
    )  # fmt: skip
    pytest.importorskip("matplotlib")
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    assert "digits.pt, 2 image(s)" in printed and "recommended: LayerCAM" in printed
    with pytest.raises(MulticamError, match="--layers"):
        run_cli(_parse([str(path), str(files[0])]))
    with pytest.raises(MulticamError, match="--metrics"):
        run_cli(_parse(["--metrics", "pointing"]))
