"""``multicam explain`` loads models pickled from a user's script or a module beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from test_cli import _digit_png

from multicam.cli import main

NET = """
import torch
from torch import nn


class {name}(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.features(x))
"""


def _save(folder: Path, script: str) -> None:
    """Run ``script`` in ``folder`` as a user would: ``python train.py``."""
    (folder / "train.py").write_text(textwrap.dedent(script))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "train.py"], cwd=folder, check=True, env=env)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh working directory; sys.path restored afterwards."""
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    _digit_png(tmp_path / "four.png")
    return tmp_path


def _explain(*extra: str) -> int:
    return main(["explain", "net.pt", "four.png", "--layer", "features.1", *extra])


def test_a_class_pickled_from_main_needs_and_finds_import(
    isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"Net{uuid.uuid4().hex[:8]}"
    _save(
        isolated,
        NET.format(name=name)
        + f'\n\nif __name__ == "__main__":\n    torch.save({name}(), "net.pt")\n',
    )
    assert _explain() == 2
    err = capsys.readouterr().err
    assert f"class {name} was defined in the script that saved it" in err
    assert "--import train.py" in err  # the file that defines it, found without running it
    assert _explain("--import", "train.py", "--out", "net.png") == 0
    assert "explained class" in capsys.readouterr().out
    assert (isolated / "net.png").exists()
    sys.modules.pop("train", None)


def test_a_class_from_a_module_in_the_current_directory(
    isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = f"nets_{uuid.uuid4().hex[:8]}"
    (isolated / f"{module}.py").write_text(NET.format(name="Net"))
    _save(isolated, f'import torch\nfrom {module} import Net\ntorch.save(Net(), "net.pt")\n')
    try:
        assert _explain("--out", "net.png") == 0
    finally:
        sys.modules.pop(module, None)


def test_a_missing_module_names_the_fix(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = f"nets_{uuid.uuid4().hex[:8]}"
    (isolated / f"{module}.py").write_text(NET.format(name="Net"))
    _save(isolated, f'import torch\nfrom {module} import Net\ntorch.save(Net(), "net.pt")\n')
    (isolated / "lib").mkdir()
    shutil.move(isolated / f"{module}.py", isolated / "lib" / f"{module}.py")
    assert _explain() == 2
    err = capsys.readouterr().err
    assert f"needs module '{module}'" in err and f"--import path/to/{module}.py" in err
    try:
        assert _explain("--import", f"lib/{module}.py", "--out", "net.png") == 0
    finally:
        sys.modules.pop(module, None)


def test_the_console_script_loads_a_script_pickled_model(tmp_path: Path) -> None:
    """The reported case, end to end: ``multicam explain`` whose own __main__ is the CLI."""
    pytest.importorskip("torch")
    _save(
        tmp_path,
        NET.format(name="Net") + '\n\nif __name__ == "__main__":\n'
        '    torch.save(Net(), "net.pt")\n',
    )
    _digit_png(tmp_path / "four.png")
    command = [sys.executable, "-m", "multicam", "explain", "net.pt", "four.png"]
    command += ["--layer", "features.1", "--import", "train.py"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert (tmp_path / "multicam-explain.png").exists()


def test_help_documents_import() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "multicam", "explain", "--help"], capture_output=True, text=True
    )
    assert "--import MODULE_OR_FILE.py" in done.stdout
    assert "__main__" in done.stdout and "--import train.py" in done.stdout
