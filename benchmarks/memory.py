"""Peak memory of multicam against a plain inference forward, one fresh process each.

``python -m benchmarks.memory [--arch resnet50] [--batch 4] [--frameworks torch,keras,flax]``

Each contender runs in its own process: it builds the model and the input, reads its
resident set size, runs the contender three times, and reports the peak resident set size
(``ru_maxrss``) minus that baseline. A fresh process per contender makes the high-water mark
its own; both contenders pay the same one-time costs (framework caches, JAX and TensorFlow
tracing of their own function: the Keras forward is a ``tf.function``, as multicam's
TensorFlow backend is), so the ratio compares like with like. The goal (issue: "peak memory
<= 1.3x an inference forward") is the ratio of the two peaks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import numpy as np
framework, arch, batch, contender = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if framework == "torch":
    import torch
import multicam as mc
from multicam import zoo

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024

spec = zoo._architecture(arch)
layer = spec.cam_layers[-1]
weights = zoo.init_weights(arch, 0)
x = zoo.example_input(arch, batch, seed=0, layout=zoo.native_layout(framework))
if contender == "forward":
    model = zoo.build(arch, framework, weights)
    if framework == "torch":
        xt = torch.from_numpy(x)
        def run():
            with torch.no_grad():
                model(xt)
    elif framework == "keras":  # compiled, as multicam's TensorFlow backend runs
        import tensorflow as tf
        forward = tf.function(lambda x: model(x, training=False), autograph=False)
        def run():
            forward(x).numpy()
    else:
        import jax
        module, variables = model
        apply = jax.jit(module.apply)
        def run():
            apply(variables, x).block_until_ready()
else:
    explainer = zoo.explainer(arch, framework, layer, weights)
    def run():
        explainer(x, targets=1, warn=False)
del weights
base = rss_kb()
for _ in range(3):
    run()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = {"base_mb": base / 1024, "peak_mb": peak / 1024, "extra_mb": (peak - base) / 1024}
print(json.dumps(result))
"""


def measure(framework: str, arch: str, batch: int, contender: str) -> dict[str, float]:
    """Run one contender in a fresh process; its baseline, peak and extra RSS in MB."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, framework, arch, str(batch), contender],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Print a table of peak memory per framework and its ratio to inference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frameworks", default="torch,keras,flax")
    args = parser.parse_args(argv)
    print(f"peak resident memory over the built model, {args.arch}, batch {args.batch}, T=1")
    print(f"{'framework':<10}{'forward MB':>12}{'multicam MB':>13}{'ratio':>8}")
    for framework in args.frameworks.split(","):
        forward = measure(framework, args.arch, args.batch, "forward")
        ours = measure(framework, args.arch, args.batch, "multicam")
        ratio = ours["extra_mb"] / max(forward["extra_mb"], 1e-9)
        print(f"{framework:<10}{forward['extra_mb']:>12.0f}{ours['extra_mb']:>13.0f}{ratio:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
