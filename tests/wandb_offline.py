"""Test helper for offline W&B runs (the reader itself is :mod:`pf_lightning.wandb_reader`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import wandb


def offline_env(mp: Any, root: Path) -> None:
    """Keep everything wandb writes inside ``root``; start from a fresh wandb singleton."""
    for var, sub in [("DIR", ""), ("CACHE_DIR", "cache"), ("CONFIG_DIR", "config"), ("DATA_DIR", "data")]:
        mp.setenv(f"WANDB_{var}", str(root / sub))
    mp.setenv("WANDB_MODE", "offline")  # also restores it after WandbLogger sets it to "dryrun"
    mp.setenv("WANDB_SILENT", "true")
    mp.chdir(root)
    wandb.teardown()
