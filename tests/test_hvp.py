"""Every HVP backend and the probe-set operator against a dense float64 torch.func Hessian."""

import copy

import pytest
import torch
from cases import CASES, make_case
from torch import nn

from pf_lightning import HessianOperator, ProbeSet, hessian_eigenpairs
from pf_lightning.curvature import (
    FiniteDifferenceFallbackWarning,
    PreconditionedOperator,
    optimizer_preconditioner,
)
from pf_lightning.probe import sample_count, sample_slice

EXACT = ("double_backward", "forward_over_reverse")


def apply(case, V, **kwargs):
    with HessianOperator(case.model, case.loss_fn, case.batches, **kwargs) as op:
        return op.matmat(V), op.backend_name


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("backend", EXACT)
def test_exact_backends_match_dense_float64(name, backend, reference):
    case = make_case(name)
    V = torch.randn(case.n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    HV, used = apply(case, V, hvp=backend)
    assert used == backend
    assert relative_error(HV, reference(name) @ V) < 1e-6


@pytest.mark.parametrize("name", CASES)
def test_finite_difference_within_documented_bound(name, reference):
    H = reference(name)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    HV64, _ = apply(make_case(name), V, hvp="finite_difference")
    assert relative_error(HV64, H @ V) < 1e-7
    HV32, _ = apply(make_case(name, torch.float32), V.float(), hvp="finite_difference")
    assert relative_error(HV32.double(), H @ V) < 2e-3


@pytest.mark.parametrize("name", ["mlp", "attention"])
def test_float32_exact_backend_close_to_float64(name, reference):
    H = reference(name)
    V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    HV, _ = apply(make_case(name, torch.float32), V.float(), hvp="double_backward")
    assert relative_error(HV.double(), H @ V) < 1e-5


def test_uncached_graphs_give_the_same_products(reference):
    case = make_case("cnn")
    V = torch.randn(case.n, 2, dtype=torch.float64)
    cached, _ = apply(case, V, hvp="double_backward", cache_graphs=True)
    fresh, _ = apply(case, V, hvp="double_backward", cache_graphs=False)
    torch.testing.assert_close(cached, fresh, rtol=1e-12, atol=1e-14)


def test_batches_weighted_by_sample_count():
    """The operator on uneven batches equals the operator on their union as one batch."""
    case = make_case("mlp")
    union = tuple(torch.cat(parts) for parts in zip(*case.batches, strict=True))
    V = torch.randn(case.n, 2, dtype=torch.float64)
    split, _ = apply(case, V, hvp="double_backward")
    with HessianOperator(case.model, case.loss_fn, [union], hvp="double_backward") as op:
        whole = op.matmat(V)
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)
    # Equal weights instead of sample counts give a different (wrong) operator.
    with HessianOperator(case.model, case.loss_fn, ProbeSet(case.batches, weights=[1, 1])) as op:
        unweighted = op.matmat(V)
    assert relative_error(unweighted, whole) > 1e-3


def test_a_0_dim_tensor_first_in_a_batch_does_not_count_its_samples():
    """{"step": tensor(3), "x": ..., "y": ...}: the leading dimension of the first tensor counted 1 sample,
    so such batches were weighted as one sample each (and probe=N drew N batches); the operator on them
    equals the operator on their union as one batch again."""
    case = make_case("mlp")
    tagged = [{"step": torch.tensor(i), "x": x, "y": y} for i, (x, y) in enumerate(case.batches)]
    assert ProbeSet(tagged).weights == [float(x.shape[0]) for x, _ in case.batches]
    union = tuple(torch.cat(parts) for parts in zip(*case.batches, strict=True))
    V = torch.randn(case.n, 2, dtype=torch.float64)
    with HessianOperator(case.model, lambda m, b: case.loss_fn(m, (b["x"], b["y"])), tagged) as op:
        split = op.matmat(V)
    with HessianOperator(case.model, case.loss_fn, [union]) as op:
        whole = op.matmat(V)
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)
    assert ProbeSet([{"weight": torch.tensor(2.0)}]).weights == [1.0]  # 0-dim tensors alone: one sample


def test_a_shared_mask_first_in_a_batch_does_not_count_its_samples():
    """{"mask": (1, d), "x": (B, d), "y": (B,)}: the first tensor's leading dimension counted 1 sample, so
    a drawn probe of N samples took N batches and cut the last one's mask; a first count of 1 gives way to
    one more of the tensors share, and the drawn probe holds N samples with the mask kept whole."""
    from torch.utils.data import DataLoader

    from pf_lightning.callbacks._probe import draw_probe

    case = make_case("mlp")
    (x, y), *_ = case.batches
    mask = torch.ones(1, x.shape[1], dtype=x.dtype)
    masked = [{"mask": mask, "x": x, "y": y}]
    assert ProbeSet(masked).weights == [float(x.shape[0])]
    loader = DataLoader(
        list(zip(x, y, strict=True)),
        batch_size=4,
        collate_fn=lambda items: {
            "mask": mask,
            "x": torch.stack([x for x, _ in items]),
            "y": torch.stack([y for _, y in items]),
        },
    )
    probe = draw_probe(loader, 6, convert=lambda b: b)
    assert probe.weights == [4.0, 2.0]
    assert [b["x"].shape[0] for b in probe.batches] == [4, 2] and probe.batches[1]["mask"].shape == mask.shape
    # Tensors that are not per sample but outnumber the per-sample ones (rotary tables, a causal mask, class
    # weights) do not count: the first tensor's leading dimension does, unless it is 1.
    ids, table = torch.zeros(8, 16, dtype=torch.long), torch.zeros(16, 4)
    rotary = {"input_ids": ids, "labels": ids, "cos": table, "sin": table, "causal": torch.ones(16, 16)}
    assert sample_count(rotary) == 8 and sample_count((x, y, *[torch.ones(10)] * 3)) == x.shape[0]
    cut = sample_slice(rotary, 0, 1)
    assert cut["input_ids"].shape == (1, 16) and cut["cos"] is table and cut["causal"].shape == (16, 16)
    # A batch of one sample with a per-class vector: one sample.
    assert sample_count({"x": x[:1], "y": y[:1], "weights": torch.ones(10)}) == 1


@pytest.mark.parametrize("backend", [*EXACT, "finite_difference"])
def test_parameter_subset_is_the_dense_sub_block(backend, reference):
    """Products on a subset are the Hessian's block, and carry no graph through the parameters left out
    (which still require grad): forward over reverse returned graph-attached products before."""
    case = make_case("mlp")
    H = reference("mlp")
    with HessianOperator(case.model, case.loss_fn, case.batches, params="4.*", hvp=backend) as op:
        assert op.space.names == ["4.weight", "4.bias"]
        block = op.matmat(torch.eye(op.n, dtype=torch.float64))
    assert not block.requires_grad and block.grad_fn is None
    start = case.n - op.n
    tol = {"rtol": 1e-10, "atol": 1e-12} if backend in EXACT else {"rtol": 1e-6, "atol": 1e-8}
    torch.testing.assert_close(block, H[start:, start:], **tol)


def test_measurement_dtype_override(reference):
    case = make_case("mlp", torch.float32)
    before = [p.detach().clone() for p in case.model.parameters()]
    V = torch.randn(case.n, 2, dtype=torch.float64)
    with HessianOperator(case.model, case.loss_fn, case.batches, dtype=torch.float64) as op:
        assert next(case.model.parameters()).dtype == torch.float64
        HV = op.matmat(V)
    assert all(p.dtype == torch.float32 for p in case.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, case.model.parameters(), strict=True))
    # float32 parameters cast exactly to float64: the product is the float64 one.
    H = reference("mlp")
    assert relative_error(HV, H @ V) < 1e-5  # data and params were float32-rounded


class _TanhBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, y):
        return grad * (1 - y * y)

    @staticmethod
    def backward(ctx, *_):
        # What fused kernels do (e.g. flash attention, pytorch issue 116350).
        raise NotImplementedError("derivative for fused_tanh_backward is not implemented")


class _FusedTanh(torch.autograd.Function):
    """A kernel with a first derivative only, like fused attention kernels on a GPU."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _TanhBackward.apply(grad, y)


class _FusedKernelMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(_FusedTanh.apply(self.fc1(x)))


def test_auto_falls_back_to_finite_differences_with_one_warning():
    case = make_case("mlp")
    twin = _FusedKernelMLP().double()
    with torch.no_grad():
        twin.fc1.weight.copy_(case.model[0].weight[:, :])
        twin.fc1.bias.copy_(case.model[0].bias)
    V = torch.randn(sum(p.numel() for p in twin.parameters()), 2, dtype=torch.float64)
    with pytest.warns(FiniteDifferenceFallbackWarning, match="finite_difference") as record:
        with HessianOperator(twin, case.loss_fn, case.batches) as op:
            HV = op.matmat(V)
            assert op.backend_name == "finite_difference"
    assert len([w for w in record if issubclass(w.category, FiniteDifferenceFallbackWarning)]) == 1
    # The same function with an ordinary tanh: exact reference.
    plain = nn.Sequential(twin.fc1, nn.Tanh(), twin.fc2)
    with HessianOperator(plain, case.loss_fn, case.batches, hvp="double_backward") as op:
        exact = op.matmat(V)
    assert relative_error(HV, exact) < 1e-7


def test_auto_uses_double_backward_when_it_runs():
    case = make_case("attention", torch.float32)
    with HessianOperator(case.model, case.loss_fn, case.batches) as op:
        op.matmat(torch.ones(op.n, 1))
        assert op.backend_name == "double_backward"


@pytest.mark.parametrize("name", ["mlp", "attention"])
def test_auto_spends_no_product_on_choosing_its_backend(name, reference, monkeypatch):
    """'auto' tries double backward on the first real product: every batch product the backend computes
    is one the operator counts (the solver's n_hvp), and the first block is exact."""
    from pf_lightning.curvature.hvp import DoubleBackwardHVP

    applied = []
    original = DoubleBackwardHVP.apply

    def counted(self, index, V):
        applied.append(V.shape[1])
        return original(self, index, V)

    monkeypatch.setattr(DoubleBackwardHVP, "apply", counted)
    case = make_case(name)
    V = torch.randn(case.n, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with HessianOperator(case.model, case.loss_fn, case.batches) as op:
        HV = op.matmat(V)
        op.matvec(V[:, 0])
        assert op.backend_name == "double_backward"
        assert sum(applied) == op.n_matvec * len(case.batches) == 4 * len(case.batches)
    assert relative_error(HV, reference(name) @ V) < 1e-6
    applied.clear()
    result = hessian_eigenpairs(case.model, case.loss_fn, case.batches, k=2, tol=1e-6)
    assert sum(applied) == result.n_hvp * len(case.batches)


def test_preconditioned_operator_is_dense_d_h_d(reference):
    case = make_case("mlp")
    optimizer = torch.optim.Adam(case.model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(3):
        optimizer.zero_grad()
        sum(case.loss_fn(case.model, b) for b in case.batches).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    from cases import dense_hessian

    H = dense_hessian(case)
    # P_t from the optimizer state by hand (Cohen et al. 2022): (1 - b1^t)(sqrt(v / (1 - b2^t)) + eps).
    P = torch.cat(
        [
            ((optimizer.state[p]["exp_avg_sq"] / (1 - 0.99**3)).sqrt() + 1e-8).reshape(-1) * (1 - 0.9**3)
            for p in case.model.parameters()
        ]
    )
    D = P.rsqrt()
    V = torch.randn(case.n, 2, dtype=torch.float64)
    with HessianOperator(case.model, case.loss_fn, case.batches) as hessian:
        diagonal = optimizer_preconditioner(optimizer, hessian.space)[0]
        torch.testing.assert_close(diagonal, P, rtol=1e-12, atol=0)
        DHD = PreconditionedOperator(hessian, diagonal).matmat(V)
    assert relative_error(DHD, (D[:, None] * H * D[None, :]) @ V) < 1e-6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hvp": "exact"}, "`hvp` must be one of"),
        ({"params": "nothing.*"}, "no trainable parameter name matches"),
        # A typo in one pattern of several measured the others' block without a word (an outside trial).
        ({"params": ["0.*", "9.*"]}, r"\['9\.\*'\] match none \(the others match 2 trainable"),
        ({"params": 3}, "glob pattern"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    case = make_case("mlp")
    with pytest.raises(ValueError, match=match):
        HessianOperator(case.model, case.loss_fn, case.batches, **kwargs)


def test_bad_probe_and_parameters_raise():
    case = make_case("mlp")
    with pytest.raises(ValueError, match="probe set is empty"):
        HessianOperator(case.model, case.loss_fn, [])
    frozen = make_case("mlp").model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(frozen, case.loss_fn, case.batches)
    half = make_case("mlp").model.half()
    with pytest.raises(ValueError, match=r"dtype=torch\.float32"):
        HessianOperator(half, case.loss_fn, case.batches)
    with pytest.raises(ValueError, match="positive sample count"):
        ProbeSet(case.batches, weights=[1, 0])


def test_gradient_is_the_weighted_mean_gradient():
    case = make_case("dropout")
    with HessianOperator(case.model, case.loss_fn, case.batches) as op:
        g = op.gradient()
        HV = op.matvec(g)
    # Per-batch gradients by plain autograd, with the masks the operator draws for batch i at seed 0:
    # torch.manual_seed(0 * SEED_STRIDE + i).
    expected = torch.zeros_like(g)
    for index, batch in enumerate(case.batches):
        torch.manual_seed(index)
        loss = case.loss_fn(case.model, batch)
        grads = torch.autograd.grad(loss, list(case.model.parameters()))
        expected += batch[0].shape[0] * torch.cat([t.reshape(-1) for t in grads])
    expected /= sum(x.shape[0] for x, _ in case.batches)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)
    assert HV.shape == g.shape


def test_finite_difference_step_does_not_grow_with_the_parameter_norm():
    """A trained network of ordinary width has a large parameter norm (about 18) but parameters of
    typical size well below 1. Along the top eigenvectors, where truncation error dominates, a step
    scaled by ``||theta||`` (as once here) is 18x too long: its top eigenvalues are percents off in
    float32 (6% here), against 1e-4 with the step of unit length."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        opt.step()
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert theta.norm() > 15 and theta.pow(2).mean().sqrt() < 0.1
    exact = hessian_eigenpairs(
        copy.deepcopy(model).double(), loss_fn, [(x.double(), y)], k=3, tol=1e-10, max_hvp=600
    )
    fd = hessian_eigenpairs(model, loss_fn, [(x, y)], k=3, tol=1e-5, hvp="finite_difference", max_hvp=600)
    torch.testing.assert_close(fd.eigenvalues.double(), exact.eigenvalues, rtol=1e-3, atol=0)


class _LayerKeptTwice(nn.Module):
    """One layer under two names (``self.first`` and ``self.net[0]``), as a compiled wrapper kept beside its
    module (``self.fast = torch.compile(self.net)``) holds every layer twice."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        self.first = self.net[0]

    def forward(self, x):
        return self.net(x)


def test_forward_over_reverse_leaves_a_layer_kept_under_two_names_in_its_slots():
    """torch.func's functional_call put a functorch tensor back into such a layer's slot: the operator's
    gradient was off by 0.11 after the first product, and the model's loss stayed cut from its parameters."""
    torch.manual_seed(0)
    model = _LayerKeptTwice()
    slots = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()]
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(64, 8, generator=gen, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64))
    ]

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    V = torch.randn(161, 3, generator=gen, dtype=torch.float64)  # 8*16 + 16 + 16 + 1 parameters
    with HessianOperator(model, loss_fn, batches, hvp="forward_over_reverse") as op:
        HV = op.matmat(V)
        g = op.gradient()
    assert all(m._parameters[name] is p for m, name, p in slots)
    with HessianOperator(model, loss_fn, batches, hvp="double_backward") as op:
        exact = op.matmat(V)
    assert relative_error(HV, exact) < 1e-12
    plain = torch.autograd.grad(loss_fn(model, batches[0]), list(model.parameters()))
    torch.testing.assert_close(g, torch.cat([t.reshape(-1) for t in plain]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["mse_loss", "lstm"])
def test_forward_over_reverse_says_where_it_does_not_run_and_what_does(kind):
    """F.mse_loss's backward has no forward-mode derivative on torch 2.13 (the bare 'ZeroTensors are
    immutable' reached the user), nor has the LSTM kernel: both name the backends that run."""
    torch.manual_seed(0)
    if kind == "lstm":
        lstm = nn.LSTM(4, 8, batch_first=True)
        model = nn.ModuleDict({"lstm": lstm, "head": nn.Linear(8, 1)})

        def loss_fn(m, batch):
            out, _ = m["lstm"](batch[0])
            return ((m["head"](out[:, -1]) - batch[1]) ** 2).mean()

        batch = (torch.randn(6, 5, 4), torch.randn(6, 1))
    else:
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def loss_fn(m, batch):
            return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

        batch = (torch.randn(16, 4), torch.randn(16, 1))
    with pytest.raises(NotImplementedError, match=r"does not run on this model.*use hvp='double_backward'"):
        hessian_eigenpairs(model, loss_fn, [batch], k=1, hvp="forward_over_reverse")
    exact = hessian_eigenpairs(model, loss_fn, [batch], k=1, hvp="double_backward")
    assert float(exact.eigenvalues[0]) > 0


def test_a_pattern_of_frozen_parameters_beside_others_is_no_typo():
    """Only names no parameter has are refused: a frozen layer's pattern (unfrozen later in a fine-tune)
    leaves the trainable ones measured."""
    case = make_case("mlp")
    case.model[0].requires_grad_(False)
    with HessianOperator(case.model, case.loss_fn, case.batches, params=["0.*", "4.*"]) as op:
        assert op.space.names == ["4.weight", "4.bias"]


def test_parameters_on_the_meta_device_are_refused_naming_them():
    """They failed in 'RuntimeError: unsupported scalarType' from deep inside (an outside trial)."""
    model = torch.nn.Linear(4, 2).to("meta")
    batch = (torch.randn(3, 4), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"\(weight, bias\) are on the 'meta' device, which holds no values"):
        HessianOperator(model, lambda m, b: (m(b[0]) - b[1]).pow(2).mean(), [batch])


def test_sharded_half_precision_parameters_are_measured_in_their_own_dtype(monkeypatch):
    """measurement_dtype chose float32 for bfloat16 weights, which sharded (FSDP2) parameters cannot be cast
    to: a bf16-true FSDP2 fit with a default monitor was refused at set-up, naming no fix (an outside trial).
    Sharded ones keep their own dtype; the refusal of another one names the fix."""
    from pf_lightning.curvature import params as module
    from pf_lightning.curvature.params import measurement_dtype

    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    assert measurement_dtype(model) == torch.float32  # one process: cast for the measurement
    monkeypatch.setattr(module, "is_sharded", lambda tensor: True)
    assert (
        measurement_dtype(model) == torch.bfloat16
        and measurement_dtype(model, torch.float64) == torch.float64
    )
    monkeypatch.setattr(module, "ShardLayout", lambda params: None)
    with pytest.raises(ValueError, match=r"own dtype torch.bfloat16, not torch.float32: pass dtype=None"):
        module.ParameterSpace(model, dtype=torch.float32)
