"""Principal flow per Hessian eigendirection (Dherin, Qin, Rosca, Wu 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..linalg.operator import combine, gram
from .thresholds import _check_lr

REGIME_CODES: dict[str, int] = {"saddle": -1, "stable": 0, "oscillating": 1, "unstable": 2}
"""Numeric codes of :func:`regimes`, for loggers that only take numbers."""

Scalar = float | Tensor


def _step(h: Scalar) -> float:
    return _check_lr(h, "h")


def _as_real_tensor(values: Tensor | Sequence[float], device: torch.device | None = None) -> Tensor:
    # Python floats are doubles: read sequences as float64 rather than torch's float32 default.
    if not isinstance(values, Tensor):
        return torch.tensor(values, dtype=torch.float64, device=device)
    return values if values.is_floating_point() else values.to(torch.get_default_dtype())


def _log_abs_one_minus(x: Tensor) -> Tensor:
    # log1p keeps log(1 - x) accurate for |x| << 1; the clamps keep the unused branch finite.
    below = torch.log1p(-x.clamp(max=1.0))
    above = torch.log((x - 1.0).clamp(min=0.0))
    return torch.where(x < 1.0, below, above)


def pf_coefficient(h: Scalar, eigenvalues: Tensor | Sequence[float]) -> Tensor:
    r"""The principal-flow coefficient :math:`r(h\lambda) = \log(1 - h\lambda)/(h\lambda)` per eigenvalue.

    With the principal complex logarithm, for :math:`x = h\lambda`:

    .. math::
        r(x) = \frac{\log\lvert 1 - x\rvert + i\pi[x > 1]}{x}
             = -\left(1 + \frac{x}{2} + \frac{x^2}{3} + \dots\right) \quad (\lvert x\rvert < 1).

    It is real for :math:`x < 1` (in :math:`(-1, 0)` for :math:`x < 0`, below :math:`-1` for
    :math:`0 < x < 1`), equals the limit :math:`-1` at :math:`x = 0`, and is complex with
    :math:`\operatorname{Re} r = \log(x-1)/x` and :math:`\operatorname{Im} r = \pi/x` for :math:`x > 1`;
    :math:`\operatorname{Re} r > 0` (divergence) iff :math:`x > 2`. At :math:`x = 1` the coefficient is
    :math:`-\infty` (real part; the official notebook substitutes :math:`-100` there).

    Args:
        h: the gradient-descent step (:class:`~pf_lightning.stability.StepDynamics` for other optimizers).
        eigenvalues: Hessian eigenvalues, any shape.

    Returns:
        A complex tensor of the shape of ``eigenvalues`` (complex128 for float64 input).

    Raises:
        ValueError: ``h`` is not positive and finite.

    Example:
        >>> r = pf_coefficient(0.5, torch.tensor([0.0, 1.0, 3.0, 4.0], dtype=torch.float64))
        >>> r.real.tolist()  # -1, log(1/2)/(1/2), log(1/2)/(3/2), log(1)/2
        [-1.0, -1.3862943611198906, -0.46209812037329684, 0.0]
        >>> torch.allclose(r.imag[2:], torch.tensor([math.pi / 1.5, math.pi / 2], dtype=torch.float64))
        True
    """
    h = _step(h)
    x = h * _as_real_tensor(eigenvalues)
    safe_x = torch.where(x == 0, torch.ones_like(x), x)
    real = torch.where(x == 0, -torch.ones_like(x), _log_abs_one_minus(x) / safe_x)
    imag = torch.where(x > 1.0, math.pi / safe_x, torch.zeros_like(x))
    return torch.complex(real, imag)


def log_growth(h: Scalar, eigenvalues: Tensor | Sequence[float]) -> Tensor:
    r"""Per-step log growth :math:`\log\lvert 1 - h\lambda\rvert` of each gradient component.

    One gradient-descent step multiplies the component along :math:`u_i` by :math:`1 - h\lambda_i`, so
    a positive value means that direction is unstable (:math:`h\lambda > 2` or :math:`\lambda < 0`),
    zero is the edge, and the value is :math:`-\infty` at :math:`h\lambda = 1` (one-step convergence).

    Args:
        h: the gradient-descent step.
        eigenvalues: Hessian eigenvalues, any shape.

    Returns:
        A real tensor of the shape of ``eigenvalues``.

    Raises:
        ValueError: ``h`` is not positive and finite.

    Example:
        >>> log_growth(0.1, torch.tensor([10.0, 20.0, 30.0])).tolist()
        [-inf, 0.0, 0.6931471824645996]
        >>> math.isclose(log_growth(0.1, [5.0]).item(), math.log(0.5), rel_tol=1e-6)
        True
    """
    h = _step(h)
    return _log_abs_one_minus(h * _as_real_tensor(eigenvalues))


def regimes(h: Scalar, eigenvalues: Tensor | Sequence[float]) -> list[str]:
    r"""The principal-flow regime of each eigendirection.

    - ``"saddle"``, :math:`\lambda < 0`: escapes along the negative curvature.
    - ``"stable"``, :math:`0 \le h\lambda < 1`: monotone convergence.
    - ``"oscillating"``, :math:`1 \le h\lambda \le 2`: the component flips sign each step (one-step
      convergence at exactly 1); it converges below 2 and keeps a period-2 oscillation at 2, the edge.
    - ``"unstable"``, :math:`h\lambda > 2`: oscillating divergence.

    :data:`REGIME_CODES` maps the names to -1, 0, 1, 2 for numeric logging.

    Args:
        h: the gradient-descent step.
        eigenvalues: Hessian eigenvalues (flattened).

    Returns:
        One name per eigenvalue, in order.

    Raises:
        ValueError: ``h`` is not positive and finite, or an eigenvalue is NaN.

    Example:
        >>> regimes(0.1, [-5.0, 5.0, 10.0, 15.0, 20.0, 30.0])
        ['saddle', 'stable', 'oscillating', 'oscillating', 'oscillating', 'unstable']
        >>> [REGIME_CODES[r] for r in regimes(1.0, [-1.0, 0.5, 1.5, 2.5])]
        [-1, 0, 1, 2]
    """
    h = _step(h)
    lam = _as_real_tensor(eigenvalues).detach().reshape(-1).to("cpu", torch.float64)
    if torch.isnan(lam).any():
        raise ValueError("eigenvalues contain NaN; no regime can be assigned")
    names = []
    for value in lam.tolist():
        x = h * value
        if value < 0:
            names.append("saddle")
        elif x < 1.0:
            names.append("stable")
        elif x <= 2.0:
            names.append("oscillating")
        else:
            names.append("unstable")
    return names


def gradient_projections(gradient: Tensor, eigenvectors: Tensor) -> Tensor:
    r"""Projections :math:`c_i = g^\top u_i` of the gradient on each eigenvector.

    Args:
        gradient: the flat gradient, shape ``(n,)``.
        eigenvectors: eigenvectors as columns, shape ``(n, k)``.

    Returns:
        Shape ``(k,)``, in the promoted dtype of the two inputs.

    Raises:
        ValueError: the shapes do not fit.

    Example:
        >>> gradient_projections(torch.tensor([3.0, 4.0]), torch.eye(2)).tolist()
        [3.0, 4.0]
        >>> u = torch.tensor([[1.0], [1.0]]) / math.sqrt(2)
        >>> round(gradient_projections(torch.tensor([1.0, 1.0]), u).item(), 6)
        1.414214
    """
    if gradient.dim() != 1:
        raise ValueError(f"gradient must be flat with shape (n,), got {tuple(gradient.shape)}")
    if eigenvectors.dim() != 2 or eigenvectors.shape[0] != gradient.shape[0]:
        raise ValueError(
            f"eigenvectors must have shape (n, k) = ({gradient.shape[0]}, k), got {tuple(eigenvectors.shape)}"
        )
    dtype = torch.promote_types(gradient.dtype, eigenvectors.dtype)
    return gram(eigenvectors.to(dtype), gradient.to(dtype))


def _eigenvalues_and_projections(
    eigenvalues: Tensor | Sequence[float], projections: Tensor | Sequence[float]
) -> tuple[Tensor, Tensor]:
    lam = _as_real_tensor(eigenvalues)
    c = _as_real_tensor(projections, device=lam.device)
    if lam.shape != c.shape:
        raise ValueError(
            f"eigenvalues {tuple(lam.shape)} and projections {tuple(c.shape)} must have the same shape"
        )
    dtype = torch.promote_types(lam.dtype, c.dtype)
    return lam.to(dtype), c.to(dtype)


def unstable_gradient_fraction(
    h: Scalar, eigenvalues: Tensor | Sequence[float], projections: Tensor, grad_norm: Scalar
) -> Tensor:
    r"""Fraction of the gradient's energy in unstable directions, :math:`\sum_{h\lambda_i>2} c_i^2 / \lVert g\rVert^2`.

    Only the tracked directions count, so this is a lower bound on the true fraction.

    Args:
        h: the gradient-descent step.
        eigenvalues: tracked eigenvalues, shape ``(k,)``.
        projections: :math:`c_i = g^\top u_i`, shape ``(k,)`` (from :func:`gradient_projections`).
        grad_norm: :math:`\lVert g\rVert` of the full gradient.

    Returns:
        A 0-dim tensor in :math:`[0, 1]`; 0 when ``grad_norm`` is 0.

    Raises:
        ValueError: ``h`` is not positive and finite, or the shapes differ.

    Example:
        >>> lam, c = torch.tensor([30.0, 5.0]), torch.tensor([3.0, 4.0])
        >>> unstable_gradient_fraction(0.1, lam, c, 5.0).item()  # 3^2 / 5^2
        0.36000001430511475
        >>> unstable_gradient_fraction(0.1, lam, c, 0.0).item()
        0.0
    """
    h = _step(h)
    lam, c = _eigenvalues_and_projections(eigenvalues, projections)
    unstable = (c.square() * (h * lam > 2.0)).sum()
    norm_sq = torch.as_tensor(grad_norm, dtype=unstable.dtype, device=unstable.device).square()
    safe = torch.where(norm_sq == 0, torch.ones_like(norm_sq), norm_sq)
    return torch.where(norm_sq == 0, torch.zeros_like(unstable), unstable / safe)


def _real_coefficient(h: float, lam: Tensor, c: Tensor) -> Tensor:
    # Re r is -inf at h*lambda = 1; a direction without gradient then contributes 0, not -inf * 0 = NaN.
    real = pf_coefficient(h, lam).real
    return torch.where(c == 0, torch.zeros_like(real), real)


def pf_loss_rate_contributions(
    h: Scalar, eigenvalues: Tensor | Sequence[float], projections: Tensor
) -> Tensor:
    r"""Each direction's contribution :math:`\operatorname{Re} r(h\lambda_i)\, c_i^2` to the PF loss rate.

    Along the principal flow :math:`dE/dt = \nabla E^\top\dot\theta = \sum_i \operatorname{Re}
    r(h\lambda_i)\,c_i^2`: negative entries decrease the loss, positive ones (:math:`h\lambda_i > 2`)
    increase it. Gradient flow would give :math:`-c_i^2`. A direction with :math:`c_i = 0` contributes
    0, even at :math:`h\lambda_i = 1` where :math:`r = -\infty`.

    Args:
        h: the gradient-descent step.
        eigenvalues: tracked eigenvalues, shape ``(k,)``.
        projections: :math:`c_i`, shape ``(k,)``.

    Returns:
        A real tensor of shape ``(k,)``.

    Raises:
        ValueError: ``h`` is not positive and finite, or the shapes differ.

    Example:
        >>> lam = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
        >>> out = pf_loss_rate_contributions(0.5, lam, torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
        >>> out.tolist()  # -1 * 1, 2 log(1/2) * 1, 0 * 4
        [-1.0, -1.3862943611198906, 0.0]
    """
    h = _step(h)
    lam, c = _eigenvalues_and_projections(eigenvalues, projections)
    return _real_coefficient(h, lam, c) * c.square()


def pf_velocity(
    h: Scalar, eigenvalues: Tensor | Sequence[float], eigenvectors: Tensor, projections: Tensor
) -> Tensor:
    r"""The principal-flow velocity restricted to the tracked directions, :math:`\sum_i \operatorname{Re} r(h\lambda_i)\,c_i\,u_i`.

    With all eigenpairs of a quadratic tracked and :math:`h\lambda_i < 1`, integrating
    :math:`\dot\theta` for time :math:`h` gives exactly one gradient-descent step, since
    :math:`\exp(h\,r(h\lambda)\,\lambda) = 1 - h\lambda`. Gradient flow would be
    :math:`-\sum_i c_i u_i`.

    Args:
        h: the gradient-descent step.
        eigenvalues: tracked eigenvalues, shape ``(k,)``.
        eigenvectors: matching eigenvectors as columns, shape ``(n, k)``.
        projections: :math:`c_i = g^\top u_i`, shape ``(k,)``.

    Returns:
        A real tensor of shape ``(n,)``.

    Raises:
        ValueError: ``h`` is not positive and finite, or the shapes do not fit.

    Example:
        >>> v = pf_velocity(0.5, torch.tensor([0.0, 1.0]), torch.eye(2, dtype=torch.float64),
        ...                 torch.tensor([1.0, 1.0], dtype=torch.float64))
        >>> v.tolist()  # [-1 * 1, 2 log(1/2) * 1]
        [-1.0, -1.3862943611198906]
    """
    h = _step(h)
    lam, c = _eigenvalues_and_projections(eigenvalues, projections)
    if eigenvectors.dim() != 2 or eigenvectors.shape[1] != c.shape[0]:
        raise ValueError(
            f"eigenvectors must have shape (n, k) with k = {c.shape[0]}, got {tuple(eigenvectors.shape)}"
        )
    weights = _real_coefficient(h, lam, c) * c
    dtype = torch.promote_types(weights.dtype, eigenvectors.dtype)
    return combine(eigenvectors.to(dtype), weights.to(dtype))
