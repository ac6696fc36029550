"""Plots from logged metrics: what ``pf-lightning report <run dir>`` draws.

A run is a CSVLogger's ``metrics.csv`` or an offline W&B run (``wandb/offline-run-*/run-*.wandb``, read
with :mod:`pf_lightning.wandb_reader`); a folder may hold several (one per learning rate, say). For
each run it writes PNGs of the sharpness against the stability threshold (``eos/*``), the top-k
spectrum over time (``hessian/eig_i``, one panel per named monitor), the principal-flow regimes
(``pf/*``), the learning rate (``lr-*`` from ``LearningRateMonitor``, ``dal/lr``), the loss and the
quality of each measurement (residuals, products, trace); with several runs, also the sharpness of all
of them on one figure (Cohen et al.'s first figure). Logs of one run by several loggers are merged into
one run. A plot without data is skipped with a message. ``html=True`` adds one self-contained page
(:func:`write_html`). Every ``plot_*`` function returns the series it drew, keyed by metric name, so
tests can compare them with what was logged.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ModuleNotFoundError as err:  # an extra: the core install measures and logs without it
    raise ModuleNotFoundError(
        "pf-lightning's report draws with matplotlib, which is not installed: pip install 'pf-lightning[report]'",
        name=err.name,
    ) from err

from . import logging as names
from . import wandb_reader

__all__ = [
    "PLOTS",
    "RunMetrics",
    "constant_axis",
    "find_runs",
    "measurement_table",
    "plot_learning_rate",
    "plot_loss",
    "plot_measurement",
    "plot_regimes",
    "plot_sharpness",
    "plot_sharpness_across_runs",
    "plot_spectrum",
    "read_csv_metrics",
    "read_settings",
    "read_wandb_metrics",
    "write_html",
    "write_report",
]

Series = tuple[np.ndarray, np.ndarray]  # steps, values
Drawn = dict[str, Series]
Source = Literal["auto", "csv", "wandb"]
_EIG = names.EIGENVALUE
_HLAMBDA = names.direction_pattern("hlambda")
# A named EdgeOfStabilityMonitor logs eos/<name>/threshold with every measurement, warm-up included.
_TAGGED_THRESHOLD = names.tag_pattern(names.THRESHOLD)
_PREFIXES = tuple(f"{prefix}/" for prefix in names.PREFIXES)


@dataclass
class RunMetrics:
    """The numeric metrics of one run: ``series[name] = (steps, values)`` in logging order."""

    name: str
    source: Path
    kind: Literal["csv", "wandb"]
    series: dict[str, Series] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # the callbacks' settings, as logged under ``pf_lightning``

    def get(self, key: str) -> Series | None:
        return self.series.get(key)

    def edge_tags(self) -> list[str]:
        """The names of the Hessian monitors a named EdgeOfStabilityMonitor logged ``eos/<name>/*`` for
        (it takes the name of the monitor it reads), in order; the unnamed one's ``eos/*`` are not here."""
        return sorted({m["tag"] for key in self.series if (m := _TAGGED_THRESHOLD.match(key))})

    def edge_view(self, tag: str) -> RunMetrics:
        """This run with the ``eos/<tag>/*`` and ``pf/<tag>/*`` metrics under the names the edge plots read
        (``eos/*``, ``pf/*``) in place of the unnamed monitor's; the other metrics (loss, rates) kept."""
        series = {k: v for k, v in self.series.items() if not k.startswith(("eos/", "pf/"))}
        for group in ("eos", "pf"):
            head = names.metric_name(group, "", tag)
            series.update(
                {f"{group}/{k.removeprefix(head)}": v for k, v in self.series.items() if k.startswith(head)}
            )
        return RunMetrics(f"{self.name} [{tag}]", self.source, self.kind, series, self.settings)


def _collect(rows: Iterable[tuple[int, str, float]]) -> dict[str, Series]:
    steps: dict[str, list[int]] = {}
    values: dict[str, list[float]] = {}
    for step, key, value in rows:
        steps.setdefault(key, []).append(step)
        values.setdefault(key, []).append(value)
    series = {k: (np.asarray(steps[k], dtype=np.int64), np.asarray(values[k], dtype=float)) for k in steps}
    return _without_logger_prefix(series)


def _without_logger_prefix(series: dict[str, Series]) -> dict[str, Series]:
    """The metrics of a logger made with ``prefix="train"`` (every name ``"train-..."``) under their own
    names, where no pf-lightning metric is logged without it and one prefix precedes them all."""
    if any(key.startswith(_PREFIXES) for key in series):
        return series
    found = {m.group(1) for key in series if (m := re.match(rf"(.+?)-(?:{'|'.join(names.PREFIXES)})/", key))}
    if len(found) != 1:
        return series
    head = f"{found.pop()}-"
    return {key.removeprefix(head): value for key, value in series.items()}


def read_csv_metrics(path: Path, progress: bool | None = None) -> dict[str, Series]:
    """The numeric columns of a CSVLogger ``metrics.csv``, against its ``step`` column.

    Args:
        path: the ``metrics.csv`` file.
        progress: show a progress bar (``None``: only on a terminal).
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))

    def cells() -> Iterable[tuple[int, str, float]]:
        for row in tqdm(
            rows, desc=f"reading {Path(path).name}", unit="row", disable=_off(progress), leave=False
        ):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for key, text in row.items():
                if key not in ("step", None) and text not in ("", None):
                    try:
                        yield step, key, float(text)
                    except ValueError:
                        continue

    return _collect(cells())


def read_wandb_metrics(path: Path, progress: bool | None = None) -> dict[str, Series]:
    """The numeric history of an offline W&B run, against ``trainer/global_step`` (Lightning's x-axis).

    Rows logged without it (``run.log`` outside Lightning) use W&B's own ``_step``. Tables, histograms
    and charts are left out. A file still being written is read up to its last complete record.

    Args:
        path: the ``run-*.wandb`` file.
        progress: show a progress bar (``None``: only on a terminal).
    """
    history = wandb_reader.history(path, strict=False)

    def cells() -> Iterable[tuple[int, str, float]]:
        for row in tqdm(
            history, desc=f"reading {Path(path).name}", unit="row", disable=_off(progress), leave=False
        ):
            step = row.get("trainer/global_step", row.get("_step"))
            if not _is_number(step):
                continue
            for key, value in row.items():
                if not key.startswith("_") and key != "trainer/global_step" and _is_number(value):
                    yield int(step), key, float(value)

    return _collect(cells())


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _off(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: disable=None hides the bar off a terminal


def find_runs(
    root: Path, source: Source = "auto", progress: bool | None = None, echo: Callable[[str], None] = print
) -> list[RunMetrics]:
    """Every run at or under ``root``: a ``metrics.csv``, a ``.wandb`` file, or folders holding them.

    Args:
        root: a run folder, a parent of several, or one ``metrics.csv`` / ``run-*.wandb`` file.
        source: ``"csv"`` or ``"wandb"`` to read only that kind; ``"auto"`` reads both.
        progress: show progress bars (``None``: only on a terminal).
        echo: where a skipped run's message goes (offline W&B runs without wandb installed).

    Raises:
        FileNotFoundError: nothing to read under ``root``.
        ModuleNotFoundError: only offline W&B runs there, and no wandb to read them.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    found: list[tuple[Path, Literal["csv", "wandb"], Path]] = []  # file, kind, the folder it names
    if source in ("auto", "csv"):
        csvs = [root] if root.is_file() and root.suffix == ".csv" else sorted(root.glob("**/metrics.csv"))
        found += [(p, "csv", p.parent) for p in csvs]
    if source in ("auto", "wandb"):
        for p in wandb_reader.find_run_files(root):
            owner = p.parent.parent.parent if p.parent.parent.name == "wandb" else p.parent
            found.append((p, "wandb", owner))
    if not found:
        kinds = {"auto": "metrics.csv or wandb/offline-run-*/run-*.wandb", "csv": "metrics.csv"}
        raise FileNotFoundError(f"no {kinds.get(source, 'run-*.wandb')} under {root}")
    base = root.parent if root.is_file() else root
    runs, missing_wandb = [], False
    for path, kind, owner in found:
        name = owner.relative_to(base).as_posix() if base in owner.parents else (base.resolve().name or "run")
        reader = read_csv_metrics if kind == "csv" else read_wandb_metrics
        try:
            series = reader(path, progress)
        except ModuleNotFoundError as err:  # wandb, an extra: the CSV runs beside it are still plotted
            if len(found) == 1:
                raise
            echo(f"skipped {path}: {err}")
            missing_wandb = True
            continue
        if not series:  # a process killed before its first record leaves a W&B file of a header alone
            echo(f"skipped {path}: it holds no metrics (a run stopped before it logged, or an empty log)")
            continue
        runs.append(RunMetrics(name, path, kind, series, read_settings(path, kind)))
    if not runs and missing_wandb:
        raise ModuleNotFoundError(
            f"no run under {root} could be read without wandb: pip install 'pf-lightning[wandb]'"
        )
    if not runs:
        raise FileNotFoundError(f"no metrics in the runs under {root}")
    runs = _merge_twins(runs)
    # Two runs named by one folder (repeated runs, or two loggers of runs that differ): say which is which.
    labels = [run.name for run in runs]  # (not `names`: that is the metric-name module here)
    for i, run in enumerate(runs):
        twins = [runs[j].kind for j, n in enumerate(labels) if n == labels[i]]
        if len(twins) > 1:
            run.name = (
                f"{labels[i]} ({run.kind if twins.count(run.kind) == 1 else f'{run.kind} {run.source.stem}'})"
            )
    return runs


def _same_run(a: RunMetrics, b: RunMetrics, cut: bool = False) -> bool:
    """Two logs of one run (a CSVLogger and a WandbLogger side by side): of different kinds, sharing
    pf-lightning metrics, and every shared metric (the loss and learning rate too) has the same steps
    and values (float32 round-off aside); with ``cut``, as far as the shorter log goes (a run killed
    mid-way leaves its loggers' files at different points: 326 and 324 measurements in an outside trial).
    Two runs of one kind are never one run."""
    shared = a.series.keys() & b.series.keys()

    def agree(x: Series, y: Series) -> bool:
        n = min(len(x[0]), len(y[0]))
        if not n or (not cut and len(x[0]) != len(y[0])):
            return False
        return np.array_equal(x[0][:n], y[0][:n]) and np.allclose(
            x[1][:n], y[1][:n], rtol=1e-6, atol=0, equal_nan=True
        )

    return (
        a.kind != b.kind
        and any(k.startswith(_PREFIXES) for k in shared)
        and all(agree(a.series[k], b.series[k]) for k in shared)
    )


def _merge_twins(runs: list[RunMetrics]) -> list[RunMetrics]:
    """One run per training run: logs of the same run by several loggers become one, with every metric
    any of them holds (the longer series where two hold one). Logs that agree only as far as the shorter
    goes are one run where they also have the same folder (the same name): two runs of one seed that differ
    only later (a longer run, a schedule's end) agree on their first steps."""
    merged: list[RunMetrics] = []
    for run in runs:
        twin = next((m for m in merged if _same_run(m, run)), None) or next(
            (m for m in merged if m.name == run.name and _same_run(m, run, cut=True)), None
        )
        if twin is None:
            merged.append(run)
            continue
        for key, series in run.series.items():
            if key not in twin.series or len(series[0]) > len(twin.series[key][0]):
                twin.series[key] = series
        twin.settings = twin.settings or run.settings
    return merged


def read_settings(path: Path, kind: Literal["csv", "wandb"]) -> dict:
    """The callbacks' settings a run logged (``pf_lightning`` in its hyperparameters): from the
    ``hparams.yaml`` beside a CSVLogger's ``metrics.csv``, or from an offline W&B run's config. Empty
    where there are none (a run logged without the callbacks, or by an older version)."""
    try:
        if kind == "csv":  # Lightning's own reader: hparams.yaml may hold tuples and other Python tags
            from lightning.pytorch.core.saving import load_hparams_from_yaml

            hparams = Path(path).with_name("hparams.yaml")
            logged = load_hparams_from_yaml(hparams, use_omegaconf=False) if hparams.is_file() else {}
        else:
            logged = wandb_reader.config(Path(path))
    except Exception:  # settings only annotate the report: a file it cannot read leaves them out
        return {}
    settings = (logged or {}).get(names.SETTINGS_KEY)
    if not isinstance(settings, Mapping):
        return {}
    return {str(key): dict(values) for key, values in settings.items() if isinstance(values, Mapping)}


# -- plots -------------------------------------------------------------------------------------
def _figure(rows: int, title: str) -> tuple[Figure, list]:
    figure = Figure(figsize=(8, 2.6 + 2.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without touching pyplot's global backend
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0].tolist()
    figure.suptitle(title)
    axes[-1].set_xlabel("step")
    return figure, axes


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def _spread(values: np.ndarray) -> bool:
    """Positive values spanning more than two decades read better on a log axis."""
    finite = values[np.isfinite(values)]
    return bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 100)


def _by_index(keys: Iterable[str], pattern: re.Pattern) -> list[str]:
    return sorted((k for k in keys if pattern.match(k)), key=lambda k: int(re.findall(r"\d+", k)[-1]))


def _steps(ax: Any, series: tuple[np.ndarray, np.ndarray], **style: Any) -> None:
    """A value that holds until it is next logged (a threshold, a learning rate, a count) as steps; a
    value logged once as a line across the panel, where steps would draw nothing."""
    steps, values = series
    if len(steps) == 1:
        ax.axhline(float(values[0]), **style)
    else:
        ax.plot(steps, values, drawstyle="steps-post", **style)


def plot_sharpness(run: RunMetrics, path: Path) -> Drawn | None:
    """``eos/sharpness`` against ``eos/threshold``, and their ratio (1.0 is the edge of stability); where
    logged, the batch sharpness with its standard-error band and its threshold, and the critical sharpness
    with its threshold 2/lr, in the same panels (their ratios against their own thresholds below)."""
    sharpness, threshold, ratio = (run.get(k) for k in (names.SHARPNESS, names.THRESHOLD, names.RATIO))
    if sharpness is None:
        return None
    preconditioned = run.get(names.PRECONDITIONED_SHARPNESS) is not None
    figure, (top, bottom) = _figure(2, f"{run.name}: sharpness against the stability threshold")
    label = "preconditioned sharpness λmax(P⁻¹H)" if preconditioned else "sharpness λmax(H)"
    top.plot(*sharpness, marker=".", label=label)
    drawn: Drawn = {names.SHARPNESS: sharpness}
    if threshold is not None:
        _steps(top, threshold, color="k", linestyle="--", label="threshold")
        drawn[names.THRESHOLD] = threshold
    batch, stderr = run.get(names.BATCH_SHARPNESS), run.get(names.BATCH_SHARPNESS_STDERR)
    if batch is not None:
        line = top.plot(*batch, marker=".", color="tab:green", label="batch sharpness (± 2 s.e.)")[0]
        drawn[names.BATCH_SHARPNESS] = batch
        if stderr is not None and np.array_equal(stderr[0], batch[0]):
            band = 2 * np.nan_to_num(stderr[1])
            top.fill_between(batch[0], batch[1] - band, batch[1] + band, color=line.get_color(), alpha=0.2)
            drawn[names.BATCH_SHARPNESS_STDERR] = stderr
        level = run.get(names.BATCH_THRESHOLD)
        if level is not None and (
            threshold is None or not np.allclose(level[1], np.interp(level[0], *threshold))
        ):
            _steps(top, level, color=line.get_color(), linestyle=":", label="batch threshold")
            drawn[names.BATCH_THRESHOLD] = level
    critical = run.get(names.CRITICAL_SHARPNESS)
    if critical is not None:
        top.plot(*critical, ".", color="tab:purple", markersize=3, label="critical sharpness 2/η_c")
        drawn[names.CRITICAL_SHARPNESS] = critical
        level = run.get(names.CRITICAL_THRESHOLD)  # 2/lr, its own level (absent from earlier versions' runs)
        if level is not None:
            _steps(top, level, color="tab:purple", linestyle=":", label="critical threshold 2/lr")
            drawn[names.CRITICAL_THRESHOLD] = level
    if _spread(np.concatenate([s[1] for key, s in drawn.items() if key != names.BATCH_SHARPNESS_STDERR])):
        top.set_yscale("log")
    top.set_ylabel("curvature")
    top.legend(loc="best")
    if ratio is not None:
        bottom.plot(*ratio, marker=".", color="tab:red", label="sharpness / threshold")
        drawn[names.RATIO] = ratio
    for key, color, text in (
        (names.BATCH_RATIO, "tab:green", "batch sharpness / its threshold"),
        (names.CRITICAL_RATIO, "tab:purple", "critical sharpness / (2/lr)"),
    ):
        series = run.get(key)
        if series is not None:
            bottom.plot(*series, "." if key == names.CRITICAL_RATIO else ".-", color=color, label=text)
            drawn[key] = series
    bottom.axhline(1.0, color="k", linestyle="--", linewidth=1)
    bottom.set_ylabel("ratio (1.0 is the edge)")
    if len(drawn.keys() & {names.RATIO, names.BATCH_RATIO, names.CRITICAL_RATIO}) > 1:
        bottom.legend(loc="best")
    _save(figure, path)
    return drawn


def plot_spectrum(run: RunMetrics, path: Path) -> Drawn | None:
    """The tracked eigenvalues over time: one panel per monitor (``hessian/eig_i``, ``hessian/<name>/eig_i``)."""
    groups: dict[str, list[str]] = {}
    for key in _by_index(run.series, _EIG):
        groups.setdefault(_EIG.match(key)["tag"] or "", []).append(key)
    if not groups:
        return None
    tags = sorted(groups, key=lambda t: (t != "", t))
    figure, axes = _figure(len(tags), f"{run.name}: Hessian spectrum over training")
    threshold = run.get(names.THRESHOLD)
    overlay = threshold is not None and run.get(names.PRECONDITIONED_SHARPNESS) is None
    drawn: Drawn = {}
    for ax, tag in zip(axes, tags, strict=True):
        for key in groups[tag]:
            match = _EIG.match(key)
            name = f"bottom {match['i']}" if match["bottom"] else f"λ{match['i']}"
            ax.plot(*run.series[key], marker=".", linestyle="--" if match["bottom"] else "-", label=name)
            drawn[key] = run.series[key]
        if tag == "" and overlay:
            _steps(ax, threshold, color="k", linestyle="--", label="stability threshold")
            drawn[names.THRESHOLD] = threshold
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"parameters of monitor {tag!r}" if tag else "all measured parameters", fontsize=10)
        ax.legend(loc="best", fontsize=8, ncols=2)
    _save(figure, path)
    return drawn


# pf/hlambda_i = hλᵢ with h = 2 / threshold: ηλᵢ under gradient descent, and 2 at the edge of every
# optimizer. The band at 1 is gradient descent's (Dherin et al. 2023); momentum oscillates earlier.
_REGIME_BANDS = (
    (-math.inf, 0.0, "tab:gray", "saddle (λ < 0)"),
    (0.0, 1.0, "tab:green", "stable; monotone under GD (hλ < 1)"),
    (1.0, 2.0, "tab:orange", "stable; oscillating under GD (1 < hλ < 2)"),
    (2.0, math.inf, "tab:red", "past the edge (hλ > 2)"),
)


def plot_regimes(run: RunMetrics, path: Path) -> Drawn | None:
    """Principal-flow regimes: ``pf/hlambda_i`` against the bands 0, 1, 2, and the unstable share."""
    keys = _by_index(run.series, _HLAMBDA)
    if not keys:
        return None
    counts = [k for k in (names.OSCILLATING_DIRECTIONS, names.UNSTABLE_DIRECTIONS) if k in run.series]
    fraction = run.get(names.UNSTABLE_GRAD_FRACTION)
    figure, axes = _figure(1 + bool(counts) + (fraction is not None), f"{run.name}: principal-flow regimes")
    top, drawn = axes[0], {}
    values = np.concatenate([run.series[k][1] for k in keys])
    low, high = min(-0.1, float(np.nanmin(values)) - 0.1), max(2.3, float(np.nanmax(values)) + 0.1)
    for lo, hi, color, label in _REGIME_BANDS:
        if max(lo, low) < min(hi, high):
            top.axhspan(max(lo, low), min(hi, high), color=color, alpha=0.12, label=label)
    for key in keys:
        top.plot(*run.series[key], marker=".", label=f"hλ{key.rsplit('_', 1)[1]}")
        drawn[key] = run.series[key]
    top.set_ylim(low, high)
    top.set_ylabel("hλᵢ = 2λᵢ / threshold (ηλᵢ under GD)")
    top.legend(loc="best", fontsize=7, ncols=2)
    panel = 1
    if counts:
        for key in counts:
            _steps(axes[panel], run.series[key], label=key.split("/")[1].replace("_", " "))
            drawn[key] = run.series[key]
        axes[panel].set_ylabel("directions")
        axes[panel].legend(loc="best", fontsize=8)
        panel += 1
    if fraction is not None:
        axes[panel].plot(*fraction, marker=".", color="tab:red")
        axes[panel].set_ylabel("unstable share of ‖g‖²")
        drawn[names.UNSTABLE_GRAD_FRACTION] = fraction
    _save(figure, path)
    return drawn


def constant_axis(values: np.ndarray) -> tuple[float, float] | None:
    """The y-range for a constant positive series, from 0 to a quarter above it (matplotlib would zoom
    onto ±5% of the one value, which reads as a varying one); ``None`` for anything else."""
    if values.size and np.all(values == values[0]) and values[0] > 0:
        return 0.0, 1.25 * float(values[0])
    return None


def plot_learning_rate(run: RunMetrics, path: Path) -> Drawn | None:
    """``lr-*`` (LearningRateMonitor), ``dal/lr`` and the cap's ``cap/lr`` with its base's ``cap/base_lr`` (the
    rates the steps ran at, logged at every step); the monitor's ``eos/lr``, sampled at its measurements, when
    none of them was logged."""
    keys = sorted(k for k in run.series if k.startswith("lr-")) + [
        k for k in (names.DAL_LR, names.CAP_LR, names.CAP_BASE_LR) if k in run.series
    ]
    keys = keys or [k for k in (names.EOS_LR,) if k in run.series]
    if not keys:
        return None
    figure, (ax,) = _figure(1, f"{run.name}: learning rate")
    drawn = {}
    for key in keys:
        values = run.series[key][1]
        constant = values.size and np.all(values == values[0])
        _steps(ax, run.series[key], label=f"{key} (constant {values[0]:.4g})" if constant else key)
        drawn[key] = run.series[key]
    everything = np.concatenate([s[1] for s in drawn.values()])
    if _spread(everything):
        ax.set_yscale("log")
    elif (limits := constant_axis(everything)) is not None:
        ax.set_ylim(*limits)
    ax.set_ylabel("learning rate")
    ax.legend(loc="best")
    _save(figure, path)
    return drawn


def plot_loss(run: RunMetrics, path: Path) -> Drawn | None:
    """Every logged loss (``train_loss``, ``val_loss``, ...), on a log axis when positive, with the step
    the edge of stability was first reached (``eos/first_edge_step``, and each named monitor's) marked."""
    keys = sorted(
        k
        for k in run.series
        if "loss" in k.rsplit("/", 1)[-1] and not k.startswith(_PREFIXES) and "epoch" not in k
    )
    if not keys:
        return None
    figure, (ax,) = _figure(1, f"{run.name}: loss")
    drawn = {}
    for key in keys:
        ax.plot(*run.series[key], label=key)
        drawn[key] = run.series[key]
    values = np.concatenate([s[1] for s in drawn.values()])
    if values.size and np.nanmin(values) > 0:
        ax.set_yscale("log")
    # The unnamed EdgeOfStabilityMonitor's first edge, then each named one's (eos/<name>/first_edge_step).
    marks = 0
    for tag in [None, *run.edge_tags()]:
        key = names.tag_name(names.FIRST_EDGE_STEP, tag)
        edge = run.get(key)
        if edge is None or not np.isfinite(edge[1]).any():
            continue
        step = edge[1][np.isfinite(edge[1])][0]
        ax.axvline(
            step,
            color=f"C{3 + marks}",  # tab:red first
            linestyle="--",
            linewidth=1,
            label=f"edge of stability reached{'' if tag is None else f' ({tag})'} (step {step:.0f})",
        )
        drawn[key] = edge
        marks += 1
    ax.set_ylabel("loss")
    ax.legend(loc="best")
    _save(figure, path)
    return drawn


_RESIDUAL = re.compile(rf"^hessian/(?:(?P<tag>.+)/)?{re.escape(names.RESIDUAL_MAX.split('/', 1)[1])}$")


def plot_measurement(run: RunMetrics, path: Path) -> Drawn | None:
    """How good each measurement was: the largest relative residual of its eigenpairs (log axis; a converged
    measurement's is below the monitor's ``tol``), its Hessian-vector products, and the trace where logged
    (``hessian/trace`` with ± 2 standard errors); one line per monitor."""
    tags = {m["tag"]: k for k in run.series if (m := _RESIDUAL.match(k))}
    if not tags:
        return None
    metric = names.tag_name
    traced = [tag for tag in tags if run.get(metric(names.TRACE, tag)) is not None]
    figure, axes = _figure(3 if traced else 2, f"{run.name}: measurement quality")
    drawn: Drawn = {}
    for tag, color in zip(tags, _colors(len(tags)), strict=True):
        label = tag or "unnamed monitor"
        for ax, name in ((axes[0], names.RESIDUAL_MAX), (axes[1], names.N_HVP)):
            series = run.get(metric(name, tag))
            if series is not None:
                ax.plot(*series, ".-", color=color, label=label)
                drawn[metric(name, tag)] = series
        if tag in traced:
            trace, std = run.get(metric(names.TRACE, tag)), run.get(metric(names.TRACE_STD, tag))
            axes[2].plot(*trace, ".-", color=color, label=label)
            drawn[metric(names.TRACE, tag)] = trace
            if std is not None and np.array_equal(std[0], trace[0]):
                axes[2].fill_between(
                    trace[0], trace[1] - 2 * std[1], trace[1] + 2 * std[1], color=color, alpha=0.2
                )
                drawn[metric(names.TRACE_STD, tag)] = std
    axes[0].set_yscale("log")
    axes[0].set_ylabel("largest relative residual")
    axes[1].set_ylabel("Hessian-vector products")
    if traced:
        axes[2].set_ylabel("trace (± 2 s.e.)")
    if len(tags) > 1:
        axes[0].legend(loc="best")
    _save(figure, path)
    return drawn


def plot_sharpness_across_runs(runs: list[RunMetrics], path: Path) -> Drawn | None:
    """Each run's sharpness (solid) and threshold (dashed, same colour): Cohen et al.'s first figure."""
    runs = [r for r in runs if r.get(names.SHARPNESS) is not None]
    if len(runs) < 2:
        return None
    figure, (top, bottom) = _figure(2, "sharpness against the stability threshold, by run")
    drawn: Drawn = {}
    for run, color in zip(runs, _colors(len(runs)), strict=True):
        threshold = run.get(names.THRESHOLD)
        label = run.name if threshold is None else f"{run.name} (threshold {threshold[1][-1]:.4g})"
        top.plot(*run.series[names.SHARPNESS], marker=".", color=color, label=label)
        drawn[f"{run.name}:{names.SHARPNESS}"] = run.series[names.SHARPNESS]
        if threshold is not None:
            _steps(top, threshold, color=color, linestyle="--")
            drawn[f"{run.name}:{names.THRESHOLD}"] = threshold
        if (ratio := run.get(names.RATIO)) is not None:
            bottom.plot(*ratio, marker=".", color=color, label=run.name)
            drawn[f"{run.name}:{names.RATIO}"] = ratio
    if _spread(np.concatenate([s[1] for k, s in drawn.items() if not k.endswith(names.RATIO)])):
        top.set_yscale("log")
    top.set_ylabel("sharpness (dashed: threshold)")
    top.legend(loc="best", fontsize=8)
    bottom.axhline(1.0, color="k", linestyle="--", linewidth=1)
    bottom.set_ylabel("sharpness / threshold")
    _save(figure, path)
    return drawn


def _folder_name(name: str) -> str:
    """A run's name as a folder name: ``lr_0.4``, ``lr_0.4_csv`` (no stray underscores)."""
    return re.sub(r"[^\w.=+-]+", "_", name).strip("_") or "run"


def _colors(n: int) -> list[str]:
    return [f"C{i % 10}" for i in range(n)]


PLOTS: dict[str, tuple[Callable[[RunMetrics, Path], Drawn | None], str]] = {
    "sharpness": (plot_sharpness, "no eos/sharpness (add EdgeOfStabilityMonitor)"),
    "spectrum": (plot_spectrum, "no hessian/eig_* (add HessianEigenMonitor)"),
    "regimes": (plot_regimes, "no pf/hlambda_* (add EdgeOfStabilityMonitor)"),
    "learning_rate": (plot_learning_rate, "no lr-* (LearningRateMonitor), dal/lr or eos/lr"),
    "loss": (plot_loss, "no metric named *loss*"),
    "measurement": (plot_measurement, "no hessian/residual_max (add HessianEigenMonitor)"),
}


_EDGE_PLOTS = ("sharpness", "regimes")  # the plots of one EdgeOfStabilityMonitor's metrics

_TABLE_COLUMNS = (
    names.SHARPNESS, names.THRESHOLD, names.RATIO, names.BATCH_SHARPNESS, names.BATCH_RATIO, names.CRITICAL_RATIO,
    names.RESIDUAL_MAX, names.N_HVP,
    names.metric_name("hessian", "skipped"), names.metric_name("hessian", "postponed"),  # a row where none ran
)  # fmt: skip


def _monitor_tags(run: RunMetrics) -> list[str | None]:
    """The Hessian monitors a run logged eigenvalues for: ``None`` for the unnamed one (first), then the
    names of the named ones (``hessian/<name>/eig_*``), in order."""
    tags = {m["tag"] for key in run.series if (m := _EIG.match(key))}
    return [None, *sorted(tags - {None})] if None in tags else sorted(tags)


def measurement_table(run: RunMetrics, tag: str | None = None) -> tuple[list[str], list[list[float]]]:
    """One row per step with a measurement: the top-k eigenvalues of the whole-Hessian monitor (the one
    named ``tag``), then the edge metrics and the measurement's quality where logged (``None`` where a
    metric was not logged at that step; a logged NaN stays NaN)."""
    eigs = _by_index(
        (k for k in run.series if (m := _EIG.match(k)) and m["tag"] == tag and not m["bottom"]), _EIG
    )
    columns = [*eigs, *(key for k in _TABLE_COLUMNS if (key := names.tag_name(k, tag)) in run.series)]
    if not columns:
        return [], []
    steps = sorted({int(step) for key in columns for step in run.series[key][0]})
    lookup = {
        key: dict(zip(run.series[key][0].tolist(), run.series[key][1].tolist(), strict=True))
        for key in columns
    }
    return ["step", *columns], [[step, *(lookup[key].get(step) for key in columns)] for step in steps]


def write_html(runs: list[RunMetrics], images: dict[str, list[Path]], path: Path) -> Path:
    """One self-contained page (plots inlined as PNG data): per run, its settings, its plots
    (``images[run.name]``) and a table of its measurements; ``images[""]``, plots of all runs, at the end.
    Opens in any browser without the files beside it."""
    import base64
    import html

    def cell(value: object) -> str:
        if value is None:
            return ""  # not logged at this step
        if isinstance(value, float):
            return f"{value:.6g}"  # nan and inf included: a failed measurement shows
        return html.escape(str(value))

    def figure(image: Path) -> str:
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        return f"<figure><img alt='{html.escape(image.stem)}' src='data:image/png;base64,{data}'></figure>"

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>pf-lightning report</title><style>",
        "body{font-family:sans-serif;margin:2em;color:#222} img{max-width:100%;border:1px solid #ddd}",
        "table{border-collapse:collapse;font-size:13px;margin:1em 0} td,th{border:1px solid #ccc;padding:2px 8px;",
        "text-align:right} th{background:#f3f3f3} h2{border-bottom:2px solid #ccc} .plots{display:flex;",
        "flex-wrap:wrap;gap:1em} .plots figure{margin:0;flex:1 1 560px}</style></head><body>",
        f"<h1>pf-lightning report</h1><p>{len(runs)} run(s).</p>",
    ]
    for run in runs:
        parts.append(
            f"<h2>{html.escape(run.name)}</h2><p>from <code>{html.escape(str(run.source))}</code></p>"
        )
        if run.settings:  # folded: the plots come first
            parts.append("<details><summary>settings of the callbacks</summary>")
            for callback, values in run.settings.items():
                rows = "".join(f"<tr><th>{cell(k)}</th><td>{cell(v)}</td></tr>" for k, v in values.items())
                parts.append(f"<h3>{cell(callback)}</h3><table>{rows}</table>")
            parts.append("</details>")
        parts.append(
            "<div class='plots'>" + "".join(figure(image) for image in images.get(run.name, [])) + "</div>"
        )
        for tag in _monitor_tags(run):  # one table per monitor: the unnamed one's, then each named one's
            header, rows = measurement_table(run, tag)
            if rows:
                head = "".join(f"<th>{cell(h)}</th>" for h in header)
                body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
                title = "Measurements" if tag is None else f"Measurements of {tag}"
                parts.append(f"<h3>{cell(title)}</h3><table><tr>{head}</tr>{body}</table>")
    if images.get(""):
        parts.append("<h2>All runs</h2><div class='plots'>" + "".join(map(figure, images[""])) + "</div>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


MANIFEST = ".pf-lightning-report"
"""In the output folder: the plots (and ``report.html``) the last report wrote there (paths relative to it,
one per line), so that the next removes those it does not write again, and nothing it did not write."""

PAGE = "report.html"
"""The page ``html=True`` writes into the output folder."""


def _stale_plots(out: Path, folders: set[Path], written: Collection[Path]) -> list[Path]:
    """The PNGs of an earlier report that this one did not write: those its manifest lists (a plot skipped
    this time, the folder of a run no longer there or of the one run left, whose plots go to the top), or,
    for a report written before manifests, those in ``out`` and the runs' ``folders`` named as this module
    names its plots (a single run's top-level plots after the folder gained a second run). Never another
    file, and nothing in a linked sub-folder."""
    names = {*PLOTS, "sharpness_runs"}

    def ours(path: Path) -> bool:
        stem = path.stem
        if path == out / PAGE:  # an earlier report's page, listed: it shows plots this one may not draw
            return True
        return path.suffix == ".png" and (stem in names or any(stem.startswith(f"{n}_") for n in _EDGE_PLOTS))

    candidates = set()
    manifest = out / MANIFEST
    if manifest.is_file():
        for line in manifest.read_text(encoding="utf-8").splitlines():
            if line and ".." not in Path(line).parts and not Path(line).is_absolute():
                candidates.add(out / line)
    else:  # an earlier report without a list: the plots named as ours where it wrote them
        for folder in {out, *folders}:
            candidates.update(sorted(folder.glob("*.png")) if folder.is_dir() else ())
    return sorted(
        path
        for path in candidates
        if ours(path)
        and path not in written
        and path.is_file()
        and not path.is_symlink()
        and not (path.parent != out and path.parent.is_symlink())
    )


def write_report(
    root: Path,
    out: Path | None = None,
    source: Source = "auto",
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
    html: bool = False,
) -> dict[Path, Drawn]:
    """Read every run under ``root`` and write its PNGs; returns what each written file shows.

    Args:
        root: a run folder, a parent of several runs, or one ``metrics.csv`` / ``run-*.wandb`` file.
        out: where the PNGs go (default ``<root>/plots``); with several runs, one sub-folder per run.
        source: ``"csv"``, ``"wandb"`` or ``"auto"`` (both).
        progress: show progress bars (``None``: only on a terminal).
        echo: where messages go (a skipped plot says why).
        html: also write ``report.html`` in ``out``: every plot, each run's settings and a table of its
            measurements on one self-contained page (:func:`write_html`).

    Raises:
        FileNotFoundError: no run under ``root``.
    """
    root = Path(root)
    out = Path(out) if out is not None else (root.parent if root.is_file() else root) / "plots"
    runs = find_runs(root, source, progress, echo)
    written: dict[Path, Drawn] = {}
    images: dict[str, list[Path]] = {}  # by run name; "" for the plots of all runs
    # The edge plots once more for each named EdgeOfStabilityMonitor (sharpness_<name>.png, regimes_<name>.png).
    tasks = [(run, name, "") for run in runs for name in PLOTS]
    tasks += [(run, name, tag) for run in runs for tag in run.edge_tags() for name in _EDGE_PLOTS]
    folders: dict[str, Path] = {}  # by run name; two names that clean to one folder get a suffix
    for run in runs:
        folder, n = (out, 1) if len(runs) == 1 else (out / _folder_name(run.name), 1)
        while folder in folders.values():
            n += 1
            folder = out / f"{_folder_name(run.name)}_{n}"
        folders[run.name] = folder
    for run, name, tag in tqdm(tasks, desc="plotting", unit="plot", disable=_off(progress)):
        folder = folders[run.name]
        plot, missing = PLOTS[name]
        path = folder / (f"{name}_{_folder_name(tag)}.png" if tag else f"{name}.png")
        view = run.edge_view(tag) if tag else run
        drawn = plot(view, path)
        if drawn is None and name in _EDGE_PLOTS:
            unnamed = any(k.startswith(("eos/", "pf/")) and not names.is_tagged(k) for k in run.series)
            if not tag and not unnamed and run.edge_tags():
                continue  # only named EdgeOfStabilityMonitors: their plots are drawn under their names
            if names.THRESHOLD in view.series:
                missing = "the EdgeOfStabilityMonitor logged no sharpness (each measurement in its warm-up, at learning rate 0 or skipped)"
        if drawn is None:
            echo(f"{run.name}: skipped {path.name}: {missing}")
        else:
            written[path] = drawn
            images.setdefault(run.name, []).append(path)
    if len(runs) > 1 and (drawn := plot_sharpness_across_runs(runs, out / "sharpness_runs.png")) is not None:
        written[out / "sharpness_runs.png"] = drawn
        images[""] = [out / "sharpness_runs.png"]
    for path in sorted(written):
        echo(f"wrote {path}")
    kept = {*written, *([out / PAGE] if html else [])}
    for path in _stale_plots(out, set(folders.values()), kept):
        path.unlink()
        echo(f"removed {path}: an earlier report's, which this one does not write there")
        if path.parent != out and not any(path.parent.iterdir()):
            path.parent.rmdir()  # the folder of a run the report no longer holds, emptied
    if written or out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        listed = sorted(path.relative_to(out).as_posix() for path in kept if path.is_relative_to(out))
        (out / MANIFEST).write_text("".join(f"{line}\n" for line in listed), encoding="utf-8")
    if html:
        out.mkdir(parents=True, exist_ok=True)
        echo(f"wrote {write_html(runs, images, out / PAGE)}")
    return written
