"""Flax builder (linen and nnx) for :mod:`multicam.zoo` architectures.

Interprets the same declarative spec as :mod:`multicam.zoo.torch`, channels-last, so that
with the same weight dict the linen module, the nnx module and the torch module compute the
same logits. Naming: each :class:`~multicam.zoo.Stage` and :class:`~multicam.zoo.Residual`
is a submodule named after it, the layers inside are named by the spec.

- linen: a ReLU is ``self.perturb(name, nn.relu(x))`` (a value marked by its module, path
  ``"features/relu4"``), except a residual block's final ReLU, which is the block module's
  output (path ``"block2"``). Weights go in ``variables``: ``params`` and ``batch_stats``.
- nnx: every layer, ReLUs included, is a small module held as an attribute, so
  ``"features.relu4"`` is an attribute path. Built in eval mode (BatchNorm on running
  statistics, dropout off).

Transformers: in both, a :class:`~multicam.zoo.TransformerBlock` is a submodule whose
output is its second residual sum (``"blocks/0"``, ``"blocks.0"``), an
:class:`~multicam.zoo.Attention` a submodule with submodules ``qkv``, ``softmax`` (a
:class:`LinenSoftmax` / :class:`NnxSoftmax`, whose output is the attention probabilities
``(N, heads, Q, K)``) and ``proj``. A GELU is exact (``approximate=False``, not flax's tanh
default) and, like a ReLU, a perturbation in linen and a module in nnx; layer norms use
``eps = 1e-5`` (flax's default is 1e-6) and the two-pass variance.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx as fnnx

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

__all__ = ["build"]


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _global_avg_pool(x: jax.Array) -> jax.Array:
    return x.mean(axis=tuple(range(1, x.ndim - 1)))


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _softmax(x: jax.Array) -> jax.Array:
    return jax.nn.softmax(x, axis=-1)


def _class_token(x: jax.Array) -> jax.Array:
    return x[:, 0]


def _tokens(x: jax.Array, cls_token: jax.Array, pos_embed: jax.Array) -> jax.Array:
    """``(N, *grid, D) -> (N, 1 + prod(grid), D)``: row-major tokens, class token, positions."""
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    cls = jnp.broadcast_to(cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, tokens], axis=1) + pos_embed.astype(x.dtype)


def _attention(x: jax.Array, heads: int, qkv: Any, softmax: Any, proj: Any) -> jax.Array:
    """Multi-head self-attention on ``(N, L, D)`` with the given sub-layers."""
    n, length, dim = x.shape
    head_dim = dim // heads
    packed = qkv(x).reshape(n, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = packed[0], packed[1], packed[2]
    probs = softmax(q @ jnp.swapaxes(k, -1, -2) / math.sqrt(head_dim))
    return proj((probs @ v).transpose(0, 2, 1, 3).reshape(n, length, dim))


# --- linen -------------------------------------------------------------------------------


def _linen_layers(module: nn.Module, layers: tuple[Layer, ...], x: jax.Array) -> jax.Array:
    """Apply ``layers`` in order inside ``module``'s compact ``__call__``."""
    for layer in layers:
        if isinstance(layer, Conv):
            x = nn.Conv(
                layer.out_channels,
                kernel_size=(layer.kernel,) * layer.dims,
                strides=(layer.stride,) * layer.dims,
                padding=((layer.padding, layer.padding),) * layer.dims,
                name=layer.name,
            )(x)
        elif isinstance(layer, BatchNorm):
            x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name=layer.name)(x)
        elif isinstance(layer, ReLU):
            x = module.perturb(layer.name, nn.relu(x))
        elif isinstance(layer, Dense):
            x = nn.Dense(layer.out_features, name=layer.name)(x)
        elif isinstance(layer, Dropout):
            x = nn.Dropout(layer.rate, deterministic=True, name=layer.name)(x)
        elif isinstance(layer, Flatten):
            x = _flatten(x)
        elif isinstance(layer, GlobalAvgPool):
            x = _global_avg_pool(x)
        elif isinstance(layer, Stage):
            x = LinenSequence(layer.layers, name=layer.name)(x)
        elif isinstance(layer, Residual):
            x = LinenResidual(layer.body, layer.shortcut, name=layer.name)(x)
        elif isinstance(layer, LayerNorm):
            x = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=layer.name)(x)
        elif isinstance(layer, GELU):
            x = module.perturb(layer.name, _gelu(x))
        elif isinstance(layer, Softmax):
            x = LinenSoftmax(name=layer.name)(x)
        elif isinstance(layer, Tokens):
            x = LinenTokens(int(np.prod(layer.grid)), layer.dim, name=layer.name)(x)
        elif isinstance(layer, ClassToken):
            x = _class_token(x)
        elif isinstance(layer, Attention):
            x = LinenAttention(layer, name=layer.name)(x)
        elif isinstance(layer, TransformerBlock):
            x = LinenTransformerBlock(layer.attention, layer.mlp, name=layer.name)(x)
        else:
            raise TypeError(f"unknown layer {layer!r}")
    return x


class LinenSequence(nn.Module):
    """The spec's layers in order; the root network and every :class:`Stage`."""

    layers: tuple[Layer, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _linen_layers(self, self.layers, x)


class LinenResidual(nn.Module):
    """``relu(body(x) + shortcut(x))``; the final ReLU is the module's output."""

    body: tuple[Layer, ...]
    shortcut: tuple[Layer, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = _linen_layers(self, self.body, x)
        skip = _linen_layers(self, self.shortcut, x)
        return nn.relu(out + skip)


class LinenSoftmax(nn.Module):
    """Softmax over the last axis as a module, so that its output has a module path."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _softmax(x)


class LinenTokens(nn.Module):
    """Row-major patch tokens, a class token and positions; params ``cls_token``, ``pos_embed``."""

    tokens: int
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cls_token = self.param("cls_token", nn.initializers.zeros, (self.dim,))
        pos_embed = self.param("pos_embed", nn.initializers.zeros, (self.tokens + 1, self.dim))
        return _tokens(x, cls_token, pos_embed)


class LinenAttention(nn.Module):
    """Self-attention with submodules ``qkv``, ``softmax`` and ``proj``."""

    spec: Attention

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        qkv, softmax, proj = self.spec.layers
        return _attention(
            x,
            self.spec.heads,
            lambda y: _linen_layers(self, (qkv,), y),
            lambda y: _linen_layers(self, (softmax,), y),
            lambda y: _linen_layers(self, (proj,), y),
        )


class LinenTransformerBlock(nn.Module):
    """``x = x + attention(x)``, then ``x = x + mlp(x)``; the second sum is the output."""

    attention: tuple[Layer, ...]
    mlp: tuple[Layer, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + _linen_layers(self, self.attention, x)
        return x + _linen_layers(self, self.mlp, x)


def _linen_variables(weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{"a.b.param": w}`` -> ``{"params": {"a": {"b": {"param": w}}}, "batch_stats": ...}``."""
    variables: dict[str, Any] = {"params": {}}
    for key, value in weights.items():
        *path, param = key.split(".")
        collection = "batch_stats" if param in ("mean", "var") else "params"
        node = variables.setdefault(collection, {})
        for part in path:
            node = node.setdefault(part, {})
        node[param] = jnp.asarray(value)
    return variables


# --- nnx ---------------------------------------------------------------------------------


class NnxReLU(fnnx.Module):
    """A ReLU as a module, so that its output has an attribute path."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class NnxFlatten(fnnx.Module):
    """Flatten all but the batch dim in channels-last order."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return _flatten(x)


class NnxGlobalAvgPool(fnnx.Module):
    """Mean over the spatial dims."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return _global_avg_pool(x)


class NnxGELU(fnnx.Module):
    """An exact (erf) GELU as a module."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return _gelu(x)


class NnxSoftmax(fnnx.Module):
    """Softmax over the last axis as a module, so that its output has an attribute path."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return _softmax(x)


class NnxClassToken(fnnx.Module):
    """The class token: ``(N, L, D) -> (N, D)``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return _class_token(x)


class NnxTokens(fnnx.Module):
    """Row-major patch tokens, a class token and positions; params ``cls_token``, ``pos_embed``."""

    def __init__(self, cls_token: np.ndarray, pos_embed: np.ndarray) -> None:
        self.cls_token = fnnx.Param(jnp.asarray(cls_token))
        self.pos_embed = fnnx.Param(jnp.asarray(pos_embed))

    def __call__(self, x: jax.Array) -> jax.Array:
        return _tokens(x, self.cls_token.get_value(), self.pos_embed.get_value())


def _init(value: np.ndarray) -> Any:
    """An initializer that returns ``value`` (no random numbers are drawn)."""

    def init(key: Any, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        if tuple(shape) != value.shape:
            raise ValueError(f"weight of shape {value.shape} for a parameter of shape {shape}")
        return jnp.asarray(value, dtype=dtype)

    return init


def _set(variable: Any, value: np.ndarray) -> None:
    variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))


def _nnx_layer(
    layer: Layer, prefix: str, weights: dict[str, np.ndarray], rngs: fnnx.Rngs
) -> fnnx.Module:
    name = prefix + layer.name
    if isinstance(layer, Conv):
        return fnnx.Conv(
            layer.in_channels,
            layer.out_channels,
            kernel_size=(layer.kernel,) * layer.dims,
            strides=(layer.stride,) * layer.dims,
            padding=((layer.padding, layer.padding),) * layer.dims,
            kernel_init=_init(weights[f"{name}.kernel"]),
            bias_init=_init(weights[f"{name}.bias"]),
            rngs=rngs,
        )
    if isinstance(layer, Dense):
        return fnnx.Linear(
            layer.in_features,
            layer.out_features,
            kernel_init=_init(weights[f"{name}.kernel"]),
            bias_init=_init(weights[f"{name}.bias"]),
            rngs=rngs,
        )
    if isinstance(layer, BatchNorm):
        norm = fnnx.BatchNorm(
            layer.channels,
            use_running_average=True,
            epsilon=BN_EPS,
            scale_init=_init(weights[f"{name}.scale"]),
            bias_init=_init(weights[f"{name}.bias"]),
            rngs=rngs,
        )
        _set(norm.mean, weights[f"{name}.mean"])
        _set(norm.var, weights[f"{name}.var"])
        return norm
    if isinstance(layer, ReLU):
        return NnxReLU()
    if isinstance(layer, Dropout):
        return fnnx.Dropout(layer.rate, deterministic=True, rngs=rngs)
    if isinstance(layer, Flatten):
        return NnxFlatten()
    if isinstance(layer, GlobalAvgPool):
        return NnxGlobalAvgPool()
    if isinstance(layer, Stage):
        return NnxSequence(layer.layers, name + ".", weights, rngs)
    if isinstance(layer, Residual):
        return NnxResidual(layer, name + ".", weights, rngs)
    if isinstance(layer, LayerNorm):
        return fnnx.LayerNorm(
            layer.features,
            epsilon=LN_EPS,
            use_fast_variance=False,
            scale_init=_init(weights[f"{name}.scale"]),
            bias_init=_init(weights[f"{name}.bias"]),
            rngs=rngs,
        )
    if isinstance(layer, GELU):
        return NnxGELU()
    if isinstance(layer, Softmax):
        return NnxSoftmax()
    if isinstance(layer, Tokens):
        return NnxTokens(weights[f"{name}.cls_token"], weights[f"{name}.pos_embed"])
    if isinstance(layer, ClassToken):
        return NnxClassToken()
    if isinstance(layer, Attention):
        return NnxAttention(layer, name + ".", weights, rngs)
    if isinstance(layer, TransformerBlock):
        return NnxTransformerBlock(layer, name + ".", weights, rngs)
    raise TypeError(f"unknown layer {layer!r}")


class NnxSequence(fnnx.Module):
    """The spec's layers in order, each an attribute named by the spec."""

    def __init__(
        self,
        layers: tuple[Layer, ...],
        prefix: str,
        weights: dict[str, np.ndarray],
        rngs: fnnx.Rngs,
    ) -> None:
        self.order = tuple(layer.name for layer in layers)
        for layer in layers:
            setattr(self, layer.name, _nnx_layer(layer, prefix, weights, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for name in self.order:
            x = getattr(self, name)(x)
        return x


class NnxResidual(fnnx.Module):
    """``relu(body(x) + shortcut(x))``; the final ReLU is the module's output."""

    def __init__(
        self, block: Residual, prefix: str, weights: dict[str, np.ndarray], rngs: fnnx.Rngs
    ) -> None:
        self.body = tuple(layer.name for layer in block.body)
        self.shortcut = tuple(layer.name for layer in block.shortcut)
        for layer in (*block.body, *block.shortcut):
            setattr(self, layer.name, _nnx_layer(layer, prefix, weights, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        out = x
        for name in self.body:
            out = getattr(self, name)(out)
        skip = x
        for name in self.shortcut:
            skip = getattr(self, name)(skip)
        return jax.nn.relu(out + skip)


class NnxAttention(fnnx.Module):
    """Self-attention with attributes ``qkv``, ``softmax`` and ``proj``."""

    def __init__(
        self, spec: Attention, prefix: str, weights: dict[str, np.ndarray], rngs: fnnx.Rngs
    ) -> None:
        self.heads = spec.heads
        qkv, softmax, proj = spec.layers
        self.qkv = _nnx_layer(qkv, prefix, weights, rngs)
        self.softmax = _nnx_layer(softmax, prefix, weights, rngs)
        self.proj = _nnx_layer(proj, prefix, weights, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _attention(x, self.heads, self.qkv, self.softmax, self.proj)


class NnxTransformerBlock(fnnx.Module):
    """``x = x + attention(x)``, then ``x = x + mlp(x)``; the branches' layers as attributes."""

    def __init__(
        self,
        block: TransformerBlock,
        prefix: str,
        weights: dict[str, np.ndarray],
        rngs: fnnx.Rngs,
    ) -> None:
        self.branches = (
            tuple(layer.name for layer in block.attention),
            tuple(layer.name for layer in block.mlp),
        )
        for layer in (*block.attention, *block.mlp):
            setattr(self, layer.name, _nnx_layer(layer, prefix, weights, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for names in self.branches:
            branch = x
            for name in names:
                branch = getattr(self, name)(branch)
            x = x + branch
        return x


# --- entry point -------------------------------------------------------------------------


def build(arch: Architecture, weights: dict[str, np.ndarray], nnx: bool = False) -> Any:
    """Build ``arch`` in Flax with ``weights``.

    Args:
        arch: the architecture spec.
        weights: a dict from :func:`multicam.zoo.init_weights` or of the same structure.
        nnx: build an nnx module instead of a linen one.

    Returns:
        ``(linen_module, variables)`` with ``nnx=False``; an ``nnx.Module`` in eval mode
        with ``nnx=True``. Both take channels-last input ``(N, *S, C)``.
    """
    if nnx:
        return NnxSequence(arch.layers, "", weights, fnnx.Rngs(0))
    return LinenSequence(arch.layers), _linen_variables(weights)
