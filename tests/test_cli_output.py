"""What the command line prints: no framework log lines, aligned tables, warm timings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require
from test_cli import _digit_png

from multicam import bench, cli, zoo
from multicam.cli import format_table, main


def test_format_table_aligns_text_left_and_numbers_right() -> None:
    lines = format_table(["name", "ms"], [["torch", "5.77"], ["tensorflow", "147.08"]])
    assert lines == [
        "  name            ms",
        "  torch         5.77",
        "  tensorflow  147.08",
    ]


def test_compare_prints_aligned_tables_without_progress_noise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require("torch")
    frameworks = [f for f in ("torch", "flax") if f in zoo.installed_frameworks()]
    code = main(["compare", "--arch", "gap_cnn", "--frameworks", ",".join(frameworks)])
    assert code == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "..." not in out  # progress goes to a terminal's stderr only
    lines = out.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("  framework"))) :]
    table = table[: table.index("")] if "" in table else table
    assert len(table) == 1 + len(frameworks)
    end = len(table[0])  # "oracle err" is right-aligned: every row ends where it ends
    assert all(len(row) == end for row in table), table
    assert [row.split()[0] for row in table[1:]] == frameworks
    if len(frameworks) > 1:
        pairs = [x for x in lines if " ~ " in x]
        assert pairs and all(x.rstrip().endswith("agree") for x in pairs)
        header = next(x for x in lines if x.startswith("  backends"))
        verdict = header.index("verdict")
        assert all(x.index("agree") == verdict for x in pairs), (header, pairs)


def test_bench_prints_an_aligned_table_not_a_dict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frameworks = bench.available_frameworks()
    if not frameworks:
        pytest.skip("no framework installed")
    argv = ["--quick", "--no-peers", "--frameworks", frameworks[0], "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "{'" not in out and "': " not in out  # no raw Python dict
    lines = out.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("  arch "))
    table = lines[start : lines.index("", start)]
    header = table[0]
    best_end = header.index("best ms/batch") + len("best ms/batch")
    for row in table[1:]:
        assert row.startswith("  digits_cnn")
        assert row[best_end - 1] != " " and row[best_end] == " ", (header, row)
    assert "multicam-numpy: best" in out
    assert "| goal |" in (tmp_path / "bench.md").read_text()  # the file stays Markdown


def test_timings_start_after_a_warm_up_call() -> None:
    calls = []

    def explain() -> int:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)  # tracing, compilation, caches
        return len(calls)

    result, warmup, best = cli.timed(explain, repeats=3)
    assert len(calls) == 4 and result == 4
    assert warmup >= 0.3 and best < 0.1


def test_the_cli_quiets_framework_logs_but_the_library_does_not(tmp_path: Path) -> None:
    require("keras")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "MULTICAM_DEBUG"))}
    script = "import multicam, multicam.cli, os; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == "None"  # importing multicam changes no logging

    model = tmp_path / "digits.keras"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, keras; from multicam import zoo, demo; "
            "zoo.build('digits_cnn', 'keras', demo.load()[0]).save(sys.argv[1])",
            str(model),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    _digit_png(tmp_path / "four.png")
    command = [sys.executable, "-m", "multicam", "explain", str(model), "four.png"]
    command += ["--layer", "features/relu3"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # no oneDNN, CPU-feature, CUDA or absl lines
    assert "explained class 4" in done.stdout
