"""The optimizer rulebook against independent references: the real torch.optim step, simulated
recurrences on quadratics, dense float64 Hessians and preconditioners written out here from torch's
update formulas; and the EoS monitor that reads it, for every torch.optim optimizer."""

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch
from cases import Case, dense_hessian
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import DigitsClassifier, digits, trainer
from torch.utils.data import DataLoader, TensorDataset

from pf_lightning import EdgeOfStabilityMonitor, HessianEigenMonitor
from pf_lightning.stability import (
    EdgeHistory,
    OptimizerRule,
    StepDynamics,
    coupled_weight_decay,
    edge_of_stability,
    optimizer_rule,
    optimizer_threshold,
    optimizers,
    register_optimizer_rule,
    step_dynamics,
    uneven_steps,
)


def rho(matrix) -> float:
    return float(np.abs(np.linalg.eigvals(np.asarray(matrix, dtype=np.float64))).max())


# -- the recurrence against the real optimizer -------------------------------------------------
SGD_CASES = [
    ({"lr": 0.1}, [5.0, 15.0, 19.0, 21.0]),
    ({"lr": 0.1, "momentum": 0.9}, [0.02, 3.0, 30.0, 37.0, 39.0]),
    ({"lr": 0.1, "momentum": 0.9, "nesterov": True}, [3.0, 12.0, 13.0, 14.0]),
    ({"lr": 0.1, "momentum": 0.5, "dampening": 0.3}, [5.0, 40.0, 42.0, 44.0]),
    ({"lr": 0.05, "momentum": 0.8, "dampening": 0.5, "nesterov": False}, [10.0, 140.0, 150.0]),
]


@pytest.mark.parametrize(("settings", "curvatures"), SGD_CASES)
def test_sgd_growth_and_threshold_match_torch_on_a_quadratic(settings, curvatures):
    for lam in curvatures:
        x = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        optimizer = torch.optim.SGD([x], **settings)
        log_abs, scale = [], 0.0  # log|x_t|, with x and the momentum buffer rescaled to stay finite
        for _ in range(2000):
            optimizer.zero_grad()
            (0.5 * lam * x.square().sum()).backward()
            optimizer.step()
            log_abs.append(math.log(abs(float(x))) + scale)
            factor = abs(float(x))
            with torch.no_grad():
                x.div_(factor)
                if "momentum_buffer" in optimizer.state[x]:
                    optimizer.state[x]["momentum_buffer"].div_(factor)
            scale += math.log(factor)
        dynamics = step_dynamics(optimizer)
        # Growth per step over 1500 steps, from the envelope (the largest |x| over 30 steps): complex
        # roots rotate the phase, so single iterates would not do.
        measured = (max(log_abs[-30:]) - max(log_abs[-1530:-1500])) / 1500
        assert float(dynamics.log_growth([lam])[0]) == pytest.approx(measured, abs=2e-3), lam
        assert (lam > dynamics.threshold) == (measured > 0), lam


def test_heavy_ball_growth_is_the_spectral_radius_of_its_matrix():
    lr, beta = 0.1, 0.9
    dynamics = step_dynamics(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=beta))
    lams = [0.01, 6.3, 30.0, 38.0, 40.0]
    expected = [math.log(rho([[1 + beta - lr * lam, -beta], [1, 0]])) for lam in lams]
    assert dynamics.log_growth(lams).tolist() == pytest.approx(expected, abs=1e-12)
    # REFERENCE §6.3: the "effective step" lr/(1 + beta) gave -0.547 at lambda = 30; heavy ball's is -0.053.
    assert expected[2] == pytest.approx(-0.0527, abs=1e-4)
    assert dynamics.regimes(lams) == ["stable", "oscillating", "oscillating", "oscillating", "unstable"]


def _moment(optimizer, p, key):
    return optimizer.state[p][key].detach().double()


def _reference_update(optimizer, p, before, grad):
    """-lr (a (g + w theta) + b m) / P from the rule's dynamics, P and coupled decay w, after the step."""
    rule = optimizer_rule(optimizer)
    group = optimizer.param_groups[0]
    state = optimizer.state[p]
    d = rule.dynamics(group, state)
    P = rule.preconditioner(group, state).double() if rule.preconditioned else torch.ones_like(grad)
    m = state["exp_avg"].double() if d.momentum_weight else torch.zeros_like(grad)
    g = grad + rule.coupled_weight_decay(group) * before
    return -d.lr * (d.gradient_weight * g + d.momentum_weight * m) / P


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
        lambda p: torch.optim.Adamax(p, lr=1e-2),
        lambda p: torch.optim.NAdam(p, lr=1e-2),
        lambda p: torch.optim.RAdam(p, lr=1e-2),
        lambda p: torch.optim.RMSprop(p, lr=1e-2),
        lambda p: torch.optim.RMSprop(p, lr=1e-2, centered=True),
        lambda p: torch.optim.Adagrad(p, lr=1e-1, lr_decay=0.05),
    ],
)
def test_rules_reproduce_the_real_step(make):
    """The rule's (a, b, P) of the last step give exactly the update torch.optim applied (ASGD's rule is its
    next step's: test_asgd_s_threshold_is_the_edge_of_its_next_step_under_a_schedule)."""
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64)
    A = A @ A.T / 6
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    optimizer = make([p])
    for _ in range(12):  # through RAdam's warm-up (rho_t <= 5 until step 6)
        optimizer.zero_grad()
        (0.5 * p @ A @ p).backward()
        before, grad = p.detach().clone(), p.grad.detach().clone()
        optimizer.step()
        expected = _reference_update(optimizer, p, before, grad)
        torch.testing.assert_close(p.detach() - before, expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize(
    "schedule",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.1),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=6),
    ],
    ids=["step-drop", "linear-warm-up"],
)
def test_asgd_s_threshold_is_the_edge_of_its_next_step_under_a_schedule(schedule):
    """ASGD's next step runs at the eta its last step set from the rate of then, so a schedule reaches it a
    step late. The rule read the group's new rate with the step count instead: an outside review logged
    eos/threshold 200 at a StepLR drop where the step that followed ran at eta 0.1 (edge 20), 10x off.
    Here, on (lambda/2) x^2 + ASGD's (lambd/2) x^2 with lambda + lambd at the threshold, the step that follows
    maps x to -x: on the edge."""
    x = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = torch.optim.ASGD([x], lr=0.1, lambd=0.5, alpha=0.75)
    scheduler = schedule(optimizer)
    for step in range(8):
        threshold = step_dynamics(optimizer).threshold
        curvature = threshold - coupled_weight_decay(optimizer)
        with torch.no_grad():
            x.fill_(1.0)
        optimizer.zero_grad()
        (0.5 * curvature * x.square()).sum().backward()
        optimizer.step()
        assert float(x) == pytest.approx(-1.0, abs=1e-6), step  # eta is kept in float32
        scheduler.step()


def test_a_group_s_step_count_is_read_from_a_parameter_the_optimizer_has_stepped():
    """Adagrad creates every parameter's state, at step 0, up front: an unused parameter first in the
    group must not make the threshold 2(1 + (t - 1) lr_decay)/lr that of step 0."""
    head, net = torch.nn.Linear(2, 2), torch.nn.Linear(3, 1)  # head: never a gradient
    optimizer = torch.optim.Adagrad([*head.parameters(), *net.parameters()], lr=0.1, lr_decay=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.ones(4, 3)).pow(2).sum().backward()
        optimizer.step()
    assert optimizer_threshold(optimizer).value == pytest.approx(2 * (1 + (3 - 1) * 0.5) / 0.1)


# -- the EoS monitor for every torch.optim optimizer -------------------------------------------
def _p_reference(name, group, state):
    """P of torch 2.13's update, written out from its sources (REFERENCE §6.4)."""
    beta1, beta2 = group.get("betas", (0.0, 0.0))
    t = float(state.get("step", 0))
    eps = group.get("eps", 0.0)
    if name in ("Adam", "AdamW", "AdamSubclass"):
        return (1 - beta1**t) * ((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)
    if name == "Adamax":
        return (1 - beta1**t) * state["exp_inf"]
    if name == "NAdam":
        return (state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps
    if name == "RAdam":
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        if rho_t <= 5:
            return torch.full_like(state["exp_avg_sq"], 1 - beta1**t)
        return (1 - beta1**t) * (state["exp_avg_sq"].sqrt() + eps) / math.sqrt(1 - beta2**t)
    if name == "RMSprop":
        nu = state["square_avg"] - (state["grad_avg"] ** 2 if group["centered"] else 0)
        return nu.sqrt() + eps
    if name == "Adagrad":
        return state["sum"].sqrt() + eps
    if name == "Adadelta":
        return (state["square_avg"] + eps).sqrt() / (state["acc_delta"] + eps).sqrt()
    raise AssertionError(name)


def _threshold_reference(name, group, state):
    lr, t = group["lr"], float(state.get("step", 0))
    beta1 = group.get("betas", (0.0,))[0]
    momentum, nesterov = group.get("momentum", 0.0), group.get("nesterov", False)
    if name == "SGD":
        if nesterov:
            return (2 + 2 * momentum) / (lr * (1 + 2 * momentum))
        return (2 + 2 * momentum) / (lr * (1 - group["dampening"]))
    if name == "ASGD":  # torch: step t + 1, the next, runs at eta = lr / (1 + lambd lr t)^alpha
        return 2 / (lr / (1 + group["lambd"] * lr * t) ** group["alpha"])
    if name in ("Adam", "AdamW", "Adamax", "AdamSubclass"):
        return (2 + 2 * beta1) / ((1 - beta1) * lr)
    if name == "NAdam":  # Nesterov form of Adam: u = (a g + b m) / P with the mu schedule
        mu = [beta1 * (1 - 0.5 * 0.96 ** (s * group["momentum_decay"])) for s in (t, t + 1)]
        product = float(state["mu_product"])
        a, b = (1 - mu[0]) / (1 - product), mu[1] / (1 - product * mu[1])
        return 2 * (1 + beta1) / (lr * (a * (1 + beta1) + b * (1 - beta1)))
    if name == "RAdam":
        beta2 = group["betas"][1]
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        r = (
            1.0
            if rho_t <= 5
            else math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        )
        return (2 + 2 * beta1) / ((1 - beta1) * lr * r)
    if name == "RMSprop":
        return (2 + 2 * momentum) / lr
    if name == "Adagrad":
        return 2 / (lr / (1 + (t - 1) * group["lr_decay"]))
    if name == "Adadelta":
        return 2 / lr
    raise AssertionError(name)


class AdamSubclass(torch.optim.Adam):
    """A user's subclass: it takes Adam's rule."""


SUPPORTED = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=1e-2),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1),
    "SGD-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=0.05, lambd=1e-3, weight_decay=1e-2),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "Adam-decoupled": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
    "NAdam-coupled": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-2),
    "RAdam-decoupled": lambda p: torch.optim.RAdam(
        p, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True
    ),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "AdamSubclass": lambda p: AdamSubclass(p, lr=1e-2),
}
COUPLED = {"SGD": 1e-2, "ASGD": 1e-2 + 1e-3, "Adam": 1e-2, "NAdam-coupled": 1e-2}  # L2 in the gradient


UPDATE_CASES = {
    **SUPPORTED,
    "SGD-nesterov-decay": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1
    ),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "Adamax-decay": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=0.1),
    "RMSprop-plain": lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=0.1),
    "Adagrad-initial": lambda p: torch.optim.Adagrad(p, lr=0.05, initial_accumulator_value=0.5),
    "Adadelta-decay": lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.1),
    "two-groups": lambda p: torch.optim.SGD(
        [{"params": [p[0]], "momentum": 0.9}, {"params": [p[1]], "lr": 0.2}], lr=0.05
    ),
}


@pytest.mark.parametrize("name", sorted(UPDATE_CASES))
def test_the_predicted_next_update_is_the_step_torch_takes(name):
    """optimizer_update, from the state and without stepping, equals the step torch.optim then takes: from
    the first step (empty state) on, for every rule, on two parameters laid out flat."""
    from pf_lightning.curvature import ParameterSpace, optimizer_update

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    optimizer = UPDATE_CASES[name](list(model.parameters()))
    space = ParameterSpace(model)
    for _ in range(8):  # through RAdam's warm-up and NAdam's schedule
        grads = [torch.randn_like(p) for p in model.parameters()]
        state_before = copy.deepcopy(optimizer.state_dict()["state"])
        predicted = optimizer_update(optimizer, space, space.flatten(grads))
        after_prediction = optimizer.state_dict()["state"]
        assert after_prediction.keys() == state_before.keys()  # the prediction left every state alone
        for index, saved in state_before.items():
            for key, value in saved.items():
                assert torch.equal(torch.as_tensor(after_prediction[index][key]), torch.as_tensor(value)), key
        before = space.values()
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        optimizer.step()
        rtol = 1e-6 if name.startswith(("ASGD", "NAdam")) else 1e-10  # eta, mu_product kept in float32
        torch.testing.assert_close(predicted, space.values() - before, rtol=rtol, atol=1e-15)


def _mse(m, batch):
    out = m(batch[0].double())
    return 0.5 * ((out - torch.nn.functional.one_hot(batch[1], 10).double()) ** 2).sum(1).mean()


def _dense_hessian(model, batch):
    return dense_hessian(Case("probe", model, _mse, [batch]))


class _Digits(DigitsClassifier):
    def __init__(self, make, **kwargs):
        super().__init__(**kwargs)
        self.make = make

    def configure_optimizers(self):
        return self.make(self.parameters())


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_every_supported_optimizer_logs_the_edge_against_a_dense_reference(tmp_path, name):
    L.seed_everything(0)
    model = _Digits(SUPPORTED[name], hidden=8, n=48).double()
    x, y = digits(48)
    probe = [(x.double(), y)]
    seen = []

    def check(trainer_, pl_module, metrics):
        optimizer = trainer_.optimizers[0]
        group = optimizer.param_groups[0]
        state0 = optimizer.state.get(group["params"][0], {})
        H = _dense_hessian(pl_module, probe[0])
        kind = name.split("-")[0]
        decay = COUPLED.get(name, 0.0)
        if optimizer_rule(optimizer).preconditioned:
            P = torch.cat(
                [_p_reference(kind, group, optimizer.state[p]).reshape(-1) for p in group["params"]]
            )
            D = P.double().rsqrt()
            shifted = H + decay * torch.eye(len(P), dtype=H.dtype)
            sharpness = float(torch.linalg.eigvalsh(D[:, None] * shifted * D[None, :])[-1])
        else:
            sharpness = float(torch.linalg.eigvalsh(H)[-1]) + decay
        threshold = _threshold_reference(kind, group, state0)
        rtol = 1e-6 if kind == "ASGD" else 1e-9  # ASGD keeps eta in float32
        assert metrics["eos/threshold"] == pytest.approx(threshold, rel=rtol)
        assert metrics["eos/sharpness"] == pytest.approx(sharpness, rel=1e-6)
        assert metrics["eos/ratio"] == pytest.approx(sharpness / threshold, rel=1e-6)
        seen.append(trainer_.global_step)

    monitor = HessianEigenMonitor(k=1, every_n_steps=4, probe=probe, tol=1e-9)
    eos = EdgeOfStabilityMonitor()
    eos.add_listener(check)
    preconditioned = optimizer_rule(SUPPORTED[name]([torch.nn.Parameter(torch.zeros(1))])).preconditioned
    with (
        pytest.warns(RuntimeWarning, match="no preconditioner before its first step")
        if preconditioned
        else _nothing()
    ):
        trainer(tmp_path, max_steps=12, callbacks=[monitor, eos]).fit(model)
    assert preconditioned == ("eos/preconditioned_sharpness" in eos.history[-1])
    # Every measurement logs the edge; an adaptive optimizer's fit-start one (no state yet) the threshold.
    assert seen == ([4, 8, 12] if preconditioned else [0, 4, 8, 12])
    assert [h["step"] for h in monitor.history] == [0, 4, 8, 12]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.LBFGS(p),
        lambda p: torch.optim.Rprop(p),
        lambda p: torch.optim.Adafactor(p),
        lambda p: torch.optim.SparseAdam(p),
    ],
)
def test_an_optimizer_without_a_rule_stops_at_set_up_with_its_name(tmp_path, make):
    model = _Digits(make, hidden=8, n=48)
    name = type(make([torch.nn.Parameter(torch.zeros(1))])).__name__
    t = trainer(tmp_path, max_steps=2, callbacks=[HessianEigenMonitor(k=1), EdgeOfStabilityMonitor()])
    with pytest.raises(MisconfigurationException, match=f"{name}.*supported: ASGD, Adadelta, Adagrad, Adam"):
        t.fit(model)


def test_a_registered_rule_serves_a_custom_optimizer_and_its_subclasses(monkeypatch):
    monkeypatch.setattr(optimizers, "_RULES", dict(optimizers._RULES))  # no rule outlives the test

    class HalfStepSGD(torch.optim.SGD):
        """Steps half of lr: its edge is 4/lr."""

    class Child(HalfStepSGD):
        pass

    rule = OptimizerRule("half_sgd", lambda group, state: StepDynamics(group["lr"] / 2, label="half_sgd"))
    register_optimizer_rule(HalfStepSGD, rule)
    p = torch.nn.Parameter(torch.zeros(2))
    assert optimizer_threshold(Child([p], lr=0.1)).value == pytest.approx(40.0)
    assert optimizer_threshold(torch.optim.SGD([p], lr=0.1)).value == pytest.approx(20.0)
    with pytest.raises(TypeError, match="OptimizerRule"):
        register_optimizer_rule(HalfStepSGD, "rule")


# -- the diagnostics on a quadratic ------------------------------------------------------------
class Quadratic(L.LightningModule):
    """0.5 * sum(a_i theta_i^2): the Hessian is diag(a) everywhere."""

    def __init__(self, curvatures, lr, momentum=0.0):
        super().__init__()
        self.register_buffer("a", torch.tensor(curvatures, dtype=torch.float64))
        self.theta = torch.nn.Parameter(torch.full((len(curvatures),), 0.01, dtype=torch.float64))
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch, batch_idx):
        return 0.5 * (self.a * self.theta.square()).sum() + 0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 1, dtype=torch.float64)), batch_size=4)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_log_growth_on_a_quadratic_is_the_optimizers_own(tmp_path, momentum):
    lr, lams = 0.1, [30.0, 12.0, 5.0, -2.0]
    model = Quadratic(lams, lr, momentum)
    monitor = HessianEigenMonitor(k=2, which="both", every_n_steps=4, tol=1e-10)
    eos = EdgeOfStabilityMonitor()
    trainer(tmp_path, max_steps=12, callbacks=[monitor, eos]).fit(model)
    last = eos.history[-1]
    for i, lam in enumerate(lams[:2]):
        if momentum:
            expected = math.log(rho([[1 + momentum - lr * lam, -momentum], [1, 0]]))
        else:
            expected = math.log(abs(1 - lr * lam))
        assert last[f"pf/log_growth_{i + 1}"] == pytest.approx(expected, abs=1e-6)
        # h lambda: lr lambda for gradient descent, lr lambda / (1 + beta) for heavy ball (2 at its edge).
        assert last[f"pf/hlambda_{i + 1}"] == pytest.approx(lr * lam / (1 + momentum), rel=1e-9)
    # N = 12 optimizer steps with lambda_min = -2 throughout: lr * 12 * (-2), each step counted once.
    assert [h["step"] for h in eos.history] == [0, 4, 8, 12]
    assert last["eos/accumulated_negative_curvature"] == pytest.approx(lr * 12 * -2.0, rel=1e-9)


class _DecayedQuadratic(Quadratic):
    def __init__(self, curvatures, make):
        super().__init__(curvatures, 0.1)
        self.make = make

    def configure_optimizers(self):
        return self.make(self.parameters())


@pytest.mark.parametrize(
    ("make", "shift", "rate"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1.0), 1.0, lambda t: 0.1),
        # ASGD's step after the measurement at t runs at lr / (1 + lambd lr t)^alpha, on H + lambd I (lambd
        # 0.5: still negative)
        (
            lambda p: torch.optim.ASGD(p, lr=0.1, lambd=0.5, alpha=0.75),
            0.5,
            lambda t: 0.1 / (1 + 0.05 * t) ** 0.75,
        ),
    ],
    ids=["sgd-l2", "asgd"],
)
def test_accumulated_negative_curvature_is_that_of_the_loss_the_step_descends(tmp_path, make, shift, rate):
    """With coupled decay w the step descends the loss plus (w/2)|theta|^2, whose Hessian is H + wI (as
    eos/sharpness counts it), at the step it takes: an outside trial's SGD with weight_decay=1 on lambda_min
    = -3 logged -3.0 over 10 steps for -2.0, and ASGD, all of whose directions were stable, logged -3.0."""
    model = _DecayedQuadratic([5.0, -2.0], make)
    monitor = HessianEigenMonitor(k=1, which="both", every_n_steps=4, tol=1e-10)
    eos = EdgeOfStabilityMonitor()
    trainer(tmp_path, max_steps=8, callbacks=[monitor, eos]).fit(model)
    assert [h["step"] for h in eos.history] == [0, 4, 8]
    # Each measurement counts the steps since the last at the step size its rule reads then.
    expected = sum(4 * rate(t) * (-2.0 + shift) for t in (4, 8))
    assert eos.history[-1]["eos/accumulated_negative_curvature"] == pytest.approx(expected, rel=1e-7)
    assert eos.history[-1]["eos/sharpness"] == pytest.approx(5.0 + shift, rel=1e-9)
    # threshold= judges it as gradient descent with that edge: the sum's step stays the optimizer's rate
    # (it took 2/threshold, 0.4 for 0.1: a review).
    monitor = HessianEigenMonitor(k=1, which="both", every_n_steps=4, tol=1e-10)
    eos = EdgeOfStabilityMonitor(threshold=5.0)
    with pytest.warns(RuntimeWarning, match="threshold"):
        trainer(tmp_path, max_steps=8, callbacks=[monitor, eos]).fit(_DecayedQuadratic([5.0, -2.0], make))
    assert eos.history[-1]["eos/accumulated_negative_curvature"] == pytest.approx(
        8 * 0.1 * (-2.0 + shift), rel=1e-9
    )


def test_edge_of_stability_refuses_eigenvalues_out_of_order_and_a_slope_window_below_two():
    """Eigenvalues from torch.linalg.eigvalsh come ascending: taken as they came, the smallest was the
    sharpness ([1, 5] at lr 0.1 gave a ratio of 0.05 for 0.25; an outside trial). A slope_window of 1 took
    the whole history's slope and 0 none (an outside review)."""
    gd = StepDynamics(0.1)
    with pytest.raises(ValueError, match=r"descending order .* got \[1.0, 5.0\]: sort them"):
        edge_of_stability([1.0, 5.0], gd, step=0)
    for window in (0, 1, 2.0, True):
        with pytest.raises(ValueError, match="slope_window must be an int >= 2"):
            edge_of_stability([5.0, 1.0], gd, step=0, slope_window=window)
    metrics, _ = edge_of_stability([5.0, 5.0, 1.0], gd, step=0, slope_window=2)  # ties are in order
    assert metrics["eos/ratio"] == pytest.approx(0.25)


def test_edge_of_stability_function_outside_lightning():
    heavy_ball = StepDynamics(0.1, 0.0, 10.0, 0.9, label="heavy_ball")
    metrics, history = edge_of_stability(
        [40.0, 30.0], heavy_ball, step=10, projections=[3.0, 4.0], grad_norm=5.0, lambda_min=-1.0
    )
    assert metrics["eos/threshold"] == pytest.approx(38.0)
    assert metrics["eos/ratio"] == pytest.approx(40 / 38)
    assert metrics["pf/log_growth_1"] == pytest.approx(math.log(rho([[1.9 - 4.0, -0.9], [1, 0]])), abs=1e-12)
    assert metrics["pf/regime_1"] == 2.0 and metrics["pf/regime_2"] == 1.0
    assert metrics["pf/unstable_grad_fraction"] == pytest.approx(9 / 25)
    assert metrics["eos/accumulated_negative_curvature"] == pytest.approx(0.1 * 10 * -1.0)
    assert metrics["eos/first_edge_step"] == 10.0
    again, _ = edge_of_stability([36.0], heavy_ball, step=15, lambda_min=-1.0, history=history)
    assert again["eos/accumulated_negative_curvature"] == pytest.approx(-1.0 - 0.1 * 5)
    assert again["eos/first_edge_step"] == 10.0
    assert again["eos/sharpening_slope"] == pytest.approx((36 - 40) / 5)
    assert history == EdgeHistory(10, ((10, 40.0),), 10, pytest.approx(-1.0))


@pytest.mark.parametrize("past", [1, 2, 3, 4, 7])
def test_sharpening_slope_fits_the_last_window_of_measurements(past):
    points = [(10 * s, 3.0 + s + 0.5 * s * s) for s in range(past + 1)]
    history = EdgeHistory(points[-2][0], tuple(points[:-1]))
    metrics, _ = edge_of_stability([points[-1][1]], StepDynamics(0.1), step=points[-1][0], history=history)
    window = points[-5:]  # slope_window = 5: the current measurement and the four before it
    expected = np.polyfit([s for s, _ in window], [v for _, v in window], 1)[0]
    assert metrics["eos/sharpening_slope"] == pytest.approx(expected, rel=1e-12)


def test_two_edge_monitors_resume_from_one_checkpoint(tmp_path):
    def callbacks():
        full = HessianEigenMonitor(k=1, every_n_steps=3)
        held_out = HessianEigenMonitor(k=1, every_n_steps=3, name="heldout", probe=[digits(32)])
        return full, held_out, EdgeOfStabilityMonitor(monitor=full), EdgeOfStabilityMonitor(monitor=held_out)

    L.seed_everything(0)
    first = callbacks()
    t = trainer(tmp_path, max_steps=6, callbacks=list(first))
    t.fit(DigitsClassifier(n=64))
    assert first[2].state_key != first[3].state_key
    path = tmp_path / "six.ckpt"
    t.save_checkpoint(path)
    assert float(t.callback_metrics["eos/heldout/sharpness"]) == first[3].history[-1]["eos/sharpness"]
    assert first[2].history[-1]["eos/sharpness"] != first[3].history[-1]["eos/sharpness"]

    second = callbacks()
    trainer(tmp_path, max_steps=9, callbacks=list(second)).fit(DigitsClassifier(n=64), ckpt_path=path)
    for before, after in zip(first[2:], second[2:], strict=True):
        assert [h["step"] for h in after.history] == [0, 3, 6, 9]
        assert after.history[:3] == before.history


@pytest.mark.parametrize(
    "make, uneven",
    [
        (lambda ps: torch.optim.RAdam(ps, lr=1e-3), True),  # the rectification r_t of each parameter's t
        (lambda ps: torch.optim.NAdam(ps, lr=1e-3), True),  # the momentum schedule mu_t
        (lambda ps: torch.optim.Adagrad(ps, lr=1e-2, lr_decay=0.01), True),
        (lambda ps: torch.optim.Adam(ps, lr=1e-3), False),  # its bias corrections are in each one's P
        (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), False),
    ],
    ids=["radam", "nadam", "adagrad", "adam", "sgd"],
)
def test_parameters_that_took_different_numbers_of_steps_are_named_where_the_rule_counts_them(make, uneven):
    """A part unfrozen later: RAdam's rule read the first parameter's rectification for the whole group,
    judging the other's directions 13x off the edge (an outside trial); now the monitor can say so."""
    early, late = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = make([early, late])
    for step in range(12):
        early.grad = torch.full_like(early, 0.1)
        late.grad = torch.full_like(late, 0.1) if step >= 8 else None  # no gradient: not stepped
        optimizer.step()
    found = uneven_steps(optimizer)
    assert (found is not None) == uneven, found
    if uneven:
        assert "step 12" in found and "step 4" in found
    late.grad = None
    even = make([early])
    early.grad = torch.ones_like(early)
    even.step()
    assert uneven_steps(even) is None


@pytest.mark.parametrize("kind", ["SGD", "Adam", "ASGD"])
def test_the_update_of_a_group_whose_rate_dropped_to_0_is_the_step_torch_takes(kind):
    """A group set to rate 0 mid-run: SGD's and Adam's steps scale with the rate, so it does not move (its
    update was refused, 'lr must be positive'); ASGD's first step after the drop still moves it by its eta,
    which a blanket 'rate 0: no change' missed (a review)."""
    from pf_lightning.curvature import ParameterSpace, optimizer_update

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)).double()
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters()}]
    optimizer = getattr(torch.optim, kind)(groups, lr=0.1)
    x = torch.randn(8, 3, dtype=torch.float64)

    def gradient():
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()

    gradient()
    optimizer.step()
    optimizer.param_groups[1]["lr"] = 0.0
    gradient()
    space = ParameterSpace(model)
    predicted = optimizer_update(optimizer, space, space.flatten([p.grad for p in space.params]))
    before = space.values().clone()
    optimizer.step()
    taken = space.values() - before
    torch.testing.assert_close(predicted, taken, rtol=1e-10, atol=1e-15)
    moved = bool(taken[-3:].abs().max() > 0)  # the second layer's 3 parameters
    assert moved == (kind == "ASGD")
