r"""The edge-of-stability and principal-flow diagnostics of one measurement, as a function.

:func:`edge_of_stability` turns what a measurement found (the eigenvalues the optimizer's threshold
applies to, the gradient's projections on their eigenvectors) and the optimizer's
:class:`~pf_lightning.stability.StepDynamics` into the ``eos/*`` and ``pf/*`` metrics, given what the
previous measurements left (:class:`EdgeHistory`). It knows nothing of Lightning or models:
:class:`~pf_lightning.EdgeOfStabilityMonitor` is a thin adapter that measures and calls it, and the same
numbers come from it outside Lightning.

Per tracked direction :math:`i` (curvature :math:`\lambda_i` of :math:`H + wI`, or of
:math:`P^{-1}(H + W)` for a preconditioned optimizer):

- ``pf/hlambda_i`` :math:`= h\lambda_i` with :math:`h = 2/\lambda^*` the gradient-descent step of the
  same threshold: :math:`\eta\lambda_i` for plain gradient descent, and for every optimizer 2 at its
  edge (it places the direction against the edge; it is not the step's argument under momentum);
- ``pf/log_growth_i``: :math:`\log\rho(M(\lambda_i))`, the per-step log growth under the optimizer's
  own recurrence (:math:`\log\lvert 1 - \eta\lambda_i\rvert` for gradient descent);
- ``pf/regime_i``: :data:`~pf_lightning.stability.REGIME_CODES` of :meth:`StepDynamics.regimes`;
- with the gradient: ``pf/projection_i`` :math:`= g^\top u_i`, ``pf/unstable_grad_fraction`` and
  ``pf/grad_norm``.

Over the run: ``eos/sharpening_slope`` (least squares over the last ``slope_window`` measurements),
``eos/loss_non_monotonicity``, ``eos/first_edge_step``, and ``eos/accumulated_negative_curvature``
:math:`= \eta\sum_t \min(\lambda_{\min,t}, 0)` over the optimizer steps taken, each step counted once
with the :math:`\lambda_{\min}` measured at the end of its interval (Elkabetz & Cohen 2021).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import logging as names
from .optimizers import StepDynamics
from .principal_flow import REGIME_CODES, _as_real_tensor, unstable_gradient_fraction
from .trends import accumulated_negative_curvature, non_monotonicity, progressive_sharpening_slope

__all__ = ["EdgeHistory", "JudgedEdge", "edge_of_stability", "judged_edge"]


@dataclass(frozen=True)
class EdgeHistory:
    """What the diagnostics carry from one measurement to the next.

    Attributes:
        step: the optimizer step of the previous measurement (None before the first one, which then
            counts the steps from 0).
        sharpness: ``(step, sharpness)`` of the previous measurements, oldest first (the slope reads the
            last ``slope_window - 1`` of them).
        first_edge_step: the first step whose ratio reached 1 outside a warm-up, or None.
        negative_curvature: the accumulated negative curvature so far.
    """

    step: int | None = None
    sharpness: tuple[tuple[int, float], ...] = ()
    first_edge_step: int | None = None
    negative_curvature: float = 0.0


@dataclass(frozen=True)
class JudgedEdge:
    """The quantity an edge is judged on: its name, value, threshold and their ratio."""

    quantity: str
    value: float
    threshold: float
    ratio: float


def judged_edge(metrics: Mapping[str, float]) -> JudgedEdge:
    """Which of a measurement's ratios the edge is judged on: the larger of ``eos/ratio`` and (under
    mini-batch training, when logged) ``eos/batch_ratio``. At small batches the batch sharpness is the
    one nearer its threshold, at large ones the full-batch sharpness."""
    if metrics.get(names.BATCH_RATIO, -math.inf) > metrics[names.RATIO]:
        return JudgedEdge(
            "batch sharpness",
            metrics[names.BATCH_SHARPNESS],
            metrics[names.BATCH_THRESHOLD],
            metrics[names.BATCH_RATIO],
        )
    return JudgedEdge("sharpness", metrics[names.SHARPNESS], metrics[names.THRESHOLD], metrics[names.RATIO])


def edge_of_stability(
    eigenvalues: Tensor | Sequence[float],
    dynamics: StepDynamics,
    *,
    step: int,
    interval_steps: int | None = None,
    projections: Tensor | Sequence[float] | None = None,
    grad_norm: float | None = None,
    lambda_min: float | None = None,
    lr: float | None = None,
    losses: Sequence[float] = (),
    history: EdgeHistory = EdgeHistory(),
    slope_window: int = 5,
    warming: bool = False,
    batch_sharpness: float | None = None,
    batch_stderr: float = math.nan,
    batch_threshold: float | None = None,
) -> tuple[dict[str, float], EdgeHistory]:
    r"""The ``eos/*`` and ``pf/*`` metrics of one measurement, and the history for the next.

    Args:
        eigenvalues: the tracked eigenvalues the threshold applies to, largest first (refused otherwise): those of
            :math:`H + wI` (coupled weight decay :math:`w`) or of :math:`P^{-1}(H + W)` when
            ``dynamics.preconditioned``. The first is the sharpness.
        dynamics: the optimizer's step (:func:`~pf_lightning.stability.step_dynamics`).
        step: the optimizer steps taken.
        interval_steps: the judged optimizer's own steps since the previous measurement (since the start
            before the first), where ``step``'s difference counts others' too (under manual optimization
            Lightning's step counts every optimizer's); None: that difference. The accumulated negative
            curvature counts these.
        projections: :math:`g^\top u_i` on the matching eigenvectors (with ``grad_norm``), or None.
        grad_norm: :math:`\lVert g\rVert`.
        lambda_min: the most negative Hessian eigenvalue, for the accumulated negative curvature.
        lr: the step of that sum (default ``dynamics.lr``).
        losses: recent per-step losses, oldest first.
        history: what the previous measurements left.
        slope_window: measurements in the sharpening slope.
        warming: an adaptive optimizer's preconditioner has not settled: no first edge step.
        batch_sharpness: for mini-batch training, the batch sharpness measured with the optimizer's rule
            (:func:`~pf_lightning.batch_sharpness`), with its ``batch_stderr`` and the ``batch_threshold``
            it compares with (default the optimizer's): logged as ``eos/batch_*``, and then the edge
            (``eos/first_edge_step``) is judged on the larger of ``eos/ratio`` and ``eos/batch_ratio``:
            at small batches the batch sharpness is the one nearer its threshold, at large ones the
            full-batch sharpness.

    Returns:
        The metrics and the updated history.

    Raises:
        ValueError: no eigenvalue, a NaN one, or projections of another length.

    Example:
        >>> gd = StepDynamics(0.1)
        >>> metrics, _ = edge_of_stability([30.0, 5.0], gd, step=10)
        >>> metrics["eos/ratio"], metrics["pf/regime_1"], round(metrics["pf/log_growth_2"], 4)
        (1.5, 2.0, -0.6931)
    """
    lam = _as_real_tensor(eigenvalues).detach().reshape(-1).to("cpu", torch.float64)
    if lam.numel() == 0 or torch.isnan(lam).any():
        raise ValueError(f"eigenvalues must be non-empty and not NaN, got {lam.tolist()}")
    if bool((lam.diff() > 0).any()):  # taken as they come, an ascending list's smallest was the sharpness
        raise ValueError(
            f"eigenvalues must be in descending order (the first is the sharpness), got {lam.tolist()}: sort "
            "them, e.g. torch.linalg.eigvalsh(H).flip(0)"
        )
    if isinstance(slope_window, bool) or not isinstance(slope_window, int) or slope_window < 2:
        raise ValueError(f"slope_window must be an int >= 2 (a slope needs two points), got {slope_window!r}")
    threshold, h = dynamics.threshold, dynamics.gd_step
    sharpness = float(lam[0])
    ratio = sharpness / threshold
    metrics = {names.THRESHOLD: threshold, names.SHARPNESS: sharpness, names.RATIO: ratio}

    growth = dynamics.log_growth(lam)
    regime = dynamics.regimes(lam)
    for i, value in enumerate(lam.tolist()):
        metrics[names.direction("hlambda", i + 1)] = h * value
        metrics[names.direction("log_growth", i + 1)] = float(growth[i])
        metrics[names.direction("regime", i + 1)] = float(REGIME_CODES[regime[i]])
    metrics[names.UNSTABLE_DIRECTIONS] = float(sum(r == "unstable" for r in regime))
    metrics[names.OSCILLATING_DIRECTIONS] = float(sum(r == "oscillating" for r in regime))
    if projections is not None:
        c = _as_real_tensor(projections).detach().reshape(-1).to("cpu", torch.float64)
        if c.shape != lam.shape or grad_norm is None:
            raise ValueError(f"projections need one entry per eigenvalue and grad_norm, got {tuple(c.shape)}")
        for i, value in enumerate(c.tolist()):
            metrics[names.direction("projection", i + 1)] = value
        # Unstable (rho > 1 with lambda > 0) exactly where h * lambda > 2, for every rule.
        metrics[names.UNSTABLE_GRAD_FRACTION] = float(unstable_gradient_fraction(h, lam, c, grad_norm))
        metrics[names.GRAD_NORM] = float(grad_norm)

    recent = [*history.sharpness[-(slope_window - 1) :], (step, sharpness)]
    slope = progressive_sharpening_slope([s for s, _ in recent], [v for _, v in recent])
    if not math.isnan(slope):
        metrics[names.SHARPENING_SLOPE] = float(slope)
    if len(losses) >= 2:
        metrics[names.LOSS_NON_MONOTONICITY] = float(non_monotonicity(list(losses)))
    if batch_sharpness is not None:
        level = threshold if batch_threshold is None else float(batch_threshold)
        metrics[names.BATCH_SHARPNESS] = float(batch_sharpness)
        metrics[names.BATCH_SHARPNESS_STDERR] = float(batch_stderr)
        metrics[names.BATCH_THRESHOLD] = level
        metrics[names.BATCH_RATIO] = float(batch_sharpness) / level
    first_edge = history.first_edge_step
    if first_edge is None and judged_edge(metrics).ratio >= 1.0 and not warming:
        first_edge = step
    if first_edge is not None:
        metrics[names.FIRST_EDGE_STEP] = float(first_edge)
    curvature = history.negative_curvature
    if lambda_min is not None:
        steps = (
            interval_steps
            if interval_steps is not None
            else max(step - (0 if history.step is None else history.step), 0)
        )
        step_size = dynamics.lr if lr is None else lr
        curvature += accumulated_negative_curvature([step_size * steps], [float(lambda_min)])
        metrics[names.NEGATIVE_CURVATURE] = curvature
    kept = (*history.sharpness, (step, sharpness))[-max(slope_window - 1, 1) :]
    return metrics, EdgeHistory(step, kept, first_edge, curvature)
