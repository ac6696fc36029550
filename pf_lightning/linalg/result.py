"""The result of an eigen-measurement: numbers that carry their own accuracy and cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["EigenResult"]


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator with their residuals and cost.

    Attributes:
        eigenvalues: shape ``(k,)``, in descending order (for ``which="both"`` the top ones first,
            then the bottom ones, still descending).
        eigenvectors: shape ``(n, k)``, unit-norm columns matching ``eigenvalues`` (local shards when
            the vectors are sharded across processes).
        residuals: shape ``(k,)``, ``||H v - lambda v||`` for each pair: LOBPCG computes it, Lanczos
            estimates it from its recurrence, plus an estimate of the products' own error
            (``info["asymmetry"]``, see :func:`~pf_lightning.linalg.lanczos`).
        converged: shape ``(k,)``, bool: whether each pair met the tolerance.
        n_hvp: operator applications (Hessian-vector products) the measurement cost.
        seconds: wall-clock time of the measurement.
        tol: the relative residual tolerance that was asked for.
        which: ``"top"``, ``"bottom"`` or ``"both"``.
        method: the solver that produced it (``"lanczos"``, ``"lobpcg"``, ``"dense"``).
        info: free-form details (backend, restarts, warm start, ...).
        neighbours: shape ``(n, g)`` or None: approximate Ritz vectors of the next ``g`` eigenvalues
            beyond the wanted ones (below the top ones, above the bottom ones), when the solver was
            asked for them. A block warm start carries them as guards, so that a direction rising
            into the wanted ones is in its first Rayleigh-Ritz step.
        gradient: shape ``(n,)`` or None: the gradient of the loss whose Hessian the operator is, at the
            same parameters and in the eigenvectors' layout, when the measurement was asked for it
            (``hessian_eigenpairs(..., gradient=True)``: taken from the products' cached gradient graphs
            where they exist, so it costs no pass).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    n_hvp: int
    seconds: float
    tol: float = 1e-3
    which: str = "top"
    method: str = ""
    info: dict = field(default_factory=dict, compare=False)
    neighbours: Tensor | None = field(default=None, compare=False, repr=False)
    gradient: Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def k(self) -> int:
        """Number of eigenpairs held."""
        return int(self.eigenvalues.numel())

    @property
    def all_converged(self) -> bool:
        """True when every pair met the tolerance."""
        return bool(self.converged.all())

    @property
    def relative_residuals(self) -> Tensor:
        """``||H v - lambda v|| / |lambda|`` per pair (``|lambda|`` floored at 1e-30, so finite)."""
        return self.residuals / self.eigenvalues.abs().clamp_min(1e-30)
