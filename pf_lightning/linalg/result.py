"""The result of an eigen-measurement: numbers that carry their own accuracy and cost."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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
        residuals: shape ``(k,)``, ``||H v - lambda v||`` for each pair.
        converged: shape ``(k,)``, bool: whether each pair met the tolerance.
        n_hvp: operator applications (Hessian-vector products) the measurement cost.
        seconds: wall-clock time of the measurement.
        tol: the relative residual tolerance that was asked for.
        which: ``"top"``, ``"bottom"`` or ``"both"``.
        method: the solver that produced it (``"lanczos"``, ``"lobpcg"``, ``"dense"``).
        info: free-form details (backend, restarts, warm start, ...).
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
        """``||H v - lambda v|| / |lambda|`` per pair (infinite where ``lambda == 0``)."""
        return self.residuals / self.eigenvalues.abs()

    def cpu(self) -> EigenResult:
        """A copy with every tensor on the CPU (for checkpoints and history)."""
        return EigenResult(
            eigenvalues=self.eigenvalues.cpu(),
            eigenvectors=self.eigenvectors.cpu(),
            residuals=self.residuals.cpu(),
            converged=self.converged.cpu(),
            n_hvp=self.n_hvp,
            seconds=self.seconds,
            tol=self.tol,
            which=self.which,
            method=self.method,
            info=dict(self.info),
        )

    def without_vectors(self) -> EigenResult:
        """A copy that drops the eigenvectors (what a long history should keep)."""
        return EigenResult(
            eigenvalues=self.eigenvalues.detach().cpu(),
            eigenvectors=torch.empty(0, self.k),
            residuals=self.residuals.detach().cpu(),
            converged=self.converged.detach().cpu(),
            n_hvp=self.n_hvp,
            seconds=self.seconds,
            tol=self.tol,
            which=self.which,
            method=self.method,
            info=dict(self.info),
        )
