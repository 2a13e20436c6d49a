"""The benchmark suite starts and reports: a tiny configuration per installed backend.

No time is asserted (shared, noisy machines); the suite itself runs in ``nox -s bench``.
"""

from __future__ import annotations

import contextlib
import json

import pytest

with contextlib.suppress(ImportError):
    import torch  # noqa: F401  (torch before TensorFlow)

from multicam import bench

FRAMEWORKS = ["torch", "keras", "flax"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_tiny_configuration_runs(framework: str, tmp_path) -> None:
    if framework not in bench.available_frameworks():
        pytest.skip(f"{framework} is not installed")
    result = bench.run(
        archs=["digits_cnn"],
        frameworks=[framework],
        batches=[1],
        targets=[1, 2],
        repeats=1,
        peers=False,
        memory=False,
        nojit_batches=[],
        numpy_stage_n=2,
        forward_n=None,
        log=lambda line: None,
    )
    contenders = {(t["targets"], t["contender"]) for t in result["timings"]}
    assert {(1, "forward"), (1, "floor"), (1, "multicam"), (2, "multicam")} <= contenders
    assert all(t["best"] > 0 for t in result["timings"])
    assert any(g["goal"].startswith("T targets") for g in result["goals"])
    if framework == "flax":
        (record,) = result["jax_recompilations"]
        assert record["traces_after"] >= record["traces_before"]
    paths = bench.write(result, tmp_path, "tiny")
    assert json.loads(paths["json"].read_text())["settings"]["archs"] == ["digits_cnn"]
    assert "| goal |" in paths["md"].read_text()


def test_resnet50_is_a_benchmark_architecture_only() -> None:
    from multicam import zoo

    assert "resnet50" not in zoo.ARCHITECTURES
    spec = zoo.BENCHMARK_ARCHITECTURES["resnet50"]
    assert spec.input_shape == (224, 224, 3) and spec.num_classes == 1000
    _features, head = bench._split(spec, "layer4")
    assert head.input_shape == (7, 7, 2048)
    assert [op.name for op in head.layers] == ["avgpool", "fc"]


def test_main_quick_writes_outputs(tmp_path, capsys) -> None:
    frameworks = bench.available_frameworks()
    if not frameworks:
        pytest.skip("no framework installed")
    code = bench.main(
        ["--quick", "--no-peers", "--frameworks", frameworks[0], "--out", str(tmp_path)]
    )
    assert code == 0
    assert (tmp_path / "bench.json").exists()
    out = capsys.readouterr().out
    assert "arch" in out and "contender" in out
    assert "{'" not in out  # a readable table, not a raw dict
