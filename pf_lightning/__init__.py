"""pf-lightning: Hessian eigenpairs, edge-of-stability and principal-flow diagnostics for Lightning."""

from .curvature import HessianOperator, NonFiniteLossError, ParameterSpace, PreconditionedOperator
from .linalg import EigenResult, NonConvergenceWarning, NonFiniteOperatorError
from .measure import hessian_eigenpairs
from .probe import ProbeSet

__version__ = "0.1.0.dev0"

__all__ = [
    "EigenResult",
    "HessianOperator",
    "NonConvergenceWarning",
    "NonFiniteLossError",
    "NonFiniteOperatorError",
    "ParameterSpace",
    "PreconditionedOperator",
    "ProbeSet",
    "__version__",
    "hessian_eigenpairs",
]
