"""``max_time_fraction``: the measurement schedule it gives, on a simulated clock.

A fake clock replaces ``time.perf_counter`` in the monitor and its budget: every training step costs
1 s and every measurement 4 s (spent in a listener, so the test also shows that a listener's time is
charged to the measurement). The cap bounds the measuring time by a fraction of the rest of the fit's
time, so with 0.5 the schedule has a closed form: after the cold measurement at fit start (4 s), the
next one waits until 4 + 4 <= 0.5 x (steps so far), i.e. step 16; from then on one measurement per 8
steps keeps measuring at exactly half the training time.
"""

import types

import lightning as L
import pytest
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_models import DigitsClassifier, logged, trainer

from pf_lightning import HessianEigenMonitor
from pf_lightning.callbacks import _budget, hessian_monitor
from pf_lightning.callbacks._budget import TimeBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StepCost(Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args) -> None:
        self.clock.now += 1.0


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    for module in (_budget, hessian_monitor):
        monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=fake))
    return fake


def _monitor(clock, fail=False, **kwargs):
    monitor = HessianEigenMonitor(k=1, every_n_steps=1, probe=32, max_time_fraction=0.5, **kwargs)

    def four_seconds(trainer, module, result):
        clock.now += 4.0
        if fail:
            raise RuntimeError("listener broke")

    monitor.add_listener(four_seconds)
    return monitor


def test_the_schedule_keeps_measuring_at_the_fraction(tmp_path, clock):
    L.seed_everything(0)
    monitor = _monitor(clock, at_fit_end=False)
    t = trainer(tmp_path, max_steps=40, callbacks=[StepCost(clock), monitor], logger=CSVLogger(tmp_path))
    with pytest.warns(RuntimeWarning, match="max_time_fraction=0.5: postponed"):
        t.fit(DigitsClassifier(n=64, batch_size=32))
    assert [h["step"] for h in monitor.history] == [0, 16, 24, 32, 40]
    metrics = logged(t)
    # From the fit's second measurement on (after the first, the rest of the fit is only its set-up);
    # at a postponed step s, the ratio that postpones it: 4 s per measurement so far over s s of training.
    postponed = [s for s in range(1, 40) if s not in (16, 24, 32)]
    assert sorted(metrics["hessian/postponed"]) == postponed
    measured = {16: 0.5, 24: 0.5, 32: 0.5, 40: 0.5}
    waiting = {s: 4 * sum(m < s for m in (0, 16, 24, 32)) / s for s in postponed}
    assert metrics["hessian/time_fraction"] == pytest.approx(measured | waiting, rel=1e-12)


def test_without_a_cap_every_due_step_is_measured_and_the_fraction_is_logged(tmp_path, clock):
    L.seed_everything(0)
    monitor = _monitor(clock, at_fit_end=False)
    monitor.max_time_fraction = None
    t = trainer(tmp_path, max_steps=4, callbacks=[StepCost(clock), monitor], logger=CSVLogger(tmp_path))
    t.fit(DigitsClassifier(n=64, batch_size=32))
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3, 4]
    fractions = logged(t)["hessian/time_fraction"]
    # After step s: 4 (s + 1) s measuring against s s of training.
    assert fractions == pytest.approx({s: 4 * (s + 1) / s for s in range(1, 5)})
    assert "hessian/postponed" not in logged(t)


def test_a_resumed_fit_starts_a_fresh_window(tmp_path, clock):
    """The interrupted process's measuring time is not held against the new process's wall time (it
    was: the resumed fit then postponed every measurement until its own time caught up)."""
    L.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=24)
    first = _monitor(clock, at_fit_end=False)
    callbacks = [StepCost(clock), first, checkpoints]
    trainer(tmp_path, max_steps=24, callbacks=callbacks, enable_checkpointing=True).fit(
        DigitsClassifier(n=64, batch_size=32)
    )
    assert [h["step"] for h in first.history] == [0, 16, 24]
    clock.now += 10_000.0  # the process that resumes starts much later
    resumed = _monitor(clock, at_fit_end=False)
    trainer(tmp_path, max_steps=48, callbacks=[StepCost(clock), resumed], enable_checkpointing=True).fit(
        DigitsClassifier(n=64, batch_size=32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    # The fit's first measurement is free (the first due step); then 4 + 4 <= 0.5 x (steps since the
    # resume) at step 24 + 16 = 40, and 4 + 8 <= 0.5 x 24 at step 48.
    assert [h["step"] for h in resumed.history] == [0, 16, 24, 25, 40, 48]
    assert first.measuring_seconds == 3 * 4.0  # the listener's 4 s each (the solver takes no fake time)
    assert resumed.measuring_seconds == 6 * 4.0  # the checkpoint's total, and this fit's three


def test_a_second_fit_of_the_same_monitor_starts_a_fresh_window(tmp_path, clock):
    monitor = _monitor(clock, at_fit_end=False)
    for _ in range(2):  # another Trainer: another run, measured at the same steps
        L.seed_everything(0)
        trainer(tmp_path, max_steps=24, callbacks=[StepCost(clock), monitor]).fit(
            DigitsClassifier(n=64, batch_size=32)
        )
        assert [h["step"] for h in monitor.history] == [0, 16, 24]


def test_a_failing_listener_is_charged_like_a_working_one(tmp_path, clock):
    L.seed_everything(0)
    monitor = _monitor(clock, fail=True, at_fit_end=False)
    t = trainer(tmp_path, max_steps=24, callbacks=[StepCost(clock), monitor], logger=CSVLogger(tmp_path))
    with pytest.warns(RuntimeWarning, match="listener broke"):
        t.fit(DigitsClassifier(n=64, batch_size=32))
    assert [h["step"] for h in monitor.history] == [0, 16, 24]
    assert sorted(logged(t)["hessian/listener_failed"]) == [0, 16, 24]


def test_budget_decisions(clock):
    budget = TimeBudget()
    assert not budget.over(0.1)  # before a fit: no window
    budget.start_fit()
    assert not budget.over(0.1)  # nothing to expect before the first measurement: measure
    budget.charge(2.0)
    clock.now += 2.0 + 4.0  # the measurement, then 4 s of training
    assert budget.overhead() is None  # one measurement: the ratio would describe the set-up only
    assert budget.over(0.5)  # 2 + 2 > 0.5 x 4
    clock.now += 4.0
    assert not budget.over(0.5)  # 2 + 2 <= 0.5 x 8
    assert not budget.over(None)
    budget.charge(2.0)
    clock.now += 2.0
    assert budget.overhead() == 0.5  # 4 s measuring, 8 s of the rest
    budget.start_fit()
    assert budget.total == 4.0 and budget.overhead() is None and not budget.over(0.01)


def test_a_step_postponed_stays_postponed_when_the_fit_is_continued(tmp_path, clock):
    """Step 20 is postponed (4 + 4 + 4 > 0.5 x 20), at its batch end and again at the fit end. Continued on
    the same Trainer, the new fit's start is step 20 once more: it was measured there (the continued fit's
    time window is fresh), a step logged postponed and measured. The next due step is the fit's first."""
    monitor = _monitor(clock)
    t = trainer(tmp_path, max_steps=20, callbacks=[StepCost(clock), monitor], logger=CSVLogger(tmp_path))
    L.seed_everything(0)
    model = DigitsClassifier(n=64, batch_size=32)
    t.fit(model)
    assert [h["step"] for h in monitor.history] == [0, 16] and 20 in logged(t)["hessian/postponed"]
    t.fit_loop.epoch_loop.max_steps = 24
    t.fit(model)
    assert [h["step"] for h in monitor.history][:3] == [0, 16, 21]
