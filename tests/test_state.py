"""A measurement leaves the model bit-identical: parameters, .grad, buffers, modes, random streams."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from pf_lightning import hessian_eigenpairs


class BatchNormDropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.25))
        self.frozen_eval = nn.Sequential(nn.Linear(12, 12), nn.BatchNorm1d(12))
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.frozen_eval(self.body(x))))


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def snapshot(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "tracking": [getattr(m, "track_running_stats", None) for m in model.modules()],
    }


def identical(a, b):
    same = lambda x, y: (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))  # noqa: E731
    return (
        all(same(x, y) for x, y in zip(a["params"], b["params"], strict=True))
        and all(same(x, y) for x, y in zip(a["grads"], b["grads"], strict=True))
        and a["grad_ids"] == b["grad_ids"]
        and all(torch.equal(x, y) for x, y in zip(a["buffers"], b["buffers"], strict=True))
        and a["modes"] == b["modes"]
        and a["tracking"] == b["tracking"]
    )


@pytest.mark.parametrize("hvp", ["double_backward", "forward_over_reverse", "finite_difference", "auto"])
@pytest.mark.parametrize("which", ["top", "both"])
def test_measurement_leaves_everything_bit_identical(hvp, which):
    torch.manual_seed(0)
    model = BatchNormDropoutNet()
    model.frozen_eval.eval()  # mixed modes must both survive
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    for _ in range(2):  # real running statistics and real gradients
        loss_fn(model, (x, y)).backward()
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    before = snapshot(model)

    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    hessian_eigenpairs(model, loss_fn, batches, k=2, which=which, hvp=hvp, max_hvp=60)
    after_draws = (torch.rand(3), random.random(), np.random.rand())

    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    expected_draws = (torch.rand(3), random.random(), np.random.rand())

    assert identical(before, snapshot(model))
    assert torch.equal(after_draws[0], expected_draws[0])
    assert after_draws[1:] == expected_draws[1:]


def test_measurement_in_another_dtype_restores_parameter_objects():
    model = BatchNormDropoutNet()
    params = list(model.parameters())
    before = snapshot(model)
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    hessian_eigenpairs(model, loss_fn, (x, y), k=1, dtype=torch.float64, max_hvp=40)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert identical(before, snapshot(model))


def test_dropout_masks_are_fixed_within_a_measurement():
    """With fixed masks the operator is symmetric: v^T (H w) == w^T (H v) to rounding."""
    from pf_lightning import HessianOperator

    torch.manual_seed(0)
    model = BatchNormDropoutNet().double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 2, (32,))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    with HessianOperator(model, loss_fn, (x, y)) as op:
        HV = op.matmat(V)
        again = op.matmat(V)
    assert torch.equal(HV, again)
    assert abs(float(V[:, 0] @ HV[:, 1] - V[:, 1] @ HV[:, 0])) < 1e-12 * float(HV.norm())


class _Ema(nn.Module):
    """A forward that reassigns its buffer (an EMA's usual form), not updating it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("ema", torch.zeros(3))

    def forward(self, x):
        out = self.lin(x)
        self.ema = 0.9 * self.ema + 0.1 * out.detach().mean(0)
        return out


def test_a_buffer_the_forward_reassigns_is_put_back():
    """The buffer's old tensor was restored by value while the module held the new one: the EMA moved
    ([0, 0, 0] to [-0.0216, -0.0070, 0.0173] in an outside trial) and training differed afterwards."""
    torch.manual_seed(0)
    model = _Ema()
    before = model.ema
    x = torch.randn(8, 4)
    hessian_eigenpairs(model, lambda m, b: m(b).pow(2).mean(), [x], k=1)
    assert model.ema is before and torch.equal(model.ema, torch.zeros(3))
