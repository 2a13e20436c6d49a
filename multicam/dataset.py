"""Explain a whole data set into a Zarr store, in one process or on a Ray cluster.

:func:`explain_dataset` runs one explainer over every row of a data set and streams the
maps into a Zarr v3 store batch by batch, so memory is bounded by the batch (and, for many
targets, by ``memory_budget``), never by the data set. The unit of work is a batch of rows
times a chunk of targets; each unit owns exactly one chunk of every array in the store and
is marked ``done`` only after its arrays are written (Zarr's local store writes each chunk
atomically). A rerun on the same store therefore computes only the units not yet done, a
crash loses at most the units in flight, and since every row has one fixed place in the
store, nothing can be written twice.

The store, for N rows, T targets per row and maps of spatial shape ``S``:

- ``maps`` ``(N, T, *S)``, float16 by default, chunked ``(batch_size, target_chunk, *S)``;
- ``scores`` ``(N, T)`` float32, ``targets`` ``(N, T)`` int64, ``blank`` ``(N, T)`` bool
  (:func:`multicam.diagnose.blank_maps` of the signed maps: no positive evidence);
- ``index`` ``(N,)``: the source row (int64), the file (its path relative to the folder) or
  the Ray data set's id column;
- ``done`` ``(N, J)`` bool, ``J = ceil(T / target_chunk)``: which units are written;
- attributes: ``layer``, ``method``, ``backend``, ``options``, ``multicam_version``, the
  source, the target request, ``complete``; every array carries ``dimension_names``, so
  ``xarray.open_zarr`` names the axes.

Two engines write the same store: ``"local"`` (this process, nothing needed beyond
``zarr``) and ``"ray"`` (Ray Data's ``map_batches`` over an actor pool, one model per
actor; the driver writes the store). Their maps are identical when the model runs on as
many threads in both (a Ray actor's torch uses ``num_cpus`` threads; the order of a
framework's sums, hence the last bit, depends on it). zarr, Ray, Pillow and tqdm are
imported only when used.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib
import inspect
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from .errors import (
    BackendNotInstalledError,
    InputError,
    MulticamError,
    OptionError,
    TargetError,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetResult",
    "add_cli_parser",
    "explain_dataset",
    "run_cli",
]

FORMAT = "multicam.dataset/1"
"""The store format this module writes (attribute ``format``)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""The files a folder source reads (case-insensitive), found recursively."""

DEFAULT_MEMORY_BUDGET = 1 << 30
"""Bytes the explainer's arrays for one call may take when ``target_chunk`` is automatic."""

_ENGINES = ("local", "ray")
_SPATIAL_NAMES = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}
_ZARR_HINT = "pip install 'multicam-xai[zarr]'"
_RAY_HINT = "pip install 'multicam-xai[ray]'"


# --- optional dependencies -------------------------------------------------------------


def _zarr() -> ModuleType:
    try:
        zarr = importlib.import_module("zarr")
    except ImportError as exc:
        raise BackendNotInstalledError(
            f"explain_dataset writes a Zarr v3 store, and zarr is not installed: {_ZARR_HINT}"
        ) from exc
    if int(str(zarr.__version__).split(".")[0]) < 3:
        raise BackendNotInstalledError(
            f"explain_dataset writes a Zarr v3 store and needs zarr>=3; zarr "
            f"{zarr.__version__} is installed: {_ZARR_HINT}"
        )
    return zarr


def _ray() -> ModuleType:
    try:
        importlib.import_module("ray.data")
        return importlib.import_module("ray")
    except ImportError as exc:
        raise BackendNotInstalledError(
            f"engine='ray' needs Ray Data, which is not installed: {_RAY_HINT} "
            "(or use engine='local', which needs only zarr)"
        ) from exc


def _pil_image() -> Any:
    try:
        return importlib.import_module("PIL.Image")
    except ImportError as exc:
        raise BackendNotInstalledError(
            "a folder source is read with Pillow, which is not installed: pip install pillow "
            "(or 'multicam-xai[viz]')"
        ) from exc


def _is_ray_dataset(source: Any) -> bool:
    """Whether ``source`` is a ``ray.data.Dataset``, without importing Ray."""
    ray_data = sys.modules.get("ray.data")
    return ray_data is not None and isinstance(source, ray_data.Dataset)


# --- sources -----------------------------------------------------------------------------


class _Source:
    """Rows of a data set, read by position: what a worker needs to load its batches.

    A source is pickled into every Ray actor, so it holds no large data; an in-memory array
    travels separately, through Ray's object store (:meth:`detach`, :meth:`attach`).
    """

    kind: ClassVar[str]
    #: whether :meth:`read` returns channels-last images for the worker to put in the
    #: model's layout
    images: ClassVar[bool] = False
    rows: int

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a new array ``(n, ...)``."""
        raise NotImplementedError

    def index(self) -> np.ndarray:
        """``(N,)`` what each row is: its position, or its file."""
        return np.arange(self.rows, dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        """What the store records about the source (JSON)."""
        raise NotImplementedError

    def detach(self) -> tuple[_Source, Any]:
        """A light copy to pickle, and the data to send separately (or ``None``)."""
        return self, None

    def attach(self, data: Any) -> _Source:
        """This source with the data :meth:`detach` took out."""
        return self


class _ArraySource(_Source):
    """An in-memory NumPy array in the model's layout."""

    kind = "array"

    def __init__(self, array: np.ndarray | None, shape: tuple[int, ...], dtype: str) -> None:
        self.array = array
        self.shape = shape
        self.dtype = dtype
        self.rows = shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        assert self.array is not None, "attach() the array first"
        return np.array(self.array[start:stop])  # a writable copy, whatever the original

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}

    def detach(self) -> tuple[_Source, Any]:
        return _ArraySource(None, self.shape, self.dtype), self.array

    def attach(self, data: Any) -> _Source:
        return self if data is None else _ArraySource(data, self.shape, self.dtype)


class _MemmapSource(_Source):
    """A C-ordered memory-mapped array (``np.load(path, mmap_mode="r")`` or ``np.memmap``).

    Rows are read with file reads, not through the mapping: pages of a mapping stay in the
    process's resident memory once touched, so reading a large file through it would make
    the resident size grow with the data set. Workers reopen the file by name.
    """

    kind = "memmap"

    def __init__(self, filename: str, offset: int, shape: tuple[int, ...], dtype: str) -> None:
        self.filename = filename
        self.offset = offset
        self.shape = shape
        self.dtype = dtype
        self.rows = shape[0]

    @classmethod
    def of(cls, array: np.ndarray) -> _MemmapSource | None:
        """The source for a memory map read from its file, or ``None`` if that is unsafe.

        A view of a memory map (a slice, a transpose) keeps the original's ``offset``; only
        an array mapped directly from the file (its ``base`` the mapping itself) is read by
        file offset.
        """
        import mmap

        filename = getattr(array, "filename", None)
        if (
            not isinstance(array, np.memmap)
            or not isinstance(array.base, mmap.mmap)
            or not array.flags.c_contiguous
            or not filename
            or array.ndim < 1
        ):
            return None
        return cls(str(filename), int(array.offset), tuple(array.shape), array.dtype.str)

    def read(self, start: int, stop: int) -> np.ndarray:
        dtype = np.dtype(self.dtype)
        per_row = math.prod(self.shape[1:])
        rows = np.fromfile(
            self.filename,
            dtype=dtype,
            count=(stop - start) * per_row,
            offset=self.offset + start * per_row * dtype.itemsize,
        )
        return rows.reshape(stop - start, *self.shape[1:])

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": os.path.abspath(self.filename),
            "shape": list(self.shape),
            "dtype": self.dtype,
        }


class _FolderSource(_Source):
    """Image files under a folder, in sorted order of their relative paths.

    Each image is converted to grey (1 channel) or RGB (3), resized with Pillow's bilinear
    filter to ``size`` and scaled to [0, 1] float32: ``(n, H, W, C)`` batches.
    """

    kind = "folder"
    images = True

    def __init__(
        self, root: str, paths: Sequence[str], size: tuple[int, int], channels: int
    ) -> None:
        self.root = root
        self.paths = list(paths)
        self.size = size
        self.channels = channels
        self.rows = len(self.paths)

    @classmethod
    def scan(
        cls, root: str | Path, size: Sequence[int] | None, channels: int | None
    ) -> _FolderSource:
        folder = Path(root)
        paths = sorted(
            path.relative_to(folder).as_posix()
            for path in folder.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
        )
        if not paths:
            raise InputError(
                f"the folder {str(folder)!r} holds no images (files ending in "
                f"{', '.join(IMAGE_SUFFIXES)}); pass a folder of images, a NumPy array or a "
                ".npy file."
            )
        if size is not None and (
            len(size) != 2 or not all(isinstance(s, int | np.integer) and s > 0 for s in size)
        ):
            raise OptionError(f"image_size={size!r}: expected (height, width), two positive ints.")
        if channels not in (None, 1, 3):
            raise OptionError(f"channels={channels!r}: expected 1 (grey) or 3 (RGB).")
        if size is None or channels is None:
            image_module = _pil_image()
            with image_module.open(folder / paths[0]) as first:
                if size is None:
                    size = (first.height, first.width)
                if channels is None:
                    channels = 1 if first.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
        return cls(str(folder.resolve()), paths, (int(size[0]), int(size[1])), int(channels))

    def read(self, start: int, stop: int) -> np.ndarray:
        image_module = _pil_image()
        height, width = self.size
        batch = np.empty((stop - start, height, width, self.channels), np.float32)
        for i, name in enumerate(self.paths[start:stop]):
            with image_module.open(os.path.join(self.root, name)) as image:
                converted = image.convert("L" if self.channels == 1 else "RGB")
                if converted.size != (width, height):
                    converted = converted.resize((width, height), image_module.Resampling.BILINEAR)
                pixels = np.asarray(converted, dtype=np.float32) / np.float32(255)
            batch[i] = pixels.reshape(height, width, self.channels)
        return batch

    def index(self) -> np.ndarray:
        return np.array(self.paths, dtype=str)

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(self.paths).encode()).hexdigest()[:16]
        return {
            "kind": self.kind,
            "path": self.root,
            "files": self.rows,
            "files_sha256": digest,
            "image_size": list(self.size),
            "channels": self.channels,
        }


@dataclass(frozen=True)
class _RaySource:
    """A ``ray.data.Dataset``: rows placed in the store by their sorted ids."""

    dataset: Any
    column: str
    index_column: str
    keys: np.ndarray  # (N,) sorted unique ids

    kind: ClassVar[str] = "ray"

    @property
    def rows(self) -> int:
        return len(self.keys)

    @classmethod
    def scan(cls, dataset: Any, column: str | None, index_column: str | None) -> _RaySource:
        columns = list(dataset.columns())
        if index_column is None:
            index_column = next((c for c in ("id", "path", "index") if c in columns), None)
        if index_column is None or index_column not in columns:
            raise OptionError(
                f"the Ray data set has columns {columns} and no id column "
                f"{index_column or '(id, path or index)'}: explain_dataset places each row "
                "in the store by a unique id. Pass index_column= naming one, read files with "
                "include_paths=True, or number the rows (e.g. build the data set from "
                "ray.data.range(N))."
            )
        if column is None:
            others = [c for c in columns if c != index_column]
            column = "image" if "image" in others else others[0] if len(others) == 1 else None
        if column is None or column not in columns or column == index_column:
            raise OptionError(
                f"column={column!r}: name the column of model inputs among {columns} "
                f"(the id column is {index_column!r})."
            )
        parts = [
            np.asarray(batch[index_column])
            for batch in dataset.select_columns([index_column]).iter_batches(
                batch_size=65536, batch_format="numpy"
            )
        ]
        ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
        if ids.dtype.kind in "OUS":
            ids = ids.astype(str)
        elif ids.dtype.kind not in "iu":
            raise OptionError(
                f"index_column={index_column!r} holds {ids.dtype} values; ids must be "
                "integers or strings."
            )
        keys = np.unique(ids)
        if len(keys) != len(ids):
            raise InputError(
                f"index_column={index_column!r} repeats ids ({len(ids) - len(keys)} "
                "duplicates); each row needs a unique id, which places it in the store."
            )
        return cls(dataset, column, index_column, keys)

    def positions(self, ids: Any) -> np.ndarray:
        """The store rows of ``ids``."""
        ids = np.asarray(ids)
        if ids.dtype.kind in "OUS":
            ids = ids.astype(str)
        rows = np.searchsorted(self.keys, ids)
        bad = (rows >= len(self.keys)) | (self.keys[np.minimum(rows, len(self.keys) - 1)] != ids)
        if bad.any():
            raise InputError(
                f"the Ray data set produced ids not seen when it was scanned (e.g. "
                f"{ids[bad][0]!r}): its {self.index_column!r} column must be deterministic."
            )
        return rows.astype(np.int64)

    def index(self) -> np.ndarray:
        return self.keys

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(map(str, self.keys)).encode()).hexdigest()[:16]
        return {
            "kind": self.kind,
            "rows": self.rows,
            "column": self.column,
            "index_column": self.index_column,
            "ids_sha256": digest,
        }


def _source(
    source: Any,
    image_size: Sequence[int] | None,
    channels: int | None,
    column: str | None,
    index_column: str | None,
) -> _Source | _RaySource:
    if _is_ray_dataset(source):
        return _RaySource.scan(source, column, index_column)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            return _FolderSource.scan(path, image_size, channels)
        if path.suffix == ".npy" and path.is_file():
            source = np.load(path, mmap_mode="r")
        else:
            raise InputError(
                f"source={str(source)!r} is neither a folder of images nor a .npy file; pass "
                "one of those, a NumPy array (or memory map) or a ray.data.Dataset."
            )
    if not isinstance(source, np.ndarray):
        raise InputError(
            f"source of type {type(source).__name__}: expected a NumPy array or memory map "
            "in the model's layout, a .npy file, a folder of images, or a ray.data.Dataset."
        )
    if source.ndim < 2 or source.shape[0] == 0:
        raise InputError(
            f"source has shape {source.shape}: expected rows (N, ...) with N >= 1, in the "
            "model's layout (e.g. (N, C, H, W) for torch)."
        )
    return _MemmapSource.of(source) or _ArraySource(source, tuple(source.shape), source.dtype.str)


# --- targets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """The target request, resolved for the whole data set and cut into target chunks.

    Attributes:
        kind: ``"predicted"``, ``"class"`` (one class for every row), ``"rows"`` (an
            ``(N, T)`` array of class ids) or ``"all"``.
        classes: the class for ``"class"``, the ``(N, T)`` array for ``"rows"``.
        num_targets: T (for ``"all"`` the model's number of classes, once known).
        chunk: targets per unit (once known).
    """

    kind: str
    classes: Any = None
    num_targets: int = 0
    chunk: int = 0

    @classmethod
    def parse(cls, targets: Any, rows: int, per_row_ok: bool) -> _Plan:
        if targets is None:
            return cls("predicted", None, 1)
        if isinstance(targets, str):
            if targets != "all":
                raise TargetError(f"targets={targets!r}: the only string accepted is 'all'.")
            return cls("all")
        if isinstance(targets, bool) or callable(targets):
            raise TargetError(
                "explain_dataset takes class targets: None (the predicted class), an int, "
                "one class per row, an (N, T) array, or 'all'; a callable or region target "
                "needs the explainer itself, batch by batch."
            )
        if isinstance(targets, int | np.integer):
            if targets < 0:
                raise TargetError(f"targets={targets}: class ids are >= 0.")
            return cls("class", int(targets), 1)
        array = np.asarray(targets)
        if array.dtype.kind not in "iu" or array.ndim not in (1, 2):
            raise TargetError(
                f"targets of shape {array.shape} and dtype {array.dtype}: expected an int, "
                f"{rows} ints (one per row), an ({rows}, T) int array, None or 'all'."
            )
        if not per_row_ok:
            raise TargetError(
                "per-row targets need rows with fixed positions: pass a NumPy array, a .npy "
                "file or a folder as the source, or None, an int or 'all' with a Ray data set."
            )
        if array.shape[0] != rows:
            raise TargetError(
                f"targets has {array.shape[0]} rows for a data set of {rows}: pass one class "
                f"per row, or an ({rows}, T) array."
            )
        if (array < 0).any():
            raise TargetError("targets holds negative class ids; class ids are >= 0.")
        array = array.reshape(rows, -1).astype(np.int64)
        return cls("rows", array, array.shape[1])

    @property
    def chunks(self) -> int:
        """J, the number of target chunks."""
        return -(-self.num_targets // self.chunk)

    def request(self, rows: np.ndarray | None, n: int, j: int) -> Any:
        """The explainer's ``targets=`` for ``n`` rows (positions ``rows``), chunk ``j``."""
        start, stop = j * self.chunk, min(self.num_targets, (j + 1) * self.chunk)
        if self.kind == "predicted":
            return None
        if self.kind == "class":
            return self.classes
        if self.kind == "all":
            return np.tile(np.arange(start, stop, dtype=np.int64), (n, 1))
        assert rows is not None
        return self.classes[rows, start:stop]

    def describe(self) -> str:
        if self.kind == "class":
            return f"class {self.classes}"
        if self.kind == "rows":
            digest = hashlib.sha256(np.ascontiguousarray(self.classes).tobytes()).hexdigest()
            return f"per-row classes {tuple(self.classes.shape)} sha256:{digest[:16]}"
        return str(self.kind)


# --- the work ----------------------------------------------------------------------------


@dataclass
class _Job:
    """Everything a worker needs; pickled into every Ray actor."""

    model_factory: Callable[[], Any]
    layer: str
    method: str
    model_options: dict[str, Any]
    call_options: dict[str, Any]
    warn: bool
    source: _Source | None  # None for a Ray data set: rows arrive in the batches
    plan: _Plan
    dtype: str
    transform: Callable[[np.ndarray], Any] | None
    batch_size: int
    column: str | None = None
    index_column: str | None = None
    spatial: tuple[int, ...] = ()  # the maps' spatial shape, once known
    pending_keys: np.ndarray | None = None  # a Ray data set's unfinished ids (None: all)


def _pending(job: _Job, keys: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: which of a Ray data set's rows still need explaining."""
    if job.pending_keys is None:
        return np.ones(len(keys), bool)
    keys = keys.astype(str) if job.pending_keys.dtype.kind == "U" else keys
    where = np.searchsorted(job.pending_keys, keys)
    found = job.pending_keys[np.minimum(where, len(job.pending_keys) - 1)] == keys
    return np.asarray((where < len(job.pending_keys)) & found)


def _method_class(method: Any) -> type:
    from . import cam

    if isinstance(method, type) and issubclass(method, cam.CAM):
        return method
    import multicam

    found = getattr(multicam, str(method), None) if isinstance(method, str) else None
    if isinstance(found, type) and issubclass(found, cam.CAM):
        return found
    names = sorted(
        name
        for name in dir(multicam)
        if isinstance(getattr(multicam, name), type)
        and issubclass(getattr(multicam, name), cam.CAM)
        and name not in ("CAM", "MultiLayerCAM")
    )
    raise OptionError(
        f"method={method!r}: expected the name of a multicam CAM method, one of "
        f"{', '.join(names)} (guided methods and MultiLayerCAM are not stored by "
        "explain_dataset)."
    )


def _split_options(method: type, options: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(constructor options, call options)``: call options are the call's keywords."""
    from .cam import CAM

    call_names = set()
    for function in (CAM.__call__, method.__call__):
        call_names |= {
            name
            for name, parameter in inspect.signature(function).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        }
    call = {k: v for k, v in options.items() if k in call_names}
    model = {k: v for k, v in options.items() if k not in call_names}
    return model, call


class _Worker:
    """One model and its explainer; explains batches unit by unit."""

    def __init__(self, job: _Job, data: Any = None) -> None:
        self.job = job
        self.source = None if job.source is None else job.source.attach(data)
        built = job.model_factory()
        options = dict(job.model_options)
        if isinstance(built, tuple) and len(built) == 2 and isinstance(built[1], Mapping):
            built, options["variables"] = built  # a linen (module, variables) pair
        self.explainer = _method_class(job.method)(built, job.layer, **options)

    def inputs(self, rows: np.ndarray) -> Any:
        """Source rows as the model's input: images moved to its layout, transformed."""
        source = self.source
        if source is not None and source.images and self.explainer.bound.layout == "channels_first":
            # a copy with canonical strides: for one channel, moveaxis gives a view that
            # counts as contiguous, and torch would run it through channels-last kernels
            rows = np.moveaxis(rows, -1, 1).copy()
        return rows if self.job.transform is None else self.job.transform(rows)

    def read(self, start: int, stop: int) -> Any:
        assert self.source is not None
        return self.inputs(self.source.read(start, stop))

    def probe(self, inputs: Any) -> dict[str, Any]:
        """Shapes and class count from one sample: what creating the store needs."""
        plan = self.job.plan
        targets = plan.classes if plan.kind == "class" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = self.explainer(inputs, targets, warn=False, **self.job.call_options)
            classes = None if result.outputs is None else result.outputs.shape[-1]
            if plan.kind == "all" and (result.outputs is None or result.outputs.ndim != 2):
                classes = self.explainer(inputs, "all", warn=False, **self.job.call_options)
                classes = classes.maps.shape[1]
        return {
            "backend": self.explainer.backend,
            "layer": self.explainer.layer,
            "layout": self.explainer.bound.layout,
            "classes": None if classes is None else int(classes),
            "spatial": [int(s) for s in result.maps.shape[2:]],
            "activations": [int(s) for s in result.activations.shape[1:]],
        }

    def units(
        self, inputs: Any, rows: np.ndarray | None, keys: Any, chunks: Sequence[int]
    ) -> Iterator[dict[str, np.ndarray]]:
        """Explain one batch for each target chunk in ``chunks``; one output per chunk.

        Outputs are padded to the full chunk width (``width`` says how many targets are
        real), so that every output has the same shapes and Ray can concatenate them.
        """
        from .diagnose import blank_maps
        from .xp import to_numpy  # a native-algebra result holds framework arrays

        plan, dtype = self.job.plan, np.dtype(self.job.dtype)
        n = int(np.shape(inputs)[0])
        for j in chunks:
            result = self.explainer(
                inputs, plan.request(rows, n, j), warn=self.job.warn, **self.job.call_options
            )
            width = int(result.maps.shape[1])
            pad = plan.chunk - width
            maps = np.asarray(to_numpy(result.maps)).astype(dtype, copy=False)
            blank = blank_maps(np.asarray(to_numpy(result.raw)))
            scores = np.asarray(to_numpy(result.scores), np.float32)
            targets = to_numpy(result.targets)
            if targets is None:
                targets = np.full((n, width), -1, np.int64)
            del result  # gradients and activations: free them before the next chunk
            if pad:
                maps = np.concatenate([maps, np.zeros((n, pad, *maps.shape[2:]), dtype)], 1)
                blank = np.pad(blank, ((0, 0), (0, pad)))
                scores = np.pad(scores, ((0, 0), (0, pad)))
                targets = np.pad(targets, ((0, 0), (0, pad)), constant_values=-1)
            out = {
                "tchunk": np.full(n, j, np.int64),
                "width": np.full(n, width, np.int64),
                "maps": maps,
                "scores": scores,
                "targets": targets.astype(np.int64),
                "blank": blank,
            }
            if rows is not None:
                out["row"] = rows
            else:
                out["key"] = np.asarray(keys)
            yield out


class _RayExplainer:
    """The Ray Data actor: builds the model once, explains the batches it is sent.

    A batch that fails is reported as a record with an ``error`` (and the model is kept),
    not raised: a Ray Data run that fails keeps its actors, and their CPUs, for as long as
    anything refers to its traceback, so the driver could not start the actors of a retry.
    The driver raises multicam errors at once and retries the other failures' units.
    """

    def __init__(self, job: _Job, data: list[Any]) -> None:
        self.job = job
        self.worker: _Worker | None = None
        self.failure: BaseException | None = None
        try:
            # The array travels as an object reference in a list (Ray resolves only
            # top-level references); ray.get maps it zero-copy from the object store.
            array = None if data[0] is None else _ray().get(data[0])
            self.worker = _Worker(job, array)
        except Exception as exc:  # reported with each batch: the driver decides
            self.failure = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        job = self.job
        if job.source is None:  # rows of a Ray data set
            assert job.column is not None and job.index_column is not None
            keep = _pending(job, np.asarray(batch[job.index_column]))
            if not keep.any():
                return
            keys = np.asarray(batch[job.index_column])[keep]
            chunk = 0
            try:
                worker = self._worker()
                inputs = worker.inputs(np.asarray(batch[job.column])[keep])
                for out in worker.units(inputs, None, keys, range(job.plan.chunks)):
                    chunk = int(out["tchunk"][0]) + 1
                    yield _no_error(out)
            except Exception as exc:
                yield _failure(job, exc, chunk, key=keys[:1])
            return
        step = job.batch_size
        for b, first, stop in zip(batch["batch"], batch["first"], batch["stop"], strict=True):
            start, chunk = int(b) * step, int(first)
            try:
                worker = self._worker()
                assert worker.source is not None
                end = min(worker.source.rows, start + step)
                inputs = worker.read(start, end)
                rows = np.arange(start, end, dtype=np.int64)
                for out in worker.units(inputs, rows, None, range(int(first), int(stop))):
                    chunk = int(out["tchunk"][0]) + 1
                    yield _no_error(out)
            except Exception as exc:
                yield _failure(job, exc, chunk, row=start)

    def _worker(self) -> _Worker:
        if self.worker is None:
            assert self.failure is not None
            raise self.failure
        return self.worker


def _no_error(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(out["tchunk"])
    empty = np.full(n, "", dtype=object)
    return {**out, "error": empty, "error_class": empty, "error_trace": empty}


def _failure(
    job: _Job, exc: BaseException, chunk: int, row: int | None = None, key: Any = None
) -> dict[str, np.ndarray]:
    """A one-row record saying that unit ``(row's batch, chunk)`` failed, and why."""
    plan, dtype = job.plan, np.dtype(job.dtype)
    record = {
        "tchunk": np.array([min(chunk, plan.chunks - 1)], np.int64),
        "width": np.zeros(1, np.int64),
        "maps": np.zeros((1, plan.chunk, *job.spatial), dtype),
        "scores": np.zeros((1, plan.chunk), np.float32),
        "targets": np.full((1, plan.chunk), -1, np.int64),
        "blank": np.zeros((1, plan.chunk), bool),
        "error": np.array([str(exc) or type(exc).__name__], dtype=object),
        "error_class": np.array([f"{type(exc).__module__}.{type(exc).__qualname__}"], dtype=object),
        "error_trace": np.array(["".join(traceback.format_exception(exc))[-4000:]], object),
    }
    if row is not None:
        record["row"] = np.array([row], np.int64)
    else:
        record["key"] = np.asarray(key)
    return record


def _probe_remote(job: _Job, data: Any, sample: Any) -> dict[str, Any]:
    """Build the model in a Ray worker and probe it (the driver may have no accelerator)."""
    worker = _Worker(job, data)
    return worker.probe(worker.read(0, 1) if sample is None else worker.inputs(sample))


# --- the store ---------------------------------------------------------------------------


class _Store:
    """The Zarr group: created once, then written unit by unit, by one writer."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.maps = group["maps"]
        self.scores = group["scores"]
        self.targets = group["targets"]
        self.blank = group["blank"]
        self.done = group["done"]
        attrs = group.attrs
        self.batch_size = int(attrs["batch_size"])
        self.chunk = int(attrs["target_chunk"])
        self.write_seconds = 0.0

    @classmethod
    def create(
        cls,
        group: Any,
        rows: int,
        plan: _Plan,
        spatial: Sequence[int],
        batch_size: int,
        dtype: str,
        index: np.ndarray,
        attrs: dict[str, Any],
    ) -> _Store:
        targets, chunk = plan.num_targets, plan.chunk
        names = _SPATIAL_NAMES.get(len(spatial), tuple(f"s{i}" for i in range(len(spatial))))
        b = min(batch_size, rows)
        group.create_array(
            "maps",
            shape=(rows, targets, *spatial),
            chunks=(b, chunk, *spatial),
            dtype=dtype,
            fill_value=np.nan,
            dimension_names=("sample", "target", *names),
        )
        pairs = {"scores": ("float32", np.nan), "targets": ("int64", -1), "blank": ("bool", False)}
        for name, (kind, fill) in pairs.items():
            group.create_array(
                name,
                shape=(rows, targets),
                chunks=(b, chunk),
                dtype=kind,
                fill_value=fill,
                dimension_names=("sample", "target"),
            )
        group.create_array(
            "done",
            shape=(rows, plan.chunks),
            chunks=(b, 1),
            dtype="bool",
            fill_value=False,
            dimension_names=("sample", "target_chunk"),
        )
        index_array = group.create_array(
            "index",
            shape=(rows,),
            chunks=(b,),
            dtype=str if index.dtype.kind == "U" else "int64",
            dimension_names=("sample",),
        )
        index_array[:] = index
        group.attrs.update(attrs)  # written last: a store without them is not ours yet
        return cls(group)

    def write(self, out: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Write one output (one or more units); ``done`` last, unit by unit.

        Returns:
            ``(rows, units)`` written.
        """
        started = time.perf_counter()
        rows_all = np.asarray(out["row"], np.int64)
        chunk_ids = np.asarray(out["tchunk"], np.int64)
        unit_of = (rows_all // self.batch_size) * (1 << 20) + chunk_ids
        units = 0
        for unit in np.unique(unit_of):
            selected = np.nonzero(unit_of == unit)[0]
            selected = selected[np.argsort(rows_all[selected], kind="stable")]
            rows = rows_all[selected]
            j = int(chunk_ids[selected[0]])
            width = int(out["width"][selected[0]])
            columns = slice(j * self.chunk, j * self.chunk + width)
            if rows[-1] - rows[0] + 1 == len(rows):
                where: Any = slice(int(rows[0]), int(rows[-1]) + 1)
                for name in ("maps", "scores", "targets", "blank"):
                    getattr(self, name)[where, columns] = out[name][selected, :width]
                self.done[where, j] = True
            else:  # rows of a Ray data set that arrived out of order
                for name in ("maps", "scores", "targets", "blank"):
                    getattr(self, name).oindex[rows, columns] = out[name][selected, :width]
                self.done.oindex[rows, j] = True
            units += 1
        self.write_seconds += time.perf_counter() - started
        return len(rows_all), units

    def pending_units(self) -> list[tuple[int, int, int]]:
        """``(batch, first chunk, stop chunk)`` runs of units not yet done."""
        done = np.asarray(self.done[:])
        rows, step = done.shape[0], self.batch_size
        items = []
        for b in range(-(-rows // step)):
            finished = np.atleast_1d(done[b * step : (b + 1) * step].all(axis=0))
            j = 0
            while j < len(finished):
                if finished[j]:
                    j += 1
                    continue
                first = j
                while j < len(finished) and not finished[j]:
                    j += 1
                items.append((b, first, j))
        return items

    def pending_rows(self) -> np.ndarray:
        """Rows with some unit not yet done."""
        return np.nonzero(~np.asarray(self.done[:]).all(axis=1))[0]

    def complete(self) -> bool:
        return bool(np.asarray(self.done[:]).all())


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _call_defaults(method: type, call: Mapping[str, Any]) -> dict[str, Any]:
    """The call's options with the explainer's defaults filled in, as recorded."""
    from .cam import CAM

    recorded: dict[str, Any] = {}
    for function in (CAM.__call__, method.__call__):
        for name, parameter in inspect.signature(function).parameters.items():
            if (
                parameter.kind is inspect.Parameter.KEYWORD_ONLY
                and name != "warn"
                and parameter.default is not inspect.Parameter.empty
            ):
                recorded.setdefault(name, parameter.default)
    recorded.update(call)
    return {k: _jsonable(v) for k, v in sorted(recorded.items())}


def _fingerprint(settings: Mapping[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _open_store(
    out: Any, overwrite: bool, fingerprint: str, settings: Mapping[str, Any]
) -> tuple[Any, _Store | None]:
    """The group at ``out``, and its store if it already holds this run's maps."""
    zarr = _zarr()
    if isinstance(out, str | os.PathLike):
        out = os.fspath(out)
    if overwrite:
        return zarr.open_group(out, mode="w", zarr_format=3), None
    try:
        group = zarr.open_group(out, mode="a", zarr_format=3)
    except Exception as exc:  # e.g. a Zarr v2 store or a file in the way
        raise OptionError(
            f"out={out!r} cannot be opened as a Zarr v3 group ({type(exc).__name__}: {exc}); "
            "pass a new path, or overwrite=True to replace it."
        ) from exc
    attrs = dict(group.attrs)
    if attrs.get("format") is None:
        members = list(group.keys())
        if members:
            raise OptionError(
                f"out={out!r} is a Zarr group with {members} but no multicam run in it; pass "
                "a new path, or overwrite=True to replace it."
            )
        return group, None
    if attrs.get("fingerprint") != fingerprint:
        recorded = attrs.get("settings", {})
        differ = [
            f"{key}: {recorded.get(key)!r} there, {settings.get(key)!r} now"
            for key in sorted(set(recorded) | set(settings))
            if _jsonable(recorded.get(key)) != _jsonable(settings.get(key))
        ]
        raise OptionError(
            f"out={out!r} holds maps of another run ({'; '.join(differ) or 'other settings'}"
            "), so it cannot be resumed with these settings: pass a new out=, the same "
            "settings, or overwrite=True to start again."
        )
    return group, _Store(group)


# --- progress ----------------------------------------------------------------------------


class _ProgressBar:
    """tqdm when installed, else a line on a terminal's stderr; images per second."""

    def __init__(self, total: int, enabled: bool, description: str) -> None:
        self.total, self.count, self.enabled = total, 0, enabled
        self.started = self.shown = time.perf_counter()
        self.bar: Any = None
        self.description = description
        if not enabled:
            return
        try:
            tqdm = importlib.import_module("tqdm").tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, unit="img", desc=description, dynamic_ncols=True)

    def update(self, images: int) -> None:
        self.count += images
        if self.bar is not None:
            self.bar.update(images)
        elif self.enabled and sys.stderr.isatty():
            now = time.perf_counter()
            if now - self.shown > 0.5 or self.count >= self.total:
                self.shown = now
                rate = self.count / max(now - self.started, 1e-9)
                sys.stderr.write(
                    f"\r{self.description}: {self.count}/{self.total} images, {rate:.1f} img/s"
                )
                sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            sys.stderr.write("\n")


# --- the result --------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetResult:
    """A finished :func:`explain_dataset` call: the store and what the call did.

    Attributes:
        store: the Zarr group (``zarr.open_group(path)`` opens it again).
        rows: N, the rows of the data set.
        num_targets: T, targets per row.
        computed: rows explained by this call (rows resumed from an earlier call are not
            counted; a row with several target chunks counts once).
        skipped: rows that were already complete in the store.
        seconds: wall time of the call, including building the model(s).
        images_per_second: ``computed / seconds``.
        write_seconds: time the writer spent writing the store.
        attempts: how many times the Ray engine ran (more than 1 after a failure it resumed
            from); 1 for the local engine.
        engine: ``"local"`` or ``"ray"``.
    """

    store: Any
    rows: int
    num_targets: int
    computed: int
    skipped: int
    seconds: float
    images_per_second: float
    write_seconds: float
    attempts: int
    engine: str

    @property
    def maps(self) -> Any:
        """``(N, T, *S)`` the maps, a Zarr array (index it, or ``[:]`` for NumPy)."""
        return self.store["maps"]

    @property
    def scores(self) -> Any:
        """``(N, T)`` float32 target scores (Zarr array)."""
        return self.store["scores"]

    @property
    def targets(self) -> Any:
        """``(N, T)`` int64 class ids (Zarr array)."""
        return self.store["targets"]

    @property
    def blank(self) -> Any:
        """``(N, T)`` bool: maps with no positive evidence (Zarr array)."""
        return self.store["blank"]

    @property
    def index(self) -> Any:
        """``(N,)`` the source row, file or id of each row (Zarr array)."""
        return self.store["index"]

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's attributes: layer, method, backend, options, version, ..."""
        return dict(self.store.attrs)


# --- the entry point ---------------------------------------------------------------------


def explain_dataset(
    model_factory: Callable[[], Any],
    layer: str,
    source: Any,
    out: Any,
    targets: Any = None,
    method: str | type = "GradCAM",
    batch_size: int = 32,
    engine: str = "local",
    progress: bool = True,
    *,
    dtype: str = "float16",
    target_chunk: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    image_size: Sequence[int] | None = None,
    channels: int | None = None,
    transform: Callable[[np.ndarray], Any] | None = None,
    column: str | None = None,
    index_column: str | None = None,
    concurrency: int | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    retries: int = 2,
    overwrite: bool = False,
    warn: bool = False,
    **options: Any,
) -> DatasetResult:
    """Explain every row of a data set and stream the maps into a Zarr v3 store.

    Rerunning the same call on the same ``out`` resumes it: finished units (a batch of rows
    times a chunk of targets) are skipped, so an interrupted run loses at most the units in
    flight and a complete store is left as it is. The layout of the store is described in
    :mod:`multicam.dataset`.

    Args:
        model_factory: a zero-argument callable returning the model (for Flax linen a
            ``(module, variables)`` pair). It is called once per worker, never per batch;
            for ``engine="ray"`` it must be picklable (a module-level function, or a
            ``functools.partial`` of one).
        layer: the layer's name, as for :class:`~multicam.GradCAM`.
        source: a NumPy array or memory map in the model's layout (``(N, C, H, W)`` for
            torch), a ``.npy`` file (memory-mapped), a folder of images (read recursively
            in sorted order with Pillow, scaled to [0, 1] and put in the model's layout), or a
            ``ray.data.Dataset`` (see ``column`` and ``index_column``).
        out: where to write: a path (a directory ``*.zarr``) or any Zarr v3 store.
        targets: as for the explainers, over the whole data set: ``None`` (the predicted
            class), an int, N ints, an ``(N, T)`` array, or ``"all"``.
        method: the name of a multicam CAM method (``"GradCAM"``, ``"XGradCAM"``, ...) or the
            class.
        batch_size: rows per batch, and the store's chunk along rows.
        engine: ``"local"`` (this process) or ``"ray"`` (an actor pool on the Ray cluster
            this process is connected to, ``ray.init(address=...)``, else a local one
            started for the call).
        progress: show a progress bar with images per second.
        dtype: the maps' dtype in the store (``"float16"`` or ``"float32"``); scores stay
            float32.
        target_chunk: targets explained per call; default: as many as ``memory_budget``
            allows. A store keeps the chunk it was created with.
        memory_budget: bytes the explainer's arrays (gradients, maps) may take per call when
            ``target_chunk`` is automatic; a rough bound, not a hard limit.
        image_size: a folder's images are resized to ``(height, width)``; default: the
            first image's size.
        channels: a folder's images are read as 1 (grey) or 3 (RGB) channels; default: as
            the first image.
        transform: a picklable ``batch -> model input`` applied to each batch as read
            (after the layout move for a folder), e.g. normalisation.
        column: a Ray data set's column of model inputs (default ``"image"``, or its only
            column besides the ids).
        index_column: a Ray data set's column of unique row ids (default ``"id"``, else
            ``"path"``); rows are stored in sorted order of their ids.
        concurrency: Ray actors (default: as many as the cluster's CPUs, or GPUs when
            ``num_gpus`` is set, allow; one CPU fewer for a Ray data set, whose own reading
            tasks need a CPU: actors that hold every CPU would starve them).
        num_cpus: CPUs per Ray actor.
        num_gpus: GPUs per Ray actor.
        retries: how often the Ray engine runs again over the batches that failed with an
            exception other than a multicam error (e.g. the model raised); multicam errors
            are raised at once. An actor whose process dies is restarted by Ray and its
            batch retried (Ray Data's default), without counting against this.
        overwrite: replace whatever is at ``out`` instead of resuming.
        warn: let the explainer warn per batch (blank maps, training mode); the store's
            ``blank`` flag records blank maps either way.
        **options: the explainer's options: constructor options (``backend=``, ``output=``,
            ``reshape=``, ``layer_layout=``, ...) and call options (``relu=``,
            ``normalize=``, ``size=``, ``interpolation=``, ...).

    Returns:
        A :class:`DatasetResult`; ``result.maps`` reads the store.

    Raises:
        BackendNotInstalledError: zarr (or, for ``engine="ray"``, Ray) is missing; the
            message names the extra to install.
        OptionError: an option is invalid, or ``out`` holds another run's maps.
        TargetError: the targets do not fit the data set or the model.

    Example:
        >>> import functools, multicam as mc
        >>> factory = functools.partial(mc.zoo.build, "digits_cnn", "torch")  # doctest: +SKIP
        >>> res = mc.explain_dataset(factory, "features.relu3", x, "maps.zarr",
        ...                          targets="all", progress=False)  # doctest: +SKIP
        >>> res.maps.shape  # (N, 10, 28, 28)  # doctest: +SKIP
    """
    started = time.perf_counter()
    if engine not in _ENGINES:
        raise OptionError(f"engine={engine!r}: expected one of {_ENGINES}.")
    ray = _ray() if engine == "ray" else None
    _zarr()
    if not isinstance(layer, str):
        raise OptionError(
            f"layer={layer!r}: explain_dataset builds the model in every worker, so the "
            "layer must be given by name (a string), not as an object."
        )
    if not callable(model_factory):
        raise OptionError("model_factory must be a zero-argument callable that builds the model.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"batch_size={batch_size!r}: expected a positive int.")
    if target_chunk is not None and (
        isinstance(target_chunk, bool) or not isinstance(target_chunk, int) or target_chunk < 1
    ):
        raise OptionError(f"target_chunk={target_chunk!r}: expected a positive int or None.")
    if np.dtype(dtype).kind != "f":
        raise OptionError(f"dtype={dtype!r}: expected a float dtype such as 'float16'.")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise OptionError(f"memory_budget={memory_budget!r}: expected a number of bytes (int).")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise OptionError(f"retries={retries!r}: expected an int >= 0.")
    method_class = _method_class(method)
    model_options, call_options = _split_options(method_class, options)
    call_options.pop("warn", None)
    for name in ("model", "inputs", "variables"):
        if name in model_options:
            raise OptionError(
                f"{name}= is not an option of explain_dataset: the model comes from "
                "model_factory (for Flax linen, return a (module, variables) pair)."
            )

    src = _source(source, image_size, channels, column, index_column)
    ray_source = src if isinstance(src, _RaySource) else None
    plan = _Plan.parse(targets, src.rows, per_row_ok=ray_source is None)
    dtype_name = np.dtype(dtype).name
    settings = {
        "layer": layer,
        "method": method_class.__name__,
        "options": _call_defaults(method_class, call_options),
        "model_options": _jsonable(model_options),
        "targets": plan.describe(),
        "source": src.describe(),
        "batch_size": batch_size,
        "dtype": dtype_name,
        "transform": None if transform is None else _describe_callable(transform),
    }
    fingerprint = _fingerprint(settings)
    group, store = _open_store(out, overwrite, fingerprint, settings)

    job = _Job(
        model_factory=model_factory,
        layer=layer,
        method=method_class.__name__,
        model_options=model_options,
        call_options=call_options,
        warn=warn,
        source=src if isinstance(src, _Source) else None,
        plan=plan,
        dtype=dtype_name,
        transform=transform,
        batch_size=batch_size,
        column=None if ray_source is None else ray_source.column,
        index_column=None if ray_source is None else ray_source.index_column,
    )
    run = _Run(job, group, store, settings, fingerprint, ray_source, batch_size)
    run.target_chunk, run.memory_budget = target_chunk, memory_budget
    if engine == "local":
        run.local(progress)
    else:
        assert ray is not None
        run.ray(ray, progress, concurrency, num_cpus, num_gpus, retries)
    assert run.store is not None
    complete = run.store.complete()
    group.attrs["complete"] = complete
    seconds = time.perf_counter() - started
    return DatasetResult(
        store=group,
        rows=src.rows,
        num_targets=run.store.targets.shape[1],
        computed=run.computed,
        skipped=run.skipped,
        seconds=seconds,
        images_per_second=run.computed / seconds if seconds > 0 else 0.0,
        write_seconds=run.store.write_seconds,
        attempts=run.attempts,
        engine=engine,
    )


def _auto_chunk(probe: Mapping[str, Any], batch_size: int, budget: int, targets: int) -> int:
    """Targets per call so that the call's arrays fit ``budget`` bytes.

    Per sample and target: the gradients ``K*h*w`` float32, twice (the framework's tensor
    and its NumPy copy), the signed map, and the map at output size three times (resized,
    normalised, cast).
    """
    layer_cells = math.prod(probe["activations"])
    map_cells = math.prod(probe["spatial"])
    per_target = 4 * (2 * layer_cells + layer_cells // max(probe["activations"][0], 1))
    per_target += 4 * 3 * map_cells
    return int(max(1, min(targets, budget // max(batch_size * per_target, 1))))


class _Run:
    """One call of :func:`explain_dataset`: creates or resumes the store, runs an engine."""

    def __init__(
        self,
        job: _Job,
        group: Any,
        store: _Store | None,
        settings: dict[str, Any],
        fingerprint: str,
        ray_source: _RaySource | None,
        batch_size: int,
    ) -> None:
        self.job, self.group, self.store = job, group, store
        self.settings, self.fingerprint = settings, fingerprint
        self.ray_source, self.batch_size = ray_source, batch_size
        self.target_chunk: int | None = None
        self.memory_budget = DEFAULT_MEMORY_BUDGET
        self.computed = self.skipped = 0
        self.attempts = 1

    @property
    def rows(self) -> int:
        if self.ray_source is not None:
            return self.ray_source.rows
        assert self.job.source is not None
        return self.job.source.rows

    def create(self, probe: Mapping[str, Any]) -> None:
        """Resolve the targets against the model, then create the store."""
        plan = self.job.plan
        classes = probe["classes"]
        if plan.kind == "all":
            if classes is None:
                raise TargetError("targets='all' needs a model whose output is (N, C) scores.")
            plan = dataclasses.replace(plan, num_targets=classes)
        elif classes is not None and plan.kind in ("class", "rows"):
            largest = int(np.max(plan.classes))
            if largest >= classes:
                raise TargetError(
                    f"target class {largest} is out of range: the model has {classes} "
                    f"outputs, so class ids run from 0 to {classes - 1}."
                )
        chunk = self.target_chunk or _auto_chunk(
            probe, self.batch_size, self.memory_budget, plan.num_targets
        )
        plan = dataclasses.replace(plan, chunk=min(chunk, plan.num_targets))
        self.job = dataclasses.replace(
            self.job, plan=plan, spatial=tuple(int(s) for s in probe["spatial"])
        )
        from . import __version__

        source = self.ray_source or self.job.source
        assert source is not None
        attrs = {
            "format": FORMAT,
            "multicam_version": __version__,
            "layer": probe["layer"],
            "method": self.settings["method"],
            "backend": probe["backend"],
            "options": self.settings["options"],
            "model_options": self.settings["model_options"],
            "targets": self.settings["targets"],
            "num_targets": plan.num_targets,
            "target_chunk": plan.chunk,
            "batch_size": self.batch_size,
            "rows": self.rows,
            "dtype": self.settings["dtype"],
            "source": self.settings["source"],
            "model_factory": _describe_callable(self.job.model_factory),
            "input_layout": probe["layout"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "complete": False,
            "settings": self.settings,
            "fingerprint": self.fingerprint,
        }
        self.store = _Store.create(
            self.group,
            self.rows,
            plan,
            probe["spatial"],
            self.batch_size,
            self.settings["dtype"],
            source.index(),
            _jsonable(attrs),
        )

    def resume(self) -> None:
        """Take the target chunks and count from the store."""
        assert self.store is not None
        attrs = self.group.attrs
        plan = dataclasses.replace(
            self.job.plan, num_targets=int(attrs["num_targets"]), chunk=self.store.chunk
        )
        spatial = tuple(int(s) for s in self.store.maps.shape[2:])
        self.job = dataclasses.replace(self.job, plan=plan, spatial=spatial)

    # -- local --

    def local(self, progress: bool) -> None:
        if self.store is not None:
            self.resume()
            if self.store.complete():  # nothing to do: do not even build the model
                self.skipped = self.rows
                return
        worker = _Worker(self.job)
        if self.store is None:
            if self.ray_source is not None:
                sample = self.ray_source.dataset.take_batch(1, batch_format="numpy")
                probe = worker.probe(worker.inputs(np.asarray(sample[self.ray_source.column])))
            else:
                probe = worker.probe(worker.read(0, 1))
            self.create(probe)
        worker.job = self.job
        store = self.store
        assert store is not None
        if self.ray_source is not None:
            self._local_rows(worker, store, progress)
            return
        items = store.pending_units()
        rows, step = self.rows, self.batch_size
        todo = self._rows_of(items)
        self.skipped = rows - todo
        bar = _ProgressBar(todo, progress, "explain_dataset")

        def read(item: tuple[int, int, int]) -> Any:
            b = item[0]
            return worker.read(b * step, min(rows, (b + 1) * step))

        try:
            with ThreadPoolExecutor(1) as pool:  # reads the next batch during this one
                upcoming: Future[Any] | None = pool.submit(read, items[0]) if items else None
                for i, (b, first, stop) in enumerate(items):
                    assert upcoming is not None
                    inputs = upcoming.result()
                    upcoming = pool.submit(read, items[i + 1]) if i + 1 < len(items) else None
                    start, end = b * step, min(rows, (b + 1) * step)
                    positions = np.arange(start, end, dtype=np.int64)
                    for out in worker.units(inputs, positions, None, range(first, stop)):
                        store.write(out)
                    if i + 1 == len(items) or items[i + 1][0] != b:
                        self.computed += end - start
                        bar.update(end - start)
        finally:
            bar.close()

    def _rows_of(self, items: Sequence[tuple[int, int, int]]) -> int:
        """How many rows the batches of ``items`` hold."""
        step = self.batch_size
        return sum(min(self.rows, (b + 1) * step) - b * step for b in {b for b, _, _ in items})

    def _local_rows(self, worker: _Worker, store: _Store, progress: bool) -> None:
        source = self.ray_source
        assert source is not None
        todo = self._undone(source, store)
        self.skipped = source.rows - todo
        bar = _ProgressBar(todo, progress, "explain_dataset")
        dataset = source.dataset
        try:
            for batch in dataset.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
                keep = _pending(self.job, np.asarray(batch[source.index_column]))
                if not keep.any():
                    continue
                inputs = worker.inputs(np.asarray(batch[source.column])[keep])
                positions = source.positions(np.asarray(batch[source.index_column])[keep])
                for out in worker.units(inputs, positions, None, range(self.job.plan.chunks)):
                    store.write(out)
                self.computed += len(positions)
                bar.update(len(positions))
        finally:
            bar.close()

    def _undone(self, source: _RaySource, store: _Store) -> int:
        """Note a Ray data set's unfinished ids in the job; how many rows remain.

        Workers skip the finished rows themselves: a ``filter`` stage would be Ray tasks
        that need CPUs the actor pool may hold.
        """
        pending = store.pending_rows()
        keys = None if len(pending) == source.rows else source.keys[pending]
        self.job = dataclasses.replace(self.job, pending_keys=keys)
        return len(pending)

    # -- ray --

    def ray(
        self,
        ray: ModuleType,
        progress: bool,
        concurrency: int | None,
        num_cpus: float,
        num_gpus: float,
        retries: int,
    ) -> None:
        cloudpickle = importlib.import_module("ray.cloudpickle")
        try:
            cloudpickle.dumps((self.job.model_factory, self.job.transform))
        except Exception as exc:
            raise OptionError(
                f"engine='ray' sends model_factory to every actor, and it cannot be pickled "
                f"({type(exc).__name__}: {exc}); use a module-level function or a "
                "functools.partial of one."
            ) from exc
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(include_dashboard=False, log_to_driver=False)
        context = ray.data.DataContext.get_current()
        saved = (context.enable_progress_bars, context.print_on_execution_start)
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        try:
            self._ray(ray, progress, concurrency, num_cpus, num_gpus, retries)
        finally:
            context.enable_progress_bars, context.print_on_execution_start = saved
            if started_here:
                ray.shutdown()

    def _ray(
        self,
        ray: ModuleType,
        progress: bool,
        concurrency: int | None,
        num_cpus: float,
        num_gpus: float,
        retries: int,
    ) -> None:
        job, data = self.job, None
        if job.source is not None:
            light, array = job.source.detach()
            if array is not None:
                data = ray.put(array)  # once; every actor maps it from the object store
            job = dataclasses.replace(job, source=light)
        if concurrency is None:
            resources = ray.cluster_resources()
            if num_gpus:
                concurrency = int(resources.get("GPU", 0) // num_gpus)
            else:
                concurrency = int(resources.get("CPU", 1) // max(num_cpus, 1e-9))
                if self.ray_source is not None:  # leave a CPU to the data set's own tasks
                    concurrency -= 1
            concurrency = max(1, concurrency)
        if self.store is None:
            sample = None
            if self.ray_source is not None:
                batch = self.ray_source.dataset.take_batch(1, batch_format="numpy")
                sample = np.asarray(batch[self.ray_source.column])
            probe_task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(
                _probe_remote
            )
            try:
                probe = ray.get(probe_task.remote(job, data, sample))
            except Exception as exc:
                raise _multicam_cause(exc) or exc from None
            self.create(probe)
        else:
            self.resume()
        job = dataclasses.replace(job, plan=self.job.plan, spatial=self.job.spatial)
        for attempt in range(retries + 1):
            self.attempts = attempt + 1
            try:
                failures = self._ray_attempt(
                    ray, job, data, progress, concurrency, num_cpus, num_gpus
                )
            except Exception as exc:  # the run itself failed, e.g. an actor died too often
                cause = _multicam_cause(exc)
                traceback.clear_frames(exc.__traceback__)  # release the actors
                gc.collect()
                if cause is not None:
                    raise cause from None
                raise
            if not failures:
                return
            first = failures[0]
            what = f"{len(failures)} batch(es) failed, first (row {first['row']}): "
            what += f"{first['class']}: {first['message']}"
            if attempt == retries:
                error = MulticamError(
                    f"explain_dataset on Ray: {what}; gave up after {retries + 1} attempts. "
                    "The store keeps every finished batch: fix the cause and rerun the same "
                    "call to resume."
                )
                error.add_note(f"raised in a Ray actor:\n{first['trace']}")
                raise error
            warnings.warn(
                f"explain_dataset: {what}; resuming from the store (attempt {attempt + 2} of "
                f"{retries + 1}).",
                RuntimeWarning,
                stacklevel=3,
            )

    def _ray_attempt(
        self,
        ray: ModuleType,
        job: _Job,
        data: Any,
        progress: bool,
        concurrency: int,
        num_cpus: float,
        num_gpus: float,
    ) -> list[dict[str, Any]]:
        """One run of the actor pool over the units not yet done; its failed batches."""
        store = self.store
        assert store is not None
        items: list[tuple[int, int, int]] = []
        if self.ray_source is not None:
            todo = self._undone(self.ray_source, store)
            job = dataclasses.replace(job, pending_keys=self.job.pending_keys)
            dataset = self.ray_source.dataset
            batch_size: int | None = self.batch_size
        else:
            items = store.pending_units()
            todo = self._rows_of(items)
            work = [{"batch": b, "first": first, "stop": stop} for b, first, stop in items]
            dataset = ray.data.from_items(work, override_num_blocks=max(1, len(work)))
            batch_size = 1  # one batch of rows per call: units stay aligned with chunks
        if self.attempts == 1:
            self.skipped = self.rows - todo
        if todo == 0:
            return []
        mapped = dataset.map_batches(
            _RayExplainer,
            fn_constructor_args=(job, [data]),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(concurrency, len(items) or concurrency)),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        )
        failures: list[dict[str, Any]] = []
        bar = _ProgressBar(todo, progress, f"explain_dataset (ray, attempt {self.attempts})")
        try:
            for block in mapped.iter_batches(batch_size=None, batch_format="numpy"):
                out = dict(block)
                if self.ray_source is not None:
                    out["row"] = self.ray_source.positions(out.pop("key"))
                errors = np.asarray(out.pop("error")).astype(str)
                classes = np.asarray(out.pop("error_class")).astype(str)
                traces = np.asarray(out.pop("error_trace")).astype(str)
                failed = errors != ""
                for i in np.nonzero(failed)[0]:
                    if classes[i].startswith("multicam."):  # deterministic: stop now
                        raise _rebuilt(classes[i], errors[i], traces[i])
                    failures.append(
                        {
                            "row": int(out["row"][i]),
                            "class": classes[i],
                            "message": errors[i],
                            "trace": traces[i],
                        }
                    )
                if failed.any():
                    out = {name: values[~failed] for name, values in out.items()}
                    if not len(out["row"]):
                        continue
                if self.ray_source is not None:
                    finished = int(np.count_nonzero(out["tchunk"] == job.plan.chunks - 1))
                else:
                    finished = self._finished_rows(out, items)
                store.write(out)
                self.computed += finished
                bar.update(finished)
        finally:
            bar.close()
        return failures

    def _finished_rows(
        self, out: Mapping[str, np.ndarray], items: Sequence[tuple[int, int, int]]
    ) -> int:
        """Rows in ``out`` whose batch's last pending target chunk it holds."""
        stops = {b: s for b, _, s in items}
        rows = np.asarray(out["row"])
        chunk_ids = np.asarray(out["tchunk"])
        batches = rows // self.batch_size
        last = np.array([stops.get(int(b), -1) - 1 for b in batches])
        return int(np.count_nonzero(chunk_ids == last))


def _rebuilt(class_path: str, message: str, trace: str) -> MulticamError:
    """The multicam error an actor reported, raised again on the driver."""
    from . import errors

    error_class = getattr(errors, class_path.rsplit(".", 1)[-1], None)
    if not (isinstance(error_class, type) and issubclass(error_class, MulticamError)):
        error_class = MulticamError
    error = error_class(message)
    error.add_note(f"raised in a Ray actor:\n{trace}")
    return error


def _describe_callable(function: Any) -> str:
    """``module.qualname`` of a function, or its repr (a ``functools.partial``)."""
    name = getattr(function, "__qualname__", None)
    module = getattr(function, "__module__", None)
    if name is None:
        return repr(function)[:500]
    return f"{module}.{name}" if module else str(name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _multicam_cause(exc: BaseException) -> MulticamError | None:
    """The multicam error a Ray failure wraps, if any (Ray re-raises it wrapped)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, MulticamError) and type(current).__module__.startswith("multicam"):
            return current
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    return None


# --- command line ------------------------------------------------------------------------


def add_cli_parser(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add ``multicam explain-dataset`` to an argparse ``subparsers`` object.

    Args:
        subparsers: what ``parser.add_subparsers()`` returned.
        parents: parsers whose options the command shares (e.g. ``--debug``).

    Returns:
        The command's parser; :func:`run_cli` runs the parsed arguments.
    """
    parser = subparsers.add_parser(
        "explain-dataset",
        parents=list(parents),
        help="explain a whole data set into a Zarr store (resumable; local or Ray)",
        description="Explain every row of a data set with one method at one layer and "
        "stream the maps into a Zarr v3 store (maps, scores, targets, index, blank). "
        "Rerunning the same command resumes. FACTORY is MODULE:FUNCTION (MODULE may be a "
        "file.py) returning the model, or (module, variables) for Flax linen. SOURCE is a "
        ".npy file in the model's layout or a folder of images.",
        epilog="example:\n  multicam explain-dataset mynets.py:make_model val/ val-cams.zarr "
        "--layer layer4 --targets all --size none --image-size 224 224 --transform "
        "mynets.py:normalize --engine ray",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("factory", help="MODULE:FUNCTION that builds the model")
    parser.add_argument("source", help=".npy file or folder of images")
    parser.add_argument("out", help="Zarr store to write or resume, e.g. cams.zarr")
    parser.add_argument("--layer", required=True, help="layer name, e.g. features.7")
    parser.add_argument(
        "--targets",
        default=None,
        help="'all', a class id, or a .npy file of N or (N, T) class ids (default: the "
        "predicted class)",
    )
    parser.add_argument("--method", default="GradCAM", help="method class (default GradCAM)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    parser.add_argument("--engine", choices=_ENGINES, default="local")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--target-chunk", type=int, default=None, help="targets per call")
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=DEFAULT_MEMORY_BUDGET / 2**20,
        metavar="MB",
        help="memory for one call's arrays when --target-chunk is not given (default "
        "%(default)g MB)",
    )
    parser.add_argument(
        "--size",
        nargs="+",
        default=["input"],
        help="map size: 'input' (default), 'none' (the layer's resolution) or H W",
    )
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None)
    parser.add_argument("--transform", default=None, help="MODULE:FUNCTION applied to batches")
    parser.add_argument("--no-relu", action="store_true", help="keep the signed maps")
    parser.add_argument("--no-normalize", action="store_true", help="do not min-max normalise")
    parser.add_argument("--concurrency", type=int, default=None, help="Ray actors")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per Ray actor")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per Ray actor")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: a local Ray)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the store")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _entry_point(spec: str, option: str, for_ray: bool) -> Callable[..., Any]:
    from .cli import import_user_module

    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise OptionError(f"{option} {spec!r}: expected MODULE:FUNCTION, e.g. mynets.py:build")
    module = import_user_module(module_name, option)
    function = getattr(module, name, None)
    if not callable(function):
        raise OptionError(f"{option} {spec!r}: {module.__name__} has no function {name!r}")
    if for_ray and not module.__name__.startswith("multicam"):
        # Ray's workers cannot import the user's script: send its code along instead
        _ray()
        importlib.import_module("ray.cloudpickle").register_pickle_by_value(module)
    return function


def run_cli(args: argparse.Namespace) -> int:
    """Run ``multicam explain-dataset`` from its parsed arguments; returns the exit status."""
    for_ray = args.engine == "ray"
    factory = _entry_point(args.factory, "FACTORY", for_ray)
    transform = _entry_point(args.transform, "--transform", for_ray) if args.transform else None
    targets: Any = args.targets
    if targets is not None and targets != "all":
        if targets.endswith(".npy"):
            targets = np.load(targets)
        else:
            try:
                targets = int(targets)
            except ValueError:
                raise OptionError(
                    f"--targets {targets!r}: expected 'all', a class id or a .npy file"
                ) from None
    size: Any
    if args.size == ["input"]:
        size = "input"
    elif [s.lower() for s in args.size] == ["none"]:
        size = None
    else:
        try:
            size = tuple(int(s) for s in args.size)
        except ValueError:
            raise OptionError(
                f"--size {' '.join(args.size)}: expected input, none or H W"
            ) from None
    if args.engine == "ray" and args.address:
        _ray().init(address=args.address)
    result = explain_dataset(
        factory,
        args.layer,
        args.source,
        args.out,
        targets=targets,
        method=args.method,
        batch_size=args.batch_size,
        engine=args.engine,
        progress=not args.no_progress,
        dtype=args.dtype,
        target_chunk=args.target_chunk,
        memory_budget=int(args.memory_budget * 2**20),
        image_size=args.image_size,
        channels=args.channels,
        transform=transform,
        concurrency=args.concurrency,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        overwrite=args.overwrite,
        relu=not args.no_relu,
        normalize=not args.no_normalize,
        size=size,
    )
    blank = int(np.count_nonzero(result.blank[:]))
    print(
        f"wrote {args.out}: {result.rows} rows x {result.num_targets} targets "
        f"({result.computed} explained now, {result.skipped} already done) in "
        f"{result.seconds:.1f} s, {result.images_per_second:.1f} images/s; "
        f"{blank} blank maps"
    )
    return 0 if result.store.attrs.get("complete") else 1
