"""The README tells the truth: its test command is CI's, its examples run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import require

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    section = README.split("## Run the tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()  # type: ignore[union-attr]
    assert ci_lines == [command]


def test_readme_example_runs() -> None:
    for framework in ("torch", "keras", "flax", "nnx"):
        require(framework)
    example = re.search(r"```python\n(.+?)\n```", README, re.S).group(1)  # type: ignore[union-attr]
    namespace: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), namespace)
    res = namespace["res"]
    assert res.maps.shape == (4, 1, 28, 28)  # type: ignore[attr-defined]
    assert np.isfinite(res.maps).all()  # type: ignore[attr-defined]


def test_cli_compare_runs() -> None:
    require("torch")
    from multicam.cli import main

    assert main(["compare", "--arch", "gap_cnn", "--frameworks", "torch", "--repeats", "1"]) == 0
    with pytest.raises(SystemExit):
        main(["compare", "--frameworks", "mxnet"])


@pytest.mark.parametrize("module", ["algebra", "targets", "zoo", "cam", "errors"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    if module == "cam":
        require("torch")
    failures, _ = doctest.testmod(importlib.import_module(f"multicam.{module}"))
    assert failures == 0
