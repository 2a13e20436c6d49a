"""``multicam.dataset.explain_dataset`` on the local engine.

The stores are compared with the explainer called batch by batch (the reference a user
would write), on the shipped, trained digits CNN. Within one process the numbers are
identical; the crash and memory tests run the engine in a subprocess.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require

zarr = pytest.importorskip("zarr", minversion="3")

import multicam as mc  # noqa: E402
from multicam import dataset, demo, zoo  # noqa: E402
from multicam.diagnose import blank_maps  # noqa: E402

LAYER = "features.relu3"
ARRAYS = ("maps", "scores", "targets", "blank", "index", "done")


@pytest.fixture(autouse=True)
def _torch() -> None:
    require("torch")


def digits_model() -> Any:
    """The demo's trained digits CNN in torch (a model factory)."""
    weights, _, _ = demo.load()
    return zoo.build("digits_cnn", "torch", weights)


def digits(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 1, 28, 28)`` the ten shipped digits, repeated with a little noise.

    A fresh C-ordered copy: torch picks its kernels by the strides, and a channels-first
    view of channels-last data (a size-1 channel axis with stride 4) can take a
    channels-last path whose sums differ in the last bit.
    """
    _, images, _ = demo.load()
    rng = np.random.default_rng(seed)
    x = np.concatenate([images] * (n // len(images) + 1))[:n]
    x = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    return np.moveaxis(x, -1, 1).copy()


def by_batch(
    x: np.ndarray, batch_size: int, targets: Any, chunk: int | None = None, **call: Any
) -> dict[str, np.ndarray]:
    """The reference: the explainer called batch by batch (and target chunk by chunk)."""
    explainer = mc.GradCAM(digits_model(), LAYER)
    parts: dict[str, list[np.ndarray]] = {"maps": [], "scores": [], "targets": [], "blank": []}
    for start in range(0, len(x), batch_size):
        batch = np.array(x[start : start + batch_size])
        n = len(batch)
        requests: list[Any]
        if chunk is None:
            requests = [targets if not isinstance(targets, np.ndarray) else targets[start:][:n]]
        else:  # targets == "all" on 10 classes
            requests = [
                np.tile(np.arange(j, min(10, j + chunk)), (n, 1)) for j in range(0, 10, chunk)
            ]
        results = [explainer(batch, request, warn=False, **call) for request in requests]
        parts["maps"].append(np.concatenate([r.maps for r in results], axis=1))
        parts["scores"].append(np.concatenate([r.scores for r in results], axis=1))
        parts["targets"].append(np.concatenate([r.targets for r in results], axis=1))
        parts["blank"].append(np.concatenate([blank_maps(r.raw) for r in results], axis=1))
    return {name: np.concatenate(values) for name, values in parts.items()}


def read(store: Any) -> dict[str, np.ndarray]:
    return {name: store[name][:] for name in ARRAYS}


def assert_same_store(a: Any, b: Any) -> None:
    for name, values in read(a).items():
        np.testing.assert_array_equal(values, b[name][:], err_msg=name)


def test_store_holds_the_explainer_maps_every_row_once(tmp_path: Path) -> None:
    x = digits(45)  # 45 rows in batches of 8: the last batch has 5
    res = dataset.explain_dataset(
        digits_model,
        LAYER,
        x,
        tmp_path / "all.zarr",
        targets="all",
        batch_size=8,
        target_chunk=3,  # 10 classes in chunks of 3, 3, 3, 1
        progress=False,
        dtype="float32",
    )
    reference = by_batch(x, 8, "all", chunk=3)
    for name, values in reference.items():
        np.testing.assert_array_equal(res.store[name][:], values, err_msg=name)
    # one call with all ten classes: the same maps up to float32 rounding
    whole = by_batch(x, 8, "all")
    np.testing.assert_allclose(res.maps[:], whole["maps"], rtol=0, atol=1e-6)
    assert res.maps.shape == (45, 10, 28, 28)
    assert res.maps.chunks == (8, 3, 28, 28)
    np.testing.assert_array_equal(res.index[:], np.arange(45))
    assert res.store["done"][:].all() and res.store["done"].shape == (45, 4)
    assert (res.rows, res.num_targets, res.computed, res.skipped) == (45, 10, 45, 0)
    attrs = res.attrs
    assert attrs["layer"] == LAYER and attrs["method"] == "GradCAM"
    assert attrs["backend"] == "torch" and attrs["complete"] is True
    assert attrs["options"]["size"] == "input" and attrs["options"]["relu"] is True
    assert attrs["multicam_version"] == mc.__version__
    assert res.store["maps"].metadata.dimension_names == ("sample", "target", "y", "x")

    # the default float16 store holds the same numbers, rounded to float16
    half = dataset.explain_dataset(
        digits_model, LAYER, x, tmp_path / "half.zarr", targets="all", batch_size=8,
        target_chunk=3, progress=False,
    )  # fmt: skip
    assert half.maps.dtype == np.float16
    np.testing.assert_array_equal(half.maps[:], reference["maps"].astype(np.float16))


@pytest.mark.parametrize(
    "targets",
    [None, 4, "rows", "array"],
    ids=["predicted", "int", "one-per-row", "n-by-t"],
)
def test_target_requests(tmp_path: Path, targets: Any) -> None:
    x = digits(21)
    rng = np.random.default_rng(1)
    if targets == "rows":
        targets = rng.integers(0, 10, 21)
    elif targets == "array":
        targets = rng.integers(0, 10, (21, 2))
    res = dataset.explain_dataset(
        digits_model, LAYER, x, tmp_path / "t.zarr", targets=targets, batch_size=8,
        progress=False, dtype="float32",
    )  # fmt: skip
    reference = by_batch(x, 8, targets)
    for name, values in reference.items():
        np.testing.assert_array_equal(res.store[name][:], values, err_msg=name)
    if targets is None:  # the predicted class
        outputs = mc.GradCAM(digits_model(), LAYER)(x, warn=False).outputs
        assert outputs is not None
        np.testing.assert_array_equal(res.targets[:, 0], outputs.argmax(1))


def write_pngs(folder: Path, n: int) -> list[str]:
    """Grey digits of mixed sizes as PNGs, some in a subfolder; returns sorted names."""
    image_module = pytest.importorskip("PIL.Image")
    _, images, _ = demo.load()
    sizes = [(28, 28), (20, 24), (40, 31), (56, 56), (17, 33)]
    names = []
    for i in range(n):
        pixels = (images[i % 10, :, :, 0] * 255).astype(np.uint8)
        picture = image_module.fromarray(pixels).resize(sizes[i % len(sizes)][::-1])
        name = f"{'sub/' if i % 3 == 0 else ''}digit{i:02d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        picture.save(folder / name)
        names.append(name)
    (folder / "notes.txt").write_text("not an image")
    return sorted(names)


def read_pngs(folder: Path, names: list[str]) -> np.ndarray:
    """What explain_dataset promises for a folder: grey, bilinear to 28x28, [0, 1], NCHW."""
    image_module = pytest.importorskip("PIL.Image")
    rows = []
    for name in names:
        with image_module.open(folder / name) as picture:
            resized = picture.convert("L").resize((28, 28), image_module.Resampling.BILINEAR)
            rows.append(np.asarray(resized, np.float32) / np.float32(255))
    return np.stack(rows)[:, None]


def test_folder_of_pngs_of_mixed_sizes(tmp_path: Path) -> None:
    names = write_pngs(tmp_path / "pngs", 13)
    res = dataset.explain_dataset(
        digits_model, LAYER, tmp_path / "pngs", tmp_path / "f.zarr", targets="all",
        batch_size=4, image_size=(28, 28), progress=False, dtype="float32",
    )  # fmt: skip
    assert list(res.index[:]) == names  # sorted relative paths, the text file skipped
    reference = by_batch(read_pngs(tmp_path / "pngs", names), 4, "all")
    for name, values in reference.items():
        np.testing.assert_array_equal(res.store[name][:], values, err_msg=name)
    assert res.attrs["source"]["kind"] == "folder"
    assert res.attrs["source"]["channels"] == 1


def test_memmap_and_npy_sources_read_by_file(tmp_path: Path) -> None:
    x = digits(19)
    np.save(tmp_path / "x.npy", x)
    from_path = dataset.explain_dataset(
        digits_model, LAYER, tmp_path / "x.npy", tmp_path / "a.zarr", batch_size=8,
        progress=False,
    )  # fmt: skip
    assert from_path.attrs["source"]["kind"] == "memmap"
    in_memory = dataset.explain_dataset(
        digits_model, LAYER, x, tmp_path / "b.zarr", batch_size=8, progress=False
    )
    for name in ("maps", "scores", "targets", "blank", "index"):
        np.testing.assert_array_equal(from_path.store[name][:], in_memory.store[name][:])
    # a view of a memory map keeps the original's offset: it is read as an array instead
    view = np.load(tmp_path / "x.npy", mmap_mode="r")[3:]
    sliced = dataset.explain_dataset(
        digits_model, LAYER, view, tmp_path / "c.zarr", batch_size=8, progress=False
    )
    assert sliced.attrs["source"]["kind"] == "array"
    np.testing.assert_array_equal(sliced.scores[:], by_batch(x[3:], 8, None)["scores"])


CRASHING_RUN = """
import os, signal, sys
import numpy as np
import torch
from multicam import dataset, demo, zoo

class KillOnSecondSentinelCall(torch.nn.Module):
    # The process dies (SIGKILL, nothing cleaned up) on the second call that sees a marked
    # row: after batch 3's first target chunk is stored, before its second.
    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, 0
    def forward(self, x):
        if (x[:, 0, 0, 0] == -1.0).any():
            self.seen += 1
            if self.seen == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.model(x)

def factory():
    weights, _, _ = demo.load()
    return KillOnSecondSentinelCall(zoo.build("digits_cnn", "torch", weights))

dataset.explain_dataset(factory, "model.features.relu3", sys.argv[1], sys.argv[2], targets="all",
                        batch_size=8, target_chunk=5, progress=False)
"""


def wrapped_digits() -> Any:
    """The digits CNN under the crashing model's layer names, without the crash."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = digits_model()

        def forward(self, x: Any) -> Any:
            return self.model(x)

    return Wrapper()


def test_killed_run_resumes_to_the_uninterrupted_store(tmp_path: Path) -> None:
    x = digits(45)
    x[26, 0, 0, 0] = -1.0  # marks batch 3 (rows 24-31) for the crashing model
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_RUN)
    crashed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "x.npy"), str(tmp_path / "resumed.zarr")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    partial = zarr.open_group(tmp_path / "resumed.zarr", mode="r")
    done = partial["done"][:]
    assert done[:24].all() and done[24:32, 0].all()  # batches 0-2, and batch 3's chunk 0
    assert not done[24:32, 1].any() and not done[32:].any()

    resumed = dataset.explain_dataset(
        wrapped_digits, "model.features.relu3", tmp_path / "x.npy", tmp_path / "resumed.zarr",
        targets="all", batch_size=8, target_chunk=5, progress=False,
    )  # fmt: skip
    assert resumed.skipped == 24 and resumed.computed == 21
    whole = dataset.explain_dataset(
        wrapped_digits, "model.features.relu3", tmp_path / "x.npy", tmp_path / "whole.zarr",
        targets="all", batch_size=8, target_chunk=5, progress=False,
    )  # fmt: skip
    assert_same_store(resumed.store, whole.store)
    assert resumed.attrs["complete"] is True

    again = dataset.explain_dataset(
        wrapped_digits, "model.features.relu3", tmp_path / "x.npy", tmp_path / "resumed.zarr",
        targets="all", batch_size=8, target_chunk=5, progress=False,
    )  # fmt: skip
    assert (again.computed, again.skipped) == (0, 45)


def test_a_store_resumes_only_the_same_run(tmp_path: Path) -> None:
    x = digits(12)
    out = tmp_path / "s.zarr"
    first = dataset.explain_dataset(digits_model, LAYER, x, out, batch_size=8, progress=False)
    with pytest.raises(mc.OptionError, match=r"another run.*layer.*overwrite=True"):
        dataset.explain_dataset(digits_model, "features.relu2", x, out, progress=False)
    with pytest.raises(mc.OptionError, match="batch_size: 8 there, 4 now"):
        dataset.explain_dataset(digits_model, LAYER, x, out, batch_size=4, progress=False)
    replaced = dataset.explain_dataset(
        digits_model, "features.relu2", x, out, batch_size=4, progress=False, overwrite=True
    )
    assert replaced.attrs["layer"] == "features.relu2" and replaced.maps.shape[0] == 12
    assert first.rows == 12
    zarr.open_group(tmp_path / "other.zarr", mode="w").create_array("a", shape=(1,), dtype="i4")
    with pytest.raises(mc.OptionError, match="no multicam run"):
        dataset.explain_dataset(digits_model, LAYER, x, tmp_path / "other.zarr", progress=False)


def test_memory_budget_chooses_the_target_chunk(tmp_path: Path) -> None:
    x = digits(9)
    # relu3: 20 channels on 16x16, maps 28x28: about 50 KB per sample and target
    res = dataset.explain_dataset(
        digits_model, LAYER, x, tmp_path / "m.zarr", targets="all", batch_size=8,
        memory_budget=1_300_000, progress=False,
    )  # fmt: skip
    chunk = res.attrs["target_chunk"]
    assert 1 < chunk < 10 and res.maps.chunks[1] == chunk
    np.testing.assert_array_equal(
        res.maps[:], by_batch(x, 8, "all", chunk=chunk)["maps"].astype(np.float16)
    )
    # a rerun keeps the store's chunks whatever it asks for
    again = dataset.explain_dataset(
        digits_model, LAYER, x, tmp_path / "m.zarr", targets="all", batch_size=8,
        target_chunk=10, progress=False,
    )  # fmt: skip
    assert again.skipped == 9 and again.attrs["target_chunk"] == chunk


MEASURE_PEAK = """
import sys
import torch
from multicam import dataset, demo, zoo

def factory():
    weights, _, _ = demo.load()
    return zoo.build("digits_cnn", "torch", weights)

dataset.explain_dataset(factory, "features.relu3", sys.argv[1], sys.argv[2], targets="all",
                        batch_size=32, progress=False, dtype="float32")
# VmHWM is this address space's peak; ru_maxrss would keep the parent's across exec
print(next(int(line.split()[1]) for line in open("/proc/self/status") if "VmHWM" in line))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_peak_memory_does_not_grow_with_the_data_set(tmp_path: Path) -> None:
    script = tmp_path / "peak.py"
    script.write_text(MEASURE_PEAK)
    peaks = {}
    for n in (128, 16 * 128):
        np.save(tmp_path / f"x{n}.npy", digits(n))
        run = subprocess.run(
            [sys.executable, str(script), str(tmp_path / f"x{n}.npy"), str(tmp_path / f"{n}")],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).parent.parent,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[n] = int(run.stdout.split()[-1]) * 1024  # VmHWM is in KiB
    # Held in memory, 2048 rows x 10 classes would be 64 MB of float32 maps and 420 MB of
    # gradients at relu3 (20 x 16 x 16). Streamed, the peak is one batch's, plus what the
    # allocator keeps for zarr's codec threads: 10-30 MiB more in the longer run here,
    # and no more at 8192 rows (measured 394, 404, 407 MiB at 128, 2048, 8192 rows).
    growth = peaks[16 * 128] - peaks[128]
    assert growth < 48 * 2**20, f"peak RSS {peaks}: grew by {growth / 2**20:.1f} MiB"


def linen_digits() -> tuple[Any, Any]:
    weights, _, _ = demo.load()
    return zoo.build("digits_cnn", "flax", weights)  # type: ignore[no-any-return]


def test_linen_factory_returns_module_and_variables(tmp_path: Path) -> None:
    require("flax")
    x = np.moveaxis(digits(10), 1, -1).copy()  # NHWC for Flax
    res = dataset.explain_dataset(
        linen_digits, "features/relu3", x, tmp_path / "l.zarr", targets=3, batch_size=4,
        progress=False, dtype="float32",
    )  # fmt: skip
    module, variables = linen_digits()
    explainer = mc.GradCAM(module, "features/relu3", variables=variables)
    maps = np.concatenate([explainer(x[i : i + 4], 3, warn=False).maps for i in (0, 4, 8)])
    np.testing.assert_array_equal(res.maps[:], maps)
    assert res.attrs["backend"] == "jax" and res.attrs["input_layout"] == "channels_last"


def test_options_reach_the_explainer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x = digits(6)
    res = dataset.explain_dataset(
        digits_model, LAYER, x, tmp_path / "o.zarr", method="XGradCAM", batch_size=4,
        size=None, relu=False, normalize=False, progress=True, dtype="float32",
    )  # fmt: skip
    if importlib.util.find_spec("tqdm") is not None:  # the bar counts images per second
        assert "6/6" in capsys.readouterr().err
    explainer = mc.XGradCAM(digits_model(), LAYER)
    reference = [explainer(x[i : i + 4], size=None, relu=False, normalize=False) for i in (0, 4)]
    np.testing.assert_array_equal(res.maps[:], np.concatenate([r.maps for r in reference]))
    assert res.maps.shape == (6, 1, 16, 16)  # the layer's resolution
    assert res.attrs["method"] == "XGradCAM" and res.attrs["options"]["size"] is None


def test_errors_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = digits(5)
    out = tmp_path / "e.zarr"
    run = functools.partial(dataset.explain_dataset, digits_model, LAYER, x, out, progress=False)
    with pytest.raises(mc.OptionError, match="engine='spark'"):
        run(engine="spark")
    with pytest.raises(mc.OptionError, match="by name"):
        dataset.explain_dataset(digits_model, object(), x, out)
    with pytest.raises(mc.OptionError, match="GradCAM"):
        run(method="GuidedBackprop")
    with pytest.raises(mc.TargetError, match="callable"):
        run(targets=lambda outputs: outputs[:, 0])
    with pytest.raises(mc.TargetError, match="4 rows for a data set of 5"):
        run(targets=[1, 2, 3, 4])
    with pytest.raises(mc.TargetError, match="class 12 is out of range"):
        run(targets=12)
    with pytest.raises(mc.OptionError, match="batch_size=0"):
        run(batch_size=0)
    with pytest.raises(mc.OptionError, match="variables= is not an option"):
        run(variables={})
    (tmp_path / "empty").mkdir()
    with pytest.raises(mc.InputError, match="holds no images"):
        dataset.explain_dataset(digits_model, LAYER, tmp_path / "empty", out)
    with pytest.raises(mc.InputError, match="neither a folder"):
        dataset.explain_dataset(digits_model, LAYER, tmp_path / "missing.npy", out)
    with pytest.raises(mc.LayerError, match=r"features\.nope"):
        dataset.explain_dataset(digits_model, "features.nope", x, tmp_path / "l.zarr")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(mc.BackendNotInstalledError, match=r"multicam-xai\[ray\]"):
        run(engine="ray")
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(mc.BackendNotInstalledError, match=r"multicam-xai\[zarr\]"):
        run()


def test_cli_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(tmp_path / "x.npy", digits(10))
    (tmp_path / "dataset_cli_nets.py").write_text(
        textwrap.dedent(
            """
            from multicam import demo, zoo

            def make():
                weights, _, _ = demo.load()
                return zoo.build("digits_cnn", "torch", weights)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="multicam")
    dataset.add_cli_parser(parser.add_subparsers(dest="command"))
    argv = [
        "explain-dataset", "dataset_cli_nets.py:make", "x.npy", "cli.zarr", "--layer", LAYER,
        "--targets", "all", "--batch-size", "4", "--target-chunk", "5", "--size", "none",
        "--no-progress", "--dtype", "float32",
    ]  # fmt: skip
    args = parser.parse_args(argv)
    try:
        assert dataset.run_cli(args) == 0
    finally:
        sys.modules.pop("dataset_cli_nets", None)
    store = zarr.open_group(tmp_path / "cli.zarr", mode="r")
    assert store["maps"].shape == (10, 10, 16, 16)
    assert store.attrs["options"]["size"] is None and store["done"][:].all()
    reference = by_batch(digits(10), 4, "all", chunk=5, size=None)
    np.testing.assert_array_equal(store["maps"][:], reference["maps"])


def test_import_multicam_dataset_imports_no_optional_dependency() -> None:
    code = (
        "import sys, multicam.dataset; "
        "print(sorted(m for m in ('zarr', 'ray', 'PIL', 'tqdm', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**os.environ}, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "[]"
