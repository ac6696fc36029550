"""How one top-5 measurement scales with the model and with the probe, on the CPU.

Llama-style causal LMs (``benchmarks/models.py``: tied embeddings, RMSNorm, rotary positions, SwiGLU),
built in code at random initialization, from 0.1M to a GPT-2-small-sized 110M parameters (d 768, 12
layers, a vocabulary of 32,000), each measured once: ``hessian_eigenpairs(k=5, tol=1e-3)`` on a probe of
8 sequences of 32 tokens; then the 0.1M model with probes of 128 to 2048 sequences. Each configuration
runs in a fresh process, so its peak resident memory (``ru_maxrss``) is its own; ``--cache FILE`` keeps
each configuration's row, so a rerun measures only the missing ones. The growth exponents are
least-squares slopes in log-log.

Usage: ``python benchmarks/scaling.py --out BENCHMARKS.md`` (about 10 minutes on 2 CPU threads, 12 GB
of memory at the largest size).

``--small-basis`` measures instead what a small Lanczos basis costs and saves: the top eigenpair
(``k=1``) of the 0.8M, 10M and 110M models to ``tol=1e-2`` (the GPU script's setting), and of the first
two to ``tol=1e-3`` (the monitors' default), with the default basis (20 between restarts: 21 vectors, 24 held at most with
the eigenvector's neighbours) and with ``basis_size`` 3 and 2 (5 and 4 held): products, seconds and peak
memory, each in a fresh process (``small-basis`` section; about 15 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.models import LlamaStyleLM, next_token_loss  # noqa: E402
from benchmarks.report import rewrite  # noqa: E402
from pf_lightning import hessian_eigenpairs  # noqa: E402
from pf_lightning.linalg.lanczos import default_basis_size, lanczos_vectors  # noqa: E402

SIZES = (  # (d, layers, heads, vocab)
    (64, 2, 4, 64),
    (128, 4, 4, 256),
    (320, 8, 5, 1024),
    (512, 9, 8, 2048),
    (768, 12, 12, 32000),
)
PROBES = (128, 256, 512, 1024, 2048)
SEQ = 32
SMALL_BASES = (None, 3, 2)
SMALL_RUNS = ((1e-2, (SIZES[1], SIZES[2], SIZES[4])), (1e-3, (SIZES[1], SIZES[2])))  # tol, sizes


def one(
    d: int,
    layers: int,
    heads: int,
    vocab: int,
    probe: int,
    k: int = 5,
    tol: float = 1e-3,
    basis_size: int | None = None,
) -> dict:
    """One measurement in this process: parameters, products, seconds, peak memory."""
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = LlamaStyleLM(vocab=vocab, d=d, n_layers=layers, n_heads=heads)
    tokens = torch.randint(0, vocab, (probe, SEQ), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    result = hessian_eigenpairs(
        model, next_token_loss, [(tokens, tokens)], k=k, tol=tol, basis_size=basis_size, max_hvp=1000
    )
    seconds = time.perf_counter() - start
    return {
        "basis_size": basis_size,
        "vectors": lanczos_vectors(k, result.info["n_params"], basis_size, neighbours=basis_size is None),
        "eig_1": float(result.eigenvalues[0]),
        "params": sum(p.numel() for p in model.parameters()),
        "probe": probe,
        "tokens": probe * SEQ,
        "n_hvp": result.n_hvp,
        "seconds": seconds,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "converged": result.all_converged,
    }


def run(config: tuple[int, ...], cache: Path | None = None) -> dict:
    rows = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    if json.dumps(config) in rows:
        return rows[json.dumps(config)]
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(config)], capture_output=True, text=True, check=True
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(row, flush=True)
    if cache is not None:
        rows[json.dumps(config)] = row
        cache.write_text(json.dumps(rows, indent=1))
    return row


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def markdown(sizes: list[dict], probes: list[dict], command: str) -> str:
    lines = [
        "## Scaling of one measurement (CPU)",
        "",
        f"Run: `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
        f"2 CPU threads; load average at the end {os.getloadavg()[0]:.2f}. One top-5 measurement "
        f'(`hessian_eigenpairs`, tol 1e-3, `hvp="auto"`: double backward) of a Llama-style LM at random '
        f"initialization; sequences of {SEQ} tokens; each configuration in a fresh process (peak resident "
        "memory its own, the model, the probe, the gradient graph and the Krylov basis of 21 vectors included).",
        "",
        "| parameters | probe (sequences) | products | seconds | seconds per product | peak memory (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in [*sizes, *probes]:
        lines.append(
            f"| {r['params']:,} | {r['probe']} | {r['n_hvp']} | {r['seconds']:.1f} | {r['seconds'] / r['n_hvp']:.3f} "
            f"| {r['peak_gb']:.2f} |"
        )
    a = slope([r["params"] for r in sizes], [r["seconds"] / r["n_hvp"] for r in sizes])
    m = slope([r["params"] for r in sizes[1:]], [r["peak_gb"] for r in sizes[1:]])
    b = slope([r["probe"] for r in probes], [r["seconds"] / r["n_hvp"] for r in probes])
    lines += [
        "",
        f"Fitted growth (log-log slopes): seconds per product ∝ parameters^**{a:.2f}** (probe fixed); "
        f"peak memory ∝ parameters^**{m:.2f}** (from 1M on; below it the interpreter's own memory dominates); "
        f"seconds per product ∝ probe^**{b:.2f}** (the {probes[0]['params']:,}-parameter model).",
    ]
    return "\n".join(lines) + "\n"


def small_basis_markdown(rows: list[dict], command: str) -> str:
    lines = [
        "## A small basis: the top eigenpair in a few vectors (CPU)",
        "",
        f"Run: `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
        f"2 CPU threads; load average at the end {os.getloadavg()[0]:.2f}. `hessian_eigenpairs(k=1, tol=..., "
        f"basis_size=...)` of the Llama-style LMs above (random initialization, a probe of 8 "
        f"sequences of {SEQ} tokens), each in a fresh process. Solver vectors: the most float32 vectors of the "
        "parameters' length Lanczos holds at once (`lanczos_vectors`, measured in `tests/test_memory.py`); "
        "peak memory: the process's, the model, its gradient graph and the interpreter included.",
        "",
        "| tol | parameters | basis_size | solver vectors | products | seconds | λ_max | peak memory (GB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        basis = (
            f"default ({default_basis_size(1, r['params'])})"
            if r["basis_size"] is None
            else str(r["basis_size"])
        )
        lines.append(
            f"| {r['tol']:g} | {r['params']:,} | {basis} | {r['vectors']} | {r['n_hvp']} | {r['seconds']:.1f} "
            f"| {r['eig_1']:.5g} "
            f"| {r['peak_gb']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="rewrite the scaling section of this file")
    parser.add_argument("--cache", type=Path, default=None, help="rows measured so far (JSON), reused")
    parser.add_argument("--small-basis", action="store_true", help="the small-basis table instead")
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(*json.loads(args.one))))
        return
    if args.small_basis:
        rows = [
            {**run((*size, 8, 1, tol, basis), args.cache), "tol": tol}
            for tol, sizes in SMALL_RUNS
            for size in sizes
            for basis in SMALL_BASES
        ]
        body = small_basis_markdown(rows, "python benchmarks/scaling.py --small-basis --out BENCHMARKS.md")
        print(body)
        if args.out is not None:
            rewrite(args.out, "small-basis", body)
        return
    sizes = [run((*size, 8), args.cache) for size in SIZES]
    probes = [run((*SIZES[0], probe), args.cache) for probe in PROBES]
    body = markdown(sizes, probes, "python benchmarks/scaling.py --out BENCHMARKS.md")
    print(body)
    if args.out is not None:
        rewrite(args.out, "scaling", body)


if __name__ == "__main__":
    main()
