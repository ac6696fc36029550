"""Bad data at run time: every callback skips the measurement, flags it, warns once, and training goes on.

Faults: a diverging run, a NaN parameter, an op whose second derivative is infinite, a probe batch the
model cannot consume, a ``training_step`` (or a loss function) that returns no loss on some steps, an
exception half-way through a measurement. ``on_error="raise"`` turns each skip into a crash instead.
"""

from __future__ import annotations

import collections
import functools
import math
import random
import re
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import DigitsClassifier, digits, logged, trainer

from pf_lightning import (
    DriftAdaptiveLR,
    EdgeOfStabilityMonitor,
    HessianEigenMonitor,
    hessian_eigenpairs,
)
from pf_lightning.callbacks import LRAdaptation
from pf_lightning.linalg import NonFiniteOperatorError

pytestmark = pytest.mark.usefixtures("one_thread")

SKIP_MESSAGE = re.compile(r"^(.*?) at step (\d+) \((\w+): ")


def fit(tmp_path, model, steps, callbacks):
    """Train with a CSV logger, recording every warning; returns (trainer, warnings' messages)."""
    logger = CSVLogger(tmp_path)
    t = trainer(tmp_path, max_steps=steps, callbacks=callbacks, logger=logger, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(model)
    return t, [str(w.message) for w in record]


def skip_warnings(messages: list[str]) -> collections.Counter:
    """(what, error type) -> how many warnings said it was skipped for that reason."""
    found = (SKIP_MESSAGE.match(m) for m in messages)
    return collections.Counter((m.group(1), m.group(3)) for m in found if m)


def dal_factory(**kwargs):
    return functools.partial(DriftAdaptiveLR, **kwargs)


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [HessianEigenMonitor, EdgeOfStabilityMonitor, LRAdaptation], ids=lambda c: c.__name__
)
@pytest.mark.parametrize("value", ["ignore", None, True, "RAISE"])
def test_on_error_is_checked_at_construction(make, value):
    with pytest.raises(MisconfigurationException, match='`on_error` must be "skip"'):
        make(on_error=value)
    assert make(on_error="raise").on_error == "raise"
    assert make().on_error == "skip"


# -- non-finite runs -------------------------------------------------------------------------


class _PoisonParameter(L.Callback):
    """Writes a NaN into the first weight after optimizer step ``at`` (before the callbacks measure)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = math.nan


@pytest.mark.parametrize("fault", ["diverging", "nan_parameter"])
def test_a_non_finite_run_trains_to_the_end_and_every_callback_skips_and_warns_once(tmp_path, fault):
    L.seed_everything(0)
    # 2/lambda_max is about 0.5 here: lr=30 grows the loss by ~60x a step until it overflows.
    model = DigitsClassifier(n=128, lr=30.0 if fault == "diverging" else 0.1)
    monitor = HessianEigenMonitor(k=1, every_n_steps=1, tol=1e-2)
    eos = EdgeOfStabilityMonitor(proxies=True)
    lra = LRAdaptation(dal_factory(p=0.0))  # measures ||Hg||/||g|| every step, keeps the optimizer's rate
    extra = [_PoisonParameter(3)] if fault == "nan_parameter" else []
    steps = 30
    t, messages = fit(tmp_path, model, steps, [monitor, eos, lra, *extra])
    assert t.global_step == steps  # trained to the end
    m = logged(t)
    measured = [h["step"] for h in monitor.history]
    skipped = sorted(m["hessian/skipped"])
    assert measured and skipped, "the run must have both good and failed measurements"
    assert max(measured) < min(skipped) and skipped[-1] == steps  # once broken, every step is skipped
    assert sorted(measured + skipped) == list(range(steps + 1))  # every step either measured or flagged
    assert all(math.isfinite(v) for h in monitor.history for v in h["eigenvalues"])
    assert t.callback_metrics["hessian/skipped"] == 1.0
    # The other two callbacks flag the same steps (the proxies and the drift run on the training batch).
    assert set(skipped) <= set(m["dal/skipped"]) and set(skipped) <= set(m["eos/proxies_skipped"])
    assert all(math.isnan(m["dal/hg_ratio"][s]) for s in skipped)
    assert m["dal/lr"][steps - 1] == m["dal/lr"][1]  # p = 0: the base rate throughout, never NaN
    # Each callback warns once per kind of error, however many steps fail.
    counts = skip_warnings(messages)
    whats = {what for what, _ in counts}
    assert {"Hessian measurement skipped", "proxies skipped", "||Hg||/||g|| not measured"} <= whats
    assert set(counts.values()) == {1}
    assert len(counts) < len(skipped)


# An op whose first derivative is exact and whose second derivative is infinite: what a fused or custom
# kernel whose double backward overflows looks like to the measurement.
class _Ones(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.inf)


class _IdentityWithInfiniteCurvature(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * _Ones.apply(x)


class InfiniteSecondDerivative(DigitsClassifier):
    def forward(self, x):
        return self.net[1:](_IdentityWithInfiniteCurvature.apply(self.net[0](x)))


def test_an_infinite_second_derivative_is_skipped_with_double_backward_and_measured_by_auto(tmp_path):
    L.seed_everything(0)
    strict = HessianEigenMonitor(k=1, every_n_steps=2, hvp="double_backward", name="strict")
    auto = HessianEigenMonitor(k=1, every_n_steps=2, name="auto")
    t, messages = fit(tmp_path, InfiniteSecondDerivative(n=128), 6, [strict, auto])
    assert t.global_step == 6
    m = logged(t)
    assert strict.history == [] and sorted(m["hessian/strict/skipped"]) == [0, 2, 4, 6]
    assert skip_warnings(messages) == {("Hessian (strict) measurement skipped", "NonFiniteOperatorError"): 1}
    # "auto" finds the exact backend broken and measures by finite differences instead.
    assert [h["step"] for h in auto.history] == [0, 2, 4, 6]
    assert {h["hvp"] for h in auto.history} == {"finite_difference"}
    reference = DigitsClassifier(n=128)
    reference.load_state_dict(t.lightning_module.state_dict())  # the same network without the odd op
    direct = hessian_eigenpairs(reference, lambda mod, b: mod.loss(b), [digits(128)], k=1, tol=1e-6)
    assert auto.latest.eigenvalues[0] == pytest.approx(float(direct.eigenvalues[0]), rel=2e-3)


# -- inputs the measurement cannot run on ----------------------------------------------------


def test_a_probe_batch_the_model_cannot_consume_is_skipped_every_time_and_warned_once(tmp_path):
    L.seed_everything(0)
    x, y = digits(128)
    probe = [(x[:64], y[:64]), (x[64:, :32], y[64:])]  # the second batch has 32 features, not 64
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, probe=probe)
    t, messages = fit(tmp_path, DigitsClassifier(n=128), 6, [monitor])
    assert t.global_step == 6 and monitor.history == []
    assert sorted(logged(t)["hessian/skipped"]) == [0, 2, 4, 6]
    assert skip_warnings(messages) == {("Hessian measurement skipped", "RuntimeError"): 1}
    [message] = [s for s in messages if "measurement skipped" in s]
    assert "mat1 and mat2 shapes cannot be multiplied" in message  # the exception's own message


def test_a_probe_the_model_cannot_consume_at_all_fails_at_fit_start(tmp_path):
    x, y = digits(64)
    monitor = HessianEigenMonitor(k=1, probe=[(x[:, :32], y)])
    model = DigitsClassifier(n=128)
    t = trainer(tmp_path, max_steps=3, callbacks=[monitor])
    with pytest.raises(MisconfigurationException, match="does not run on the first probe batch") as info:
        t.fit(model)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert t.global_step == 0  # before any training


class _SometimesNoLoss(DigitsClassifier):
    """Returns None (Lightning skips the step) at the global steps in ``skip``."""

    def __init__(self, skip=(3, 4), **kwargs):
        super().__init__(**kwargs)
        self.skip = set(skip)

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step in self.skip:
            return None
        return super().training_step(batch, batch_idx)


def test_a_training_step_that_returns_none_on_some_steps(tmp_path):
    L.seed_everything(0)
    model = _SometimesNoLoss(n=128, lr=0.1)
    monitor = HessianEigenMonitor(k=1, every_n_steps=1)
    eos = EdgeOfStabilityMonitor(proxies=True)
    lra = LRAdaptation(dal_factory(p=1.0))
    t, messages = fit(tmp_path, model, 7, [monitor, eos, lra])
    assert t.global_step == 7
    m = logged(t)
    # The callbacks measure after step s with training_step called at global_step s.
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 5, 6, 7]
    assert sorted(m["hessian/skipped"]) == [3, 4]
    assert sorted(m["eos/proxies_skipped"]) == [3, 4]
    assert sorted(m["dal/skipped"]) == [3, 4]
    assert m["dal/held"][4] == 1.0 and m["dal/lr"][4] == m["dal/lr"][3]
    counts = skip_warnings(messages)
    assert counts == {
        ("Hessian measurement skipped", "MisconfigurationException"): 1,
        ("proxies skipped", "MisconfigurationException"): 1,
        ("||Hg||/||g|| not measured", "MisconfigurationException"): 1,
    }
    assert "training_step returned NoneType" in next(s for s in messages if "measurement skipped" in s)
    assert len(eos.losses) == 5  # the two steps without a loss leave no entry


def test_a_loss_function_that_returns_none_is_skipped(tmp_path):
    L.seed_everything(0)
    calls = collections.Counter()

    def loss_fn(module, batch):
        step = module.trainer.global_step
        calls[step] += 1
        return None if step in (2, 4) else module.loss(batch)

    monitor = HessianEigenMonitor(k=1, every_n_steps=1, loss_fn=loss_fn, hvp="finite_difference")
    t, messages = fit(tmp_path, DigitsClassifier(n=128), 5, [monitor])
    assert [h["step"] for h in monitor.history] == [0, 1, 3, 5]
    assert sorted(logged(t)["hessian/skipped"]) == [2, 4]
    assert skip_warnings(messages) == {("Hessian measurement skipped", "ValueError"): 1}
    # The skip is cheap: the failure surfaces at the first of the measurement's loss evaluations (a good
    # measurement by finite differences takes two per product).
    assert calls[2] == calls[4] == 1 and calls[3] > 3


# -- an exception half-way through a measurement ---------------------------------------------


def _snapshot(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
    }


def _assert_same(before, model):
    after = _snapshot(model)
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"], strict=True))
    for (ref, value), (ref_after, value_after) in zip(before["grads"], after["grads"], strict=True):
        assert ref is ref_after  # the same tensors (or None), with the same values
        assert value is value_after is None or torch.equal(value, value_after)
    assert all(torch.equal(a, b) for a, b in zip(before["buffers"], after["buffers"], strict=True))
    assert before["modes"] == after["modes"]
    assert torch.equal(before["torch"], after["torch"])
    assert before["python"] == after["python"]
    assert np.array_equal(before["numpy"], after["numpy"])


@pytest.mark.parametrize("hvp", ["double_backward", "finite_difference"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_measurement_that_raises_half_way_leaves_the_model_bit_identical(hvp, error):
    torch.manual_seed(0)
    model = DigitsClassifier(n=64, dropout=0.3, batchnorm=True)
    model.train()
    model.net[2].eval()  # a mixed set of modes, to be put back exactly
    x, y = digits(64)
    model.loss((x, y)).backward()  # the run's own gradients, held in .grad
    model.net[0].weight.grad = None  # and one parameter without a gradient
    before = _snapshot(model)
    calls = {"n": 0}

    def loss_fn(module, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # after a few products: parameters may be displaced, graphs cached
            module.eval()
            random.random(), np.random.rand(), torch.rand(3)
            raise error("boom")
        loss = module.loss(batch)
        if calls["n"] == 2:  # a loss function that calls backward itself
            loss.backward(retain_graph=True)
        return loss

    with pytest.raises(error, match="boom"):
        batches = [(x[:32], y[:32]), (x[32:], y[32:])]
        # Graphs rebuilt for every product, so double backward evaluates the loss as often as FD does.
        hessian_eigenpairs(model, loss_fn, batches, k=2, hvp=hvp, tol=1e-8, cache_graphs=False)
    assert calls["n"] == 6
    _assert_same(before, model)


# -- on_error="raise" -------------------------------------------------------------------------


class _RunawayMomentum(L.Callback):
    """Sets heavy ball's momentum to 1.5 after step 2, before the monitors measure (torch takes any
    momentum >= 0): its threshold (2 + 2 beta)/lr holds for beta < 1 only."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            trainer.optimizers[0].param_groups[0]["momentum"] = 1.5


def _nan_from_step_2(module, batch):
    loss = module.loss(batch)
    return loss * math.nan if module.trainer.global_step >= 2 else loss


def _nan_hessian(on_error):
    return [HessianEigenMonitor(k=1, every_n_steps=1, loss_fn=_nan_from_step_2, on_error=on_error)]


def _eos_without_threshold(on_error):
    return [
        _RunawayMomentum(),
        HessianEigenMonitor(k=1, every_n_steps=1),
        EdgeOfStabilityMonitor(on_error=on_error),
    ]


def _nan_drift(on_error):
    return [LRAdaptation(dal_factory(p=1.0), loss_fn=_nan_from_step_2, on_error=on_error)]


@pytest.mark.parametrize(
    ("make", "error", "flag"),
    [
        (_nan_hessian, FloatingPointError, "hessian/skipped"),
        (_eos_without_threshold, ValueError, "eos/skipped"),
        (_nan_drift, FloatingPointError, "dal/skipped"),
    ],
    ids=["HessianEigenMonitor", "EdgeOfStabilityMonitor", "LRAdaptation"],
)
def test_on_error_raise_stops_training_where_skip_flags_and_goes_on(tmp_path, make, error, flag):
    L.seed_everything(0)
    t, _ = fit(tmp_path / "skip", DigitsClassifier(n=128, lr=0.05), 4, make("skip"))
    assert t.global_step == 4 and sorted(logged(t)[flag]) == [2, 3, 4]
    L.seed_everything(0)
    t = trainer(tmp_path / "raise", max_steps=4, callbacks=make("raise"))
    with pytest.raises(error):
        t.fit(DigitsClassifier(n=128, lr=0.05))
    assert t.global_step == 2


def test_non_finite_proxies_and_drift_are_flagged_not_logged_as_numbers(tmp_path):
    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=1, every_n_steps=10, hvp="double_backward", at_fit_start=False)
    eos = EdgeOfStabilityMonitor(proxies=True)
    lra = LRAdaptation(dal_factory(p=1.0), hvp="double_backward")
    t, messages = fit(tmp_path, InfiniteSecondDerivative(n=128), 3, [monitor, eos, lra])
    m = logged(t)
    assert "pf/hg_ratio" not in m and sorted(m["eos/proxies_skipped"]) == [1, 2, 3]
    assert all(math.isnan(v) for v in m["dal/hg_ratio"].values())
    assert skip_warnings(messages) == {
        ("proxies skipped", NonFiniteOperatorError.__name__): 1,
        ("||Hg||/||g|| not measured", NonFiniteOperatorError.__name__): 1,
        ("Hessian measurement skipped", NonFiniteOperatorError.__name__): 1,
    }


# -- Adam's first steps ----------------------------------------------------------------------


@pytest.mark.parametrize(("warmup", "edge"), [(None, None), (2, 2), (0, 1)])
def test_adam_first_steps_are_logged_but_raise_no_edge_warning_until_the_preconditioner_settles(
    tmp_path, warmup, edge
):
    """After Adam's first step P = 0.1 (|g| + eps): the preconditioned sharpness is 58x the threshold here
    (8-2600x on the demos' digits MLP), then 1.13x after step 2 and below 1 from step 3 on."""
    L.seed_everything(0)
    model = DigitsClassifier(n=256, hidden=64, optimizer="adam", lr=1e-2)
    fired = []
    monitor = HessianEigenMonitor(k=1, every_n_steps=1, at_fit_end=False)
    eos = EdgeOfStabilityMonitor(
        on_warning=lambda trainer, module, metrics: fired.append(trainer.global_step)
    )
    if warmup is not None:
        eos.preconditioner_warmup_steps = warmup
    t, messages = fit(tmp_path, model, 11, [monitor, eos])
    m = logged(t)
    ratios = m["eos/ratio"]
    assert sorted(ratios) == list(range(1, 12))  # step 0: no second moments yet, nothing to compare
    assert ratios[1] > 10 and ratios[2] > 1 and max(ratios[s] for s in range(3, 12)) < 1  # logged as measured
    settled = 10 if warmup is None else warmup
    # Step 0 logs the threshold alone, flagged: the optimizer has no preconditioner before its first step.
    assert sorted(m.get("eos/warmup", {})) == [0, *range(1, min(settled, 12))]
    assert 0 in m["eos/threshold"] and 0 not in m["eos/sharpness"]
    assert fired == sorted(m.get("eos/warning", {})) == ([] if edge is None else [edge])
    assert eos.first_edge_step == edge
    assert sum("x the stability threshold" in s for s in messages) == (edge is not None)


def _failing_on_call(n):
    """A loss function that raises on the ``n``-th call of every optimizer step's measurements."""
    calls = collections.Counter()

    def loss_fn(module, batch):
        step = module.trainer.global_step
        calls[step] += 1
        if calls[step] == n:
            raise RuntimeError("a failure half-way through a measurement")
        return module.loss(batch)

    return loss_fn


def _train(tmp_path, callbacks):
    L.seed_everything(123)
    model = DigitsClassifier(lr=0.05, momentum=0.9, dropout=0.2, batchnorm=True, n=256, batch_size=32)
    t = trainer(tmp_path, max_steps=8, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model)
    optimizer_state = t.optimizers[0].state_dict()["state"]
    return [p.detach().clone() for p in model.parameters()], optimizer_state, torch.rand(3)


def test_a_run_whose_measurements_all_fail_half_way_is_bit_identical_to_one_without_callbacks(tmp_path):
    plain = _train(tmp_path / "plain", [])
    # Finite differences and DAL's forward difference displace the parameters when the loss raises.
    monitor = HessianEigenMonitor(
        k=2, every_n_steps=2, probe=64, hvp="finite_difference", loss_fn=_failing_on_call(3)
    )
    eos = EdgeOfStabilityMonitor(proxies=True)
    lra = LRAdaptation(dal_factory(p=0.0), loss_fn=_failing_on_call(2))
    failed = _train(tmp_path / "failed", [monitor, eos, lra])
    assert monitor.history == [] and eos.history == []
    assert all(torch.equal(a, b) for a, b in zip(plain[0], failed[0], strict=True))
    for key, state in plain[1].items():
        assert all(torch.equal(state[name], failed[1][key][name]) for name in state)
    assert torch.equal(plain[2], failed[2])  # the random stream is where it would have been
