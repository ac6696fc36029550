"""Symmetric linear operators as the eigensolvers see them.

The solvers in :mod:`pf_lightning.linalg` touch an operator through four calls only:
``matmat`` (apply to a block of column vectors), ``inner`` (the Gram matrix of two blocks),
``randn`` (a block of Gaussian start vectors) and ``local_rows`` (this process's rows of a block
drawn for the full length). Every inner product goes through ``inner``, so an operator whose vectors
are sharded across processes (FSDP) only has to all-reduce there, and the same algorithm runs
unchanged on one device, under DDP (replicated vectors) and on shards.

The solvers decide (convergence, restarts, breakdowns) only on what ``inner`` returns and on
products, so an operator that returns identical values on every process keeps the processes in step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DenseOperator", "LinearOperator", "OffloadedOperator", "ShiftedOperator", "gram"]

# One BLAS call takes at most 2**31 - 1 elements along its inner dimension (on CUDA, torch.dot of
# 2.1B-parameter vectors raises "dot only supports n ... <= 2147483647"): longer ones go in pieces.
_LONGEST = 2**31 - 1
_PIECE = 2**30


def gram(X: Tensor, Y: Tensor) -> Tensor:
    """``X^T Y`` of two blocks of rows ``(n, a)`` and ``(n, b)``, of a block and a vector, or the inner
    product of two vectors: summed over pieces of the rows where ``n`` is longer than one BLAS call takes."""
    if X.shape[0] <= _LONGEST:
        return X.mT @ Y if X.ndim == 2 else X @ Y
    total = gram(X[:_PIECE], Y[:_PIECE])
    for start in range(_PIECE, X.shape[0], _PIECE):
        total = total + gram(X[start : start + _PIECE], Y[start : start + _PIECE])
    return total


class LinearOperator:
    """A symmetric ``n x n`` operator acting on (local parts of) flat vectors.

    Subclasses implement :meth:`_matmat`; the base class counts applications so every result can
    say what it cost. ``n`` is the length of the local vectors; ``inner`` must return the *global*
    inner product, identical on every process.

    Args:
        n: length of the (local) vectors the operator acts on.
        dtype: floating dtype of those vectors.
        device: device of those vectors.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if n < 1:
            raise ValueError(f"an operator needs n >= 1, got n={n}")
        if not dtype.is_floating_point:
            raise ValueError(f"operators act on floating-point vectors, got dtype={dtype}")
        self.n = int(n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_matvec = 0

    @property
    def global_n(self) -> int:
        """Length of the full vectors (equals ``n`` unless vectors are sharded)."""
        return self.n

    def _matmat(self, X: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def matmat(self, X: Tensor) -> Tensor:
        """Apply the operator to the columns of ``X`` (shape ``(n, b)``).

        The product belongs to the caller: the solvers update it in place (Lanczos copies one that
        aliases its input, carries a graph or was made in inference mode first)."""
        if X.ndim != 2 or X.shape[0] != self.n:
            raise ValueError(f"matmat expects a block of shape ({self.n}, b), got {tuple(X.shape)}")
        self.n_matvec += X.shape[1]
        return self._matmat(X)

    def matvec(self, x: Tensor) -> Tensor:
        """Apply the operator to one vector of shape ``(n,)``."""
        return self.matmat(x.reshape(-1, 1)).reshape(-1)

    def inner(self, X: Tensor, Y: Tensor) -> Tensor:
        """Gram matrix ``X^T Y`` of two blocks (or inner product of two vectors), reduced globally."""
        return gram(X, Y)

    def randn(self, b: int, generator: torch.Generator) -> Tensor:
        """A ``(n, b)`` block of standard Gaussian vectors, identical on every process for a seed.

        Drawn on the CPU from ``generator`` and then moved, so a seed gives the same vectors on
        every device; in float64 for a float64 operator, in float32 otherwise (the CPU draws float32
        four times as fast: 7 against 29 ns an entry, 7 s against 29 s for a 1B-parameter start vector).
        """
        draw = torch.float64 if self.dtype == torch.float64 else torch.float32
        X = torch.randn(self.global_n, b, generator=generator, dtype=draw)
        return self.local_rows(X).to(device=self.device, dtype=self.dtype)

    def local_rows(self, X: Tensor) -> Tensor:
        """This process's rows of a ``(global_n, b)`` block drawn for the full vectors.

        The identity unless vectors are sharded; then every process takes its slice of one globally
        seeded block, so a seed gives the same (global) vectors however the operator is sharded.
        """
        return X


class DenseOperator(LinearOperator):
    """A symmetric matrix held in memory: the reference operator of the tests and doctests.

    Example::

        >>> A = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
        >>> op = DenseOperator(A)
        >>> op.matvec(torch.ones(3, dtype=torch.float64))
        tensor([ 3.,  1., -2.], dtype=torch.float64)
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, X: Tensor) -> Tensor:
        return self.matrix @ X


class ShiftedOperator(LinearOperator):
    """``sign * (A - shift * I)``: turns a search for one end of the spectrum into the other."""

    def __init__(self, base: LinearOperator, shift: float = 0.0, sign: float = 1.0) -> None:
        super().__init__(base.n, base.dtype, base.device)
        self.base, self.shift, self.sign = base, float(shift), float(sign)

    @property
    def global_n(self) -> int:
        return self.base.global_n

    def _matmat(self, X: Tensor) -> Tensor:
        Y = self.base.matmat(X)
        if self.shift:
            Y = Y - self.shift * X
        return Y if self.sign == 1.0 else self.sign * Y

    def inner(self, X: Tensor, Y: Tensor) -> Tensor:
        return self.base.inner(X, Y)

    def local_rows(self, X: Tensor) -> Tensor:
        return self.base.local_rows(X)


class OffloadedOperator(LinearOperator):
    """``base`` seen from another device: the solver keeps its vectors on ``device`` (host memory).

    Each application moves the block to ``base.device``, applies ``base`` there and moves the
    product back, so the base's device holds only the block being multiplied, its product and
    whatever the product itself needs; the basis and the orthogonalization stay on ``device``.
    Inner products go through ``base.inner`` (which reduces across processes where it must).

    Args:
        base: the operator.
        device: where the solver's vectors live (``"cpu"`` for a basis in host memory).
    """

    def __init__(self, base: LinearOperator, device: torch.device | str) -> None:
        super().__init__(base.n, base.dtype, device)
        self.base = base

    @property
    def global_n(self) -> int:
        return self.base.global_n

    def _matmat(self, X: Tensor) -> Tensor:
        return self.base.matmat(X.to(self.base.device)).to(self.device)

    def inner(self, X: Tensor, Y: Tensor) -> Tensor:
        return self.base.inner(X, Y)

    def local_rows(self, X: Tensor) -> Tensor:
        return self.base.local_rows(X)
