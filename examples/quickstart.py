"""Progressive sharpening and the edge of stability, measured with one function call.

Full-batch gradient descent on sklearn's digits (a tanh MLP 64-200-200-10 with the squared error of
Cohen et al. 2021): the top Hessian eigenvalue (the *sharpness*) rises until it reaches the
stability threshold 2/lr of gradient descent, then hovers there while the loss keeps falling
non-monotonically. Every measurement is warm-started from the previous one and leaves training
untouched. Runs in under a minute on two CPU cores: `python examples/quickstart.py`. The same
experiment as a Lightning run, with plots: examples/edge_of_stability.py (`make demo`).
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from pf_lightning import HessianOperator, hessian_eigenpairs
from pf_lightning.linalg.trace import hutchpp_trace


def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)  # standardized inputs
    targets = nn.functional.one_hot(torch.tensor(y), 10).float()
    return (x[:n], targets[:n]) if n else (x, targets)


def squared_error(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()
    if args.every < 1 or args.steps < 0 or args.k < 1 or not args.lr > 0:
        parser.error("--every and --k must be >= 1, --steps >= 0 and --lr > 0")

    torch.manual_seed(0)
    torch.set_num_threads(2)
    x, y = digits()
    model = nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    threshold = 2.0 / args.lr
    probe = [(x, y)]  # full batch: the Hessian of exactly the loss that GD descends

    print(f"full-batch GD, lr={args.lr}: the stability threshold 2/lr is {threshold:.1f}")
    header = f"{'step':>5} {'loss':>8}  " + " ".join(f"{'eig_' + str(i + 1):>7}" for i in range(args.k))
    print(header + f"  {'ratio':>5}  {'HVPs':>4} {'sec':>5}  regime")
    previous, train_seconds, measure_seconds = None, 0.0, 0.0
    for step in range(args.steps + 1):
        if step % args.every == 0:
            result = hessian_eigenpairs(model, squared_error, probe, k=args.k, warm_start=previous, tol=1e-3)
            previous, measure_seconds = result, measure_seconds + result.seconds
            with torch.no_grad():
                loss = float(squared_error(model, (x, y)))
            ratio = float(result.eigenvalues[0]) / threshold
            regime = "edge of stability" if ratio > 0.95 else "progressive sharpening"
            eigs = " ".join(f"{float(e):7.3f}" for e in result.eigenvalues)
            print(
                f"{step:5d} {loss:8.4f}  {eigs}  {ratio:5.2f}  {result.n_hvp:4d} {result.seconds:5.2f}  {regime}"
            )
        if step == args.steps:
            break
        start = time.perf_counter()
        optimizer.zero_grad()
        squared_error(model, (x, y)).backward()
        optimizer.step()
        train_seconds += time.perf_counter() - start

    with HessianOperator(model, squared_error, probe) as op:
        trace = hutchpp_trace(op, n_matvec=60)
    print(f"\nHessian trace at the end (Hutch++, 60 HVPs): {trace.trace:.2f} +- {trace.std_error:.2f}")
    print(f"time: training {train_seconds:.1f} s, measuring {measure_seconds:.1f} s")


if __name__ == "__main__":
    main()
