r"""Stability thresholds, principal-flow coefficients, drift proxies and the DAL learning rate.

Pure functions on floats and tensors, and the optimizer rules that read an optimizer's settings and
state (never its parameters, never writing to it): nothing here knows about models, operators or
Lightning. The callbacks and schedulers feed them the eigenpairs, gradient norms and optimizer settings
they measure.

**Thresholds** (Cohen et al. 2021, arXiv 2103.00065; Cohen et al. 2022, arXiv 2207.14484). On a
quadratic with curvature :math:`\lambda` an optimizer is stable iff :math:`\lambda` is below

.. math::
    \text{GD: } \frac{2}{\eta}, \quad
    \text{heavy ball: } \frac{2 + 2\beta}{\eta}, \quad
    \text{Nesterov: } \frac{2 + 2\beta}{\eta (1 + 2\beta)}, \quad
    \text{Adam: } \frac{2 + 2\beta_1}{(1 - \beta_1)\eta},

the last for the preconditioned sharpness :math:`\lambda_{\max}(P^{-1}H)` with a frozen preconditioner.

**Principal flow** (Dherin, Qin, Rosca, Wu 2023, arXiv 2302.01952). Gradient descent with step :math:`h`
follows, per Hessian eigendirection :math:`(\lambda_i, u_i)` and gradient projection
:math:`c_i = \nabla E^\top u_i`,

.. math::
    \dot\theta = \sum_i r(h\lambda_i)\, c_i\, u_i, \qquad r(x) = \frac{\log(1 - x)}{x}
    = -\left(1 + \frac{x}{2} + \frac{x^2}{3} + \frac{x^3}{4} + \dots\right),

with the principal complex logarithm; on a quadratic it reproduces gradient descent exactly at
:math:`t = nh`. Per step the component :math:`c_i` is multiplied by :math:`1 - h\lambda_i`.

**DAL** (the same paper, ``dal.py`` in ``deepmind/discretisation_drift``): :math:`h = \min(2/v^p,
h_{\max})` with :math:`v = \lVert Hg\rVert / \lVert g\rVert`.

**Gradient-flow error** (Elkabetz & Cohen 2021, arXiv 2107.06608): gradient descent leaves the flow
through negative curvature, :math:`\eta\sum_t \min(\lambda_{\min,t}, 0)`, and through the Euler local
error :math:`(\eta/2)\lVert Hg\rVert/\lVert g\rVert`.
"""

from .edge import EdgeHistory, JudgedEdge, edge_of_stability, judged_edge
from .optimizers import (
    PRECONDITIONER_WARMUP_STEPS,
    OptimizerRule,
    PreconditionerUnavailable,
    StepDynamics,
    coupled_weight_decay,
    edge_lr,
    group_settings,
    has_stepped,
    optimizer_rule,
    optimizer_steps,
    optimizer_threshold,
    parameter_preconditioner,
    register_optimizer_rule,
    step_dynamics,
    supported_optimizers,
    uneven_steps,
    unheld_parameters,
    unit_step_dynamics,
    update_threshold,
)
from .principal_flow import (
    REGIME_CODES,
    gradient_projections,
    log_growth,
    pf_coefficient,
    pf_loss_rate_contributions,
    pf_velocity,
    regimes,
    unstable_gradient_fraction,
)
from .proxies import dal_learning_rate, drift_ratio, euler_local_error, hg_ratio, rayleigh_quotient
from .thresholds import (
    StabilityThreshold,
    UnsupportedOptimizer,
    threshold_adam,
    threshold_gd,
    threshold_heavy_ball,
    threshold_nesterov,
)
from .trends import (
    accumulated_negative_curvature,
    first_crossing_step,
    non_monotonicity,
    progressive_sharpening_slope,
)

__all__ = [
    "PRECONDITIONER_WARMUP_STEPS",
    "REGIME_CODES",
    "EdgeHistory",
    "JudgedEdge",
    "OptimizerRule",
    "PreconditionerUnavailable",
    "StabilityThreshold",
    "StepDynamics",
    "UnsupportedOptimizer",
    "accumulated_negative_curvature",
    "coupled_weight_decay",
    "dal_learning_rate",
    "drift_ratio",
    "edge_lr",
    "edge_of_stability",
    "euler_local_error",
    "first_crossing_step",
    "gradient_projections",
    "group_settings",
    "has_stepped",
    "hg_ratio",
    "judged_edge",
    "log_growth",
    "non_monotonicity",
    "optimizer_rule",
    "optimizer_steps",
    "optimizer_threshold",
    "parameter_preconditioner",
    "pf_coefficient",
    "pf_loss_rate_contributions",
    "pf_velocity",
    "progressive_sharpening_slope",
    "rayleigh_quotient",
    "regimes",
    "register_optimizer_rule",
    "step_dynamics",
    "supported_optimizers",
    "threshold_adam",
    "threshold_gd",
    "threshold_heavy_ball",
    "threshold_nesterov",
    "uneven_steps",
    "unheld_parameters",
    "unit_step_dynamics",
    "unstable_gradient_fraction",
    "update_threshold",
]
