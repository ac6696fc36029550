"""Why a top-5 measurement every 100 steps cannot cost 5% of full-batch GD on the digits MLP.

The overhead benchmark's run without Lightning: full-batch GD (lr 0.2) on the digits MLP 64-200-200-10,
with a top-5 measurement on a 512-sample probe every 100 steps. It prints:

- the time of one training step, one gradient and one exact HVP on the probe (median of 20);
- at each measurement, the top-5 eigenvalues, the smallest principal cosine between the top-5
  subspaces of this and the previous measurement, and the products that Lanczos needs to reach
  tol 1e-3 for several basis sizes, cold and warm-started.

Usage: ``python benchmarks/edge_cost.py`` (about one minute on 2 CPU threads).
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from pf_lightning.curvature import HessianOperator
from pf_lightning.linalg import lanczos

BASIS_SIZES = (12, 20, 40)
REFERENCE = (BASIS_SIZES[0], False)  # eigenvalues and rotation are read off the cold run of the first size


def median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x, y = (x - x.mean(0)) / x.std(0).clamp_min(1e-6), torch.tensor(y)
    net = nn.Sequential(nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 10))

    def loss_fn(model, batch):
        return 0.5 * ((model(batch[0]) - F.one_hot(batch[1], 10).float()) ** 2).sum(1).mean()

    probe = [(x[:512], y[:512])]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    params = list(net.parameters())

    def step():
        optimizer.zero_grad()
        loss_fn(net, (x, y)).backward()

    graph = torch.autograd.grad(loss_fn(net, probe[0]), params, create_graph=True)
    vector = [torch.randn_like(p) for p in params]
    hvp_ms = median_ms(lambda: torch.autograd.grad(graph, params, vector, retain_graph=True))
    gradient_ms = median_ms(lambda: torch.autograd.grad(loss_fn(net, probe[0]), params))
    print(
        f"full-batch step (forward + backward, 1797 samples): {median_ms(step):.2f} ms; gradient on the "
        f"probe: {gradient_ms:.2f} ms; one HVP through the cached graph: {hvp_ms:.2f} ms"
    )
    optimizer.zero_grad()

    header = " | ".join(f"basis {m} cold | basis {m} warm" for m in BASIS_SIZES)
    print(f"\n| step | λ1 … λ5 | smallest cosine to previous | {header} |")
    print("|" + "---|" * (3 + 2 * len(BASIS_SIZES)))
    previous: dict[tuple[int, bool], torch.Tensor] = {}
    totals: dict[tuple[int, bool], int] = {}
    for t in range(1001):
        if t % 100 == 0:
            before = previous.get(REFERENCE)  # the reference run's vectors 100 steps ago
            results = {}
            for m in BASIS_SIZES:
                for warm in (False, True):
                    with HessianOperator(net, loss_fn, probe) as op:
                        v0 = previous[(m, True)].sum(1) if warm and (m, True) in previous else None
                        results[(m, warm)] = result = lanczos(op, 5, basis_size=m, v0=v0)
                    previous[(m, warm)] = result.eigenvectors
                    totals[(m, warm)] = totals.get((m, warm), 0) + result.n_hvp
            reference = results[REFERENCE]
            values = f"{float(reference.eigenvalues[0]):.2f} … {float(reference.eigenvalues[4]):.2f}"
            overlap = (
                "–"
                if before is None
                else f"{float(torch.linalg.svdvals(before.mT @ reference.eigenvectors).min()):.3f}"
            )
            cells = " | ".join(str(r.n_hvp) for r in results.values())
            print(f"| {t} | {values} | {overlap} | {cells} |")
        step()
        optimizer.step()
    print(
        "| total | | | " + " | ".join(str(totals[(m, w)]) for m in BASIS_SIZES for w in (False, True)) + " |"
    )


if __name__ == "__main__":
    main()
