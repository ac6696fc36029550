"""Long runs: memory does not grow with the number of measurements.

A real Trainer runs a small model for a few thousand optimizer steps with every callback measuring at
every step (HessianEigenMonitor, EdgeOfStabilityMonitor with its one-HVP proxies, LRAdaptation with a
DriftAdaptiveLR): thousands of eigensolves, proxy products and DAL measurements. After a warm-up (the
histories fill to their caps), the live tensors, their bytes, the Python objects and the resident set
size are compared at one third, two thirds and the end of the run. A negative control runs the same
harness with a listener that keeps every result (the leak a history without a cap would be) and shows
that the same check fails on it.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pf_lightning import (
    DriftAdaptiveLR,
    EdgeOfStabilityMonitor,
    EigenResult,
    HessianEigenMonitor,
    LRAdaptation,
)

STEPS = 2100
MAX_HISTORY = 200  # reached after 200 measurements, well before the first checkpoint

# Growth allowed from the first checkpoint to the last. A leak of one result per measurement adds
# 4 tensors and 86 KB of storage per step (k = 2 eigenvectors of 10756 parameters): 1200 tensors and
# 26 MB of storage and of RSS over the 300 steps between the negative control's checkpoints.
TOLERANCE = {"tensors": 20, "tensor_bytes": 64 * 1024, "objects": 600, "rss_mb": 8.0}


class Tiny(L.LightningModule):
    """A 16-512-4 tanh MLP (10756 parameters) on 256 fixed random samples, plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 512), nn.Tanh(), nn.Linear(512, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def rss_mb() -> float:
    """Resident memory after glibc hands its free pages back: what earlier tests in this process freed
    would otherwise take a leak in without any growth (a leak of 64 MB read 0.0 MB after other tests)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> list[torch.Tensor]:
    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]


@dataclass
class Snapshot:
    step: int
    tensors: int
    tensor_bytes: int
    objects: int
    rss_mb: float
    warning_registry: int


def snapshot(step: int) -> Snapshot:
    gc.collect()
    tensors = live_tensors()
    storages = {}
    for t in tensors:
        try:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            continue
    registries = [getattr(m, "__dict__", {}).get("__warningregistry__") for m in list(sys.modules.values())]
    registry = sum(len(r) for r in registries if isinstance(r, dict))
    return Snapshot(step, len(tensors), sum(storages.values()), len(gc.get_objects()), rss_mb(), registry)


class Checkpoints(L.Callback):
    """Snapshots of memory at the given optimizer steps (after every other callback's step hook)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps, self.snapshots = set(steps), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.snapshots.append(snapshot(trainer.global_step))


def growth(snapshots: list[Snapshot]) -> dict[str, float]:
    """Largest increase of each quantity over its value at the first snapshot."""
    first = snapshots[0]
    return {key: max(getattr(s, key) - getattr(first, key) for s in snapshots[1:]) for key in TOLERANCE}


def exceeded(snapshots: list[Snapshot]) -> list[str]:
    return [key for key, value in growth(snapshots).items() if value > TOLERANCE[key]]


def run(tmp_path, steps: int, extra_listener: Callable | None = None, critical_every_n_steps: int | None = 7):
    L.seed_everything(0)
    monitor = HessianEigenMonitor(
        k=2, every_n_steps=1, probe=32, tol=1e-2, max_hvp=20, max_history=MAX_HISTORY
    )
    if extra_listener is not None:
        monitor.add_listener(extra_listener)
    # Mini-batches of 32: batch sharpness at every measurement (on two batches), critical sharpness every 7.
    eos = EdgeOfStabilityMonitor(
        proxies=True, batch_sharpness_batches=2, critical_every_n_steps=critical_every_n_steps
    )
    adaptation = LRAdaptation(functools.partial(DriftAdaptiveLR, p=1.0, max_lr=1.0))
    checkpoints = Checkpoints([steps // 3, 2 * steps // 3, steps])
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[monitor, eos, adaptation, checkpoints],
        logger=CSVLogger(tmp_path),
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        # As in a plain Python run: each distinct message is shown once (here: to nowhere, where pytest
        # would keep every one) and remembered in its module's registry, which counts as our memory.
        warnings.simplefilter("default")
        warnings.showwarning = lambda *args, **kwargs: None
        trainer.fit(Tiny(), data())
    return trainer, monitor, eos, adaptation, checkpoints.snapshots


def assert_no_graph(value, where: str) -> None:
    """No tensor in ``value`` (nested lists, dicts, results) carries autograd history."""
    if isinstance(value, torch.Tensor):
        assert not value.requires_grad and value.grad_fn is None, where
    elif isinstance(value, EigenResult):
        for name in ("eigenvalues", "eigenvectors", "residuals", "converged", "neighbours", "gradient"):
            assert_no_graph(getattr(value, name), f"{where}.{name}")
        assert_no_graph(value.info, f"{where}.info")
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_no_graph(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            assert_no_graph(item, f"{where}[{i}]")


def only_plain_values(value) -> bool:
    """Histories hold floats, ints, strings and lists of them: nothing that could pin a tensor."""
    if isinstance(value, dict):
        return all(only_plain_values(v) for v in value.values())
    if isinstance(value, list):
        return all(only_plain_values(v) for v in value)
    return isinstance(value, int | float | str | bool) or value is None


@pytest.mark.slow
def test_memory_is_flat_over_thousands_of_measurements(tmp_path, one_thread):
    start = time.perf_counter()
    trainer, monitor, eos, adaptation, snapshots = run(tmp_path, STEPS)
    seconds = time.perf_counter() - start
    print(f"{STEPS} steps in {seconds:.1f} s")
    for s in snapshots:
        print(s)
    print("growth", growth(snapshots))

    # Every step measured: eigenpairs, EoS diagnostics and proxies, and DAL's ||Hg||/||g||.
    assert [s.step for s in snapshots] == [STEPS // 3, 2 * STEPS // 3, STEPS]
    assert monitor._last_step == STEPS and monitor.latest is not None
    assert exceeded(snapshots) == []

    # Every list, dict, set or deque a callback or the scheduler keeps is capped: after STEPS > MAX_HISTORY
    # measurements none holds more than MAX_HISTORY entries.
    (scheduler,) = adaptation.schedulers
    for owner in (monitor, eos, adaptation, scheduler):
        for name, value in vars(owner).items():
            if isinstance(value, list | dict | set | tuple | deque):
                assert len(value) <= MAX_HISTORY, f"{type(owner).__name__}.{name} holds {len(value)}"
    assert len(monitor.history) == MAX_HISTORY and len(eos.history) == MAX_HISTORY
    assert monitor.history[-1]["step"] == eos.history[-1]["step"] == STEPS
    assert eos.losses.maxlen == 50 and len(monitor._listeners) == 0  # the EoS monitor's, detached at fit end

    # Nothing kept holds an autograd graph.
    assert_no_graph(monitor.latest, "monitor.latest")
    assert only_plain_values(monitor.history) and only_plain_values(eos.history)
    assert_no_graph(dict(trainer.callback_metrics), "callback_metrics")
    assert_no_graph(vars(scheduler), "scheduler")


def test_the_check_catches_a_result_kept_per_measurement(tmp_path, one_thread):
    """Negative control: the same run and the same tolerances, with every result kept."""
    kept: list[EigenResult] = []
    steps = 450
    # Without the critical sharpness: its line search leaves freed pages in the allocator that the leaked
    # results then fill, so the RSS did not grow (0.0 MB against 29 MB without it; tensors and bytes did).
    keep = lambda trainer, module, result: kept.append(result)  # noqa: E731
    *_, snapshots = run(tmp_path, steps, extra_listener=keep, critical_every_n_steps=None)
    print("growth with a leak", growth(snapshots))
    assert len(kept) == steps + 1
    assert {"tensors", "tensor_bytes", "objects", "rss_mb"} <= set(exceeded(snapshots))
