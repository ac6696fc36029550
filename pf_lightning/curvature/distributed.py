r"""Everything the curvature layer does across processes, in one place.

Two layouts of the flat parameter vector occur under ``torch.distributed``:

- **replicated** (DDP): every rank holds all parameters and all solver vectors. Each rank applies the
  Hessian of its own probe shard and one flat ``all_reduce(SUM)`` of the sample-weighted products
  makes the operator global (:func:`all_reduce_sum`, the one reduction point). Inner products are
  local: the vectors are identical on every rank, so every quantity the solvers decide on is too.
- **sharded** (FSDP2, ``fully_shard``): parameters are DTensors and every rank holds a slice of
  each. Solver vectors live as the same local slices, so an inner product is a local Gram matrix
  all-reduced, and a start vector is this rank's slice of one globally seeded vector
  (:class:`ShardLayout`). Products go by finite differences of gradients taken with ordinary
  ``backward`` passes: second-order autograd does not run through FSDP2's all-gather, and its
  reduce-scatter of the gradients is then the reduction (FSDP averages over ranks, hence the
  loss scale of :func:`data_parallel_size`).

A rank that meets a non-finite value never raises alone: the decision goes through a collective
that every rank takes (:func:`any_rank`, or NaN propagated through the product's own reduction), so
all ranks skip a measurement together and none waits forever in a collective the others left.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "ShardLayout",
    "all_reduce_sum",
    "any_rank",
    "data_parallel_size",
    "is_distributed",
    "is_sharded",
    "local_part",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place: the one collective of the curvature layer.

    A raw ``all_reduce`` on one contiguous buffer (Lightning's ``strategy.reduce`` adds a barrier
    per call, and gloo has no average). Without a process group it returns ``tensor`` unchanged.
    """
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flags: Sequence[bool], device: torch.device | str = "cpu") -> list[bool]:
    """For each flag, whether it is set on at least one rank (one small all-reduce; local without a group)."""
    if not is_distributed():
        return [bool(f) for f in flags]
    buffer = torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64, device=device)
    return [bool(v > 0) for v in all_reduce_sum(buffer).tolist()]


# -- sharded (DTensor) parameters ------------------------------------------------------------------
def is_sharded(tensor: Tensor) -> bool:
    """True for a ``DTensor`` (an FSDP2 / tensor-parallel parameter or gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def local_part(tensor: Tensor) -> Tensor:
    """This rank's slice of a ``DTensor`` (a view sharing its storage); a plain tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def data_parallel_size(params: Sequence[Tensor]) -> int:
    """Ranks whose gradients FSDP averages: the size of the parameters' device mesh."""
    return int(params[0].device_mesh.size()) if params and is_sharded(params[0]) else 1


class ShardLayout:
    """Where this rank's slice of each sharded parameter sits in the global flat vector.

    The global flat vector is the concatenation of the flattened *full* parameters, in order; the
    local flat vector is the concatenation of the flattened local slices. Each local slice of an
    FSDP2 parameter is a box of the full tensor (``Shard(0)``: a block of rows), found with
    ``compute_local_shape_and_global_offset``, the function DTensor itself uses to place shards.

    Raises:
        ValueError: a placement whose local data is not one box of the full tensor.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        self.global_shapes = [tuple(p.shape) for p in params]
        self.global_numels = [p.numel() for p in params]
        self.boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        for p in params:
            local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            if tuple(local_shape) != tuple(p.to_local().shape):
                raise ValueError(
                    f"a DTensor parameter with placements {p.placements} does not hold one box of the full "
                    "tensor on each rank; measure FSDP2 models sharded with fully_shard (Shard placements)"
                )
            self.boxes.append((tuple(local_shape), tuple(offset)))
        self.global_n = sum(self.global_numels)

    def local_rows(self, X: Tensor) -> Tensor:
        """The rows of a global ``(global_n, b)`` block that this rank holds, as ``(n_local, b)``."""
        if X.shape[0] != self.global_n:
            raise ValueError(f"expected a global block of {self.global_n} rows, got {X.shape[0]}")
        pieces, start = [], 0
        for shape, numel, (local_shape, offset) in zip(
            self.global_shapes, self.global_numels, self.boxes, strict=True
        ):
            piece = X[start : start + numel].reshape(*shape, X.shape[1])
            for dim, (size, first) in enumerate(zip(local_shape, offset, strict=True)):
                piece = piece.narrow(dim, first, size)
            pieces.append(piece.reshape(-1, X.shape[1]))
            start += numel
        return torch.cat(pieces, dim=0)
