"""Stochastic trace estimation of a symmetric operator: Hutchinson and Hutch++.

Both estimators only apply the operator to blocks of probe vectors and reduce through
:meth:`~pf_lightning.linalg.operator.LinearOperator.inner`, so the trace of a Hessian costs a fixed,
reported number of Hessian-vector products and never forms the matrix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pf_lightning.linalg._common import orthonormalize
from pf_lightning.linalg.operator import LinearOperator, combine

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace", "rademacher"]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its statistical accuracy and cost.

    Attributes:
        trace: the estimate of :math:`\\operatorname{tr}(A)`.
        std_error: standard error of the stochastic part of the estimate (for Hutch++ the Hutchinson
            estimate of the deflated residual; the exact low-rank part has none). ``nan`` when only one
            probe was drawn, ``0.0`` when no stochastic part was needed.
        n_hvp: operator applications (Hessian-vector products) the estimate cost.
        seconds: wall-clock time of the estimate.
        method: ``"hutchinson"`` or ``"hutch++"``.
    """

    trace: float
    std_error: float
    n_hvp: int
    seconds: float
    method: str


def rademacher(op: LinearOperator, b: int, generator: torch.Generator) -> Tensor:
    """A ``(n, b)`` block of independent random signs, identical on every process for a seed.

    Like :meth:`LinearOperator.randn`, the signs are drawn on the CPU for the full ``global_n`` rows
    and then moved, so a seed gives the same probes on every device and every process. Unlike it,
    columns are drawn one after another: ``b`` draws of one column equal one draw of ``b`` columns.
    With sharded vectors every process keeps its rows (:meth:`LinearOperator.local_rows`) of the same
    global probes, so the estimate is the one a single process would compute.

    Args:
        op: the operator the probes are for (gives length, dtype and device).
        b: number of probe vectors.
        generator: a CPU generator; it is advanced.
    """
    # Drawn one vector after another, so the probes depend on the seed only, not on how they are blocked.
    # int8 keeps the CPU staging block at one byte per entry (a Hessian has ~1e8 rows).
    signs = torch.randint(0, 2, (b, op.global_n), generator=generator, dtype=torch.int8).T
    return op.local_rows(2 * signs - 1).to(device=op.device, dtype=op.dtype)


def _quadratic_forms(
    op: LinearOperator,
    n_probes: int,
    generator: torch.Generator,
    block_size: int,
    project: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``z_i^T A z_i`` (float64, on the CPU) for ``n_probes`` sign probes, optionally projected first."""
    values = []
    for start in range(0, n_probes, block_size):
        Z = rademacher(op, min(block_size, n_probes - start), generator)
        if project is not None:
            Z = project(Z)
        # The diagonal of the b x b Gram matrix: one global reduction per block keeps shards consistent.
        values.append(torch.diagonal(op.inner(Z, op.matmat(Z))).to(device="cpu", dtype=torch.float64))
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


def _std_error(samples: Tensor) -> float:
    if samples.numel() == 0:
        return 0.0
    if samples.numel() == 1:
        return math.nan
    return float(samples.std(correction=1) / math.sqrt(samples.numel()))


def _check_int_at_least(name: str, value: int, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}; {fix}")


def hutchinson_trace(
    op: LinearOperator, n_samples: int = 100, *, seed: int = 0, block_size: int = 10
) -> TraceEstimate:
    """Hutchinson's estimate of the trace of a symmetric operator with random sign probes.

    .. math::

        \\operatorname{tr}(A) \\approx \\frac{1}{N} \\sum_{i=1}^{N} z_i^\\top A z_i,
        \\qquad z_i \\in \\{-1, +1\\}^n \\text{ uniform},

    unbiased with per-probe variance :math:`2 \\sum_{i \\neq j} A_{ij}^2` (Hutchinson 1990); the reported
    standard error is the sample standard deviation over :math:`\\sqrt{N}`. A diagonal operator is
    recovered exactly.

    Args:
        op: the symmetric operator.
        n_samples: number of probes ``N`` (= operator applications).
        seed: seed of the CPU generator the probes are drawn from.
        block_size: probes applied per :meth:`~LinearOperator.matmat` call (memory vs. batching).

    Returns:
        The estimate, its standard error and its cost.

    Raises:
        ValueError: when ``n_samples`` or ``block_size`` is below 1.

    Example::

        >>> from pf_lightning.linalg.operator import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> est = hutchinson_trace(op, n_samples=8)
        >>> est.trace, est.std_error, est.n_hvp
        (2.0, 0.0, 8)
    """
    _check_int_at_least("n_samples", n_samples, 1, "draw at least one probe (use n_samples=100 or more)")
    _check_int_at_least("block_size", block_size, 1, "apply at least one probe per block")
    start_time, start_hvp = time.perf_counter(), op.n_matvec
    generator = torch.Generator().manual_seed(seed)
    samples = _quadratic_forms(op, n_samples, generator, block_size)
    return TraceEstimate(
        trace=float(samples.mean()),
        std_error=_std_error(samples),
        n_hvp=op.n_matvec - start_hvp,
        seconds=time.perf_counter() - start_time,
        method="hutchinson",
    )


def hutchpp_trace(op: LinearOperator, n_matvec: int = 99, *, seed: int = 0) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): exact trace of a sketched top subspace plus
    Hutchinson on the rest.

    With a budget of :math:`m` applications, draw :math:`k = \\lfloor m/3 \\rfloor` sign vectors
    :math:`S`, orthonormalize :math:`Q = \\operatorname{orth}(A S)` and estimate

    .. math::

        \\operatorname{tr}(A) \\approx \\operatorname{tr}(Q^\\top A Q)
        + \\frac{1}{N} \\sum_{i=1}^{N} g_i^\\top (I - QQ^\\top) A (I - QQ^\\top) g_i ,

    with the remaining :math:`N = m - k - \\operatorname{rank} Q` sign probes :math:`g_i`. The error
    falls as :math:`O(1/m)` instead of Hutchinson's :math:`O(1/\\sqrt{m})` when the spectrum decays, and
    the estimate is exact when :math:`\\operatorname{rank} A \\le k`. ``Q`` is orthonormal in
    ``op.inner``; a rank-deficient :math:`AS` gives a smaller ``Q`` and more probes for the residual.

    Args:
        op: the symmetric operator.
        n_matvec: total budget of operator applications (at least 3); it is used exactly, except that
            the residual probes are skipped when ``Q`` already spans the whole space.
        seed: seed of the CPU generator the sketch and the probes are drawn from.

    Returns:
        The estimate, the standard error of its residual (stochastic) part and its cost.

    Raises:
        ValueError: when ``n_matvec`` is below 3.

    Example::

        >>> from pf_lightning.linalg.operator import DenseOperator
        >>> eigenvalues = torch.tensor([3.0, 1.0, -2.0] + [0.0] * 17, dtype=torch.float64)
        >>> est = hutchpp_trace(DenseOperator(torch.diag(eigenvalues)), n_matvec=30)  # rank 3 <= 30 // 3
        >>> round(est.trace, 10), est.n_hvp
        (2.0, 30)
    """
    _check_int_at_least("n_matvec", n_matvec, 3, "Hutch++ splits the budget in three (use n_matvec=99)")
    start_time, start_hvp = time.perf_counter(), op.n_matvec
    generator = torch.Generator().manual_seed(seed)
    k = n_matvec // 3
    Q = orthonormalize(op, op.matmat(rademacher(op, k, generator)))
    rank = Q.shape[1]
    low_rank = float(torch.trace(op.inner(Q, op.matmat(Q)))) if rank else 0.0
    # Once Q spans everything the residual is zero: probing it would only spend applications.
    n_probes = 0 if rank >= op.global_n else n_matvec - k - rank

    def deflate(Z: Tensor) -> Tensor:
        return Z - combine(Q, op.inner(Q, Z)) if rank else Z

    samples = _quadratic_forms(op, n_probes, generator, max(k, 1), project=deflate)
    residual = float(samples.mean()) if n_probes else 0.0
    return TraceEstimate(
        trace=low_rank + residual,
        std_error=_std_error(samples),
        n_hvp=op.n_matvec - start_hvp,
        seconds=time.perf_counter() - start_time,
        method="hutch++",
    )
