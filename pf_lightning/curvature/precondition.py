r"""Diagonal preconditioners read from an optimizer's state.

Adam's effective step is :math:`\eta P_t^{-1} m_t` with (Cohen et al. 2022, ``src/adam.py``)

.. math::  P_t = (1 - \beta_1^t)\left(\sqrt{\nu_t / (1 - \beta_2^t)} + \epsilon\right),

:math:`\nu_t` being ``exp_avg_sq``; the learning rate is *not* part of :math:`P_t`. RMSprop is the
case :math:`\beta_1 = 0` without bias correction: :math:`P = \sqrt{\nu} + \epsilon`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._validation import Checks
from ..linalg.operator import LinearOperator
from .distributed import local_part
from .params import ParameterSpace

_check = Checks()

__all__ = [
    "ADAM_FAMILY",
    "PRECONDITIONER_WARMUP_STEPS",
    "PreconditionedOperator",
    "PreconditionerUnavailable",
    "adam_preconditioner",
    "check_diagonal",
    "optimizer_steps",
]

ADAM_FAMILY = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop")

PRECONDITIONER_WARMUP_STEPS = 10
"""Optimizer steps before a preconditioned sharpness is compared with its threshold for warnings.

The threshold of Cohen et al. (2022) holds for a frozen preconditioner ``P``. After ``t`` Adam steps the
bias-corrected second moment is about the mean of ``t`` squared gradients, so ``P`` moves by about
``1/(2t)`` per step, and the first-moment correction ``1 - beta1^t`` moves it by 90%, 42%, 22%, ... in the
first steps; from ``t = 10`` (``1/(1 - beta1)`` for the default ``beta1 = 0.9``) each moves it by about 5%
a step. Measured on the digits MLP of ``pf_lightning.demos`` (Adam, full batch and batches of 128): the
ratio is 8-2600x the threshold after step 1 and up to 10x after step 2 while the loss falls, and below 1
from step 5 on except in a run that truly diverged (lr 3e-2); the real crossings came at steps 15
(lr 1e-2) and about 300 (lr 1e-3), which a warm-up of ``1/(1 - beta2) = 1000`` steps would have hidden.
"""


class PreconditionerUnavailable(RuntimeError):
    """The optimizer has no second-moment state yet (before its first step) or is not Adam-like."""


def _step_of(state: dict) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, Tensor) else step)


def adam_preconditioner(optimizer: torch.optim.Optimizer, space: ParameterSpace) -> Tensor:
    """The flat diagonal of ``P_t`` for the parameters of ``space``.

    Raises:
        PreconditionerUnavailable: the optimizer is not Adam-family, a parameter is not in it, or a
            parameter has no state yet (measure after the first optimizer step).
    """
    kind = type(optimizer).__name__
    if kind not in ADAM_FAMILY:
        raise PreconditionerUnavailable(f"{kind} has no diagonal preconditioner; Adam-family optimizers do")
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces = []
    for name, p in zip(space.names, space.params, strict=True):
        group = group_of.get(id(p))
        if group is None:
            raise PreconditionerUnavailable(f"parameter {name!r} is not optimized by this {kind}")
        state = optimizer.state.get(p, {})
        nu = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
        nu = state.get("exp_avg_sq", state.get("square_avg")) if nu is None else nu
        if nu is None or _step_of(state) < 1:
            raise PreconditionerUnavailable(
                f"{kind} has no second-moment state for {name!r} yet: measure after the first step"
            )
        nu = local_part(nu)  # FSDP2 keeps optimizer state as DTensors shaped like the parameters
        eps = float(group["eps"])
        if kind == "RMSprop":
            pieces.append(nu.detach().sqrt().add(eps).reshape(-1))
            continue
        beta1, beta2 = (float(b) for b in group["betas"])
        t = _step_of(state)
        bias2 = 1.0 - beta2**t
        pieces.append(((nu.detach() / bias2).sqrt().add(eps) * (1.0 - beta1**t)).reshape(-1))
    return torch.cat(pieces).to(space.dtype)


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """The steps ``optimizer`` has taken, from its per-parameter ``step`` state (the fewest; 0 before any)."""
    return int(min((_step_of(state) for state in optimizer.state.values()), default=0.0))


def check_diagonal(name: str, diagonal: Any, n: int) -> None:
    """``diagonal`` is a flat Tensor of ``n`` positive, finite entries (``ValueError`` naming ``name``)."""
    expected = f"a flat Tensor of shape ({n},) with positive, finite entries (e.g. from adam_preconditioner)"
    _check.instance(name, diagonal, Tensor, expected)
    if diagonal.shape != (n,) or diagonal.is_complex() or diagonal.dtype == torch.bool:
        _check.fail(
            name, expected, diagonal, f"its shape is {tuple(diagonal.shape)} and its dtype {diagonal.dtype}"
        )
    if not bool((diagonal > 0).all()) or not bool(torch.isfinite(diagonal).all()):
        _check.fail(name, expected, diagonal, "some entries are not positive and finite")


class PreconditionedOperator(LinearOperator):
    r"""The preconditioned Hessian :math:`P^{-1/2} H P^{-1/2}` for a diagonal preconditioner ``P``.

    Its eigenvalues are those of :math:`P^{-1} H`; for Adam, :math:`\lambda_{max}` is the
    *preconditioned sharpness* whose stability threshold is :math:`(2 + 2\beta_1)/((1-\beta_1)\eta)`
    (Cohen et al. 2022, REFERENCE §1.2).

    Args:
        base: the Hessian operator.
        diagonal: the flat, positive diagonal of ``P`` (e.g. from :func:`adam_preconditioner`).
    """

    def __init__(self, base: LinearOperator, diagonal: Tensor) -> None:
        _check.instance("base", base, LinearOperator, "a LinearOperator such as a HessianOperator")
        check_diagonal("diagonal", diagonal, base.n)
        super().__init__(base.n, base.dtype, base.device)
        self.base = base
        self.scale = diagonal.to(device=base.device, dtype=base.dtype).rsqrt()[:, None]

    @property
    def global_n(self) -> int:
        return self.base.global_n

    def _matmat(self, X: Tensor) -> Tensor:
        return self.scale * self.base.matmat(self.scale * X)

    def inner(self, X: Tensor, Y: Tensor) -> Tensor:
        return self.base.inner(X, Y)

    def local_rows(self, X: Tensor) -> Tensor:
        return self.base.local_rows(X)
