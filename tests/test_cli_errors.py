"""Every failure of the command line is one line on stderr and exit status 2; --version."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import _digit_png

import multicam
from multicam import cli, zoo
from multicam.cli import main


def _status(argv: list[str]) -> int | str | None:
    """main's status; usage errors exit through argparse's SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def _one_error_line(err: str, command: str = "explain") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"multicam {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_version_prints_the_distribution_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"multicam {cli.version()}"


def test_version_reads_multicam_xai_then_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def installed(name: str) -> str:
        asked.append(name)
        return "9.8.7"

    monkeypatch.setattr(importlib.metadata, "version", installed)
    assert cli.version() == "9.8.7" and asked == ["multicam-xai"]

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version() == multicam.__version__


@pytest.fixture
def torch_digits(tmp_path: Path) -> tuple[Path, Path]:
    torch = pytest.importorskip("torch")
    from multicam import demo

    model_path = tmp_path / "digits.pt"
    torch.save(zoo.build("digits_cnn", "torch", demo.load()[0]), model_path)
    return model_path, _digit_png(tmp_path / "four.png")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (["--target", "foo"], "'foo' is not a class id"),
        (["--target", "12"], "out of range"),
        (["--layer", "features.nope"], "no layer 'features.nope'"),
        (["--channels", "3"], "pass --channels 1"),
        (["IMAGE=missing.png"], "no image file"),
        (["IMAGE=digits.pt"], "cannot read"),
        (["MODEL=missing.pt"], "no model file"),
        (["--import", "missing.py"], "--import missing.py: no such file"),
    ],
)
def test_explain_failures_are_one_line_and_status_2(
    torch_digits: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    change: list[str],
    expected: str,
) -> None:
    model, image = torch_digits
    args = {"MODEL": str(model), "IMAGE": str(image)}
    options = ["--layer", "features.relu3", "--out", str(model.with_suffix(".png"))]
    for item in change:
        if "=" in item and item.split("=")[0] in args:
            key, value = item.split("=")
            args[key] = str(model.parent / value)
    options += [c for c in change if "=" not in c]
    code = _status(["explain", args["MODEL"], args["IMAGE"], *options])
    assert code == 2
    assert expected in _one_error_line(capsys.readouterr().err)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("the model's forward\nfailed")

    monkeypatch.setattr(cli, "explain", broken)
    assert main(["explain", "m.pt", "x.png", "--layer", "l"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "RuntimeError: the model's forward failed" in line and "--debug" in line
    with pytest.raises(RuntimeError):
        main(["explain", "m.pt", "x.png", "--layer", "l", "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError):
        main(["explain", "m.pt", "x.png", "--layer", "l"])


def test_usage_errors_are_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, command in [
        (["explain", "m.pt", "x.png"], "explain"),
        (["demo", "--digits", "12"], "demo"),
        (["compare", "--frameworks", "mxnet"], "compare"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        _one_error_line(capsys.readouterr().err, command)


def test_the_console_script_prints_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "multicam", "explain", "nope.pt", "nope.png", "--layer", "x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert _one_error_line(done.stderr) == "multicam explain: error: no model file 'nope.pt'"


def test_several_targets_by_comma(torch_digits: tuple[Path, Path]) -> None:
    model, image = torch_digits
    out = model.parent / "two.png"
    argv = ["explain", str(model), str(image), "--layer", "features.relu3"]
    code = main([*argv, "--target", "4,9", "--out", str(out)])
    assert code == 0 and out.exists()
    assert np.asarray(cli._targets("4,9")).tolist() == [4, 9]
