"""What the loggers hold after a real fit with both monitors: the W&B run summary (extremes), the run
config (the callbacks' settings), TensorBoard's custom-scalars layout and density histogram, the CSV
logger's hparams.yaml. Everything is read back from the files the real libraries wrote."""

import csv
import linecache
import logging
import re
import sys
import warnings

import lightning as L
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning_models import DigitsClassifier, digits, trainer

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor
from pf_lightning.logging import OUTSIDE_WARMUP_SUMMARIES, SETTINGS_KEY, WANDB_SUMMARIES


def _fit(tmp_path, logger, progress_bar=False, **monitor):
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.6)
    hessian = HessianEigenMonitor(k=2, every_n_steps=2, **monitor)
    eos = EdgeOfStabilityMonitor()
    fitted = trainer(
        tmp_path,
        max_steps=8,
        logger=logger,
        callbacks=[hessian, eos],
        log_every_n_steps=1,
        enable_progress_bar=progress_bar,
    )
    fitted.fit(model)
    return hessian, eos, fitted


@pytest.mark.parametrize("prefix", ["", "train"])
def test_wandb_summary_holds_the_extremes_and_the_config_the_settings(tmp_path, monkeypatch, prefix):
    """With WandbLogger(prefix="train") every metric reads "train-...": the summaries and tables too."""
    import wandb
    from wandb_offline import offline_env

    from pf_lightning.wandb_reader import config, find_run_file, history, metric_definitions, summary

    offline_env(monkeypatch, tmp_path)
    p = f"{prefix}-" if prefix else ""
    try:
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="pf", prefix=prefix)
        hessian, eos, _ = _fit(tmp_path, logger)
        logger.experiment.finish()
    finally:
        wandb.teardown()
    path = find_run_file(tmp_path)
    ratios = [h["eos/ratio"] for h in eos.history]
    assert len(ratios) >= 4 and max(ratios) != ratios[-1]  # the maximum is not the last value
    logged = [row[p + "eos/ratio"] for row in history(path) if p + "eos/ratio" in row]
    assert logged == pytest.approx(ratios, rel=1e-6)
    final = summary(path)
    assert final[p + "eos/ratio"]["max"] == pytest.approx(max(ratios), rel=1e-6)
    top = max(h["eigenvalues"][0] for h in hessian.history)
    assert final[p + "hessian/eig_1"]["max"] == pytest.approx(top)
    assert {p + "eos/spectrum_vs_threshold_table", p + "hessian/spectra"} <= final.keys()  # the tables
    summaries = {m["name"]: m["summary"] for m in metric_definitions(path) if m["name"]}
    for name, kind in WANDB_SUMMARIES.items():  # the monitor writes those outside warm-ups itself
        assert summaries[p + name] == ["none" if name in OUTSIDE_WARMUP_SUMMARIES else kind]
    settings = config(path)[SETTINGS_KEY]
    assert settings["HessianEigenMonitor"]["k"] == 2 and settings["HessianEigenMonitor"]["every_n_steps"] == 2
    assert (
        settings["HessianEigenMonitor"]["hvp"] == "auto" and settings["HessianEigenMonitor"]["probe"] is None
    )
    assert settings["EdgeOfStabilityMonitor"]["warn_ratio"] == 1.0


def test_wandb_summary_and_chart_of_an_adaptive_optimizer(tmp_path, monkeypatch):
    """Adam's first measurements are logged, flagged eos/warmup and not judged: the summary's maximum is
    that of the judged ones (it was the warm-up's, a ratio above the judged ones' in a run never at the
    edge); under a tag, as the named monitor's metrics."""
    import wandb
    from wandb_offline import offline_env

    from pf_lightning.wandb_reader import find_run_file, summary, tables

    offline_env(monkeypatch, tmp_path)
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.02, optimizer="adam")
    hessian = HessianEigenMonitor(k=1, every_n_steps=2, name="train")
    eos = EdgeOfStabilityMonitor(monitor=hessian, chart_every=1)
    eos.preconditioner_warmup_steps = 6
    try:
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="pf")
        fitted = trainer(tmp_path, max_steps=14, logger=logger, callbacks=[hessian, eos])
        fitted.fit(model)
        logger.experiment.finish()
    finally:
        wandb.teardown()
    judged = [h for h in eos.history if "eos/warmup" not in h]
    warm = [h for h in eos.history if "eos/warmup" in h]
    assert len(judged) >= 3 and warm
    assert "eos/train/warmup" not in fitted.callback_metrics  # it stayed at 1.0 after the warm-up
    path = find_run_file(tmp_path)
    final = summary(path)
    for name in ("ratio", "sharpness"):
        assert max(h[f"eos/{name}"] for h in warm) > max(h[f"eos/{name}"] for h in judged)  # else no test
        assert final[f"eos/train/{name}"] == {"max": pytest.approx(max(h[f"eos/{name}"] for h in judged))}
    # The chart draws what Adam's threshold is for, λ_max(P⁻¹H), not the Hessian's own eigenvalues (it
    # drew eig_1, a thousandth of that threshold, with it).
    chart = max(
        (t for key, t in tables(path.parent).items() if "spectrum_vs_threshold" in key),
        key=lambda t: len(t["data"]),
    )
    lines: dict[str, list] = {}
    for step, key, value in chart["data"]:
        lines.setdefault(key, []).append((step, value))
    assert lines.keys() == {"preconditioned sharpness", "threshold"}
    assert lines["preconditioned sharpness"] == [  # the judged ones: warm-up measurements are not
        (h["step"], pytest.approx(h["eos/sharpness"])) for h in judged
    ]


def _layout(log_dir, **size_guidance):
    """A TensorBoard run's scalar tags and its custom-scalars charts ({title: tag patterns}), read back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(log_dir, size_guidance={"tensors": 0, "scalars": 0, **size_guidance})
    events.Reload()
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {
        chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart
    }
    return events, events.Tags()["scalars"], charts


def _drawn(scalars, charts, title):
    """The logged tags a chart's patterns draw."""
    return {tag for tag in scalars if any(re.search(pattern, tag) for pattern in charts[title])}


@pytest.mark.parametrize("prefix", ["", "train"])
def test_tensorboard_layout_draws_sharpness_with_its_threshold_and_the_density(tmp_path, prefix):
    """With TensorBoardLogger(prefix="train") every tag reads "train-...": the layout and the density too."""
    logger = TensorBoardLogger(tmp_path, name="tb", prefix=prefix)
    p = f"{prefix}-" if prefix else ""
    hessian, _, _ = _fit(tmp_path, logger, density_every=2)
    events, scalars, charts = _layout(logger.log_dir, histograms=0)
    assert {
        p + t for t in ("eos/sharpness", "eos/threshold", "eos/ratio", "hessian/eig_1", "hessian/eig_2")
    } <= set(scalars)

    def drawn(title):
        return _drawn(scalars, charts, title)

    assert drawn("sharpness and its threshold") == {p + "eos/sharpness", p + "eos/threshold"}
    assert drawn("top-k eigenvalues and the threshold") == {
        p + "hessian/eig_1",
        p + "hessian/eig_2",
        p + "eos/threshold",
    }
    assert drawn("ratio to the threshold (1 = the edge)") == {p + "eos/ratio"}
    # The callbacks' settings go to the Text tab, not to a second HParams session (Lightning wrote one).
    assert p + "hp_metric" in scalars and len(events.Scalars(p + "hp_metric")) == 1
    densities = events.Histograms(p + "hessian/density")
    assert [d.step for d in densities] == [0, 4, 8]  # the first, third and fifth measurement
    last = densities[-1].histogram_value
    assert last.num == pytest.approx(1.0, abs=0.02)  # the broadened density's mass over its grid
    top = float(hessian.history[-1]["eigenvalues"][0])
    assert last.min < top < last.max  # the grid covers the spectrum up to the top eigenvalue


def test_tensorboard_layout_draws_each_quantity_with_its_own_threshold_under_adam(tmp_path):
    """Under Adam the threshold is that of λ_max(P⁻¹H): the top-k eigenvalues of H are drawn without it (they
    were, a thousandth of it), and the critical sharpness with its own level 2/lr, not with eos/threshold."""
    logger = TensorBoardLogger(tmp_path, name="tb")
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.01, optimizer="adam")
    eos = EdgeOfStabilityMonitor(critical_every_n_steps=2)
    trainer(
        tmp_path, max_steps=6, logger=logger, callbacks=[HessianEigenMonitor(k=2, every_n_steps=3), eos]
    ).fit(model)
    events, scalars, charts = _layout(logger.log_dir)

    def drawn(title):
        return _drawn(scalars, charts, title)

    assert "top-k eigenvalues and the threshold" not in charts
    assert drawn("top-k eigenvalues") == {"hessian/eig_1", "hessian/eig_2"}
    assert drawn("sharpness and its threshold") == {"eos/sharpness", "eos/threshold"}
    assert drawn("critical sharpness and its threshold (2/lr)") == {
        "eos/critical_sharpness",
        "eos/critical_threshold",
    }
    levels = [event.value for event in events.Scalars("eos/critical_threshold")]
    assert [event.step for event in events.Scalars("eos/critical_threshold")] == [2, 4, 6]
    assert levels == pytest.approx([2 / 0.01] * 3)
    assert drawn("ratio to the threshold (1 = the edge)") == {"eos/ratio", "eos/critical_ratio"}


def test_csv_logger_keeps_the_settings_in_hparams(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, logger)
    hparams = yaml.safe_load((tmp_path / "csv" / "version_0" / "hparams.yaml").read_text())
    assert hparams[SETTINGS_KEY]["HessianEigenMonitor"]["k"] == 2
    assert hparams[SETTINGS_KEY]["EdgeOfStabilityMonitor"]["batch_sharpness"] is None


def test_a_trainer_without_a_logger_is_told_where_the_metrics_go(tmp_path, caplog):
    """logger=False keeps the metrics nowhere: said once, as information (a sweep reading .latest means it)."""
    with caplog.at_level(logging.INFO):
        t = L.Trainer(
            default_root_dir=tmp_path,
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[HessianEigenMonitor(k=1), HessianEigenMonitor(k=1, name="other")],
        )
        t.fit(DigitsClassifier(n=64))
    said = [r.getMessage() for r in caplog.records if "no logger" in r.getMessage()]
    assert len(said) == 1 and "callback_metrics" in said[0] and ".latest" in said[0]
    assert "hessian/eig_1" in t.callback_metrics


def test_settings_of_named_monitors_have_keys_mlflow_takes(tmp_path):
    """MLflow takes only alphanumerics and _ - . : / and space in a parameter's name: keys such as
    "HessianEigenMonitor[main]" made it refuse the whole call, and a run with a named monitor kept none of
    the callbacks' settings (an outside trial)."""
    from lightning.fabric.utilities.logger import _flatten_dict

    L.seed_everything(0)
    hessian = HessianEigenMonitor(k=2, every_n_steps=4, name="main")
    logger = CSVLogger(tmp_path, name="csv")
    fitted = trainer(
        tmp_path, max_steps=4, logger=logger, callbacks=[hessian, EdgeOfStabilityMonitor(hessian)]
    )
    fitted.fit(DigitsClassifier(n=64))
    hparams = yaml.safe_load((tmp_path / "csv" / "version_0" / "hparams.yaml").read_text())
    settings = hparams[SETTINGS_KEY]
    assert settings["HessianEigenMonitor:main"]["k"] == 2 and "EdgeOfStabilityMonitor:main" in settings
    flat = _flatten_dict({SETTINGS_KEY: settings})  # as MLFlowLogger.log_hyperparams flattens them
    assert all(re.fullmatch(r"[\w\-. :/]+", key) for key in flat), sorted(flat)


def test_the_progress_bar_shows_the_latest_ratio_and_the_loggers_get_each_value_once(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    _, eos, fitted = _fit(tmp_path, logger, progress_bar=True)
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("eos/ratio")]
    assert [int(row["step"]) for row in rows] == [h["step"] for h in eos.history] == [0, 2, 4, 6, 8]
    assert fitted.progress_bar_metrics["eos/ratio"] == pytest.approx(eos.history[-1]["eos/ratio"], rel=1e-6)


def test_the_edge_warning_points_at_the_line_that_called_fit(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.6)
    monitors = [HessianEigenMonitor(k=1, every_n_steps=2), EdgeOfStabilityMonitor()]
    fitting = trainer(tmp_path, max_steps=2, callbacks=monitors)
    with pytest.warns(RuntimeWarning, match="reached .* the stability threshold") as caught:
        fitting.fit(model)
    (edge,) = [w for w in caught if "stability threshold" in str(w.message)]
    assert edge.filename == __file__ and "fitting.fit(model)" in linecache.getline(edge.filename, edge.lineno)


def test_a_warning_clears_the_progress_bar_line_before_it_prints(capsys):
    """tqdm's bars (Lightning's progress bar) are cleared while the warning prints and redrawn after."""
    from tqdm import tqdm

    from pf_lightning.logging import warn_once

    bar = tqdm(total=10, file=sys.stderr, ascii=True, mininterval=0)
    bar.update(3)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        )  # print, as outside pytest
        warn_once(set(), "edge", "the edge, on a line of its own")
    bar.close()
    err = capsys.readouterr().err
    before = err[: err.index(__file__)]
    assert "3/10" in before and before.endswith("\r")  # the bar was drawn, then its line cleared
    assert "3/10" in err[err.index("on a line of its own") :]  # and drawn again after the warning


def test_the_wandb_workspace_charts_what_a_fit_logs(tmp_path):
    """The workspace's panels, built offline: every metric they chart is one a real fit logs (or the
    batch and critical sharpness, logged under mini-batches and ``critical_every_n_steps``), against
    ``trainer/global_step``, unsmoothed."""
    from pf_lightning import logging as names
    from pf_lightning.wandb_workspace import X_AXIS, build_workspace

    workspace = build_workspace("an-entity", "a-project", k=2)
    panels = [panel for section in workspace.sections for panel in section.panels]
    charted = {metric for panel in panels for metric in panel.y}
    logger = CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, logger)
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        logged = set(next(csv.reader(f)))
    stochastic = {names.BATCH_SHARPNESS, names.BATCH_THRESHOLD, names.BATCH_RATIO}
    stochastic |= {names.CRITICAL_SHARPNESS, names.CRITICAL_THRESHOLD, names.CRITICAL_RATIO}
    assert charted - logged == stochastic
    assert {"hessian/eig_1", "hessian/eig_2", "eos/threshold", "pf/hlambda_2"} <= charted
    assert all(panel.x == X_AXIS and panel.smoothing_type == "none" for panel in panels)
    assert workspace.settings.x_axis == X_AXIS
    spec = workspace._to_model().model_dump(by_alias=True)  # what .save() sends: the spec validates offline
    assert spec["entity"] == "an-entity" and spec["displayName"] == "pf-lightning"
    with pytest.raises(ValueError, match="k must be"):
        build_workspace("e", "p", k=0)


def test_the_progress_bar_value_neither_breaks_a_dataloader_iter_step_nor_leaks_into_the_next_fit(tmp_path):
    """A ``training_step(self, dataloader_iter)`` gives Lightning no batch size to infer (it refuses a
    ``self.log`` without one); a ratio measured at the end of one fit is not shown in the next."""

    class IteratorStep(DigitsClassifier):
        def training_step(self, dataloader_iter):
            batch, _, _ = next(dataloader_iter)
            return self.loss(batch)

    L.seed_everything(0)
    model = IteratorStep(n=128, lr=0.6)
    x, y = model.train_dataloader().dataset.tensors
    probe, loss = [(x, y)], lambda module, batch: module.loss(batch)
    hessian = HessianEigenMonitor(k=1, every_n_steps=2, probe=probe, loss_fn=loss)
    eos = EdgeOfStabilityMonitor()
    first = trainer(tmp_path, max_steps=3, callbacks=[hessian, eos], enable_progress_bar=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*progress bar.*")  # the fallback would warn
        first.fit(model)  # measured at steps 0 and 2 (shown at the next batch end), and 3 at fit end
    assert len(eos.history) == 3
    late = HessianEigenMonitor(k=1, every_n_steps=2, probe=probe, loss_fn=loss, at_fit_start=False)
    second = trainer(tmp_path, max_steps=1, callbacks=[late, eos], enable_progress_bar=True)
    second.fit(IteratorStep(n=128, lr=0.6))
    assert "eos/ratio" not in second.progress_bar_metrics  # the first fit's last ratio stayed with it


def test_the_workspace_command_names_a_bad_argument(capsys):
    from pf_lightning.cli import workspace_main

    assert workspace_main(["--entity", "e", "--project", "p", "--k", "0"]) == 1
    assert "k must be a positive number" in capsys.readouterr().err


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_the_progress_bar_marks_a_measurement_while_it_runs(tmp_path, bar):
    """The bar stands still while a measurement runs: it carries a mark for that time only (TQDM: at the
    end of its metrics; Rich: after the task's description)."""
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    def shown(trainer):  # "" before the training bar exists (the fit-start measurement)
        callback = trainer.progress_bar_callback
        if isinstance(callback, TQDMProgressBar):
            return (callback._train_progress_bar.postfix or "") if callback._train_progress_bar else ""
        task = callback.train_progress_bar_id
        return "" if task is None else callback.progress.tasks[task].description

    seen = {"during": [], "after": []}

    class Bar(Callback):
        def on_train_batch_start(self, trainer, *args):
            seen["after"].append(shown(trainer))

    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, name="probe2")
    monitor.add_listener(lambda trainer, *_: seen["during"].append(shown(trainer)))
    progress = TQDMProgressBar() if bar == "tqdm" else RichProgressBar()
    fitting = trainer(tmp_path, max_steps=4, callbacks=[monitor, Bar(), progress], enable_progress_bar=True)
    fitting.fit(DigitsClassifier(n=64, batch_size=32))
    assert seen["during"][0] == "" and len(seen["during"]) == 3
    assert all(p.endswith("measuring Hessian (probe2)…") for p in seen["during"][1:])
    assert seen["after"] and not any("measuring" in p for p in seen["after"])


def test_the_tensorboard_layout_has_no_edge_charts_for_a_monitor_no_edge_monitor_reads(tmp_path):
    """A held-out monitor beside the one the EdgeOfStabilityMonitor reads: its layout drew two empty charts
    (its eos/heldout/* are never logged; an outside trial). It gets its eigenvalues, every chart has data."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    L.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitors = [
        HessianEigenMonitor(k=2, every_n_steps=2),
        HessianEigenMonitor(k=1, every_n_steps=2, name="heldout", probe=[digits(32)]),
        EdgeOfStabilityMonitor(),
    ]
    trainer(tmp_path, max_steps=2, logger=logger, callbacks=monitors, log_every_n_steps=1).fit(
        DigitsClassifier(n=128, lr=0.1)
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {
        (category.title, chart.title): list(chart.multiline.tag)
        for category in layout.category
        for chart in category.chart
    }
    assert {title for category, title in charts if category == "pf-lightning (heldout)"} == {
        "top-k eigenvalues"
    }
    for key, patterns in charts.items():
        assert any(re.search(pattern, tag) for pattern in patterns for tag in scalars), key


def test_the_wandb_summary_of_a_monitor_named_with_a_dot_is_its_maximum(tmp_path, monkeypatch):
    """per_group(parameter_groups(model, depth=2)) names its monitors "net.0", "net.2", ...: W&B read the dot
    in define_metric as a nested key, so their eig_1's summary was the last value (an outside trial)."""
    import wandb
    from wandb_offline import offline_env

    from pf_lightning.wandb_reader import find_run_file, summary

    offline_env(monkeypatch, tmp_path)
    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, name="net.0", params="net.0.*")
    try:
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="pf")
        trainer(tmp_path, max_steps=8, logger=logger, callbacks=[monitor]).fit(
            DigitsClassifier(n=128, lr=0.6)
        )
        logger.experiment.finish()
    finally:
        wandb.teardown()
    values = [h["eigenvalues"][0] for h in monitor.history]
    assert max(values) != values[-1]  # the maximum is not the last value
    assert summary(find_run_file(tmp_path))["hessian/net.0/eig_1"] == {"max": pytest.approx(max(values))}
