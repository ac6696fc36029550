"""How accurate finite-difference Hessian-vector products are, by model and precision, and at which step.

For each benchmark model (``mlp``, ``cnn``, ``transformer``, and ``llama``: the Llama-style LM with tied
embeddings, RMSNorm, rotary positions and SwiGLU), pre-trained as in ``benchmarks/models.py`` and measured on
a probe batch of 128: the top-5 eigenvalues by central finite differences, relative to the exact ones
(double backward in float64, tol 1e-9), in float64, float32 and bfloat16:

- double backward in the same precision (what the precision alone costs);
- ``hvp="finite_difference"`` at the default step (``hessian_eigenpairs``: what a user gets);
- fixed steps ``c * eps^(1/3)`` per unit move for c = 0.1 and 1 (1 was the rule before the default 0.3);
- Richardson extrapolation, ``(4 D(h) - D(2h)) / 3`` with ``h = 0.3 * eps^(1/5)`` (the step that balances
  its ``O(h^4)`` truncation against rounding): four gradients per product instead of two.

``llama + HF casts`` is the same model with Hugging Face's two casts (RMSNorm in float32, logits cast to
float32 before the loss): in a float64 measurement its loss comes back in float32, and the default step
follows the loss's precision; the fixed steps take float64's epsilon.

Usage: ``python benchmarks/fd_accuracy.py --out BENCHMARKS.md`` (about 20 minutes on 2 CPU threads).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.models import LlamaStyleLM, make_bench  # noqa: E402
from benchmarks.report import rewrite  # noqa: E402
from pf_lightning import hessian_eigenpairs  # noqa: E402
from pf_lightning.curvature import ParameterSpace  # noqa: E402
from pf_lightning.curvature.hvp import FiniteDifferenceHVP  # noqa: E402
from pf_lightning.linalg import LinearOperator, lanczos  # noqa: E402
from pf_lightning.probe import map_tensors  # noqa: E402

K = 5
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
TOL = {torch.float64: 1e-8, torch.float32: 1e-5, torch.bfloat16: 1e-3}
FIXED = (0.1, 1.0)
MAX_HVP = 400


class FixedStep(LinearOperator):
    """The Hessian of one batch by central differences at a fixed step per unit move, on a copy of the
    model cast to ``dtype`` (no dropout or BatchNorm in these models: no measurement state needed)."""

    def __init__(self, model, loss_fn, batch, dtype: torch.dtype, relative_step: float) -> None:
        self.model = copy.deepcopy(model).to(dtype)
        self.batch = map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)
        space = ParameterSpace(self.model, dtype=dtype)
        super().__init__(space.n, torch.float32 if dtype == torch.bfloat16 else dtype, "cpu")
        self.backend = FiniteDifferenceHVP(space, lambda _: loss_fn(self.model, self.batch), relative_step)

    def _matmat(self, X: Tensor) -> Tensor:
        Xp = X.to(self.backend.space.dtype)
        self.backend.begin_block(Xp)
        try:
            return self.backend.apply(0, Xp).to(X.dtype)
        finally:
            self.backend.release()


class Richardson(FixedStep):
    """Central differences at h and 2h combined so that their h^2 error terms cancel."""

    def _matmat(self, X: Tensor) -> Tensor:
        near = super()._matmat(X)
        self.backend.relative_step *= 2
        try:
            far = super()._matmat(X)
        finally:
            self.backend.relative_step /= 2
        return (4 * near - far) / 3


def _errors(values: Tensor, reference: Tensor) -> tuple[float, float]:
    """Relative error of the top eigenvalue, and the largest over the top k."""
    rel = (values.double() - reference).abs() / reference.abs()
    return float(rel[0]), float(rel.max())


def _solve(
    net, loss_fn, batch, dtype: torch.dtype, hvp: str, reference: Tensor
) -> tuple[tuple[float, float], int]:
    result = hessian_eigenpairs(
        net, loss_fn, [batch], k=K, hvp=hvp, dtype=dtype, tol=TOL[dtype], max_hvp=MAX_HVP
    )
    return _errors(result.eigenvalues, reference), result.n_hvp


def measure(name: str) -> list[dict]:
    bench = make_bench("llama" if name.startswith("llama") else name, probe_size=128)
    model, batch = bench.model, bench.probe
    reference = hessian_eigenpairs(
        model, bench.loss_fn, [batch], k=K, hvp="double_backward", dtype=torch.float64, tol=1e-9
    ).eigenvalues.double()
    variants = [(name, model)]
    if name == "llama":
        casts = LlamaStyleLM(d=model.embed.weight.shape[1], hf_casts=True)
        casts.load_state_dict(model.state_dict())
        variants.append(("llama + HF casts", casts))
    rows = []
    for label, net in variants:
        for dtype in DTYPES if label == name else (torch.float64,):
            row = {"model": label, "dtype": str(dtype).removeprefix("torch."), "n": bench.n_params}

            row["exact"], _ = _solve(net, bench.loss_fn, batch, dtype, "double_backward", reference)
            row["default"], row["default_hvp"] = _solve(
                net, bench.loss_fn, batch, dtype, "finite_difference", reference
            )
            eps = torch.finfo(dtype).eps ** (1.0 / 3.0)
            for c in FIXED:
                result = lanczos(
                    FixedStep(net, bench.loss_fn, batch, dtype, c * eps),
                    k=K,
                    tol=TOL[dtype],
                    max_matvec=MAX_HVP,
                )
                row[c] = _errors(result.eigenvalues, reference), result.n_hvp
            richardson = Richardson(net, bench.loss_fn, batch, dtype, 0.3 * torch.finfo(dtype).eps ** 0.2)
            result = lanczos(richardson, k=K, tol=TOL[dtype], max_matvec=MAX_HVP)
            row["richardson"] = _errors(result.eigenvalues, reference), result.n_hvp
            print(row, flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    def pair(e: tuple[float, float]) -> str:
        return f"{e[0]:.1e} / {e[1]:.1e}"

    def run(e: tuple[float, float], hvp: int) -> str:
        return f"{pair(e)} ({hvp}{'!' if hvp >= MAX_HVP else ''})"

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Accuracy of finite differences",
        "",
        f"Run: `{command}` on {now}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads. Each "
        "benchmark model pre-trained, on a probe batch of 128; relative error of the top eigenvalue / the "
        "largest over the top 5, against double backward in float64 (tol 1e-9), with the products each run "
        f"took (`!`: out of its {MAX_HVP}, not converged). Solver tol 1e-8 (float64), 1e-5 (float32), "
        "1e-3 (bfloat16). `c` is the step per unit move over eps^(1/3); the default is c = 0.3, with the "
        "epsilon of the loss's dtype when that is coarser than the measurement's. Richardson: "
        "(4 D(h) - D(2h)) / 3 at h = 0.3 eps^(1/5), four gradients per product (products counted once).",
        "",
        "| model | dtype | double backward | finite differences, default | c = 0.1 | c = 1 (before) | Richardson |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fixed = " | ".join(run(*r[c]) for c in (*FIXED, "richardson"))
        lines.append(
            f"| {r['model']} | {r['dtype']} | {pair(r['exact'])} | {run(r['default'], r['default_hvp'])} | {fixed} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer", "llama"])
    parser.add_argument("--out", type=Path, default=None, help="rewrite the fd-accuracy section of this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    rows = [row for name in args.models for row in measure(name)]
    body = markdown(
        rows,
        "python benchmarks/fd_accuracy.py"
        + (
            f" --models {' '.join(args.models)}"
            if args.models != ["mlp", "cnn", "transformer", "llama"]
            else ""
        ),
    )
    print(body)
    if args.out is not None:
        rewrite(args.out, "fd-accuracy", body)


if __name__ == "__main__":
    main()
