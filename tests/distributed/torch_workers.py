"""Rank functions of the plain ``torch.distributed`` tests (no Lightning): run by ``workers.spawn``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from workers import count_collectives, global_case, model_copy, poisoned, shard

from pf_lightning import batch_sharpness, critical_sharpness, hessian_eigenpairs
from pf_lightning.curvature import HessianOperator, NonFiniteLossError, ParameterSpace
from pf_lightning.curvature.drift import gradient_curvature
from pf_lightning.linalg import NonFiniteOperatorError
from pf_lightning.measure import eigenvalue_stderr, hessian_trace


def _cast(batches: list, dtype: torch.dtype) -> list:
    return [(x.to(dtype), y) for x, y in batches]


def _measure(model: nn.Module, loss_fn: Any, batches: list, **kwargs: Any) -> dict[str, Any]:
    with count_collectives() as calls:
        result = hessian_eigenpairs(model, loss_fn, batches, **kwargs)
    return {
        "eigenvalues": result.eigenvalues,
        "eigenvectors": result.eigenvectors,
        "residuals": result.residuals,
        "converged": result.converged,
        "n_hvp": result.n_hvp,
        "hvp": result.info["hvp"],
        "calls": calls,
    }


def _skip_together(model: nn.Module, loss_fn: Any, batches: list, rank: int) -> str:
    """Rank 1 meets a NaN: every rank must raise, after the same collectives (no hang)."""
    bad = poisoned(batches) if rank == 1 else batches
    try:
        hessian_eigenpairs(model, loss_fn, bad, k=2, tol=1e-6)
    except (NonFiniteLossError, NonFiniteOperatorError) as err:
        return type(err).__name__
    return "no error"


def ddp(rank: int) -> dict[str, Any]:
    """Replicated parameters: eigenpairs in float64 and float32, LOBPCG, finite differences, trace,
    a NaN on one rank, and a measurement after it (the ranks must still be in step)."""
    case = global_case()
    mine = shard(case, rank)
    out: dict[str, Any] = {"n": case.n}
    model = model_copy(case, torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    out["lanczos64"] = _measure(model, case.loss_fn, mine, k=3, tol=1e-9, max_hvp=600)
    out["lobpcg64"] = _measure(model, case.loss_fn, mine, k=2, which="both", tol=1e-8, method="lobpcg")
    out["fd64"] = _measure(model, case.loss_fn, mine, k=2, tol=1e-8, hvp="finite_difference")
    out["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    model32 = model_copy(case, torch.float32)
    out["lanczos32"] = _measure(model32, case.loss_fn, _cast(mine, torch.float32), k=3, tol=1e-4, max_hvp=600)
    ddp_model = nn.parallel.DistributedDataParallel(model)  # the wrapper is unwrapped by the measurement
    out["wrapped"] = _measure(ddp_model, case.loss_fn, mine, k=1, tol=1e-9)["eigenvalues"]
    out["trace"] = hessian_trace(model, case.loss_fn, mine, method="hutchinson", n_hvp=6, seed=3).trace
    # 4 groups on rank 0, 3 on rank 1: rank 0 deals its 4 into 3
    top = out["lanczos64"]["eigenvectors"][:, 0]
    out["stderr"] = eigenvalue_stderr(model, case.loss_fn, mine, top, chunks=3, hvp="double_backward")
    out["nan"] = _skip_together(model, case.loss_fn, mine, rank)
    out["after_nan"] = _measure(model, case.loss_fn, mine, k=1, tol=1e-9)["eigenvalues"]
    # Each rank's first batch: together one global mini-batch, as DDP steps on.
    out["batch_sharpness"] = batch_sharpness(model, case.loss_fn, mine[:1]).value
    out["critical"] = critical_sharpness(model, case.loss_fn, mine, rel_tol=1e-4).value
    return out


def fsdp(rank: int) -> dict[str, Any]:
    """FSDP2-sharded parameters (``fully_shard`` per layer and on the root), float64, uneven shards
    (rank 0 holds two batches, rank 1 one, so rank 1 pads a pass)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    case = global_case()
    mine = shard(case, rank)
    model = model_copy(case, torch.float64)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    space = ParameterSpace(model)
    global_index = torch.arange(space.global_n, dtype=torch.float64)[:, None]
    out: dict[str, Any] = {"n": space.n, "global_n": space.global_n}
    out["rows"] = space.local_rows(global_index)[:, 0].long()
    before = [p.to_local().detach().clone() for p in model.parameters()]
    out["auto"] = _measure(model, case.loss_fn, mine, k=3, tol=1e-8, max_hvp=600)
    out["unchanged"] = all(
        torch.equal(a, p.to_local()) and p.grad is None
        for a, p in zip(before, model.parameters(), strict=True)
    )
    out["trace"] = hessian_trace(model, case.loss_fn, mine, method="hutchinson", n_hvp=6, seed=3).trace
    out["stderr"] = eigenvalue_stderr(model, case.loss_fn, mine, out["auto"]["eigenvectors"][:, 0], chunks=3)
    try:
        hessian_eigenpairs(model, case.loss_fn, mine, k=1, hvp="double_backward")
        out["exact_backend"] = "no error"
    except ValueError as err:
        out["exact_backend"] = str(err)
    out["nan"] = _skip_together(model, case.loss_fn, mine, rank)
    out["after_nan"] = _measure(model, case.loss_fn, mine, k=1, tol=1e-8)["eigenvalues"]
    before = [p.to_local().detach().clone() for p in model.parameters()]
    out["critical"] = critical_sharpness(model, case.loss_fn, mine, rel_tol=1e-4).value  # sharded, no HVP
    out["critical_unchanged"] = all(
        torch.equal(a, p.to_local()) and p.grad is None
        for a, p in zip(before, model.parameters(), strict=True)
    )
    root_only = model_copy(case, torch.float64)  # the root holds every parameter: gathered after a pass
    fully_shard(root_only, mesh=mesh)
    out["critical_root"] = critical_sharpness(root_only, case.loss_fn, mine, rel_tol=1e-4).value
    before = [p.to_local().detach().clone() for p in model.parameters()]
    with HessianOperator(model, case.loss_fn, mine) as op:  # DAL's default: moves the shards by e g
        out["drift"] = gradient_curvature(op, "forward_difference").hg_ratio
    out["drift_unchanged"] = all(
        torch.equal(a, p.to_local()) and p.grad is None
        for a, p in zip(before, model.parameters(), strict=True)
    )
    return out


def both(rank: int) -> dict[str, Any]:
    """Both layouts in one launch (process start-up dominates the cost of these tests)."""
    return {"ddp": ddp(rank), "fsdp": fsdp(rank)}


def loss_windows(rank: int, cases: list[tuple[int, ...]]) -> list[list[float]]:
    """For each case, the EoS monitor's loss window after ``counts[rank]`` steps of this rank (losses
    10 rank + i), averaged with the other ranks' as a measurement does."""
    from types import SimpleNamespace

    from pf_lightning import EdgeOfStabilityMonitor

    windows = []
    for counts in cases:
        eos = EdgeOfStabilityMonitor(loss_window=5)
        trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1)
        for i in range(counts[rank]):
            trainer.global_step = i + 1
            eos.on_train_batch_end(trainer, None, torch.tensor(float(10 * rank + i)), None, i)
        windows.append(eos._run_losses(torch.device("cpu")))
    return windows
