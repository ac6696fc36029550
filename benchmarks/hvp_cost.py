"""Cost of one Hessian-vector product per backend, as a multiple of one plain gradient.

All variants of one model are timed in one process with interleaved repeats: each repeat times the
plain gradient and every backend once, in an order rotated from repeat to repeat, and the ratio of a
repeat is taken against that repeat's gradient, so drifts of the machine's speed cancel. The table
gives the median ratio over the repeats.

Each timed product runs inside ``with HessianOperator(...) as op:`` after one untimed product in
the same context, so the double-backward variant with a cached graph is timed in its steady state
(one backward through the retained gradient graph); the first product, which builds that graph, is
reported separately.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pf_lightning import HessianOperator

from .models import Bench


@dataclass
class Variant:
    label: str
    hvp: str
    cache_graphs: bool = True
    block: int = 1
    error: str | None = None
    ratios: list[float] = field(default_factory=list)


def variants(block: int = 20) -> list[Variant]:
    return [
        Variant("double_backward, cached graph (steady state)", "double_backward", True),
        Variant("double_backward, cache_graphs=False", "double_backward", False),
        Variant("forward_over_reverse, block of 1", "forward_over_reverse", block=1),
        Variant(f"forward_over_reverse, block of {block} (per vector)", "forward_over_reverse", block=block),
        Variant("finite_difference (central)", "finite_difference"),
    ]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # CUDA work is asynchronous: time it to completion


def _seconds(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _block(n: int, b: int, device: torch.device | None = None) -> Tensor:
    g = torch.Generator().manual_seed(b)
    return torch.randn(n, b, generator=g).to(device)


def _time_variant(bench: Bench, v: Variant, V: Tensor, calls: int = 1) -> float:
    """Seconds per vector of one product in steady state: the mean of ``calls`` products after one
    untimed product in the same context."""
    with HessianOperator(
        bench.model, bench.loss_fn, bench.probe, hvp=v.hvp, cache_graphs=v.cache_graphs
    ) as op:
        op.matmat(V)
        return _seconds(lambda: [op.matmat(V) for _ in range(calls)]) / (calls * V.shape[1])


def _first_call(bench: Bench, V: Tensor) -> float:
    """Seconds of the first cached double-backward product (it builds the gradient graph)."""
    with HessianOperator(bench.model, bench.loss_fn, bench.probe, hvp="double_backward") as op:
        return _seconds(lambda: op.matmat(V))


def hvp_cost(bench: Bench, repeats: int, block: int = 20) -> dict:
    """Median cost ratios of every backend on ``bench``; failing backends carry their error."""
    torch.manual_seed(0)
    params = [p for p in bench.model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)

    def gradient() -> None:
        torch.autograd.grad(bench.loss_fn(bench.model, bench.probe), params)

    vs = variants(block)
    blocks = {b: _block(n, b, params[0].device) for b in {1, block}}
    for v in vs:  # a failing backend fails on its first product: find out before timing anything
        try:
            _time_variant(bench, v, blocks[v.block])
        except Exception as err:
            v.error = (str(err).strip().splitlines() or [type(err).__name__])[0][:140]
    gradient()  # warm-up
    # Average a few calls per timing on small models, so that each timing lasts ~50 ms or more.
    calls = min(20, max(1, math.ceil(0.05 / min(_seconds(gradient) for _ in range(3)))))
    live = [v for v in vs if v.error is None]
    grad_times: list[float] = []
    first: list[float] = []
    for r in range(repeats):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        t_grad = _seconds(lambda: [gradient() for _ in range(calls)]) / calls
        grad_times.append(t_grad)
        for v in order:
            n_calls = max(1, math.ceil(calls / v.block))  # a block of 20 is long enough on its own
            v.ratios.append(_time_variant(bench, v, blocks[v.block], n_calls) / t_grad)
        first.append(_first_call(bench, blocks[1]) / t_grad)
    return {
        "model": bench.name,
        "n_params": bench.n_params,
        "probe": int(bench.probe[0].shape[0]),
        "grad_ms": 1e3 * statistics.median(grad_times),
        "first_call_ratio": statistics.median(first),
        "rows": [
            {
                "label": v.label,
                "ratio": statistics.median(v.ratios) if v.error is None else None,
                "spread": (min(v.ratios), max(v.ratios)) if v.error is None else None,
                "error": v.error,
            }
            for v in vs
        ],
        "repeats": repeats,
        "calls": calls,
    }
