"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

Ubaru, Chen & Saad (2017), as used for Hessians by Ghorbani et al. (2019) and PyHessian's ``density``:
``m`` Lanczos steps from a random unit vector ``v`` give a Gauss quadrature rule
:math:`v^\\top f(A) v \\approx \\sum_i w_i f(\\theta_i)` with the Ritz values :math:`\\theta_i` as nodes
and the squared first components of the eigenvectors of the tridiagonal :math:`T_m` as weights
(exact for polynomials of degree :math:`< 2m`). Averaged over start vectors and broadened by a
Gaussian, the rules estimate the normalized eigenvalue density
:math:`\\frac1n \\sum_j \\delta(t - \\lambda_j)`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from pf_lightning.linalg._common import lanczos_step
from pf_lightning.linalg.operator import LinearOperator
from pf_lightning.linalg.trace import rademacher

__all__ = ["SpectralDensity", "slq_density"]


@dataclass(frozen=True)
class SpectralDensity:
    """Gauss quadrature rules of an operator's spectrum, one per random start vector.

    Attributes:
        nodes: shape ``(n_vectors, m)``, float64 on the CPU: Ritz values, ascending per row. A start
            vector whose Lanczos run broke down early has its row padded with its first node at weight 0.
        weights: shape ``(n_vectors, m)``, float64 on the CPU: quadrature weights, each row sums to 1.
        n_hvp: operator applications (Hessian-vector products) the estimate cost.
        seconds: wall-clock time of the estimate.
    """

    nodes: Tensor
    weights: Tensor
    n_hvp: int
    seconds: float

    @property
    def spectral_range(self) -> float:
        """Width ``max(nodes) - min(nodes)`` of the estimated spectrum (a lower bound on the true one)."""
        return float(self.nodes.max() - self.nodes.min())

    def _scale(self) -> float:
        # A spectrum of one point (A = c I) has no width: fall back to the size of the point itself.
        width = self.spectral_range
        return width if width > 0 else max(1.0, float(self.nodes.abs().max()))

    def grid(self, n_points: int = 1000, pad: float = 0.05) -> Tensor:
        """Evenly spaced points over ``[min node - pad * range, max node + pad * range]`` (float64).

        Args:
            n_points: number of grid points (at least 2).
            pad: margin on each side, as a fraction of :attr:`spectral_range`.
        """
        if n_points < 2:
            raise ValueError(f"n_points must be >= 2 for a grid, got {n_points}")
        margin = pad * self._scale()
        lo, hi = float(self.nodes.min()) - margin, float(self.nodes.max()) + margin
        return torch.linspace(lo, hi, n_points, dtype=torch.float64)

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Gaussian-broadened density on ``grid``, averaged over start vectors.

        .. math::

            \\rho(t) = \\frac{1}{n_v} \\sum_{v} \\sum_i w_{v,i}\\,
            \\frac{1}{\\sqrt{2\\pi}\\sigma} e^{-(t - \\theta_{v,i})^2 / 2\\sigma^2}

        integrates to 1 over a grid that extends a few ``sigma`` past the extreme nodes.

        Args:
            grid: points ``t`` to evaluate at, any shape (e.g. from :meth:`grid`).
            sigma: width of the Gaussian; defaults to ``0.01 * spectral_range``.

        Returns:
            The density at ``grid``, same shape, float64 on the CPU.

        Raises:
            ValueError: when ``sigma`` is not positive.
        """
        sigma = 0.01 * self._scale() if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}; leave it None for 1% of the spectral range")
        t = grid.detach().to(device="cpu", dtype=torch.float64)
        z = (t.reshape(-1, 1, 1) - self.nodes) / sigma  # (points, vectors, m)
        kernel = torch.exp(-0.5 * z**2) / (math.sqrt(2 * math.pi) * sigma)
        return (kernel * self.weights).sum(-1).mean(-1).reshape(t.shape)

    def trace_estimate(self, n: int) -> float:
        """``n`` times the mean of :math:`\\sum_i w_i \\theta_i`: Hutchinson's estimate of ``tr(A)`` for an
        ``n x n`` operator, a consistency check of the quadrature."""
        return n * float((self.weights * self.nodes).sum(-1).mean())


def _lanczos_tridiagonal(op: LinearOperator, v: Tensor, n_steps: int) -> Tensor:
    """The ``m x m`` (``m <= n_steps``) float64 Lanczos tridiagonal from the unit vector ``v``."""
    V = torch.empty(n_steps, op.n, dtype=op.dtype, device=op.device)  # one basis vector per row
    V[0] = v
    alphas: list[float] = []
    betas: list[float] = []
    norm_estimate = 0.0
    tol = 1e3 * torch.finfo(op.dtype).eps
    for j in range(n_steps):
        coefficients, w, beta = lanczos_step(op, V, j)
        alpha = float(coefficients[j])
        alphas.append(alpha)
        if j == n_steps - 1:
            break
        norm_estimate = max(norm_estimate, abs(alpha), beta)
        # Breakdown: the Krylov space is invariant, T_j already holds the exact quadrature rule.
        if beta <= tol * norm_estimate:
            break
        betas.append(beta)
        torch.div(w, beta, out=V[j + 1])
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return T


def slq_density(
    op: LinearOperator, n_steps: int = 80, n_vectors: int = 4, *, seed: int = 0
) -> SpectralDensity:
    """Estimate the spectral density of a symmetric operator by stochastic Lanczos quadrature.

    For each of ``n_vectors`` random sign vectors :math:`v` (normalized), ``n_steps`` Lanczos steps with
    full reorthogonalization give :math:`T_m = U \\Theta U^\\top`; the nodes are :math:`\\theta_i` and the
    weights :math:`w_i = U_{1i}^2`, so that :math:`\\sum_i w_i \\theta_i^p = v^\\top A^p v` for
    :math:`p < 2m`. A run that breaks down (:math:`\\beta_j \\approx 0`) stops early with an exact rule.
    Vectors live in ``op.dtype``; the tridiagonal is solved in float64. Memory: ``n_steps`` vectors.

    Args:
        op: the symmetric operator.
        n_steps: Lanczos steps per start vector (= operator applications per vector), at most ``n``.
        n_vectors: number of random start vectors to average over.
        seed: seed of the CPU generator the start vectors are drawn from.

    Returns:
        The quadrature rules, their cost, and helpers to evaluate the density on a grid.

    Raises:
        ValueError: when ``n_steps < 2``, ``n_vectors < 1`` or ``n_steps`` exceeds the dimension.

    Example::

        >>> from pf_lightning.linalg.operator import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)))
        >>> sd = slq_density(op, n_steps=4, n_vectors=2)
        >>> sd.nodes[0].round(decimals=8)
        tensor([1., 2., 3., 4.], dtype=torch.float64)
        >>> round(sd.trace_estimate(op.n), 10)
        10.0
    """
    for name, value, minimum in (("n_steps", n_steps, 2), ("n_vectors", n_vectors, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if n_steps > op.global_n:
        raise ValueError(
            f"n_steps={n_steps} exceeds the dimension n={op.global_n} of the operator: a Krylov space "
            f"cannot grow past it, lower n_steps to at most {op.global_n}"
        )
    start_time, start_hvp = time.perf_counter(), op.n_matvec
    generator = torch.Generator().manual_seed(seed)
    nodes = torch.empty(n_vectors, n_steps, dtype=torch.float64)
    weights = torch.zeros(n_vectors, n_steps, dtype=torch.float64)
    for row in range(n_vectors):
        v = rademacher(op, 1, generator)[:, 0]
        v = v / torch.sqrt(op.inner(v, v))
        theta, U = torch.linalg.eigh(_lanczos_tridiagonal(op, v, n_steps))
        m = theta.numel()
        nodes[row, :m], nodes[row, m:] = theta, theta[0]
        weights[row, :m] = U[0] ** 2
    return SpectralDensity(
        nodes=nodes,
        weights=weights,
        n_hvp=op.n_matvec - start_hvp,
        seconds=time.perf_counter() - start_time,
    )
