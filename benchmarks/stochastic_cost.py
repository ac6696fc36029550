"""What the stochastic-edge signals cost next to a training step and to the eigensolver.

The digits MLP (64-200-200-10, tanh, squared error, SGD lr 0.2 with momentum 0.9) at mini-batches of 32
and 128. For each batch size, interleaved over ``--repeats`` rounds (medians, ranges in brackets):

- one training step (forward, backward, optimizer step) on one mini-batch: the unit;
- one batch-sharpness measurement as the EoS monitor takes it by default (20 fresh batches drawn like
  the training batches, one gradient and one HVP each, or fewer once the standard error is 2%);
- one critical-sharpness measurement along SGD's next update on one batch (one gradient, then forward
  passes only);
- one top-1 and one top-5 eigen-measurement on the default 512-sample probe (tol 1e-3, cold start).

Usage: ``python benchmarks/stochastic_cost.py --out BENCHMARKS.md`` (about 2 minutes on 2 CPU threads).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset, default_collate  # noqa: E402

from benchmarks.report import rewrite  # noqa: E402
from pf_lightning import batch_sharpness, critical_sharpness, hessian_eigenpairs  # noqa: E402
from pf_lightning.callbacks._probe import TrainingBatches  # noqa: E402

BATCH_SIZES = (32, 128)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return 0.5 * ((model(batch[0]) - F.one_hot(batch[1], 10).float()) ** 2).sum(1).mean()


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x, y = (x - x.mean(0)) / x.std(0).clamp_min(1e-6), torch.tensor(y)
    net = nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    source = TrainingBatches(TensorDataset(x, y), default_collate, batch_size)
    train = source.draw(10**9, seed=1)
    for _ in range(200):  # off the initialization: a trained state, momentum buffers filled
        optimizer.zero_grad()
        _loss(net, next(train)).backward()
        optimizer.step()
    probe = [(x[:512], y[:512])]
    batch = next(train)

    def step():
        optimizer.zero_grad()
        _loss(net, next(train)).backward()
        optimizer.step()

    times: dict[str, list[float]] = {k: [] for k in ("step", "batch", "critical", "top1", "top5")}
    counts: dict[str, list[float]] = {"batches": [], "hvp_batch": [], "forward": [], "hvp1": [], "hvp5": []}
    for round_ in range(repeats):
        # A step moves the model: take a few, then measure all at the same parameters.
        for _ in range(5):
            seconds, _ = _timed(step)
            times["step"].append(seconds)
        seconds, bs = _timed(
            lambda round_=round_: batch_sharpness(
                net, _loss, source.draw(20, seed=round_), rel_stderr=0.02, max_batches=20, optimizer=optimizer
            )
        )
        times["batch"].append(seconds)
        counts["batches"].append(bs.n_batches)
        counts["hvp_batch"].append(bs.n_hvp)
        seconds, cs = _timed(
            lambda: critical_sharpness(net, _loss, [batch], initial_step=0.2, optimizer=optimizer)
        )
        times["critical"].append(seconds)
        counts["forward"].append(cs.n_forward)
        for k, key in ((1, "top1"), (5, "top5")):
            seconds, result = _timed(lambda k=k: hessian_eigenpairs(net, _loss, probe, k=k, tol=1e-3))
            times[key].append(seconds)
            counts[f"hvp{k}"].append(result.n_hvp)
    unit = statistics.median(times["step"])
    return {
        "batch_size": batch_size,
        "step_ms": 1e3 * unit,
        "ratios": {key: [t / unit for t in values] for key, values in times.items() if key != "step"},
        "counts": {key: statistics.median(values) for key, values in counts.items()},
        "batches": (min(counts["batches"]), max(counts["batches"])),
    }


def markdown(results: list[dict], command: str, repeats: int) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f}× ({min(values):.1f}–{max(values):.1f})"

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    lines = [
        "## The stochastic edge: what batch and critical sharpness cost",
        "",
        f"Run: `{command}` on {now}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; load "
        f"average {load:.2f} at the end. Digits MLP 64-200-200-10 (55k parameters, tanh, squared error), SGD "
        "lr 0.2 with momentum 0.9, after 200 steps. Each cost is a multiple of one training step on one "
        f"mini-batch (forward, backward, optimizer step); medians over {repeats} interleaved rounds (range).",
        "",
        "| batch | training step | batch sharpness (default: ≤ 20 batches, 2% s.e.) | critical sharpness (one batch) | top-1 eigenpair (512 probe) | top-5 eigenpairs (512 probe) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        c, q = r["counts"], r["ratios"]
        lines.append(
            f"| {r['batch_size']} | {r['step_ms']:.2f} ms | {cell(q['batch'])}: {c['batches']:.0f} batches "
            f"({r['batches'][0]:.0f}–{r['batches'][1]:.0f}), "
            f"{c['hvp_batch']:.0f} HVPs | {cell(q['critical'])}: 1 gradient, {c['forward']:.0f} forward passes "
            f"| {cell(q['top1'])}: {c['hvp1']:.0f} HVPs | {cell(q['top5'])}: {c['hvp5']:.0f} HVPs |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="rewrite the stochastic section of this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    results = [measure(b, args.repeats) for b in BATCH_SIZES]
    body = markdown(results, f"python benchmarks/stochastic_cost.py --repeats {args.repeats}", args.repeats)
    print(body)
    if args.out is not None:
        rewrite(args.out, "stochastic", body)


if __name__ == "__main__":
    main()
