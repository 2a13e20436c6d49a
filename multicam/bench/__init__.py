"""The benchmark suite behind ``multicam bench``: multicam against its floors and its peers.

For every network, framework, batch size N and number of targets T, the contenders are
timed side by side in one process, interleaved (one call of each in turn, in a fresh
random order every round), after one warm-up call each that is excluded from the timings
and reported on its own (tracing, compilation, caches):

- ``forward``: a plain inference forward of the whole network;
- ``floor``: the framework's fastest hand-written Grad-CAM core, the denominator of every
  ratio: the forward to the layer, then the head under autograd and one batched
  vector-Jacobian product back to the layer, T targets at once (the network is rebuilt
  from the zoo spec as two halves sharing its weights), activations and gradients handed
  back as NumPy. TensorFlow's is one ``tf.function``, JAX's one ``jax.jit``, torch's is
  eager; ``floor-loop`` (one backward per target) counts too where it is faster;
- beside the floor: TensorFlow's eager floors and torch's ``torch.compile`` floor;
- ``multicam``: ``GradCAM(model, layer)(x, targets=(N, T) classes)``, maps resized to the
  input and normalised, i.e. everything a user gets (and TensorFlow's ``compile=False``);
- peers, where importable: Captum ``LayerGradCam``, pytorch-grad-cam ``GradCAM``, torchcam
  ``GradCAM``, tf-keras-vis ``Gradcam`` and the Keras example's recipe; a peer explains one
  class per call, so T maps cost it T calls.

After each case, where multicam compiles (TensorFlow, JAX), one call with other classes at
the same shapes counts the traces it adds. The NumPy stage (pooling, weighted sum, ReLU,
resize, normalise) is timed alone. Results: a Markdown table, a JSON file and a plot, with
the machine, versions and settings.

One module per part: :mod:`.timing` (interleaved timing, peak memory), :mod:`.nets` (the
networks and their halves), :mod:`.contenders` (what the frameworks' contenders share),
:mod:`.torch`, :mod:`.tensorflow` and :mod:`.jax` (each framework's contenders),
:mod:`.stage` (the NumPy stage alone), :mod:`.suite` (the run and the command),
:mod:`.goals` (issue 13's targets) and :mod:`.report` (Markdown, text, JSON, plot).

No time is ever asserted here; ``tests/test_benchmarks.py`` only checks that a tiny
configuration runs.
"""

from __future__ import annotations

from .contenders import available_frameworks
from .goals import evaluate
from .nets import classes, gap64, split
from .report import markdown, plot, text, write
from .suite import main, run
from .timing import Timing, time_interleaved

__all__ = [
    "Timing",
    "available_frameworks",
    "classes",
    "evaluate",
    "gap64",
    "main",
    "markdown",
    "plot",
    "run",
    "split",
    "text",
    "time_interleaved",
    "write",
]
