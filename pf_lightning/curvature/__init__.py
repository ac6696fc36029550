"""Curvature operators of a model's loss: HVP backends, the Hessian over a probe set, the
preconditioned view, and the state guard around every measurement. Knows nothing of Lightning."""

from .distributed import CollectiveFailure, MeasurementAborted
from .groups import parameter_groups
from .hvp import BACKENDS, DoubleBackwardHVP, FiniteDifferenceHVP, ForwardOverReverseHVP
from .operator import (
    HVP_CHOICES,
    PRODUCT_COST,
    FiniteDifferenceFallbackWarning,
    HessianOperator,
    NonFiniteLossError,
    WorkMeter,
)
from .params import ParameterSpace
from .precondition import (
    PreconditionedOperator,
    PreconditionerUnavailable,
    optimizer_preconditioner,
    optimizer_update,
    optimizer_weight_decay,
)
from .state import measurement_context

__all__ = [
    "BACKENDS",
    "HVP_CHOICES",
    "PRODUCT_COST",
    "CollectiveFailure",
    "DoubleBackwardHVP",
    "FiniteDifferenceFallbackWarning",
    "FiniteDifferenceHVP",
    "ForwardOverReverseHVP",
    "HessianOperator",
    "MeasurementAborted",
    "NonFiniteLossError",
    "ParameterSpace",
    "PreconditionedOperator",
    "PreconditionerUnavailable",
    "WorkMeter",
    "measurement_context",
    "optimizer_preconditioner",
    "optimizer_update",
    "optimizer_weight_decay",
    "parameter_groups",
]
