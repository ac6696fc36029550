"""Lightning callbacks: thin adapters from the trainer's hooks to the measurement and the diagnostics."""

from .eos_monitor import EdgeOfStabilityMonitor
from .hessian_monitor import HessianEigenMonitor
from .lr_adaptation import LRAdaptation

__all__ = ["EdgeOfStabilityMonitor", "HessianEigenMonitor", "LRAdaptation"]
