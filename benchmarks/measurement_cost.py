"""What one measurement costs against its floor, and what warm starts save along a run.

Two tables, written to BENCHMARKS.md with ``--out`` (section "measurement-cost"):

- **The floor.** One cold top-5 measurement (``hessian_eigenpairs``, ``hvp="auto"``, tol 1e-3) on each
  benchmark model (``benchmarks/models.py``: the digits MLP and CNN, the small transformer classifier,
  the Llama-style LM): its products against the ideal count (Lanczos with full reorthogonalization and
  a basis large enough never to restart, same start vector, tested from the k-th product: a cold start
  tests from the 20th), and its seconds per product against one
  exact product through the cached gradient graph on the same probe (the graph already built), the two
  timed in alternation: the time of everything else a measurement does (graph build, the solver's linear
  algebra, Python) spread over its products.
- **Warm starts along a run.** Full-batch GD (lr 0.2) on the digits MLP from step 300, measuring the
  top-k every 1, 5 or 100 steps, 12 measurements: the mean products of a cold start, of Lanczos from the
  sum of the previous eigenvectors (``method="lanczos"``), and of ``method="auto"`` (a block restart
  from the previous eigenvectors and their neighbours, or Lanczos from the sum of both, whichever was
  cheaper last), with the sequence of its choices, and how far each warm start's eigenvalues came from
  the cold one's; and the products of a warm start where nothing moved.

Usage: ``python benchmarks/measurement_cost.py --out BENCHMARKS.md`` (about 8 minutes on 2 CPU threads);
``--split mlp`` only prints where one measurement's time goes on that model (its products, the first one
with the graph build, and the rest); ``--stacking mlp`` what the once-per-fit check that a stacked probe
keeps the loss costs there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.models import MODELS, make_bench
from benchmarks.report import rewrite
from pf_lightning import hessian_eigenpairs
from pf_lightning.curvature import HessianOperator
from pf_lightning.linalg import lanczos


def _cached_product(bench, probe: list, n: int, v: torch.Tensor, clock=time.perf_counter) -> float:
    """Seconds of one exact product through the cached gradient graph: ``n`` in a row, the graph built
    first by one more."""
    with HessianOperator(bench.model, bench.loss_fn, probe, hvp="double_backward") as op:
        v = v.to(op.device, op.dtype)
        op.matvec(v)  # builds the graph
        start = clock()
        for _ in range(n):
            op.matvec(v)
        return (clock() - start) / n


def floor_row(name: str, k: int = 5, budget: float = 20.0, device: str = "cpu") -> dict:
    """One model's floor: the measurement and the cached product timed in alternation (this machine's speed
    drifts within seconds: a ratio of medians timed apart swung from 1.0 to 1.9), in as many rounds as fit
    ``budget`` seconds, 7 to 41. Reported: the median and range of the rounds' ratios, and the ratio of the
    fastest measurement to the fastest product (slowdowns from outside only add time: with many rounds the
    fastest of each is the least disturbed). On a CUDA ``device`` each time is read after synchronizing."""
    bench = make_bench(name).to(device)
    probe = [bench.probe]

    def clock() -> float:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def measure():
        return hessian_eigenpairs(bench.model, bench.loss_fn, probe, k=k, tol=1e-3)

    start = clock()
    result = measure()
    rounds = min(41, max(7, round(budget / (2 * (clock() - start)))))
    with HessianOperator(bench.model, bench.loss_fn, probe, hvp="double_backward") as op:
        ideal = lanczos(op, k, tol=1e-3, basis_size=min(op.n, 400), first_test=k)
    v = torch.randn(ideal.eigenvectors.shape[0], generator=torch.Generator().manual_seed(0))
    seconds, products = [], []
    for _ in range(rounds):
        start = clock()
        measure()
        seconds.append(clock() - start)
        products.append(_cached_product(bench, probe, result.n_hvp, v, clock))
    ratios = [s / result.n_hvp / p for s, p in zip(seconds, products, strict=True)]
    row = {
        "model": name,
        "params": bench.n_params,
        "probe": len(bench.probe[0]),
        "n_hvp": result.n_hvp,
        "ideal": ideal.n_hvp,
        "seconds": statistics.median(seconds),
        "per_product": statistics.median(seconds) / result.n_hvp,
        "product": statistics.median(products),
        "ratio": statistics.median(ratios),
        "ratio_range": (min(ratios), max(ratios)),
        "rounds": rounds,
        "best_ratio": min(seconds) / result.n_hvp / min(products),
    }
    print(row, flush=True)
    return row


def split_row(name: str, k: int = 5, rounds: int = 25) -> dict:
    """Where one measurement's time goes on the CPU: its first product (which builds the gradient graph), its
    other products, and everything else (set-up, the solver's work between products, the result); medians
    over ``rounds`` measurements, each followed by as many cached-graph products in a row for comparison.
    The operator's products are timed by wrapping ``HessianOperator._matmat`` for the duration."""
    bench = make_bench(name)
    probe = [bench.probe]
    matmat, products = HessianOperator._matmat, []
    v = torch.randn(bench.n_params, generator=torch.Generator().manual_seed(0))

    def timed(op: HessianOperator, X: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = matmat(op, X)
        products.append(time.perf_counter() - start)
        return out

    rows = []
    HessianOperator._matmat = timed
    try:
        hessian_eigenpairs(bench.model, bench.loss_fn, probe, k=k, tol=1e-3)  # warm-up
        for _ in range(rounds):
            products.clear()
            start = time.perf_counter()
            n = hessian_eigenpairs(bench.model, bench.loss_fn, probe, k=k, tol=1e-3).n_hvp
            total = time.perf_counter() - start
            first, rest = products[0], products[1:]
            cached = _cached_product(bench, probe, n, v)
            rows.append((total, first, statistics.mean(rest), total - first - sum(rest), cached, n))
    finally:
        HessianOperator._matmat = matmat
    median = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
    out = {
        "model": name,
        "products": rows[0][5],
        "measurement_ms": 1e3 * median(0),
        "first_product_ms": 1e3 * median(1),
        "other_products_ms": 1e3 * median(2),
        "cached_product_ms": 1e3 * median(4),
        "outside_products_ms": 1e3 * median(3),
        "outside_per_product_ms": 1e3 * median(3) / rows[0][5],
    }
    print(out, flush=True)
    return out


def stacking_row(name: str, loader_batch: int = 128, rounds: int = 15) -> dict:
    """What the monitor's check that a stacked probe keeps the loss costs, once per fit and drawn probe,
    before its first measurement: the probe as the loader's batches of ``loader_batch`` and stacked into one batch, the check
    (loss and gradient of both, :func:`pf_lightning.callbacks._probe._stacking_keeps_the_loss`), one cold
    top-5 measurement on the stacked probe and one cached product on it timed in alternation; medians over
    ``rounds``."""
    from pf_lightning.callbacks._probe import _stacking_keeps_the_loss, stack_batches
    from pf_lightning.probe import ProbeSet

    bench = make_bench(name)
    x, y = bench.probe
    drawn = ProbeSet(
        [(x[i : i + loader_batch], y[i : i + loader_batch]) for i in range(0, len(x), loader_batch)]
    )
    stacked = stack_batches(drawn)
    assert len(stacked) == 1 and _stacking_keeps_the_loss(bench.model, bench.loss_fn, drawn, stacked)
    v = torch.randn(bench.n_params, generator=torch.Generator().manual_seed(0))
    checks, measurements, products = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        _stacking_keeps_the_loss(bench.model, bench.loss_fn, drawn, stacked)
        checks.append(time.perf_counter() - start)
        start = time.perf_counter()
        hessian_eigenpairs(bench.model, bench.loss_fn, stacked, k=5, tol=1e-3)
        measurements.append(time.perf_counter() - start)
        products.append(_cached_product(bench, stacked, 5, v))
    out = {
        "model": name,
        "loader_batches": len(drawn),
        "check_ms": 1e3 * statistics.median(checks),
        "measurement_ms": 1e3 * statistics.median(measurements),
        "cached_product_ms": 1e3 * statistics.median(products),
        "check_in_products": statistics.median(c / p for c, p in zip(checks, products, strict=True)),
        "check_of_measurement": statistics.median(c / m for c, m in zip(checks, measurements, strict=True)),
    }
    print(out, flush=True)
    return out


def _digits_run():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x, y = (x - x.mean(0)) / x.std(0).clamp_min(1e-6), torch.tensor(y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 10))

    def loss_fn(model, batch):
        return 0.5 * ((model(batch[0]) - F.one_hot(batch[1], 10).float()) ** 2).sum(1).mean()

    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)

    def train(steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn(net, (x, y)).backward()
            optimizer.step()

    train(300)
    return net, loss_fn, [(x[:512], y[:512])], train


def _worst_difference(result, reference) -> float:
    """The largest relative difference between two results' eigenvalues."""
    return float(((result.eigenvalues - reference.eigenvalues).abs() / reference.eigenvalues.abs()).max())


def warm_rows(ks=(1, 5, 20), gaps=(1, 5, 100), measurements: int = 12) -> list[dict]:
    rows = []
    for k in ks:
        for gap in gaps:
            net, loss_fn, probe, train = _digits_run()
            first = hessian_eigenpairs(net, loss_fn, probe, k=k)
            still = hessian_eigenpairs(net, loss_fn, probe, k=k, warm_start=first)
            auto = first
            # method="lanczos" results carry no neighbours: this chain starts from the eigenvectors alone
            lanczos_warm = hessian_eigenpairs(net, loss_fn, probe, k=k, method="lanczos")
            cold_n, lanczos_n, auto_n, choices = [], [], [], []
            lanczos_off = auto_off = 0.0
            for _ in range(measurements):
                train(gap)
                cold = hessian_eigenpairs(net, loss_fn, probe, k=k)
                lanczos_warm = hessian_eigenpairs(
                    net, loss_fn, probe, k=k, warm_start=lanczos_warm, method="lanczos"
                )
                auto = hessian_eigenpairs(net, loss_fn, probe, k=k, warm_start=auto)
                cold_n.append(cold.n_hvp)
                lanczos_n.append(lanczos_warm.n_hvp)
                auto_n.append(auto.n_hvp)
                choices.append(auto.info["warm_method"][0])
                lanczos_off = max(lanczos_off, _worst_difference(lanczos_warm, cold))
                auto_off = max(auto_off, _worst_difference(auto, cold))
            rows.append(
                {
                    "k": k,
                    "gap": gap,
                    "still": still.n_hvp,
                    "cold": statistics.mean(cold_n),
                    "lanczos": statistics.mean(lanczos_n),
                    "auto": statistics.mean(auto_n),
                    "choices": "".join(choices),
                    "lanczos_off": lanczos_off,
                    "auto_off": auto_off,
                }
            )
            print(rows[-1], flush=True)
    return rows


def floor_table(floor: list[dict]) -> list[str]:
    """The floor rows as markdown table lines (this script's section, and the GPU one of ``gpu.py``)."""
    lines = [
        "| model | parameters | probe | products | ideal | seconds | per product (ms) | cached product (ms) "
        "| rounds | ratio (range) | fastest / fastest |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in floor:
        low, high = r["ratio_range"]
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['probe']} | {r['n_hvp']} | {r['ideal']} | {r['seconds']:.3f} "
            f"| {1e3 * r['per_product']:.2f} | {1e3 * r['product']:.2f} | {r['rounds']} "
            f"| **{r['ratio']:.2f}** ({low:.2f}–{high:.2f}) | {r['best_ratio']:.2f} |"
        )
    return lines


def markdown(floor: list[dict], warm: list[dict], command: str) -> str:
    lines = [
        "## Measurement cost: the floor and warm starts",
        "",
        f"Run: `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads; load average at the end {os.getloadavg()[0]:.2f}.",
        "",
        '**The floor** (one cold top-5 measurement, tol 1e-3, `hvp="auto"`; models of the tables above). '
        "*Ideal*: Lanczos with full reorthogonalization and a basis that never restarts. *Per product*: the "
        "measurement's seconds over its products, against one exact product through the cached gradient graph "
        "(as many products in a row, the graph already built), the two timed in alternation (7 to 41 rounds, "
        "as many as fit 20 s): medians, the median and range of the rounds' ratios, and the fastest measurement "
        "against the fastest product (the least disturbed of each: slowdowns from outside only add time).",
        "",
        *floor_table(floor),
        "",
        "**Warm starts along a run** (full-batch GD, lr 0.2, on the digits MLP from step 300; 512-sample probe; "
        "mean products over 12 measurements). *Still*: a warm start on unchanged parameters. *Lanczos from the "
        'eigenvectors*: `method="lanczos"`, from the sum of the previous eigenvectors (its results keep no '
        "neighbours). *auto's choices*: b = block restart (LOBPCG from the previous eigenvectors and their "
        "neighbours), l = Lanczos from the sum of both. *Off*: the largest relative difference of a warm "
        "start's eigenvalues from the cold measurement's over the 12 (both to tol 1e-3; a difference above "
        "~1e-3 is a missed eigenvalue).",
        "",
        "| k | every | still | cold | Lanczos from the eigenvectors (off) | auto (off) | auto / cold | auto's choices |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in warm:
        lines.append(
            f"| {r['k']} | {r['gap']} | {r['still']} | {r['cold']:.1f} | {r['lanczos']:.1f} ({r['lanczos_off']:.0e}) "
            f"| **{r['auto']:.1f}** ({r['auto_off']:.0e}) | {r['auto'] / r['cold']:.2f} | `{r['choices']}` |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="rewrite the measurement-cost section of this file"
    )
    parser.add_argument(
        "--split",
        choices=MODELS,
        default=None,
        help="only print where one measurement's time goes on this model (products and the rest)",
    )
    parser.add_argument(
        "--stacking",
        choices=MODELS,
        default=None,
        help="only print what the check that a stacked probe keeps the loss costs on this model",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    if args.split is not None:
        split_row(args.split)
        return
    if args.stacking is not None:
        stacking_row(args.stacking)
        return
    body = markdown(
        [floor_row(name) for name in MODELS],
        warm_rows(),
        "python benchmarks/measurement_cost.py --out BENCHMARKS.md",
    )
    print(body)
    if args.out is not None:
        rewrite(args.out, "measurement-cost", body)


if __name__ == "__main__":
    main()
