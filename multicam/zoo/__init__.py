"""Reference networks, built identically in every framework from one NumPy weight dict.

Each architecture is a small declarative spec (:class:`Architecture`) that a per-framework
builder interprets, so the PyTorch, Keras, Flax linen and Flax nnx networks have the same
layers, the same names and, given the same weight dict, compute the same function. They
exist to cross-check backends (:mod:`multicam.testing`), in tests, the demo and benchmarks.

Conventions, identical in every framework:

- Weights are channels-last: conv kernels ``(*k, in, out)``, dense kernels ``(in, out)``;
  ``flatten`` flattens channels-last (H, W, C) order, so the first dense layer needs no
  permutation (the torch builder permutes the activations instead).
- Padding is explicit and symmetric (``padding=p`` pads p on each side), BatchNorm runs on
  its running statistics with ``eps = 1e-5``, dropout is inactive at inference.
- A layer's canonical name is its dotted path, e.g. ``"features.relu4"``;
  :func:`layer_name` gives each framework's spelling (``"features/relu4"`` in Keras and
  linen).
- Transformers (:data:`TRANSFORMER_ARCHITECTURES`) work on token sequences ``(N, L, D)``,
  batch first in every framework: layer normalisation over the last axis with
  ``eps = 1e-5``, exact (erf) GELU, attention written out with its softmax as a named layer
  whose output is the attention probabilities ``(N, heads, Q, K)``.

Example:
    >>> from multicam import zoo
    >>> weights = zoo.init_weights("digits_cnn", seed=0)
    >>> weights["features.conv1.kernel"].shape
    (2, 2, 1, 8)
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ARCHITECTURES",
    "BENCHMARK_ARCHITECTURES",
    "SEGMENTATION_ARCHITECTURES",
    "TRANSFORMER_ARCHITECTURES",
    "explainer",
    "installed_frameworks",
    "FRAMEWORKS",
    "Architecture",
    "Attention",
    "BatchNorm",
    "ClassToken",
    "Conv",
    "Dense",
    "Dropout",
    "Flatten",
    "GELU",
    "GlobalAvgPool",
    "LayerNorm",
    "ReLU",
    "Residual",
    "Softmax",
    "Stage",
    "Tokens",
    "TransformerBlock",
    "build",
    "example_input",
    "init_weights",
    "layer_name",
]

BN_EPS = 1e-5
LN_EPS = 1e-5

FRAMEWORKS = ("torch", "keras", "flax", "nnx")
"""Frameworks :func:`build` knows: PyTorch, Keras 3, Flax linen, Flax nnx."""


@dataclass(frozen=True)
class Conv:
    """Convolution over ``dims`` spatial dims, symmetric zero ``padding``."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dims: int = 2


@dataclass(frozen=True)
class BatchNorm:
    """Batch normalisation on running statistics, ``eps = 1e-5``."""

    name: str
    channels: int


@dataclass(frozen=True)
class ReLU:
    """A named ReLU, so that its output can be chosen as the layer."""

    name: str


@dataclass(frozen=True)
class Dense:
    """Fully connected layer, kernel ``(in, out)``, on the last axis.

    ``gain`` multiplies the standard deviation of its random kernel in
    :func:`init_weights` (e.g. a larger one for attention's ``qkv``, so that the softmax
    is peaked).
    """

    name: str
    in_features: int
    out_features: int
    gain: float = 1.0


@dataclass(frozen=True)
class Flatten:
    """Flatten all but the batch dim in channels-last order."""

    name: str


@dataclass(frozen=True)
class Dropout:
    """Dropout, inactive at inference."""

    name: str
    rate: float


@dataclass(frozen=True)
class GlobalAvgPool:
    """Mean over the spatial dims: ``(N, *S, K) -> (N, K)``."""

    name: str


@dataclass(frozen=True)
class Stage:
    """A named group of layers (a ``nn.Sequential`` in torch, a nested model in Keras)."""

    name: str
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class Residual:
    """``relu(body(x) + shortcut(x))``; an empty shortcut is the identity."""

    name: str
    body: tuple[Layer, ...]
    shortcut: tuple[Layer, ...] = ()


@dataclass(frozen=True)
class LayerNorm:
    """Layer normalisation over the last axis, learned ``scale`` and ``bias``, ``eps = 1e-5``."""

    name: str
    features: int


@dataclass(frozen=True)
class GELU:
    """A named exact GELU, ``x * Phi(x)`` with the normal CDF ``Phi`` (erf, not tanh)."""

    name: str


@dataclass(frozen=True)
class Softmax:
    """Softmax over the last axis as a named layer, so that its output can be observed."""

    name: str


@dataclass(frozen=True)
class Tokens:
    """Patch tokens from a channels-last grid: ``(N, *grid, D) -> (N, 1 + prod(grid), D)``.

    Flattens the grid in row-major order, prepends a learned class token ``cls_token``
    ``(D,)`` and adds a learned positional embedding ``pos_embed`` ``(1 + prod(grid), D)``.
    """

    name: str
    grid: tuple[int, ...]
    dim: int


@dataclass(frozen=True)
class ClassToken:
    """The class token of a token sequence: ``(N, L, D) -> (N, D)``, i.e. ``x[:, 0]``."""

    name: str


@dataclass(frozen=True)
class Attention:
    """Multi-head self-attention, written out: ``proj(softmax(q k^T / sqrt(d)) v)``.

    On ``(N, L, D)`` tokens. Its layers (see :attr:`layers`): ``qkv``, a dense layer to
    ``3 D`` whose output splits as ``(3, heads, D / heads)`` (timm's order), ``softmax``
    over the keys, whose output is the attention probabilities ``(N, heads, Q, K)``, and
    ``proj``, a dense layer on the heads' outputs concatenated.
    """

    name: str
    dim: int
    heads: int
    qkv_gain: float = 1.5

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The named layers inside, in order: ``qkv``, ``softmax``, ``proj``."""
        return (
            Dense("qkv", self.dim, 3 * self.dim, gain=self.qkv_gain),
            Softmax("softmax"),
            Dense("proj", self.dim, self.dim),
        )


@dataclass(frozen=True)
class TransformerBlock:
    """A pre-norm transformer block: ``x = x + attention(x)``, then ``x = x + mlp(x)``.

    ``attention`` and ``mlp`` are the two residual branches (e.g. layer norm and
    :class:`Attention`; layer norm and a :class:`Stage` of dense, GELU, dense), their
    layers direct children of the block; the block's output is the second sum.
    """

    name: str
    attention: tuple[Layer, ...]
    mlp: tuple[Layer, ...]


Layer = (
    Conv
    | BatchNorm
    | ReLU
    | Dense
    | Flatten
    | Dropout
    | GlobalAvgPool
    | Stage
    | Residual
    | LayerNorm
    | GELU
    | Softmax
    | Tokens
    | ClassToken
    | Attention
    | TransformerBlock
)


@dataclass(frozen=True)
class Architecture:
    """A reference network.

    Attributes:
        name: registry key.
        input_shape: one sample, channels-last: ``(*S, C)``.
        num_classes: width of the output logits.
        layers: the network, in order.
        cam_layers: canonical names of the layers with spatial output, for Grad-CAM; for a
            transformer, layers whose output is tokens ``(N, L, D)``, explained with
            ``reshape=token_grid``.
        description: one line.
        token_grid: for a transformer, the grid its patch tokens form (after the class
            token), e.g. ``(4, 4)``; ``None`` otherwise.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    layers: tuple[Layer, ...]
    cam_layers: tuple[str, ...]
    description: str = field(default="", compare=False)
    token_grid: tuple[int, ...] | None = None


def _digits_cnn() -> Architecture:
    features = (
        Conv("conv1", 1, 8, kernel=2, padding=1),
        ReLU("relu1"),
        Conv("conv2", 8, 16, kernel=2, stride=2, padding=1),
        ReLU("relu2"),
        Conv("conv3", 16, 20, kernel=2, padding=1),
        ReLU("relu3"),
        Conv("conv4", 20, 24, kernel=2, stride=2, padding=1),
        ReLU("relu4"),
    )
    classifier = (
        Flatten("flatten"),
        Dense("dense1", 1944, 256),
        Dropout("dropout1", 0.3),
        ReLU("relu5"),
        Dense("dense2", 256, 64),
        Dropout("dropout2", 0.3),
        ReLU("relu6"),
        Dense("dense3", 64, 10),
    )
    names = [f"features.{op.name}" for op in features]
    return Architecture(
        "digits_cnn",
        (28, 28, 1),
        10,
        (Stage("features", features), Stage("classifier", classifier)),
        tuple(names),
        "the MNIST CNN of the blank-map report: four 2x2 convs, then 1944 -> 256 -> 64 -> 10",
    )


def _resnet_tiny() -> Architecture:
    def block(name: str, cin: int, cout: int, stride: int) -> Residual:
        body = (
            Conv("conv1", cin, cout, kernel=3, stride=stride, padding=1),
            BatchNorm("bn1", cout),
            ReLU("relu1"),
            Conv("conv2", cout, cout, kernel=3, padding=1),
            BatchNorm("bn2", cout),
        )
        shortcut: tuple[Layer, ...] = ()
        if stride != 1 or cin != cout:
            shortcut = (
                Conv("down_conv", cin, cout, kernel=1, stride=stride),
                BatchNorm("down_bn", cout),
            )
        return Residual(name, body, shortcut)

    layers = (
        Conv("stem_conv", 3, 8, kernel=3, padding=1),
        BatchNorm("stem_bn", 8),
        ReLU("stem_relu"),
        block("block1", 8, 8, 1),
        block("block2", 8, 16, 2),
        GlobalAvgPool("pool"),
        Dense("fc", 16, 5),
    )
    cam = ("stem_relu", "block1", "block1.relu1", "block2.conv1", "block2.relu1", "block2")
    return Architecture(
        "resnet_tiny", (16, 16, 3), 5, layers, cam, "two residual blocks with BatchNorm"
    )


def _conv1d_net() -> Architecture:
    features = (
        Conv("conv1", 2, 8, kernel=5, padding=2, dims=1),
        ReLU("relu1"),
        Conv("conv2", 8, 16, kernel=3, stride=2, padding=1, dims=1),
        ReLU("relu2"),
    )
    return Architecture(
        "conv1d_net",
        (64, 2),
        4,
        (Stage("features", features), GlobalAvgPool("pool"), Dense("fc", 16, 4)),
        tuple(f"features.{op.name}" for op in features),
        "a 1-D signal classifier: two convs, global average pooling, linear",
    )


def _gap_cnn() -> Architecture:
    features = (
        Conv("conv1", 3, 6, kernel=3, padding=1),
        ReLU("relu1"),
        Conv("conv2", 6, 8, kernel=3, padding=1),
        ReLU("relu2"),
    )
    return Architecture(
        "gap_cnn",
        (12, 12, 3),
        5,
        (Stage("features", features), GlobalAvgPool("pool"), Dense("fc", 8, 5)),
        tuple(f"features.{op.name}" for op in features),
        "conv -> global average pool -> linear: d score_c / dA_k = W[k, c] / (h w) exactly",
    )


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch for arch in (_digits_cnn(), _resnet_tiny(), _conv1d_net(), _gap_cnn())
}


def _resnet50() -> Architecture:
    """ResNet-50's shape: bottleneck blocks [3, 4, 6, 3], 224x224x3 input, 1000 classes.

    The zoo has no max pooling, so the stem's 3x3 stride-2 max pool is a 3x3 stride-2
    convolution (+ BatchNorm, ReLU): 25.6 M parameters, 4.2 GMACs per image (torchvision's
    ResNet-50: 25.6 M, 4.1 GMACs). Random weights: for speed, not for pictures.
    """

    def bottleneck(name: str, cin: int, width: int, stride: int) -> Residual:
        cout = 4 * width
        body = (
            Conv("conv1", cin, width, kernel=1),
            BatchNorm("bn1", width),
            ReLU("relu1"),
            Conv("conv2", width, width, kernel=3, stride=stride, padding=1),
            BatchNorm("bn2", width),
            ReLU("relu2"),
            Conv("conv3", width, cout, kernel=1),
            BatchNorm("bn3", cout),
        )
        shortcut: tuple[Layer, ...] = ()
        if stride != 1 or cin != cout:
            shortcut = (
                Conv("down_conv", cin, cout, kernel=1, stride=stride),
                BatchNorm("down_bn", cout),
            )
        return Residual(name, body, shortcut)

    stages: list[Layer] = []
    cin = 64
    for index, (blocks, width, stride) in enumerate(
        [(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)], start=1
    ):
        layers = []
        for b in range(blocks):
            layers.append(bottleneck(f"block{b + 1}", cin, width, stride if b == 0 else 1))
            cin = 4 * width
        stages.append(Stage(f"layer{index}", tuple(layers)))
    stem = (
        Conv("conv1", 3, 64, kernel=7, stride=2, padding=3),
        BatchNorm("bn1", 64),
        ReLU("relu1"),
        Conv("pool", 64, 64, kernel=3, stride=2, padding=1),
        BatchNorm("pool_bn", 64),
        ReLU("pool_relu"),
    )
    return Architecture(
        "resnet50",
        (224, 224, 3),
        1000,
        (Stage("stem", stem), *stages, GlobalAvgPool("avgpool"), Dense("fc", 2048, 1000)),
        ("layer3", "layer4"),
        "ResNet-50 size: bottleneck blocks [3, 4, 6, 3], 224x224, 1000 classes (benchmarks)",
    )


def _seg_fcn() -> Architecture:
    features = (
        Conv("conv1", 3, 8, kernel=3, padding=1),
        ReLU("relu1"),
        Conv("conv2", 8, 8, kernel=3, padding=1),
        ReLU("relu2"),
    )
    return Architecture(
        "seg_fcn",
        (10, 10, 3),
        3,
        (Stage("features", features), Conv("classifier", 8, 3, kernel=1)),
        tuple(f"features.{op.name}" for op in features),
        "a fully convolutional segmentation net: two 3x3 convs, a 1x1 conv to 3 class maps",
    )


SEGMENTATION_ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (_seg_fcn(),)}
"""Networks whose output is a map of class scores (N, C, *S), for :class:`multicam.Region`
targets; kept out of :data:`ARCHITECTURES`, whose tests use class targets."""


def _tiny_vit() -> Architecture:
    """A vision transformer: 4x4 patches of a 16x16x3 image, 2 pre-norm blocks, 10 classes.

    Width 16, 2 heads, MLP width 32; the class token after the final layer norm feeds the
    head. Every block's attention softmax is a layer, ``"blocks.<i>.attn.softmax"``. Its
    Grad-CAM layers end at the last block's ``norm1`` (the usual choice): after the last
    block's attention only the class token reaches the head (layer norm acts per token), so
    the patch tokens of ``"blocks.1"`` have zero gradients and blank maps.
    """
    dim, heads, hidden, grid = 16, 2, 32, (4, 4)

    def block(name: str) -> TransformerBlock:
        return TransformerBlock(
            name,
            attention=(LayerNorm("norm1", dim), Attention("attn", dim, heads)),
            mlp=(
                LayerNorm("norm2", dim),
                Stage("mlp", (Dense("fc1", dim, hidden), GELU("act"), Dense("fc2", hidden, dim))),
            ),
        )

    layers = (
        Conv("patch_embed", 3, dim, kernel=4, stride=4),
        Tokens("tokens", grid, dim),
        Stage("blocks", (block("0"), block("1"))),
        LayerNorm("norm", dim),
        ClassToken("pool"),
        Dense("head", dim, 10),
    )
    return Architecture(
        "tiny_vit",
        (16, 16, 3),
        10,
        layers,
        ("tokens", "blocks.0", "blocks.1.norm1"),
        "a vision transformer: 4x4 patches, class token, 2 pre-norm blocks of 2 heads",
        token_grid=grid,
    )


TRANSFORMER_ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (_tiny_vit(),)}
"""Networks on token sequences ``(N, L, D)``: their :attr:`~Architecture.cam_layers` are
explained with ``reshape=`` :attr:`~Architecture.token_grid`; kept out of
:data:`ARCHITECTURES`, whose tests expect layers with spatial outputs."""

BENCHMARK_ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (_resnet50(),)}
"""Large networks for :mod:`multicam.bench`; kept out of :data:`ARCHITECTURES`, which the
agreement tests iterate. :func:`build`, :func:`init_weights` and :func:`example_input`
accept their names too."""


def iter_layers(layers: tuple[Layer, ...], prefix: str = "") -> Iterator[tuple[str, Layer]]:
    """Yield ``(dotted_name, layer)`` for every layer, containers before their children."""
    for layer in layers:
        name = prefix + layer.name
        yield name, layer
        if isinstance(layer, Stage | Attention):
            yield from iter_layers(layer.layers, name + ".")
        elif isinstance(layer, Residual):
            yield from iter_layers(layer.body, name + ".")
            yield from iter_layers(layer.shortcut, name + ".")
        elif isinstance(layer, TransformerBlock):
            yield from iter_layers(layer.attention, name + ".")
            yield from iter_layers(layer.mlp, name + ".")


def _architecture(arch: str | Architecture) -> Architecture:
    if isinstance(arch, Architecture):
        return arch
    found = (
        ARCHITECTURES.get(arch)
        or SEGMENTATION_ARCHITECTURES.get(arch)
        or TRANSFORMER_ARCHITECTURES.get(arch)
        or BENCHMARK_ARCHITECTURES.get(arch)
    )
    if found is None:
        known = sorted(
            [
                *ARCHITECTURES,
                *SEGMENTATION_ARCHITECTURES,
                *TRANSFORMER_ARCHITECTURES,
                *BENCHMARK_ARCHITECTURES,
            ]
        )
        raise KeyError(f"unknown architecture {arch!r}; known: {known}")
    return found


def init_weights(arch: str | Architecture, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for ``arch``, reproducible from ``seed``.

    He-normal kernels (times :attr:`Dense.gain`), small random biases, and BatchNorm and
    layer norm parameters away from the identity so that every parameter matters in
    agreement tests.

    Returns:
        ``{"<dotted layer name>.<param>": array}`` with params ``kernel``, ``bias`` (conv,
        dense), ``scale``, ``bias``, ``mean``, ``var`` (BatchNorm), ``scale``, ``bias``
        (layer norm) and ``cls_token``, ``pos_embed`` (:class:`Tokens`).
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, layer in iter_layers(_architecture(arch).layers):
        if isinstance(layer, Conv):
            shape = (layer.kernel,) * layer.dims + (layer.in_channels, layer.out_channels)
            fan_in = layer.in_channels * layer.kernel**layer.dims
            weights[f"{name}.kernel"] = rng.normal(0, np.sqrt(2 / fan_in), shape)
            weights[f"{name}.bias"] = rng.normal(0, 0.05, layer.out_channels)
        elif isinstance(layer, Dense):
            shape = (layer.in_features, layer.out_features)
            std = layer.gain * np.sqrt(2 / layer.in_features)
            weights[f"{name}.kernel"] = rng.normal(0, std, shape)
            weights[f"{name}.bias"] = rng.normal(0, 0.05, layer.out_features)
        elif isinstance(layer, BatchNorm):
            weights[f"{name}.scale"] = rng.uniform(0.5, 1.5, layer.channels)
            weights[f"{name}.bias"] = rng.normal(0, 0.1, layer.channels)
            weights[f"{name}.mean"] = rng.normal(0, 0.1, layer.channels)
            weights[f"{name}.var"] = rng.uniform(0.5, 1.5, layer.channels)
        elif isinstance(layer, LayerNorm):
            weights[f"{name}.scale"] = rng.uniform(0.5, 1.5, layer.features)
            weights[f"{name}.bias"] = rng.normal(0, 0.1, layer.features)
        elif isinstance(layer, Tokens):
            weights[f"{name}.cls_token"] = rng.normal(0, 1.0, layer.dim)
            tokens = 1 + int(np.prod(layer.grid))
            weights[f"{name}.pos_embed"] = rng.normal(0, 0.5, (tokens, layer.dim))
    return {key: value.astype(np.float32) for key, value in weights.items()}


def layer_name(canonical: str, framework: str) -> str:
    """A layer's name in ``framework``: dotted for torch and nnx, slashed for Keras and linen.

    Example:
        >>> layer_name("features.relu4", "keras")
        'features/relu4'
    """
    if framework not in FRAMEWORKS:
        raise KeyError(f"unknown framework {framework!r}; known: {FRAMEWORKS}")
    return canonical if framework in ("torch", "nnx") else canonical.replace(".", "/")


def build(
    arch: str | Architecture, framework: str, weights: dict[str, np.ndarray] | None = None
) -> Any:
    """Build ``arch`` in ``framework`` with ``weights`` (default: ``init_weights(arch)``).

    Args:
        arch: an :class:`Architecture` or the name of one (a key of :data:`ARCHITECTURES`,
            :data:`SEGMENTATION_ARCHITECTURES`, :data:`TRANSFORMER_ARCHITECTURES` or
            :data:`BENCHMARK_ARCHITECTURES`).
        framework: ``"torch"`` (an ``nn.Module`` in eval mode), ``"keras"`` (a Keras 3
            model), ``"flax"`` (a ``(linen_module, variables)`` pair) or ``"nnx"`` (an
            ``nnx.Module`` in eval mode).
        weights: a dict from :func:`init_weights` or of the same structure.
    """
    architecture = _architecture(arch)
    if weights is None:
        weights = init_weights(architecture)
    if framework not in FRAMEWORKS:
        raise KeyError(f"unknown framework {framework!r}; known: {FRAMEWORKS}")
    module_name = {"torch": "torch", "keras": "keras", "flax": "flax", "nnx": "flax"}[framework]
    builder = importlib.import_module(f"multicam.zoo.{module_name}")
    return (
        builder.build(architecture, weights, nnx=framework == "nnx")
        if module_name == "flax"
        else builder.build(architecture, weights)
    )


_NEEDS = {
    "torch": ("torch",),
    "keras": ("tensorflow", "keras"),
    "flax": ("flax",),
    "nnx": ("flax",),
}


def installed_frameworks() -> list[str]:
    """The :data:`FRAMEWORKS` whose packages are installed, found without importing them."""
    return [
        name
        for name, modules in _NEEDS.items()
        if all(importlib.util.find_spec(module) is not None for module in modules)
    ]


def explainer(
    arch: str | Architecture,
    framework: str,
    layer: str,
    weights: dict[str, np.ndarray] | None = None,
    method: type | None = None,
    **options: Any,
) -> Any:
    """``arch`` built in ``framework`` and bound to the canonical ``layer``.

    Args:
        arch: an architecture or its name.
        framework: one of :data:`FRAMEWORKS`.
        layer: a canonical dotted layer name, e.g. ``"features.relu4"``.
        weights: as for :func:`build`.
        method: the explainer class, default :class:`multicam.GradCAM`.
        **options: passed to the explainer, e.g. ``reshape=(4, 4)`` for a transformer's
            token layer.

    Returns:
        The explainer, e.g. a ``GradCAM``; call it with a batch in ``framework``'s layout.
    """
    from ..cam import GradCAM

    model = build(arch, framework, weights)
    if framework == "flax":
        model, options["variables"] = model
    return (method or GradCAM)(model, layer_name(layer, framework), **options)


def native_layout(framework: str) -> str:
    """The input layout of ``framework``'s zoo models: channels-first for torch only."""
    return "channels_first" if framework == "torch" else "channels_last"


def example_input(
    arch: str | Architecture, batch_size: int = 2, seed: int = 0, layout: str = "channels_last"
) -> np.ndarray:
    """A reproducible float32 input batch for ``arch``, ``(N, *S, C)`` or ``(N, C, *S)``."""
    architecture = _architecture(arch)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch_size, *architecture.input_shape)).astype(np.float32)
    return np.moveaxis(x, -1, 1) if layout == "channels_first" else x
