"""Stability thresholds of the optimizer in use (Cohen et al. 2021, 2022)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
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
        optimizer: the update rule the threshold was derived for: ``"gd"``, ``"heavy_ball"``,
            ``"nesterov"``, ``"adam"``, ``"rmsprop"``, ``"adagrad"`` or a caller's own label.
        preconditioned: whether ``value`` applies to :math:`\\lambda_{\\max}(P^{-1}H)` (adaptive
            methods) rather than :math:`\\lambda_{\\max}(H)`.
        formula: the formula with the numbers used, for humans, e.g. ``"(2 + 2*beta)/lr"``.

    Example:
        >>> t = StabilityThreshold(200.0, "gd", False, "2/lr")
        >>> effective_lr(t)
        0.01
    """

    value: float
    optimizer: str
    preconditioned: bool
    formula: str

    def __post_init__(self) -> None:
        if not self.value > 0:
            raise ValueError(f"StabilityThreshold value must be positive, got {self.value!r}")


def _check_lr(lr: float, name: str = "lr") -> float:
    lr = float(lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"{name} must be positive and finite, got {lr!r}")
    return lr


def _check_beta(beta: float, name: str) -> float:
    beta = float(beta)
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


_ADAM_FAMILY = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
)


def optimizer_threshold(optimizer: torch.optim.Optimizer, group: int = 0) -> StabilityThreshold:
    r"""The stability threshold of ``optimizer``'s parameter group ``group``, from its settings.

    - ``SGD`` with ``momentum=0``: :math:`2/\eta` (gradient descent).
    - ``SGD`` with momentum :math:`\beta` and dampening :math:`d`: heavy ball,
      :math:`(2+2\beta)/\eta_{\text{eff}}` with :math:`\eta_{\text{eff}} = \eta(1-d)`.
    - ``SGD`` with ``nesterov=True``: :math:`(2+2\beta)/(\eta(1+2\beta))`.
    - Adam, AdamW, NAdam, RAdam, Adamax (preconditioned): :math:`(2+2\beta_1)/((1-\beta_1)\eta)`.
    - RMSprop (preconditioned): :math:`2/\eta`; with momentum :math:`\beta` it is heavy ball on the
      preconditioned problem, :math:`(2+2\beta)/\eta`.
    - Adagrad (preconditioned): :math:`2/\eta`.

    Preconditioned thresholds apply to :math:`\lambda_{\max}(P^{-1}H)`: for the Adam family
    :math:`P = (1-\beta_1^t)(\sqrt{\nu_t/(1-\beta_2^t)} + \epsilon)`, for RMSprop :math:`P = \sqrt{\nu}
    + \epsilon`, for Adagrad :math:`P = \sqrt{\textstyle\sum_t g_t^2} + \epsilon` (the square root of the
    sum of squared gradients; Adagrad's ``lr_decay`` is not included). They assume a frozen
    :math:`P`; NAdam's Nesterov-style momentum and RAdam's un-preconditioned warm-up make the Adam value
    an approximation for those two. Coupled ``weight_decay`` adds itself to every Hessian eigenvalue:
    compare ``sharpness + weight_decay`` with the threshold in that case. Subclasses of these
    optimizers are treated as their base class.

    Args:
        optimizer: a ``torch.optim`` optimizer.
        group: index into ``optimizer.param_groups``.

    Returns:
        The threshold, the update rule it was derived for and the formula with the group's numbers.

    Raises:
        UnsupportedOptimizer: the optimizer's class has no known threshold (pass ``threshold=``
            explicitly then).
        ValueError: ``group`` is out of range, or a setting of the group (lr, momentum, dampening,
            betas) is out of range.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> optimizer_threshold(torch.optim.SGD([p], lr=0.01, momentum=0.9)).value
        380.0
        >>> t = optimizer_threshold(torch.optim.Adam([p], lr=0.01))
        >>> round(t.value, 9), t.preconditioned
        (3800.0, True)
    """
    if not 0 <= group < len(optimizer.param_groups):
        raise ValueError(
            f"group must index optimizer.param_groups (0..{len(optimizer.param_groups) - 1}), got {group}"
        )
    settings = optimizer.param_groups[group]
    lr = _check_lr(settings["lr"])
    name = type(optimizer).__name__

    if isinstance(optimizer, torch.optim.SGD):
        beta = _check_beta(settings.get("momentum", 0.0), "momentum")
        if beta == 0.0:
            return StabilityThreshold(threshold_gd(lr), "gd", False, f"2/lr, lr={lr:g}")
        if settings.get("nesterov", False):
            return StabilityThreshold(
                threshold_nesterov(lr, beta),
                "nesterov",
                False,
                f"(2 + 2*beta)/(lr*(1 + 2*beta)), lr={lr:g}, beta={beta:g}",
            )
        dampening = float(settings.get("dampening", 0.0))
        if dampening == 0.0:
            return StabilityThreshold(
                threshold_heavy_ball(lr, beta),
                "heavy_ball",
                False,
                f"(2 + 2*beta)/lr, lr={lr:g}, beta={beta:g}",
            )
        # PyTorch's buffer is beta*v + (1 - d)*g: heavy ball whose gradient is scaled by (1 - d).
        if not 0.0 < dampening < 1.0:
            raise ValueError(f"SGD dampening must be in [0, 1) for a finite threshold, got {dampening!r}")
        lr_eff = lr * (1.0 - dampening)
        return StabilityThreshold(
            threshold_heavy_ball(lr_eff, beta),
            "heavy_ball",
            False,
            f"(2 + 2*beta)/lr_eff, lr_eff = lr*(1 - dampening) = {lr_eff:g}, beta={beta:g}",
        )

    if isinstance(optimizer, _ADAM_FAMILY):
        beta1 = _check_beta(settings["betas"][0], "beta1")
        return StabilityThreshold(
            threshold_adam(lr, beta1),
            "adam",
            True,
            f"(2 + 2*beta1)/((1 - beta1)*lr), lr={lr:g}, beta1={beta1:g} ({name})",
        )

    if isinstance(optimizer, torch.optim.RMSprop):
        beta = _check_beta(settings.get("momentum", 0.0), "momentum")
        if beta == 0.0:
            return StabilityThreshold(threshold_gd(lr), "rmsprop", True, f"2/lr, lr={lr:g}")
        # RMSprop's momentum buffer accumulates g/P: heavy ball on the preconditioned problem.
        return StabilityThreshold(
            threshold_heavy_ball(lr, beta), "rmsprop", True, f"(2 + 2*beta)/lr, lr={lr:g}, beta={beta:g}"
        )

    if isinstance(optimizer, torch.optim.Adagrad):
        return StabilityThreshold(
            threshold_gd(lr), "adagrad", True, f"2/lr with P = sqrt(sum g^2) + eps, lr={lr:g}"
        )

    raise UnsupportedOptimizer(
        f"no stability threshold is known for {name}; pass threshold= explicitly "
        "(supported: SGD, Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad)"
    )


def effective_lr(threshold: StabilityThreshold) -> float:
    r"""The gradient-descent step with the same threshold: :math:`h = 2/\text{threshold}`.

    This is the :math:`h` to use in :func:`pf_coefficient`, :func:`log_growth` and :func:`regimes`
    for an optimizer that is not plain gradient descent, with the eigenvalues the threshold applies
    to (preconditioned ones for adaptive methods). It is an approximation: it matches the optimizer's
    stability edge (:math:`h\lambda = 2` exactly at the threshold) but not its transient dynamics, which
    momentum and a changing preconditioner make different from gradient descent away from the edge.

    Args:
        threshold: a threshold, e.g. from :func:`optimizer_threshold`.

    Returns:
        :math:`2/\text{threshold.value}`.

    Example:
        >>> effective_lr(StabilityThreshold(threshold_gd(0.05), "gd", False, "2/lr"))
        0.05
        >>> effective_lr(StabilityThreshold(threshold_heavy_ball(0.01, 0.9), "heavy_ball", False, ""))
        0.005263157894736842
    """
    return 2.0 / threshold.value


def edge_lr(optimizer: torch.optim.Optimizer, sharpness: float, group: int = 0) -> float:
    r"""The learning rate at which ``optimizer``'s stability threshold equals ``sharpness``.

    Every threshold of :func:`optimizer_threshold` is a constant over the learning rate
    (:math:`2/\eta`, :math:`(2+2\beta)/\eta`, :math:`(2+2\beta_1)/((1-\beta_1)\eta)`, ...), so the edge is
    :math:`\eta_{\text{edge}} = \eta \cdot \text{threshold}(\eta) / S`: :math:`2/S` for gradient
    descent, :math:`38/S` for Adam with :math:`\beta_1 = 0.9` (with :math:`S` the preconditioned
    sharpness there). Steps below it are stable on the local quadratic model, steps above it are not.

    Args:
        optimizer: a ``torch.optim`` optimizer whose group ``group`` has a positive learning rate.
        sharpness: the curvature the threshold applies to (``eos/sharpness``), positive and finite.
        group: index into ``optimizer.param_groups``.

    Returns:
        :math:`\eta_{\text{edge}}`.

    Raises:
        ValueError: ``sharpness`` is not positive and finite (and what :func:`optimizer_threshold` raises).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> edge_lr(torch.optim.SGD([p], lr=0.3), 20.0)
        0.1
        >>> round(edge_lr(torch.optim.Adam([p], lr=1e-3), 3800.0), 12)
        0.01
    """
    sharpness = float(sharpness)
    if not (sharpness > 0 and math.isfinite(sharpness)):
        raise ValueError(f"sharpness must be positive and finite, got {sharpness!r}")
    if not 0 <= group < len(optimizer.param_groups):
        return optimizer_threshold(optimizer, group).value  # raises the out-of-range error
    # threshold * lr does not depend on lr: evaluate it at lr = 1, so a schedule at 0 still has an edge.
    settings = optimizer.param_groups[group]
    saved = settings["lr"]
    try:
        settings["lr"] = 1.0
        constant = optimizer_threshold(optimizer, group).value
    finally:
        settings["lr"] = saved
    return constant / sharpness
