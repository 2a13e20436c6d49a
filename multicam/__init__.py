"""multicam: Grad-CAM and its relatives with one API for PyTorch, TensorFlow/Keras and JAX.

``import multicam`` imports no deep-learning framework; a backend is loaded when a model
of its framework is explained.

Example:
    >>> import multicam as mc  # doctest: +SKIP
    >>> res = mc.GradCAM(model, layer="features.7")(x, targets=4)  # doctest: +SKIP
    >>> res.maps.shape  # (N, T, H, W)  # doctest: +SKIP
"""

from __future__ import annotations

from . import algebra, errors, metrics, zoo
from .cam import (
    CAM,
    CAMResult,
    EigenCAM,
    FusedResult,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    MultiLayerCAM,
    TokenGrid,
    XGradCAM,
)
from .dataset import DatasetResult, explain_dataset
from .errors import (
    BackendError,
    BackendNotInstalledError,
    InputError,
    LayerError,
    MulticamError,
    NonFiniteError,
    OptionError,
    TargetError,
    UnsupportedModelError,
)
from .evaluate import Evaluation, EvaluationRow, evaluate
from .guided import GuidedBackprop, GuidedGradCAM
from .methods import (
    FEM,
    ISCAM,
    KPCACAM,
    SESS,
    SSCAM,
    ClassActivationMap,
    ConceptResult,
    DeepFeatureFactorization,
    EigenGradCAM,
    FinerCAM,
    FullGrad,
    LeGrad,
    RandomCAM,
    RefineCAM,
    ShapleyCAM,
    SmoothGradCAMPlusPlus,
    SobelCAM,
)
from .perturbation import AblationCAM, ScoreCAM
from .targets import Region, Targets

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "FEM",
    "ISCAM",
    "KPCACAM",
    "SESS",
    "SSCAM",
    "ClassActivationMap",
    "ConceptResult",
    "DeepFeatureFactorization",
    "EigenGradCAM",
    "FinerCAM",
    "FullGrad",
    "LeGrad",
    "RandomCAM",
    "RefineCAM",
    "ShapleyCAM",
    "SmoothGradCAMPlusPlus",
    "SobelCAM",
    "AblationCAM",
    "BackendError",
    "BackendNotInstalledError",
    "CAMResult",
    "EigenCAM",
    "FusedResult",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "MultiLayerCAM",
    "XGradCAM",
    "InputError",
    "LayerError",
    "MulticamError",
    "NonFiniteError",
    "OptionError",
    "Region",
    "ScoreCAM",
    "TargetError",
    "Targets",
    "TokenGrid",
    "UnsupportedModelError",
    "DatasetResult",
    "Evaluation",
    "EvaluationRow",
    "__version__",
    "algebra",
    "errors",
    "evaluate",
    "explain_dataset",
    "metrics",
    "zoo",
]
