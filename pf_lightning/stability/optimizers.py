r"""One rule per optimizer family: everything pf-lightning knows about an optimizer, in one place.

A rule says, for one ``torch.optim`` class and its subclasses, how a step moves the parameters along a
direction of (preconditioned) curvature :math:`\lambda` with the preconditioner held fixed. Every
optimizer here is, per direction, the linear recurrence

.. math::
    m \leftarrow \beta m + (1 - \beta)\,\lambda x, \qquad
    x \leftarrow x - \eta\,(a\,\lambda x + b\,m),

with step :math:`\eta`, a weight :math:`a` on the current gradient, a weight :math:`b` on its
exponential moving average and the average's decay :math:`\beta` (:class:`StepDynamics`). Gradient
descent is :math:`a = 1, b = 0`; PyTorch's heavy ball (buffer :math:`v = \beta v + g`) is
:math:`a = 0, b = 1/(1 - \beta)`; Nesterov adds :math:`a = 1, b = \beta/(1 - \beta)`; Adam is
:math:`a = 0, b = 1` in the basis of :math:`P^{-1}H`. The recurrence's matrix has a root at
:math:`-1` at the **stability threshold**

.. math::
    \lambda^* = \frac{2(1 + \beta)}{\eta\,\bigl(a(1 + \beta) + b(1 - \beta)\bigr)},

which gives :math:`2/\eta`, :math:`(2 + 2\beta)/\eta`, :math:`(2 + 2\beta)/(\eta(1 + 2\beta))` and
:math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)` for those four (Cohen et al. 2021, 2022). Its spectral radius
is the per-step growth of that direction; complex roots mean the direction oscillates (REFERENCE §6.3).

A rule also says whether and how the optimizer preconditions (the diagonal :math:`P` of its update,
read from its own state, bias corrections included) and how its weight decay couples: an L2 term added
to the gradient adds :math:`w` to every Hessian eigenvalue (the step sees :math:`H + wI`), while decoupled
decay (AdamW) shrinks the weights outside the gradient and is not part of the curvature.

``torch.optim`` optimizers and their rules (:func:`optimizer_rule`; subclasses take their parent's):

================  ==================================================================  ================
optimizer         step along a direction (P: the diagonal preconditioner)             weight decay
================  ==================================================================  ================
SGD               GD, heavy ball or Nesterov; dampening d scales b by (1 - d)         coupled
ASGD              GD with the decaying step ``eta`` from its state                    coupled (+ lambd)
Adam, AdamW       a = 0, b = 1, P = (1 - b1^t)(sqrt(v / (1 - b2^t)) + eps)            by class / flag
Adamax            a = 0, b = 1, P = (1 - b1^t) * exp_inf                              coupled
NAdam             a, b from its momentum schedule mu_t; P = sqrt(v/(1 - b2^t)) + eps  by flag
RAdam             a = 0, b = the rectification r_t; P = (1 - b1^t)(sqrt(v) + eps)     by flag
                  / sqrt(1 - b2^t) (P = 1 - b1^t while r_t is undefined, rho_t <= 5)
RMSprop           GD (or heavy ball with momentum) on P = sqrt(v) + eps (centered:    coupled
                  sqrt(v - mean(g)^2) + eps)
Adagrad           GD with step lr / (1 + (t-1) lr_decay), P = sqrt(sum g^2) + eps     coupled
Adadelta          GD on P = sqrt(square_avg + eps) / sqrt(acc_delta + eps) (approx.)  coupled
================  ==================================================================  ================

Refused, with the reason (:class:`UnsupportedOptimizer`): LBFGS (a line search on quasi-Newton
curvature pairs: no fixed step), SparseAdam (sparse gradients), Rprop (sign steps), Adafactor (its
update is clipped by its own RMS: not linear in the gradient), Muon (orthogonalized updates: no
diagonal preconditioner), and any group with ``maximize=True``. Register a rule for an optimizer of
your own with :func:`register_optimizer_rule`. ASGD has thresholds but no edge rate (:func:`edge_lr`,
the sharpness cap): its step is not proportional to its rate.

The preconditioned thresholds assume a frozen :math:`P` (Cohen et al. 2022): while :math:`P` still
moves, after the first steps, they are an approximation (see the EoS monitor's warm-up).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .principal_flow import _as_real_tensor, log_growth, regimes
from .thresholds import StabilityThreshold, UnsupportedOptimizer, _check_beta, _check_lr

__all__ = [
    "PRECONDITIONER_WARMUP_STEPS",
    "OptimizerRule",
    "PreconditionerUnavailable",
    "StepDynamics",
    "coupled_weight_decay",
    "edge_lr",
    "group_settings",
    "has_stepped",
    "optimizer_rule",
    "optimizer_steps",
    "optimizer_threshold",
    "parameter_preconditioner",
    "register_optimizer_rule",
    "step_dynamics",
    "supported_optimizers",
    "unit_step_dynamics",
    "update_threshold",
]


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
    """The optimizer has no preconditioner state for a parameter yet (before its first step), or does
    not precondition at all."""


@dataclass(frozen=True)
class StepDynamics:
    r"""One step of an optimizer along a direction of curvature :math:`\lambda`, as a linear recurrence.

    .. math::
        m' = \beta m + (1 - \beta)\lambda x, \quad x' = x - \eta(a\lambda x + b m'), \qquad
        M(\lambda) = \begin{pmatrix} 1 - \eta\lambda(a + b(1 - \beta)) & -\eta b\beta \\
        (1 - \beta)\lambda & \beta \end{pmatrix}

    (state :math:`(x, m)`; with :math:`b = 0` the state is :math:`x` alone and one step multiplies it
    by :math:`1 - \eta a\lambda`). :math:`\lambda` is a Hessian eigenvalue, or one of
    :math:`P^{-1}H` for a preconditioned optimizer (``preconditioned``).

    Attributes:
        lr: the step :math:`\eta`.
        gradient_weight: :math:`a`.
        momentum_weight: :math:`b`.
        beta: :math:`\beta`, the decay of the gradient average :math:`m`.
        preconditioned: whether :math:`\lambda` is an eigenvalue of :math:`P^{-1}H`.
        label: the update rule, e.g. ``"gd"``, ``"heavy_ball"``, ``"adam"``.
        formula: the threshold's formula with the numbers used, for humans.

    Example:
        >>> hb = StepDynamics(0.1, 0.0, 1 / (1 - 0.9), 0.9, label="heavy_ball")
        >>> round(hb.threshold, 9)  # (2 + 2 beta) / lr
        38.0
        >>> round(hb.log_growth([30.0]).item(), 4)  # log rho([[1 + beta - lr lambda, -beta], [1, 0]])
        -0.0527
    """

    lr: float
    gradient_weight: float = 1.0
    momentum_weight: float = 0.0
    beta: float = 0.0
    preconditioned: bool = False
    label: str = "gd"
    formula: str = ""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"the step lr must be positive and finite, got {self.lr!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must satisfy 0 <= beta < 1, got {self.beta!r}")
        a, b = self.gradient_weight, self.momentum_weight
        if not (a >= 0 and b >= 0 and a + b > 0 and math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"the gradient and momentum weights must be >= 0, not both 0, got {a!r}, {b!r}")

    @property
    def scalar(self) -> bool:
        """No momentum state: one step multiplies a direction's component by :math:`1 - h\\lambda`."""
        return self.momentum_weight == 0.0 or self.beta == 0.0

    @property
    def gd_step(self) -> float:
        r"""The gradient-descent step :math:`h` with the same threshold, :math:`h = 2/\lambda^*`.

        For a scalar rule :math:`h\lambda` is the exact per-step factor's argument; with momentum it only
        places the edge at :math:`h\lambda = 2` (``pf/hlambda_i``)."""
        a, b, beta = self.gradient_weight, self.momentum_weight, self.beta
        return self.lr * (a + b * (1.0 - beta) / (1.0 + beta))

    @property
    def threshold(self) -> float:
        r""":math:`\lambda^* = 2(1 + \beta)/(\eta(a(1 + \beta) + b(1 - \beta)))`."""
        return 2.0 / self.gd_step

    def _trace_det(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        a, b, beta, lr = self.gradient_weight, self.momentum_weight, self.beta, self.lr
        trace = 1.0 + beta - lr * lam * (a + b * (1.0 - beta))
        det = beta * (1.0 - lr * a * lam)
        return trace, det

    def _roots(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        trace, det = self._trace_det(lam)
        disc = (trace.square() - 4.0 * det).to(torch.complex128)
        root = disc.sqrt()
        return (trace + root) / 2.0, (trace - root) / 2.0

    def growth(self, eigenvalues: Tensor | list[float]) -> Tensor:
        r"""Per-step growth factor :math:`\rho(M(\lambda))` of each direction (> 1: unstable).

        Example:
            >>> StepDynamics(0.1).growth([5.0, 30.0]).tolist()  # |1 - lr lambda|
            [0.5, 2.0]
        """
        lam = _as_real_tensor(eigenvalues).double()
        if self.scalar:
            return (1.0 - self.gd_step * lam).abs()
        first, second = self._roots(lam)
        return torch.maximum(first.abs(), second.abs())

    def log_growth(self, eigenvalues: Tensor | list[float]) -> Tensor:
        r"""Per-step log growth :math:`\log\rho(M(\lambda))`: :math:`\log\lvert 1 - \eta\lambda\rvert` for
        gradient descent, positive past the threshold, 0 at the edge."""
        if self.scalar:
            return log_growth(self.gd_step, eigenvalues)
        return self.growth(eigenvalues).log()

    def regimes(self, eigenvalues: Tensor | list[float]) -> list[str]:
        r"""The regime of each direction under this recurrence.

        ``"saddle"`` (:math:`\lambda < 0`), ``"stable"`` (converges without changing sign: a dominant root
        real and positive), ``"oscillating"`` (complex roots or a negative dominant root, :math:`\rho \le
        1`), ``"unstable"`` (:math:`\rho > 1`, past the threshold). For a scalar rule these are
        :func:`~pf_lightning.stability.regimes` at :math:`h = ` :attr:`gd_step`.

        Example:
            >>> StepDynamics(0.1, 0.0, 10.0, 0.9).regimes([-1.0, 0.01, 6.3, 40.0])  # complex from 0.026
            ['saddle', 'stable', 'oscillating', 'unstable']
        """
        if self.scalar:
            return regimes(self.gd_step, eigenvalues)
        lam = _as_real_tensor(eigenvalues).detach().reshape(-1).to("cpu", torch.float64)
        if torch.isnan(lam).any():
            raise ValueError("eigenvalues contain NaN; no regime can be assigned")
        first, second = self._roots(lam)
        rho = torch.maximum(first.abs(), second.abs())
        dominant = torch.where(first.abs() >= second.abs(), first, second)
        names = []
        for value, r, z in zip(lam.tolist(), rho.tolist(), dominant.tolist(), strict=True):
            if value < 0:
                names.append("saddle")
            elif r > 1.0 + 1e-12:
                names.append("unstable")
            elif abs(z.imag) > 0 or z.real < 0:
                names.append("oscillating")
            else:
                names.append("stable")
        return names

    def stability_threshold(self) -> StabilityThreshold:
        """This threshold as a :class:`~pf_lightning.stability.StabilityThreshold`."""
        return StabilityThreshold(self.threshold, self.label, self.preconditioned, self.formula)


Group = Mapping[str, Any]
State = Mapping[str, Any]


@dataclass(frozen=True)
class OptimizerRule:
    """What pf-lightning knows about one optimizer family.

    Attributes:
        name: the family, e.g. ``"sgd"``, ``"adam"``.
        dynamics: ``dynamics(group, state) -> StepDynamics``, the step of a parameter group with the
            rate and betas the group holds now (after a per-step scheduler's step, the next step's) and the
            step counts of its state (the last step's, as ``P`` is; before any step, the first step's);
            a step size the state already holds for the next step is read as it is (ASGD's ``eta``, set
            from the rate of the last step: a schedule reaches it a step late); ``state`` is the optimizer
            state of the group's first parameter.
        preconditioner: ``preconditioner(group, state) -> Tensor``, the diagonal :math:`P` of one
            parameter's update (shaped like the parameter), read from that parameter's state; ``None``
            for optimizers that do not precondition.
        state_keys: the state entries ``preconditioner`` reads (for error messages and documentation).
        coupled_weight_decay: ``coupled_weight_decay(group) -> float``, the weight decay that enters the
            gradient (the step sees :math:`H + wI`); 0 when decay is decoupled or off.
        update: ``update(group, state, grad, param) -> Tensor``, the change of one
            parameter that the optimizer's next step would make with gradient ``grad``, computed from
            ``state`` without changing it (an empty ``state``: the first step's); ``None`` where unknown.
            The inputs come in the dtype to compute in (float64 from :func:`optimizer_update`).
        step_scales_with_lr: the step is the group's learning rate times what the state and the gradient
            give, so every threshold is inversely proportional to the rate: :func:`edge_lr` (and the
            sharpness cap) needs it. ``False`` for ASGD, whose step ``lr/(1 + lambd lr t)^alpha`` is not
            proportional to ``lr`` and comes from the state, set with the previous step's rate.

    Example::

        def my_dynamics(group, state):
            return StepDynamics(group["lr"], label="my_sgd", formula=f"2/lr, lr={group['lr']:g}")

        register_optimizer_rule(MySGD, OptimizerRule("my_sgd", my_dynamics))
    """

    name: str
    dynamics: Callable[[Group, State], StepDynamics]
    preconditioner: Callable[[Group, State], Tensor] | None = None
    state_keys: tuple[str, ...] = ()
    coupled_weight_decay: Callable[[Group], float] = field(default=lambda group: _weight_decay(group))
    update: Callable[[Group, State, Tensor, Tensor], Tensor] | None = None
    step_scales_with_lr: bool = True

    @property
    def preconditioned(self) -> bool:
        return self.preconditioner is not None


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def _weight_decay(group: Group) -> float:
    """The group's ``weight_decay`` (0 where the optimizer has none)."""
    return _float(group.get("weight_decay", 0.0))


def _steps(state: State) -> float:
    return _float(state.get("step", 0))


def _lr(group: Group) -> float:
    return _check_lr(_float(group["lr"]))


def _entry(state: State, key: str) -> Tensor:
    value = state.get(key)
    if not isinstance(value, Tensor):
        raise PreconditionerUnavailable(
            f"no `{key}` in the optimizer state yet: measure after the first step"
        )
    return value.detach()


def _adam_moment(group: Group, state: State) -> Tensor:
    return _entry(state, "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")


def _decoupled_flag(group: Group) -> float:
    return 0.0 if group.get("decoupled_weight_decay") else _weight_decay(group)


def _moment(state: State, key: str, like: Tensor, fill: float = 0.0) -> Tensor:
    """A state tensor, dense and in ``like``'s dtype (SGD keeps a sparse parameter's momentum buffer sparse:
    ``nn.Embedding(sparse=True)``), or its value before the first step."""
    value = state.get(key)
    if isinstance(value, Tensor):
        value = value.detach()
        return (value.to_dense() if value.is_sparse else value).to(like.dtype)
    return torch.full_like(like, fill)


def _l2(group: Group, grad: Tensor, param: Tensor) -> Tensor:
    """The gradient the step sees under coupled (L2) weight decay."""
    decay = _weight_decay(group)
    return grad + decay * param if decay else grad


def _first_moment(group: Group, state: State, grad: Tensor) -> Tensor:
    """The next ``exp_avg``, beta1 m + (1 - beta1) g (Adam, Adamax, NAdam, RAdam)."""
    beta1 = _float(group["betas"][0])
    return beta1 * _moment(state, "exp_avg", grad) + (1.0 - beta1) * grad


def _second_moment(group: Group, state: State, grad: Tensor) -> Tensor:
    """The next ``exp_avg_sq``, beta2 v + (1 - beta2) g^2 (Adam, NAdam, RAdam)."""
    beta2 = _float(group["betas"][1])
    return beta2 * _moment(state, "exp_avg_sq", grad) + (1.0 - beta2) * grad.square()


def _adam_l2(group: Group, grad: Tensor, param: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient and the decoupled shrink ``-lr w theta`` (zero unless decay is decoupled)."""
    decay = _weight_decay(group)
    if decay and group.get("decoupled_weight_decay"):
        return grad, -_lr(group) * decay * param
    return _l2(group, grad, param), torch.zeros_like(param)


# -- SGD family --------------------------------------------------------------------------------
def _sgd(group: Group, state: State) -> StepDynamics:
    lr = _lr(group)
    beta = _check_beta(group.get("momentum", 0.0), "momentum")
    if beta == 0.0:
        return StepDynamics(lr, label="gd", formula=f"2/lr, lr={lr:g}")
    dampening = _float(group.get("dampening", 0.0))
    if not 0.0 <= dampening < 1.0:
        raise ValueError(f"SGD dampening must be in [0, 1) for a finite threshold, got {dampening!r}")
    # PyTorch's buffer v = beta v + (1 - d) g is (1 - d)/(1 - beta) times an average m of the gradients.
    b = beta * (1.0 - dampening) / (1.0 - beta)
    damp = f", dampening={dampening:g}" if dampening else ""
    if group.get("nesterov", False):  # step g + beta v
        return StepDynamics(
            lr, 1.0, b, beta, label="nesterov",
            formula=f"(2 + 2*beta)/(lr*(1 + beta + beta*(1 - d))), lr={lr:g}, beta={beta:g}{damp}",
        )  # fmt: skip
    return StepDynamics(
        lr, 0.0, b / beta, beta, label="heavy_ball",
        formula=f"(2 + 2*beta)/(lr*(1 - d)), lr={lr:g}, beta={beta:g}{damp}",
    )  # fmt: skip


def _asgd_eta(group: Group, state: State) -> float:
    """The step ASGD's next step takes: the ``eta`` its last step set, lr / (1 + lambd lr t)^alpha at the
    rate of then (a scheduler's change reaches it a step late), or the rate before the first step."""
    return _float(state["eta"]) if "eta" in state else _lr(group)


def _asgd(group: Group, state: State) -> StepDynamics:
    eta = _asgd_eta(group, state)
    return StepDynamics(
        eta,
        label="gd",
        formula=f"2/eta, eta={eta:g} (ASGD's decayed step, for its step {_steps(state) + 1:g})",
    )


def _sgd_update(group: Group, state: State, grad: Tensor, param: Tensor) -> Tensor:
    grad = _l2(group, grad, param)
    beta = _float(group.get("momentum", 0.0))
    if beta:
        if isinstance(state.get("momentum_buffer"), Tensor):  # the first step copies the gradient, undamped
            buffer = (
                beta * _moment(state, "momentum_buffer", grad)
                + (1.0 - _float(group.get("dampening", 0.0))) * grad
            )
        else:
            buffer = grad
        grad = grad + beta * buffer if group.get("nesterov", False) else buffer
    return -_lr(group) * grad


def _asgd_update(group: Group, state: State, grad: Tensor, param: Tensor) -> Tensor:
    eta = _asgd_eta(group, state)
    return -eta * (_l2(group, grad, param) + _float(group["lambd"]) * param)


# -- Adam family -------------------------------------------------------------------------------
def _adam_like(label: str) -> Callable[[Group, State], StepDynamics]:
    def dynamics(group: Group, state: State) -> StepDynamics:
        lr, beta1 = _lr(group), _check_beta(group["betas"][0], "beta1")
        return StepDynamics(
            lr, 0.0, 1.0, beta1, preconditioned=True, label=label,
            formula=f"(2 + 2*beta1)/((1 - beta1)*lr), lr={lr:g}, beta1={beta1:g}",
        )  # fmt: skip

    return dynamics


def _adam_denominator(group: Group, nu: Tensor, t: float) -> Tensor:
    """sqrt(nu / (1 - beta2^t)) + eps: the denominator of Adam's (and NAdam's) step t."""
    return (nu / (1.0 - _float(group["betas"][1]) ** t)).sqrt().add(_float(group["eps"]))


def _adam_p(group: Group, state: State) -> Tensor:
    t = _steps(state)
    return _adam_denominator(group, _adam_moment(group, state), t) * (1.0 - _float(group["betas"][0]) ** t)


def _adamax_p(group: Group, state: State) -> Tensor:
    # u = max(beta2 u, |g| + eps) already holds eps; the step is lr / (1 - beta1^t) * m / u.
    return _entry(state, "exp_inf") * (1.0 - _float(group["betas"][0]) ** _steps(state))


def _adam_update(group: Group, state: State, grad: Tensor, param: Tensor) -> Tensor:
    grad, shrink = _adam_l2(group, grad, param)
    t = _steps(state) + 1.0
    v = _second_moment(group, state, grad)
    if group.get("amsgrad"):
        v = torch.maximum(_moment(state, "max_exp_avg_sq", grad), v)
    bias1 = 1.0 - _float(group["betas"][0]) ** t
    return shrink - _lr(group) / bias1 * _first_moment(group, state, grad) / _adam_denominator(group, v, t)


def _adamax_update(group: Group, state: State, grad: Tensor, param: Tensor) -> Tensor:
    grad = _l2(group, grad, param)
    beta1, beta2 = (_float(b) for b in group["betas"])
    u = torch.maximum(beta2 * _moment(state, "exp_inf", grad), grad.abs() + _float(group["eps"]))
    return -_lr(group) / (1.0 - beta1 ** (_steps(state) + 1.0)) * _first_moment(group, state, grad) / u


def _nadam_mu(group: Group, t: float) -> float:
    """NAdam's momentum schedule mu_t = beta1 (1 - 0.96^(t psi) / 2)."""
    return _float(group["betas"][0]) * (1.0 - 0.5 * 0.96 ** (t * _float(group["momentum_decay"])))


def _nadam(group: Group, state: State) -> StepDynamics:
    lr, beta1 = _lr(group), _check_beta(group["betas"][0], "beta1")

    def mu(t: float) -> float:
        return _nadam_mu(group, t)

    # The coefficients of the last step t (as P is the last step's); before any step, the first one's.
    t = _steps(state)
    s, product = (t, _float(state["mu_product"])) if t >= 1 else (1.0, mu(1.0))
    a = (1.0 - mu(s)) / (1.0 - product)
    b = mu(s + 1.0) / (1.0 - product * mu(s + 1.0))
    return StepDynamics(
        lr, a, b, beta1, preconditioned=True, label="nadam",
        formula=f"2(1 + beta1)/(lr*(a(1 + beta1) + b(1 - beta1))), lr={lr:g}, beta1={beta1:g}, "
        f"a={a:.4g}, b={b:.4g} (mu schedule at step {s:g})",
    )  # fmt: skip


def _nadam_p(group: Group, state: State) -> Tensor:
    return _adam_denominator(group, _entry(state, "exp_avg_sq"), _steps(state))


def _nadam_update(group: Group, state: State, grad: Tensor, param: Tensor) -> Tensor:
    grad, shrink = _adam_l2(group, grad, param)
    lr, t = _lr(group), _steps(state) + 1.0
    mu, mu_next = _nadam_mu(group, t), _nadam_mu(group, t + 1.0)
    product = _float(state.get("mu_product", 1.0)) * mu
    m, v = _first_moment(group, state, grad), _second_moment(group, state, grad)
    step = lr * (1.0 - mu) / (1.0 - product) * grad + lr * mu_next / (1.0 - product * mu_next) * m
    return shrink - step / _adam_denominator(group, v, t)


def _radam_rho(group: Group, t: float) -> tuple[float, float]:
    beta2 = _float(group["betas"][1])
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t) if t > 0 else 0.0
    return rho_inf, rho_t


def _radam_rectification(group: Group, t: float) -> float | None:
    """RAdam's variance rectification r_t at step t, None during its warm-up (rho_t <= 5: unrectified)."""
    rho_inf, rho_t = _radam_rho(group, t)
    if rho_t <= 5.0:
        return None
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


def _radam(group: Group, state: State) -> StepDynamics:
    lr, beta1 = _lr(group), _check_beta(group["betas"][0], "beta1")
    rect = _radam_rectification(group, _steps(state))
    if rect is None:  # RAdam's warm-up: the bias-corrected momentum alone, P = 1 - beta1^t
        rect, note = 1.0, "warm-up, unrectified"
    else:
        note = f"rectification r={rect:.4g}"
    return StepDynamics(
        lr, 0.0, rect, beta1, preconditioned=True, label="radam",
        formula=f"(2 + 2*beta1)/((1 - beta1)*lr*r), lr={lr:g}, beta1={beta1:g} ({note})",
    )  # fmt: skip


def _radam_p(group: Group, state: State) -> Tensor:
    beta1, beta2 = (_float(b) for b in group["betas"])
    t = _steps(state)
    nu = _entry(state, "exp_avg_sq")
    bias1 = 1.0 - beta1**t
    if _radam_rectification(group, t) is None:
        return torch.full_like(nu, bias1)
    return nu.sqrt().add(_float(group["eps"])) * (bias1 / math.sqrt(1.0 - beta2**t))


def _radam_update(group: Group, state: State, grad: Tensor, param: Tensor) -> Tensor:
    grad, shrink = _adam_l2(group, grad, param)
    beta1, beta2 = (_float(b) for b in group["betas"])
    t = _steps(state) + 1.0
    step = _lr(group) * _first_moment(group, state, grad) / (1.0 - beta1**t)
    rect = _radam_rectification(group, t)
    if rect is not None:
        v = _second_moment(group, state, grad)
        step = step * rect * math.sqrt(1.0 - beta2**t) / (v.sqrt() + _float(group["eps"]))
    return shrink - step


# -- RMSprop, Adagrad, Adadelta ----------------------------------------------------------------
def _rmsprop(group: Group, state: State) -> StepDynamics:
    lr = _lr(group)
    beta = _check_beta(group.get("momentum", 0.0), "momentum")
    if beta == 0.0:
        return StepDynamics(lr, preconditioned=True, label="rmsprop", formula=f"2/lr, lr={lr:g}")
    # The buffer v = beta v + g/P: heavy ball on the preconditioned problem.
    return StepDynamics(
        lr, 0.0, 1.0 / (1.0 - beta), beta, preconditioned=True, label="rmsprop",
        formula=f"(2 + 2*beta)/lr, lr={lr:g}, beta={beta:g}",
    )  # fmt: skip


def _rmsprop_p(group: Group, state: State) -> Tensor:
    nu = _entry(state, "square_avg")
    if group.get("centered"):
        nu = nu - _entry(state, "grad_avg").square()
    return nu.sqrt().add(_float(group["eps"]))


def _rmsprop_update(group: Group, state: State, grad: Tensor, param: Tensor) -> Tensor:
    grad = _l2(group, grad, param)
    alpha = _float(group["alpha"])
    nu = alpha * _moment(state, "square_avg", grad) + (1.0 - alpha) * grad.square()
    if group.get("centered"):
        nu = nu - (alpha * _moment(state, "grad_avg", grad) + (1.0 - alpha) * grad).square()
    step = grad / (nu.sqrt() + _float(group["eps"]))
    beta = _float(group.get("momentum", 0.0))
    if beta:
        step = beta * _moment(state, "momentum_buffer", grad) + step
    return -_lr(group) * step


def _adagrad_step(group: Group, t: float) -> float:
    """Adagrad's rate after ``t`` steps, lr / (1 + t lr_decay): its step ``t + 1`` runs at it."""
    return _lr(group) / (1.0 + t * _float(group.get("lr_decay", 0.0)))


def _adagrad(group: Group, state: State) -> StepDynamics:
    step = _adagrad_step(group, max(_steps(state) - 1.0, 0.0))  # the last step's
    return StepDynamics(
        step, preconditioned=True, label="adagrad",
        formula=f"2/clr, clr = lr/(1 + (t - 1)*lr_decay) = {step:g}",
    )  # fmt: skip


def _adagrad_p(group: Group, state: State) -> Tensor:
    if _steps(state) < 1:  # the accumulator holds only initial_accumulator_value before a step
        raise PreconditionerUnavailable("Adagrad has taken no step yet: measure after the first step")
    return _entry(state, "sum").sqrt().add(_float(group["eps"]))


def _adagrad_update(group: Group, state: State, grad: Tensor, param: Tensor) -> Tensor:
    grad = _l2(group, grad, param)
    step = _adagrad_step(group, _steps(state))  # the next step's
    total = _moment(state, "sum", grad, _float(group.get("initial_accumulator_value", 0.0))) + grad.square()
    return -step * grad / (total.sqrt() + _float(group["eps"]))


def _adadelta(group: Group, state: State) -> StepDynamics:
    lr = _lr(group)
    return StepDynamics(lr, preconditioned=True, label="adadelta", formula=f"2/lr, lr={lr:g}")


def _adadelta_p(group: Group, state: State) -> Tensor:
    # step = lr * sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g, with the acc_delta from before the
    # step: the state holds the one after it, so this P is the next step's estimate, not the last step's
    # exactly (9% apart at step 5 on a quadratic, closer as acc_delta settles).
    eps = _float(group["eps"])
    return _entry(state, "square_avg").add(eps).sqrt() / _entry(state, "acc_delta").add(eps).sqrt()


def _adadelta_update(group: Group, state: State, grad: Tensor, param: Tensor) -> Tensor:
    grad = _l2(group, grad, param)
    rho, eps = _float(group["rho"]), _float(group["eps"])
    square_avg = rho * _moment(state, "square_avg", grad) + (1.0 - rho) * grad.square()
    delta = (_moment(state, "acc_delta", grad) + eps).sqrt() / (square_avg + eps).sqrt() * grad
    return -_lr(group) * delta


_RULES: dict[type, OptimizerRule] = {
    torch.optim.SGD: OptimizerRule("sgd", _sgd, update=_sgd_update),
    torch.optim.ASGD: OptimizerRule(
        "asgd",
        _asgd,
        # param *= 1 - lambd * eta before the gradient step: for gradient descent the same as L2 decay.
        coupled_weight_decay=lambda g: _weight_decay(g) + _float(g.get("lambd", 0.0)),
        update=_asgd_update,
        step_scales_with_lr=False,
    ),
    torch.optim.Adam: OptimizerRule(
        "adam",
        _adam_like("adam"),
        _adam_p,
        ("exp_avg_sq", "max_exp_avg_sq", "step"),
        _decoupled_flag,
        _adam_update,
    ),
    torch.optim.AdamW: OptimizerRule(
        "adamw",
        _adam_like("adamw"),
        _adam_p,
        ("exp_avg_sq", "max_exp_avg_sq", "step"),
        lambda g: 0.0,
        _adam_update,
    ),
    torch.optim.Adamax: OptimizerRule(
        "adamax", _adam_like("adamax"), _adamax_p, ("exp_inf", "step"), update=_adamax_update
    ),
    torch.optim.NAdam: OptimizerRule(
        "nadam", _nadam, _nadam_p, ("exp_avg_sq", "mu_product", "step"), _decoupled_flag, _nadam_update
    ),
    torch.optim.RAdam: OptimizerRule(
        "radam", _radam, _radam_p, ("exp_avg_sq", "step"), _decoupled_flag, _radam_update
    ),
    torch.optim.RMSprop: OptimizerRule(
        "rmsprop", _rmsprop, _rmsprop_p, ("square_avg", "grad_avg"), update=_rmsprop_update
    ),
    torch.optim.Adagrad: OptimizerRule(
        "adagrad", _adagrad, _adagrad_p, ("sum", "step"), update=_adagrad_update
    ),
    torch.optim.Adadelta: OptimizerRule(
        "adadelta", _adadelta, _adadelta_p, ("square_avg", "acc_delta"), update=_adadelta_update
    ),
}

_REFUSED: dict[str, str] = {
    "LBFGS": "a line search on quasi-Newton curvature pairs has no fixed step to compare with",
    "SparseAdam": "its sparse gradients have no Hessian-vector products here",
    "Rprop": "its sign-based steps are not linear in the gradient",
    "Adafactor": "its update is clipped by its own RMS, so the step is not linear in the gradient",
    "Muon": "its orthogonalized updates have no diagonal preconditioner",
}


def supported_optimizers(*, step_scales_with_lr: bool | None = None) -> list[str]:
    """The names of the optimizer classes that have a rule (registered ones included); with
    ``step_scales_with_lr``, only those whose rule's :attr:`OptimizerRule.step_scales_with_lr` is that."""
    return sorted(
        cls.__name__
        for cls, rule in _RULES.items()
        if step_scales_with_lr is None or rule.step_scales_with_lr == step_scales_with_lr
    )


def register_optimizer_rule(optimizer_class: type, rule: OptimizerRule) -> None:
    """Give ``optimizer_class`` (and its subclasses) ``rule``, replacing any rule it had.

    Raises:
        TypeError: ``optimizer_class`` is not a ``torch.optim.Optimizer`` subclass or ``rule`` is not an
            :class:`OptimizerRule`.
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    if not isinstance(rule, OptimizerRule):
        raise TypeError(f"rule must be an OptimizerRule, got {type(rule).__name__}")
    _RULES[optimizer_class] = rule


def optimizer_rule(optimizer: torch.optim.Optimizer | type) -> OptimizerRule:
    """The rule of ``optimizer``'s class, or of its nearest registered base class.

    Raises:
        UnsupportedOptimizer: no rule, naming the optimizer, the reason where one is known, and the
            supported optimizers.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for base in cls.__mro__:
        if base in _RULES:
            return _RULES[base]
        if base.__name__ in _REFUSED and base.__module__.startswith("torch.optim"):
            raise UnsupportedOptimizer(
                f"{cls.__name__} has no stability threshold: {_REFUSED[base.__name__]} (supported: "
                f"{', '.join(supported_optimizers())}; others through register_optimizer_rule)"
            )
    raise UnsupportedOptimizer(
        f"no stability rule is known for {cls.__name__} (supported: {', '.join(supported_optimizers())}): "
        "register one with pf_lightning.stability.register_optimizer_rule"
    )


def group_settings(optimizer: torch.optim.Optimizer, group: int) -> Group:
    """The settings of parameter group ``group``, checked: in range, and not ascending the loss.

    Raises:
        ValueError: ``group`` is out of range.
        UnsupportedOptimizer: the group has ``maximize=True``.
    """
    if not 0 <= group < len(optimizer.param_groups):
        raise ValueError(
            f"group must index optimizer.param_groups (0..{len(optimizer.param_groups) - 1}), got {group}"
        )
    settings = optimizer.param_groups[group]
    if settings.get("maximize", False):
        raise UnsupportedOptimizer(
            f"{type(optimizer).__name__}'s parameter group {group} has maximize=True: it ascends the loss, and "
            "no stability threshold applies; return the negated objective from training_step and set "
            "maximize=False (the same steps, on a loss whose Hessian the monitors measure)"
        )
    return settings


def step_dynamics(optimizer: torch.optim.Optimizer, group: int = 0) -> StepDynamics:
    """The per-direction dynamics of ``optimizer``'s parameter group ``group`` (its current rate and betas, its state's step counts).

    Raises:
        UnsupportedOptimizer: see :func:`optimizer_rule`; also for ``maximize=True``.
        ValueError: ``group`` is out of range, or a setting (lr, momentum, betas) is out of range.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> step_dynamics(torch.optim.SGD([p], lr=0.1, momentum=0.9)).label
        'heavy_ball'
    """
    return optimizer_rule(optimizer).dynamics(
        group_settings(optimizer, group), _group_state(optimizer, group)
    )


def uneven_steps(optimizer: torch.optim.Optimizer, group: int = 0) -> str | None:
    """Where the parameters of group ``group`` have taken different numbers of steps (a part unfrozen
    later, a branch without gradients for a while) and the rule's step depends on the count (RAdam's
    rectification, NAdam's momentum schedule, Adagrad's ``lr_decay``; not Adam's bias corrections, which
    are in each parameter's ``P``): the two step counts and their dynamics, else None.
    :func:`step_dynamics` describes the group by its first stepped parameter."""
    rule, settings = optimizer_rule(optimizer), group_settings(optimizer, group)
    first = _group_state(optimizer, group)
    seen, a = {_steps(first)}, None
    for param in optimizer.param_groups[group]["params"]:
        state = optimizer.state.get(param)
        if not has_stepped(optimizer, param) or _steps(state) in seen:
            continue
        seen.add(_steps(state))
        a, b = a or rule.dynamics(settings, first), rule.dynamics(settings, state)
        if replace(a, formula="") != replace(b, formula=""):
            return f"step {_steps(first):g}: {a.formula}; step {_steps(state):g}: {b.formula}"
    return None


def unit_step_dynamics(optimizer: torch.optim.Optimizer, group: int = 0) -> StepDynamics:
    r"""The dynamics of parameter group ``group`` with its learning rate set to 1.

    Every threshold is inversely proportional to the step, so :math:`\eta \cdot \text{threshold}` is this
    threshold, also for a schedule at :math:`\eta = 0` (a warm-up from zero), where
    :func:`step_dynamics` has none; every other setting is checked as there.

    Raises:
        UnsupportedOptimizer: see :func:`step_dynamics`.
        ValueError: ``group`` or a setting other than the learning rate is out of range.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> round(unit_step_dynamics(torch.optim.SGD([p], lr=0.0, momentum=0.9)).threshold, 12)  # (2 + 2 beta)
        3.8
    """
    settings = group_settings(optimizer, group)
    return optimizer_rule(optimizer).dynamics({**settings, "lr": 1.0}, _group_state(optimizer, group))


def _group_state(optimizer: torch.optim.Optimizer, group: int) -> State:
    """The state of the group's first parameter the optimizer has stepped (:func:`has_stepped`), whose
    step count the rule reads; before any step, the first state there is (Adagrad's, at step 0)."""
    params = optimizer.param_groups[group]["params"]
    param = next((p for p in params if has_stepped(optimizer, p)), None)
    if param is None:
        param = next((p for p in params if optimizer.state.get(p)), None)
    return {} if param is None else optimizer.state[param]


def optimizer_threshold(optimizer: torch.optim.Optimizer, group: int = 0) -> StabilityThreshold:
    r"""The stability threshold of ``optimizer``'s parameter group ``group``: :attr:`StepDynamics.threshold`.

    Preconditioned thresholds (``.preconditioned``) apply to :math:`\lambda_{\max}(P^{-1}(H + wI))`, the
    others to :math:`\lambda_{\max}(H) + w`, with :math:`w` the coupled weight decay
    (:func:`coupled_weight_decay`). See the module's table for every optimizer.

    Raises:
        UnsupportedOptimizer: the optimizer has no rule (pass ``threshold=`` explicitly then).
        ValueError: ``group`` or a setting of the group is out of range.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> optimizer_threshold(torch.optim.SGD([p], lr=0.01, momentum=0.9)).value
        380.0
        >>> t = optimizer_threshold(torch.optim.Adam([p], lr=0.01))
        >>> round(t.value, 9), t.preconditioned
        (3800.0, True)
    """
    return step_dynamics(optimizer, group).stability_threshold()


def coupled_weight_decay(optimizer: torch.optim.Optimizer, group: int = 0) -> float:
    """The weight decay of group ``group`` that enters the gradient, so the step sees ``H + w I``."""
    return optimizer_rule(optimizer).coupled_weight_decay(group_settings(optimizer, group))


def parameter_preconditioner(
    optimizer: torch.optim.Optimizer, param: Tensor, group: int | None = None
) -> tuple[Tensor, float]:
    """The diagonal ``P`` of ``param``'s update (shaped like the parameter's state) and the coupled weight
    decay of its group (``group``, or the group holding ``param``).

    Raises:
        PreconditionerUnavailable: the optimizer does not precondition, does not optimize ``param``, or
            has no state for it yet.
    """
    rule = optimizer_rule(optimizer)
    kind = type(optimizer).__name__
    if rule.preconditioner is None:
        raise PreconditionerUnavailable(f"{kind} does not precondition its steps")
    if group is None:
        group = next(
            (
                i
                for i, settings in enumerate(optimizer.param_groups)
                if any(p is param for p in settings["params"])
            ),
            None,
        )
    if group is None:
        raise PreconditionerUnavailable(f"a measured parameter is not optimized by this {kind}")
    state = optimizer.state.get(param, {})
    if not state:
        raise PreconditionerUnavailable(f"{kind} has no state yet: measure after the first step")
    return rule.preconditioner(group_settings(optimizer, group), state), coupled_weight_decay(
        optimizer, group
    )


def update_threshold(optimizer: torch.optim.Optimizer) -> float:
    r"""The level a curvature along the optimizer's next update is compared with: :math:`2/\eta` (group 0's).

    With the update written :math:`-\eta s`, a quadratic's loss rises along it exactly when
    :math:`s^\top H s / s^\top g > 2/\eta` (for :math:`s^\top g > 0`), whatever the optimizer: the
    threshold of the quotients taken along the update (batch sharpness along it, critical sharpness).
    At heavy ball's edge the quotient is :math:`\lambda/(1 + \beta) = 2/\eta`.
    """
    return 2.0 / _lr(group_settings(optimizer, 0))


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """The steps ``optimizer`` has taken, from its per-parameter ``step`` state: the fewest among the
    parameters it has stepped (:func:`has_stepped`; 0 before any)."""
    return int(min((_steps(state) for state in optimizer.state.values() if _steps(state) >= 1), default=0.0))


def has_stepped(optimizer: torch.optim.Optimizer, param: Tensor) -> bool:
    """Whether ``optimizer`` has stepped ``param``: it holds state for it, at ``step`` 1 or later where the
    state counts steps. Adam creates a parameter's state at its first gradient; Adagrad creates every
    parameter's, at step 0, with the optimizer, so a parameter that never had a gradient stays there."""
    state = optimizer.state.get(param)
    return bool(state) and (_steps(state) >= 1 or "step" not in state)


def unheld_parameters(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> list[str]:
    """The names of ``module``'s trainable parameters in none of ``optimizer``'s groups (another optimizer's,
    under manual optimization, or nobody's): a measurement over every trainable parameter includes them,
    where the optimizer's step does not move them."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in held]


def edge_lr(optimizer: torch.optim.Optimizer, sharpness: float, group: int = 0) -> float:
    r"""The learning rate at which ``optimizer``'s stability threshold equals ``sharpness``.

    Every threshold is inversely proportional to the step, so the edge is
    :math:`\eta_{\text{edge}} = \eta \cdot \text{threshold}(\eta) / S`: :math:`2/S` for gradient descent,
    :math:`38/S` for Adam with :math:`\beta_1 = 0.9` (with :math:`S` the preconditioned sharpness there).

    Raises:
        ValueError: ``sharpness`` is not positive and finite (and what :func:`optimizer_threshold` raises).
        UnsupportedOptimizer: the optimizer has no rule, ascends (``maximize=True``), or its step is not
            proportional to its rate (ASGD: :attr:`OptimizerRule.step_scales_with_lr`).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> edge_lr(torch.optim.SGD([p], lr=0.3), 20.0)
        0.1
        >>> round(edge_lr(torch.optim.Adam([p], lr=1e-3), 3800.0), 12)
        0.01
    """
    sharpness = float(sharpness)
    if not (sharpness > 0 and math.isfinite(sharpness)):
        raise ValueError(f"sharpness must be positive and finite, got {sharpness!r}")
    dynamics = unit_step_dynamics(optimizer, group)
    if not optimizer_rule(optimizer).step_scales_with_lr:
        try:
            step = step_dynamics(optimizer, group).formula
        except ValueError:  # a rate of 0 has no step to name; the refusal stands
            step = dynamics.formula
        raise UnsupportedOptimizer(
            f"{type(optimizer).__name__}'s step is not proportional to its learning rate ({step}, from a rate "
            "set one step earlier): no rate puts its threshold at a given sharpness"
        )
    return dynamics.threshold / sharpness
