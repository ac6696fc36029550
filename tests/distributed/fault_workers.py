"""Rank functions of the fault tests (``test_faults.py``): ranks that raise, hang or die inside a measurement.

``faults`` runs on plain gloo ranks started by ``launch``, which sets the process group's timeout and
never waits past a deadline (a rank of it dies on purpose); ``fit`` is the Lightning run (ddp_spawn).
"""

from __future__ import annotations

import datetime
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning_workers import EndProcessGroup, ShardedDigits
from torch import nn
from workers import WORLD, count_collectives, free_port, global_case, model_copy, shard

from pf_lightning import HessianEigenMonitor, hessian_eigenpairs
from pf_lightning.curvature import HessianOperator, MeasurementAborted
from pf_lightning.curvature.drift import gradient_curvature


class FailingLoss:
    """``loss_fn`` that fails on its ``at``-th call (from 1) on the ranks in ``fail = {rank: at}``.

    ``how``: ``"shape"`` feeds the model inputs of the wrong width (torch's own shape error), ``"key"``
    raises ``KeyError``, ``"kill"`` kills the process (SIGKILL).
    """

    def __init__(self, loss_fn: Callable, rank: int, fail: dict[int, int], how: str = "shape") -> None:
        self.loss_fn, self.at, self.how = loss_fn, fail.get(rank), how
        self.calls = 0

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "key":
                raise KeyError("labels")
            x, y = batch
            batch = (x[:, :-1], y)
        return self.loss_fn(model, batch)


def _outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    """What ``fn()`` raised on this rank, and the collectives it issued meanwhile."""
    out: dict[str, Any] = {"type": None}
    with count_collectives() as calls:
        start = time.perf_counter()
        try:
            fn()
        except Exception as err:
            out.update(type=type(err).__name__, message=str(err))
            out["cause"] = type(err.__cause__).__name__ if err.__cause__ is not None else None
            if isinstance(err, MeasurementAborted):
                out.update(rank=err.rank, error_type=err.error_type, error_message=err.error_message)
        out["seconds"] = time.perf_counter() - start
    out["calls"] = calls
    return out


def faults(rank: int, save: Callable[[Any], None]) -> None:
    """Ranks that raise at different points of measurements, on the DDP case (float64, uneven shards:
    rank 0 holds two batches, rank 1 one); then a clean measurement, which must still agree; then rank 1
    dies in a measurement (last: the process group is broken afterwards)."""
    case = global_case()
    mine = shard(case, rank)
    model = model_copy(case, torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    out: dict[str, Any] = {}

    def eigenpairs(loss_fn: Callable, batches: list = mine, **kwargs: Any) -> Any:
        options = {"k": 2, "tol": 1e-8, "hvp": "double_backward", "cache_graphs": False, **kwargs}
        return hessian_eigenpairs(model, loss_fn, batches, **options)

    # Rank 1's forward fails with a shape error at its 3rd call: without cached graphs, its 3rd product.
    shape = FailingLoss(case.loss_fn, rank, {1: 3})
    out["third_product"] = _outcome(lambda: eigenpairs(shape))
    out["third_product"]["loss_calls"] = shape.calls
    out["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # The same error type on every rank at the same product: each rank raises its own, as one process would.
    out["all_ranks"] = _outcome(lambda: eigenpairs(FailingLoss(case.loss_fn, rank, {0: 3, 1: 2}, "key")))
    # hvp="auto": the loss fails during the double-backward trial (not a reason to fall back).
    out["auto_trial"] = _outcome(
        lambda: eigenpairs(FailingLoss(case.loss_fn, rank, {1: 1}, "key"), hvp="auto")
    )
    # Rank 1's own inputs: an empty probe shard; a preconditioner with a zero in its entries only.
    out["empty_shard"] = _outcome(lambda: eigenpairs(case.loss_fn, mine if rank == 0 else []))
    diagonal = torch.ones(case.n, dtype=torch.float64)
    diagonal[0] = 0.0 if rank == 1 else 1.0
    out["preconditioner"] = _outcome(lambda: eigenpairs(case.loss_fn, preconditioner=diagonal))

    # The gradient of the EoS proxies and the LR drift measurement (||Hg||/||g||): rank 1 raises in it.
    def drift() -> None:
        with HessianOperator(model, FailingLoss(case.loss_fn, rank, {1: 1}), mine) as op:
            gradient_curvature(op)

    out["gradient"] = _outcome(drift)
    out["unchanged_after_all"] = all(
        torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)
    )
    # The process group is still in step: a clean measurement agrees with one process on the union.
    result = eigenpairs(case.loss_fn, k=3, tol=1e-9, hvp="auto", cache_graphs=True)
    out["after"] = result.eigenvalues
    save(out)
    # Rank 1's process is killed (SIGKILL) in its 3rd product: rank 0 must not wait for it.
    out["dying"] = _outcome(lambda: eigenpairs(FailingLoss(case.loss_fn, rank, {1: 3}, "kill")))
    save(out)


# -- ranks that hang or die: a launcher that never waits past its deadline --------------------------
def _timed_entry(rank: int, fn: Callable, port: int, out: str, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=timeout_s)
    )
    fn(rank, lambda result: torch.save(result, Path(out) / f"rank{rank}.pt"))
    os._exit(0)  # the process group may be broken: no teardown that could wait on it


def launch(fn: Callable, out: Path, timeout_s: float, deadline_s: float) -> dict[int, Any]:
    """Run ``fn(rank, save)`` on two gloo ranks whose process group times out after ``timeout_s``; return
    what each rank last passed to ``save`` (nothing for a rank that never did before it died or before
    ``deadline_s``, when every rank still running is killed)."""
    context = mp.start_processes(
        _timed_entry,
        args=(fn, free_port(), str(out), timeout_s),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and any(p.is_alive() for p in context.processes):
        time.sleep(0.1)
    for p in context.processes:
        if p.is_alive():
            p.kill()
        p.join()
    return {
        r: torch.load(Path(out) / f"rank{r}.pt", weights_only=False)
        for r in range(WORLD)
        if (Path(out) / f"rank{r}.pt").exists()
    }


# -- Lightning -----------------------------------------------------------------------------------
class ProbeLoss:
    """The model's loss, raising (``"shape"``) or sleeping on rank 1 at its ``at``-th call during the
    measurement at ``step`` (probe-shard losses only: the monitor's ``loss_fn``)."""

    def __init__(self, step: int | None, at: int = 5, how: str = "shape", seconds: float = 0.0) -> None:
        self.step, self.at, self.how, self.seconds = step, at, how, seconds
        self.calls = 0

    def __call__(self, module: ShardedDigits, batch: Any) -> torch.Tensor:
        if module.trainer.global_rank == 1 and module.trainer.global_step == self.step:
            self.calls += 1
            if self.calls == self.at:
                if self.how == "sleep":
                    time.sleep(self.seconds)
                else:
                    x, y = batch
                    batch = (x[:, :-1], y)
        return module.loss(batch)


class TimedMonitor(HessianEigenMonitor):
    """Saves, on a rank whose measurement raises, the exception and how long the measurement ran (a
    spawned rank's exceptions reach no callback hook: Lightning handles them in the launching process)."""

    def __init__(self, out: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool = False) -> Any:
        start = time.perf_counter()
        try:
            return super().measure(trainer, pl_module, force)
        except Exception as err:
            failure = {
                "error": type(err).__name__,
                "message": str(err),
                "seconds": time.perf_counter() - start,
            }
            torch.save(failure, Path(self.out) / f"failure{trainer.global_rank}.pt")
            raise


class Record(Callback):
    """Per rank: the skip flag after every step; at step ``at``, the steps measured so far, their
    eigenvalues and the weights (saved then: a rank that later fails runs no teardown)."""

    def __init__(self, monitor: HessianEigenMonitor, out: str, at: int) -> None:
        self.monitor, self.out, self.at = monitor, out, at
        self.skipped: dict[int, float | None] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.set_num_threads(1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        flag = trainer.callback_metrics.get("hessian/skipped")
        self.skipped[trainer.global_step] = None if flag is None else float(flag)
        if trainer.global_step == self.at:
            record = {
                "skipped": dict(self.skipped),
                "steps": [h["step"] for h in self.monitor.history],
                "eigenvalues": [h["eigenvalues"] for h in self.monitor.history],
                "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            }
            torch.save(record, Path(self.out) / f"rank{trainer.global_rank}.pt")


def fit(out: str, loss: ProbeLoss, steps: int = 4, timeout_s: float | None = None) -> None:
    """Full-batch GD on uneven shards (``lightning_workers``) under ddp_spawn for ``steps`` steps, measuring
    every 2 steps by finite differences (a probe loss per product, so a failure lands inside a product);
    each rank saves what it recorded at step 4."""
    Path(out).mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    model = ShardedDigits()
    monitor = TimedMonitor(
        out,
        k=2,
        every_n_steps=2,
        loss_fn=loss,
        hvp="finite_difference",
        tol=1e-6,
        max_hvp=300,
        at_fit_end=False,
    )
    strategy = DDPStrategy(
        start_method="spawn", **({} if timeout_s is None else {"timeout": _seconds(timeout_s)})
    )
    trainer = L.Trainer(
        default_root_dir=out,
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=steps,
        callbacks=[monitor, Record(monitor, out, at=4), EndProcessGroup()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model)


def _seconds(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)
