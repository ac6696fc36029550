"""Eigensolvers, trace and density estimators on symmetric linear operators.

Torch only: nothing here knows about ``nn.Module``, Lightning or where the operator comes from.
"""

from ._common import NonConvergenceWarning, NonFiniteOperatorError, held_nonconvergence
from .lanczos import lanczos
from .lobpcg import lobpcg
from .operator import DenseOperator, LinearOperator, OffloadedOperator, ShiftedOperator
from .result import EigenResult

__all__ = [
    "DenseOperator",
    "EigenResult",
    "LinearOperator",
    "NonConvergenceWarning",
    "NonFiniteOperatorError",
    "OffloadedOperator",
    "ShiftedOperator",
    "held_nonconvergence",
    "lanczos",
    "lobpcg",
]
