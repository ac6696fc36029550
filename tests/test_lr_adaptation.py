"""LRAdaptation with DriftAdaptiveLR and SharpnessCappedLR inside real Lightning runs."""

import copy
import functools
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import DigitsClassifier, ManualDigits, TwoOptimizers, digits, logged, trainer

from pf_lightning import (
    DriftAdaptiveLR,
    EdgeOfStabilityMonitor,
    HessianEigenMonitor,
    HessianOperator,
    LRAdaptation,
    SharpnessCappedLR,
    gradient_curvature,
)


def dal_factory(**kwargs):
    return functools.partial(DriftAdaptiveLR, **kwargs)


def fit(tmp_path, model, steps, callbacks, **kwargs):
    t = trainer(
        tmp_path,
        max_steps=steps,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        **kwargs,
    )
    t.fit(model)
    return t


@pytest.mark.parametrize("first", ["LearningRateMonitor", "LRAdaptation"])
def test_a_learning_rate_monitor_listed_first_is_warned_about(tmp_path, first):
    """LearningRateMonitor logs at its batch start: listed first, it logged 0.1 for the first step where DAL
    set 1.47 for it from the batch about to train (outside trial). Said at set-up, naming the order."""
    L.seed_everything(0)
    callbacks = [LRAdaptation(dal_factory(p=1.0, max_lr=5.0)), LearningRateMonitor("step")]
    if first == "LearningRateMonitor":
        callbacks.reverse()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(tmp_path, DigitsClassifier(n=128, lr=0.1), 2, callbacks)
    said = [w for w in caught if "list LRAdaptation first" in str(w.message)]
    assert len(said) == int(first == "LearningRateMonitor")
    m = logged(t)
    assert (m["lr-SGD"][0] == pytest.approx(m["dal/lr"][0])) == (first == "LRAdaptation")


@pytest.mark.parametrize(
    ("optimizer", "max_lr", "p", "warned"),
    [
        ("adam", 5.0, 1.0, True),
        ("adam", 0.01, 1.0, False),
        ("sgd", 5.0, 1.0, False),
        ("adam", 5.0, 0.0, False),
    ],
)
def test_dal_on_a_preconditioning_optimizer_with_a_gradient_descent_max_lr_is_warned_about(
    tmp_path, optimizer, max_lr, p, warned
):
    """DAL's 2/v^p is a gradient-descent rate: on Adam at its default max_lr=5 an outside trial's AdamW at
    3e-3 ran at 0.006-2.1, in silence. Warned at set-up where max_lr is over 10 times the configured rate
    (not at p = 0, which keeps the configured rate)."""
    L.seed_everything(0)
    model = DigitsClassifier(n=64, optimizer=optimizer, lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, model, 1, [LRAdaptation(dal_factory(max_lr=max_lr, p=p))])
    said = [str(w.message) for w in caught if "in gradient-descent units" in str(w.message)]
    assert len(said) == int(warned) and all("5000 times the configured 0.001" in m for m in said)


def test_dal_sets_each_rate_from_the_hg_ratio_measured_before_it(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1)
    start = copy.deepcopy(model)
    t = fit(tmp_path, model, 8, [LRAdaptation(dal_factory(p=1.0, max_lr=5.0)), LearningRateMonitor("step")])
    m = logged(t)
    for step in range(8):  # the first step's rate comes from a measurement before it
        v = m["dal/hg_ratio"][step]
        assert m["dal/lr"][step] == pytest.approx(min(2.0 / v, 5.0), rel=1e-6)
        assert m["lr-SGD"][step] == pytest.approx(m["dal/lr"][step], rel=1e-6)  # LearningRateMonitor agrees

    # The last value was measured at the final parameters: an exact double-backward product agrees
    # within the forward difference's bound.
    x, y = digits(128)
    with HessianOperator(model, lambda mod, b: mod.loss(b), [(x, y)], hvp="double_backward") as op:
        exact = gradient_curvature(op, "operator")
    assert m["dal/hg_ratio"][8] == pytest.approx(exact.hg_ratio, rel=5e-3)

    # A plain-PyTorch loop with the documented timing reproduces the run.
    optimizer = torch.optim.SGD(start.parameters(), lr=0.1)
    scheduler = DriftAdaptiveLR(optimizer, p=1.0, max_lr=5.0)

    def hg_ratio():
        with HessianOperator(start, lambda mod, b: mod.loss(b), [(x, y)]) as op:
            return gradient_curvature(op, "forward_difference").hg_ratio

    scheduler.refresh(hg_ratio())
    for _ in range(8):
        optimizer.zero_grad()
        start.loss((x, y)).backward()
        optimizer.step()
        scheduler.step(hg_ratio())
    for a, b in zip(start.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dal_is_measured_only_for_the_steps_of_its_window(tmp_path):
    """Outside window=(3, 6) the base rate runs and v is not needed: 3 measurements in 10 steps, not 11,
    and no 'holding the previous rate' warning for the steps before the window."""
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "DriftAdaptiveLR", RuntimeWarning)
        t = fit(tmp_path, model, 10, [LRAdaptation(dal_factory(p=1.0, max_lr=5.0, window=(3, 6)))])
    m = logged(t)
    assert sorted(m["dal/hg_ratio"]) == sorted(m["dal/seconds"]) == [3, 4, 5]
    for step in range(10):  # v measured at the end of step s sets the rate of step s (counted from 0)
        expected = min(2.0 / m["dal/hg_ratio"][step], 5.0) if step in (3, 4, 5) else 0.1
        assert m["dal/lr"][step] == pytest.approx(expected, rel=1e-6)
        assert m["dal/active"][step] == float(step in (3, 4, 5)) and m["dal/held"][step] == 0.0


def test_dal_window_counts_the_schedulers_own_steps_under_manual_optimization(tmp_path):
    """Two optimizers stepped each batch: Lightning's step counts both (two a batch), DAL's schedule one.
    Its steps 3-5 (global steps 6-10) each run at 2/v of a v measured just before them."""
    L.seed_everything(0)
    dal = dal_factory(p=1.0, max_lr=5.0, window=(3, 6))
    # Optimizer 0 steps the first layer only: v over the whole model is said (an outside trial found it silent).
    with pytest.warns(RuntimeWarning, match=r"DriftAdaptiveLR's SGD does not update 4 trainable .*params="):
        t = fit(tmp_path, TwoOptimizers(n=64), 16, [LRAdaptation(dal, loss_fn=lambda m, b: m.loss(b))])
    m = logged(t)
    assert sorted(m["dal/hg_ratio"]) == [6, 8, 10]
    for step in range(0, 16, 2):  # the batch starts
        expected = min(2.0 / m["dal/hg_ratio"][step], 5.0) if step in (6, 8, 10) else 0.1
        assert m["dal/lr"][step] == pytest.approx(expected, rel=1e-6)


def test_a_manual_run_with_two_optimizers_resumes_at_the_uninterrupted_rates(tmp_path):
    """Under manual optimization this callback steps its schedulers at its own batch end, before
    ModelCheckpoint saves, so a resumed run owes none; but the resume took one wherever the scheduler's count
    equalled global_step - 1, which two optimizers' global_step (two a batch) made true by chance: a DAL
    warm-up resumed at global step 2 ran a step ahead for the rest of the run (an outside trial: rates
    0.8125, 1.05, 1.2875 for 0.575, 0.8125, 1.05)."""

    def callbacks():
        dal = dal_factory(p=1.0, max_lr=5.0, warmup_steps=8)
        return [LRAdaptation(dal, loss_fn=lambda m, b: m.loss(b))]

    L.seed_everything(0)
    reference = TwoOptimizers(n=64)
    resumed = copy.deepcopy(reference)
    saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{step}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # v over the whole model, which optimizer 0 does not all step
        straight = logged(
            fit(tmp_path / "straight", reference, 16, [*callbacks(), saving], enable_checkpointing=True)
        )
        second = trainer(
            tmp_path / "second", max_steps=16, callbacks=callbacks(), logger=CSVLogger(tmp_path / "second")
        )
        second.fit(resumed, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    after = logged(second)
    later = range(4, 16, 2)
    assert {s: after["dal/lr"][s] for s in later} == {s: straight["dal/lr"][s] for s in later}
    assert len({straight["dal/lr"][s] for s in later}) >= 3  # the warm-up moves the rate: a step ahead shows
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


class _Stop(BaseException):
    """Ctrl+C's kind: not an Exception, so no measurement skips it."""


class _SelfStepping(ManualDigits):
    """training_step steps its DAL scheduler itself, with the last measurement."""

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        self.lr_schedulers().step(self.trainer.callback_metrics["dal/hg_ratio"])

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = DriftAdaptiveLR(optimizer, p=1.0, max_lr=5.0, warmup_steps=8)
        return {"optimizer": optimizer, "lr_scheduler": scheduler.lightning_config()}


@pytest.mark.parametrize("stepping", ["callback", "training_step"])
def test_a_manual_run_interrupted_inside_its_measurement_resumes_at_the_uninterrupted_rates(
    tmp_path, stepping
):
    """Under manual optimization the schedulers are stepped after the batch end's measurement: a checkpoint
    written inside it (OnExceptionCheckpoint on Ctrl+C) owes them that step. With no step owed under manual
    optimization (a first mend of the two-optimizer resume), the scheduler stayed a step behind for the rest
    of the run (a review: rates 0.746, 0.908 for 0.907, 0.838). The step the schedulers were last stepped at
    is kept in the checkpoint and tells it, with each scheduler's count at the batch start: one training_step
    stepped itself owes none (counted as owed, it ran a step ahead for the rest of the run: a review)."""
    armed = {"at": None}

    def loss_fn(module, batch):
        if armed["at"] is not None and module.trainer.global_step == armed["at"]:
            armed["at"] = None
            raise _Stop
        return module.loss(batch)

    counts = {}

    def run(root, model, ckpt_path=None, saver=()):
        factory = dal_factory(p=1.0, max_lr=5.0, warmup_steps=8) if stepping == "callback" else None
        callbacks = [LRAdaptation(factory, loss_fn=loss_fn), *saver]
        t = trainer(
            root, max_steps=12, callbacks=callbacks, logger=CSVLogger(root), enable_checkpointing=bool(saver)
        )
        t.fit(model, ckpt_path=ckpt_path)
        counts[root.name] = t.lr_scheduler_configs[0].scheduler.last_epoch
        return logged(t)

    L.seed_everything(0)
    reference = (ManualDigits if stepping == "callback" else _SelfStepping)(n=64)
    interrupted = copy.deepcopy(reference)
    straight = run(tmp_path / "straight", reference)
    armed["at"] = 4
    with pytest.raises(_Stop):
        run(tmp_path / "first", interrupted, saver=[OnExceptionCheckpoint(tmp_path, filename="on_exception")])
    checkpoint = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)
    stepped = stepping == "training_step"  # before the measurement
    assert checkpoint["global_step"] == 4 and checkpoint["lr_schedulers"][0]["last_epoch"] == 3 + stepped
    after = run(tmp_path / "second", interrupted, ckpt_path=tmp_path / "on_exception.ckpt")
    assert counts["second"] == counts["straight"] == 12
    if stepped:
        return  # its rates take the measurement from before its step, which the resume takes again (README)
    later = range(4, 12)
    assert {s: after["dal/lr"][s] for s in later} == {s: straight["dal/lr"][s] for s in later}
    for a, b in zip(reference.parameters(), interrupted.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_training_step_that_steps_its_scheduler_resumes_with_the_value_it_was_last_fed(tmp_path):
    """A resumed fit's first training_step found no dal/hg_ratio in callback_metrics (the callback put it
    back at its first batch end, after that step), so a scheduler training_step steps itself held an older
    value: an outside trial's rates ran 3.04 for 1.07 at the first changed step, and the runs parted."""

    def run(root, model, steps, ckpt_path=None, saver=()):
        adaptation = LRAdaptation(loss_fn=lambda module, batch: module.loss(batch))
        t = trainer(root, max_steps=steps, callbacks=[adaptation, *saver], enable_checkpointing=bool(saver))
        t.fit(model, ckpt_path=ckpt_path)

    L.seed_everything(0)
    reference = _SelfStepping(n=64)
    resumed = copy.deepcopy(reference)
    saver = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    run(tmp_path / "straight", reference, 12, saver=[saver])
    run(tmp_path / "second", resumed, 12, ckpt_path=tmp_path / "step=8.ckpt")
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["sgd", "adam with a tensor lr"])
def test_p0_trains_bit_identically_to_no_adaptation(tmp_path, tensor_lr):
    def run(callbacks):
        L.seed_everything(0)
        model = DigitsClassifier(n=128, batch_size=32, dropout=0.2, batchnorm=True, momentum=0.9)
        if tensor_lr:  # the scheduler fills the tensor in place, as torch's do: Adam computes as without it
            model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2))
        trainer(tmp_path, max_steps=9, callbacks=callbacks).fit(model)
        return model.state_dict()

    plain = run([])
    measured = run([LRAdaptation(dal_factory(p=0.0), every_n_steps=2)])
    for key in plain:
        assert torch.equal(plain[key], measured[key]), key


def test_an_installed_scheduler_resumes_like_an_uninterrupted_run(tmp_path):
    def adaptation():
        return LRAdaptation(dal_factory(p=1.0, max_lr=2.0, window=(2, None), warmup_steps=3), every_n_steps=2)

    L.seed_everything(0)
    reference = DigitsClassifier(n=128, lr=0.05)
    resumed = copy.deepcopy(reference)
    t = fit(tmp_path / "straight", reference, 12, [adaptation()])
    straight = logged(t)["dal/lr"]

    first = fit(tmp_path / "first", copy.deepcopy(resumed), 5, [adaptation()])
    first.save_checkpoint(tmp_path / "five.ckpt")
    callback = adaptation()
    second = trainer(
        tmp_path / "second", max_steps=12, callbacks=[callback], logger=CSVLogger(tmp_path / "second")
    )
    second.fit(resumed, ckpt_path=tmp_path / "five.ckpt")
    assert callback.installed.last_epoch == 12
    after = logged(second)["dal/lr"]
    assert {s: after[s] for s in range(6, 12)} == {s: straight[s] for s in range(6, 12)}
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


class _DalDigits(DigitsClassifier):
    """DigitsClassifier with DAL from configure_optimizers; under manual optimization if ``manual``."""

    def __init__(self, manual: bool, scheduler: str = "configured", **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = not manual
        self.scheduler = scheduler  # "configured", "stepped" by training_step, or "installed" by LRAdaptation

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.loss(batch))
        optimizer.step()
        if self.scheduler == "stepped":  # the README's earlier advice: the value measured before this step
            scheduler = self.lr_schedulers()
            scheduler.step(self.trainer.callback_metrics[scheduler.monitor])

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        if self.scheduler == "installed":
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": DriftAdaptiveLR(optimizer, max_lr=5.0).lightning_config(),
        }


@pytest.mark.parametrize("scheduler", ["configured", "stepped", "installed"])
def test_manual_optimization_takes_the_rates_of_automatic_optimization(tmp_path, scheduler):
    """Lightning steps no scheduler under manual optimization and drops lightning_config()'s monitor: the
    fit stopped at set-up asking for that config, and a scheduler nobody stepped kept its first rate."""

    def run(module, name):
        factory = dal_factory(max_lr=5.0) if module.scheduler == "installed" else None
        callback = LRAdaptation(factory, loss_fn=lambda mod, batch: mod.loss(batch))
        t = fit(tmp_path / name, module, 8, [callback])
        return logged(t)["dal/lr"], module, t.lr_scheduler_configs[0].scheduler

    L.seed_everything(0)
    automatic = _DalDigits(False, n=128, lr=0.1)
    manual = _DalDigits(True, scheduler, n=128, lr=0.1)
    manual.load_state_dict(automatic.state_dict())
    want, automatic, _ = run(automatic, "automatic")
    got, manual, stepped = run(manual, "manual")
    assert len(set(want.values())) > 4  # the rate moves
    if scheduler == "stepped":  # stepped before the batch's measurement: a step behind, and never twice
        assert [got[s] for s in range(1, 8)] != [want[s] for s in range(1, 8)]
    else:
        assert got == want
        for a, b in zip(automatic.parameters(), manual.parameters(), strict=True):
            assert torch.equal(a, b)
    assert stepped.last_epoch == 8


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_sharpness_cap_follows_the_edge_of_the_optimizer_in_use(tmp_path, optimizer):
    L.seed_everything(0)
    model = DigitsClassifier(n=128)
    if optimizer == "adam":
        make, constant = (lambda p: torch.optim.Adam(p, lr=0.05)), 38.0
    else:
        make, constant = (lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.5)), 3.0

    def configure():
        opt = make(model.parameters())
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
        return {"optimizer": opt, "lr_scheduler": SharpnessCappedLR(opt, 0.5, base=cosine).lightning_config()}

    model.configure_optimizers = configure
    monitor = HessianEigenMonitor(k=1, every_n_steps=3, tol=1e-4)
    callbacks = [LRAdaptation(), LearningRateMonitor("step"), monitor, EdgeOfStabilityMonitor()]
    t = fit(tmp_path, model, 10, callbacks)
    m = logged(t)
    base_lr = 0.05 if optimizer == "adam" else 1.0
    measured = sorted(m["eos/sharpness"])
    assert measured[0] == (0 if optimizer == "sgd_momentum" else 3)  # Adam: no preconditioner at step 0
    for step in range(measured[0], 10):
        latest = m["eos/sharpness"][max(s for s in measured if s <= step)]
        cosine = 0.5 * base_lr * (1 + math.cos(math.pi * step / 12))
        expected = min(cosine, 0.5 * constant / latest)
        assert m["cap/lr"][step] == pytest.approx(expected, rel=1e-6)
        assert m["lr-" + ("Adam" if optimizer == "adam" else "SGD")][step] == pytest.approx(
            expected, rel=1e-6
        )
        assert m["cap/base_lr"][step] == pytest.approx(cosine, rel=1e-6)
    assert {s: m["cap/sharpness"][s] for s in measured} == {s: m["eos/sharpness"][s] for s in measured}
    assert any(m["cap/capped"][s] == 1.0 for s in range(measured[0], 10))


class _DecayedQuadratic(L.LightningModule):
    """E = w^2 / 2 (curvature 1) under SGD with L2 decay 0.1: the step descends E + 0.1 w^2 / 2."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        return 0.5 * (self.w**2).sum() + 0.0 * batch[0].sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=4)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=0.1)
        return {"optimizer": optimizer, "lr_scheduler": DriftAdaptiveLR(optimizer, p=1.0).lightning_config()}


@pytest.mark.parametrize("hvp", ["forward_difference", "double_backward"])
def test_dal_measures_the_loss_with_the_optimizers_coupled_weight_decay(tmp_path, hvp):
    """v of E alone (1) set 2/1 where the step's curvature is 1.1: w grew 1.2-fold a step, 237-fold in 30
    steps, in silence (outside trial). v of E + 0.1 w^2 / 2 is 1.1: DAL-1 holds w at its edge."""
    model = _DecayedQuadratic()
    t = fit(tmp_path, model, 30, [LRAdaptation(hvp=hvp)])
    m = logged(t)
    assert [m["dal/hg_ratio"][s] for s in range(30)] == pytest.approx([1.1] * 30, rel=1e-6)
    assert [m["dal/lr"][s] for s in range(30)] == pytest.approx([2 / 1.1] * 30, rel=1e-6)
    assert abs(float(model.w.detach())) == pytest.approx(1.0, rel=1e-4)


def test_a_bad_hg_ratio_holds_the_rate_warns_once_and_is_flagged(tmp_path):
    calls = {"n": 0}

    def loss_fn(module, batch):
        calls["n"] += 1
        loss = module.loss(batch)
        return loss * math.nan if calls["n"] in (3, 4) else loss  # a NaN stops a measurement at once

    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = fit(tmp_path, model, 6, [LRAdaptation(dal_factory(p=1.0), loss_fn=loss_fn)])
    m = logged(t)
    # Measurements: step 0 before the first step (gradients 1-2), then after steps 1, 2, 3, ...
    assert m["dal/skipped"] == {1: 1.0, 2: 1.0}
    assert m["dal/held"][1] == 1.0 and m["dal/held"][2] == 1.0 and m["dal/held"][3] == 0.0
    assert m["dal/lr"][1] == m["dal/lr"][2] == pytest.approx(m["dal/lr"][0])
    assert m["dal/lr"][3] == pytest.approx(2.0 / m["dal/hg_ratio"][3], rel=1e-6)
    messages = [str(w.message) for w in record]
    assert sum("holding the previous rate" in s for s in messages) == 1
    assert sum("not measured" in s for s in messages) == 1
    # Both point at the line that called trainer.fit (the scheduler's pointed into Lightning's module.py).
    assert {
        w.filename for w in record if "holding" in str(w.message) or "not measured" in str(w.message)
    } == {__file__}
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheduler": 3}, "factory"),
        ({"every_n_steps": 0}, "`every_n_steps` must be an int >= 1"),
        ({"optimizer_index": -1}, "`optimizer_index` must be an int >= 0"),
        ({"hvp": "central"}, "`hvp` must be one of"),
        ({"loss_fn": "loss"}, "`loss_fn` must be callable"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        LRAdaptation(**kwargs)


def _configured(kind):
    def configure(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if kind == "plain":
            return opt
        if kind == "no_monitor":
            return {"optimizer": opt, "lr_scheduler": {"scheduler": DriftAdaptiveLR(opt), "interval": "step"}}
        if kind == "dal":
            return {"optimizer": opt, "lr_scheduler": DriftAdaptiveLR(opt).lightning_config()}
        if kind == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss"}}
        if kind == "every_2":
            return {
                "optimizer": opt,
                "lr_scheduler": {**DriftAdaptiveLR(opt).lightning_config(), "frequency": 2},
            }
        if kind in ("dal_and_cosine", "cap_and_its_base"):
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
            measured = (
                DriftAdaptiveLR(opt) if kind == "dal_and_cosine" else SharpnessCappedLR(opt, base=cosine)
            )
            return [opt], [measured.lightning_config(), {"scheduler": cosine, "interval": "step"}]
        return {"optimizer": opt, "lr_scheduler": SharpnessCappedLR(opt).lightning_config()}

    return configure


@pytest.mark.parametrize(
    ("kind", "callback", "match"),
    [
        ("plain", LRAdaptation, "found no DriftAdaptiveLR or SharpnessCappedLR"),
        ("no_monitor", LRAdaptation, r"lightning_config\(\)"),
        ("every_2", LRAdaptation, "frequency=1.*got interval='step', frequency=2"),  # adapted 10-19 for 5-9
        (
            "dal_and_cosine",
            LRAdaptation,
            "a CosineAnnealingLR also sets the rate.*remove it",
        ),  # lost in silence
        ("cap_and_its_base", LRAdaptation, "would step twice a step"),  # 0.253 for 0.381 at step 13
        ("cap", LRAdaptation, "add HessianEigenMonitor"),
        ("plain", lambda: LRAdaptation(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2)), "installs"),
        ("plain", lambda: LRAdaptation(dal_factory(), optimizer_index=1), "optimizer_index=1"),
        # base= was suggested, which refuses a ReduceLROnPlateau (outside trial)
        (
            "plateau",
            lambda: LRAdaptation(functools.partial(SharpnessCappedLR)),
            "ReduceLROnPlateau.*remove one",
        ),
    ],
)
def test_bad_configurations_fail_at_fit_start_naming_the_fix(tmp_path, kind, callback, match):
    model = DigitsClassifier(n=64)
    model.configure_optimizers = functools.partial(_configured(kind), model)
    with pytest.raises(MisconfigurationException, match=match):
        trainer(tmp_path, max_steps=2, callbacks=[callback()]).fit(model)


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_a_cap_on_a_preconditioning_optimizer_refuses_a_given_threshold(tmp_path, kind):
    """With threshold= the monitor logs lambda_max(H) as eos/sharpness; Adam's edge 38/S is one of
    lambda_max(P^-1 H) (the helper's run: a cap of 38 where the edge was at 0.117, never binding). SGD's
    edge 2/S is one of lambda_max(H): that cap runs."""
    model = DigitsClassifier(n=64)

    def configure():
        optimizer = getattr(torch.optim, kind)(model.parameters(), lr=0.01)
        return {"optimizer": optimizer, "lr_scheduler": SharpnessCappedLR(optimizer).lightning_config()}

    model.configure_optimizers = configure
    callbacks = [HessianEigenMonitor(k=1), EdgeOfStabilityMonitor(threshold=5.0), LRAdaptation()]
    t = trainer(tmp_path, max_steps=1, callbacks=callbacks)
    if kind == "SGD":
        t.fit(model)
        assert t.global_step == 1
        return
    with pytest.raises(MisconfigurationException, match="remove threshold= from the EdgeOfStabilityMonitor"):
        t.fit(model)


class _CappedWarmUpFromZero(DigitsClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=2.0)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))
        cap = SharpnessCappedLR(optimizer, fraction=0.9, base=warmup)
        return {"optimizer": optimizer, "lr_scheduler": cap.lightning_config()}


def test_the_cap_holds_a_warm_up_from_rate_zero_from_its_first_step(tmp_path):
    """At rate 0 no threshold applies, but the sharpness does: the fit-start measurement caps the warm-up."""
    L.seed_everything(0)
    monitors = [
        HessianEigenMonitor(k=1, every_n_steps=100, tol=1e-6),
        EdgeOfStabilityMonitor(),
        LRAdaptation(),
    ]
    t = trainer(tmp_path, max_steps=4, callbacks=monitors, logger=CSVLogger(tmp_path))
    with pytest.warns(RuntimeWarning, match="learning rate of SGD is 0"):
        t.fit(_CappedWarmUpFromZero(n=128))
    metrics = logged(t)
    cap = 0.9 * 2 / metrics["hessian/eig_1"][0]
    assert cap < 0.5  # binding from the warm-up's first positive rate (0.5) on
    assert [metrics["cap/lr"][step] for step in range(4)] == pytest.approx([0.0, cap, cap, cap], rel=1e-12)


class _CappedHeavyBall(DigitsClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=2.0, momentum=0.5)  # far beyond the edge
        return {
            "optimizer": optimizer,
            "lr_scheduler": SharpnessCappedLR(optimizer, fraction=0.9).lightning_config(),
        }


@pytest.mark.parametrize("first", ["monitors", "lr_adaptation"])
def test_the_edge_is_judged_at_the_rate_the_cap_sets_from_the_measurement(tmp_path, first):
    """The cap sets the next step's rate from the sharpness just measured: that is the rate judged. Judged
    at the rate before it (an outside trial), the fit start warned of an edge at the configured 2.0, which no
    step ran at, and eos/ratio wandered 0.73-1.16 around the cap's 0.9."""
    L.seed_everything(0)
    monitors = [HessianEigenMonitor(k=1, every_n_steps=2, tol=1e-6), EdgeOfStabilityMonitor()]
    callbacks = [*monitors, LRAdaptation()] if first == "monitors" else [LRAdaptation(), *monitors]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(tmp_path, _CappedHeavyBall(n=128), 6, [*callbacks, LearningRateMonitor("step")])
    assert not [w for w in caught if "stability threshold" in str(w.message)]
    m = logged(t)
    measured = sorted(m["eos/ratio"])
    assert measured == [0, 2, 4, 6]
    for step in measured:
        assert m["eos/ratio"][step] == pytest.approx(0.9, rel=1e-9)
        assert m["eos/threshold"][step] == pytest.approx(
            3.0 / m["eos/lr"][step], rel=1e-12
        )  # (2 + 2 beta)/lr
        if step < 6:
            assert (
                m["eos/lr"][step] == m["lr-SGD"][step] == m["cap/lr"][step]
            )  # the rate the next step runs at
    assert "eos/first_edge_step" not in m and "eos/warning" not in m


def _cap_callbacks(every_n_steps):
    """What a sharpness cap reads: a Hessian monitor (no fit-end measurement), the EoS monitor, LRAdaptation."""
    monitor = HessianEigenMonitor(k=1, every_n_steps=every_n_steps, at_fit_end=False)
    return [monitor, EdgeOfStabilityMonitor(), LRAdaptation()]


def test_a_capped_adam_run_resumes_bit_for_bit(tmp_path):
    """The preconditioned measurement's warm start is in the checkpoint: a resumed run measures the same
    preconditioned sharpness as the uninterrupted one, so the cap, and training, are the same."""

    class Capped(DigitsClassifier):
        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=0.05)
            return {
                "optimizer": optimizer,
                "lr_scheduler": SharpnessCappedLR(optimizer, 0.05).lightning_config(),
            }

    def callbacks():
        return _cap_callbacks(every_n_steps=3)

    L.seed_everything(0)
    reference = Capped(n=128)
    resumed = copy.deepcopy(reference)
    straight = logged(fit(tmp_path / "straight", reference, 12, callbacks()))
    first = fit(tmp_path / "first", copy.deepcopy(resumed), 5, callbacks())
    first.save_checkpoint(tmp_path / "five.ckpt")
    second = trainer(
        tmp_path / "second", max_steps=12, callbacks=callbacks(), logger=CSVLogger(tmp_path / "second")
    )
    second.fit(resumed, ckpt_path=tmp_path / "five.ckpt")
    after = logged(second)
    assert sorted(after["eos/preconditioned_sharpness"]) == [6, 9, 12]
    for step in (6, 9, 12):
        assert after["eos/preconditioned_sharpness"][step] == straight["eos/preconditioned_sharpness"][step]
    assert {s: after["cap/lr"][s] for s in range(6, 12)} == {s: straight["cap/lr"][s] for s in range(6, 12)}
    assert max(straight["cap/capped"].values()) == 1.0  # the cap binds: a different measurement would show
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


class _CappedCosine(DigitsClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=2.0, momentum=0.5)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=12)
        scheduler = SharpnessCappedLR(optimizer, 0.5, base=cosine)
        return {"optimizer": optimizer, "lr_scheduler": scheduler.lightning_config()}


@pytest.mark.parametrize(
    ("model", "adaptation", "recorded"),
    [
        (_CappedCosine, LRAdaptation(), "SharpnessCappedLR(fraction=0.5, base=CosineAnnealingLR)"),
        (
            DigitsClassifier,
            LRAdaptation(dal_factory(p=1.0, max_lr=5.0)),
            "DriftAdaptiveLR(p=1.0, max_lr=5.0, window=None, warmup_steps=0)",
        ),
    ],
    ids=["cap", "dal"],
)
def test_the_logged_settings_name_the_scheduler_served_with_its_arguments(
    tmp_path, model, adaptation, recorded
):
    """A cap returned from configure_optimizers was recorded as scheduler None, and an installed scheduler
    as its factory's repr (under LightningCLI with memory addresses, different in every run)."""
    L.seed_everything(0)
    callbacks = [HessianEigenMonitor(k=1, every_n_steps=2), EdgeOfStabilityMonitor(), adaptation]
    t = fit(tmp_path, model(n=128, lr=0.1), 2, callbacks)
    hparams = yaml.safe_load((Path(t.logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["pf_lightning"]["LRAdaptation"]["scheduler"] == recorded


def test_lr_adaptation_alone_logs_its_settings(tmp_path):
    """Only the first Hessian monitor logged the callbacks' settings: with LRAdaptation alone they reached no
    logger (an outside trial)."""
    L.seed_everything(0)
    t = fit(tmp_path, DigitsClassifier(n=128, lr=0.1), 2, [LRAdaptation(dal_factory(p=1.0, max_lr=5.0))])
    hparams = yaml.safe_load((Path(t.logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["pf_lightning"]["LRAdaptation"]["scheduler"] == (
        "DriftAdaptiveLR(p=1.0, max_lr=5.0, window=None, warmup_steps=0)"
    )


class _LateRestore(SingleDeviceStrategy):
    """Restores the checkpoint after on_fit_start, as ModelParallelStrategy (FSDP2) does."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


@pytest.mark.parametrize("late", [False, True], ids=["restored before fit start", "after (FSDP2)"])
@pytest.mark.parametrize("kind", ["cap", "dal"])
def test_a_run_resumed_from_a_step_checkpoint_takes_the_step_lightning_had_not_taken(tmp_path, kind, late):
    """ModelCheckpoint(every_n_train_steps=5) saves at step 5's batch end, before Lightning steps these
    schedulers with step 5's measurement: the resumed run takes that step at its start, so its rates
    (the capped cosine's, the DAL window's) and parameters are the uninterrupted run's. Before, it kept
    step 0's cap until step 10 and the cosine lagged one step; DAL ran step 6 at the rate of step 4. A
    strategy that restores the checkpoint after on_fit_start (FSDP2's) lost the callback's state: an outside
    trial's DAL ran its first resumed step 20% fast, and a capped cosine stayed a step behind."""

    def callbacks():
        if kind == "dal":
            return [LRAdaptation(dal_factory(p=1.0, max_lr=50.0, window=(0, 8)), every_n_steps=5)]
        return _cap_callbacks(every_n_steps=5)

    L.seed_everything(0)
    if kind == "dal":
        reference = DigitsClassifier(n=128, lr=0.1)
    else:
        reference = _CappedCosine(n=128)
    resumed = copy.deepcopy(reference)
    saving = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}"
    )
    start = 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the edge warning
        straight = logged(
            fit(tmp_path / "straight", reference, 12, [*callbacks(), saving], enable_checkpointing=True)
        )
        strategy = {"strategy": _LateRestore(torch.device("cpu"))} if late else {}
        second = trainer(
            tmp_path / "second",
            max_steps=12,
            callbacks=callbacks(),
            logger=CSVLogger(tmp_path / "second"),
            **strategy,
        )
        second.fit(resumed, ckpt_path=tmp_path / "ckpt" / f"step={start}.ckpt")
    after = logged(second)
    rate = "dal/lr" if kind == "dal" else "cap/lr"
    later = range(start + 1, 12)
    assert {s: after[rate][s] for s in later} == {s: straight[rate][s] for s in later}
    assert len(set(straight[rate].values())) >= 3  # the rate moves: a step lost would show
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_resumed_run_holds_the_value_its_checkpoint_says_the_monitor_held(tmp_path):
    """A measurement after the scheduler's last step (at an epoch end, at fit end) is in Lightning's
    callback_metrics only, which a resumed fit starts without: the checkpoint's record of it steps the
    scheduler, not the older value the scheduler holds. Here the record says 40: step 6 is capped at
    0.5 * (2 + 2 * 0.5)/40 = 0.0375, not at step 0's sharpness."""

    def callbacks():
        return _cap_callbacks(every_n_steps=100)

    L.seed_everything(0)
    model = _CappedCosine(n=128)
    first = fit(tmp_path / "first", model, 5, callbacks())
    first.save_checkpoint(tmp_path / "five.ckpt")
    state = torch.load(tmp_path / "five.ckpt", weights_only=False)
    (key,) = (k for k in state["callbacks"] if k.startswith("LRAdaptation"))
    assert set(state["callbacks"][key]["fed"]) == {"cap/sharpness"}
    state["callbacks"][key]["fed"]["cap/sharpness"] = 40.0
    torch.save(state, tmp_path / "edited.ckpt")
    second = trainer(
        tmp_path / "second", max_steps=8, callbacks=callbacks(), logger=CSVLogger(tmp_path / "second")
    )
    second.fit(model, ckpt_path=tmp_path / "edited.ckpt")
    assert logged(second)["cap/lr"][6] == pytest.approx(0.5 * 3.0 / 40)


def test_a_reused_edge_monitor_no_longer_feeds_the_lr_adaptation_of_an_earlier_trainer(tmp_path):
    """LRAdaptation listens to the EdgeOfStabilityMonitor for one fit: reused without it in another Trainer,
    the monitor stepped the old cap (cap/* logged into a run that has no cap, the old scheduler moved)."""
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.5)

    def configure():
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        return {"optimizer": opt, "lr_scheduler": SharpnessCappedLR(opt, 0.5).lightning_config()}

    model.configure_optimizers = configure
    monitor, eos, adaptation = _cap_callbacks(every_n_steps=2)
    fit(tmp_path / "a", model, 4, [monitor, eos, adaptation])
    cap = adaptation.schedulers[0]
    state = cap.state_dict()
    t = fit(tmp_path / "b", DigitsClassifier(n=128, lr=0.5), 4, [monitor, eos])
    metrics = logged(t)
    assert sorted(metrics["eos/sharpness"]) == [0, 2, 4]
    assert not any(key.startswith("cap/") for key in metrics)
    assert cap.state_dict() == state


def test_a_sharpness_measured_at_an_epoch_end_caps_the_next_step(tmp_path):
    """An every_n_epochs measurement comes after Lightning has stepped the cap for the epoch's last step:
    the first step of the next epoch ran at the previous cap (an outside trial: 1.61 at 2.55x the edge, where
    the cap from the new sharpness was 0.569), the new cap from the step after."""
    L.seed_everything(0)
    model = DigitsClassifier(n=128, batch_size=32, lr=3.0)

    def configure():
        optimizer = torch.optim.SGD(model.parameters(), lr=3.0)
        return {"optimizer": optimizer, "lr_scheduler": SharpnessCappedLR(optimizer, 0.9).lightning_config()}

    model.configure_optimizers = configure
    used = {}

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            used[trainer.global_step] = optimizer.param_groups[0]["lr"]

    monitor = HessianEigenMonitor(k=1, every_n_steps=None, every_n_epochs=1, tol=1e-4, at_fit_end=False)
    t = fit(tmp_path, model, 12, [monitor, EdgeOfStabilityMonitor(), LRAdaptation(), Record()])
    sharpness = logged(t)["eos/sharpness"]
    assert sorted(sharpness) == [0, 4, 8, 12]  # fit start, then each epoch's end (4 batches each)
    for step in range(12):
        latest = sharpness[max(s for s in sharpness if s <= step)]
        assert used[step] == pytest.approx(min(3.0, 0.9 * 2 / latest), rel=1e-6), step


def test_a_scheduler_replaced_by_stochastic_weight_averaging_is_no_longer_measured_or_logged(tmp_path):
    """SWA puts its SWALR in place of the schedulers at its first epoch: dal/lr went on being logged at
    DAL's last rate while the optimizer ran at SWA's, and ||Hg||/||g|| was measured every step for nothing."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    L.seed_everything(0)
    model = DigitsClassifier(n=128, batch_size=32, lr=0.1)
    model.configure_optimizers = functools.partial(_configured("dal"), model)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1)  # from epoch 1
    with pytest.warns(RuntimeWarning, match="DriftAdaptiveLR is no longer among the trainer's schedulers"):
        t = fit(tmp_path, model, -1, [LRAdaptation(), swa], max_epochs=3)
    m = logged(t)
    assert sorted(m["dal/lr"]) == [0, 1, 2, 3]  # epoch 0 (4 batches): DAL's rates; SWALR's from step 4
    assert sorted(m["dal/hg_ratio"]) == [0, 1, 2, 3, 4]  # the last for step 4, measured before the swap
    assert not [k for k in t.callback_metrics if k.startswith("dal/")]  # dal/lr held DAL's last rate


def test_a_group_added_at_an_epoch_start_takes_its_first_step_at_the_capped_rate(tmp_path):
    """BaseFinetuning adds a group at an epoch's start: the cap adopted it only at its own next step, so the
    group's first optimizer step ran at the rate it was added with (5.5x its cap in a review's example)."""
    L.seed_everything(0)
    model = DigitsClassifier(n=128, batch_size=32, lr=3.0)
    head = model.net[-1]
    head.requires_grad_(False)

    def configure():
        body = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(body, lr=3.0)
        return {"optimizer": optimizer, "lr_scheduler": SharpnessCappedLR(optimizer, 0.9).lightning_config()}

    model.configure_optimizers = configure
    used = {}

    class Unfreeze(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                head.requires_grad_(True)
                trainer.optimizers[0].add_param_group({"params": list(head.parameters()), "lr": 3.0})

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            used[trainer.global_step] = [group["lr"] for group in optimizer.param_groups]

    monitor = HessianEigenMonitor(k=1, every_n_steps=2, tol=1e-4, at_fit_end=False)
    t = fit(tmp_path, model, 8, [monitor, EdgeOfStabilityMonitor(), LRAdaptation(), Unfreeze()])
    sharpness = logged(t)["eos/sharpness"]
    assert [len(used[step]) for step in range(8)] == [1] * 4 + [2] * 4
    for step in range(4, 8):
        cap = 0.9 * 2 / sharpness[max(s for s in sharpness if s <= step)]
        assert cap < 3.0 and used[step] == pytest.approx([cap, cap], rel=1e-6), step
