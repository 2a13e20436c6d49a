"""PyTorch builder for :mod:`multicam.zoo` architectures.

Every spec entry is a module named after it: a :class:`~multicam.zoo.Stage` is an
``nn.Sequential`` (so ``"blocks.0"`` is the first child of ``"blocks"``), an
:class:`~multicam.zoo.Attention` is a :class:`SelfAttention` with children ``qkv``,
``softmax`` (an ``nn.Softmax(dim=-1)``, whose output is the attention probabilities) and
``proj``, a :class:`~multicam.zoo.TransformerBlock` a :class:`PreNormBlock`. Input is
channels-first ``(N, C, *S)``; token layers are ``(N, L, D)`` as in every framework.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from . import (
    BN_EPS,
    GELU,
    LN_EPS,
    Architecture,
    Attention,
    BatchNorm,
    ClassToken,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    Layer,
    LayerNorm,
    ReLU,
    Residual,
    Softmax,
    Stage,
    Tokens,
    TransformerBlock,
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


class PatchTokens(nn.Module):
    """``(N, D, *grid) -> (N, 1 + prod(grid), D)``: row-major tokens, class token, positions."""

    def __init__(self, cls_token: torch.Tensor, pos_embed: torch.Tensor) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(cls_token)
        self.pos_embed = nn.Parameter(pos_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


class ClassTokenPool(nn.Module):
    """The class token: ``(N, L, D) -> (N, D)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class SelfAttention(nn.Module):
    """Multi-head self-attention written out; ``softmax``'s output is the attention."""

    def __init__(self, heads: int, qkv: nn.Module, proj: nn.Module) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = qkv
        self.softmax = nn.Softmax(dim=-1)
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        head_dim = dim // self.heads
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim))
        return self.proj((attn @ v).transpose(1, 2).reshape(n, length, dim))


class PreNormBlock(nn.Module):
    """``x = x + attention(x)``, then ``x = x + mlp(x)``; the branches' layers as children."""

    def __init__(
        self, attention: OrderedDict[str, nn.Module], mlp: OrderedDict[str, nn.Module]
    ) -> None:
        super().__init__()
        self.attention_names = list(attention)
        self.mlp_names = list(mlp)
        for name, module in [*attention.items(), *mlp.items()]:
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for names in (self.attention_names, self.mlp_names):
            branch = x
            for name in names:
                branch = self.get_submodule(name)(branch)
            x = x + branch
        return x


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
    if isinstance(layer, LayerNorm):
        layer_norm = nn.LayerNorm(layer.features, eps=LN_EPS)
        layer_norm.weight = nn.Parameter(_tensor(weights[f"{name}.scale"]))
        layer_norm.bias = nn.Parameter(_tensor(weights[f"{name}.bias"]))
        return layer_norm
    if isinstance(layer, GELU):
        return nn.GELU(approximate="none")
    if isinstance(layer, Softmax):
        return nn.Softmax(dim=-1)
    if isinstance(layer, Tokens):
        cls_token = _tensor(weights[f"{name}.cls_token"]).reshape(1, 1, -1)
        return PatchTokens(cls_token, _tensor(weights[f"{name}.pos_embed"])[None])
    if isinstance(layer, ClassToken):
        return ClassTokenPool()
    if isinstance(layer, Attention):
        children = _children(layer.layers, name + ".", weights)
        return SelfAttention(layer.heads, children["qkv"], children["proj"])
    if isinstance(layer, TransformerBlock):
        return PreNormBlock(
            _children(layer.attention, name + ".", weights),
            _children(layer.mlp, name + ".", weights),
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
