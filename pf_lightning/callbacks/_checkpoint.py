"""What a :class:`~pf_lightning.HessianEigenMonitor` keeps in a checkpoint, and how it comes back.

The latest eigenvectors (``n x k`` floats) warm-start the first measurement after a resume. They are
left out when asked (``checkpoint_eigenvectors=False``: large models, small checkpoints) and always
when they are FSDP2 shards: the callback state is saved from rank 0 only, so a resumed run would
hand rank 0's slice to every rank, whose slices differ (and may differ in size). Without vectors the
first measurement after a resume starts cold.
"""

from __future__ import annotations

from typing import Any

import torch

from ..linalg import EigenResult


def result_state(result: EigenResult | None, with_vectors: bool) -> dict[str, Any] | None:
    """The result as plain CPU tensors; ``eigenvectors`` empty unless kept and not sharded."""
    if result is None:
        return None
    keep = with_vectors and not result.info.get("sharded", False)
    vectors = result.eigenvectors.detach().cpu() if keep else torch.empty(0, result.k)
    return {
        "eigenvalues": result.eigenvalues.detach().cpu(),
        "eigenvectors": vectors,
        "residuals": result.residuals.detach().cpu(),
        "converged": result.converged.detach().cpu(),
        "n_hvp": result.n_hvp,
        "seconds": result.seconds,
        "tol": result.tol,
        "which": result.which,
        "method": result.method,
    }


def result_from_state(state: dict[str, Any] | None) -> EigenResult | None:
    return None if state is None else EigenResult(**state)
