"""PyTorch builder for :mod:`multicam.zoo` architectures."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from . import (
    BN_EPS,
    Architecture,
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    Layer,
    ReLU,
    Residual,
    Stage,
)


class ChannelsLastFlatten(nn.Module):
    """Flatten ``(N, C, *S)`` in ``(*S, C)`` order, as Keras and Flax do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.movedim(x, 1, -1).flatten(1)


class GlobalAvgPoolNd(nn.Module):
    """Mean over all spatial dims: ``(N, C, *S) -> (N, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)


class ResidualBlock(nn.Module):
    """``relu(body(x) + shortcut(x))``, the body and shortcut layers as direct children."""

    def __init__(
        self, body: OrderedDict[str, nn.Module], shortcut: OrderedDict[str, nn.Module]
    ) -> None:
        super().__init__()
        self.body_names = list(body)
        self.shortcut_names = list(shortcut)
        for name, module in [*body.items(), *shortcut.items()]:
            self.add_module(name, module)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self.body_names:
            out = self.get_submodule(name)(out)
        skip = x
        for name in self.shortcut_names:
            skip = self.get_submodule(name)(skip)
        return self.relu(out + skip)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _module(layer: Layer, prefix: str, weights: dict[str, np.ndarray]) -> nn.Module:
    name = prefix + layer.name
    if isinstance(layer, Conv):
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[layer.dims]
        conv = conv_cls(
            layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.padding
        )
        kernel = weights[f"{name}.kernel"]  # (*k, in, out) -> (out, in, *k)
        conv.weight = nn.Parameter(_tensor(np.moveaxis(kernel, (-1, -2), (0, 1))))
        conv.bias = nn.Parameter(_tensor(weights[f"{name}.bias"]))
        return conv
    if isinstance(layer, Dense):
        dense = nn.Linear(layer.in_features, layer.out_features)
        dense.weight = nn.Parameter(_tensor(weights[f"{name}.kernel"].T))
        dense.bias = nn.Parameter(_tensor(weights[f"{name}.bias"]))
        return dense
    if isinstance(layer, BatchNorm):
        # BatchNorm1d/2d/3d differ only in the rank they accept; 2d's check is the strictest,
        # so use the generic base with its running statistics.
        norm = nn.modules.batchnorm._BatchNorm(layer.channels, eps=BN_EPS)
        norm._check_input_dim = lambda x: None  # type: ignore[method-assign]
        norm.weight = nn.Parameter(_tensor(weights[f"{name}.scale"]))
        norm.bias = nn.Parameter(_tensor(weights[f"{name}.bias"]))
        norm.running_mean = _tensor(weights[f"{name}.mean"])
        norm.running_var = _tensor(weights[f"{name}.var"])
        return norm
    if isinstance(layer, ReLU):
        return nn.ReLU()
    if isinstance(layer, Dropout):
        return nn.Dropout(layer.rate)
    if isinstance(layer, Flatten):
        return ChannelsLastFlatten()
    if isinstance(layer, GlobalAvgPool):
        return GlobalAvgPoolNd()
    if isinstance(layer, Stage):
        return _sequential(layer.layers, name + ".", weights)
    if isinstance(layer, Residual):
        return ResidualBlock(
            _children(layer.body, name + ".", weights),
            _children(layer.shortcut, name + ".", weights),
        )
    raise TypeError(f"unknown layer {layer!r}")


def _children(
    layers: tuple[Layer, ...], prefix: str, weights: dict[str, np.ndarray]
) -> OrderedDict[str, nn.Module]:
    return OrderedDict((layer.name, _module(layer, prefix, weights)) for layer in layers)


def _sequential(
    layers: tuple[Layer, ...], prefix: str, weights: dict[str, np.ndarray]
) -> nn.Sequential:
    return nn.Sequential(_children(layers, prefix, weights))


def build(arch: Architecture, weights: dict[str, np.ndarray]) -> nn.Module:
    """The ``arch`` network as a ``torch.nn.Module`` in eval mode, NCHW input."""
    return _sequential(arch.layers, "", weights).eval()
