"""``max_work_fraction``: measuring work counted in sample-gradients, and the schedule it gives.

A Hessian-vector product on ``p`` probe samples is charged ``2p`` (``PRODUCT_COST``), a gradient ``p``
(double backward's gradient graph of a batch too), a forward pass ``p / 3``; training is charged one per sample of every micro-batch. The schedule is then
a function of the product counts alone: replayed here from the logged ``hessian/n_hvp``, and the same
in two runs.
"""

import warnings

import lightning as L
import pytest
import torch
from cases import make_case
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import DigitsClassifier, digits, logged, trainer
from torch.utils.data import DataLoader, TensorDataset

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor, HessianOperator, hessian_eigenpairs
from pf_lightning.curvature import PRODUCT_COST, WorkMeter

BATCH, PROBE, FRACTION = 32, 8, 0.5


def test_a_meter_charges_products_gradients_and_forward_passes_by_probe_samples():
    """Double backward's gradient graphs count as a gradient each (one per batch, built by the first
    product; they went uncounted, so a measurement's work was 2 n_hvp p where it runs (2 n_hvp + 1) p)."""
    case = make_case("mlp")
    samples = sum(len(b[0]) for b in case.batches)
    with WorkMeter() as outer:
        result = hessian_eigenpairs(case.model, case.loss_fn, case.batches, k=2, tol=1e-6)
        measured = (PRODUCT_COST * result.n_hvp + 1) * samples
        assert result.info["hvp"] == "double_backward" and outer.work == pytest.approx(measured, rel=1e-12)
        with WorkMeter() as inner, HessianOperator(case.model, case.loss_fn, case.batches) as op:
            op.gradient()  # before any product: a backward pass per batch
            op.loss()
            op.matmat(torch.ones(op.n, 3, dtype=torch.float64))  # builds the graphs: a gradient more
            op.gradient()  # read off the graphs: no pass
    assert inner.work == pytest.approx((1 + 1 / 3 + 1 + 3 * PRODUCT_COST) * samples, rel=1e-12)
    assert outer.work == pytest.approx(measured + inner.work, rel=1e-12)
    with HessianOperator(case.model, case.loss_fn, case.batches) as op:  # no meter open: nothing counted
        op.gradient()
    assert outer.work == pytest.approx(measured + inner.work, rel=1e-12)
    with WorkMeter() as finite:
        fd = hessian_eigenpairs(
            case.model, case.loss_fn, case.batches, k=2, tol=1e-6, hvp="finite_difference"
        )
    assert finite.work == pytest.approx(PRODUCT_COST * fd.n_hvp * samples, rel=1e-12)  # no graph to build


def _budgeted() -> HessianEigenMonitor:
    return HessianEigenMonitor(
        k=1, every_n_steps=1, probe=PROBE, max_work_fraction=FRACTION, at_fit_end=False, stderr_every=None
    )


def _fit(tmp_path, accumulate=1):
    L.seed_everything(0)
    monitor = _budgeted()
    t = trainer(
        tmp_path,
        max_steps=120,
        callbacks=[monitor],
        logger=CSVLogger(tmp_path),
        accumulate_grad_batches=accumulate,
    )
    with pytest.warns(RuntimeWarning, match="max_work_fraction=0.5: postponed"):
        t.fit(DigitsClassifier(n=64 * accumulate, batch_size=BATCH))
    return monitor, logged(t)


def _replay(history: list[dict], per_step: int) -> tuple[list[int], list[float]]:
    """The steps the work rule measures: after each measurement, the next due step s is measured once the
    work spent so far plus the last measurement's fits in FRACTION of the samples trained on (``per_step``
    a step); a measurement's work its products and its probe batch's gradient graph."""
    work = [(PRODUCT_COST * h["n_hvp"] + 1) * PROBE for h in history]
    expected, spent = [0], work[0]
    for i in range(1, len(work)):
        step = expected[-1] + 1
        while spent + work[i - 1] > FRACTION * per_step * step:
            step += 1
        expected.append(step)
        spent += work[i]
    return expected, work


def test_the_schedule_is_the_work_rule_and_the_same_in_two_runs(tmp_path):
    monitor, metrics = _fit(tmp_path / "a")
    steps = [h["step"] for h in monitor.history]
    expected, work = _replay(monitor.history, BATCH)
    assert steps == expected and len(steps) >= 4
    assert set(metrics["hessian/postponed"]) == set(range(1, 121)) - set(steps)
    for i, step in enumerate(steps[1:], start=2):
        fraction = metrics["hessian/work_fraction"][step]
        assert fraction == pytest.approx(sum(work[:i]) / (BATCH * step))
        # Within the cap, but for a measurement dearer than the one it was expected to cost like.
        assert fraction <= FRACTION + max(0.0, work[i - 1] - work[i - 2]) / (BATCH * step) + 1e-12
    # At a postponed step the ratio that postponed it: the work so far, one more like the last past the cap.
    for step in sorted(metrics["hessian/postponed"]):
        done = [w for s, w in zip(steps, work, strict=True) if s < step]
        assert metrics["hessian/work_fraction"][step] == pytest.approx(sum(done) / (BATCH * step))
        assert sum(done) + done[-1] > FRACTION * BATCH * step
    again, _ = _fit(tmp_path / "b")
    assert [h["step"] for h in again.history] == steps


def test_a_step_postponed_under_gradient_accumulation_stays_postponed(tmp_path):
    """Three micro-batches a step: the later micro-batches of a postponed step (still at its global_step)
    measured it once their samples tipped the budget, so the step was logged postponed and measured, with
    two work fractions. The schedule is the work rule at the step's own micro-batch."""
    monitor, metrics = _fit(tmp_path, accumulate=3)
    steps = [h["step"] for h in monitor.history]
    assert steps == _replay(monitor.history, 3 * BATCH)[0] and len(steps) >= 4
    assert not set(metrics["hessian/postponed"]) & set(steps)


class _Ordered(DigitsClassifier):
    """The same batches in the same order every epoch: a resumed run trains exactly as the uninterrupted one."""

    def train_dataloader(self):
        x, y = digits(self.hparams.n)
        return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def test_a_resumed_or_continued_run_measures_the_uninterrupted_run_s_steps(tmp_path):
    """The budget is the run's: resumed from a checkpoint (which holds it) or continued on the same Trainer,
    the fit measures the steps of the uninterrupted run. Each fit opened a fresh window: its first due step
    was measured at once (a step the uninterrupted run postponed), and the run's later steps shifted."""
    L.seed_everything(0)
    whole = _budgeted()
    with pytest.warns(RuntimeWarning, match="postponed"):
        trainer(tmp_path / "whole", max_steps=120, callbacks=[whole]).fit(_Ordered(n=64, batch_size=BATCH))
    steps = [h["step"] for h in whole.history]
    assert 60 not in steps and len([s for s in steps if s > 60]) >= 2

    L.seed_everything(0)
    ckpt = ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=60, save_top_k=-1)
    first = trainer(
        tmp_path / "first", max_steps=60, callbacks=[_budgeted(), ckpt], enable_checkpointing=True
    )
    with pytest.warns(RuntimeWarning, match="postponed"):
        first.fit(_Ordered(n=64, batch_size=BATCH))
    resumed = _budgeted()
    with pytest.warns(RuntimeWarning, match="postponed"):
        trainer(tmp_path / "resumed", max_steps=120, callbacks=[resumed]).fit(
            _Ordered(n=64, batch_size=BATCH), ckpt_path=tmp_path / "ckpt" / "step=60.ckpt"
        )
    assert [h["step"] for h in resumed.history] == steps

    L.seed_everything(0)
    continued, model = _budgeted(), _Ordered(n=64, batch_size=BATCH)
    t = trainer(tmp_path / "continued", max_steps=60, callbacks=[continued])
    with pytest.warns(RuntimeWarning, match="postponed"):
        t.fit(model)
    t.fit_loop.epoch_loop.max_steps = 120
    t.fit(model)
    assert [h["step"] for h in continued.history] == steps


class _Untensored(DigitsClassifier):
    """Batches of Python lists: no tensor to count samples from."""

    def train_dataloader(self):
        x, y = digits(self.hparams.n)
        rows = list(zip(x.tolist(), y.tolist(), strict=True))
        return DataLoader(rows, batch_size=16, collate_fn=lambda items: {"rows": items})

    def training_step(self, batch, batch_idx):
        x = torch.tensor([a for a, _ in batch["rows"]])
        y = torch.tensor([b for _, b in batch["rows"]])
        return self.loss((x, y))


def test_batches_whose_samples_cannot_be_counted_are_named_with_the_fix(tmp_path):
    x, y = digits(8)
    monitor = HessianEigenMonitor(
        k=1, every_n_steps=1, probe=[(x, y)], loss_fn=lambda m, b: m.loss(b), max_work_fraction=0.05
    )
    t = trainer(tmp_path, max_steps=2, callbacks=[monitor])
    with pytest.raises(MisconfigurationException, match="max_work_fraction counts the samples"):
        t.fit(_Untensored(n=64))


def test_a_run_resumed_with_a_cap_it_did_not_have_starts_an_empty_window(tmp_path):
    """Without the cap the measurements' work was kept, not the training's: resumed with a cap, that window
    (all the earlier measurements against no training) postponed every step until the samples trained
    since caught up with it. Work is counted only under the cap: the resumed run measures as a fresh window
    does, its first due step at once."""
    L.seed_everything(0)
    plain = HessianEigenMonitor(k=1, every_n_steps=1, probe=PROBE, at_fit_end=False, stderr_every=None)
    ckpt = ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=30, save_top_k=-1)
    first = trainer(tmp_path / "first", max_steps=30, callbacks=[plain, ckpt], enable_checkpointing=True)
    first.fit(_Ordered(n=64, batch_size=BATCH))
    capped = _budgeted()
    with pytest.warns(RuntimeWarning, match="postponed"):
        trainer(tmp_path / "resumed", max_steps=90, callbacks=[capped]).fit(
            _Ordered(n=64, batch_size=BATCH), ckpt_path=tmp_path / "ckpt" / "step=30.ckpt"
        )
    resumed = [h["step"] for h in capped.history if h["step"] > 30]
    assert resumed[0] == 31 and len(resumed) >= 3


@pytest.mark.parametrize(
    ("cap", "options", "named"),
    [
        ({"max_work_fraction": 0.05}, {"proxies": True}, "the proxies"),
        ({"max_time_fraction": 0.05}, {"critical_every_n_steps": 2}, "the critical search"),
        ({}, {"proxies": True, "critical_every_n_steps": 2}, None),
    ],
)
def test_the_edge_monitors_per_step_measurements_under_a_cap_are_said_to_be_outside_it(
    tmp_path, cap, options, named
):
    """The EdgeOfStabilityMonitor's proxies and critical search run at their own cadence, which neither cap
    controls or counts: an outside trial's fit under max_work_fraction=0.05 with proxies every step logged a
    work fraction of 0.34 where the measuring work was 4.7 times the training's, in silence."""
    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, **cap)
    eos = EdgeOfStabilityMonitor(batch_sharpness=False, **options)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=2, callbacks=[monitor, eos]).fit(DigitsClassifier(n=64, batch_size=BATCH))
    said = [str(w.message) for w in record if "run at their own cadence" in str(w.message)]
    if named is None:
        assert not said
    else:
        assert len(said) == 1 and named in said[0] and next(iter(cap)) in said[0], said
