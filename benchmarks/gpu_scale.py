"""Billion-parameter language models in bfloat16 on one GPU: the top eigenpair and critical sharpness.

    python benchmarks/gpu_scale.py --json gpu_scale.json --out BENCHMARKS.md   # one CUDA GPU
    python benchmarks/gpu_scale.py --quick                                     # smoke test, CPU too

For each size, a Llama-style causal LM (``benchmarks/models.py``: tied embeddings, RMSNorm, rotary
positions, SwiGLU; vocabulary 32,000) built in code at random initialization, its weights in bfloat16
on the device, a probe of 4 sequences of 256 tokens:

- ``1B``: d 2048, 20 layers (1.07B parameters); ``7B``: d 4096, 32 layers (6.57B).
- **Top-1 eigenpair**: ``hessian_eigenpairs(k=1, tol=1e-2)``, double backward through the math attention
  kernel, its passes in bfloat16 and its solver vectors in float32 (the measurement's rule: a Krylov basis
  in bfloat16 breaks down). Lanczos holds at most ``lanczos_vectors`` float32 vectors of the parameters'
  length (README, "Memory"): 24 with the default basis (21, and the eigenvector with its 2 neighbours),
  4 with ``basis_size=2`` (more products). ``choose`` takes the first that fits of: the default basis on
  the GPU beside the model and the products' gradient graph, the default basis in host memory
  (``basis_device="cpu"``), ``basis_size=2`` on the GPU, ``basis_size=2`` in host memory; none fitting,
  the row says so with the memory needed. At 1.07B parameters the default basis is 96 GiB, which an
  H200 holds beside the model; at 6.57B a float32 vector is 24.5 GiB, the default basis 588 GiB, and
  ``basis_size=2``'s 98 GiB go to a 128 GiB host. Time, products, the GPU's peak.
- **Critical sharpness per step**: one training step (SGD with momentum 0.9 and the same probe, bfloat16
  weights and gradients) against ``critical_sharpness(..., optimizer=)`` along that optimizer's next
  update: forward passes and one gradient, as a fraction of a training step (medians of 3).

One process for both sizes, the model freed between them. Each part that fails (out of memory) is
recorded as its error and the rest goes on; ``--json`` is written after each part, so a run stopped by a
time limit keeps what it finished. ``--max-hvp`` bounds the top eigenpair's products (100): at 6.57B, with
the basis in host memory, each moves a 24.5 GiB vector to the GPU and back. ``--render FILE`` re-renders
a saved JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.models import LlamaStyleLM, next_token_loss  # noqa: E402
from benchmarks.report import rewrite  # noqa: E402
from pf_lightning import critical_sharpness, hessian_eigenpairs  # noqa: E402
from pf_lightning.linalg.lanczos import lanczos_vectors  # noqa: E402

SIZES = {"1B": (2048, 20, 16), "7B": (4096, 32, 32)}  # d, layers, heads
QUICK_SIZES = {"1B": (64, 2, 4), "7B": (96, 2, 4)}
VOCAB, QUICK_VOCAB = 32000, 256
PROBE, QUICK_PROBE = (4, 256), (2, 16)  # sequences, tokens
SMALL_BASIS = 2  # the fewest Lanczos vectors between restarts for k = 1: 4 vectors in all
GIB = 2**30
HOST_MARGIN = 4 * GIB


def build(size: tuple[int, int, int], vocab: int, device: str) -> LlamaStyleLM:
    """The model initialized on ``device`` directly in bfloat16 (no float32 copy on the host)."""
    d, layers, heads = size
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaStyleLM(vocab=vocab, d=d, n_layers=layers, n_heads=heads)
    finally:
        torch.set_default_dtype(default)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> tuple[float, float]:
    """Free bytes on the device (inf on the CPU) and available host memory."""
    host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    gpu = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else float("inf")
    return gpu, host


def _error(err: BaseException) -> str:
    traceback.print_exc()
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def solver_bytes(n: int, basis_size: int | None = None) -> int:
    """The float32 vectors a top-1 Lanczos measurement holds at most (README, "Memory"); with the default
    basis ``method="auto"`` also keeps the eigenvector's neighbours for the next warm start."""
    return lanczos_vectors(1, n, basis_size, neighbours=basis_size is None) * 4 * n


def graph_reserve(n: int) -> int:
    """GPU memory left beside the solver's vectors: in bfloat16 the gradient graph, its product and the
    block being multiplied (about 4 parameter-sized tensors), and a few GiB of activations."""
    return 4 * 2 * n + 4 * GIB


def placement(need: float, reserve: float, gpu_free: float, host_free: float) -> str | None:
    """Where ``need`` bytes of solver vectors go: ``"device"`` where they fit in the GPU's free memory
    beside ``reserve`` (the products' gradient graph and blocks), ``"cpu"`` where the host's available
    memory holds them with a few GiB to spare, None where neither does."""
    if need + reserve <= gpu_free:
        return "device"
    if need + HOST_MARGIN <= host_free:
        return "cpu"
    return None


def choose(n: int, gpu_free: float, host_free: float) -> tuple[int | None, str | None]:
    """The solver's basis size and place: the default basis where it fits (the GPU first), else
    ``SMALL_BASIS`` (4 vectors) where that fits; ``(None, None)`` where nothing does. In host memory the GPU
    still holds the float32 vector being multiplied and its product beside the reserve."""
    reserve = graph_reserve(n)
    for basis_size in (None, SMALL_BASIS):
        where = placement(solver_bytes(n, basis_size), reserve, gpu_free, host_free)
        if where == "device" or (where == "cpu" and reserve + 2 * 4 * n <= gpu_free):
            return basis_size, where
    return None, None


def top_eigenpair(model: LlamaStyleLM, probe: list, device: str, max_hvp: int = 100) -> dict[str, Any]:
    n = sum(p.numel() for p in model.parameters())
    gpu, host = _free(device)
    basis_size, where = choose(n, gpu, host)
    need = solver_bytes(n, SMALL_BASIS if where is None else basis_size)
    row: dict[str, Any] = {"vector_gib": need / GIB, "basis_size": basis_size}
    if where is None:
        beside = (graph_reserve(n) + 2 * 4 * n) / GIB  # what the GPU holds with the vectors on the host
        row["error"] = (
            f"not run: even basis_size={SMALL_BASIS}'s float32 solver vectors need {need / GIB:.0f} GiB (on the "
            f"host, with {beside:.0f} GiB on the GPU beside them); free: {gpu / GIB:.0f} GiB on the GPU, "
            f"{host / GIB:.0f} GiB on the host"
        )
        return row
    basis_device = None if where == "device" else "cpu"
    row["basis_device"] = basis_device or device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        _sync(device)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-convergence is in the row
            result = hessian_eigenpairs(
                model,
                next_token_loss,
                probe,
                k=1,
                tol=1e-2,
                max_hvp=max_hvp,
                dtype=torch.bfloat16,
                basis_device=basis_device,
                basis_size=basis_size,
            )
        _sync(device)
        row.update(
            seconds=time.perf_counter() - start,
            n_hvp=result.n_hvp,
            eig_1=float(result.eigenvalues[0]),
            rel_residual=float(result.relative_residuals[0]),
            converged=result.all_converged,
            hvp=result.info["hvp"],
        )
    except Exception as err:  # out of memory, above all: recorded
        row["error"] = _error(err)
    if device.startswith("cuda"):
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return row


def critical_per_step(model: LlamaStyleLM, probe: list, device: str, repeats: int) -> dict[str, Any]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    row: dict[str, Any] = {}
    try:
        steps, criticals = [], []
        for _ in range(repeats + 1):  # the first step builds the momentum buffers: not timed
            _sync(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            next_token_loss(model, probe[0]).backward()
            optimizer.step()
            _sync(device)
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            critical = critical_sharpness(
                model, next_token_loss, probe, optimizer=optimizer, initial_step=1e-3, dtype=torch.bfloat16
            )
            _sync(device)
            criticals.append(time.perf_counter() - start)
        step, crit = statistics.median(steps[1:]), statistics.median(criticals[1:])
        row.update(
            step_seconds=step,
            critical_seconds=crit,
            fraction=crit / step,
            n_forward=critical.n_forward,
            critical_ratio=critical.ratio,
        )
    except Exception as err:
        row["error"] = _error(err)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    return row


def _release(device: str) -> None:
    """Return freed tensors to the device, so that ``mem_get_info`` sees them free."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure(
    label: str,
    size: tuple[int, int, int],
    vocab: int,
    shape: tuple[int, int],
    device: str,
    row: dict[str, Any] | None = None,
    save: Callable[[], None] = lambda: None,
    max_hvp: int = 100,
) -> dict:
    """One size's row, filled into ``row`` part by part, ``save()`` after each: a run stopped by a time
    limit keeps the parts it finished. The top eigenpair first, at initialization: critical sharpness
    trains the model."""
    row = {} if row is None else row
    start = time.perf_counter()
    model = build(size, vocab, device)
    n = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1)).to(device)
    probe = [(tokens, tokens)]
    row.update(size=label, params=n, d=size[0], layers=size[1], tokens=shape[0] * shape[1])
    print(f"# {label}: {n / 1e9:.2f}B parameters, built in {time.perf_counter() - start:.0f} s", flush=True)
    row["top1"] = top_eigenpair(model, probe, device, max_hvp)
    save()
    print(f"# {label}: top eigenpair done at {time.perf_counter() - start:.0f} s", flush=True)
    _release(device)
    row["critical"] = critical_per_step(model, probe, device, repeats=3)
    save()
    print(f"# {label}: critical sharpness done at {time.perf_counter() - start:.0f} s", flush=True)
    del model, probe, tokens
    _release(device)
    return row


def render(results: dict[str, Any]) -> str:
    env = results["env"]
    out = [
        f"## Billion-parameter LMs on one GPU: {env.get('gpu', env['device'])}",
        "",
        f"Run: `{results['command']}` on {results['date']}; torch {env['torch']}. Llama-style LMs in "
        "bfloat16 at random initialization, a probe of "
        f"{results['rows'][0]['tokens'] if results['rows'] else '?'} tokens (`benchmarks/gpu_scale.py` says how).",
        "",
        "| model | parameters | top-1: seconds | products | λ_max (rel. residual) | solver vectors | GPU peak "
        "| training step | critical sharpness | per step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        unfinished = {"error": "not finished: the run was stopped by its time limit"}
        t, c = r.get("top1", unfinished), r.get("critical", unfinished)
        if "error" in t:
            top = [f"{t['error']}", "", "", f"{t['vector_gib']:.0f} GiB" if "vector_gib" in t else "", ""]
        else:
            where = "host" if t["basis_device"] == "cpu" else "GPU"
            where += f", basis_size={t['basis_size']}" if t.get("basis_size") else ""
            peak = f"{t['peak_gib']:.1f} GiB" if "peak_gib" in t else "–"
            top = [
                f"{t['seconds']:.1f}",
                str(t["n_hvp"]),
                f"{t['eig_1']:.4g} ({t['rel_residual']:.0e})",
                f"{t['vector_gib']:.0f} GiB ({where})",
                peak,
            ]
        crit = (
            [c["error"], "", ""]
            if "error" in c
            else [f"{1e3 * c['step_seconds']:.0f} ms", f"{1e3 * c['critical_seconds']:.0f} ms "
                  f"({c['n_forward']} passes)", f"**{c['fraction']:.2f}×**"]
        )  # fmt: skip
        params = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e3:.0f}k"
        out.append(f"| {r['size']} | {params} | " + " | ".join(top + crit) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test that runs on the CPU")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--max-hvp", type=int, default=100, help="the top eigenpair's budget of products")
    parser.add_argument("--out", type=Path, default=None, help="rewrite the gpu-scale section of this file")
    parser.add_argument("--render", type=Path, default=None, help="render this JSON and stop")
    args = parser.parse_args()
    if args.render is not None:
        results = json.loads(args.render.read_text())
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        env = {"torch": torch.__version__, "device": device}
        if device == "cuda":
            env["gpu"] = torch.cuda.get_device_name(0)
        results = {
            "env": env,
            "command": "python " + " ".join(["benchmarks/gpu_scale.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rows": [],
        }
        sizes = QUICK_SIZES if args.quick else SIZES
        vocab, shape = (QUICK_VOCAB, QUICK_PROBE) if args.quick else (VOCAB, PROBE)

        def save() -> None:
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))

        for label in args.sizes:
            results["rows"].append({})
            measure(label, sizes[label], vocab, shape, device, results["rows"][-1], save, args.max_hvp)
            print(json.dumps(results["rows"][-1], indent=1), flush=True)
    body = render(results)
    print(body)
    if args.out is not None:
        rewrite(args.out, "gpu-scale", body)


if __name__ == "__main__":
    main()
