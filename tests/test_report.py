"""``pf-lightning report``: PNGs from real short runs (CSV and offline W&B) that show what was logged."""

from __future__ import annotations

import csv
import functools
import struct
import sys

import lightning as L
import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from matplotlib.image import imread
from wandb_offline import offline_env

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor
from pf_lightning.cli import main
from pf_lightning.demos import DigitsDataModule, DigitsMLP
from pf_lightning.report import constant_axis, find_runs, measurement_table, read_wandb_metrics, write_report
from pf_lightning.wandb_reader import find_run_file, history

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = {"sharpness", "spectrum", "regimes", "learning_rate", "loss", "measurement"}


pytestmark = pytest.mark.usefixtures("one_thread")


def short_run(root, logger, lr=0.4, optimizer=torch.optim.SGD, named=False):
    """Twelve full-batch steps on 256 digits with the monitors; returns the EoS monitor and the monitors."""
    model = DigitsMLP(hidden=(32, 32), optimizer=functools.partial(optimizer, lr=lr))
    hessian = HessianEigenMonitor(k=2, every_n_steps=4, probe=256)
    extra = (
        [HessianEigenMonitor(k=2, every_n_steps=4, probe=256, params="net.0.*", name="first")]
        if named
        else []
    )
    eos = EdgeOfStabilityMonitor()
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_steps=12,
        logger=logger,
        callbacks=[hessian, *extra, eos, LearningRateMonitor("step")],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DigitsDataModule(n=256))
    return eos, [hessian, *extra]


def assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes, path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    image = imread(path)
    assert image.shape[:2] == (height, width) and width >= 400 and height >= 300
    assert image.std() > 0.01  # not a blank canvas


def csv_columns(path):
    """``{column: (steps, values)}`` straight from metrics.csv, independently of the report module."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = {}
    for column in rows[0]:
        cells = [(int(r["step"]), float(r[column])) for r in rows if r[column] != "" and column != "step"]
        if cells:
            out[column] = (np.array([s for s, _ in cells]), np.array([v for _, v in cells]))
    return out


def assert_matches_monitors(drawn, eos, monitors):
    """The plotted eos/* and hessian/* series are exactly the measurements the callbacks made."""
    steps = np.array([h["step"] for h in eos.history])
    for key in ("eos/sharpness", "eos/threshold", "eos/ratio"):
        np.testing.assert_array_equal(drawn["sharpness"][key][0], steps)
        np.testing.assert_allclose(drawn["sharpness"][key][1], [h[key] for h in eos.history], rtol=1e-6)
    for monitor in monitors:
        prefix = f"hessian/{monitor.name}/" if monitor.name else "hessian/"
        for i in range(monitor.k):
            got = drawn["spectrum"][f"{prefix}eig_{i + 1}"]
            np.testing.assert_array_equal(got[0], [h["step"] for h in monitor.history])
            np.testing.assert_allclose(got[1], [h["eigenvalues"][i] for h in monitor.history], rtol=1e-6)


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv_run")
    eos, monitors = short_run(root, CSVLogger(root, name="run", version=""), named=True)
    return root / "run", eos, monitors


def test_csv_report_draws_the_logged_data(csv_run, tmp_path):
    run_dir, eos, monitors = csv_run
    messages = []
    written = write_report(run_dir, tmp_path / "plots", progress=False, echo=messages.append)
    assert {p.stem for p in written} == PLOTS and all(p.parent == tmp_path / "plots" for p in written)
    for path in written:
        assert_png(path)
    drawn = {p.stem: series for p, series in written.items()}
    assert_matches_monitors(drawn, eos, monitors)
    logged = csv_columns(run_dir / "metrics.csv")
    for series in drawn.values():
        for key, (steps, values) in series.items():
            np.testing.assert_array_equal(steps, logged[key][0])
            np.testing.assert_array_equal(values, logged[key][1])
    assert {"pf/hlambda_1", "pf/hlambda_2", "pf/unstable_grad_fraction"} <= drawn["regimes"].keys()
    assert set(drawn["learning_rate"]) == {"lr-SGD"} and set(drawn["loss"]) == {"train_loss"}
    assert np.all(drawn["learning_rate"]["lr-SGD"][1] == 0.4)
    assert "hessian/first/eig_1" in drawn["spectrum"]  # a named monitor gets its own panel
    assert sum(m.startswith("wrote") for m in messages) == len(PLOTS)


def test_a_run_logged_with_a_logger_prefix_is_drawn_as_without_it(csv_run, tmp_path):
    """CSVLogger(prefix="train") names every column "train-...": the report reads them under their names."""
    run_dir, _, _ = csv_run
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    header = ",".join(c if c == "step" else f"train-{c}" for c in lines[0].split(","))
    (tmp_path / "prefixed").mkdir()
    (tmp_path / "prefixed" / "metrics.csv").write_text("\n".join([header, *lines[1:]]) + "\n")
    plain = write_report(run_dir / "metrics.csv", tmp_path / "plain", progress=False)
    prefixed = write_report(tmp_path / "prefixed", tmp_path / "out", progress=False)
    assert {p.stem for p in prefixed} == {p.stem for p in plain} == PLOTS
    drawn = {p.stem: series for p, series in prefixed.items()}
    for path, series in plain.items():
        assert drawn[path.stem].keys() == series.keys()
        for key, (steps, values) in series.items():
            np.testing.assert_array_equal(drawn[path.stem][key][0], steps)
            np.testing.assert_array_equal(drawn[path.stem][key][1], values)


def test_wandb_report_draws_the_logged_data(tmp_path, monkeypatch):
    offline_env(monkeypatch, tmp_path)
    logger = WandbLogger(save_dir=tmp_path / "run", project="t", offline=True)
    (tmp_path / "run").mkdir()
    try:
        eos, monitors = short_run(tmp_path, logger)
        logger.experiment.finish()
    finally:
        wandb.teardown()
    written = write_report(tmp_path / "run", tmp_path / "plots", source="wandb", progress=False, echo=print)
    assert {p.stem for p in written} == PLOTS
    for path in written:
        assert_png(path)
    drawn = {p.stem: series for p, series in written.items()}
    assert_matches_monitors(drawn, eos, monitors)
    rows = history(find_run_file(tmp_path / "run"))
    losses = [(r["trainer/global_step"], r["train_loss"]) for r in rows if "train_loss" in r]
    np.testing.assert_array_equal(drawn["loss"]["train_loss"][0], [s for s, _ in losses])
    np.testing.assert_array_equal(drawn["loss"]["train_loss"][1], [v for _, v in losses])


def test_truncated_wandb_file_is_read_up_to_its_last_record(tmp_path, monkeypatch):
    offline_env(monkeypatch, tmp_path)
    try:
        run = wandb.init(mode="offline", dir=tmp_path, project="t")
        for step in range(50):
            run.log({"train_loss": 1.0 / (step + 1), "trainer/global_step": step})
        run.finish()
    finally:
        wandb.teardown()
    path = find_run_file(tmp_path)
    whole = read_wandb_metrics(path, progress=False)["train_loss"]
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(path.read_bytes()[:-100])  # as if the run were still being written
    with pytest.raises(ValueError):
        history(cut)
    partial = read_wandb_metrics(cut, progress=False)["train_loss"]
    assert 0 < len(partial[0]) <= len(whole[0])
    np.testing.assert_array_equal(partial[1], whole[1][: len(partial[1])])


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in rows for k in row})
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_plots_without_data_are_skipped_with_a_message(tmp_path):
    write_csv(tmp_path / "metrics.csv", [{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(20)])
    messages = []
    written = write_report(tmp_path, progress=False, echo=messages.append)
    assert [p.name for p in written] == ["loss.png"] and (tmp_path / "plots" / "loss.png").is_file()
    skipped = [m for m in messages if "skipped" in m]
    assert len(skipped) == 5 and any("EdgeOfStabilityMonitor" in m for m in skipped)


def test_a_later_report_removes_the_plots_it_no_longer_draws_there(tmp_path):
    """A folder that gains a second run gets a sub-folder per run: the first report's top-level plots stayed
    beside them, stale (an outside trial). They go, with a message; other files stay."""
    write_csv(
        tmp_path / "runs" / "a" / "metrics.csv", [{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(9)]
    )
    write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda _: None)
    assert (tmp_path / "out" / "loss.png").is_file()
    (tmp_path / "out" / "notes.png").write_bytes(b"mine")
    write_csv(
        tmp_path / "runs" / "b" / "metrics.csv", [{"step": s, "train_loss": 2.0 / (s + 1)} for s in range(9)]
    )
    messages = []
    written = write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=messages.append)
    assert {p.relative_to(tmp_path / "out").as_posix() for p in written} == {"a/loss.png", "b/loss.png"}
    assert not (tmp_path / "out" / "loss.png").exists() and (tmp_path / "out" / "notes.png").is_file()
    assert [m for m in messages if m.startswith("removed")] == [
        f"removed {tmp_path / 'out' / 'loss.png'}: an earlier report's, which this one does not write there"
    ]
    # Back to one run: its plots go to the top again, and both runs' folders go (they stayed, stale); a
    # folder of the user's own with a file named like a plot is not the report's (it was removed too).
    (tmp_path / "out" / "b" / "notes.png").write_bytes(b"mine")
    (tmp_path / "out" / "figures").mkdir()
    (tmp_path / "out" / "figures" / "loss.png").write_bytes(b"mine")
    (tmp_path / "out" / "sharpness.png").write_bytes(b"mine")  # named like a plot, not in the list
    (tmp_path / "runs" / "a" / "metrics.csv").unlink()
    written = write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda _: None)
    assert {p.relative_to(tmp_path / "out").as_posix() for p in written} == {"loss.png"}
    assert not (tmp_path / "out" / "a").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "b").iterdir()) == ["notes.png"]  # not ours: kept
    assert (tmp_path / "out" / "figures" / "loss.png").read_bytes() == b"mine"
    assert (tmp_path / "out" / "sharpness.png").read_bytes() == b"mine"


def test_a_report_without_html_removes_the_page_an_earlier_one_wrote(tmp_path):
    """report.html stayed after a later report without --html, showing its plots under the earlier run's
    settings (an outside trial); a page of the user's own, never listed, stays."""
    write_csv(tmp_path / "runs" / "metrics.csv", [{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(9)])
    page = tmp_path / "out" / "report.html"
    write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda _: None, html=True)
    assert page.is_file()
    write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda _: None, html=True)
    assert page.is_file()  # written again: kept
    messages = []
    write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=messages.append)
    assert (
        not page.exists()
        and f"removed {page}: an earlier report's, which this one does not write there" in messages
    )
    page.write_text("mine")
    write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda _: None)
    assert page.read_text() == "mine"


def test_a_report_of_an_earlier_version_without_a_list_is_cleaned_by_the_names(tmp_path):
    """An output folder written before the list of plots: its single run's top-level plots go once the
    folder holds a second run (as they did), found by their names."""
    write_csv(
        tmp_path / "runs" / "a" / "metrics.csv", [{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(9)]
    )
    write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda _: None)
    (tmp_path / "out" / ".pf-lightning-report").unlink()
    write_csv(
        tmp_path / "runs" / "b" / "metrics.csv", [{"step": s, "train_loss": 2.0 / (s + 1)} for s in range(9)]
    )
    write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda _: None)
    assert not (tmp_path / "out" / "loss.png").exists() and (tmp_path / "out" / "a" / "loss.png").is_file()
    assert (tmp_path / "out" / ".pf-lightning-report").read_text() == "a/loss.png\nb/loss.png\n"


def test_several_runs_get_a_folder_each_and_a_comparison(tmp_path):
    for lr in (0.4, 0.2):
        rows = [
            {
                "step": s,
                "eos/sharpness": 4 + s / 10,
                "eos/threshold": 2 / lr,
                "eos/ratio": (4 + s / 10) * lr / 2,
            }
            for s in range(0, 60, 10)
        ]
        write_csv(tmp_path / "runs" / f"lr_{lr}" / "metrics.csv", rows)
    written = write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda _: None)
    names = {p.relative_to(tmp_path / "out").as_posix() for p in written}
    assert names == {"lr_0.2/sharpness.png", "lr_0.4/sharpness.png", "sharpness_runs.png"}
    comparison = written[tmp_path / "out" / "sharpness_runs.png"]
    np.testing.assert_array_equal(comparison["lr_0.2:eos/threshold"][1], [10.0] * 6)
    assert_png(tmp_path / "out" / "sharpness_runs.png")
    assert [r.name for r in find_runs(tmp_path / "runs")] == ["lr_0.2", "lr_0.4"]


def test_report_command(tmp_path, csv_run, capsys):
    run_dir, _, _ = csv_run
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run_dir / "metrics.csv"), "--out", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 0 and (tmp_path / "sharpness.png").is_file()
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "nothing-here")])
    assert exit_info.value.code == 1 and "does not exist" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")  # --out names a file: one line, no traceback
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run_dir / "metrics.csv"), "--out", str(tmp_path / "a-file"), "--no-progress"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("pf-lightning report: [Errno 17] File exists")


def test_a_mini_batch_run_plots_batch_and_critical_sharpness_against_their_thresholds(tmp_path):
    """Heavy ball on mini-batches: the sharpness panel holds λ_max, the batch sharpness (its band), its
    own threshold 2/lr next to (2 + 2β)/lr, and the critical sharpness; the ratio panel all three ratios,
    each series exactly as logged."""
    model = DigitsMLP(hidden=(32, 32), optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5))
    eos = EdgeOfStabilityMonitor(critical_every_n_steps=2, batch_sharpness_batches=4)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=8,
        logger=CSVLogger(tmp_path, name="run", version=""),
        callbacks=[HessianEigenMonitor(k=1, every_n_steps=4, probe=64), eos],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DigitsDataModule(n=256, batch_size=32))
    written = write_report(tmp_path / "run", tmp_path / "plots", progress=False, echo=lambda m: None)
    drawn = {p.stem: series for p, series in written.items()}["sharpness"]
    expected = {
        "eos/batch_sharpness", "eos/batch_sharpness_stderr", "eos/batch_threshold", "eos/batch_ratio",
        "eos/critical_sharpness", "eos/critical_threshold", "eos/critical_ratio",
    }  # fmt: skip
    assert expected <= drawn.keys()
    assert np.allclose(drawn["eos/critical_threshold"][1], 2 / 0.1)
    assert np.allclose(drawn["eos/batch_threshold"][1], 2 / 0.1)
    assert np.allclose(drawn["eos/threshold"][1], (2 + 2 * 0.5) / 0.1)
    np.testing.assert_array_equal(drawn["eos/critical_sharpness"][0], [2, 4, 6, 8])
    logged = csv_columns(tmp_path / "run" / "metrics.csv")
    for key in expected:
        np.testing.assert_array_equal(drawn[key][1], logged[key][1])
    assert_png(tmp_path / "plots" / "sharpness.png")


def test_one_run_logged_by_csv_and_wandb_is_one_run(tmp_path, monkeypatch):
    """A CSVLogger and a WandbLogger on one run (as ``examples/edge_of_stability.py --logger both``
    writes them): one run, one folder with a clean name, every metric either log holds."""
    offline_env(monkeypatch, tmp_path)
    run_dir = tmp_path / "runs" / "lr_0.4"
    run_dir.mkdir(parents=True)
    loggers = [
        CSVLogger(tmp_path / "runs", name="lr_0.4", version=""),
        WandbLogger(save_dir=run_dir, offline=True),
    ]
    try:
        eos, monitors = short_run(tmp_path, loggers)
        loggers[1].experiment.finish()
    finally:
        wandb.teardown()
    short_run(tmp_path, CSVLogger(tmp_path / "runs", name="lr_0.2", version=""), lr=0.2)
    runs = find_runs(tmp_path / "runs")
    assert [r.name for r in runs] == ["lr_0.2", "lr_0.4"]
    assert runs[1].settings["HessianEigenMonitor"]["k"] == 2  # from hparams.yaml or the W&B config
    written = write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda _: None)
    assert {p.parent.name for p in written} == {"lr_0.2", "lr_0.4", "out"}
    drawn = {p.stem: series for p, series in written.items() if p.parent.name == "lr_0.4"}
    assert_matches_monitors(drawn, eos, monitors)


def test_the_two_logs_of_a_run_killed_mid_way_are_one_run():
    """kill -9 leaves a CSVLogger's file and a WandbLogger's at different points (326 and 324 measurements
    in an outside trial): they were two runs and a comparison of the run with itself. Logs agreeing as far
    as the shorter goes are one; a log that differs within that stretch is another run."""
    from pathlib import Path

    from pf_lightning.report import RunMetrics, _merge_twins

    steps = np.arange(0, 60, 5)
    full = {"hessian/eig_1": (steps, 2.0 + steps / 10), "train_loss": (steps, 1.0 / (steps + 1))}
    cut = {key: (x[:-2], y[:-2]) for key, (x, y) in full.items()}
    other = {key: (x[:-2], y[:-2] * 1.01) for key, (x, y) in full.items()}
    csv_log = RunMetrics("run", Path("run/metrics.csv"), "csv", full)
    merged = _merge_twins([csv_log, RunMetrics("run", Path("run/wandb"), "wandb", cut)])
    assert len(merged) == 1 and np.array_equal(merged[0].series["hessian/eig_1"][0], steps)
    assert len(_merge_twins([csv_log, RunMetrics("run", Path("run/wandb"), "wandb", other)])) == 2
    # Two runs of one seed, one longer, each logged twice: agreeing on their first steps does not make the
    # short run's CSV log the long run's W&B log (a review: the short run took the long one's series).
    short = [RunMetrics("short", Path(f"short/{kind}"), kind, cut) for kind in ("csv", "wandb")]
    long = [RunMetrics("long", Path(f"long/{kind}"), kind, full) for kind in ("csv", "wandb")]
    runs = _merge_twins([short[0], long[1], long[0], short[1]])
    assert sorted((run.name, len(run.series["hessian/eig_1"][0])) for run in runs) == [
        ("long", len(steps)),
        ("short", len(steps) - 2),
    ]


def test_a_constant_learning_rate_is_drawn_from_zero():
    assert constant_axis(np.full(5, 0.4)) == (0.0, 0.5)
    assert constant_axis(np.array([0.4, 0.2])) is None and constant_axis(np.zeros(3)) is None


def test_a_threshold_or_rate_logged_once_is_drawn_across_the_panel(tmp_path, monkeypatch):
    """One measurement (a short run, a fit that stopped early): steps through a single point draw
    nothing, so the threshold, batch threshold and learning rate would be missing from their panels."""
    from pf_lightning import report

    figures = []
    monkeypatch.setattr(report, "_save", lambda figure, path: figures.append(figure))
    once = {
        "eos/sharpness": 3.2,
        "eos/threshold": 5.0,
        "eos/ratio": 0.64,
        "eos/batch_sharpness": 4.1,
        "eos/batch_threshold": 20.0,
        "eos/batch_ratio": 0.205,
        "hessian/eig_1": 3.2,
        "lr-SGD": 0.4,
    }
    run = report.RunMetrics(
        "once", tmp_path, "csv", {k: (np.array([7]), np.array([v])) for k, v in once.items()}
    )
    report.plot_sharpness(run, tmp_path / "s.png")
    report.plot_spectrum(run, tmp_path / "e.png")
    report.plot_learning_rate(run, tmp_path / "l.png")
    lines = {line.get_label(): line for f in figures for ax in f.axes for line in ax.get_lines()}
    for label, value in [
        ("threshold", 5.0),
        ("batch threshold", 20.0),
        ("stability threshold", 5.0),
        ("lr-SGD (constant 0.4)", 0.4),
    ]:
        xs, ys = lines[label].get_data()
        assert len(set(np.asarray(xs, float))) == 2 and set(np.asarray(ys, float)) == {value}, label


def test_the_loss_plot_marks_the_first_edge_step_and_the_measurement_plot_the_residuals(tmp_path):
    rows = [{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(30)]
    rows += [
        {
            "step": s,
            "eos/first_edge_step": 20.0,
            "hessian/residual_max": 1e-4 * (s + 1),
            "hessian/n_hvp": 20.0,
        }
        for s in (20, 25)
    ]
    rows += [{"step": s, "hessian/trace": 5.0 + s, "hessian/trace_std": 0.1} for s in (20, 25)]
    write_csv(tmp_path / "metrics.csv", rows)
    written = write_report(tmp_path, progress=False, echo=lambda _: None)
    drawn = {p.stem: series for p, series in written.items()}
    np.testing.assert_array_equal(drawn["loss"]["eos/first_edge_step"][1], [20.0, 20.0])
    assert set(drawn["measurement"]) == {
        "hessian/residual_max",
        "hessian/n_hvp",
        "hessian/trace",
        "hessian/trace_std",
    }
    np.testing.assert_allclose(drawn["measurement"]["hessian/residual_max"][1], [2.1e-3, 2.6e-3])
    assert_png(tmp_path / "plots" / "measurement.png")


def test_the_html_report_opens_in_a_real_browser(csv_run, tmp_path):
    """``--html``: one self-contained page with the settings, every plot inlined and the measurements,
    rendered by headless Chromium (installed by ``.ci/run`` where missing)."""
    import shutil
    import subprocess

    run_dir, _, monitors = csv_run
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run_dir), "--out", str(tmp_path / "out"), "--no-progress", "--html"])
    assert exit_info.value.code == 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(PLOTS) and "<h3>HessianEigenMonitor</h3>" in page
    header, rows = measurement_table(find_runs(run_dir)[0])
    assert header[:3] == ["step", "hessian/eig_1", "hessian/eig_2"]
    assert [row[0] for row in rows] == [h["step"] for h in monitors[0].history]
    np.testing.assert_allclose(
        [row[1] for row in rows], [h["eigenvalues"][0] for h in monitors[0].history], rtol=1e-6
    )
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    shot = tmp_path / "page.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
         "--window-size=1280,2400", (tmp_path / "out" / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert_png(shot, min_bytes=20_000)
    image = imread(shot)
    colored = (np.ptp(image[..., :3], axis=-1) > 0.3).mean()  # the plots' coloured lines, not just text
    assert colored > 0.001


def test_without_wandb_the_csv_runs_beside_an_offline_wandb_run_are_still_plotted(tmp_path, monkeypatch):
    write_csv(
        tmp_path / "runs" / "csv_run" / "metrics.csv",
        [{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(9)],
    )
    wandb_file = tmp_path / "runs" / "w" / "wandb" / "offline-run-1-x" / "run-x.wandb"
    wandb_file.parent.mkdir(parents=True)
    wandb_file.write_bytes(b":W&B\xe1\xbe\x00")  # never parsed: reading it needs wandb first
    monkeypatch.setitem(sys.modules, "wandb.proto", None)  # as if wandb were not installed
    messages = []
    written = write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=messages.append)
    assert [p.name for p in written] == ["loss.png"]
    assert any(m.startswith(f"skipped {wandb_file}") and "pf-lightning[wandb]" in m for m in messages)
    with pytest.raises(ModuleNotFoundError, match=r"pf-lightning\[wandb\]"):
        write_report(wandb_file, tmp_path / "out2", progress=False, echo=messages.append)


def test_runs_of_one_kind_or_with_different_losses_are_never_merged(tmp_path, csv_run):
    """Same initialisation and seed, different learning rates: identical eigenvalues at step 0 but different
    losses. Two CSV runs stay two runs, and each keeps its own settings from its hparams.yaml."""
    run_dir, _, _ = csv_run
    assert find_runs(run_dir)[0].settings["HessianEigenMonitor"]["k"] == 2  # a CSV-only run's settings
    for lr, loss in ((0.1, 1.0), (0.2, 2.0)):
        rows = [{"step": 0, "hessian/eig_1": 3.5, "hessian/n_hvp": 20.0}]
        rows += [{"step": s, "train_loss": loss / (s + 1), "lr-SGD": lr} for s in range(5)]
        write_csv(tmp_path / "runs" / f"lr_{lr}" / "metrics.csv", rows)
    runs = find_runs(tmp_path / "runs")
    assert [r.name for r in runs] == ["lr_0.1", "lr_0.2"]
    assert [float(r.series["lr-SGD"][1][0]) for r in runs] == [0.1, 0.2]


def test_two_run_names_that_clean_to_one_folder_get_two_folders(tmp_path):
    for name in ("lr 0.1", "lr_0.1"):
        write_csv(
            tmp_path / "runs" / name / "metrics.csv",
            [{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(5)],
        )
    written = write_report(tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda _: None)
    assert sorted(p.parent.name for p in written) == ["lr_0.1", "lr_0.1_2"]


def test_a_named_edge_monitor_gets_its_own_edge_plots_and_a_warm_up_is_not_a_missing_monitor(tmp_path):
    """An EdgeOfStabilityMonitor reading a named Hessian monitor logs eos/<name>/* and pf/<name>/*: the report
    skipped them, told the user to add the monitor they had, and plotted only the unnamed one's; a run whose
    every measurement was in the warm-up was told the same (outside trial)."""
    rows = [
        {"step": s, "eos/x/sharpness": 2.0 + s, "eos/x/threshold": 10.0, "eos/x/ratio": (2.0 + s) / 10.0,
         "pf/x/hlambda_1": 2 * (2.0 + s) / 10.0, "eos/sharpness": 5.0, "eos/threshold": 10.0, "eos/ratio": 0.5,
         "pf/hlambda_1": 1.0}
        for s in range(0, 8, 2)
    ]  # fmt: skip
    write_csv(tmp_path / "both" / "metrics.csv", rows)
    written = write_report(tmp_path / "both", progress=False, echo=lambda m: None)
    by_name = {path.name: drawn for path, drawn in written.items()}
    assert {"sharpness.png", "sharpness_x.png", "regimes.png", "regimes_x.png"} <= set(by_name)
    np.testing.assert_array_equal(by_name["sharpness_x.png"]["eos/sharpness"][1], [2.0, 4.0, 6.0, 8.0])
    np.testing.assert_array_equal(by_name["sharpness.png"]["eos/sharpness"][1], [5.0] * 4)

    named_only = [{k: v for k, v in row.items() if k.count("/") == 2 or k == "step"} for row in rows]
    write_csv(tmp_path / "named" / "metrics.csv", named_only)
    messages = []
    written = write_report(tmp_path / "named", progress=False, echo=messages.append)
    assert {"sharpness_x.png", "regimes_x.png"} <= {path.name for path in written}
    assert not any("sharpness" in m and "skipped" in m for m in messages), messages

    write_csv(tmp_path / "warmup" / "metrics.csv", [{"step": 0, "eos/threshold": 38.0, "eos/warmup": 1.0}])
    messages = []
    write_report(tmp_path / "warmup", progress=False, echo=messages.append)
    assert any("skipped sharpness.png: the EdgeOfStabilityMonitor logged no sharpness" in m for m in messages)
    assert not any("add EdgeOfStabilityMonitor" in m for m in messages), messages


def test_a_run_whose_monitors_are_all_named_gets_their_tables_and_edge_marks(tmp_path):
    """Two named Hessian monitors, each read by an EdgeOfStabilityMonitor: report.html had no measurement
    table and loss.png no edge mark, both read only the unnamed monitor's metrics (an outside trial)."""
    rows = [{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(12)]
    for tag, top, edge in (("a", 3.0, 4.0), ("b", 7.0, 8.0)):
        rows += [
            {"step": s, f"hessian/{tag}/eig_1": top + s, f"hessian/{tag}/eig_2": 1.0, f"eos/{tag}/threshold": 10.0,
             f"eos/{tag}/sharpness": top + s, f"eos/{tag}/ratio": (top + s) / 10.0, f"eos/{tag}/first_edge_step": edge,
             f"hessian/{tag}/residual_max": 1e-4}
            for s in (0, 4, 8)
        ]  # fmt: skip
    rows.append({"step": 10, "hessian/b/skipped": 1.0})  # a failed measurement: a row that says so
    write_csv(tmp_path / "metrics.csv", rows)
    written = write_report(tmp_path, progress=False, echo=lambda _: None, html=True)
    drawn = {p.stem: series for p, series in written.items() if p.suffix == ".png"}
    np.testing.assert_array_equal(drawn["loss"]["eos/a/first_edge_step"][1], [4.0] * 3)
    np.testing.assert_array_equal(drawn["loss"]["eos/b/first_edge_step"][1], [8.0] * 3)
    run = find_runs(tmp_path)[0]
    assert measurement_table(run) == ([], [])  # no unnamed monitor
    header, table = measurement_table(run, "b")
    assert header == ["step", "hessian/b/eig_1", "hessian/b/eig_2", "eos/b/sharpness", "eos/b/threshold",
                      "eos/b/ratio", "hessian/b/residual_max", "hessian/b/skipped"]  # fmt: skip
    assert [row[:2] for row in table] == [
        [0, 7.0],
        [4, 11.0],
        [8, 15.0],
        [10, None],
    ]
    assert table[-1][-1] == 1.0
    page = (tmp_path / "plots" / "report.html").read_text()
    assert "<h3>Measurements of a</h3>" in page and "<h3>Measurements of b</h3>" in page


def test_a_wandb_run_killed_before_its_first_record_is_skipped_with_one_message(tmp_path, monkeypatch):
    """SIGKILL before W&B's first write leaves a file of its 7-byte header: the report showed it as a
    run of its own with six "add HessianEigenMonitor"-style messages (an outside trial)."""
    offline_env(monkeypatch, tmp_path)
    try:
        run = wandb.init(mode="offline", dir=tmp_path / "killed", project="t")
        run.log({"train_loss": 1.0, "trainer/global_step": 0})
        run.finish()
    finally:
        wandb.teardown()
    path = find_run_file(tmp_path / "killed")
    path.write_bytes(path.read_bytes()[:7])  # the header alone
    write_csv(
        tmp_path / "killed" / "csv" / "metrics.csv",
        [{"step": s, "train_loss": 1.0 / (s + 1)} for s in range(5)],
    )
    messages = []
    written = write_report(tmp_path / "killed", progress=False, echo=messages.append)
    assert [p.name for p in written] == ["loss.png"]
    assert (
        f"skipped {path}: it holds no metrics (a run stopped before it logged, or an empty log)" in messages
    )
    assert sum(".png" in m for m in messages if "skipped" in m) == 5, messages  # one run's, the CSV's
    with pytest.raises(FileNotFoundError, match="no metrics in the runs under"):
        write_report(path, progress=False, echo=messages.append)


def test_the_learning_rate_plot_draws_the_capped_rate_the_steps_ran_at(tmp_path):
    """Under SharpnessCappedLR the plot fell back to eos/lr, sampled at the measurements and a step behind
    the base, where cap/lr and cap/base_lr are logged at every step: an outside trial's steps 16-19 ran at
    the cap's 0.002145 and the plot showed 0.002966; its binding steps did not appear at all."""
    from pf_lightning import report

    steps = np.arange(6)
    series = {
        "cap/lr": (steps, np.array([0.5, 0.4, 0.3, 0.3, 0.2, 0.1])),
        "cap/base_lr": (steps, np.array([0.5, 0.5, 0.45, 0.4, 0.3, 0.1])),
        "eos/lr": (np.array([0, 5]), np.array([0.5, 0.1])),
    }
    drawn = report.plot_learning_rate(report.RunMetrics("cap", tmp_path, "csv", series), tmp_path / "l.png")
    assert set(drawn) == {"cap/lr", "cap/base_lr"}
    assert list(drawn["cap/lr"][1]) == [0.5, 0.4, 0.3, 0.3, 0.2, 0.1]
