"""Keras (TensorFlow) contenders: compiled and eager forwards and floors, multicam, peers.

- ``forward``: ``model(x, training=False)`` in a ``tf.function``; ``forward-eager``
  (beside it) without;
- ``floor`` (the denominator): in one ``tf.function``, the features half, then the head
  under a ``GradientTape`` and ``batch_jacobian`` (pfor) back to the layer for T > 1;
  ``floor-loop``: the same with one ``tape.gradient`` per target (unrolled in the graph);
  the faster of the two counts. This is the form a Keras user writes for speed;
- ``floor-eager``, ``floor-eager-loop`` (beside it): the same without ``tf.function``;
- ``multicam``: ``GradCAM(model, layer)(x, targets=classes)`` (the compiled path);
  beside it ``multicam-eager`` (``compile=False``) and ``multicam-backend`` (the backend's
  ``gradients`` alone, without the NumPy stage);
- peers: the keras.io Grad-CAM recipe (eager, one class per call, as written there) and
  tf-keras-vis ``Gradcam`` where it can rebuild the model.

Every floor hands its activations and gradients back as NumPy (``.numpy()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import zoo
from .contenders import Case, Contenders, backend_only

__all__ = ["CONTENDERS", "KerasContenders"]


class KerasContenders(Contenders):
    """Keras 3 on TensorFlow; channels-last input."""

    name = "keras"

    def __init__(self, arch: str, weights: dict[str, np.ndarray], layer: str) -> None:
        super().__init__(arch, weights, layer)
        import keras
        import tensorflow as tf

        from ..cam import GradCAM

        self.tf, self.keras = tf, keras
        self.model = zoo.build(self.arch, "keras", weights)
        self.features = zoo.build(self.features_arch, "keras", weights)
        self.head = zoo.build(self.head_arch, "keras", weights)
        name = zoo.layer_name(layer, "keras")
        self.explainer = GradCAM(self.model, name)
        self.eager_explainer = GradCAM(self.model, name, compile=False)
        self.top = layer.split(".")[0]
        self._forward = tf.function(lambda x: self.model(x, training=False), autograph=False)
        # One tf.function per floor form; TensorFlow traces each per input and T shape.
        self._floors = {
            batched: tf.function(self._floor_graph(batched), autograph=False)
            for batched in (True, False)
        }

    def trace_count(self) -> int | None:
        return int(getattr(self.explainer.bound, "trace_count", -1))

    def explain(self, x: np.ndarray, classes: np.ndarray) -> Any:
        return self.explainer(x, targets=classes, warn=False)

    def _floor_graph(self, batched: bool) -> Callable[[Any, Any], tuple[Any, Any]]:
        tf = self.tf

        def floor(x: Any, index: Any) -> tuple[Any, Any]:
            t = index.shape[1]
            a = self.features(x, training=False)
            with tf.GradientTape(persistent=t > 1, watch_accessed_variables=False) as tape:
                tape.watch(a)
                scores = tf.gather(self.head(a, training=False), index, axis=1, batch_dims=1)
                columns = tf.unstack(scores, axis=1) if (t > 1 and not batched) else []
            if t == 1:
                return a, tape.gradient(scores, a)[:, None]
            if batched:
                return a, tape.batch_jacobian(scores, a, experimental_use_pfor=True)
            return a, tf.stack([tape.gradient(column, a) for column in columns], axis=1)

        return floor

    def case(self, x: np.ndarray, classes: np.ndarray, peers: bool) -> Case:
        tf = self.tf
        t = classes.shape[1]
        xt = tf.convert_to_tensor(x)
        index = tf.convert_to_tensor(classes)
        eager_floors = {batched: self._floor_graph(batched) for batched in (True, False)}

        def numpy(floor: Callable[[Any, Any], tuple[Any, Any]]) -> Callable[[], Any]:
            return lambda: tuple(tensor.numpy() for tensor in floor(xt, index))

        out: Case = {
            "forward": ("forward", lambda: self._forward(xt).numpy()),
            "forward-eager": ("forward-extra", lambda: self.model(xt, training=False).numpy()),
            "floor": ("floor", numpy(self._floors[True])),
            "floor-eager": ("floor-extra", numpy(eager_floors[True])),
            "multicam": ("multicam", lambda: self.explainer(x, targets=classes, warn=False)),
            "multicam-backend": ("multicam-extra", backend_only(self.explainer, x, classes)),
            "multicam-eager": (
                "multicam-extra",
                lambda: self.eager_explainer(x, targets=classes, warn=False),
            ),
        }
        if t > 1:
            out["floor-loop"] = ("floor", numpy(self._floors[False]))
            out["floor-eager-loop"] = ("floor-extra", numpy(eager_floors[False]))
        if peers:
            out.update(self._peer_contenders(x, classes))
        return out

    def _peer_contenders(self, x: np.ndarray, classes: np.ndarray) -> Case:
        tf, keras = self.tf, self.keras
        out: Case = {}
        columns = [classes[:, i] for i in range(classes.shape[1])]
        size = tuple(x.shape[1:-1])
        grad_model = keras.Model(
            self.model.inputs, [self.model.get_layer(self.top).output, self.model.output]
        )

        def run_recipe() -> Any:
            # keras.io "Grad-CAM class activation visualization", batched over samples.
            maps = []
            for column in columns:
                with tf.GradientTape() as tape:
                    conv, preds = grad_model(x)
                    class_channel = tf.gather(preds, column, axis=1, batch_dims=1)
                grads = tape.gradient(class_channel, conv)
                pooled = tf.reduce_mean(grads, axis=(1, 2))
                heatmap = tf.einsum("nhwk,nk->nhw", conv, pooled)
                heatmap = tf.maximum(heatmap, 0) / tf.reduce_max(
                    heatmap, axis=(1, 2), keepdims=True
                )
                maps.append(tf.image.resize(heatmap[..., None], size).numpy())
            return maps

        out["keras-recipe"] = ("peer", run_recipe)
        try:
            from tf_keras_vis.gradcam import Gradcam  # type: ignore[import-not-found,unused-ignore]
            from tf_keras_vis.utils.scores import CategoricalScore  # type: ignore[import-not-found,unused-ignore]

            gradcam = Gradcam(self.model, clone=True)

            def run_vis() -> Any:
                return [
                    gradcam(CategoricalScore(column.tolist()), x, penultimate_layer=self.top)
                    for column in columns
                ]

            out["tf-keras-vis"] = ("peer", run_vis)
        except Exception as exc:  # ImportError, or a Keras 3 incompatibility
            self.skipped["tf-keras-vis"] = f"{type(exc).__name__}: {exc}"[:300]
        return out


CONTENDERS = KerasContenders
