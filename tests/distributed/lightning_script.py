"""A Lightning fit under a launcher that re-launches ``sys.argv`` (``ddp``, ``ModelParallelStrategy``).

Usage: ``python tests/distributed/lightning_script.py {ddp|fsdp|fsdp_validation} OUT_DIR``; each rank writes
``OUT_DIR/rank{r}.pt`` (see ``lightning_workers.py``).
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from lightning_workers import fit, fit_after_validation  # noqa: E402

if __name__ == "__main__":
    kind, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    strategy = "ddp" if kind == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    (fit_after_validation if kind == "fsdp_validation" else fit)(strategy, out)
