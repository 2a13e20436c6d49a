"""NumPy reference forward pass for :mod:`multicam.zoo` architectures (float64).

The exact oracle of the agreement tests: it computes every layer's output without any
framework, so each backend's activations and scores can be checked against it, and on
``gap_cnn`` its gradients are known in closed form (:func:`gap_cnn_gradients`).
"""

from __future__ import annotations

import numpy as np

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


def _apply(
    layers: tuple[Layer, ...],
    x: np.ndarray,
    weights: dict[str, np.ndarray],
    prefix: str,
    record: dict[str, np.ndarray],
    replace: dict[str, np.ndarray],
) -> np.ndarray:
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
            x = np.maximum(x, 0.0)
        elif isinstance(layer, Flatten):
            x = x.reshape(x.shape[0], -1)
        elif isinstance(layer, GlobalAvgPool):
            x = x.mean(axis=tuple(range(1, x.ndim - 1)))
        elif isinstance(layer, Dropout):
            pass
        elif isinstance(layer, Stage):
            x = _apply(layer.layers, x, weights, name + ".", record, replace)
        elif isinstance(layer, Residual):
            body = _apply(layer.body, x, weights, name + ".", record, replace)
            x = np.maximum(
                body + _apply(layer.shortcut, x, weights, name + ".", record, replace), 0.0
            )
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
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run ``arch`` on channels-last ``inputs`` in float64.

    Args:
        arch: an architecture or its name.
        weights: its weight dict.
        inputs: ``(N, *S, C)``.
        replace: ``{layer_name: output}`` channels-last outputs that replace what those
            layers compute, to evaluate the network from a layer on (finite differences).

    Returns:
        ``(logits, outputs)``: logits ``(N, C)`` and every layer's channels-last output
        keyed by its canonical dotted name.
    """
    record: dict[str, np.ndarray] = {}
    logits = _apply(
        _architecture(arch).layers,
        np.asarray(inputs, np.float64),
        weights,
        "",
        record,
        replace or {},
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
