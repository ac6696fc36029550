"""Gradient flow versus gradient descent (Elkabetz & Cohen 2021), and trends over a run."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .principal_flow import _as_real_tensor

Scalar = float | Tensor


def _as_float64(values: Tensor | Sequence[float]) -> Tensor:
    return _as_real_tensor(values).detach().to("cpu", torch.float64).reshape(-1)


def accumulated_negative_curvature(
    lrs: Sequence[float] | Tensor, lambda_mins: Sequence[float] | Tensor
) -> Scalar:
    r"""Elkabetz & Cohen's discretization hazard :math:`\sum_t \eta_t \min(\lambda_{\min,t}, 0)`.

    The distance between gradient descent and gradient flow is bounded by
    :math:`O(\exp(-\int_0^t \lambda_-)\,t\,\eta)` with :math:`\lambda_- = \min(\lambda_{\min}, 0)`; this
    sum is the Riemann approximation of :math:`\int\lambda_-\,dt` along the run (non-positive; more
    negative means gradient descent may have drifted further from the flow).

    Args:
        lrs: the step :math:`\eta_t` of each interval.
        lambda_mins: the smallest Hessian eigenvalue measured for each interval.

    Returns:
        The sum: a float for sequences, a 0-dim tensor if either input is a tensor.

    Raises:
        ValueError: the two have different lengths.

    Example:
        >>> accumulated_negative_curvature([0.1, 0.1, 0.2], [-2.0, 3.0, -1.0])
        -0.4
        >>> accumulated_negative_curvature([0.1], [5.0])
        0.0
    """
    if isinstance(lrs, Tensor) or isinstance(lambda_mins, Tensor):
        eta = _as_real_tensor(lrs).reshape(-1)
        lam = _as_real_tensor(lambda_mins, device=eta.device).reshape(-1)
        if eta.shape != lam.shape:
            raise ValueError(f"lrs ({eta.numel()}) and lambda_mins ({lam.numel()}) must have the same length")
        dtype = torch.promote_types(torch.promote_types(eta.dtype, lam.dtype), torch.get_default_dtype())
        return (eta.to(dtype) * lam.to(dtype).clamp(max=0.0)).sum()
    if len(lrs) != len(lambda_mins):
        raise ValueError(f"lrs ({len(lrs)}) and lambda_mins ({len(lambda_mins)}) must have the same length")
    return math.fsum(float(eta) * min(float(lam), 0.0) for eta, lam in zip(lrs, lambda_mins, strict=True))


def progressive_sharpening_slope(
    steps: Sequence[float] | Tensor, sharpness: Sequence[float] | Tensor
) -> float:
    r"""Least-squares slope of sharpness against step (sharpness units per step).

    .. math::  \hat b = \frac{\sum_j (s_j - \bar s)(\lambda_j - \bar\lambda)}{\sum_j (s_j - \bar s)^2}

    Positive while sharpness rises (*progressive sharpening*), near zero at the edge of stability.
    Points with a non-finite sharpness (a skipped measurement) are left out.

    Args:
        steps: the step of each measurement.
        sharpness: the sharpness measured at those steps.

    Returns:
        The slope; NaN with fewer than two usable points or when all steps are equal.

    Raises:
        ValueError: the two have different lengths.

    Example:
        >>> progressive_sharpening_slope([0, 10, 20], [1.0, 2.0, 3.0])
        0.1
        >>> math.isnan(progressive_sharpening_slope([5], [1.0]))
        True
    """
    s = _as_float64(steps)
    y = _as_float64(sharpness)
    if s.shape != y.shape:
        raise ValueError(f"steps ({s.numel()}) and sharpness ({y.numel()}) must have the same length")
    keep = torch.isfinite(y) & torch.isfinite(s)
    s, y = s[keep], y[keep]
    if s.numel() < 2:
        return math.nan
    ds = s - s.mean()
    denominator = float(ds.square().sum())
    if denominator == 0.0:
        return math.nan
    return float((ds * (y - y.mean())).sum()) / denominator


def non_monotonicity(losses: Sequence[float] | Tensor) -> float:
    r"""Fraction of consecutive pairs in which the loss increased, :math:`\#\{t: E_{t+1} > E_t\}/(T-1)`.

    Zero for a monotone decrease (the stable regime), positive at the edge of stability where the loss
    falls over long spans but not step by step. Pass the window of interest.

    Args:
        losses: the losses, in step order.

    Returns:
        The fraction in :math:`[0, 1]`; NaN with fewer than two losses or a non-finite one (a NaN compares
        as "not rising", which would read a diverged run as a monotone one).

    Example:
        >>> non_monotonicity([4.0, 3.0, 3.5, 2.0, 2.5])
        0.5
        >>> non_monotonicity([3.0, 2.0, 1.0])
        0.0
    """
    e = _as_float64(losses)
    if e.numel() < 2 or not bool(torch.isfinite(e).all()):
        return math.nan
    return float((e[1:] > e[:-1]).double().mean())


def first_crossing_step(
    steps: Sequence[int] | Tensor, ratios: Sequence[float] | Tensor, level: float = 1.0
) -> int | None:
    r"""The first step at which ``ratio >= level``, e.g. where sharpness first reaches the threshold.

    Args:
        steps: the step of each measurement, in order.
        ratios: e.g. sharpness / threshold at those steps.
        level: the level to reach (1.0 is the edge of stability).

    Returns:
        The step, or ``None`` if the ratio never reaches ``level``.

    Raises:
        ValueError: the two have different lengths.

    Example:
        >>> first_crossing_step([0, 50, 100, 150], [0.5, 0.9, 1.02, 0.98])
        100
        >>> first_crossing_step([0, 50], [0.5, 0.9]) is None
        True
    """
    s = torch.as_tensor(steps).reshape(-1).tolist()
    r = _as_float64(ratios).tolist()
    if len(s) != len(r):
        raise ValueError(f"steps ({len(s)}) and ratios ({len(r)}) must have the same length")
    for step, ratio in zip(s, r, strict=True):
        if ratio >= level:
            return int(step)
    return None
