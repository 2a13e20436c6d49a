"""NumPy reference forward pass for :mod:`multicam.zoo` architectures (float64).

The exact oracle of the agreement tests: it computes every layer's output without any
framework, so each backend's activations and scores can be checked against it, and on
``gap_cnn`` its gradients are known in closed form (:func:`gap_cnn_gradients`). On a
transformer, an attention layer's inner ``qkv``, ``softmax`` (the attention probabilities
``(N, heads, Q, K)``) and ``proj`` are recorded, and may be replaced, like any layer.
"""

from __future__ import annotations

import math

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
    _architecture,
)

__all__ = ["forward", "gap_cnn_gradients"]


def _conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, layer: Conv) -> np.ndarray:
    """Channels-last convolution ``(N, *S, C) -> (N, *S', K)`` by strided windows."""
    dims = layer.dims
    pad = [(0, 0)] + [(layer.padding, layer.padding)] * dims + [(0, 0)]
    x = np.pad(x, pad)
    windows = np.lib.stride_tricks.sliding_window_view(
        x, (layer.kernel,) * dims, axis=tuple(range(1, dims + 1))
    )
    windows = windows[(slice(None), *[slice(None, None, layer.stride)] * dims)]
    # windows: (N, *S', C, *k); kernel: (*k, C, K)
    k_axes = tuple(range(windows.ndim - dims, windows.ndim))
    c_axis = windows.ndim - dims - 1
    out = np.tensordot(windows, kernel, axes=((c_axis, *k_axes), (dims, *range(dims))))
    return out + bias


_ERF = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU ``x * Phi(x) = x (1 + erf(x / sqrt 2)) / 2``."""
    return 0.5 * x * (1.0 + _ERF(x / math.sqrt(2.0)))


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Layer normalisation over the last axis (population variance), ``eps = 1e-5``."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * scale + bias


def _attention(
    layer: Attention,
    x: np.ndarray,
    name: str,
    weights: dict[str, np.ndarray],
    record: dict[str, np.ndarray],
    replace: dict[str, np.ndarray],
) -> np.ndarray:
    """Self-attention on ``(N, L, D)``, recording (and replacing) ``qkv``, ``softmax``, ``proj``."""

    def dense(child: str, value: np.ndarray) -> np.ndarray:
        kernel = weights[f"{name}.{child}.kernel"].astype(np.float64)
        return value @ kernel + weights[f"{name}.{child}.bias"].astype(np.float64)

    def output(child: str, value: np.ndarray) -> np.ndarray:
        key = f"{name}.{child}"
        if key in replace:
            value = np.asarray(replace[key], np.float64)
        record[key] = value
        return value

    n, length, dim = x.shape
    head_dim = dim // layer.heads
    qkv = output("qkv", dense("qkv", x))
    q, k, v = qkv.reshape(n, length, 3, layer.heads, head_dim).transpose(2, 0, 3, 1, 4)
    probs = output("softmax", _softmax(q @ np.swapaxes(k, -1, -2) / math.sqrt(head_dim)))
    heads = (probs @ v).transpose(0, 2, 1, 3).reshape(n, length, dim)
    return output("proj", dense("proj", heads))


def _relu(
    x: np.ndarray,
    name: str,
    gates: dict[str, np.ndarray],
    pre_relu: dict[str, np.ndarray] | None,
) -> np.ndarray:
    """ReLU of ``x``, with units whose ``gates[name]`` is 0 or 1 forced closed or open."""
    if pre_relu is not None:
        pre_relu[name] = x
    out = np.maximum(x, 0.0)
    if name in gates:
        gate = np.asarray(gates[name], np.float64)
        out = np.where(np.isnan(gate), out, np.nan_to_num(gate) * x)
    return out


def _apply(
    layers: tuple[Layer, ...],
    x: np.ndarray,
    prefix: str,
    weights: dict[str, np.ndarray],
    record: dict[str, np.ndarray],
    replace: dict[str, np.ndarray],
    gates: dict[str, np.ndarray],
    pre_relu: dict[str, np.ndarray] | None,
) -> np.ndarray:
    args = (weights, record, replace, gates, pre_relu)
    for layer in layers:
        name = prefix + layer.name
        w = {
            k[len(name) + 1 :]: v.astype(np.float64)
            for k, v in weights.items()
            if k.startswith(name + ".")
        }
        if isinstance(layer, Conv):
            x = _conv(x, w["kernel"], w["bias"], layer)
        elif isinstance(layer, Dense):
            x = x @ w["kernel"] + w["bias"]
        elif isinstance(layer, BatchNorm):
            x = (x - w["mean"]) / np.sqrt(w["var"] + BN_EPS) * w["scale"] + w["bias"]
        elif isinstance(layer, ReLU):
            x = _relu(x, name, gates, pre_relu)
        elif isinstance(layer, Flatten):
            x = x.reshape(x.shape[0], -1)
        elif isinstance(layer, GlobalAvgPool):
            x = x.mean(axis=tuple(range(1, x.ndim - 1)))
        elif isinstance(layer, Dropout):
            pass
        elif isinstance(layer, Stage):
            x = _apply(layer.layers, x, name + ".", *args)
        elif isinstance(layer, Residual):
            body = _apply(layer.body, x, name + ".", *args)
            x = _relu(body + _apply(layer.shortcut, x, name + ".", *args), name, gates, pre_relu)
        elif isinstance(layer, LayerNorm):
            x = _layer_norm(x, w["scale"], w["bias"])
        elif isinstance(layer, GELU):
            x = _gelu(x)
        elif isinstance(layer, Softmax):
            x = _softmax(x)
        elif isinstance(layer, Tokens):
            tokens = x.reshape(x.shape[0], -1, x.shape[-1])
            cls = np.broadcast_to(w["cls_token"], (x.shape[0], 1, x.shape[-1]))
            x = np.concatenate([cls, tokens], axis=1) + w["pos_embed"]
        elif isinstance(layer, ClassToken):
            x = x[:, 0]
        elif isinstance(layer, Attention):
            x = _attention(layer, x, name, weights, record, replace)
        elif isinstance(layer, TransformerBlock):
            x = x + _apply(layer.attention, x, name + ".", *args)
            x = x + _apply(layer.mlp, x, name + ".", *args)
        else:
            raise TypeError(f"unknown layer {layer!r}")
        if name in replace:
            x = np.asarray(replace[name], np.float64)
        record[name] = x
    return x


def forward(
    arch: str | Architecture,
    weights: dict[str, np.ndarray],
    inputs: np.ndarray,
    replace: dict[str, np.ndarray] | None = None,
    *,
    gates: dict[str, np.ndarray] | None = None,
    pre_relu: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run ``arch`` on channels-last ``inputs`` in float64.

    Args:
        arch: an architecture or its name.
        weights: its weight dict.
        inputs: ``(N, *S, C)``.
        replace: ``{layer_name: output}`` channels-last outputs that replace what those
            layers compute, to evaluate the network from a layer on (finite differences).
        gates: ``{relu_name: gate}`` arrays shaped like that ReLU's output: NaN where the
            ReLU decides, 0 to force a unit closed (output 0), 1 to force it open (output =
            input). A residual block's own ReLU is named after the block. Used to evaluate
            the other side of a kink that float32 round-off may put a backend on.
        pre_relu: a dict to fill with every ReLU's input ``{relu_name: pre-activation}``.

    Returns:
        ``(logits, outputs)``: logits ``(N, C)`` and every layer's channels-last output
        keyed by its canonical dotted name (tokens ``(N, L, D)`` and attention
        probabilities ``(N, heads, Q, K)`` as they are).
    """
    record: dict[str, np.ndarray] = {}
    logits = _apply(
        _architecture(arch).layers,
        np.asarray(inputs, np.float64),
        "",
        weights,
        record,
        replace or {},
        gates or {},
        pre_relu,
    )
    return logits, record


def gap_cnn_gradients(
    weights: dict[str, np.ndarray], classes: np.ndarray, spatial: tuple[int, ...]
) -> np.ndarray:
    """Exact ``d logit / d A`` at ``features.relu2`` of ``gap_cnn``: ``W[k, c] / (h w)``.

    Args:
        weights: the ``gap_cnn`` weight dict.
        classes: ``(N, T)`` class ids.
        spatial: the layer's spatial shape ``(h, w)``.

    Returns:
        ``(N, T, K, h, w)`` channels-first gradients.
    """
    kernel = weights["fc.kernel"].astype(np.float64)  # (K, C)
    alpha = kernel.T[classes] / np.prod(spatial)  # (N, T, K)
    return np.broadcast_to(alpha[..., None, None], (*alpha.shape, *spatial))
