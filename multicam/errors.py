"""multicam's exception hierarchy.

Every error multicam raises on purpose derives from :class:`MulticamError`, so callers can
catch them all at once. Each message says what was wrong, what was expected, and how to fix
it. Several classes also derive from the built-in exception a Python user would expect
(``ValueError``, ``ImportError``, ``TypeError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "BackendError",
    "BackendNotInstalledError",
    "GuidedWarning",
    "InputError",
    "LayerError",
    "LayoutWarning",
    "MulticamError",
    "MulticamWarning",
    "NonFiniteError",
    "OptionError",
    "TargetError",
    "TrainingModeWarning",
    "UnsupportedModelError",
]


class MulticamError(Exception):
    """Base class of every error multicam raises on purpose."""


class BackendError(MulticamError):
    """A backend cannot be chosen, loaded, or lacks a needed capability."""


class BackendNotInstalledError(BackendError, ImportError):
    """The framework a backend needs is not installed."""


class UnsupportedModelError(BackendError, TypeError):
    """No backend knows how to explain this kind of model."""


class LayerError(MulticamError, ValueError):
    """The chosen layer does not exist, is ambiguous, or has no spatial output."""


class TargetError(MulticamError, ValueError):
    """The targets do not fit the batch or the model's outputs."""


class InputError(MulticamError, ValueError):
    """The input batch has the wrong rank, layout, size or dtype."""


class OptionError(MulticamError, ValueError):
    """An option of a call has a value multicam does not understand."""


class NonFiniteError(MulticamError, FloatingPointError):
    """NaN or Inf appeared in the input, the activations, the gradients or the scores."""


class MulticamWarning(UserWarning):
    """Base class of every warning multicam issues; ``warn=False`` on a call silences them."""


class TrainingModeWarning(MulticamWarning):
    """The model was left in training mode; multicam explained it in inference mode."""


class LayoutWarning(MulticamWarning):
    """multicam guessed where a layer's channel axis is; pass ``layer_layout=`` to state it."""


class GuidedWarning(MulticamWarning):
    """Guided backpropagation found nonlinearities it cannot guide (SiLU, GELU, ...)."""


def nearest_names(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """Format the candidates closest to ``name`` for an error message."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.3)
    if not close:
        close = candidates[:n]
    more = "" if len(candidates) <= len(close) else f" (of {len(candidates)})"
    return ", ".join(repr(c) for c in close) + more
