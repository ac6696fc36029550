"""Shared machinery of the eigensolvers: selection of wanted Ritz values, convergence, results, and the
Lanczos step that the eigensolver and the spectral density both take."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

import torch
from torch import Tensor

from .operator import LinearOperator, combine, subtract_combination_
from .result import EigenResult

Which = Literal["top", "bottom", "both"]
WHICH = ("top", "bottom", "both")


class NonConvergenceWarning(RuntimeWarning):
    """An eigensolver stopped on its budget before every wanted pair met the tolerance."""


_HELD: ContextVar[list[str] | None] = ContextVar("pf_lightning_held_nonconvergence", default=None)


@contextlib.contextmanager
def held_nonconvergence() -> Iterator[list[str]]:
    """Inside, the solvers put their :class:`NonConvergenceWarning` messages in the list this yields instead
    of warning: a monitor measuring at every interval, on every rank, says them once itself (on rank zero,
    in the same category, so the user's filters for it hold). The warning filters are not touched."""
    held: list[str] = []
    token = _HELD.set(held)
    try:
        yield held
    finally:
        _HELD.reset(token)


def _nonconvergence(message: str) -> None:
    held = _HELD.get()
    if held is not None:
        held.append(message)
    else:
        warnings.warn(message, NonConvergenceWarning, stacklevel=4)  # at the solver's caller


class NonFiniteOperatorError(FloatingPointError):
    """The operator returned NaN or infinity: no eigenvalue computed from it would mean anything."""


def wanted_pairs(k: int, which: str) -> int:
    """The eigenpairs a measurement of ``k`` wants: ``k`` at each end for ``which="both"``."""
    return 2 * k if which == "both" else k


def check_k(op: LinearOperator, k: int, which: str) -> int:
    """Validate ``k`` and ``which``; return the number of wanted pairs."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    n_wanted = wanted_pairs(k, which)
    if n_wanted > op.global_n:
        raise ValueError(
            f"asked for {n_wanted} eigenpairs (k={k}, which={which!r}) of an operator of size "
            f"{op.global_n}: lower k to at most {op.global_n // wanted_pairs(1, which)}"
        )
    return n_wanted


def guard_count(n_wanted: int) -> int:
    """Guard vectors carried beyond the wanted pairs by a block method (LOBPCG's ``extra``) and returned
    as a result's ``neighbours`` for a block warm start: they speed up the last wanted pair when its
    gap is small, and hold the directions next in line."""
    return max(2, n_wanted // 2)


def default_budget(n_wanted: int) -> int:
    """The products a solver may spend when the caller sets no ``max_matvec``: ``max(300, 40 k)``."""
    return max(300, 40 * n_wanted)


def check_tol(tol: float) -> float:
    if not (isinstance(tol, int | float) and 0 < tol < 1):
        raise ValueError(f"tol is a relative residual tolerance in (0, 1), got {tol!r}")
    return float(tol)


def select(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the wanted values in ``theta``: the ``k`` largest, the ``k`` smallest, or both ends.

    For ``which="both"``, ``k`` counts each end. For a restart or a block that keeps extra vectors,
    ``select_block`` splits a total count between the ends instead.
    """
    m = theta.numel()
    order = torch.argsort(theta, descending=True)
    if which == "top":
        return order[: min(k, m)]
    if which == "bottom":
        return order[max(m - k, 0) :]
    if 2 * k >= m:
        return order
    return torch.cat([order[:k], order[m - k :]])


def select_block(theta: Tensor, total: int, which: str) -> Tensor:
    """Indices of ``total`` values to keep, taken from the wanted end(s) of the spectrum."""
    m = theta.numel()
    total = min(total, m)
    order = torch.argsort(theta, descending=True)
    if which == "top":
        return order[:total]
    if which == "bottom":
        return order[m - total :]
    n_top = (total + 1) // 2
    return torch.cat([order[:n_top], order[m - (total - n_top) :]]) if total > n_top else order[:n_top]


def converged_mask(theta: Tensor, res: Tensor, tol: float, scale: float) -> Tensor:
    """``res <= tol * max(|theta|, 1e-2 * scale)``.

    Relative to each eigenvalue, except that eigenvalues below 1% of the spectral scale (the largest
    |Ritz value| seen) are measured against that 1%: a near-zero eigenvalue of a Hessian cannot be
    resolved to a relative accuracy, and asking for it would spend the budget for nothing.
    """
    floor = 1e-2 * scale
    return res <= tol * torch.clamp(theta.abs(), min=floor)


NON_FINITE_HINT = "check the loss and the model's parameters on the probe batches"


def all_finite(W: Tensor) -> bool:
    """Whether every entry of ``W`` is finite. The extremes propagate NaN and hold any infinity: a
    reduction, where ``isfinite(W).all()`` allocates an absolute value of ``W``'s size and three masks."""
    if W.numel() == 0:
        return True
    low, high = torch.aminmax(W.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def check_finite(W: Tensor) -> None:
    if not all_finite(W):
        raise NonFiniteOperatorError(
            f"the operator returned a non-finite value (NaN or inf): {NON_FINITE_HINT}"
        )


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def finish(
    *,
    theta: Tensor,
    vectors: Tensor,
    res: Tensor,
    conv: Tensor,
    n_hvp: int,
    start: float,
    tol: float,
    which: str,
    method: str,
    info: dict,
    neighbours: Tensor | None = None,
) -> EigenResult:
    """Sort descending, build the result, warn once if some pair did not converge."""
    order = torch.argsort(theta, descending=True)
    result = EigenResult(
        eigenvalues=theta[order],
        eigenvectors=vectors[:, order],
        residuals=res[order],
        converged=conv[order],
        n_hvp=int(n_hvp),
        seconds=time.perf_counter() - start,
        tol=tol,
        which=which,
        method=method,
        info=info,
        neighbours=neighbours,
    )
    if info.get("floored"):
        _nonconvergence(
            f"{method}: the operator's products are not symmetric to tol={tol:g} (its projections differ by "
            f"{info['asymmetry']:.1e} of the spectral scale), so {info['floored']} of {result.k} eigenpairs "
            "cannot reach it: finite differences across a kink (ReLU, max pooling) need an exact hvp backend; "
            "products too coarse for tol (finite differences in float32 near a zero eigenvalue, a bfloat16 "
            "measurement) a finer dtype (float64) or a looser tol"
        )
    elif not result.all_converged:
        worst = float((result.residuals / result.eigenvalues.abs().clamp_min(1e-30)).max())
        _nonconvergence(
            f"{method}: {int((~result.converged).sum())} of {result.k} eigenpairs did not reach "
            f"tol={tol:g} within {n_hvp} Hessian-vector products (worst relative residual "
            f"{worst:.2e}); raise max_hvp or loosen tol"
        )
    return result


def orthonormalize(op: LinearOperator, W: Tensor, against: Tensor | None = None) -> Tensor:
    """Orthonormalize the columns of ``W`` (against ``against`` first), dropping dependent ones.

    Two passes of block classical Gram-Schmidt followed by an eigen-decomposition of the Gram
    matrix (SVQB, Stathopoulos & Wu 2002), which is stable where Cholesky-QR breaks down.
    Every inner product goes through ``op.inner``; the Gram matrix's eigenproblem runs on the CPU.
    """
    for _ in range(2):
        if W.shape[1] == 0:
            return W
        if against is not None and against.shape[1] > 0:
            W = W - combine(against, op.inner(against, W))
        G = op.inner(W, W).to(device="cpu", dtype=torch.float64)
        G = 0.5 * (G + G.mT)
        d = G.diagonal().clamp_min(1e-300).rsqrt()
        evals, evecs = torch.linalg.eigh(d[:, None] * G * d[None, :])
        keep = evals > evals.max().clamp_min(0) * (torch.finfo(W.dtype).eps * 10 * W.shape[1])
        if not bool(keep.any()):
            return W[:, :0]
        T = (d[:, None] * evecs[:, keep]) * evals[keep].rsqrt()[None, :]
        W = combine(W, T.to(device=W.device, dtype=W.dtype))
    return W


def lanczos_step(op: LinearOperator, V: Tensor, j: int) -> tuple[Tensor, Tensor, float]:
    """One Lanczos step with full reorthogonalization from the basis rows ``V[: j + 1]`` (one vector a row).

    Applies the operator to ``V[j]`` and removes the component along the whole basis with classical
    Gram-Schmidt run twice ("twice is enough"): the projection on ``v_j`` and ``v_{j-1}`` is the three-term
    recurrence, the rest removes the loss of orthogonality that creates spurious copies of converged Ritz
    values. Every inner product goes through ``op.inner``. The projections are removed from the product
    in place (one fused matrix-vector update each): besides the basis, a step holds the product alone.
    A NaN or infinity in the product reaches the remainder's norm, which is checked in place of the
    product itself (one read of a vector fewer per step); so is a norm that overflows.

    Raises:
        NonFiniteOperatorError: the product is not finite (or its norm overflows the dtype).

    Returns:
        The float64 coefficients of the product on the basis (column ``j`` of the projected matrix), on the
        CPU, the remainder ``w`` and its norm ``beta`` (the next coupling).
    """
    w = op.matvec(V[j])
    inference = w.is_inference() and not torch.is_inference_mode_enabled()
    if w.requires_grad or inference or w.untyped_storage().data_ptr() == V.untyped_storage().data_ptr():
        # Updated in place below: never the basis (an operator that hands back its input), nor a tensor a
        # graph may have saved (an operator whose products carry one), nor one made in inference mode.
        w = w.detach().clone()
    basis = V[: j + 1].mT  # (n, j + 1): the blocks the operator's inner product takes
    h = op.inner(basis, w)
    subtract_combination_(w, basis, h)
    h2 = op.inner(basis, w)
    subtract_combination_(w, basis, h2)
    # One transfer to the host a step, the coefficients and the squared norm together: the solver's
    # decisions and its small eigenproblems run there (an accelerator would wait on each scalar read).
    host = torch.cat([h + h2, op.inner(w, w).reshape(1)]).to(device="cpu", dtype=torch.float64)
    beta_squared = float(host[-1])
    if not math.isfinite(beta_squared):
        raise NonFiniteOperatorError(
            f"the operator returned a non-finite value (NaN or inf) or one whose norm overflows {w.dtype}: "
            f"{NON_FINITE_HINT}"
        )
    return host[:-1], w, max(beta_squared, 0.0) ** 0.5
