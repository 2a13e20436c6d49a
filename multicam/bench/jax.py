"""JAX/Flax contenders: jitted forward and floor, multicam, with and without jit.

- ``forward``: ``jax.jit(module.apply)``;
- ``floor`` (the denominator): in one ``jax.jit``, the features half, then ``jax.vjp`` of
  the head and ``jax.vmap`` of the VJP over the T one-hot cotangents;
- ``multicam``: ``GradCAM(module, layer, variables=...)(x, targets=classes)``;
  ``multicam-backend`` (beside it): the backend's ``gradients`` alone, without the NumPy
  stage.

As framework ``flax-nojit`` every contender runs under ``jax.disable_jit()`` (a debugging
mode; kept to show what jit buys). Results are made concrete (``block_until_ready``) and the
floor hands its activations and gradients back as NumPy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import zoo
from .contenders import Case, Contenders, backend_only

__all__ = ["CONTENDERS", "FlaxContenders"]


class FlaxContenders(Contenders):
    """Flax linen, with ``jit=True`` (framework ``flax``) or without (``flax-nojit``)."""

    def __init__(
        self, arch: str, weights: dict[str, np.ndarray], layer: str, jit: bool = True
    ) -> None:
        super().__init__(arch, weights, layer)
        import jax
        import jax.numpy as jnp

        from ..cam import GradCAM

        self.jax, self.jit = jax, jit
        self.name = "flax" if jit else "flax-nojit"
        self.module, self.variables = zoo.build(self.arch, "flax", weights)
        features, self._features_variables = zoo.build(self.features_arch, "flax", weights)
        head, self._head_variables = zoo.build(self.head_arch, "flax", weights)
        self.explainer = GradCAM(
            self.module, zoo.layer_name(layer, "flax"), variables=self.variables
        )

        def forward(variables: Any, x: Any) -> Any:
            return self.module.apply(variables, x)

        def floor(features_variables: Any, head_variables: Any, x: Any, cls: Any) -> Any:
            a = features.apply(features_variables, x)
            outputs, vjp = jax.vjp(lambda a: head.apply(head_variables, a), a)
            cotangents = jax.nn.one_hot(cls.T, outputs.shape[1], dtype=outputs.dtype)
            (grads,) = jax.vmap(vjp)(cotangents)
            return a, jnp.moveaxis(grads, 0, 1)

        self._forward = jax.jit(forward) if jit else forward
        self._floor = jax.jit(floor) if jit else floor

    def trace_count(self) -> int | None:
        return int(getattr(self.explainer.bound, "trace_count", -1)) if self.jit else None

    def explain(self, x: np.ndarray, classes: np.ndarray) -> Any:
        return self.explainer(x, targets=classes, warn=False)

    def case(self, x: np.ndarray, classes: np.ndarray, peers: bool) -> Case:
        jax = self.jax
        xj = jax.device_put(x)
        cls = jax.device_put(classes.astype(np.int32))

        def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
            if self.jit:
                return lambda: jax.block_until_ready(fn())

            def eager() -> Any:
                with jax.disable_jit():
                    return jax.block_until_ready(fn())

            return eager

        def floor() -> Any:
            a, grads = self._floor(self._features_variables, self._head_variables, xj, cls)
            return np.asarray(a), np.asarray(grads)

        return {
            "forward": ("forward", wrap(lambda: self._forward(self.variables, xj))),
            "floor": ("floor", wrap(floor)),
            "multicam": (
                "multicam",
                wrap(lambda: self.explainer(x, targets=classes, warn=False)),
            ),
            "multicam-backend": (
                "multicam-extra",
                wrap(backend_only(self.explainer, x, classes)),
            ),
        }


CONTENDERS = FlaxContenders
