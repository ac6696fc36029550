"""Run the benchmarks and (with ``--out``) rewrite their sections of BENCHMARKS.md.

    .venv/bin/python benchmarks/run.py all --out BENCHMARKS.md     # full size (what `make bench` runs)
    .venv/bin/python benchmarks/run.py all --quick                 # smoke test, under ~2 minutes

Subcommands: ``hvp`` (cost of one HVP per backend), ``solvers`` (top-k eigenvalues, pf_lightning
against SciPy ARPACK, PyHessian and hessian-eigenthings, cold and warm), ``all`` (both).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable as a package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import report, solvers  # noqa: E402
from benchmarks.hvp_cost import hvp_cost  # noqa: E402
from benchmarks.models import make_bench  # noqa: E402


def config(quick: bool) -> dict:
    """Sizes and settings of a run. ``quick`` shrinks everything to a smoke test."""
    if quick:
        return {
            "probe": {"mlp": 256, "cnn": 256, "transformer": 64},
            "pretrain": 30,
            "hvp_repeats": 3,
            "ks": [1, 5],
            "pyhessian": [(100, 1e-3, "defaults"), (300, 1e-5, "tight")],
            "power": [(100, 1e-4, "defaults")],
            "lanczos_grid": [5, 10, 15, 20, 30, 40, 60, 80],
            "warm_steps": 10,
            "warm_lr_factors": [0.1, 1.0],
            "ncv_grid": {1: [3, 5, 8], 5: [8, 11, 15]},
        }
    return {
        "probe": {"mlp": 512, "cnn": 512, "transformer": 128},
        "pretrain": 100,
        "hvp_repeats": 15,
        "ks": [1, 5, 20],
        "pyhessian": [(100, 1e-3, "defaults"), (1000, 1e-4, "tol 1e-4"), (1000, 1e-5, "tol 1e-5")],
        "power": [(100, 1e-4, "defaults"), (1000, 1e-3, "tol 1e-3, long")],
        "lanczos_grid": [5, 8, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100, 120, 140, 160, 200, 250, 300],
        "warm_steps": 10,
        "warm_lr_factors": [0.1, 1.0],
        "ncv_grid": {1: [3, 5, 8, 12], 5: [8, 11, 15], 20: [25, 30, 50]},
    }


def bench_for(name: str, cfg: dict, quick: bool):
    return make_bench(name, probe_size=cfg["probe"][name], pretrain_steps=cfg["pretrain"], quick=quick)


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        if model:
            name = f"{name} ({model})"
    except OSError:
        pass
    return name


def interpreter() -> str:
    """The Python that ran, relative to the repository when it lives there (``.venv/bin/python``)."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(ROOT))
    except ValueError:
        return str(exe)


def load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def info(start: float, load_before: str, extra: str = "") -> dict:
    return {
        "command": " ".join(shlex.quote(a) for a in [interpreter(), *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": load(),
        "minutes": (time.perf_counter() - start) / 60,
        "extra": extra,
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_hvp(cfg: dict, quick: bool) -> str:
    start, before = time.perf_counter(), load()
    results = []
    for name in ("mlp", "cnn", "transformer"):
        log(f"[hvp] {name}")
        results.append(hvp_cost(bench_for(name, cfg, quick), cfg["hvp_repeats"]))
    return report.hvp_markdown(results, info(start, before))


def run_solvers(cfg: dict, quick: bool) -> str:
    start, before = time.perf_counter(), load()
    ks = cfg["ks"]
    kmax = max(ks)
    model_results = []
    for name in ("mlp", "transformer"):
        bench = bench_for(name, cfg, quick)
        log(f"[solvers] {name}: reference")
        ref = solvers.reference(bench, kmax)
        values = ref["values"]
        rows, previous = [], {}
        for k in ks:
            log(f"[solvers] {name}: pf_lightning and ARPACK, top-{k}")
            row, previous[k] = solvers.pf_row(bench, values, k, "pf_lightning Lanczos, cold", "tol=1e-3")
            rows.append(row)
        rows += [solvers.arpack_row(bench, values, k) for k in ks]
        arpack_spent = 0
        for k in ks:
            row, spent = solvers.arpack_tuned_row(bench, values, k, cfg["ncv_grid"][k])
            rows.append(row)
            arpack_spent += spent
        for max_iter, tol, label in cfg["pyhessian"]:
            log(f"[solvers] {name}: PyHessian {label}")
            rows += solvers.pyhessian_rows(bench, values, ks, max_iter, tol, label)
        log(f"[solvers] {name}: hessian-eigenthings")
        rows += [solvers.eigenthings_lanczos_default(bench, values, k) for k in ks]
        search_rows, spent = solvers.eigenthings_lanczos_search(bench, values, ks, cfg["lanczos_grid"])
        rows += search_rows
        for max_iter, tol, label in cfg["power"]:
            log(f"[solvers] {name}: eigenthings power iteration {label}")
            rows += solvers.eigenthings_power_rows(bench, values, ks, max_iter, tol, label)
        # Full-batch SGD at h = c / lambda_max moves the parameters between two measurements: c = 0.1 is a
        # small move, c = 1 the largest step that is still monotone along the top direction.
        warm = []
        for c in cfg["warm_lr_factors"]:
            lr = round(c / float(values[0]), 4)
            log(f"[solvers] {name}: warm starts after {cfg['warm_steps']} SGD steps at lr {lr}")
            warm_rows, warm_info = solvers.warm_rows(bench, ks, previous, cfg["warm_steps"], lr, values, kmax)
            warm.append({"factor": c, "rows": warm_rows, "info": warm_info})
        model_results.append(
            {
                "model": name,
                "n_params": bench.n_params,
                "probe": int(bench.probe[0].shape[0]),
                "reference": ref,
                "rows": rows,
                "search_spent": spent,
                "arpack_spent": arpack_spent,
                "warm": warm,
            }
        )
    return report.solvers_markdown(model_results, ks, info(start, before))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("hvp", "solvers", "all"))
    parser.add_argument("--quick", action="store_true", help="small models, few repeats: a smoke test")
    parser.add_argument("--out", type=Path, help="rewrite this file's results sections (BENCHMARKS.md)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    cfg = config(args.quick)
    start = time.perf_counter()
    sections = {}
    if args.what in ("hvp", "all"):
        sections["hvp"] = run_hvp(cfg, args.quick)
        print(sections["hvp"], flush=True)
    if args.what in ("solvers", "all"):
        sections["solvers"] = run_solvers(cfg, args.quick)
        print(sections["solvers"], flush=True)
    if args.out is not None:
        for name, body in sections.items():
            report.rewrite(args.out, name, body)
        log(f"rewrote {', '.join(sections)} in {args.out}")
    log(f"total {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
