r"""An optimizer's state over the measured parameters: its preconditioned view of the Hessian, its weight
decay and its next update, each from the optimizer's rule.

What ``P`` is for each optimizer (Adam's :math:`(1 - \beta_1^t)(\sqrt{\nu_t/(1 - \beta_2^t)} + \epsilon)`,
Adamax's :math:`(1 - \beta_1^t)u_t`, RMSprop's :math:`\sqrt{\nu} + \epsilon`, ...) is the optimizer's rule
in :mod:`pf_lightning.stability.optimizers`; this module lays the per-parameter diagonals out over a
:class:`~pf_lightning.curvature.ParameterSpace` and applies :math:`P^{-1/2}(H + W)P^{-1/2}`, with ``W``
the coupled weight decay of each parameter's group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._validation import Checks
from ..linalg.operator import LinearOperator
from ..stability.optimizers import (
    PreconditionerUnavailable,
    UnsupportedOptimizer,
    coupled_weight_decay,
    group_settings,
    has_stepped,
    optimizer_rule,
    parameter_preconditioner,
    step_dynamics,
)
from .distributed import local_part
from .params import ParameterSpace

_check = Checks()

__all__ = [
    "PreconditionedOperator",
    "PreconditionerUnavailable",
    "check_diagonal",
    "optimizer_preconditioner",
    "optimizer_update",
    "optimizer_weight_decay",
]


def _group_indices(optimizer: torch.optim.Optimizer, space: ParameterSpace) -> list[int | None]:
    """The index of the parameter group that optimizes each parameter of ``space`` (None: none does)."""
    group_of = {
        id(p): index for index, settings in enumerate(optimizer.param_groups) for p in settings["params"]
    }
    return [group_of.get(id(p)) for p in space.params]


def _step(optimizer: torch.optim.Optimizer, group: int) -> float:
    """The step ``eta`` of the group's update (its rate, with Adagrad's decay), 0 for a group at rate 0."""
    if float(optimizer.param_groups[group]["lr"]) == 0.0:
        return 0.0
    return step_dynamics(optimizer, group).lr


def optimizer_preconditioner(
    optimizer: torch.optim.Optimizer, space: ParameterSpace
) -> tuple[Tensor, Tensor]:
    r"""The flat diagonal of ``P`` and of the coupled weight decay ``W`` for the parameters of ``space``.

    ``P`` is relative to group 0's learning rate :math:`\eta_0`: a parameter of a group stepping at
    :math:`\eta_g` moves by :math:`-\eta_g P_g^{-1} m = -\eta_0 (P_g \eta_0/\eta_g)^{-1} m`, so its diagonal
    is the rule's :math:`P_g` times :math:`\eta_0/\eta_g`, and :math:`\lambda_{\max}(P^{-1}(H + W))` meets
    group 0's threshold where the groups step at different rates (layer-wise rates) with the same other
    settings. ``P`` is infinite (:math:`P^{-1} = 0`) for a parameter the optimizer's step does not move:
    one outside its groups (trained by another optimizer, or not at all), in a group at rate 0, or one it
    has not stepped while it has stepped others (a parameter that never had a gradient, as an unused head;
    see :func:`~pf_lightning.stability.has_stepped`). The step's dynamics are those of the block it moves.

    Raises:
        PreconditionerUnavailable: the optimizer does not precondition, or has stepped no parameter of
            ``space`` yet (measure after the first optimizer step).
    """
    groups = _group_indices(optimizer, space)
    stepped = [
        group is not None and has_stepped(optimizer, p) for p, group in zip(space.params, groups, strict=True)
    ]
    if not any(stepped):
        # The optimizer's own reason: it does not precondition, or it has not stepped yet.
        first = next((i for i, group in enumerate(groups) if group is not None), None)
        if first is None:
            raise PreconditionerUnavailable(
                f"no measured parameter is optimized by this {type(optimizer).__name__}"
            )
        try:
            parameter_preconditioner(optimizer, space.params[first], groups[first])
        except PreconditionerUnavailable as err:
            raise PreconditionerUnavailable(f"{err} (parameter {space.names[first]!r})") from err
        raise PreconditionerUnavailable(
            f"{type(optimizer).__name__} has stepped no measured parameter yet: measure after its first step"
        )
    rates: dict[int, float] = {}  # the steps of group 0 and of the groups measured, read once each

    def rate(index: int) -> float:
        if index not in rates:
            rates[index] = _step(optimizer, index)
        return rates[index]

    diagonals = []
    for name, p, group, moved in zip(space.names, space.params, groups, stepped, strict=True):
        if moved and group != 0 and rate(group) == 0.0 and rate(0) > 0.0:  # a group at rate 0 does not move
            moved = False
        if not moved:
            diagonals.append(
                torch.full((local_part(p).numel(),), torch.inf, dtype=space.dtype, device=space.device)
            )
            continue
        try:
            diagonal, _ = parameter_preconditioner(optimizer, p, group)
        except PreconditionerUnavailable as err:
            raise PreconditionerUnavailable(f"{err} (parameter {name!r})") from err
        local = local_part(diagonal)  # FSDP2 keeps optimizer state as DTensors
        local = local.reshape(-1).to(device=space.device, dtype=space.dtype)
        if group != 0 and rate(group) != rate(0) and rate(0) > 0.0:  # at group 0's rate 0 nothing is judged
            local = local * (rate(0) / rate(group))
        diagonals.append(local)
    return torch.cat(diagonals), optimizer_weight_decay(optimizer, space)


def optimizer_weight_decay(optimizer: torch.optim.Optimizer, space: ParameterSpace) -> Tensor:
    """The flat diagonal ``W`` of the weight decay that enters the gradient, per parameter of ``space``
    (the step sees ``H + W``; zero where decay is decoupled or off, and for a parameter outside the
    optimizer's groups)."""
    decays = [
        0.0 if group is None else coupled_weight_decay(optimizer, group)
        for group in _group_indices(optimizer, space)
    ]
    return torch.cat(
        [
            torch.full((n,), decay, dtype=space.dtype, device=space.device)
            for n, decay in zip(space.numels, decays, strict=True)
        ]
    )


def optimizer_update(optimizer: torch.optim.Optimizer, space: ParameterSpace, gradient: Tensor) -> Tensor:
    """The flat change of the parameters of ``space`` that ``optimizer``'s next step would make with the
    flat ``gradient`` (this rank's slices under FSDP2), from its state and without stepping it.

    Computed in float64 by the optimizer's rule (:attr:`~pf_lightning.stability.OptimizerRule.update`),
    one parameter at a time, each written into the result in the space's dtype: beside the result it
    holds float64 copies of one parameter (its gradient, state and value), never of the whole model.

    A parameter outside the optimizer's groups does not move (its change is 0), nor one in a group at rate 0
    where the rule's step scales with the rate (:attr:`~pf_lightning.stability.OptimizerRule.step_scales_with_lr`;
    ASGD's does not: its first step after a group's rate drops to 0 still moves by its ``eta``).

    Raises:
        UnsupportedOptimizer: the optimizer's rule has no update (or the optimizer no rule), or a group
            has ``maximize=True``.
    """
    rule = optimizer_rule(optimizer)
    if rule.update is None:
        raise UnsupportedOptimizer(
            f"the rule {rule.name!r} of {type(optimizer).__name__} has no `update`: its next step is unknown"
        )
    out = torch.zeros(gradient.shape, dtype=space.dtype, device=gradient.device)
    pieces = zip(space.params, space.unflatten(gradient.detach()), space.unflatten(out), strict=True)
    for (p, grad, target), group in zip(pieces, _group_indices(optimizer, space), strict=True):
        if group is None or (rule.step_scales_with_lr and float(optimizer.param_groups[group]["lr"]) == 0.0):
            continue  # not moved: its change stays 0
        state = {
            key: local_part(value).to(torch.float64)
            if isinstance(value, Tensor) and value.is_floating_point()
            else value
            for key, value in optimizer.state.get(p, {}).items()
        }
        param = local_part(p).detach().to(torch.float64)
        settings = group_settings(optimizer, group)  # refuses maximize=True
        grad = grad.to(torch.float64).reshape(param.shape)
        target.copy_(rule.update(settings, state, grad, param).reshape(target.shape))
    return out


def check_diagonal(
    name: str, diagonal: Any, n: int, allow_zero: bool = False, allow_inf: bool = False
) -> None:
    """``diagonal`` is a flat Tensor of ``n`` positive (or with ``allow_zero`` non-negative), finite (or
    with ``allow_inf`` possibly infinite) entries (``ValueError`` naming ``name``)."""
    sign = "non-negative" if allow_zero else "positive"
    bound = "not NaN" if allow_inf else "finite"
    expected = (
        f"a flat Tensor of shape ({n},) with {sign}, {bound} entries (e.g. from optimizer_preconditioner)"
    )
    _check.instance(name, diagonal, Tensor, expected)
    if diagonal.shape != (n,) or diagonal.is_complex() or diagonal.dtype == torch.bool:
        _check.fail(
            name, expected, diagonal, f"its shape is {tuple(diagonal.shape)} and its dtype {diagonal.dtype}"
        )
    low = diagonal >= 0 if allow_zero else diagonal > 0
    high = ~torch.isnan(diagonal) if allow_inf else torch.isfinite(diagonal)
    if not bool(low.all()) or not bool(high.all()):
        _check.fail(name, expected, diagonal, f"some entries are not {sign} and {bound}")


class PreconditionedOperator(LinearOperator):
    r"""The preconditioned Hessian :math:`P^{-1/2} (H + W) P^{-1/2}` for diagonal ``P`` and ``W``.

    Its eigenvalues are those of :math:`P^{-1}(H + W)`; for Adam, :math:`\lambda_{max}` is the
    *preconditioned sharpness* whose stability threshold is :math:`(2 + 2\beta_1)/((1-\beta_1)\eta)`
    (Cohen et al. 2022, REFERENCE §1.2). ``W`` is the weight decay that enters the gradient (L2 decay
    coupled into the update), zero by default.

    Args:
        base: the Hessian operator.
        diagonal: the flat, positive diagonal of ``P`` (e.g. from :func:`optimizer_preconditioner`);
            ``inf`` where the step does not move a parameter (its rows and columns are then zero).
        shift: the flat diagonal of ``W``, or None.
    """

    def __init__(self, base: LinearOperator, diagonal: Tensor, shift: Tensor | None = None) -> None:
        _check.instance("base", base, LinearOperator, "a LinearOperator such as a HessianOperator")
        check_diagonal("diagonal", diagonal, base.n, allow_inf=True)
        if shift is not None:
            check_diagonal("shift", shift, base.n, allow_zero=True)
        super().__init__(base.n, base.dtype, base.device)
        self.base = base
        self.scale = diagonal.to(device=base.device, dtype=base.dtype).rsqrt()[:, None]
        # P^-1/2 W P^-1/2 = W / P: added to each product without another pass through the model.
        coupled = shift is not None and bool(shift.any())
        self.added = shift.to(self.scale)[:, None] * self.scale.square() if coupled else None

    @property
    def global_n(self) -> int:
        return self.base.global_n

    def _matmat(self, X: Tensor) -> Tensor:
        product = self.scale * self.base.matmat(self.scale * X)
        return product if self.added is None else product + self.added * X

    def inner(self, X: Tensor, Y: Tensor) -> Tensor:
        return self.base.inner(X, Y)

    def local_rows(self, X: Tensor) -> Tensor:
        return self.base.local_rows(X)
