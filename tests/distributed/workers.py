"""Shared helpers of the multi-process tests: process launch, collective counting, rank shards.

Workers run in fresh processes (``torch.multiprocessing`` spawn, gloo on CPU) and hand their results
back as ``torch.save`` files, one per rank, which the test process compares with single-process
references computed on the union of the ranks' probe shards.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: cases.py, lightning_models.py

from cases import Case, make_case  # noqa: E402

WORLD = 2
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "barrier")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, port: int, out: str, args: tuple, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # A gloo worker thread may still be releasing the last collective's work, whose tensors need the
    # GIL; if the interpreter is finalizing by then, the thread aborts the process (SIGABRT, "terminate
    # called without an active exception": 8 of 26 two-rank FSDP2 launches on torch 2.13, results
    # already saved). Leave without finalizing; a failure above still exits through mp.spawn's handler.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable, out: Path, *args: Any, world: int = WORLD) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world`` gloo ranks; return what each rank returned, in rank order."""
    mp.spawn(_entry, args=(fn, free_port(), str(out), args, world), nprocs=world, join=True)
    return load(out, world)


def load(out: Path, world: int = WORLD) -> list[Any]:
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


@contextlib.contextmanager
def count_collectives() -> Iterator[list[tuple[str, int]]]:
    """Record ``(name, numel)`` of every collective issued through ``torch.distributed`` meanwhile."""
    calls: list[tuple[str, int]] = []
    saved = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name: str, original: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls.append((name, 0 if tensor is None else tensor.numel()))
            return original(*args, **kwargs)

        return wrapper

    for name, original in saved.items():
        setattr(dist, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


# -- the data: one case, its batches split unevenly over the ranks --------------------------------
def global_case(dtype: torch.dtype = torch.float64) -> Case:
    """The ``mlp`` case with a third batch: 12 + 7 samples on rank 0, 5 on rank 1 (uneven on purpose)."""
    case = make_case("mlp", dtype)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 10, generator=gen, dtype=torch.float64).to(dtype)
    case.batches = [*case.batches, (x, torch.randint(0, 3, (5,), generator=gen))]
    return case


def shard(case: Case, rank: int) -> list:
    return case.batches[:2] if rank == 0 else case.batches[2:]


def poisoned(batches: list) -> list:
    """The same batches with one NaN input value in the first."""
    (x, y), *rest = batches
    x = x.clone()
    x[0, 0] = float("nan")
    return [(x, y), *rest]


def model_copy(case: Case, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(case.model).to(dtype)
