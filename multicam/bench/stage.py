"""The NumPy stage alone: pool, weigh, ReLU, resize and normalise, without a model.

Timed against pytorch-grad-cam's per-image post-processing, and compared with the torch
ResNet-50 forward at the same batch size.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import algebra, zoo
from .timing import time_interleaved

__all__ = ["numpy_stage", "torch_forward"]


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


def torch_forward(n: int, repeats: int) -> dict[str, Any]:
    """The torch ResNet-50 inference forward at batch ``n``: the NumPy stage's yardstick."""
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
