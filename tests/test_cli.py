"""The command line through its entry point: demo end to end, compare, explain."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from multicam import zoo
from multicam.cli import main

pytest.importorskip("matplotlib")


def _picture_is_non_trivial(path: Path) -> None:
    from PIL import Image

    assert path.exists() and path.stat().st_size > 10_000
    pixels = np.asarray(Image.open(path).convert("RGB"), np.float32)
    assert pixels.std() > 20  # not a blank canvas
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # many colours: real maps


def test_demo_runs_end_to_end_on_every_installed_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    frameworks = zoo.installed_frameworks()
    for framework in frameworks:
        assert f"{framework}: building" in printed
    if len(frameworks) > 1:
        assert "DISAGREE" not in printed and printed.count(" agree") >= 1
    # The shipped model reproduces the report: digit 5's own class is blank at relu4.
    assert "why is the map of digit 5 blank for its own class?" in printed
    assert "100% negative" in printed
    assert "ms / batch" in printed and "after a warm-up call" in printed
    _picture_is_non_trivial(out)
    # One backend's grid and an agreement table, not one block per backend.
    width, height = _size(out)
    assert width >= 1000 and height < 1.3 * width


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_compare_exits_zero_when_backends_agree(capsys: pytest.CaptureFixture[str]) -> None:
    require("torch")
    assert main(["compare", "--arch", "gap_cnn", "--frameworks", "torch", "--repeats", "1"]) == 0
    assert "oracle err" in capsys.readouterr().out


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--frameworks", "mxnet"])
    with pytest.raises(SystemExit):
        main(["demo", "--digits", "12"])


def _digit_png(path: Path) -> Path:
    from PIL import Image

    from multicam import demo

    _, images, _ = demo.load()
    Image.fromarray((images[4, ..., 0] * 255).astype(np.uint8)).save(path)
    return path


def test_explain_a_whole_torch_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    from multicam import demo

    model_path = tmp_path / "digits.pt"
    torch.save(zoo.build("digits_cnn", "torch", demo.load()[0]), model_path)
    out = tmp_path / "explained.png"
    code = main(
        [
            "explain",
            str(model_path),
            str(_digit_png(tmp_path / "four.png")),
            "--layer",
            "features.relu3",
            "--channels",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "class 4" in capsys.readouterr().out  # the predicted class of the digit four
    _picture_is_non_trivial(out)
    assert _size(out)[0] >= 600  # readable at normal size, not 264 x 88


def test_explain_a_keras_file(tmp_path: Path) -> None:
    require("keras")
    from multicam import demo

    model_path = tmp_path / "digits.keras"
    zoo.build("digits_cnn", "keras", demo.load()[0]).save(model_path)
    out = tmp_path / "explained.png"
    code = main(
        [
            "explain",
            str(model_path),
            str(_digit_png(tmp_path / "four.png")),
            "--layer",
            "features/relu3",
            "--target",
            "all",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert out.exists()


def flax_digits() -> object:
    """A Flax entry point for ``multicam explain --flax test_cli:flax_digits``."""
    from multicam import demo

    return zoo.build("digits_cnn", "flax", demo.load()[0])


def test_explain_a_flax_entry_point(tmp_path: Path) -> None:
    require("flax")
    out = tmp_path / "explained.png"
    code = main(
        [
            "explain",
            "test_cli:flax_digits",
            str(_digit_png(tmp_path / "four.png")),
            "--flax",
            "--layer",
            "features/relu3",
            "--channels",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.exists()


def test_explain_reports_unknown_formats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    code = main(["explain", str(tmp_path / "model.onnx"), "x.png", "--layer", "l"])
    assert code == 2
    assert "unknown model format '.onnx'" in capsys.readouterr().err


def test_entry_point_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "multicam", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("demo", "compare", "explain"):
        assert command in out
    script = shutil.which("multicam")
    if script is not None:  # installed as a console script
        out = subprocess.run([script, "demo", "--help"], capture_output=True, text=True, check=True)
        assert "--digits" in out.stdout


def test_evaluate_command_is_wired(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    require("torch")
    from multicam.cli import main

    out = tmp_path / "curves.png"
    code = main(
        [
            "evaluate",
            "--framework",
            "torch",
            "--methods",
            "GradCAM,HiResCAM",
            "--metrics",
            "deletion,insertion",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "recommended:" in printed and "HiResCAM" in printed


def test_explain_dataset_command_is_wired(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    require("torch")
    pytest.importorskip("zarr")
    factory = tmp_path / "factory_mod.py"
    factory.write_text(
        "from multicam import demo, zoo\n\n"
        "def make():\n"
        "    return zoo.build('digits_cnn', 'torch', demo.load()[0])\n"
    )
    from multicam import demo

    images = np.moveaxis(demo.load()[1][:5], -1, 1).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    argv = [
        "explain-dataset",
        f"{factory}:make",
        str(tmp_path / "x.npy"),
        str(tmp_path / "cams.zarr"),
        "--layer",
        "features.relu3",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "5 explained now" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 explained now, 5 already done" in capsys.readouterr().out
