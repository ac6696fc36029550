r"""The curvature along the gradient: one Hessian-vector product with the gradient itself.

The principal-flow quantities that need no eigensolver, on the loss of an (entered)
:class:`~pf_lightning.curvature.HessianOperator`:

.. math::
    v = \frac{\lVert Hg\rVert}{\lVert g\rVert}, \qquad q = \frac{g^\top H g}{\lVert g\rVert^2},
    \qquad \lvert q\rvert \le v \le \max_i \lvert\lambda_i\rvert .

:math:`v` drives DAL-p (:class:`~pf_lightning.DriftAdaptiveLR`) and the drift ratio
:math:`(h/2)v`. With an optimizer's coupled L2 decay ``W`` (``weight_decay=``) they are those of the loss its
step descends, :math:`L + \tfrac12\theta^\top W\theta`: gradient :math:`g + W\theta`, Hessian :math:`H + W`.
``Hg`` comes either from the operator's own backend (exact with double backward) or,
as in the paper's ``dal.py``, from one extra gradient at :math:`\theta + e g` with
:math:`e = 0.01/\lVert g\rVert` (a forward difference; the displacement has norm 0.01).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .._validation import Checks
from .operator import HessianOperator

__all__ = ["GRADIENT_HVP_METHODS", "GradientCurvature", "gradient_curvature"]

GRADIENT_HVP_METHODS = ("operator", "forward_difference")
FORWARD_DIFFERENCE_DISPLACEMENT = 0.01  # dal.py: e = 0.01 / ||g||
_check = Checks()


@dataclass(frozen=True)
class GradientCurvature:
    """``||g||``, ``||Hg||`` and ``g^T H g`` of one loss, with what they cost.

    Attributes:
        grad_norm: :math:`\\lVert g\\rVert`.
        hg_norm: :math:`\\lVert Hg\\rVert`.
        g_dot_hg: :math:`g^\\top H g`.
        method: ``"forward_difference"`` or the operator backend's name.
        seconds: wall-clock time of the measurement.
    """

    grad_norm: float
    hg_norm: float
    g_dot_hg: float
    method: str
    seconds: float

    @property
    def hg_ratio(self) -> float:
        """:math:`v = \\lVert Hg\\rVert/\\lVert g\\rVert`; NaN when the gradient is zero."""
        return self.hg_norm / self.grad_norm if self.grad_norm > 0 else math.nan

    @property
    def rayleigh_quotient(self) -> float:
        """:math:`g^\\top H g/\\lVert g\\rVert^2`; NaN when the gradient is zero."""
        return self.g_dot_hg / self.grad_norm**2 if self.grad_norm > 0 else math.nan

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.grad_norm, self.hg_norm, self.g_dot_hg))


def gradient_curvature(
    op: HessianOperator, method: str = "operator", weight_decay: torch.Tensor | None = None
) -> GradientCurvature:
    r"""Measure :math:`\lVert g\rVert`, :math:`\lVert Hg\rVert` and :math:`g^\top Hg` of ``op``'s loss.

    Args:
        op: an entered :class:`HessianOperator` (its probe set is usually the current batch). Under
            ``torch.distributed`` the gradient and the product are of the loss over every rank's
            batches, so every rank gets the same numbers.
        method: ``"operator"``: :math:`Hg` from the operator's HVP backend (exact with double
            backward; 1 gradient + 1 HVP). ``"forward_difference"``: the paper's
            :math:`Hg \approx (\nabla E(\theta + e g) - \nabla E(\theta))/e`, :math:`e = 0.01/\lVert g\rVert`
            (2 gradients, no second-order autograd; its error is :math:`O(e\lVert g\rVert)` times the
            third derivative: 0.1-0.3% relative on the test models in float32 and float64, up to 1.9%
            in float64 and 2.8% in float32 on a small tanh MLP after a few steps at DAL rates 3-5, and
            up to 26% on a 106k-parameter GPT-2 in its first steps under AdamW: use ``"operator"``
            with an exact backend there).
        weight_decay: the flat diagonal :math:`W` of an optimizer's coupled L2 decay over ``op``'s
            parameters (:func:`~pf_lightning.curvature.precondition.optimizer_weight_decay`), or None: the
            quantities are then those of :math:`L + \tfrac12\theta^\top W\theta`, the loss the step
            descends (:math:`g + W\theta` and :math:`H + W`; a decay of 0.1 on a 1-D quadratic of curvature 1
            puts DAL-1's rate at 2/1.1, the edge, where 2/1 grew the parameter 1.2-fold a step).

    Returns:
        A :class:`GradientCurvature`; its values are NaN when the gradient is zero or not finite.

    Raises:
        ValueError: unknown ``method``, or ``weight_decay`` not of the operator's flat shape.
        NonFiniteLossError: the loss is not finite.

    Example:
        >>> from pf_lightning.curvature import HessianOperator
        >>> A = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0]]))
        >>> loss = lambda m, batch: 0.5 * (m.weight @ A @ m.weight.T).sum()
        >>> with HessianOperator(model, loss, [torch.zeros(1)]) as op:
        ...     gc = gradient_curvature(op)
        >>> gc.hg_ratio  # g = A w lies along the eigenvector with eigenvalue 4
        4.0
    """
    _check.instance("op", op, HessianOperator, "an entered HessianOperator (with HessianOperator(...) as op)")
    _check.choice("method", method, GRADIENT_HVP_METHODS)
    start = time.perf_counter()
    g = loss_gradient = op.gradient()
    decay = None
    if weight_decay is not None:
        _check.instance("weight_decay", weight_decay, torch.Tensor, "None or a flat tensor of the decays")
        if tuple(weight_decay.shape) != tuple(g.shape):
            raise ValueError(
                f"`weight_decay` must be flat over the operator's parameters, shape {tuple(g.shape)}; got "
                f"{tuple(weight_decay.shape)} (optimizer_weight_decay(optimizer, op.space) gives it)"
            )
        if bool(weight_decay.any()):
            decay = weight_decay.to(g.dtype)
            g = g + decay * op.space.values().to(g.dtype)
    grad_norm = float(op.inner(g, g).sqrt())
    if not (math.isfinite(grad_norm) and grad_norm > 0):
        nan = math.nan
        return GradientCurvature(grad_norm, nan, nan, method, time.perf_counter() - start)
    if method == "operator":
        hg = op.matvec(g)
        name = op.backend_name
    else:
        hg = _forward_difference(op, loss_gradient, g, FORWARD_DIFFERENCE_DISPLACEMENT / grad_norm)
        name = method
    if decay is not None:
        hg = hg + decay * g
    hg_norm = float(op.inner(hg, hg).sqrt())
    return GradientCurvature(grad_norm, hg_norm, float(op.inner(g, hg)), name, time.perf_counter() - start)


def _forward_difference(
    op: HessianOperator, gradient: torch.Tensor, v: torch.Tensor, e: float
) -> torch.Tensor:
    """``(grad(theta + e v) - gradient) / e``, ``gradient`` the operator's loss's at ``theta``, with the parameters
    put back bit for bit afterwards (this rank's slices of sharded ones: ``v`` holds those)."""
    params = op.space.local_params()
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, piece in zip(params, op.space.unflatten(v), strict=True):
                p.add_(piece.to(p.dtype), alpha=e)
        g_shifted = op.gradient()
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
    return (g_shifted - gradient) / e
