"""One-HVP proxies of the curvature along the gradient, and the DAL learning rate."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .principal_flow import _step
from .thresholds import _check_lr

Scalar = float | Tensor


def _check_norm(value: Scalar, name: str) -> None:
    # Tensor inputs are not checked, so the computation stays on the device without a host sync.
    if not isinstance(value, Tensor) and value < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")


def _ratio(numerator: Scalar, denominator: Scalar) -> Scalar:
    """numerator / denominator, NaN where the denominator is 0; float in, float out."""
    if isinstance(numerator, Tensor) or isinstance(denominator, Tensor):
        # torch's own promotion: a Python number never widens a tensor's dtype.
        dtype = torch.result_type(numerator, denominator)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        device = numerator.device if isinstance(numerator, Tensor) else denominator.device  # type: ignore[union-attr]
        num = torch.as_tensor(numerator, dtype=dtype, device=device)
        den = torch.as_tensor(denominator, dtype=dtype, device=device)
        safe = torch.where(den == 0, torch.ones_like(den), den)
        return torch.where(den == 0, torch.full_like(num / safe, math.nan), num / safe)
    if denominator == 0:
        return math.nan
    return float(numerator) / float(denominator)


def hg_ratio(grad_norm: Scalar, hg_norm: Scalar) -> Scalar:
    r"""The one-HVP curvature proxy :math:`v = \lVert Hg\rVert / \lVert g\rVert`.

    :math:`\lvert q\rvert \le v \le \max_i\lvert\lambda_i\rvert` with :math:`q` the
    :func:`rayleigh_quotient`; :math:`v = \lambda_{\max}` when :math:`g` lies along the top eigenvector.

    Args:
        grad_norm: :math:`\lVert g\rVert`.
        hg_norm: :math:`\lVert Hg\rVert`.

    Returns:
        :math:`v`, NaN when ``grad_norm`` is 0; a float for floats, a tensor for tensors.

    Raises:
        ValueError: a float norm is negative.

    Example:
        >>> hg_ratio(2.0, 10.0)
        5.0
        >>> math.isnan(hg_ratio(0.0, 1.0))
        True
    """
    _check_norm(grad_norm, "grad_norm")
    _check_norm(hg_norm, "hg_norm")
    return _ratio(hg_norm, grad_norm)


def rayleigh_quotient(g_dot_hg: Scalar, grad_norm: Scalar) -> Scalar:
    r"""The Rayleigh quotient of the gradient, :math:`q = g^\top H g / \lVert g\rVert^2`.

    The curvature along the gradient; :math:`\lambda_{\min} \le q \le \lambda_{\max}`.

    Args:
        g_dot_hg: :math:`g^\top H g`.
        grad_norm: :math:`\lVert g\rVert`.

    Returns:
        :math:`q`, NaN when ``grad_norm`` is 0; a float for floats, a tensor for tensors.

    Raises:
        ValueError: a float ``grad_norm`` is negative.

    Example:
        >>> rayleigh_quotient(12.0, 2.0)
        3.0
        >>> rayleigh_quotient(torch.tensor(-8.0), torch.tensor(2.0)).item()
        -2.0
    """
    _check_norm(grad_norm, "grad_norm")
    return _ratio(g_dot_hg, grad_norm * grad_norm)


def drift_ratio(h: Scalar, grad_norm: Scalar, hg_norm: Scalar) -> Scalar:
    r"""The first-order drift relative to the gradient, :math:`(h/2)\lVert Hg\rVert / \lVert g\rVert`.

    In the principal-flow expansion :math:`-(\nabla E + (h/2)H\nabla E + \dots)` this is the size of the
    implicit-gradient-regularization term relative to the gradient; for Elkabetz & Cohen it is the
    local error of Euler's method (one gradient-descent step) relative to the step, which is why
    :func:`euler_local_error` is this function. Values near 1 mean the step is far from gradient flow.

    Args:
        h: the step.
        grad_norm: :math:`\lVert g\rVert`.
        hg_norm: :math:`\lVert Hg\rVert`.

    Returns:
        :math:`(h/2)v`, NaN when ``grad_norm`` is 0; a float for floats, a tensor for tensors.

    Raises:
        ValueError: ``h`` is not positive and finite, or a float norm is negative.

    Example:
        >>> drift_ratio(0.1, 2.0, 10.0)
        0.25
        >>> drift_ratio(0.01, 1.0, 200.0)  # g along a direction at the 2/h edge
        1.0
    """
    h = _step(h)
    return 0.5 * h * hg_ratio(grad_norm, hg_norm)


euler_local_error = drift_ratio
"""Elkabetz & Cohen's Euler local error :math:`(\\eta/2)\\lVert Hg\\rVert/\\lVert g\\rVert`: :func:`drift_ratio`."""


def dal_learning_rate(hg_ratio: Scalar, p: float, max_lr: float) -> Scalar:
    r"""The DAL-p learning rate :math:`\min(2/v^p,\ h_{\max})` of the principal-flow paper.

    :math:`v = \lVert Hg\rVert/\lVert g\rVert` on the current batch (:func:`hg_ratio`). With
    :math:`p = 1` the rate sets :math:`(h/2)\lVert Hg\rVert = \lVert g\rVert`, i.e. :math:`2/\lambda_{\max}`
    when :math:`g` lies along the top eigenvector; for :math:`v > 1` a larger :math:`p` gives a smaller,
    more stable rate, and for :math:`v < 1` a *larger* one. With :math:`p = 0` the formula is the
    constant :math:`\min(2, h_{\max})`: ``p = 0`` leaves the rate constant. (``dal.py`` short-circuits
    :math:`p = 0` to its base rate ``static_lr``, which this function does not know: a caller wanting
    plain SGD keeps its own rate.) In ``dal.py`` the cap is ``max_lr_scale`` (default 5) in absolute
    units.

    Where :math:`v` is not a positive finite number (``grad_norm`` was 0, the HVP failed, or
    :math:`Hg = 0`) the result is NaN, so that a scheduler can hold its previous rate; ``dal.py`` instead
    lets :math:`v = 0` reach the cap.

    Args:
        hg_ratio: :math:`v`, a float or a tensor.
        p: the power, :math:`p \ge 0`.
        max_lr: the cap :math:`h_{\max} > 0`.

    Returns:
        The rate, float for a float ``hg_ratio``, tensor for a tensor.

    Raises:
        ValueError: ``p`` is negative or not finite, or ``max_lr`` is not positive.

    Example:
        >>> dal_learning_rate(20.0, 1.0, 5.0)  # 2 / lambda_max for g along the top eigenvector
        0.1
        >>> dal_learning_rate(0.1, 1.0, 5.0)  # 2 / 0.1 = 20 is capped
        5.0
        >>> dal_learning_rate(4.0, 0.5, 5.0), dal_learning_rate(100.0, 0.0, 5.0)
        (1.0, 2.0)
    """
    p = float(p)
    if not (p >= 0 and math.isfinite(p)):
        raise ValueError(f"p must be a finite number >= 0, got {p!r}")
    max_lr = _check_lr(max_lr, "max_lr")
    if isinstance(hg_ratio, Tensor):
        v = hg_ratio if hg_ratio.is_floating_point() else hg_ratio.to(torch.get_default_dtype())
        valid = torch.isfinite(v) & (v > 0)
        safe = torch.where(valid, v, torch.ones_like(v))
        rate = torch.clamp(2.0 / safe.pow(p), max=max_lr)
        return torch.where(valid, rate, torch.full_like(rate, math.nan))
    v = float(hg_ratio)
    if not (math.isfinite(v) and v > 0):
        return math.nan
    return min(2.0 / v**p, max_lr)
