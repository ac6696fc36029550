"""Bounded memory: the solvers' documented vector counts, a basis kept in host memory, bfloat16
accuracy against float64, and checkpoints with or without the eigenvectors."""

import dataclasses
from collections.abc import Callable

import lightning as L
import pytest
import torch
from cases import make_case
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import DigitsClassifier, digits, trainer
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pf_lightning import HessianEigenMonitor, batch_sharpness, critical_sharpness, hessian_eigenpairs
from pf_lightning.curvature import optimizer_update
from pf_lightning.curvature.operator import HessianOperator
from pf_lightning.linalg import DenseOperator, OffloadedOperator, lanczos, lobpcg
from pf_lightning.linalg import operator as operator_module
from pf_lightning.linalg.lanczos import lanczos_vectors
from pf_lightning.linalg.operator import combine, gram, recombine_rows_, subtract_combination_
from pf_lightning.linalg.trace import hutchpp_trace
from pf_lightning.stability import pf_velocity


class VectorCounter(TorchDispatchMode):
    """Peak total size, in vectors of length ``n``, of the tensors allocated meanwhile and still alive
    (storages of at least a quarter vector; a ``(n, m)`` basis counts ``m``)."""

    def __init__(self, n: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.unit = n * torch.empty((), dtype=dtype).element_size()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.unit // 4:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {key: v for key, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()) / self.unit)
        return out


def low_rank_operator(n: int = 2000) -> DenseOperator:
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, 60, generator=gen, dtype=torch.float64))
    A = (Q * torch.linspace(1, 0.01, 60, dtype=torch.float64)) @ Q.T + 1e-3 * torch.eye(
        n, dtype=torch.float64
    )
    return DenseOperator(A)


@pytest.mark.parametrize("neighbours", [False, True])
@pytest.mark.parametrize(("k", "which"), [(1, "top"), (5, "top"), (3, "both"), (10, "both")])
def test_solvers_keep_the_documented_number_of_vectors(k, which, neighbours):
    op = low_rank_operator()
    wanted = k * (2 if which == "both" else 1)
    with VectorCounter(op.n, op.dtype) as counter:
        result = lanczos(op, k, which=which, tol=1e-8, max_matvec=3000, neighbours=neighbours)
    assert result.info["restarts"] >= 1  # the restart's recombination is part of what is counted
    basis = max(2 * wanted + 10, 20)
    projected = ((basis + 1) * basis + basis * basis + basis * wanted) / op.n
    guards = max(2, wanted // 2) if neighbours else 0  # hessian_eigenpairs' method="auto" keeps them
    assert (result.neighbours is not None) == neighbours
    # Lanczos docstring: basis_size + 1, and the product being orthogonalized during a step or the k result
    # vectors and their neighbours at the end, plus the projected problem's float64 matrices (H, the Ritz
    # vectors S and the wanted columns of S), which are not small next to n = 2000 (0.5-2.6 vectors here,
    # ~1e-6 of a vector at a million parameters). Measured: the rule exactly, plus those.
    rule = lanczos_vectors(wanted, op.n, neighbours=neighbours)
    assert rule == basis + 1 + max(1, wanted + guards)
    assert counter.peak <= rule + projected, counter.peak
    with VectorCounter(op.n, op.dtype) as counter:
        lobpcg(op, k, which=which, tol=1e-8, max_matvec=3000)
    block = wanted + max(2, wanted // 2)
    assert counter.peak <= 11 * block, counter.peak  # LOBPCG docstring: at most 11 b (measured 9.7-10.5 b)


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize(("k", "basis_size"), [(1, 2), (1, 3), (2, 3), (3, 8)])
def test_a_small_basis_holds_basis_size_plus_one_and_the_product(k, basis_size, warm):
    """The few-vector configuration of a model whose parameters fill the device (README, "Memory"):
    basis_size + 1 vectors and one more, the product during a step or the eigenvector at the end; the
    eigenpairs are the dense solver's all the same, at more products."""
    op = low_rank_operator()
    v0 = op.matrix[:, :k].sum(dim=1) if warm else None  # allocated before counting, as a caller's would be
    with VectorCounter(op.n, op.dtype) as counter:
        result = lanczos(op, k, tol=1e-8, max_matvec=3000, basis_size=basis_size, v0=v0)
    projected = ((basis_size + 1) * basis_size + basis_size * basis_size + basis_size * k) / op.n
    caller = 1 if warm else 0  # the caller's v0, which the counter sees once the solver reads it
    assert counter.peak <= lanczos_vectors(k, op.n, basis_size) + projected + caller, counter.peak
    assert result.all_converged and result.info["restarts"] >= 10
    want = torch.linalg.eigvalsh(op.matrix).flip(0)[:k]
    torch.testing.assert_close(result.eigenvalues, want, rtol=1e-7, atol=0)


def deep_bfloat16_net() -> tuple[torch.nn.Module, Callable, list]:
    """Eight 64x64 layers in bfloat16: no parameter is more than an eighth of the model."""
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Tanh()) for _ in range(8)]
    model = torch.nn.Sequential(*layers).to(torch.bfloat16)

    def loss_fn(m: torch.nn.Module, batch: tuple) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(batch[0].to(torch.bfloat16)).float(), batch[1])

    return model, loss_fn, [(torch.randn(32, 64), torch.randint(0, 64, (32,)))]


def test_a_bfloat16_product_adds_its_passes_into_the_float32_result_without_a_copy():
    """At 6.57B parameters on an H200 a float32 copy of the product was the 24.5 GiB that did not fit
    (BENCHMARKS.md, "Billion-parameter LMs"): the product of the bfloat16 passes is added into the float32
    result as it is converted, and one column is its own flat product."""
    model, loss_fn, batches = deep_bfloat16_net()
    with HessianOperator(model, loss_fn, batches, hvp="double_backward", dtype=torch.bfloat16) as op:
        v = torch.randn(op.n)
        op.matvec(v)  # builds the cached gradient graph
        with VectorCounter(op.n, torch.float32) as counter:
            op.matvec(v)
    # In float32 vectors: the block's own storage seen through its view (1), its bfloat16 copy for the
    # passes (1/2), the float32 result (1), the bfloat16 product (1/2). Before: 4.0 (a float32 copy of it).
    assert counter.peak <= 3.0, counter.peak


def test_the_optimizers_update_holds_float64_copies_of_one_parameter_at_a_time():
    """critical_sharpness(optimizer=) and batch sharpness along the update: the update of a model in
    bfloat16 held the whole gradient, the update's pieces and their concatenation in float64 (8 float32
    vectors here; at 6.57B parameters float64 copies of 49 GiB each, on which an H200 ran out)."""
    model, loss_fn, batches = deep_bfloat16_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        loss_fn(model, batches[0]).backward()
        optimizer.step()
    with HessianOperator(model, loss_fn, batches, dtype=torch.bfloat16) as op:
        gradient = op.gradient()
        reference = torch.cat(
            [
                (-1e-3 * (0.9 * optimizer.state[p]["momentum_buffer"].double() + g.double())).reshape(-1)
                for p, g in zip(op.space.params, op.space.unflatten(gradient), strict=True)
            ]
        ).to(torch.bfloat16)
        with VectorCounter(op.n, torch.float32) as counter:
            update = optimizer_update(optimizer, op.space, gradient)
    assert torch.equal(update, reference)  # computed in float64, rounded once to the passes' dtype
    # The gradient's storage seen through its views (1), the bfloat16 result (1/2), and six float64
    # tensors of one 64x64 parameter (its gradient, momentum, value and three intermediates: 6 x 1/4).
    assert counter.peak <= 3.0, counter.peak


@pytest.mark.parametrize("solver", [lanczos, lobpcg])
def test_basis_in_host_memory_gives_the_same_eigenpairs(solver):
    op = low_rank_operator(400)
    here = solver(op, 3, tol=1e-10, max_matvec=3000)
    host = solver(op, 3, tol=1e-10, max_matvec=3000, basis_device="cpu")
    torch.testing.assert_close(host.eigenvalues, here.eigenvalues, rtol=1e-12, atol=0)
    assert host.eigenvectors.device.type == "cpu" and host.info["basis_device"] == "cpu"
    assert host.n_hvp == here.n_hvp
    # Only the vectors being multiplied go to the operator's device (on CPU both devices are the host:
    # the adapter's moves are what a CUDA operator would see).
    seen = []
    offloaded = OffloadedOperator(op, "cpu")
    original = op._matmat
    op._matmat = lambda X: seen.append(X.shape[1]) or original(X)
    offloaded.matmat(torch.ones(400, 2, dtype=torch.float64))
    assert seen == [2] and offloaded.device.type == "cpu"


def test_basis_device_through_hessian_eigenpairs_and_the_monitor(tmp_path):
    case = make_case("mlp")
    kwargs = {"k": 2, "tol": 1e-10, "max_hvp": 800}
    here = hessian_eigenpairs(case.model, case.loss_fn, case.batches, **kwargs)
    host = hessian_eigenpairs(case.model, case.loss_fn, case.batches, basis_device="cpu", **kwargs)
    torch.testing.assert_close(host.eigenvalues, here.eigenvalues, rtol=1e-12, atol=0)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, basis_device="cpu", at_fit_end=False)
    trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(DigitsClassifier(n=64))
    assert monitor.latest.info["basis_device"] == "cpu" and monitor.latest.info["warm_start"]


def test_a_monitor_with_a_small_basis_measures_with_it_and_refuses_one_too_small(tmp_path):
    with pytest.raises(
        MisconfigurationException, match=r"`basis_size` must be an int >= 5 .*\(k=2, which='both'\)"
    ):
        HessianEigenMonitor(k=2, which="both", basis_size=4)
    L.seed_everything(0)
    monitor = HessianEigenMonitor(k=1, every_n_steps=2, basis_size=2, tol=1e-6, at_fit_end=False)
    model = DigitsClassifier(n=64)
    trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(model)
    assert monitor.spec.basis_size == 2 and [h["step"] for h in monitor.history] == [0, 2]
    latest = monitor.latest
    assert latest.info["basis_size"] == 2 and latest.info["warm_start"] and latest.neighbours is None
    direct = dataclasses.replace(monitor.spec, basis_size=None).eigenpairs(model, 1)  # the default basis
    torch.testing.assert_close(latest.eigenvalues, direct.eigenvalues, rtol=1e-5, atol=0)


# Measured here (torch 2.13 CPU): bfloat16 with double backward is within 0.16% of float64 on the top-3
# of these cases (finite differences in bfloat16: 0.2-1.0%); the bound leaves a factor of ~3.
@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "cnn", "attention"])
def test_bfloat16_top_eigenvalues_within_half_a_percent(name, reference):
    case = make_case(name, torch.float32)
    want = torch.linalg.eigvalsh(reference(name)).flip(0)[:3]
    result = hessian_eigenpairs(case.model, case.loss_fn, case.batches, k=3, dtype=torch.bfloat16, tol=1e-2)
    assert result.eigenvectors.dtype == torch.float32  # solver vectors in float32, passes in bfloat16
    assert float(((result.eigenvalues.double() - want) / want).abs().max()) < 5e-3


def test_bfloat16_on_the_digits_mlp():
    L.seed_everything(0)
    model = DigitsClassifier(n=256)
    x, y = digits(256)
    loss = lambda m, b: m.loss(b)  # noqa: E731
    exact = hessian_eigenpairs(model.double(), loss, [(x.double(), y)], k=3, tol=1e-8)
    half = hessian_eigenpairs(model.float(), loss, [(x, y)], k=3, dtype=torch.bfloat16, tol=1e-2)
    assert float(((half.eigenvalues.double() - exact.eigenvalues) / exact.eigenvalues).abs().max()) < 1e-2


@pytest.mark.parametrize("keep", [True, False])
def test_checkpoint_with_or_without_eigenvectors_resumes(tmp_path, keep):
    def run(max_steps, ckpt_path=None, callbacks=()):
        L.seed_everything(0)
        monitor = HessianEigenMonitor(k=2, every_n_steps=4, at_fit_end=False, checkpoint_eigenvectors=keep)
        t = trainer(tmp_path, max_steps=max_steps, callbacks=[monitor, *callbacks], enable_checkpointing=True)
        t.fit(DigitsClassifier(n=128), ckpt_path=ckpt_path)
        return monitor

    run(4, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)])
    path = tmp_path / "ckpt" / "epoch=3-step=4.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [v for key, v in saved.items() if key.startswith("HessianEigenMonitor")]
    assert state["latest"]["eigenvectors"].numel() == (
        2 * sum(p.numel() for p in DigitsClassifier().parameters()) if keep else 0
    )
    resumed = run(8, ckpt_path=str(path))
    assert [h["step"] for h in resumed.history] == [0, 4, 8]
    assert resumed.latest.info["warm_start"] is keep  # cold, cleanly, without the vectors


def test_sharded_eigenvectors_never_go_into_a_checkpoint():
    from pf_lightning.callbacks._checkpoint import result_state

    case = make_case("mlp")
    result = hessian_eigenpairs(case.model, case.loss_fn, case.batches, k=1)
    assert result_state(result, True)["eigenvectors"].shape == (case.n, 1)
    result.info["sharded"] = True  # what an FSDP2 measurement records
    assert result_state(result, True)["eigenvectors"].numel() == 0


def test_bfloat16_finite_differences_warn_about_their_accuracy():
    case = make_case("mlp_mse", torch.float32)
    with pytest.warns(UserWarning, match="finite-difference products in bfloat16"):
        hessian_eigenpairs(
            case.model, case.loss_fn, case.batches, k=1, dtype=torch.bfloat16, hvp="finite_difference"
        )


def _trained(model: torch.nn.Module, loss_fn: Callable, batch: tuple, optimizer: torch.optim.Optimizer):
    for _ in range(2):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _first_auto_product(model, loss_fn, batches, _optimizer) -> None:
    with HessianOperator(model, loss_fn, batches, dtype=torch.bfloat16) as op:
        op.matvec(torch.ones(op.n))


def _second_fd_product(model, loss_fn, batches, _optimizer) -> None:
    with HessianOperator(model, loss_fn, batches, hvp="finite_difference", dtype=torch.bfloat16) as op:
        v = torch.ones(op.n)
        op.matvec(v)  # saves the parameters: per-parameter copies, below the counter's threshold here
        op.matvec(v)


def _gradient(model, loss_fn, batches, _optimizer) -> None:
    with HessianOperator(model, loss_fn, batches, dtype=torch.bfloat16) as op:
        op.gradient()


def _mini_batches() -> list:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 64, generator=gen), torch.randint(0, 64, (8,), generator=gen)) for _ in range(4)]


SGD = lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)  # noqa: E731
ADAM = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)  # noqa: E731
BF16 = {"dtype": torch.bfloat16}


@pytest.mark.parametrize(
    ("measure", "optimizer", "bound"),
    [
        # The float32 result (1) and the bfloat16 gradient added into it (1/2); was 2.5 (a float32 copy).
        (_gradient, None, 1.5),
        # The block seen through its view (1), its bfloat16 copy (1/2), the result (1), the product (1/2);
        # was 3.25: `hvp="auto"` checked its trial product with isfinite (|x| and three masks).
        (_first_auto_product, None, 3.0),
        # The same with g(θ + hv) and g(θ - hv) in place of the product (1/2 each); was 5.0 (the difference
        # and quotient as new tensors, copied into a block).
        (_second_fd_product, None, 3.5),
        # The gradient (1.5, above); the search holds the direction alone. Was 2.5.
        (lambda m, f, b, o: critical_sharpness(m, f, b, initial_step=1e-3, **BF16), None, 1.5),
        # The gradient (1), its copy masked to the optimizer's parameters for the clipping norm (1, freed),
        # then the update (1/2) and six float64 tensors of one parameter (6/4). Was 4.0.
        (
            lambda m, f, b, o: critical_sharpness(
                m, f, b, optimizer=o, initial_step=1e-3, gradient_clip=(1.0, "norm"), **BF16
            ),
            SGD,
            3.0,
        ),
        # The direction x (1) and a product (2, as above); was 5.0: the gradient the optimizer sees, and the
        # previous batch's x and gradient during the next gradient.
        (lambda m, f, b, o: batch_sharpness(m, f, _mini_batches(), optimizer=o, **BF16), SGD, 3.0),
        # Adam's scale P^-1/2 (1), Lanczos's 3 vectors, the scaled block (1) and a product (2: its fourth
        # vector is the result); was 8.0: the preconditioner's diagonal held through the solve.
        (
            lambda m, f, b, o: hessian_eigenpairs(
                m, f, b, k=1, tol=1e-2, basis_size=2, preconditioner=o, hvp="double_backward", **BF16
            ),
            ADAM,
            7.0,
        ),
    ],
    ids=[
        "gradient",
        "auto-trial-product",
        "fd-product",
        "critical",
        "critical-clip-sgd",
        "batch-sgd",
        "adam",
    ],
)
def test_a_measurement_holds_what_it_needs_and_no_more(measure, optimizer, bound):
    """Peaks in float32 parameter-sized vectors of a bfloat16 model with no parameter over an eighth of it,
    each 24.5 GiB at 6.57B parameters (an outside audit of every path after the H200 runs found these)."""
    model, loss_fn, batches = deep_bfloat16_net()
    opt = None if optimizer is None else _trained(model, loss_fn, batches[0], optimizer(model))
    with VectorCounter(sum(p.numel() for p in model.parameters()), torch.float32) as counter:
        measure(model, loss_fn, batches, opt)
    assert counter.peak <= bound, counter.peak


def test_products_along_vectors_longer_than_one_blas_call_go_in_contiguous_pieces(monkeypatch):
    """cuBLAS takes 32-bit sizes and leading dimensions: torch.dot of 6.57B-parameter vectors raised on an
    H200 ("dot only supports n <= 2147483647", BENCHMARKS.md), and gemv/gemm check theirs alike. With the
    limit lowered to 999 and the CPU counted as such a device, every product along the parameters goes in
    contiguous pieces (a Lanczos basis's rows are 1000 apart: too long a stride too), and the helpers and
    the solvers give what one call gives."""
    gen = torch.Generator().manual_seed(0)
    X, Y, c = (
        torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((1000, 3), (1000, 2), (3,))
    )
    V, S = torch.randn(5, 1000, generator=gen, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    op = low_rank_operator(1000)

    def results() -> dict:
        return {
            "gram": (gram(X, Y), gram(X, Y[:, 0]), gram(Y[:, 0], Y[:, 0])),
            "combine": (combine(X, c), combine(X, Y[:3].mT.contiguous().mT)),
            "subtract": subtract_combination_(Y[:, 0].clone(), X, c),
            "recombine": _recombined(V, S),
            "recombine, wide blocks": _recombined(V, S[:2, :1]),  # 500 columns a block: pieces of 300
            "gram, rows 1000 apart": gram(V[:3, :600].mT, Y[:600, 0]),  # 600 rows, too long a stride
            "lanczos": lanczos(op, 3, tol=1e-10, max_matvec=3000, basis_size=8),
            "lobpcg": lobpcg(op, 3, tol=1e-8, max_matvec=3000),
            "hutch++": hutchpp_trace(op, 30).trace,
            "pf_velocity": pf_velocity(0.5, torch.tensor([1.0, 3.0]), X[:, :2], torch.tensor([1.0, -1.0])),
        }

    plain = results()
    pieces = []
    monkeypatch.setattr(operator_module, "_LONGEST", 999)
    monkeypatch.setattr(operator_module, "_PIECE", 300)  # four pieces, the last one short
    monkeypatch.setattr(operator_module, "_LIMITED", ("cuda", "cpu"))
    real = operator_module._pieces
    monkeypatch.setattr(operator_module, "_pieces", lambda n: pieces.append(n) or real(n))
    cut = results()
    assert len(pieces) > 100 and set(pieces) == {1000, 600}
    for name in plain:
        a, b = plain[name], cut[name]
        if name in ("lanczos", "lobpcg"):  # the same iterations; vectors to the tolerance's square root
            assert a.n_hvp == b.n_hvp, name
            torch.testing.assert_close(b.eigenvectors.abs(), a.eigenvectors.abs(), rtol=0, atol=1e-6)
            a, b = a.eigenvalues, b.eigenvalues
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def _recombined(V: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    V = V.clone()
    recombine_rows_(V, S)
    return V
