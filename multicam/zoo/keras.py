"""Keras 3 builder for :mod:`multicam.zoo` architectures.

Interprets the same declarative spec as :mod:`multicam.zoo.torch`, channels-last: every
:class:`~multicam.zoo.Stage` is a nested ``keras.Sequential`` and every
:class:`~multicam.zoo.Residual` a nested functional ``keras.Model``, both named after the
spec, so that layer paths read ``"features/relu4"``, ``"block2/conv1"`` or ``"block2"`` (the
block's post-ReLU output). Padding is explicit and symmetric (a named ``ZeroPadding`` layer
``"<conv>_pad"`` before a ``"valid"`` convolution), because Keras ``"same"`` padding is
asymmetric for stride 2. A strided 1x1 convolution is built as a ``pool_size=1`` average
pooling ``"<conv>_subsample"`` (pure subsampling) and a stride-1 convolution: the same
function, avoiding a heap-corrupting oneDNN kernel in TensorFlow 2.21's CPU build.

Transformers: a :class:`~multicam.zoo.TransformerBlock` is a nested functional model whose
output is its second residual sum (path ``"blocks/0"``), its branches' layers direct
children and the sums ``Add`` layers ``"add1"``, ``"add2"``; an
:class:`~multicam.zoo.Attention` is a nested functional model with layers ``"qkv"``,
``"softmax"`` (a ``keras.layers.Softmax``, whose output is the attention probabilities
``(N, heads, Q, K)``) and ``"proj"``, the heads split and merged by named ``Reshape`` and
``Permute`` layers (``"split_heads"``, ``"heads_first"``, ``"tokens_first"``,
``"merge_heads"``) and the products computed by ``keras.ops`` on the graph.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

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

_PAD = {1: keras.layers.ZeroPadding1D, 2: keras.layers.ZeroPadding2D, 3: keras.layers.ZeroPadding3D}
_CONV = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}
_SUBSAMPLE = {
    1: keras.layers.AveragePooling1D,
    2: keras.layers.AveragePooling2D,
    3: keras.layers.AveragePooling3D,
}
_GAP = {
    1: keras.layers.GlobalAveragePooling1D,
    2: keras.layers.GlobalAveragePooling2D,
    3: keras.layers.GlobalAveragePooling3D,
}


@keras.saving.register_keras_serializable(package="multicam.zoo")
class PatchTokens(keras.layers.Layer):
    """``(N, *grid, D) -> (N, 1 + prod(grid), D)``: row-major tokens, class token, positions.

    Weights: ``cls_token`` ``(D,)`` and ``pos_embed`` ``(1 + prod(grid), D)``.
    """

    def __init__(self, tokens: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokens = tokens
        self.dim = dim

    def build(self, input_shape: Any) -> None:
        self.cls_token = self.add_weight(shape=(self.dim,), initializer="zeros", name="cls_token")
        self.pos_embed = self.add_weight(
            shape=(self.tokens + 1, self.dim), initializer="zeros", name="pos_embed"
        )

    def call(self, x: Any) -> Any:
        tokens = keras.ops.reshape(x, (-1, self.tokens, self.dim))
        cls = keras.ops.zeros_like(tokens[:, :1]) + keras.ops.cast(self.cls_token, tokens.dtype)
        pos_embed = keras.ops.cast(self.pos_embed, tokens.dtype)
        return keras.ops.concatenate([cls, tokens], axis=1) + pos_embed

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (input_shape[0], self.tokens + 1, self.dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "tokens": self.tokens, "dim": self.dim}


@keras.saving.register_keras_serializable(package="multicam.zoo")
class ClassTokenPool(keras.layers.Layer):
    """The class token: ``(N, L, D) -> (N, D)``."""

    def call(self, x: Any) -> Any:
        return x[:, 0]

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (input_shape[0], *input_shape[2:])


class _Builder:
    """Builds the Keras layers of a spec, tracking shapes and the weights to load."""

    def __init__(self, weights: dict[str, np.ndarray], dtype: str | None) -> None:
        self.weights = weights
        self.dtype = dtype
        self.pending: list[tuple[keras.layers.Layer, list[np.ndarray]]] = []

    def layers(
        self, specs: tuple[Layer, ...], prefix: str, shape: tuple[int, ...]
    ) -> tuple[list[keras.layers.Layer], tuple[int, ...]]:
        """The Keras layers for ``specs`` applied in order to one sample of ``shape``."""
        result: list[keras.layers.Layer] = []
        for spec in specs:
            made, shape = self.layer(spec, prefix, shape)
            result.extend(made)
        return result, shape

    def layer(
        self, spec: Layer, prefix: str, shape: tuple[int, ...]
    ) -> tuple[list[keras.layers.Layer], tuple[int, ...]]:
        """The Keras layers for one spec entry and the sample shape after them."""
        name = prefix + spec.name
        dtype = self.dtype
        if isinstance(spec, Conv):
            made: list[keras.layers.Layer] = []
            spatial = shape[:-1]
            if spec.padding:
                made.append(_PAD[spec.dims](spec.padding, name=f"{spec.name}_pad", dtype=dtype))
                spatial = tuple(s + 2 * spec.padding for s in spatial)
            stride = spec.stride
            if spec.kernel == 1 and stride > 1:
                # Same function, built as subsampling + stride-1 conv: TF 2.21's oneDNN CPU
                # kernel for the input gradient of a strided 1x1 conv corrupts the heap on
                # small shapes (e.g. 16x16x8 -> 8x8), crashing any backward through it.
                made.append(
                    _SUBSAMPLE[spec.dims](1, stride, name=f"{spec.name}_subsample", dtype=dtype)
                )
                spatial = tuple((s - 1) // stride + 1 for s in spatial)
                stride = 1
            conv = _CONV[spec.dims](
                spec.out_channels,
                spec.kernel,
                strides=stride,
                padding="valid",
                name=spec.name,
                dtype=dtype,
            )
            self.pending.append(
                (conv, [self.weights[f"{name}.kernel"], self.weights[f"{name}.bias"]])
            )
            made.append(conv)
            spatial = tuple((s - spec.kernel) // stride + 1 for s in spatial)
            return made, (*spatial, spec.out_channels)
        if isinstance(spec, Dense):
            dense = keras.layers.Dense(spec.out_features, name=spec.name, dtype=dtype)
            self.pending.append(
                (dense, [self.weights[f"{name}.kernel"], self.weights[f"{name}.bias"]])
            )
            return [dense], (*shape[:-1], spec.out_features)
        if isinstance(spec, BatchNorm):
            norm = keras.layers.BatchNormalization(epsilon=BN_EPS, name=spec.name, dtype=dtype)
            params = [self.weights[f"{name}.{p}"] for p in ("scale", "bias", "mean", "var")]
            self.pending.append((norm, params))
            return [norm], shape
        if isinstance(spec, ReLU):
            return [keras.layers.ReLU(name=spec.name, dtype=dtype)], shape
        if isinstance(spec, Dropout):
            return [keras.layers.Dropout(spec.rate, name=spec.name, dtype=dtype)], shape
        if isinstance(spec, Flatten):
            return [keras.layers.Flatten(name=spec.name, dtype=dtype)], (int(np.prod(shape)),)
        if isinstance(spec, GlobalAvgPool):
            return [_GAP[len(shape) - 1](name=spec.name, dtype=dtype)], shape[-1:]
        if isinstance(spec, Stage):
            children, out_shape = self.layers(spec.layers, name + ".", shape)
            stage = keras.Sequential(
                [keras.Input(shape=shape, name="input"), *children], name=spec.name
            )
            return [stage], out_shape
        if isinstance(spec, Residual):
            inputs = keras.Input(shape=shape, name="input")
            body, out_shape = self.layers(spec.body, name + ".", shape)
            shortcut, _ = self.layers(spec.shortcut, name + ".", shape)
            out = inputs
            for layer in body:
                out = layer(out)
            skip = inputs
            for layer in shortcut:
                skip = layer(skip)
            out = keras.layers.Add(name="add", dtype=dtype)([out, skip])
            out = keras.layers.ReLU(name="relu", dtype=dtype)(out)
            return [keras.Model(inputs, out, name=spec.name)], out_shape
        if isinstance(spec, LayerNorm):
            norm = keras.layers.LayerNormalization(epsilon=LN_EPS, name=spec.name, dtype=dtype)
            self.pending.append(
                (norm, [self.weights[f"{name}.scale"], self.weights[f"{name}.bias"]])
            )
            return [norm], shape
        if isinstance(spec, GELU):
            # keras.activations.gelu is exact (erf) by default: approximate=False.
            return [keras.layers.Activation("gelu", name=spec.name, dtype=dtype)], shape
        if isinstance(spec, Softmax):
            return [keras.layers.Softmax(axis=-1, name=spec.name, dtype=dtype)], shape
        if isinstance(spec, Tokens):
            tokens = int(np.prod(spec.grid))
            layer = PatchTokens(tokens, spec.dim, name=spec.name, dtype=dtype)
            params = [self.weights[f"{name}.cls_token"], self.weights[f"{name}.pos_embed"]]
            self.pending.append((layer, params))
            return [layer], (tokens + 1, spec.dim)
        if isinstance(spec, ClassToken):
            return [ClassTokenPool(name=spec.name, dtype=dtype)], shape[1:]
        if isinstance(spec, Attention):
            return [self.attention(spec, name, shape)], shape
        if isinstance(spec, TransformerBlock):
            inputs = keras.Input(shape=shape, name="input")
            out = inputs
            for index, branch in enumerate((spec.attention, spec.mlp), start=1):
                layers, _ = self.layers(branch, name + ".", shape)
                residual = out
                for layer in layers:
                    residual = layer(residual)
                out = keras.layers.Add(name=f"add{index}", dtype=dtype)([out, residual])
            return [keras.Model(inputs, out, name=spec.name)], shape
        raise TypeError(f"unknown layer {spec!r}")

    def attention(self, spec: Attention, name: str, shape: tuple[int, ...]) -> keras.Model:
        """Self-attention on ``(L, D)`` tokens as a functional model named ``spec.name``."""
        length, dim = shape
        heads, head_dim = spec.heads, spec.dim // spec.heads
        dtype = self.dtype
        qkv_spec, softmax_spec, proj_spec = spec.layers
        (qkv,), _ = self.layer(qkv_spec, name + ".", shape)
        (softmax,), _ = self.layer(softmax_spec, name + ".", (heads, length, length))
        (proj,), _ = self.layer(proj_spec, name + ".", shape)
        inputs = keras.Input(shape=shape, name="input")
        split = keras.layers.Reshape((length, 3, heads, head_dim), name="split_heads", dtype=dtype)
        # (N, L, 3, heads, d) -> (N, 3, heads, L, d)
        packed = keras.layers.Permute((2, 3, 1, 4), name="heads_first", dtype=dtype)(
            split(qkv(inputs))
        )
        q, k, v = packed[:, 0], packed[:, 1], packed[:, 2]
        logits = keras.ops.matmul(q, keras.ops.swapaxes(k, -1, -2)) / math.sqrt(head_dim)
        heads_out = keras.ops.matmul(softmax(logits), v)  # (N, heads, L, d)
        merged = keras.layers.Permute((2, 1, 3), name="tokens_first", dtype=dtype)(heads_out)
        merged = keras.layers.Reshape((length, dim), name="merge_heads", dtype=dtype)(merged)
        return keras.Model(inputs, proj(merged), name=spec.name)


def build(arch: Architecture, weights: dict[str, np.ndarray], *, dtype: str | None = None) -> Any:
    """The ``arch`` network as a functional Keras 3 model, channels-last input.

    Args:
        arch: the architecture spec.
        weights: ``{"<dotted name>.<param>": array}`` as from :func:`multicam.zoo.init_weights`.
        dtype: an optional Keras dtype policy for every layer, e.g. ``"float16"`` or
            ``"mixed_float16"``; ``None`` for the global default (float32).

    Returns:
        A built ``keras.Model`` named ``arch.name`` with the weights loaded.
    """
    builder = _Builder(weights, dtype)
    inputs = keras.Input(shape=arch.input_shape, name="input")
    layers, _ = builder.layers(arch.layers, "", tuple(arch.input_shape))
    out = inputs
    for layer in layers:
        out = layer(out)
    model = keras.Model(inputs, out, name=arch.name)
    for layer, params in builder.pending:
        layer.set_weights([np.asarray(p) for p in params])
    return model
