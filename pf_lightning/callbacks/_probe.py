"""Probe sets and loss functions for the callbacks: drawn from the trainer, measured on the module."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import math
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, SequentialSampler

from ..logging import warn_user

try:  # numpy is optional at run time
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

from ..curvature.distributed import any_rank, is_distributed, is_sharded
from ..curvature.state import measurement_context, measuring, rng_state
from ..measure import loss_of
from ..probe import (
    ProbeSet,
    couples_samples,
    move_to_device,
    plain_values,
    sample_count,
    sample_slice,
)

DEFAULT_PROBE_SIZE = 512


def training_input(trainer: Any, hooks: bool = True) -> Callable[[Any], Any]:
    """The conversion Lightning's training loop applies to a loader's batch before ``training_step``: the
    precision plugin's (float64 inputs under ``"64-true"``, bfloat16 under ``"bf16-true"``), the batch
    hooks ``on_before_batch_transfer``, ``transfer_batch_to_device`` and ``on_after_batch_transfer`` (the
    module's or the DataModule's, as the loop picks them), and the strategy's device move. Batches drawn
    from the loader (the default probe, the batch-sharpness draws) go through all of it, so they reach
    the loss as the training batches do; ``hooks=False`` (batches a user hands in, already in the form
    ``training_step`` takes) applies only the precision plugin and the device move, both idempotent.
    The hooks run with :func:`~pf_lightning.is_measuring` True and the random states restored."""
    module, strategy, precision = trainer.lightning_module, trainer.strategy, trainer.precision_plugin

    def convert(batch: Any) -> Any:
        with rng_state(), measuring():  # a hook's random augmentation must not move training's streams
            batch = precision.convert_input(batch)
            if not hooks:
                return move_to_device(batch, strategy.root_device)
            # The loop's own dispatch (module or DataModule hook); a call, nothing of the module is written.
            batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
            return strategy.batch_to_device(batch, dataloader_idx=0)

    return convert


def drawn_from_loader(probe: Any) -> bool:
    """Whether a monitor's ``probe`` argument asks for samples drawn from the training loader (None, or a
    number of samples) rather than giving its own batches."""
    return probe is None or isinstance(probe, int)


def keeps_batches_whole(pl_module: nn.Module, batch_size: int | str | None) -> bool:
    """Whether the loss couples a batch's samples, so that a probe's batches are neither cut nor stacked nor
    split into groups: the user's ``probe_batch_size="loader"``, or a module that shows it (batch
    normalization; :func:`~pf_lightning.probe.couples_samples`)."""
    return batch_size == "loader" or couples_samples(pl_module)


def build_probe(
    trainer: Any,
    pl_module: Any,
    probe: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch_size: int | str | None = None,
    hvp: str = "auto",
    params: Any = None,
    dtype: torch.dtype | None = None,
) -> ProbeSet:
    """The probe set a monitor's ``probe`` argument asks for, converted as training batches are.

    A probe drawn from the training loader is stacked into batches of ``batch_size`` samples (``None``:
    one batch), one forward pass each, where the loader's batches have one structure and shapes
    (:func:`stack_batches`): a product on 512 samples in one batch costs 2.5 times less than on four
    batches of 128 (REFERENCE §7). The loader's batches are kept with ``"loader"``, for a module whose
    loss couples a batch's samples (:func:`~pf_lightning.probe.couples_samples`), where ``loss_fn`` of
    a stacked batch does not have the objective of its batches (a loss with ``reduction="sum"``, a mean
    over the tokens of padded sequences, or one that couples samples in a way no module shows:
    :func:`_stacking_keeps_the_loss`), and, unless
    ``batch_size`` is given, where products keep no graph (``hvp="finite_difference"``, FSDP2's sharded
    parameters): a stacked probe would hold all its activations at once in every product."""
    if isinstance(probe, ProbeSet):
        convert = training_input(trainer, hooks=False)
        return ProbeSet([convert(b) for b in probe.batches], weights=probe.weights)
    if drawn_from_loader(probe):
        loader = trainer.train_dataloader
        if loader is None:
            raise MisconfigurationException(
                "no training dataloader to draw the probe from: pass `probe=` batches"
            )
        if isinstance(loader, Mapping | list | tuple | CombinedLoader):
            count = len(loader.flattened) if isinstance(loader, CombinedLoader) else len(loader)
            raise MisconfigurationException(
                f"the Trainer trains on {count} dataloaders (a {type(loader).__name__}): which samples"
                " of each make the loss is training_step's choice, so no probe is drawn from them: pass"
                " `probe=` batches in the form training_step receives them"
            )
        size = DEFAULT_PROBE_SIZE if probe is None else probe
        draw = functools.partial(
            draw_probe,
            loader,
            size,
            training_input(trainer),
            requested=probe is not None,
            max_batches=fixed_epoch(trainer) if _cut_short(trainer) else None,  # a whole loader ends itself
        )
        # A loss that couples a batch's samples is measured on whole batches, as training takes them: a cut
        # last batch (12 of 100) normalized over other statistics, 3% off a BatchNorm MLP's sharpness.
        coupled = keeps_batches_whole(pl_module, batch_size)
        drawn = draw(whole_batches=coupled)
        uncached = hvp == "finite_difference" or any(is_sharded(p) for p in pl_module.parameters())
        if coupled or (uncached and batch_size is None):
            return drawn
        stacked = stack_batches(drawn, batch_size)
        # Every rank stacks or none (batches padded to other lengths on one rank cannot be stacked): no
        # rank may wait in the check's collectives for one that skipped it.
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        if any_rank([stacked is drawn], device)[0]:
            return drawn
        keeps = _stacking_keeps_the_loss(pl_module, loss_fn, drawn, stacked, params, dtype, hvp)
        return stacked if keeps else draw(whole_batches=True)
    with untouched_iteration(probe):
        batches = list(probe)
    if not batches:
        raise MisconfigurationException(
            f"`probe` holds no batch ({type(probe).__name__} of none): pass batches with samples, or "
            "probe=None to draw them from the training loader"
        )
    convert = training_input(trainer, hooks=False)
    try:
        return ProbeSet([convert(b) for b in batches])
    except ValueError as err:  # said of the argument as the user named it
        raise MisconfigurationException(str(err).replace("`batches`", "`probe`", 1)) from err


class _Unstackable(Exception):
    pass


def _concat(items: list[Any], counts: list[int]) -> Any:
    """The batches ``items`` (of ``counts`` samples) as one, in their containers (dicts, lists, tuples,
    namedtuples, dataclasses): tensors with the samples along their leading dimension and per-sample lists
    (:func:`~pf_lightning.probe.plain_values`) concatenated, everything else equal in all of them."""
    first = items[0]
    if all(isinstance(x, Tensor) for x in items):
        if all(
            x.ndim and x.shape[0] == c and x.shape[1:] == first.shape[1:]
            for x, c in zip(items, counts, strict=True)
        ):
            return torch.cat(items)
        if all(x.shape == first.shape and torch.equal(x, first) for x in items):
            return first  # not per sample (e.g. a mask shared by the batch)
        raise _Unstackable
    if isinstance(first, collections.abc.Mapping) and all(
        isinstance(x, collections.abc.Mapping) and x.keys() == first.keys() for x in items
    ):
        merged = {key: _concat([x[key] for x in items], counts) for key in first}
        try:
            return type(first)(merged)
        except Exception:  # a mapping type that cannot be built from a dict
            return merged
    if dataclasses.is_dataclass(first) and all(type(x) is type(first) for x in items):
        out = copy.copy(first)
        for field in dataclasses.fields(first):  # frozen ones too
            object.__setattr__(out, field.name, _concat([getattr(x, field.name) for x in items], counts))
        return out
    if all(plain_values(x) and len(x) == c for x, c in zip(items, counts, strict=True)):
        return type(first)(v for x in items for v in x)  # per-sample texts or ids
    if isinstance(first, tuple | list) and all(
        type(x) is type(first) and len(x) == len(first) for x in items
    ):
        parts = [_concat([x[i] for x in items], counts) for i in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    if all(type(x) is type(first) for x in items):
        with contextlib.suppress(Exception):
            if all(bool(x == first) for x in items):
                return first
    raise _Unstackable


def _stacking_keeps_the_loss(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    drawn: ProbeSet,
    stacked: ProbeSet,
    params: Any = None,
    dtype: torch.dtype | None = None,
    hvp: str = "auto",
) -> bool:
    """Whether ``stacked`` (``drawn``'s batches joined) has the objective of ``drawn``: the sample-weighted
    mean of the loader batches' losses, in value and in gradient (warned where not).

    A loss that sums over samples comes out as many times larger as batches were stacked; a mean over
    the tokens of padded sequences weighs the samples by their token counts, and stacked batches pool
    those counts: the loss value may agree to 1e-4 (at initialization every token's loss is about the
    same) while the gradient and the Hessian differ by percents. So both are compared, over the whole
    probe, each within 10 rounding units of the measurement's dtype (at least 1e-4 relative), on the
    parameters (``params``), in the dtype (``dtype``) and with the backend's checkpointing (``hvp``) the
    measurement will use. A coupling that only the training mode shows (mixup gated on
    ``self.training``) is not seen: pass ``probe_batch_size="loader"`` for it.
    The passes run through :class:`~pf_lightning.curvature.HessianOperator` (each rank's shard, reduced
    over all ranks as in a measurement, so every rank gets the same answer), in evaluation mode (no
    dropout mask to tell the two apart), the module's modes, buffers and random states restored: one
    forward pass and one backward pass per batch of each. Where the check fails (a loss that raises, say)
    the loader's batches are kept on every rank, with a warning; the first measurement reports the loss."""
    from ..curvature.operator import HessianOperator

    settings = {"params": params, "dtype": dtype, "hvp": hvp}
    try:
        with measurement_context(module):
            module.eval()
            with HessianOperator(module, loss_fn, drawn, **settings) as op:
                gradient, loss = op.gradient(), op.loss()
                tol = max(1e-4, 10 * torch.finfo(op.space.dtype).eps)
            with HessianOperator(module, loss_fn, stacked, **settings) as op:
                both = torch.stack([gradient, op.gradient() - gradient], dim=1)
                loss_stacked = op.loss()
                norm, off = op.inner(both, both).diagonal().sqrt().tolist()  # over all ranks' slices
        loss_off = abs(loss_stacked - loss) / max(abs(loss), abs(loss_stacked), math.ulp(0.0))
        gradient_off = off / max(norm, math.ulp(0.0))
        keeps = loss_off <= tol and gradient_off <= tol
    except Exception as err:  # raised on every rank (the operator's collectives agree on failures)
        warn_user(
            f"the probe's stacking could not be checked ({type(err).__name__}: {err}): the probe keeps the "
            "training loader's batches",
            UserWarning,
        )
        return False
    if not keeps:
        warn_user(
            f"the probe's {len(drawn)} loader batches stacked into {len(stacked)} do not have the same loss "
            f"({loss_stacked:.10g} against their sample-weighted mean {loss:.10g}) or gradient (relative "
            f"difference {gradient_off:.2g}): the loss sums over samples (reduction='sum'), averages over "
            "the tokens of padded sequences, or couples samples, and weighs them differently in one batch. "
            "The probe keeps the training loader's batches, whole (one forward pass each, as "
            "probe_batch_size='loader'), so each is measured as it is trained",
            UserWarning,
        )
    return keeps


def stack_groups(weights: list[float], batch_size: int | None = None) -> list[list[int]]:
    """The indices of the consecutive batches (of ``weights`` samples) that :func:`stack_batches` joins
    into each batch of at most ``batch_size`` samples (``None``: all of them)."""
    groups: list[list[int]] = []
    for index, weight in enumerate(weights):
        if groups and (batch_size is None or sum(weights[i] for i in groups[-1]) + weight <= batch_size):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def stack_batches(probe: ProbeSet, batch_size: int | None = None) -> ProbeSet:
    """``probe``'s consecutive batches concatenated into batches of at most ``batch_size`` samples
    (``None``: all of them), the same samples in the same order; ``probe`` itself where its batches
    cannot be stacked (different structures, or shapes beyond the sample dimension, as with padded
    sequences of different lengths). A batch larger than ``batch_size`` stays as it is."""
    groups = stack_groups(probe.weights, batch_size)
    if len(groups) == len(probe):
        return probe
    batches, weights = [], []
    for group in groups:
        counts = [int(probe.weights[i]) for i in group]
        try:
            batches.append(_concat([probe.batches[i] for i in group], counts))
        except _Unstackable:
            return probe
        weights.append(float(sum(counts)))
    return ProbeSet(batches, weights=weights)


@contextlib.contextmanager
def held_draw_state(holder: Any) -> Iterator[None]:
    """Put back on exit what reading batches moves in ``holder``: the random generators it keeps as
    attributes (torch, NumPy, ``random``) and its plain attributes (numbers, strings, None). A dataset that
    samples or augments from a generator of its own (``self.g = torch.Generator()``) draws from it when a
    measurement reads batches, an ``IterableDataset`` whose ``__iter__`` reseeds from an epoch counter it
    advances (``self.epoch += 1``) counts the measurement's pass, and training must find both where they were."""
    plain = {
        name: value
        for name, value in getattr(holder, "__dict__", {}).items()
        if value is None or isinstance(value, str | bytes | int | float | bool)
    }
    saved = []
    # Its attributes, and a `generator` it exposes otherwise (a property, a slot), as torch's samplers name it.
    held = [*getattr(holder, "__dict__", {}).values(), getattr(holder, "generator", None)]
    for value in {id(v): v for v in held}.values():
        if isinstance(value, torch.Generator):
            saved.append((value.set_state, value.get_state()))
        elif isinstance(value, random.Random):
            saved.append((value.setstate, value.getstate()))
        elif np is not None and isinstance(value, np.random.Generator):
            saved.append(
                (lambda state, g=value.bit_generator: setattr(g, "state", state), value.bit_generator.state)
            )
        elif np is not None and isinstance(value, np.random.RandomState):
            saved.append((value.set_state, value.get_state()))
    try:
        yield
    finally:
        for restore, state in saved:
            restore(state)
        for name, value in plain.items():
            if holder.__dict__.get(name, value) is not value:
                holder.__dict__[name] = value


@contextlib.contextmanager
def untouched_iteration(loader: Any) -> Iterator[None]:
    """Iterate ``loader`` without moving the order in which training will read it.

    A shuffling ``DataLoader`` draws its order and its workers' base seed from the global generator, or
    from its own ``generator=`` (also its sampler's), and a sampler or a dataset may draw from generators
    of its own under any name (:func:`held_draw_state`): all of them are put back afterwards. A stream that can be read only
    once (a queue, a socket) loses what the probe reads: pass it ``probe=`` batches instead. With
    ``persistent_workers`` a new ``iter`` would create (or reset) the worker iterator that training
    keeps and resumes, so the batches are read in this process instead.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (
        loader,
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
        getattr(loader, "dataset", None),
    )
    in_process = isinstance(loader, DataLoader) and loader.persistent_workers and loader.num_workers > 0
    saved = {"num_workers": loader.num_workers, "timeout": loader.timeout} if in_process else {}
    try:
        for name in saved:  # a single-process iterator requires timeout == 0
            setattr(loader, name, 0)
        with rng_state(), contextlib.ExitStack() as held:
            for owner in {id(o): o for o in owners if o is not None}.values():
                held.enter_context(held_draw_state(owner))
            yield
    finally:
        for name, value in saved.items():
            setattr(loader, name, value)


def draw_probe(
    dataloader: Any,
    size: int,
    convert: Callable[[Any], Any],
    requested: bool = False,
    max_batches: int | None = None,
    whole_batches: bool = False,
) -> ProbeSet:
    """The first ``size`` samples the training dataloader yields, drawn once under isolated RNG.

    Iterating a shuffling loader draws from torch's global generator or the loader's own;
    :func:`untouched_iteration` puts them back, so building the probe leaves the training run's data
    order and random stream untouched. Under DDP the loader carries a ``DistributedSampler`` and each
    rank draws from its own shard. ``requested``: the size is the user's ``probe=N``, and a loader that
    holds fewer samples is warned about (the probe then holds all of them). ``max_batches``: the
    batches an epoch trains on, where they are the loader's first ones every epoch (:func:`fixed_epoch`).
    ``whole_batches``: no batch is cut, for a loss that couples a batch's samples (batch normalization): the
    probe ends with the last batch that fits in ``size``, or is the first batch where that holds more.
    """
    batches, counts, total, rounded = [], [], 0, False
    with untouched_iteration(dataloader):
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            count = sample_count(batch)
            if total + count > size and whole_batches:
                rounded = True
                if (
                    batches
                ):  # the probe ends at the last whole batch; a first batch beyond size is taken whole
                    break
            elif total + count > size:
                keep = size - total
                # A container it cannot cut: the whole batch, with its true count.
                with contextlib.suppress(IndexError, TypeError, RuntimeError, ValueError):
                    batch, count = sample_slice(batch, 0, keep), keep
            batches.append(convert(batch))
            counts.append(count)
            total += count
            if total >= size:
                break
    if not batches:
        raise MisconfigurationException(
            "the training dataloader yielded no batch to build the probe set from"
        )
    if rounded:
        rank_zero_info(
            f"pf-lightning: the probe keeps the loader's batches whole (the loss couples a batch's samples: "
            f"batch normalization, probe_batch_size='loader', or a loss whose batches are not their samples "
            f"pooled): {total} samples in {len(batches)} batch(es) for the {size} asked"
        )
    elif requested and total < size:
        shard = (
            " on rank 0 (under DDP probe=N counts per rank, each drawing from its shard)"
            if (is_distributed())
            else ""
        )
        source = (
            "the training dataloader yields"
            if max_batches is None
            else f"the {max_batches} batch(es) of the loader each epoch trains on (limit_train_batches, "
            "overfit_batches or fast_dev_run)"
        )
        warn_user(
            f"probe={size} asks for more samples than {source} ({total}){shard}: the "
            f"probe holds those {total} samples",
            UserWarning,
        )
    return ProbeSet(batches, weights=counts)


class TrainingBatches:
    """Fresh mini-batches drawn like the training loader's: from the indices its sampler yields in an epoch
    (a subset, a DDP shard, a weighted draw), through its dataset and collate function, of its batch size;
    under gradient accumulation one mini-batch is that many micro-batches (a :class:`ProbeSet`, measured
    one micro-batch at a time, as training holds them). Each draw has an order of its own from a seeded
    generator: the same seed draws the same batches, and the training run's data order and random streams
    are untouched (a dataset's own random generators included: :func:`held_draw_state`).

    Under DDP each rank draws from its own shard (its ``DistributedSampler``): the ``i``-th batches of all
    ranks form one global mini-batch of ``world_size`` times the per-rank size, as in training. The batches
    go through the training loop's conversion (:func:`training_input`: precision plugin, transfer hooks,
    device), as the probe does.

    Args:
        dataset: a map-style dataset.
        collate_fn: the loader's collate function.
        size: samples per micro-batch (the loader's batch size).
        convert: applied to each collated batch (None: none).
        pool: the indices to draw from (None: every index of ``dataset``).
        micro: micro-batches per mini-batch (the gradient accumulation).
        fixed: ``pool`` is the order of a fixed epoch (``limit_train_batches`` on a loader that does not
            shuffle): its consecutive mini-batches are the ones every epoch trains on, and draws are those,
            not regroupings of their samples.
    """

    def __init__(
        self,
        dataset: Any,
        collate_fn: Callable,
        size: int,
        convert: Callable[[Any], Any] | None = None,
        pool: list[int] | None = None,
        micro: int = 1,
        fixed: bool = False,
    ) -> None:
        self.dataset, self.collate_fn, self.size, self.convert = dataset, collate_fn, size, convert
        if pool is None:
            self.pool = torch.arange(len(dataset))
        else:
            self.pool = torch.as_tensor(list(pool) if fixed else sorted(pool), dtype=torch.long)
        self.micro, self.fixed = micro, fixed
        if size * micro > len(self.pool):
            raise ValueError(
                f"a mini-batch of {size * micro} samples is larger than the {len(self.pool)} samples drawn from"
            )

    @classmethod
    def from_trainer(cls, trainer: Any) -> TrainingBatches:
        """The plan of ``trainer``'s training loader.

        Raises:
            ValueError: the loader cannot be drawn from (no single ``DataLoader``, an iterable dataset,
                no batch size, or a mini-batch larger than an epoch), with the reason.
        """
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise ValueError(f"the training dataloader is a {type(loader).__name__}, not one DataLoader")
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                "the training dataset is iterable: fresh batches cannot be drawn from it by index"
            )
        size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
        if not isinstance(size, int) or size < 1:
            raise ValueError("the training dataloader has no fixed batch_size")
        sampler = _sampler(loader)
        with untouched_iteration(loader):  # a sampler may draw from the global or its own generator
            pool = [int(i) for i in sampler]
        trained = fixed_epoch(trainer)
        # A fixed order: its batches (the first ones under limit_train_batches) are all it trains on, not the
        # remainder a drop_last loader leaves.
        if trained is not None:
            pool = pool[: trained * size]
        whole = trained is None and len(pool) == len(dataset) and sorted(pool) == list(range(len(dataset)))
        return cls(
            dataset,
            loader.collate_fn,
            size,
            training_input(trainer),
            None if whole else pool,
            max(int(trainer.accumulate_grad_batches), 1),
            fixed=trained is not None,
        )

    def _fetch(self, indices: list[int]) -> Any:
        # A dataset's random transforms draw from the global generators, or from its own.
        with rng_state(), held_draw_state(self.dataset):
            # As DataLoader fetches: one __getitems__ call where the dataset batches its indexing.
            getitems = getattr(self.dataset, "__getitems__", None)
            samples = getitems(indices) if getitems is not None else [self.dataset[j] for j in indices]
            batch = self.collate_fn(samples)
        return batch if self.convert is None else self.convert(batch)

    def draw(self, count: int, seed: int) -> Iterator[Any]:
        """Up to ``count`` mini-batches, drawn lazily: consecutive slices of one random order of the pool
        (without replacement while the pool lasts, then a new order), the order from ``seed``. A fixed
        epoch's mini-batches are drawn whole, each once at most, in a random order of them (the same on
        every rank for the same ``seed``: each rank's ``i``-th is then its shard of one trained step)."""
        generator = torch.Generator().manual_seed(seed % 2**63)
        span = self.size * self.micro
        per_order = len(self.pool) // span
        if self.fixed:
            count = min(count, per_order)
            steps = self.pool[: per_order * span].view(per_order, span)
        for i in range(count):
            if i % per_order == 0:
                if self.fixed:
                    order = steps[torch.randperm(per_order, generator=generator)].reshape(-1)
                else:
                    order = self.pool[torch.randperm(len(self.pool), generator=generator)]
            start = (i % per_order) * span
            chunks = [
                order[start + j * self.size : start + (j + 1) * self.size].tolist() for j in range(self.micro)
            ]
            batches = [self._fetch(indices) for indices in chunks]
            yield batches[0] if self.micro == 1 else ProbeSet(batches)


def _sampler(loader: DataLoader) -> Any:
    return getattr(loader.batch_sampler, "sampler", None) or loader.sampler


def _cut_short(trainer: Any) -> bool | None:
    """Whether ``limit_train_batches`` ends each epoch before the loader does (None: an unsized loader)."""
    loader, batches = trainer.train_dataloader, trainer.num_training_batches
    if not isinstance(loader, DataLoader) or not math.isfinite(batches):
        return False
    try:
        return batches < len(loader)
    except TypeError:
        return None


def fixed_epoch(trainer: Any) -> int | None:
    """The batches an epoch trains on where the loader yields the same order every epoch (a sequential
    sampler, a ``DistributedSampler`` without shuffling): training then sees those batches only, every
    epoch, the loader's first ``limit_train_batches`` of them where that cuts the epoch short. None
    otherwise: a shuffled loader, whose epochs each group the set into other batches, or an unsized one."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or not math.isfinite(trainer.num_training_batches):
        return None
    return int(trainer.num_training_batches) if _same_order(_sampler(loader)) else None


def _same_order(sampler: Any) -> bool:
    """Whether ``sampler`` yields the same order every epoch (sequential, or a ``DistributedSampler`` that
    does not shuffle)."""
    return isinstance(sampler, SequentialSampler) or (
        isinstance(sampler, DistributedSampler) and not sampler.shuffle
    )


def trains_on_mini_batches(trainer: Any) -> bool:
    """Whether an optimizer step sees less than the data an epoch trains on: an epoch has more batches
    (after ``limit_train_batches``, per rank under DDP) than are accumulated into one step, or it is cut
    short of a shuffled loader (each epoch another random subset). An unsized loader counts as mini-batch
    training."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches > max(int(trainer.accumulate_grad_batches), 1):
        return True
    short = _cut_short(trainer)
    return short is None or (short and fixed_epoch(trainer) is None)


@contextlib.contextmanager
def _silenced_logging(module: nn.Module) -> Iterator[None]:
    """Keep a ``training_step``'s ``self.log`` calls out of the logs while it serves as a loss."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    module.log = lambda *args, **kwargs: None
    module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss of ``module.training_step(batch, 0)``: a tensor, the ``"loss"`` of a dict (or of a
    Hugging Face ``ModelOutput``), or the ``.loss`` attribute of any other output object."""
    with _silenced_logging(module):
        out = module.training_step(batch, 0)
    loss = loss_of(out)
    if loss is not None:
        return loss
    raise MisconfigurationException(
        f"training_step returned {type(out).__name__} without a `loss`; the Hessian monitor needs the loss: "
        "return it (or a dict or an object with `loss`), or pass `loss_fn=` to the callback "
        "(pf_lightning.measure.output_loss computes model(**batch).loss)"
    )


def _side_effects(module: nn.Module) -> dict[str, Any]:
    """What a loss call must leave alone and is not restored: the module's public plain attributes
    (numbers, strings; containers by identity and length) and every parameter's in-place version."""
    seen: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if isinstance(value, int | float | str | bool):
            seen[name] = value
        elif isinstance(value, list | dict | set | collections.deque):
            seen[name] = (id(value), len(value))
    for name, p in module.named_parameters():
        if not is_sharded(p):  # FSDP2 swaps its own parameters around a forward pass
            seen[name] = p._version  # bumped by every in-place update (an EMA teacher's copy_/mul_)
    return seen


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN is NaN


def resolve_loss_fn(module: Any, loss_fn: Callable | None) -> Callable:
    """The loss the measurement differentiates (a measurement runs compiled code eagerly, as its original).

    A loss call that changes the module's public plain attributes (a counter, a queue) or updates a
    parameter in place through autograd-visible ops (an EMA teacher's ``mul_``/``copy_``; updates through
    ``.data`` are not seen) is warned about, once per fit and monitor: the measurement runs the loss once
    per probe batch and product, and restores neither. Guard such updates with
    ``pf_lightning.is_measuring()``.
    """
    if loss_fn is None and not getattr(module, "automatic_optimization", True):
        raise MisconfigurationException(
            "with manual optimization, training_step steps the optimizer itself and cannot serve as a loss: "
            "pass `loss_fn=lambda module, batch: ...` to the callback"
        )
    base = loss_fn or training_step_loss
    source = "loss_fn" if loss_fn is not None else "training_step"
    warned: list[bool] = []

    def loss(module: nn.Module, batch: Any) -> Tensor:
        before = None if warned else _side_effects(module)
        out = base(module, batch)
        if before is not None:
            after = _side_effects(module)
            changed = sorted(k for k in before if not _same(after.get(k), before[k]))
            if changed:
                warned.append(True)
                warn_user(
                    f"{source} changed {', '.join(changed[:5])} while serving as a measurement's loss: a "
                    "measurement calls it once per probe batch and Hessian-vector product and restores neither "
                    "attributes nor in-place parameter updates. Guard them with `if not pf_lightning.is_measuring():`"
                    + (
                        ""
                        if loss_fn is not None
                        else ", or pass the callback a `loss_fn=` without side effects"
                    ),
                    UserWarning,
                )
        return out

    return loss
