"""Real-world targets: segmentation regions, several outputs, transformer token grids."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import available_frameworks, native_input

import multicam as mc
from multicam import zoo
from multicam.testing import assert_results_agree
from multicam.zoo import numpy as zoo_numpy

MASK = np.zeros((10, 10), bool)
MASK[2:5, 3:7] = True


def _seg(framework: str, targets: object, **call: object) -> mc.CAMResult:
    weights = zoo.init_weights("seg_fcn", 0)
    explainer = zoo.explainer("seg_fcn", framework, "features.relu2", weights)
    x = native_input(framework, zoo.example_input("seg_fcn", 2, seed=1))
    return explainer(x, targets=targets, warn=False, **call)


def test_region_scores_are_masked_sums_on_every_backend(framework: str) -> None:
    per_sample = np.stack([MASK, ~MASK])
    res = _seg(framework, [mc.Region(1, MASK), mc.Region(2, per_sample.astype(np.float32))])
    logits, _ = zoo_numpy.forward(
        "seg_fcn", zoo.init_weights("seg_fcn", 0), zoo.example_input("seg_fcn", 2, seed=1)
    )  # (N, H, W, C)
    expected = np.stack(
        [(logits[..., 1] * MASK).sum((1, 2)), (logits[..., 2] * per_sample).sum((1, 2))], 1
    )
    np.testing.assert_allclose(res.scores, expected, rtol=1e-5, atol=1e-5)
    assert res.targets.tolist() == [[1, 2], [1, 2]]  # type: ignore[union-attr]


def test_regions_agree_across_backends() -> None:
    results = {f: _seg(f, mc.Region(0, MASK)) for f in available_frameworks()}
    assert_results_agree(results)


def test_region_errors_name_both_shapes(framework: str) -> None:
    with pytest.raises(mc.TargetError, match=r"mask has shape \(4, 4\).*spatial shape \(10, 10\)"):
        _seg(framework, mc.Region(1, np.ones((4, 4), bool)))
    with pytest.raises(mc.TargetError, match="Region class 7 is out of range"):
        _seg(framework, mc.Region(7, MASK))
    with pytest.raises(mc.TargetError, match="output map"):
        explainer = zoo.explainer("gap_cnn", framework, "features.relu2")
        explainer(native_input(framework, zoo.example_input("gap_cnn", 1)), mc.Region(0, MASK))


def test_class_targets_on_a_map_output_point_to_region(framework: str) -> None:
    with pytest.raises(mc.TargetError, match=r"mc\.Region"):
        _seg(framework, 1)


torch = pytest.importorskip("torch")


class TwoHeads(torch.nn.Module):
    """A torch model returning a dict of two class-score outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.main = torch.nn.Linear(4, 3)
        self.aux = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.relu(self.conv(x)).mean((2, 3))
        return {"main": self.main(pooled), "aux": self.aux(pooled)}


def test_several_outputs_choose_one_by_key() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    model = TwoHeads().eval()
    aux = mc.GradCAM(model, "relu", output="aux")(x, targets=1, warn=False)
    with torch.no_grad():
        expected = model(torch.from_numpy(x))["aux"][:, 1].numpy()
    np.testing.assert_allclose(aux.scores[:, 0], expected, rtol=1e-6)
    with pytest.raises(mc.TargetError, match=r"2 outputs .*\['main', 'aux'\].*output="):
        mc.GradCAM(model, "relu")(x, targets=1)
    with pytest.raises(mc.TargetError, match=r"output='seg' is not one of"):
        mc.GradCAM(model, "relu", output="seg")(x, targets=1)


def test_several_outputs_by_index_on_keras_and_flax() -> None:
    weights = zoo.init_weights("gap_cnn", 0)
    x = zoo.example_input("gap_cnn", 2)
    reference = zoo.explainer("gap_cnn", "torch", "features.relu2", weights)(
        np.moveaxis(x, -1, 1), targets=2, warn=False
    )
    if "keras" in available_frameworks():
        import keras

        inner = zoo.build("gap_cnn", "keras", weights)
        outputs = inner(inner.inputs[0])
        twice = keras.Model(inner.inputs, [outputs * 2.0, outputs])
        res = mc.GradCAM(twice, "gap_cnn/features/relu2", output=1)(x, targets=2, warn=False)
        assert_results_agree({"torch": reference, "keras": res})
    if "flax" in available_frameworks():
        import jax.numpy as jnp

        module, variables = zoo.build("gap_cnn", "flax", weights)

        def features(x: object) -> object:
            return jnp.asarray(x)  # the "layer" is the input itself: (N, H, W, C)

        def head(a: object) -> tuple[object, object]:
            logits = module.apply(variables, a)
            return logits * 2, logits

        res = mc.GradCAM((features, head), None, backend="jax", output=1)(x, 2, warn=False)
        np.testing.assert_allclose(res.scores, reference.scores, rtol=1e-5)


class TinyViT(torch.nn.Module):
    """Patchify -> [class token; patch tokens] -> per-token MLP block -> mean -> head."""

    def __init__(self, class_token: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.patchify = torch.nn.Conv2d(3, 6, 2, stride=2)
        self.class_token = torch.nn.Parameter(torch.randn(1, 1, 6)) if class_token else None
        self.block = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU())
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patchify(x).flatten(2).transpose(1, 2)  # (N, 16, 6)
        if self.class_token is not None:
            tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], 1)
        return self.head(self.block(tokens).mean(1))


@pytest.mark.parametrize("class_token", [False, True])
def test_token_sequences_become_grids(class_token: bool) -> None:
    model = TinyViT(class_token).eval()
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    res = mc.GradCAM(model, "block", reshape=(4, 4))(x, targets=[1, 3], warn=False)
    assert res.raw.shape == (2, 1, 4, 4) and res.maps.shape == (2, 1, 8, 8)
    # By hand: tokens (N, L, D) -> drop the class token -> (N, D, 4, 4) grids.
    captured = {}
    handle = model.block.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    tokens = torch.from_numpy(x)
    out = model(tokens)
    handle.remove()
    a = captured["a"]
    (g,) = torch.autograd.grad(out[[0, 1], [1, 3]].sum(), a)
    a, g = a.detach().numpy()[:, int(class_token) :], g.numpy()[:, int(class_token) :]
    expected = np.einsum("nd,nld->nl", g.mean(1), a).reshape(2, 4, 4)
    np.testing.assert_allclose(res.raw[:, 0], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(mc.OptionError, match="do not form a"):
        mc.GradCAM(model, "block", reshape=(3, 3))(x, targets=1)
    explicit = mc.GradCAM(model, "block", reshape=mc.TokenGrid((4, 4), int(class_token)))
    np.testing.assert_allclose(explicit(x, targets=[1, 3], warn=False).raw, res.raw)


def test_token_grid_on_a_channels_last_backend() -> None:
    """A JAX (features, head) pair whose layer is a token sequence (N, 1 + 9, D)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(3)
    embed, head_w = rng.normal(size=(12, 5)), rng.normal(size=(5, 3))
    class_token = rng.normal(size=(1, 1, 5))

    def features(x: object) -> object:  # (N, 6, 6, 3) -> 3x3 patches of 2x2x3 -> tokens
        patches = jnp.reshape(x, (-1, 3, 2, 3, 2, 3)).transpose(0, 1, 3, 2, 4, 5)
        tokens = jnp.tanh(patches.reshape(-1, 9, 12) @ embed)
        return jnp.concatenate([jnp.broadcast_to(class_token, (tokens.shape[0], 1, 5)), tokens], 1)

    def head(tokens: object) -> object:
        return tokens.mean(1) @ head_w  # type: ignore[attr-defined]

    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    res = mc.GradCAM((features, head), None, backend="jax", reshape=(3, 3))(
        x, targets=[0, 2], warn=False, size=None
    )
    tokens = np.asarray(features(x))
    _, vjp = jax.vjp(head, jnp.asarray(tokens))
    (grads,) = vjp(jnp.asarray(np.eye(3, dtype=np.float32)[[0, 2]]))
    grads = np.asarray(grads)[:, 1:]
    expected = np.einsum("nd,nld->nl", grads.mean(1), tokens[:, 1:]).reshape(2, 3, 3)
    np.testing.assert_allclose(res.raw[:, 0], expected, rtol=1e-5, atol=1e-6)
