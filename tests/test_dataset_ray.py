"""``multicam.dataset.explain_dataset`` on the Ray engine, against a local Ray.

One Ray session (``ray.init(num_cpus=2)``) serves the module; each call starts its own
actor pool (two actors, one CPU each). Ray's actors run torch on one thread, so the local
reference runs with one thread too: the same sums in the same order, identical stores.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require

zarr = pytest.importorskip("zarr", minversion="3")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import multicam as mc  # noqa: E402
from multicam import dataset, demo, zoo  # noqa: E402

# Ray Data reads its own deprecated settings when it copies its context
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

LAYER = "features.relu3"
ARRAYS = ("maps", "scores", "targets", "blank", "index", "done")
SENTINEL = -1.0  # marks a row for the failing models


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    require("torch")
    # The models below are defined here; Ray's workers cannot import this file.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread, as in a Ray actor with ``num_cpus=1``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_model() -> Any:
    weights, _, _ = demo.load()
    return zoo.build("digits_cnn", "torch", weights)


def digits(n: int) -> np.ndarray:
    _, images, _ = demo.load()
    rng = np.random.default_rng(0)
    x = np.concatenate([images] * (n // len(images) + 1))[:n]
    x = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    return np.moveaxis(x, -1, 1).copy()


def failing_model(marker: str, how: str) -> Any:
    """The digits CNN (as ``model.*``) that fails once on a marked row.

    The first call that sees the sentinel creates ``marker`` and then raises (``how ==
    "raise"``) or ends its process (``"exit"``); later calls, in any process, pass.
    """
    import torch

    class FailsOnce(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = digits_model()

        def forward(self, x: Any) -> Any:
            if bool((x[:, 0, 0, 0] == SENTINEL).any()) and not os.path.exists(marker):
                Path(marker).touch()
                if how == "exit":
                    os._exit(1)
                raise RuntimeError("injected failure on the marked batch")
            return self.model(x)

    return FailsOnce()


def assert_same_store(a: Any, b: Any, names: tuple[str, ...] = ARRAYS) -> None:
    for name in names:
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_ray_store_equals_local_store(tmp_path: Path, one_thread: None) -> None:
    x = digits(45)  # 45 rows, batches of 8
    options = dict(targets="all", batch_size=8, target_chunk=3, progress=False)
    local = dataset.explain_dataset(digits_model, LAYER, x, tmp_path / "l.zarr", **options)
    on_ray = dataset.explain_dataset(
        digits_model, LAYER, x, tmp_path / "r.zarr", engine="ray", concurrency=2, **options
    )
    assert_same_store(on_ray.store, local.store)
    assert on_ray.store["done"][:].all() and (on_ray.computed, on_ray.attempts) == (45, 1)
    np.testing.assert_array_equal(on_ray.index[:], np.arange(45))
    # and the local store is the explainer's, batch by batch
    explainer = mc.GradCAM(digits_model(), LAYER)
    for start in range(0, 45, 8):
        batch = np.array(x[start : start + 8])
        maps = np.concatenate(
            [
                explainer(batch, np.tile(np.arange(j, min(10, j + 3)), (len(batch), 1))).maps
                for j in range(0, 10, 3)
            ],
            axis=1,
        )
        np.testing.assert_array_equal(local.maps[start : start + 8], maps.astype(np.float16))


def test_ray_reads_a_folder_of_mixed_sizes(tmp_path: Path, one_thread: None) -> None:
    image_module = pytest.importorskip("PIL.Image")
    _, images, _ = demo.load()
    for i in range(11):
        side = (20, 28, 41)[i % 3]
        pixels = (images[i % 10, :, :, 0] * 255).astype(np.uint8)
        image_module.fromarray(pixels).resize((side, side + i)).save(tmp_path / f"{i:02d}.png")
    options = dict(batch_size=4, image_size=(28, 28), progress=False, dtype="float32")
    local = dataset.explain_dataset(digits_model, LAYER, tmp_path, tmp_path / "l.zarr", **options)
    on_ray = dataset.explain_dataset(
        digits_model, LAYER, tmp_path, tmp_path / "r.zarr", engine="ray", **options
    )
    assert_same_store(on_ray.store, local.store)
    assert list(on_ray.index[:]) == [f"{i:02d}.png" for i in range(11)]


def test_a_ray_dataset_source(tmp_path: Path, one_thread: None) -> None:
    x = digits(21)
    x[10, 0, 0, 0] = SENTINEL  # the row with id 110
    order = np.random.default_rng(3).permutation(21)  # ids are not the arrival order
    items = [{"id": int(100 + i), "image": x[i]} for i in order]
    source = ray.data.from_items(items, override_num_blocks=5).materialize()
    factory = functools.partial(failing_model, str(tmp_path / "failed-once"), "raise")
    layer = "model." + LAYER
    options = dict(targets=2, batch_size=8, progress=False, dtype="float32")

    # the local engine stops at the marked row's batch: a partial store
    with pytest.raises(RuntimeError, match="injected failure"):
        dataset.explain_dataset(factory, layer, source, tmp_path / "l.zarr", **options)
    finished = int(zarr.open_group(tmp_path / "l.zarr")["done"][:].sum())
    assert 0 < finished < 21
    # Ray resumes it: the workers skip the finished rows
    resumed = dataset.explain_dataset(
        factory, layer, source, tmp_path / "l.zarr", engine="ray", **options
    )
    assert (resumed.skipped, resumed.computed) == (finished, 21 - finished)
    assert resumed.store["done"][:].all()
    np.testing.assert_array_equal(resumed.index[:], np.arange(100, 121))

    # a whole run on Ray, and the explainer on the whole array, agree with it
    on_ray = dataset.explain_dataset(
        factory, layer, source, tmp_path / "r.zarr", engine="ray", **options
    )
    reference = mc.GradCAM(factory(), layer)(x, 2, warn=False)
    # rows met in other batches than the reference's: equal up to float32 rounding
    for store in (on_ray, resumed):
        np.testing.assert_allclose(store.maps[:], reference.maps, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(store.targets[:], np.full((21, 1), 2))
    again = dataset.explain_dataset(
        factory, layer, source, tmp_path / "r.zarr", engine="ray", **options
    )
    assert (again.computed, again.skipped) == (0, 21)
    with pytest.raises(mc.TargetError, match="per-row targets"):
        dataset.explain_dataset(
            digits_model, LAYER, source, tmp_path / "t.zarr", targets=np.zeros(21, int)
        )


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_failure_on_one_batch_is_retried(tmp_path: Path, how: str, one_thread: None) -> None:
    x = digits(40)
    x[21, 0, 0, 0] = SENTINEL  # batch 2 of 5
    marker = tmp_path / "failed-once"
    factory = functools.partial(failing_model, str(marker), how)
    options = dict(targets="all", batch_size=8, target_chunk=5, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_ray = dataset.explain_dataset(
            factory, "model." + LAYER, x, tmp_path / "r.zarr", engine="ray", **options
        )
    assert marker.exists()  # the failure happened
    if how == "raise":  # the run failed and was resumed from the store
        assert on_ray.attempts == 2
        assert any("resuming from the store" in str(w.message) for w in caught)
    else:  # Ray restarted the actor and retried its batch within the run
        assert on_ray.attempts == 1
    assert on_ray.store["done"][:].all()
    np.testing.assert_array_equal(on_ray.index[:], np.arange(40))
    local = dataset.explain_dataset(
        factory, "model." + LAYER, x, tmp_path / "l.zarr", **options
    )  # the marker exists: no failure here
    assert_same_store(on_ray.store, local.store)


def test_a_multicam_error_is_not_retried(tmp_path: Path) -> None:
    with pytest.raises(mc.LayerError, match=r"features\.nope"):
        dataset.explain_dataset(
            digits_model, "features.nope", digits(4), tmp_path / "r.zarr", engine="ray",
            progress=False,
        )  # fmt: skip
