"""Backend registry: find the backend for a model, or load one by name.

Built-in backends are listed as dotted paths and imported only when needed; a model's
backend is found without importing any framework the user has not imported (a model of an
unimported framework cannot exist). Third-party backends register a :class:`Backend`
subclass under the ``multicam.backends`` entry-point group; they are loaded lazily, and a
broken plugin is a warning, not a crash.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from ..errors import BackendError, BackendNotInstalledError, UnsupportedModelError
from .base import Backend, BoundModel, LayerGradients, Layout, make_layer_gradients

__all__ = [
    "Backend",
    "BoundModel",
    "LayerGradients",
    "Layout",
    "available_backends",
    "backend_for",
    "get_backend",
    "resolve_backend",
    "make_layer_gradients",
]

ENTRY_POINT_GROUP = "multicam.backends"


@dataclass(frozen=True)
class _Builtin:
    path: str  # "module:Class"
    extra: str
    frameworks: tuple[str, ...]  # sys.modules keys: a model can be ours only if one is there
    needs: str  # what to install, for messages


_BUILTINS: dict[str, _Builtin] = {
    "torch": _Builtin("multicam.backends.torch:TorchBackend", "torch", ("torch",), "torch"),
    "tensorflow": _Builtin(
        "multicam.backends.tensorflow:TensorFlowBackend",
        "tensorflow",
        ("keras", "tensorflow"),
        "tensorflow (Keras 3)",
    ),
    "jax": _Builtin("multicam.backends.jax:JaxBackend", "jax", ("jax", "flax"), "jax and flax"),
}
_ALIASES = {"pytorch": "torch", "tf": "tensorflow", "keras": "tensorflow", "flax": "jax"}

_loaded: dict[str, Backend] = {}
_by_type: dict[type, str] = {}
_plugins: dict[str, Any] | None = None


class MulticamPluginWarning(UserWarning):
    """A third-party backend registered under ``multicam.backends`` failed to load."""


def _plugin_entry_points() -> dict[str, Any]:
    global _plugins
    if _plugins is None:
        _plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _plugins


def _known_names() -> list[str]:
    return sorted(set(_BUILTINS) | set(_plugin_entry_points()))


def get_backend(name: str) -> Backend:
    """Load the backend registered as ``name`` (aliases: pytorch, tf, keras, flax).

    Raises:
        BackendNotInstalledError: its framework is not installed (names the extra).
        BackendError: no backend has that name.
    """
    name = _ALIASES.get(name, name)
    if name in _loaded:
        return _loaded[name]
    if name in _BUILTINS:
        builtin = _BUILTINS[name]
        module_name, class_name = builtin.path.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendNotInstalledError(
                f"the {name!r} backend needs {builtin.needs}, which could not be imported "
                f"({exc}). Install it with: pip install 'multicam-xai[{builtin.extra}]'"
            ) from exc
        backend_cls = getattr(module, class_name)
    elif name in _plugin_entry_points():
        try:
            backend_cls = _plugin_entry_points()[name].load()
        except Exception as exc:
            raise BackendError(
                f"the third-party backend {name!r} (entry point group {ENTRY_POINT_GROUP!r}) "
                f"failed to load: {exc!r}. Reinstall or update the package that provides it."
            ) from exc
    else:
        raise BackendError(
            f"no backend is called {name!r}; known backends: {', '.join(_known_names())}."
        )
    backend = backend_cls()
    _loaded[name] = backend
    return backend


def backend_for(model: Any) -> Backend:
    """Find the backend for ``model`` from its type, importing no new framework.

    Raises:
        UnsupportedModelError: no built-in or registered backend accepts the model.
    """
    name = _by_type.get(type(model))
    if name is not None:
        return get_backend(name)
    for name, builtin in _BUILTINS.items():
        if not any(module in sys.modules for module in builtin.frameworks):
            continue
        try:
            backend = get_backend(name)
        except BackendNotInstalledError:
            continue
        if backend.accepts(model):
            _by_type[type(model)] = name
            return backend
    for name in _plugin_entry_points():
        try:
            backend = get_backend(name)
        except BackendError as exc:
            warnings.warn(str(exc), MulticamPluginWarning, stacklevel=2)
            continue
        if backend.accepts(model):
            _by_type[type(model)] = name
            return backend
    raise UnsupportedModelError(
        f"no backend recognises a model of type {type(model).__module__}."
        f"{type(model).__qualname__}. Supported: torch.nn.Module (backend 'torch'), Keras 3 "
        "models on TensorFlow (backend 'tensorflow'), Flax linen and nnx modules, and a "
        "(features, head) pair of JAX functions with backend='jax' (backend 'jax'). "
        "Pass backend=... to choose one explicitly, or register a third-party backend "
        f"under the {ENTRY_POINT_GROUP!r} entry-point group."
    )


def resolve_backend(model: Any, backend: str | Backend | None) -> Backend:
    """The backend an explainer uses.

    Detected from ``model`` when ``backend`` is ``None``, looked up by name when it is a
    string, or the given :class:`Backend` itself.
    """
    if backend is None:
        return backend_for(model)
    if isinstance(backend, str):
        return get_backend(backend)
    return backend


def available_backends() -> list[str]:
    """The built-in and registered backends whose frameworks can be imported here."""
    names = []
    for name in _known_names():
        try:
            get_backend(name)
        except BackendError:
            continue
        names.append(name)
    return names
