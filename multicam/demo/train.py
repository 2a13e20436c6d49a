"""Retrain the demo's digits CNN, reproducibly: ``python -m multicam.demo.train``.

The network is :mod:`multicam.zoo`'s ``digits_cnn`` (the CNN of the blank-map report:
four 2x2 convolutions, then 1944 -> 256 -> 64 -> 10 with dropout). The data are
scikit-learn's bundled handwritten digits (1,797 8x8 images, no download), upsampled to
28x28 with multicam's own bilinear resize and scaled to [0, 1]. Training uses PyTorch on
the CPU with fixed seeds; the weights are written as float16 (about 1 MB) together with
one held-out example of each digit for the demo, to ``multicam/demo/digits_cnn.npz``.

Needs ``pip install 'multicam-xai[torch]' scikit-learn``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from .. import algebra, zoo

WEIGHTS = Path(__file__).with_name("digits_cnn.npz")


def load_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(N, 28, 28, 1)`` float32 in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = algebra.resize(digits.images.astype(np.float32) / 16.0, (28, 28))
    return np.clip(images, 0, 1)[..., None], digits.target.astype(np.int64)


def export_weights(model: object) -> dict[str, np.ndarray]:
    """A trained torch ``digits_cnn`` back to the zoo's channels-last weight dict."""
    weights = {}
    for name, tensor in model.state_dict().items():  # type: ignore[attr-defined]
        array = tensor.detach().cpu().numpy()
        layer, param = name.rsplit(".", 1)
        if param == "weight" and array.ndim > 2:  # conv (out, in, *k) -> (*k, in, out)
            weights[f"{layer}.kernel"] = np.moveaxis(array, (0, 1), (-1, -2))
        elif param == "weight":  # linear (out, in) -> (in, out)
            weights[f"{layer}.kernel"] = array.T
        else:
            weights[f"{layer}.{param}"] = array
    return weights


def train(epochs: int = 30, seed: int = 0) -> tuple[dict[str, np.ndarray], float, np.ndarray]:
    """Train on 1,497 digits, test on the last 300.

    Returns:
        The weights, the test accuracy, and the index of one test example per digit.
    """
    import torch

    torch.manual_seed(seed)
    images, labels = load_digits_28()
    x = torch.from_numpy(np.moveaxis(images, -1, 1).copy())
    y = torch.from_numpy(labels)
    split = len(x) - 300
    model = zoo.build("digits_cnn", "torch", zoo.init_weights("digits_cnn", seed)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(split, generator=generator)
        for start in range(0, split, 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(x[split:]).argmax(1)
    accuracy = float((predicted == y[split:]).float().mean())
    examples = np.array([split + int(np.flatnonzero(labels[split:] == d)[0]) for d in range(10)])
    return export_weights(model), accuracy, examples


def main() -> None:
    """Train and write :data:`WEIGHTS`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    weights, accuracy, examples = train(args.epochs, args.seed)
    images, labels = load_digits_28()
    arrays: dict[str, Any] = {f"weights/{k}": v.astype(np.float16) for k, v in weights.items()}
    arrays["images"] = np.round(images[examples] * 255).astype(np.uint8)
    arrays["labels"] = labels[examples]
    arrays["accuracy"] = np.float32(accuracy)
    np.savez_compressed(args.out, **arrays)
    print(f"test accuracy {accuracy:.3f}; wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
