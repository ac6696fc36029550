"""Leave the model exactly as it was: the guard around every measurement.

A measurement must not disturb training (DESIGN principle 1). Inside :func:`measurement_context`
- buffers (BatchNorm running statistics) and module modes are restored bit for bit on exit; train-mode
  BatchNorm modules stop tracking running statistics for the duration, which leaves their output
  unchanged (batch statistics) and makes them pure functions that ``torch.func`` can transform;
- the CPU, CUDA, Python and NumPy random states are restored, so dropout masks drawn for the
  measurement do not shift the training run's random stream;
- autocast is disabled: second derivatives in float16 overflow to NaN (Lightning issue 12600);
- modules that follow Hugging Face's convention of a boolean ``gradient_checkpointing`` attribute
  (``model.gradient_checkpointing_enable()``) run without activation checkpointing, and get it back on
  exit: double backward through checkpointed segments is refused (reentrant) or can fail on recompute,
  and without it ``hvp="auto"`` stays exact, at the cost of the probe batch's full activations;
- FSDP2 modules are resharded on exit: a forward pass without backward leaves the root module's
  parameters gathered (plain tensors), and training's next pass, or the next measurement, expects
  them sharded;
- ``.grad`` is never written, since every backend uses ``torch.autograd.grad``; the training run's
  ``.grad`` tensors are set aside for the duration anyway and put back on exit, so a user loss function
  that calls ``backward`` writes fresh tensors instead of accumulating into them.

Everything is restored in ``finally`` blocks: a measurement that raises half-way (a NaN, a shape
error, a ``KeyboardInterrupt``) leaves the model exactly as one that finishes.

What the loss itself does beyond computing the loss is not undone: a ``training_step`` serving as the
loss runs once per probe batch and product, so a counter it increments, a queue it appends to, or a
parameter it updates in place (an EMA teacher) would move with every product. :func:`is_measuring` is
True inside every measurement, for a ``training_step`` to guard such updates with.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import reshard

try:  # numpy is optional at run time
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = [
    "cast_model",
    "drawn_quietly",
    "is_measuring",
    "measurement_context",
    "measuring",
    "rng_state",
    "seeded",
]


def _random_states() -> tuple[Any, ...]:
    """Every random state that training may draw from: torch CPU/CUDA, Python, NumPy."""
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state() if np is not None else None


def _set_random_states(states: tuple[Any, ...]) -> None:
    cpu, cuda, py, npy = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(py)
    if npy is not None:
        np.random.set_state(npy)


@contextlib.contextmanager
def rng_state() -> Iterator[None]:
    """Restore every random state that training may draw from (torch CPU/CUDA, Python, NumPy)."""
    saved = _random_states()
    try:
        yield
    finally:
        _set_random_states(saved)


def drawn_quietly(batches: Iterable[Any]) -> Iterator[Any]:
    """The items of ``batches``, drawn on a random stream of their own: iterating a ``DataLoader`` draws its
    base seed (and a shuffling sampler's) from torch's generator, and a dataset's random augmentation, a
    generator of random batches from the global ones, which would move the caller's (the training run's)
    streams. The iteration's stream starts where the caller's is and goes on from draw to draw (restored to
    the start before each, every batch drew the same numbers: a review); the caller's is put back after
    each. A list is iterated as it is."""
    if isinstance(batches, list | tuple):
        yield from batches
        return
    own: tuple[Any, ...] | None = None

    def quietly(action: Callable[[], Any]) -> Any:
        nonlocal own
        caller = _random_states()
        if own is not None:
            _set_random_states(own)
        try:
            return action()
        finally:
            own = _random_states()
            _set_random_states(caller)

    items = quietly(lambda: iter(batches))
    while True:
        try:
            item = quietly(lambda: next(items))
        except StopIteration:
            return
        yield item


def seeded(seed: int) -> None:
    """Seed torch's generators so that dropout masks repeat: call inside :func:`rng_state`.

    Only the generators :func:`rng_state` restores: the CPU one, and the CUDA ones once CUDA is
    initialized. (``torch.manual_seed`` would also queue a lazy CUDA seed in a process that has not
    initialized CUDA, formatting the Python stack each time, about 5 ms inside a Lightning fit, and
    that seed would land on the training run's CUDA generators if it initialized CUDA later.)
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def cast_model(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Run with every floating parameter and buffer of ``model`` in ``dtype``.

    ``.data`` is rebound to a cast copy and rebound back to the original tensor on exit: the original
    values come back bit for bit whatever the cast loses, and parameter identities (which optimizers
    hold) never change.
    """
    tensors = [
        t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.dtype != dtype
    ]
    if dtype is None or not tensors:
        yield
        return
    originals = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.to(dtype)
        yield
    finally:
        for t, original in zip(tensors, originals, strict=True):
            t.data = original


_MEASURING = contextvars.ContextVar("pf_lightning_measuring", default=False)


def is_measuring() -> bool:
    """True while a pf-lightning measurement runs the loss (in any of its passes), False otherwise.

    Guard what a ``training_step`` must do once per training step, not once per product::

        def training_step(self, batch, batch_idx):
            loss = ...
            if not pf_lightning.is_measuring():
                self.seen += len(batch)        # a counter, a queue, an EMA teacher's update
            return loss
    """
    return _MEASURING.get()


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Mark the block as part of a measurement: :func:`is_measuring` is True inside."""
    token = _MEASURING.set(True)
    try:
        yield
    finally:
        _MEASURING.reset(token)


@contextlib.contextmanager
def measurement_context(model: nn.Module, exact: bool = False) -> Iterator[None]:
    """Run a measurement on ``model`` and restore its buffers (values, and the tensors in their slots), modes,
    ``.grad`` and random states
    (on any exit, an exception included); :func:`is_measuring` is True inside. ``exact``: the products
    will need second-order autograd, so Hugging Face-style ``gradient_checkpointing`` is switched off
    for the duration (finite differences keep it, and its memory savings).

    ``torch.compile``d code (the module, a submodule, a function its forward calls) runs its original
    Python eagerly inside (``torch.compiler.set_stance("force_eager")``): compiled graphs have no double
    backward, and their backward, with donated buffers, not even the retained graph of a finite
    difference; nor does a measurement's pass compile graphs of its own. Training keeps its compiled
    graphs."""
    modes = [(m, m.training) for m in model.modules()]
    # The tensor each module's buffer slot holds, and its value: a forward that reassigns one (`self.ema =
    # 0.9 * self.ema + ...`, an EMA's usual form) leaves a new tensor there, which copying into the old one
    # would not undo.
    slots = [(m, name, b) for m in model.modules() for name, b in m._buffers.items()]
    buffers = list({id(b): (b, b.detach().clone()) for _, _, b in slots if b is not None}.values())
    grads = [(p, p.grad) for p in model.parameters()]
    tracking = [
        (m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm) and m.training
    ]
    checkpointing = (
        [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True] if exact else []
    )
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    with measuring():
        try:
            for p, _ in grads:
                p.grad = None
            for m, _ in tracking:
                m.track_running_stats = False
            for m in checkpointing:
                m.gradient_checkpointing = False
            with (
                rng_state(),
                torch.autocast(device_type=device_type, enabled=False),
                torch.compiler.set_stance("force_eager"),
            ):
                yield
        finally:
            for m, flag in tracking:
                m.track_running_stats = flag
            for m in checkpointing:
                m.gradient_checkpointing = True
            for m, name, b in slots:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, mode in modes:
                m.training = mode
            for p, g in grads:
                p.grad = g
            reshard(model)  # a pass without backward leaves FSDP2's root gathered
