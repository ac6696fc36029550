"""Wall-time overhead of HessianEigenMonitor + EdgeOfStabilityMonitor on a Lightning run.

Interleaved fits of the same model with and without both monitors (default settings, every 100 steps),
medians over repeats, ratio measured in one run. Two regimes: full-batch gradient descent on sklearn
digits (the edge-of-stability setting; the digits MLP 64-200-200-10) and mini-batches of 128. Batches
are served whole (a batch sampler over a TensorDataset), so the baseline is the training itself, not
per-sample collation (which made a full-batch step three times slower and the overhead look smaller).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import rewrite

ACCELERATOR = "cpu"  # --accelerator gpu: the same comparison on a CUDA device (section "overhead-gpu")


class DigitsMLP(L.LightningModule):
    def __init__(self, batch_size: int | None, lr: float = 0.2) -> None:
        super().__init__()
        self.batch_size, self.lr = batch_size, lr
        self.net = nn.Sequential(
            nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 10)
        )
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32)
        self.x, self.y = (x - x.mean(0)) / x.std(0).clamp_min(1e-6), torch.tensor(y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((self.net(x) - F.one_hot(y, 10).float()) ** 2).sum(1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        dataset = TensorDataset(self.x, self.y)
        order = RandomSampler(dataset) if self.batch_size else SequentialSampler(dataset)
        batches = BatchSampler(order, self.batch_size or len(dataset), drop_last=False)
        return DataLoader(dataset, sampler=batches, batch_size=None)  # one indexing per batch


def fit_seconds(
    batch_size: int | None, steps: int, monitored: bool, every: int, settings: dict | None = None
) -> tuple[float, float, list[int], float]:
    L.seed_everything(0, verbose=False)
    model = DigitsMLP(batch_size)
    monitor = HessianEigenMonitor(every_n_steps=every, **(settings or {}))
    callbacks = [monitor, EdgeOfStabilityMonitor()] if monitored else []
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            default_root_dir=root,
            accelerator=ACCELERATOR,
            devices=1,
            max_steps=steps,
            logger=L.pytorch.loggers.CSVLogger(root),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        start = time.perf_counter()
        trainer.fit(model)
        seconds = time.perf_counter() - start
    measuring = monitor.measuring_seconds if monitored else 0.0  # whole measurements, listeners included
    hvps = statistics.mean(h["n_hvp"] for h in monitor.history) if monitored and monitor.history else 0.0
    return seconds, measuring, [h["step"] for h in monitor.history] if monitored else [], hvps


def run(steps: int, repeats: int, every: int) -> list[dict]:
    rows = []
    # The capped runs are 4x longer: the budget then has room for more than the cold first measurement,
    # and the table shows the interval it settles on.
    regimes = [
        ("full batch (1797)", None, {}, steps),
        ("full batch (1797), k=1", None, {"k": 1}, steps),
        ("full batch (1797), probe=128", None, {"probe": 128}, steps),
        ("full batch (1797), max_work_fraction=0.05", None, {"max_work_fraction": 0.05}, 4 * steps),
        ("full batch (1797), max_time_fraction=0.05", None, {"max_time_fraction": 0.05}, 4 * steps),
        ("mini-batch 128", 128, {}, steps),
        ("mini-batch 128, max_work_fraction=0.05", 128, {"max_work_fraction": 0.05}, 4 * steps),
        ("mini-batch 128, max_time_fraction=0.05", 128, {"max_time_fraction": 0.05}, 4 * steps),
    ]
    for label, batch_size, settings, n_steps in regimes:
        plain, monitored, measuring, schedules, hvps = [], [], [], [], []
        for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
            plain.append(fit_seconds(batch_size, n_steps, False, every)[0])
            seconds, inside, schedule, mean_hvp = fit_seconds(batch_size, n_steps, True, every, settings)
            hvps.append(mean_hvp)
            monitored.append(seconds)
            measuring.append(inside)
            schedules.append(schedule)
        base, with_monitors = statistics.median(plain), statistics.median(monitored)
        median_run = sorted(range(repeats), key=lambda i: monitored[i])[(repeats - 1) // 2]  # odd: the median
        rows.append(
            {
                "regime": label,
                "steps": n_steps,
                "plain": base,
                "monitored": with_monitors,
                "overhead": with_monitors / base - 1,
                "measuring": statistics.median(measuring),
                # Measuring time over the rest of the same fit: immune to the machine's drift between fits.
                "in_run": statistics.median(m / (s - m) for m, s in zip(measuring, monitored, strict=True)),
                "measurements": statistics.median(len(s) for s in schedules),
                "schedule": schedules[median_run],
                "reproducible": all(s == schedules[0] for s in schedules),
                "hvps": statistics.median(hvps),
                "spread": (min(plain), max(plain), min(monitored), max(monitored)),
            }
        )
    return rows


def _schedule(steps: list[int], every: int) -> str:
    """``0, 100, ..., 1000`` for the full cadence; the steps themselves when the budget thinned it."""
    if len(steps) > 3 and all(b - a == every for a, b in itertools.pairwise(steps)):
        return f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
    return ", ".join(str(s) for s in steps)


def markdown(rows: list[dict], steps: int, repeats: int, every: int, command: str) -> str:
    lines = [
        "## Training overhead of the monitors",
        "",
        f"Run: `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
        f"{_device()}. {steps} optimizer steps ({4 * steps} with a work or time cap) of the digits MLP "
        f"(64-200-200-10, tanh, squared error, SGD lr 0.2), with and without "
        f"`HessianEigenMonitor(every_n_steps={every})` + `EdgeOfStabilityMonitor()` at their defaults (k = 5, "
        f"512 probe samples, tol 1e-3, warm starts, measured at fit start and end too); median wall time of "
        f"`trainer.fit` over {repeats} interleaved repeats (range in parentheses). *Measuring* is the wall time of the measurements "
        f"(listeners included), and *in-run* that time over the rest of the same fit (the overhead "
        f"estimate that fits on a loaded machine cannot blur; `max_time_fraction` caps it, `max_work_fraction` "
        f"caps the work of measuring against the work of training, in sample-gradients). Load average "
        f"at the end: {os.getloadavg()[0]:.2f}.",
        "",
        "| regime | steps | without (s) | with both monitors (s) | overhead | measured at steps "
        "| same steps in every repeat | HVPs each | measuring (s) | in-run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['regime']} | {r['steps']} | {r['plain']:.2f} ({r['spread'][0]:.2f}–{r['spread'][1]:.2f}) "
            f"| {r['monitored']:.2f} ({r['spread'][2]:.2f}–{r['spread'][3]:.2f}) "
            f"| **{100 * r['overhead']:+.1f}%** | {_schedule(r['schedule'], every)} "
            f"| {'yes' if r['reproducible'] else 'no'} | {r['hvps']:.0f} "
            f"| {r['measuring']:.2f} | {100 * r['in_run']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def _device() -> str:
    if ACCELERATOR == "gpu":
        return f"one {torch.cuda.get_device_name(0)}"
    return f"{torch.get_num_threads()} CPU threads"


def main() -> None:
    global ACCELERATOR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="rewrite the overhead section of this file")
    args = parser.parse_args()
    ACCELERATOR = args.accelerator
    torch.set_num_threads(2)
    rows = run(args.steps, args.repeats, args.every)
    command = (
        f"python benchmarks/overhead.py --steps {args.steps} --repeats {args.repeats} --every {args.every}"
        + (" --accelerator gpu" if args.accelerator == "gpu" else "")
    )
    body = markdown(rows, args.steps, args.repeats, args.every, command)
    print(body)
    if args.out is not None:
        rewrite(args.out, "overhead" if args.accelerator == "cpu" else "overhead-gpu", body)


if __name__ == "__main__":
    main()
