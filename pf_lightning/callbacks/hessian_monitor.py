"""HessianEigenMonitor: the top-k Hessian eigenpairs of the training loss, measured at intervals.

Each measurement takes the eigenpairs of the mean loss over a fixed probe set (drawn once from the
training dataloader, or given), warm-started from the previous one, and leaves training untouched:
parameters, gradients, buffers, modes and random states are restored bit for bit. Results are logged
at the measurement's ``global_step`` to every attached logger, kept in ``.latest`` and ``.history``,
and handed to listeners such as :class:`~pf_lightning.EdgeOfStabilityMonitor`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from .. import logging as names
from .._validation import SEED_MAX, Checks, is_int, is_tag, parameter_names
from ..curvature import HVP_CHOICES, ParameterSpace, WorkMeter, measurement_context
from ..curvature.distributed import (
    LocalFailure,
    MeasurementAborted,
    any_rank,
    is_distributed,
    is_sharded,
    per_rank,
)
from ..curvature.params import measurement_dtype, select_parameters
from ..linalg import EigenResult, NonConvergenceWarning, held_nonconvergence
from ..linalg._common import wanted_pairs
from ..linalg.density import SpectralDensity
from ..logging import (
    announce_run,
    define_wandb_metrics,
    eigenvalue,
    log_metrics,
    metric_name,
    progress_mark,
    tag_name,
    tagged,
    tensorboard_writers,
    wandb_experiments,
    wandb_log,
    warn_once,
)
from ..measure import STDERR_GROUPS, MeasurementSpec, check_basis_size, check_max_hvp, check_method
from ..probe import ProbeSet, sample_count
from ._budget import TimeBudget, WorkBudget
from ._checkpoint import (
    UnreadableState,
    cached_state_key,
    monitor_from_state,
    result_state,
    starts_a_run,
    warn_fresh_start,
    warn_other_settings,
)
from ._faults import OnError, check_on_error, notify, skip_or_raise
from ._probe import build_probe, drawn_from_loader, keeps_batches_whole, resolve_loss_fn

Listener = Callable[[Trainer, LightningModule, EigenResult], None]


HVPChoice = Literal["auto", "double_backward", "forward_over_reverse", "finite_difference"]
"""``HVP_CHOICES`` written out for type checkers and LightningCLI's ``--help`` (a test keeps them equal)."""

check = Checks(MisconfigurationException)


class SharedProbe:
    """One probe set for several monitors (:meth:`HessianEigenMonitor.per_group`): the first monitor to
    start draws it, the others use it, so the batches are held (and moved to the device) once."""

    def __init__(self) -> None:
        self.probe: ProbeSet | None = None


class HessianEigenMonitor(Callback):
    """Measure the top-k Hessian eigenpairs of the training loss every ``every_n_steps`` optimizer steps.

    Args:
        k: eigenpairs to track (at each end with ``which="both"``).
        every_n_steps: measure after every this many optimizer steps (``global_step``, so once per
            step under gradient accumulation); ``None`` to measure only by epoch or at fit start/end.
        probe: ``None`` draws ``512`` samples from the training dataloader once; an int draws that many;
            a list of batches, a ``DataLoader`` or a :class:`~pf_lightning.ProbeSet` is used as given.
        loss_fn: ``loss_fn(module, batch) -> Tensor``; by default the module's ``training_step`` (its
            ``self.log`` calls are kept out of the logs).
        which: ``"top"``, or ``"both"`` to also track the ``k`` most negative eigenvalues.
        every_n_epochs: also measure at the end of every this many epochs (as Lightning's ``ModelCheckpoint``
            does, also at an epoch that ``max_steps`` ends early).
        at_fit_start: measure before the first optimizer step.
        at_fit_end: measure after the last optimizer step.
        warmup_steps: no step-interval and no fit-start measurement before this ``global_step`` (with
            ``warmup_steps=5`` the fit-start measurement at step 0 is not taken either).
        hvp: HVP backend (``"auto"``, ``"double_backward"``, ``"forward_over_reverse"``,
            ``"finite_difference"``).
        tol: relative residual tolerance of each eigenpair.
        max_hvp: Hessian-vector products allowed per measurement (``None``: the solver's default).
        warm_start: start each measurement from the previous eigenvectors.
        max_work_fraction: cap on the work of measuring (listeners included) over the work of training,
            both counted in sample-gradients (a Hessian-vector product on ``p`` probe samples costs
            ``2p``, a training micro-batch of ``b`` samples ``b``), ``hessian/work_fraction``, from the
            fit's second measurement on: a due measurement that would exceed it is postponed to the next
            due step that fits (``hessian/postponed``). The counts do not depend on the machine's speed,
            so two runs on one machine measure at the same steps (product counts read rounding: another
            thread count or machine can move them; README, "What it costs").
        max_time_fraction: the same cap on wall time: the time spent measuring over the rest of the fit's
            wall time, ``hessian/time_fraction``. It follows the machine's real costs, so the measured
            steps differ from run to run.
        params: glob patterns restricting the measured parameters.
        dtype: measure in this dtype (default: the parameters' own; float32 for half-precision weights).
        max_history: measurements kept in ``.history`` (oldest dropped first).
        name: tag for a second instance (metrics become ``hessian/<name>/...``, e.g. a held-out probe).
        seed: seeds start vectors and the dropout masks fixed within a measurement.
        stderr_every: every this many measurements (``None``: never), also measure the sampling error
            of ``eig_1`` on the probe, ``hessian/eig_1_stderr``: the standard error of the top
            eigenvector's Rayleigh quotient over 8 groups of the probe's samples
            (:func:`~pf_lightning.eigenvalue_stderr`: a gradient graph and a product per group, 16% of
            a top-5 measurement's time on the digits MLP, hence every 10th by default). Under DDP and
            FSDP2 over the union of the ranks' groups, the same on every rank.
        trace_every: also estimate the trace (Hutch++, ``trace_hvp`` products) every this many
            measurements; logged as ``hessian/trace`` and ``hessian/trace_std``. Each estimate draws its
            probes from ``seed`` and its step, so the errors of a run's estimates are independent (its
            dropout masks are ``seed``'s, as the eigenpairs').
        trace_hvp: products per trace estimate (at least 4: Hutch++'s standard error needs two residual
            probes).
        density_every: also estimate the spectral density (SLQ) every this many measurements; kept
            in ``.density`` and logged as the histogram ``hessian/density`` to W&B and TensorBoard; its
            start vectors are drawn from ``seed`` and its step, as the trace's.
        density_steps: Lanczos steps per SLQ vector (two vectors per estimate).
        basis_device: keep the solver's vectors and ``.latest``'s eigenvectors on this device
            (``"cpu"``: host memory, for models too large for the accelerator to hold ``max(2k + 10, 20)``
            copies of their parameters); see :func:`~pf_lightning.hessian_eigenpairs`.
        basis_size: Lanczos vectors kept between restarts (``None``: ``max(2k + 10, 20)``): with
            ``basis_size`` the solver holds ``basis_size + 1`` parameter-sized vectors and as many more as
            the pairs wanted (``k``, ``2k`` for ``which="both"``; at least one), for a model whose device
            (or host) holds only a few copies of its parameters; ``.latest`` keeps its ``k`` (or ``2k``)
            eigenvectors between measurements for the next warm start, which is by Lanczos, never the block
            method. Must exceed the pairs wanted; see :func:`~pf_lightning.hessian_eigenpairs`. The trace and
            density estimates (``trace_every``, ``density_every``) do not take it: the density holds
            ``density_steps`` vectors.
        method: the eigensolver, as :func:`~pf_lightning.hessian_eigenpairs` takes it: ``"auto"`` (Lanczos
            cold, measured again by a block where an eigenvalue came back twice; warm, a block or Lanczos,
            whichever was cheaper), ``"lanczos"``, or ``"lobpcg"``, a block that holds as many copies of a
            repeated eigenvalue as it has columns: the bottom of a low-rank Hessian (the zeros of a last
            layer's block, ``params=`` on it, ``which="both"``), which Lanczos returns each distinct value of
            once where a restart comes before its Krylov space closes. Not with ``basis_size``.
        checkpoint_eigenvectors: save the latest eigenvectors in checkpoints, so the first measurement
            after a resume is warm-started (``n x k`` floats; never saved when they are FSDP2 shards).
        probe_batch_size: a drawn probe's batches are joined into batches of at most this many samples
            (a larger one is not cut), one forward pass each (``None``: one batch with double backward,
            whose cached graphs hold the whole probe's activations anyway, the loader's batches with finite differences and on FSDP2
            shards, whose products hold one batch's at a time; a product on 512 samples in one batch
            costs 2.5 times less than on four batches of 128); ``"loader"`` keeps the loader's batches, as a loss
            that couples the samples of a batch (in-batch negatives) needs. A module with batch
            normalization keeps them too: its batch statistics are part of the loss training sees. So
            does a loss whose stacked probe has another loss or gradient than its batches' sample-weighted
            mean (a ``reduction="sum"``, a token mean over padded sequences), checked once before the
            first measurement and warned. Batches given as ``probe`` are used as they are.
        on_error: ``"skip"``: a measurement that fails at run time (NaN or infinite loss or product, a
            probe batch the model cannot consume, a loss that is not returned, any ``Exception``) is
            skipped with the model left as it was, flagged as ``hessian/skipped`` at that step, warned
            once per error type, and training goes on; the trace, the density and listeners fail the
            same way (``hessian/trace_skipped``, ``hessian/density_skipped``,
            ``hessian/listener_failed``). ``"raise"``: the exception stops training.

    Checkpoints: the state holds the history, the latest result and the step bookkeeping. A resumed fit
    continues the interrupted one (no extra fit-start measurement unless one was due at that step), so
    its history matches an uninterrupted run's. A state this version cannot read (missing keys, wrong
    types or shapes, NaN, another callback's state) gives one ``RuntimeWarning`` and a fresh start:
    empty history, cold start; training itself resumes as usual.

    Raises:
        MisconfigurationException: a bad argument; at fit start, a ``training_step`` that returns no loss
            or a first probe batch that the loss cannot run on.

    Example::

        trainer = Trainer(callbacks=[HessianEigenMonitor(k=5, every_n_steps=100)])
    """

    def __init__(
        self,
        k: int = 5,
        every_n_steps: int | None = 100,
        probe: int | Sequence[Any] | ProbeSet | None = None,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        which: Literal["top", "both"] = "top",
        every_n_epochs: int | None = None,
        at_fit_start: bool = True,
        at_fit_end: bool = True,
        warmup_steps: int = 0,
        hvp: HVPChoice = "auto",
        tol: float = 1e-3,
        max_hvp: int | None = None,
        warm_start: bool = True,
        max_work_fraction: float | None = None,
        max_time_fraction: float | None = None,
        params: str | Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        max_history: int = 10_000,
        name: str | None = None,
        seed: int = 0,
        stderr_every: int | None = 10,
        trace_every: int | None = None,
        trace_hvp: int = 60,
        density_every: int | None = None,
        density_steps: int = 60,
        basis_device: str | None = None,
        basis_size: int | None = None,
        checkpoint_eigenvectors: bool = True,
        on_error: OnError = "skip",
        probe_batch_size: int | Literal["loader"] | None = None,
        method: Literal["auto", "lanczos", "lobpcg"] = "auto",
    ) -> None:
        super().__init__()
        check_on_error(on_error)
        k = check.integer("k", k, 1)
        every_n_steps = check.integer("every_n_steps", every_n_steps, 1, allow_none=True)
        every_n_epochs = check.integer("every_n_epochs", every_n_epochs, 1, allow_none=True)
        warmup_steps = check.integer("warmup_steps", warmup_steps, 0)
        max_history = check.integer("max_history", max_history, 1)
        stderr_every = check.integer("stderr_every", stderr_every, 1, allow_none=True)
        trace_every = check.integer("trace_every", trace_every, 1, allow_none=True)
        trace_hvp = check.integer(
            "trace_hvp", trace_hvp, 4, hint="Hutch++'s standard error needs two residual probes"
        )
        density_every = check.integer("density_every", density_every, 1, allow_none=True)
        density_steps = check.integer("density_steps", density_steps, 2)
        check.choice("which", which, ("top", "both"))
        check.choice("hvp", hvp, HVP_CHOICES)
        tol = check.number("tol", tol, above=0, below=1, hint="a relative residual tolerance such as 1e-3")
        max_work_fraction = check.number("max_work_fraction", max_work_fraction, above=0, allow_none=True)
        max_time_fraction = check.number("max_time_fraction", max_time_fraction, above=0, allow_none=True)
        for flag, value in (
            ("at_fit_start", at_fit_start),
            ("at_fit_end", at_fit_end),
            ("warm_start", warm_start),
            ("checkpoint_eigenvectors", checkpoint_eigenvectors),
        ):
            check.flag(flag, value)
        if probe is not None and not isinstance(probe, ProbeSet):
            if is_int(probe):
                probe = check.integer("probe", probe, 1, hint="a probe size is a number of training samples")
            else:
                check.batches("probe", probe, single_batch=False)
        if probe_batch_size != "loader":
            probe_batch_size = check.integer(
                "probe_batch_size", probe_batch_size, 1, allow_none=True, hint="or 'loader'"
            )
        check.function("loss_fn", loss_fn, "loss_fn(module, batch) -> Tensor", 2)
        check.patterns("params", params)
        check.dtype("dtype", dtype)
        check.tag("name", name)
        seed = check.seed("seed", seed)
        check.device("basis_device", basis_device)
        basis_size = check_basis_size(check, basis_size, k, which)
        max_hvp = check_max_hvp(check, max_hvp, k, which)
        check_method(check, method, basis_size)  # its max_hvp at set-up, where the parameters' count is known
        if every_n_steps is None and every_n_epochs is None and not (at_fit_start or at_fit_end):
            warnings.warn(  # at the user's line: a monitor driven by its own measure() calls is deliberate
                "this HessianEigenMonitor has no cadence (every_n_steps=None, every_n_epochs=None, "
                "at_fit_start=False, at_fit_end=False): it measures only where measure() is called; set one",
                UserWarning,
                stacklevel=names.user_stacklevel(),  # per_group's caller too
            )
        self.k, self.every_n_steps, self.every_n_epochs = k, every_n_steps, every_n_epochs
        self.which, self.hvp, self.tol, self.max_hvp = which, hvp, float(tol), max_hvp
        self.at_fit_start, self.at_fit_end, self.warmup_steps = at_fit_start, at_fit_end, warmup_steps
        self.warm_start, self.max_time_fraction, self.params = warm_start, max_time_fraction, params
        self.max_work_fraction = max_work_fraction
        self.dtype, self.max_history, self.name, self.seed = dtype, max_history, name, seed
        self.trace_every, self.trace_hvp, self.stderr_every = trace_every, trace_hvp, stderr_every
        self.density_every, self.density_steps = density_every, density_steps
        self.basis_device, self.checkpoint_eigenvectors = basis_device, checkpoint_eigenvectors
        self.basis_size, self.method = basis_size, method
        self.on_error = on_error
        self._shared_probe: SharedProbe | None = None  # set by per_group: one probe for all groups
        self._probe_arg, self._loss_arg = probe, loss_fn
        self._probe_loader: Any = None  # the training loader a drawn probe came from (None: probe= batches)
        self._whole = False  # the probe's batches are kept whole: the loss couples a batch's samples
        self.probe_batch_size = probe_batch_size
        self.spec: MeasurementSpec | None = None  # resolved when a fit starts
        self._listeners: list[Listener] = []
        self._gradient_readers: list[Listener] = []  # listeners that read ``result.gradient``
        self._start = "fit"  # "resumed" from a checkpoint, or "unreadable" (its state could not be read)
        self._new_run()

    def _new_run(self) -> None:
        """What one run accumulates, empty (see :func:`starts_a_run`)."""
        self.latest: EigenResult | None = None
        self.history: list[dict[str, Any]] = []
        self.density: SpectralDensity | None = None
        self._last_step = self._postponed_step = -1  # the steps measured and postponed last
        self._budget, self._work = TimeBudget(), WorkBudget()
        self._measured = 0  # measurements taken (the history is capped): the trace and density cadence
        self._warned: set[str] = set()

    @classmethod
    def per_group(cls, groups: Mapping[str, str | Sequence[str]], **kwargs: Any) -> list[HessianEigenMonitor]:
        """One monitor per named parameter group: the spectrum of each diagonal block of the Hessian.

        Each monitor measures the Hessian restricted to its group's parameters (the other parameters
        held fixed) and logs ``hessian/<group>/eig_i``; all of them share one probe set. A product
        restricted to a group still runs the full forward and backward pass, so ``g`` groups cost
        about ``g`` times one monitor's products. An :class:`~pf_lightning.EdgeOfStabilityMonitor`
        reads a monitor over all parameters, never a group's (a block's top eigenvalue is at most
        the full Hessian's, so it would understate the sharpness): add one without ``params``.

        Args:
            groups: ``{name: glob pattern or list of patterns}``, e.g. from
                :func:`~pf_lightning.curvature.parameter_groups` or ``{"attn": "blocks.*.attn.*"}``.
            **kwargs: the other arguments of :class:`HessianEigenMonitor`, the same for every group.

        Raises:
            MisconfigurationException: no group, a bad name, or ``name``/``params`` in ``kwargs``.

        Example::

            monitors = HessianEigenMonitor.per_group(parameter_groups(model, depth=2), k=3)
            trainer = Trainer(callbacks=[*monitors, HessianEigenMonitor(k=3), EdgeOfStabilityMonitor()])
        """
        clash = {"name", "params"} & set(kwargs)
        if clash:
            raise MisconfigurationException(
                f"per_group sets `name` and `params` from the groups: do not pass {sorted(clash)}"
            )
        check.keywords(f"{cls.__name__}.per_group", kwargs, parameter_names(cls) - {"name", "params"})
        expected = "a non-empty {name: patterns} mapping, e.g. parameter_groups(model) or {'attn': 'blocks.*.attn.*'}"
        if not isinstance(groups, Mapping) or not groups:
            check.fail("groups", expected, groups)
        patterns_of = {}
        for name, patterns in groups.items():
            if not is_tag(name):
                hint = "each name must be a non-empty string without '/' or spaces: it names metrics hessian/<name>/..."
                check.fail("groups", expected, groups, hint)
            pattern_list = [patterns] if isinstance(patterns, str) else patterns
            if not (
                isinstance(pattern_list, list | tuple)
                and pattern_list
                and all(isinstance(p, str) and p for p in pattern_list)
            ):
                check.fail(
                    "groups",
                    expected,
                    groups,
                    f"group {name!r} must map to a glob pattern or a non-empty list of them",
                )
            patterns_of[name] = patterns if isinstance(patterns, str) else list(patterns)
        shared = SharedProbe()
        return [
            cls(name=name, params=params, **kwargs)._sharing(shared) for name, params in patterns_of.items()
        ]

    def _sharing(self, shared: SharedProbe) -> HessianEigenMonitor:
        """This monitor, drawing its probe from (or into) ``shared``."""
        self._shared_probe = shared
        return self

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(self, k=self.k, which=self.which, name=self.name)

    def add_listener(self, listener: Listener, *, gradient: bool = False) -> None:
        """Call ``listener(trainer, pl_module, result)`` after every successful measurement.

        ``gradient=True``: the listener reads ``result.gradient``, the probe's gradient, which the
        measurement then takes from its own cached gradient graphs (no pass with double backward, one
        gradient with the other backends) instead of the listener building its own. Adding a listener
        again updates ``gradient``. ``.latest`` does not keep the gradient."""
        if listener not in self._listeners:
            self._listeners.append(listener)
        if gradient and listener not in self._gradient_readers:
            self._gradient_readers.append(listener)
        elif not gradient and listener in self._gradient_readers:
            self._gradient_readers.remove(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (nothing if it is not attached)."""
        for attached in (self._listeners, self._gradient_readers):
            if listener in attached:
                attached.remove(listener)

    def metric(self, name: str) -> str:
        return metric_name("hessian", name, self.name)

    def settings(self) -> tuple[str, dict[str, Any]]:
        """What this monitor was asked for, as the loggers record it (the W&B run config under
        ``pf_lightning``): its key there, and its arguments."""
        probe = self._probe_arg
        if probe is not None and not is_int(probe):
            probe = (
                f"{len(probe)} batches given" if isinstance(probe, Sequence | ProbeSet) else "batches given"
            )
        first = ("k", "which", "every_n_steps", "every_n_epochs", "warmup_steps", "hvp", "tol", "max_hvp")
        more = (
            "probe_batch_size",
            "warm_start",
            "max_work_fraction",
            "max_time_fraction",
            "params",
            "dtype",
            "seed",
            "stderr_every",
            "trace_every",
            "density_every",
            "basis_size",
            "method",
        )
        values = {name: getattr(self, name) for name in (*first, *more)}
        return names.settings_key("HessianEigenMonitor", self.name), {
            **values,
            "probe": probe,
        }

    # -- set-up ------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        same = [
            cb for cb in trainer.callbacks if isinstance(cb, HessianEigenMonitor) and cb.name == self.name
        ]
        if len(same) > 1:  # they would log under one name, each row overwriting the other's
            where = names.metric_name("hessian", "*", self.name)
            raise MisconfigurationException(
                f"{len(same)} HessianEigenMonitors log under {where!r}, each overwriting the others' metrics: "
                "pass a different name= to each but one, e.g. HessianEigenMonitor(probe=held_out_batches, "
                "name='heldout') logs hessian/heldout/eig_1"
            )
        if stage == "fit":
            if starts_a_run(trainer):
                self._new_run()
            self._start, self.spec = "fit", None  # another fit may bring another model or other data
            if self._shared_probe is not None:  # every setup runs before any on_train_start
                self._shared_probe.probe = None
        self._check_strategy(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The set-up fails on every rank or none: one raising alone would leave the others waiting in the
        # first measurement's collectives (a probe empty on one rank; an outside trial).
        try:
            hold = LocalFailure()
            with hold:
                self._set_up(trainer, pl_module)
            any_rank([False], pl_module.device, error=hold.take())
            samples = per_rank(self.spec.probe.total_weight, pl_module.device)
            if len(set(samples)) > 1:  # known to every rank: each warns, or none
                hold = LocalFailure()
                with hold:
                    self._warn_uneven_probes(samples)
                any_rank([False], pl_module.device, error=hold.take())
            if self.stderr_every and self._whole:  # the same on every rank (settings and the module)
                # One group per whole batch; under DDP the measurement takes as many as the rank with the
                # fewest. Said within a hold too: a warning made an error (-W error) stops every rank.
                groups = int(min(per_rank(len(self.spec.probe), pl_module.device)))
                hold = LocalFailure()
                with hold:
                    self._warn_few_groups(groups)
                any_rank([False], pl_module.device, error=hold.take())
        except MeasurementAborted as err:
            raise MisconfigurationException(
                f"the measurement could not be set up on rank {err.rank} ({err.error_type}: {err.error_message})"
            ) from err
        if self.every_n_epochs is not None:
            counts = per_rank(trainer.num_training_batches, pl_module.device)
            if len(set(counts)) > 1:
                raise MisconfigurationException(
                    f"every_n_epochs={self.every_n_epochs}, but the ranks' epochs differ in length ("
                    + ", ".join(f"rank {r}: {n:g} batches" for r, n in enumerate(counts))
                    + "; loaders of uneven shards with use_distributed_sampler=False): they would end their "
                    "epochs, and measure, at different steps, each waiting for the others; use every_n_steps"
                )
        if self._start == "resumed" and self.latest is not None:
            # The last measurement's values, as the interrupted fit held them for ModelCheckpoint and
            # EarlyStopping (a resumed fit had none until its next measurement: "metric not available").
            for key, value in self._metrics(self.latest).items():
                trainer.callback_metrics.setdefault(key, torch.tensor(value))
        step = trainer.global_step
        # A resumed fit continues the interrupted one: measure now only where that run was due to and
        # did not (it raised; at step 0 in its fit-start measurement too); nothing after a fresh start from an
        # unreadable state. A step the checkpoint holds a measurement of is not measured again.
        fit_start = self.at_fit_start and step >= self.warmup_steps
        resumed_due = self._start == "resumed" and (self._due(step) or (step == 0 and fit_start))
        if resumed_due or (self._start == "fit" and fit_start):
            self.measure(trainer, pl_module)

    def _warn_uneven_probes(self, samples: list[float]) -> None:
        """Warn where the ranks' probes hold different numbers of samples (uneven shards)."""
        counts = ", ".join(f"rank {r}: {n:g}" for r, n in enumerate(samples))
        self._warn_once(
            "uneven_probes",
            f"the ranks' probes hold different numbers of samples ({counts}): the Hessian measured is that of "
            "the sample-weighted mean loss over all of them, while DDP descends the unweighted mean of the "
            "ranks' losses where their batches differ in size (README, 'Distributed training'); shard evenly "
            "(Lightning's DistributedSampler) or give each rank a probe= of one size",
        )

    def _warn_few_groups(self, groups: int) -> None:
        """Warn where eig_1_stderr has fewer than :data:`STDERR_GROUPS` groups of whole probe batches."""
        if groups < STDERR_GROUPS:
            self._warn_once(
                "stderr_groups",
                f"hessian/eig_1_stderr is the spread over groups of whole probe batches (the loss couples a "
                f"batch's samples: batch normalization, or probe_batch_size='loader'), and the probe holds "
                f"{groups}"
                + (" on the rank with the fewest" if is_distributed() else "")
                + ": "
                + (
                    "no standard error (NaN) from one group"
                    if groups < 2
                    else f"{groups - 1} degree(s) of freedom where {STDERR_GROUPS} groups give "
                    f"{STDERR_GROUPS - 1}, so each value is rough"
                )
                + "; draw the probe in more batches (smaller loader batches, or probe= batches)",
            )

    def _set_up(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """This rank's part of the fit's set-up: the module's checks, the probe, the measurement's settings."""
        self.check_module(pl_module)
        check.usable_device("basis_device", self.basis_device)
        shared, loss_fn = self._shared_probe, resolve_loss_fn(pl_module, self._loss_arg)
        if shared is not None and shared.probe is not None:
            probe = shared.probe
        else:  # its stacking is checked with forward passes of the loss: after the module's checks
            probe = build_probe(
                trainer,
                pl_module,
                self._probe_arg,
                loss_fn,
                self.probe_batch_size,
                self.hvp,
                params=self.params,
                dtype=measurement_dtype(pl_module, self.dtype),
            )
            if shared is not None:
                shared.probe = probe
        self._whole = keeps_batches_whole(pl_module, self.probe_batch_size)
        self._probe_loader = trainer.train_dataloader if drawn_from_loader(self._probe_arg) else None
        self.spec = MeasurementSpec(
            loss_fn=loss_fn,
            probe=probe,
            params=self.params,
            hvp=self.hvp,
            seed=self.seed,
            dtype=measurement_dtype(pl_module, self.dtype),
            tol=self.tol,
            max_hvp=self.max_hvp,
            basis_device=self.basis_device,
            basis_size=self.basis_size,
            method=self.method,
        )
        self._budget.start_fit()
        self._work.start_fit()
        define_wandb_metrics(trainer, self.name)
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, HessianEigenMonitor)]
        if monitors[0] is self:
            # The monitors an EdgeOfStabilityMonitor reads (set at its set-up, before this): their edge charts.
            readers = [
                cb
                for cb in trainer.callbacks
                if isinstance(getattr(cb, "monitor", None), HessianEigenMonitor)
            ]
            preconditioned = {cb.monitor.name for cb in readers if getattr(cb, "preconditioned", False)}
            critical = {cb.monitor.name for cb in readers if getattr(cb, "critical_every_n_steps", None)}
            edged = {cb.monitor.name for cb in readers}
            announce_run(
                trainer, [cb.name for cb in monitors if cb.params is None], edged, preconditioned, critical
            )
        # Fail now, not at the first measurement, if there is no loss, the probe does not fit the model or
        # the loss is no scalar of the parameters; guarded like a measurement, so BatchNorm statistics and
        # the random stream are kept. With gradients, to see a detached loss; not under FSDP2, whose forward
        # with gradients waits for a backward.
        sharded = any(is_sharded(p) for p in pl_module.parameters())
        try:
            with measurement_context(pl_module), torch.set_grad_enabled(not sharded):
                loss = self.spec.loss_fn(pl_module, probe.batches[0])
                scalar = isinstance(loss, torch.Tensor) and loss.numel() == 1
                attached = sharded or (scalar and loss.requires_grad)
                del loss  # its graph
        except MisconfigurationException:
            raise
        except Exception as err:
            raise MisconfigurationException(
                f"the loss does not run on the first probe batch ({type(err).__name__}: {err}): pass "
                "`probe=` batches that training_step (or `loss_fn=`) accepts"
            ) from err
        if not (scalar and attached):
            raise MisconfigurationException(
                "the loss of the first probe batch is "
                + ("not a scalar Tensor" if not scalar else "detached from the parameters (no grad_fn)")
                + ": `loss_fn` (or training_step) must return the scalar loss computed from the model's "
                "output with gradients, not .detach()ed nor under torch.no_grad()"
            )

    # -- when to measure ---------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.max_work_fraction is not None:
            try:
                self._work.trained(sample_count(batch))
            except ValueError as err:
                raise MisconfigurationException(
                    f"max_work_fraction counts the samples of every training batch: {err}. Use "
                    "max_time_fraction instead, or batches that hold a tensor with one row per sample"
                ) from err
        if self._due(trainer.global_step):
            self.measure(trainer, pl_module)

    def _due(self, step: int) -> bool:
        # Step 0 is the fit-start measurement's (at_fit_start), not the micro-batches' before the first step.
        every = self.every_n_steps
        return bool(every) and step > 0 and step % every == 0 and step >= self.warmup_steps

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._probe_loader is not None and trainer.train_dataloader is not self._probe_loader:
            self._warn_once(
                "reloaded",
                f"the training dataloader was reloaded (reload_dataloaders_every_n_epochs): the probe keeps the "
                f"samples drawn at fit start, so {self._label} measures the loss on those; pass probe= batches to "
                "choose the data measured",
            )

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_fit_end:
            self.measure(trainer, pl_module)

    # -- the measurement ---------------------------------------------------------------------
    def measure(
        self, trainer: Trainer, pl_module: LightningModule, force: bool = False
    ) -> EigenResult | None:
        """Measure now, at most once per ``global_step`` and not at a step either budget postponed; returns
        the result, or None if skipped. ``force=True`` measures regardless: a step already measured again (a
        second record at that step, charged to the budgets like any other), a postponed one. After the fit
        the EdgeOfStabilityMonitor no longer listens: a forced measurement then reaches this monitor alone."""
        step = trainer.global_step
        # A step measured or postponed (by either budget) is settled: the later micro-batches of its
        # accumulation, its epoch end and the fit end at it ask again at the same global_step.
        if self.spec is None or (step in (self._last_step, self._postponed_step) and not force):
            return None
        if not force and self._postponed(trainer, pl_module, step):
            return None
        begin = time.perf_counter()
        try:
            with WorkMeter() as meter, progress_mark(trainer, f"measuring {self._label}…"):
                result = self._measure_now(trainer, pl_module, step)
        finally:  # a failed attempt costs time and work too, unless it stops the fit as not taken (Ctrl+C,
            # on_error="raise"): a fit resumed from the checkpoint written on the way out takes it again, and
            # charged twice it postponed other steps than the uninterrupted run (an outside trial)
            if self._last_step == step:
                self._budget.charge(time.perf_counter() - begin)
                if self.max_work_fraction is not None:  # its window counts training only under the cap too
                    self._work.charge(meter.work)
        if result is not None:
            self._log_fractions(trainer, step)
        return result

    def _log_fractions(self, trainer: Trainer, step: int, measured: int = 2) -> None:
        """``hessian/time_fraction`` (and ``work_fraction`` under ``max_work_fraction``) once the fit has
        measured ``measured`` times (see :meth:`Budget.overhead`)."""
        fractions = {self.metric("time_fraction"): self._budget.overhead(measured)}
        if self.max_work_fraction is not None:
            fractions[self.metric("work_fraction")] = self._work.overhead(measured)
        fractions = {key: value for key, value in fractions.items() if value is not None}
        if fractions:
            log_metrics(trainer, fractions, step)

    def _measure_now(self, trainer: Trainer, pl_module: LightningModule, step: int) -> EigenResult | None:
        previous, self._last_step = self._last_step, step
        try:
            with held_nonconvergence() as solver:  # said once below, on rank zero
                result = self.spec.eigenpairs(
                    pl_module,
                    self.k,
                    self.which,
                    warm_start=self.latest if self.warm_start else None,
                    gradient=bool(self._gradient_readers),
                )
            for message in solver:
                self._warn_once(
                    "converged",
                    f"step {step}: {message}; see hessian/converged (warned once)",
                    NonConvergenceWarning,
                )
        except Exception as err:  # never BaseException: KeyboardInterrupt stops the run
            try:
                self._skip(trainer, err, "measurement skipped", "skipped")
            except BaseException:  # on_error="raise", or a failed collective (raised under "skip" too)
                self._last_step = previous  # not measured: a checkpoint written on the way out says so
                raise
            return None
        except BaseException:
            self._last_step = previous  # Ctrl+C: not measured, so a fit resumed from its checkpoint takes it
            raise
        latest, measured, last_row = self.latest, self._measured, self.history[-1] if self.history else None
        try:
            if self.spec.hvp == "auto" and result.info.get("hvp") == "finite_difference":
                # Agreed by every rank: from now on this fit asks for finite differences directly.
                self.spec = dataclasses.replace(self.spec, hvp="finite_difference")
            self.latest = result if result.gradient is None else dataclasses.replace(result, gradient=None)
            self._record(trainer, result)
            self._measured += 1
            self._spectrum_extras(trainer, pl_module)
            notify(
                self._listeners, (trainer, pl_module, result), on_error=self.on_error, warned=self._warned,
                trainer=trainer, what=f"{self._label} listener", metric=self.metric("listener_failed"),
            )  # fmt: skip
        except BaseException as err:
            if not isinstance(err, Exception):  # Ctrl+C in a listener (the EoS monitor's batch sharpness):
                # not taken either, so a resumed fit takes it again, from the same warm start.
                self._last_step, self.latest, self._measured = previous, latest, measured
                if self.history and self.history[-1] is not last_row:
                    self.history.pop()
            raise
        return result

    @property
    def _label(self) -> str:
        """How this monitor names itself in warnings."""
        return f"Hessian ({self.name})" if self.name else "Hessian"

    def _skip(self, trainer: Trainer, err: Exception, what: str, flag: str) -> None:
        skip_or_raise(
            err,
            on_error=self.on_error,
            warned=self._warned,
            trainer=trainer,
            what=f"{self._label} {what}",
            metric=self.metric(flag),
        )

    @property
    def probe(self) -> ProbeSet | None:
        """The probe set of the current (or last) fit."""
        return None if self.spec is None else self.spec.probe

    @property
    def measuring_seconds(self) -> float:
        """Wall time spent measuring, listeners included, over the run (its fits; kept in checkpoints)."""
        return self._budget.total

    @property
    def hvp_in_use(self) -> str:
        """``hvp``, except that once ``"auto"`` has fallen back to finite differences in a fit it asks for
        them directly: trying double backward again would cost a product and a warning per measurement."""
        return self.hvp if self.spec is None else self.spec.hvp

    def _postponed(self, trainer: Trainer, pl_module: LightningModule, step: int) -> bool:
        work, time_ = self.max_work_fraction, self.max_time_fraction
        over_work, over_time = self._work.over(work), self._budget.over(time_)
        if work is not None or time_ is not None:  # clocks and shards differ between ranks: postpone together
            over_work, over_time = any_rank([over_work, over_time], pl_module.device)
        over = over_work or over_time
        if over:
            self._postponed_step = step
            cap = f"max_work_fraction={work}" if over_work else f"max_time_fraction={time_}"
            self._warn_once("budget", f"measuring would exceed {cap}: postponed")
            log_metrics(trainer, {self.metric("postponed"): 1.0}, step)
            self._log_fractions(trainer, step, measured=1)  # the ratio so far: one more would pass the cap
        return over

    def _warn_once(self, key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
        warn_once(self._warned, key, message if self.name is None else f"[{self.name}] {message}", category)

    # -- checks at fit set-up -----------------------------------------------------------------
    def _check_strategy(self, trainer: Trainer) -> None:
        """Fail at setup on a strategy the measurement does not support, naming the supported choice.

        FSDP1 (Lightning's ``FSDPStrategy``) and DeepSpeed wrap or flatten parameters in ways no test here
        covers (both need a GPU); FSDP2 through ``ModelParallelStrategy`` measures by finite differences.
        """
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        unsupported = names & {"FSDPStrategy", "DeepSpeedStrategy"}
        if unsupported:
            raise MisconfigurationException(
                f"Hessian measurements do not support {unsupported.pop()}: shard the model with "
                "ModelParallelStrategy and torch's fully_shard in configure_model (FSDP2), or use DDP"
            )
        if "ModelParallelStrategy" in names and self.hvp not in ("auto", "finite_difference"):
            raise MisconfigurationException(
                f"hvp={self.hvp!r} needs second-order autograd, which does not run on FSDP2's sharded "
                "parameters under ModelParallelStrategy: use hvp='auto' or 'finite_difference'"
            )

    def check_module(self, module: LightningModule) -> None:
        """The arguments only the module can judge, checked before the first step: ``params`` must match
        trainable parameters of one measurable dtype, and ``k`` (at each end for ``which="both"``) must fit
        their count. A callback reading this monitor's parameters may call it first.

        Raises:
            MisconfigurationException: naming the argument and the fix."""
        lazy = [
            n
            for n, p in module.named_parameters()
            if isinstance(p, torch.nn.parameter.UninitializedParameter)
        ]
        if lazy:
            raise MisconfigurationException(
                f"HessianEigenMonitor cannot measure this module: its lazy parameters ({', '.join(lazy[:3])}"
                f"{', ...' if len(lazy) > 3 else ''}) have no shape before a forward pass: run one batch "
                "through the model before fit (or in the LightningModule's `setup`) to initialize them"
            )
        try:
            select_parameters(module, self.params, argument="params")
            space = ParameterSpace(module, self.params, dtype=measurement_dtype(module, self.dtype))
        except ValueError as err:
            raise MisconfigurationException(f"HessianEigenMonitor cannot measure this module: {err}") from err
        if wanted_pairs(self.k, self.which) > space.global_n:
            most = space.global_n // wanted_pairs(1, self.which)
            raise MisconfigurationException(
                f"`k` must be at most {most} for the {space.global_n} measured parameters "
                f"(which={self.which!r}), got {self.k}"
            )
        check_method(check, self.method, self.basis_size, self.max_hvp, self.k, self.which, n=space.global_n)

    # -- what a measurement logs and keeps ----------------------------------------------------
    def _metrics(self, result: EigenResult) -> dict[str, float]:
        """A measurement's ``hessian/*`` metrics (under this monitor's tag)."""
        top = result.eigenvalues[: self.k]
        metrics = {eigenvalue(i + 1, self.name): float(v) for i, v in enumerate(top)}
        if self.which == "both":
            bottom = result.eigenvalues[self.k :].flip(0)
            metrics.update(
                {eigenvalue(i + 1, self.name, bottom=True): float(v) for i, v in enumerate(bottom)}
            )
            metrics[tag_name(names.EIG_MIN, self.name)] = float(bottom[0])
        quality = {
            names.RESIDUAL_MAX: float(result.relative_residuals.max()),
            names.N_HVP: float(result.n_hvp),
            names.SECONDS: result.seconds,
            names.CONVERGED: float(result.all_converged),
        }
        metrics.update(tagged(quality, self.name))
        return metrics

    def _record(self, trainer: Trainer, result: EigenResult) -> None:
        """Log a measurement's metrics at its step and append it to the history."""
        metrics = self._metrics(result)
        if not result.all_converged:
            self._warn_once(
                "converged",
                f"some eigenpairs did not converge (tol={self.tol}); see hessian/converged",
                NonConvergenceWarning,
            )
        log_metrics(trainer, metrics, trainer.global_step)
        self.history.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "eigenvalues": result.eigenvalues.detach().cpu().tolist(),
                "residuals": result.residuals.detach().cpu().tolist(),
                "converged": result.converged.detach().cpu().tolist(),
                "n_hvp": result.n_hvp,
                "seconds": result.seconds,
                "hvp": result.info.get("hvp", ""),
            }
        )
        del self.history[: max(0, len(self.history) - self.max_history)]

    def _draw_seed(self, trainer: Trainer) -> int:
        """The seed of a stochastic estimate's draws at this step (the trace's probes, the density's start
        vectors; the dropout masks stay ``seed``'s, as the eigenpairs'): with one seed for all, their errors
        repeated from measurement to measurement (correlation 0.75-0.81 between neighbours over 40 seeds, an
        outside trial), and averaging a run's traces removed none. The same on every rank, and in a resumed
        run."""
        return (self.seed * 1_000_003 + trainer.global_step) % (SEED_MAX + 1)

    def _spectrum_extras(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Trace and density at their slower cadence (counted in measurements taken, not in the capped
        history); a failed one is skipped and flagged like a failed measurement."""
        count = self._measured
        metrics: dict[str, float] = {}
        if self.stderr_every and count % self.stderr_every == 1 % self.stderr_every:
            try:
                vector = self.latest.eigenvectors[:, 0]
                stderr = self.spec.eigenvalue_stderr(pl_module, vector, cut=not self._whole)
            except Exception as err:
                self._skip(trainer, err, "eig_1_stderr skipped", "stderr_skipped")
            else:
                metrics[tag_name(names.EIG_1_STDERR, self.name)] = stderr
                self.history[-1]["eig_1_stderr"] = stderr
        if self.trace_every and count % self.trace_every == 1 % self.trace_every:
            try:
                estimate = self.spec.trace(pl_module, self.trace_hvp, probe_seed=self._draw_seed(trainer))
            except Exception as err:
                self._skip(trainer, err, "trace skipped", "trace_skipped")
            else:
                metrics.update(
                    tagged({names.TRACE: estimate.trace, names.TRACE_STD: estimate.std_error}, self.name)
                )
                self.history[-1]["trace"] = estimate.trace
        if self.density_every and count % self.density_every == 1 % self.density_every:
            try:
                self.density = self.spec.density(
                    pl_module, self.density_steps, probe_seed=self._draw_seed(trainer)
                )
                self._log_density(trainer)
            except Exception as err:
                self._skip(trainer, err, "density skipped", "density_skipped")
        log_metrics(trainer, metrics, trainer.global_step)

    def _log_density(self, trainer: Trainer) -> None:
        """The density evaluated at bin centres, as a histogram over the spectral range: to W&B and to
        TensorBoard (its mass per bin as the bucket counts)."""
        writers, runs = tensorboard_writers(trainer), wandb_experiments(trainer)
        if self.density is None or not (writers or runs):
            return
        edges = self.density.grid(n_points=121).double()
        centres, widths = (edges[1:] + edges[:-1]) / 2, edges[1:] - edges[:-1]
        values = self.density.density(centres).double()
        if runs:
            import wandb

            histogram = wandb.Histogram(np_histogram=(values.numpy(), edges.numpy()))
            wandb_log(trainer, {self.metric("density"): histogram}, trainer.global_step)
        mass = values * widths
        for writer, prefix in writers:
            writer.add_histogram_raw(
                prefix + self.metric("density"),
                min=float(edges[0]),
                max=float(edges[-1]),
                num=float(mass.sum()),
                sum=float((mass * centres).sum()),
                sum_squares=float((mass * centres**2).sum()),
                bucket_limits=edges[1:].tolist(),
                bucket_counts=mass.tolist(),
                global_step=trainer.global_step,
            )

    # -- checkpointing -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "latest": result_state(self.latest, self.checkpoint_eigenvectors),
            "last_step": self._last_step,
            "postponed_step": self._postponed_step,
            "measure_seconds": self._budget.total,
            "measured": self._measured,
            "work": self._work.state(),
        }

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        warn_other_settings(self, trainer, checkpoint, same="name")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start = "resumed"
        try:
            state = monitor_from_state(state_dict)
            self.history, self.latest, steps, self._budget.total, self._measured, work = state
            self._last_step, self._postponed_step = steps
            self._work.restore(work)
        except UnreadableState as err:
            warn_fresh_start(type(self).__name__, err)
            self._start = "unreadable"
            self._new_run()
