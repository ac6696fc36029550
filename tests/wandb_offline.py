"""Test helpers for offline W&B runs: the reader now lives in :mod:`pf_lightning.wandb_reader`.

Re-exported here so tests keep importing ``from wandb_offline import ...``; ``offline_env`` is the
test-only part (it needs pytest's ``monkeypatch``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import wandb

from pf_lightning.wandb_reader import (
    BLOCK_SIZE,
    CHUNK_HEADER,
    FILE_HEADER,
    FIRST,
    FULL,
    LAST,
    MIDDLE,
    ZERO,
    config,
    find_run_file,
    find_run_files,
    history,
    metric_definitions,
    read_chunks,
    read_records,
    summary,
    tables,
)

__all__ = [
    "BLOCK_SIZE",
    "CHUNK_HEADER",
    "FILE_HEADER",
    "FIRST",
    "FULL",
    "LAST",
    "MIDDLE",
    "ZERO",
    "config",
    "find_run_file",
    "find_run_files",
    "history",
    "metric_definitions",
    "offline_env",
    "read_chunks",
    "read_records",
    "summary",
    "tables",
]


def offline_env(mp: Any, root: Path) -> None:
    """Keep everything wandb writes inside ``root``; start from a fresh wandb singleton."""
    for var, sub in [("DIR", ""), ("CACHE_DIR", "cache"), ("CONFIG_DIR", "config"), ("DATA_DIR", "data")]:
        mp.setenv(f"WANDB_{var}", str(root / sub))
    mp.setenv("WANDB_MODE", "offline")  # also restores it after WandbLogger sets it to "dryrun"
    mp.setenv("WANDB_SILENT", "true")
    mp.chdir(root)
    wandb.teardown()
