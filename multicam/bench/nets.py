"""The benchmark's networks, and each split at its layer into the halves the floors use.

Zoo architectures (``digits_cnn``, ``resnet50``) and issue 13's GAP-head network
(:func:`gap64`: conv -> conv -> conv -> global average pool -> dense, 64x64 input, the
layer at 16x16), each with the layer the suite explains (:data:`LAYERS`). A floor runs the
network as two halves sharing its weights: the features up to the layer, and the head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import zoo

__all__ = ["GAP_HEAD", "LAYERS", "architecture", "classes", "gap64", "split"]


def gap64() -> zoo.Architecture:
    """Issue 13's network: three 3x3 convs (two of stride 2), GAP, dense; 64x64x3 -> 10.

    The layer ``features.relu3`` is 16x16 with 64 channels; at batch 32 and ten targets
    its gradients are 21 MB.
    """
    features = (
        zoo.Conv("conv1", 3, 16, kernel=3, stride=2, padding=1),
        zoo.ReLU("relu1"),
        zoo.Conv("conv2", 16, 32, kernel=3, stride=2, padding=1),
        zoo.ReLU("relu2"),
        zoo.Conv("conv3", 32, 64, kernel=3, padding=1),
        zoo.ReLU("relu3"),
    )
    return zoo.Architecture(
        "gap64",
        (64, 64, 3),
        10,
        (zoo.Stage("features", features), zoo.GlobalAvgPool("pool"), zoo.Dense("fc", 64, 10)),
        tuple(f"features.{op.name}" for op in features),
        "conv -> conv -> conv -> global average pool -> dense, 64x64 (issue 13)",
    )


_OWN = {"gap64": gap64()}
#: The layer explained per architecture (default: its last CAM layer).
LAYERS = {"digits_cnn": "features.relu4", "resnet50": "layer4", "gap64": "features.relu3"}
#: Networks whose head is global average pooling + dense: ten targets cost little more
#: than one (one forward, one cheap batched backward through the head).
GAP_HEAD = ("gap64", "resnet50")


def architecture(name: str) -> zoo.Architecture:
    """A benchmark network by name: :func:`gap64` or any zoo architecture."""
    return _OWN.get(name) or zoo._architecture(name)


def split(arch: zoo.Architecture, layer: str) -> tuple[zoo.Architecture, zoo.Architecture]:
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


def classes(n: int, t: int, num_classes: int, shift: int = 0) -> np.ndarray:
    """``(N, T)`` distinct classes per row, different rows different classes.

    ``shift`` gives other classes at the same shape (the no-retrace check).
    """
    rows = np.arange(t)[None, :] * 7 + np.arange(n)[:, None] * 13 + shift
    return (rows % num_classes).astype(np.int64)
