"""DAL-p and the sharpness cap on sklearn digits: the stability/performance trade-off, measured.

Dherin et al. (2023) propose DAL-p, the step h = min(2 / v^p, max_lr) with v = ||Hg||/||g|| on the
current batch, as a knob between stability and performance; a sharpness cap keeps the step at a
fraction of the stability edge 2/lambda_max instead. This script trains a tanh MLP (64-128-128-10,
cross-entropy) on 1397 of the 1797 digits and keeps 400 held out, full-batch and with mini-batches of
64, through Lightning with ``LRAdaptation`` installing the scheduler, for

- a fixed rate (p = 0: DAL leaves the base rate 0.1),
- DAL-p for p in {0.5, 1, 2} and max_lr in {1, 5},
- a cap at fraction in {0.5, 0.9, 1.5} of the edge rate 2/lambda_max on a base rate of 8.0, far
  above the edge, so the cap is what decides (lambda_max measured every 10 steps on 512 samples),

over several seeds, and reports training stability (the fraction of loss increases and the largest
relative loss spike, on the full-batch training loss) against held-out accuracy, as mean and
standard deviation over the seeds. It also reports where each DAL run sat: the median v, and how often
the rate was clipped at max_lr (which happens when v^p < 2 / max_lr).

What to look for: a larger p lowers the rate when v > 1 and raises it when v < 1; once v is small the
rate sits at max_lr and p stops mattering, so max_lr becomes the knob. The cap trades stability
(fraction < 1) against speed (fraction > 1).

Run: ``python examples/dal_sweep.py`` (about 10 minutes on 2 CPU cores; ``--quick`` for one seed and
fewer steps); ``--out BENCHMARKS.md`` writes the table into that file between ``<!-- dal:start/end -->``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback

from pf_lightning import (
    DriftAdaptiveLR,
    EdgeOfStabilityMonitor,
    HessianEigenMonitor,
    LRAdaptation,
    SharpnessCappedLR,
)
from pf_lightning.demos.digits import DigitsMLP, load_digits_tensors, tensor_loader

HELD_OUT = 400
BASE_LR = 0.1
CAP_BASE_LR = 8.0


def configurations(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, settings) for every run of the sweep."""
    runs: list[tuple[str, dict[str, Any]]] = [("fixed lr 0.1 (p = 0)", {"lr": BASE_LR})]
    for max_lr in (1.0, 5.0):
        for p in (0.5, 1.0, 2.0):
            runs.append(
                (f"DAL p={p:g}, max_lr={max_lr:g}", {"lr": BASE_LR, "dal": {"p": p, "max_lr": max_lr}})
            )
    for fraction in (0.5, 0.9, 1.5):
        runs.append(
            (f"cap {fraction:g} x edge, base lr {CAP_BASE_LR:g}", {"lr": CAP_BASE_LR, "cap": fraction})
        )
    return runs[::3] if quick else runs


class Recorder(Callback):
    """The full training loss every ``every`` steps, the rate and DAL's v at every step."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, every: int) -> None:
        self.x, self.y, self.every = x, y, every
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.v: list[float] = []

    def _train_loss(self, module: DigitsMLP) -> float:
        with torch.no_grad():
            return float(module.loss((self.x, self.y)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
        if step % self.every == 0:
            self.losses.append(self._train_loss(pl_module))
        v = trainer.callback_metrics.get("dal/hg_ratio")
        if v is not None:
            self.v.append(float(v))

    def on_train_end(self, trainer, pl_module) -> None:
        self.losses.append(self._train_loss(pl_module))


def run_one(settings: dict[str, Any], seed: int, steps: int, batch_size: int | None) -> dict[str, float]:
    x, y = load_digits_tensors()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))  # one split for all runs
    train, held = order[HELD_OUT:], order[:HELD_OUT]
    L.seed_everything(seed, verbose=False)
    model = DigitsMLP(
        hidden=(128, 128),
        loss="cross_entropy",
        optimizer=functools.partial(torch.optim.SGD, lr=settings["lr"]),
        seed=seed,
    )
    recorder = Recorder(x[train], y[train], every=1 if batch_size is None else 5)
    callbacks: list[Callback] = [recorder]
    if "dal" in settings:
        callbacks.append(LRAdaptation(functools.partial(DriftAdaptiveLR, **settings["dal"])))
    if "cap" in settings:
        callbacks += [
            LRAdaptation(functools.partial(SharpnessCappedLR, fraction=settings["cap"])),
            HessianEigenMonitor(k=1, every_n_steps=10, probe=512),
            EdgeOfStabilityMonitor(),
        ]
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the EoS monitor's edge warnings are the point of the cap runs
        trainer = L.Trainer(
            default_root_dir=root,
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        trainer.fit(model, train_dataloaders=tensor_loader((x[train], y[train]), batch_size))
    with torch.no_grad():
        accuracy = float((model(x[held]).argmax(1) == y[held]).float().mean())
    losses = recorder.losses
    changes = [b / a - 1.0 for a, b in itertools.pairwise(losses)]
    finite = all(math.isfinite(loss) for loss in losses)
    result = {
        "accuracy": accuracy,
        "final_loss": losses[-1] if finite else math.inf,
        "increases": sum(c > 0 for c in changes) / len(changes) if finite else math.nan,
        "spike": max(0.0, *changes) if finite else math.inf,
        "median_lr": statistics.median(recorder.lrs),
    }
    if "dal" in settings and recorder.v:
        max_lr = settings["dal"]["max_lr"]
        result["median_v"] = statistics.median(recorder.v)
        result["at_max_lr"] = sum(lr >= max_lr * (1 - 1e-6) for lr in recorder.lrs) / len(recorder.lrs)
    return result


def summarize(values: list[float], digits: int = 3) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"diverged in {len(values) - len(finite)}/{len(values)}"
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{statistics.mean(values):.{digits}g} ± {statistics.stdev(values):.1g}"


def markdown(
    table: dict[str, list[tuple[str, list[dict[str, float]]]]], seeds: int, steps: int, command: str
) -> str:
    lines = [
        "## DAL-p and the sharpness cap on digits: stability against held-out accuracy",
        "",
        f"Command: `{command}` ({seeds} seed(s), {steps} steps each; mean ± standard deviation over the seeds).",
        "tanh MLP 64-128-128-10, cross-entropy, 1397 training digits, 400 held out; SGD without momentum.",
        "*Loss increases* and *largest spike* are measured on the full training loss (every step for",
        "full batch, every 5 steps for mini-batches); the spike is the largest relative increase",
        "L_{t+1}/L_t − 1. *median v* is DAL's ||Hg||/||g||; *at max_lr* is the fraction of steps whose",
        "rate was clipped at max_lr.",
        "",
    ]
    for regime, rows in table.items():
        lines += [
            f"### {regime}",
            "",
            "| run | held-out acc. | final train loss | loss increases | largest spike | median lr | median v | at max_lr |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, results in rows:

            def col(key: str, digits: int = 3, results=results) -> str:
                values = [r[key] for r in results if key in r]
                return summarize(values, digits) if values else "–"

            lines.append(
                f"| {label} | {col('accuracy')} | {col('final_loss')} | {col('increases', 2)} | {col('spike', 2)} "
                f"| {col('median_lr')} | {col('median_v')} | {col('at_max_lr', 2)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="one seed, 100 steps, a third of the runs")
    parser.add_argument("--out", type=Path, default=None, help="write the table into this markdown file")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    seeds, steps = (1, 100) if args.quick else (args.seeds, args.steps)
    torch.set_num_threads(args.threads)
    table: dict[str, list[tuple[str, list[dict[str, float]]]]] = {}
    start = time.perf_counter()
    for regime, batch_size in (("Full batch", None), ("Mini-batches of 64", 64)):
        rows = []
        for label, settings in configurations(args.quick):
            results = [run_one(settings, seed, steps, batch_size) for seed in range(seeds)]
            rows.append((label, results))
            accuracy = summarize([r["accuracy"] for r in results])
            print(
                f"[{time.perf_counter() - start:6.0f}s] {regime:>18} | {label:<34} | held-out acc {accuracy}"
            )
        table[regime] = rows
    command = "python examples/dal_sweep.py" + (
        " --quick" if args.quick else f" --seeds {seeds} --steps {steps}"
    )
    body = markdown(table, seeds, steps, command)
    print(body)
    if args.out is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from benchmarks.report import rewrite

        rewrite(args.out, "dal", body)


if __name__ == "__main__":
    main()
