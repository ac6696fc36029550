"""batch_sharpness and critical_sharpness against hand computations: dense float64 Hessians of each
batch from torch.func, closed forms on quadratics, and a bisection of the loss along the direction."""

import copy
import math
import warnings

import lightning as L
import pytest
import torch
from cases import Case, dense_hessian
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import DigitsClassifier, digits, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor
from pf_lightning.demos import MeasurementTable, edge_summary
from pf_lightning.measure import MIN_BATCHES_TO_STOP, batch_sharpness, critical_sharpness
from pf_lightning.stability import OptimizerRule, optimizer_rule, optimizers, register_optimizer_rule


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()


def _mse(model, batch):
    x, y = batch
    out = model(x.double())
    return 0.5 * ((out - nn.functional.one_hot(y, 10).double()) ** 2).sum(dim=1).mean()


def _batches(size, count):
    x, y = digits(size * count)
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(count)]


def test_batch_sharpness_is_the_mean_of_per_batch_rayleigh_quotients():
    model, batches = _mlp(), _batches(16, 6)
    expected, numerators, denominators = [], [], []
    for batch in batches:
        H = dense_hessian(Case("batch", model, _mse, [batch]))
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(_mse(model, batch), model.parameters())])
        numerators.append(float(g @ H @ g))
        denominators.append(float(g @ g))
        expected.append(numerators[-1] / denominators[-1])
    result = batch_sharpness(model, _mse, batches, hvp="double_backward")
    mean = sum(expected) / len(expected)
    std = math.sqrt(sum((v - mean) ** 2 for v in expected) / (len(expected) - 1))
    assert result.value == pytest.approx(mean, rel=1e-5)
    assert result.stderr == pytest.approx(std / math.sqrt(len(expected)), rel=1e-5)
    assert list(result.values) == pytest.approx(expected, rel=1e-5)
    assert (result.n_batches, result.n_skipped, result.n_hvp) == (6, 0, 6)
    # The mean of the ratios, not the ratio of the means (EoSS's "expectation inside", another quantity).
    assert result.value != pytest.approx(sum(numerators) / sum(denominators), rel=1e-3)


def test_batch_sharpness_stops_at_the_relative_error_or_the_batch_cap():
    model, batches = _mlp(), _batches(16, 12)
    every = batch_sharpness(model, _mse, batches)
    loose = batch_sharpness(model, _mse, batches, rel_stderr=0.5)
    # Not before 10 batches (it stopped at 3, where a few agreeing batches understate the error 4-5x).
    assert loose.n_batches == MIN_BATCHES_TO_STOP == 10 and loose.stderr <= 0.5 * loose.value
    assert loose.values == every.values[:10]
    assert batch_sharpness(model, _mse, batches, max_batches=4).n_batches == 4
    assert every.n_batches == 12


def test_batches_without_a_usable_gradient_are_skipped_and_counted():
    model, batches = _mlp(), _batches(16, 3)
    x, y = batches[0]
    nan_batch = (torch.full_like(x, math.nan), y)

    flat_batch = torch.zeros(4)  # a batch on which the loss does not depend on the parameters

    def loss_fn(m, batch):
        if isinstance(batch, torch.Tensor):
            return sum(p.sum() for p in m.parameters()) * 0.0
        return _mse(m, batch)

    result = batch_sharpness(model, loss_fn, [batches[0], nan_batch, flat_batch, batches[1]])
    assert (result.n_batches, result.n_skipped) == (2, 2)
    assert math.isfinite(result.value)
    assert result.value == pytest.approx(batch_sharpness(model, _mse, [batches[0], batches[1]]).value)
    with pytest.raises(ValueError, match="no batch had a finite, non-zero gradient"):
        batch_sharpness(model, loss_fn, [nan_batch, flat_batch])
    with pytest.raises(ValueError, match="batches"):
        batch_sharpness(model, _mse, x)  # one tensor is not a list of mini-batches
    with pytest.raises(ValueError, match="wrap it in a list"):
        batch_sharpness(model, _mse, batches[0])  # nor is one (x, y) batch


class Quadratic(nn.Module):
    def __init__(self, n=8, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        Q = torch.randn(n, n, generator=generator, dtype=torch.float64)
        self.register_buffer("A", Q @ Q.T / n + 0.1 * torch.eye(n, dtype=torch.float64))
        self.register_buffer("b", torch.randn(n, generator=generator, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(n, generator=generator, dtype=torch.float64))

    def loss(self, batch=None):
        return 0.5 * self.theta @ self.A @ self.theta - self.b @ self.theta


def _train(model, optimizer, batches, steps):
    for i in range(steps):
        optimizer.zero_grad()
        _mse(model, batches[i % len(batches)]).backward()
        optimizer.step()
    optimizer.zero_grad()


def _flat_gradient(model, batch):
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad(_mse(model, batch), model.parameters())])


def _state_copy(optimizer):
    return [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for st in optimizer.state.values()
    ]


@pytest.mark.parametrize("nesterov", [False, True])
def test_with_momentum_the_quotient_is_taken_along_the_next_update(nesterov):
    """SGD with momentum and L2 decay: s = beta v + (g + w theta) (Nesterov: g~ + beta s), the quotient
    s^T (H + w) s / s^T (g + w theta) from dense Hessians, compared with 2/lr; the state is untouched."""
    model, batches = _mlp(), _batches(16, 4)
    beta, w, lr = 0.9, 0.01, 0.05
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta, weight_decay=w, nesterov=nesterov)
    _train(model, optimizer, batches, 5)
    v = torch.cat([optimizer.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = []
    for batch in batches:
        H = dense_hessian(Case("batch", model, _mse, [batch]))
        seen = _flat_gradient(model, batch) + w * theta
        s = beta * v + seen
        if nesterov:
            s = seen + beta * s
        expected.append(float(s @ (H @ s + w * s)) / float(s @ seen))
    before = _state_copy(optimizer)
    result = batch_sharpness(model, _mse, batches, hvp="double_backward", optimizer=optimizer)
    assert list(result.values) == pytest.approx(expected, rel=1e-6)
    assert result.along == "update" and result.threshold == pytest.approx(2 / lr)
    assert result.ratio == pytest.approx(result.value * lr / 2)
    for saved, state in zip(before, optimizer.state.values(), strict=True):
        assert all(torch.equal(saved[k], state[k]) for k in saved if torch.is_tensor(saved[k]))


def test_with_adam_the_quotient_is_the_preconditioned_rayleigh_quotient():
    """x = P^-1 g_B with torch's Adam P = (1 - b1^t)(sqrt(v/(1 - b2^t)) + eps): x^T H x / x^T P x, compared
    with Adam's threshold (2 + 2 b1)/((1 - b1) lr)."""
    model, batches = _mlp(), _batches(16, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    _train(model, optimizer, batches, 7)
    b1, b2 = 0.9, 0.99
    P = torch.cat(
        [
            (1 - b1**7) * ((optimizer.state[p]["exp_avg_sq"] / (1 - b2**7)).sqrt() + 1e-8).reshape(-1)
            for p in model.parameters()
        ]
    )
    expected = []
    for batch in batches:
        H = dense_hessian(Case("batch", model, _mse, [batch]))
        x = _flat_gradient(model, batch) / P
        expected.append(float(x @ H @ x) / float(x @ (P * x)))
    result = batch_sharpness(model, _mse, batches, hvp="double_backward", optimizer=optimizer)
    assert list(result.values) == pytest.approx(expected, rel=1e-6)
    assert result.along == "preconditioned gradient"
    assert result.threshold == pytest.approx((2 + 2 * b1) / ((1 - b1) * 1e-3))
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(RuntimeError, match="first step"):  # no second moments yet
        batch_sharpness(model, _mse, batches, optimizer=fresh)


UPDATE_OPTIMIZERS = {  # along the update: s = -(the step a copy of the optimizer takes) / lr, vs 2/lr
    "sgd-dampening-decay": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.02
    ),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.05, lambd=1e-3, weight_decay=0.01),
}
PRECONDITIONED_OPTIMIZERS = {  # along P^-1 (g + w theta): x^T (H + w) x / x^T P x, vs the threshold
    "rmsprop-centered": (lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True), 0.0),
    "adagrad-decay": (lambda p: torch.optim.Adagrad(p, lr=0.05, weight_decay=0.01), 0.01),
    "adam-coupled-decay": (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.05), 0.05),
}


@pytest.mark.parametrize("name", sorted(UPDATE_OPTIMIZERS))
def test_the_update_quotient_follows_the_step_a_copy_of_the_optimizer_takes(name):
    model, batches = _mlp(), _batches(16, 3)
    make = UPDATE_OPTIMIZERS[name]
    optimizer = make(model.parameters())
    _train(model, optimizer, batches, 4)
    lr, w = 0.05, optimizer.param_groups[0]["weight_decay"] + optimizer.param_groups[0].get("lambd", 0.0)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = []
    for batch in batches:
        twin = copy.deepcopy(model)
        twin_optimizer = make(twin.parameters())
        twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        _mse(twin, batch).backward()
        twin_optimizer.step()
        s = -(torch.cat([p.detach().reshape(-1) for p in twin.parameters()]) - theta) / lr
        H = dense_hessian(Case("batch", model, _mse, [batch]))
        seen = _flat_gradient(model, batch) + w * theta
        expected.append(float(s @ (H @ s + w * s)) / float(s @ seen))
    result = batch_sharpness(model, _mse, batches, hvp="double_backward", optimizer=optimizer)
    rtol = 1e-5 if name == "asgd" else 1e-8  # ASGD keeps its step eta in float32
    assert list(result.values) == pytest.approx(expected, rel=rtol)
    assert result.along == "update" and result.threshold == pytest.approx(2 / lr)


@pytest.mark.parametrize("name", sorted(PRECONDITIONED_OPTIMIZERS))
def test_the_preconditioned_quotient_uses_the_optimizers_p_and_coupled_decay(name):
    from test_optimizer_rules import _p_reference

    model, batches = _mlp(), _batches(16, 3)
    make, w = PRECONDITIONED_OPTIMIZERS[name]
    optimizer = make(model.parameters())
    _train(model, optimizer, batches, 6)
    group = optimizer.param_groups[0]
    kind = {"rmsprop-centered": "RMSprop", "adagrad-decay": "Adagrad", "adam-coupled-decay": "Adam"}[name]
    P = torch.cat([_p_reference(kind, group, optimizer.state[p]).reshape(-1) for p in model.parameters()])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = []
    for batch in batches:
        H = dense_hessian(Case("batch", model, _mse, [batch]))
        x = (_flat_gradient(model, batch) + w * theta) / P
        expected.append(float(x @ (H @ x + w * x)) / float(x @ (P * x)))
    result = batch_sharpness(model, _mse, batches, hvp="double_backward", optimizer=optimizer)
    assert list(result.values) == pytest.approx(expected, rel=1e-8)
    assert result.along == "preconditioned gradient" and result.n_uphill == 0


def test_at_heavy_balls_edge_the_update_quotient_sits_at_two_over_lr():
    """On a quadratic at lr * lambda = 2 + 2 beta (heavy ball's threshold) the iterates settle into the
    period-two oscillation: the quotient along the update is lambda/(1 + beta) = 2/lr, a ratio of 1, while
    the gradient quotient gives lambda, (1 + beta) times the ratio of the update variant's 2/lr."""
    lam, beta = 4.0, 0.5
    lr = (2 + 2 * beta) / lam
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    loss_fn = lambda m, b: 0.5 * lam * (m(b) ** 2).mean()  # noqa: E731
    batch = torch.ones(1, 1, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta)
    for _ in range(200):  # the other root of the recurrence, -beta, dies out
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    along_update = batch_sharpness(model, loss_fn, [batch], optimizer=optimizer)
    assert along_update.ratio == pytest.approx(1.0, rel=1e-9)
    assert batch_sharpness(model, loss_fn, [batch]).value == pytest.approx(lam, rel=1e-12)


def test_critical_sharpness_on_a_quadratic_is_the_rayleigh_quotient():
    model = Quadratic()
    A, g = model.A, (model.A @ model.theta - model.b).detach()
    result = critical_sharpness(model, lambda m, b: m.loss(), [torch.zeros(1)], initial_step=1e-3)
    assert result.value == pytest.approx(float(g @ A @ g / (g @ g)), rel=1e-2)
    assert result.n_backward == 1 and result.n_forward <= 20
    d = -(g + 0.3 * torch.randn(g.shape, generator=torch.Generator().manual_seed(1), dtype=g.dtype))
    assert float(g @ d) < 0
    given = critical_sharpness(model, lambda m, b: m.loss(), [torch.zeros(1)], d, initial_step=10.0)
    assert given.value == pytest.approx(float(d @ A @ d / -(g @ d)), rel=1e-2)
    assert given.n_backward == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.05),
        lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    ],
)
def test_critical_sharpness_along_the_optimizers_next_update(make):
    """d = the step a copy of the optimizer takes, over lr: the value is d^T A d / (-g^T d), the threshold
    2/lr, and the ratio the inverse of the multiple of the actual step at which the loss stops falling."""
    import copy

    model = Quadratic()
    loss_fn = lambda m, b: m.loss()  # noqa: E731
    optimizer = make(model.parameters())
    for _ in range(4):
        optimizer.zero_grad()
        model.loss().backward()
        optimizer.step()
    optimizer.zero_grad()
    twin_model = copy.deepcopy(model)
    twin = make(twin_model.parameters())
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    twin_model.loss().backward()
    twin.step()
    lr = optimizer.param_groups[0]["lr"]
    step = (twin_model.theta - model.theta).detach()
    A, g = model.A, (model.A @ model.theta - model.b).detach()
    before = _state_copy(optimizer)
    result = critical_sharpness(
        model, loss_fn, [torch.zeros(1)], initial_step=lr, optimizer=optimizer, rel_tol=1e-3
    )
    d = step / lr
    assert result.value == pytest.approx(float(d @ A @ d / -(g @ d)), rel=2e-3)
    assert result.threshold == pytest.approx(2 / lr) and result.n_backward == 1
    multiple = 1 / result.ratio  # the loss at theta + multiple * step equals the loss at theta
    with torch.no_grad():
        base = float(model.loss())
        model.theta.add_(multiple * step)
        assert float(model.loss()) == pytest.approx(base, rel=1e-2, abs=1e-9)
        model.theta.sub_(multiple * step)
    for saved, state in zip(before, optimizer.state.values(), strict=True):  # the optimizer did not step
        assert all(torch.equal(saved[k], state[k]) for k in saved if torch.is_tensor(saved[k]))
    with pytest.raises(ValueError, match="direction"):
        critical_sharpness(model, loss_fn, [torch.zeros(1)], -g, optimizer=optimizer)


def test_critical_sharpness_on_an_mlp_matches_a_bisection_of_the_loss():
    model, batches = _mlp(), _batches(32, 2)
    loss0 = sum(_mse(model, b) for b in batches).item() / 2
    params = [p.detach().clone() for p in model.parameters()]
    g = torch.cat(
        [
            t.reshape(-1)
            for t in torch.autograd.grad(sum(_mse(model, b) for b in batches) / 2, model.parameters())
        ]
    )

    def rise(eta):
        shifted = {}
        offset = 0
        for (name, p), saved in zip(model.named_parameters(), params, strict=True):
            shifted[name] = saved - eta * g[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        with torch.no_grad():
            out = [
                0.5
                * (
                    (torch.func.functional_call(model, shifted, (x.double(),)) - nn.functional.one_hot(y, 10))
                    ** 2
                )
                .sum(dim=1)
                .mean()
                for x, y in batches
            ]
        return float(sum(out) / 2) - loss0

    lo, hi = 1e-4, 1e-4
    while rise(hi) <= 0:
        lo, hi = hi, 2 * hi
    for _ in range(60):  # a fine bisection, independent of the search under test
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rise(mid) <= 0 else (lo, mid)
    result = critical_sharpness(model, _mse, batches, rel_tol=1e-3)
    assert result.step == pytest.approx(hi, rel=1e-2)
    assert result.value == pytest.approx(2 / hi, rel=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def test_critical_sharpness_refuses_bad_directions_and_leaves_the_model_alone():
    model = Quadratic()
    loss_fn = lambda m, b: m.loss()  # noqa: E731
    g = (model.A @ model.theta - model.b).detach()
    before = model.theta.detach().clone()
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="flat tensor of the 8 measured parameters"):
        critical_sharpness(model, loss_fn, [torch.zeros(1)], torch.ones(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite and non-zero"):
        critical_sharpness(model, loss_fn, [torch.zeros(1)], torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="uphill"):
        critical_sharpness(model, loss_fn, [torch.zeros(1)], g)
    assert torch.equal(model.theta.detach(), before)
    assert torch.equal(torch.get_rng_state(), state)
    flat = nn.Linear(3, 1)  # a loss that never rises along d: no critical step
    result = critical_sharpness(flat, lambda m, b: -m.weight.sum(), [torch.zeros(1)], torch.ones(4))
    assert result.value == 0.0 and math.isinf(result.step)


@pytest.mark.parametrize("clip", [(0.0, "norm"), (math.inf, "norm"), (1.0, "l1"), (True, "value"), 1.0])
def test_a_bad_gradient_clip_is_named(clip):
    model = Quadratic()
    with pytest.raises(ValueError, match=r"`gradient_clip` must be None or a \(value > 0, \"norm\""):
        critical_sharpness(model, lambda m, b: m.loss(), [torch.zeros(1)], gradient_clip=clip)


def test_a_saturated_loss_has_no_critical_step_and_costs_few_passes():
    """tanh saturates: along d the loss falls to a plateau below its start and never rises again."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    loss_fn = lambda m, b: ((torch.tanh(m(b)) - 1) ** 2).mean()  # noqa: E731
    result = critical_sharpness(model, loss_fn, [torch.ones(4, 1)], torch.ones(1), initial_step=1.0)
    assert result.value == 0.0 and math.isinf(result.step)
    assert result.n_forward <= 12  # three unchanged doublings, not 2^40


def test_a_step_that_overflows_the_loss_counts_as_a_rise():
    """(|theta|^2)^150 along d = -theta_0: it rises again past eta = 2 and overflows to inf far beyond."""
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.5)
    loss_fn = lambda m, b: (m.weight**2).sum() ** 150  # noqa: E731
    d = -model.weight.detach().reshape(-1).clone()
    result = critical_sharpness(model, loss_fn, [torch.zeros(1)], d, initial_step=1e6, rel_tol=1e-3)
    assert result.step == pytest.approx(2.0, rel=1e-3)


# -- in a Lightning run ----------------------------------------------------------------------------
class _LastBatch(L.Callback):
    """Keeps the batch, parameters and optimizer of the last step (after the monitors' hooks ran)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch = batch
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())


def _quotient_monte_carlo(model, n_batches, size, seed):
    """Mean and standard error of g^T H g / ||g||^2 over fresh batches of the model's data, in float64
    through torch.func (another code path than the monitor's)."""
    x, y = digits(model.hparams.n)
    net = copy.deepcopy(model.net).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    quotients = []
    for _ in range(n_batches):
        idx = torch.randperm(len(x), generator=generator)[:size]
        target = nn.functional.one_hot(y[idx], 10).double()

        def loss(p, idx=idx, target=target):
            out = torch.func.functional_call(net, p, (x[idx].double(),))
            return 0.5 * ((out - target) ** 2).sum(dim=1).mean()

        g = torch.func.grad(loss)(params)
        _, hg = torch.func.jvp(torch.func.grad(loss), (params,), (g,))
        quotients.append(float(sum((g[k] * hg[k]).sum() for k in g) / sum((g[k] ** 2).sum() for k in g)))
    mean = sum(quotients) / n_batches
    std = math.sqrt(sum((q - mean) ** 2 for q in quotients) / (n_batches - 1))
    return mean, std / math.sqrt(n_batches)


def test_a_mini_batch_run_logs_batch_sharpness_within_error_bars_of_a_monte_carlo_estimate(tmp_path):
    """Mini-batch SGD: eos/batch_* by default at every measurement; the last value (at the final
    parameters) agrees with 400 fresh batches measured independently, within the combined error bars."""
    L.seed_everything(0)
    model = DigitsClassifier(lr=0.3, n=512, batch_size=32)
    monitor = HessianEigenMonitor(k=1, every_n_steps=15, at_fit_end=False)
    eos = EdgeOfStabilityMonitor(batch_sharpness_batches=40, batch_sharpness_rel_stderr=0.01)
    trainer(tmp_path, max_steps=30, callbacks=[monitor, eos]).fit(model)
    assert [h["step"] for h in eos.history] == [0, 15, 30]
    last = eos.history[-1]
    assert last["eos/batch_threshold"] == pytest.approx(2 / 0.3)  # plain SGD: along g, against 2/lr
    assert last["eos/batch_ratio"] == pytest.approx(last["eos/batch_sharpness"] * 0.3 / 2)
    mean, stderr = _quotient_monte_carlo(model, 400, 32, seed=12345)
    logged, logged_err = last["eos/batch_sharpness"], last["eos/batch_sharpness_stderr"]
    assert abs(logged - mean) <= 3 * math.hypot(logged_err, stderr), (logged, logged_err, mean, stderr)
    # The logged error bar is the sample formula: its spread matches the independent one's.
    n = last["eos/batch_sharpness_batches"]
    assert logged_err * math.sqrt(n) == pytest.approx(stderr * math.sqrt(400), rel=0.5)


def test_full_batch_runs_and_batch_sharpness_false_log_no_batch_sharpness(tmp_path):
    for model, kwargs in [
        (DigitsClassifier(lr=0.3, n=128), {}),
        (DigitsClassifier(lr=0.3, n=128, batch_size=32), {"batch_sharpness": False}),
    ]:
        eos = EdgeOfStabilityMonitor(**kwargs)
        trainer(tmp_path, max_steps=4, callbacks=[HessianEigenMonitor(k=1, every_n_steps=2), eos]).fit(model)
        assert eos.history and not any("eos/batch_sharpness" in h for h in eos.history)


@pytest.mark.parametrize("clip", [None, (0.05, "norm"), (0.002, "value")])
def test_in_a_run_critical_sharpness_follows_the_next_update_on_the_batch_just_trained(tmp_path, clip):
    """Every n steps: the line search along a stepped copy of the optimizer on the last batch, bisected
    here, gives the logged value; the ratio is against 2/lr. With Lightning's gradient clipping the copy
    steps on the gradient torch's clip_grad_norm_ / clip_grad_value_ leave: the step the trainer takes
    (norm 0.05: about a tenth of the unclipped one here)."""
    L.seed_everything(0)
    model = DigitsClassifier(lr=0.2, n=256, batch_size=32, momentum=0.9)
    eos = EdgeOfStabilityMonitor(critical_every_n_steps=5, batch_sharpness=False)
    last = _LastBatch()
    callbacks = [HessianEigenMonitor(k=1, every_n_steps=100), eos, last]
    clipping = {} if clip is None else {"gradient_clip_val": clip[0], "gradient_clip_algorithm": clip[1]}
    t = trainer(tmp_path, max_steps=10, callbacks=callbacks, **clipping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the clipping note
        t.fit(model)
    value, ratio = (float(t.callback_metrics[k]) for k in ("eos/critical_sharpness", "eos/critical_ratio"))
    assert ratio == pytest.approx(value * 0.2 / 2, rel=1e-6)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.2, momentum=0.9)
    optimizer.load_state_dict(last.optimizer_state)
    twin.loss(last.batch).backward()
    if clip is not None and clip[1] == "norm":
        assert float(torch.nn.utils.clip_grad_norm_(twin.parameters(), clip[0])) > 5 * clip[0]  # it binds
    elif clip is not None:
        assert max(float(p.grad.abs().max()) for p in twin.parameters()) > 5 * clip[0]
        torch.nn.utils.clip_grad_value_(twin.parameters(), clip[0])
    before = [p.detach().clone() for p in twin.parameters()]
    optimizer.step()
    step = [p.detach() - b for p, b in zip(twin.parameters(), before, strict=True)]

    def rise(mu):
        with torch.no_grad():
            for p, b, s in zip(twin.parameters(), before, step, strict=True):
                p.copy_(b + mu * s)
            return float(twin.loss(last.batch)) - base

    with torch.no_grad():
        for p, b in zip(twin.parameters(), before, strict=True):
            p.copy_(b)
        base = float(twin.loss(last.batch))
    lo, hi = 1e-3, 1e3  # the multiple of the actual step at which the loss stops falling
    assert rise(lo) < 0 < rise(hi)
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if rise(mid) <= 0 else (lo, mid)
    assert ratio == pytest.approx(1 / lo, rel=0.02)


@pytest.mark.parametrize("batch_size", [4, 64])
def test_the_edge_warning_names_the_larger_ratio_under_mini_batches(tmp_path, batch_size, capsys):
    """At batch 4 the batch sharpness is the nearer to its threshold, at batch 64 lambda_max: the warning
    fires on the larger ratio and names it; so do the examples' console table and edge summary."""
    L.seed_everything(0)
    model = DigitsClassifier(lr=0.3, n=256, batch_size=batch_size)
    eos = EdgeOfStabilityMonitor(warn_ratio=0.05)
    table = MeasurementTable(k=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callbacks = [HessianEigenMonitor(k=1, every_n_steps=2), eos, table]
        trainer(tmp_path, max_steps=2, callbacks=callbacks).fit(model)
    first = eos.history[0]
    batch_larger = first["eos/batch_ratio"] > first["eos/ratio"]
    assert batch_larger == (batch_size == 4), first
    edge = [str(w.message) for w in caught if "x the stability threshold" in str(w.message)]
    assert len(edge) == 1 and edge[0].startswith(
        f"step 0: {'batch sharpness' if batch_larger else 'sharpness'} "
    )
    larger = max(first["eos/batch_ratio"], first["eos/ratio"])
    assert f"reached {larger:.2f} x" in edge[0] and first["eos/warning"] == 1.0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.split()[0] == "0")
    assert f" {larger:6.3f}  " in row, row  # 0.586 (lambda_max, batch 64) or 0.774 (batch 4)
    assert row.endswith("below the edge (batch sharpness)" if batch_larger else "below the edge"), row
    assert edge_summary(eos)["initial_ratio"] == larger


def test_under_mini_batches_the_edge_is_judged_on_the_larger_ratio():
    """edge_of_stability: with a batch sharpness the edge is reached when either ratio reaches 1 (the batch
    quotient at small batches, lambda_max at large ones); without one, lambda_max's alone."""
    from pf_lightning.stability import StepDynamics, edge_of_stability, judged_edge

    gd = StepDynamics(0.1)  # threshold 20
    batch_above, _ = edge_of_stability([18.0], gd, step=5, batch_sharpness=21.0, batch_stderr=0.4)
    assert batch_above["eos/batch_ratio"] == pytest.approx(1.05) and batch_above["eos/first_edge_step"] == 5.0
    assert batch_above["eos/batch_threshold"] == 20.0 and batch_above["eos/batch_sharpness_stderr"] == 0.4
    sharp_above, _ = edge_of_stability([22.0], gd, step=5, batch_sharpness=15.0, batch_threshold=16.0)
    assert (
        sharp_above["eos/batch_ratio"] == pytest.approx(15 / 16) and sharp_above["eos/first_edge_step"] == 5.0
    )
    assert judged_edge(batch_above).quantity == "batch sharpness" and judged_edge(batch_above).ratio == 1.05
    assert judged_edge(sharp_above).quantity == "sharpness" and judged_edge(sharp_above).ratio == 1.1
    both_below, _ = edge_of_stability([19.0], gd, step=5, batch_sharpness=15.0, batch_threshold=16.0)
    assert "eos/first_edge_step" not in both_below
    alone, _ = edge_of_stability([22.0], gd, step=5)
    assert alone["eos/first_edge_step"] == 5.0 and "eos/batch_ratio" not in alone


def test_an_update_against_the_batch_gradient_is_counted_uphill_and_critical_is_infinite():
    """Heavy ball whose buffer points against this batch's gradient: s^T g < 0, the quotient is negative
    and counted in n_uphill; critical sharpness along that update is inf (the loss rises at every step),
    not an error; a given uphill direction without an optimizer stays an error."""
    lam, lr, beta = 4.0, 0.1, 0.9
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    loss_fn = lambda m, b: 0.5 * lam * (m(b) ** 2).mean()  # noqa: E731  # g = lam * w = 4
    batch = torch.ones(1, 1, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta)
    optimizer.state[model.weight]["momentum_buffer"] = torch.full((1, 1), -10.0, dtype=torch.float64)
    s = beta * -10.0 + 4.0  # -5: the step -lr s moves w up, the loss rises at every step size
    result = batch_sharpness(model, loss_fn, [batch], optimizer=optimizer)
    assert result.values[0] == pytest.approx(s * lam * s / (s * 4.0))  # -5 * 4 * -5 / -20 = -5
    assert result.n_uphill == 1
    critical = critical_sharpness(model, loss_fn, [batch], optimizer=optimizer, initial_step=lr)
    assert math.isinf(critical.value) and math.isinf(critical.ratio) and critical.step == 0.0
    with pytest.raises(ValueError, match="points uphill"):
        critical_sharpness(model, loss_fn, [batch], torch.ones(1, dtype=torch.float64))


def test_in_float32_an_uphill_update_is_infinite_and_an_unresolved_given_direction_is_warned():
    """In float32 the loss's rise at the small steps that show an update points uphill is below the dtype's
    resolution: a change of exactly 0, which the search read as "not rising", so an outside trial's heavy
    ball against its gradient gave a critical sharpness of 1.8e8 where float64 gave inf. The update's slope
    gᵀd tells it now, without a search; a given direction, whose slope is unknown, is warned about."""
    gen = torch.Generator().manual_seed(0)
    A, t = torch.randn(40, 5, generator=gen), torch.randn(40, generator=gen)
    model = nn.Linear(5, 1)
    loss_fn = lambda m, b: 0.5 * ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()  # noqa: E731
    grads = torch.autograd.grad(loss_fn(model, (A, t)), list(model.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for p, g in zip(model.parameters(), grads, strict=True):
        optimizer.state[p]["momentum_buffer"] = -5 * g  # s = 0.9 (-5 g) + g = -3.5 g: uphill
    for dtype in (None, torch.float64):
        critical = critical_sharpness(
            model, loss_fn, [(A, t)], optimizer=optimizer, initial_step=0.05, dtype=dtype
        )
        assert math.isinf(critical.value) and math.isinf(critical.ratio) and critical.step == 0.0
        assert critical.n_forward == 1  # the base loss alone
    uphill = torch.cat([g.reshape(-1) for g in grads])
    with pytest.raises(ValueError, match="points uphill"):
        critical_sharpness(model, loss_fn, [(A, t)], uphill, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="fell below its value at no step tried"):
        critical_sharpness(model, loss_fn, [(A, t)], uphill)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a descent direction falls at the steps tried: no warning
        downhill = critical_sharpness(model, loss_fn, [(A, t)], -uphill)
    # A quadratic: along d = -g the value is g^T H g / |g|^2, H = X^T X / n over the features and the bias.
    X = torch.cat([A, torch.ones(40, 1)], dim=1).double()
    g = uphill.double()  # the weight's then the bias's, as X's columns
    rayleigh = float(g @ (X.T @ X / 40) @ g / (g @ g))
    assert downhill.value == pytest.approx(rayleigh, rel=0.02)


def test_an_optimizer_that_maximizes_has_no_next_update_to_measure():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    with pytest.raises(Exception, match="maximize=True"):
        critical_sharpness(model, _mse, _batches(8, 1), optimizer=optimizer)


def _loop_of(loader, accumulate=1):
    """A stand-in trainer for TrainingBatches.from_trainer: ``loader`` whole (no limit_train_batches), the
    training loop's conversions as they are for float32 on CPU."""
    from types import SimpleNamespace

    identity = SimpleNamespace(
        convert_input=lambda b: b,
        _on_before_batch_transfer=lambda b, dataloader_idx: b,
        batch_to_device=lambda b, dataloader_idx: b,
    )
    return SimpleNamespace(
        train_dataloader=loader,
        num_training_batches=len(loader),
        accumulate_grad_batches=accumulate,
        precision_plugin=identity,
        lightning_module=identity,
        strategy=identity,
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_training_batches_leave_out_the_remainder_drop_last_never_trains_on(shuffle):
    """200 samples in batches of 64 with drop_last: an unshuffled loader trains on samples 0-191 only, every
    epoch (batch sharpness drew from all 200; outside trial); a shuffled one drops other samples each epoch."""

    from torch.utils.data import TensorDataset

    from pf_lightning.callbacks._probe import TrainingBatches

    x, y = digits(200)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, drop_last=True, shuffle=shuffle)
    pool = sorted(TrainingBatches.from_trainer(_loop_of(loader)).pool.tolist())
    assert pool == list(range(200 if shuffle else 192))


def test_training_batches_follow_the_loaders_sampler_accumulation_and_leave_the_rngs_alone():
    """Drawn from the indices the sampler yields (a subset), through __getitems__ where the dataset has it,
    the same for the same seed, as micro-batches under accumulation (one ProbeSet per mini-batch, whose
    batch sharpness is that of their union), with torch's global generator untouched."""

    from torch.utils.data import SubsetRandomSampler, TensorDataset

    from pf_lightning import ProbeSet
    from pf_lightning.callbacks._probe import TrainingBatches

    class Batched(TensorDataset):
        fetched = 0

        def __getitems__(self, indices):
            Batched.fetched += 1
            return [self[i] for i in indices]

    x, y = digits(64)
    subset = list(range(10, 40))
    loader = DataLoader(Batched(x, y), batch_size=5, sampler=SubsetRandomSampler(subset))
    fake = _loop_of(loader, accumulate=2)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    source = TrainingBatches.from_trainer(fake)
    first, again = list(source.draw(4, seed=7)), list(source.draw(4, seed=7))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(isinstance(b, ProbeSet) and len(b) == 2 for b in first) and Batched.fetched == 16
    rows = {tuple(r.tolist()) for r in x[10:40]}
    for a, b in zip(first, again, strict=True):
        for (xa, ya), (xb, yb) in zip(a.batches, b.batches, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and len(xa) == 5
            assert all(tuple(r.tolist()) in rows for r in xa)  # only the sampler's subset
    drawn = [torch.cat([b[0] for b in m.batches]) for m in first[:3]]  # one order: no repeats in 3 x 10
    assert len({tuple(r.tolist()) for d in drawn for r in d}) == 30
    model = _mlp()
    union = [(torch.cat([b[0] for b in m.batches]), torch.cat([b[1] for b in m.batches])) for m in first]
    assert batch_sharpness(model, _mse, first).values == pytest.approx(
        batch_sharpness(model, _mse, union).values, rel=1e-10
    )


class _Limited(DigitsClassifier):
    def __init__(self, shuffle, **kwargs):
        super().__init__(**kwargs)
        self.shuffle = shuffle

    def train_dataloader(self):
        x, y = digits(self.hparams.n)
        return DataLoader(TensorDataset(x, y), batch_size=self.hparams.batch_size, shuffle=self.shuffle)


@pytest.mark.parametrize("batches", [1, 2])
@pytest.mark.parametrize("shuffle", [False, True], ids=["fixed order", "shuffled"])
def test_limit_train_batches_on_a_fixed_order_is_all_the_run_trains_on(tmp_path, shuffle, batches):
    """limit_train_batches without shuffling: every epoch trains on the loader's first batches, so the
    default probe holds them (eig_1 at step 0 = the dense float64 Hessian of their loss), one batch is
    full-batch training (no batch sharpness) and two draw batch sharpness from those 32 samples alone.
    Shuffled, each epoch takes other batches of all 256: mini-batch training on all of them. Before, a
    fixed single batch of 16 was judged on batch sharpness drawn from all 256 (ratio 0.313 against the
    probe's 1.287 at step 0 in the helper's run)."""
    from pf_lightning.callbacks._probe import TrainingBatches

    L.seed_everything(0)
    model = _Limited(shuffle, n=256, batch_size=16)
    start = copy.deepcopy(model.net).double()
    monitor = HessianEigenMonitor(k=1, every_n_steps=3, tol=1e-6)
    eos = EdgeOfStabilityMonitor(batch_sharpness_batches=4)
    t = trainer(tmp_path, max_steps=3, limit_train_batches=batches, callbacks=[monitor, eos])
    t.fit(model)
    measured = (batches > 1 or shuffle) == any("eos/batch_sharpness" in h for h in eos.history)
    assert measured, eos.history[0]
    if shuffle:
        assert TrainingBatches.from_trainer(t).pool.numel() == 256
        return
    x, y = digits(16 * batches)
    H = dense_hessian(Case("first batches", start, _mse, [(x.double(), y)]))
    assert monitor.history[0]["eigenvalues"][0] == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-5
    )
    if batches > 1:
        assert TrainingBatches.from_trainer(t).pool.tolist() == list(range(32))
        # The batch sharpness is the mean over the two batches trained on (it averaged random regroupings
        # of their 32 samples, batches never trained on).
        quotients = []
        for b in range(batches):
            batch = (x[16 * b : 16 * (b + 1)].double(), y[16 * b : 16 * (b + 1)])
            H = dense_hessian(Case("trained batch", start, _mse, [batch]))
            g = torch.cat(
                [d.reshape(-1) for d in torch.autograd.grad(_mse(start, batch), list(start.parameters()))]
            )
            quotients.append(float(g @ H @ g / (g @ g)))
        assert eos.history[0]["eos/batch_sharpness"] == pytest.approx(sum(quotients) / batches, rel=1e-5)


def test_a_whole_loader_in_a_fixed_order_is_judged_on_the_batches_it_trains_on(tmp_path):
    """An unshuffled loader trains on the same consecutive batches every epoch, cut short or not: without
    limit_train_batches the batch sharpness averaged random regroupings of its samples, batches never trained
    on (an outside trial: 5.835 where the five trained batches' mean was 2.707). Now their mean, exactly."""
    L.seed_everything(0)
    model = _Limited(False, n=64, batch_size=16)
    start = copy.deepcopy(model.net).double()
    monitor = HessianEigenMonitor(k=1, every_n_steps=3, tol=1e-6)
    eos = EdgeOfStabilityMonitor(batch_sharpness_batches=8)
    trainer(tmp_path, max_steps=3, callbacks=[monitor, eos]).fit(model)
    x, y = digits(64)
    quotients = []
    for b in range(4):
        batch = (x[16 * b : 16 * (b + 1)].double(), y[16 * b : 16 * (b + 1)])
        H = dense_hessian(Case("trained batch", start, _mse, [batch]))
        g = torch.cat(
            [d.reshape(-1) for d in torch.autograd.grad(_mse(start, batch), list(start.parameters()))]
        )
        quotients.append(float(g @ H @ g / (g @ g)))
    assert eos.history[0]["eos/batch_sharpness_batches"] == 4  # each trained batch once
    assert eos.history[0]["eos/batch_sharpness"] == pytest.approx(sum(quotients) / 4, rel=1e-5)


@pytest.mark.parametrize("limit", [None, 2])
def test_a_probe_larger_than_the_trained_batches_names_what_limits_it(tmp_path, limit):
    """A whole unshuffled loader's probe warning blamed limit_train_batches, which was not set (a review)."""
    model = _Limited(False, n=64, batch_size=16)
    monitor = HessianEigenMonitor(k=1, every_n_steps=None, at_fit_end=False, probe=128)
    options = {} if limit is None else {"limit_train_batches": limit}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=1, callbacks=[monitor], **options).fit(model)
    said = [str(w.message) for w in record if "asks for more samples" in str(w.message)]
    expected = "the training dataloader yields (64)" if limit is None else "the 2 batch(es) of the loader"
    assert len(said) == 1 and expected in said[0], said


class _Curriculum(DigitsClassifier):
    """Each epoch a new stretch of 256 samples (the loader reloaded every epoch), in a fixed order."""

    def train_dataloader(self):
        x, y = digits(768)
        span = slice(256 * self.trainer.current_epoch, 256 * (self.trainer.current_epoch + 1))
        return DataLoader(TensorDataset(x[span], y[span]), batch_size=64)


def test_a_reloaded_training_loader_is_where_batch_sharpness_draws_from(tmp_path):
    """reload_dataloaders_every_n_epochs=1: the batch sharpness drew from the fit's first loader all run,
    silently (1.348 here at step 4 where the batches trained give 1.383). It follows the reloaded
    loader (here the two batches each epoch trains on: limit_train_batches=2 on a fixed order), and the
    Hessian monitor says that its probe stays the one drawn at fit start."""
    L.seed_everything(0)
    model = _Curriculum(n=768, batch_size=64)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, probe=128)
    eos = EdgeOfStabilityMonitor(batch_sharpness_batches=4)
    weights = {}
    eos.add_listener(lambda t, m, metrics: weights.update({t.global_step: copy.deepcopy(m.net).double()}))
    t = trainer(
        tmp_path,
        max_epochs=3,
        limit_train_batches=2,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[monitor, eos],
    )
    with pytest.warns(RuntimeWarning, match="dataloader was reloaded .* the probe keeps the samples drawn"):
        t.fit(model)
    x, y = digits(768)
    measured = {h["step"]: h["eos/batch_sharpness"] for h in eos.history if "eos/batch_sharpness" in h}
    for step, epoch in ((4, 1), (6, 2)):
        quotients = []
        for b in range(2):  # the two batches of this epoch's stretch that it trains on
            rows = slice(256 * epoch + 64 * b, 256 * epoch + 64 * (b + 1))
            batch, net = (x[rows].double(), y[rows]), weights[step]
            H = dense_hessian(Case("trained batch", net, _mse, [batch]))
            g = torch.cat(
                [d.reshape(-1) for d in torch.autograd.grad(_mse(net, batch), list(net.parameters()))]
            )
            quotients.append(float(g @ H @ g / (g @ g)))
        assert measured[step] == pytest.approx(sum(quotients) / 2, rel=1e-5)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        x, y = digits(64)
        return iter(zip(x, y, strict=True))


def test_batch_sharpness_and_critical_sharpness_that_cannot_apply_stop_at_set_up(tmp_path):
    model = DigitsClassifier(n=64)
    model.train_dataloader = lambda: DataLoader(_Stream(), batch_size=16)
    eos = EdgeOfStabilityMonitor(batch_sharpness=True)
    with (
        pytest.raises(MisconfigurationException, match=r"batch_sharpness=True .* iterable"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=2, callbacks=[HessianEigenMonitor(k=1, probe=32), eos]).fit(model)
    # The monitor's fit-start measurement came first: its listener does not call the error a skipped
    # measurement that training goes on after.
    assert not [w for w in caught if "skipped" in str(w.message)], [str(w.message) for w in caught]

    class Custom(torch.optim.SGD):
        pass

    rule = optimizer_rule(torch.optim.SGD)
    register_optimizer_rule(Custom, OptimizerRule("custom", rule.dynamics))  # no `update`
    try:
        model = DigitsClassifier(n=64, batch_size=16)
        model.configure_optimizers = lambda: Custom(model.parameters(), lr=0.1)
        eos = EdgeOfStabilityMonitor(critical_every_n_steps=1)
        with pytest.raises(MisconfigurationException, match="critical_every_n_steps needs the next update"):
            trainer(tmp_path, max_steps=2, callbacks=[HessianEigenMonitor(k=1), eos]).fit(model)
    finally:
        optimizers._RULES.pop(Custom)


class _NaNWhenMeasuringThrees(DigitsClassifier):
    """Batches that start with a 3 have a NaN loss inside a measurement (a bad sample in the pool)."""

    def training_step(self, batch, batch_idx):
        from pf_lightning import is_measuring

        loss = self.loss(batch)
        return loss * float("nan") if is_measuring() and int(batch[1][0]) == 3 else loss


def test_batches_left_out_of_batch_sharpness_are_warned_about(tmp_path):
    """A batch whose loss was NaN was dropped from the mean without a flag or a warning (outside trial)."""
    L.seed_everything(0)
    x, y = digits(64)
    keep = y != 3
    probe = [(x[keep][:32], y[keep][:32])]
    monitor, eos = HessianEigenMonitor(k=1, every_n_steps=4, probe=probe), EdgeOfStabilityMonitor()
    with pytest.warns(RuntimeWarning, match=r"batch sharpness left out [1-9]\d* of its batches"):
        trainer(tmp_path, max_steps=4, callbacks=[monitor, eos]).fit(
            _NaNWhenMeasuringThrees(n=256, batch_size=8)
        )
    measured = [h["eos/batch_sharpness_batches"] for h in eos.history if "eos/batch_sharpness_batches" in h]
    assert (
        measured and min(measured) < 20 and all(math.isfinite(h["eos/batch_sharpness"]) for h in eos.history)
    )


@pytest.mark.parametrize(
    ("optimizer", "momentum", "warned"), [("sgd", 0.0, False), ("sgd", 0.9, True), ("adam", 0.0, True)]
)
def test_a_given_threshold_says_the_batch_sharpness_is_along_the_gradient(
    tmp_path, optimizer, momentum, warned
):
    """threshold= judges the optimizer as gradient descent: its batch sharpness is g^T H g / g^T g, which is not
    the step of momentum, a preconditioner or LBFGS's line search (README: 'skipped with a warning'; an outside
    trial found it logged in silence). Said once, where the step is not plain gradient descent."""
    L.seed_everything(0)
    model = DigitsClassifier(n=128, batch_size=32, optimizer=optimizer, momentum=momentum, lr=0.01)
    monitors = [HessianEigenMonitor(k=1, every_n_steps=2), EdgeOfStabilityMonitor(threshold=50.0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=2, callbacks=monitors).fit(model)
    said = [w for w in caught if "taken along each batch's gradient" in str(w.message)]
    assert len(said) == int(warned)
    assert monitors[1].history[-1]["eos/batch_threshold"] == pytest.approx(50.0)
