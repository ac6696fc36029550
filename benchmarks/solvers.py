"""Top-k Hessian eigenvalues to a relative residual of 1e-3: pf_lightning against the other tools.

Every method runs on the same model, the same probe batch and the same float32 parameters. Its cost is
counted in Hessian-vector products (HVPs) and wall-clock seconds; its accuracy is measured the same
way for all of them, outside the method:

- ``eig_err``: max over the top-k of ``|lambda_i - ref_i| / |ref_i|`` (both sorted descending), with the
  reference from pf_lightning's Lanczos in float64 at ``tol=1e-8`` (the models are too large for a
  dense Hessian), cross-checked against SciPy ARPACK in float64 at ``tol=1e-10``;
- ``max_res``: max over the top-k of ``||H v_i - lambda_i v_i|| / |lambda_i|`` for the values and
  (normalized) vectors the method returned, with ``H`` applied in float32 by an extra exact product
  that is not counted in the method's cost.

Foreign tools run on a deep copy of the model (PyHessian leaves it in eval mode with graph-carrying
``.grad``), under the math SDPA kernel (the fused kernels have no double backward).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg as sla
import torch
from torch import Tensor, nn

from pf_lightning import EigenResult, HessianOperator, NonConvergenceWarning, hessian_eigenpairs
from pf_lightning.curvature.hvp import math_attention

from .models import Bench

TOL = 1e-3


@dataclass
class Row:
    model: str
    k: int
    method: str
    settings: str
    n_hvp: int
    seconds: float
    eig_err: float
    max_res: float
    note: str = ""


# -- accuracy -------------------------------------------------------------------------------------
def reference(bench: Bench, k: int, check: bool = True) -> dict:
    """Top-k eigenvalues in float64: pf_lightning Lanczos at tol 1e-8, checked against ARPACK
    (float64, tol 1e-10) when ``check``."""
    start = time.perf_counter()
    res = hessian_eigenpairs(
        bench.model,
        bench.loss_fn,
        bench.probe,
        k=k,
        tol=1e-8,
        hvp="double_backward",
        dtype=torch.float64,
        max_hvp=4000,
    )
    seconds = time.perf_counter() - start
    if not res.all_converged:
        raise RuntimeError(f"the float64 reference did not converge on {bench.name}")
    values = res.eigenvalues.double()
    arpack = _arpack(bench, k, tol=1e-10, dtype=torch.float64) if check else None
    return {
        "values": values,
        "n_hvp": res.n_hvp,
        "seconds": seconds,
        "arpack_agreement": None if arpack is None else eig_error(arpack["values"], values),
        "arpack_n_hvp": None if arpack is None else arpack["n_hvp"],
    }


def eig_error(values: Tensor, ref: Tensor) -> float:
    values = torch.sort(values.detach().double().cpu(), descending=True).values
    k = values.numel()
    return float(((values - ref[:k]).abs() / ref[:k].abs()).max())


def true_residual(bench: Bench, values: Tensor, vectors: Tensor) -> float:
    """Max relative residual of (values, vectors (n, k)) under the float32 Hessian."""
    values = values.detach().to(torch.float32).cpu()
    V = vectors.detach().to(torch.float32).cpu()
    V = V / torch.linalg.vector_norm(V, dim=0, keepdim=True)
    with HessianOperator(bench.model, bench.loss_fn, bench.probe, hvp="double_backward") as op:
        HV = op.matmat(V)
    return float((torch.linalg.vector_norm(HV - V * values, dim=0) / values.abs()).max())


def _row(
    bench: Bench,
    ref: Tensor,
    k: int,
    method: str,
    settings: str,
    n_hvp: int,
    seconds: float,
    values: Tensor,
    vectors: Tensor,
    note: str = "",
) -> Row:
    return Row(
        bench.name,
        k,
        method,
        settings,
        int(n_hvp),
        seconds,
        eig_error(values, ref),
        true_residual(bench, values, vectors),
        note,
    )


# -- pf_lightning ---------------------------------------------------------------------------------
def pf(bench: Bench, k: int, **kwargs) -> tuple[EigenResult, float]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        res = hessian_eigenpairs(
            bench.model, bench.loss_fn, bench.probe, k=k, tol=TOL, hvp="double_backward", **kwargs
        )
    return res, time.perf_counter() - start


def pf_row(bench: Bench, ref: Tensor, k: int, label: str, settings: str, **kwargs) -> tuple[Row, EigenResult]:
    res, seconds = pf(bench, k, **kwargs)
    notes = [] if res.all_converged else [f"{int((~res.converged).sum())} pair(s) not converged"]
    if "warm_method" in res.info:  # the start method="auto" chose
        notes.append({"block": "a block", "lanczos": "Lanczos"}[res.info["warm_method"]])
    note = "; ".join(notes)
    row = _row(bench, ref, k, label, settings, res.n_hvp, seconds, res.eigenvalues, res.eigenvectors, note)
    return row, res


# -- SciPy ARPACK ---------------------------------------------------------------------------------
def _arpack(
    bench: Bench,
    k: int,
    tol: float,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    ncv: int | None = None,
) -> dict:
    """``eigsh(which='LA')`` on a float64 ``LinearOperator`` whose products are pf_lightning's
    double-backward HVPs in ``dtype`` (ARPACK's Lanczos vectors stay in float64)."""
    with HessianOperator(bench.model, bench.loss_fn, bench.probe, hvp="double_backward", dtype=dtype) as op:

        def matvec(x: np.ndarray) -> np.ndarray:
            X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1, 1)).to(op.dtype)
            return op.matmat(X).double().numpy().reshape(x.shape)

        A = sla.LinearOperator((op.n, op.n), matvec=matvec, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(op.n)
        start = time.perf_counter()
        values, vectors = sla.eigsh(A, k=k, which="LA", tol=tol, v0=v0, ncv=ncv)
        seconds = time.perf_counter() - start
        n_hvp = op.n_matvec
    return {
        "values": torch.from_numpy(values.copy()),
        "vectors": torch.from_numpy(vectors.copy()),
        "n_hvp": n_hvp,
        "seconds": seconds,
    }


def arpack_row(bench: Bench, ref: Tensor, k: int, tol: float = TOL) -> Row:
    out = _arpack(bench, k, tol)
    return _row(
        bench,
        ref,
        k,
        "SciPy eigsh (ARPACK)",
        f"which='LA', tol={tol:g}, default ncv=max(2k+1, 20)",
        out["n_hvp"],
        out["seconds"],
        out["values"],
        out["vectors"],
    )


def arpack_tuned_row(bench: Bench, ref: Tensor, k: int, grid: list[int], tol: float = TOL) -> tuple[Row, int]:
    """ARPACK with the ``ncv`` (Lanczos basis size) of ``grid`` that needs the fewest products: its
    default ``ncv >= 20`` makes it pay at least 20 products even for k = 1. Returns the row and the
    products the whole search spent."""
    runs = [(ncv, _arpack(bench, k, tol, ncv=ncv)) for ncv in grid if k < ncv <= bench.n_params]
    ncv, out = min(runs, key=lambda run: run[1]["n_hvp"])
    row = _row(
        bench,
        ref,
        k,
        "SciPy eigsh (ARPACK), tuned ncv",
        f"which='LA', tol={tol:g}, ncv: fewest products of a small grid",
        out["n_hvp"],
        out["seconds"],
        out["values"],
        out["vectors"],
        note=f"ncv={ncv}",
    )
    return row, sum(o["n_hvp"] for _, o in runs)


# -- PyHessian ------------------------------------------------------------------------------------
def pyhessian_rows(
    bench: Bench, ref: Tensor, ks: list[int], max_iter: int, tol: float, label: str, seed: int = 0
) -> list[Row]:
    """One ``hessian(...).eigenvalues(top_n=max(ks))`` run; the rows for smaller k are its prefixes.

    PyHessian finds the eigenvalues one after the other (power iteration, deflated by
    orthogonalization), each from a fresh ``torch.randn`` start: with the same seed, ``top_n=k`` returns
    exactly the first k of a ``top_n=K`` run. Its products are counted by wrapping its
    ``hessian_vector_product``; the cost of the first k pairs is read when the (k+1)-th starts.
    """
    import sys

    import pyhessian  # noqa: F401 - registers the submodule, whose name the package shadows with a class

    ph = sys.modules["pyhessian.hessian"]
    kmax = max(ks)
    model = copy.deepcopy(bench.model)
    count, marks = [0], {}
    t0 = [0.0]
    orig_hvp, orig_orth = ph.hessian_vector_product, ph.orthnormal

    def counting_hvp(*args, **kwargs):
        count[0] += 1
        return orig_hvp(*args, **kwargs)

    def marking_orth(w, v_list):
        marks.setdefault(len(v_list), (count[0], time.perf_counter() - t0[0]))
        return orig_orth(w, v_list)

    ph.hessian_vector_product, ph.orthnormal = counting_hvp, marking_orth
    try:
        torch.manual_seed(seed)
        with math_attention():
            t0[0] = time.perf_counter()
            h = ph.hessian(model, nn.CrossEntropyLoss(), data=bench.probe, cuda=False)
            values, vectors = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=kmax)
            marks[kmax] = (count[0], time.perf_counter() - t0[0])
    finally:
        ph.hessian_vector_product, ph.orthnormal = orig_hvp, orig_orth
    flat = torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in vectors], dim=1)
    vals = torch.tensor(values, dtype=torch.float64)
    settings = f"maxIter={max_iter}, tol={tol:g}"
    return [
        _row(bench, ref, k, f"PyHessian ({label})", settings, marks[k][0], marks[k][1], vals[:k], flat[:, :k])
        for k in ks
    ]


# -- hessian-eigenthings --------------------------------------------------------------------------
def _et_operator(bench: Bench, model: nn.Module) -> tuple[object, list[int]]:
    import hessian_eigenthings as he

    base = he.HessianOperator(model, [bench.probe], he.supervised_loss(nn.functional.cross_entropy))
    count = [0]

    def matvec(v: Tensor) -> Tensor:
        count[0] += 1
        return base.matvec(v)

    return he.LambdaOperator(matvec, size=base.size, device=base.device, dtype=base.dtype), count


def eigenthings_lanczos_default(bench: Bench, ref: Tensor, k: int, seed: int = 0) -> Row:
    """``lanczos(op, k=k)`` with its defaults: ``max_iter=2k`` steps, ``which='LM'``, one pass."""
    import hessian_eigenthings as he

    model = copy.deepcopy(bench.model)
    op, count = _et_operator(bench, model)
    start = time.perf_counter()
    with math_attention():
        out = he.lanczos(op, k=k, seed=seed)
    seconds = time.perf_counter() - start
    note = f"max_iter={2 * k}"
    if not bool(out.converged.all()):
        note += f"; {int((~out.converged).sum())} flagged unconverged"
    return _row(
        bench,
        ref,
        k,
        "eigenthings lanczos (defaults)",
        "max_iter=2k, which='LM', tol=1e-4",
        count[0],
        seconds,
        out.eigenvalues,
        out.eigenvectors.mT,
        note,
    )


SEARCH_SETTINGS = (
    "which='LA', tol=1e-3, reorthogonalize=True; smallest max_iter of the grid flagged converged"
)


def eigenthings_lanczos_search(
    bench: Bench, ref: Tensor, ks: list[int], grid: list[int], seed: int = 0
) -> tuple[list[Row], int]:
    """The smallest ``max_iter`` of ``grid`` for which ``lanczos(which='LA', tol=1e-3,
    reorthogonalize=True)`` flags all top-k pairs converged.

    With a fixed seed the Krylov basis does not depend on k, so one run with ``k=max(ks)`` gives the
    top-k of every smaller k. The row reports the cost of the run that was accepted (what a user who
    knew the right ``max_iter`` in advance would pay); the whole search cost is returned too.
    """
    import hessian_eigenthings as he

    kmax = max(ks)
    found: dict[int, Row] = {}
    spent = 0
    last = None
    for m in grid:
        model = copy.deepcopy(bench.model)
        op, count = _et_operator(bench, model)
        start = time.perf_counter()
        with math_attention():
            out = he.lanczos(
                op, k=min(kmax, m), max_iter=m, tol=TOL, which="LA", reorthogonalize=True, seed=seed
            )
        seconds = time.perf_counter() - start
        spent += count[0]
        last = (m, out, count[0], seconds)
        for k in ks:
            if k not in found and k <= m and bool(out.converged[:k].all()):
                found[k] = _row(
                    bench,
                    ref,
                    k,
                    "eigenthings lanczos (searched max_iter)",
                    SEARCH_SETTINGS,
                    count[0],
                    seconds,
                    out.eigenvalues[:k],
                    out.eigenvectors[:k].mT,
                    note=f"max_iter={m}",
                )
        if len(found) == len(ks):
            break
    rows = []
    for k in ks:
        if k in found:
            rows.append(found[k])
        elif last is not None and k <= last[0]:
            m, out, n, seconds = last
            rows.append(
                _row(
                    bench,
                    ref,
                    k,
                    "eigenthings lanczos (searched max_iter)",
                    SEARCH_SETTINGS,
                    n,
                    seconds,
                    out.eigenvalues[:k],
                    out.eigenvectors[:k].mT,
                    note=f"max_iter={m}: not flagged converged",
                )
            )
    return rows, spent


def eigenthings_power_rows(
    bench: Bench, ref: Tensor, ks: list[int], max_iter: int, tol: float, label: str, seed: int = 0
) -> list[Row]:
    """One ``deflated_power_iteration(k=max(ks))`` run; smaller k are its prefixes (pair i starts from
    ``seed + i`` and depends only on the pairs before it)."""
    import hessian_eigenthings as he
    import hessian_eigenthings.algorithms.power_iteration as pi

    kmax = max(ks)
    model = copy.deepcopy(bench.model)
    op, count = _et_operator(bench, model)
    found: list[tuple[float, Tensor, bool]] = []
    marks: dict[int, tuple[int, float]] = {}
    orig = pi.power_iteration_one
    start = time.perf_counter()

    def marking(*args, **kwargs):
        lam, vec, res, iters, conv = orig(*args, **kwargs)
        found.append((lam, vec, conv))
        marks[len(found)] = (count[0], time.perf_counter() - start)
        return lam, vec, res, iters, conv

    pi.power_iteration_one = marking
    try:
        with math_attention():
            he.deflated_power_iteration(op, k=kmax, max_iter=max_iter, tol=tol, seed=seed)
    finally:
        pi.power_iteration_one = orig
    rows = []
    for k in ks:
        vals = torch.tensor([f[0] for f in found[:k]], dtype=torch.float64)
        vecs = torch.stack([f[1] for f in found[:k]], dim=1)
        n_bad = sum(not f[2] for f in found[:k])
        note = f"{n_bad} flagged unconverged" if n_bad else ""
        rows.append(
            _row(
                bench,
                ref,
                k,
                f"eigenthings power iteration ({label})",
                f"max_iter={max_iter}, tol={tol:g}",
                marks[k][0],
                marks[k][1],
                vals,
                vecs,
                note,
            )
        )
    return rows


# -- warm starts ----------------------------------------------------------------------------------
WARM_LABELS = (
    "pf_lightning Lanczos, cold",
    "pf_lightning warm, method='auto'",
    "pf_lightning warm, method='lobpcg'",
)


def warm_rows(
    bench: Bench,
    ks: list[int],
    previous: dict[int, EigenResult],
    steps: int,
    lr: float,
    ref0: Tensor,
    kref: int,
) -> tuple[list[Row], dict]:
    """Move the parameters by ``steps`` full-batch SGD steps at ``lr``, measure the top-k cold and
    warm-started from ``previous`` (the results at the old parameters), then put the parameters back."""
    saved = copy.deepcopy(bench.model.state_dict())
    try:
        bench.sgd_steps(steps, lr)
        ref = reference(bench, kref, check=False)
        ref1 = ref["values"]
        rows = []
        for k in ks:
            cold, warm_auto, warm_lobpcg = WARM_LABELS
            rows.append(pf_row(bench, ref1, k, cold, "tol=1e-3")[0])
            rows.append(pf_row(bench, ref1, k, warm_auto, "tol=1e-3", warm_start=previous[k])[0])
            rows.append(
                pf_row(bench, ref1, k, warm_lobpcg, "tol=1e-3", warm_start=previous[k], method="lobpcg")[0]
            )
    finally:
        bench.model.load_state_dict(saved)
    drift = {k: float(((ref1[:k] - ref0[:k]).abs() / ref0[:k].abs()).max()) for k in ks}
    return rows, {"drift": drift, "reference": ref, "steps": steps, "lr": lr}
