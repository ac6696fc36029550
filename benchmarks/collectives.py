"""Collectives per Hessian-vector product under DDP: pf_lightning against hessian-eigenthings.

Two gloo processes on the CPU, each holding half of a benchmark model's probe batch (split into one or
four batches per rank). Every call to ``torch.distributed``'s collectives is counted, with the bytes it
carries, during (a) one operator application to one vector, (b) one application to a block of 5
vectors (ours only: hessian-eigenthings' operator takes one vector at a time), and (c) a whole top-5
measurement (ours: ``hessian_eigenpairs``, tol 1e-3, including the per-measurement set-up collectives).
hessian-eigenthings' ``DDPHessianOperator`` (1.0.0a5) is run with its defaults (``method="autograd"``)
and with ``method="finite_difference"``.

    .venv/bin/python benchmarks/collectives.py --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable as a package
    sys.path.insert(0, str(ROOT))

from benchmarks.models import make_bench  # noqa: E402
from benchmarks.report import rewrite  # noqa: E402
from benchmarks.run import info, load  # noqa: E402

NAMES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "barrier")


@contextmanager
def counted() -> Iterator[list[tuple[str, int]]]:
    """``(name, bytes)`` of every ``torch.distributed`` collective issued meanwhile."""
    calls: list[tuple[str, int]] = []
    saved = {name: getattr(dist, name) for name in NAMES}

    def wrap(name: str, original: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls.append((name, 0 if t is None else t.numel() * t.element_size()))
            return original(*args, **kwargs)

        return wrapper

    for name, original in saved.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


def _split(probe: tuple, rank: int, pieces: int) -> list[tuple]:
    x, y = probe
    half = x.shape[0] // 2
    x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    return [(a, b) for a, b in zip(x.chunk(pieces), y.chunk(pieces), strict=True)]


def _ours(bench: Any, batches: list, vector: torch.Tensor) -> dict[str, Any]:
    from pf_lightning import hessian_eigenpairs
    from pf_lightning.curvature import HessianOperator

    with HessianOperator(bench.model, bench.loss_fn, batches, hvp="double_backward") as op:
        op.matvec(vector)  # builds the gradient graphs: not what is counted
        with counted() as one:
            op.matvec(vector)
        with counted() as block:
            op.matmat(vector[:, None].repeat(1, 5))
    with counted() as whole:
        result = hessian_eigenpairs(bench.model, bench.loss_fn, batches, k=5, tol=1e-3)
    return {"one": one, "block": block, "whole": whole, "n_hvp": result.n_hvp}


def _theirs(bench: Any, batches: list, vector: torch.Tensor, method: str) -> dict[str, Any]:
    from hessian_eigenthings.operators.distributed import DDPHessianOperator

    op = DDPHessianOperator(bench.model, batches, bench.loss_fn, method=method)
    with counted() as one:
        op.matvec(vector)
    return {"one": one}


def _worker(rank: int, port: int, model: str, pieces: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        bench = make_bench(model, probe_size=256, pretrain_steps=0)
        batches = _split(bench.probe, rank, pieces)
        n = bench.n_params
        vector = torch.randn(n, generator=torch.Generator().manual_seed(0))
        row = {
            "model": model,
            "n": n,
            "pieces": pieces,
            "ours": _ours(bench, batches, vector),
            "autograd": _theirs(bench, batches, vector, "autograd"),
            "finite_difference": _theirs(bench, batches, vector, "finite_difference"),
        }
        if rank == 0:
            torch.save(row, Path(out) / f"{model}-{pieces}.pt")
    finally:
        dist.destroy_process_group()


def measure(model: str, pieces: int, out: Path) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, model, pieces, str(out)), nprocs=2, join=True)
    return torch.load(out / f"{model}-{pieces}.pt", weights_only=False)


def _cell(calls: list[tuple[str, int]], vectors: int, vector_bytes: int) -> tuple[str, str]:
    count = len(calls) / vectors
    volume = sum(b for _, b in calls) / vectors
    return f"{count:.3g}", f"{volume / 1e3:,.0f} kB ({volume / vector_bytes:.2f}×)"


def markdown(rows: list[dict[str, Any]], run: dict[str, Any]) -> str:
    lines = [
        "## Collectives per Hessian-vector product under DDP",
        "",
        f"Run: `{run['command']}` on {run['date']}; torch {run['torch']}, 2 gloo processes × 1 thread, "
        f"machine `{run['machine']}`, {run['cpus']} CPUs; load average {run['load_before']} before, "
        f"{run['load_after']} after; {run['minutes']:.1f} min.",
        "",
        "Every `torch.distributed` collective counted (calls and bytes, per vector) while the operator is "
        "applied; each rank holds half of the 256-sample probe of the named model from "
        "`benchmarks/models.py`, as one or four batches. Bytes in brackets: multiples of one float32 "
        "parameter vector. hessian-eigenthings 1.0.0a5's `DDPHessianOperator` all-reduces every "
        "parameter's gradient (autograd-aware, so the double backward all-reduces it again) and every "
        "parameter's product, once per batch; ours sums the ranks' sample-weighted products in one flat "
        "all-reduce per application.",
        "",
        "| model (params) | batches per rank | ours: 1 vector | ours: block of 5, per vector | "
        "ours: whole top-5 measurement, per HVP | eigenthings autograd | eigenthings finite difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vb = 4 * r["n"]
        ours = r["ours"]
        cells = [
            _cell(ours["one"], 1, vb),
            _cell(ours["block"], 5, vb),
            _cell(ours["whole"], ours["n_hvp"], vb),
            _cell(r["autograd"]["one"], 1, vb),
            _cell(r["finite_difference"]["one"], 1, vb),
        ]
        text = " | ".join(f"**{c}** calls, {b}" for c, b in cells)
        lines.append(f"| {r['model']} ({r['n'] / 1e3:.0f}k) | {r['pieces']} | {text} |")
    whole = rows[0]["ours"]
    lines += [
        "",
        f"The whole-measurement column includes the two small set-up collectives of a measurement (total "
        f"sample weight and batch counts; the agreement on the `auto` backend): {rows[0]['model']} top-5 "
        f"took {whole['n_hvp']} HVPs and {len(whole['whole'])} collectives.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--out", type=Path, default=None, help="rewrite the collectives section of this file")
    args = parser.parse_args()
    start, before = time.perf_counter(), load()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for pieces in (1, 4):
                rows.append(measure(model, pieces, Path(tmp)))
    body = markdown(rows, info(start, before))
    print(body)
    if args.out is not None:
        rewrite(args.out, "collectives", body)


if __name__ == "__main__":
    main()
