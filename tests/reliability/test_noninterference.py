"""Non-interference, property-based: with LR adaptation off, a run with the callbacks is the run without them.

DESIGN principle 1. Hypothesis draws a model (dropout, BatchNorm, LayerNorm, self-attention through
``nn.MultiheadAttention`` or ``F.scaled_dot_product_attention``), an optimizer, a precision, the loss,
gradient accumulation, how the loader shuffles (global generator, its own ``generator=``, a persistent
worker), whether ``training_step`` draws augmentation noise from Python's and NumPy's global generators,
and which callbacks measure what how often: ``HessianEigenMonitor`` (also per parameter group, with
trace and density), ``EdgeOfStabilityMonitor`` (with proxies) and ``LRAdaptation`` serving a
``DriftAdaptiveLR(p=0)``, which measures the drift but keeps the optimizer's rate (adaptation off).
Each case trains twice from the same seed on shuffled mini-batches, without and with the callbacks,
and asserts bit equality (``torch.equal``, never a tolerance) of the final parameters, buffers,
gradients, module modes, every optimizer state tensor and scalar, the per-step losses, and torch's,
NumPy's and Python's random states after fit; and that every callback measured exactly at the steps
it was asked to, so that no case passes vacuously.
"""

from __future__ import annotations

import functools
import math
import random
import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger
from lightning_models import DigitsClassifier, digits, trainer
from test_state import snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pf_lightning import DriftAdaptiveLR, EdgeOfStabilityMonitor, HessianEigenMonitor, LRAdaptation
from pf_lightning.curvature import parameter_groups

KINDS = ("dropout", "batchnorm", "layernorm", "mha", "sdpa")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
# 16-mixed is not on the list: on CPU Lightning replaces it by bf16-mixed (torch has no fp16 autocast there).
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "bf16-true", "16-true")
ADAM_FAMILY = ("adam", "adamw")
N_SAMPLES, BATCH_SIZE = 64, 16  # 4 batches an epoch: 6-10 steps cross 1-4 epoch boundaries


@dataclass(frozen=True)
class Case:
    kind: str = "dropout"
    optimizer: str = "sgd"
    precision: str = "32-true"
    loss: str = "mse"
    augment: bool = False
    steps: int = 6
    accumulate: int = 1
    # the shuffle's randomness: the global generator, the loader's own seeded generator, or the global
    # generator with one persistent worker process, whose iterator the loader keeps from epoch to epoch
    loader: str = "global"
    # HessianEigenMonitor over all parameters and/or per parameter group (two); their common settings.
    hessian: bool = True
    per_group: bool = False
    k: int = 1
    which: str = "top"
    every_n_steps: int = 2
    at_fit_start: bool = True
    every_n_epochs: int | None = None
    hvp: str = "auto"
    probe: int | str = 24  # samples drawn from the training loader, or "loader": that loader itself
    warm_start: bool = True
    dtype: torch.dtype | None = None
    trace_every: int | None = None
    density_every: int | None = None
    eos: bool = False
    proxies: bool = False
    proxy_every_n_steps: int = 1
    # Mini-batches of 16: batch sharpness runs at every EoS measurement (on few batches here).
    batch_sharpness_batches: int = 2
    critical_every_n_steps: int | None = None
    # DriftAdaptiveLR(p=0) measured by LRAdaptation: "served" (configure_optimizers returns it, in both
    # runs, and LRAdaptation() feeds it) or "installed" (LRAdaptation(factory) installs it).
    dal: str | None = None
    dal_every_n_steps: int = 1
    dal_hvp: str = "forward_difference"


# forward-over-reverse products cost about 20x a double-backward one on these models (torch.func
# overhead): the fast sweep leaves them to the slow one.
FAST_HVPS = ("auto", "finite_difference")
ALL_HVPS = (*FAST_HVPS, "forward_over_reverse")


@st.composite
def cases(draw: st.DrawFn, hvps: tuple[str, ...] = FAST_HVPS) -> Case:
    hessian = draw(st.booleans())
    per_group = draw(st.booleans())
    dal = draw(st.sampled_from([None, "served", "installed"]))
    if not (hessian or per_group or dal):
        hessian = True
    eos = hessian and draw(st.booleans())
    return Case(
        kind=draw(st.sampled_from(KINDS)),
        optimizer=draw(st.sampled_from(OPTIMIZERS)),
        precision=draw(st.sampled_from(PRECISIONS)),
        loss=draw(st.sampled_from(["mse", "cross_entropy"])),
        augment=draw(st.booleans()),
        steps=draw(st.integers(6, 10)),
        accumulate=draw(st.sampled_from([1, 2])),
        loader=draw(st.sampled_from(["global", "generator", "workers"])),
        hessian=hessian,
        per_group=per_group,
        k=draw(st.integers(1, 3)),
        which=draw(st.sampled_from(["top", "both"])),
        every_n_steps=draw(st.integers(1, 4)),
        at_fit_start=draw(st.booleans()),
        every_n_epochs=draw(st.sampled_from([None, 1])),
        hvp=draw(st.sampled_from(hvps)),
        probe=draw(st.sampled_from([16, 24, "loader"])),  # 24: the probe ends inside a batch of 16
        warm_start=draw(st.booleans()),
        dtype=draw(st.sampled_from([None, torch.float64])),
        trace_every=draw(st.sampled_from([None, 1, 2])),
        density_every=draw(st.sampled_from([None, 2])),
        eos=eos,
        proxies=eos and draw(st.booleans()),
        proxy_every_n_steps=draw(st.integers(1, 3)),
        batch_sharpness_batches=draw(st.integers(2, 3)),
        critical_every_n_steps=draw(st.sampled_from([None, 1, 3])),
        dal=dal,
        dal_every_n_steps=draw(st.integers(1, 3)),
        dal_hvp=draw(st.sampled_from(["forward_difference", "auto"])),
    )


class SelfAttention(nn.Module):
    """Pre-norm self-attention with a residual and dropout on the attention weights."""

    def __init__(self, d: int, kernel: str, heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.kernel, self.heads, self.dropout = kernel, heads, dropout
        self.norm = nn.LayerNorm(d)
        if kernel == "mha":
            self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        else:
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.kernel == "mha":
            return x + self.attn(h, h, h, need_weights=False)[0]
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return x + self.out(a.transpose(1, 2).flatten(2))


class Classifier(DigitsClassifier):
    """The digits classifier with the drawn architecture, optimizer and augmentation."""

    def __init__(self, case: Case) -> None:
        super().__init__(
            hidden=32,
            loss=case.loss,
            dropout={"dropout": 0.2, "batchnorm": 0.1}.get(case.kind, 0.0),
            batchnorm=case.kind == "batchnorm",
            n=N_SAMPLES,
            batch_size=BATCH_SIZE,
        )
        self.case = case
        if case.kind == "layernorm":
            self.net = nn.Sequential(
                nn.Linear(64, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Tanh(),
                nn.Linear(32, 10),
            )  # fmt: skip
        elif case.kind in ("mha", "sdpa"):  # the 64 pixels embedded as 8 tokens of width 8
            self.net = nn.Sequential(
                nn.Linear(64, 64), nn.Unflatten(1, (8, 8)), SelfAttention(8, case.kind), nn.Flatten(), nn.Tanh(),
                nn.Linear(64, 10),
            )  # fmt: skip

    def train_dataloader(self):
        x, y = digits(self.hparams.n)
        kwargs: dict[str, Any] = {"batch_size": self.hparams.batch_size, "shuffle": True}
        if self.case.loader == "stream":
            return DataLoader(_SamplingStream(x, y), batch_size=self.hparams.batch_size)
        if self.case.loader == "sampler":
            return DataLoader(
                TensorDataset(x, y), batch_size=self.hparams.batch_size, sampler=_OwnSampler(len(x))
            )
        if self.case.loader == "generator":
            kwargs["generator"] = torch.Generator().manual_seed(11)
        elif self.case.loader == "workers":
            kwargs.update(num_workers=1, persistent_workers=True)
        return DataLoader(TensorDataset(x, y), **kwargs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.case.augment:  # augmentation that draws from Python's and NumPy's global generators
            noise = torch.from_numpy(np.random.normal(0.0, 0.05, size=tuple(x.shape)))
            x = random.uniform(0.9, 1.1) * x + noise.to(x.dtype)
        return super().training_step((x, y), batch_idx)

    def configure_optimizers(self):
        kind, params = self.case.optimizer, self.parameters()
        eps = 1e-4 if self.case.precision == "16-true" else 1e-8  # 1e-8 is 0 in float16: NaN steps
        if kind == "adam":
            optimizer = torch.optim.Adam(params, lr=0.01, eps=eps)
        elif kind == "adamw":
            optimizer = torch.optim.AdamW(params, lr=0.01, eps=eps, weight_decay=0.05)
        else:
            momentum = 0.0 if kind == "sgd" else 0.9
            optimizer = torch.optim.SGD(params, lr=0.05, momentum=momentum, nesterov=kind == "nesterov")
        if self.case.dal == "served":
            return {
                "optimizer": optimizer,
                "lr_scheduler": DriftAdaptiveLR(optimizer, p=0.0).lightning_config(),
            }
        return optimizer


class MemoryLogger(Logger):
    """Keeps every logged metric as ``{key: {step: value}}``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, {})[step] = float(value)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def groups(model: Classifier) -> dict[str, list[str]]:
    """Two parameter groups, the first layer and the rest (one monitor per layer costs too much here)."""
    layers = parameter_groups(model, depth=2)  # {"net.0": ["net.0.*"], ...}
    first = next(iter(layers))
    return {"first": layers.pop(first), "rest": [p for patterns in layers.values() for p in patterns]}


def make_callbacks(case: Case, model: nn.Module, loader: DataLoader) -> list[Callback]:
    common = {
        "k": case.k,
        "which": case.which,
        "every_n_steps": case.every_n_steps,
        "at_fit_start": case.at_fit_start,
        "every_n_epochs": case.every_n_epochs,
        "hvp": case.hvp,
        "probe": loader if case.probe == "loader" else case.probe,
        "max_hvp": 20,
        "warm_start": case.warm_start,
        "dtype": case.dtype,
        "trace_every": case.trace_every,
        "trace_hvp": 12,
        "density_every": case.density_every,
        "density_steps": 8,
    }
    callbacks: list[Callback] = []
    if case.hessian:
        callbacks.append(HessianEigenMonitor(**common))
    if case.per_group:
        callbacks += HessianEigenMonitor.per_group(groups(model), **common)
    if case.eos:
        callbacks.append(
            EdgeOfStabilityMonitor(
                proxies=case.proxies,
                proxy_every_n_steps=case.proxy_every_n_steps,
                batch_sharpness_batches=case.batch_sharpness_batches,
                critical_every_n_steps=case.critical_every_n_steps,
            )
        )
    if case.dal == "served":
        callbacks.append(LRAdaptation(every_n_steps=case.dal_every_n_steps, hvp=case.dal_hvp))
    elif case.dal == "installed":
        factory = functools.partial(DriftAdaptiveLR, p=0.0)
        callbacks.append(LRAdaptation(factory, every_n_steps=case.dal_every_n_steps, hvp=case.dal_hvp))
    return callbacks


@dataclass
class Run:
    model: Classifier
    trainer: L.Trainer
    logger: MemoryLogger
    callbacks: list[Callback]
    losses: list[torch.Tensor]
    rng: tuple[torch.Tensor, Any, Any]


class _SamplingStream(torch.utils.data.IterableDataset):
    """An iterable dataset that samples with replacement from generators it holds (torch and NumPy)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.g, self.noise = torch.Generator().manual_seed(3), np.random.default_rng(5)

    def __iter__(self):
        for _ in range(len(self.x)):
            i = int(torch.randint(len(self.x), (1,), generator=self.g))
            yield self.x[i] + float(self.noise.normal(0.0, 0.01)), self.y[i]


class _OwnSampler(torch.utils.data.Sampler):
    """A shuffling sampler whose generators are its own, not named `generator` (torch's and NumPy's)."""

    def __init__(self, n: int) -> None:
        self.n, self.g, self.rng = n, torch.Generator().manual_seed(5), np.random.default_rng(3)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.g).tolist()
        shift = int(self.rng.integers(self.n))
        return iter(order[shift:] + order[:shift])

    def __len__(self) -> int:
        return self.n


def fit(tmp_path, case: Case, measured: bool) -> Run:
    L.seed_everything(7, verbose=False)
    model = Classifier(case)
    loader = model.train_dataloader()
    callbacks = make_callbacks(case, model, loader) if measured else []
    recorder, logger = LossRecorder(), MemoryLogger()
    t = trainer(
        tmp_path,
        max_steps=case.steps,
        precision=case.precision,
        accumulate_grad_batches=case.accumulate,
        callbacks=[recorder, *callbacks],
        logger=logger,
    )
    with warnings.catch_warnings():
        # non-convergence (noisy augmented losses, 20 products), the served scheduler's missing metric in
        # the plain run, few dataloader workers: none of them is what this test is about
        warnings.simplefilter("ignore")
        t.fit(model, train_dataloaders=loader)
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    return Run(model, t, logger, callbacks, recorder.losses, rng)


def assert_same(a: Any, b: Any, what: str) -> None:
    """Bit equality of two tensors (same dtype), or equality of two scalars or Nones."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), what
        assert a.dtype == b.dtype and torch.equal(a, b), what
    else:
        assert a == b, what


def assert_bit_identical(case: Case, plain: Run, measured: Run) -> None:
    a, b = plain.model.state_dict(), measured.model.state_dict()  # parameters and buffers, by name
    assert list(a) == list(b)
    for key in a:
        assert_same(a[key], b[key], key)
    before, after = snapshot(plain.model), snapshot(measured.model)  # also .grad, modes, BN tracking
    for field in ("params", "grads", "buffers"):
        for i, (x, y) in enumerate(zip(before[field], after[field], strict=True)):
            assert_same(x, y, f"{field}[{i}]")
    assert before["modes"] == after["modes"] and before["tracking"] == after["tracking"]

    opt_a, opt_b = plain.trainer.optimizers[0].state_dict(), measured.trainer.optimizers[0].state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys()
    if case.optimizer != "sgd":  # plain SGD keeps no state
        assert len(opt_a["state"]) == len(opt_a["param_groups"][0]["params"])
    for index, state in opt_a["state"].items():
        assert state.keys() == opt_b["state"][index].keys()
        for name, value in state.items():
            assert_same(value, opt_b["state"][index][name], f"optimizer state {index}.{name}")
    for group_a, group_b in zip(opt_a["param_groups"], opt_b["param_groups"], strict=True):
        if case.dal == "installed":  # the installed scheduler records the rate it found, and keeps it
            assert group_b.pop("initial_lr") == group_a["lr"]
        assert group_a == group_b

    assert len(plain.losses) == len(measured.losses) == case.steps * case.accumulate
    assert all(bool(loss.isfinite()) for loss in plain.losses)  # torch.equal is False on NaN
    assert torch.equal(torch.stack(plain.losses), torch.stack(measured.losses))
    assert torch.equal(plain.rng[0], measured.rng[0])
    np_a, np_b = plain.rng[1], measured.rng[1]
    assert np_a[0] == np_b[0] and np.array_equal(np_a[1], np_b[1]) and np_a[2:] == np_b[2:]
    assert plain.rng[2] == measured.rng[2]


def assert_measured(case: Case, run: Run) -> None:
    """Every callback measured at exactly the steps it was asked to: nothing passes by measuring nothing."""
    n = case.steps
    expected = set(range(case.every_n_steps, n + 1, case.every_n_steps)) | {n}  # every n, and at fit end
    if case.at_fit_start:
        expected.add(0)
    if case.every_n_epochs:
        per_epoch = N_SAMPLES // BATCH_SIZE // case.accumulate
        expected |= set(range(per_epoch, n + 1, per_epoch))
    expected = sorted(expected)
    monitors = [cb for cb in run.callbacks if isinstance(cb, HessianEigenMonitor)]
    assert len(monitors) == case.hessian + 2 * case.per_group
    for monitor in monitors:
        assert [h["step"] for h in monitor.history] == expected, monitor.name
        assert run.logger.metrics[monitor.metric("eig_1")].keys() == set(expected)
        assert all(math.isfinite(v) for h in monitor.history for v in h["eigenvalues"])
        assert all(len(h["eigenvalues"]) == case.k * (1 + (case.which == "both")) for h in monitor.history)
        if case.trace_every:
            assert run.logger.metrics[monitor.metric("trace")].keys() == set(expected[:: case.trace_every])
        assert (monitor.density is not None) == (case.density_every is not None)
    if case.eos:
        (eos,) = [cb for cb in run.callbacks if isinstance(cb, EdgeOfStabilityMonitor)]
        # Adam-family: no preconditioner before the first step, so no sharpness at step 0.
        eos_steps = [s for s in expected if s > 0 or case.optimizer not in ADAM_FAMILY]
        assert [h["step"] for h in eos.history] == eos_steps
        assert run.logger.metrics["eos/ratio"].keys() == set(eos_steps)
        if case.proxies:
            proxy_steps = set(range(case.proxy_every_n_steps, n + 1, case.proxy_every_n_steps))
            assert run.logger.metrics["pf/hg_ratio"].keys() == proxy_steps
    if case.dal:
        dal_steps = set(range(0, n + 1, case.dal_every_n_steps))
        assert run.logger.metrics["dal/hg_ratio"].keys() == dal_steps
        assert all(math.isfinite(v) for v in run.logger.metrics["dal/hg_ratio"].values())
        assert run.logger.metrics["dal/active"] and not any(run.logger.metrics["dal/active"].values())


# Every model kind, optimizer and precision, every kind of loader and probe at least once, and every
# callback, whatever Hypothesis draws.
COVERING = [
    Case(
        kind,
        optimizer,
        precision,
        loader=loader,
        probe=probe,
        augment=augment,
        hvp=hvp,
        per_group=True,
        k=2,
        which="both",
        eos=True,
        proxies=True,
        dal="served",
    )
    for kind, optimizer, precision, loader, probe, augment, hvp in zip(
        KINDS,
        OPTIMIZERS,
        PRECISIONS,
        ["global", "generator", "workers", "generator", "workers"],
        [24, "loader", 24, 16, "loader"],
        [False, True, True, False, True],
        ["auto", "finite_difference", "auto", "finite_difference", "auto"],
        strict=True,
    )
]
SETTINGS = {
    "deadline": None,
    "derandomize": True,  # the same cases on every run: CI is deterministic
    "database": None,
    # tmp_path is shared by the examples: nothing is written there (no checkpoint, an in-memory logger)
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


def record_events(case: Case) -> None:
    """The spread of the drawn cases, shown by ``pytest --hypothesis-show-statistics``."""
    for name in ("kind", "optimizer", "precision", "loader", "probe", "hvp"):
        event(f"{name}={getattr(case, name)}")
    event(f"callbacks={'H' * case.hessian}{'G' * case.per_group}{'E' * case.eos}{'D' * bool(case.dal)}")


def check_case(tmp_path, case: Case) -> None:
    plain = fit(tmp_path, case, measured=False)
    measured = fit(tmp_path, case, measured=True)
    assert_measured(case, measured)
    assert_bit_identical(case, plain, measured)


@settings(max_examples=20, **SETTINGS)
@given(case=cases())
@example(case=COVERING[0])
@example(case=COVERING[1])
@example(case=COVERING[2])
@example(case=COVERING[3])
@example(case=COVERING[4])
def test_training_is_bit_identical_with_and_without_the_callbacks(tmp_path, one_thread, case):
    record_events(case)
    check_case(tmp_path, case)


@pytest.mark.slow
@settings(max_examples=40, **SETTINGS)
@given(case=cases(hvps=ALL_HVPS))
@example(
    case=Case("layernorm", "nesterov", "bf16-mixed", loader="workers", hvp="forward_over_reverse", eos=True)
)
def test_a_wider_sweep_with_forward_over_reverse_products_is_bit_identical(tmp_path, one_thread, case):
    record_events(case)
    check_case(tmp_path, case)


@pytest.mark.parametrize("probe", [24, "loader"])
@pytest.mark.parametrize("loader", ["generator", "workers", "stream", "sampler"])
def test_reading_the_probe_leaves_the_training_loaders_order_untouched(tmp_path, one_thread, loader, probe):
    """Regression: a probe read from a loader with its own generator advanced that generator, and one read
    from a loader with persistent workers created the worker iterator that training then only reset,
    drawing its shuffle from the wrong place in the global stream; both trained in another order. A
    stream that samples from generators of its own advanced them (trained on other samples), and so did
    a sampler whose generators have other names than `generator` (an outside trial: the next epoch's
    order)."""
    check_case(tmp_path, Case(loader=loader, probe=probe, every_n_steps=3))
