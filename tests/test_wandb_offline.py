"""The offline W&B reader (``pf_lightning.wandb_reader``) on real runs: plain wandb, and Lightning's WandbLogger."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import wandb
from wandb_offline import offline_env

from pf_lightning.wandb_reader import (
    FILE_HEADER,
    FIRST,
    LAST,
    MIDDLE,
    config,
    find_run_file,
    history,
    metric_definitions,
    read_chunks,
    read_records,
    summary,
    tables,
)

# step -> logged values; awkward floats prove the JSON round trip is exact
ROWS = {
    0: {"loss": 1 / 3, "hessian/eig_1": 12.5, "trainer/global_step": 0},
    3: {"loss": 0.1, "hessian/eig_1": -2.5e10, "trainer/global_step": 30},
    7: {"loss": 1e-300, "hessian/eig_1": math.pi, "trainer/global_step": 70},
}
TABLE = {"columns": ["step", "index", "eigenvalue"], "data": [[7, 0, math.pi], [7, 1, 0.25]]}
BIG = "x" * 100_000  # a config value larger than a 32 KiB block: forces FIRST/MIDDLE/LAST fragments


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb_plain")
    with pytest.MonkeyPatch.context() as mp:
        offline_env(mp, root)
        try:
            run = wandb.init(mode="offline", dir=root, project="t", config={"lr": 0.125, "big": BIG})
            run.define_metric("hessian/*", step_metric="trainer/global_step")
            run.define_metric("loss", summary="min")
            for step, row in ROWS.items():
                run.log(row, step=step)
            run.log({"eigs": wandb.Table(columns=TABLE["columns"], data=TABLE["data"])}, step=8)
            run.summary["best_eig"] = 2.75
            run.finish()
        finally:
            wandb.teardown()  # finish() leaves the wandb-core service running; this stops it
    return find_run_file(root)


def test_file_layout(plain_run):
    assert plain_run.parent.name.startswith("offline-run-") and plain_run.name.startswith("run-")
    kinds = {r.WhichOneof("record_type") for r in read_records(plain_run)}
    assert {"run", "history", "summary", "metric", "exit"} <= kinds


def test_history_values(plain_run):
    rows = history(plain_run)
    by_step = {r["_step"]: r for r in rows}
    assert sorted(by_step) == [0, 3, 7, 8]
    for step, logged in ROWS.items():
        assert {k: by_step[step][k] for k in logged} == logged  # exact equality, slash key kept whole
    assert by_step[8]["eigs"]["_type"] == "table-file" and by_step[8]["eigs"]["nrows"] == 2
    assert all({"_runtime", "_timestamp"} <= r.keys() for r in rows)


def test_summary_config_metrics(plain_run):
    s = summary(plain_run)
    assert s["best_eig"] == 2.75
    assert s["hessian/eig_1"] == math.pi and s["_step"] == 8
    assert s["loss"] == {"min": 1e-300}  # define_metric(summary="min") replaces the last value
    c = config(plain_run)
    assert c["lr"] == 0.125 and c["big"] == BIG
    defs = metric_definitions(plain_run)
    hess = [d for d in defs if d["glob_name"] == "hessian/*"]
    assert hess and hess[0]["step_metric"] == "trainer/global_step" and hess[0]["step_sync"]
    assert {"name": "loss", "summary": ["min"]}.items() <= next(
        d for d in defs if d["name"] == "loss"
    ).items()


def test_tables(plain_run):
    loaded = tables(plain_run.parent)
    path = summary(plain_run)["eigs"]["path"]
    # the file name embeds wandb's step counter when log() was called (7 here), not the step=8 argument
    assert list(loaded) == [path] and path.startswith("media/table/eigs_")
    assert loaded[path] == TABLE
    assert tables(plain_run) == loaded  # the .wandb file works as well as its folder


def test_fragments_reassembled(plain_run):
    kinds = [k for k, _ in read_chunks(plain_run)]
    assert FIRST in kinds and MIDDLE in kinds and LAST in kinds


def test_corruption_is_detected(plain_run, tmp_path):
    bad = tmp_path / plain_run.name
    shutil.copy(plain_run, bad)
    data = bytearray(bad.read_bytes())
    data[FILE_HEADER.size + 20] ^= 0xFF  # inside the first record's payload
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_records(bad)
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a wandb log"):
        read_records(bad)
    with pytest.raises(FileNotFoundError):
        find_run_file(tmp_path)


def test_lightning_wandb_logger(tmp_path, monkeypatch):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import WandbLogger

    offline_env(monkeypatch, tmp_path)
    eig = {2: 0.375, 4: -1.0 / 7}

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.lin(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class LogEig(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in eig:
                trainer.logger.log_metrics(
                    {"hessian/eig_1": eig[trainer.global_step]}, step=trainer.global_step
                )

    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4
    )
    logger = WandbLogger(offline=True, save_dir=tmp_path, project="t")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=logger,
        callbacks=[LogEig()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    try:
        trainer.fit(Regression(), data)
        trainer.logger.experiment.finish()
    finally:
        wandb.teardown()

    run_file = find_run_file(tmp_path)
    rows = history(run_file)
    assert [r["_step"] for r in rows] == list(range(len(rows)))  # _step counts log calls only
    got = {r["trainer/global_step"]: r["hessian/eig_1"] for r in rows if "hessian/eig_1" in r}
    assert got == eig
    # Lightning's own rows carry the step *before* the optimizer step that produced them: 0..4,
    # while trainer.global_step in on_train_batch_end is already 1..5.
    assert [r["trainer/global_step"] for r in rows if "train_loss" in r] == [0, 1, 2, 3, 4]
    defs = metric_definitions(run_file)
    assert {"name": "trainer/global_step"}.items() <= defs[0].items()
    assert {"glob_name": "*", "step_metric": "trainer/global_step", "step_sync": True}.items() <= defs[
        1
    ].items()
    assert summary(run_file)["hessian/eig_1"] == eig[4]


def test_history_agrees_with_wandbs_own_reader(plain_run):
    """wandb 0.31's ``wandb leet inspect --json`` prints the records of a .wandb file from its Go core: its
    history rows must be the ones this reader returns."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "wandb"]
    probe = subprocess.run(
        [*command, "leet", "inspect", "--help"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        pytest.skip(f"wandb {wandb.__version__} has no `wandb leet inspect` to compare with")
    done = subprocess.run(
        [*command, "leet", "inspect", "--json", str(plain_run)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    theirs = [r["history"]["item"] for r in records if r.get("type") == "history"]
    ours = history(plain_run)
    assert len(theirs) == len(ours) == len(ROWS) + 1  # and the table's row

    def dotted(row, prefix=""):  # wandb's printer joins nested keys with dots; this reader nests them
        out = {}
        for key, value in row.items():
            out.update(
                dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
            )
        return out

    for their_row, our_row in zip(theirs, ours, strict=True):
        assert their_row == dotted(our_row)
    assert [row["_step"] for row in ours] == [*ROWS, 8]
