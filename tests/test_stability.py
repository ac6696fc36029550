"""Stability math against closed forms, independent computations and the optimizers themselves."""

import cmath
import dataclasses
import math

import pytest
import torch

from pf_lightning.stability import (
    REGIME_CODES,
    StabilityThreshold,
    UnsupportedOptimizer,
    accumulated_negative_curvature,
    dal_learning_rate,
    drift_ratio,
    euler_local_error,
    first_crossing_step,
    gradient_projections,
    hg_ratio,
    log_growth,
    non_monotonicity,
    optimizer_threshold,
    pf_coefficient,
    pf_loss_rate_contributions,
    pf_velocity,
    progressive_sharpening_slope,
    rayleigh_quotient,
    regimes,
    threshold_adam,
    threshold_gd,
    threshold_heavy_ball,
    threshold_nesterov,
    unstable_gradient_fraction,
)

F64 = torch.float64


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(3))


def _symmetric(
    n: int, seed: int, spectrum: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense symmetric matrix with its eigenvalues (ascending) and eigenvectors."""
    gen = torch.Generator().manual_seed(seed)
    if spectrum is None:
        a = torch.randn(n, n, generator=gen, dtype=F64)
        matrix = (a + a.T) / 2
    else:
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
        matrix = q @ torch.diag(spectrum.to(F64)) @ q.T
        matrix = (matrix + matrix.T) / 2
    lam, u = torch.linalg.eigh(matrix)
    return matrix, lam, u


# --------------------------------------------------------------------------------------------------
# Thresholds: closed forms
# --------------------------------------------------------------------------------------------------


def test_threshold_closed_forms():
    assert threshold_gd(0.01) == pytest.approx(200.0)
    assert threshold_heavy_ball(0.01, 0.9) == pytest.approx(380.0)
    assert threshold_heavy_ball(0.2, 0.0) == pytest.approx(threshold_gd(0.2))
    assert threshold_nesterov(0.01, 0.9) == pytest.approx(3.8 / (0.01 * 2.8))
    assert threshold_nesterov(0.2, 0.0) == pytest.approx(threshold_gd(0.2))
    assert threshold_adam(0.01, 0.9) == pytest.approx(38 / 0.01)
    assert threshold_adam(3e-4, 0.9) == pytest.approx(38 / 3e-4)
    assert threshold_adam(0.01, 0.0) == pytest.approx(2 / 0.01)  # RMSprop
    # Nesterov is always the strictest of the momentum methods for beta > 0.
    assert threshold_nesterov(0.1, 0.5) < threshold_heavy_ball(0.1, 0.5)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: threshold_gd(0.0), "lr"),
        (lambda: threshold_gd(-1.0), "lr"),
        (lambda: threshold_gd(math.nan), "lr"),
        (lambda: threshold_heavy_ball(0.1, 1.0), "momentum"),
        (lambda: threshold_heavy_ball(0.1, -0.1), "momentum"),
        (lambda: threshold_nesterov(0.0, 0.9), "lr"),
        (lambda: threshold_nesterov(0.1, 1.5), "momentum"),
        (lambda: threshold_adam(0.1, 1.0), "beta1"),
        (lambda: threshold_adam(math.inf, 0.9), "lr"),
    ],
)
def test_threshold_validation_names_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# --------------------------------------------------------------------------------------------------
# Thresholds: the optimizers themselves on f = lambda x^2 / 2 are the independent reference
# --------------------------------------------------------------------------------------------------


def _final_distance(make_optimizer, curvature: float, steps: int = 200) -> float:
    x = torch.nn.Parameter(torch.ones(1, dtype=F64))
    optimizer = make_optimizer([x])
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * x.square().sum()).backward()
        optimizer.step()
    return abs(x.item())


OPTIMIZERS_ON_A_LINE = {
    "gd": (lambda p: torch.optim.SGD(p, lr=0.1), lambda: threshold_gd(0.1)),
    "heavy_ball": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda: threshold_heavy_ball(0.1, 0.9),
    ),
    "nesterov": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda: threshold_nesterov(0.1, 0.9),
    ),
    "heavy_ball_dampened": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.5),
        lambda: threshold_heavy_ball(0.1 * 0.5, 0.5),
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS_ON_A_LINE))
def test_threshold_separates_bounded_from_divergent_runs(name):
    make_optimizer, formula = OPTIMIZERS_ON_A_LINE[name]
    threshold = formula()
    assert optimizer_threshold(make_optimizer([_param()])).value == pytest.approx(threshold)
    assert _final_distance(make_optimizer, 0.95 * threshold) < 1.0
    assert _final_distance(make_optimizer, 1.05 * threshold) > 1e3


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_adam_threshold_for_a_frozen_preconditioner(beta1):
    # Adam's update with its preconditioner P held fixed: m <- b1 m + (1 - b1) g, x <- x - lr m / P.
    lr, preconditioner = 0.01, 3.0
    threshold = threshold_adam(lr, beta1)

    def final_distance(curvature: float) -> float:
        x, m = 1.0, 0.0
        for _ in range(200):
            m = beta1 * m + (1 - beta1) * curvature * x
            x -= lr * m / preconditioner
        return abs(x)

    # The threshold applies to the preconditioned curvature lambda / P.
    assert final_distance(0.95 * threshold * preconditioner) < 1.0
    assert final_distance(1.05 * threshold * preconditioner) > 1e3


# --------------------------------------------------------------------------------------------------
# optimizer_threshold on real torch optimizers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_optimizer", "value", "rule", "preconditioned"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.05), 40.0, "gd", False),
        (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 76.0, "heavy_ball", False),
        (
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
            3.8 / (0.05 * 2.8),
            "nesterov",
            False,
        ),
        (
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.9),
            3.8 / (0.05 * 0.1),
            "heavy_ball",
            False,
        ),
        (lambda p: torch.optim.Adam(p, lr=0.01), 3800.0, "adam", True),
        (lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01)), 3800.0, "adam", True),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.99)), 3.6 / (0.2 * 1e-3), "adamw", True),
        # NAdam's first step, momentum_decay -> infinity (mu_t = beta1): a = 1, b = beta1 / (1 - beta1^2)
        (
            lambda p: torch.optim.NAdam(p, lr=1e-3, momentum_decay=1e9),
            3.8 / (1e-3 * (1.9 + 0.1 * 0.9 / (1 - 0.81))),
            "nadam",
            True,
        ),
        (lambda p: torch.optim.RAdam(p, lr=1e-3), 38 / 1e-3, "radam", True),  # warm-up: r = 1
        (lambda p: torch.optim.Adamax(p, lr=1e-3), 38 / 1e-3, "adamax", True),
        (lambda p: torch.optim.RMSprop(p, lr=0.01), 200.0, "rmsprop", True),
        (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5), 300.0, "rmsprop", True),
        (lambda p: torch.optim.Adagrad(p, lr=0.1), 20.0, "adagrad", True),
    ],
)
def test_optimizer_threshold(make_optimizer, value, rule, preconditioned):
    threshold = optimizer_threshold(make_optimizer([_param()]))
    assert threshold.value == pytest.approx(value)
    assert threshold.optimizer == rule
    assert threshold.preconditioned is preconditioned
    assert threshold.formula


def test_optimizer_threshold_dampening_is_named_in_the_formula():
    threshold = optimizer_threshold(torch.optim.SGD([_param()], lr=0.05, momentum=0.9, dampening=0.9))
    assert "dampening=0.9" in threshold.formula and "(1 - d)" in threshold.formula


def test_optimizer_threshold_reads_the_requested_group():
    a, b = _param(), _param()
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1, momentum=0.5)
    assert optimizer_threshold(optimizer).value == pytest.approx(30.0)
    assert optimizer_threshold(optimizer, group=1).value == pytest.approx(6.0)
    with pytest.raises(ValueError, match="group"):
        optimizer_threshold(optimizer, group=2)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.LBFGS(p),
        lambda p: torch.optim.SparseAdam(p),
        lambda p: torch.optim.Rprop(p),
        lambda p: torch.optim.Adafactor(p),
        lambda p: torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))]),
        lambda p: torch.optim.SGD(p, lr=0.1, maximize=True),
    ],
)
def test_unsupported_optimizer_names_itself_and_the_supported_ones(make_optimizer):
    optimizer = make_optimizer([_param()])
    with pytest.raises(UnsupportedOptimizer, match=type(optimizer).__name__) as info:
        optimizer_threshold(optimizer)
    assert isinstance(info.value, ValueError)
    if not optimizer.param_groups[0].get("maximize"):
        # the way to another: a rule of its own (the EoS monitor adds that a threshold= may be given)
        assert "ASGD, Adadelta, Adagrad, Adam" in str(info.value) and "register_optimizer_rule" in str(
            info.value
        )


def test_stability_threshold_is_frozen_and_positive():
    threshold = StabilityThreshold(10.0, "custom", False, "given")
    with pytest.raises(dataclasses.FrozenInstanceError):
        threshold.value = 3.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="positive"):
        StabilityThreshold(0.0, "custom", False, "given")


# --------------------------------------------------------------------------------------------------
# Principal flow: the regime table of REFERENCE §1.1
# --------------------------------------------------------------------------------------------------

H_LAMBDA = [-0.5, 0.5, 1.0, 1.5, 2.0, 3.0]


@pytest.mark.parametrize("h", [1.0, 0.01])
def test_regime_table(h):
    eigenvalues = torch.tensor([x / h for x in H_LAMBDA], dtype=F64)
    assert regimes(h, eigenvalues) == [
        "saddle",
        "stable",
        "oscillating",
        "oscillating",
        "oscillating",
        "unstable",
    ]
    assert [REGIME_CODES[r] for r in regimes(h, eigenvalues)] == [-1, 0, 1, 1, 1, 2]

    r = pf_coefficient(h, eigenvalues)
    assert r.dtype == torch.complex128
    assert -1.0 < r[0].real < 0.0 and r[0].imag == 0.0  # saddle: real, in (-1, 0)
    assert r[1].real < -1.0 and r[1].imag == 0.0  # monotone convergence
    assert r[2].real == -math.inf  # one-step jump (the notebook's -100)
    assert r[3].real < 0.0 and r[3].imag == pytest.approx(math.pi / 1.5)
    assert r[4].real == pytest.approx(0.0, abs=1e-12) and r[4].imag == pytest.approx(math.pi / 2)
    assert r[5].real > 0.0 and r[5].imag == pytest.approx(math.pi / 3)

    growth = log_growth(h, eigenvalues)
    expected = [math.log(abs(1 - x)) if x != 1.0 else -math.inf for x in H_LAMBDA]
    assert growth.tolist() == pytest.approx(expected, abs=1e-12)
    assert growth[5] > 0 and growth[0] > 0  # unstable and saddle directions grow


def test_regimes_rejects_nan_and_bad_step():
    with pytest.raises(ValueError, match="NaN"):
        regimes(0.1, [1.0, math.nan])
    with pytest.raises(ValueError, match="h"):
        pf_coefficient(0.0, [1.0])
    with pytest.raises(ValueError, match="h"):
        log_growth(-0.1, [1.0])
    # float() took True as 1 and "0.1" as 0.1 (an outside trial): a bool or a string is no step.
    for bad in (True, "0.1"):
        with pytest.raises(ValueError, match=r"h must be a number, got"):
            regimes(bad, [1.0])
        with pytest.raises(ValueError, match=r"lr must be a number, got"):
            threshold_gd(bad)
    with pytest.raises(ValueError, match=r"momentum must be a number, got '0.9' \(str\)"):
        threshold_heavy_ball(0.1, "0.9")


def test_pf_coefficient_matches_the_series_for_small_arguments():
    x = torch.tensor([-0.1, -1e-3, -1e-9, 0.0, 1e-9, 1e-3, 0.05, 0.1], dtype=F64)
    series = -sum(x**k / (k + 1) for k in range(60))
    r = pf_coefficient(1.0, x)
    assert torch.allclose(r.real, series, rtol=1e-14, atol=0)
    assert torch.all(r.imag == 0)
    assert r.real[3] == -1.0  # the limit at 0


def test_pf_coefficient_in_the_oscillating_band():
    h = 0.02
    x = torch.linspace(1.01, 1.99, 25, dtype=F64)
    r = pf_coefficient(h, x / h)
    expected = torch.complex(torch.log(x - 1) / x, math.pi / x)
    assert torch.allclose(r, expected, rtol=1e-12, atol=1e-14)
    # and against Python's principal complex log, an independent implementation
    for value, coefficient in zip(x.tolist(), r.tolist(), strict=True):
        assert coefficient == pytest.approx(cmath.log(1 - value) / value, rel=1e-12)


def test_pf_coefficient_keeps_single_precision():
    r = pf_coefficient(0.1, torch.tensor([1.0, 15.0]))
    assert r.dtype == torch.complex64
    assert r.real[0].item() == pytest.approx(math.log(0.9) / 0.1, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Principal flow on a quadratic reproduces gradient descent
# --------------------------------------------------------------------------------------------------


def test_pf_growth_over_one_step_equals_the_gd_factor():
    h = 0.1
    lam = torch.tensor([-7.0, -1.0, 1e-8, 0.3, 2.0, 5.0, 9.0, 9.99], dtype=F64)  # h*lam < 1
    factor = torch.exp(h * pf_coefficient(h, lam).real * lam)
    assert torch.allclose(factor, 1 - h * lam, rtol=1e-12, atol=1e-14)


def test_integrating_pf_velocity_for_time_h_is_one_gd_step():
    h, n = 0.1, 6
    spectrum = torch.tensor([-4.0, -0.5, 0.7, 2.5, 6.0, 8.5])  # h*lambda in (-0.4, 0.85)
    matrix, lam, u = _symmetric(n, seed=3, spectrum=spectrum)
    theta0 = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=F64)

    def velocity(theta):
        return pf_velocity(h, lam, u, gradient_projections(matrix @ theta, u))

    theta, steps = theta0.clone(), 200
    dt = h / steps
    for _ in range(steps):  # classical RK4
        k1 = velocity(theta)
        k2 = velocity(theta + dt / 2 * k1)
        k3 = velocity(theta + dt / 2 * k2)
        k4 = velocity(theta + dt * k3)
        theta = theta + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    gd_step = theta0 - h * (matrix @ theta0)
    assert torch.allclose(theta, gd_step, rtol=1e-9, atol=1e-11)


def test_loss_rate_contributions_sum_to_the_gradient_dot_velocity():
    h = 0.05
    _, lam, u = _symmetric(7, seed=5)
    lam = lam * 30  # spread h*lambda over all regimes
    g = torch.randn(7, generator=torch.Generator().manual_seed(6), dtype=F64)
    c = gradient_projections(g, u)
    contributions = pf_loss_rate_contributions(h, lam, c)
    assert contributions.sum() == pytest.approx(float(g @ pf_velocity(h, lam, u, c)), rel=1e-12)
    # positive exactly in the unstable directions
    assert torch.equal(contributions > 0, h * lam > 2)
    # gradient-flow limit: r -> -1 as h -> 0
    assert torch.allclose(pf_loss_rate_contributions(1e-9, lam, c), -(c**2), rtol=1e-6)


def test_zero_projection_at_one_step_convergence_contributes_nothing():
    out = pf_loss_rate_contributions(0.5, torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert out[0] == 0.0 and torch.isfinite(out).all()
    assert torch.isfinite(pf_velocity(0.5, torch.tensor([2.0]), torch.ones(3, 1), torch.tensor([0.0]))).all()


def test_unstable_gradient_fraction_against_a_projection():
    h = 0.1
    spectrum = torch.tensor([-3.0, 4.0, 12.0, 19.0, 21.0, 35.0])
    _, lam, u = _symmetric(6, seed=7, spectrum=spectrum)
    g = torch.randn(6, generator=torch.Generator().manual_seed(8), dtype=F64)
    c = gradient_projections(g, u)
    unstable = u[:, h * lam > 2]  # the eigenvalues 21 and 35
    assert unstable.shape[1] == 2
    expected = (unstable @ (unstable.T @ g)).square().sum() / g.square().sum()
    fraction = unstable_gradient_fraction(h, lam, c, g.norm())
    assert fraction.item() == pytest.approx(expected.item(), rel=1e-12)
    assert unstable_gradient_fraction(h, lam, c, float(g.norm())).item() == pytest.approx(
        expected.item(), rel=1e-12
    )
    assert unstable_gradient_fraction(h, lam, c, 0.0).item() == 0.0


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        gradient_projections(torch.ones(3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="flat"):
        gradient_projections(torch.ones(3, 1), torch.ones(3, 2))
    with pytest.raises(ValueError, match="same shape"):
        pf_loss_rate_contributions(0.1, torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="eigenvectors"):
        pf_velocity(0.1, torch.ones(2), torch.ones(5, 3), torch.ones(2))


# --------------------------------------------------------------------------------------------------
# One-HVP proxies and DAL
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_proxies_are_bounded_by_the_spectrum(seed):
    matrix, lam, _ = _symmetric(8, seed=seed)
    g = torch.randn(8, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
    hg = matrix @ g
    v = hg_ratio(g.norm(), hg.norm())
    q = rayleigh_quotient(g @ hg, g.norm())
    assert isinstance(v, torch.Tensor) and isinstance(q, torch.Tensor)
    assert abs(q) <= v + 1e-12
    assert v <= lam.abs().max() + 1e-12
    assert lam.min() - 1e-12 <= q <= lam.max() + 1e-12
    assert drift_ratio(0.3, g.norm(), hg.norm()) == pytest.approx(0.15 * v.item())
    # floats in, floats out
    v_float = hg_ratio(float(g.norm()), float(hg.norm()))
    assert isinstance(v_float, float) and v_float == pytest.approx(v.item())


def test_proxies_along_an_eigenvector_are_the_eigenvalue():
    matrix, lam, u = _symmetric(5, seed=11)
    g = 2.5 * u[:, 1]
    hg = matrix @ g
    assert hg_ratio(float(g.norm()), float(hg.norm())) == pytest.approx(abs(lam[1].item()))
    assert rayleigh_quotient(float(g @ hg), float(g.norm())) == pytest.approx(lam[1].item())


def test_proxies_at_zero_gradient_are_nan():
    assert math.isnan(hg_ratio(0.0, 0.0))
    assert math.isnan(rayleigh_quotient(0.0, 0.0))
    assert math.isnan(drift_ratio(0.1, 0.0, 1.0))
    assert torch.isnan(hg_ratio(torch.tensor(0.0), torch.tensor(1.0)))
    assert torch.isnan(rayleigh_quotient(torch.tensor(0.0), torch.tensor(0.0)))
    with pytest.raises(ValueError, match="grad_norm"):
        hg_ratio(-1.0, 1.0)


def test_proxies_follow_torch_promotion():
    assert rayleigh_quotient(1.0, torch.tensor(2.0, dtype=F64)).dtype == F64
    assert hg_ratio(torch.tensor(2.0), 3.0).dtype == torch.float32
    assert hg_ratio(torch.tensor(2), torch.tensor(3)).item() == pytest.approx(1.5)
    ratios = drift_ratio(0.1, torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]))
    assert ratios[0].item() == pytest.approx(0.1) and torch.isnan(ratios[1])


def test_euler_local_error_is_the_drift_ratio():
    assert euler_local_error is drift_ratio
    assert euler_local_error(0.01, 1.0, 200.0) == pytest.approx(1.0)  # the 2/h edge


def test_dal_p1_along_the_top_eigenvector_is_two_over_lambda_max():
    spectrum = torch.tensor([0.5, 3.0, 10.0, 40.0])
    matrix, _, u = _symmetric(4, seed=12, spectrum=spectrum)
    g = 0.3 * u[:, -1]
    v = hg_ratio(float(g.norm()), float((matrix @ g).norm()))
    assert dal_learning_rate(v, 1.0, 5.0) == pytest.approx(2 / 40.0)
    assert dal_learning_rate(torch.tensor(v), 1.0, 5.0).item() == pytest.approx(2 / 40.0)
    # with v > 1 a larger p is more conservative, with v < 1 less
    assert dal_learning_rate(40.0, 2.0, 5.0) < dal_learning_rate(40.0, 0.5, 5.0)
    assert dal_learning_rate(0.9, 2.0, 5.0) > dal_learning_rate(0.9, 0.5, 5.0)


def test_dal_cap_constant_and_invalid_curvature():
    assert dal_learning_rate(0.01, 1.0, 5.0) == 5.0
    assert dal_learning_rate(0.01, 1.0, 0.3) == 0.3
    assert dal_learning_rate(123.0, 0.0, 5.0) == 2.0  # p = 0: the constant min(2, max_lr)
    assert dal_learning_rate(123.0, 0.0, 1.5) == 1.5
    for v in (0.0, -1.0, math.nan, math.inf):
        assert math.isnan(dal_learning_rate(v, 1.0, 5.0))
    rates = dal_learning_rate(torch.tensor([0.0, 4.0, math.nan, 0.1]), 1.0, 5.0)
    assert torch.isnan(rates[0]) and torch.isnan(rates[2])
    assert rates[1].item() == pytest.approx(0.5) and rates[3].item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="p"):
        dal_learning_rate(1.0, -1.0, 5.0)
    with pytest.raises(ValueError, match="max_lr"):
        dal_learning_rate(1.0, 1.0, 0.0)


# --------------------------------------------------------------------------------------------------
# Gradient flow vs descent, and trends
# --------------------------------------------------------------------------------------------------


def test_accumulated_negative_curvature():
    lrs, lambda_mins = [0.1, 0.1, 0.05, 0.05], [-2.0, 1.0, -4.0, 0.0]
    assert accumulated_negative_curvature(lrs, lambda_mins) == pytest.approx(-0.4)
    as_tensor = accumulated_negative_curvature(
        torch.tensor(lrs, dtype=F64), torch.tensor(lambda_mins, dtype=F64)
    )
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.item() == pytest.approx(-0.4)
    assert accumulated_negative_curvature([], []) == 0.0
    with pytest.raises(ValueError, match="length"):
        accumulated_negative_curvature([0.1], [1.0, 2.0])


def test_progressive_sharpening_slope_against_least_squares():
    gen = torch.Generator().manual_seed(13)
    steps = torch.arange(0, 1000, 50, dtype=F64)
    sharpness = 4.0 + 0.012 * steps + 0.3 * torch.randn(steps.shape, generator=gen, dtype=F64)
    design = torch.stack([torch.ones_like(steps), steps], dim=1)
    _, slope = torch.linalg.lstsq(design, sharpness[:, None]).solution[:, 0]
    assert progressive_sharpening_slope(steps, sharpness) == pytest.approx(slope.item(), rel=1e-10)
    assert progressive_sharpening_slope(steps.tolist(), sharpness.tolist()) == pytest.approx(
        slope.item(), rel=1e-10
    )
    # a skipped (NaN) measurement is left out
    with_gap = sharpness.clone()
    with_gap[3] = math.nan
    keep = torch.isfinite(with_gap)
    _, slope_gap = torch.linalg.lstsq(design[keep], sharpness[keep, None]).solution[:, 0]
    assert progressive_sharpening_slope(steps, with_gap) == pytest.approx(slope_gap.item(), rel=1e-10)
    assert math.isnan(progressive_sharpening_slope([1.0], [2.0]))
    assert math.isnan(progressive_sharpening_slope([5, 5], [1.0, 2.0]))
    assert math.isnan(progressive_sharpening_slope([], []))


def test_non_monotonicity():
    assert non_monotonicity([5.0, 4.0, 3.0, 2.0]) == 0.0
    assert non_monotonicity([1.0, 2.0, 1.0, 2.0, 1.0]) == 0.5
    assert non_monotonicity(torch.tensor([1.0, 2.0, 3.0])) == 1.0
    assert non_monotonicity([1.0, 1.0]) == 0.0  # equal is not an increase
    assert math.isnan(non_monotonicity([1.0]))


def test_first_crossing_step():
    steps, ratios = [0, 100, 200, 300, 400], [0.2, 0.7, 0.99, 1.0, 1.1]
    assert first_crossing_step(steps, ratios) == 300
    assert first_crossing_step(steps, ratios, level=0.5) == 100
    assert first_crossing_step(torch.tensor(steps), torch.tensor(ratios), level=1.05) == 400
    assert first_crossing_step(steps, ratios, level=2.0) is None
    assert first_crossing_step([], []) is None
    with pytest.raises(ValueError, match="length"):
        first_crossing_step([1, 2], [0.5])
