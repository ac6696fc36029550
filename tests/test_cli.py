"""The ``pf-lightning`` command: every config in configs/ parses and trains a few steps; dispatch and help."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor
from pf_lightning.cli import cli_main, main
from pf_lightning.demos import DigitsMLP

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SINGLE_PROCESS = [
    "eos_digits.yaml",
    "adaptive_eos_digits.yaml",
    "transformer_lm.yaml",
    "dal_digits.yaml",
    "stochastic_edge_digits.yaml",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    """As from a shell: LightningCLI warns when it is given args while sys.argv holds pytest's."""
    monkeypatch.setattr(sys, "argv", ["pf-lightning"])


def test_every_config_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted([*SINGLE_PROCESS, "ddp_digits.yaml"])


def shrunk(name: str, tmp_path: Path, steps: int = 3) -> Path:
    """The config with a few steps, small probes, a measurement every step and the logs in ``tmp_path``."""
    config = yaml.safe_load((CONFIGS / name).read_text())
    trainer = config["trainer"]
    trainer["max_steps"] = steps
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path)
    for callback in trainer["callbacks"]:
        if callback["class_path"] == "pf_lightning.HessianEigenMonitor":
            callback["init_args"].update(every_n_steps=1, probe=16 if "transformer" in name else 64)
        if callback.get("init_args", {}).get("critical_every_n_steps"):
            callback["init_args"].update(critical_every_n_steps=1, batch_sharpness_batches=4)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_config_parses(name, tmp_path):
    cli = cli_main(["--config", str(CONFIGS / name), f"--trainer.default_root_dir={tmp_path}"], run=False)
    callbacks = cli.trainer.callbacks
    assert any(isinstance(cb, HessianEigenMonitor) for cb in callbacks)
    assert any(isinstance(cb, EdgeOfStabilityMonitor) for cb in callbacks)
    assert isinstance(cli.trainer.logger, CSVLogger)
    assert cli.model.configure_optimizers() is not None


@pytest.mark.parametrize("name", SINGLE_PROCESS)
def test_config_trains_a_few_steps(name, tmp_path, capsys):
    main(["fit", "--config", str(shrunk(name, tmp_path))])
    log_dir = tmp_path / Path(name).stem / "version_0"
    with open(log_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    eig_steps = sorted({int(r["step"]) for r in rows if r.get("hessian/eig_1")})
    assert eig_steps == [0, 1, 2, 3]  # fit start, every step, fit end at step 3 (once)
    ratios = [float(r["eos/ratio"]) for r in rows if r.get("eos/ratio")]
    assert ratios and all(r > 0 for r in ratios)
    assert (log_dir / "config.yaml").is_file()  # LightningCLI saved the resolved config
    assert "sharpness" in capsys.readouterr().out  # MeasurementTable's header
    if name == "transformer_lm.yaml":
        assert {"hessian/attn/eig_1", "hessian/mlp/eig_1", "hessian/embed/eig_1"} <= rows[0].keys()
    if (
        name == "stochastic_edge_digits.yaml"
    ):  # mini-batches of 8: batch sharpness by default, critical opted in
        batch = {int(r["step"]): float(r["eos/batch_ratio"]) for r in rows if r.get("eos/batch_ratio")}
        critical = {int(r["step"]) for r in rows if r.get("eos/critical_ratio")}
        assert sorted(batch) == [0, 1, 2, 3] and all(v > 0 for v in batch.values())
        assert critical == {1, 2, 3}
    if name == "dal_digits.yaml":
        # LRAdaptation installed DAL: each rate is 2/v from the v measured before it.
        lr = {int(r["step"]): float(r["dal/lr"]) for r in rows if r.get("dal/lr")}
        v = {int(r["step"]): float(r["dal/hg_ratio"]) for r in rows if r.get("dal/hg_ratio")}
        assert sorted(lr) == [0, 1, 2] and all(
            lr[s] == pytest.approx(min(2 / v[s], 5.0), rel=1e-6) for s in lr
        )


def test_help_names_the_report_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "pf-lightning report" in out and "fit" in out and "LightningCLI's own help follows" in out
    with pytest.raises(SystemExit) as exit_info:  # no command: the usage alone (it said LightningCLI's help
        main([])  # followed, and LightningCLI's "expected subcommand" error did)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert (
        "pf-lightning report <run dir>" in captured.err and "help follows" not in captured.err + captured.out
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["reprot", "runs"])
    assert exit_info.value.code == 2
    assert "choose from fit, validate, test, predict, report, workspace" in capsys.readouterr().err


def _refusal(config, tmp_path, capsys) -> str:
    """`pf-lightning fit` on ``config``: it must end with exit status 2 and one line on stderr, returned."""
    path = tmp_path / "refused.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.parametrize(
    ("section", "setting", "message"),
    [
        ("callbacks", {"k": 0}, "HessianEigenMonitor(...): `k` must be an int >= 1, got 0 (int)"),
        ("table", {"k": 0}, "MeasurementTable(...): `k` must be an int >= 1, got 0 (int)"),
        ("data", {"n": 0}, "DigitsDataModule(...): `n` must be a positive number of images or None, got 0"),
    ],
    ids=["callback", "console table", "data module"],
)
def test_a_class_that_refuses_its_configured_arguments_ends_the_command_with_its_message(
    section, setting, message, tmp_path, capsys
):
    """Not jsonargparse's chained traceback of every type it tried (87 lines for `k: 0`): one line, exit 2."""
    config = yaml.safe_load(shrunk("eos_digits.yaml", tmp_path).read_text())
    if section != "data":
        (callback,) = (
            c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(message.split("(")[0])
        )
        callback["init_args"].update(setting)
    else:
        config["data"]["init_args"].update(setting)
    assert _refusal(config, tmp_path, capsys) == f"pf-lightning: error: {message}"


@pytest.mark.parametrize(
    ("callback", "setting", "start"),
    [
        ("HessianEigenMonitor", {"basis_device": "foo"}, "`basis_device` must be None or a device such as"),
        (
            "EdgeOfStabilityMonitor",
            {"on_warning": "math.sqrt"},
            "`on_warning` must be callable as on_warning(",
        ),
    ],
    ids=["device", "arity"],
)
def test_a_refusal_made_while_handling_another_error_is_still_one_line(
    callback, setting, start, tmp_path, capsys
):
    """The checks of a device's spelling and of a function's arity refused inside the `except` of torch's or
    inspect's error, so the CLI read that error as the innermost and printed 99 lines (an outside trial)."""
    config = yaml.safe_load(shrunk("eos_digits.yaml", tmp_path).read_text())
    (entry,) = (c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(callback))
    entry.setdefault("init_args", {}).update(setting)
    assert _refusal(config, tmp_path, capsys).startswith(f"pf-lightning: error: {callback}(...): {start}")


def test_a_cap_s_bad_fraction_in_yaml_ends_the_command_with_its_message(tmp_path, capsys):
    """LightningCLI passes every argument of the class, base=None among them: the cap's own check was
    skipped as if a base schedule were bound, and the fit started and failed at fit start with a traceback."""
    config = yaml.safe_load(shrunk("dal_digits.yaml", tmp_path).read_text())
    (adaptation,) = (c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LRAdaptation"))
    adaptation["init_args"]["scheduler"] = {
        "class_path": "pf_lightning.SharpnessCappedLR",
        "init_args": {"fraction": 0.0},
    }
    line = _refusal(config, tmp_path, capsys)
    assert (
        line.startswith("pf-lightning: error: LRAdaptation(...)")
        and "`fraction` must be a finite number > 0" in line
    )


class BuggyDigitsMLP(DigitsMLP):
    """A model whose constructor has a bug below it: torch's TypeError for a float layer width."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.extra = torch.nn.Linear(64, 1.5)


def test_a_bug_below_a_constructor_keeps_its_traceback(tmp_path):
    """Only a constructor's own refusal (or pf-lightning's argument checks) becomes a one-line error: a
    TypeError raised inside torch from a model's __init__ is a bug to be traced, not a refused argument."""
    config = yaml.safe_load(shrunk("eos_digits.yaml", tmp_path).read_text())
    config["model"]["class_path"] = f"{__name__}.BuggyDigitsMLP"
    path = tmp_path / "buggy.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(Exception) as info:
        main(["fit", "--config", str(path)])
    assert not isinstance(info.value, SystemExit)
    chain = [info.value, info.value.__cause__, info.value.__context__]
    assert any(isinstance(e, TypeError) and "float" in str(e) for e in chain if e is not None), chain


@pytest.mark.slow
def test_ddp_config_trains_on_two_processes(tmp_path):
    """Lightning's "ddp" strategy re-launches the command for rank 1: run it as the console script does."""
    config = shrunk("ddp_digits.yaml", tmp_path, steps=2)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "pf_lightning.cli", "fit", "--config", str(config)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "ddp_digits" / "version_0" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({int(r["step"]) for r in rows if r.get("hessian/eig_1")}) == [0, 1, 2]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_RUNS = {  # a few steps each; the summaries they print are what a user reads
    "edge_of_stability.py": (["--lrs", "0.4", "--steps", "4", "--every", "2"], "Summary"),
    "adaptive_edge_of_stability.py": (["--lrs", "0.002", "--steps", "4", "--every", "2"], "Summary"),
    "transformer_lm.py": (["--steps", "2", "--every", "1", "--probe", "8"], "lambda_max per parameter group"),
    "ddp_digits.py": (["--steps", "2", "--every", "1"], "max relative difference"),
    "stochastic_edge.py": (
        ["--batch-sizes", "32", "--lrs", "0.5", "--steps", "4", "--every", "2", "--critical-every", "2"],
        "Ratios against 2/lr",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXAMPLE_RUNS))
def test_example_runs(script, tmp_path):
    """Each example as a user runs it (a script; DDP re-launches it), shortened to a few steps."""
    args, expected = EXAMPLE_RUNS[script]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, str(EXAMPLES / script), *args, "--out", str(tmp_path / "runs")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout
    assert list((tmp_path / "runs").glob("**/metrics.csv"))


@pytest.mark.slow
def test_an_example_logging_to_csv_and_wandb_does_not_warn_that_its_new_folder_is_not_empty(tmp_path):
    """W&B's folder inside the CSV run's was created first: Lightning warned on every fresh run that previous
    log files would be deleted (an outside trial)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = [
        "--lrs",
        "0.4",
        "--steps",
        "2",
        "--every",
        "2",
        "--logger",
        "both",
        "--out",
        str(tmp_path / "runs"),
    ]
    command = [sys.executable, str(EXAMPLES / "edge_of_stability.py"), *args]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exists and is not empty" not in done.stderr
    assert list((tmp_path / "runs").glob("*/metrics.csv")) and list((tmp_path / "runs").glob("*/wandb"))


_WITHOUT_EXTRAS = r"""
import importlib.abc, importlib.metadata, sys

BLOCKED = {"wandb", "matplotlib", "jsonargparse"}  # scikit-learn, the fourth extra: not imported (checked below)


def hidden(lookup):  # no distribution metadata either (what torchmetrics checks before importing matplotlib)
    def find(name, *args, **kwargs):
        if name.lower() in BLOCKED:
            raise importlib.metadata.PackageNotFoundError(name)
        return lookup(name, *args, **kwargs)

    return find


importlib.metadata.version = hidden(importlib.metadata.version)
importlib.metadata.distribution = hidden(importlib.metadata.distribution)


class NotInstalled(importlib.abc.MetaPathFinder):  # as if the extras were never installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
import lightning as L
from lightning.pytorch.loggers import CSVLogger

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor
import torch

from pf_lightning.demos import DigitsMLP

x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, :10] > 0).long().argmax(1)), batch_size=64)

L.seed_everything(0)
trainer = L.Trainer(max_steps=4, logger=CSVLogger(sys.argv[1]), callbacks=[HessianEigenMonitor(k=2, every_n_steps=2),
    EdgeOfStabilityMonitor()], enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
trainer.fit(DigitsMLP(hidden=(16,)), data)
print("loaded:", sorted((BLOCKED | {"sklearn"}) & {m.partition(".")[0] for m in sys.modules}))
for name in ("pf_lightning.report", "pf_lightning.cli"):
    try:
        module = __import__(name, fromlist=["_"])
    except ModuleNotFoundError as err:
        print(name, "->", err)
from pf_lightning.cli import cli_main, report_main
print("report exit", report_main([sys.argv[1]]))
try:
    cli_main(["fit", "--help"])
except ModuleNotFoundError as err:
    print("fit ->", err)
"""


def test_the_core_install_measures_and_logs_without_the_extras(tmp_path):
    """wandb, matplotlib and jsonargparse unimportable (the core install): a fit with both monitors and a
    CSVLogger logs the eigenvalues, loads none of them, and each extra's command names its install line."""
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "loaded: []" in out
    assert "pf_lightning.report -> pf-lightning's report draws with matplotlib" in out
    assert "pip install 'pf-lightning[report]'" in out and "report exit 1" in out
    assert "fit -> pf-lightning fit (LightningCLI) needs jsonargparse" in out and "'pf-lightning[cli]'" in out
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    with metrics.open() as f:
        table = list(csv.DictReader(f))
    rows = [row for row in table if row.get("hessian/eig_1")]
    assert [int(row["step"]) for row in rows] == [0, 2, 4]
    assert all(float(row["hessian/eig_1"]) >= float(row["hessian/eig_2"]) > 0 for row in rows)
    assert [int(row["step"]) for row in table if row.get("eos/ratio")] == [0, 2, 4]


@pytest.mark.parametrize(
    ("callback", "choices"),
    [
        ("HessianEigenMonitor", "{auto,double_backward,forward_over_reverse,finite_difference}"),
        ("LRAdaptation", "{forward_difference,auto,double_backward,forward_over_reverse,finite_difference}"),
    ],
)
def test_fit_help_lists_the_hvp_choices(callback, choices, capsys):
    from typing import get_args

    from pf_lightning.callbacks.hessian_monitor import HVPChoice
    from pf_lightning.callbacks.lr_adaptation import HG_METHODS, HGMethod
    from pf_lightning.curvature import HVP_CHOICES

    assert get_args(HVPChoice) == HVP_CHOICES and get_args(HGMethod) == HG_METHODS
    with pytest.raises(SystemExit):
        cli_main(["fit", "--trainer.callbacks.help", f"pf_lightning.{callback}"])
    assert f"--trainer.callbacks.hvp {choices}" in capsys.readouterr().out.replace("\n", " ")


def test_a_fit_that_fails_at_set_up_keeps_the_previous_runs_log(tmp_path):
    """The configs wrote every fit to runs/<name>/ itself: a fit stopped at set-up by a bad argument
    (`momentum: -1`, the optimizer's own refusal) deleted the previous run's metrics.csv (an outside trial).
    Each fit has its own version folder now."""
    config = shrunk("eos_digits.yaml", tmp_path, steps=1)
    main(["fit", "--config", str(config)])
    (first,) = (tmp_path / "eos_digits").glob("**/metrics.csv")
    before = first.read_text()
    with pytest.raises(ValueError, match="Invalid momentum value"):
        main(["fit", "--config", str(config), "--model.optimizer.init_args.momentum=-1"])
    assert first.read_text() == before and "hessian/eig_1" in before


def test_the_markov_data_module_is_its_seed_s_in_every_process():
    """The chain's transition probabilities came from torch's global generator (its Dirichlet draw): the
    transformer example trained on other data in every run (best losses 0.606, 0.561, 0.582; an outside
    trial)."""
    from pf_lightning.demos import MarkovSequenceDataModule

    torch.manual_seed(0)
    first = MarkovSequenceDataModule(n=64, seed=0)
    torch.manual_seed(1)
    again = MarkovSequenceDataModule(n=64, seed=0)
    assert torch.equal(first.transition, again.transition) and torch.equal(first.sequences, again.sequences)
    assert not torch.equal(first.transition, MarkovSequenceDataModule(n=64, seed=1).transition)
    rows = first.transition  # each context's next token: a distribution over `branching` (2) successors
    assert torch.allclose(rows.sum(-1), torch.ones(16, 16)) and bool(((rows > 0).sum(-1) == 2).all())


def test_the_console_table_of_a_resumed_fit_shows_no_loss_for_the_restored_rows(tmp_path, capsys):
    """A fit resumed from a checkpoint reprints the measurements it restored: each showed the loss of the
    step it resumed at (an outside trial), which no measurement before it was taken with."""
    from lightning_models import DigitsClassifier, trainer

    from pf_lightning.demos import MeasurementTable

    def callbacks():  # the table first: it prints each row a batch end after its measurement
        return [MeasurementTable(k=1), HessianEigenMonitor(k=1, every_n_steps=2), EdgeOfStabilityMonitor()]

    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1)
    first = trainer(tmp_path, max_steps=4, callbacks=callbacks())
    first.fit(model)
    first.save_checkpoint(tmp_path / "four.ckpt")

    def rows():
        lines = [line.split() for line in capsys.readouterr().out.splitlines()]
        return {int(words[0]): words[1] for words in lines if words and words[0].isdigit()}

    fresh = rows()
    assert "-" not in fresh.values(), fresh  # listed first, the table prints a row once a loss is in
    trainer(tmp_path, max_steps=6, callbacks=callbacks()).fit(model, ckpt_path=tmp_path / "four.ckpt")
    resumed = rows()
    assert resumed[0] == resumed[2] == "-" and "-" not in (resumed[4], resumed[6]), resumed


@pytest.mark.parametrize("which", ["top", "both"])
def test_the_console_table_keeps_each_value_under_its_header_when_it_shows_more_than_measured(
    tmp_path, capsys, which
):
    """MeasurementTable(k=5) on a k=3 monitor printed 3 eigenvalues under 5 headers, the products under
    eig_4 and the seconds under eig_5 (an outside trial); with which="both" its eig_4 would have been a
    bottom eigenvalue."""
    from lightning_models import DigitsClassifier, trainer

    from pf_lightning.demos import MeasurementTable

    monitor = HessianEigenMonitor(k=3, which=which, every_n_steps=None, at_fit_end=False)
    callbacks = [monitor, EdgeOfStabilityMonitor(), MeasurementTable(k=5)]
    trainer(tmp_path, max_steps=1, callbacks=callbacks).fit(DigitsClassifier(n=64))
    header, row = (line.split() for line in capsys.readouterr().out.splitlines()[:2])
    cells = dict(zip(header, row[: len(header)], strict=True))
    top = [f"{v:.4g}" for v in monitor.history[0]["eigenvalues"][:3]]
    assert [cells[f"eig_{i}"] for i in range(1, 6)] == [*top, "-", "-"]
    assert cells["HVPs"] == str(monitor.history[0]["n_hvp"])


def test_a_loss_fn_without_a_return_annotation_can_be_configured(tmp_path, monkeypatch):
    """`loss_fn: mymodule.loss` was refused by the type check ("Expected ... to be a function that returns
    <class 'Tensor'>") unless the function said `-> torch.Tensor` (an outside trial)."""
    (tmp_path / "user_losses.py").write_text("def loss(module, batch):\n    return module.loss(batch)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = yaml.safe_load(shrunk("eos_digits.yaml", tmp_path, steps=1).read_text())
    (entry,) = (c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("HessianEigenMonitor"))
    entry.setdefault("init_args", {})["loss_fn"] = "user_losses.loss"
    path = tmp_path / "loss_fn.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (metrics,) = (tmp_path / "eos_digits").glob("**/metrics.csv")
    assert "hessian/eig_1" in metrics.read_text()
