"""Bad configuration fails at construction, naming the argument and what it must be (DESIGN, principle 5).

Every public constructor and function of ``pf_lightning`` gets a table of its arguments: a strategy of
valid values and one of bad values (wrong types, out of range, NaN and infinities, unknown choices,
dtypes and devices). Hypothesis draws from them and checks that

- a bad value raises at once, with one exception type per layer: Lightning's
  ``MisconfigurationException`` from the callbacks, ``ValueError`` from everything else (the library's
  convention, wrong types included); the message names the argument in backticks and says what it
  ``must`` be;
- any combination of valid values does not raise, so the checks are not stricter than the API;
- an unknown keyword is refused: by Python itself (``TypeError`` naming it) in a direct call, and by
  the library, with a suggestion, where keywords pass through it (``per_group``, ``LRAdaptation``'s
  factory);
- what only the model or the trainer can tell (patterns that match nothing, ``k`` larger than the
  parameter count, an optimizer without a threshold, a device this machine lacks) fails when fit
  sets up, with the same kind of message, before the first training step.
"""

from __future__ import annotations

import functools
import inspect
import math
import string

import lightning as L
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import DigitsClassifier, trainer
from torch import nn

from pf_lightning import (
    DriftAdaptiveLR,
    EdgeOfStabilityMonitor,
    HessianEigenMonitor,
    HessianOperator,
    LRAdaptation,
    ParameterSpace,
    PreconditionedOperator,
    ProbeSet,
    SharpnessCappedLR,
    batch_sharpness,
    critical_sharpness,
    gradient_curvature,
    hessian_density,
    hessian_eigenpairs,
    hessian_trace,
    output_loss,
    parameter_groups,
)

SETTINGS = settings(
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


# -- the model the functions measure ---------------------------------------------------------------
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))  # 11 parameters


N_PARAMS = 11


def loss_fn(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((module(x) - y) ** 2).mean()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(2)]


def sgd(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


@functools.cache
def previous_result():
    return hessian_eigenpairs(model(), loss_fn, batches(), k=1)


# -- bad values, by what the argument is -----------------------------------------------------------
objects = st.sampled_from([object(), [1], (2,), {"a": 1}, 1j, b"1", frozenset()])
text = st.text(alphabet=string.ascii_letters + string.digits + "._-", max_size=6)
numeric_strings = st.sampled_from(["0.5", "1", "1e-3", "nan", ""])


def bad_int(minimum: int, maximum: int | None = None, none_ok: bool = False):
    wrong_type = st.one_of(
        numeric_strings,
        st.booleans(),
        st.floats(allow_nan=True, allow_infinity=True),  # 2.0 included: a float is not a count
        objects,
        *([] if none_ok else [st.none()]),
    )
    out_of_range = st.integers(max_value=minimum - 1)
    if maximum is not None:
        out_of_range = st.one_of(out_of_range, st.integers(min_value=maximum + 1))
    return st.one_of(wrong_type, out_of_range)


def good_int(minimum: int, maximum: int = 10_000, none_ok: bool = False):
    return st.one_of(st.integers(minimum, maximum), *([st.none()] if none_ok else []))


def bad_number(above=None, at_least=None, below=None, none_ok: bool = False):
    low = above if above is not None else at_least
    out_of_range = (
        [st.floats(max_value=low, exclude_max=at_least is not None, allow_nan=False)]
        if low is not None
        else []
    )
    out_of_range += [st.floats(min_value=below, allow_nan=False)] if below is not None else []
    return st.one_of(
        numeric_strings,
        st.booleans(),
        objects,
        st.sampled_from([float("nan"), float("inf"), float("-inf")]),
        *out_of_range,
        *([] if none_ok else [st.none()]),
    )


def good_number(above=None, at_least=None, below=None, none_ok: bool = False):
    low = above if above is not None else at_least
    floats = st.floats(
        min_value=low if low is not None else -1e6,
        max_value=below if below is not None else 1e6,
        exclude_min=above is not None,
        exclude_max=below is not None,
        allow_nan=False,
        allow_infinity=False,
    )
    return st.one_of(floats, *([st.none()] if none_ok else []))


def bad_choice(choices):
    choices = sorted(choices)  # a set's order changes with the hash seed; the draws must not
    return st.one_of(
        text.filter(lambda s: s not in choices),
        st.sampled_from([c.upper() for c in choices if c.upper() not in choices]),
        st.none(),
        st.integers(),
        st.just(list(choices)[:1]),
    )


bad_flag = st.one_of(st.integers(0, 1), st.sampled_from(["True", "no", None, 1.0]), objects)
bad_dtype = st.sampled_from(
    [torch.int64, torch.int32, torch.float16, torch.complex64, torch.bool, "float32", 32]
)
good_dtype = st.sampled_from([None, torch.float32, torch.float64])
bad_device = st.sampled_from(["gpu0", "", "CPU", "meta", "cuda:x", 0, 1.5, True, ["cpu"], object()])
good_device = st.sampled_from([None, "cpu", torch.device("cpu")])
bad_patterns = st.sampled_from([5, "", [], [""], ["0.*", 3], {"a": "0.*"}, True, b"0.*"])
bad_tag = st.sampled_from(["", "a/b", "a b", "tab\t", "\n", 5, True, ["a"]])
good_tag = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_.\-]{1,12}", fullmatch=True))
bad_seed = st.one_of(bad_int(0, 2**32 - 1), st.just(2**70))
good_seed = st.integers(0, 2**32 - 1)


def bad_callable(n_args: int, none_ok: bool = True):
    wrong_arity = [lambda: 0, lambda a, b, c, d: 0] if n_args != 1 else [lambda: 0, lambda a, b: 0]
    return st.one_of(st.sampled_from(["loss", 5, object(), *wrong_arity]), *([] if none_ok else [st.none()]))


bad_batches = st.sampled_from([None, 5, 1.5, "abc", b"ab", [], (), object(), True])

# -- the tables: argument -> (valid values, bad values) ----------------------------------------------
HESSIAN_MONITOR = {
    "k": (good_int(1, 20), bad_int(1)),
    "every_n_steps": (good_int(1, none_ok=True), bad_int(1, none_ok=True)),
    "probe": (
        st.one_of(st.none(), st.integers(1, 4096), st.just(batches())),
        st.one_of(
            st.integers(max_value=0), st.sampled_from([1.5, "abc", True, [], torch.zeros(3), {"x": 1}])
        ),
    ),
    "loss_fn": (st.sampled_from([None, loss_fn, lambda m, b: b]), bad_callable(2)),
    "which": (st.sampled_from(["top", "both"]), bad_choice({"top", "both"}) | st.just("bottom")),
    "every_n_epochs": (good_int(1, none_ok=True), bad_int(1, none_ok=True)),
    "at_fit_start": (st.booleans(), bad_flag),
    "at_fit_end": (st.booleans(), bad_flag),
    "warmup_steps": (good_int(0), bad_int(0)),
    "hvp": (
        st.sampled_from(["auto", "double_backward", "forward_over_reverse", "finite_difference"]),
        bad_choice({"auto", "double_backward", "forward_over_reverse", "finite_difference"}),
    ),
    "tol": (good_number(above=0, below=1), bad_number(above=0, below=1)),
    "max_hvp": (good_int(40, none_ok=True), bad_int(1, none_ok=True)),  # a product per pair for any good k
    "warm_start": (st.booleans(), bad_flag),
    "stderr_every": (good_int(1, none_ok=True), bad_int(1, none_ok=True)),
    "probe_batch_size": (st.one_of(good_int(1, none_ok=True), st.just("loader")), bad_int(1, none_ok=True)),
    "max_work_fraction": (
        good_number(above=0, none_ok=True),
        bad_number(above=0, none_ok=True),
    ),
    "max_time_fraction": (
        good_number(above=0, none_ok=True),
        bad_number(above=0, none_ok=True),
    ),
    "params": (st.sampled_from([None, "0.*", ["0.*", "2.weight"], ("*",)]), bad_patterns),
    "dtype": (st.sampled_from([None, torch.float32, torch.float64, torch.bfloat16]), bad_dtype),
    "max_history": (good_int(1), bad_int(1)),
    "name": (good_tag, bad_tag),
    "seed": (good_seed, bad_seed),
    "trace_every": (good_int(1, none_ok=True), bad_int(1, none_ok=True)),
    "trace_hvp": (good_int(4), bad_int(4)),
    "density_every": (good_int(1, none_ok=True), bad_int(1, none_ok=True)),
    "density_steps": (good_int(2), bad_int(2)),
    "basis_device": (good_device, bad_device),
    "basis_size": (good_int(41, 100, none_ok=True), bad_int(2, none_ok=True)),  # above 2k for any good k
    "checkpoint_eigenvectors": (st.booleans(), bad_flag),
    "on_error": (st.sampled_from(["skip", "raise"]), bad_choice({"skip", "raise"})),
    "method": (st.sampled_from(["auto", "lanczos", "lobpcg"]), bad_choice({"auto", "lanczos", "lobpcg"})),
}

EOS_MONITOR = {
    "monitor": (
        st.sampled_from([None, HessianEigenMonitor(k=1)]),
        st.sampled_from([5, "monitor", object(), sgd()]),
    ),
    "optimizer_index": (good_int(0), bad_int(0)),
    "threshold": (good_number(above=0, none_ok=True), bad_number(above=0, none_ok=True)),
    "warn_ratio": (good_number(above=0), bad_number(above=0)),
    "on_warning": (st.sampled_from([None, lambda t, m, x: None]), bad_callable(3)),
    "proxies": (st.booleans(), bad_flag),
    "proxy_every_n_steps": (good_int(1), bad_int(1)),
    "loss_window": (good_int(2), bad_int(2)),
    "slope_window": (good_int(2), bad_int(2)),
    "chart_every": (good_int(1), bad_int(1)),
    "on_error": (st.sampled_from(["skip", "raise"]), bad_choice({"skip", "raise"})),
    "batch_sharpness": (st.sampled_from([None, True, False]), bad_flag.filter(lambda v: v is not None)),
    "batch_sharpness_batches": (good_int(2), bad_int(2)),
    "batch_sharpness_rel_stderr": (good_number(above=0, below=1), bad_number(above=0, below=1)),
    "critical_every_n_steps": (good_int(1, none_ok=True), bad_int(1, none_ok=True)),
}

LR_ADAPTATION = {
    "scheduler": (
        st.sampled_from(
            [
                None,
                DriftAdaptiveLR,
                functools.partial(DriftAdaptiveLR, p=2.0, max_lr=1.0),
                functools.partial(SharpnessCappedLR, fraction=0.5),
                lambda opt: DriftAdaptiveLR(opt),
            ]
        ),
        st.sampled_from(
            [
                3,
                "DriftAdaptiveLR",
                lambda: None,
                functools.partial(DriftAdaptiveLR, p=-1.0),
                functools.partial(DriftAdaptiveLR, max_lr="5"),
                functools.partial(SharpnessCappedLR, fraction=float("nan")),
                functools.partial(DriftAdaptiveLR, 2.0),  # binds the optimizer's place
            ]
        ),
    ),
    "optimizer_index": (good_int(0), bad_int(0)),
    "every_n_steps": (good_int(1), bad_int(1)),
    "hvp": (
        st.sampled_from(["forward_difference", "auto", "double_backward"]),
        bad_choice(
            {"forward_difference", "auto", "double_backward", "forward_over_reverse", "finite_difference"}
        ),
    ),
    "loss_fn": (st.sampled_from([None, loss_fn]), bad_callable(2)),
    "params": (st.sampled_from([None, "net.*", ["net.0.*"]]), bad_patterns),
    "seed": (good_seed, bad_seed),
    "on_error": (st.sampled_from(["skip", "raise"]), bad_choice({"skip", "raise"})),
}

DRIFT_ADAPTIVE_LR = {
    "optimizer": (st.builds(sgd), st.sampled_from([None, "sgd", [nn.Parameter(torch.zeros(1))], object()])),
    "p": (good_number(at_least=0), bad_number(at_least=0)),
    "max_lr": (good_number(above=0), bad_number(above=0)),
    "window": (
        st.one_of(
            st.none(),
            st.tuples(st.integers(0, 50), st.none()),
            st.integers(0, 50).flatmap(lambda a: st.tuples(st.just(a), st.integers(a + 1, 100))),
        ),
        st.sampled_from(
            [(5, 5), (6, 2), (-1, 3), (1,), (1, 2, 3), (1.5, 3), ("0", 3), (0, 2.0), (True, 3), 5, "0,10"]
        ),
    ),
    "warmup_steps": (good_int(0), bad_int(0)),
    "last_epoch": (st.just(-1), bad_int(-1)),
}

SHARPNESS_CAPPED_LR = {
    "optimizer": DRIFT_ADAPTIVE_LR["optimizer"],
    "fraction": (good_number(above=0), bad_number(above=0)),
    "base": (st.none(), st.sampled_from([5, "cosine", torch.optim.lr_scheduler.StepLR(sgd(), 3)])),
    "last_epoch": (st.just(-1), bad_int(-1)),
}

COMMON_MEASUREMENT = {
    "hvp": HESSIAN_MONITOR["hvp"],
    "seed": (good_seed, bad_seed),
    "params": (st.sampled_from([None, "0.*", ["0.weight", "2.*"]]), bad_patterns),
    "dtype": (good_dtype, bad_dtype),
}

HESSIAN_OPERATOR = {
    "model": (st.builds(model), st.sampled_from([None, 5, "model", loss_fn])),
    "loss_fn": (st.just(loss_fn), bad_callable(2, none_ok=False)),
    "probe": (st.sampled_from([batches(), batches()[0], ProbeSet(batches())]), bad_batches),
    "cache_graphs": (st.booleans(), bad_flag),
    "weights": (
        st.sampled_from([None, [1, 2], [0.5, 0.5]]),
        st.sampled_from([5, "ab", [1], [1, 0], [1, float("nan")], [1, float("inf")], [True, 1], ["1", "2"]]),
    ),
    **COMMON_MEASUREMENT,
}

HESSIAN_EIGENPAIRS = {
    "model": HESSIAN_OPERATOR["model"],
    "loss_fn": HESSIAN_OPERATOR["loss_fn"],
    "batches": (st.sampled_from([batches(), batches()[0], ProbeSet(batches())]), bad_batches),
    "k": (good_int(1, 3), bad_int(1) | st.integers(N_PARAMS + 1, 10**9)),
    "which": (st.sampled_from(["top", "bottom", "both"]), bad_choice({"top", "bottom", "both"})),
    "tol": (good_number(above=1e-4, below=1), bad_number(above=0, below=1)),
    "max_hvp": (
        good_int(6, 400, none_ok=True),
        bad_int(1, none_ok=True),
    ),  # a product per pair for any good k
    "warm_start": (
        st.one_of(st.none(), st.builds(previous_result)),
        st.sampled_from([5, "previous", True, object()]),
    ),
    "method": (st.sampled_from(["auto", "lanczos", "lobpcg"]), bad_choice({"auto", "lanczos", "lobpcg"})),
    "preconditioner": (
        st.sampled_from([None, torch.ones(N_PARAMS), torch.full((N_PARAMS,), 2.0)]),
        st.sampled_from(
            [
                5,
                "adam",
                [1.0] * N_PARAMS,
                torch.ones(3),
                torch.zeros(N_PARAMS),
                torch.full((N_PARAMS,), float("nan")),
            ]
        ),
    ),
    "weights": (
        st.sampled_from([None, [1, 2], [0.5, 0.5]]),
        st.sampled_from([5, "ab", [1], [1, 0], [1, float("nan")], [1, float("inf")], [True, 1], ["1", "2"]]),
    ),
    "cache_graphs": (st.booleans(), bad_flag),
    "basis_device": (good_device, bad_device),
    "basis_size": (good_int(7, 40, none_ok=True), bad_int(2, none_ok=True)),  # above 2k for any good k
    "gradient": (st.booleans(), bad_flag),
    **COMMON_MEASUREMENT,
}

HESSIAN_TRACE = {
    "model": HESSIAN_OPERATOR["model"],
    "loss_fn": HESSIAN_OPERATOR["loss_fn"],
    "batches": HESSIAN_EIGENPAIRS["batches"],
    "n_hvp": (good_int(3, 30), bad_int(3)),
    "method": (st.sampled_from(["hutch++", "hutchinson"]), bad_choice({"hutch++", "hutchinson"})),
    "probe_seed": (good_seed | st.none(), st.one_of(bad_int(0, 2**32 - 1, none_ok=True), st.just(2**70))),
    **COMMON_MEASUREMENT,
}

HESSIAN_DENSITY = {
    "model": HESSIAN_OPERATOR["model"],
    "loss_fn": HESSIAN_OPERATOR["loss_fn"],
    "batches": HESSIAN_EIGENPAIRS["batches"],
    "n_steps": (good_int(2, 30), bad_int(2)),
    "n_vectors": (good_int(1, 3), bad_int(1)),
    "probe_seed": (good_seed | st.none(), st.one_of(bad_int(0, 2**32 - 1, none_ok=True), st.just(2**70))),
    **COMMON_MEASUREMENT,
}

BATCH_SHARPNESS = {
    "model": HESSIAN_OPERATOR["model"],
    "loss_fn": HESSIAN_OPERATOR["loss_fn"],
    "batches": (st.sampled_from([batches()]), bad_batches | st.just(torch.ones(3))),
    "rel_stderr": (good_number(above=0, below=10, none_ok=True), bad_number(above=0, none_ok=True)),
    "max_batches": (good_int(1, 5, none_ok=True), bad_int(1, none_ok=True)),
    "optimizer": (st.none(), st.sampled_from([5, "sgd", object(), torch.ones(3)])),
    **COMMON_MEASUREMENT,
}

CRITICAL_SHARPNESS = {
    "model": HESSIAN_OPERATOR["model"],
    "loss_fn": HESSIAN_OPERATOR["loss_fn"],
    "batches": HESSIAN_EIGENPAIRS["batches"],
    "direction": (
        st.none(),
        st.sampled_from(
            [
                5,
                "down",
                torch.ones(3),
                torch.ones(N_PARAMS, 1),
                torch.zeros(N_PARAMS),
                torch.full((N_PARAMS,), math.nan),
            ]
        ),
    ),
    "initial_step": (good_number(above=1e-3, below=1.0), bad_number(above=0)),
    "rel_tol": (good_number(above=1e-3, below=0.5), bad_number(above=0, below=1)),
    "max_forward": (good_int(40, 80), bad_int(4)),
    "optimizer": (st.none(), st.sampled_from([5, "sgd", object(), torch.ones(3)])),
    "gradient_clip": (
        st.sampled_from([None, (1.0, "norm"), (0.5, "value")]),
        st.sampled_from(
            [(0.0, "norm"), (-1.0, "value"), (math.nan, "norm"), (1.0, "l1"), 1.0, "norm", (1.0,)]
        ),
    ),
    "seed": COMMON_MEASUREMENT["seed"],
    "params": COMMON_MEASUREMENT["params"],
    "dtype": COMMON_MEASUREMENT["dtype"],
}

PARAMETER_SPACE = {
    "model": HESSIAN_OPERATOR["model"],
    "patterns": COMMON_MEASUREMENT["params"],
    "dtype": (st.sampled_from([None, torch.float32, torch.float64, torch.bfloat16]), bad_dtype),
}

PROBE_SET = {
    "batches": HESSIAN_EIGENPAIRS["batches"],
    "weights": HESSIAN_EIGENPAIRS["weights"],
    "device": (good_device, bad_device),
}


def _operator():
    return HessianOperator(model(), loss_fn, batches())


PRECONDITIONED_OPERATOR = {
    "base": (st.builds(_operator), st.sampled_from([None, 5, model(), torch.eye(N_PARAMS)])),
    "diagonal": HESSIAN_EIGENPAIRS["preconditioner"][0].filter(lambda d: d is not None),
}
PRECONDITIONED_OPERATOR["diagonal"] = (
    PRECONDITIONED_OPERATOR["diagonal"],
    HESSIAN_EIGENPAIRS["preconditioner"][1],
)
PRECONDITIONED_OPERATOR["shift"] = (
    st.sampled_from([None, torch.zeros(N_PARAMS), torch.full((N_PARAMS,), 0.1)]),
    st.sampled_from(
        [5, torch.full((N_PARAMS,), -1.0), torch.zeros(N_PARAMS + 1), torch.full((N_PARAMS,), float("nan"))]
    ),
)

GRADIENT_CURVATURE = {
    "op": (st.builds(_operator), st.sampled_from([None, 5, model(), torch.eye(N_PARAMS)])),
    "method": (
        st.sampled_from(["operator", "forward_difference"]),
        bad_choice({"operator", "forward_difference"}),
    ),
    "weight_decay": (
        st.sampled_from([None, torch.zeros(N_PARAMS), torch.full((N_PARAMS,), 0.1)]),
        st.sampled_from([5, 0.1, torch.zeros(N_PARAMS - 1), torch.zeros(N_PARAMS, 1)]),
    ),
}

PARAMETER_GROUPS = {
    "model": HESSIAN_OPERATOR["model"],
    "depth": (good_int(1, 5), bad_int(1)),
}


class _LossModel(nn.Module):
    """A model that computes its own loss (Hugging Face style), for ``output_loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.weight * x).sum()}


OUTPUT_LOSS = {"model": (st.builds(_LossModel), st.sampled_from([None, 5, "model", object(), loss_fn]))}


def _gradient_curvature(op, method="operator", weight_decay=None):
    if not isinstance(op, HessianOperator):
        return gradient_curvature(op, method, weight_decay)
    with op:
        return gradient_curvature(op, method, weight_decay)


def _output_loss(model):
    return output_loss(model, {"x": torch.ones(2)})


# target: (callable taking the table's arguments as keywords, table, exception of its layer)
TARGETS = {
    "HessianEigenMonitor": (HessianEigenMonitor, HESSIAN_MONITOR, MisconfigurationException),
    "EdgeOfStabilityMonitor": (EdgeOfStabilityMonitor, EOS_MONITOR, MisconfigurationException),
    "LRAdaptation": (LRAdaptation, LR_ADAPTATION, MisconfigurationException),
    "DriftAdaptiveLR": (DriftAdaptiveLR, DRIFT_ADAPTIVE_LR, ValueError),
    "SharpnessCappedLR": (SharpnessCappedLR, SHARPNESS_CAPPED_LR, ValueError),
    "HessianOperator": (HessianOperator, HESSIAN_OPERATOR, ValueError),
    "ParameterSpace": (ParameterSpace, PARAMETER_SPACE, ValueError),
    "PreconditionedOperator": (PreconditionedOperator, PRECONDITIONED_OPERATOR, ValueError),
    "ProbeSet": (ProbeSet, PROBE_SET, ValueError),
    "hessian_eigenpairs": (hessian_eigenpairs, HESSIAN_EIGENPAIRS, ValueError),
    "hessian_trace": (hessian_trace, HESSIAN_TRACE, ValueError),
    "hessian_density": (hessian_density, HESSIAN_DENSITY, ValueError),
    "batch_sharpness": (batch_sharpness, BATCH_SHARPNESS, ValueError),
    "critical_sharpness": (critical_sharpness, CRITICAL_SHARPNESS, ValueError),
    "gradient_curvature": (_gradient_curvature, GRADIENT_CURVATURE, ValueError),
    "output_loss": (_output_loss, OUTPUT_LOSS, ValueError),
    "parameter_groups": (parameter_groups, PARAMETER_GROUPS, ValueError),
}


def _consistent(target: str, kwargs: dict, bad: str | None = None) -> dict:
    """Make the valid arguments agree with each other (and leave the bad one the only fault)."""
    if "weights" in kwargs:
        key = "probe" if "probe" in kwargs else "batches"
        if bad == "weights":
            kwargs[key] = batches()  # two batches: a one-element weight list is then wrong
        elif bad != key and isinstance(kwargs[key], tuple) and kwargs["weights"] is not None:
            kwargs["weights"] = [1.0]  # one batch, one weight
    if target == "critical_sharpness" and kwargs.get("direction") is not None:
        if bad == "gradient_clip":
            kwargs["direction"] = None  # the clip's own fault, not its clash with a direction
        else:
            kwargs["gradient_clip"] = None  # a clip applies to the gradient, not to a given direction
    if (
        target == "HessianEigenMonitor"
        and kwargs.get("method") == "lobpcg"
        and bad not in ("basis_size", "method")
    ):
        kwargs["basis_size"] = None  # a Lanczos setting, which LOBPCG refuses
        if kwargs.get("max_hvp") is not None and bad not in ("max_hvp", "k"):
            wanted = 2 * kwargs["k"] if kwargs.get("which") == "both" else kwargs["k"]
            kwargs["max_hvp"] = max(kwargs["max_hvp"], wanted + max(2, wanted // 2))  # one block
    if target == "hessian_eigenpairs":
        if bad in ("preconditioner", "warm_start"):
            kwargs["params"] = None
        elif kwargs["params"] is not None:  # a diagonal or a previous result on all 11 parameters
            kwargs["preconditioner"], kwargs["warm_start"] = None, None
        if bad != "warm_start" and kwargs["which"] == "bottom":
            kwargs["warm_start"] = None  # the previous result is a top one: it cannot start the other end
        if bad == "k" or (kwargs["method"] == "lobpcg" and bad not in ("basis_size", "method")):
            kwargs["basis_size"] = None  # a Lanczos setting, which LOBPCG refuses; above a good k only
        if bad == "k":
            kwargs["max_hvp"] = None  # a product per pair of a good k only
        if kwargs["method"] == "lobpcg" and kwargs["max_hvp"] is not None and bad != "max_hvp":
            kwargs["max_hvp"] = max(kwargs["max_hvp"], 12)  # one LOBPCG block (k = 3, both ends: 9)
    return kwargs


def _valid(target: str, data, skip: str | None = None) -> dict:
    _, table, _ = TARGETS[target]
    kwargs = {name: data.draw(valid, label=name) for name, (valid, _) in table.items() if name != skip}
    return kwargs if skip else _consistent(target, kwargs)


CASES = [(target, argument) for target, (_, table, _) in TARGETS.items() for argument in table]


@pytest.mark.parametrize(("target", "argument"), CASES, ids=[f"{t}-{a}" for t, a in CASES])
@SETTINGS
@given(data=st.data())
def test_a_bad_value_fails_at_construction_naming_the_argument(target, argument, data):
    build, table, error = TARGETS[target]
    kwargs = _valid(target, data, skip=argument)
    kwargs[argument] = data.draw(table[argument][1], label=f"bad {argument}")
    kwargs = _consistent(target, kwargs, bad=argument)
    with pytest.raises(Exception) as info:
        build(**kwargs)
    err = info.value
    other = ValueError if error is MisconfigurationException else MisconfigurationException
    assert isinstance(err, error) and not isinstance(err, other), f"{type(err).__name__}: {err}"
    message = str(err)
    assert f"`{argument}`" in message, message
    assert "must" in message, message


@pytest.mark.parametrize("target", list(TARGETS))
@settings(SETTINGS, max_examples=30)
@given(data=st.data())
def test_valid_values_are_accepted(target, data):
    build, _, _ = TARGETS[target]
    build(**_valid(target, data))


# -- unknown keywords ------------------------------------------------------------------------------
identifiers = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)
DIRECT = {name: TARGETS[name] for name in TARGETS if name not in ("gradient_curvature", "output_loss")}


@pytest.mark.parametrize("target", list(DIRECT))
@settings(SETTINGS, max_examples=10)
@given(data=st.data())
def test_an_unknown_keyword_in_a_direct_call_is_a_type_error_naming_it(target, data):
    build, table, _ = DIRECT[target]
    unknown = data.draw(identifiers.filter(lambda s: s not in table), label="unknown")
    with pytest.raises(TypeError, match=f"'{unknown}'"):
        build(**_valid(target, data), **{unknown: 1})


TYPOS = {"kk": "k", "every_n_step": "every_n_steps", "max_hvps": "max_hvp", "warmup": "warmup_steps"}


@SETTINGS
@given(unknown=identifiers.filter(lambda s: s not in HESSIAN_MONITOR) | st.sampled_from(list(TYPOS)))
def test_per_group_refuses_an_unknown_keyword_with_a_suggestion(unknown):
    with pytest.raises(MisconfigurationException) as info:
        HessianEigenMonitor.per_group({"head": "2.*"}, **{unknown: 1})
    message = str(info.value)
    assert f"`{unknown}`" in message and "must" in message, message
    if unknown in TYPOS:
        assert f"did you mean `{TYPOS[unknown]}`" in message, message


@pytest.mark.parametrize("argument", ["k", "tol", "hvp", "dtype", "seed", "basis_device"])
@SETTINGS
@given(data=st.data())
def test_per_group_passes_bad_values_on_to_the_constructor(argument, data):
    bad = data.draw(HESSIAN_MONITOR[argument][1])
    with pytest.raises(MisconfigurationException, match=f"`{argument}` must"):
        HessianEigenMonitor.per_group({"head": "2.*"}, **{argument: bad})


@pytest.mark.parametrize(
    "groups",
    [
        {},
        [],
        None,
        "2.*",
        {"a/b": "2.*"},
        {"": "2.*"},
        {"a b": "2.*"},
        {5: "2.*"},
        {"a": 5},
        {"a": []},
        {"a": ""},
    ],
)
def test_per_group_refuses_bad_groups(groups):
    with pytest.raises(MisconfigurationException, match="`groups` must"):
        HessianEigenMonitor.per_group(groups, k=1)


@SETTINGS
@given(unknown=identifiers.filter(lambda s: s not in DRIFT_ADAPTIVE_LR) | st.just("maxlr"))
def test_lr_adaptation_refuses_an_unknown_keyword_of_its_factory(unknown):
    with pytest.raises(MisconfigurationException) as info:
        LRAdaptation(functools.partial(DriftAdaptiveLR, **{unknown: 1.0}))
    message = str(info.value)
    assert f"`{unknown}`" in message and "`scheduler`" in message and "must" in message, message
    if unknown == "maxlr":
        assert "did you mean `max_lr`" in message


@pytest.mark.parametrize(("init_args", "argument"), [({"p": -2.0}, "p"), ({"max_lr": 0.0}, "max_lr")])
def test_a_yaml_scheduler_with_a_bad_value_fails_at_construction(init_args, argument):
    """LightningCLI builds ``scheduler:`` from a class_path as a partial of jsonargparse's instantiator."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LRAdaptation, "callback")
    scheduler = {"class_path": "pf_lightning.DriftAdaptiveLR", "init_args": init_args}
    config = parser.parse_object({"callback": {"scheduler": scheduler}})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    with pytest.raises(MisconfigurationException, match=f"`scheduler` must build .*`{argument}` must"):
        instantiate(config)


# -- what only the trainer can tell fails at set-up, before the first step ---------------------------
class _Counting(DigitsClassifier):
    """Counts training steps: none may run when the configuration is bad."""

    def __init__(self, optimizer_class: type | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.optimizer_class, self.steps = optimizer_class, 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        if self.optimizer_class is None:
            return super().configure_optimizers()
        return self.optimizer_class(self.parameters(), lr=0.1)


SETUP_CASES = {
    "params-match-nothing": (
        lambda: [HessianEigenMonitor(k=1, params="encoder.*", at_fit_start=False)],
        None,
        "params",
    ),
    "k-above-the-parameter-count": (lambda: [HessianEigenMonitor(k=2000, which="both")], None, "k"),
    "optimizer-without-a-threshold": (
        lambda: [HessianEigenMonitor(k=1), EdgeOfStabilityMonitor()],  # the monitor measures first
        torch.optim.Rprop,
        "threshold",
    ),
    "lr-adaptation-params": (
        lambda: [LRAdaptation(functools.partial(DriftAdaptiveLR), params="encoder.*")],
        None,
        "params",
    ),
}
if not torch.cuda.is_available():
    SETUP_CASES["missing-device"] = (
        lambda: [HessianEigenMonitor(k=1, basis_device="cuda")],
        None,
        "basis_device",
    )


@pytest.mark.parametrize("case", list(SETUP_CASES))
def test_what_needs_the_model_fails_at_setup_before_the_first_step(tmp_path, case):
    callbacks, optimizer_class, argument = SETUP_CASES[case]
    callbacks = callbacks()
    model = _Counting(optimizer_class, n=64)
    before = [p.detach().clone() for p in model.parameters()]
    L.seed_everything(0)
    with pytest.raises(MisconfigurationException, match=f"`{argument}` must"):
        trainer(tmp_path, max_steps=3, callbacks=callbacks).fit(model)
    assert model.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(not getattr(cb, "history", []) for cb in callbacks)


REAL = {"gradient_curvature": gradient_curvature, "output_loss": output_loss}
NOT_FUZZED = {"output_loss": {"batch"}}  # any batch the model takes


@pytest.mark.parametrize("target", list(TARGETS))
def test_the_tables_cover_every_argument(target):
    """A new argument needs its row here: valid values and bad ones."""
    build, table, _ = TARGETS[target]
    names = set(inspect.signature(REAL.get(target, build)).parameters) - {"self"}
    assert names - NOT_FUZZED.get(target, set()) == set(table)
