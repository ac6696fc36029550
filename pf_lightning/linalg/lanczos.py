r"""Lanczos with full reorthogonalization and thick (Krylov-Schur) restarts.

For a symmetric operator :math:`A`, ``m`` steps of Lanczos build an orthonormal basis :math:`V_m` of
the Krylov space :math:`\mathcal K_m(A, v_0)` with

.. math::  A V_m = V_m T_m + \beta_m v_{m+1} e_m^\top ,

and the Ritz pairs :math:`(\theta_i, V_m s_i)` of :math:`T_m = V_m^\top A V_m` have residual norms
:math:`\|A V_m s_i - \theta_i V_m s_i\| = |\beta_m e_m^\top s_i|`, available without another product.
When the basis is full and the wanted pairs have not converged, the basis is compressed to the wanted
Ritz vectors and their nearest neighbours (Wu & Simon 2000, Stewart 2001) and Lanczos goes on from
:math:`v_{m+1}`: memory stays at ``basis_size + 1`` vectors whatever the number of steps.

Memory, in vectors of the operator's length ``n`` (parameter-sized vectors for a Hessian): the basis
``basis_size + 1`` (default ``max(2k + 10, 20)``, ``k`` counting both ends for ``which="both"``), and
one more: during a step the product, from which the projections on the basis are removed in place, and
at the end the ``k`` eigenvectors of the result (and with ``neighbours=True`` their ``max(2, k // 2)``
neighbours), formed while the basis is still there: :func:`lanczos_vectors`, measured in
``tests/test_memory.py``. What one product needs comes on top (for the Hessian operator: its
accumulator and the backend's own, see :mod:`pf_lightning.curvature.hvp`). A restart recombines the
basis in place, a block of entries of every vector at a time (less than one vector extra). A small
``basis_size`` (2 for ``k = 1``: 4 vectors) serves a model whose device holds only a few copies of its
parameters, at more products. With ``basis_device="cpu"`` the basis, the product and the result live in
host memory and the operator's device holds only the vector being multiplied and its product (plus the
product's own needs).

Every basis vector is reorthogonalized against the whole basis (two passes of classical Gram-Schmidt,
each one ``inner`` per step), which keeps the Ritz values free of the ghost copies that plain Lanczos
produces and makes the residual estimate trustworthy in float32.

The projected matrix, its eigenproblem, the convergence test and every other decision are float64 on the
CPU: a step moves one column of coefficients (and the remainder's squared norm) there in one transfer,
and only a restart and the result move small matrices back. On an accelerator the solver then waits on
the device once a step (it waited at up to five scalar reads and a float64 ``eigh`` on the device), and
launches no small kernels there; ``benchmarks/gpu.py`` (section ``floor``) measures what a step costs
beyond its product.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ._common import (
    check_k,
    check_tol,
    converged_mask,
    default_budget,
    finish,
    guard_count,
    lanczos_step,
    make_generator,
    orthonormalize,
    select,
    select_block,
)
from .operator import LinearOperator, OffloadedOperator, combine, recombine_rows_
from .result import EigenResult

__all__ = ["WARM_START_MIX", "default_basis_size", "lanczos", "lanczos_vectors"]

WARM_START_MIX = 1.0
"""Weight of the random vector added to a warm start (relative to the warm start's unit vector)."""


def default_basis_size(n_wanted: int, n: int) -> int:
    """Basis size used when none is given: room for the wanted pairs and as many again, at least 20."""
    return min(n, max(2 * n_wanted + 10, 20))


def lanczos_vectors(n_wanted: int, n: int, basis_size: int | None = None, neighbours: bool = False) -> int:
    """The most vectors of length ``n`` a :func:`lanczos` run holds at once (the module docstring's rule):
    the basis, ``basis_size + 1``, and one more during a step (the product being orthogonalized) or, at the
    end, the ``n_wanted`` eigenvectors and their neighbours. The operator's own needs come on top, and
    so does, for the one step that follows a breakdown (an exactly invariant Krylov space, rare before
    the basis spans most of a small operator), the fresh vector drawn and orthonormalized (about 4).

    Example::

        >>> lanczos_vectors(1, 10**9), lanczos_vectors(1, 10**9, neighbours=True), lanczos_vectors(1, 10**9, 2)
        (22, 24, 4)
    """
    m = min(n, basis_size if basis_size is not None else default_basis_size(n_wanted, n))
    return m + 1 + max(1, n_wanted + (guard_count(n_wanted) if neighbours else 0))


def _explored(
    H: Tensor,
    j: int,
    block: int,
    broke: bool,
    found: Tensor | None,
    values: Tensor,
    k: int,
    which: str,
    tol: float,
    scale: float,
) -> tuple[bool, Tensor | None]:
    """Whether converged wanted values can be returned after a breakdown, and the values to remember.

    An invariant Krylov space holds each distinct eigenvalue once: a repeated one (the zero eigenvalues
    of a low-rank Hessian, the copies a symmetry makes) has further directions outside it. Its Ritz pairs
    are exact, so their residuals say nothing about those: the basis goes on from a fresh direction
    orthogonal to it. When that block closes as an invariant space too (``broke``), the values are
    returned once the wanted ones no longer change from one such block to the next (``found``: at the
    previous); otherwise once the newest block (from row ``block``) has converged the wanted end of its
    own spectrum, as a Lanczos run from that fresh direction would before returning.
    """
    values = torch.sort(values).values
    if (
        broke
    ):  # unchanged: each value within the tolerance of the previous block's, as `converged_mask` judges
        same = found is not None and bool(converged_mask(values, (values - found).abs(), tol, scale).all())
        return same, values
    T = H[block:j, block:j]
    theta, S = torch.linalg.eigh(0.5 * (T + T.mT))
    own = select(theta, k, which)
    res = abs(float(H[j, j - 1])) * S[-1, own].abs()
    return bool(converged_mask(theta[own], res, tol, scale).all()), found


def lanczos(
    op: LinearOperator,
    k: int = 5,
    *,
    which: str = "top",
    tol: float = 1e-3,
    max_matvec: int | None = None,
    basis_size: int | None = None,
    v0: Tensor | None = None,
    seed: int = 0,
    basis_device: torch.device | str | None = None,
    neighbours: bool = False,
    first_test: int | None = None,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Args:
        op: the symmetric operator.
        k: eigenpairs wanted (at each end for ``which="both"``).
        which: ``"top"`` (largest algebraic), ``"bottom"`` (smallest algebraic) or ``"both"``.
        tol: relative residual tolerance, ``||A v - lambda v|| <= tol * |lambda|`` (eigenvalues below
            1% of the spectral scale are measured against that 1%).
        max_matvec: budget of operator applications; the result is flagged non-converged and a
            :class:`NonConvergenceWarning` is raised when it runs out. Default ``max(300, 40 * k)``.
        basis_size: Lanczos vectors kept between restarts (memory: :func:`lanczos_vectors`); any value
            above the number of wanted pairs converges, a small one in more products.
        v0: a warm start (e.g. the sum of a previous result's eigenvectors): the start vector is its
            direction plus a seeded Gaussian one of equal norm (:data:`WARM_START_MIX`), so that a
            direction the previous result missed is still in the Krylov space; the Gaussian alone otherwise.
        seed: seed of the start vector and of any vector drawn after a breakdown.
        basis_device: keep the basis (and the returned eigenvectors) on this device, e.g. ``"cpu"``
            for a model too large for the accelerator to hold ``basis_size + 1`` copies of its
            parameters; each product moves one vector there and back. ``None``: the operator's device.
        neighbours: also return the Ritz vectors of the next ``max(2, k // 2)`` Ritz values beyond the
            wanted ones (``EigenResult.neighbours``, approximate: they were not asked to converge), the
            guards of a later block warm start; formed with the eigenvectors, while the basis is there.
        first_test: the product after which convergence is first tested. Default: from a cold start the
            default basis size, ``max(2 k + 10, 20)`` (the start vector's weight on each wanted direction
            has then been amplified by a polynomial of that degree), or the basis where it is smaller; from
            a warm one (a usable ``v0``) the number of wanted pairs. A smaller value saves products where
            the wanted end of the spectrum is known to stand well apart.

    Returns:
        An :class:`EigenResult` with eigenvalues in descending order. Its residuals are the recurrence's
        estimate plus the largest asymmetry of the projected matrix (``info["asymmetry"]``, relative to the
        spectral scale): an estimate of the products' own error, which the recurrence cannot see (its
        antisymmetric part only). Once every wanted pair has converged or is kept from ``tol`` by that floor
        alone (``info["floored"]`` of them), the run stops, those flagged and warned.

    Example::

        >>> from pf_lightning.linalg import DenseOperator
        >>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
        >>> r = lanczos(DenseOperator(A), k=2, tol=1e-10)
        >>> [round(float(e), 6) for e in r.eigenvalues]
        [50.0, 49.0]
    """
    start = time.perf_counter()
    n_wanted = check_k(op, k, which)
    tol = check_tol(tol)
    if basis_device is not None and torch.device(basis_device) != op.device:
        op = OffloadedOperator(op, basis_device)
    n = op.global_n
    m = basis_size if basis_size is not None else default_basis_size(n_wanted, n)
    if isinstance(m, bool) or not isinstance(m, int) or m < min(n, n_wanted + 1):
        raise ValueError(f"basis_size must be an int > the number of wanted pairs ({n_wanted}), got {m!r}")
    m = min(m, n)
    budget = default_budget(n_wanted) if max_matvec is None else int(max_matvec)
    if budget < n_wanted:
        raise ValueError(
            f"max_matvec must be at least the {n_wanted} pairs wanted (one product each), got {max_matvec!r}"
        )
    if first_test is not None and (
        isinstance(first_test, bool) or not isinstance(first_test, int) or first_test < 1
    ):
        raise ValueError(f"first_test must be a positive int (a product count), got {first_test!r}")

    generator = make_generator(seed)
    v = op.randn(1, generator)[:, 0]
    nrm = float(op.inner(v, v)) ** 0.5
    warm = False  # a usable v0: the Gaussian alone otherwise, a cold start
    if v0 is not None:
        w = v0.reshape(-1).to(op.device, op.dtype)
        if w.shape[0] != op.n:
            raise ValueError(f"v0 has {w.shape[0]} entries, the operator acts on {op.n}")
        w_norm = float(op.inner(w, w)) ** 0.5
        if math.isfinite(w_norm) and w_norm > 0.0:
            # The previous directions plus a random one of equal weight: a start vector from the previous
            # eigenvectors alone can be all but orthogonal to a direction that has just become the
            # sharpest, and Lanczos then converges, residual and all, on the one below it (seen on NAdam).
            v.mul_(WARM_START_MIX / nrm).add_(w, alpha=1.0 / w_norm)  # in place: v is the solver's own
            nrm = float(op.inner(v, v)) ** 0.5
            warm = True
        del w

    # One basis vector per row: each new vector is written, and each product's input read, in one
    # contiguous stretch (columns of an (n, m + 1) matrix cost 30% more per step on a CPU at n = 55k).
    V = torch.empty(m + 1, op.n, dtype=op.dtype, device=op.device)  # a row is written before it is read
    torch.div(v, nrm, out=V[0])
    del v
    # The projected matrix, its eigenproblem and every decision live on the host, in float64:
    # `lanczos_step` moves one column of coefficients there a step, nothing moves back until a restart.
    H = torch.zeros(m + 1, m, dtype=torch.float64)
    eps = torch.finfo(op.dtype).eps
    used, restarts, scale, asymmetry = 0, 0, 0.0, 0.0
    # After a breakdown (an invariant Krylov space) the basis goes on from a fresh direction, a new block of
    # the projected matrix: `block` is where the newest one began (0: none this cycle), `found` the wanted
    # values when the last block closed (see `_explored`).
    block, found = 0, None
    # A residual test cannot see a direction the Krylov space has not reached yet. A cold start builds the
    # default basis's worth of vectors (20 for up to 5 wanted pairs) before its first test, as ARPACK does:
    # the start vector's weight on the top eigenvector has then been amplified by a polynomial of that
    # degree. Tested from the k-th step, Lanczos returned lambda_1 and lambda_3 for the top 2 of a spectrum
    # [1, 0.95, 0.9, bulk <= 0.5] from 2 of 100 random starts (20 of 100 at a 0.5% gap), converged, in
    # 12-14 products; none of 100 in 20. A warm start holds the previous directions and tests from the k-th
    # step, and so does a run whose Krylov space has become invariant (all it can reach is in the basis).
    if first_test is None:
        first_test = n_wanted if warm else min(m, default_basis_size(n_wanted, n))
    # What A V_j = V_j H_j leaves out beyond the last coupling, a bound per basis vector: a coupling set to 0
    # at a breakdown, and after a restart what the kept Ritz vectors inherit of those (triangle inequality).
    slack = torch.zeros(m + 1, dtype=torch.float64)

    j = 0
    while True:
        H[: j + 1, j], w, beta = lanczos_step(op, V, j)
        used += 1
        scale = max(scale, float(H[: j + 1, j].abs().max()))
        complete = broke = False
        # Invariant to the tolerance: every Ritz pair would pass the test (the floor of `converged_mask`).
        if beta > max(100 * eps, 1e-2 * tol) * max(scale, 1e-300):
            H[j + 1, j] = beta
            torch.div(w, beta, out=V[j + 1])
            del w  # the basis and the product are all a step holds
        else:
            del w
            # An invariant subspace (to the tolerance): its Ritz pairs are exact. Continue from a fresh direction
            # (coupling 0) unless the basis already spans the whole space.
            H[j + 1, j] = 0.0
            slack[j] += beta
            against = V[: j + 1].mT
            fresh = (
                orthonormalize(op, op.randn(1, generator), against=against)
                if j + 1 < n
                else V.new_empty(op.n, 0)
            )
            del against
            complete = fresh.shape[1] == 0
            broke = not complete
            if broke:
                block = j + 1
            V[j + 1] = 0.0 if complete else fresh[:, 0]
        j += 1
        early = used < first_test and not block  # before the first test (see first_test)
        if (j < n_wanted or (early and j < m)) and not complete and used < budget:
            continue

        # Rayleigh-Ritz on the projected matrix: a j x j eigenproblem, negligible next to a product.
        T = H[:j, :j]
        # A symmetric operator's projections are symmetric to its products' own error: what they differ by,
        # beyond the couplings `slack` already counts (a breakdown's, which the next column sees), is a floor
        # under every residual that the recurrence's estimate cannot see (README, "tol").
        gap = (T - T.mT).abs_().sub_(slack[:j, None]).sub_(slack[None, :j])  # one j x j matrix, in place
        asymmetry = max(asymmetry, float(gap.max()))
        del gap  # not alive beside the eigenproblem's matrices (tests/test_memory.py counts them)
        theta, S = torch.linalg.eigh(0.5 * (T + T.mT))
        beta_last = float(H[j, j - 1])
        res = abs(beta_last) * S[j - 1, :].abs() + slack[:j] @ S.abs() + asymmetry
        scale = max(scale, float(theta.abs().max()))
        wanted = select(theta, k, which)
        conv = converged_mask(theta[wanted], res[wanted], tol, scale)
        # The wanted pairs that the floor alone keeps from their tolerance: once the recurrence's part of their
        # residual is down to the floor, more products do not help them.
        floored = ~converged_mask(theta[wanted], torch.full_like(res[wanted], asymmetry), tol, scale)
        settled = conv | (floored & (res[wanted] <= 2 * asymmetry))
        done = bool(conv.all()) and not early  # a full basis before first_test: restart, no test
        if done and (broke or block):
            done, found = _explored(H, j, block, broke, found, theta[wanted], k, which, tol, scale)
        stuck = not early and bool(floored.any()) and bool(settled.all())
        if done or complete or used >= budget or stuck:
            vectors = combine(V[:j].mT, S[:, wanted].to(op.device, op.dtype))
            guards = None
            if neighbours:  # formed on their own: a slice of one product would keep it all alive
                near = select_block(theta, n_wanted + guard_count(n_wanted), which)
                extra = near[~torch.isin(near, wanted)]
                guards = combine(V[:j].mT, S[:, extra].to(op.device, op.dtype)) if extra.numel() else None
            info = {
                "restarts": restarts,
                "basis_size": m,
                "warm_start": warm,
                "basis_device": str(V.device),
                "asymmetry": asymmetry / scale if scale > 0 else 0.0,
                "floored": int((floored & ~conv).sum()),  # pairs left unconverged by the products' own error
            }
            del V  # free the basis before the result's vectors are sorted (a copy of k)
            return finish(
                neighbours=guards,
                theta=theta[wanted].to(op.device, op.dtype),
                vectors=vectors,
                res=res[wanted].to(op.device, op.dtype),
                conv=conv.to(op.device),
                n_hvp=used,
                start=start,
                tol=tol,
                which=which,
                method="lanczos",
                info=info,
            )
        if j < m:
            continue

        # Thick restart: keep the wanted Ritz vectors and their nearest unwanted neighbours, which
        # carry the information that speeds up the next cycle.
        n_keep = min(n_wanted + (m - n_wanted) // 2, m - 1)
        keep = select_block(theta, n_keep, which)
        recombine_rows_(V, S[:, keep].to(op.device, op.dtype))
        V[n_keep] = V[m]
        H.zero_()
        H[:n_keep, :n_keep] = torch.diag(theta[keep])
        H[n_keep, :n_keep] = beta_last * S[m - 1, keep]
        slack[:n_keep] = slack[:m] @ S[:, keep].abs()
        slack[n_keep:] = 0.0
        j = n_keep
        restarts += 1
        block = 0  # the kept Ritz vectors mix the blocks: the next cycle is one Krylov space
