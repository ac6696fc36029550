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

**Failures.** A rank never raises alone inside a measurement, whatever fails on it (a non-finite loss,
a loss function or a forward that raises on its probe shard only, an out-of-memory error): it holds
the exception (:class:`LocalFailure`), still takes the measurement's next collective with its part
poisoned by NaN, and every rank then sees a non-finite sum. Only then, and only on that path, one
more small collective exchanges what each rank held (:func:`reduce_agreed`), and every rank raises
at the same point: the rank's own exception when every rank raised the same type (as one process
would), :class:`MeasurementAborted` naming the failing rank when only some did (the failing rank
chains its original), or a non-finite error. The healthy path keeps one collective per product.

A rank that hangs or dies inside a measurement cannot be told apart from a slow one: the others wait
in the collective until the process group's timeout (``init_process_group(timeout=...)``; Lightning:
``DDPStrategy(timeout=...)``, 30 minutes by default), or fail at once when the rank's process exits
(gloo sees the connection close), and raise :class:`CollectiveFailure`. The process group is not
usable after that (gloo closes the pairs), so the fit must fail; it does not hang. (With NCCL the
timeout is enforced by its watchdog, which by default ends the process instead of raising; untested
here, where there is no multi-GPU machine.) The same holds for an exception inside a sharded (FSDP2)
forward or backward pass: FSDP issues its own collectives there, which a rank that left the pass
cannot match, so that rank raises :class:`CollectiveFailure` and the others wait for the timeout (or
fail at once when its process exits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CollectiveFailure",
    "LocalFailure",
    "MeasurementAborted",
    "ShardLayout",
    "all_reduce_sum",
    "any_rank",
    "data_parallel_size",
    "is_agreed",
    "is_distributed",
    "is_sharded",
    "local_part",
    "per_rank",
    "reduce_agreed",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class MeasurementAborted(RuntimeError):
    """Some ranks (not all, or not all alike) raised inside a measurement; every rank raises this.

    Every rank raises it at the same collective, so all of them leave the measurement together and the
    process group stays in step: skipping the measurement and training on is safe. On a rank that
    failed, the original exception is chained (``__cause__``).

    Attributes:
        rank: the lowest rank that raised.
        ranks: every rank that raised.
        error_type: the qualified class name of ``rank``'s exception.
        error_message: its message (at most about 1000 bytes of it).
    """

    def __init__(self, rank: int, error_type: str, error_message: str, ranks: tuple[int, ...] = ()) -> None:
        self.rank, self.error_type, self.error_message = int(rank), error_type, error_message
        self.ranks = tuple(ranks) or (self.rank,)
        others = f" (and ranks {list(self.ranks[1:])})" if len(self.ranks) > 1 else ""
        super().__init__(
            f"rank {rank}{others} raised {error_type} inside the measurement: {error_message}; "
            "every rank stopped the measurement at the same collective"
        )

    def __reduce__(self) -> tuple:  # picklable (multiprocessing hands exceptions between processes)
        return type(self), (self.rank, self.error_type, self.error_message, self.ranks)


class CollectiveFailure(RuntimeError):
    """A rank could not stay in step with the others: never skip this, let the fit fail.

    Raised when a collective of a measurement fails (a rank hung past the process group's timeout, or
    its process exited) and when a rank fails inside a sharded (FSDP2) forward or backward pass, whose
    own collectives the other ranks are then waiting in. The process group is not usable afterwards.
    """


_AGREED = "_pf_agreed"  # marks an exception every rank raises at the same point


def _agreed(error: BaseException) -> BaseException:
    try:
        setattr(error, _AGREED, True)
    except AttributeError:  # pragma: no cover - an exception type with __slots__
        pass
    return error


def is_agreed(error: BaseException) -> bool:
    """True for an exception every rank raised together (or one after which ranks cannot agree)."""
    return isinstance(error, MeasurementAborted | CollectiveFailure) or bool(getattr(error, _AGREED, False))


class LocalFailure:
    """Holds an exception of this rank's local work between two collectives of a measurement.

    As a context manager it swallows an ``Exception`` raised in its block under ``torch.distributed``
    and keeps it (the first one) until :meth:`take` hands it to the next collective
    (:func:`reduce_agreed`, :func:`any_rank`), which reports it to every rank. Without a process group,
    and for exceptions every rank already raised together, it lets the exception through unchanged.
    The code after the block must reach that collective without what the block failed to compute.
    """

    def __init__(self) -> None:
        self.error: Exception | None = None

    def __enter__(self) -> LocalFailure:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        if not isinstance(error, Exception) or not is_distributed() or is_agreed(error):
            return False
        if self.error is None:
            self.error = error
        return True

    def take(self) -> Exception | None:
        """The held exception (None if none), which the caller now reports; the hold is emptied."""
        error, self.error = self.error, None
        return error


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place: the one collective of the curvature layer.

    A raw ``all_reduce`` on one contiguous buffer (Lightning's ``strategy.reduce`` adds a barrier
    per call, and gloo has no average). Without a process group it returns ``tensor`` unchanged.

    Raises:
        CollectiveFailure: the all-reduce failed (a rank past the process group's timeout, or gone).
    """
    if is_distributed():
        try:
            dist.all_reduce(tensor)
        except RuntimeError as err:
            raise CollectiveFailure(
                f"an all-reduce of the measurement failed on rank {dist.get_rank()}: another rank hung past the "
                f"process group's timeout or exited; the process group is not usable any more ({err})"
            ) from err
    return tensor


@dataclass(frozen=True)
class _Report:
    rank: int
    nonfinite: bool  # a FloatingPointError (non-finite loss or product): skipped as such, not aborted
    error_type: str
    message: str


_REPORT_BYTES = 1024


def _exchange(error: BaseException | None, device: torch.device) -> list[_Report]:
    """What every rank held: one all-reduce of a ``(world, 1024)`` byte table, one row per rank."""
    table = torch.zeros(dist.get_world_size(), _REPORT_BYTES, dtype=torch.uint8, device=device)
    if error is not None:
        text = f"{type(error).__qualname__}\n{error}".encode(errors="replace")[: _REPORT_BYTES - 3]
        row = table[dist.get_rank()]
        row[0] = 2 if isinstance(error, FloatingPointError) else 1
        row[1], row[2] = divmod(len(text), 256)
        row[3 : 3 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    reports = []
    for rank, row in enumerate(all_reduce_sum(table).cpu().tolist()):
        if row[0]:
            size = 256 * row[1] + row[2]
            error_type, _, message = bytes(row[3 : 3 + size]).decode(errors="replace").partition("\n")
            reports.append(_Report(rank, row[0] == 2, error_type, message))
    return reports


def _raise_agreed(
    reports: list[_Report], error: BaseException | None, nonfinite: type[FloatingPointError]
) -> None:
    """Raise the same decision on every rank (``reports`` are identical everywhere)."""
    raised = [r for r in reports if not r.nonfinite]
    if raised:
        if (
            error is not None
            and len(raised) == dist.get_world_size()
            and len({r.error_type for r in raised}) == 1
        ):
            raise _agreed(error)  # every rank raised the same: as one process would
        first = raised[0]
        aborted = MeasurementAborted(
            first.rank, first.error_type, first.message, tuple(r.rank for r in raised)
        )
        raise _agreed(aborted) from error
    if reports:  # a non-finite loss on some rank: every rank skips it as such
        if error is not None:
            raise _agreed(error)
        raise _agreed(nonfinite(f"on rank {reports[0].rank}: {reports[0].message}"))


def reduce_agreed(
    buffer: Tensor,
    error: BaseException | None = None,
    nonfinite: type[FloatingPointError] = FloatingPointError,
) -> bool:
    """:func:`all_reduce_sum` of ``buffer`` (floating point) that also agrees on local failures.

    A rank passing ``error`` fills its ``buffer`` with NaN, so the sum is not finite on any rank; then,
    and only then, one more small collective (:func:`_exchange`) tells every rank what each one held,
    and all of them raise together: the local exception itself where every rank raised one of the same
    type, :class:`MeasurementAborted` where only some did, and for a non-finite loss somewhere
    (a ``FloatingPointError``) that rank's error, or ``nonfinite`` on the others.

    Returns:
        Whether the reduced ``buffer`` is finite (False: no rank failed, the values themselves are not).
    """
    if not is_distributed():
        if error is not None:
            raise error
        return bool(torch.isfinite(buffer).all())
    if error is not None:
        buffer.fill_(math.nan)
    if bool(torch.isfinite(all_reduce_sum(buffer)).all()):  # the same reduced bits on every rank
        return True
    _raise_agreed(_exchange(error, buffer.device), error, nonfinite)
    return False


def any_rank(
    flags: Sequence[bool],
    device: torch.device | str = "cpu",
    error: BaseException | None = None,
    nonfinite: type[FloatingPointError] = FloatingPointError,
) -> list[bool]:
    """For each flag, whether it is set on at least one rank (one small all-reduce; local without a group).

    ``error`` and ``nonfinite``: this rank's held local failure, reported as by :func:`reduce_agreed`.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return [bool(f) for f in flags]
    buffer = torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64, device=device)
    reduce_agreed(buffer, error, nonfinite)
    return [bool(v > 0) for v in buffer.tolist()]


def per_rank(value: float, device: torch.device | str = "cpu") -> list[float]:
    """Every rank's ``value``, in rank order (one all-reduce of a world-sized vector; ``[value]`` without a
    group): for a setting each rank reads from its own data that all of them must share."""
    if not is_distributed():
        return [float(value)]
    values = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    values[dist.get_rank()] = float(value)
    return all_reduce_sum(values).tolist()


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


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state (a no-op where it is there already).

    After a forward pass with no backward FSDP2 keeps the root module's parameters gathered, as plain
    tensors beside the other modules' DTensors (it would reshard them in the backward): the next pass
    would reuse them, and a measurement would find its parameters half sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


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
