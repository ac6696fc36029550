"""Example 1: progressive sharpening and the edge of stability on sklearn digits (Cohen et al. 2021, fig. 1).

A tanh MLP 64-200-200-10 is trained on all 1797 digits with the squared error 0.5 * sum((out - onehot)**2)
by full-batch gradient descent, once for each learning rate η. HessianEigenMonitor measures the top
eigenvalues of the training-loss Hessian on the whole training set every ``--every`` steps and
EdgeOfStabilityMonitor compares the largest (the *sharpness*) with gradient descent's stability
threshold 2/η.

What to look for:
  * progressive sharpening: the sharpness starts near 4 and rises while the loss falls;
  * the edge of stability: it stops rising at 2/η (ratio 1.0) and hovers there, a few percent
    above, for the rest of the run: the larger η, the earlier and the lower;
  * the loss keeps falling over long spans but goes up on some single steps once at the edge;
  * in the regime plot, ηλ of the top directions sits at or just above 2 (oscillating divergence
    along those directions, which the network's nonlinearity keeps in check).

Measured on 2 CPU cores (defaults: lrs 0.4, 0.2, 0.1, 2500 steps, a measurement every 50, all
1797 images as the probe; 4-6 minutes): the sharpness starts at 3.97 in every run and reaches the edge
(ratio >= 0.95) at step 100 (lr 0.4), 300 (lr 0.2) and 1450 (lr 0.1, as in the reference set-up,
2/lr = 20 by step ~1650). After overshooting once (ratio 1.36 and 1.21), the ratio stays within
1.03-1.16 (lr 0.4, mean 1.06) and 1.00-1.08 (lr 0.2, mean 1.03) to the end, and 0.95-1.05 for lr 0.1
(mean 1.01). At the edge the loss rises on 40-46% of the single steps (13% for lr 0.1, at the edge only
late), yet falls from 0.62 to 0.014-0.024 overall.
``make demo`` runs a shorter version (lr 0.4 and 0.2, 600 steps) with W&B offline, then
``pf-lightning report`` draws the plots into demo_output/plots/.

    python examples/edge_of_stability.py                      # CSV logs under runs/edge_of_stability
    python examples/edge_of_stability.py --logger wandb       # offline W&B runs instead
    pf-lightning report runs/edge_of_stability                # PNG plots
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor
from pf_lightning.demos import DigitsDataModule, DigitsMLP, MeasurementTable, edge_summary


class LossRecorder(L.Callback):
    """Keeps the training loss of every optimizer step (to count the steps where it went up)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def make_loggers(kind: str, out: Path, name: str, project: str = "pf-lightning-examples") -> list[Logger]:
    """A CSVLogger writing ``out/name/metrics.csv`` and/or an offline W&B run under ``out/name/wandb``."""
    loggers: list[Logger] = []
    if kind in ("csv", "both"):
        loggers.append(CSVLogger(out, name=name, version=""))
        # Its writer now, while the folder is new: after W&B's folder inside it, the CSVLogger warned that
        # the folder "exists and is not empty" on every fresh run.
        loggers[-1].experiment  # noqa: B018
    if kind in ("wandb", "both"):
        (out / name).mkdir(parents=True, exist_ok=True)
        # offline: no key, no network; `wandb sync` uploads the run later.
        loggers.append(WandbLogger(save_dir=out / name, name=name, project=project, offline=True))
    return loggers


def finish_wandb(loggers: list[Logger]) -> None:
    """Close the W&B run, so that the next run of the script's loop starts a new one."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def summarize(name: str, eos: EdgeOfStabilityMonitor, recorder: LossRecorder, seconds: float) -> str:
    """One paragraph: where the edge was reached, how the ratio behaved after, how the loss moved."""
    s = edge_summary(eos)
    threshold = eos.history[-1]["eos/threshold"] if eos.history else math.nan
    losses = recorder.losses
    text = (
        f"{name}: threshold {threshold:.4g}, ratio sharpness/threshold {s['initial_ratio']:.2f} at the start"
    )
    if math.isnan(s["first_step"]):
        text += f", {s['final_ratio']:.2f} at the end: the edge was not reached in this run"
    else:
        first = int(s["first_step"])
        after = losses[first:]
        ups = sum(b > a for a, b in itertools.pairwise(after)) / max(len(after) - 1, 1)
        text += (
            f"; edge (ratio >= 0.95) first reached at step {first}, then ratio {s['ratio_min']:.3f}-"
            f"{s['ratio_max']:.3f} (mean {s['ratio_mean']:.3f}) over {int(s['measurements'])} measurements; "
            f"loss rose on {100 * ups:.1f}% of the steps after it"
        )
    if losses:
        text += f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    return text + f"; {seconds:.0f} s"


def run(lr: float, args: argparse.Namespace) -> str:
    """Train at learning rate ``lr`` with the monitors attached; returns the summary line."""
    name = f"lr_{lr:g}"
    model = DigitsMLP(hidden=(200, 200), loss="mse", optimizer=functools.partial(torch.optim.SGD, lr=lr))
    hessian = HessianEigenMonitor(k=args.k, every_n_steps=args.every, probe=1797)  # all 1797 samples
    eos = EdgeOfStabilityMonitor()
    recorder = LossRecorder()
    loggers = make_loggers(args.logger, args.out, name)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=loggers,
        callbacks=[hessian, eos, LearningRateMonitor("step"), recorder, MeasurementTable(k=args.k)],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    print(f"\n== full-batch gradient descent, lr {lr:g}: threshold 2/lr = {2 / lr:.4g} ==")
    start = time.perf_counter()
    try:
        trainer.fit(model, DigitsDataModule())
    finally:
        finish_wandb(loggers)
    return summarize(f"lr {lr:g}", eos, recorder, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.4, 0.2, 0.1], help="learning rates")
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps per run")
    parser.add_argument("--every", type=int, default=50, help="measure every this many steps")
    parser.add_argument("--k", type=int, default=3, help="eigenvalues tracked")
    parser.add_argument("--out", type=Path, default=Path("runs/edge_of_stability"), help="log folder")
    parser.add_argument("--logger", choices=("csv", "wandb", "both"), default="csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    summaries = [run(lr, args) for lr in args.lrs]
    print("\nSummary (the sharpness should settle at ratio ~1.0, i.e. at 2/lr, and stay there):")
    for line in summaries:
        print(f"  {line}")
    print(f"\nLogs in {args.out}/; plots: pf-lightning report {args.out}")


if __name__ == "__main__":
    main()
