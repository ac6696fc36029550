"""EdgeOfStabilityMonitor: thresholds of the optimizer in use, preconditioned sharpness, PF regimes,
the early warning, W&B, and the edge of stability itself on sklearn digits."""

import copy
import itertools
import math
import re
import warnings

import lightning as L
import pytest
import torch
from cases import dense_hessian, make_case
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import DigitsClassifier, TwoOptimizers, digits, logged, trainer

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor
from pf_lightning import logging as names
from pf_lightning.curvature import ParameterSpace, optimizer_preconditioner
from pf_lightning.stability import non_monotonicity


def fit(tmp_path, model, steps, monitor=None, **eos_kwargs):
    monitor = monitor or HessianEigenMonitor(k=2, every_n_steps=5, tol=1e-4)
    eos = EdgeOfStabilityMonitor(**eos_kwargs)
    t = trainer(tmp_path, max_steps=steps, callbacks=[eos, monitor])  # order does not matter: listeners
    t.fit(model)
    return t, monitor, eos


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 2 / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), (2 + 2 * 0.9) / 0.1),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
            (2 + 2 * 0.9) / (0.1 * (1 + 2 * 0.9)),
        ),
    ],
)
def test_threshold_follows_the_optimizer_in_use(tmp_path, optimizer, expected):
    L.seed_everything(0)
    model = DigitsClassifier(n=128)
    model.configure_optimizers = lambda: optimizer(model.parameters())
    t, monitor, eos = fit(tmp_path, model, 5)
    last = eos.history[-1]
    assert last["eos/threshold"] == pytest.approx(expected)
    assert last["eos/sharpness"] == pytest.approx(monitor.history[-1]["eigenvalues"][0])
    assert float(t.callback_metrics["eos/ratio"]) == pytest.approx(last["eos/sharpness"] / expected)


def test_sgd_weight_decay_shifts_the_sharpness_and_the_gradient_it_projects(tmp_path):
    """L2 decay w: the step sees H + wI and the gradient g + w theta; both enter the diagnostics."""
    L.seed_everything(0)
    model = DigitsClassifier(n=128)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
    _, monitor, eos = fit(tmp_path, model, 5)
    last, result = eos.history[-1], monitor.latest
    assert last["eos/sharpness"] == pytest.approx(monitor.history[-1]["eigenvalues"][0] + 0.5)
    x, y = digits(128)
    params = list(model.parameters())
    g = torch.cat([t_.reshape(-1) for t_ in torch.autograd.grad(model.loss((x, y)), params)])
    seen = g + 0.5 * torch.cat([p.detach().reshape(-1) for p in params])
    assert last["pf/grad_norm"] == pytest.approx(float(seen.norm()), rel=1e-5)
    assert float(seen.norm()) > 1.5 * float(g.norm())  # the decay term is not a rounding-level change
    for i in range(2):
        assert last[f"pf/projection_{i + 1}"] == pytest.approx(
            float(seen @ result.eigenvectors[:, i]), rel=1e-4, abs=1e-6
        )


def test_principal_flow_quantities_match_their_definitions(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.7)
    _, monitor, eos = fit(tmp_path, model, 5)
    last, result = eos.history[-1], monitor.latest
    x, y = digits(128)
    params = list(model.parameters())
    g = torch.cat([t_.reshape(-1) for t_ in torch.autograd.grad(model.loss((x, y)), params)])
    for i in range(2):
        lam = float(result.eigenvalues[i])
        assert last[f"pf/hlambda_{i + 1}"] == pytest.approx(0.7 * lam)
        assert last[f"pf/log_growth_{i + 1}"] == pytest.approx(
            torch.log(torch.tensor(abs(1 - 0.7 * lam))).item(), rel=1e-6
        )
        assert last[f"pf/projection_{i + 1}"] == pytest.approx(
            float(g @ result.eigenvectors[:, i]), rel=1e-4, abs=1e-7
        )
    unstable = [i for i in range(2) if 0.7 * float(result.eigenvalues[i]) > 2]
    assert last["pf/unstable_directions"] == len(unstable)
    fraction = sum(float(g @ result.eigenvectors[:, i]) ** 2 for i in unstable) / float(g @ g)
    assert last["pf/unstable_grad_fraction"] == pytest.approx(fraction, rel=1e-4, abs=1e-9)


class _Adam(DigitsClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2, betas=(0.9, 0.999))


def test_adam_preconditioned_sharpness_equals_dense_at_the_same_step(tmp_path):
    L.seed_everything(0)
    model = _Adam(hidden=12, n=64).double()
    x, y = digits(64)
    probe = [(x.double(), y)]
    monitor = HessianEigenMonitor(k=1, every_n_steps=4, probe=probe, tol=1e-8, at_fit_start=False)
    t, _, eos = fit(tmp_path, model, 4, monitor=monitor)
    assert [h["step"] for h in eos.history] == [4]
    # Dense lambda_max(P^-1 H) from the optimizer state at step 4, computed independently.
    case = make_case("mlp")
    case.model, case.batches = model, probe
    case.loss_fn = lambda m, b: 0.5 * ((m(b[0]) - torch.nn.functional.one_hot(b[1], 10)) ** 2).sum(1).mean()
    H = dense_hessian(case)
    P = optimizer_preconditioner(t.optimizers[0], ParameterSpace(model))[0]
    D = P.rsqrt()
    expected = float(torch.linalg.eigvalsh(D[:, None] * H * D[None, :])[-1])
    last = eos.history[-1]
    assert last["eos/preconditioned_sharpness"] == pytest.approx(expected, rel=1e-6)
    assert last["eos/sharpness"] == last["eos/preconditioned_sharpness"]
    assert last["eos/threshold"] == pytest.approx(38 / 1e-2)
    assert monitor.history[-1]["eigenvalues"][0] == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6
    )


def test_early_warning_fires_once_per_crossing_with_the_hook(tmp_path):
    L.seed_everything(0)
    events = []
    model = DigitsClassifier(n=128, lr=0.05)
    with pytest.warns(RuntimeWarning, match="stability threshold") as record:
        fit(
            tmp_path,
            model,
            10,
            warn_ratio=0.01,
            on_warning=lambda t, m, metrics: events.append(t.global_step),
        )
    assert events == [0]  # crossed at the first measurement and stayed above
    assert len([w for w in record if "stability threshold" in str(w.message)]) == 1


def test_proxies_are_bounded_by_the_spectrum(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1)  # full batch: the proxy batch is the probe set
    t, monitor, _ = fit(tmp_path, model, 5, proxies=True)
    v, q = float(t.callback_metrics["pf/hg_ratio"]), float(t.callback_metrics["pf/rayleigh_quotient"])
    assert abs(q) <= v <= float(monitor.latest.eigenvalues[0]) * 1.001
    assert float(t.callback_metrics["pf/drift_ratio"]) == pytest.approx(0.1 / 2 * v)


def test_proxies_with_coupled_weight_decay_are_of_the_loss_the_step_descends(tmp_path):
    """As eos/sharpness (lambda_max + w): ||(H + w)(g + w theta)|| / ||g + w theta||, against the dense float64
    Hessian of the full batch at the final parameters (the proxies of the fit's last step; callback_metrics hold float32)."""
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1).double()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.05)
    t, _, _ = fit(tmp_path, model, 3, proxies=True)
    x, y = digits(128)
    case = make_case("mlp")
    case.model, case.batches = model, [(x.double(), y)]
    case.loss_fn = lambda m, b: 0.5 * ((m(b[0]) - torch.nn.functional.one_hot(b[1], 10)) ** 2).sum(1).mean()
    space = ParameterSpace(model)
    grads = torch.autograd.grad(model.loss((x.double(), y)), space.params)
    theta = space.values()
    g = torch.cat([gr.reshape(-1) for gr in grads]) + 0.05 * theta
    Hw = dense_hessian(case) + 0.05 * torch.eye(theta.numel(), dtype=torch.float64)
    assert float(t.callback_metrics["pf/hg_ratio"]) == pytest.approx(
        float((Hw @ g).norm() / g.norm()), rel=1e-6
    )
    assert float(t.callback_metrics["pf/rayleigh_quotient"]) == pytest.approx(
        float(g @ Hw @ g / (g @ g)), rel=1e-6
    )


def test_several_optimizers_measured_against_the_chosen_one(tmp_path, caplog):
    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, loss_fn=lambda m, b: m.loss(b))
    eos = EdgeOfStabilityMonitor(optimizer_index=1)
    with (
        caplog.at_level("INFO"),
        pytest.warns(RuntimeWarning, match=r"\(optimizer 1\) does not update 2 trainable"),
    ):
        trainer(tmp_path, max_steps=2, callbacks=[monitor, eos]).fit(TwoOptimizers(n=64))
    assert eos.history[-1]["eos/threshold"] == pytest.approx((2 + 2 * 0.9) / 0.05)
    assert "thresholds are those of optimizer 1 (SGD)" in caplog.text


def test_two_monitors_of_one_hessian_monitor_are_refused_and_the_named_fix_logs_both(tmp_path):
    """Two EdgeOfStabilityMonitors judging two optimizers on one Hessian monitor logged under the same eos/*
    names: the CSV kept optimizer 1's threshold 76 at every step and optimizer 0's 20 was lost. Refused at
    set-up; the fix the error names logs both."""
    loss_fn = lambda m, b: m.loss(b)  # noqa: E731
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, loss_fn=loss_fn)
    pair = [EdgeOfStabilityMonitor(optimizer_index=0), EdgeOfStabilityMonitor(optimizer_index=1)]
    with pytest.raises(MisconfigurationException, match=r"2 EdgeOfStabilityMonitors read one .* 'eos/\*'"):
        trainer(tmp_path, max_steps=2, callbacks=[monitor, *pair]).fit(TwoOptimizers(n=64))
    L.seed_everything(0)
    second = HessianEigenMonitor(k=1, every_n_steps=2, loss_fn=loss_fn, name="opt1")
    pair = [
        EdgeOfStabilityMonitor(optimizer_index=0),
        EdgeOfStabilityMonitor(monitor=second, optimizer_index=1),
    ]
    t = trainer(tmp_path, max_steps=4, logger=CSVLogger(tmp_path), callbacks=[monitor, second, *pair])
    with pytest.warns(RuntimeWarning, match="does not update"):
        t.fit(TwoOptimizers(n=64))
    metrics = logged(t)
    assert metrics["eos/threshold"] == dict.fromkeys([0, 2, 4], pytest.approx(2 / 0.1))
    assert metrics["eos/opt1/threshold"] == dict.fromkeys([0, 2, 4], pytest.approx((2 + 2 * 0.9) / 0.05))


class _ReturningTwoOptimizers(TwoOptimizers):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        return self.loss(batch).detach()


@pytest.mark.parametrize("returns", [False, True])
def test_manual_optimization_without_a_returned_loss_says_the_loss_metric_is_missing(tmp_path, returns):
    """eos/loss_non_monotonicity needs each step's loss: a manual training_step returning nothing left it out
    in silence (outside trial); it is said once, and a returned loss gives the metric."""
    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, loss_fn=lambda m, b: m.loss(b))
    eos = EdgeOfStabilityMonitor(optimizer_index=1)
    model = (_ReturningTwoOptimizers if returns else TwoOptimizers)(n=64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=6, callbacks=[monitor, eos]).fit(model)
    said = [str(w.message) for w in record if "eos/loss_non_monotonicity needs" in str(w.message)]
    logged = [h for h in eos.history if "eos/loss_non_monotonicity" in h]
    if returns:
        assert not said and [h["step"] for h in logged] == [4, 6]  # two losses from the second batch on
    else:
        assert len(said) == 1 and "training_step returned no loss" in said[0] and not logged


def test_accumulated_negative_curvature_counts_the_judged_optimizers_own_steps(tmp_path):
    """Under manual optimization Lightning's step counts both optimizers' steps (two a batch): the sum
    eta * sum min(lambda_min, 0) over the judged optimizer's steps counted each step twice (outside trial:
    -1.597 for -0.7985, exactly 2x). A run resumed between two measurements keeps the count."""

    def callbacks():
        monitor = HessianEigenMonitor(
            k=1, which="both", every_n_steps=4, at_fit_end=False, loss_fn=lambda m, b: m.loss(b)
        )
        return monitor, EdgeOfStabilityMonitor()  # optimizer 0: SGD at lr 0.1, stepped once a batch

    def fit(path, steps, model, ckpt_path=None):
        monitor, eos = callbacks()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the block optimizer 0 does not update
            t = trainer(path, max_steps=steps, callbacks=[monitor, eos])
            t.fit(model, ckpt_path=ckpt_path)
        return t, monitor, eos

    L.seed_everything(0)
    model = TwoOptimizers(n=64, lr=0.1)
    resumed = copy.deepcopy(model)
    _, monitor, eos = fit(tmp_path / "straight", 12, model)
    steps = [h["step"] for h in monitor.history]
    assert steps == [0, 4, 8, 12]
    lambda_min = [min(h["eigenvalues"][-1], 0.0) for h in monitor.history]
    # one step of optimizer 0 per batch, two global steps per batch
    expected = sum(0.1 * (b - a) / 2 * lam for a, b, lam in zip([0, *steps], steps, lambda_min, strict=False))
    assert expected < -1e-3  # negative curvature to sum
    assert eos.history[-1]["eos/accumulated_negative_curvature"] == pytest.approx(expected, rel=1e-6)

    first, _, eos_first = fit(tmp_path / "first", 6, resumed)  # measured at 4, then one batch more
    assert eos_first.state_dict()["interval_steps"] == 1
    first.save_checkpoint(tmp_path / "six.ckpt")
    _, _, eos_second = fit(tmp_path / "second", 12, resumed, ckpt_path=tmp_path / "six.ckpt")
    assert eos_second.history[-1]["eos/accumulated_negative_curvature"] == pytest.approx(expected, rel=1e-6)


def test_a_hessian_monitor_resumed_under_other_settings_says_so_and_its_step_is_not_recorded_twice(tmp_path):
    """A resume with k changed: the Hessian monitor's state (keyed by k, which, name) was not loaded, so it
    measured the step it resumed at again, and the EoS monitor, whose state was, recorded that step twice
    (history [0, 4, 8, 8, 12]): eos/sharpening_slope at 12 was -0.032 where an unchanged resume logged -0.065
    (an outside trial), and only Lightning's generic warning spoke. Both monitors say so now, and the EoS
    monitor does not judge a step it has judged."""

    def fit(path, steps, model, k, ckpt_path=None):
        monitor = HessianEigenMonitor(k=k, every_n_steps=4, at_fit_end=False, tol=1e-8)
        eos = EdgeOfStabilityMonitor(monitor, slope_window=3)
        t = trainer(path, max_steps=steps, callbacks=[monitor, eos])
        t.fit(model, ckpt_path=ckpt_path)
        return t, eos

    L.seed_everything(0)
    model = DigitsClassifier(n=64, lr=0.5).double()
    first, _ = fit(tmp_path / "first", 8, model, k=2)
    first.save_checkpoint(tmp_path / "eight.ckpt")
    resumed = [copy.deepcopy(model) for _ in range(2)]
    _, same = fit(tmp_path / "same", 12, resumed[0], k=2, ckpt_path=tmp_path / "eight.ckpt")
    with pytest.warns(
        RuntimeWarning, match=r"HessianEigenMonitor: the checkpoint holds its state under other settings"
    ):
        _, other = fit(tmp_path / "other", 12, resumed[1], k=3, ckpt_path=tmp_path / "eight.ckpt")
    assert [h["step"] for h in same.history] == [h["step"] for h in other.history] == [0, 4, 8, 12]
    slope = same.history[-1][names.SHARPENING_SLOPE]
    assert slope != 0 and other.history[-1][names.SHARPENING_SLOPE] == pytest.approx(slope, rel=1e-6)
    # A monitor added under a new name is not one whose settings changed, though another was dropped.
    from types import SimpleNamespace

    from pf_lightning.callbacks._checkpoint import warn_other_settings

    a, b, c = (HessianEigenMonitor(k=2, name=name) for name in "abc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_other_settings(
            c, SimpleNamespace(callbacks=[a, c]), {"callbacks": {a.state_key: {}, b.state_key: {}}}, "name"
        )


def test_the_warnings_of_named_monitors_say_which_monitor(tmp_path):
    """Two named EoS monitors each warned "step 0: sharpness ... reached ..." without saying whose."""
    L.seed_everything(0)
    a = HessianEigenMonitor(k=1, every_n_steps=None, at_fit_end=False, name="a")
    b = HessianEigenMonitor(k=1, every_n_steps=None, at_fit_end=False, name="b", probe=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = trainer(
            tmp_path, max_steps=1, callbacks=[a, b, EdgeOfStabilityMonitor(a), EdgeOfStabilityMonitor(b)]
        )
        fit.fit(DigitsClassifier(n=64, lr=0.6))
    edges = sorted(str(w.message)[:18] for w in caught if "reached" in str(w.message))
    assert edges == ["[a] step 0: sharpn", "[b] step 0: sharpn"]


def test_whether_the_preconditioned_sharpness_converged_is_logged(tmp_path):
    """Under Adam the sharpness and the ratios come from the EoS monitor's own measurement of
    lambda_max(P^-1 H), whose convergence nothing logged: an outside trial's finite differences across ReLU
    kinks gave eos/sharpness 10% and 21% high, flagged not converged only in a Python warning."""

    def fit(path, **monitor):
        hessian = HessianEigenMonitor(k=1, every_n_steps=2, at_fit_start=False, at_fit_end=False, **monitor)
        t = trainer(path, max_steps=4, callbacks=[hessian, EdgeOfStabilityMonitor()], logger=CSVLogger(path))
        t.fit(DigitsClassifier(n=64, optimizer="adam", lr=0.01))
        metrics = logged(t)
        return metrics["eos/preconditioned_converged"], metrics["eos/preconditioned_n_hvp"]

    L.seed_everything(0)
    converged, products = fit(tmp_path / "default")
    assert converged == {2: 1.0, 4: 1.0} and all(3 < n < 300 for n in products.values())
    with pytest.warns(RuntimeWarning, match="the preconditioned sharpness did not reach tol=1e-09"):
        # Its products were charged to the work budget but logged nowhere (an outside trial could not
        # replay an Adam run's schedule from the logs).
        assert fit(tmp_path / "starved", tol=1e-9, max_hvp=3) == ({2: 0.0, 4: 0.0}, {2: 3.0, 4: 3.0})


def test_missing_hessian_monitor_fails_at_setup(tmp_path):
    with pytest.raises(MisconfigurationException, match="add HessianEigenMonitor"):
        trainer(tmp_path, max_steps=1, callbacks=[EdgeOfStabilityMonitor()]).fit(DigitsClassifier(n=64))
    # One given but left out of the callbacks never measures: the fit logged no eos/* and said nothing.
    outside = EdgeOfStabilityMonitor(monitor=HessianEigenMonitor())
    with pytest.raises(MisconfigurationException, match="not among the Trainer's callbacks"):
        trainer(tmp_path, max_steps=1, callbacks=[outside]).fit(DigitsClassifier(n=64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"warn_ratio": -1}, "warn_ratio"),
        ({"loss_window": 1}, "loss_window"),
        ({"optimizer_index": -1}, "optimizer_index"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        EdgeOfStabilityMonitor(**kwargs)


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    import wandb
    from wandb_offline import offline_env

    from pf_lightning.wandb_reader import find_run_file, history, metric_definitions

    offline_env(monkeypatch, tmp_path)
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1)
    monitor = HessianEigenMonitor(k=2, every_n_steps=3)
    eos = EdgeOfStabilityMonitor(chart_every=1)
    try:
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="pf")
        trainer(tmp_path, max_steps=6, logger=logger, callbacks=[monitor, eos]).fit(model)
        logger.experiment.finish()
    finally:
        wandb.teardown()
    path = find_run_file(tmp_path)
    # Each log_metrics call is one W&B row; rows of one measurement share trainer/global_step.
    by_step: dict[int, dict] = {}
    for row in history(path):
        by_step.setdefault(row.get("trainer/global_step"), {}).update(row)
    rows = [by_step[step] for step in sorted(s for s, r in by_step.items() if "hessian/eig_1" in r)]
    assert [r["trainer/global_step"] for r in rows] == [h["step"] for h in monitor.history] == [0, 3, 6]
    for row, h, e in zip(rows, monitor.history, eos.history, strict=True):
        assert row["hessian/eig_1"] == pytest.approx(h["eigenvalues"][0], rel=1e-6)
        assert row["eos/ratio"] == pytest.approx(e["eos/ratio"], rel=1e-6)
        assert row["pf/log_growth_1"] == pytest.approx(e["pf/log_growth_1"], rel=1e-6)
    globs = {(m["glob_name"], m["step_metric"]) for m in metric_definitions(path)}
    assert {("hessian/*", "trainer/global_step"), ("eos/*", "trainer/global_step")} <= globs
    assert any("eos/spectrum_vs_threshold_table" in r for r in history(path))  # the custom chart's data
    from pf_lightning.wandb_reader import tables

    spectra = [t for key, t in tables(path.parent).items() if "hessian/spectra" in key or "spectra" in key]
    assert spectra and spectra[-1]["columns"] == ["step", "index", "eigenvalue", "threshold"]
    assert [row[:2] for row in spectra[-1]["data"]][:2] == [[0, 1], [0, 2]]
    # One chart per measurement: the fit end draws no second copy of the last one (it did, at step 6).
    charted = [r["trainer/global_step"] for r in history(path) if "hessian/spectra" in r]
    assert charted == [0, 3, 6]


@pytest.mark.slow
@pytest.mark.parametrize("lr", [0.15, 0.2])
def test_sharpness_rises_to_two_over_lr_and_hovers(tmp_path, lr):
    """Cohen et al.'s first figure on sklearn digits: full-batch GD, tanh MLP, squared error.

    At the edge the trajectory is chaotic: the floating-point reduction order, which depends on the
    number of threads, changes which measurements land on an overshoot (lr 0.2: median ratio 1.06 with
    two threads, 1.10 with one). Two threads, as on CI, make the run reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        L.seed_everything(0)
        model = DigitsClassifier(lr=lr, hidden=200, n=1024)
        monitor = HessianEigenMonitor(k=1, every_n_steps=50)
        _, _, eos = fit(tmp_path, model, 900, monitor=monitor)
    finally:
        torch.set_num_threads(threads)
    ratios = [h["eos/ratio"] for h in eos.history]
    assert ratios[0] < 0.75  # starts well below the edge
    assert eos.first_edge_step is not None
    after = [r for h, r in zip(eos.history, ratios, strict=True) if h["step"] >= eos.first_edge_step]
    assert len(after) >= 4
    assert abs(sorted(after)[len(after) // 2] - 1) < 0.10  # the median hovers within 10% of 2/lr
    assert all(0.85 < r < 1.3 for r in after)  # single measurements overshoot most right after the catapult


def test_loss_window_holds_one_full_loss_per_optimizer_step(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(n=256, lr=0.05, batch_size=64)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, probe=64)
    eos = EdgeOfStabilityMonitor()
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                seen.append((trainer.global_step, float(pl_module.loss(batch))))

    trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[monitor, eos, Record()]).fit(model)
    assert len(eos.losses) == 3  # one entry per optimizer step, none for the half-done first group
    # Lightning's outputs hold the pre-step loss of each micro-batch, scaled by 1/2: the entry of step s is
    # the mean of the two unscaled pre-step losses. Record() sees post-step parameters for the second
    # micro-batch of each group, so compare only the scale: within 20% of the recorded micro-batch losses.
    recorded = [sum(v for s, v in seen[2 * i : 2 * i + 2]) / 2 for i in range(3)]
    for entry, reference in zip(eos.losses, recorded, strict=True):
        assert entry == pytest.approx(reference, rel=0.2)


@pytest.mark.parametrize("eos_first", [False, True], ids=["monitor first", "eos first"])
def test_a_measurement_s_loss_window_ends_at_the_step_it_was_taken(tmp_path, eos_first):
    """eos/loss_non_monotonicity at step s counts the rises among the losses of steps 1..s, whichever
    callback comes first: listed after the Hessian monitor (the README's order), the monitor measures at
    its batch end before this callback has seen the loss of step s."""
    L.seed_everything(0)
    model = DigitsClassifier(n=640, lr=1.0, batch_size=32)
    monitor = HessianEigenMonitor(k=1, every_n_steps=4, probe=64, at_fit_start=False)
    eos = EdgeOfStabilityMonitor(loss_window=50, batch_sharpness=False)
    losses = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[trainer.global_step] = float(outputs["loss"])

    callbacks = [Record(), eos, monitor] if eos_first else [Record(), monitor, eos]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the edge warning: lr 3 is past it
        trainer(tmp_path, max_steps=12, callbacks=callbacks).fit(model)
    logged = {h["step"]: h["eos/loss_non_monotonicity"] for h in eos.history}
    assert sorted(logged) == [4, 8, 12]
    for step, value in logged.items():
        window = [losses[s] for s in range(1, step + 1)]
        rises = sum(b > a for a, b in itertools.pairwise(window))
        assert value == rises / (len(window) - 1), (step, value, window)


class _LossReadsNaN(DigitsClassifier):
    """Its gradients are the MSE's; the loss value it returns is NaN from step 2 (a NaN added as a constant)."""

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        return loss + torch.tensor(float("nan")) if self.global_step >= 2 else loss


def test_a_non_finite_loss_in_the_window_is_no_monotone_descent(tmp_path):
    """A NaN compared as 'not rising': losses NaN from step 2 on logged eos/loss_non_monotonicity 0.0, a
    perfectly monotone (stable) run, without a word (an outside trial)."""
    assert math.isnan(non_monotonicity([3.0, float("nan"), 1.0])) and non_monotonicity([3.0, 2.0]) == 0.0
    monitor = HessianEigenMonitor(k=1, every_n_steps=3, loss_fn=lambda m, b: m.loss(b), at_fit_start=False)
    eos = EdgeOfStabilityMonitor(loss_window=5, batch_sharpness=False)
    with pytest.warns(
        RuntimeWarning, match=r"step 3: a training loss of the last \d steps is NaN or infinite"
    ):
        trainer(tmp_path, max_steps=6, callbacks=[monitor, eos]).fit(_LossReadsNaN(n=64))
    logged = {h["step"]: h["eos/loss_non_monotonicity"] for h in eos.history}
    assert sorted(logged) == [3, 6] and all(math.isnan(v) for v in logged.values())


class _EndsEpochsEarly(DigitsClassifier):
    def on_train_batch_start(self, batch, batch_idx):
        return -1 if batch_idx == 2 else None  # Lightning's way to end an epoch here


def test_a_measurement_after_an_epoch_cut_short_is_judged_at_once(tmp_path):
    """The module ends each epoch at its third batch (on_train_batch_start returns -1): that batch
    neither steps nor reaches a batch end, and the epoch-end measurements after it are judged then and
    there, with every step's loss in their window (they were held for a batch end that never came)."""
    L.seed_everything(0)
    model = _EndsEpochsEarly(n=128, batch_size=32)
    monitor = HessianEigenMonitor(k=1, every_n_steps=None, every_n_epochs=1, at_fit_start=False, probe=64)
    eos = EdgeOfStabilityMonitor(batch_sharpness=False)
    trainer(tmp_path, max_epochs=2, callbacks=[monitor, eos]).fit(model)
    assert [h["step"] for h in monitor.history] == [2, 4]  # two epoch ends (the fit end is the second)
    assert [h["step"] for h in eos.history] == [2, 4] and len(eos.losses) == 4


def test_wandb_chart_holds_batch_and_critical_sharpness_of_a_mini_batch_run(tmp_path, monkeypatch):
    """The spectrum-vs-threshold chart of a heavy-ball mini-batch run: λ_max, the threshold, the batch
    sharpness with its ±2 s.e. band and its own threshold 2/lr, and the critical sharpness, as logged."""
    import wandb
    from wandb_offline import offline_env

    from pf_lightning.wandb_reader import find_run_file, tables

    offline_env(monkeypatch, tmp_path)
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1, batch_size=32, momentum=0.5)
    eos = EdgeOfStabilityMonitor(chart_every=1, critical_every_n_steps=2, batch_sharpness_batches=3)
    try:
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="pf")
        callbacks = [HessianEigenMonitor(k=1, every_n_steps=2, probe=64), eos]
        trainer(tmp_path, max_steps=4, logger=logger, callbacks=callbacks).fit(model)
        logger.experiment.finish()
    finally:
        wandb.teardown()
    charts = [
        t for key, t in tables(find_run_file(tmp_path).parent).items() if "spectrum_vs_threshold" in key
    ]
    final = max(charts, key=lambda t: len(t["data"]))  # the chart logged at the end of fit
    assert final["columns"] == ["step", "lineKey", "lineVal"]
    lines: dict[str, list] = {}
    for step, key, value in final["data"]:
        lines.setdefault(key, []).append((step, value))
    assert {"eig_1", "threshold", "batch_sharpness", "batch_threshold", "critical_sharpness"} <= lines.keys()
    band = [lines[f"batch_sharpness {sign} 2 s.e."] for sign in "-+"]
    for h, (step, value), low, high in zip(eos.history, lines["batch_sharpness"], *band, strict=True):
        assert step == h["step"] and value == pytest.approx(h["eos/batch_sharpness"])
        half = 2 * h["eos/batch_sharpness_stderr"]
        assert low[1] == pytest.approx(value - half) and high[1] == pytest.approx(value + half)
    assert all(row[1] == pytest.approx(2 / 0.1) for row in lines["batch_threshold"])
    assert [row[0] for row in lines["critical_sharpness"]] == [2, 4]
    assert lines["critical_threshold"] == [(2, pytest.approx(2 / 0.1)), (4, pytest.approx(2 / 0.1))]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_edge_reads_the_measurement_s_gradient_and_builds_no_operator_of_its_own(tmp_path, optimizer):
    """Full batch, double backward: a fit with the EoS monitor calls the probe's loss exactly as often as
    one without it (the projections come from the gradient the measurement read off its cached graphs).
    Under Adam the rule reads no projections, and the measurement is not asked for the gradient."""
    calls, seen = [0], []

    def loss_fn(model, batch):
        calls[0] += 1
        return model.loss(batch)

    counts = {}
    for with_eos in (False, True):
        L.seed_everything(0)
        calls[0] = 0
        model = DigitsClassifier(n=128, lr=0.5 if optimizer == "sgd" else 1e-2, optimizer=optimizer)
        monitor = HessianEigenMonitor(k=2, every_n_steps=2, tol=1e-4, loss_fn=loss_fn, hvp="double_backward")
        monitor.add_listener(lambda trainer, module, result: seen.append(result.gradient))
        callbacks = [EdgeOfStabilityMonitor(), monitor] if with_eos else [monitor]
        trainer(tmp_path, max_steps=4, callbacks=callbacks).fit(model)
        counts[with_eos] = calls[0]
        if with_eos and optimizer == "sgd":
            assert all(g is not None for g in seen[-3:]) and monitor.latest.gradient is None
    if optimizer == "adam":  # the preconditioned measurement (its own loss calls) is the EoS monitor's
        assert all(g is None for g in seen)
    else:
        assert counts[True] == counts[False] > 0


class _Scheduled(DigitsClassifier):
    """The rate ``factor(step)`` times ``lr``, set before every optimizer step."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _warm_up_from_zero(step):  # linear, as Hugging Face's get_linear_schedule_with_warmup starts
    return min(1.0, step / 4)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_warm_up_from_rate_zero_logs_the_sharpness_and_judges_the_edge_from_the_first_positive_rate(
    tmp_path, optimizer
):
    L.seed_everything(0)
    model = _Scheduled(_warm_up_from_zero, n=128, lr=0.1 if optimizer == "sgd" else 1e-2, optimizer=optimizer)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, tol=1e-6)
    t = trainer(
        tmp_path, max_steps=6, callbacks=[monitor, EdgeOfStabilityMonitor()], logger=CSVLogger(tmp_path)
    )
    with pytest.warns(RuntimeWarning, match="learning rate of .* is 0 .* no stability threshold"):
        t.fit(model)
    metrics = logged(t)
    assert metrics["eos/lr"][0] == 0.0 and 0 not in metrics["eos/threshold"] and "eos/skipped" not in metrics
    if optimizer == "sgd":  # the sharpness does not depend on the step: logged at rate 0 too
        assert metrics["eos/sharpness"][0] == pytest.approx(metrics["hessian/eig_1"][0], rel=1e-12)
        assert sorted(metrics["eos/threshold"]) == [2, 4, 6]
        for step in (2, 4, 6):
            assert metrics["eos/threshold"][step] == pytest.approx(2 / (0.1 * min(1.0, step / 4)))
    else:  # no preconditioner before the first step; judged from then on
        assert 0 not in metrics["eos/sharpness"]
        assert sorted(metrics["eos/preconditioned_sharpness"]) == [2, 4, 6]


def test_optimizer_settings_without_a_threshold_fail_at_fit_start(tmp_path):
    model = DigitsClassifier(n=64, momentum=1.5)  # torch takes any momentum >= 0; heavy ball needs < 1
    t = trainer(tmp_path, max_steps=2, callbacks=[HessianEigenMonitor(k=1), EdgeOfStabilityMonitor()])
    with pytest.raises(
        MisconfigurationException, match=r"SGD's settings give no stability threshold.*momentum"
    ):
        t.fit(model)


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_maximize_in_any_parameter_group_fails_at_fit_start(tmp_path, kind):
    """Group 1 ascends: no threshold applies to the run (not judged with group 0's, not skipped mid-run)."""
    model = DigitsClassifier(n=64)
    first, rest = list(model.net[0].parameters()), list(model.net[2:].parameters())
    make = getattr(torch.optim, kind)
    model.configure_optimizers = lambda: make([{"params": first}, {"params": rest, "maximize": True}], lr=0.1)
    t = trainer(tmp_path, max_steps=2, callbacks=[HessianEigenMonitor(k=1), EdgeOfStabilityMonitor()])
    with pytest.raises(MisconfigurationException, match=f"{kind}'s parameter group 1 has maximize=True"):
        t.fit(model)


def test_maximize_is_refused_with_a_threshold_too(tmp_path):
    """An ascent's edge is where -lambda_min(H) meets its threshold; with threshold= the monitor would compare
    the measured lambda_max(H) with it. The refusal names the fix (the negated objective), not threshold=."""
    model = DigitsClassifier(n=64)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    t = trainer(
        tmp_path, max_steps=2, callbacks=[HessianEigenMonitor(k=1), EdgeOfStabilityMonitor(threshold=20.0)]
    )
    with pytest.raises(MisconfigurationException, match=r"maximize=True.*negated objective") as caught:
        t.fit(model)
    assert "threshold=" not in str(caught.value)


def test_parameter_groups_that_step_differently_are_named(tmp_path):
    """Momentum 0.9 on the first layer, none on the rest: group 0's (2 + 2 beta)/lr is not the edge of the
    others' directions (the helper's softmax case: rho 1.40 where group 0's regime says oscillating and
    stable); the warning names both steps. One set of settings draws no warning."""
    for momenta, expected in [((0.9, 0.0), 1), ((0.9, 0.9), 0)]:
        model = DigitsClassifier(n=64)
        first, rest = list(model.net[0].parameters()), list(model.net[2:].parameters())
        groups = [{"params": first, "momentum": momenta[0]}, {"params": rest, "momentum": momenta[1]}]
        model.configure_optimizers = lambda groups=groups: torch.optim.SGD(groups, lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(tmp_path, model, 2)
        named = [str(w.message) for w in caught if "step differently" in str(w.message)]
        assert len(named) == expected, [str(w.message) for w in caught]
        if expected:
            assert "group 0: heavy_ball" in named[0] and "group 1: gd, 2/lr, lr=0.1" in named[0]


class _PreconditionedOverPart(DigitsClassifier):
    """Adam (or Adagrad) that does not move every trainable parameter: an unused head (never a gradient,
    so no Adam state, and Adagrad's at step 0), or the first layer left out of the optimizer."""

    def __init__(self, case, **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.head = torch.nn.Linear(3, 3)  # trainable, never in the loss

    def configure_optimizers(self):
        params = self.net[2:].parameters() if self.case == "part" else self.parameters()
        if self.case == "adagrad":  # which creates every parameter's state, at step 0, up front
            return torch.optim.Adagrad(params, lr=1e-2)
        return torch.optim.Adam(params, lr=1e-2)


def _preconditioner(optimizer, p):
    state = optimizer.state[p]
    if isinstance(optimizer, torch.optim.Adagrad):
        return state["sum"].sqrt() + 1e-10
    (beta1, beta2), eps, t = (0.9, 0.999), 1e-8, float(state["step"])
    return (1 - beta1**t) * ((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)


def test_adam_groups_at_different_rates_are_measured_with_their_rates(tmp_path):
    """Layer-wise rates (1e-2 on the first layer, 1e-3 on the rest): group g steps -eta_g P_g^-1 m, so the
    preconditioned sharpness against group 0's 38/eta_0 is lambda_max of diag(eta_g/eta_0) P^-1 H, here
    from a dense float64 Hessian and Adam's state read independently; no warning (the settings agree).
    Before, group 0's rate stood for all: 748 where the step's is 646."""
    L.seed_everything(0)
    model = DigitsClassifier(hidden=12, n=64).double()
    first, rest = list(model.net[0].parameters()), list(model.net[2:].parameters())
    rates = {id(p): 1e-2 for p in first} | {id(p): 1e-3 for p in rest}
    model.configure_optimizers = lambda: torch.optim.Adam(
        [{"params": first, "lr": 1e-2}, {"params": rest}], lr=1e-3
    )
    x, y = digits(64)
    probe = [(x.double(), y)]
    monitor = HessianEigenMonitor(k=1, every_n_steps=4, probe=probe, tol=1e-8, at_fit_start=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t, _, eos = fit(tmp_path, model, 4, monitor=monitor)
    assert not [w for w in caught if "step differently" in str(w.message)]
    case = make_case("mlp")
    case.model, case.batches = model, probe
    case.loss_fn = lambda m, b: 0.5 * ((m(b[0]) - torch.nn.functional.one_hot(b[1], 10)) ** 2).sum(1).mean()
    H = dense_hessian(case)
    optimizer = t.optimizers[0]
    scale = torch.cat([torch.full((p.numel(),), rates[id(p)] / 1e-2) for p in model.parameters()]).double()
    P = torch.cat([_preconditioner(optimizer, p).reshape(-1) for p in model.parameters()]).double()
    D = (scale / P).sqrt()
    expected = float(torch.linalg.eigvalsh(D[:, None] * H * D[None, :])[-1])
    last = eos.history[-1]
    assert last["eos/preconditioned_sharpness"] == pytest.approx(expected, rel=1e-6)
    assert last["eos/threshold"] == pytest.approx(38 / 1e-2)
    unscaled = float(torch.linalg.eigvalsh(P.rsqrt()[:, None] * H * P.rsqrt()[None, :])[-1])
    assert unscaled > 1.1 * expected  # the rates matter here


@pytest.mark.parametrize("case", ["unused", "part", "adagrad"])
def test_a_preconditioning_optimizer_that_moves_part_of_the_parameters_is_measured_on_that_block(
    tmp_path, case
):
    """The step x' = x - P^-1 g leaves the other parameters where they are: P^-1 = 0 there, and the
    preconditioned sharpness is that of the moved block (it was never logged: every measurement was
    treated as one before Adam's first step)."""
    L.seed_everything(0)
    model = _PreconditionedOverPart(case, hidden=12, n=64).double()
    x, y = digits(64)
    probe = [(x.double(), y)]
    monitor = HessianEigenMonitor(k=1, every_n_steps=4, probe=probe, tol=1e-8, at_fit_start=False)
    t, _, eos = fit(tmp_path, model, 4, monitor=monitor)
    assert [h["step"] for h in eos.history] == [4]
    optimizer = t.optimizers[0]
    params = [p for p in model.parameters() if p.requires_grad]
    head = [model.head.weight, model.head.bias]
    moved = [case != "part" or any(p is q for q in model.net[2:].parameters()) for p in params]
    moved = [m and not any(p is q for q in head) for m, p in zip(moved, params, strict=True)]
    assert moved.count(False) == (4 if case == "part" else 2)
    make = make_case("mlp")
    make.model, make.batches = model, probe
    make.loss_fn = lambda m, b: 0.5 * ((m(b[0]) - torch.nn.functional.one_hot(b[1], 10)) ** 2).sum(1).mean()
    H = dense_hessian(make)
    keep = torch.cat([torch.full((p.numel(),), m) for p, m in zip(params, moved, strict=True)])
    D = torch.cat(
        [_preconditioner(optimizer, p).reshape(-1) for p, m in zip(params, moved, strict=True) if m]
    ).rsqrt()
    block = H[keep][:, keep]
    expected = float(torch.linalg.eigvalsh(D[:, None] * block * D[None, :])[-1])
    assert eos.history[-1]["eos/preconditioned_sharpness"] == pytest.approx(expected, rel=1e-6)


def _ends_at_zero(step):  # after two steps, as a cosine to eta_min=0 ends
    return 1.0 if step < 2 else 0.0


def test_the_per_step_diagnostics_at_rate_zero_log_no_drift_and_skip_the_critical_sharpness(tmp_path):
    L.seed_everything(0)
    eos = EdgeOfStabilityMonitor(proxies=True, critical_every_n_steps=1)
    callbacks = [HessianEigenMonitor(k=1, every_n_steps=None, at_fit_end=False), eos]
    t = trainer(tmp_path, max_steps=4, callbacks=callbacks, logger=CSVLogger(tmp_path))
    with pytest.warns(RuntimeWarning, match="critical sharpness is not measured at learning rate 0"):
        t.fit(_Scheduled(_ends_at_zero, n=128, lr=0.1))
    metrics = logged(t)
    assert "eos/proxies_skipped" not in metrics and "eos/critical_skipped" not in metrics
    rates = {step: 0.1 if step < 2 else 0.0 for step in range(1, 5)}  # the rate of the step after each
    assert set(metrics["pf/drift_ratio"]) == set(rates)
    for step, rate in rates.items():
        if rate:
            assert metrics["pf/drift_ratio"][step] == pytest.approx(rate / 2 * metrics["pf/hg_ratio"][step])
        else:
            assert metrics["pf/drift_ratio"][step] == 0.0
    assert sorted(metrics["eos/critical_sharpness"]) == [s for s, rate in rates.items() if rate]


class _OwnClipping(DigitsClassifier):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=0.05, gradient_clip_algorithm="value")


@pytest.mark.parametrize(
    ("module", "clip", "named"),
    [
        (DigitsClassifier, 0.05, r"gradient_clip_val=0.05, norm"),
        (_OwnClipping, None, r"_OwnClipping.configure_gradient_clipping"),
        (DigitsClassifier, None, None),
    ],
)
def test_gradient_clipping_is_named_where_the_thresholds_assume_the_unclipped_step(
    tmp_path, module, clip, named
):
    """The thresholds follow the optimizer's rule on the unclipped gradient, the critical search the
    trainer's clipping (a module's own is not modelled): said once at fit start, by the monitor and by
    LRAdaptation (whose DAL rate is that of the unclipped step)."""
    from pf_lightning import DriftAdaptiveLR, LRAdaptation

    L.seed_everything(0)
    callbacks = [
        HessianEigenMonitor(k=1, every_n_steps=None, at_fit_end=False),
        EdgeOfStabilityMonitor(critical_every_n_steps=1),
        LRAdaptation(DriftAdaptiveLR),
    ]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=2, gradient_clip_val=clip, callbacks=callbacks).fit(module(n=64))
    said = [str(w.message) for w in record if "shortens the steps" in str(w.message)]
    if named is None:
        assert said == []
    else:
        assert len(said) == 2 and all(re.search(named, message) for message in said)
        assert any("edge is 2/(c*lr)" in message for message in said)
        searched = "the clipped step" if clip else "the unclipped update"  # a module's own: not modelled
        assert any(f"eos/critical_ratio searches along {searched}" in message for message in said)
        assert any("DriftAdaptiveLR sets is that of the unclipped step" in message for message in said)


def _run(tmp_path, callbacks, steps=10, lr=0.5, seed=7):
    L.seed_everything(seed)
    t = trainer(tmp_path, max_steps=steps, callbacks=callbacks)
    t.fit(DigitsClassifier(n=128, lr=lr))
    return t


def _edge_rows(eos):
    return [{k: v for k, v in row.items() if k != "eigenvalues"} for row in eos.history]


def test_callbacks_reused_with_another_trainer_start_a_new_run(tmp_path):
    """A fit on a new Trainer starts at step 0: the reused callbacks measure and judge it exactly as fresh
    ones do. They carried the previous run's first edge step, sharpening points, loss window, warm start and
    'already above the edge' into it: the edge warning and on_warning stayed silent at its crossing, and
    eos/first_edge_step named a step of the other run."""
    events = []
    monitor = HessianEigenMonitor(k=2, every_n_steps=5, tol=1e-4)
    eos = EdgeOfStabilityMonitor(on_warning=lambda t, m, metrics: events.append(t.global_step))
    with pytest.warns(RuntimeWarning, match="stability threshold"):
        _run(tmp_path / "a", [monitor, eos], steps=20, lr=1.0, seed=0)  # ends above the edge
    assert eos.first_edge_step == 0 and eos.history[-1]["eos/ratio"] > 1 and events == [0]
    fresh_monitor = HessianEigenMonitor(k=2, every_n_steps=5, tol=1e-4)
    fresh_events = []
    fresh = EdgeOfStabilityMonitor(on_warning=lambda t, m, metrics: fresh_events.append(t.global_step))
    with pytest.warns(RuntimeWarning, match="stability threshold"):
        _run(tmp_path / "b", [fresh_monitor, fresh], steps=20, lr=0.63)
    events.clear()
    with pytest.warns(RuntimeWarning, match="stability threshold"):
        _run(tmp_path / "c", [monitor, eos], steps=20, lr=0.63)
    steps = [h["step"] for h in monitor.history]
    assert steps == [h["step"] for h in fresh_monitor.history] == [0, 5, 10, 15, 20]
    assert [h["eigenvalues"] for h in monitor.history] == [h["eigenvalues"] for h in fresh_monitor.history]
    assert _edge_rows(eos) == _edge_rows(fresh)
    assert eos.first_edge_step == fresh.first_edge_step == 20  # crossed in this run, not at the other's 0
    assert events == fresh_events == [20]


def test_a_monitor_reused_with_another_trainer_feeds_only_that_trainer_s_callbacks(tmp_path):
    """A reused EdgeOfStabilityMonitor reads the new Trainer's HessianEigenMonitor (it read the first one it
    ever found: no eos/* at all); a reused HessianEigenMonitor no longer feeds an EoS monitor of an earlier
    Trainer (it logged a second, other eos/sharpening_slope at the same steps)."""
    first, eos = HessianEigenMonitor(k=2, every_n_steps=5), EdgeOfStabilityMonitor()
    _run(tmp_path / "a", [first, eos])
    second = HessianEigenMonitor(k=2, every_n_steps=5)
    _run(tmp_path / "b", [second, eos], lr=0.3)
    assert [h["step"] for h in eos.history] == [0, 5, 10]
    assert [h["eigenvalues"] for h in eos.history] == [h["eigenvalues"][:2] for h in second.history]
    judged = list(eos.history)
    other = EdgeOfStabilityMonitor()
    _run(tmp_path / "c", [second, other], lr=0.4)
    assert eos.history == judged  # not in this Trainer: nothing reaches it
    assert [h["step"] for h in other.history] == [0, 5, 10]


class _Fails(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            raise RuntimeError("the fit fails at step 3")


def test_a_fit_that_fails_leaves_no_listener_behind(tmp_path):
    """Lightning calls no teardown after an exception: the EoS monitor detaches itself in on_exception, so the
    Hessian monitor reused without it does not feed it (it judged that other run's steps 0, 2, 4 as its own)."""
    monitor, eos = HessianEigenMonitor(k=1, every_n_steps=2, probe=64), EdgeOfStabilityMonitor()
    with pytest.raises(RuntimeError, match="fails at step 3"):
        _run(tmp_path / "a", [monitor, eos, _Fails()], steps=6)
    assert [h["step"] for h in eos.history] == [0, 2]
    _run(tmp_path / "b", [monitor], steps=4)
    assert [h["step"] for h in monitor.history] == [0, 2, 4] and [h["step"] for h in eos.history] == [0, 2]


def test_a_fit_continued_on_the_same_trainer_continues_the_run(tmp_path):
    """Fitting the same Trainer again with more steps goes on from its global_step: the measurements are the
    uninterrupted run's, the step where the first fit ended measured once (it was measured again at the second
    fit's start: two rows, the same eigenvalues, a measurement's products wasted)."""
    whole_monitor, whole = HessianEigenMonitor(k=2, every_n_steps=5, tol=1e-4), EdgeOfStabilityMonitor()
    _run(tmp_path / "a", [whole_monitor, whole], steps=20, lr=0.2)
    monitor, eos = HessianEigenMonitor(k=2, every_n_steps=5, tol=1e-4), EdgeOfStabilityMonitor()
    t = _run(tmp_path / "b", [monitor, eos], steps=10, lr=0.2)
    t.fit_loop.epoch_loop.max_steps = 20
    t.fit(t.lightning_module)
    assert [h["step"] for h in monitor.history] == [h["step"] for h in whole_monitor.history]
    assert [h["step"] for h in eos.history] == [0, 5, 10, 15, 20]
    for ours, reference in zip(monitor.history, whole_monitor.history, strict=True):
        assert ours["eigenvalues"] == pytest.approx(reference["eigenvalues"], rel=1e-5)


class _LossOfShapeOne(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        return self.loss(batch).reshape(1)  # Lightning trains it as a scalar


def test_a_loss_of_shape_one_is_recorded_as_a_scalar(tmp_path):
    """The losses were stacked into an (N, 1) tensor whose tolist() gave lists: float() stopped the fit at
    the first measurement after step 0 (outside trial)."""
    L.seed_everything(0)
    monitor, eos = HessianEigenMonitor(k=1, every_n_steps=3), EdgeOfStabilityMonitor()
    trainer(tmp_path, max_steps=7, callbacks=[monitor, eos]).fit(_LossOfShapeOne(n=64))
    assert [h["step"] for h in eos.history] == [0, 3, 6, 7]
    assert all(isinstance(x, float) for x in eos.losses) and len(eos.losses) == 7


def test_an_edge_read_from_a_block_monitor_is_warned(tmp_path):
    """monitor= a HessianEigenMonitor of a parameter subset: its lambda_max is a diagonal block's (here
    below the whole Hessian's), and the ratio to 2/eta understates the edge."""
    L.seed_everything(0)
    block = HessianEigenMonitor(k=1, params="net.0.*", name="first", tol=1e-6)
    whole = HessianEigenMonitor(k=1, tol=1e-6)
    t = trainer(tmp_path, max_steps=1, callbacks=[block, whole, EdgeOfStabilityMonitor(monitor=block)])
    with pytest.warns(
        RuntimeWarning, match=r"params='net.0.\*'\) that leaves out parameters SGD moves: its top eigenvalue"
    ):
        t.fit(DigitsClassifier(n=64))
    assert float(block.latest.eigenvalues[0]) < float(whole.latest.eigenvalues[0])


def test_a_block_monitor_whose_params_match_nothing_is_refused_by_its_own_check_first(tmp_path):
    """Listed after the EoS monitor, a block monitor whose params matched nothing failed with a bare
    ValueError naming `patterns` (the EoS monitor's block check ran first; a review)."""
    block = HessianEigenMonitor(k=1, params="nomatch.*", name="block")
    t = trainer(tmp_path, max_steps=1, callbacks=[EdgeOfStabilityMonitor(monitor=block), block])
    with pytest.raises(
        MisconfigurationException, match=r"HessianEigenMonitor cannot measure .*`params` must"
    ):
        t.fit(DigitsClassifier(n=64))


@pytest.mark.parametrize("index", [0, 1])
def test_a_block_monitor_of_the_judged_optimizers_own_parameters_is_not_warned_about(tmp_path, index):
    """A GAN's natural set-up: each optimizer judged on the block it moves. Two warnings said the opposite at
    once (the block understates the edge; the optimizer does not move the other parameters, so the whole
    Hessian overstates it), both untrue there (an outside trial). Judging optimizer 1 on optimizer 0's block
    still says both, and names what each leaves out."""
    L.seed_everything(0)
    block = HessianEigenMonitor(k=1, params="net.0.*", name="first", loss_fn=lambda m, b: m.loss(b))
    eos = EdgeOfStabilityMonitor(monitor=block, optimizer_index=index)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=2, callbacks=[block, eos]).fit(TwoOptimizers(n=64))
    said = [str(w.message) for w in record]
    understates = [m for m in said if "that leaves out parameters" in m]
    overstates = [m for m in said if "does not update" in m]
    if index == 0:
        assert not understates and not overstates, said
    else:
        assert len(understates) == 1 and len(overstates) == 1 and "'net.0.weight'" in overstates[0]


def test_the_warning_on_groups_with_different_weight_decays_lists_them_in_group_order(tmp_path):
    """It printed the set sorted ([0.0, 0.001]) where group 0's decay, the one added, was 0.001."""
    model = DigitsClassifier(n=64)

    def configure():
        first, rest = model.net[0].parameters(), [p for m in model.net[1:] for p in m.parameters()]
        groups = [{"params": list(first), "weight_decay": 0.001}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=0.1)

    model.configure_optimizers = configure
    t = trainer(tmp_path, max_steps=1, callbacks=[HessianEigenMonitor(k=1), EdgeOfStabilityMonitor()])
    with pytest.warns(
        RuntimeWarning, match=r"decays \[0\.001, 0\.0\] \(group by group\).*group 0's, 0\.001,"
    ):
        t.fit(model)


class _FrozenGroup(DigitsClassifier):
    """SGD with the first layer in a group at rate 0, first or second."""

    def __init__(self, frozen_first):
        super().__init__(n=128, lr=0.1)
        self.frozen_first = frozen_first

    def configure_optimizers(self):
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        groups = [{"params": first, "lr": 0.0}, {"params": rest, "lr": 0.1}]
        return torch.optim.SGD(groups if self.frozen_first else groups[::-1])


@pytest.mark.parametrize(
    ("frozen_first", "said"),
    [
        (True, "group 0 of SGD is at rate 0 while group(s) 1 train: the edge is judged at group 0's rate"),
        (False, "group 1: rate 0, it stops moving, and its block is in the sharpness all the same"),
    ],
)
def test_a_group_at_rate_0_beside_groups_that_train_is_said(tmp_path, frozen_first, said):
    """Group 0 at rate 0 (a backbone frozen by its rate) left every measurement unjudged with a warning of a
    warm-up from zero; a group at rate 0 after it was named by an internal error's words, and its critical
    sharpness skipped with them (a group at rate 0 does not move: its part of the next update is 0)."""
    L.seed_everything(0)
    eos = EdgeOfStabilityMonitor(critical_every_n_steps=1)
    t = trainer(tmp_path, max_steps=2, callbacks=[HessianEigenMonitor(k=1, every_n_steps=2), eos])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(_FrozenGroup(frozen_first))
    messages = [str(w.message) for w in caught]
    assert sum(said in m for m in messages) == 1, messages
    assert not any("warm-up from zero" in m or "must be positive" in m for m in messages)
    assert (eos.history == []) is frozen_first  # group 0 at rate 0: nothing judged, as said


def test_a_fit_resumed_between_measurements_holds_the_last_values_for_checkpoints_and_early_stopping(
    tmp_path,
):
    """callback_metrics held the monitors' values between measurements, but a fit resumed from a checkpoint
    had none until its next one: EarlyStopping(monitor="eos/ratio") stopped it, "metric not available"
    (an outside trial). The last measurement's values come back with the state."""
    from lightning.pytorch.callbacks import EarlyStopping

    def callbacks():
        return [HessianEigenMonitor(k=1, every_n_steps=4, at_fit_end=False), EdgeOfStabilityMonitor()]

    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1)
    first = trainer(tmp_path, max_steps=5, callbacks=callbacks())
    first.fit(model)
    first.save_checkpoint(tmp_path / "five.ckpt")
    held = {k: float(first.callback_metrics[k]) for k in ("hessian/eig_1", "eos/ratio", "pf/hlambda_1")}
    stop = EarlyStopping(monitor="eos/ratio", mode="max", check_on_train_epoch_end=True, patience=100)
    resumed = trainer(tmp_path, max_steps=7, callbacks=[*callbacks(), stop])
    resumed.fit(model, ckpt_path=tmp_path / "five.ckpt")  # steps 5 and 6: no measurement
    assert resumed.global_step == 7
    assert {k: float(resumed.callback_metrics[k]) for k in held} == held


def test_warm_up_ratios_are_logged_but_not_left_for_early_stopping(tmp_path):
    """Adam's warm-up measurements are logged, flagged eos/warmup and not judged, but their eos/ratio and
    eos/sharpness stayed in trainer.callback_metrics: an outside trial's EarlyStopping(divergence_threshold=2)
    stopped an Adam fit at step 4 on a warm-up ratio of 5.1, whose judged ratios were 0.14 and below."""

    class Seen(L.Callback):
        def __init__(self):
            self.ratio = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.ratio[trainer.global_step] = "eos/ratio" in trainer.callback_metrics

    L.seed_everything(0)
    hessian = HessianEigenMonitor(k=1, every_n_steps=2, at_fit_end=False)
    eos = EdgeOfStabilityMonitor()
    eos.preconditioner_warmup_steps = 5
    seen = Seen()
    t = trainer(tmp_path, max_steps=8, logger=CSVLogger(tmp_path), callbacks=[hessian, eos, seen])
    t.fit(DigitsClassifier(n=64, lr=0.02, optimizer="adam"))
    warm = [h["step"] for h in eos.history if "eos/warmup" in h]
    assert warm == [2, 4] and sorted(logged(t)["eos/ratio"]) == [2, 4, 6, 8]  # logged all the same
    assert seen.ratio == {0: False, 1: False, 2: False, 3: False, 4: False, 5: False, 6: True, 7: True}


@pytest.mark.parametrize("clip", [0.05, None])
def test_the_edge_warning_under_clipping_says_its_threshold_is_the_unclipped_step_s(tmp_path, clip):
    """lr 2 with a norm clip at 0.05 (steps 15 times shorter) warned 'reached 1.03 x the stability
    threshold' and nothing more, where the run was far from its edge (an outside trial)."""
    L.seed_everything(0)
    callbacks = [HessianEigenMonitor(k=1, every_n_steps=None, at_fit_end=False), EdgeOfStabilityMonitor()]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=1, gradient_clip_val=clip, callbacks=callbacks).fit(
            DigitsClassifier(n=64, lr=8.0)
        )
    (edge,) = [str(w.message) for w in record if "x the stability threshold" in str(w.message)]
    assert ("the unclipped step's: gradient clipping may keep the steps taken below it" in edge) == (
        clip is not None
    )


def test_the_wandb_spectra_and_chart_leave_out_the_warm_up_measurements(tmp_path, monkeypatch):
    """The README says the table holds the measurements the monitor judged; it held Adam's warm-up ones too
    (an outside trial: rows at steps 1-9 flagged eos/warmup, the chart's line starting at 21210 there)."""
    import wandb
    from wandb_offline import offline_env

    from pf_lightning.wandb_reader import find_run_file, tables

    offline_env(monkeypatch, tmp_path)
    L.seed_everything(0)
    eos = EdgeOfStabilityMonitor(chart_every=1, batch_sharpness=False)
    try:
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="pf")
        callbacks = [HessianEigenMonitor(k=2, every_n_steps=3, probe=64), eos]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no preconditioner before the first step
            trainer(tmp_path, max_steps=12, logger=logger, callbacks=callbacks).fit(
                DigitsClassifier(n=64, lr=1e-3, optimizer="adam")
            )
        logger.experiment.finish()
    finally:
        wandb.teardown()
    assert [h["step"] for h in eos.history if "eos/warmup" in h] == [3, 6, 9]
    logged = tables(find_run_file(tmp_path).parent)
    spectra = max((t for key, t in logged.items() if "hessian/spectra" in key), key=lambda t: len(t["data"]))
    assert [row[:2] for row in spectra["data"]] == [[12, 1], [12, 2]]
    chart = max(
        (t for key, t in logged.items() if "spectrum_vs_threshold" in key), key=lambda t: len(t["data"])
    )
    assert {step for step, _, _ in chart["data"]} == {12}


def test_the_wandb_chart_and_spectra_hold_the_latest_measurements_that_fit_a_table(tmp_path, monkeypatch):
    """W&B keeps a table's first MAX_ROWS (10,000) rows: an outside trial's chart of 1,101 measurements at
    k = 10 lost its threshold line and the spectra their newest 101 measurements, without a word. Here the
    limit is 20 rows: the chart draws 3 lines (eig_1, eig_2, threshold), so the latest 6 measurements."""
    import wandb
    from wandb_offline import offline_env

    from pf_lightning.wandb_reader import find_run_file, tables

    offline_env(monkeypatch, tmp_path)
    monkeypatch.setattr(wandb.Table, "MAX_ROWS", 20)
    L.seed_everything(0)
    eos = EdgeOfStabilityMonitor(chart_every=1, batch_sharpness=False)
    monitor = HessianEigenMonitor(k=2, every_n_steps=1, probe=64, at_fit_end=False)
    try:
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="pf")
        trainer(tmp_path, max_steps=9, logger=logger, callbacks=[monitor, eos]).fit(DigitsClassifier(n=64))
        logger.experiment.finish()
    finally:
        wandb.teardown()
    logged = tables(find_run_file(tmp_path).parent)
    last = [h["step"] for h in eos.history][-6:]

    def latest(name):
        return max(
            (t for key, t in logged.items() if name in key), key=lambda t: max(row[0] for row in t["data"])
        )

    lines: dict[str, list] = {}
    for step, key, _ in latest("spectrum_vs_threshold")["data"]:
        lines.setdefault(key, []).append(step)
    assert lines == {"eig_1": last, "eig_2": last, "threshold": last}
    spectra = latest("hessian/spectra")
    assert [row[0] for row in spectra["data"]] == [s for s in last for _ in range(2)]


def test_a_resumed_run_keeps_the_summary_s_extremes_of_the_whole_run(tmp_path):
    """The W&B summary's maxima were rebuilt from the checkpoint's history, capped by max_history: a
    resumed run lost the earlier peak (an outside trial: a max ratio of 1.512 for 1.576). Here the peak,
    1.18, came at the start; the history of one kept at step 8 holds 0.78."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def callbacks():
        return [
            HessianEigenMonitor(k=1, every_n_steps=1, max_history=1, stderr_every=None),
            EdgeOfStabilityMonitor(batch_sharpness=False),
        ]

    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.6)
    resumed_model = copy.deepcopy(model)
    straight, resumed = callbacks(), callbacks()
    saver = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=8, save_top_k=-1)
    trainer(tmp_path / "a", max_steps=12, callbacks=[*straight, saver], enable_checkpointing=True).fit(model)
    trainer(tmp_path / "b", max_steps=12, callbacks=resumed).fit(
        resumed_model, ckpt_path=tmp_path / "step=8.ckpt"
    )
    peak = straight[1]._extremes["eos/ratio"]
    assert peak > 1.0 > max(h["eos/ratio"] for h in straight[1].history)
    assert resumed[1]._extremes == straight[1]._extremes


def test_a_history_shorter_than_the_slope_s_window_does_not_change_the_slope(tmp_path):
    """eos/sharpening_slope is fitted over the EoS history's last slope_window measurements; that history was
    capped by the monitor's max_history, so max_history=1 fitted 2 points for 5 (an outside trial: -0.0131
    for -0.0628, and a flipped sign later). It keeps at least slope_window - 1 now."""

    def slopes(max_history):
        L.seed_everything(0)
        eos = EdgeOfStabilityMonitor(batch_sharpness=False, slope_window=5)
        monitor = HessianEigenMonitor(k=1, every_n_steps=2, max_history=max_history, stderr_every=None)
        trainer(tmp_path, max_steps=16, callbacks=[monitor, eos]).fit(DigitsClassifier(n=128, lr=0.3))
        return [h.get("eos/sharpening_slope") for h in eos.history][-3:], len(eos.history)

    (capped, kept), (full, _) = slopes(1), slopes(10_000)
    assert kept == 4 and capped == full and all(s is not None for s in capped)


@pytest.mark.parametrize("max_history", [10_000, 1])
def test_a_checkpoint_without_the_summary_s_extremes_rebuilds_them_at_the_resume(tmp_path, max_history):
    """An earlier version's checkpoint keeps no extremes: they were rebuilt only at the next measurement, so
    a checkpoint written before it saved none, and a fit measuring nothing more wrote no summary (an outside
    trial). Rebuilt at the resume; where max_history cut the history, the maxima may be short: said once."""

    def callbacks():
        monitor = HessianEigenMonitor(k=1, every_n_steps=2, at_fit_end=False, max_history=max_history)
        return [monitor, EdgeOfStabilityMonitor(batch_sharpness=False)]

    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.6)
    first = callbacks()
    t = trainer(tmp_path, max_steps=8, callbacks=first)
    t.fit(model)
    t.save_checkpoint(tmp_path / "eight.ckpt")
    checkpoint = torch.load(tmp_path / "eight.ckpt", weights_only=False)
    (key,) = (k for k in checkpoint["callbacks"] if k.startswith("EdgeOfStabilityMonitor"))
    del checkpoint["callbacks"][key]["extremes"]  # as an earlier version wrote it
    torch.save(checkpoint, tmp_path / "earlier.ckpt")
    resumed = callbacks()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=9, callbacks=resumed).fit(model, ckpt_path=tmp_path / "earlier.ckpt")
    said = [str(w.message) for w in record if "keeps no W&B summary extremes" in str(w.message)]
    judged = [h for h in resumed[1].history]
    expected = {
        "eos/ratio": max(h["eos/ratio"] for h in judged),
        "eos/sharpness": max(h["eos/sharpness"] for h in judged),
    }
    assert resumed[1]._extremes == pytest.approx(expected)
    if max_history == 1:
        assert len(said) == 1 and len(judged) == 4  # the slope's window
    else:
        assert said == [] and resumed[1]._extremes == pytest.approx(first[1]._extremes)
    assert resumed[1].state_dict()["extremes"] == resumed[1]._extremes  # a checkpoint now keeps them


@pytest.mark.parametrize("critical", [0, 60])
def test_the_chart_counts_its_rows_by_the_lines_it_draws(monkeypatch, critical):
    """A history preconditioned first (Adam) and plain later (resumed under SGD) was counted at two lines per
    measurement where the latest draw k + 1, and went past the table's rows (132 of 100 at k = 3); critical
    points filled the rows of the one measurement that must fit (104 of 100; a review)."""
    import wandb

    from pf_lightning.callbacks import eos_monitor as module

    logged = {}
    monkeypatch.setattr(module, "wandb_experiments", lambda trainer: [object()])
    monkeypatch.setattr(module, "wandb_log", lambda trainer, payload, step: logged.update(payload))
    monkeypatch.setattr(wandb.Table, "MAX_ROWS", 100)
    eos = EdgeOfStabilityMonitor()
    eos.monitor = HessianEigenMonitor(k=3)
    entry = {"eigenvalues": [3.0, 2.0, 1.0], "eos/sharpness": 3.0, "eos/threshold": 10.0}
    pre = [{"step": s, **entry, "eos/preconditioned_sharpness": 3.0} for s in range(100)]
    eos.history = pre + [{"step": s, **entry} for s in range(100, 300)]
    eos._critical = [(s, 1.0, 2.0) for s in range(300 - critical, 300)]
    eos._log_chart(None, 299)
    chart, spectra = logged["eos/spectrum_vs_threshold"].table.data, logged["hessian/spectra"].data
    assert len(chart) <= 100 and len(spectra) <= 100
    drawn = {step for step, key, _ in chart if key == "threshold"}
    assert drawn == set(range(300 - len(drawn), 300)) and len(drawn) == (
        25 if critical == 0 else 16
    )  # 4 m + 2 m <= 100
