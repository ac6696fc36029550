"""Metric names and reporting: one scheme, every attached logger, W&B extras when W&B is there.

Sparse measurements are logged at the measurement's ``global_step`` through each logger's
``log_metrics`` (as ``LearningRateMonitor`` does), not through ``LightningModule.log``, which would
re-emit a stale value at later steps. They are also written to ``trainer.callback_metrics`` so
schedulers, ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them.

Names (README, "Metric names"): ``hessian/eig_{i}`` (i = 1 is the largest), ``hessian/eig_bottom_{i}``
(i = 1 is the most negative), ``hessian/eig_min``, ``hessian/residual_max``, ``hessian/n_hvp``,
``hessian/seconds``, ``hessian/converged``, ``hessian/skipped``, ``hessian/trace``; ``eos/*``, ``pf/*``
and ``dal/*`` and ``cap/*`` for the diagnostics and schedulers built on them. Failures are flags logged
as 1.0 at the step they happened (callbacks/_faults.py): ``hessian/skipped``, ``hessian/trace_skipped``,
``hessian/density_skipped``, ``hessian/listener_failed``, ``eos/skipped``, ``eos/proxies_skipped``,
``dal/skipped``, ``eos/batch_sharpness_skipped``, ``eos/critical_skipped``; ``eos/warmup`` marks measurements before an adaptive optimizer's preconditioner settled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "EIGENVALUE",
    "PREFIXES",
    "direction",
    "direction_pattern",
    "eigenvalue",
    "log_metrics",
    "metric_name",
    "tagged",
    "wandb_experiments",
    "wandb_log",
    "warn_once",
]

PREFIXES = ("hessian", "eos", "pf", "dal", "cap")

# -- the names every callback, function and the report use (README, "Metric names") -------------
SHARPNESS = "eos/sharpness"
THRESHOLD = "eos/threshold"
RATIO = "eos/ratio"
PRECONDITIONED_SHARPNESS = "eos/preconditioned_sharpness"
EOS_LR = "eos/lr"
WARMUP = "eos/warmup"
WARNING = "eos/warning"
FIRST_EDGE_STEP = "eos/first_edge_step"
SHARPENING_SLOPE = "eos/sharpening_slope"
LOSS_NON_MONOTONICITY = "eos/loss_non_monotonicity"
NEGATIVE_CURVATURE = "eos/accumulated_negative_curvature"
BATCH_SHARPNESS = "eos/batch_sharpness"
BATCH_SHARPNESS_STDERR = "eos/batch_sharpness_stderr"
BATCH_THRESHOLD = "eos/batch_threshold"
BATCH_RATIO = "eos/batch_ratio"
BATCH_COUNT = "eos/batch_sharpness_batches"
BATCH_UPHILL = "eos/batch_uphill_fraction"
CRITICAL_SHARPNESS = "eos/critical_sharpness"
CRITICAL_RATIO = "eos/critical_ratio"
CRITICAL_FORWARD = "eos/critical_forward"
UNSTABLE_DIRECTIONS = "pf/unstable_directions"
OSCILLATING_DIRECTIONS = "pf/oscillating_directions"
UNSTABLE_GRAD_FRACTION = "pf/unstable_grad_fraction"
GRAD_NORM = "pf/grad_norm"
HG_RATIO = "pf/hg_ratio"
RAYLEIGH_QUOTIENT = "pf/rayleigh_quotient"
DRIFT_RATIO = "pf/drift_ratio"
DAL_LR = "dal/lr"
DAL_HG_RATIO = "dal/hg_ratio"
CAP_SHARPNESS = "cap/sharpness"
EIGENVALUE = re.compile(r"^hessian/(?:(?P<tag>.+)/)?eig_(?P<bottom>bottom_)?(?P<i>\d+)$")
"""``hessian/eig_{i}``, ``hessian/eig_bottom_{i}`` and their ``hessian/<tag>/...`` forms."""


def eigenvalue(i: int, tag: str | None = None, bottom: bool = False) -> str:
    """``hessian/eig_{i}`` (i = 1 the largest), or ``hessian/eig_bottom_{i}`` (i = 1 the most negative),
    under ``hessian/<tag>/`` for a named monitor: the names :data:`EIGENVALUE` matches."""
    return metric_name("hessian", f"eig_bottom_{i}" if bottom else f"eig_{i}", tag)


def direction(stem: str, i: int) -> str:
    """``pf/<stem>_<i>``, the per-direction metrics: stems ``hlambda``, ``log_growth``, ``regime``,
    ``projection``; ``i = 1`` is the sharpest direction."""
    return f"pf/{stem}_{i}"


def direction_pattern(stem: str) -> re.Pattern[str]:
    """The pattern of :func:`direction`'s names for ``stem``, the index as its group 1."""
    return re.compile(rf"^pf/{stem}_(\d+)$")


def metric_name(group: str, name: str, tag: str | None = None) -> str:
    """``group/name``, or ``group/tag/name`` for a named second instance (e.g. a held-out probe)."""
    return f"{group}/{tag}/{name}" if tag else f"{group}/{name}"


def tagged(metrics: Mapping[str, float], tag: str | None) -> dict[str, float]:
    """``metrics`` keyed ``group/tag/name`` instead of ``group/name`` (unchanged without a tag)."""
    if not tag:
        return dict(metrics)
    out = {}
    for key, value in metrics.items():
        group, name = key.split("/", 1)
        out[metric_name(group, name, tag)] = value
    return out


def log_metrics(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Log to every attached logger at ``step`` and expose the values in ``trainer.callback_metrics``."""
    if not metrics:
        return
    clean = {key: float(value) for key, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)
    for key, value in clean.items():
        trainer.callback_metrics[key] = torch.tensor(value)


def warn_once(seen: set[str], key: str, message: str) -> None:
    """One rank-zero warning per ``key`` for the owner of ``seen``: a problem that repeats at every
    measurement is reported once (the logged flags record every occurrence)."""
    if key not in seen:
        seen.add(key)
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(message, category=RuntimeWarning)


def wandb_experiments(trainer: Any) -> list[Any]:
    """The W&B runs of the attached ``WandbLogger``s (on rank zero; empty without wandb)."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return []
    if getattr(trainer, "global_rank", 0) != 0:
        return []
    runs = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            experiment = logger.experiment
            if hasattr(experiment, "define_metric"):  # a real run, not a disabled dummy
                runs.append(experiment)
    return runs


def define_wandb_metrics(trainer: Any) -> None:
    """Chart every pf-lightning metric against ``trainer/global_step`` (the x-axis users expect).

    ``define_metric`` is idempotent, so every monitor may call this at the start of every fit."""
    for run in wandb_experiments(trainer):
        for prefix in PREFIXES:
            run.define_metric(f"{prefix}/*", step_metric="trainer/global_step")


def wandb_log(trainer: Any, payload: Mapping[str, Any], step: int) -> None:
    """Log W&B-only objects (tables, histograms, custom charts) with the step column WandbLogger uses."""
    for run in wandb_experiments(trainer):
        run.log({**payload, "trainer/global_step": step})
