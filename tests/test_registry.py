"""Backend discovery: no framework imported by multicam itself, detection, plugins."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from typing import Any

import numpy as np
import pytest

import multicam as mc
from multicam import backends
from multicam.backends import Backend, BoundModel

FRAMEWORK_MODULES = ("torch", "tensorflow", "keras", "jax", "flax")


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_import_multicam_imports_no_framework() -> None:
    loaded = _run(
        f"""
        import sys, multicam, multicam.testing, multicam.zoo, multicam.backends
        print(sorted(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))
        """
    )
    assert loaded == "[]"


def test_detecting_a_torch_model_imports_no_other_framework() -> None:
    pytest.importorskip("torch")
    loaded = _run(
        f"""
        import sys, torch, multicam
        cam = multicam.GradCAM(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), "0")
        print(cam.backend, sorted(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))
        """
    )
    assert loaded == "torch ['torch']"


def test_missing_framework_names_the_extra() -> None:
    message = _run(
        """
        import sys
        sys.modules["jax"] = None  # make "import jax" fail as if it were not installed
        import multicam
        try:
            multicam.GradCAM(object(), "x", backend="jax")
        except multicam.BackendNotInstalledError as exc:
            print(exc)
        """
    )
    assert "pip install 'multicam-xai[jax]'" in message


def test_unsupported_model_lists_what_is_supported() -> None:
    with pytest.raises(mc.UnsupportedModelError, match=r"torch\.nn\.Module.*Keras 3.*Flax"):
        mc.GradCAM(object(), "layer")


def test_unknown_backend_name() -> None:
    with pytest.raises(mc.BackendError, match="no backend is called 'mxnet'"):
        mc.GradCAM(object(), "layer", backend="mxnet")


class ToyModel:
    """A "framework" whose models are plain objects, explained by ToyBackend."""


class ToyBound(BoundModel):
    backend = "toy"
    layout = "channels_first"
    layer_name = "only"

    def gradients(self, inputs: Any, targets: mc.Targets) -> backends.LayerGradients:
        x = np.asarray(inputs, np.float32)
        classes = targets.class_ids((x.shape[0], 2), np.zeros((x.shape[0], 2)))
        grads = np.ones((x.shape[0], classes.shape[1], *x.shape[1:]), np.float32)
        return backends.make_layer_gradients(
            x,
            grads,
            np.zeros(classes.shape),
            classes,
            layout="channels_first",
            input_shape=x.shape,
            layer_name="only",
        )


class ToyBackend(Backend):
    name = "toy"
    extra = "toy"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return isinstance(model, ToyModel)

    def bind(self, model: Any, layer: Any, **options: Any) -> BoundModel:
        return ToyBound()


class _EntryPoint:
    def __init__(self, name: str, target: Any) -> None:
        self.name, self._target = name, target

    def load(self) -> Any:
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def test_third_party_backend_through_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        backends,
        "_plugins",
        {
            "broken": _EntryPoint("broken", ImportError("no module named x")),
            "toy": _EntryPoint("toy", ToyBackend),
        },
    )
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_by_type", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = mc.GradCAM(ToyModel(), "only")(np.ones((2, 3, 4, 4)), targets=1)
    assert res.backend == "toy" and res.maps.shape == (2, 1, 4, 4)
    assert any("broken" in str(w.message) for w in caught)
    assert "toy" in backends.available_backends()
