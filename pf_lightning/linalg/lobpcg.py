r"""Locally optimal block preconditioned conjugate gradient (LOBPCG) for warm starts.

Knyazev (2001): each iteration takes the Rayleigh-Ritz pairs of :math:`A` on the span of the current
block :math:`X`, the residuals :math:`W = AX - X\Theta` of the pairs that have not converged, and the
previous search directions :math:`P`. Started from the eigenvectors of a previous measurement, a few
iterations are enough when the parameters have moved a little, which is what a monitor sees between
two measurements of one training run.

The basis :math:`[X, W, P]` is kept orthonormal (``W`` through the operator's inner product, ``P`` by
small coefficient algebra since it lies in the span of the previous orthonormal basis), so every
Rayleigh-Ritz step is a standard symmetric eigenproblem and the residuals are computed explicitly.
Only the columns that have not converged are multiplied by ``A`` (soft locking).

Memory, in vectors of the operator's length ``n``, for a block of ``b = k + extra`` columns (``k``
counting both ends for ``which="both"``; default ``extra = max(2, k // 2)``): at most ``11 b``
(measured 9.7-10.5 b in ``tests/test_memory.py``), reached in the Rayleigh-Ritz update, which holds the
basis ``[X, W, P]`` and its image (``6 b``) while it forms the new ``X, AX, P, AP``; while ``W`` is
multiplied, ``7 b`` plus what the products need. With ``basis_device="cpu"`` all of it
stays in host memory and the operator's device holds only the columns being multiplied and their
products.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ._common import (
    check_finite,
    check_k,
    check_tol,
    converged_mask,
    default_budget,
    finish,
    guard_count,
    make_generator,
    orthonormalize,
    select,
    select_block,
)
from .operator import LinearOperator, OffloadedOperator, combine
from .result import EigenResult

__all__ = ["lobpcg"]


def _rayleigh_ritz(op: LinearOperator, S: Tensor, AS: Tensor) -> tuple[Tensor, Tensor]:
    """The Ritz values and coefficients of ``S``, float64 on the CPU (where every small matrix of the
    solver lives: an accelerator would wait on each decision read from it)."""
    G = op.inner(S, AS).to(device="cpu", dtype=torch.float64)
    return torch.linalg.eigh(0.5 * (G + G.mT))


def _residual_norms(op: LinearOperator, R: Tensor) -> Tensor:
    return op.inner(R, R).diagonal().to(device="cpu", dtype=torch.float64).clamp_min(0).sqrt()


def lobpcg(
    op: LinearOperator,
    k: int = 5,
    *,
    which: str = "top",
    tol: float = 1e-3,
    max_matvec: int | None = None,
    X0: Tensor | None = None,
    extra: int | None = None,
    seed: int = 0,
    basis_device: torch.device | str | None = None,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by LOBPCG, warm-started from ``X0``.

    Args:
        op: the symmetric operator.
        k: eigenpairs wanted (at each end for ``which="both"``).
        which: ``"top"``, ``"bottom"`` or ``"both"``.
        tol: relative residual tolerance (as in :func:`lanczos`).
        max_matvec: budget of operator applications (default ``max(300, 40 * k)``).
        X0: ``(n, b0)`` start block, typically the eigenvectors of a previous result; missing
            columns are filled with seeded Gaussian vectors.
        extra: guard vectors carried beyond the wanted ones (they speed up convergence of the
            last wanted pair when its gap is small; the result returns them as ``neighbours``).
            Default ``max(2, k // 2)``.
        seed: seed of the random columns.
        basis_device: keep the block, its images and the search directions on this device (``"cpu"``
            for host memory); each product moves the active columns there and back.

    Returns:
        An :class:`EigenResult` with eigenvalues in descending order.
    """
    start = time.perf_counter()
    n_wanted = check_k(op, k, which)
    tol = check_tol(tol)
    if basis_device is not None and torch.device(basis_device) != op.device:
        op = OffloadedOperator(op, basis_device)
    n = op.global_n
    extra = guard_count(n_wanted) if extra is None else int(extra)
    if extra < 0:
        raise ValueError(f"extra must be >= 0, got {extra}")
    b = min(n_wanted + extra, n)
    budget = default_budget(n_wanted) if max_matvec is None else int(max_matvec)
    if budget < b:
        raise ValueError(f"max_matvec={budget} cannot pay for one block of {b} products: raise it")

    generator = make_generator(seed)
    X = torch.empty(op.n, 0, dtype=op.dtype, device=op.device)
    if X0 is not None:
        X0 = X0.reshape(op.n, -1) if X0.ndim == 1 else X0
        if X0.shape[0] != op.n:
            raise ValueError(f"X0 has {X0.shape[0]} rows, the operator acts on {op.n}")
        X = orthonormalize(op, X0[:, :b].to(op.device, op.dtype))
    while X.shape[1] < b:
        fill = orthonormalize(op, op.randn(b - X.shape[1], generator), against=X)
        X = torch.cat([X, fill], dim=1)

    AX = op.matmat(X)
    used = X.shape[1]
    check_finite(AX)
    theta, C = _rayleigh_ritz(op, X, AX)
    Cw = C.to(op.device, op.dtype)
    X, AX = combine(X, Cw), combine(AX, Cw)
    P = AP = None
    iterations, scale = 0, float(theta.abs().max())

    while True:
        R = AX - X * theta.to(op.device, op.dtype)[None, :]
        res = _residual_norms(op, R)
        scale = max(scale, float(theta.abs().max()))
        wanted = select(theta, k, which)
        conv = converged_mask(theta[wanted], res[wanted], tol, scale)
        # Only unconverged wanted columns are expanded: the guard columns still improve through every
        # Rayleigh-Ritz step, but paying products for their residuals does not speed up the wanted ones.
        active = torch.zeros_like(theta, dtype=torch.bool)
        active[wanted] = ~conv
        W = orthonormalize(op, R[:, active], against=X if P is None else torch.cat([X, P], dim=1))
        del R  # the residual block is not needed past this point: one block less at the peak
        if bool(conv.all()) or used + W.shape[1] > budget or W.shape[1] == 0:
            info = {
                "iterations": iterations,
                "block_size": b,
                "warm_start": X0 is not None,
                "basis_device": str(X.device),
            }
            guards = torch.ones_like(theta, dtype=torch.bool)
            guards[wanted] = False
            return finish(
                neighbours=X[:, guards] if bool(guards.any()) else None,
                theta=theta[wanted].to(op.device, op.dtype),
                vectors=X[:, wanted],
                res=res[wanted].to(op.device, op.dtype),
                conv=conv.to(op.device),
                n_hvp=used,
                start=start,
                tol=tol,
                which=which,
                method="lobpcg",
                info=info,
            )
        AW = op.matmat(W)
        used += W.shape[1]
        check_finite(AW)
        # Each block is freed once copied into S or AS: 9 blocks at most while they are assembled.
        S = torch.cat([X, W] if P is None else [X, W, P], dim=1)
        del X, W, P
        AS = torch.cat([AX, AW] if AP is None else [AX, AW, AP], dim=1)
        del AX, AW, AP
        theta_all, C = _rayleigh_ritz(op, S, AS)
        keep = select_block(theta_all, b, which)
        Cx = C[:, keep]
        # The new search directions are the W and P parts of the new Ritz vectors, made orthonormal
        # to the new block within the (orthonormal) basis S: pure coefficient algebra, no products.
        Cp = torch.cat([torch.zeros_like(Cx[:b]), Cx[b:]], dim=0)
        Cp = Cp - Cx @ (Cx.mT @ Cp)
        Cp = Cp - Cx @ (Cx.mT @ Cp)
        U, sv, _ = torch.linalg.svd(Cp, full_matrices=False)
        Cp = U[:, sv > 1e-10 * max(float(sv.max()), 1e-300)] if sv.numel() else U[:, :0]
        theta = theta_all[keep]
        Cx_w, Cp_w = Cx.to(op.device, op.dtype), Cp.to(op.device, op.dtype)
        X, AX = combine(S, Cx_w), combine(AS, Cx_w)
        P, AP = (combine(S, Cp_w), combine(AS, Cp_w)) if Cp.shape[1] else (None, None)
        del S, AS  # held until the next iteration's residuals otherwise: 6 blocks at that peak
        iterations += 1
