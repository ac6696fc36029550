"""pf-lightning: Hessian eigenpairs, edge-of-stability and principal-flow diagnostics for Lightning."""

from .callbacks import EdgeOfStabilityMonitor, HessianEigenMonitor, LRAdaptation
from .curvature import HessianOperator, NonFiniteLossError, ParameterSpace, PreconditionedOperator
from .curvature.distributed import CollectiveFailure, MeasurementAborted
from .curvature.drift import GradientCurvature, gradient_curvature
from .curvature.groups import parameter_groups
from .curvature.state import is_measuring
from .linalg import EigenResult, NonConvergenceWarning, NonFiniteOperatorError
from .measure import (
    BatchSharpness,
    CriticalSharpness,
    batch_sharpness,
    critical_sharpness,
    eigenvalue_stderr,
    hessian_density,
    hessian_eigenpairs,
    hessian_trace,
    output_loss,
)
from .probe import ProbeSet
from .schedulers import DriftAdaptiveLR, SharpnessCappedLR

__version__ = "0.1.0.dev0"

__all__ = [
    "BatchSharpness",
    "CollectiveFailure",
    "CriticalSharpness",
    "DriftAdaptiveLR",
    "EdgeOfStabilityMonitor",
    "EigenResult",
    "GradientCurvature",
    "HessianEigenMonitor",
    "HessianOperator",
    "LRAdaptation",
    "MeasurementAborted",
    "NonConvergenceWarning",
    "NonFiniteLossError",
    "NonFiniteOperatorError",
    "ParameterSpace",
    "PreconditionedOperator",
    "ProbeSet",
    "SharpnessCappedLR",
    "__version__",
    "batch_sharpness",
    "critical_sharpness",
    "eigenvalue_stderr",
    "gradient_curvature",
    "hessian_density",
    "hessian_eigenpairs",
    "hessian_trace",
    "is_measuring",
    "output_loss",
    "parameter_groups",
]
