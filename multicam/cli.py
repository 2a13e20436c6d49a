"""The ``multicam`` command line: ``demo``, ``compare``, ``explain`` and ``bench``.

- ``multicam demo``: the trained digits CNN in every installed framework, Grad-CAM for all
  classes, agreement, timings, the diagnosis of blank maps, and a PNG.
- ``multicam compare``: the reference networks in every installed framework with the same
  weights; agreement with the exact NumPy oracle and between backends, and time per
  backend. Exits 1 when any pair disagrees beyond the test suite's tolerances.
- ``multicam explain MODEL IMAGE --layer NAME``: a saved model (Keras ``.keras``, a PyTorch
  model saved whole with ``torch.save(model)``, or a Flax model from a Python entry point
  ``package.module:function``) and an image, to a PNG and a diagnosis.
- ``multicam bench``: the benchmark suite of :mod:`multicam.bench`.

A failure is one line on stderr, ``multicam COMMAND: error: ...``, and exit status 2;
``--debug`` (or ``MULTICAM_DEBUG=1``) shows the traceback instead. The command line quiets
the frameworks' own log lines (TensorFlow's oneDNN and CUDA notices, absl, JAX's platform
warnings); importing :mod:`multicam` as a library changes no logging.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import pickle
import re
import sys
import textwrap
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import zoo
from .cam import CAMResult, GradCAM
from .errors import InputError, MulticamError
from .testing import MAPS_ATOL, RAW_RTOL, assert_results_agree, check_against_oracle

__all__ = ["format_table", "main"]

DEBUG_ENV = "MULTICAM_DEBUG"
# What each zoo framework imports, in a safe order (torch before TensorFlow).
_MODULES = {"torch": ("torch",), "keras": ("tensorflow", "keras"), "flax": ("jax", "flax")}
_MODULES["nnx"] = _MODULES["flax"]


def version() -> str:
    """The installed version: the ``multicam-xai`` distribution, else ``multicam.__version__``."""
    try:
        return importlib.metadata.version("multicam-xai")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


# --- output ------------------------------------------------------------------------------------


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  "
) -> list[str]:
    """Lines of an aligned text table: text columns left-aligned, numbers right-aligned.

    A column is numeric when its cells are numbers or strings that parse as one
    (``"1.2e-06"``, ``"5.3"``); ``None`` prints as an empty cell.
    """
    columns = len(header)
    cells = [
        ["" if v is None else str(v) for v in row] + [""] * (columns - len(row)) for row in rows
    ]

    def numeric(c: int) -> bool:
        values = [row[c] for row in cells if row[c]]
        try:
            [float(v) for v in values]
        except ValueError:
            return False
        return bool(values)

    right = [numeric(c) for c in range(columns)]
    widths = [max([len(header[c])] + [len(row[c]) for row in cells]) for c in range(columns)]

    def line(values: Sequence[str]) -> str:
        padded = [
            values[c].rjust(widths[c]) if right[c] else values[c].ljust(widths[c])
            for c in range(columns)
        ]
        return (indent + "  ".join(padded)).rstrip()

    return [line(list(header))] + [line(row) for row in cells]


def agreement_table(results: dict[str, CAMResult]) -> tuple[bool, list[list[str]]]:
    """Every pair of results: whether all agree, and rows ``pair, raw, maps, verdict``.

    ``raw`` is the largest difference of the signed maps relative to each map's largest
    |value|; ``maps`` the largest absolute difference of the normalised maps; the verdict
    uses the test suite's tolerances (:data:`multicam.testing.RAW_RTOL`, ``MAPS_ATOL``).
    """
    ok, rows = True, []
    names = list(results)
    for a, name_a in enumerate(names):
        for name_b in names[a + 1 :]:
            pair = {name_a: results[name_a], name_b: results[name_b]}
            try:
                (agreement,) = assert_results_agree(pair, raw_rtol=np.inf, maps_atol=np.inf)
            except AssertionError as exc:  # different shapes or targets
                ok = False
                rows.append([f"{name_a} ~ {name_b}", "", "", f"DISAGREE: {exc}"])
                continue
            agreed = agreement.raw <= RAW_RTOL and agreement.maps <= MAPS_ATOL
            ok = ok and agreed
            rows.append(
                [
                    f"{name_a} ~ {name_b}",
                    f"{agreement.raw:.1e}",
                    f"{agreement.maps:.1e}",
                    "agree" if agreed else "DISAGREE",
                ]
            )
    return ok, rows


AGREEMENT_HEADER = (
    "backends",
    "raw maps, max rel. diff",
    "normalised maps, max abs. diff",
    "verdict",
)


def timed(call: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """Call once to warm up (tracing, compilation, caches), then time ``repeats`` calls.

    Returns:
        The last result, the warm-up call's seconds, and the best timed call's seconds.
    """
    start = time.perf_counter()
    result = call()
    warmup = time.perf_counter() - start
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return result, warmup, best


class _Progress:
    """A transient progress note on a terminal's stderr; nothing when it is not a terminal."""

    def __init__(self) -> None:
        self.shown = 0
        self.tty = sys.stderr.isatty()

    def show(self, text: str) -> None:
        if self.tty:
            self.clear()
            sys.stderr.write(text)
            sys.stderr.flush()
            self.shown = len(text)

    def clear(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\r" + " " * self.shown + "\r")
            sys.stderr.flush()
            self.shown = 0


# --- quiet frameworks ------------------------------------------------------------------------


def _quiet_framework_logs() -> None:
    """Quiet the frameworks' log lines for this process (the command line only).

    TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL`` when it is imported; a value the user set is
    kept. JAX warns through Python logging.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ INFO and WARNING lines
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name in ("jax._src.xla_bridge", "jax._src.compiler", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _silenced_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null, where C++ libraries write their notices.

    TensorFlow prints its oneDNN and CPU notices from C++ at import time, before its log
    level applies; only the descriptor itself can hold them back. Python exceptions are
    not affected: they are raised, not printed.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _preload(frameworks: Sequence[str], debug: bool) -> None:
    """Import the frameworks' packages with their import-time notices held back."""
    if debug:
        return
    modules = [m for f in frameworks for m in _MODULES.get(f, ())]
    modules.sort(key=lambda m: m != "torch")  # torch must be imported before TensorFlow
    with _silenced_stderr():
        for module in dict.fromkeys(modules):
            with contextlib.suppress(ImportError):  # reported where the module is used
                importlib.import_module(module)


# --- loading the user's model ------------------------------------------------------------------


def _on_path(folder: Path) -> None:
    entry = str(folder.resolve())
    if entry not in sys.path:
        sys.path.insert(0, entry)


def import_user_module(spec: str, option: str = "--import") -> types.ModuleType:
    """Import ``spec``: a ``file.py`` (executed as module ``file``) or a module name.

    The current directory and the file's own directory are put on ``sys.path`` first, so
    the module's own imports of its neighbours work. Code under
    ``if __name__ == "__main__":`` does not run. ``option`` names the source in errors.
    """
    _on_path(Path.cwd())
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise MulticamError(f"{option} {spec}: no such file")
        _on_path(path.parent)
        name = path.stem
        loaded = sys.modules.get(name)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "") == path.resolve():
            return loaded
        if loaded is not None or not name.isidentifier():
            name = f"_multicam_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise MulticamError(f"{option} {spec}: cannot be imported as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise MulticamError(
                f"{option} {spec} failed: {type(exc).__name__}: {exc} "
                "(its top level runs as on import; rerun with --debug for the traceback)"
            ) from exc
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise MulticamError(
            f"{option} {spec}: {exc}; pass a module importable from the current directory "
            "or a path to a .py file"
        ) from exc


def _defining_files(name: str, folders: Sequence[Path]) -> list[Path]:
    """Python files in ``folders`` that define a class ``name`` (read, never run)."""
    pattern = re.compile(rf"^class\s+{re.escape(name)}\b", re.MULTILINE)
    found = []
    for folder in dict.fromkeys(f.resolve() for f in folders):
        for candidate in sorted(folder.glob("*.py")):
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if pattern.search(candidate.read_text(encoding="utf-8")):
                    found.append(candidate)
    return found


def _relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _pickle_module(source: Path, user_modules: Sequence[types.ModuleType]) -> types.ModuleType:
    """A ``pickle`` look-alike whose unpickler finds classes pickled from ``__main__``.

    ``torch.save(model)`` in a script records the model's class as ``__main__.Net``; in
    ``multicam`` the ``__main__`` module is this command line. Lookups of ``__main__`` go to
    the modules given with ``--import``, in order; a class still missing is a
    :class:`MulticamError` that names the file to import.
    """

    def hint(name: str) -> str:
        files = _defining_files(name, [Path.cwd(), source.parent])
        if not files:
            return f"pass the script that defines class {name} with --import SCRIPT.py"
        shown = " or ".join(f"--import {_relative(f)}" for f in files[:2])
        return f"pass {shown} (it defines class {name})"

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module in ("__main__", "__mp_main__"):
                for user in user_modules:
                    if hasattr(user, name):
                        return getattr(user, name)
                imported = ", ".join(m.__name__ for m in user_modules)
                where = f"none of the imported modules ({imported}) defines it" if imported else ""
                raise MulticamError(
                    f"{source.name} holds a model whose class {name} was defined in the script "
                    f"that saved it (its __main__){'; ' + where if where else ''}: {hint(name)}"
                )
            try:
                return super().find_class(module, name)
            except ModuleNotFoundError as exc:
                top = (exc.name or module).split(".")[0]
                raise MulticamError(
                    f"{source.name} needs module {module!r} for its class {name}, which is not "
                    f"importable ({exc}): run multicam from the folder that holds {top}.py or "
                    f"pass --import path/to/{top}.py"
                ) from exc
            except AttributeError as exc:
                raise MulticamError(
                    f"{source.name} needs class {name} from module {module!r}, which has no "
                    f"such class ({exc}): {hint(name)}"
                ) from exc

    shim = types.ModuleType("multicam_unpickle")
    shim.Unpickler = Unpickler  # type: ignore[attr-defined]
    shim.load = lambda file, **kw: Unpickler(file, **kw).load()  # type: ignore[attr-defined]
    shim.loads = pickle.loads  # type: ignore[attr-defined]
    return shim


def _load_model(
    source: str, flax_entry: bool, user_modules: Sequence[types.ModuleType] = ()
) -> tuple[Any, dict[str, Any]]:
    """A model (and explainer options) from a file or a ``module:function`` entry point."""
    if flax_entry:
        module_name, _, function = source.rpartition(":")
        if not module_name or not function:
            raise MulticamError(
                f"--flax needs MODULE:FUNCTION (a module name or a file.py), got {source!r}"
            )
        module = import_user_module(module_name, "--flax")
        if not hasattr(module, function):
            raise MulticamError(f"--flax {source}: {module_name} has no {function!r}")
        made = getattr(module, function)()
        if isinstance(made, tuple):
            linen, variables = made
            return linen, {"variables": variables}
        return made, {}
    path = Path(source)
    if not path.is_file():
        raise MulticamError(f"no model file {source!r}")
    if path.suffix in (".keras", ".h5"):
        import keras

        return keras.saving.load_model(path, compile=False), {}
    if path.suffix in (".pt", ".pth"):
        import torch

        # A whole pickled model: loading it runs its code, as torch.load documents.
        model = torch.load(
            path,
            weights_only=False,
            map_location="cpu",
            pickle_module=_pickle_module(path, user_modules),
        )
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


def _model_input(model: Any, channels_first: bool) -> tuple[list[int] | None, int | None]:
    """The input size and channels a model declares: Keras inputs, a torch first conv."""
    declared = getattr(model, "inputs", None)
    if declared and len(declared) == 1 and len(declared[0].shape) == 4:
        shape = declared[0].shape
        spatial = shape[2:] if channels_first else shape[1:3]
        size = [int(s) for s in spatial if s is not None]
        channels = shape[1] if channels_first else shape[3]
        return (size if len(size) == 2 else None), (int(channels) if channels else None)
    if "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):
        conv = next((m for m in model.modules() if type(m).__name__ == "Conv2d"), None)
        if conv is not None:
            return None, int(conv.in_channels)
    return None, None


def _targets(text: str) -> str | list[int]:
    if text == "all":
        return text
    try:
        ids = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a class id: pass an integer like 3, several like 3,5, or 'all'; "
            "leave --target out for the predicted class"
        ) from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"class ids are >= 0, got {text!r}")
    return ids


def _read_image(source: str, channels: int) -> Any:
    from PIL import Image, UnidentifiedImageError

    path = Path(source)
    if not path.is_file():
        raise MulticamError(f"no image file {source!r}")
    try:
        with Image.open(path) as image:
            return image.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise MulticamError(f"cannot read {source!r} as an image (PNG, JPEG, ...): {exc}") from exc


def _softmax_if_logits(outputs: np.ndarray) -> np.ndarray | None:
    """Class probabilities when ``outputs`` are logits; None when they are not (N, C)."""
    if outputs.ndim != 2:
        return None
    sums = outputs.sum(axis=1)
    if outputs.min() >= 0 and np.allclose(sums, 1, atol=1e-3):
        return outputs  # already probabilities
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


MAX_PICTURED = 10


def explain(args: argparse.Namespace) -> int:
    """``multicam explain``: see the module docstring."""
    from PIL import Image

    from . import viz

    user_modules = [import_user_module(spec) for spec in args.imports or ()]
    if not args.flax:
        _on_path(Path.cwd())  # modules a pickled model's classes live in
    model, options = _load_model(args.model, args.flax, user_modules)
    explainer = GradCAM(model, args.layer, **options)
    channels_first = explainer.bound.layout == "channels_first"
    declared_size, declared_channels = _model_input(model, channels_first)
    size = args.size or declared_size
    channels = args.channels or declared_channels or 3
    image = _read_image(args.image, channels)
    if size:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    batch = np.moveaxis(array, -1, 0)[None] if channels_first else array[None]
    targets: Any = args.target
    if isinstance(targets, list):
        targets = targets[0] if len(targets) == 1 else np.array([targets])
    try:
        result = explainer(batch, targets=targets, warn=False)
    except InputError as exc:
        if "channel" not in str(exc):
            raise
        other = 1 if channels == 3 else 3
        raise InputError(
            f"the model rejected the image read with {channels} channel(s): if it takes "
            f"{'grey' if other == 1 else 'RGB'} images, pass --channels {other}. ({exc})"
        ) from exc
    probabilities = None if result.outputs is None else _softmax_if_logits(result.outputs)
    predicted = None if result.outputs is None else int(np.argmax(result.outputs[0]))
    diagnosis = result.diagnose()
    if result.targets is None:
        shown = np.arange(result.maps.shape[1])
        target_ids = shown[None]
    else:
        shown = np.argsort(-result.scores[0], kind="stable")[:MAX_PICTURED]
        shown.sort()
        target_ids = result.targets[:, shown]
        explained = ", ".join(
            f"class {c} (score {score:.4g})"
            for c, score in zip(target_ids[0], result.scores[0, shown], strict=True)
        )
        if len(shown) < result.targets.shape[1]:
            explained = f"{result.targets.shape[1]} classes, the highest-scoring: {explained}"
        print(f"explained {explained} at layer {result.layer!r} ({result.backend})")
    print(diagnosis)
    caption = Path(args.image).name
    if predicted is not None:
        caption += f"\npredicted: class {predicted}"
        if probabilities is not None:
            caption += f"\n(p {probabilities[0, predicted]:.2f})"
    what = (
        f"class {int(target_ids[0, 0])}"
        if target_ids.shape[1] == 1
        else f"{len(shown)} classes"
        + (
            f" (the highest-scoring of {result.maps.shape[1]})"
            if len(shown) < result.maps.shape[1]
            else ""
        )
    )
    viz.explanation(
        [array],
        result.maps[:, shown],
        result.raw[:, shown],
        target_ids,
        predicted=None if predicted is None else [predicted],
        blank=diagnosis.blank[:, shown],
        image_labels=[caption],
        title=f"Grad-CAM of {what} at layer {result.layer!r} of {Path(args.model).name} "
        f"({result.backend})",
        path=args.out,
    )
    print(f"wrote {Path(args.out).resolve()}")
    return 0


# --- compare -----------------------------------------------------------------------------------


def compare(
    archs: Sequence[str], frameworks: Sequence[str], batch: int, seed: int, repeats: int
) -> bool:
    """Print the agreement and timing tables; return whether everything agreed."""
    if "torch" in frameworks:
        import torch  # noqa: F401  (torch must be imported before TensorFlow)
    print(f"frameworks: {', '.join(frameworks)}; batch {batch}, weight seed {seed}, all classes")
    print(
        f"tolerances: raw maps {RAW_RTOL:g} relative, normalised maps {MAPS_ATOL:g} absolute; "
        f"times are the best of {repeats} after one warm-up call"
    )
    progress = _Progress()
    ok = True
    for arch in archs:
        spec = zoo.ARCHITECTURES[arch]
        layer = spec.cam_layers[-1]
        weights = zoo.init_weights(arch, seed)
        inputs = zoo.example_input(arch, batch, seed=seed)
        print(f"\n{arch}: {spec.description}; layer {layer!r}")
        results: dict[str, CAMResult] = {}
        rows = []
        for step, framework in enumerate(frameworks, 1):
            progress.show(f"  [{step}/{len(frameworks)}] {arch} on {framework} ...")
            native = zoo.example_input(arch, batch, seed=seed, layout=zoo.native_layout(framework))
            explainer = zoo.explainer(arch, framework, layer, weights)
            result, _, seconds = timed(
                functools.partial(explainer, native, targets="all", warn=False), repeats
            )
            errors = check_against_oracle(result, arch, weights, inputs, layer, rtol=1.0)
            results[framework] = result
            rows.append(
                [framework, result.backend, f"{1e3 * seconds:.2f}", f"{max(errors.values()):.2e}"]
            )
        progress.clear()
        for line in format_table(["framework", "backend", "ms / batch", "oracle err"], rows):
            print(line)
        if len(results) > 1:
            agreed, pairs = agreement_table(results)
            ok = ok and agreed
            print()
            for line in format_table(AGREEMENT_HEADER, pairs):
                print(line)
    return ok


# --- the parser --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line: ``multicam explain: error: ... (see ... --help)``."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _frameworks(parser: argparse.ArgumentParser, wanted: str | None) -> list[str]:
    available = zoo.installed_frameworks()
    frameworks = wanted.split(",") if wanted else available
    unknown = [f for f in frameworks if f not in zoo.FRAMEWORKS]
    if unknown:
        parser.error(f"unknown frameworks {unknown}; choose from {', '.join(zoo.FRAMEWORKS)}")
    absent = [f for f in frameworks if f not in available]
    if absent:
        parser.error(f"not installed: {', '.join(absent)}; pip install 'multicam-xai[all]'")
    if not frameworks:
        parser.error("no framework is installed; pip install 'multicam-xai[all]'")
    return frameworks


EXPLAIN_EPILOG = """\
models pickled from a script:
  torch.save(model) records where the model's class is defined. A class from a module
  next to you (mynets.py) is found: the current directory is on the import path. A class
  defined in the script that saved it is recorded as __main__.Net; pass that script with
  --import so its classes are found (its top level runs as on import; code under
  if __name__ == "__main__": does not):

    multicam explain net.pt cat.png --layer features.7 --import train.py

examples:
  multicam explain digits.keras four.png --layer features/relu3 --target all
  multicam explain net.pt cat.png --layer layer4 --import mynets.py --out cat-cam.png
  multicam explain mymodels:make_flax cat.png --flax --layer Conv_3

A failure is one line on stderr and exit status 2; --debug or MULTICAM_DEBUG=1 shows the
traceback."""


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = _Parser(
        prog="multicam",
        description="Grad-CAM with one API for PyTorch, Keras and Flax. Start with: multicam demo",
    )
    parser.add_argument("--version", action="version", version=f"multicam {version()}")
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help=f"show tracebacks and the frameworks' log lines (also {DEBUG_ENV}=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    frameworks_help = (
        f"comma-separated subset of {', '.join(zoo.FRAMEWORKS)} (default: all installed)"
    )

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="why Grad-CAM maps go blank, on a trained digits CNN in every framework",
        description="Grad-CAM of all ten classes on a few digits, on every installed "
        "backend: agreement, time per backend, which maps are blank and why, and a PNG.",
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
    demo.add_argument(
        "--repeats", type=int, default=3, help="timed calls per backend after a warm-up call"
    )

    cmp = commands.add_parser(
        "compare",
        parents=[common],
        help="the reference networks in every framework: agreement with the oracle and speed",
        description="Build each reference network with the same weights in every installed "
        "framework; compare every backend with the exact NumPy oracle and with each other. "
        "Exits 1 when a pair disagrees.",
    )
    cmp.add_argument("--arch", choices=[*zoo.ARCHITECTURES, "all"], default="all")
    cmp.add_argument("--frameworks", default=None, help=frameworks_help)
    cmp.add_argument("--batch", type=int, default=4, help="samples per batch (default 4)")
    cmp.add_argument("--seed", type=int, default=0, help="weights and input seed")
    cmp.add_argument(
        "--repeats", type=int, default=3, help="timed calls after a warm-up call; best is shown"
    )

    exp = commands.add_parser(
        "explain",
        parents=[common],
        help="Grad-CAM of a saved model on an image, to a PNG and a diagnosis",
        description=textwrap.fill(
            "Explain a saved model on one image. MODEL is a Keras .keras/.h5 file, a PyTorch "
            "model saved whole with torch.save(model) (.pt/.pth; loading runs its code: only "
            "load files you trust), or with --flax a MODULE:FUNCTION (MODULE may be a file.py) "
            "that returns (linen_module, variables) or an nnx module. The image is scaled to "
            "[0, 1]; the PNG shows it with the ReLU'd and signed maps, the predicted class "
            "framed and blank maps marked.",
            88,
        ),
        epilog=EXPLAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exp.add_argument("model", metavar="MODEL", help="model file, or MODULE:FUNCTION with --flax")
    exp.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, ...)")
    exp.add_argument("--layer", required=True, help="layer name or path, e.g. features.7")
    exp.add_argument(
        "--target",
        type=_targets,
        default=None,
        help="class id, several as 3,5, or 'all' (default: the predicted class)",
    )
    exp.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE_OR_FILE.py",
        help="import a module or run a .py file first, so the classes of a pickled model "
        "are found, also those it defined in __main__ (repeatable; see below)",
    )
    exp.add_argument("--flax", action="store_true", help="MODEL is a Flax MODULE:FUNCTION")
    exp.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize the image")
    exp.add_argument(
        "--channels",
        type=int,
        default=None,
        choices=(1, 3),
        help="read the image as 1 (grey) or 3 (RGB) channels (default: what the model's "
        "input or first convolution takes, else 3)",
    )
    exp.add_argument(
        "--out", default="multicam-explain.png", help="PNG to write (default %(default)s)"
    )

    from .evaluate import add_cli_parser as add_evaluate_parser

    evaluate = add_evaluate_parser(commands, parents=[common])
    from . import dataset

    explain_dataset = dataset.add_cli_parser(commands, parents=[common])

    commands.add_parser(
        "bench",
        help="backend speed side by side: floors, many targets, peers (multicam bench --help)",
        add_help=False,
    )
    return parser, {
        "demo": demo,
        "compare": cmp,
        "explain": exp,
        "evaluate": evaluate,
        "explain-dataset": explain_dataset,
    }


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, MulticamError) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    if not isinstance(exc, MulticamError):
        text += " (rerun with --debug for the traceback)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``multicam`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if not debug:
        _quiet_framework_logs()
    parser, subparsers = _parser()
    command = argv[0] if argv[:1] == ["bench"] else None
    args = None if command else parser.parse_args(argv)
    command = command or args.command  # type: ignore[union-attr]
    try:
        if args is None:  # the suite parses its own options
            from . import bench

            _preload(bench.available_frameworks(), debug)
            return bench.main(argv[1:])
        if args.command == "demo":
            from . import demo as demo_module

            digits = args.digits.split(",")
            if not all(d.strip() in tuple("0123456789") for d in digits):
                subparsers["demo"].error(
                    f"--digits takes digits 0-9, e.g. 4,5; got {args.digits!r}"
                )
            frameworks = _frameworks(subparsers["demo"], args.frameworks)
            _preload(frameworks, debug)
            demo_module.run(args.out, frameworks, [int(d) for d in digits], args.repeats)
            return 0
        if args.command == "compare":
            frameworks = _frameworks(subparsers["compare"], args.frameworks)
            _preload(frameworks, debug)
            archs = list(zoo.ARCHITECTURES) if args.arch == "all" else [args.arch]
            return 0 if compare(archs, frameworks, args.batch, args.seed, args.repeats) else 1
        if args.command == "explain-dataset":
            from . import dataset

            return dataset.run_cli(args)
        if args.command == "evaluate":
            from .evaluate import run_cli as run_evaluate

            if args.model is None:
                chosen = args.framework or _frameworks(subparsers["evaluate"], None)[0]
                _preload([chosen], debug)
            else:
                _preload(_model_frameworks(args.model, args.flax), debug)
            return run_evaluate(args)
        _preload(_model_frameworks(args.model, args.flax), debug)
        return explain(args)
    except KeyboardInterrupt:
        print(f"multicam {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"multicam {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _model_frameworks(model: str, flax: bool) -> list[str]:
    """The framework a model argument needs, from ``--flax`` or its file's suffix."""
    suffix = Path(model).suffix
    if flax:
        return ["flax"]
    if suffix in (".keras", ".h5"):
        return ["keras"]
    if suffix in (".pt", ".pth"):
        return ["torch"]
    return []


if __name__ == "__main__":
    sys.exit(main())
