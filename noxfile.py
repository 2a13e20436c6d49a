"""Development sessions for multicam: lint, tests, per-backend tests.

Every session installs from ``constraints-cpu.txt``, which pins the CPU build of PyTorch
(a bare ``torch`` resolves to a multi-GB CUDA build) and the framework versions the test
suite was run with. TensorFlow is installed as ``tensorflow-cpu``.

``MULTICAM_REQUIRE_BACKENDS`` tells the test suite which backends must be importable: a
missing one is then an error, not a skip.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "constraints-cpu.txt")
FRAMEWORKS = {
    # array-api-compat: the torch and jax extras' algebra="native" path.
    "torch": ["torch", "array-api-compat"],
    "tensorflow": ["tensorflow-cpu", "keras"],
    "jax": ["jax", "flax", "array-api-compat"],
}


def _install(session: nox.Session, backends: list[str], extras: str = "test") -> None:
    packages = [pkg for name in backends for pkg in FRAMEWORKS[name]]
    session.install(*CONSTRAINTS, *packages, "-e", f".[{extras}]")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Ruff (style, imports, docstrings) and mypy (types) over the package and tests."""
    _install(session, list(FRAMEWORKS))
    session.install("ruff", "mypy")
    session.run("ruff", "check", "multicam", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "multicam", "tests", "noxfile.py")
    session.run("mypy")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """All backends in one environment, so the cross-backend agreement tests run.

    Includes Captum, the independent PyTorch implementation the torch results are checked
    against, and the ``viz`` extra, so the demo runs end to end and writes its PNG. Extra
    pytest arguments pass through: ``nox -s tests -- -k algebra``.
    """
    _install(session, list(FRAMEWORKS), extras="test,peers,viz,zarr,ray")
    session.run(
        "pytest",
        *session.posargs,
        env={"MULTICAM_REQUIRE_BACKENDS": ",".join(FRAMEWORKS)},
    )


@nox.session(python="3.11")
@nox.parametrize("backend", list(FRAMEWORKS))
def backend(session: nox.Session, backend: str) -> None:
    """One backend alone, the other frameworks absent: proves each works on its own."""
    _install(session, [backend])
    session.run("pytest", *session.posargs, env={"MULTICAM_REQUIRE_BACKENDS": backend})


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """The benchmark suite, all three frameworks and Captum: ``multicam bench``.

    Writes ``benchmarks/results/`` (JSON, Markdown table, plot). Extra arguments pass
    through to ``python -m benchmarks.run``, e.g. ``nox -s bench -- --quick``.
    """
    _install(session, list(FRAMEWORKS), extras="test,peers")
    session.install("matplotlib")
    session.run("python", "-m", "benchmarks.run", *session.posargs)


@nox.session(name="peers-bench", python="3.11")
def peers_bench(session: nox.Session) -> None:
    """Time multicam beside the peers that need torchvision (pytorch-grad-cam, torchcam).

    Its own environment, pinned by ``benchmarks/constraints-peers.txt`` (torch 2.14.1 with
    its matching torchvision 0.29.1, tf-keras-vis), so the default environment keeps the
    CPU torch of ``constraints-cpu.txt``. Quantus (without its ``tensorflow`` extra, which
    wants Keras 2) and pytest go in too, for the peers' metric checks on torch and Keras:
    ``.nox/peers-bench/bin/python -m pytest tests/test_peers_metrics.py``.
    """
    session.install(
        "-c",
        "benchmarks/constraints-peers.txt",
        "torch",
        "torchvision",
        "tensorflow-cpu",
        "keras",
        "captum",
        "grad-cam",
        "torchcam",
        "tf-keras-vis",
        "quantus==0.6.0",
        "pytest",
        "matplotlib",
        "-e",
        ".",
    )
    session.run("python", "-m", "benchmarks.run", "--peers", *session.posargs)
