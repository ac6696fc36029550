"""LRAdaptation: feeds DriftAdaptiveLR and SharpnessCappedLR their measurements, logs their choices.

The schedulers are ordinary ``LRScheduler``s that Lightning steps after every optimizer step with a
monitored metric (``dal/hg_ratio`` or ``cap/sharpness``). This callback puts that metric in
``trainer.callback_metrics`` before Lightning steps them: ``||Hg||/||g||`` measured on the batch just
trained, at the parameters the next step starts from (every ``every_n_steps`` optimizer steps, the
scheduler holding the last value in between; only for steps inside DAL's ``window``, which alone run at
its rate), or the latest ``eos/sharpness`` of the
:class:`EdgeOfStabilityMonitor`. Under manual optimization, where Lightning steps no scheduler, it steps
them itself at the end of each batch in which the optimizer stepped (unless ``training_step`` already
did), with the same value at the same point. At the start of each step it logs the rate the scheduler chose and the
quantity it came from. Given ``scheduler=``, it also installs the scheduler itself, for users who
cannot edit ``configure_optimizers``; the scheduler's state then lives in the checkpoint like any other.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from typing_extensions import override

from .. import logging as names
from .._validation import Checks, parameter_names
from ..curvature import HVP_CHOICES, HessianOperator
from ..curvature.drift import gradient_curvature
from ..curvature.params import measurement_dtype, select_parameters
from ..curvature.precondition import optimizer_weight_decay
from ..linalg import NonFiniteOperatorError
from ..logging import announce_run, log_metrics, metric_name, warn_once
from ..schedulers import DriftAdaptiveLR, SharpnessCappedLR
from ..stability import optimizer_rule, unheld_parameters
from ._checkpoint import UnreadableState, count, mapping, real, starts_a_run, warn_fresh_start
from ._faults import OnError, check_on_error, skip_or_raise
from ._probe import resolve_loss_fn
from .eos_monitor import CLIPPED_STEP, EdgeOfStabilityMonitor, gradient_clipping
from .hessian_monitor import HessianEigenMonitor

SchedulerFactory = Callable[[Optimizer], LRScheduler]
HG_METHODS = ("forward_difference", *HVP_CHOICES)
HGMethod = Literal[
    "forward_difference", "auto", "double_backward", "forward_over_reverse", "finite_difference"
]
"""``HG_METHODS`` written out for type checkers and LightningCLI's ``--help`` (a test keeps them equal)."""
check = Checks(MisconfigurationException)


def check_factory(factory: Any) -> None:
    """``scheduler=`` is ``None`` or a factory; a ``functools.partial`` of a pf-lightning scheduler is built
    once on a stand-in optimizer, so an unknown or bad argument fails now rather than at fit start."""
    call = "a factory scheduler(optimizer) -> LRScheduler (e.g. functools.partial(DriftAdaptiveLR, p=1.0))"
    check.function("scheduler", factory, call, 1)
    if factory is None:
        return
    target, args, keywords = factory, (), {}
    while isinstance(target, functools.partial):  # partial(partial(DriftAdaptiveLR, p=1), max_lr=2)
        args, keywords = (*target.args, *args), {**target.keywords, **keywords}
        target = target.func
    ours = (DriftAdaptiveLR, SharpnessCappedLR)
    # LightningCLI (jsonargparse) turns a YAML class_path into partial(<instantiator>, ..., cls, **init_args).
    target = next((a for a in (target, *args) if any(a is cls for cls in ours)), None)
    if target is None:
        return  # any other callable is the user's own: it is called at fit start
    accepted = parameter_names(target, skip=("self", "optimizer"))
    check.keywords(f"{target.__name__} (in `scheduler`)", keywords, accepted)
    if keywords.get("base") is not None:  # LightningCLI passes every argument: base=None among them
        return  # a base schedule is bound to its own optimizer: only the real one can be checked
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        factory(stand_in)
    except (TypeError, ValueError) as err:
        raise MisconfigurationException(f"`scheduler` must build a valid {target.__name__}: {err}") from None


class LRAdaptation(Callback):
    """Measurement and logging for pf-lightning's LR schedulers; optionally installs one.

    Args:
        scheduler: ``None`` to serve the :class:`DriftAdaptiveLR` / :class:`SharpnessCappedLR` that
            ``configure_optimizers`` returns (with ``scheduler.lightning_config()``), or a factory
            ``scheduler(optimizer) -> LRScheduler`` (e.g. ``functools.partial(DriftAdaptiveLR, p=1.0)``;
            in YAML a ``class_path`` with ``init_args``) installed on optimizer ``optimizer_index`` at the
            start of fit.
        optimizer_index: the optimizer an installed scheduler wraps.
        every_n_steps: measure ``||Hg||/||g||`` once this many optimizer steps have passed since the last
            measurement (``global_step``'s, which under manual optimization counts every optimizer's steps);
            in between, DAL holds
            the last value (cheaper, and the rate changes only at measurements). Steps outside DAL's
            ``window`` run at the base rate and are not measured (no ``dal/hg_ratio`` there).
        hvp: how ``Hg`` is computed: ``"forward_difference"`` (as ``dal.py``: one extra gradient at
            ``theta + e g``, ``e = 0.01/||g||``) or an HVP backend (``"auto"``, ``"double_backward"``, ...)
            for the exact product.
        loss_fn: ``loss_fn(module, batch) -> scalar Tensor``; by default the module's ``training_step``.
        params: glob patterns of the parameters whose curvature counts (all trainable ones by default).
        seed: seeds the random state of the measurement's forward passes (dropout masks).
        on_error: ``"skip"``: a ``||Hg||/||g||`` measurement that fails at run time (NaN or infinite loss,
            a batch the loss cannot run on, a ``training_step`` that returns no loss, any ``Exception``)
            is logged as ``dal/hg_ratio = NaN`` and ``dal/skipped``, warned once per error type, and
            the scheduler holds its previous rate; training goes on. ``"raise"``: the exception stops
            training.

    Checkpoints: the state holds the step of the last measurement (the cadence of a resumed fit) and the
    value each scheduler's monitor last held: Lightning writes a step checkpoint at a training batch
    end, before it steps these schedulers with that batch's measurement, so a fit resumed from one takes
    that step at its start, as the uninterrupted run did. A state this version cannot read gives one
    ``RuntimeWarning`` and a fresh start (measure at the first step). The schedulers' own states are checked by their ``load_state_dict``, which raises a
    ``ValueError`` on a state they did not write: they set the learning rate, so a silent reset
    would change training.

    Raises:
        MisconfigurationException: a bad argument; at fit start, no pf-lightning scheduler to serve, a
            scheduler configured without ``lightning_config()``, or a sharpness cap without an
            :class:`EdgeOfStabilityMonitor`.

    Example::

        trainer = Trainer(callbacks=[LRAdaptation(functools.partial(DriftAdaptiveLR, p=1.0, max_lr=5.0))])
    """

    def __init__(
        self,
        scheduler: SchedulerFactory | None = None,
        optimizer_index: int = 0,
        every_n_steps: int = 1,
        hvp: HGMethod = "forward_difference",
        loss_fn: Callable[[Any, Any], Any] | None = None,
        params: str | list[str] | None = None,
        seed: int = 0,
        on_error: OnError = "skip",
    ) -> None:
        check_on_error(on_error)
        check_factory(scheduler)
        optimizer_index = check.integer("optimizer_index", optimizer_index, 0)
        every_n_steps = check.integer("every_n_steps", every_n_steps, 1)
        check.choice("hvp", hvp, HG_METHODS)
        check.function("loss_fn", loss_fn, "loss_fn(module, batch) -> scalar Tensor", 2)
        check.patterns("params", params)
        seed = check.seed("seed", seed)
        self.factory, self.optimizer_index, self.every_n_steps = scheduler, optimizer_index, every_n_steps
        self.hvp, self.user_loss_fn, self.params, self.seed = hvp, loss_fn, params, seed
        self.on_error = on_error
        self.schedulers: list[DriftAdaptiveLR | SharpnessCappedLR] = []
        self.installed: LRScheduler | None = None
        self.eos: EdgeOfStabilityMonitor | None = None
        self._loss_fn: Callable | None = None
        self._last_measured: int | None = None
        self._restored: int | None = None
        self._due = False  # the first step of a resumed fit has its measurement to take
        # Manual optimization: Lightning steps no scheduler, this callback does (see on_train_batch_end).
        self._manual = False
        self._at_batch_start: tuple[int, list[int]] | None = None  # (global step, schedulers' last_epoch)
        # What each scheduler's monitor last held (the value Lightning steps it with), kept in checkpoints:
        # Lightning saves a step checkpoint at the batch end, before it steps these schedulers.
        self._fed: dict[str, float] = {}
        self._fed_restored: dict[str, float] = {}
        # Manual optimization: the global step whose batch end last stepped the schedulers (kept in
        # checkpoints: one written inside the measurement before that, on Ctrl+C, owes them a step).
        self._scheduled_at: int | None = None
        self._scheduled_restored: int | None = None
        # ... and the schedulers' counts at the batch start then: one training_step stepped itself owes none.
        self._counts_at_save: list[int] | None = None
        self._counts_restored: list[int] | None = None
        self._started = False  # between on_fit_start and teardown
        self._last_logged: int | None = None
        self._last_end: int | None = None
        self._warned: set[str] = set()

    def settings(self) -> tuple[str, dict[str, Any]]:
        """What this callback was asked for, as the loggers record it (the W&B run config under
        ``pf_lightning``): its key there, and its arguments."""
        factory = self.factory
        scheduler = None if factory is None else getattr(factory, "__qualname__", None) or repr(factory)
        if self.schedulers:  # set up (at fit start): what it serves, with the arguments they were built with
            scheduler = "; ".join(s.describe() for s in self.schedulers)
        values = {
            "scheduler": scheduler,
            "optimizer_index": self.optimizer_index,
            "every_n_steps": self.every_n_steps,
        }
        return "LRAdaptation", {**values, "hvp": self.hvp, "params": self.params, "seed": self.seed}

    # -- set-up ------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._loss_fn = resolve_loss_fn(pl_module, self.user_loss_fn)
            if starts_a_run(trainer):  # the rest of its state is the schedulers', set up at fit start
                self._warned = set()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After configure_optimizers, before a checkpoint's optimizer and scheduler states are restored:
        # a scheduler added here is restored on resume like one configure_optimizers returned.
        try:  # `params` that match nothing fail before the first step, not at its measurement
            select_parameters(pl_module, self.params, argument="params")
        except ValueError as err:
            raise MisconfigurationException(f"LRAdaptation cannot measure this module: {err}") from err
        if self.factory is not None:
            if self.optimizer_index >= len(trainer.optimizers):
                raise MisconfigurationException(
                    f"optimizer_index={self.optimizer_index} but the module configures {len(trainer.optimizers)} optimizer(s)"
                )
            scheduler = self.factory(trainer.optimizers[self.optimizer_index])
            if not isinstance(scheduler, DriftAdaptiveLR | SharpnessCappedLR):
                raise MisconfigurationException(
                    f"scheduler= built a {type(scheduler).__name__}; LRAdaptation installs DriftAdaptiveLR or "
                    "SharpnessCappedLR (return other schedulers from configure_optimizers)"
                )
            trainer.lr_scheduler_configs.append(LRSchedulerConfig(**scheduler.lightning_config()))
            self.installed = scheduler
        self.schedulers = []
        self._manual, self._at_batch_start = not pl_module.automatic_optimization, None
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, DriftAdaptiveLR | SharpnessCappedLR):
                self._check_config(config)
                self.schedulers.append(config.scheduler)
        kinds = [type(s) for s in self.schedulers]
        if len(set(kinds)) != len(kinds) or len({id(s.optimizer) for s in self.schedulers}) != len(kinds):
            raise MisconfigurationException(
                "LRAdaptation serves at most one DriftAdaptiveLR and one SharpnessCappedLR, on different optimizers: "
                "two schedulers writing one optimizer's rate would overwrite each other (cap a DAL schedule by "
                "lowering its max_lr instead)"
            )
        if not self.schedulers:
            raise MisconfigurationException(
                "LRAdaptation found no DriftAdaptiveLR or SharpnessCappedLR: return one from configure_optimizers "
                "as {'optimizer': opt, 'lr_scheduler': scheduler.lightning_config()}, or pass scheduler= to install one"
            )
        for config in trainer.lr_scheduler_configs:
            other = config.scheduler
            for scheduler in self.schedulers:
                if other is scheduler or getattr(other, "optimizer", None) is not scheduler.optimizer:
                    continue
                if other is getattr(scheduler, "base", None):
                    raise MisconfigurationException(
                        f"the {type(other).__name__} SharpnessCappedLR caps is also configured on its own, so it "
                        "would step twice a step: return only the cap's lightning_config() from configure_optimizers"
                    )
                raise MisconfigurationException(
                    f"a {type(other).__name__} also sets the rate of the optimizer {type(scheduler).__name__} "
                    "sets every step, and would be overwritten in silence: "
                    + (
                        "remove one of them (a ReduceLROnPlateau steps on a metric of its own and cannot be the "
                        "cap's base)"
                        if isinstance(scheduler, SharpnessCappedLR) and isinstance(other, ReduceLROnPlateau)
                        else "cap it instead, SharpnessCappedLR(optimizer, base=that_scheduler)"
                        if isinstance(scheduler, SharpnessCappedLR)
                        else "remove it (DAL's window= and warmup_steps= shape the DAL rate)"
                    )
                )
        for scheduler in self.schedulers:
            if not isinstance(scheduler, DriftAdaptiveLR) or self.params is not None:
                continue
            outside = unheld_parameters(scheduler.optimizer, pl_module)
            if outside:  # several optimizers (manual optimization): v of the whole model, not of its step
                warn_once(
                    self._warned,
                    "outside",
                    f"DriftAdaptiveLR's {type(scheduler.optimizer).__name__} does not update {len(outside)} "
                    f"trainable parameter tensor(s) ({outside[0]!r}, ...), but v = ||Hg||/||g|| is measured over "
                    "every trainable parameter: pass LRAdaptation(params=...) the globs of the parameters it "
                    "steps, for the curvature along the gradient it descends",
                )
        if any(isinstance(s, SharpnessCappedLR) for s in self.schedulers):
            self._find_eos(trainer)
        for scheduler in self.schedulers:
            base = float(scheduler.base_lrs[0])
            if (
                isinstance(scheduler, DriftAdaptiveLR)
                and scheduler.p > 0  # p = 0 keeps the configured rate
                and optimizer_rule(scheduler.optimizer).preconditioned
                and scheduler.max_lr > 10 * base
            ):
                warn_once(
                    self._warned,
                    "preconditioned",
                    f"DriftAdaptiveLR sets {type(scheduler.optimizer).__name__}'s rate to min(2/v^p, max_lr) with v of "
                    f"the raw Hessian, in gradient-descent units, where the preconditioned step's rates are far "
                    f"smaller: max_lr={scheduler.max_lr:g} is {scheduler.max_lr / base:.0f} times the configured "
                    f"{base:g} (an outside trial's AdamW at 3e-3 ran at 0.006-2.1); set max_lr to the largest rate "
                    "the optimizer should take",
                )
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, LearningRateMonitor)]
        if any(isinstance(s, DriftAdaptiveLR) for s in self.schedulers) and monitors:
            if trainer.callbacks.index(monitors[0]) < trainer.callbacks.index(self):
                warn_once(
                    self._warned,
                    "order",
                    "LearningRateMonitor is listed before LRAdaptation: at a fit's first step (and the step a "
                    "resumed run owes a measurement) it logs the rate before DAL sets it from the batch about "
                    "to train; list LRAdaptation first in the Trainer's callbacks",
                )
        clipping = gradient_clipping(trainer, pl_module)
        if clipping is not None:
            warn_once(
                self._warned,
                "clipping",
                f"{clipping[0]} shortens the steps the trainer takes: the rate "
                f"{' and '.join(sorted({type(s).__name__ for s in self.schedulers}))} sets is that of the "
                "unclipped step: " + CLIPPED_STEP,
            )
        self._take_restored()
        self._started = True  # a checkpoint restored after this hook (FSDP2's strategy) is taken as it loads
        self._last_logged = self._last_end = None

    def _take_restored(self) -> None:
        """Go on with what a checkpoint held: a resumed run keeps its cadence and the values it was fed."""
        self._last_measured, self._restored = self._restored, None
        self._fed, self._fed_restored = self._fed_restored, {}
        self._scheduled_at, self._scheduled_restored = self._scheduled_restored, None
        self._counts_at_save, self._counts_restored = self._counts_restored, None

    def _check_config(self, config: LRSchedulerConfig) -> None:
        if self._manual:
            return  # Lightning drops monitor and reduce_on_plateau there and steps nothing: this callback does
        scheduler = config.scheduler
        if (
            config.interval != "step"
            or config.frequency != 1
            or not config.reduce_on_plateau
            or config.monitor != scheduler.monitor
        ):
            raise MisconfigurationException(
                f"{type(scheduler).__name__} must be stepped every optimizer step with its measurement: "
                f"return {{'optimizer': opt, 'lr_scheduler': scheduler.lightning_config()}} from configure_optimizers "
                f"(interval='step', frequency=1, reduce_on_plateau=True, monitor={scheduler.monitor!r}); got "
                f"interval={config.interval!r}, frequency={config.frequency}, "
                f"reduce_on_plateau={config.reduce_on_plateau}, monitor={config.monitor!r}"
            )

    def _find_eos(self, trainer: Trainer) -> None:
        found = [cb for cb in trainer.callbacks if isinstance(cb, EdgeOfStabilityMonitor)]
        if not found:
            raise MisconfigurationException(
                "SharpnessCappedLR needs the sharpness the EdgeOfStabilityMonitor measures: add "
                "HessianEigenMonitor(...) and EdgeOfStabilityMonitor() to the Trainer's callbacks"
            )
        capped = {id(s.optimizer) for s in self.schedulers if isinstance(s, SharpnessCappedLR)}
        matching = [cb for cb in found if id(trainer.optimizers[cb.optimizer_index]) in capped]
        if not matching:
            raise MisconfigurationException(
                "no EdgeOfStabilityMonitor measures the optimizer SharpnessCappedLR wraps: set its optimizer_index"
            )
        # The edge of the training loss: the monitor reading the unnamed Hessian monitor, not a held-out one.
        self.eos = next((cb for cb in matching if cb.monitor.name is None), matching[0])
        optimizer = trainer.optimizers[self.eos.optimizer_index]
        if self.eos.fixed_threshold is not None and optimizer_rule(optimizer).preconditioned:
            raise MisconfigurationException(
                f"SharpnessCappedLR caps {type(optimizer).__name__} at the edge of its preconditioned sharpness "
                "lambda_max(P^-1 H), but an EdgeOfStabilityMonitor given threshold= measures lambda_max(H): "
                "remove threshold= from the EdgeOfStabilityMonitor"
            )
        self.eos.add_listener(self._on_edge, sets_rate=True)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Fed for one fit: an EdgeOfStabilityMonitor reused with another Trainer must not step these schedulers.
        self._started = False
        if self.eos is not None:
            self.eos.remove_listener(self._on_edge)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning calls no teardown after an exception

    def _remember(self, trainer: Trainer, monitor: str) -> None:
        # The value Lightning will step the scheduler with, as it will read it (a float32 tensor).
        self._fed[monitor] = float(trainer.callback_metrics[monitor])

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Schedulers are restored after on_fit_start. A checkpoint Lightning wrote at a training batch end
        # (ModelCheckpoint(every_n_train_steps=...)) holds them from before their step for that batch:
        # take it now, with the value they would have been stepped with, as an uninterrupted run did. Under
        # manual optimization this callback steps them at its own batch end, before ModelCheckpoint's: a step
        # is owed only where a checkpoint was written before that (inside the measurement, on Ctrl+C), which
        # the step it last stepped them at tells (global_step counts every optimizer's steps, so comparing it
        # with a scheduler's count was true by chance with two: a resumed DAL warm-up ran a step ahead).
        if not any(isinstance(cb, HessianEigenMonitor) for cb in trainer.callbacks):
            announce_run(trainer, [], layout=False)  # the settings, which the first monitor logs otherwise
        step = trainer.global_step
        counts, self._counts_at_save = self._counts_at_save, None
        for index, scheduler in enumerate(self.schedulers):
            if self._manual:
                owed = self._scheduled_at is not None and step > self._scheduled_at
                if owed and counts is not None and len(counts) == len(self.schedulers):
                    owed = scheduler.last_epoch == counts[index]  # not stepped by training_step since
            else:
                owed = scheduler.last_epoch == step - 1
            if owed and scheduler.monitor in self._fed:
                scheduler.step(self._fed[scheduler.monitor])
        if self._manual:
            self._scheduled_at = step
        # The value a resumed fit was last fed, where training_step reads it before this callback's first batch
        # end puts it there (a scheduler it steps itself held an older value and a resumed run went its own
        # way: an outside trial).
        for scheduler in self.schedulers:
            if scheduler.monitor in self._fed and scheduler.monitor not in trainer.callback_metrics:
                trainer.callback_metrics[scheduler.monitor] = torch.tensor(self._fed[scheduler.monitor])
        # A checkpoint written inside the measurement for this step (OnExceptionCheckpoint on Ctrl+C) does not
        # count it as taken: take it before this step, on its batch, as the first step of a fit does.
        last = self._last_measured
        self._due = last is not None and trainer.global_step - last >= self.every_n_steps

    # -- per step ----------------------------------------------------------------------------
    @staticmethod
    def _name(scheduler: Any, key: str) -> str:
        return metric_name("dal" if isinstance(scheduler, DriftAdaptiveLR) else "cap", key)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._drop_replaced(trainer)
        for scheduler in self.schedulers:
            scheduler.adopt_new_groups()  # a group added at this epoch's start steps at the scheduled rate
        step = trainer.global_step
        if self._manual:
            self._at_batch_start = (step, [scheduler.last_epoch for scheduler in self.schedulers])
        if step == self._last_logged:
            return  # gradient accumulation: the rate is that of the optimizer step still in progress
        self._last_logged = step
        due, self._due = self._due, False
        for scheduler in self.schedulers:
            if (
                isinstance(scheduler, DriftAdaptiveLR)
                and (self._last_measured is None or due)
                and scheduler.adapts(scheduler.last_epoch)  # the step about to run, by its own count
            ):
                # The first step of a fit (or one whose measurement a resumed checkpoint had not finished):
                # measure now, so it already runs at the DAL rate.
                self._measure_drift(trainer, pl_module, batch, scheduler.optimizer)
                self._last_measured = step  # after it: a run interrupted inside it measures again on resume
                scheduler.refresh(self._fed[scheduler.monitor])  # as Lightning's later steps read it
        metrics = {}
        for scheduler in self.schedulers:
            for key, value in scheduler.metrics().items():
                if key not in ("hg_ratio", "sharpness"):  # logged when measured
                    metrics[self._name(scheduler, key)] = value
        log_metrics(trainer, metrics, step)

    def _drop_replaced(self, trainer: Trainer) -> None:
        """Stop serving a scheduler the trainer no longer steps (Lightning's StochasticWeightAveraging puts
        its SWALR in place of the schedulers at its first epoch): its rate and measurements would be logged
        as if they still set the optimizer's."""
        stepped = {id(config.scheduler) for config in trainer.lr_scheduler_configs}
        for scheduler in [s for s in self.schedulers if id(s) not in stepped]:
            self.schedulers.remove(scheduler)
            # Its values no longer hold (dal/lr said 1.0 under SWALR's 0.05).
            prefix = self._name(scheduler, "")
            for key in [k for k in trainer.callback_metrics if k.startswith(prefix)]:
                del trainer.callback_metrics[key]
            others = sorted({type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs})
            warn_once(
                self._warned,
                f"replaced {type(scheduler).__name__}",
                f"{type(scheduler).__name__} is no longer among the trainer's schedulers (now: "
                f"{', '.join(others) or 'none'}; StochasticWeightAveraging replaces them with SWALR): LRAdaptation "
                "stops measuring and logging for it from this step",
            )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_end:
            return  # gradient accumulation: the optimizer step is not complete yet
        self._last_end = step
        for scheduler in self.schedulers:
            if (
                isinstance(scheduler, DriftAdaptiveLR)
                and (self._last_measured is None or step - self._last_measured >= self.every_n_steps)
                and self._adapts_next(scheduler)
            ):
                self._measure_drift(trainer, pl_module, batch, scheduler.optimizer)
                self._last_measured = step
            elif scheduler.monitor not in trainer.callback_metrics:
                # Nothing measured in this fit yet (a fresh start, or a resume between measurements): what
                # the monitor held when the checkpoint was written (a measurement after the scheduler's
                # last step, at an epoch end), else what the scheduler holds, or NaN (it waits silently).
                held = math.nan if scheduler.measured is None else scheduler.measured
                trainer.callback_metrics[scheduler.monitor] = torch.tensor(
                    self._fed.get(scheduler.monitor, held)
                )
                self._remember(trainer, scheduler.monitor)
        if self._manual and self._at_batch_start is not None and self._at_batch_start[0] != step:
            # The optimizer stepped in this batch: step each scheduler training_step did not, as Lightning
            # would after this hook under automatic optimization (once a batch, whatever its optimizer steps).
            for scheduler, last_epoch in zip(self.schedulers, self._at_batch_start[1], strict=True):
                if scheduler.last_epoch == last_epoch:
                    scheduler.step(trainer.callback_metrics[scheduler.monitor])
            self._scheduled_at = step

    def _adapts_next(self, scheduler: DriftAdaptiveLR) -> bool:
        """Whether the optimizer step whose rate this batch's end sets runs at a DAL rate, by the scheduler's
        own count of steps (under manual optimization Lightning's step counts every optimizer's)."""
        taken = scheduler.last_epoch
        if self._manual and self._at_batch_start is not None:  # training_step may have stepped it already
            taken = self._at_batch_start[1][self.schedulers.index(scheduler)]
        return scheduler.adapts(taken + 1)

    def _measure_drift(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, optimizer: Any
    ) -> None:
        """Measure ||Hg||/||g|| on ``batch`` and log it (NaN when it failed), of the loss ``optimizer``'s step
        descends (with its coupled L2 decay)."""
        exact = self.hvp != "forward_difference"
        metrics: dict[str, float]
        try:
            with HessianOperator(
                pl_module,
                self._loss_fn,
                [batch],
                params=self.params,
                hvp=self.hvp if exact else "auto",
                seed=self.seed,
                dtype=measurement_dtype(pl_module),
            ) as op:
                decay = optimizer_weight_decay(optimizer, op.space)
                gc = gradient_curvature(op, "operator" if exact else "forward_difference", decay)
            if not (gc.finite and math.isfinite(gc.hg_ratio)):
                raise NonFiniteOperatorError(f"||g|| = {gc.grad_norm}, ||Hg|| = {gc.hg_norm}")
            metrics = {
                "hg_ratio": gc.hg_ratio,
                "grad_norm": gc.grad_norm,
                "hg_norm": gc.hg_norm,
                "seconds": gc.seconds,
            }
        except Exception as err:  # never BaseException: KeyboardInterrupt stops the run
            skip_or_raise(
                err,
                on_error=self.on_error,
                warned=self._warned,
                trainer=trainer,
                what="||Hg||/||g|| not measured",
                metric=None,  # dal/skipped is logged below, with the NaN that makes the scheduler hold
            )
            metrics = {"hg_ratio": math.nan, "skipped": 1.0}
        # The scheduler reads dal/hg_ratio from callback_metrics; NaN makes it hold its previous rate.
        log_metrics(
            trainer, {metric_name("dal", key): value for key, value in metrics.items()}, trainer.global_step
        )
        self._remember(trainer, names.DAL_HG_RATIO)

    def _on_edge(self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]) -> None:
        # Called with each sharpness the EoS monitor measured, before it judges it at the rate set here (at
        # learning rate 0 too: a warm-up from zero is capped from its first step); a measurement that gave no
        # sharpness keeps the cap (one whose judgement then fails has set it already).
        sharpness = float(metrics[names.SHARPNESS])
        log_metrics(trainer, {names.CAP_SHARPNESS: sharpness}, trainer.global_step)
        self._remember(trainer, names.CAP_SHARPNESS)
        for scheduler in self.schedulers:
            # Cap the next step now: a measurement may come after the cap's step for the last optimizer step
            # (before the first step of a fit, at an epoch's end, after this callback stepped it under manual
            # optimization), and the next step would run at the previous cap. Where the step is still to come
            # (a batch end under automatic optimization) it reads the same value: refreshing first is a no-op.
            if isinstance(scheduler, SharpnessCappedLR):
                scheduler.refresh(self._fed[scheduler.monitor])  # as Lightning's later steps read it

    # -- checkpoint --------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_measured": self._last_measured,
            "fed": dict(self._fed),
            "scheduled_at": self._scheduled_at,
            "batch_start": None if self._at_batch_start is None else list(self._at_batch_start[1]),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            state = mapping(state_dict, ("last_measured",), type(self).__name__)
            last = state["last_measured"]
            self._restored = None if last is None else count(last, "last_measured")
            fed = mapping(state.get("fed", {}), (), type(self).__name__)  # absent in older checkpoints
            self._fed_restored = {str(k): real(v, f"fed[{k!r}]") for k, v in fed.items()}
            scheduled = state.get("scheduled_at")  # absent in older checkpoints: no step owed
            self._scheduled_restored = None if scheduled is None else count(scheduled, "scheduled_at")
            counts = state.get("batch_start")
            if counts is not None and not isinstance(counts, list | tuple):
                raise UnreadableState(f"batch_start is {counts!r}, not a list of counts")
            self._counts_restored = None if counts is None else [count(c, "batch_start") for c in counts]
        except UnreadableState as err:
            warn_fresh_start(type(self).__name__, err)
            self._restored, self._fed_restored, self._scheduled_restored = None, {}, None
            self._counts_restored = None
        if self._started:
            # ModelParallelStrategy (FSDP2) restores callbacks after on_fit_start, which took nothing: a
            # resumed run measured afresh and skipped the scheduler step the checkpoint owed (DAL's first
            # step 20% fast, a capped cosine a step behind for the rest of the run; an outside trial).
            self._take_restored()
