"""``max_work_fraction``: measuring work counted in sample-gradients, and the schedule it gives.

A Hessian-vector product on ``p`` probe samples is charged ``2p`` (``PRODUCT_COST``), a gradient ``p``,
a forward pass ``p / 3``; training is charged one per sample of every micro-batch. The schedule is then
a function of the product counts alone: replayed here from the logged ``hessian/n_hvp``, and the same
in two runs.
"""

import lightning as L
import pytest
import torch
from cases import make_case
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import DigitsClassifier, digits, logged, trainer
from torch.utils.data import DataLoader

from pf_lightning import HessianEigenMonitor, HessianOperator, hessian_eigenpairs
from pf_lightning.curvature import PRODUCT_COST, WorkMeter

BATCH, PROBE, FRACTION = 32, 8, 0.5


def test_a_meter_charges_products_gradients_and_forward_passes_by_probe_samples():
    case = make_case("mlp")
    samples = sum(len(b[0]) for b in case.batches)
    with WorkMeter() as outer:
        result = hessian_eigenpairs(case.model, case.loss_fn, case.batches, k=2, tol=1e-6)
        assert outer.work == PRODUCT_COST * result.n_hvp * samples
        with WorkMeter() as inner, HessianOperator(case.model, case.loss_fn, case.batches) as op:
            op.gradient()
            op.loss()
            op.matmat(torch.ones(op.n, 3, dtype=torch.float64))
    assert inner.work == pytest.approx((1 + 1 / 3 + 3 * PRODUCT_COST) * samples, rel=1e-12)
    assert outer.work == pytest.approx(PRODUCT_COST * result.n_hvp * samples + inner.work, rel=1e-12)
    with HessianOperator(case.model, case.loss_fn, case.batches) as op:  # no meter open: nothing counted
        op.gradient()
    assert outer.work == pytest.approx(PRODUCT_COST * result.n_hvp * samples + inner.work, rel=1e-12)


def _fit(tmp_path):
    L.seed_everything(0)
    monitor = HessianEigenMonitor(
        k=1, every_n_steps=1, probe=PROBE, max_work_fraction=FRACTION, at_fit_end=False, stderr_every=None
    )
    t = trainer(tmp_path, max_steps=120, callbacks=[monitor], logger=CSVLogger(tmp_path))
    with pytest.warns(RuntimeWarning, match="max_work_fraction=0.5: postponed"):
        t.fit(DigitsClassifier(n=64, batch_size=BATCH))
    return monitor, logged(t)


def test_the_schedule_is_the_work_rule_and_the_same_in_two_runs(tmp_path):
    monitor, metrics = _fit(tmp_path / "a")
    steps = [h["step"] for h in monitor.history]
    # Replay: after each measurement, the next due step s is measured once the work spent so far plus
    # the last measurement's fits in FRACTION of the samples trained on (BATCH per step).
    work = [PRODUCT_COST * h["n_hvp"] * PROBE for h in monitor.history]
    expected, spent = [0], work[0]
    for i in range(1, len(work)):
        step = expected[-1] + 1
        while spent + work[i - 1] > FRACTION * BATCH * step:
            step += 1
        expected.append(step)
        spent += work[i]
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
