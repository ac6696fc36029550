"""pf-lightning: Hessian eigenpairs, edge-of-stability and principal-flow diagnostics for Lightning."""

from .callbacks import EdgeOfStabilityMonitor, HessianEigenMonitor
from .curvature import HessianOperator, NonFiniteLossError, ParameterSpace, PreconditionedOperator
from .linalg import EigenResult, NonConvergenceWarning, NonFiniteOperatorError
from .measure import hessian_density, hessian_eigenpairs, hessian_trace
from .probe import ProbeSet

__version__ = "0.1.0.dev0"

__all__ = [
    "EdgeOfStabilityMonitor",
    "EigenResult",
    "HessianEigenMonitor",
    "HessianOperator",
    "NonConvergenceWarning",
    "NonFiniteLossError",
    "NonFiniteOperatorError",
    "ParameterSpace",
    "PreconditionedOperator",
    "ProbeSet",
    "__version__",
    "hessian_density",
    "hessian_eigenpairs",
    "hessian_trace",
]
