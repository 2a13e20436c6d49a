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
        torch_compile=[],
        numpy_stage_n=2,
        forward_n=None,
        log=lambda line: None,
    )
    contenders = {(t["targets"], t["contender"], t["kind"]) for t in result["timings"]}
    assert {
        (1, "forward", "forward"),
        (1, "floor", "floor"),
        (1, "multicam", "multicam"),
        (2, "multicam", "multicam"),
        (2, "multicam-T1", "multicam-extra"),  # one target in the same rounds as T=2
        (1, "multicam-backend", "multicam-extra"),  # the backend without the NumPy stage
        (2, "floor-loop", "floor") if framework != "flax" else (2, "floor", "floor"),
    } <= contenders
    assert all(t["best"] > 0 for t in result["timings"])
    assert any(g["goal"].startswith("one target <= 1.3x") for g in result["goals"])
    if framework == "keras":  # the eager forms are reported beside the compiled floor
        assert {(1, "floor-eager", "floor-extra"), (1, "multicam-eager", "multicam-extra")} <= (
            contenders
        )
    if framework in ("keras", "flax"):  # multicam compiles: other classes must not retrace
        records = result["retraces"]
        assert [(r["framework"], r["targets"]) for r in records] == [(framework, 1), (framework, 2)]
        assert all(r["traces_before"] >= 1 for r in records)
        assert any(g["goal"].startswith("no new traces") for g in result["goals"])
    else:
        assert result["retraces"] == []
    paths = bench.write(result, tmp_path, "tiny")
    assert json.loads(paths["json"].read_text())["settings"]["archs"] == ["digits_cnn"]
    markdown = paths["md"].read_text()
    assert "| goal |" in markdown and "| net | N | framework |" in markdown


def test_networks_split_at_their_layer() -> None:
    from multicam import zoo

    assert "resnet50" not in zoo.ARCHITECTURES
    spec = zoo.BENCHMARK_ARCHITECTURES["resnet50"]
    assert spec.input_shape == (224, 224, 3) and spec.num_classes == 1000
    _features, head = bench.split(spec, "layer4")
    assert head.input_shape == (7, 7, 2048)
    assert [op.name for op in head.layers] == ["avgpool", "fc"]
    _features, head = bench.split(bench.gap64(), "features.relu3")
    assert head.input_shape == (16, 16, 64)  # issue 13's layer: 16x16, 64 channels
    classes = bench.classes(4, 10, 10)
    assert all(len(set(row)) == 10 for row in classes.tolist())
    assert not (bench.classes(4, 10, 10, shift=1) == classes).any()


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
