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
``hessian/density_skipped``, ``hessian/stderr_skipped``, ``hessian/listener_failed``, ``eos/skipped``,
``eos/proxies_skipped``, ``eos/listener_failed``, ``dal/skipped``, ``eos/batch_sharpness_skipped``,
``eos/critical_skipped``; ``eos/warmup`` marks measurements before an adaptive optimizer's preconditioner
settled, and ``eos/preconditioned_converged`` whether its preconditioned measurement met ``tol``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import warnings
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "EIGENVALUE",
    "OUTSIDE_WARMUP_SUMMARIES",
    "PREFIXES",
    "SETTINGS_KEY",
    "WANDB_SUMMARIES",
    "announce_run",
    "direction",
    "direction_pattern",
    "eigenvalue",
    "is_tagged",
    "log_metrics",
    "metric_name",
    "progress_mark",
    "summarize_wandb",
    "tag_name",
    "tag_pattern",
    "tagged",
    "tensorboard_layout",
    "tensorboard_writers",
    "wandb_experiments",
    "wandb_log",
    "warn_once",
    "warn_user",
]

PREFIXES = ("hessian", "eos", "pf", "dal", "cap")

# -- the names every callback, function and the report use (README, "Metric names") -------------
SHARPNESS = "eos/sharpness"
THRESHOLD = "eos/threshold"
RATIO = "eos/ratio"
PRECONDITIONED_SHARPNESS = "eos/preconditioned_sharpness"
PRECONDITIONED_CONVERGED = "eos/preconditioned_converged"
PRECONDITIONED_N_HVP = "eos/preconditioned_n_hvp"
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
CRITICAL_THRESHOLD = "eos/critical_threshold"
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
CAP_LR = "cap/lr"
CAP_BASE_LR = "cap/base_lr"
EIG_MIN = "hessian/eig_min"
RESIDUAL_MAX = "hessian/residual_max"
N_HVP = "hessian/n_hvp"
SECONDS = "hessian/seconds"
CONVERGED = "hessian/converged"
TRACE = "hessian/trace"
TRACE_STD = "hessian/trace_std"
EIG_1_STDERR = "hessian/eig_1_stderr"
EIGENVALUE = re.compile(r"^hessian/(?:(?P<tag>.+)/)?eig_(?P<bottom>bottom_)?(?P<i>\d+)$")
"""``hessian/eig_{i}``, ``hessian/eig_bottom_{i}`` and their ``hessian/<tag>/...`` forms."""


def eigenvalue(i: int, tag: str | None = None, bottom: bool = False) -> str:
    """``hessian/eig_{i}`` (i = 1 the largest), or ``hessian/eig_bottom_{i}`` (i = 1 the most negative),
    under ``hessian/<tag>/`` for a named monitor: the names :data:`EIGENVALUE` matches."""
    return metric_name("hessian", f"eig_bottom_{i}" if bottom else f"eig_{i}", tag)


WANDB_SUMMARIES: dict[str, str] = {
    SHARPNESS: "max",
    RATIO: "max",
    BATCH_SHARPNESS: "max",
    BATCH_RATIO: "max",
    CRITICAL_RATIO: "max",
    "hessian/eig_1": "max",
    EIG_MIN: "min",
}
"""The W&B run summary of these metrics is their extreme over the run (how close training came to the
edge), not their last value; every other metric keeps W&B's default (the last value)."""

OUTSIDE_WARMUP_SUMMARIES = (SHARPNESS, RATIO)
"""Of :data:`WANDB_SUMMARIES`, those whose extreme leaves out an adaptive optimizer's warm-up measurements
(logged, flagged ``eos/warmup`` and not judged: at its first steps Adam's ratio reached 1.37 in a run whose
judged ratios stayed below 0.22). W&B cannot filter the rows it summarizes, so the EdgeOfStabilityMonitor
writes their summary itself (:func:`summarize_wandb`); nor are a warm-up's values of them left in
``trainer.callback_metrics``, where ``EarlyStopping`` and ``ModelCheckpoint`` would act on them."""

EDGE_CHARTS: dict[str, tuple[str, ...]] = {
    "sharpness and its threshold": (SHARPNESS, THRESHOLD, BATCH_SHARPNESS, BATCH_THRESHOLD),
    "critical sharpness and its threshold (2/lr)": (CRITICAL_SHARPNESS, CRITICAL_THRESHOLD),
    "ratio to the threshold (1 = the edge)": (RATIO, BATCH_RATIO, CRITICAL_RATIO),
}
r"""The edge charts of the dashboards (TensorBoard's layout, the W&B workspace): title and the ``eos/*``
metrics drawn together, each quantity with its own threshold; each dashboard adds the top-k eigenvalues,
with the threshold where it is theirs (not under a preconditioning optimizer, whose threshold is that of
``eos/sharpness``, :math:`\lambda_{\max}(P^{-1}H)`)."""
TOP_K_CHART = "top-k eigenvalues and the threshold"
TOP_K_ONLY_CHART = "top-k eigenvalues"  # no threshold: none is read, or it is not theirs (Adam's)

SETTINGS_KEY = "pf_lightning"
"""The callbacks' settings go to every logger's hyperparameters (the W&B run config) under this key."""


def settings_key(owner: str, name: str | None) -> str:
    """The key of one callback's settings under :data:`SETTINGS_KEY`: its class, and the name of the monitor
    it belongs to after a colon (``HessianEigenMonitor:heldout``). MLflow takes only alphanumerics and
    ``_ - . : /`` and space in a parameter's name, and refused every setting of a run with brackets there."""
    return owner if name is None else f"{owner}:{name}"


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


def tag_pattern(name: str) -> re.Pattern[str]:
    """The pattern of :func:`tag_name`'s names for ``name`` under any tag, the tag as group ``tag``.

    Example::

        >>> tag_pattern("eos/threshold").match("eos/heldout/threshold")["tag"], is_tagged("eos/threshold")
        ('heldout', False)
    """
    group, rest = name.split("/", 1)
    return re.compile(rf"^{re.escape(group)}/(?P<tag>[^/]+)/{re.escape(rest)}$")


def is_tagged(name: str) -> bool:
    """Whether ``name`` is a named instance's, ``group/tag/name`` (the unnamed one's are ``group/name``)."""
    return name.count("/") > 1


def tag_name(name: str, tag: str | None) -> str:
    """``group/name`` as ``group/tag/name`` (unchanged without a tag)."""
    group, rest = name.split("/", 1)
    return metric_name(group, rest, tag)


def tagged(metrics: Mapping[str, float], tag: str | None) -> dict[str, float]:
    """``metrics`` keyed ``group/tag/name`` instead of ``group/name`` (unchanged without a tag)."""
    return {tag_name(key, tag): value for key, value in metrics.items()}


def log_metrics(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Log to every attached logger at ``step`` and expose the values in ``trainer.callback_metrics``."""
    if not metrics:
        return
    clean = {key: float(value) for key, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)
    for key, value in clean.items():
        trainer.callback_metrics[key] = torch.tensor(value)


def warn_once(seen: set[str], key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
    """One rank-zero warning per ``key`` for the owner of ``seen``: a problem that repeats at every
    measurement is reported once (the logged flags record every occurrence).

    The warning points at the user's code (the first caller outside pf-lightning, Lightning and torch:
    the line that called ``trainer.fit``), and tqdm's bars (Lightning's progress bar) are cleared while
    it prints and redrawn after, so it never lands in the middle of a progress line."""
    if key in seen:
        return
    seen.add(key)
    warn_user(message, category)


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """A rank-zero warning at the user's code (see :func:`warn_once`), every time it is called, with
    tqdm's bars cleared while it prints."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from tqdm import tqdm

    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    with tqdm.external_write_mode(file=sys.stderr):
        warnings.warn(message, category, stacklevel=user_stacklevel())


@contextlib.contextmanager
def progress_mark(trainer: Any, text: str) -> Iterator[None]:
    """``text`` on the training progress bar while the block runs (a measurement, which holds the bar
    still for its duration), the bar as it was afterwards: at the end of the metrics of Lightning's
    ``TQDMProgressBar``, after the task's description of its ``RichProgressBar``; other bars are left as
    they are. Showing it is never worth a measurement: a bar that refuses is left alone."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    callback = getattr(trainer, "progress_bar_callback", None)
    restore: Any = None
    with contextlib.suppress(Exception):
        if not _is_rank_zero(trainer) or callback is None or callback.is_disabled:
            pass
        elif isinstance(callback, TQDMProgressBar) and callback.train_progress_bar is not None:
            bar, before = callback.train_progress_bar, callback.train_progress_bar.postfix
            bar.set_postfix_str(f"{before}, {text}" if before else text, refresh=True)
            restore = lambda: bar.set_postfix_str(before or "", refresh=False)  # noqa: E731
        elif isinstance(callback, RichProgressBar) and callback.train_progress_bar_id is not None:
            progress, task = callback.progress, callback.train_progress_bar_id
            before = progress.tasks[task].description
            progress.update(task, description=f"{before} · {text}")
            progress.refresh()
            restore = lambda: progress.update(task, description=before)  # noqa: E731
    try:
        yield
    finally:
        if restore is not None:
            with contextlib.suppress(Exception):
                restore()


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by this function's caller point at the first frame
    outside pf-lightning, Lightning and torch (1, the caller itself, if there is none)."""
    roots = ("pf_lightning", "lightning", "lightning_fabric", "pytorch_lightning", "torch")
    modules = [sys.modules.get(root) for root in roots]
    internal = tuple(
        os.path.dirname(module.__file__) + os.sep for module in modules if getattr(module, "__file__", None)
    )
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


def wandb_experiments(trainer: Any) -> list[tuple[Any, str]]:
    """The W&B runs of the attached ``WandbLogger``s (on rank zero; empty without wandb), each with what
    its logger puts before the metric names (``WandbLogger(prefix="train")``: ``"train-"``; else ``""``),
    as :func:`tensorboard_writers` gives TensorBoard's."""
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
                runs.append((experiment, _logger_prefix(logger)))
    return runs


def _logger_prefix(logger: Any) -> str:
    """What a Lightning logger puts before every metric name it logs (its ``prefix`` and join character)."""
    return f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if getattr(logger, "_prefix", "") else ""


def define_wandb_metrics(trainer: Any, tag: str | None = None) -> None:
    """Chart every pf-lightning metric against ``trainer/global_step`` (the x-axis users expect), and
    summarize those of :data:`WANDB_SUMMARIES` (under ``tag``, a named monitor's) by their extreme, as
    the logger names them (its prefix first).

    ``define_metric`` is idempotent, so every monitor may call this at the start of every fit."""
    for run, prefix in wandb_experiments(trainer):
        for group in PREFIXES:
            run.define_metric(f"{prefix}{group}/*", step_metric="trainer/global_step")
        for name, summary in WANDB_SUMMARIES.items():
            run.define_metric(  # W&B reads a '.' in a metric's name as a nested key: a group "net.0"'s
                # summary was its last value, not its max (an outside trial); escaped, it is that metric's
                (prefix + tag_name(name, tag)).replace(".", "\\."),
                step_metric="trainer/global_step",
                summary="none" if name in OUTSIDE_WARMUP_SUMMARIES else summary,
            )


def summarize_wandb(
    trainer: Any, metrics: Mapping[str, float], extremes: dict[str, float], write: bool = True
) -> None:
    """Fold the :data:`OUTSIDE_WARMUP_SUMMARIES` among ``metrics`` (tagged names, outside a warm-up) into
    ``extremes`` (the caller's, one run's) and, with ``write``, write them as the W&B run summary, shaped as
    W&B's own (``{"max": value}``)."""
    for key, value in metrics.items():
        parts = key.split("/")
        name = f"{parts[0]}/{parts[-1]}"  # group/tag/name as group/name
        if name not in OUTSIDE_WARMUP_SUMMARIES or not math.isfinite(value):
            continue
        kind = WANDB_SUMMARIES[name]
        extremes[key] = (
            value if key not in extremes else (max if kind == "max" else min)(extremes[key], value)
        )
        for run, prefix in wandb_experiments(trainer) if write else ():
            run.summary[prefix + key] = {kind: extremes[key]}


def _is_rank_zero(trainer: Any) -> bool:
    return getattr(trainer, "global_rank", 0) == 0


def _plain(value: Any) -> Any:
    """A setting as every logger stores it: numbers, strings, booleans and None kept, the rest as text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)


def announce_run(
    trainer: Any,
    tags: list[str | None],
    edged: Collection[str | None] | None = None,
    preconditioned: Collection[str | None] = (),
    critical: Collection[str | None] = (),
    layout: bool = True,
) -> None:
    """Once per fit, from the first :class:`~pf_lightning.HessianEigenMonitor` (or an ``LRAdaptation`` where
    there is none, with ``layout=False``: no monitor's charts to lay out): every pf-lightning
    callback's ``settings()`` to every logger's hyperparameters under :data:`SETTINGS_KEY` (the W&B run
    config, hparams.yaml of a CSVLogger, MLflow's params; TensorBoard keeps the module's hyperparameters
    only, so there they go to the Text tab), and the TensorBoard custom-scalars layout
    (:func:`tensorboard_layout`) for the whole-Hessian monitors named ``tags``, with edge charts for those in
    ``edged`` (``preconditioned``: those judged by a preconditioning optimizer's rule; ``critical``: those
    whose critical sharpness is measured). A logger that refuses is warned about once; training goes on. With no logger, says so (as
    information: a sweep that reads ``.latest`` may mean it)."""
    if not trainer.loggers:  # logger=False: nothing keeps the metrics, which is easy to miss
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(
            "pf-lightning: the trainer has no logger (logger=False): the monitors' metrics reach only "
            "trainer.callback_metrics, the Hessian monitors' .latest and .history and the EoS monitor's .history; "
            "pass a logger (CSVLogger, WandbLogger, ...) "
            "to keep them"
        )
    settings = {}
    for cb in trainer.callbacks:
        ours = any(cls.__module__.startswith("pf_lightning.") for cls in type(cb).__mro__)  # subclasses too
        if ours and callable(getattr(cb, "settings", None)):
            try:
                key, values = cb.settings()
                settings[key] = {name: _plain(value) for name, value in values.items()}
            except Exception as err:  # what the loggers show of the set-up is never worth stopping a fit for
                warn_once(set(), "settings", f"the settings of {type(cb).__name__} were not logged ({err!r})")
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers if settings else ():
        try:
            if isinstance(logger, TensorBoardLogger):  # its Text tab below: a second HParams session else
                continue
            logger.log_hyperparams({SETTINGS_KEY: settings})
        except Exception as err:  # e.g. MLflow refuses a changed parameter on a second fit
            warn_once(
                set(), "settings", f"{type(logger).__name__} did not take the callbacks' settings ({err!r})"
            )
    for writer, prefix in tensorboard_writers(trainer):
        try:
            # TensorBoard's HParams tab keeps the first hyperparameters of a run (the module's): a text entry.
            if settings:
                writer.add_text(SETTINGS_KEY, _markdown(settings))
        except Exception as err:
            warn_once(set(), "settings", f"TensorBoard did not take the callbacks' settings ({err!r})")
        try:
            if layout:
                writer.add_custom_scalars(tensorboard_layout(tags, prefix, edged, preconditioned, critical))
        except Exception as err:
            warn_once(set(), "layout", f"the TensorBoard layout was not written ({err!r})")


def _markdown(settings: dict[str, dict[str, Any]]) -> str:
    """The settings as markdown tables, one per callback (TensorBoard's Text tab renders them)."""
    parts = []
    for callback, values in settings.items():
        rows = "\n".join(f"| {name} | {value} |" for name, value in values.items())
        parts.append(f"**{callback}**\n\n| setting | value |\n|---|---|\n{rows}")
    return "\n\n".join(parts)


def tensorboard_writers(trainer: Any) -> list[tuple[Any, str]]:
    """The ``SummaryWriter``s of the attached ``TensorBoardLogger``s (on rank zero), each with what its
    logger puts before the metric names (``TensorBoardLogger(prefix="train")``: ``"train-"``; else ``""``),
    so that what is written to the writer directly is named like the logged metrics."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not _is_rank_zero(trainer):
        return []
    return [
        (logger.experiment, _logger_prefix(logger))
        for logger in trainer.loggers
        if isinstance(logger, TensorBoardLogger)
    ]


def tensorboard_layout(
    tags: list[str | None],
    prefix: str = "",
    edged: Collection[str | None] | None = None,
    preconditioned: Collection[str | None] = (),
    critical: Collection[str | None] = (),
) -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars layout: for each whole-Hessian monitor (``tags``: their names, ``None``
    for the unnamed one), the top-k eigenvalues and, for one an EdgeOfStabilityMonitor reads (``edged``;
    ``None``: every one), the charts of :data:`EDGE_CHARTS` and the threshold with the top-k eigenvalues,
    unless it judges a preconditioning optimizer (``preconditioned``), whose threshold is that of
    :math:`P^{-1}H`; the critical sharpness's chart only where it is measured (``critical``); a monitor no EoS monitor reads has no ``eos/*`` to draw. ``prefix``: what the logger
    puts before every metric name (see :func:`tensorboard_writers`)."""

    def exact(metrics: tuple[str, ...], tag: str | None) -> str:
        """A regex matching exactly these ``eos/<name>`` metrics, under ``tag``."""
        return "|".join(
            f"^{re.escape(prefix + metric_name('eos', m.split('/', 1)[1], tag))}$" for m in metrics
        )

    layout = {}
    for tag in tags or [None]:
        top_k = f"^{re.escape(prefix + metric_name('hessian', 'eig_', tag))}\\d+$"
        if edged is not None and tag not in edged:
            charts = {TOP_K_ONLY_CHART: ["Multiline", [top_k]]}
        else:
            charts = {
                title: ["Multiline", [exact(metrics, tag)]]
                for title, metrics in EDGE_CHARTS.items()
                if tag in critical or CRITICAL_SHARPNESS not in metrics
            }
            if tag in preconditioned:
                charts[TOP_K_ONLY_CHART] = ["Multiline", [top_k]]
            else:
                charts[TOP_K_CHART] = ["Multiline", [top_k, exact((THRESHOLD,), tag)]]
        layout[f"pf-lightning{'' if tag is None else f' ({tag})'}"] = charts
    return layout


def wandb_log(trainer: Any, payload: Mapping[str, Any], step: int) -> None:
    """Log W&B-only objects (tables, histograms, custom charts) with the step column WandbLogger uses."""
    for run, prefix in wandb_experiments(trainer):
        run.log({**{prefix + key: value for key, value in payload.items()}, "trainer/global_step": step})
