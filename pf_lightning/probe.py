"""Probe sets: the fixed batches a curvature measurement is taken on, and their weights.

The Hessian of a probe set is that of the **mean** loss over the union of its samples, so each batch
is weighted by its sample count, not counted once: with batches of 64 and 36 samples the first
weighs 0.64. Under ``torch.distributed`` each rank holds its own shard; the operator adds the
weights of all ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import Checks, is_number

__all__ = [
    "ProbeSet",
    "couples_samples",
    "map_tensors",
    "move_to_device",
    "plain_values",
    "sample_count",
    "sample_slice",
]

_check = Checks()


def sample_count(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor that has one (depth-first through
    tuples, lists, dicts and dataclass-like objects with ``__dict__``), unless that is 1 and more of its
    tensors share another (a shared ``(1, T)`` mask placed first). A 0-dim tensor (a step counter, a scalar
    weight) is not per sample; a batch of 0-dim tensors alone is one sample."""
    tensors = list(_tensors(batch))
    counts = [int(t.shape[0]) for t in tensors if t.ndim]
    if counts:
        # max keeps the first of equals: the first tensor's count unless it is 1 and another is more common.
        return counts[0] if counts[0] != 1 else max(counts, key=counts.count)
    if tensors:
        return 1
    raise ValueError(
        f"cannot count the samples of a batch of type {type(batch).__name__}: it holds no tensor; pass "
        "`weights=` with one sample count per batch"
    )


def _tensors(batch: Any) -> Iterator[Tensor]:
    """The tensors of a (nested) batch, depth first."""
    if isinstance(batch, Tensor):
        yield batch
        return
    if isinstance(batch, Mapping):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        items = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):  # slotted ones have no __dict__
        items = [getattr(batch, field.name) for field in dataclasses.fields(batch)]
    elif hasattr(batch, "__dict__"):
        items = vars(batch).values()
    else:
        items = ()
    for item in items:
        yield from _tensors(item)


def couples_samples(model: nn.Module) -> bool:
    """Whether the loss of a batch couples its samples through the model (batch normalization, whose
    batch statistics enter every sample's output): its batches may then be neither stacked nor cut
    without changing the loss."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def plain_values(value: Any) -> bool:
    """Whether ``value`` is a non-empty list or tuple of plain values (strings, numbers, None): per-sample
    texts or ids where its length is the batch's sample count (a ``training_step`` that tokenizes)."""
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(v is None or isinstance(v, str | bytes | int | float | bool) for v in value)
    )


def map_tensors(
    batch: Any, fn: Callable[[Tensor], Tensor], values: Callable[[Sequence], Any] | None = None
) -> Any:
    """Apply ``fn`` to every tensor of a (nested) batch, keeping its containers (dicts, lists, tuples,
    namedtuples, dataclasses); ``values``, where given, to every list or tuple of plain values
    (:func:`plain_values`)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        out = copy.copy(batch)
        for field in dataclasses.fields(batch):  # frozen ones too
            object.__setattr__(out, field.name, map_tensors(getattr(batch, field.name), fn, values))
        return out
    if isinstance(batch, Mapping):
        return type(batch)({key: map_tensors(value, fn, values) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(value, fn, values) for value in batch))
    if isinstance(batch, list | tuple):
        if values is not None and plain_values(batch):
            return values(batch)
        return type(batch)(map_tensors(value, fn, values) for value in batch)
    return batch


def sample_slice(batch: Any, lo: int, hi: int) -> Any:
    """Samples ``lo:hi`` of a batch: every tensor whose leading dimension is its sample count and every list
    of per-sample values (:func:`plain_values`) cut there, the rest (a shared mask, a step counter) kept.

    Raises:
        ValueError: the batch holds its samples in a container this cannot take apart (not a tensor, dict,
            list, tuple, namedtuple or dataclass).
    """
    count = sample_count(batch)
    cut = map_tensors(
        batch,
        lambda t: t[lo:hi] if t.ndim and t.shape[0] == count else t,
        lambda v: v[lo:hi] if len(v) == count else v,
    )
    kept = len(range(count)[lo:hi])
    before = [t.shape[0] if t.ndim else None for t in _tensors(batch)]
    after = [t.shape[0] if t.ndim else None for t in _tensors(cut)]
    if kept != count and after != [kept if n == count else n for n in before]:  # a tensor left uncut
        raise ValueError(
            f"cannot cut a batch of type {type(batch).__name__} into groups of its samples: it holds them in a "
            "container other than tensors, dicts, lists, tuples, namedtuples or dataclasses; give batches in "
            "one of those"
        )
    return cut


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    return map_tensors(batch, lambda t: t.to(device))


class ProbeSet:
    """Fixed batches and their sample counts.

    Args:
        batches: a list (or any iterable that is not a tuple, such as a ``DataLoader``) of batches;
            a single batch (a ``Tensor``, a ``tuple`` such as ``(x, y)``, or a ``dict``) is one batch.
        weights: sample count of each batch; counted from the leading dimension otherwise.
        device: where to move the batches (their current device when ``None``).

    Raises:
        ValueError: no batch, a weight that is not positive, or a count that does not match.
    """

    def __init__(
        self,
        batches: Any,
        weights: Sequence[float] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(batches, ProbeSet):
            batches, weights = batches.batches, weights if weights is not None else batches.weights
        else:
            _check.batches("batches", batches, single_batch=True)
        if isinstance(batches, Tensor | tuple | Mapping):
            batches = [batches]
        from .curvature.state import drawn_quietly  # curvature builds on this module

        self.batches = list(drawn_quietly(batches))
        if not self.batches:
            raise ValueError("`batches` must hold at least one batch: the probe set is empty")
        device = _check.device("device", device)
        if device is not None:
            self.batches = [move_to_device(b, device) for b in self.batches]
        if weights is None:
            counts = []
            for batch in self.batches:
                try:
                    counts.append(sample_count(batch))
                except ValueError as err:
                    raise ValueError(
                        f"`batches` must hold a tensor in every batch, or pass `weights`: {err}"
                    ) from None
            if any(c <= 0 for c in counts):
                raise ValueError(
                    f"`batches` must hold batches with a positive sample count, got counts {counts}"
                )
        else:
            expected = f"None or one positive sample count per batch ({len(self.batches)}), each finite"
            if (
                isinstance(weights, str | bytes | Mapping)
                or (isinstance(weights, Tensor) and weights.ndim != 1)
                or not isinstance(weights, Iterable)
            ):
                _check.fail("weights", expected, weights)
            counts = [c.item() if isinstance(c, Tensor) and c.numel() == 1 else c for c in weights]
            if len(counts) != len(self.batches) or not all(
                is_number(c) and math.isfinite(c) and c > 0 for c in counts
            ):
                _check.fail("weights", expected, weights)
        self.weights = [float(c) for c in counts]

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def total_weight(self) -> float:
        """Samples on this process."""
        return sum(self.weights)
