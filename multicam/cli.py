"""The ``multicam`` command line: ``demo``, ``compare``, ``explain`` and ``bench``.

- ``multicam demo``: the trained digits CNN in every installed framework, Grad-CAM for all
  classes, agreement, timings, the diagnosis of blank maps, and a PNG grid.
- ``multicam compare``: the reference networks in every installed framework with the same
  weights; agreement with the exact NumPy oracle and between backends, and time per
  backend. Exits non-zero when any pair disagrees beyond the test suite's tolerances.
- ``multicam explain MODEL IMAGE --layer NAME``: a saved model (Keras ``.keras``, a PyTorch
  model saved whole with ``torch.save(model)``, or a Flax model from a Python entry point
  ``package.module:function``) and an image, to a PNG and a diagnosis.
- ``multicam bench``: the benchmark suite of :mod:`multicam.bench`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import zoo
from .cam import CAMResult, GradCAM
from .errors import MulticamError
from .testing import MAPS_ATOL, RAW_RTOL, agreement_report, check_against_oracle


def _timed(explainer: GradCAM, inputs: np.ndarray, repeats: int) -> tuple[CAMResult, float]:
    result = explainer(inputs, targets="all", warn=False)  # warm-up: tracing, compilation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = explainer(inputs, targets="all", warn=False)
        best = min(best, time.perf_counter() - start)
    return result, best


def compare(
    archs: Sequence[str], frameworks: Sequence[str], batch: int, seed: int, repeats: int
) -> bool:
    """Print the agreement and timing tables; return whether everything agreed."""
    if "torch" in frameworks:
        import torch  # noqa: F401  (torch must be imported before TensorFlow)
    print(f"frameworks: {', '.join(frameworks)}; batch {batch}, weight seed {seed}, all classes")
    print(f"tolerances: raw maps {RAW_RTOL:g} relative, normalised maps {MAPS_ATOL:g} absolute")
    ok = True
    for arch in archs:
        spec = zoo.ARCHITECTURES[arch]
        layer = spec.cam_layers[-1]
        weights = zoo.init_weights(arch, seed)
        inputs = zoo.example_input(arch, batch, seed=seed)
        print(f"\n{arch} ({spec.description}); layer {layer!r}")
        print(f"  {'framework':<10}{'backend':<12}{'ms / batch':>12}{'oracle err':>14}")
        results: dict[str, CAMResult] = {}
        for step, framework in enumerate(frameworks, 1):
            print(f"  [{step}/{len(frameworks)}] {framework} ...", end="\r", flush=True)
            native = zoo.example_input(arch, batch, seed=seed, layout=zoo.native_layout(framework))
            explainer = zoo.explainer(arch, framework, layer, weights)
            result, seconds = _timed(explainer, native, repeats)
            errors = check_against_oracle(result, arch, weights, inputs, layer, rtol=1.0)
            results[framework] = result
            print(
                f"  {framework:<10}{result.backend:<12}{1e3 * seconds:>12.2f}"
                f"{max(errors.values()):>14.2e}"
            )
        agreed, lines = agreement_report(results)
        ok = ok and agreed
        for line in lines:
            print(f"  {line}")
    return ok


def _load_model(source: str, flax_entry: bool) -> tuple[Any, dict[str, Any]]:
    """A model (and explainer options) from a file or a ``module:function`` entry point."""
    if flax_entry:
        module_name, _, function = source.partition(":")
        if not function:
            raise MulticamError(f"--flax needs package.module:function, got {source!r}")
        made = getattr(importlib.import_module(module_name), function)()
        if isinstance(made, tuple):
            module, variables = made
            return module, {"variables": variables}
        return made, {}
    path = Path(source)
    if not path.exists():
        raise MulticamError(f"no model file {source!r}")
    if path.suffix in (".keras", ".h5"):
        import keras

        return keras.saving.load_model(path, compile=False), {}
    if path.suffix in (".pt", ".pth"):
        import torch

        # A whole pickled model: loading it runs its code, as torch.load documents.
        model = torch.load(path, weights_only=False, map_location="cpu")
        if not isinstance(model, torch.nn.Module):
            raise MulticamError(
                f"{source} holds a {type(model).__name__}, not a model; save the whole "
                "model with torch.save(model, path) (a state_dict has no architecture)."
            )
        return model.eval(), {}
    raise MulticamError(
        f"unknown model format {path.suffix!r}: pass a Keras .keras/.h5 file, a PyTorch "
        ".pt/.pth saved with torch.save(model), or a Flax entry point with --flax. "
        "TorchScript and torch.export archives inline their layers, so no layer can be "
        "observed in them."
    )


def explain(args: argparse.Namespace) -> int:
    """``multicam explain``: see the module docstring."""
    from PIL import Image

    from . import viz

    model, options = _load_model(args.model, args.flax)
    explainer = GradCAM(model, args.layer, **options)
    channels_first = explainer.bound.layout == "channels_first"
    size, channels = args.size, args.channels
    declared = getattr(model, "inputs", None)
    if declared and len(declared) == 1 and len(declared[0].shape) == 4:
        shape = declared[0].shape
        spatial = shape[2:] if channels_first else shape[1:3]
        size = size or [int(s) for s in spatial if s is not None] or None
        channels = int(shape[1] if channels_first else shape[3] or channels)
    image = Image.open(args.image).convert("L" if channels == 1 else "RGB")
    if size:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    batch = np.moveaxis(array, -1, 0)[None] if channels_first else array[None]
    targets = None if args.target is None else ("all" if args.target == "all" else int(args.target))
    result = explainer(batch, targets=targets, warn=False)
    if result.targets is not None:
        explained = ", ".join(
            f"class {c} (score {score:.4g})"
            for c, score in zip(result.targets[0], result.scores[0], strict=True)
        )
        print(f"explained {explained} at layer {result.layer!r} ({result.backend})")
    print(result.diagnose())
    cells = [viz.overlay(array, result.maps[0, t]) for t in range(result.maps.shape[1])]
    cells += [viz.signed(result.raw[0, t]) for t in range(result.raw.shape[1])]
    assert result.targets is not None or targets is None
    labels = [f"class {c}" for c in (result.targets[0] if result.targets is not None else [0])]
    viz.grid(
        [array],
        [cells],
        col_labels=[f"{label} ReLU" for label in labels] + [f"{label} signed" for label in labels],
        path=args.out,
    )
    print(f"wrote {Path(args.out).resolve()}")
    return 0


def _frameworks(parser: argparse.ArgumentParser, wanted: str | None) -> list[str]:
    available = zoo.installed_frameworks()
    frameworks = wanted.split(",") if wanted else available
    unknown = [f for f in frameworks if f not in zoo.FRAMEWORKS]
    if unknown:
        parser.error(f"unknown frameworks {unknown}; choose from {', '.join(zoo.FRAMEWORKS)}")
    absent = [f for f in frameworks if f not in available]
    if absent:
        parser.error(f"not installed: {', '.join(absent)}; pip install 'multicam[all]'")
    if not frameworks:
        parser.error("no framework is installed; pip install 'multicam[all]'")
    return frameworks


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``multicam`` console script."""
    parser = argparse.ArgumentParser(
        prog="multicam",
        description="Grad-CAM with one API for PyTorch, Keras and Flax. Start with: multicam demo",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    frameworks_help = (
        f"comma-separated subset of {', '.join(zoo.FRAMEWORKS)} (default: all installed)"
    )

    demo = commands.add_parser(
        "demo",
        help="why Grad-CAM maps go blank, on a trained digits CNN in every framework",
        description="Grad-CAM of all ten classes on a few digits, on every installed "
        "backend: agreement, time per backend, which maps are blank and why, and a PNG grid.",
    )
    demo.add_argument(
        "--out", default="multicam-demo.png", help="PNG to write (default %(default)s)"
    )
    demo.add_argument("--frameworks", default=None, help=frameworks_help)
    demo.add_argument(
        "--digits",
        default="4,5,8,9",
        help="which digits to explain, comma-separated (default %(default)s)",
    )
    demo.add_argument("--repeats", type=int, default=3, help="timed calls per backend")

    cmp = commands.add_parser(
        "compare",
        help="the reference networks in every framework: agreement with the oracle and speed",
        description="Build each reference network with the same weights in every installed "
        "framework; compare every backend with the exact NumPy oracle and with each other.",
    )
    cmp.add_argument("--arch", choices=[*zoo.ARCHITECTURES, "all"], default="all")
    cmp.add_argument("--frameworks", default=None, help=frameworks_help)
    cmp.add_argument("--batch", type=int, default=4, help="samples per batch (default 4)")
    cmp.add_argument("--seed", type=int, default=0, help="weights and input seed")
    cmp.add_argument("--repeats", type=int, default=3, help="timed repeats, best is shown")

    exp = commands.add_parser(
        "explain",
        help="Grad-CAM of a saved model on an image, to a PNG and a diagnosis",
        description="Explain a saved model on one image. MODEL is a Keras .keras/.h5 file, "
        "a PyTorch model saved whole with torch.save(model) (.pt/.pth; loading runs its "
        "code: only load files you trust), or with --flax a package.module:function that "
        "returns (linen_module, variables) or an nnx module. The image is scaled to [0, 1].",
    )
    exp.add_argument("model", help="model file, or module:function with --flax")
    exp.add_argument("image", help="image file (PNG, JPEG, ...)")
    exp.add_argument("--layer", required=True, help="layer name or path, e.g. features.7")
    exp.add_argument("--target", default=None, help="class id, 'all', or omit for the predicted")
    exp.add_argument("--flax", action="store_true", help="MODEL is a Flax entry point")
    exp.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize the image")
    exp.add_argument("--channels", type=int, default=3, choices=(1, 3), help="1 (grey) or 3 (RGB)")
    exp.add_argument("--out", default="multicam-explain.png", help="PNG to write")

    commands.add_parser(
        "bench",
        help="backend speed side by side: floors, many targets, peers (multicam bench --help)",
        add_help=False,
    )

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the suite parses its own options
        from . import bench

        return bench.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo as demo_module

        digits = [int(d) for d in args.digits.split(",")]
        if not all(0 <= d <= 9 for d in digits):
            parser.error("--digits takes digits 0-9")
        demo_module.run(args.out, _frameworks(parser, args.frameworks), digits, args.repeats)
        return 0
    if args.command == "compare":
        frameworks = _frameworks(parser, args.frameworks)
        archs = list(zoo.ARCHITECTURES) if args.arch == "all" else [args.arch]
        return 0 if compare(archs, frameworks, args.batch, args.seed, args.repeats) else 1
    try:
        return explain(args)
    except MulticamError as exc:
        print(f"multicam explain: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
