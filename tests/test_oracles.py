"""pf_lightning's top eigenvalues against the tools it replaces: PyHessian and hessian-eigenthings.

One small tanh MLP (64-12-12-10, 1066 parameters) on 256 standardized sklearn digits with cross-entropy,
briefly trained so that its spectrum has the usual shape (a few positive outliers, small negative
eigenvalues) instead of the nearly symmetric spectrum of a network at initialization, which makes
deflated power iteration (PyHessian, eigenthings' ``deflated_power_iteration``) chase negative
eigenvalues of similar magnitude.

Each oracle gets its own freshly built model: PyHessian puts the model in eval mode for good (and
hangs graph-carrying ``.grad`` tensors on it until its power iteration zeroes them), so no measurement
may run on a model an oracle has touched. ``test_pyhessian_side_effects_do_not_reach_our_measurement``
shows those side effects and that our measurement does not inherit them.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacfwd

from pf_lightning import hessian_eigenpairs

pytest.importorskip("sklearn")
pyhessian = pytest.importorskip("pyhessian")
he = pytest.importorskip("hessian_eigenthings")

# PyHessian builds its gradient graph with loss.backward(create_graph=True), which torch warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")

K = 3
PF_TOL = 1e-6


def _data() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:256], dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x, torch.tensor(digits.target[:256], dtype=torch.long)


BATCH = _data()


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def fresh_model() -> nn.Module:
    """The same trained float32 MLP every call, built from scratch (seeded init, 50 full-batch Adam steps)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(50):
            opt.zero_grad()
            loss_fn(model, BATCH).backward()
            opt.step()
    for p in model.parameters():
        p.grad = None
    return model.train()


@pytest.fixture(scope="module")
def dense_eigenvalues() -> Tensor:
    """All eigenvalues (descending) of the float64 Hessian, by ``jacfwd(grad(f))`` on a pure function.

    Not ``torch.func.hessian`` (= ``jacfwd(jacrev)``): on torch 2.13 it returns wrong, asymmetric rows
    for models with normalization layers (BatchNorm/LayerNorm weights). This MLP has none, but the
    reference should be the construction that is right for every model.
    """
    model = fresh_model().double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x, y = BATCH[0].double(), BATCH[1]

    def f(flat: Tensor) -> Tensor:
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    H = jacfwd(grad(f))(flat0)
    assert float((H - H.mT).abs().max()) <= 1e-12 * float(H.abs().max())
    return torch.linalg.eigvalsh(H).flip(0)


@pytest.fixture(scope="module")
def ours() -> Tensor:
    """pf_lightning's top-3 at relative residual 1e-6, measured in float64 on a float32 model."""
    result = hessian_eigenpairs(fresh_model(), loss_fn, BATCH, k=K, tol=PF_TOL, dtype=torch.float64)
    assert result.all_converged
    return result.eigenvalues


def rel(a: Tensor, b: Tensor) -> Tensor:
    return (a.double() - b.double()).abs() / b.double().abs()


def test_spectrum_has_the_shape_power_iteration_needs(dense_eigenvalues: Tensor) -> None:
    # Deflated power iteration finds the largest |lambda|: the comparison is only meaningful when the
    # top-3 are the three largest in magnitude, and it converges in a few hundred steps only when the
    # ratios lambda_{i+1} / lambda_i (i <= 3) stay away from 1 (here 0.63, 0.91, 0.96).
    top, bottom = dense_eigenvalues[: K + 1], dense_eigenvalues[-1]
    assert float(top[K - 1]) > 2 * abs(float(bottom))
    assert float((top[1:] / top[:-1]).max()) < 0.97


def test_ours_match_dense_float64(ours: Tensor, dense_eigenvalues: Tensor) -> None:
    # A relative residual r = ||Hv - theta v|| / |theta| <= 1e-6 puts an exact eigenvalue within
    # r |theta| of theta (Bauer-Fike for symmetric matrices): 1e-6 is the tolerance the result promises.
    assert float(rel(ours, dense_eigenvalues[:K]).max()) <= PF_TOL


def test_same_top_eigenvalues_as_pyhessian(ours: Tensor, dense_eigenvalues: Tensor) -> None:
    ph = sys.modules["pyhessian.hessian"]  # the package shadows its submodule with the class
    torch.manual_seed(0)  # PyHessian draws its start vectors from the global generator
    h = ph.hessian(fresh_model(), nn.CrossEntropyLoss(), data=BATCH, cuda=False)
    values, _ = h.eigenvalues(maxIter=1000, tol=1e-6, top_n=K)
    theirs = torch.sort(torch.tensor(values, dtype=torch.float64), descending=True).values
    # PyHessian stops when two successive power-iteration estimates differ by < tol (relative), not on a
    # residual, so its error is not bounded by tol: the Rayleigh quotient's error shrinks by about
    # q = (lambda_{i+1} / lambda_i)^2 <= 0.93 per step, so the error left when the change falls below tol
    # is about tol * q / (1 - q) <= 1.3e-5 per pair, plus what the deflation against the previous
    # (approximate) eigenvectors passes on, plus float32 products. It reaches 1.6e-5 here; 1e-4 leaves a
    # 6x margin and is still 800x tighter than the smallest relative gap between the top-3 (0.086).
    assert float(rel(theirs, dense_eigenvalues[:K]).max()) <= 1e-4
    assert float(rel(ours, theirs).max()) <= 1e-4


def test_same_top_eigenvalues_as_eigenthings_lanczos(ours: Tensor, dense_eigenvalues: Tensor) -> None:
    model = fresh_model()
    op = he.HessianOperator(model, [BATCH], he.supervised_loss(F.cross_entropy))
    # Enough steps that its own residual test passes at 1e-5 (its default, max_iter=2k, does not).
    out = he.lanczos(op, k=K, max_iter=80, tol=1e-5, which="LA", reorthogonalize=True, seed=0)
    assert bool(out.converged.all())
    theirs = torch.sort(out.eigenvalues.double(), descending=True).values
    # Converged Ritz values of a fully reorthogonalized Lanczos in float32: the residual bound 1e-5 plus
    # float32 rounding of the products (~1e-6 of the spectral scale).
    assert float(rel(theirs, dense_eigenvalues[:K]).max()) <= 2e-5
    assert float(rel(ours, theirs).max()) <= 2e-5


def test_same_top_eigenvalues_as_eigenthings_power_iteration(ours: Tensor, dense_eigenvalues: Tensor) -> None:
    model = fresh_model()
    op = he.HessianOperator(model, [BATCH], he.supervised_loss(F.cross_entropy))
    out = he.deflated_power_iteration(op, k=K, max_iter=2000, tol=1e-4, seed=0)
    assert bool(out.converged.all())
    theirs = torch.sort(out.eigenvalues.double(), descending=True).values
    # Its stopping test is a relative residual <= 1e-4 (and a relative change <= 1e-4), so each value is
    # within 1e-4 of an exact eigenvalue of the deflated operator; the deflation by the earlier
    # approximate pairs adds errors of the same order. 3e-4 covers both.
    assert float(rel(theirs, dense_eigenvalues[:K]).max()) <= 3e-4
    assert float(rel(ours, theirs).max()) <= 3e-4


def test_pyhessian_side_effects_do_not_reach_our_measurement(ours: Tensor) -> None:
    touched = fresh_model()
    ph = sys.modules["pyhessian.hessian"]
    torch.manual_seed(0)
    h = ph.hessian(touched, nn.CrossEntropyLoss(), data=BATCH, cuda=False)
    # What PyHessian leaves behind: eval mode (for good), and, until its power iteration zeroes them,
    # .grad tensors that carry its autograd graph.
    assert all(p.grad is not None and p.grad.requires_grad for p in touched.parameters())
    h.eigenvalues(maxIter=5, top_n=1)
    assert not touched.training
    assert fresh_model().training  # which is why every oracle above gets a fresh model

    # Our measurement on the touched model does not depend on that state: same eigenvalues as on a
    # fresh model (this MLP has no mode-dependent layer), and the model is handed back as we found it
    # (still in eval mode, .grad untouched).
    sentinel = [torch.full_like(p, 7.0) for p in touched.parameters()]
    for p, g in zip(touched.parameters(), sentinel, strict=True):
        p.grad = g
    again = hessian_eigenpairs(touched, loss_fn, BATCH, k=K, tol=PF_TOL, dtype=torch.float64)
    assert float(rel(again.eigenvalues, ours).max()) <= 1e-9
    assert not touched.training
    assert all(p.grad is g for p, g in zip(touched.parameters(), sentinel, strict=True))
    assert all(bool((g == 7.0).all()) for g in sentinel)
