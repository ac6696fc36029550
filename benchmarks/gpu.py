"""Checks and costs on a CUDA device: what CI (CPU only) cannot run.

    python benchmarks/gpu.py --json gpu.json --md gpu.md          # on a machine with one CUDA GPU
    python benchmarks/gpu.py --quick                              # smoke test (runs on CPU too)

Sections, each printed as a markdown table and saved in ``--json``:

1. ``accuracy``: top-5 eigenvalues of the benchmark models on the GPU in float32 (double backward and
   finite differences) against a float64 Lanczos on the CPU (tol 1e-10): independent kernels.
2. ``hvp``: the cost of one Hessian-vector product per backend as a multiple of one gradient (the
   harness of ``benchmarks/hvp_cost.py``, CUDA-synchronised), plus a 19M-parameter transformer.
3. ``attention``: SDPA kernels on the GPU. Unpinned attention goes through the math kernel for
   double backward; a model that pins the flash (bf16) or memory-efficient (float32) kernel has no
   double backward, so ``hvp="auto"`` falls back to finite differences; both against float64.
4. ``lightning``: ``Trainer(accelerator="gpu")`` with HessianEigenMonitor and EdgeOfStabilityMonitor,
   one process, under ``strategy="ddp"`` (NCCL) and FSDP2 (``ModelParallelStrategy`` with
   ``fully_shard``), and with ``precision="bf16-mixed"``: the eigenvalues each logs at the same steps,
   against the single-device run and a CPU run at fit start.
5. ``bitwise``: training on the GPU with dropout, BatchNorm and momentum, with and without the
   callbacks: parameters, buffers, optimizer state and the CUDA random state after fit.
6. ``nccl2``: whether NCCL runs two ranks on one GPU (it refuses; multi-GPU DDP needs more GPUs).
7. ``floor``: one cold top-5 measurement's seconds per product against a cached-graph product on the
   four benchmark models (``benchmarks/measurement_cost.py``'s floor, CUDA-synchronised).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
import warnings
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.hvp_cost import hvp_cost  # noqa: E402
from benchmarks.measurement_cost import floor_row, floor_table  # noqa: E402
from benchmarks.models import MODELS, Bench, Transformer, _tokens, cross_entropy, make_bench  # noqa: E402
from pf_lightning import (  # noqa: E402
    DriftAdaptiveLR,
    EdgeOfStabilityMonitor,
    HessianEigenMonitor,
    LRAdaptation,
    SharpnessCappedLR,
    hessian_eigenpairs,
)
from pf_lightning.demos import DigitsDataModule, DigitsMLP, TinyTransformerLM, load_digits_tensors  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(((a - b).abs() / b.abs()).max())


def accuracy(device: str, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for name in ("mlp", "cnn", "transformer"):
        bench = make_bench(
            name, probe_size=128 if quick else 512, pretrain_steps=10 if quick else 100, quick=quick
        )
        ref_model = copy.deepcopy(bench.model).double()
        probe64 = [
            (
                bench.probe[0].double() if bench.probe[0].is_floating_point() else bench.probe[0],
                bench.probe[1],
            )
        ]
        ref = hessian_eigenpairs(ref_model, cross_entropy, probe64, k=5, tol=1e-10, max_hvp=3000)
        gpu = bench.to(device)
        for hvp in ("double_backward", "finite_difference"):
            start = time.perf_counter()
            res = hessian_eigenpairs(
                gpu.model, cross_entropy, [gpu.probe], k=5, tol=1e-4, hvp=hvp, max_hvp=3000
            )
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "model": name,
                    "n_params": bench.n_params,
                    "hvp": hvp,
                    "eig_1": float(res.eigenvalues[0]),
                    "max_rel_err_top5": _rel(res.eigenvalues, ref.eigenvalues),
                    "n_hvp": res.n_hvp,
                    "seconds": seconds,
                }
            )
    return rows


def large_transformer(device: str, quick: bool) -> Bench:
    """About 19M parameters (d_model 512, 6 layers, 128 tokens): big enough not to be launch-bound."""
    torch.manual_seed(0)
    d, layers, seq = (128, 2, 32) if quick else (512, 6, 128)
    x, y = _tokens(256, vocab=32, seq_len=seq)
    model = Transformer(d_model=d, n_layers=layers, seq_len=seq).to(device)
    probe = (x[:64].to(device), y[:64].to(device))
    return Bench("transformer-19M" if not quick else "transformer-small", model, cross_entropy, probe, probe)


def large(device: str, quick: bool) -> list[dict[str, Any]]:
    """Top-5 of the 19M-parameter transformer: float32 and bfloat16 passes against float64, with seconds."""
    bench = large_transformer(device, quick)
    ref_model = copy.deepcopy(bench.model).double()
    start = time.perf_counter()
    ref = hessian_eigenpairs(ref_model, cross_entropy, [bench.probe], k=5, tol=1e-8, max_hvp=3000)
    rows = [
        {
            "case": "float64, double_backward (reference)",
            "seconds": time.perf_counter() - start,
            "n_hvp": ref.n_hvp,
        }
    ]
    del ref_model
    for label, kwargs in (
        ("float32, double_backward", {"hvp": "double_backward"}),
        ("float32, finite_difference", {"hvp": "finite_difference"}),
        ("bfloat16 passes, double_backward", {"hvp": "double_backward", "dtype": torch.bfloat16}),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            res = hessian_eigenpairs(
                bench.model, cross_entropy, [bench.probe], k=5, tol=1e-4, max_hvp=3000, **kwargs
            )
            seconds = time.perf_counter() - start
        rows.append(
            {
                "case": label,
                "seconds": seconds,
                "n_hvp": res.n_hvp,
                "eig_1": float(res.eigenvalues[0]),
                "max_rel_err_top5": _rel(res.eigenvalues, ref.eigenvalues),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
            }
        )
    return rows


def hvp_table(device: str, quick: bool) -> list[dict[str, Any]]:
    out = []
    repeats = 3 if quick else 15
    for name in ("mlp", "cnn", "transformer"):
        bench = make_bench(
            name, probe_size=128 if quick else 512, pretrain_steps=10 if quick else 100, quick=quick
        )
        out.append(hvp_cost(bench.to(device), repeats))
    out.append(hvp_cost(large_transformer(device, quick), repeats, block=4))
    return out


def floor(device: str, quick: bool) -> list[dict[str, Any]]:
    """The measurement floor of ``benchmarks/measurement_cost.py`` on ``device``."""
    return [
        floor_row(name, device=device, budget=2.0 if quick else 20.0)
        for name in (("mlp",) if quick else MODELS)
    ]


def attention(device: str, quick: bool) -> list[dict[str, Any]]:
    d, seq = (64, 32) if quick else (256, 256)
    lm = TinyTransformerLM(vocab=64, seq_len=seq, d_model=d, n_heads=4, n_layers=2, seed=0)
    tokens = torch.randint(0, 64, (16, seq), generator=torch.Generator().manual_seed(0)).to(device)
    batches = [(tokens,)]

    def pinned(backends: list[SDPBackend]):
        def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
            with sdpa_kernel(backends):
                return model.loss(batch)

        return loss_fn

    plain = lambda model, batch: model.loss(batch)  # noqa: E731
    ref = hessian_eigenpairs(
        copy.deepcopy(lm).double().to(device), plain, batches, k=2, tol=1e-9, max_hvp=2000
    )
    cases = [
        ("float32, unpinned", torch.float32, plain),
        ("bfloat16, unpinned", torch.bfloat16, plain),
        ("bfloat16, flash pinned", torch.bfloat16, pinned([SDPBackend.FLASH_ATTENTION])),
        ("float32, memory-efficient pinned", torch.float32, pinned([SDPBackend.EFFICIENT_ATTENTION])),
    ]
    rows = []
    for label, dtype, loss_fn in cases:
        model = copy.deepcopy(lm).to(device=device, dtype=dtype)
        row: dict[str, Any] = {"case": label}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                res = hessian_eigenpairs(model, loss_fn, batches, k=2, tol=1e-4, max_hvp=2000, dtype=dtype)
                row["seconds"] = time.perf_counter() - start
            row.update(
                hvp=res.info["hvp"],
                eig_1=float(res.eigenvalues[0]),
                rel_err=_rel(res.eigenvalues, ref.eigenvalues),
                n_hvp=res.n_hvp,
                warnings=sorted({type(w.message).__name__ for w in caught}),
            )
        except Exception as err:  # recorded, not fatal: the table says which case failed and why
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        rows.append(row)
    return rows


class ShardedDigitsMLP(DigitsMLP):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def _fit(
    accelerator: str,
    strategy: Any = "auto",
    precision: str = "32-true",
    steps: int = 40,
    optimizer: Any = None,
    extra: str = "",
) -> dict:
    """Full-batch training of the digits MLP with the monitors; ``extra`` adds "everything" (both ends
    of the spectrum, trace, density, proxies, DAL) or "cap" (a SharpnessCappedLR)."""
    module_cls = ShardedDigitsMLP if not isinstance(strategy, str) else DigitsMLP
    model = module_cls(hidden=(200, 200), loss="mse", seed=0, optimizer=optimizer)
    # One explicit probe batch: a probe drawn from the loader would differ under DDP's sampler.
    probe = [load_digits_tensors(512)]
    everything = extra == "everything"
    monitor = HessianEigenMonitor(
        k=3,
        every_n_steps=steps // 2,
        probe=probe,
        tol=1e-5,
        which="both" if everything else "top",
        trace_every=1 if everything else None,
        density_every=1 if everything else None,
    )
    callbacks: list = [monitor, EdgeOfStabilityMonitor(monitor, proxies=everything)]
    if everything:
        callbacks.append(LRAdaptation(partial(DriftAdaptiveLR, p=1, max_lr=0.5), every_n_steps=5))
    if extra == "cap":
        callbacks.append(LRAdaptation(partial(SharpnessCappedLR, fraction=0.9)))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        strategy=strategy,
        precision=precision,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, DigitsDataModule(batch_size=None))
    logged = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k.split("/")[0] in ("eos", "pf", "dal", "cap")
    }
    return {
        "steps": [h["step"] for h in monitor.history],
        "eigs": [h["eigenvalues"] for h in monitor.history],
        "hvp": monitor.history[-1]["hvp"],
        "logged": {k: logged[k] for k in sorted(logged) if k in SHOWN},
        "n_metrics": len(trainer.callback_metrics),
        "seconds": time.perf_counter() - start,
    }


SAME_TRAINING = ("single device", "bf16-mixed", "ddp (1 rank)", "FSDP2 (1 rank)", "sharpness cap")
SHOWN = (
    "eos/ratio",
    "eos/preconditioned_sharpness",
    "pf/unstable_grad_fraction",
    "eos/drift_ratio",
    "dal/lr",
    "cap/lr",
)


def lightning(device: str) -> list[dict[str, Any]]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    accel = "gpu" if device.startswith("cuda") else "cpu"
    runs: dict[str, Any] = {}
    configs = [
        ("cpu, single device", lambda: _fit("cpu")),
        (f"{accel}, single device", lambda: _fit(accel)),
        (f"{accel}, bf16-mixed", lambda: _fit(accel, precision="bf16-mixed")),
        (f"{accel}, ddp (1 rank)", lambda: _fit(accel, strategy="ddp")),
        (f"{accel}, FSDP2 (1 rank)", lambda: _fit(accel, strategy=ModelParallelStrategy(1, 1))),
        (f"{accel}, Adam", lambda: _fit(accel, optimizer=partial(torch.optim.Adam, lr=1e-3))),
        (f"{accel}, everything", lambda: _fit(accel, extra="everything")),
        (f"{accel}, sharpness cap", lambda: _fit(accel, extra="cap")),
        (
            f"{accel}, FSDP2, Adam",
            lambda: _fit(
                accel, strategy=ModelParallelStrategy(1, 1), optimizer=partial(torch.optim.Adam, lr=1e-3)
            ),
        ),
    ]
    for label, run in configs:
        try:
            runs[label] = run()
        except Exception as err:
            runs[label] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            traceback.print_exc()
    base = runs[f"{accel}, single device"]
    cpu = runs["cpu, single device"]
    rows = []
    for label, run in runs.items():
        row = {"run": label, **{k: v for k, v in run.items() if k != "eigs"}}
        if "error" not in run and "error" not in base:
            row["eig_1"] = [e[0] for e in run["eigs"]]
            if label.split(", ", 1)[1] in SAME_TRAINING:
                row["rel_vs_single_device"] = max(
                    _rel(torch.tensor(a[:3]), torch.tensor(b[:3]))
                    for a, b in zip(run["eigs"], base["eigs"], strict=True)
                )
            row["rel_vs_cpu_at_fit_start"] = _rel(
                torch.tensor(run["eigs"][0][:3]), torch.tensor(cpu["eigs"][0][:3])
            )
        rows.append(row)
    return rows


class NoisyNet(L.LightningModule):
    """Dropout, BatchNorm and SGD with momentum: every piece of state a measurement could disturb."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.Tanh(), nn.Dropout(0.3), nn.Linear(128, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _train_noisy(accelerator: str, callbacks: list) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    model = NoisyNet()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=30,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, DigitsDataModule(batch_size=256))
    opt = trainer.optimizers[0]
    return {
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "momentum": [opt.state[p]["momentum_buffer"].cpu().clone() for p in model.parameters()],
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0),
        "cpu_rng": torch.get_rng_state(),
    }


def bitwise(device: str) -> dict[str, Any]:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accel = "gpu" if device.startswith("cuda") else "cpu"
    plain = _train_noisy(accel, [])
    again = _train_noisy(accel, [])  # the control: is training on this device deterministic at all?
    monitor = HessianEigenMonitor(
        k=2, every_n_steps=5, probe=256, which="both", trace_every=2, density_every=3
    )
    eos = EdgeOfStabilityMonitor(monitor, proxies=True)
    watched = _train_noisy(accel, [monitor, eos])

    def same(a: dict, b: dict) -> dict[str, bool]:
        return {
            "parameters_and_buffers": all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]),
            "momentum": all(torch.equal(x, y) for x, y in zip(a["momentum"], b["momentum"], strict=True)),
            "cuda_rng": torch.equal(a["cuda_rng"], b["cuda_rng"]),
            "cpu_rng": torch.equal(a["cpu_rng"], b["cpu_rng"]),
        }

    return {
        "control": same(plain, again),
        "with_callbacks": same(plain, watched),
        "measurements": len(monitor.history),
    }


def _nccl_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=rank, world_size=2)
        t = torch.ones(4, device="cuda")
        dist.all_reduce(t)
        torch.cuda.synchronize()
        msg = f"ok: all_reduce gave {t[0].item()}"
        dist.destroy_process_group()
    except Exception as err:
        msg = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    Path(out, f"rank{rank}.txt").write_text(msg)


def nccl_two_ranks_one_gpu() -> list[str]:
    import tempfile

    import torch.multiprocessing as mp

    from tests.distributed.workers import free_port

    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _nccl_rank, args=(free_port(), out), nprocs=2, join=False, start_method="spawn"
        )
        deadline = time.time() + 90
        while not ctx.join(timeout=5) and time.time() < deadline:
            pass
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        return [
            Path(out, f"rank{r}.txt").read_text()
            if Path(out, f"rank{r}.txt").exists()
            else "no answer (killed after 90 s)"
            for r in range(2)
        ]


def _fmt(x: float) -> str:
    return f"{x:.1e}" if x < 1e-2 else f"{100 * x:.1f}%"


def render(results: dict[str, Any]) -> str:
    """The markdown section of BENCHMARKS.md from the JSON of one run."""
    env = results["env"]
    out = [
        f"## On a GPU: {env.get('gpu', env['device'])}",
        "",
        f"Run: `{results.get('command', 'python benchmarks/gpu.py')}` on {results.get('date', '?')}; torch "
        f"{env['torch']} (CUDA {env.get('cuda')}), lightning {env['lightning']}; one GPU, so DDP and FSDP2 ran "
        "as one rank each (NCCL refuses two ranks on one GPU: last table). CI has no GPU: these checks run "
        "only here.",
    ]
    if isinstance(results.get("accuracy"), list):
        out += [
            "",
            "**Accuracy on the GPU**: top-5 eigenvalues in float32 on the GPU (tol 1e-4) against a float64 "
            "Lanczos on the CPU (tol 1e-10), benchmark models of the CPU tables.",
            "",
            "| model | params | backend | HVPs | seconds | max rel. error, top 5 |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['model']} | {r['n_params'] / 1e3:.0f}k | {r['hvp']} | {r['n_hvp']} | {r['seconds']:.2f} | "
            f"{_fmt(r['max_rel_err_top5'])} |"
            for r in results["accuracy"]
        ]
    if isinstance(results.get("large"), list):
        out += [
            "",
            "**A 19M-parameter transformer** (d_model 512, 6 layers, 64 sequences of 128 tokens): top-5 on "
            "the GPU against float64 double backward on the GPU (tol 1e-8), cold start; peak memory is "
            "`torch.cuda.max_memory_allocated` during the measurement.",
            "",
            "| passes | HVPs | seconds | max rel. error, top 5 | peak GiB |",
            "|---|---|---|---|---|",
        ]
        for r in results["large"]:
            err = _fmt(r["max_rel_err_top5"]) if "max_rel_err_top5" in r else "reference"
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "–"
            out.append(f"| {r['case']} | {r['n_hvp']} | {r['seconds']:.1f} | {err} | {peak} |")
    if isinstance(results.get("attention"), list):
        out += [
            "",
            "**Attention kernels** (TinyTransformerLM, d_model 256, 2 layers, 16 sequences of 256 tokens): "
            '`hvp="auto"` against float64 double backward. Unpinned SDPA is scoped to the math kernel for '
            "double backward; a model that pins a fused kernel, which has no double backward, falls back to "
            "finite differences.",
            "",
            "| model | backend chosen | HVPs | seconds | rel. error, top 2 | warnings |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["attention"]:
            if "error" in r:
                out.append(f"| {r['case']} | fails: {r['error']} | | | | |")
            else:
                warned = ", ".join(r["warnings"]) or "–"
                out.append(
                    f"| {r['case']} | {r['hvp']} | {r['n_hvp']} | {r['seconds']:.2f} | {_fmt(r['rel_err'])} | {warned} |"
                )
    if isinstance(results.get("lightning"), list):
        out += [
            "",
            "**The callbacks under Lightning on the GPU**: the digits MLP (64-200-200-10, squared error, full "
            "batch, SGD lr 0.1 unless noted), 40 steps, `HessianEigenMonitor(k=3, every_n_steps=20)` on one "
            "fixed 512-sample probe and `EdgeOfStabilityMonitor`. 'everything' adds `which=\"both\"`, trace, "
            "density, proxies and DAL. Relative differences of the logged top-3 eigenvalues at steps 0, 20 "
            "and 40, where the training is the same as the single-device run's.",
            "",
            "| run | backend | λ_max at steps 0/20/40 | vs GPU single device | vs CPU at step 0 | metrics logged | s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["lightning"]:
            if "error" in r:
                out.append(f"| {r['run']} | fails: {r['error']} | | | | | |")
                continue
            eig = " / ".join(f"{x:.4f}" for x in r["eig_1"])
            same = _fmt(r["rel_vs_single_device"]) if "rel_vs_single_device" in r else "(other training)"
            out.append(
                f"| {r['run']} | {r['hvp']} | {eig} | {same} | {_fmt(r['rel_vs_cpu_at_fit_start'])} | "
                f"{r['n_metrics']} | {r['seconds']:.1f} |"
            )
    if isinstance(results.get("bitwise"), dict):
        b = results["bitwise"]
        held = lambda d: ", ".join(f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in d.items())  # noqa: E731
        out += [
            "",
            "**Bit-identical training on CUDA** (dropout, BatchNorm, SGD momentum, 30 steps, "
            f'`deterministic=True`; {b["measurements"]} measurements with `which="both"`, trace, density '
            "and proxies): two runs without callbacks: "
            f"{held(b['control'])}; with against without: {held(b['with_callbacks'])}.",
        ]
    if isinstance(results.get("nccl2"), list):
        out += ["", "**NCCL, two ranks on the one GPU**: " + "; ".join(results["nccl2"][:1])]
    if isinstance(results.get("hvp"), list):
        rows = results["hvp"]
        out += [
            "",
            "**Cost of one HVP on the GPU** as a multiple of one gradient (median of "
            f"{rows[0]['repeats']} interleaved repeats, CUDA-synchronised; harness of the CPU table).",
            "",
            "| backend | "
            + " | ".join(f"{r['model']} ({r['n_params'] / 1e6:.2g}M, batch {r['probe']})" for r in rows)
            + " |",
            "|---" * (len(rows) + 1) + "|",
            "| plain gradient | " + " | ".join(f"{r['grad_ms']:.1f} ms" for r in rows) + " |",
        ]
        for i in range(len(rows[0]["rows"])):
            label = rows[0]["rows"][i]["label"].replace("block of 20", "block of 20 (4 at 19M)")
            cells = [
                f"**{r['rows'][i]['ratio']:.2f}×**" if r["rows"][i]["error"] is None else "fails"
                for r in rows
            ]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    if isinstance(results.get("floor"), list):
        out += [
            "",
            "**The measurement's floor on the GPU** (the CPU table's harness, `benchmarks/measurement_cost.py`, "
            "CUDA-synchronised): one cold top-5 measurement's seconds per product against one exact product "
            "through the cached gradient graph, timed in alternation; what is left above 1 is the solver's own "
            "work and its waits on the device.",
            "",
            *floor_table(results["floor"]),
        ]
    return "\n".join(out) + "\n"


def _env(device: str) -> dict[str, Any]:
    info = {"torch": torch.__version__, "lightning": L.__version__, "device": device}
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="sections to run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None, help="render this JSON as markdown and stop")
    parser.add_argument(
        "--out", type=Path, default=None, help="with --render: rewrite the gpu section of this file"
    )
    parser.add_argument(
        "--section", default="gpu", help="with --out: the section's name (one section per run and machine)"
    )
    args = parser.parse_args()
    if args.render is not None:
        body = render(json.loads(args.render.read_text()))
        print(body)
        if args.out is not None:
            from benchmarks.report import rewrite

            rewrite(args.out, args.section, body)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {
        "env": _env(device),
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(results["env"]), flush=True)
    sections = {
        "accuracy": lambda: accuracy(device, args.quick),
        "large": lambda: large(device, args.quick),
        "attention": lambda: attention(device, args.quick),
        "lightning": lambda: lightning(device),
        "bitwise": lambda: bitwise(device),
        "nccl2": nccl_two_ranks_one_gpu if device.startswith("cuda") else lambda: ["skipped: no CUDA"],
        "hvp": lambda: hvp_table(device, args.quick),
        "floor": lambda: floor(device, args.quick),
    }
    for name, run in sections.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            results[name] = run()
        except Exception as err:
            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        print(
            f"## {name} ({time.perf_counter() - start:.0f} s)\n{json.dumps(results[name], indent=1, default=str)}",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
