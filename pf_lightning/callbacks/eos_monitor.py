"""EdgeOfStabilityMonitor: sharpness against the stability threshold of the optimizer in use.

After every measurement of a :class:`HessianEigenMonitor` it logs the sharpness, the threshold of the
optimizer actually stepping and their ratio (1.0 is the edge), the per-step growth and regime of every
tracked direction under that optimizer's own step, trends of the run, and an early warning with a hook for
user actions. What it knows of an optimizer (threshold, preconditioner, step dynamics, weight-decay
coupling) is its rule in :mod:`pf_lightning.stability.optimizers`: 2/lr for SGD, (2 + 2 beta)/lr for
heavy ball, and for preconditioning optimizers (Adam family, RMSprop, Adagrad, Adadelta) the
preconditioned sharpness lambda_max(P^-1 (H + W)), e.g. against (2 + 2 beta1)/((1 - beta1) lr) for Adam
(Cohen et al. 2021, 2022). The metrics are computed by
:func:`~pf_lightning.stability.edge_of_stability`; this callback measures what it needs and logs them.

With an adaptive optimizer the warning waits for the preconditioner to settle (10 steps, see
:data:`~pf_lightning.stability.PRECONDITIONER_WARMUP_STEPS`): after the first steps ``P``
rests on one or a few squared gradients and the preconditioned sharpness is inflated far past a
threshold derived for a frozen ``P``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from .. import logging as names
from .. import stability
from .._validation import Checks
from ..curvature.distributed import (
    LocalFailure,
    MeasurementAborted,
    all_reduce_sum,
    any_rank,
    is_distributed,
    reduce_agreed,
    world_size,
)
from ..curvature.drift import gradient_curvature
from ..curvature.params import ParameterSpace, select_parameters
from ..curvature.precondition import optimizer_weight_decay
from ..linalg import EigenResult, NonConvergenceWarning, NonFiniteOperatorError, held_nonconvergence
from ..linalg.operator import gram
from ..logging import (
    log_metrics,
    metric_name,
    summarize_wandb,
    tag_name,
    tagged,
    wandb_experiments,
    wandb_log,
    warn_once,
)
from ..measure import BatchSharpness
from ..stability import PRECONDITIONER_WARMUP_STEPS, EdgeHistory, PreconditionerUnavailable, StepDynamics
from ._checkpoint import (
    UnreadableState,
    cached_state_key,
    eos_from_state,
    result_state,
    starts_a_run,
    warn_fresh_start,
    warn_other_settings,
)
from ._faults import OnError, check_on_error, notify, skip_or_raise
from ._probe import TrainingBatches, trains_on_mini_batches
from .hessian_monitor import HessianEigenMonitor

WarningAction = Callable[[Trainer, LightningModule, dict[str, float]], None]
EdgeListener = Callable[[Trainer, LightningModule, dict[str, float]], None]
check = Checks(MisconfigurationException)


PROGRESS_BAR = (names.RATIO, names.BATCH_RATIO)
"""Shown in Lightning's progress bar after each measurement (kept there until the next one)."""


_UNSETTLED = object()  # no training loader settled yet for the batch-sharpness draws


@dataclasses.dataclass(frozen=True)
class _Measured:
    """What one measurement gives the edge's judgement, which also reads the loss window: the arguments of
    :func:`~pf_lightning.stability.edge_of_stability` but the losses and the history, and the metrics
    measured beside them."""

    eigenvalues: list[float]  # the monitor's tracked eigenvalues, for the history
    edge_inputs: dict[str, Any]
    extras: dict[str, float]


def _steps_along_gradient(optimizer: Any) -> bool:
    """Whether every group of ``optimizer`` steps along its gradient, as plain gradient descent (no momentum,
    no preconditioner; False for an optimizer without a rule, LBFGS's line search among them)."""
    try:
        groups = [stability.unit_step_dynamics(optimizer, i) for i in range(len(optimizer.param_groups))]
    except (stability.UnsupportedOptimizer, ValueError):
        return False
    return all(d.scalar and not d.preconditioned for d in groups)


def _other_steps(optimizer: torch.optim.Optimizer, first: StepDynamics) -> list[str]:
    """The parameter groups that step otherwise than group 0 (``first``), each described. A preconditioning
    optimizer's rates are in its ``P`` (:func:`~pf_lightning.curvature.optimizer_preconditioner`), so
    there only its other settings count."""
    others = []
    for i in range(1, len(optimizer.param_groups)):
        if float(optimizer.param_groups[i]["lr"]) == 0.0:
            if not first.preconditioned:  # a preconditioning optimizer's P holds it: it does not move
                others.append(
                    f"group {i}: rate 0, it stops moving, and its block is in the sharpness all the same "
                    "(measure the groups that train: HessianEigenMonitor(params=...))"
                )
            continue
        try:
            dynamics = stability.step_dynamics(optimizer, i)
        except ValueError as err:  # a setting no rule accepts
            others.append(f"group {i}: {err}")
            continue
        compared = dataclasses.replace(
            dynamics, formula="", lr=first.lr if first.preconditioned else dynamics.lr
        )
        if compared != dataclasses.replace(first, formula=""):
            others.append(f"group {i}: {dynamics.label}, {dynamics.formula}")
    return others


def gradient_clipping(
    trainer: Trainer, pl_module: LightningModule
) -> tuple[str, tuple[float, str] | None] | None:
    """How the trainer clips gradients before each optimizer step: None where it does not; else the clipping
    in words and, for Lightning's own (``gradient_clip_val``, ``gradient_clip_algorithm``), the
    ``(value, algorithm)`` that :func:`~pf_lightning.critical_sharpness` takes (None for a module's own
    ``configure_gradient_clipping``, which may clip any way). Lightning clips under automatic
    optimization only, and not at a value of 0 or below."""
    if not pl_module.automatic_optimization:
        return None
    if type(pl_module).configure_gradient_clipping is not LightningModule.configure_gradient_clipping:
        return f"{type(pl_module).__name__}.configure_gradient_clipping", None
    value = trainer.gradient_clip_val
    if not value or value <= 0:
        return None
    algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", None) or "norm")
    return f"gradient clipping (gradient_clip_val={value}, {algorithm})", (float(value), algorithm)


CLIPPED_STEP = (
    "while clipping binds (by a factor c = clip/||g|| under norm clipping) the step is c times shorter, and "
    "gradient descent's edge is 2/(c*lr)"
)
"""What a clipped step means for the edge, in the warnings of the monitor and of ``LRAdaptation``."""


class EdgeOfStabilityMonitor(Callback):
    """Edge-of-stability and principal-flow diagnostics from the latest Hessian eigenpairs.

    Args:
        monitor: the :class:`HessianEigenMonitor` to read; by default the trainer's monitor over all
            parameters (the unnamed one first), never a parameter group's.
        optimizer_index: which of the module's optimizers the threshold is taken from.
        threshold: a fixed stability threshold, for optimizers without a known one.
        warn_ratio: sharpness/threshold level that triggers the early warning.
        on_warning: ``action(trainer, pl_module, metrics)`` called each time the ratio crosses
            ``warn_ratio`` upwards (e.g. save a checkpoint).
        proxies: also log the one-HVP proxies ``||Hg||/||g||``, ``g^T H g/||g||^2`` and the drift ratio
            ``(lr/2)||Hg||/||g||`` on the current training batch.
        proxy_every_n_steps: cadence of the proxies.
        loss_window: optimizer steps over which loss non-monotonicity is measured.
        slope_window: measurements over which the progressive-sharpening slope is fitted.
        chart_every: with W&B, log the chart of top-k eigenvalues against the threshold every this
            many measurements (and at the end of fit).
        batch_sharpness: log the batch sharpness (``eos/batch_sharpness``, ``_stderr``, ``eos/batch_threshold``,
            ``eos/batch_ratio``, ``eos/batch_sharpness_batches``) at every measurement, on fresh mini-batches
            drawn like the training loader's (:func:`~pf_lightning.batch_sharpness` with the optimizer's
            rule: along its next update against 2/lr for SGD, the preconditioned quotient against its
            threshold for Adam and the other preconditioning optimizers). ``None`` (default): when training
            uses mini-batches (the loader yields more batches than one optimizer step accumulates).
            Then the edge warning and ``eos/first_edge_step`` judge the larger of ``eos/ratio`` and
            ``eos/batch_ratio``: at small batches the batch sharpness is the one nearer its threshold, at
            large ones the full-batch sharpness (on digits: batch 8, 0.76 against 0.46; batch 128, 0.74
            against 0.97). ``eos/batch_uphill_fraction`` is the fraction of batches along whose update
            the loss rises at every step size (their quotient is negative).
        batch_sharpness_batches: at most this many mini-batches per measurement (one gradient and one
            Hessian-vector product each).
        batch_sharpness_rel_stderr: stop drawing once the standard error is this fraction of the value
            (after at least :data:`~pf_lightning.measure.MIN_BATCHES_TO_STOP` batches).
        critical_every_n_steps: every this many optimizer steps, log the critical sharpness along the
            optimizer's next update on the batch just trained (``eos/critical_sharpness``,
            ``eos/critical_ratio`` against 2/lr: above 1 that step would raise the batch's loss;
            ``eos/critical_forward`` passes; ``inf`` where the update points uphill on that batch): one
            gradient and a few forward passes of that batch (5-6 on digits), no Hessian-vector product
            (:func:`~pf_lightning.critical_sharpness`). Under gradient accumulation the batch is the last
            micro-batch. None: off.
        on_error: ``"skip"``: diagnostics that fail at run time (the preconditioned measurement, the
            principal-flow gradient, the proxies, a NaN, any ``Exception``) are skipped for that step,
            flagged as ``eos/skipped`` (``eos/proxies_skipped`` for the proxies), warned once per error
            type, and training goes on; so is a failing ``on_warning`` action or W&B chart.
            ``"raise"``: the exception stops training.

    Adaptive optimizers: the sharpness, threshold and ratio are logged from the first measurement
    on, but until the optimizer has taken ``preconditioner_warmup_steps`` steps (an attribute, default
    10, :data:`~pf_lightning.stability.PRECONDITIONER_WARMUP_STEPS`; 0 warns from the
    first step) those measurements are flagged ``eos/warmup`` and neither raise the edge warning nor
    call ``on_warning`` nor count as ``eos/first_edge_step``.

    Checkpoints: the state holds the history, the loss window, the first edge step, the accumulated
    negative curvature (and the judged optimizer's steps since the last measurement, its next interval:
    under manual optimization with several optimizers Lightning's step counts all of theirs) and the
    latest preconditioned measurement (the next one's warm start; its vectors
    left out as the monitor's are, by ``checkpoint_eigenvectors`` and for FSDP2 shards). A state this
    version cannot read (missing keys, wrong types, NaN, another callback's state) gives one
    ``RuntimeWarning`` and a fresh start of all of them.

    Attributes:
        history: the logged metrics of each measurement, oldest first; like the monitor's ``history``
            it keeps the last ``monitor.max_history`` of them, and never fewer than the sharpening slope's
            ``slope_window - 1``; the W&B chart and table draw the latest judged ones that fit a W&B table.

    Raises:
        MisconfigurationException: no :class:`HessianEigenMonitor`, or a bad argument.
    """

    def __init__(
        self,
        monitor: HessianEigenMonitor | None = None,
        optimizer_index: int = 0,
        threshold: float | None = None,
        warn_ratio: float = 1.0,
        on_warning: WarningAction | None = None,
        proxies: bool = False,
        proxy_every_n_steps: int = 1,
        loss_window: int = 50,
        slope_window: int = 5,
        chart_every: int = 10,
        on_error: OnError = "skip",
        batch_sharpness: bool | None = None,
        batch_sharpness_batches: int = 20,
        batch_sharpness_rel_stderr: float = 0.02,
        critical_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        check_on_error(on_error)
        if batch_sharpness is not None:
            check.flag("batch_sharpness", batch_sharpness)
        batch_sharpness_batches = check.integer("batch_sharpness_batches", batch_sharpness_batches, 2)
        batch_sharpness_rel_stderr = check.number(
            "batch_sharpness_rel_stderr", batch_sharpness_rel_stderr, above=0, below=1,
            hint="a relative standard error such as 0.02",
        )  # fmt: skip
        critical_every_n_steps = check.integer(
            "critical_every_n_steps", critical_every_n_steps, 1, allow_none=True
        )
        if monitor is not None:
            check.instance("monitor", monitor, HessianEigenMonitor, "None or a HessianEigenMonitor")
        optimizer_index = check.integer("optimizer_index", optimizer_index, 0)
        proxy_every_n_steps = check.integer("proxy_every_n_steps", proxy_every_n_steps, 1)
        loss_window = check.integer("loss_window", loss_window, 2)
        slope_window = check.integer("slope_window", slope_window, 2)
        chart_every = check.integer("chart_every", chart_every, 1)
        threshold = check.number(
            "threshold", threshold, above=0, allow_none=True, hint="a sharpness level such as 2 / lr"
        )
        warn_ratio = check.number(
            "warn_ratio", warn_ratio, above=0, hint="1.0 warns at the edge of stability"
        )
        check.function("on_warning", on_warning, "on_warning(trainer, pl_module, metrics)", 3)
        check.flag("proxies", proxies)
        self.monitor = monitor
        self._given_monitor = monitor  # None: the Trainer's, found at each set-up
        self.optimizer_index, self.fixed_threshold, self.warn_ratio = (
            optimizer_index,
            threshold,
            float(warn_ratio),
        )
        self.on_warning, self.proxies, self.proxy_every_n_steps = on_warning, proxies, proxy_every_n_steps
        self.slope_window, self.chart_every = slope_window, chart_every
        self.on_error = on_error
        self.batch_sharpness, self.batch_sharpness_batches = batch_sharpness, batch_sharpness_batches
        self.batch_sharpness_rel_stderr = float(batch_sharpness_rel_stderr)
        self.critical_every_n_steps = critical_every_n_steps
        self.preconditioner_warmup_steps = PRECONDITIONER_WARMUP_STEPS
        # Per-step losses stay on the device (0-d float64 tensors) until a measurement reads them: a
        # float() every step would wait for the GPU each step and stall its asynchronous queue.
        self.losses: collections.deque[float | torch.Tensor] = collections.deque(maxlen=loss_window)
        self._last_loss_step = -1
        # The losses of the batches since the last optimizer step (its micro-batches): their sum and count,
        # which stay two values where global_step stands still (a manual training_step that does not step).
        self._pending_losses: tuple[torch.Tensor, int] | None = None
        # From an optimizer step to this callback's batch end the step's loss is not recorded yet: a
        # measurement a monitor listed before this callback makes at its batch end is judged at ours.
        self._batch_open = False
        self._judgement_due = False  # a measurement (or its failed diagnostics) waits for the batch end
        self._unjudged: _Measured | None = None
        self._listeners: list[EdgeListener] = []
        self._rate_setters: list[EdgeListener] = []
        self._batches: TrainingBatches | None = None
        self._batches_loader: Any = _UNSETTLED  # the training loader they were settled for
        self._batches_error: MisconfigurationException | None = None
        self._progress: dict[str, float] = {}
        # The trainer's gradient clipping, in words and as critical_sharpness takes it (set at fit start).
        self._clipping: tuple[str, tuple[float, str] | None] | None = None
        self._step_hook: Any = None  # counts the judged optimizer's steps during a fit
        self._restored = False  # a checkpoint's state was loaded for the fit about to start
        # Whether the judged optimizer preconditions (set at fit start): its threshold is then that of
        # P^-1 H, not of the Hessian's own eigenvalues (the dashboards draw it with eos/sharpness alone).
        self.preconditioned = False
        self._new_run()

    def _new_run(self) -> None:
        """What one run accumulates, empty (see :func:`~pf_lightning.callbacks._checkpoint.starts_a_run`)."""
        self.losses.clear()
        self._raw = 0  # the window's last losses, recorded since the last measurement: this rank's own
        self.history: list[dict[str, Any]] = []
        self._measured = 0  # measurements judged in this run (the chart's cadence)
        self.first_edge_step: int | None = None
        self.negative_curvature = 0.0
        # The judged optimizer's own steps since the last judged measurement, the negative curvature's
        # interval (None: unknown, in a run resumed from a checkpoint that did not keep it).
        self._interval_steps: int | None = 0
        self._above = False
        self._preconditioned_latest: EigenResult | None = None
        self._warned: set[str] = set()
        # (step, value, threshold 2/lr) for the W&B chart, capped as the history
        self._critical: list[tuple[int, float, float]] = []
        self._charted: tuple[Any, ...] | None = None  # what the last W&B chart drew (see _chart)
        self._extremes: dict[str, float] = {}  # the W&B summary's extremes (see _summarize)
        self._extremes_pending = False  # restored without them: rebuilt from the history

    @property
    def _clip(self) -> tuple[float, str] | None:
        """The trainer's clipping as critical_sharpness takes it (None: none, or a module's own)."""
        return None if self._clipping is None else self._clipping[1]

    @property
    @override
    def state_key(self) -> str:
        # Two instances differ by the Hessian monitor they read (its name) and the optimizer they judge;
        # one reading the unnamed monitor keeps the key of earlier versions, so their checkpoints load.
        name = None if self.monitor is None else self.monitor.name
        if name is None:
            return cached_state_key(self, optimizer_index=self.optimizer_index)
        return cached_state_key(self, monitor=name, optimizer_index=self.optimizer_index)

    def add_listener(self, listener: EdgeListener, *, sets_rate: bool = False) -> None:
        """Call ``listener(trainer, pl_module, metrics)`` after every measurement whose ``eos/*`` metrics
        (untagged names, e.g. ``names.SHARPNESS``) were logged; at learning rate 0 they are ``eos/lr`` and
        ``eos/sharpness`` alone, and a preconditioned optimizer's listeners are not called there.

        ``sets_rate=True``: the listener sets the next step's learning rate from the sharpness (the sharpness
        cap). It is called before the measurement is judged, with ``eos/sharpness`` and ``eos/lr`` (the rate
        before it acts) alone, so the threshold, the ratios and ``eos/lr`` are those of the rate it set."""
        attached = self._rate_setters if sets_rate else self._listeners
        if listener not in attached:
            attached.append(listener)

    def remove_listener(self, listener: EdgeListener) -> None:
        """Stop calling ``listener`` (nothing if it is not attached)."""
        for attached in (self._listeners, self._rate_setters):
            if listener in attached:
                attached.remove(listener)

    def settings(self) -> tuple[str, dict[str, Any]]:
        """What this monitor was asked for, as the loggers record it (the W&B run config under
        ``pf_lightning``): its key there, and its arguments."""
        name = None if self.monitor is None else self.monitor.name
        values = {
            "optimizer_index": self.optimizer_index,
            "threshold": self.fixed_threshold,
            "warn_ratio": self.warn_ratio,
            "proxies": self.proxies,
            "batch_sharpness": self.batch_sharpness,
            "batch_sharpness_batches": self.batch_sharpness_batches,
            "batch_sharpness_rel_stderr": self.batch_sharpness_rel_stderr,
            "critical_every_n_steps": self.critical_every_n_steps,
            "chart_every": self.chart_every,
        }
        return names.settings_key("EdgeOfStabilityMonitor", name), values

    def metric(self, name: str) -> str:
        """The logged name of ``eos/<name>`` (``eos/<monitor name>/<name>`` for a named monitor)."""
        return metric_name("eos", name, None if self.monitor is None else self.monitor.name)

    # -- set-up ------------------------------------------------------------------------------
    def _reads(self, trainer: Trainer) -> HessianEigenMonitor:
        """The HessianEigenMonitor this monitor reads on ``trainer``: the one given, else the Trainer's (found
        anew for each Trainer, not the one an earlier fit found)."""
        if self._given_monitor is not None:
            return self._given_monitor
        found = [cb for cb in trainer.callbacks if isinstance(cb, HessianEigenMonitor)]
        if not found:
            raise MisconfigurationException(
                "EdgeOfStabilityMonitor reads the eigenpairs of a HessianEigenMonitor: add "
                "HessianEigenMonitor(...) to the Trainer's callbacks (or pass monitor=)"
            )
        # A group's spectrum is that of a diagonal block of the Hessian, whose top eigenvalue is at most
        # the full one's: the threshold applies to the whole Hessian only.
        full = [cb for cb in found if cb.params is None]
        if not full:
            raise MisconfigurationException(
                "EdgeOfStabilityMonitor needs the sharpness of the whole Hessian, but every "
                "HessianEigenMonitor measures a parameter subset (`params=`): add HessianEigenMonitor() "
                "without `params` (or pass monitor= explicitly)"
            )
        return next((cb for cb in full if cb.name is None), full[0])

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.monitor = self._reads(trainer)
        readers = [
            cb
            for cb in trainer.callbacks
            if isinstance(cb, EdgeOfStabilityMonitor) and cb._reads(trainer) is self.monitor
        ]
        if len(readers) > 1:  # their eos/* and pf/* carry the Hessian monitor's name alone
            where = self.metric("*")
            raise MisconfigurationException(
                f"{len(readers)} EdgeOfStabilityMonitors read one HessianEigenMonitor and log under {where!r}, "
                "each overwriting the others' metrics: give each but one a HessianEigenMonitor of its own with "
                "a name= (e.g. EdgeOfStabilityMonitor(monitor=HessianEigenMonitor(name='opt1'), "
                "optimizer_index=1), with that monitor among the callbacks too)"
            )
        if not any(cb is self.monitor for cb in trainer.callbacks):
            raise MisconfigurationException(
                "EdgeOfStabilityMonitor(monitor=...) reads a HessianEigenMonitor that is not among the Trainer's "
                "callbacks, so it never measures: add that monitor to the callbacks too"
            )
        self.monitor.add_listener(self._on_measurement, gradient=True)  # for this fit (see teardown)
        if stage == "fit":
            if starts_a_run(trainer):
                self._new_run()
            self._progress = {}  # nothing from an earlier fit in this one's progress bar
            self._batches, self._batches_loader, self._batches_error = None, _UNSETTLED, None
            self._batch_open, self._judgement_due, self._unjudged = False, False, None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Attached for one fit: a Hessian monitor reused with another Trainer must not feed this monitor
        # when it is not in that Trainer (it would log its eos/* into that run).
        if self.monitor is not None:
            self.monitor.remove_listener(self._on_measurement)
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    def _count_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._interval_steps is not None:
            self._interval_steps += 1

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning calls no teardown after an exception

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The optimizers exist from here on; the monitor's fit-start measurement (its on_train_start,
        # which may run before this callback's) already reads them.
        optimizers = trainer.optimizers
        # Before the fit-start measurement is judged: its edge warning says its threshold is the unclipped step's.
        self._clipping = gradient_clipping(trainer, pl_module)
        if self.optimizer_index >= len(optimizers):
            raise MisconfigurationException(
                f"optimizer_index={self.optimizer_index} but the module configures {len(optimizers)} optimizer(s)"
            )
        preconditioned = False
        optimizer = optimizers[self.optimizer_index]
        try:  # an ascent's edge is -lambda_min's, not the measured lambda_max's: refused with threshold= too
            for i in range(len(getattr(optimizer, "param_groups", ()))):
                stability.group_settings(optimizer, i)
        except stability.UnsupportedOptimizer as err:
            raise MisconfigurationException(str(err)) from err
        if self.fixed_threshold is None:
            try:  # at lr 1: a schedule may start at 0 (a warm-up from zero); every other setting of every
                # group is checked
                groups = [
                    stability.unit_step_dynamics(optimizer, i) for i in range(len(optimizer.param_groups))
                ]
                preconditioned = groups[0].preconditioned
            except stability.UnsupportedOptimizer as err:
                raise MisconfigurationException(
                    f"`threshold` must be given for this optimizer: {err}"
                ) from err
            except ValueError as err:
                raise MisconfigurationException(
                    f"{type(optimizer).__name__}'s settings give no stability threshold: {err}; correct them, "
                    "or pass threshold= explicitly"
                ) from err
        # Lightning's step counts every optimizer's steps (manual optimization with several): the judged
        # one's are counted where it steps.
        if self._step_hook is not None:
            self._step_hook.remove()
        register = getattr(optimizer, "register_step_post_hook", None)
        if callable(register):
            self._step_hook = register(self._count_step)
        else:  # an optimizer Lightning takes by its protocol alone: Lightning's steps are its steps
            self._step_hook, self._interval_steps = None, None
        # The gradient's projections are read where the step is not preconditioned: the measurement
        # hands over the probe gradient there (from its cached graphs), and does not take it otherwise.
        self.preconditioned = preconditioned
        self.monitor.add_listener(self._on_measurement, gradient=not preconditioned)
        if self.critical_every_n_steps is not None:
            try:
                update = stability.optimizer_rule(optimizer).update
            except stability.UnsupportedOptimizer:
                update = None
            if update is None:
                raise MisconfigurationException(
                    f"critical_every_n_steps needs the next update of {type(optimizer).__name__}, which no rule "
                    "gives: register an OptimizerRule with `update=` (pf_lightning.stability.register_optimizer_rule), "
                    "or set critical_every_n_steps=None"
                )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_loss_step, self._pending_losses = trainer.global_step, None
        self._rebuild_extremes()
        if self._restored and self.history:
            # The last judged measurement's values, as the interrupted fit held them for ModelCheckpoint and
            # EarlyStopping (a resumed fit had none until its next measurement: "metric not available").
            entry = self.history[-1]
            unjudged = names.OUTSIDE_WARMUP_SUMMARIES if names.WARMUP in entry else ()  # as the fit left them
            last = {
                key: value
                for key, value in entry.items()
                if "/" in key and key != names.WARNING and key not in unjudged
            }
            for key, value in tagged(last, self.monitor.name).items():
                trainer.callback_metrics.setdefault(key, torch.tensor(float(value)))
        self._restored = False
        self._training_batches(trainer, pl_module)
        if self._batches_error is not None:  # found by the listener at the fit-start measurement
            raise self._batches_error
        optimizers = trainer.optimizers
        optimizer = optimizers[self.optimizer_index]
        measured = None  # every trainable parameter
        if self.monitor.params is not None:
            self.monitor.check_module(pl_module)  # its own error where params match nothing, before ours
            measured = {name: p for name, p in select_parameters(pl_module, self.monitor.params)}
            ids = {id(p) for p in measured.values()}
            held = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            if any(id(p) not in ids for p in held):  # a block of the optimizer's own is exact (a GAN's)
                self._warn_once(
                    "block",
                    f"EdgeOfStabilityMonitor(monitor=...) reads a HessianEigenMonitor of a parameter subset "
                    f"(params={self.monitor.params!r}) that leaves out parameters {type(optimizer).__name__} "
                    "moves: its top eigenvalue is a diagonal block's, at most that of the block the optimizer "
                    "moves, so the ratio to the threshold understates how close training is to the edge",
                )
        if self.fixed_threshold is None and not stability.optimizer_rule(optimizer).preconditioned:
            outside = [
                name
                for name in stability.unheld_parameters(optimizer, pl_module)
                if measured is None or name in measured
            ]
            if outside:  # a preconditioning optimizer's sharpness is measured on its own block (P^-1 = 0)
                self._warn_once(
                    "outside",
                    f"{type(optimizer).__name__} (optimizer {self.optimizer_index}) does not update "
                    f"{len(outside)} trainable parameter tensor(s) ({outside[0]!r}, ...): eos/sharpness is the "
                    "top eigenvalue of the whole Hessian, at least that of the block it moves, so eos/ratio "
                    "can overstate its edge",
                )
        if (
            self.fixed_threshold is not None
            and self._batches is not None
            and not _steps_along_gradient(optimizer)
        ):
            self._warn_once(
                "given_threshold_batches",
                f"threshold= judges {type(optimizer).__name__} as gradient descent with that edge: "
                "eos/batch_sharpness is taken along each batch's gradient (g^T H g / g^T g), not along "
                f"{type(optimizer).__name__}'s own step; remove threshold= where the optimizer has a rule "
                "(pf_lightning.stability.register_optimizer_rule), or pass batch_sharpness=False",
            )
        clipping = self._clipping
        if clipping is not None:
            critical = (
                "eos/critical_ratio searches along the clipped step"
                if self._clip is not None
                else "eos/critical_ratio searches along the unclipped update"
            )
            self._warn_once(
                "clipping",
                f"{clipping[0]} shortens the steps the trainer takes; eos/threshold, eos/ratio and the batch "
                f"sharpness compare with the edge of the unclipped step at the optimizer's rate ({critical}): "
                + CLIPPED_STEP,
            )
        caps = [
            f"{cap}={value}"
            for cap, value in (
                ("max_work_fraction", self.monitor.max_work_fraction),
                ("max_time_fraction", self.monitor.max_time_fraction),
            )
            if value is not None
        ]
        per_step = [
            f"{what} every {n} step(s)"
            for what, n in (
                (
                    "the proxies (one gradient and one product of the batch)",
                    self.proxy_every_n_steps if self.proxies else None,
                ),
                ("the critical search (one gradient and 5-6 forward passes)", self.critical_every_n_steps),
            )
            if n is not None
        ]
        if caps and per_step:
            self._warn_once(
                "uncapped",
                f"{' and '.join(per_step)} run at their own cadence, outside the HessianEigenMonitor's "
                f"{' and '.join(caps)}, which caps its measurements alone and does not count these: each costs "
                "a few gradients of its batch (at every step, several times the training's own work); raise "
                "proxy_every_n_steps and critical_every_n_steps to keep them within your budget",
            )
        if len(optimizers) > 1:
            rank_zero_info(
                f"EdgeOfStabilityMonitor: {len(optimizers)} optimizers; thresholds are those of optimizer "
                f"{self.optimizer_index} ({type(optimizers[self.optimizer_index]).__name__}): set optimizer_index= "
                "to choose another"
            )

    def _training_batches(self, trainer: Trainer, pl_module: LightningModule) -> TrainingBatches | None:
        """Where batch sharpness draws its mini-batches, settled for each training loader of the fit: again
        after Lightning reloads it (``reload_dataloaders_every_n_epochs``, a curriculum). None: not measured.

        Raises:
            MisconfigurationException: ``batch_sharpness=True`` but the fit's first training loader cannot be
                drawn from (a reloaded one that cannot is warned about and not measured).
        """
        loader = trainer.train_dataloader
        if loader is self._batches_loader:
            return self._batches
        reloaded = self._batches_loader is not _UNSETTLED
        self._batches_loader, self._batches = loader, None
        wanted = self.batch_sharpness
        if wanted is False:
            return None
        # Every rank decides alike: one measuring alone waits in the measurement's collectives for the others
        # (ranks whose shards differ in length, use_distributed_sampler=False: one trains on mini-batches, the
        # other on its whole shard; an outside trial's gloo aborted at the fit-start measurement).
        device = pl_module.device
        if wanted is None and not any_rank([trains_on_mini_batches(trainer)], device)[0]:
            return None
        source = failure = None
        try:
            source = TrainingBatches.from_trainer(trainer)
        except ValueError as err:
            failure = err
        try:
            any_rank([False], device, error=failure)
            self._batches = source
        except (ValueError, MeasurementAborted) as agreed:
            err = (
                agreed if isinstance(agreed, ValueError) else f"on rank {agreed.rank}, {agreed.error_message}"
            )
            if wanted and not reloaded:
                self._batches_error = MisconfigurationException(
                    f"batch_sharpness=True needs mini-batches drawn like the training loader's, but {err}: "
                    "give the Trainer one map-style DataLoader with a batch_size, or set batch_sharpness=False"
                )
                raise self._batches_error from agreed
            self._warn_once(
                "batches", f"mini-batch training, but batch sharpness is not measured: {err}; the edge is judged on "
                "eos/ratio alone, the full-batch sharpness, which at small batches can stay well below the threshold",
            )  # fmt: skip
        return self._batches

    def _dynamics(self, trainer: Trainer) -> tuple[StepDynamics, torch.optim.Optimizer]:
        optimizer = trainer.optimizers[self.optimizer_index]
        if self.fixed_threshold is None:
            dynamics = stability.step_dynamics(optimizer)
            others = _other_steps(optimizer, dynamics)
            if others:
                self._warn_once(
                    "groups",
                    f"the parameter groups of {type(optimizer).__name__} step differently (group 0: "
                    f"{dynamics.label}, {dynamics.formula}; {'; '.join(others)}): the threshold, ratio, growth "
                    "rates and regimes are group 0's, which can misjudge the edge of the other groups' "
                    "directions; give the groups one learning rate and momentum, or pass threshold=",
                )
            for group in range(len(optimizer.param_groups)):
                uneven = stability.uneven_steps(optimizer, group)
                if uneven is not None:
                    self._warn_once(
                        "steps",
                        f"parameters of group {group} of {type(optimizer).__name__} have taken different numbers "
                        f"of steps (a part unfrozen later?), and its step depends on the count ({uneven}): the "
                        "threshold, ratio, growth rates and regimes are the first stepped parameter's, which "
                        "can misjudge the others' directions",
                    )
                    break
            return dynamics, optimizer
        # A given threshold: gradient descent with that edge.
        return StepDynamics(
            2.0 / self.fixed_threshold, label=type(optimizer).__name__, formula="given"
        ), optimizer

    # -- per measurement ---------------------------------------------------------------------
    def _on_measurement(self, trainer: Trainer, pl_module: LightningModule, result: EigenResult) -> None:
        try:
            self._training_batches(trainer, pl_module)
        except MisconfigurationException:  # from the monitor's fit-start measurement: this on_train_start,
            return  # next, stops the fit with it (a skipped measurement would say training goes on)
        optimizer = trainer.optimizers[self.optimizer_index]
        if self.fixed_threshold is None and float(optimizer.param_groups[0]["lr"]) == 0.0:
            self._at_rest(trainer, pl_module, result, optimizer)
            return
        try:
            measured = self._diagnostics(trainer, pl_module, result)
        except Exception as err:  # never BaseException: KeyboardInterrupt stops the run
            self._skip(trainer, err, "EoS diagnostics skipped", self.metric("skipped"))
            measured = None  # judged as nothing, but judged: the ranks' loss windows meet there
        if self._batch_open:  # the loss of the step just taken joins the window at this callback's batch end
            self._judgement_due, self._unjudged = True, measured
            return
        self._judge(trainer, pl_module, measured)

    def _judge(self, trainer: Trainer, pl_module: LightningModule, measured: _Measured | None) -> None:
        """The edge of one measurement, with the loss window up to the step it was taken at: log it, warn,
        keep it in the history and hand it to the listeners. Every rank judges every measurement (``None``:
        its diagnostics failed or do not apply) and so averages the loss window with the others."""
        losses = self._run_losses(pl_module.device)
        if measured is None or self._judged(measured.edge_inputs["step"]):
            return
        recent = self.history[-(self.slope_window - 1) :]
        history = EdgeHistory(
            step=self.history[-1]["step"] if self.history else None,
            sharpness=tuple((h["step"], h[names.SHARPNESS]) for h in recent),
            first_edge_step=self.first_edge_step,
            negative_curvature=self.negative_curvature,
        )
        try:
            metrics, edge = stability.edge_of_stability(
                **measured.edge_inputs,
                interval_steps=self._interval_steps,
                losses=losses if len(losses) >= 2 else (),
                history=history,
                slope_window=self.slope_window,
            )
        except Exception as err:  # never BaseException: KeyboardInterrupt stops the run
            self._skip(trainer, err, "EoS diagnostics skipped", self.metric("skipped"))
            return
        metrics.update(measured.extras)
        dynamics, step = measured.edge_inputs["dynamics"], measured.edge_inputs["step"]
        if math.isnan(metrics.get(names.LOSS_NON_MONOTONICITY, 0.0)):
            self._warn_once(
                "loss_not_finite",
                f"step {step}: a training loss of the last {len(losses)} steps is NaN or infinite: "
                f"{tag_name(names.LOSS_NON_MONOTONICITY, self.monitor.name)} is NaN while it is in the window",
            )
        if dynamics.preconditioned:
            metrics[names.PRECONDITIONED_SHARPNESS] = metrics[names.SHARPNESS]
        warming = names.WARMUP in metrics
        judged = stability.judged_edge(metrics)  # the larger of eos/ratio and eos/batch_ratio
        ratio = judged.ratio
        fire = ratio >= self.warn_ratio and not self._above and not warming
        if fire:
            metrics[names.WARNING] = 1.0
            formula = dynamics.formula if judged.threshold == dynamics.threshold else "2/lr along its update"
            self._warn_once(
                "edge",
                f"step {step}: {judged.quantity} {judged.value:.4g} reached {ratio:.2f} x the stability threshold "
                f"{judged.threshold:.4g} of {dynamics.label} ({formula})"
                + (
                    ", the unclipped step's: gradient clipping may keep the steps taken below it ("
                    + (
                        "a module's own clipping is not modelled"
                        if self._clip is None
                        else "eos/critical_ratio follows the clipped step"
                        if self.critical_every_n_steps is not None
                        else "critical_every_n_steps= measures eos/critical_ratio along the clipped step"
                    )
                    + ")"
                    if self._clipping is not None
                    else ""
                ),
            )
        if not warming:
            self._above = ratio >= self.warn_ratio
        self.first_edge_step, self.negative_curvature = edge.first_edge_step, edge.negative_curvature
        self._interval_steps = 0 if self._step_hook is not None else None
        log_metrics(trainer, tagged(metrics, self.monitor.name), step)
        if warming:  # logged, not judged: not for EarlyStopping or ModelCheckpoint to act on (an outside
            # trial's EarlyStopping(divergence_threshold=2) stopped an Adam fit at step 4 on a warm-up ratio 5.1)
            for key in names.OUTSIDE_WARMUP_SUMMARIES:
                trainer.callback_metrics.pop(tag_name(key, self.monitor.name), None)
        else:
            self._summarize(trainer, metrics)
            # The warm-up is over: its flag no longer holds (callback_metrics kept it at 1.0 to the end).
            trainer.callback_metrics.pop(tag_name(names.WARMUP, self.monitor.name), None)
        # For the progress bar at the next training-batch end (the only hook where Lightning takes self.log).
        self._progress = {
            self.metric(key.split("/", 1)[1]): metrics[key] for key in PROGRESS_BAR if key in metrics
        }
        self.history.append({"step": step, "eigenvalues": measured.eigenvalues, **metrics})
        # Capped like the monitor's own history: a long run must not grow with its measurements. Never below
        # the sharpening slope's window, which it is read from (max_history=1 fitted 2 points for 5, and
        # flipped the slope's sign: an outside trial).
        keep = max(self.monitor.max_history, self.slope_window - 1)
        del self.history[: max(0, len(self.history) - keep)]
        notify(
            self._listeners, (trainer, pl_module, metrics), on_error=self.on_error, warned=self._warned,
            trainer=trainer, what="EoS listener", metric=self.metric("listener_failed"),
        )  # fmt: skip
        if fire and self.on_warning is not None:
            try:
                self.on_warning(trainer, pl_module, metrics)
            except Exception as err:
                self._skip(trainer, err, "on_warning action failed", None)
        self._measured += 1
        if self._measured % self.chart_every == 0:
            self._chart(trainer, step)

    def _summarize(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """The W&B summary of the sharpness and ratio, over the measurements outside a warm-up
        (:data:`~pf_lightning.logging.OUTSIDE_WARMUP_SUMMARIES`); a run resumed from a checkpoint that did not
        keep them rebuilds them from its history first."""
        self._rebuild_extremes()
        summarize_wandb(trainer, tagged(metrics, self.monitor.name), self._extremes)

    def _rebuild_extremes(self) -> None:
        """After a resume from a checkpoint that did not keep the summary's extremes (an earlier version's):
        those of the history it held, at once, so that a checkpoint written before the next measurement keeps
        them too (they stayed empty until then: an outside trial). A history cut by ``max_history`` may have
        lost the run's peak: said once."""
        if not self._extremes_pending or self.monitor is None:
            return
        self._extremes_pending = False
        for h in self.history:
            if names.WARMUP not in h:
                earlier = {key: h[key] for key in names.OUTSIDE_WARMUP_SUMMARIES if key in h}
                summarize_wandb(None, tagged(earlier, self.monitor.name), self._extremes, write=False)
        if len(self.history) >= self.monitor.max_history:
            self._warn_once(
                "extremes",
                f"the checkpoint keeps no W&B summary extremes (an earlier version's) and its history holds the "
                f"last {len(self.history)} measurements only: the summary's maxima and minima cover those and "
                "the ones after the resume",
            )

    def _judged(self, step: int) -> bool:
        """Whether a measurement at ``step`` was judged already. It is not judged again (nor handed to the
        rate setters): a Hessian monitor resumed under other settings (k, which) finds no state of its own in
        the checkpoint and measures the step it resumed at afresh; a second record of one step halved
        `eos/sharpening_slope` (-0.032 for -0.065 in an outside trial)."""
        return bool(self.history) and self.history[-1]["step"] >= step

    def _set_rates(self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]) -> None:
        """Hand the sharpness to the listeners that set the next step's rate from it (``sets_rate=True``)."""
        notify(
            self._rate_setters, (trainer, pl_module, dict(metrics)), on_error=self.on_error,
            warned=self._warned, trainer=trainer, what="EoS listener", metric=self.metric("listener_failed"),
        )  # fmt: skip

    def _at_rest(
        self, trainer: Trainer, pl_module: LightningModule, result: EigenResult, optimizer: Any
    ) -> None:
        """A measurement at learning rate 0: a step moves nothing and has no threshold (2/lr is infinite).

        The sharpness is logged where it does not depend on the step (no preconditioner) and handed to the
        listeners (the sharpness cap, which then caps the first steps of a warm-up from zero); nothing is
        judged against a threshold."""
        step = trainer.global_step
        metrics = {names.EOS_LR: 0.0}
        if not stability.optimizer_rule(optimizer).preconditioned:
            eigenvalue = float(result.eigenvalues[0]) + self._coupled_weight_decay(optimizer)
            metrics[names.SHARPNESS] = eigenvalue
        moving = [i for i, group in enumerate(optimizer.param_groups) if float(group["lr"]) != 0.0]
        logs = f"log {' and '.join(sorted(metrics))} and judge no edge"
        if moving:  # the edge is judged at group 0's rate: others train unjudged
            self._warn_once(
                "zero_lr_group",
                f"step {step}: group 0 of {type(optimizer).__name__} is at rate 0 while group(s) "
                f"{', '.join(map(str, moving))} train: the edge is judged at group 0's rate, so these measurements "
                f"{logs}; freeze its parameters with requires_grad=False instead, or put a group that trains first "
                "(a preconditioning optimizer then leaves a group at rate 0 out of its sharpness exactly)",
            )
        else:
            self._warn_once(
                "zero_lr",
                f"step {step}: the learning rate of {type(optimizer).__name__} is 0 (a warm-up from zero, or a "
                f"schedule's end): no stability threshold applies, so measurements at rate 0 {logs}",
            )
        log_metrics(trainer, tagged(metrics, self.monitor.name), step)
        self._summarize(trainer, metrics)
        if names.SHARPNESS in metrics:
            self._set_rates(trainer, pl_module, metrics)
            notify(
                self._listeners, (trainer, pl_module, metrics), on_error=self.on_error, warned=self._warned,
                trainer=trainer, what="EoS listener", metric=self.metric("listener_failed"),
            )  # fmt: skip

    def _diagnostics(
        self, trainer: Trainer, pl_module: LightningModule, result: EigenResult
    ) -> _Measured | None:
        """Measure what the rule of the optimizer needs to judge the edge (None before an adaptive
        optimizer's first step, when its preconditioner does not exist yet)."""
        monitor = self.monitor
        dynamics, optimizer = self._dynamics(trainer)
        step = trainer.global_step
        projections = grad_norm = None
        warming, decay = False, 0.0
        if dynamics.preconditioned:
            preconditioned = self._preconditioned(trainer, pl_module, optimizer, dynamics)
            if preconditioned is None:
                return None
            eigenvalues = preconditioned.eigenvalues[:1]
            warming = stability.optimizer_steps(optimizer) < self.preconditioner_warmup_steps
        else:
            decay = self._coupled_weight_decay(optimizer)
            # L2 weight decay adds decay * theta to the gradient: the step sees H + decay * I.
            eigenvalues = result.eigenvalues[: monitor.k].detach().double().cpu() + decay
            projections, grad_norm = self._gradient(result, pl_module, optimizer)
        if self._rate_setters and not self._judged(step):
            # The next step runs at the rate they set from this sharpness (a cap): judged at it, with it.
            before = float(optimizer.param_groups[0]["lr"])
            self._set_rates(
                trainer, pl_module, {names.SHARPNESS: float(eigenvalues[0]), names.EOS_LR: before}
            )
            if float(optimizer.param_groups[0]["lr"]) != before:
                dynamics, optimizer = self._dynamics(trainer)
        lr = float(optimizer.param_groups[0]["lr"])
        batch = None if warming else self._measure_batch_sharpness(trainer, pl_module, optimizer)
        extras = {names.EOS_LR: lr}
        if dynamics.preconditioned:
            extras[names.PRECONDITIONED_CONVERGED] = float(preconditioned.all_converged)
            extras[names.PRECONDITIONED_N_HVP] = float(preconditioned.n_hvp)  # charged to the work budget too
        if batch is not None:
            extras[names.BATCH_COUNT] = float(batch.n_batches)
            extras[names.BATCH_UPHILL] = batch.n_uphill / batch.n_batches
        if warming:
            extras[names.WARMUP] = 1.0
        edge_inputs = {
            "eigenvalues": eigenvalues,
            "dynamics": dynamics,
            "step": step,
            "projections": projections,
            "grad_norm": grad_norm,
            # The loss the step descends, as the sharpness: H + decay (coupled L2 decay, ASGD's lambd), at the
            # step its rule takes (ASGD's decayed one); under a preconditioner the raw Hessian's at the rate,
            # as with threshold=, whose dynamics step 2/threshold, not the optimizer's.
            "lambda_min": float(result.eigenvalues[-1]) + decay if monitor.which == "both" else None,
            "lr": lr if dynamics.preconditioned or self.fixed_threshold is not None else dynamics.lr,
            "warming": warming,
            "batch_sharpness": None if batch is None else batch.value,
            "batch_stderr": math.nan if batch is None else batch.stderr,
            "batch_threshold": None if batch is None else batch.threshold,
        }
        return _Measured(result.eigenvalues[: monitor.k].tolist(), edge_inputs, extras)

    def _measure_batch_sharpness(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> BatchSharpness | None:
        """Batch sharpness on fresh mini-batches, or None (not measured; a failure is skipped and flagged)."""
        source = self._training_batches(trainer, pl_module)
        if source is None:
            return None
        spec, step = self.monitor.spec, trainer.global_step
        # Each rank its own batches, each step new ones; a fixed epoch's trained steps, the same on every rank.
        seed = hash((spec.seed, step) if source.fixed else (spec.seed, step, trainer.global_rank))
        try:
            # Drawn before measuring, and agreed on: a dataset or collate error on one rank is reported to
            # every rank (which all skip) instead of leaving the others waiting in a collective.
            hold = LocalFailure()
            with hold:
                batches = list(source.draw(self.batch_sharpness_batches, seed))
            any_rank([False], pl_module.device, error=hold.take())
            result = spec.batch_sharpness(
                pl_module,
                batches,
                optimizer=None if self.fixed_threshold is not None else optimizer,
                rel_stderr=self.batch_sharpness_rel_stderr,
                max_batches=self.batch_sharpness_batches,
            )
        except Exception as err:  # never BaseException
            self._skip(trainer, err, "batch sharpness skipped", self.metric("batch_sharpness_skipped"))
            return None
        if result.n_skipped:
            self._warn_once(
                "batch_skipped",
                f"step {step}: batch sharpness left out {result.n_skipped} of its batches (a zero gradient, or a "
                "loss, gradient or product that is not finite): the value is the mean over the "
                f"{result.n_batches} measured ({self.metric('batch_sharpness_batches')}); warned once",
            )
        return result

    def _group_decays(self, optimizer: Any) -> list[float]:
        """Each parameter group's L2 weight decay (0 for decoupled decay, or an optimizer without a rule)."""
        try:
            rule = stability.optimizer_rule(optimizer)
        except stability.UnsupportedOptimizer:
            return [0.0] * len(optimizer.param_groups)
        return [rule.coupled_weight_decay(group) for group in optimizer.param_groups]

    def _coupled_weight_decay(self, optimizer: Any) -> float:
        """Group 0's L2 weight decay, the one the sharpness adds (warned where the groups' differ)."""
        decays = self._group_decays(optimizer)
        if len(set(decays)) > 1:
            self._warn_once(
                "decays",
                f"parameter groups have different L2 weight decays {decays} (group by group): the sharpness "
                f"adds group 0's, {decays[0]}, to every eigenvalue (the gradient's projections and the preconditioned sharpness "
                "use each group's own)",
            )
        return decays[0]

    def _preconditioned(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any, dynamics: StepDynamics
    ) -> EigenResult | None:
        try:
            with held_nonconvergence():  # said below, once, on rank zero
                result = self.monitor.spec.eigenpairs(
                    pl_module, 1, "top", warm_start=self._preconditioned_latest, preconditioner=optimizer
                )
        except PreconditionerUnavailable as err:  # before the first step: no second moments yet
            self._warn_once(
                "precond",
                f"{type(optimizer).__name__} has no preconditioner before its first step ({err}): this "
                "measurement logs the threshold alone, flagged eos/warmup (HessianEigenMonitor(at_fit_start=False) "
                "or warmup_steps=1 leaves the fit start unmeasured)",
            )
            metrics = {names.THRESHOLD: dynamics.threshold, names.WARMUP: 1.0}
            log_metrics(trainer, tagged(metrics, self.monitor.name), trainer.global_step)
            return None
        self._preconditioned_latest = result
        if not result.all_converged:
            self._warn_once(
                "precond_converged",
                f"step {trainer.global_step}: the preconditioned sharpness did not reach tol={result.tol:g} "
                f"(relative residual {float(result.relative_residuals.max()):.2e}); eos/sharpness and the ratios "
                f"come from it: see {self.metric('preconditioned_converged')}",
                NonConvergenceWarning,
            )
        return result

    def _gradient(
        self, result: EigenResult, pl_module: LightningModule, optimizer: Any
    ) -> tuple[torch.Tensor, float]:
        """The projections ``g^T u_i`` of the gradient the optimizer sees on the tracked eigenvectors, and
        ``||g||``: the probe gradient plus ``W theta`` under L2 weight decay ``W`` (the step sees
        ``H + W``, as the sharpness does).

        The probe gradient comes with the measurement (this listener asks for it), read off the products'
        cached gradient graphs."""
        if result.gradient is None:
            raise RuntimeError("the measurement carries no probe gradient: it was not asked for one")
        vectors = result.eigenvectors[:, : self.monitor.k]
        # With FSDP2 the vectors are this rank's slices: the projections and the squared norm are sums
        # over all ranks' slices, reduced on the module's device (NCCL reduces no host tensor, and the
        # vectors may be kept there: basis_device="cpu"); a rank whose local part fails reports it (under
        # DDP too: the ranks skip these diagnostics together, where the failure was held and dropped).
        device = pl_module.device
        parts = torch.zeros(vectors.shape[1] + 1, dtype=torch.float64, device=device)
        hold = LocalFailure()
        with hold:
            gradient = result.gradient.to(vectors.dtype)
            if any(self._group_decays(optimizer)):
                space = ParameterSpace(pl_module, self.monitor.params, dtype=gradient.dtype)
                decay = optimizer_weight_decay(optimizer, space).to(gradient)
                gradient = gradient + decay * space.values().to(gradient)
            local = torch.cat([gram(vectors, gradient), gram(gradient, gradient).reshape(1)])
            parts.copy_(local.to(device=device, dtype=torch.float64))
        if result.info.get("sharded"):
            reduce_agreed(parts, hold.take())
        else:  # whole vectors on every rank: nothing to sum, but a failure on one is every rank's
            any_rank([False], device, error=hold.take())
        return parts[:-1].cpu(), float(parts[-1].clamp_min(0).sqrt())

    # -- per step ----------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._batch_open = True  # a step whose loss this callback's batch end records

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch_open = False
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:  # Lightning also trains a loss of shape (1,)
            loss = loss.detach().reshape(())
            pending = self._pending_losses  # the first as it is (no device work without accumulation)
            self._pending_losses = (
                (loss, 1) if pending is None else (pending[0].double() + loss.double(), pending[1] + 1)
            )
        elif not pl_module.automatic_optimization:  # (automatic: no loss means Lightning skipped the batch)
            self._warn_once(
                "no loss",
                "training_step returned no loss (manual optimization): "
                f"{tag_name(names.LOSS_NON_MONOTONICITY, self.monitor.name)} needs each step's loss and is not "
                "logged; return the loss (or "
                '{"loss": loss}) from training_step',
            )
        step = trainer.global_step
        if step == self._last_loss_step:
            if self._progress:
                self._show_progress(trainer, pl_module)
            return  # gradient accumulation: the optimizer step is not complete yet
        self._last_loss_step = step
        if self._pending_losses is not None:
            (total, n), accumulate = self._pending_losses, trainer.accumulate_grad_batches
            # Lightning divides each micro-batch loss by the accumulation count: undo it, and record the
            # mean over the micro-batches of one optimizer step (no device work without accumulation).
            mean = total if n == 1 else total / n
            self.losses.append(mean if accumulate == 1 else mean.double() * accumulate)
            self._pending_losses = None
            self._raw = min(self._raw + 1, len(self.losses))
        if self._judgement_due:
            measured, self._judgement_due, self._unjudged = self._unjudged, False, None
            self._judge(trainer, pl_module, measured)
        if self._progress:
            self._show_progress(trainer, pl_module)
        if self.proxies and step % self.proxy_every_n_steps == 0:
            self._log_proxies(trainer, pl_module, batch)
        if self.critical_every_n_steps is not None and step % self.critical_every_n_steps == 0:
            self._log_critical(trainer, pl_module, batch)

    def _show_progress(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The latest ratios in Lightning's progress bar (not to the loggers again); never worth a fit."""
        progress, self._progress = self._progress, {}
        if trainer.progress_bar_callback is None or getattr(trainer, "barebones", False):
            return
        try:
            for (
                key,
                value,
            ) in progress.items():  # batch_size: a dataloader_iter training_step has none to infer
                pl_module.log(
                    key, value, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1,
                    rank_zero_only=True,
                )  # fmt: skip
        except Exception as err:
            self._warn_once("progress", f"the ratios are not shown in the progress bar ({err!r})")

    def _log_critical(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Critical sharpness along the optimizer's next update, on the batch just trained."""
        optimizer = trainer.optimizers[self.optimizer_index]
        lr = float(optimizer.param_groups[0]["lr"])
        if lr == 0.0:
            moving = any(float(group["lr"]) != 0.0 for group in optimizer.param_groups)
            self._warn_once(
                "zero_lr_critical",
                f"step {trainer.global_step}: critical sharpness is not measured at learning rate 0 ("
                + (
                    "group 0's, while others train: its search steps in units of group 0's rate"
                    if moving
                    else "a warm-up from zero, or a schedule's end: the step vanishes with the rate, and has no "
                    "curvature along it"
                )
                + ")",
            )
            return
        try:
            result = self.monitor.spec.critical_sharpness(
                pl_module, [batch], optimizer=optimizer, initial_step=lr, gradient_clip=self._clip
            )
        except Exception as err:  # never BaseException
            self._skip(trainer, err, "critical sharpness skipped", self.metric("critical_skipped"))
            return
        metrics = {
            names.CRITICAL_SHARPNESS: result.value,
            names.CRITICAL_RATIO: float(result.ratio),
            names.CRITICAL_THRESHOLD: float(result.threshold),
            names.CRITICAL_FORWARD: float(result.n_forward),
        }
        log_metrics(trainer, tagged(metrics, self.monitor.name), trainer.global_step)
        self._critical.append((trainer.global_step, result.value, float(result.threshold)))
        del self._critical[: max(0, len(self._critical) - self.monitor.max_history)]

    def _log_proxies(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        monitor = self.monitor
        optimizer = trainer.optimizers[self.optimizer_index]
        lr = float(optimizer.param_groups[0]["lr"])
        try:
            with monitor.spec.operator(pl_module, [batch]) as op:
                try:  # of the loss the step descends, as eos/sharpness (with its coupled L2 decay)
                    decay = optimizer_weight_decay(optimizer, op.space)
                except stability.UnsupportedOptimizer:  # threshold= on an optimizer without a rule
                    decay = None
                gc = gradient_curvature(op, weight_decay=decay)
            if not gc.finite:
                raise NonFiniteOperatorError(f"||g|| = {gc.grad_norm}, ||Hg|| = {gc.hg_norm}")
            # A step of rate 0 (a warm-up from zero, a schedule's end) drifts nowhere.
            drift = 0.0 if lr == 0.0 else float(stability.drift_ratio(lr, gc.grad_norm, gc.hg_norm))
        except Exception as err:  # never BaseException
            self._skip(trainer, err, "proxies skipped", self.metric("proxies_skipped"))
            return
        metrics = {
            names.HG_RATIO: gc.hg_ratio,
            names.RAYLEIGH_QUOTIENT: gc.rayleigh_quotient,
            names.DRIFT_RATIO: drift,
        }
        log_metrics(trainer, tagged(metrics, self.monitor.name), trainer.global_step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._progress = {}  # a measurement at fit end has no batch end left to show it
        if self.history:
            self._chart(trainer, trainer.global_step)

    def _chart(self, trainer: Trainer, step: int) -> None:
        """The W&B chart and table, unless the last ones drew the same measurements: at fit end after a
        measurement that was charted, a second copy at one step."""
        drawn = (self.history[-1]["step"], len(self.history), self._critical[-1] if self._critical else None)
        if drawn == self._charted:
            return
        self._charted = drawn
        try:
            self._log_chart(trainer, step)
        except Exception as err:
            self._skip(trainer, err, "W&B chart skipped", None)

    def _log_chart(self, trainer: Trainer, step: int) -> None:
        """W&B: the top-k eigenvalues (under a preconditioning optimizer the preconditioned sharpness, which
        its threshold is for), the threshold and, where measured, the batch sharpness (± 2 standard errors)
        and the critical sharpness, each with its threshold, over steps as one line chart; the spectra as a
        table: of the judged measurements (an adaptive optimizer's warm-up ones are logged, not judged), the
        latest that fit in a W&B table (``wandb.Table.MAX_ROWS``, 10,000 rows: W&B keeps a longer table's first
        rows, and an outside trial's chart of 1,101 measurements at k = 10 lost its threshold line and its
        newest 101 spectra, without a word; the cost of a chart grew with the run besides)."""
        history = [h for h in self.history if names.WARMUP not in h]
        if not wandb_experiments(trainer) or not history:
            return
        import wandb

        limit = int(getattr(wandb.Table, "MAX_ROWS", 10_000))
        # The rows of one measurement at most, in the chart (one per line: the top-k eigenvalues, or the one of
        # the preconditioned sharpness, counted as k all the same; the threshold; the batch sharpness with its
        # band and threshold) and in the spectra table (its eigenvalues), besides the critical sharpness's.
        per_measurement = max(len(h["eigenvalues"]) for h in history) + 1
        per_measurement += 4 if any(names.BATCH_SHARPNESS in h for h in history) else 0

        def critical_since(m: int) -> list[tuple[int, float, float]]:
            """The critical points the latest m measurements chart: since the first of them (all where all)."""
            since = history[-m]["step"] if m < len(history) else -math.inf
            return [c for c in self._critical if c[0] >= since]

        low, high = 1, len(history)  # the most that fit (rows grow with m), by bisection
        while low < high:
            middle = (low + high + 1) // 2
            fits = per_measurement * middle + 2 * len(critical_since(middle)) <= limit
            low, high = (middle, high) if fits else (low, middle - 1)
        critical = critical_since(low)
        room = max(0, limit - per_measurement * low) // 2  # a measurement's own rows first
        critical = critical[len(critical) - room :] if len(critical) > room else critical
        history = history[-low:]
        steps = [h["step"] for h in history]
        series: list[tuple[str, list[float], list[float]]]
        if any(names.PRECONDITIONED_SHARPNESS in h for h in history):
            series = [("preconditioned sharpness", steps, [h[names.SHARPNESS] for h in history])]
        else:
            k = min(len(h["eigenvalues"]) for h in history)
            series = [(f"eig_{i + 1}", steps, [h["eigenvalues"][i] for h in history]) for i in range(k)]
        series.append(("threshold", steps, [h[names.THRESHOLD] for h in history]))
        batch = [h for h in history if names.BATCH_SHARPNESS in h]
        if batch:
            at = [h["step"] for h in batch]
            value = [h[names.BATCH_SHARPNESS] for h in batch]
            band = [
                2 * h[names.BATCH_SHARPNESS_STDERR] if math.isfinite(h[names.BATCH_SHARPNESS_STDERR]) else 0.0
                for h in batch
            ]
            series += [
                ("batch_sharpness", at, value),
                ("batch_sharpness - 2 s.e.", at, [v - b for v, b in zip(value, band, strict=True)]),
                ("batch_sharpness + 2 s.e.", at, [v + b for v, b in zip(value, band, strict=True)]),
            ]
            if any(h[names.BATCH_THRESHOLD] != h[names.THRESHOLD] for h in batch):
                series.append(("batch_threshold", at, [h[names.BATCH_THRESHOLD] for h in batch]))
        if critical:
            at = [s for s, _, _ in critical]
            series.append(("critical_sharpness", at, [v for _, v, _ in critical]))
            series.append(("critical_threshold", at, [t for _, _, t in critical]))
        chart = wandb.plot.line_series(
            xs=[xs for _, xs, _ in series],
            ys=[ys for _, _, ys in series],
            keys=[key for key, _, _ in series],
            title="Hessian eigenvalues vs stability threshold",
            xname="step",
        )
        rows = [
            [h["step"], i + 1, v, h[names.THRESHOLD]] for h in history for i, v in enumerate(h["eigenvalues"])
        ]
        spectra = wandb.Table(columns=["step", "index", "eigenvalue", "threshold"], data=rows)
        tables = {
            self.metric("spectrum_vs_threshold"): chart,
            metric_name("hessian", "spectra", self.monitor.name): spectra,
        }
        wandb_log(trainer, tables, step)

    def _warn_once(self, key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
        name = None if self.monitor is None else self.monitor.name
        warn_once(self._warned, key, message if name is None else f"[{name}] {message}", category)  # whose

    def _loss_values(self) -> list[float]:
        """The recorded per-step losses as floats (one device-to-host copy for all of them)."""
        if any(isinstance(x, torch.Tensor) for x in self.losses):
            device = next(x.device for x in self.losses if isinstance(x, torch.Tensor))
            stacked = torch.stack(
                [torch.as_tensor(x, dtype=torch.float64, device=device) for x in self.losses]
            )
            self.losses.clear()
            self.losses.extend(stacked.tolist())
        return [float(x) for x in self.losses]

    def _run_losses(self, device: torch.device) -> list[float]:
        """The losses of the steps taken: under data parallelism each rank records its own batches' losses,
        and a step descends their mean. At each measurement every rank averages the losses recorded since
        the last one with the other ranks' (one all-reduce of a buffer the window's size, with each rank's
        count in a slot of its own: where the counts differ, every rank keeps its own losses and is warned).
        A resumed run's window holds rank 0's own losses for the steps between its last measurement and the
        checkpoint."""
        values = self._loss_values()
        raw, self._raw = self._raw, 0
        if not is_distributed():
            return values
        ranks = world_size()
        buffer = torch.zeros(ranks + (self.losses.maxlen or 0), dtype=torch.float64, device=device)
        buffer[dist.get_rank()] = raw
        if raw:
            buffer[ranks : ranks + raw] = torch.tensor(values[-raw:], dtype=torch.float64)
        all_reduce_sum(buffer)
        if bool((buffer[:ranks] != raw).any()):  # the same counts on every rank: the same answer on all
            self._warn_once(
                "losses",
                "the ranks recorded different numbers of step losses since the last measurement (a training_step "
                "that returns a loss on some ranks only?): eos/loss_non_monotonicity is each rank's own",
            )
            return values
        if raw:
            values[-raw:] = (buffer[ranks : ranks + raw] / ranks).tolist()
            self.losses.clear()
            self.losses.extend(values)
        return values

    def _skip(self, trainer: Trainer, err: Exception, what: str, metric: str | None) -> None:
        skip_or_raise(
            err, on_error=self.on_error, warned=self._warned, trainer=trainer, what=what, metric=metric
        )

    # -- checkpointing -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        self._rebuild_extremes()
        return {
            "history": self.history,
            "losses": self._loss_values(),
            "first_edge_step": self.first_edge_step,
            "negative_curvature": self.negative_curvature,
            "interval_steps": self._interval_steps,
            "above": self._above,
            # The warm start of the next preconditioned measurement: a resumed run measures as the
            # uninterrupted one does (and so caps the rate the same).
            "preconditioned_latest": result_state(
                self._preconditioned_latest, self.monitor is not None and self.monitor.checkpoint_eigenvectors
            ),
            # The W&B summary's extremes over the whole run: the history a resumed run rebuilt them from is
            # capped, and lost an earlier peak (an outside trial: a max ratio of 1.512 for 1.576)
            "extremes": dict(self._extremes),
        }

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        warn_other_settings(self, trainer, checkpoint, same="monitor")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            history, losses, edge, curvature, interval, above, preconditioned, extremes = eos_from_state(
                state_dict
            )
        except UnreadableState as err:
            warn_fresh_start(type(self).__name__, err)
            self._new_run()
            return
        self.history, self.first_edge_step, self.negative_curvature = history, edge, curvature
        self._interval_steps, self._above, self._preconditioned_latest = interval, above, preconditioned
        self._extremes, self._extremes_pending = extremes, "extremes" not in state_dict
        self.losses.clear()
        self.losses.extend(losses)
        self._raw = 0
        self._restored = True  # on_train_start puts the last measurement back in callback_metrics


__all__ = ["EdgeOfStabilityMonitor"]
