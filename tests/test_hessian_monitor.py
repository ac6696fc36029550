"""HessianEigenMonitor in real Trainer runs: values, logging, cadence, resume, non-interference, errors."""

import copy
import csv
import dataclasses
import math
import pathlib
import re
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from cases import dense_hessian, make_case
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import DigitsClassifier, ManualDigits, digits, logged, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pf_lightning import (
    EdgeOfStabilityMonitor,
    HessianEigenMonitor,
    NonConvergenceWarning,
    hessian_eigenpairs,
    hessian_trace,
)


def read_csv(logger):
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


def test_logged_eigenvalues_are_the_probe_hessian_at_that_step(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(lr=0.1, n=128)
    monitor = HessianEigenMonitor(k=3, every_n_steps=5, tol=1e-4)
    logger = CSVLogger(tmp_path)
    trainer(tmp_path, max_steps=12, callbacks=[monitor], logger=logger).fit(model)
    assert [h["step"] for h in monitor.history] == [0, 5, 10, 12]  # fit start, every 5, fit end
    # The last measurement is of the final model: recompute it independently, tighter.
    x, y = digits(128)
    direct = hessian_eigenpairs(model, lambda m, b: m.loss(b), [(x, y)], k=3, tol=1e-6)
    torch.testing.assert_close(monitor.latest.eigenvalues, direct.eigenvalues, rtol=2e-3, atol=0)
    rows = read_csv(logger)
    measured = {int(r["step"]): r for r in rows if r.get("hessian/eig_1")}
    assert sorted(measured) == [0, 5, 10, 12]
    assert float(measured[12]["hessian/eig_1"]) == pytest.approx(
        monitor.history[-1]["eigenvalues"][0], rel=1e-6
    )
    assert all(not r.get("hessian/eig_1") for r in rows if int(r["step"]) not in measured)
    assert "hessian/eig_1" in model.trainer.callback_metrics


class _TwoLoaders(DigitsClassifier):
    """Trains on a dict of two dataloaders: training_step gets {"a": batch, "b": batch}."""

    def train_dataloader(self):
        x, y = digits(64)
        return {
            "a": DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8),
            "b": DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8),
        }

    def training_step(self, batch, batch_idx):
        return self.loss(batch["a"]) + 0.5 * self.loss(batch["b"])


def test_several_training_dataloaders_need_a_given_probe(tmp_path):
    """No probe is drawn from a dict of loaders (the fit crashed drawing it: "cannot count the samples of
    a batch of type str"): set-up names the fix, and a given probe in training_step's form is measured,
    its eig_1 the dense float64 Hessian's."""
    model = _TwoLoaders(hidden=8, n=64)
    with pytest.raises(MisconfigurationException, match=r"trains on 2 dataloaders .* pass `probe=` batches"):
        trainer(tmp_path, max_steps=1, callbacks=[HessianEigenMonitor(k=1)]).fit(model)
    x, y = digits(64)
    probe = [{"a": (x[:8], y[:8]), "b": (x[32:40], y[32:40])}]
    monitor = HessianEigenMonitor(k=1, probe=probe, tol=1e-6, at_fit_end=False)
    start = copy.deepcopy(model).double()
    trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(model)
    names = [n for n, _ in start.named_parameters()]
    shapes = [p.shape for _, p in start.named_parameters()]
    batch = {k: (v[0].double(), v[1]) for k, v in probe[0].items()}

    def loss(flat):
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)}

        def mse(x, y):
            out = torch.func.functional_call(start, params, (x,))
            return 0.5 * ((out - torch.nn.functional.one_hot(y, 10).double()) ** 2).sum(dim=1).mean()

        return mse(*batch["a"]) + 0.5 * mse(*batch["b"])

    flat = torch.cat([p.detach().reshape(-1) for p in start.parameters()])
    dense = torch.func.jacfwd(torch.func.grad(loss))(flat)
    top = float(torch.linalg.eigvalsh((dense + dense.T) / 2)[-1])
    assert monitor.history[0]["step"] == 0
    assert monitor.history[0]["eigenvalues"][0] == pytest.approx(top, rel=1e-5)


def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(lr=0.05, n=256, batch_size=32)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, probe=64, at_fit_end=False)
    trainer(tmp_path, max_steps=6, accumulate_grad_batches=2, callbacks=[monitor]).fit(model)
    assert [h["step"] for h in monitor.history] == [0, 2, 4, 6]


def _fit_parameters(tmp_path, callbacks, steps=8):
    L.seed_everything(123)
    model = DigitsClassifier(lr=0.05, momentum=0.9, dropout=0.2, batchnorm=True, n=256, batch_size=32)
    t = trainer(tmp_path, max_steps=steps, callbacks=callbacks)
    t.fit(model)
    optimizer_state = t.optimizers[0].state_dict()["state"]
    return [p.detach().clone() for p in model.parameters()], optimizer_state, torch.rand(3)


def test_training_is_bit_identical_with_and_without_the_callbacks(tmp_path):
    plain = _fit_parameters(tmp_path / "a", [])
    hessian = HessianEigenMonitor(k=2, every_n_steps=3, probe=48, which="both")
    # Mini-batches of 32: batch sharpness on by default; critical sharpness every 3 steps.
    eos = EdgeOfStabilityMonitor(proxies=True, critical_every_n_steps=3)
    monitored = _fit_parameters(tmp_path / "b", [hessian, eos])
    assert "eos/batch_sharpness" in eos.history[-1]
    assert len(hessian.history) >= 3
    assert all(torch.equal(a, b) for a, b in zip(plain[0], monitored[0], strict=True))
    for key, state in plain[1].items():
        assert all(torch.equal(state[name], monitored[1][key][name]) for name in state)
    assert torch.equal(plain[2], monitored[2])  # the global random stream is where it would have been


def test_resume_continues_history_and_warm_start(tmp_path):
    def run(max_steps, ckpt_path=None, callbacks=()):
        L.seed_everything(0)
        model = DigitsClassifier(lr=0.1, n=128)
        monitor = HessianEigenMonitor(k=2, every_n_steps=4, at_fit_end=False)
        t = trainer(tmp_path, max_steps=max_steps, callbacks=[monitor, *callbacks], enable_checkpointing=True)
        t.fit(model, ckpt_path=ckpt_path)
        return monitor

    straight = run(12)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    run(8, callbacks=[checkpoint])
    resumed = run(12, ckpt_path=str(tmp_path / "ckpt" / "epoch=7-step=8.ckpt"))
    assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history] == [0, 4, 8, 12]
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert a["eigenvalues"] == pytest.approx(b["eigenvalues"], rel=1e-4)
    assert resumed.latest.info["warm_start"]  # the step-12 measurement started from the step-8 vectors


def test_two_instances_coexist_with_their_own_state(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(lr=0.1, n=128)
    x, y = digits()
    train = HessianEigenMonitor(k=1, every_n_steps=5)
    held_out = HessianEigenMonitor(k=1, every_n_steps=5, probe=[(x[1500:], y[1500:])], name="heldout")
    t = trainer(tmp_path, max_steps=5, callbacks=[train, held_out])
    t.fit(model)
    assert train.state_key != held_out.state_key
    assert {"hessian/eig_1", "hessian/heldout/eig_1"} <= set(t.callback_metrics)
    assert t.callback_metrics["hessian/eig_1"] != t.callback_metrics["hessian/heldout/eig_1"]


def test_non_finite_measurement_is_skipped_once_and_training_goes_on(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(lr=0.1, n=128)
    calls = {"n": 0}

    def loss_fn(module, batch):
        calls["n"] += 1
        loss = module.loss(batch)
        return loss * float("nan") if module.trainer.global_step >= 4 else loss

    monitor = HessianEigenMonitor(k=1, every_n_steps=2, loss_fn=loss_fn)
    logger = CSVLogger(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = trainer(tmp_path, max_steps=8, callbacks=[monitor], logger=logger)
        t.fit(model)
    assert t.global_step == 8
    assert [h["step"] for h in monitor.history] == [0, 2]
    skipped = [w for w in record if "measurement skipped" in str(w.message)]
    assert len(skipped) == 1
    assert sorted(int(r["step"]) for r in read_csv(logger) if r.get("hessian/skipped")) == [4, 6, 8]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "`k` must be an int >= 1"),
        ({"every_n_steps": 0}, "`every_n_steps`"),
        ({"hvp": "exact"}, "`hvp` must be one of"),
        ({"probe": 0}, "probe size"),
        ({"which": "bottom"}, "`which`"),
        ({"tol": 2.0}, "`tol`"),
        ({"max_time_fraction": 0.0}, "max_time_fraction"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        HessianEigenMonitor(**kwargs)


class _Lazy(DigitsClassifier):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net[0] = torch.nn.LazyLinear(32)


@pytest.mark.parametrize("at_fit_start", [True, False])
def test_lazy_parameters_fail_at_set_up_naming_the_fix(tmp_path, at_fit_start):
    """They stopped the fit with torch's "Can't access the shape of an uninitialized parameter" (outside
    trial); initialized by one forward pass, the model is measured."""
    monitor = HessianEigenMonitor(k=1, at_fit_start=at_fit_start)
    with pytest.raises(
        MisconfigurationException, match=r"lazy parameters \(net.0.weight, net.0.bias\).*run one batch"
    ):
        trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(_Lazy(n=64))
    model = _Lazy(n=64)
    model(digits(64)[0])
    trainer(tmp_path, max_steps=1, callbacks=[monitor := HessianEigenMonitor(k=1)]).fit(model)
    assert [h["step"] for h in monitor.history] == [0, 1]


class _NoLoss(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        self.loss(batch)
        return None


def test_training_step_without_loss_fails_at_setup(tmp_path):
    with pytest.raises(MisconfigurationException, match="training_step returned NoneType"):
        trainer(tmp_path, max_steps=1, callbacks=[HessianEigenMonitor(k=1)]).fit(_NoLoss(n=64))


def test_manual_optimization_needs_and_uses_a_loss_fn(tmp_path):
    with pytest.raises(MisconfigurationException, match="manual optimization"):
        trainer(tmp_path, max_steps=1, callbacks=[HessianEigenMonitor(k=1)]).fit(ManualDigits(n=64))
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, loss_fn=lambda m, b: m.loss(b))
    trainer(tmp_path, max_steps=4, callbacks=[monitor]).fit(ManualDigits(n=64))
    assert [h["step"] for h in monitor.history] == [0, 2, 4]


def test_training_step_logs_stay_out_of_the_logs(tmp_path):
    L.seed_everything(0)
    logger = CSVLogger(tmp_path)
    model = DigitsClassifier(lr=0.1, n=64)
    trainer(
        tmp_path,
        max_steps=3,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[HessianEigenMonitor(k=1, every_n_steps=1)],
    ).fit(model)
    steps = [int(r["step"]) for r in read_csv(logger) if r.get("train_loss")]
    assert steps == sorted(
        set(steps)
    )  # one train_loss per step: the monitor's training_step calls logged nothing


class _QuietClassifier(DigitsClassifier):
    def training_step(self, batch, batch_idx):  # dynamo cannot trace Lightning's self.log on torch 2.13
        return self.loss(batch)


def test_compiled_module_is_measured_uncompiled(tmp_path):
    compiled_with_grad = []

    def backend(graph, inputs):  # as backend="eager", recording each graph it is given
        compiled_with_grad.append(torch.is_grad_enabled())
        return graph.forward

    L.seed_everything(0)
    model = _QuietClassifier(lr=0.1, n=64)
    compiled = torch.compile(model, backend=backend)  # compiled graphs have no double backward
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, hvp="double_backward")
    trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(compiled)
    assert [h["step"] for h in monitor.history] == [0, 2]
    # training's one graph; none from the measurements or the set-up's no-grad check of the probe
    assert compiled_with_grad == [True]
    assert model._compiler_ctx is not None and "forward" in model.__dict__  # still compiled for training
    x, y = digits(64)
    direct = hessian_eigenpairs(
        model, lambda m, b: m.loss(b), [(x, y)], k=1, hvp="finite_difference", tol=1e-5
    )
    assert monitor.latest.eigenvalues[0] == pytest.approx(float(direct.eigenvalues[0]), rel=2e-3)


class _CompiledChild(_QuietClassifier):
    """A submodule compiled by assignment (``self.body = torch.compile(body)``) or in place
    (``body.compile()``): AOT autograd's backward, with donated buffers, runs neither double backward nor
    the retained graph of a finite difference."""

    def __init__(self, in_place: bool, **kwargs):
        super().__init__(**kwargs)
        body = nn.Sequential(*self.net[1:])
        if in_place:
            body.compile(backend="aot_eager")
        self.net = nn.Sequential(self.net[0], body if in_place else torch.compile(body, backend="aot_eager"))


@pytest.mark.parametrize("in_place", [False, True], ids=["assigned", "in place"])
@pytest.mark.parametrize("hvp", ["double_backward", "finite_difference"])
def test_a_compiled_submodule_is_measured_through_its_original_code(tmp_path, hvp, in_place):
    """An assigned one: every measurement was skipped (RuntimeError: a backward 'compiled with non-empty
    donated buffers requires create_graph=False and retain_graph=False'), and auto's fallback with it."""
    L.seed_everything(0)
    model = _CompiledChild(in_place, lr=0.1, n=64)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, hvp=hvp, tol=1e-6, on_error="raise")
    trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(model)
    assert [h["step"] for h in monitor.history] == [0, 2]
    plain = _QuietClassifier(lr=0.1, n=64)  # the same parameters, never compiled
    plain.net = nn.Sequential(plain.net[0], nn.Sequential(*plain.net[1:]))
    plain.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()})
    x, y = digits(64)
    reference = hessian_eigenpairs(
        plain, lambda m, b: m.loss(b), [(x, y)], k=1, hvp="double_backward", tol=1e-7
    )
    assert monitor.latest.eigenvalues[0] == pytest.approx(float(reference.eigenvalues[0]), rel=1e-4)
    direct = hessian_eigenpairs(
        model, lambda m, b: m.loss(b), [(x, y)], k=1, hvp=hvp, tol=1e-6
    )  # the API too
    assert float(direct.eigenvalues[0]) == pytest.approx(float(reference.eigenvalues[0]), rel=1e-4)


def test_bf16_mixed_precision_measures_in_float32(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(lr=0.1, n=64)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, tol=1e-5)
    trainer(tmp_path, max_steps=2, precision="bf16-mixed", callbacks=[monitor]).fit(model)
    x, y = digits(64)
    direct = hessian_eigenpairs(
        model, lambda m, b: m.loss(b), [(x, y)], k=1, tol=1e-6
    )  # float32, no autocast
    assert monitor.latest.eigenvalues[0] == pytest.approx(float(direct.eigenvalues[0]), rel=1e-4)


def test_trace_and_density_at_a_slower_cadence(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(lr=0.1, n=128)
    monitor = HessianEigenMonitor(
        k=1, every_n_steps=2, trace_every=2, trace_hvp=30, density_every=3, density_steps=20
    )
    t = trainer(tmp_path, max_steps=6, callbacks=[monitor])
    t.fit(model)
    assert [h["step"] for h in monitor.history] == [0, 2, 4, 6]
    assert [("trace" in h) for h in monitor.history] == [True, False, True, False]  # measurements 1 and 3
    # The estimate is unbiased: compare it with the exact trace of this small Hessian.
    from cases import dense_hessian, make_case

    case = make_case("mlp")
    case.model, case.batches = model, [digits(128)]
    case.loss_fn = lambda m, b: 0.5 * ((m(b[0]) - torch.nn.functional.one_hot(b[1], 10)) ** 2).sum(1).mean()
    exact = float(torch.trace(dense_hessian(case)))
    assert float(t.callback_metrics["hessian/trace"]) == pytest.approx(
        exact, abs=4 * float(t.callback_metrics["hessian/trace_std"]) + 1e-3 * abs(exact)
    )
    assert monitor.density is not None and monitor.density.nodes.shape == (2, 20)


def test_each_trace_estimate_draws_its_own_probes(tmp_path):
    """At rate 0 the Hessian never moves: the estimates differ by their probes alone. With one seed for all,
    every estimate repeated the first one's error (an outside trial: +2.2, +1.7, +1.1 standard errors over
    a run); drawn per step, a run's mean is nearer the exact trace than its estimates, and a second run
    repeats them."""
    runs = []
    for name in ("first", "second"):
        L.seed_everything(0)
        model = DigitsClassifier(lr=0.0, n=128)
        monitor = HessianEigenMonitor(k=1, every_n_steps=1, trace_every=1, trace_hvp=12, at_fit_end=False)
        trainer(tmp_path / name, max_steps=15, callbacks=[monitor]).fit(model)
        runs.append([h["trace"] for h in monitor.history])
    traces = torch.tensor(runs[0], dtype=torch.float64)
    assert runs[0] == runs[1] and len(set(runs[0])) == len(runs[0]) == 16
    case = make_case("mlp")
    case.model, case.batches = model, [digits(128)]
    case.loss_fn = lambda m, b: 0.5 * ((m(b[0]) - torch.nn.functional.one_hot(b[1], 10)) ** 2).sum(1).mean()
    exact = float(torch.trace(dense_hessian(case)))
    assert abs(float(traces.mean()) - exact) < float((traces - exact).abs().mean())
    assert abs(float(traces.mean()) - exact) < 3 * float(traces.std()) / 4  # 16 independent estimates


def test_a_trace_s_new_probes_keep_the_dropout_masks_of_the_eigenpairs(tmp_path):
    """The per-step seed draws the probes, not the masks: with a sketch spanning every direction (Hutch++
    exact) the trace of a model that does not move is the same at every step, the trace of the operator the
    eigenpairs see. A first version redrew the masks too: 10.89, 11.52, 10.64, 10.70 for 10.82 (a review)."""
    L.seed_everything(0)
    model = DigitsClassifier(hidden=2, dropout=0.5, lr=0.0, n=64).double()  # float64: the sketch keeps rank n
    n = sum(p.numel() for p in model.parameters())
    monitor = HessianEigenMonitor(k=1, every_n_steps=1, trace_every=1, trace_hvp=3 * n, at_fit_end=False)
    trainer(tmp_path, max_steps=3, callbacks=[monitor]).fit(model)
    traces = [h["trace"] for h in monitor.history]
    exact = hessian_trace(model, lambda m, b: m.loss(b), monitor.probe.batches, n_hvp=3 * n).trace
    assert traces == pytest.approx([exact] * 4, rel=1e-12)


def test_time_budget_postpones_measurements_and_says_so(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(lr=0.1, n=128)
    monitor = HessianEigenMonitor(k=1, every_n_steps=1, max_time_fraction=0.001)
    logger = CSVLogger(tmp_path)
    with pytest.warns(RuntimeWarning, match="max_time_fraction"):
        trainer(tmp_path, max_steps=4, callbacks=[monitor], logger=logger).fit(model)
    assert [h["step"] for h in monitor.history] == [0]  # measuring costs far more than 0.1% of a step
    assert sorted(int(r["step"]) for r in read_csv(logger) if r.get("hessian/postponed")) == [1, 2, 3, 4]


def test_a_second_fit_with_the_same_monitor_measures_again(tmp_path):
    """Another Trainer is another run: its step 4 is measured (not skipped as already measured), and the
    history is that run's (see test_eos_monitor's reuse tests)."""
    monitor = HessianEigenMonitor(k=1, every_n_steps=4, probe=64, at_fit_start=False)
    rows = []
    for _ in range(2):
        L.seed_everything(0)
        trainer(tmp_path, max_steps=4, callbacks=[monitor]).fit(DigitsClassifier(n=128, batch_size=64))
        assert [h["step"] for h in monitor.history] == [4]
        rows.append(monitor.history[0])
    assert rows[1] is not rows[0] and rows[1]["eigenvalues"] == rows[0]["eigenvalues"]


class _Uncast(L.LightningModule):
    """A model whose training_step does not cast its inputs: it relies on Lightning's precision plugin to
    convert the float32 batches, as most user code does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        return 0.5 * ((out - torch.nn.functional.one_hot(y, 10).to(out.dtype)) ** 2).sum(dim=1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x, y = digits(128)  # float32
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)


@pytest.mark.parametrize(
    ("precision", "dtype", "rtol"),
    [("64-true", torch.float64, 1e-6), ("bf16-true", torch.bfloat16, 1e-4), ("16-true", torch.float16, 1e-4)],
)
def test_true_precisions_measure_the_default_probe_converted_as_training_batches_are(
    tmp_path, precision, dtype, rtol
):
    """The default probe goes through the precision plugin (float32 data become float64, bfloat16,
    float16) before the measurement's own dtype rule (float32 for 16-bit weights): the top eigenvalue
    equals a float64 dense Hessian of the cast model on the cast probe."""
    from cases import Case, dense_hessian

    L.seed_everything(0)
    model = _Uncast()
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, tol=1e-7, at_fit_end=False)
    trainer(tmp_path, max_steps=2, precision=precision, callbacks=[monitor]).fit(model)
    assert [h["step"] for h in monitor.history] == [0, 2] and monitor.probe.batches[0][0].dtype == dtype
    x, y = digits(128)
    reference = copy.deepcopy(model.net).double()
    batch = (x.to(dtype).double(), y)  # the probe as the plugin converted it

    def loss_fn(net, b):
        return 0.5 * ((net(b[0]) - torch.nn.functional.one_hot(b[1], 10).double()) ** 2).sum(1).mean()

    top = float(torch.linalg.eigvalsh(dense_hessian(Case("uncast", reference, loss_fn, [batch])))[-1])
    assert float(monitor.latest.eigenvalues[0]) == pytest.approx(top, rel=rtol)


def test_a_drawn_probe_goes_through_the_batch_hooks_a_given_one_only_through_the_precision(tmp_path):
    """A normalization in on_after_batch_transfer (the module's) or on_before_batch_transfer (the
    DataModule's, as the loop dispatches it) reaches the probe drawn from the loader; batches handed in
    as `probe=` are taken as training_step takes them (not normalized twice), cast by the precision."""
    x, y = digits(128)

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)

        def on_before_batch_transfer(self, batch, dataloader_idx):
            return (batch[0] * 3, batch[1])

    # The drawn probe: both loader batches of 64, stacked into one.
    for probe, expected in ((None, x.double() * 3 / 2), ([(x[:32], y[:32])], x[:32].double())):
        L.seed_everything(0)
        model = _Uncast()
        model.on_after_batch_transfer = lambda batch, dataloader_idx: (batch[0] / 2, batch[1])
        monitor = HessianEigenMonitor(k=1, every_n_steps=2, at_fit_end=False, probe=probe)
        trainer(tmp_path, max_steps=1, precision="64-true", callbacks=[monitor]).fit(model, Data())
        assert torch.equal(monitor.probe.batches[0][0], expected.double())


class _SideEffects(_Uncast):
    """A training_step with side effects: a counter, a queue and an EMA teacher, optionally guarded."""

    def __init__(self, guarded: bool) -> None:
        super().__init__()
        self.guarded, self.seen, self.queue, self.flags = guarded, 0, [], []
        self.teacher = copy.deepcopy(self.net).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        import pf_lightning

        self.flags.append(pf_lightning.is_measuring()) if not self.guarded else None
        if not (self.guarded and pf_lightning.is_measuring()):
            self.seen += 1
            self.queue.append(batch_idx)
            with torch.no_grad():
                for t, s in zip(self.teacher.parameters(), self.net.parameters(), strict=True):
                    t.mul_(0.9).add_(s, alpha=0.1)
        return super().training_step(batch, batch_idx)


def test_side_effects_of_training_step_are_warned_and_is_measuring_guards_them(tmp_path):
    """Unguarded, the counter, the queue and the teacher's in-place update move with every product and are
    named in one warning; guarded by is_measuring(), they move once per training step, as without the
    monitor, and nothing is warned."""
    import warnings

    import pf_lightning

    assert not pf_lightning.is_measuring()
    loose = _SideEffects(guarded=False)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, probe=64, at_fit_end=False)
    with pytest.warns(UserWarning, match=r"training_step changed .*queue, seen.*is_measuring") as caught:
        trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(loose)
    assert sum("while serving as a measurement's loss" in str(w.message) for w in caught) == 1
    assert "teacher.0.weight" in next(str(w.message) for w in caught if "serving" in str(w.message))
    assert loose.seen > 2 and True in loose.flags and False in loose.flags

    guarded = _SideEffects(guarded=True)
    plain = _SideEffects(guarded=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(log_every_n_steps|num_workers|LeafSpec).*")
        trainer(tmp_path, max_steps=2, callbacks=[HessianEigenMonitor(k=1, every_n_steps=2, probe=64)]).fit(
            guarded
        )
    trainer(tmp_path, max_steps=2).fit(plain)
    assert guarded.seen == plain.seen == 2 and guarded.queue == plain.queue
    for a, b in zip(guarded.teacher.parameters(), plain.teacher.parameters(), strict=True):
        assert torch.equal(a, b)


class _ReentrantCheckpointed(_Uncast):
    """The middle layer under torch.utils.checkpoint(use_reentrant=True), as older code and models use."""

    def __init__(self, checkpointed: bool = True) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 10),
        )
        self.checkpointed = checkpointed

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = self.net[1](self.net[0](x))
        middle = lambda t: self.net[3](self.net[2](t))  # noqa: E731
        h = checkpoint(middle, h, use_reentrant=True) if self.checkpointed else middle(h)
        return self.net[4](h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return 0.5 * ((out - torch.nn.functional.one_hot(y, 10).to(out.dtype)) ** 2).sum(dim=1).mean()


def test_a_fit_with_reentrant_checkpointing_is_measured_not_skipped(tmp_path):
    """Issue 16, item 2: every measurement used to be skipped; now finite differences of ordinary backward
    passes, within 1e-3 of double backward on the same model without checkpointing."""
    L.seed_everything(0)
    model = _ReentrantCheckpointed()
    monitor = HessianEigenMonitor(k=2, every_n_steps=2, probe=64, tol=1e-6, at_fit_end=False)
    with pytest.warns(UserWarning, match="hvp='auto'"):
        t = trainer(tmp_path, max_steps=2, callbacks=[monitor])
        t.fit(model)
    assert [h["step"] for h in monitor.history] == [0, 2] and "hessian/skipped" not in t.callback_metrics
    plain = _ReentrantCheckpointed(checkpointed=False)
    plain.load_state_dict(model.state_dict())
    x, y = digits(64)
    direct = hessian_eigenpairs(plain, lambda m, b: m.training_step(b, 0), [(x, y)], k=2, tol=1e-6)
    torch.testing.assert_close(monitor.latest.eigenvalues, direct.eigenvalues, rtol=1e-3, atol=0)


def test_a_drawn_probe_is_stacked_into_one_forward_pass_and_measures_the_same_hessian(tmp_path):
    """Four loader batches of 32 become one batch of 128 (or two of 64 with probe_batch_size=64): the same
    samples and the same Hessian of their mean loss as the loader's batches measured one by one."""
    L.seed_everything(0)
    monitors = {
        size: HessianEigenMonitor(
            k=2,
            tol=1e-10,
            probe=128,
            probe_batch_size=size,
            name=str(size),
            at_fit_end=False,
            every_n_steps=None,
        )
        for size in (None, 64, "loader")
    }
    model = DigitsClassifier(n=256, batch_size=32).double()
    trainer(tmp_path, max_steps=1, callbacks=list(monitors.values())).fit(model)
    shapes = {size: [b[0].shape[0] for b in m.probe.batches] for size, m in monitors.items()}
    assert shapes == {None: [128], 64: [64, 64], "loader": [32, 32, 32, 32]}
    loader = monitors["loader"].probe.batches
    assert torch.equal(monitors[None].probe.batches[0][0], torch.cat([b[0] for b in loader]))
    reference = monitors["loader"].history[0]["eigenvalues"]
    for size in (None, 64):
        assert monitors[size].history[0]["eigenvalues"] == pytest.approx(reference, rel=1e-9)


def _summed_squared_error(module, batch):
    x, y = batch
    out = module(x.double())  # a float64 model
    return 0.5 * ((out - torch.nn.functional.one_hot(y, 10).double()) ** 2).sum()  # reduction="sum"


class _SummedLoss(DigitsClassifier):
    def loss(self, batch):
        return _summed_squared_error(self, batch)


@pytest.mark.parametrize(
    ("batch_size", "probe", "probe_batch_size", "kept"),
    [(32, 128, None, [32, 32, 32, 32]), (24, 64, 40, [24, 24])],  # stacked: [128]; [24], [40]
)
def test_a_loss_summed_over_samples_keeps_the_loader_batches_and_measures_each_as_trained(
    tmp_path, batch_size, probe, probe_batch_size, kept
):
    """Stacked, a summed loss would cover several batches at once: a multiple of each trained batch's
    Hessian. The stacking check sees the stacked loss is not the mean of the batches' losses (on a
    stacked batch of several, not the first, which may hold one) and keeps them, whole (a cut batch of 16
    would sum over 2/3 of a trained batch)."""
    from cases import dense_hessian, make_case

    L.seed_everything(0)
    model = _SummedLoss(hidden=8, n=256, batch_size=batch_size).double()
    at_start = copy.deepcopy(model)
    monitor = HessianEigenMonitor(
        k=1, tol=1e-10, probe=probe, probe_batch_size=probe_batch_size, at_fit_end=False, every_n_steps=None
    )
    with pytest.warns(UserWarning, match=r"sums over samples \(reduction='sum'\)"):
        trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(model)
    assert [b[0].shape[0] for b in monitor.probe.batches] == kept
    case = make_case("mlp")
    case.model, case.batches, case.loss_fn = at_start, monitor.probe.batches, _summed_squared_error
    expected = float(torch.linalg.eigvalsh(dense_hessian(case))[-1])  # the mean of the batches' sums
    assert monitor.history[0]["eigenvalues"][0] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("probe", "kept"), [(96, [32, 32, 32]), (80, [32, 32]), (20, [32])])
def test_batch_normalization_keeps_the_loader_batches_whole(tmp_path, caplog, probe, kept):
    """Batch statistics are part of the loss: a cut last batch (80 = 32 + 32 + 16) normalized over 16 samples,
    which no trained batch does (3% off a BatchNorm MLP's sharpness with batches of 100; 35% at 32 + 8; a
    batch of 1 skipped every measurement: outside trial). The probe ends at the last whole batch, or is the
    first whole batch, and says so; the measurement is the dense Hessian of those batches in train mode."""
    L.seed_everything(0)
    model = DigitsClassifier(n=128, batch_size=32, batchnorm=True).double()
    start = copy.deepcopy(model)
    monitor = HessianEigenMonitor(k=1, probe=probe, at_fit_end=False, every_n_steps=None, tol=1e-10)
    with caplog.at_level("INFO"):
        trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(model)
    assert [b[0].shape[0] for b in monitor.probe.batches] == kept
    assert (f"{sum(kept)} samples in {len(kept)} batch(es) for the {probe} asked" in caplog.text) == (
        probe != 96
    )
    case = make_case("mlp")
    case.model, case.batches = start.train(), monitor.probe.batches
    case.loss_fn = lambda m, b: (
        0.5 * ((m(b[0].double()) - torch.nn.functional.one_hot(b[1], 10)) ** 2).sum(1).mean()
    )
    expected = float(torch.linalg.eigvalsh(dense_hessian(case))[-1])
    assert monitor.history[0]["eigenvalues"][0] == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize(
    ("batch_size", "said"), [(128, "no standard error (NaN) from one group"), (64, "1 degree")]
)
def test_a_standard_error_over_few_whole_batches_says_so(tmp_path, batch_size, said):
    """Batch normalization keeps the probe's batches whole, so eig_1_stderr has one group per batch: one batch
    logged NaN at every measurement, two a value on one degree of freedom (0.03-1.07 where the spread was
    0.35; an outside trial), in silence. Said at set-up; 8 batches say nothing."""
    for size, warned in [(batch_size, True), (16, False)]:
        L.seed_everything(0)
        model = DigitsClassifier(n=128, batch_size=size, batchnorm=True)
        monitor = HessianEigenMonitor(k=1, probe=128, stderr_every=1, at_fit_end=False, every_n_steps=None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(model)
        messages = [str(w.message) for w in caught if "eig_1_stderr is the spread" in str(w.message)]
        assert len(messages) == int(warned) and all(said in m for m in messages)
        stderr = monitor.history[0]["eig_1_stderr"]
        assert math.isnan(stderr) == (size == 128)


def test_unstackable_batches_stay_as_they_are():
    from pf_lightning import ProbeSet
    from pf_lightning.callbacks._probe import stack_batches

    # Sequences padded to different lengths cannot be stacked; dicts with a shared mask can.
    ragged = ProbeSet([torch.zeros(4, 7), torch.zeros(4, 9)])
    assert stack_batches(ragged) is ragged
    mask = torch.ones(3, 3)
    dicts = ProbeSet(
        [
            {"x": torch.arange(4.0)[:, None], "mask": mask},
            {"x": torch.arange(4.0, 6.0)[:, None], "mask": mask},
        ]
    )
    stacked = stack_batches(dicts)
    assert len(stacked) == 1 and stacked.weights == [6.0]
    assert (
        torch.equal(stacked.batches[0]["x"][:, 0], torch.arange(6.0)) and stacked.batches[0]["mask"] is mask
    )

    @dataclasses.dataclass(frozen=True, slots=True)
    class Batch:  # a collate_fn's dataclass: stacked field by field (it stayed as many forward passes)
        x: torch.Tensor
        mask: torch.Tensor

    stacked = stack_batches(ProbeSet([Batch(**b) for b in dicts.batches]))
    assert len(stacked) == 1 and stacked.weights == [6.0] and isinstance(stacked.batches[0], Batch)
    assert torch.equal(stacked.batches[0].x[:, 0], torch.arange(6.0)) and stacked.batches[0].mask is mask


def test_the_sampling_error_of_eig_1_is_logged_with_every_measurement(tmp_path):
    from pf_lightning import eigenvalue_stderr

    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=2, every_n_steps=2, tol=1e-8, stderr_every=1)
    model = DigitsClassifier(n=128).double()
    t = trainer(tmp_path, max_steps=4, callbacks=[monitor], logger=CSVLogger(tmp_path))
    t.fit(model)
    stderr = logged(t)["hessian/eig_1_stderr"]
    assert sorted(stderr) == [0, 2, 4]
    assert all(0 < v < 0.5 * monitor.history[0]["eigenvalues"][0] for v in stderr.values())
    want = eigenvalue_stderr(model, lambda m, b: m.loss(b), monitor.probe, monitor.latest.eigenvectors[:, 0])
    assert stderr[4] == pytest.approx(want, rel=1e-9) and monitor.history[-1]["eig_1_stderr"] == stderr[4]


def test_finite_differences_keep_the_loader_batches_of_a_drawn_probe(tmp_path):
    """No cached graph: a stacked probe would hold all its activations in every product."""
    L.seed_everything(0)
    monitor = HessianEigenMonitor(
        k=1, probe=96, hvp="finite_difference", at_fit_end=False, every_n_steps=None
    )
    trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(DigitsClassifier(n=128, batch_size=32))
    assert [b[0].shape[0] for b in monitor.probe.batches] == [32, 32, 32]


def test_a_corrupted_warm_start_record_gives_a_fresh_start():
    from pf_lightning.callbacks._checkpoint import UnreadableState, result_from_state, result_state

    case_result = hessian_eigenpairs(*_quadratic_case(), k=1)
    state = result_state(case_result, True)
    assert result_from_state(state).info == {}
    for bad in (
        {"warm_costs": 3},
        {"warm_costs": {"block": -1}},
        {"warm_method": "power"},
        {"warm_streak": "x"},
    ):
        with pytest.raises(UnreadableState):
            result_from_state({**state, "warm": bad})


def _quadratic_case():
    model = torch.nn.Linear(3, 1, bias=False).double()
    x = torch.eye(3, dtype=torch.float64)
    return model, lambda m, b: 0.5 * m(b[0]).square().sum(), [(x, torch.zeros(3))]


def test_the_stacking_check_runs_in_the_measurement_dtype_of_a_bfloat16_model():
    """A bfloat16 model is measured in float32 (measurement_dtype): the check runs there too, where it
    passes a mean loss and refuses a summed one (it had raised on bfloat16 parameters and kept the
    loader's batches without a word)."""
    from torch import nn

    from pf_lightning import ProbeSet
    from pf_lightning.callbacks._probe import _stacking_keeps_the_loss, stack_batches

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1)).to(torch.bfloat16)
    x, y = torch.randn(20, 8).to(torch.bfloat16), torch.randn(20, 1)
    drawn = ProbeSet([(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])])
    stacked = stack_batches(drawn)
    mean = lambda m, b: ((m(b[0]).float() - b[1]) ** 2).mean()  # noqa: E731
    assert _stacking_keeps_the_loss(model, mean, drawn, stacked, dtype=torch.float32)
    summed = lambda m, b: ((m(b[0]).float() - b[1]) ** 2).sum()  # noqa: E731
    with pytest.warns(UserWarning, match=r"sums over samples \(reduction='sum'\)") as caught:
        assert not _stacking_keeps_the_loss(model, summed, drawn, stacked, dtype=torch.float32)
    # At the caller's line, as every other warning of the callbacks (it pointed into _probe.py).
    assert [w.filename for w in caught if "sums over samples" in str(w.message)] == [__file__]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.warns(UserWarning, match="stacking could not be checked"):  # bfloat16 needs a dtype
        assert not _stacking_keeps_the_loss(model, mean, drawn, stacked)


@pytest.mark.parametrize("name", [None, "a"])
def test_two_monitors_under_one_name_stop_at_set_up_naming_the_fix(tmp_path, name):
    """They logged under the same hessian/* names, each row overwriting the other's, without a word (an
    outside trial; Lightning's own state_key error comes only where every argument is the same)."""
    monitors = [HessianEigenMonitor(k=2, name=name), HessianEigenMonitor(k=1, every_n_steps=3, name=name)]
    t = trainer(tmp_path, max_steps=2, callbacks=monitors)
    where = "hessian/*" if name is None else "hessian/a/*"
    match = f"2 HessianEigenMonitors log under '{re.escape(where)}'.*different name="
    with pytest.raises(MisconfigurationException, match=match):
        t.fit(DigitsClassifier(n=64))


class _NamedDigits(torch.utils.data.Dataset):
    """Digits served as (its index as a string, label): a training_step that looks its inputs up (tokenizes)."""

    def __init__(self, n: int):
        self.x, self.y = digits(n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return str(i), self.y[i]


class _LookupClassifier(DigitsClassifier):
    def loss(self, batch):
        names, y = batch
        x, _ = digits(self.hparams.n)
        return super().loss((x[[int(name) for name in names]], y))

    def train_dataloader(self):
        return DataLoader(_NamedDigits(self.hparams.n), batch_size=64)


def test_a_probe_of_per_sample_texts_is_cut_and_stacked_with_them(tmp_path):
    """probe=100 from batches of 64 keeps 36 of the second: its labels were cut and its 64 strings not, so
    every measurement was skipped ('Expected input batch_size (64) to match target batch_size (36)'), and
    the sampling error's groups likewise (outside trial)."""
    L.seed_everything(0)
    model = _LookupClassifier(lr=0.1, n=256)
    monitor = HessianEigenMonitor(k=1, every_n_steps=3, probe=100, stderr_every=1, on_error="raise")
    trainer(tmp_path, max_steps=3, callbacks=[monitor]).fit(model)
    assert [h["step"] for h in monitor.history] == [0, 3]
    assert sum(monitor.spec.probe.weights) == 100
    x, y = digits(256)
    reference = hessian_eigenpairs(
        model, lambda m, b: DigitsClassifier.loss(m, b), [(x[:100], y[:100])], k=1, tol=1e-6
    )
    assert monitor.latest.eigenvalues[0] == pytest.approx(float(reference.eigenvalues[0]), rel=1e-4)
    assert all(0 < h["eig_1_stderr"] < h["eigenvalues"][0] for h in monitor.history)


class _EpochSeededStream(torch.utils.data.IterableDataset):
    """Reseeds its order from an epoch counter that each pass advances (a common IterableDataset)."""

    def __init__(self):
        self.x, self.y = digits(192)
        self.epoch = 0

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(1000 + self.epoch))
        self.epoch += 1
        for i in order.tolist():
            yield self.x[i], self.y[i]


def test_drawing_the_probe_leaves_an_iterable_datasets_epoch_counter_alone(tmp_path):
    """The probe's pass over the stream advanced its counter: epoch 2 trained on another order than without
    the callbacks (the first differing batch was epoch 2's first; outside trial)."""

    def run(callbacks):
        L.seed_everything(0)
        model = DigitsClassifier(lr=0.1, n=192)
        stream = _EpochSeededStream()
        trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model, DataLoader(stream, batch_size=64))
        return model, stream

    plain, plain_stream = run([])
    measured, stream = run([HessianEigenMonitor(k=1, every_n_steps=2, probe=128)])
    assert stream.epoch == plain_stream.epoch == 2
    for a, b in zip(plain.parameters(), measured.parameters(), strict=True):
        assert torch.equal(a, b)


class _SparseEmbedding(L.LightningModule):
    def __init__(self, sparse=True, momentum=0.0, batch_size=64):
        super().__init__()
        self.emb, self.out = nn.Embedding(20, 4, sparse=sparse), nn.Linear(4, 3)
        self.momentum, self.batch_size = momentum, batch_size

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.out(torch.tanh(self.emb(x))), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(
            torch.randint(0, 20, (64,), generator=g), torch.randint(0, 3, (64,), generator=g)
        )
        return DataLoader(data, batch_size=self.batch_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)  # takes sparse gradients


def test_a_sparse_embedding_is_measured_and_trains_bit_for_bit(tmp_path):
    """nn.Embedding(sparse=True) gives sparse gradients: every measurement was skipped ('reshape is not
    implemented for sparse tensors', outside trial). They are measured as the dense embedding's Hessian."""
    runs = {}
    for name, callbacks in [
        ("plain", []),
        ("measured", [HessianEigenMonitor(k=2, every_n_steps=2, tol=1e-6)]),
    ]:
        L.seed_everything(0)
        model = _SparseEmbedding()
        t = trainer(tmp_path / name, max_steps=4, callbacks=callbacks, logger=CSVLogger(tmp_path / name))
        t.fit(model)
        runs[name] = (model, t)
    model, t = runs["measured"]
    assert not any(k.endswith("skipped") for k in logged(t))
    dense = _SparseEmbedding(sparse=False)
    dense.load_state_dict(model.state_dict())
    batch = next(iter(dense.train_dataloader()))
    reference = hessian_eigenpairs(dense.double(), lambda m, b: m.loss(b), [batch], k=2, tol=1e-10)
    assert float(t.callback_metrics["hessian/eig_1"]) == pytest.approx(
        float(reference.eigenvalues[0]), rel=1e-4
    )
    for a, b in zip(runs["plain"][0].parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_sparse_embedding_s_momentum_update_is_measured(tmp_path):
    """SGD keeps a sparse parameter's momentum buffer sparse: the batch and critical sharpness along the
    momentum update were skipped at every step after the first ('add(sparse, dense) is not supported').
    They equal those of the same run with a dense embedding."""
    logs = {}
    for sparse in (True, False):
        L.seed_everything(0)
        model = _SparseEmbedding(sparse=sparse, momentum=0.9, batch_size=16)
        callbacks = [
            HessianEigenMonitor(k=1, every_n_steps=2),
            EdgeOfStabilityMonitor(critical_every_n_steps=1),
        ]
        t = trainer(
            tmp_path / str(sparse), max_steps=4, callbacks=callbacks, logger=CSVLogger(tmp_path / str(sparse))
        )
        t.fit(model)
        logs[sparse] = logged(t)
    sparse, dense = logs[True], logs[False]
    assert not any(k.endswith("skipped") for k in sparse)
    assert sorted(sparse["eos/critical_sharpness"]) == [1, 2, 3, 4]
    assert sorted(sparse["eos/batch_sharpness"]) == [0, 2, 4]
    for key in ("eos/critical_sharpness", "eos/batch_sharpness"):
        for step, value in dense[key].items():
            assert sparse[key][step] == pytest.approx(value, rel=1e-4), (key, step)


def test_a_solver_that_does_not_converge_is_said_once_at_the_user_s_line(tmp_path):
    """The solver's NonConvergenceWarning came at every measurement (and under DDP from every rank, an
    outside trial), pointing into pf-lightning, beside the monitor's own warning: one warning now, the
    solver's words, at the line that called fit; every measurement's flag is logged."""
    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=3, every_n_steps=1, max_hvp=8, tol=1e-5)
    t = trainer(tmp_path, max_steps=4, callbacks=[monitor], logger=CSVLogger(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(DigitsClassifier(n=128))
    said = [w for w in caught if "eigenpair" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__, [(w.filename, str(w.message)) for w in said]
    assert "lanczos: 3 of 3 eigenpairs did not reach tol=1e-05 within 8" in str(said[0].message)
    assert "see hessian/converged" in str(said[0].message) and said[0].category is NonConvergenceWarning
    assert logged(t)["hessian/converged"] == {step: 0.0 for step in range(5)}


class _WarningStep(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        warnings.warn("a warning of the training step", UserWarning, stacklevel=1)
        return super().training_step(batch, batch_idx)


def test_measurements_leave_the_warning_filters_as_they_are(tmp_path):
    """Holding the solver's warnings by swapping the warning filters at every measurement reset Python's
    once-per-line record: a training step's warning came once per measurement instead of once (a review).
    The user's filter for NonConvergenceWarning holds for the monitor's own saying of it."""
    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=3, every_n_steps=2, max_hvp=8, tol=1e-5)
    t = trainer(tmp_path, max_steps=6, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=NonConvergenceWarning)
        t.fit(_WarningStep(n=128))
    messages = [str(w.message) for w in caught]
    assert messages.count("a warning of the training step") == 1, messages
    assert not any("eigenpair" in m for m in messages)


@pytest.mark.parametrize(("which", "most"), [("top", 10), ("both", 5)])
def test_a_k_the_measured_block_cannot_hold_stops_at_set_up_with_the_largest_it_can(tmp_path, which, most):
    """k pairs at each end for which="both": the last layer's 10 biases hold 5 of each end, 10 of one."""
    monitor = HessianEigenMonitor(k=most + 1, which=which, params=["net.5.bias"])
    t = trainer(tmp_path, max_steps=1, callbacks=[monitor])
    with pytest.raises(MisconfigurationException, match=f"`k` must be at most {most} for the 10 measured"):
        t.fit(DigitsClassifier(n=64))


def test_numpy_integers_are_taken_as_the_ints_they_are(tmp_path):
    """The checks accepted np.int64 and the constructors kept it, which the solver then refused: every
    measurement was skipped ("k must be a positive int, got np.int64(2)"), EdgeOfStabilityMonitor's
    loss_window failed in a bare deque TypeError, and the settings logged '2' (an outside trial)."""
    i = np.int64
    monitor = HessianEigenMonitor(k=i(2), every_n_steps=i(2), seed=i(3), max_hvp=i(60), stderr_every=None)
    eos = EdgeOfStabilityMonitor(loss_window=i(5), slope_window=i(3), chart_every=i(2))
    logger = CSVLogger(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no skipped measurement
        warnings.filterwarnings(
            "ignore", message=".*(does not have many workers|LightningModule|log_every_n)"
        )
        trainer(tmp_path, max_steps=4, callbacks=[monitor, eos], logger=logger).fit(DigitsClassifier(n=64))
    assert [h["step"] for h in monitor.history] == [0, 2, 4]
    assert [len(h["eigenvalues"]) for h in monitor.history] == [2, 2, 2]
    assert [type(v) for v in (monitor.k, monitor.every_n_steps, monitor.seed, monitor.max_hvp)] == [int] * 4
    assert [type(v) for v in (eos.slope_window, eos.chart_every)] == [int, int] and eos.losses.maxlen == 5
    assert "every_n_steps: 2\n" in (pathlib.Path(logger.log_dir) / "hparams.yaml").read_text()


def test_a_monitor_without_a_cadence_says_so_where_it_is_built():
    """every_n_steps=None, no epochs and neither fit end measured nothing, without a word (an outside
    trial); a monitor driven by its own measure() calls is built so on purpose, so it is a warning."""
    with pytest.warns(
        UserWarning, match="no cadence .* measures only where measure\\(\\) is called"
    ) as caught:
        HessianEigenMonitor(every_n_steps=None, at_fit_start=False, at_fit_end=False)
    assert [w.filename for w in caught] == [__file__]
    with pytest.warns(UserWarning, match="no cadence") as caught:  # at per_group's caller (a review)
        HessianEigenMonitor.per_group(
            {"a": "net.0.*"}, every_n_steps=None, at_fit_start=False, at_fit_end=False
        )
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HessianEigenMonitor(every_n_steps=None, at_fit_start=False)  # the fit end measures


@pytest.mark.parametrize(
    ("probe", "match"),
    [
        (
            lambda x, y: [(x[:0], y[:0])],
            r"`probe` must hold batches with a positive sample count, got counts \[0\]",
        ),
        (
            lambda x, y: DataLoader(TensorDataset(x[:0], y[:0])),
            r"`probe` holds no batch \(DataLoader of none\)",
        ),
    ],
    ids=["empty-batch", "empty-loader"],
)
def test_a_probe_without_samples_stops_the_fit_naming_probe(tmp_path, probe, match):
    """They stopped it with a ValueError about `batches`, an argument the user never passed, and the empty
    loader as a list: "got [] (list)" (an outside trial)."""
    x, y = digits(64)
    t = trainer(tmp_path, max_steps=1, callbacks=[HessianEigenMonitor(k=1, probe=probe(x, y))])
    with pytest.raises(MisconfigurationException, match=match):
        t.fit(DigitsClassifier(n=64))


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (lambda m, b: ((m(b[0]) - torch.eye(10)[b[1]]) ** 2).mean(1), "is not a scalar Tensor"),
        (lambda m, b: m.loss(b).detach(), r"is detached from the parameters \(no grad_fn\)"),
    ],
    ids=["per-sample", "detached"],
)
def test_a_loss_no_measurement_can_use_stops_the_fit_at_set_up(tmp_path, loss_fn, match):
    """They passed the set-up and every measurement was skipped, one warning for the fit (an outside trial)."""
    t = trainer(tmp_path, max_steps=2, callbacks=[HessianEigenMonitor(k=1, loss_fn=loss_fn)])
    with pytest.raises(MisconfigurationException, match=f"the loss of the first probe batch {match}"):
        t.fit(DigitsClassifier(n=64))


class _LowRankQuadratic(L.LightningModule):
    """0.5 theta^T A theta with A of rank 20 on 120 parameters (eigenvalues 1..20 and 100 zeros)."""

    def __init__(self):
        super().__init__()
        q, _ = torch.linalg.qr(
            torch.randn(120, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        )
        self.register_buffer("a", q @ torch.diag(torch.linspace(1.0, 20.0, 20, dtype=torch.float64)) @ q.mT)
        self.theta = nn.Parameter(torch.zeros(120, dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        return 0.5 * self.theta @ self.a @ self.theta + 0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 1, dtype=torch.float64)), batch_size=4)


def test_a_monitor_measures_the_bottom_of_a_low_rank_hessian_with_method_lobpcg(tmp_path):
    """The README sent a monitor's user to method="lobpcg" for a low-rank Hessian's bottom, which only the
    functions took (an outside trial): Lanczos returns each distinct low value once where a restart comes
    before its Krylov space closes (rank 20 + 1 > the basis of 20 for k = 2 at both ends: [1, 0] for the
    two zeros), a block as many copies as its columns."""
    monitor = HessianEigenMonitor(
        k=2, which="both", method="lobpcg", tol=1e-6, every_n_steps=None, at_fit_end=False
    )
    trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(_LowRankQuadratic())
    (entry,) = monitor.history
    assert entry["eigenvalues"][:2] == pytest.approx([20.0, 19.0], rel=1e-6)
    assert entry["eigenvalues"][2:] == pytest.approx([0.0, 0.0], abs=1e-6)
    with pytest.raises(MisconfigurationException, match="`basis_size` must be None with method='lobpcg'"):
        HessianEigenMonitor(method="lobpcg", basis_size=30)
    # Below one block it skipped every measurement (a review): refused at set-up, where the block is known
    # (at most the parameters' count: 4 products measure both ends of 2 of a 4-parameter block, a review).
    t = trainer(tmp_path, max_steps=1, callbacks=[HessianEigenMonitor(k=5, method="lobpcg", max_hvp=6)])
    with pytest.raises(MisconfigurationException, match=r"`max_hvp` must be at least 7 with method='lobpcg'"):
        t.fit(DigitsClassifier(n=64))
    small = HessianEigenMonitor(k=2, which="both", method="lobpcg", max_hvp=4, params="net.0.bias", name="b")
    trainer(tmp_path, max_steps=1, callbacks=[small]).fit(DigitsClassifier(n=64, hidden=4))
    assert len(small.history) == 2 and len(small.history[0]["eigenvalues"]) == 4
