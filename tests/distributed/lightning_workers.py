"""Lightning pieces of the multi-process tests: a digits model whose ranks hold uneven data shards,
a callback that records what each rank measured, and the fit every launcher runs.

``fit(strategy, out)`` is what each rank executes, under ``ddp_spawn`` (inside pytest), ``ddp`` and
``ModelParallelStrategy`` (both re-launch a script, see ``lightning_script.py``). Each rank writes
``out/rank{r}.pt``; the test process builds the single-process reference from the probe shards and
the weights recorded there.
"""

from __future__ import annotations

import datetime
import types
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning_models import DigitsClassifier, digits
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor

SHARDS = ((0, 24), (24, 34))  # rank 0: 24 samples, rank 1: 10 (uneven on purpose)
STEPS = 4


class ShardedDigits(DigitsClassifier):
    """Full-batch gradient descent on this rank's own slice of digits, in float64."""

    def __init__(self, fsdp: bool = False, batch_sizes: tuple[int, int] | None = None) -> None:
        super().__init__(hidden=8, lr=0.05, loss="mse")
        self.fsdp, self.batch_sizes = fsdp, batch_sizes
        self.double()

    def configure_model(self) -> None:
        if not self.fsdp:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        # The root holds a layer of its own (the last), as in Hugging Face recipes (embeddings, final
        # norm): FSDP2 keeps the root's parameters gathered after a forward pass without backward.
        linears = [layer for layer in self.net if isinstance(layer, torch.nn.Linear)]
        for layer in linears[:-1]:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def train_dataloader(self) -> DataLoader:
        x, y = digits(SHARDS[-1][1])
        rank = self.trainer.global_rank
        lo, hi = SHARDS[rank]
        size = hi - lo if self.batch_sizes is None else self.batch_sizes[rank]
        return DataLoader(
            TensorDataset(x[lo:hi], y[lo:hi]), batch_size=size, shuffle=self.batch_sizes is not None
        )


class RankProbe:
    """Probe batches that hold a NaN on rank 1 only (iterated once, on each rank, at fit start)."""

    def __iter__(self):
        x, y = digits(8)
        x = x.clone()
        if dist.get_rank() == 1:
            x[0, 0] = float("nan")
        yield (x, y)


class Recorder(Callback):
    """Saves, per rank, the probe, the fit-start weights and eigenpairs, and what fit left behind."""

    def __init__(self, monitor: HessianEigenMonitor, bad: HessianEigenMonitor | None, out: str) -> None:
        self.monitor, self.bad, self.out = monitor, bad, out
        self.record: dict[str, Any] = {}
        self._warnings: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.set_num_threads(1)  # two ranks share the cores
        self._catch = warnings.catch_warnings(record=True)
        self._warnings = self._catch.__enter__()
        warnings.simplefilter("always")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        latest = self.monitor.latest
        self.record.update(
            probe=self.monitor.probe.batches,
            weights={k: full(v).detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            eigenvalues=latest.eigenvalues.cpu(),
            n_local=latest.eigenvectors.shape[0],
            hvp=latest.info["hvp"],
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        self.record.update(
            global_step=trainer.global_step,
            measurements=len(self.monitor.history),
            stderr=self.monitor.history[0].get("eig_1_stderr"),  # the fit-start measurement's (the 1st of 10)
            stderr_skipped="hessian/stderr_skipped" in trainer.callback_metrics,
            final_eigenvalues=self.monitor.latest.eigenvalues.cpu(),
            skipped=None if self.bad is None else (self.bad.latest is None, len(self.bad.history)),
            skipped_metric=float(trainer.callback_metrics.get("hessian/bad/skipped", float("nan"))),
            edge={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eos/")},
            final_weights={k: full(v).detach().cpu().clone() for k, v in pl_module.state_dict().items()},
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.record["warnings"] = [str(w.message) for w in self._warnings if "skipped" in str(w.message)]
        self._catch.__exit__(None, None, None)
        torch.save(self.record, Path(self.out) / f"rank{trainer.global_rank}.pt")


def fit(strategy: Any, out: str, nan_probe: bool = False) -> L.Trainer:
    fsdp = not isinstance(strategy, str)
    L.seed_everything(0, verbose=False)
    model = ShardedDigits(fsdp=fsdp)
    monitor = HessianEigenMonitor(k=3, every_n_steps=2, tol=1e-8, max_hvp=800, at_fit_end=False)
    bad = HessianEigenMonitor(k=2, every_n_steps=2, probe=RankProbe(), name="bad") if nan_probe else None
    # The stochastic edge in the same run: batch sharpness on draws of the whole shard, critical sharpness.
    eos = EdgeOfStabilityMonitor(batch_sharpness=True, batch_sharpness_batches=3, critical_every_n_steps=2)
    callbacks = [monitor, *([bad] if bad else []), eos, Recorder(monitor, bad, out)]
    trainer = two_ranks(strategy, out, STEPS, callbacks)
    trainer.fit(model)
    return trainer


MINI_BATCHES = (8, 5)  # per rank: one global mini-batch of 13 samples


class EdgeRecorder(Callback):
    """Saves, per rank, the weights and the batch sharpness of the last measurement (the final step)."""

    def __init__(self, eos: EdgeOfStabilityMonitor, out: str) -> None:
        self.eos, self.out = eos, out

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.set_num_threads(1)
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))  # this rank's own batch's

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = self.eos.history[-1]
        record = {
            "losses": self.losses,
            "non_monotonicity": [h.get("eos/loss_non_monotonicity") for h in self.eos.history],
            "step": last["step"],
            "weights": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "metrics": {k: v for k, v in last.items() if k.startswith("eos/")},
            "logged": {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("eos/", "hessian/"))
            },
        }
        torch.save(record, Path(self.out) / f"rank{trainer.global_rank}.pt")


def fit_minibatch(strategy: Any, out: str) -> None:
    """Mini-batch SGD on the uneven shards: batch sharpness on by default, on both ranks' draws."""
    L.seed_everything(0, verbose=False)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, at_fit_end=False)
    eos = EdgeOfStabilityMonitor(batch_sharpness_batches=6)
    trainer = two_ranks(strategy, out, STEPS, [monitor, eos, EdgeRecorder(eos, out)])
    trainer.fit(ShardedDigits(batch_sizes=MINI_BATCHES))


class FlakyDigits(ShardedDigits):
    """Rank 1 cannot read the samples the batch-sharpness draws fetch (training reads them through its loader,
    the draws through the dataset): only rank 1's draw fails. Unshuffled, the draws are the batches trained."""

    def setup(self, stage: str) -> None:
        if self.trainer.global_rank == 1:  # this spawned process's class only
            from pf_lightning.callbacks._probe import TrainingBatches

            def unreadable(source: Any, indices: list[int]) -> Any:
                raise RuntimeError("rank 1 cannot read this sample")

            TrainingBatches._fetch = unreadable

    def train_dataloader(self) -> DataLoader:
        x, y = digits(SHARDS[-1][1])
        rank = self.trainer.global_rank
        lo, hi = SHARDS[rank]
        return DataLoader(TensorDataset(x[lo:hi], y[lo:hi]), batch_size=MINI_BATCHES[rank])


def fit_flaky_draw(out: str) -> None:
    """Batch sharpness whose draw fails on rank 1 only: both ranks skip it, and the fit goes on."""
    L.seed_everything(0, verbose=False)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, at_fit_end=False)
    eos = EdgeOfStabilityMonitor(batch_sharpness_batches=2)
    # A rank left waiting in a collective fails within a minute rather than hanging the test.
    strategy = DDPStrategy(start_method="spawn", timeout=datetime.timedelta(seconds=60))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two_ranks(strategy, out, STEPS, [monitor, eos, EdgeRecorder(eos, out)]).fit(FlakyDigits())


class DecayingDigits(ShardedDigits):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=1e-3)


class BreakDecayOnRank1(Callback):
    """Rank 1 cannot compute the weight-decay term of the gradient's projections; saves each rank's EoS
    history and flags at the end."""

    def __init__(self, eos: EdgeOfStabilityMonitor, out: str) -> None:
        self.eos, self.out = eos, out

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.set_num_threads(1)
        if trainer.global_rank == 1:  # this spawned process's module only
            import pf_lightning.callbacks.eos_monitor as eos_module

            def broken(optimizer: Any, space: Any) -> torch.Tensor:
                raise RuntimeError("rank 1 cannot read the weight decay")

            eos_module.optimizer_weight_decay = broken

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {
            "steps": [h["step"] for h in self.eos.history],
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eos/")},
        }
        torch.save(record, Path(self.out) / f"rank{trainer.global_rank}.pt")


def fit_failing_projections(out: str) -> None:
    """The gradient's projections fail on rank 1 only: both ranks skip the EoS diagnostics, the fit goes on."""
    L.seed_everything(0, verbose=False)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, at_fit_end=False)
    eos = EdgeOfStabilityMonitor()
    strategy = DDPStrategy(start_method="spawn", timeout=datetime.timedelta(seconds=60))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two_ranks(strategy, out, STEPS, [monitor, eos, BreakDecayOnRank1(eos, out)]).fit(DecayingDigits())


class EndProcessGroup(Callback):
    """Both ranks meet and destroy the process group when a fit ends normally.

    Lightning destroys only an NCCL process group (at exit); a gloo one is left to the interpreter's
    finalization, where its worker threads can abort a process whose fit succeeded ("terminate called
    without an active exception", SIGABRT; pytorch/pytorch#179291). Seen once in CI, on a loaded machine.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class FixedOrderDigits(ShardedDigits):
    """Mini-batches of 4 from a DistributedSampler that does not shuffle: with limit_train_batches=2 every
    epoch trains on the same two global batches (samples 0-7 and 8-15, dealt to the ranks in turn)."""

    def train_dataloader(self) -> DataLoader:
        x, y = digits(SHARDS[-1][1])
        dataset = TensorDataset(x, y)
        return DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, shuffle=False))


def fit_fixed_order(out: str) -> None:
    """Batch sharpness where an epoch is cut short of a fixed order: drawn from the trained steps."""
    L.seed_everything(0, verbose=False)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, at_fit_end=False)
    eos = EdgeOfStabilityMonitor(batch_sharpness_batches=6)
    trainer = two_ranks(
        "ddp_spawn", out, STEPS, [monitor, eos, EdgeRecorder(eos, out)], limit_train_batches=2
    )
    trainer.fit(FixedOrderDigits())


def two_ranks(strategy: Any, out: str, max_steps: int, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    """A two-process CPU trainer on the ranks' own data shards, without logger or checkpoints."""
    return L.Trainer(
        default_root_dir=out,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=[*callbacks, EndProcessGroup()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        **kwargs,
    )


class RankClock(Callback):
    """A fake clock on each rank for ``max_time_fraction``: a training step costs 1 s on rank 0 and 10 s
    on rank 1, a measurement 4 s on both (spent in a listener). Alone, rank 1 would measure far more
    often than rank 0; each rank saves the steps it measured and postponed."""

    def __init__(self, monitor: HessianEigenMonitor, out: str) -> None:
        self.monitor, self.out, self.now = monitor, out, 0.0
        self.postponed: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from pf_lightning.callbacks import _budget, hessian_monitor

        torch.set_num_threads(1)
        clock = types.SimpleNamespace(perf_counter=lambda: self.now)
        _budget.time = hessian_monitor.time = clock  # this spawned process only
        self.step_seconds = (1.0, 10.0)[trainer.global_rank]
        self.monitor.add_listener(self.measured)

    def measured(self, trainer: L.Trainer, pl_module: L.LightningModule, result: Any) -> None:
        self.now += 4.0

    def on_train_batch_start(self, *args: Any) -> None:
        self.now += self.step_seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.monitor._postponed_step:
            self.postponed.append(trainer.global_step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        steps = [h["step"] for h in self.monitor.history]
        torch.save(
            {"steps": steps, "postponed": self.postponed}, Path(self.out) / f"rank{trainer.global_rank}.pt"
        )


def fit_with_time_budget(out: str) -> None:
    L.seed_everything(0, verbose=False)
    monitor = HessianEigenMonitor(k=1, every_n_steps=1, max_time_fraction=0.5, at_fit_end=False)
    # A rank that measures alone waits at the collective: fail within a minute rather than hang.
    strategy = DDPStrategy(start_method="spawn", timeout=datetime.timedelta(seconds=60))
    trainer = two_ranks(strategy, out, 40, [monitor, RankClock(monitor, out)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ShardedDigits())


class ValidatedDigits(ShardedDigits):
    """FSDP2-sharded digits with a validation loop: a forward pass without backward before the epoch's end."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch), sync_dist=True)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


class FitEndRecorder(Callback):
    """Saves, per rank, the fit-end measurement (after the last validation) with its weights and probe."""

    def __init__(self, monitor: HessianEigenMonitor, out: str) -> None:
        self.monitor, self.out = monitor, out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        torch.save(
            {
                "probe": self.monitor.probe.batches,
                "weights": {k: full(v).detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                "measured": [h["step"] for h in self.monitor.history],
                "eigenvalues": self.monitor.latest.eigenvalues.cpu(),
            },
            Path(self.out) / f"rank{trainer.global_rank}.pt",
        )


def fit_after_validation(strategy: Any, out: str) -> None:
    """The fit-end measurement of an FSDP2 model right after a validation loop (on_error="raise")."""
    L.seed_everything(0, verbose=False)
    monitor = HessianEigenMonitor(
        k=1, every_n_steps=None, at_fit_start=False, tol=1e-8, max_hvp=800, on_error="raise"
    )
    trainer = two_ranks(strategy, out, 2, [monitor, FitEndRecorder(monitor, out)])
    trainer.fit(ValidatedDigits(fsdp=True))


class _SavesSetUpFailure:
    """A callback whose fit-start set-up saves, on a rank where it raises, the exception (a spawned rank's
    exceptions reach no callback hook: Lightning handles them in the launching process)."""

    def __init__(self, out: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            super().on_train_start(trainer, pl_module)
        except Exception as err:
            failure = {"error": type(err).__name__, "message": str(err)}
            torch.save(failure, Path(self.out) / f"failure{trainer.global_rank}.pt")
            raise


class RecordingMonitor(_SavesSetUpFailure, HessianEigenMonitor):
    pass


class RecordingEdge(_SavesSetUpFailure, EdgeOfStabilityMonitor):
    pass


class EmptyOnRankOne:
    """Probe batches: one on rank 0, none on rank 1."""

    def __iter__(self):
        if dist.get_rank() == 0:
            yield digits(8)


class UnevenBatches:
    """Probe batches: three on rank 0, two on rank 1."""

    def __iter__(self):
        yield from (digits(8) for _ in range(3 - dist.get_rank()))


class WarningRecorder(Callback):
    """Keeps the warnings this rank raises during the fit in ``warnings{rank}.pt``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._context = warnings.catch_warnings(record=True)
        self._caught = self._context.__enter__()
        warnings.simplefilter("always")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._context.__exit__(None, None, None)
        messages = [str(w.message) for w in self._caught]
        torch.save(messages, Path(self.out) / f"warnings{trainer.global_rank}.pt")


UNEVEN_BATCHES = (16, 16)  # rank 0: two batches of its 24 samples, rank 1: its 10 in one


def fit_uneven_set_up(out: str, case: str) -> None:
    """Settings each rank reads from its own shard, which must agree: ``"default"`` (rank 0 trains on
    mini-batches, rank 1 on its whole shard: batch sharpness), ``"required"`` (the same, with
    ``batch_sharpness=True``), ``"epochs"`` (``every_n_epochs`` on epochs of 2 and 1 steps), ``"probe"``
    (a probe that is empty on rank 1), ``"stderr"`` (whole probe batches, three on rank 0 and two on rank 1,
    as groups of ``eig_1_stderr``)."""
    L.seed_everything(0, verbose=False)
    kwargs = {"k": 1, "every_n_steps": 2, "at_fit_end": False}
    if case == "epochs":
        kwargs.update(every_n_steps=None, every_n_epochs=1, at_fit_start=False)
    if case == "probe":
        kwargs.update(probe=EmptyOnRankOne())
    if case == "stderr":
        kwargs.update(probe=UnevenBatches(), probe_batch_size="loader", stderr_every=1)
    monitor = RecordingMonitor(out, **kwargs)
    eos = RecordingEdge(out, batch_sharpness=True if case == "required" else None)
    # A rank left waiting in a collective fails within a minute rather than hanging the test.
    strategy = DDPStrategy(start_method="spawn", timeout=datetime.timedelta(seconds=60))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two_ranks(strategy, out, STEPS, [monitor, eos, EdgeRecorder(eos, out), WarningRecorder(out)]).fit(
            ShardedDigits(batch_sizes=UNEVEN_BATCHES)
        )
