"""Faults around checkpoints and loggers: an interrupted fit resumed from its last checkpoint, corrupted
or foreign callback and scheduler states, and W&B absent, offline or disabled.

Policies under test: an interrupted run resumes to the history of an uninterrupted one; a callback handed
a state it cannot use warns once and starts fresh (its state is an observation of training); a scheduler
raises a ``ValueError`` that names the bad entry (its state sets the learning rate).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_models import DigitsClassifier, logged, trainer

from pf_lightning import DriftAdaptiveLR, EdgeOfStabilityMonitor, HessianEigenMonitor, SharpnessCappedLR
from pf_lightning.callbacks import LRAdaptation
from pf_lightning.linalg import EigenResult

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def _loss(module, batch):
    return module.loss(batch)


# -- (a) an interrupted fit, resumed ---------------------------------------------------------


class _Interrupt(Exception):
    pass


def _run(root, max_steps, *, loss_fn=_loss, listener=None, ckpt_path=None, on_error="raise"):
    """12 full-batch steps; eigenpairs (by finite differences) every 3 steps, a checkpoint every 4."""
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1)
    monitor = HessianEigenMonitor(
        k=2, every_n_steps=3, loss_fn=loss_fn, hvp="finite_difference", tol=1e-4, on_error=on_error
    )
    if listener is not None:
        monitor.add_listener(listener)
    eos = EdgeOfStabilityMonitor()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=4, save_top_k=-1, save_last=True)
    t = trainer(root, max_steps=max_steps, callbacks=[monitor, eos, checkpoint], enable_checkpointing=True)
    t.fit(model, ckpt_path=ckpt_path)
    return monitor, eos, model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("straight"), 12)


def _fail_at_step_9(error):
    calls = {"n": 0}

    def loss_fn(module, batch):
        if module.trainer.global_step == 9:
            calls["n"] += 1
            if calls["n"] == 4:  # mid-measurement: the parameters are displaced by a finite difference
                raise error("interrupted")
        return module.loss(batch)

    return loss_fn


def _listener_failing_at_step_9(trainer, pl_module, result):
    if trainer.global_step == 9:
        raise _Interrupt("a listener failed")


@pytest.mark.parametrize("fault", ["loss_fn", "listener", "keyboard_interrupt"])
def test_a_fit_interrupted_during_a_measurement_resumes_to_the_uninterrupted_history(
    tmp_path, uninterrupted, fault
):
    straight_monitor, straight_eos, straight_model = uninterrupted
    if fault == "keyboard_interrupt":
        # Never swallowed, even with on_error="skip": Lightning turns it into a graceful exit.
        handler = signal.getsignal(signal.SIGINT)
        try:
            with pytest.raises(SystemExit):
                _run(tmp_path, 12, loss_fn=_fail_at_step_9(KeyboardInterrupt), on_error="skip")
        finally:
            signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl+C while it shuts down
    else:
        kwargs = (
            {"loss_fn": _fail_at_step_9(_Interrupt)}
            if fault == "loss_fn"
            else {"listener": _listener_failing_at_step_9}
        )
        with pytest.raises(_Interrupt):
            _run(tmp_path, 12, **kwargs)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=3-step=4.ckpt",
        "epoch=7-step=8.ckpt",
        "last.ckpt",
    ]
    monitor, eos, model = _run(tmp_path, 12, ckpt_path="last")
    assert [h["step"] for h in monitor.history] == [0, 3, 6, 9, 12]
    for resumed, straight in zip(monitor.history, straight_monitor.history, strict=True):
        assert resumed["eigenvalues"] == straight["eigenvalues"]  # bit for bit
    keys = ("step", "eigenvalues", "eos/sharpness", "eos/ratio", "pf/log_growth_1", "eos/sharpening_slope")
    assert [{k: h.get(k) for k in keys} for h in eos.history] == [
        {k: h.get(k) for k in keys} for h in straight_eos.history
    ]
    for p, q in zip(model.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(p, q)


def _interrupted_then_resumed(tmp_path, failing, error, max_steps, **monitor_kwargs):
    """A fit whose ``failing`` loss raises ``error`` (an OnExceptionCheckpoint on the way out), then the fit
    resumed from that checkpoint: the checkpoint's global step and the resumed monitor's measured steps."""

    def run(ckpt_path=None):
        L.seed_everything(0)
        monitor = HessianEigenMonitor(k=1, every_n_steps=2, loss_fn=failing, **monitor_kwargs)
        saver = OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")
        trainer(tmp_path, max_steps=max_steps, callbacks=[monitor, saver], enable_checkpointing=True).fit(
            DigitsClassifier(n=64), ckpt_path=ckpt_path
        )
        return monitor

    with pytest.raises(error):
        run()
    checkpoint = tmp_path / "on_exception.ckpt"
    step = torch.load(checkpoint, weights_only=False)["global_step"]
    return step, [h["step"] for h in run(str(checkpoint)).history]


def test_a_first_measurement_that_raised_is_taken_on_resume(tmp_path):
    """``at_fit_start=False``: the first due measurement (step 2) raises, the exception checkpoint is
    written at step 2, and the resumed fit measures at step 2 before training on."""

    def failing(module, batch):
        if module.trainer.global_step == 2 and not module.trainer.ckpt_path:
            raise _Interrupt("first measurement")
        return module.loss(batch)

    resumed = _interrupted_then_resumed(
        tmp_path, failing, _Interrupt, 4, at_fit_start=False, on_error="raise"
    )
    assert resumed == (2, [2, 4])


def test_a_fit_start_measurement_that_raised_is_taken_on_resume(tmp_path):
    """Interrupted inside the fit-start measurement, the exception checkpoint is written at step 0, which the
    resumed fit measured only where its every_n_steps was due (never at 0): its history began at step 2."""
    calls = []

    def failing(module, batch):
        calls.append(module.trainer.global_step)
        if len(calls) == 2 and not module.trainer.ckpt_path:  # the first call is the set-up check of the loss
            raise _Interrupt("fit-start measurement")
        return module.loss(batch)

    assert _interrupted_then_resumed(tmp_path, failing, _Interrupt, 4, on_error="raise") == (0, [0, 2, 4])


def test_a_failed_collective_under_skip_is_not_recorded_as_measured(tmp_path):
    """A failed collective stops the fit under on_error="skip" too; the step it stopped in was recorded as
    measured in the exception checkpoint and never taken on resume ([0, 2, 6] for [0, 2, 4, 6]; a review)."""
    from pf_lightning.curvature import CollectiveFailure

    def failing(module, batch):
        if module.trainer.global_step == 4 and not module.trainer.ckpt_path:
            raise CollectiveFailure("a rank went away")
        return module.loss(batch)

    resumed = _interrupted_then_resumed(tmp_path, failing, CollectiveFailure, 6, at_fit_end=False)
    assert resumed == (4, [0, 2, 4, 6])


def test_an_interrupted_measurement_is_not_charged_to_the_work_budget(tmp_path):
    """The measurement stopped at step 35 is not taken (the resumed fit takes it) and was not charged: charged,
    its partial work made an outside trial's resumed fit postpone step 35 and measure 65. The resumed fit
    measures and postpones the steps of the uninterrupted one."""
    state = {"armed": False, "calls": 0}

    def failing(module, batch):
        if state["armed"] and module.trainer.global_step == 35:
            state["calls"] += 1
            if state["calls"] == 12:
                state["armed"] = False
                raise _Interrupt("inside the step-35 measurement")
        return module.loss(batch)

    def run(root, armed=False, ckpt_path=None):
        L.seed_everything(0)
        state.update(armed=armed, calls=0)
        monitor = HessianEigenMonitor(
            k=2, every_n_steps=5, max_work_fraction=0.5, probe=64, hvp="finite_difference", loss_fn=failing,
            on_error="raise", at_fit_end=False,
        )  # fmt: skip
        saver = OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")
        t = trainer(
            root, max_steps=70, callbacks=[monitor, saver], enable_checkpointing=True, logger=CSVLogger(root)
        )
        t.fit(DigitsClassifier(n=512), ckpt_path=ckpt_path)
        return monitor, logged(t)

    straight, straight_logs = run(tmp_path / "straight")
    with pytest.raises(_Interrupt):
        run(tmp_path / "first", armed=True)
    resumed, resumed_logs = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "on_exception.ckpt"))
    assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history]
    postponed = {s for s in straight_logs["hessian/postponed"] if s > 35}
    assert postponed and set(resumed_logs["hessian/postponed"]) == postponed


def test_trace_cadence_counts_measurements_not_the_capped_history(tmp_path):
    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=1, every_n_steps=1, max_history=1, trace_every=3, trace_hvp=4)
    monitor_trainer = trainer(tmp_path, max_steps=6, callbacks=[monitor], logger=CSVLogger(tmp_path))
    monitor_trainer.fit(DigitsClassifier(n=64))
    assert len(monitor.history) == 1 and monitor.history[0]["step"] == 6
    assert sorted(logged(monitor_trainer)["hessian/trace"]) == [0, 3, 6]  # measurements 1, 4, 7


# -- (b) corrupted and foreign callback states -----------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    """A checkpoint after 4 steps with a HessianEigenMonitor, an EdgeOfStabilityMonitor and DAL."""
    root = tmp_path_factory.mktemp("good")
    _fit_for_states(root, 4)
    return root / "ckpt" / "last.ckpt"


def _callbacks():
    monitor = HessianEigenMonitor(k=2, every_n_steps=2, loss_fn=_loss)
    eos = EdgeOfStabilityMonitor()
    lra = LRAdaptation(functools.partial(DriftAdaptiveLR, p=1.0, max_lr=1.0), every_n_steps=2)
    return monitor, eos, lra


def _fit_for_states(root, max_steps, ckpt_path=None):
    L.seed_everything(0)
    monitor, eos, lra = _callbacks()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=4, save_last=True)
    t = trainer(
        root, max_steps=max_steps, callbacks=[monitor, eos, lra, checkpoint], enable_checkpointing=True
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(DigitsClassifier(n=128, lr=0.1), ckpt_path=ckpt_path)
    return t, (monitor, eos, lra), [str(w.message) for w in record]


def _key(states, kind):
    [key] = [k for k in states if k.startswith(kind)]
    return key


def _nan_vectors(state):
    state["latest"]["eigenvectors"][0, 0] = math.nan


def _nan_eigenvalue(state):
    state["history"][0]["eigenvalues"][0] = math.nan


HESSIAN_CORRUPTIONS = {
    "missing_key": lambda s: s.pop("latest"),
    "history_is_a_string": lambda s: s.update(history="abc"),
    "last_step_is_a_string": lambda s: s.update(last_step="4"),
    "vectors_of_another_k": lambda s: s["latest"].update(eigenvectors=torch.zeros(3, 7)),
    "eigenvalues_2d": lambda s: s["latest"].update(eigenvalues=torch.zeros(2, 2)),
    "nan_eigenvectors": _nan_vectors,
    "nan_in_history": _nan_eigenvalue,
    "step_is_negative": lambda s: s["history"][-1].update(step=-4),
}
EOS_CORRUPTIONS = {
    "missing_key": lambda s: s.pop("losses"),
    "first_edge_step_is_a_string": lambda s: s.update(first_edge_step="never"),
    "nan_curvature": lambda s: s.update(negative_curvature=math.nan),
    "history_without_sharpness": lambda s: [h.pop("eos/sharpness") for h in s["history"]],
    "a_loss_is_a_string": lambda s: s["losses"].append("0.1"),
}


def _corrupt_and_resume(tmp_path, checkpoint_file, kind, corrupt):
    state = torch.load(checkpoint_file, weights_only=False)
    corrupt(state["callbacks"][_key(state["callbacks"], kind)])
    path = tmp_path / "corrupt.ckpt"
    torch.save(state, path)
    return _fit_for_states(tmp_path, 8, ckpt_path=str(path))


def _fresh_start_warnings(messages, owner):
    return [m for m in messages if m.startswith(f"{owner}: the checkpoint's callback state cannot be used")]


def test_states_the_callbacks_wrote_load_without_a_warning(checkpoint_file, recwarn):
    states = torch.load(checkpoint_file, weights_only=False)["callbacks"]
    monitor, eos, lra = _callbacks()
    hessian = states[_key(states, "HessianEigenMonitor")]
    hessian["history"] += copy.deepcopy(hessian["history"])  # a second fit with the monitor starts at 0 again
    monitor.load_state_dict(hessian)
    eos.load_state_dict(states[_key(states, "EdgeOfStabilityMonitor")])
    lra.load_state_dict(states[_key(states, "LRAdaptation")])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert [h["step"] for h in monitor.history] == [0, 2, 4, 0, 2, 4] and monitor._last_step == 4
    assert monitor.latest.eigenvectors.shape[1] == 2 and monitor.latest.eigenvectors.numel() > 0
    assert [h["step"] for h in eos.history] == [0, 2, 4] and len(eos.losses) == 4 and lra._restored == 4


@pytest.mark.parametrize("corruption", list(HESSIAN_CORRUPTIONS))
def test_a_bad_hessian_monitor_state_gives_a_fresh_start_with_one_warning(
    tmp_path, checkpoint_file, corruption
):
    t, (monitor, eos, _), messages = _corrupt_and_resume(
        tmp_path, checkpoint_file, "HessianEigenMonitor", HESSIAN_CORRUPTIONS[corruption]
    )
    assert t.global_step == 8
    assert len(_fresh_start_warnings(messages, "HessianEigenMonitor")) == 1
    assert [h["step"] for h in monitor.history] == [6, 8]  # fresh, then measured on the usual cadence
    assert all(math.isfinite(v) for h in monitor.history for v in h["eigenvalues"])
    assert [h["step"] for h in eos.history] == [0, 2, 4, 6, 8]  # the other callbacks keep their state


@pytest.mark.parametrize("corruption", list(EOS_CORRUPTIONS))
def test_a_bad_eos_monitor_state_gives_a_fresh_start_with_one_warning(tmp_path, checkpoint_file, corruption):
    t, (monitor, eos, _), messages = _corrupt_and_resume(
        tmp_path, checkpoint_file, "EdgeOfStabilityMonitor", EOS_CORRUPTIONS[corruption]
    )
    assert t.global_step == 8
    assert len(_fresh_start_warnings(messages, "EdgeOfStabilityMonitor")) == 1
    assert [h["step"] for h in eos.history] == [6, 8] and len(eos.losses) == 4
    assert eos.first_edge_step in (None, 6) and eos.negative_curvature == 0.0  # DAL reaches the edge at 6
    assert [h["step"] for h in monitor.history] == [0, 2, 4, 6, 8]


def test_another_callbacks_state_under_each_key_gives_fresh_starts(tmp_path, checkpoint_file):
    state = torch.load(checkpoint_file, weights_only=False)
    states = state["callbacks"]
    hessian, eos, lra = (
        _key(states, k) for k in ("HessianEigenMonitor", "EdgeOfStabilityMonitor", "LRAdaptation")
    )
    states[hessian], states[eos], states[lra] = (
        copy.deepcopy(states[eos]),
        copy.deepcopy(states[hessian]),
        {"history": []},
    )
    torch.save(state, tmp_path / "swapped.ckpt")
    t, (monitor, eos_cb, _), messages = _fit_for_states(tmp_path, 8, ckpt_path=str(tmp_path / "swapped.ckpt"))
    assert t.global_step == 8
    for owner in ("HessianEigenMonitor", "EdgeOfStabilityMonitor", "LRAdaptation"):
        assert len(_fresh_start_warnings(messages, owner)) == 1, owner
    assert [h["step"] for h in monitor.history] == [6, 8] and [h["step"] for h in eos_cb.history] == [6, 8]


@pytest.mark.parametrize(
    "state",
    [
        None,
        [],
        {"last_measured": "4"},
        {"last_measured": -3},
        {"last_measured": True},
        {"measured": 4},
        {"last_measured": 4, "fed": [2.0]},
        {"last_measured": 4, "fed": {"cap/sharpness": "2.0"}},
    ],
)
def test_lr_adaptation_starts_fresh_on_a_bad_state(state):
    lra = LRAdaptation()
    with pytest.warns(RuntimeWarning, match="LRAdaptation: the checkpoint's callback state cannot be used"):
        lra.load_state_dict(state)
    assert lra._restored is None and lra._fed_restored == {}
    lra.load_state_dict({"last_measured": 6})  # a state written before "fed" was kept
    assert lra._restored == 6 and lra._fed_restored == {}
    lra.load_state_dict({"last_measured": 6, "fed": {"cap/sharpness": 2.5, "dal/hg_ratio": math.nan}})
    assert lra._fed_restored["cap/sharpness"] == 2.5 and math.isnan(lra._fed_restored["dal/hg_ratio"])


def _dal(lr=0.1, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return DriftAdaptiveLR(torch.optim.SGD([{"params": [p]} for p in params], lr=lr), p=1.0)


def _cap(base=False):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10) if base else None
    return SharpnessCappedLR(optimizer, fraction=0.9, base=cosine)


def _stepped(scheduler, values=(4.0, 5.0, 3.0)):
    for value in values:
        scheduler.step(value)
    return scheduler


def _cosine_state():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10).state_dict()


SCHEDULER_CORRUPTIONS = {
    "not_a_dict": (lambda s: None, "not a dict"),
    "foreign_cosine_state": (lambda s: _cosine_state(), "missing"),
    "missing_measured": (lambda s: {k: v for k, v in s.items() if k != "measured"}, "missing"),
    "nan_measured": (lambda s: {**s, "measured": math.nan}, "measured is nan"),
    "measured_is_a_string": (lambda s: {**s, "measured": "3"}, "measured is '3'"),
    "last_epoch_is_a_float": (lambda s: {**s, "last_epoch": 2.5}, "last_epoch"),
    "base_lrs_of_another_length": (lambda s: {**s, "base_lrs": [0.1, 0.1]}, "base_lrs"),
    "negative_rate": (lambda s: {**s, "_last_lr": [-1.0]}, "_last_lr"),
}


@pytest.mark.parametrize(
    "make", [_dal, _cap, functools.partial(_cap, base=True)], ids=["dal", "cap", "cap_cosine"]
)
@pytest.mark.parametrize("corruption", list(SCHEDULER_CORRUPTIONS))
def test_a_bad_scheduler_state_raises_a_clear_error_and_changes_nothing(make, corruption):
    good = _stepped(make()).state_dict()
    corrupt, match = SCHEDULER_CORRUPTIONS[corruption]
    scheduler = make()
    before = scheduler.state_dict()
    with pytest.raises(ValueError, match=f"load_state_dict: .*{match}.*not written by a"):
        scheduler.load_state_dict(corrupt(copy.deepcopy(good)))
    assert scheduler.state_dict() == before
    scheduler.load_state_dict(good)  # a state it wrote still loads, and the rate follows it
    assert scheduler.get_last_lr() == _stepped(make()).get_last_lr()


def test_a_corrupted_scheduler_state_in_a_checkpoint_stops_the_resume_with_the_error(
    tmp_path, checkpoint_file
):
    state = torch.load(checkpoint_file, weights_only=False)
    state["lr_schedulers"][0]["measured"] = math.nan
    torch.save(state, tmp_path / "bad_scheduler.ckpt")
    with pytest.raises(ValueError, match=r"DriftAdaptiveLR\.load_state_dict: measured is nan"):
        _fit_for_states(tmp_path, 8, ckpt_path=str(tmp_path / "bad_scheduler.ckpt"))


def test_a_stale_or_broken_warm_start_is_dropped_not_fed_to_the_solver(tmp_path):
    L.seed_everything(0)
    model = DigitsClassifier(n=128, lr=0.1)
    monitor = HessianEigenMonitor(k=2, every_n_steps=2, loss_fn=_loss)
    eos = EdgeOfStabilityMonitor()
    t = trainer(tmp_path, max_steps=2, callbacks=[monitor, eos])
    t.fit(model)
    good = monitor.latest
    n = good.eigenvectors.shape[0]
    for vectors in (torch.full((n, 2), math.nan), torch.ones(n + 3, 2), torch.empty(0, 2)):
        monitor.latest = EigenResult(**{**good.__dict__, "eigenvectors": vectors, "info": {}})
        result = monitor.measure(t, model, force=True)
        assert not result.info["warm_start"]
        torch.testing.assert_close(result.eigenvalues, good.eigenvalues, rtol=1e-3, atol=0)


# -- (c) W&B absent, offline, disabled --------------------------------------------------------

_WITHOUT_WANDB = """
import sys
sys.modules["wandb"] = None  # what `import wandb` finds when wandb is not installed
sys.path.insert(0, "tests")
import functools, math, warnings
import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning_models import DigitsClassifier, logged, trainer
from pf_lightning import DriftAdaptiveLR, EdgeOfStabilityMonitor, HessianEigenMonitor
from pf_lightning.callbacks import LRAdaptation

try:
    import wandb
except ImportError as err:
    print("import wandb:", type(err).__name__)
L.seed_everything(0)
monitor = HessianEigenMonitor(k=2, every_n_steps=2, trace_every=1, trace_hvp=9, density_every=1, density_steps=8)
callbacks = [monitor, EdgeOfStabilityMonitor(chart_every=1, proxies=True), LRAdaptation(functools.partial(DriftAdaptiveLR, p=1.0))]
t = trainer(sys.argv[1], max_steps=4, callbacks=callbacks, logger=CSVLogger(sys.argv[1]))
t.fit(DigitsClassifier(n=64))
print("steps", [h["step"] for h in monitor.history], "density", monitor.density is not None)
print("metrics", sorted(k for k in t.callback_metrics if k.split("/")[0] in ("hessian", "eos", "dal")))
print("wandb still absent:", sys.modules["wandb"] is None)
"""


def test_without_wandb_installed_the_callbacks_log_to_csv(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_WITHOUT_WANDB), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "import wandb: ModuleNotFoundError" in out and "wandb still absent: True" in out
    assert "steps [0, 2, 4] density True" in out
    assert "'hessian/trace'" in out and "'eos/ratio'" in out and "'dal/hg_ratio'" in out
    csv_text = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "hessian/eig_1" in csv_text and "eos/sharpness" in csv_text


def _nan_from_step_2(module, batch):
    loss = module.loss(batch)
    return loss * math.nan if module.trainer.global_step >= 2 else loss


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_offline_and_disabled(tmp_path, monkeypatch, mode):
    import wandb
    from lightning.pytorch.loggers import WandbLogger
    from wandb_offline import offline_env

    from pf_lightning.wandb_reader import find_run_file, history

    offline_env(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", mode)
    L.seed_everything(0)
    monitor = HessianEigenMonitor(
        k=1, every_n_steps=1, loss_fn=_nan_from_step_2, density_every=1, density_steps=8
    )
    eos = EdgeOfStabilityMonitor(chart_every=1)
    logger = WandbLogger(save_dir=tmp_path, project="t", offline=mode == "offline")
    t = trainer(tmp_path, max_steps=4, callbacks=[monitor, eos], logger=logger, log_every_n_steps=1)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            t.fit(DigitsClassifier(n=64))
        t.logger.experiment.finish()
    finally:
        wandb.teardown()
    assert t.global_step == 4 and [h["step"] for h in monitor.history] == [0, 1]
    assert t.callback_metrics["hessian/skipped"] == 1.0
    assert sum("Hessian measurement skipped" in str(w.message) for w in record) == 1
    if mode == "disabled":
        assert not list(tmp_path.rglob("*.wandb"))
        return
    rows = history(find_run_file(tmp_path))
    skipped = sorted(r["trainer/global_step"] for r in rows if "hessian/skipped" in r)
    assert skipped == [2, 3, 4]
    assert sorted(r["trainer/global_step"] for r in rows if "hessian/eig_1" in r) == [0, 1]
    assert any("hessian/density" in r for r in rows) and any(
        "eos/spectrum_vs_threshold_table" in r for r in rows
    )


class _Rates(L.Callback):
    """The rate of group 0 at every optimizer step."""

    def __init__(self):
        self.used = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.used[trainer.global_step] = optimizer.param_groups[0]["lr"]


def _interrupted_and_resumed(run, ctrl_c, tmp_path):
    """``run(root, callbacks=(), ckpt_path=None)`` straight through; then with ``ctrl_c["armed"]`` (the run's
    own code raises KeyboardInterrupt where it reads it) and an OnExceptionCheckpoint; then resumed from
    that checkpoint. Returns the straight and the resumed run's results."""
    ctrl_c["armed"] = False
    straight = run(tmp_path / "straight")
    ctrl_c["armed"] = True
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into a graceful exit
            run(tmp_path / "first", [OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl+C while it shuts down
    ctrl_c["armed"] = False
    assert torch.load(tmp_path / "on_exception.ckpt", weights_only=False)["global_step"] == 6
    return straight, run(tmp_path / "second", ckpt_path=tmp_path / "on_exception.ckpt")


def test_a_dal_run_interrupted_inside_its_measurement_resumes_to_the_uninterrupted_rates(tmp_path):
    """Ctrl+C inside the ||Hg||/||g|| measurement for step 6: the exception checkpoint counted it as taken,
    and the resumed run ran steps 6-7 at step 4's rate and every later step apart (an outside trial: all
    10 resumed steps off). The resumed run takes it before step 6, on that step's batch (full batch here)."""
    ctrl_c = {"armed": False}

    def loss_fn(module, batch):
        if module.trainer.global_step == 6 and ctrl_c["armed"]:
            raise KeyboardInterrupt
        return module.loss(batch)

    def run(root, callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        model = DigitsClassifier(n=128, lr=0.05)
        rates = _Rates()
        adaptation = LRAdaptation(
            functools.partial(DriftAdaptiveLR, p=1.0, max_lr=2.0), every_n_steps=2, loss_fn=loss_fn
        )
        t = trainer(root, max_steps=10, callbacks=[adaptation, rates, *callbacks], enable_checkpointing=True)
        t.fit(model, ckpt_path=ckpt_path)
        return rates.used, model

    (straight, straight_model), (resumed, model) = _interrupted_and_resumed(run, ctrl_c, tmp_path)
    assert sorted(resumed) == list(range(6, 10))
    assert resumed == {step: straight[step] for step in range(6, 10)}
    assert len(set(resumed.values())) > 1  # the rate moves: a stale one would show
    for p, q in zip(model.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(p, q)


DAL_SETTING_CORRUPTIONS = {  # each loaded in silence before (an outside trial)
    "negative_measured": ({"measured": -3.0}, "positive"),  # the next rate was NaN
    "negative_p": ({"p": -1.0}, "`p` must be"),  # refused only at the first step, mid-run
    "nan_max_lr": ({"max_lr": math.nan}, "`max_lr` must be a finite number"),
    "zero_max_lr": ({"max_lr": 0.0}, "`max_lr` must be"),
    "reversed_window": ({"window": [7, 3]}, "`window` must be"),  # DAL never adapted
    "fractional_warmup": ({"warmup_steps": 2.5}, "`warmup_steps` must be"),
    "a_cap_state": ({"fraction": 0.9, "_uncapped": [0.1], "base": None}, "settings of another scheduler"),
}
CAP_SETTING_CORRUPTIONS = {
    "negative_fraction": ({"fraction": -1.0}, "`fraction` must be"),  # the next rate was -1: uphill
    "inf_fraction": ({"fraction": math.inf}, "`fraction` must be a finite number"),
    "a_dal_state": ({"p": 1.0, "max_lr": 5.0}, "settings of another scheduler"),
}


@pytest.mark.parametrize(
    ("make", "corruption"),
    [(_dal, c) for c in DAL_SETTING_CORRUPTIONS] + [(_cap, c) for c in CAP_SETTING_CORRUPTIONS],
)
def test_a_scheduler_state_with_settings_its_constructor_refuses_is_refused(make, corruption):
    changes, match = {**DAL_SETTING_CORRUPTIONS, **CAP_SETTING_CORRUPTIONS}[corruption]
    scheduler = make()
    before = scheduler.state_dict()
    with pytest.raises(ValueError, match=f"load_state_dict: .*{match}.*not written by a"):
        scheduler.load_state_dict({**_stepped(make()).state_dict(), **changes})
    assert scheduler.state_dict() == before


def test_a_cap_state_with_or_without_a_base_loads_only_into_the_same_kind_of_cap():
    """A cap on a cosine loading a state without a base restarted the cosine in silence (outside trial)."""
    with pytest.raises(ValueError, match="had no base schedule and this one caps a CosineAnnealingLR"):
        _cap(base=True).load_state_dict(_stepped(_cap()).state_dict())
    with pytest.raises(ValueError, match="capped a base schedule and this one has none"):
        _cap().load_state_dict(_stepped(_cap(base=True)).state_dict())


@pytest.mark.parametrize("where", ["measurement", "listener"])
def test_a_capped_run_interrupted_inside_the_hessian_measurement_resumes_to_the_uninterrupted_rates(
    tmp_path, where
):
    """Ctrl+C inside the Hessian measurement at step 6: the monitor counted it as taken, the resumed run
    never measured step 6, and steps 6-8 ran at step 3's cap (an outside trial). The same where Ctrl+C
    lands in a listener before the EoS monitor's (a review). It is measured on resume."""

    ctrl_c = {"armed": False}

    def loss_fn(module, batch):
        if module.trainer.global_step == 6 and ctrl_c["armed"] and where == "measurement":
            raise KeyboardInterrupt
        return module.loss(batch)

    def listener(trainer, pl_module, result):
        if trainer.global_step == 6 and ctrl_c["armed"] and where == "listener":
            raise KeyboardInterrupt

    def run(root, callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        model = DigitsClassifier(n=128, lr=3.0)

        def configure():
            optimizer = torch.optim.SGD(model.parameters(), lr=3.0)
            return {
                "optimizer": optimizer,
                "lr_scheduler": SharpnessCappedLR(optimizer, 0.9).lightning_config(),
            }

        model.configure_optimizers = configure
        monitor = HessianEigenMonitor(k=1, every_n_steps=3, loss_fn=loss_fn, tol=1e-4, at_fit_end=False)
        monitor.add_listener(listener)  # before the EoS monitor's, which it adds at set-up
        rates = _Rates()
        callbacks = [monitor, EdgeOfStabilityMonitor(), LRAdaptation(), rates, *callbacks]
        t = trainer(root, max_steps=10, callbacks=callbacks, enable_checkpointing=True)
        t.fit(model, ckpt_path=ckpt_path)
        return rates.used, model, monitor

    (straight, straight_model, _), (resumed, model, monitor) = _interrupted_and_resumed(run, ctrl_c, tmp_path)
    assert [h["step"] for h in monitor.history][-2:] == [6, 9]
    assert resumed == {step: straight[step] for step in range(6, 10)}
    assert straight[6] != straight[5]  # the cap from step 6's sharpness binds from step 6
    for p, q in zip(model.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(p, q)
