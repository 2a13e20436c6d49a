"""Entry point of the benchmark nox sessions: ``python -m benchmarks.run [options]``.

The suite itself is the package :mod:`multicam.bench` (also ``multicam bench``);
``--peers`` names this run's outputs ``peers`` instead of ``bench``.
"""

from __future__ import annotations

import sys

with __import__("contextlib").suppress(ImportError):
    import torch  # noqa: F401  (torch before TensorFlow in one process)

from multicam.bench import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--peers" in argv:
        argv.remove("--peers")
        argv = ["--name", "peers", *argv]
    sys.exit(main(argv))
