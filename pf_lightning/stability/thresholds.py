"""Stability thresholds of the optimizer in use (Cohen et al. 2021, 2022)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

Scalar = float | Tensor


class UnsupportedOptimizer(ValueError):
    """The optimizer has no known stability threshold; the caller must give one explicitly."""


@dataclass(frozen=True)
class StabilityThreshold:
    """The largest stable curvature of an optimizer on a quadratic.

    Attributes:
        value: the threshold; the optimizer is stable along a direction whose (preconditioned, if
            ``preconditioned``) curvature is below it.
        optimizer: the update rule the threshold was derived for (``StepDynamics.label``): ``"gd"``,
            ``"heavy_ball"``, ``"nesterov"``, ``"adam"``, ``"adamw"``, ``"adamax"``, ``"nadam"``,
            ``"radam"``, ``"rmsprop"``, ``"adagrad"``, ``"adadelta"`` or a caller's own label.
        preconditioned: whether ``value`` applies to :math:`\\lambda_{\\max}(P^{-1}H)` (adaptive
            methods) rather than :math:`\\lambda_{\\max}(H)`.
        formula: the formula with the numbers used, for humans, e.g. ``"(2 + 2*beta)/lr"``.

    Example:
        >>> StabilityThreshold(200.0, "gd", False, "2/lr").value
        200.0
    """

    value: float
    optimizer: str
    preconditioned: bool
    formula: str

    def __post_init__(self) -> None:
        if not self.value > 0:
            raise ValueError(f"StabilityThreshold value must be positive, got {self.value!r}")


def _real(value: Any, name: str) -> float:
    """``value`` as a float: a number or a one-element tensor, never a bool or a string (``float("0.1")``
    and ``True`` would pass as 0.1 and 1)."""
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _check_lr(lr: float, name: str = "lr") -> float:
    lr = _real(lr, name)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"{name} must be positive and finite, got {lr!r}")
    return lr


def _check_beta(beta: float, name: str) -> float:
    beta = _real(beta, name)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must satisfy 0 <= {name} < 1, got {beta!r}")
    return beta


def threshold_gd(lr: float) -> float:
    r"""Stability threshold of gradient descent: :math:`2/\eta`.

    Along a direction of curvature :math:`\lambda` one step multiplies the error by
    :math:`1 - \eta\lambda`, which has modulus at most one iff :math:`\eta\lambda \le 2`.

    Args:
        lr: the step :math:`\eta > 0`.

    Returns:
        :math:`2/\eta`.

    Raises:
        ValueError: ``lr`` is not positive and finite.

    Example:
        >>> threshold_gd(0.01)
        200.0
        >>> threshold_gd(0.5)
        4.0
    """
    return 2.0 / _check_lr(lr)


def threshold_heavy_ball(lr: float, momentum: float) -> float:
    r"""Stability threshold of heavy-ball momentum: :math:`(2 + 2\beta)/\eta`.

    For :math:`v \leftarrow \beta v + g,\ \theta \leftarrow \theta - \eta v` (PyTorch's ``SGD`` with
    ``momentum=beta``) on :math:`\tfrac12\lambda x^2`, the characteristic polynomial
    :math:`z^2 - (1 + \beta - \eta\lambda)z + \beta` has a root at :math:`-1` when
    :math:`\eta\lambda = 2 + 2\beta`.

    Args:
        lr: the step :math:`\eta > 0`.
        momentum: :math:`0 \le \beta < 1`.

    Returns:
        :math:`(2 + 2\beta)/\eta`.

    Raises:
        ValueError: ``lr`` or ``momentum`` is out of range.

    Example:
        >>> threshold_heavy_ball(0.01, 0.9)
        380.0
        >>> threshold_heavy_ball(0.1, 0.0) == threshold_gd(0.1)
        True
    """
    lr = _check_lr(lr)
    beta = _check_beta(momentum, "momentum")
    return (2.0 + 2.0 * beta) / lr


def threshold_nesterov(lr: float, momentum: float) -> float:
    r"""Stability threshold of Nesterov momentum: :math:`(2 + 2\beta)/(\eta(1 + 2\beta))`.

    For PyTorch's form :math:`v \leftarrow \beta v + g,\ \theta \leftarrow \theta - \eta(g + \beta v)`
    the characteristic polynomial at :math:`z = -1` is :math:`2 + 2\beta - \eta\lambda(1 + 2\beta)`.

    Args:
        lr: the step :math:`\eta > 0`.
        momentum: :math:`0 \le \beta < 1`.

    Returns:
        :math:`(2 + 2\beta)/(\eta(1 + 2\beta))`.

    Raises:
        ValueError: ``lr`` or ``momentum`` is out of range.

    Example:
        >>> round(threshold_nesterov(0.01, 0.9), 6)
        135.714286
        >>> threshold_nesterov(0.1, 0.0) == threshold_gd(0.1)
        True
    """
    lr = _check_lr(lr)
    beta = _check_beta(momentum, "momentum")
    return (2.0 + 2.0 * beta) / (lr * (1.0 + 2.0 * beta))


def threshold_adam(lr: float, beta1: float) -> float:
    r"""Stability threshold of Adam for the preconditioned sharpness: :math:`(2+2\beta_1)/((1-\beta_1)\eta)`.

    Adam with a frozen preconditioner :math:`P` is heavy-ball momentum with an exponential moving
    average (step :math:`\eta(1-\beta_1)` in heavy-ball terms) on :math:`P^{-1}H` (Cohen et al. 2022).
    RMSprop is :math:`\beta_1 = 0`, giving :math:`2/\eta`.

    Args:
        lr: the step :math:`\eta > 0`.
        beta1: Adam's first-moment decay, :math:`0 \le \beta_1 < 1`.

    Returns:
        :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)`, which is :math:`38/\eta` for :math:`\beta_1 = 0.9`.

    Raises:
        ValueError: ``lr`` or ``beta1`` is out of range.

    Example:
        >>> round(threshold_adam(0.01, 0.9), 9)
        3800.0
        >>> threshold_adam(0.01, 0.0)
        200.0
    """
    lr = _check_lr(lr)
    beta1 = _check_beta(beta1, "beta1")
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
