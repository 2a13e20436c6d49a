"""The benchmark suite behind ``multicam bench``: multicam against its floors and its peers.

For every architecture, framework, batch size N and number of targets T, the contenders
are timed side by side in one process, interleaved (one call of each in turn, in a fresh
random order every round), after one warm-up call each that is excluded from the timings
and reported on its own (tracing, compilation, caches):

- ``forward``: a plain inference forward of the whole network (floor 1);
- ``floor``: a hand-written forward to the layer without a graph, then the head under
  autograd and one batched vector-Jacobian product back to the layer, T targets at once
  (the network is rebuilt from the zoo spec as two halves sharing its weights);
- ``floor-loop``: the same with one backward per target (T > 1); the floor is the faster;
- ``multicam``: ``GradCAM(model, layer)(x, targets=(N, T) classes)``, maps resized to the
  input and normalised, i.e. everything a user gets;
- peers, where importable: Captum ``LayerGradCam``, pytorch-grad-cam ``GradCAM``, torchcam
  ``GradCAM``, tf-keras-vis ``Gradcam`` and the Keras example's recipe; a peer explains one
  class per call, so T maps cost it T calls.

Peak memory is the largest resident-set growth seen by a sampling thread during one extra
call. The NumPy stage (pooling, weighted sum, ReLU, resize, normalise) is timed alone.
Results: a Markdown table, a JSON file and a plot, with the machine, versions and settings.

No time is ever asserted here; ``tests/test_benchmarks.py`` only checks that a tiny
configuration runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import algebra, zoo

__all__ = ["Timing", "main", "run"]

_NEEDS = {"torch": ("torch",), "keras": ("tensorflow", "keras"), "flax": ("jax", "flax")}
# The ResNet-50-size network of the zoo and its layer; the digits CNN and its last conv.
_LAYERS = {"digits_cnn": "features.relu4", "resnet50": "layer4"}
_PACKAGES = (
    "numpy",
    "torch",
    "tensorflow",
    "keras",
    "jax",
    "jaxlib",
    "flax",
    "captum",
    "grad-cam",
    "torchcam",
    "tf-keras-vis",
    "torchvision",
    "opencv-python-headless",
    "opencv-python",
)


@dataclasses.dataclass
class Timing:
    """One contender on one case."""

    arch: str
    framework: str
    batch: int
    targets: int
    contender: str
    kind: str  # forward, floor, multicam, peer
    times: list[float]
    warmup_s: float
    peak_mb: float | None = None
    note: str = ""

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


# --- measuring -----------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: no sampling
        return 0


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Largest growth of the resident set during ``fn()``, in MiB (sampled every ~0.2 ms)."""
    base = _rss_bytes()
    if base == 0:
        return None
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
        peak[0] = max(peak[0], _rss_bytes())
        del result
    finally:
        done.set()
        thread.join()
    return (peak[0] - base) / 2**20


def time_interleaved(
    contenders: dict[str, Callable[[], Any]],
    repeats: int,
    seed: int = 0,
    failures: dict[str, str] | None = None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm each contender up once, then time ``repeats`` rounds, shuffled every round."""
    warmup: dict[str, float] = {}
    for name, fn in list(contenders.items()):
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # a peer that fails here: reported, not timed
            if failures is None:
                raise
            failures[name] = f"fails here: {type(exc).__name__}: {exc}"[:400]
            contenders = {k: v for k, v in contenders.items() if k != name}
            continue
        warmup[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            result = contenders[name]()
            times[name].append(time.perf_counter() - start)
            del result
    return times, warmup


# --- networks ------------------------------------------------------------------------------


def _split(arch: zoo.Architecture, layer: str) -> tuple[zoo.Architecture, zoo.Architecture]:
    """``arch`` as two halves: the layers up to ``layer`` (its output) and the head."""
    top, *rest = layer.split(".")
    names = [op.name for op in arch.layers]
    index = names.index(top)
    node: Any = arch.layers[index]
    for part in rest:  # the layer must end its top-level component
        assert isinstance(node, zoo.Stage | zoo.Residual)
        children = node.layers if isinstance(node, zoo.Stage) else node.body
        if children[-1].name != part:
            raise ValueError(f"{layer!r} does not end {top!r}; cannot split there")
        node = children[-1]
    features = dataclasses.replace(
        arch, name=arch.name + "_features", layers=arch.layers[: index + 1]
    )
    shape = _output_shape(arch, features.layers)
    head = dataclasses.replace(
        arch, name=arch.name + "_head", input_shape=shape, layers=arch.layers[index + 1 :]
    )
    return features, head


def _output_shape(arch: zoo.Architecture, layers: Sequence[Any]) -> tuple[int, ...]:
    """Channels-last shape of one sample after ``layers``, from the spec alone."""
    shape = tuple(arch.input_shape)

    def walk(ops: Sequence[Any], shape: tuple[int, ...]) -> tuple[int, ...]:
        for op in ops:
            if isinstance(op, zoo.Conv):
                spatial = tuple(
                    (s + 2 * op.padding - op.kernel) // op.stride + 1 for s in shape[:-1]
                )
                shape = (*spatial, op.out_channels)
            elif isinstance(op, zoo.Stage):
                shape = walk(op.layers, shape)
            elif isinstance(op, zoo.Residual):
                shape = walk(op.body, shape)
            elif isinstance(op, zoo.Dense):
                shape = (*shape[:-1], op.out_features)
            elif isinstance(op, zoo.Flatten):
                shape = (int(np.prod(shape)),)
            elif isinstance(op, zoo.GlobalAvgPool):
                shape = shape[-1:]
        return shape

    return walk(layers, shape)


def _classes(n: int, t: int, num_classes: int) -> np.ndarray:
    """``(N, T)`` distinct classes per row, different rows different classes."""
    return ((np.arange(t)[None, :] * 7 + np.arange(n)[:, None] * 13) % num_classes).astype(np.int64)


# --- contenders per framework ----------------------------------------------------------------


class _Framework:
    name = ""
    backend = ""

    def __init__(self, arch: str, weights: dict[str, np.ndarray], layer: str) -> None:
        self.arch = zoo._architecture(arch)
        self.weights = weights
        self.layer = layer
        self.features_arch, self.head_arch = _split(self.arch, layer)
        self.skipped: dict[str, str] = {}

    def contenders(
        self, x: np.ndarray, classes: np.ndarray, peers: bool
    ) -> dict[str, tuple[str, Callable[[], Any]]]:
        raise NotImplementedError


class _Torch(_Framework):
    name, backend = "torch", "torch"

    def __init__(self, arch: str, weights: dict[str, np.ndarray], layer: str) -> None:
        super().__init__(arch, weights, layer)
        import torch

        from .cam import GradCAM

        self.torch = torch
        self.model = zoo.build(self.arch, "torch", weights)
        self.features = zoo.build(self.features_arch, "torch", weights)
        self.head = zoo.build(self.head_arch, "torch", weights)
        self.explainer = GradCAM(self.model, zoo.layer_name(layer, "torch"))
        self.top = layer.split(".")[0]
        self._peers: dict[str, Any] = {}

    def _peer_model(self, name: str) -> Any:
        # Each peer gets its own copy: peers leave hooks on the model they are given.
        if name not in self._peers:
            self._peers[name] = copy.deepcopy(self.model)
        return self._peers[name]

    def contenders(
        self, x: np.ndarray, classes: np.ndarray, peers: bool
    ) -> dict[str, tuple[str, Callable[[], Any]]]:
        torch = self.torch
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
        n, t = classes.shape
        index = torch.from_numpy(classes)
        size = tuple(x.shape[1:-1])

        def forward() -> Any:
            with torch.inference_mode():
                return self.model(xt)

        def floor(batched: bool) -> Callable[[], Any]:
            def run() -> Any:
                with torch.no_grad():
                    a = self.features(xt)
                a.requires_grad_(True)
                with torch.enable_grad():
                    scores = self.head(a).gather(1, index)
                    if t == 1:
                        return torch.autograd.grad(scores.sum(), a)[0]
                    if batched:
                        eye = torch.eye(t)[:, None, :].expand(t, n, t)
                        return torch.autograd.grad(
                            scores, a, grad_outputs=eye, is_grads_batched=True
                        )[0]
                    return [
                        torch.autograd.grad(scores[:, i].sum(), a, retain_graph=True)[0]
                        for i in range(t)
                    ]

            return run

        out: dict[str, tuple[str, Callable[[], Any]]] = {
            "forward": ("forward", forward),
            "floor": ("floor", floor(True)),
            "multicam": ("multicam", lambda: self.explainer(xt, targets=classes)),
        }
        if t > 1:
            out["floor-loop"] = ("floor", floor(False))
        if peers:
            out.update(self._peer_contenders(xt, classes, size))
        return out

    def _peer_contenders(
        self, xt: Any, classes: np.ndarray, size: tuple[int, ...]
    ) -> dict[str, tuple[str, Callable[[], Any]]]:
        torch = self.torch
        out: dict[str, tuple[str, Callable[[], Any]]] = {}
        columns = [classes[:, i].tolist() for i in range(classes.shape[1])]
        try:
            from captum.attr import LayerAttribution, LayerGradCam

            model = self._peer_model("captum")
            captum = LayerGradCam(model, model.get_submodule(self.layer))

            def run_captum() -> Any:
                return [
                    LayerAttribution.interpolate(
                        captum.attribute(xt, target=column, relu_attributions=True),
                        size,
                        interpolate_mode="bilinear",
                    )
                    for column in columns
                ]

            out["captum"] = ("peer", run_captum)
        except ImportError as exc:
            self.skipped["captum"] = f"not importable here: {exc}"
        try:
            from pytorch_grad_cam import GradCAM as PGCGradCAM  # type: ignore[import-not-found,unused-ignore]
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # type: ignore[import-not-found,unused-ignore]

            model = self._peer_model("pytorch-grad-cam")
            pgc = PGCGradCAM(model=model, target_layers=[model.get_submodule(self.layer)])

            def run_pgc() -> Any:
                return [
                    pgc(input_tensor=xt, targets=[ClassifierOutputTarget(c) for c in column])
                    for column in columns
                ]

            out["pytorch-grad-cam"] = ("peer", run_pgc)
        except ImportError as exc:
            self.skipped["pytorch-grad-cam"] = f"not importable here: {exc}"
        try:
            from torchcam.methods import GradCAM as TCGradCAM  # type: ignore[import-not-found,unused-ignore]

            model = self._peer_model("torchcam")
            extractor = TCGradCAM(model, target_layer=self.layer)

            def run_torchcam() -> Any:
                with torch.enable_grad():
                    scores = model(xt)
                    maps = []
                    for i, column in enumerate(columns):
                        (cam,) = extractor(
                            column, scores, retain_graph=i < len(columns) - 1, normalized=True
                        )
                        maps.append(
                            torch.nn.functional.interpolate(
                                cam[:, None], size=size, mode="bilinear", align_corners=False
                            )
                        )
                    model.zero_grad(set_to_none=True)
                return maps

            out["torchcam"] = ("peer", run_torchcam)
        except ImportError as exc:
            self.skipped["torchcam"] = f"not importable here: {exc}"
        return out


class _Keras(_Framework):
    name, backend = "keras", "tensorflow"

    def __init__(self, arch: str, weights: dict[str, np.ndarray], layer: str) -> None:
        super().__init__(arch, weights, layer)
        import keras
        import tensorflow as tf

        from .cam import GradCAM

        self.tf, self.keras = tf, keras
        self.model = zoo.build(self.arch, "keras", weights)
        self.features = zoo.build(self.features_arch, "keras", weights)
        self.head = zoo.build(self.head_arch, "keras", weights)
        self.explainer = GradCAM(self.model, zoo.layer_name(layer, "keras"))
        self.top = layer.split(".")[0]

    def contenders(
        self, x: np.ndarray, classes: np.ndarray, peers: bool
    ) -> dict[str, tuple[str, Callable[[], Any]]]:
        tf = self.tf
        t = classes.shape[1]
        xt = tf.convert_to_tensor(x)
        index = tf.convert_to_tensor(classes)

        def forward() -> Any:
            return self.model(xt, training=False)

        def floor(batched: bool) -> Callable[[], Any]:
            def run() -> Any:
                a = self.features(xt, training=False)
                with tf.GradientTape(persistent=t > 1, watch_accessed_variables=False) as tape:
                    tape.watch(a)
                    scores = tf.gather(self.head(a, training=False), index, axis=1, batch_dims=1)
                    columns = tf.unstack(scores, axis=1) if (t > 1 and not batched) else []
                if t == 1:
                    return tape.gradient(scores, a)
                if batched:
                    return tape.batch_jacobian(scores, a, experimental_use_pfor=True)
                return [tape.gradient(column, a) for column in columns]

            return run

        out: dict[str, tuple[str, Callable[[], Any]]] = {
            "forward": ("forward", forward),
            "floor": ("floor", floor(True)),
            "multicam": ("multicam", lambda: self.explainer(x, targets=classes)),
        }
        if t > 1:
            out["floor-loop"] = ("floor", floor(False))
        if peers:
            out.update(self._peer_contenders(x, classes))
        return out

    def _peer_contenders(
        self, x: np.ndarray, classes: np.ndarray
    ) -> dict[str, tuple[str, Callable[[], Any]]]:
        tf, keras = self.tf, self.keras
        out: dict[str, tuple[str, Callable[[], Any]]] = {}
        columns = [classes[:, i] for i in range(classes.shape[1])]
        size = tuple(x.shape[1:-1])
        grad_model = keras.Model(
            self.model.inputs, [self.model.get_layer(self.top).output, self.model.output]
        )

        def run_recipe() -> Any:
            # keras.io "Grad-CAM class activation visualization", batched over samples.
            maps = []
            for column in columns:
                with tf.GradientTape() as tape:
                    conv, preds = grad_model(x)
                    class_channel = tf.gather(preds, column, axis=1, batch_dims=1)
                grads = tape.gradient(class_channel, conv)
                pooled = tf.reduce_mean(grads, axis=(1, 2))
                heatmap = tf.einsum("nhwk,nk->nhw", conv, pooled)
                heatmap = tf.maximum(heatmap, 0) / tf.reduce_max(
                    heatmap, axis=(1, 2), keepdims=True
                )
                maps.append(tf.image.resize(heatmap[..., None], size).numpy())
            return maps

        out["keras-recipe"] = ("peer", run_recipe)
        try:
            from tf_keras_vis.gradcam import Gradcam  # type: ignore[import-not-found,unused-ignore]
            from tf_keras_vis.utils.scores import CategoricalScore  # type: ignore[import-not-found,unused-ignore]

            gradcam = Gradcam(self.model, clone=True)

            def run_vis() -> Any:
                return [
                    gradcam(CategoricalScore(column.tolist()), x, penultimate_layer=self.top)
                    for column in columns
                ]

            out["tf-keras-vis"] = ("peer", run_vis)
        except Exception as exc:  # ImportError, or a Keras 3 incompatibility
            self.skipped["tf-keras-vis"] = f"{type(exc).__name__}: {exc}"[:300]
        return out


class _Flax(_Framework):
    name, backend = "flax", "jax"

    def __init__(
        self, arch: str, weights: dict[str, np.ndarray], layer: str, jit: bool = True
    ) -> None:
        super().__init__(arch, weights, layer)
        import jax
        import jax.numpy as jnp

        from .cam import GradCAM

        self.jax, self.jnp, self.jit = jax, jnp, jit
        self.name = "flax" if jit else "flax-nojit"
        self.module, self.variables = zoo.build(self.arch, "flax", weights)
        fm, fv = zoo.build(self.features_arch, "flax", weights)
        hm, hv = zoo.build(self.head_arch, "flax", weights)
        self.explainer = GradCAM(
            self.module, zoo.layer_name(layer, "flax"), variables=self.variables
        )

        def forward(v: Any, x: Any) -> Any:
            return self.module.apply(v, x)

        def floor(fv: Any, hv: Any, x: Any, cls: Any) -> Any:
            a = fm.apply(fv, x)
            outputs, vjp = jax.vjp(lambda a: hm.apply(hv, a), a)
            scores = jnp.take_along_axis(outputs, cls, axis=1)
            cotangents = jax.nn.one_hot(cls.T, outputs.shape[1], dtype=outputs.dtype)
            (grads,) = jax.vmap(vjp)(cotangents)
            return grads, scores

        self._forward = jax.jit(forward) if jit else forward
        self._floor = jax.jit(floor) if jit else floor
        self._fv, self._hv = fv, hv

    @property
    def trace_count(self) -> int:
        return int(getattr(self.explainer.bound, "trace_count", -1))

    def contenders(
        self, x: np.ndarray, classes: np.ndarray, peers: bool
    ) -> dict[str, tuple[str, Callable[[], Any]]]:
        jax = self.jax
        xj = jax.device_put(x)
        cls = jax.device_put(classes.astype(np.int32))

        def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
            if self.jit:
                return lambda: jax.block_until_ready(fn())

            def eager() -> Any:
                with jax.disable_jit():
                    return jax.block_until_ready(fn())

            return eager

        return {
            "forward": ("forward", wrap(lambda: self._forward(self.variables, xj))),
            "floor": ("floor", wrap(lambda: self._floor(self._fv, self._hv, xj, cls))),
            "multicam": ("multicam", wrap(lambda: self.explainer(x, targets=classes))),
        }


def _make(framework: str, arch: str, weights: dict[str, np.ndarray], layer: str) -> _Framework:
    if framework == "torch":
        return _Torch(arch, weights, layer)
    if framework == "keras":
        return _Keras(arch, weights, layer)
    if framework == "flax":
        return _Flax(arch, weights, layer, jit=True)
    if framework == "flax-nojit":
        return _Flax(arch, weights, layer, jit=False)
    raise KeyError(framework)


# --- the NumPy stage ----------------------------------------------------------------------------


def numpy_stage(
    n: int, k: int, spatial: tuple[int, int], size: tuple[int, int], repeats: int
) -> dict[str, Any]:
    """Time pooling, weighted sum, ReLU, resize and normalise alone, on random maps."""
    rng = np.random.default_rng(0)
    activations = rng.standard_normal((n, k, *spatial), dtype=np.float32)
    gradients = rng.standard_normal((n, 1, k, *spatial), dtype=np.float32)

    def stage() -> np.ndarray:
        weights = algebra.channel_weights(gradients)
        maps = algebra.relu(algebra.weighted_sum(activations, weights))
        maps = algebra.resize(maps, size)
        return algebra.normalize(maps, len(size))

    contenders: dict[str, Callable[[], Any]] = {"multicam-numpy": stage}
    skipped = {}
    try:
        import torch  # before TensorFlow; pytorch-grad-cam needs it
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.image import scale_cam_image  # type: ignore[import-not-found,unused-ignore]

        pgc = PGCGradCAM(model=torch.nn.Conv2d(1, 1, 1), target_layers=[])

        def peer() -> np.ndarray:
            # BaseCAM.compute_cam_per_layer: get_cam_image, ReLU, scale_cam_image per image.
            cam = pgc.get_cam_image(None, None, None, activations, gradients[:, 0], False)
            return scale_cam_image(np.maximum(cam, 0), size)

        contenders["pytorch-grad-cam-postprocess"] = peer
    except ImportError as exc:
        skipped["pytorch-grad-cam-postprocess"] = f"not importable here: {exc}"
    times, _ = time_interleaved(contenders, repeats)
    return {
        "n": n,
        "k": k,
        "spatial": list(spatial),
        "size": list(size),
        "results": {
            name: {"best_s": min(ts), "median_s": statistics.median(ts), "times": ts}
            for name, ts in times.items()
        },
        "skipped": skipped,
    }


# --- the run --------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    found = {}
    for package in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    found["python"] = platform.python_version()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        found["multicam"] = importlib.metadata.version("multicam")
    return found


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf")
        else None,
        "gpu": "none used (CPU builds)",
    }


def available_frameworks() -> list[str]:
    """Benchmark frameworks whose packages are installed (found without importing them)."""
    return [
        name
        for name, modules in _NEEDS.items()
        if all(importlib.util.find_spec(m) is not None for m in modules)
    ]


def run(
    archs: Sequence[str] = ("digits_cnn", "resnet50"),
    frameworks: Sequence[str] | None = None,
    batches: Sequence[int] = (1, 8),
    targets: Sequence[int] = (1, 10, 100),
    repeats: int = 3,
    peers: bool = True,
    peer_targets: int = 10,
    memory: bool = True,
    nojit_batches: Sequence[int] = (1,),
    numpy_stage_n: int = 64,
    forward_n: int | None = 64,
    budget_s: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the suite; return everything measured as a JSON-ready dict.

    Args:
        archs: zoo architectures (``"digits_cnn"``, ``"resnet50"``).
        frameworks: subset of ``torch``, ``keras``, ``flax``; default all installed.
            ``flax`` also runs ``flax-nojit`` at the batch sizes in ``nojit_batches``.
        batches: batch sizes N.
        targets: numbers of target classes per image T (capped at the model's classes).
        repeats: timed rounds after the warm-up; best and median are reported.
        peers: also time the peers that are importable.
        peer_targets: the largest T a peer is timed at (a peer needs T calls).
        memory: measure peak memory (one extra call per contender).
        nojit_batches: batch sizes at which JAX also runs without jit.
        numpy_stage_n: N of the NumPy-stage timing (K=2048, 7x7 -> 224x224); 0 skips it.
        forward_n: the ResNet-50 torch forward batch the NumPy stage is compared with;
            ``None`` skips it.
        budget_s: stop starting new cases after this many seconds.
        log: progress lines.
    """
    started = time.perf_counter()
    if frameworks is None:
        frameworks = available_frameworks()
    if "torch" in frameworks or importlib.util.find_spec("torch") is not None:
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401  (torch before TensorFlow)
    plan = list(frameworks)
    if "flax" in plan and nojit_batches:
        plan.append("flax-nojit")
    timings: list[Timing] = []
    skipped: dict[str, str] = {}
    recompiles: list[dict[str, Any]] = []
    cut: list[str] = []
    warnings.simplefilter("ignore")
    for arch in archs:
        spec = zoo._architecture(arch)
        layer = _LAYERS.get(arch, spec.cam_layers[-1])
        weights = zoo.init_weights(arch, seed=0)
        for framework in plan:
            fw = _make(framework, arch, weights, layer)
            fw_batches = nojit_batches if framework == "flax-nojit" else batches
            for n in fw_batches:
                x = zoo.example_input(arch, n, seed=1)
                for t in targets:
                    if t > spec.num_classes:
                        cut.append(f"{arch}: T={t} > {spec.num_classes} classes")
                        continue
                    if budget_s is not None and time.perf_counter() - started > budget_s:
                        cut.append(f"{arch} {framework} N={n} T={t}: over the time budget")
                        continue
                    classes = _classes(n, t, spec.num_classes)
                    use_peers = peers and t <= peer_targets
                    contenders = fw.contenders(x, classes, use_peers)
                    if framework == "flax":
                        before = None
                    failed: dict[str, str] = {}
                    times, warmup = time_interleaved(
                        {n_: fn for n_, (kind, fn) in contenders.items()},
                        repeats,
                        failures=failed,
                    )
                    for name in failed:
                        if contenders[name][0] != "peer":
                            raise RuntimeError(failed[name])
                        skipped[f"{framework}:{name}"] = failed[name]
                        del contenders[name]
                    if framework == "flax" and t > 1:
                        # Same shapes, other classes: must not trace again.
                        before = fw.trace_count  # type: ignore[attr-defined]
                        other = _classes(n, t, spec.num_classes)[:, ::-1].copy()
                        fw.explainer(x, targets=other)  # type: ignore[attr-defined]
                        recompiles.append(
                            {
                                "arch": arch,
                                "batch": n,
                                "targets": t,
                                "traces_before": before,
                                "traces_after": fw.trace_count,  # type: ignore[attr-defined]
                            }
                        )
                    for name, (kind, fn) in contenders.items():
                        peak = peak_memory_mb(fn) if memory else None
                        timings.append(
                            Timing(
                                arch, framework, n, t, name, kind, times[name], warmup[name], peak
                            )
                        )
                    best = {name: min(ts) for name, ts in times.items()}
                    log(
                        f"{arch:<10} {framework:<10} N={n:<3} T={t:<3} "
                        + "  ".join(f"{k} {1e3 * v:.1f}ms" for k, v in best.items())
                    )
            skipped.update({f"{framework}:{k}": v for k, v in fw.skipped.items()})
            del fw
    stage = None
    if numpy_stage_n:
        stage = numpy_stage(numpy_stage_n, 2048, (7, 7), (224, 224), max(repeats, 3))
        skipped.update(stage["skipped"])
        if forward_n and "torch" in frameworks:
            stage["forward"] = _torch_forward(forward_n, max(1, min(repeats, 2)))
        log(
            f"numpy stage N={numpy_stage_n}: "
            + ", ".join(f"{k} {1e3 * r['best_s']:.1f}ms" for k, r in stage["results"].items())
        )
    if peers:
        for peer, module in [
            ("captum", "captum"),
            ("pytorch-grad-cam", "pytorch_grad_cam"),
            ("torchcam", "torchcam"),
            ("tf-keras-vis", "tf_keras_vis"),
        ]:
            if importlib.util.find_spec(module) is None and not any(
                k.endswith(peer) for k in skipped
            ):
                skipped[peer] = "not installed in this environment"
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": _machine(),
        "versions": _versions(),
        "settings": {
            "archs": list(archs),
            "layers": {a: _LAYERS.get(a) for a in archs},
            "frameworks": plan,
            "batches": list(batches),
            "targets": list(targets),
            "repeats": repeats,
            "peer_targets": peer_targets,
            "nojit_batches": list(nojit_batches),
            "warmup": "one call per contender and case before timing, excluded, reported",
            "timing": "interleaved rounds in shuffled order; best-of-N and median",
            "memory": "peak RSS growth during one extra call, sampled every ~0.2 ms",
            "threads": {"torch": _torch_threads()},
        },
        "timings": [dict(dataclasses.asdict(t), best=t.best, median=t.median) for t in timings],
        "numpy_stage": stage,
        "jax_recompilations": recompiles,
        "skipped": skipped,
        "cut": cut,
        "elapsed_s": time.perf_counter() - started,
    }
    result["goals"] = evaluate(result)
    return result


def _torch_threads() -> int | None:
    if "torch" not in sys.modules:
        return None
    return int(sys.modules["torch"].get_num_threads())


def _torch_forward(n: int, repeats: int) -> dict[str, Any]:
    import torch

    model = zoo.build("resnet50", "torch")
    x = torch.from_numpy(np.moveaxis(zoo.example_input("resnet50", n, seed=1), -1, 1).copy())

    def forward() -> Any:
        with torch.inference_mode():
            return model(x)

    times, _ = time_interleaved({"forward": forward}, repeats)
    return {
        "framework": "torch",
        "batch": n,
        "best_s": min(times["forward"]),
        "times": times["forward"],
    }


# --- goals --------------------------------------------------------------------------------------


def _index(result: dict[str, Any]) -> dict[tuple[str, str, int, int, str], dict[str, Any]]:
    return {
        (t["arch"], t["framework"], t["batch"], t["targets"], t["contender"]): t
        for t in result["timings"]
    }


def _floor(idx: dict[Any, Any], key: tuple[str, str, int, int]) -> float | None:
    found = [idx[(*key, c)]["best"] for c in ("floor", "floor-loop") if (*key, c) in idx]
    return min(found) if found else None


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured ratios and whether it was met."""
    idx = _index(result)
    goals: list[dict[str, Any]] = []
    cases = sorted({k[:4] for k in idx})

    def add(goal: str, case: str, value: float | None, limit: float, lower: bool) -> None:
        if value is None:
            return
        met = value <= limit if lower else value >= limit
        goals.append({"goal": goal, "case": case, "value": value, "limit": limit, "met": met})

    for arch, fw, n, t in cases:
        case = f"{arch} {fw} N={n} T={t}"
        mc = idx.get((arch, fw, n, t, "multicam"))
        if mc is None:
            continue
        floor = _floor(idx, (arch, fw, n, t))
        add(
            "T targets <= 1.15x the hand-written floor",
            case,
            mc["best"] / floor if floor else None,
            1.15,
            True,
        )
        fwd = idx.get((arch, fw, n, t, "forward"))
        if t == 1 and fwd and fwd.get("peak_mb") and mc.get("peak_mb") is not None:
            add(
                "peak memory <= 1.3x an inference forward (T=1)",
                case,
                mc["peak_mb"] / max(fwd["peak_mb"], 1e-9),
                1.3,
                True,
            )
        if t == 1:
            for (a, f, nn, tt, c), peer in idx.items():
                if (a, f, nn, tt) == (arch, fw, n, t) and peer["kind"] == "peer":
                    add(
                        f"one target: >= 1.0x the speed of {c}",
                        case,
                        peer["best"] / mc["best"],
                        1.0,
                        False,
                    )
        if arch == "resnet50" and t == 10:
            one = idx.get((arch, fw, n, 1, "multicam"))
            if one:
                add("GAP head: T=10 <= 1.5x T=1", case, mc["best"] / one["best"], 1.5, True)
            for (a, f, nn, tt, c), peer in idx.items():
                if (a, f, nn, tt) == (arch, fw, n, t) and peer["kind"] == "peer":
                    add(
                        f"GAP head: ten maps >= 5x faster than {c}",
                        case,
                        peer["best"] / mc["best"],
                        5.0,
                        False,
                    )
    stage = result.get("numpy_stage")
    if stage:
        ours = stage["results"]["multicam-numpy"]["best_s"]
        if stage.get("forward"):
            fwd = stage["forward"]
            add(
                "NumPy stage <= 10% of the ResNet-50 forward (same N)",
                f"N={stage['n']} torch forward N={fwd['batch']}",
                ours / fwd["best_s"] * stage["n"] / fwd["batch"],
                0.10,
                True,
            )
        peer = stage["results"].get("pytorch-grad-cam-postprocess")
        if peer:
            add(
                "NumPy stage faster than pytorch-grad-cam's post-processing",
                f"N={stage['n']}",
                peer["best_s"] / ours,
                1.0,
                False,
            )
    for rec in result.get("jax_recompilations", []):
        add(
            "JAX: no recompilation when only the classes change",
            f"{rec['arch']} N={rec['batch']} T={rec['targets']}",
            float(rec["traces_after"] - rec["traces_before"]),
            0.0,
            True,
        )
    return goals


# --- output -----------------------------------------------------------------------------------


TIMING_HEADER = (
    "arch",
    "framework",
    "N",
    "T",
    "contender",
    "best ms/batch",
    "median ms/batch",
    "best ms/image",
    "x floor",
    "warm-up ms",
    "peak MiB",
)
GOAL_HEADER = ("goal", "case", "measured", "limit", "met")


def _timing_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per contender and case, in :data:`TIMING_HEADER`'s columns."""
    idx = _index(result)
    rows = []
    for t in result["timings"]:
        floor = _floor(idx, (t["arch"], t["framework"], t["batch"], t["targets"]))
        rows.append(
            [
                t["arch"],
                t["framework"],
                str(t["batch"]),
                str(t["targets"]),
                t["contender"],
                f"{1e3 * t['best']:.1f}",
                f"{1e3 * t['median']:.1f}",
                f"{1e3 * t['best'] / t['batch']:.1f}",
                f"{t['best'] / floor:.2f}" if floor else "",
                f"{1e3 * t['warmup_s']:.0f}",
                "" if t["peak_mb"] is None else f"{t['peak_mb']:.0f}",
            ]
        )
    return rows


def _goal_rows(result: dict[str, Any], missed: str) -> list[list[str]]:
    return [
        [
            g["goal"],
            g["case"],
            f"{g['value']:.3g}",
            f"{g['limit']:g}",
            "met" if g["met"] else missed,
        ]
        for g in result["goals"]
    ]


def _stage_lines(result: dict[str, Any], bullet: str) -> list[str]:
    """The NumPy stage's timings, one line each."""
    stage = result.get("numpy_stage")
    if not stage:
        return []
    lines = [
        f"NumPy stage alone, N={stage['n']}, K={stage['k']}, "
        f"{'x'.join(map(str, stage['spatial']))} -> {'x'.join(map(str, stage['size']))}, "
        "one target:"
    ]
    lines += [
        f"{bullet}{name}: best {1e3 * r['best_s']:.1f} ms, median {1e3 * r['median_s']:.1f} ms"
        for name, r in stage["results"].items()
    ]
    if stage.get("forward"):
        fwd = stage["forward"]
        lines.append(
            f"{bullet}torch ResNet-50 inference forward, N={fwd['batch']}: "
            f"best {1e3 * fwd['best_s']:.0f} ms"
        )
    return lines


def _recompile_lines(result: dict[str, Any], bullet: str) -> list[str]:
    if not result["jax_recompilations"]:
        return []
    return ["JAX traces of multicam's jitted function before/after a call with other classes:"] + [
        f"{bullet}{rec['arch']} N={rec['batch']} T={rec['targets']}: "
        f"{rec['traces_before']} -> {rec['traces_after']}"
        for rec in result["jax_recompilations"]
    ]


def _pipe_table(header: Sequence[str], rows: list[list[str]], text: Sequence[str]) -> list[str]:
    """A compact Markdown table; columns named in ``text`` are left-aligned, others right."""
    rule = "|" + "|".join("---" if h in text else "---:" for h in header) + "|"
    lines = ["| " + " | ".join(row) + " |" for row in [list(header), *rows]]
    return [lines[0], rule, *lines[1:]]


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown: settings, the timing table, the NumPy stage, the goals."""
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; elapsed {result['elapsed_s']:.0f} s  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores "
        f"({result['machine']['affinity']} usable), {result['machine']['memory_gb']} GB, "
        f"{result['machine']['platform']}; {result['machine']['gpu']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "  ",
        "Settings: "
        + "; ".join(f"{k}: {v}" for k, v in result["settings"].items() if k != "threads")
        + f"; torch threads {result['settings']['threads']['torch']}",
        "",
    ]
    lines += _pipe_table(TIMING_HEADER, _timing_rows(result), ("arch", "framework", "contender"))
    for extra in (_stage_lines(result, "- "), _recompile_lines(result, "- ")):
        if extra:
            lines += ["", extra[0], "", *extra[1:]]
    lines.append("")
    lines += _pipe_table(GOAL_HEADER, _goal_rows(result, "**missed**"), ("goal", "case", "met"))
    if result["skipped"]:
        lines += ["", "Not measured:"] + [f"- {k}: {v}" for k, v in result["skipped"].items()]
    if result["cut"]:
        lines += ["", "Cut:"] + [f"- {c}" for c in result["cut"]]
    return "\n".join(lines) + "\n"


def text(result: dict[str, Any]) -> str:
    """The results for a terminal: aligned tables; the full settings are in the files."""
    from .cli import format_table

    settings = result["settings"]
    machine = result["machine"]
    lines = [
        f"multicam bench: {', '.join(settings['archs'])} on {', '.join(settings['frameworks'])}; "
        f"N {settings['batches']}, T {settings['targets']}; best of {settings['repeats']} "
        f"timed round(s) after a warm-up call; {result['elapsed_s']:.0f} s",
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['affinity']} usable), "
        f"{machine['memory_gb']} GB; {machine['gpu']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        "time per batch in ms; x floor: relative to the hand-written forward + backward",
    ]
    lines += format_table(TIMING_HEADER, _timing_rows(result))
    for extra in (_stage_lines(result, "  "), _recompile_lines(result, "  ")):
        if extra:
            lines += ["", *extra]
    if result["goals"]:
        lines += ["", "goals:"]
        lines += format_table(GOAL_HEADER, _goal_rows(result, "MISSED"))
    if result["skipped"]:
        lines += ["", "not measured:"] + [f"  {k}: {v}" for k, v in result["skipped"].items()]
    if result["cut"]:
        lines += ["", "cut:"] + [f"  {c}" for c in result["cut"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """Bar chart of time / floor per contender and case; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    idx = _index(result)
    cases = sorted({k[:4] for k in idx})
    archs = sorted({c[0] for c in cases})
    fig, axes = plt.subplots(len(archs), 1, figsize=(14, 4.5 * len(archs)), squeeze=False)
    for ax, arch in zip(axes[:, 0], archs, strict=True):
        arch_cases = [c for c in cases if c[0] == arch]
        names = sorted({k[4] for k in idx if k[0] == arch and k[4] not in ("floor", "floor-loop")})
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            values = []
            for case in arch_cases:
                floor = _floor(idx, case)
                entry = idx.get((*case, name))
                values.append(entry["best"] / floor if entry and floor else np.nan)
            ax.bar(np.arange(len(arch_cases)) + j * width, values, width, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.15, color="r", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(arch_cases)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{c[1]}\nN={c[2]} T={c[3]}" for c in arch_cases], fontsize=7)
        ax.set_ylabel("best time / hand-written floor")
        ax.set_title(f"{arch}: time relative to the floor (forward + batched VJP to the layer)")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` (if matplotlib) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    paths["md"].write_text(markdown(result))
    png = out_dir / f"{name}.png"
    if plot(result, png):
        paths["png"] = png
    return paths


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    """``multicam bench``: run the suite, print the table, write JSON, Markdown and a plot."""
    parser = argparse.ArgumentParser(
        prog="multicam bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default="digits_cnn,resnet50", help="comma-separated zoo archs")
    parser.add_argument("--frameworks", default=None, help="comma-separated: torch,keras,flax")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument(
        "--targets", default="1,10,100", help="targets per image (default 1,10,100)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--peer-targets", type=int, default=10, help="largest T for peers")
    parser.add_argument("--no-peers", action="store_true", help="skip the peers")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument("--nojit-batches", default="1", help="batches for JAX without jit")
    parser.add_argument("--numpy-n", type=int, default=64, help="NumPy stage N (0 skips)")
    parser.add_argument(
        "--forward-n", type=int, default=64, help="forward N for the NumPy ratio (0 skips)"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds; later cases are cut")
    parser.add_argument("--quick", action="store_true", help="tiny: digits_cnn, N=1, T=1, 1 round")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--name", default="bench", help="output file stem")
    args = parser.parse_args(argv)
    frameworks = args.frameworks.split(",") if args.frameworks else available_frameworks()
    missing = [f for f in frameworks if f not in available_frameworks()]
    if missing:
        parser.error(f"not installed: {missing}; installed: {available_frameworks()}")
    if args.quick:
        options: dict[str, Any] = dict(
            archs=["digits_cnn"],
            batches=[1],
            targets=[1],
            repeats=1,
            peer_targets=1,
            memory=False,
            nojit_batches=[],
            numpy_stage_n=2,
            forward_n=None,
        )
    else:
        options = dict(
            archs=args.arch.split(","),
            batches=_ints(args.batches),
            targets=_ints(args.targets),
            repeats=args.repeats,
            peer_targets=args.peer_targets,
            memory=not args.no_memory,
            nojit_batches=_ints(args.nojit_batches),
            numpy_stage_n=args.numpy_n,
            forward_n=args.forward_n or None,
        )
    result = run(frameworks=frameworks, peers=not args.no_peers, budget_s=args.budget, **options)
    paths = write(result, Path(args.out), args.name)
    print()
    print(text(result), end="")
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
