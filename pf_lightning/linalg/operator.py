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

__all__ = [
    "DenseOperator",
    "LinearOperator",
    "OffloadedOperator",
    "ShiftedOperator",
    "combine",
    "gram",
    "recombine_rows_",
    "subtract_combination_",
]

# cuBLAS takes 32-bit sizes and leading dimensions (torch.dot of 6.57B-parameter vectors on an H200 raised
# "dot only supports n ... <= 2147483647"; gemv and gemm check theirs alike). Products along vectors longer
# than that go in contiguous pieces of _PIECE rows, each within the limits; elsewhere, and on devices
# whose torch does not hand such products to a 32-bit BLAS (the CPU falls back to its own loops), as one call.
_LONGEST = 2**31 - 1
_PIECE = 2**26
_LIMITED = ("cuda",)


def _too_long(*tensors: Tensor) -> bool:
    """A size, or the stride of a dimension longer than 1, over what one such BLAS call takes."""
    return any(
        t.device.type in _LIMITED
        and max([*t.shape, *(step for size, step in zip(t.shape, t.stride(), strict=True) if size > 1), 0])
        > _LONGEST
        for t in tensors
    )


def _pieces(n: int) -> list[slice]:
    return [slice(start, start + _PIECE) for start in range(0, n, _PIECE)]


# A float32 product along n adds its n terms one after another (torch 2.13's CPU BLAS): its error grows
# with n, where the float64 sum of short pieces' products does not. The Gram matrix of an (n, 4) block was
# off by 5e-4 at n = 2^20 and 3% at 2^24 (LOBPCG then returned 484 for a top eigenvalue of 10 at 2^22),
# and in pieces of 4096 terms within 2e-7. Inner products along more than _ONE_CALL entries go that way:
# one batched product of the pieces (at most _BATCHES of them), summed in float64.
_ONE_CALL = 2**16
_TERMS = 4096
_BATCHES = 2**16


def _summed_gram(X: Tensor, Y: Tensor) -> Tensor:
    """``X^T Y`` of ``(n, a)`` and ``(n, b)`` blocks in float64, from products of pieces of the rows.

    The block with fewer columns goes first (``(Y^T X)^T`` where ``b < a``): torch's CPU batched product
    of pieces ``(a, terms) @ (terms, 1)`` takes 4-6 times as long as ``(1, terms) @ (terms, a)``, the
    Lanczos step's ``basis^T w`` among them."""
    if Y.shape[1] < X.shape[1]:
        return _summed_gram(Y, X).mT
    n = X.shape[0]
    terms = max(_TERMS, -(-n // _BATCHES))
    whole = n - n % terms
    pieces = torch.bmm(X[:whole].unflatten(0, (-1, terms)).mT, Y[:whole].unflatten(0, (-1, terms)))
    total = pieces.sum(0, dtype=torch.float64)
    if whole < n:
        total += (X[whole:].mT @ Y[whole:]).double()
    return total


def gram(X: Tensor, Y: Tensor) -> Tensor:
    """``X^T Y`` of two blocks of rows ``(n, a)`` and ``(n, b)``, of a block and a vector, or the inner
    product of two vectors, in their dtype. Along more than ``_ONE_CALL`` entries it is summed in float64
    over short pieces (an accurate sum), and in contiguous pieces where one BLAS call cannot take the rows."""
    too_long = _too_long(X, Y)
    if X.shape[0] <= _ONE_CALL and not too_long:
        return X.mT @ Y if X.ndim == 2 else X @ Y
    X2, Y2 = (X[:, None] if X.ndim == 1 else X), (Y[:, None] if Y.ndim == 1 else Y)
    if not too_long:
        total = _summed_gram(X2, Y2)
    else:
        total = sum(
            _summed_gram(X2[rows].contiguous(), Y2[rows].contiguous()) for rows in _pieces(X.shape[0])
        )
    return total.reshape(X.shape[1:] + Y.shape[1:]).to(X.dtype)


def combine(X: Tensor, C: Tensor) -> Tensor:
    """``X C``: the rows ``(n, a)`` combined by a small ``(a, b)`` matrix or ``(a,)`` vector, piece by piece
    of the rows where one BLAS call cannot take them."""
    if not _too_long(X):
        return X @ C
    out = X.new_empty((X.shape[0], *C.shape[1:]))
    for rows in _pieces(X.shape[0]):
        out[rows] = X[rows].contiguous() @ C
    return out


def subtract_combination_(w: Tensor, X: Tensor, c: Tensor) -> Tensor:
    """``w -= X c`` in place for a vector ``w`` of length ``n``, rows ``X`` ``(n, a)`` and coefficients ``c``."""
    if not _too_long(w, X):
        return w.addmv_(X, c, alpha=-1)
    for rows in _pieces(X.shape[0]):
        w[rows].addmv_(X[rows].contiguous(), c, alpha=-1)
    return w


def recombine_rows_(V: Tensor, S: Tensor) -> None:
    """``V[:p] = S^T V[:m]`` in place for a basis of ``m`` or more rows of length ``n`` and an ``(m, p)``
    matrix ``S``, ``p <= m``.

    Column blocks are independent, so recombining ``m`` blocks of ``n / m`` entries one after the other
    needs less than one extra vector, where ``S^T V[:m]`` at once would need ``p`` of them; where one BLAS
    call cannot take a block (its rows are ``n`` apart), blocks of at most ``_PIECE`` columns are copied
    to contiguous ones first.
    """
    m, p = S.shape
    width = max(1, -(-V.shape[1] // m))
    long = _too_long(V)
    if long:
        width = min(width, _PIECE)
    St = S.mT
    for first in range(0, V.shape[1], width):
        block = V[:, first : first + width]
        block[:p] = St @ (block[:m].contiguous() if long else block[:m])


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
