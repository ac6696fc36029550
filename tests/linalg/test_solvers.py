"""Lanczos and LOBPCG against dense ``eigh`` over a table of spectra."""

import warnings

import pytest
import torch

from pf_lightning.linalg import (
    DenseOperator,
    LinearOperator,
    NonConvergenceWarning,
    NonFiniteOperatorError,
    lanczos,
    lobpcg,
)
from pf_lightning.linalg.density import slq_density
from pf_lightning.linalg.operator import gram

SOLVERS = {"lanczos": lanczos, "lobpcg": lobpcg}


def symmetric(eigenvalues, seed=0, dtype=torch.float64):
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return ((Q * eigenvalues) @ Q.T).to(dtype)


def hessian_like(n=200, seed=0):
    """A few large outliers over a bulk near zero with negative values: the shape of NN Hessians."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.randn(n - 8, generator=g, dtype=torch.float64) * 0.3
    return torch.cat(
        [torch.tensor([40.0, 25.0, 18.0, 12.0, 9.0, 7.0, -6.0, -3.5], dtype=torch.float64), bulk]
    )


SPECTRA = {
    "hessian_like": hessian_like(),
    "separated": torch.linspace(1, 100, 150, dtype=torch.float64),
    "repeated_top": torch.cat([torch.full((3,), 10.0), torch.linspace(-1, 5, 97)]).double(),
    "all_negative": -torch.linspace(1, 50, 120, dtype=torch.float64),
}


def wanted(eigs, k, which):
    e = torch.sort(eigs, descending=True).values
    return {"top": e[:k], "bottom": e[-k:], "both": torch.cat([e[:k], e[-k:]])}[which]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("which", ["top", "bottom", "both"])
def test_float64_eigenpairs_match_eigh(solver, spectrum, which):
    eigs = SPECTRA[spectrum]
    A = symmetric(eigs)
    k = 4
    result = SOLVERS[solver](DenseOperator(A), k, which=which, tol=1e-9, max_matvec=3000)
    assert result.all_converged
    expected = wanted(eigs, k, which)
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-6, atol=1e-6 * float(eigs.abs().max()))
    # Reported residuals are the true ones, and the vectors are unit-norm eigenvectors.
    true_residuals = (A @ result.eigenvectors - result.eigenvectors * result.eigenvalues).norm(dim=0)
    torch.testing.assert_close(result.residuals, true_residuals, rtol=0, atol=1e-8 * float(eigs.abs().max()))
    torch.testing.assert_close(result.eigenvectors.norm(dim=0), torch.ones(result.k, dtype=torch.float64))
    assert result.n_hvp > 0
    assert torch.all(result.eigenvalues[:-1] >= result.eigenvalues[1:])


@pytest.mark.parametrize("solver", SOLVERS)
def test_eigenvectors_align_where_the_gap_allows(solver):
    eigs = SPECTRA["hessian_like"]
    A = symmetric(eigs)
    _evals, evecs = torch.linalg.eigh(A)
    result = SOLVERS[solver](DenseOperator(A), 5, tol=1e-8, max_matvec=2000)
    for i in range(5):
        cos = torch.abs(result.eigenvectors[:, i] @ evecs[:, -1 - i])
        assert cos >= 0.999


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_operator_reaches_1e_3(solver):
    eigs = SPECTRA["hessian_like"]
    A = symmetric(eigs, dtype=torch.float32)
    result = SOLVERS[solver](DenseOperator(A), 5, which="both", tol=1e-3)
    assert result.all_converged
    torch.testing.assert_close(result.eigenvalues.double(), wanted(eigs, 5, "both"), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("solver", SOLVERS)
def test_deterministic_for_a_seed(solver):
    A = symmetric(SPECTRA["hessian_like"])
    a = SOLVERS[solver](DenseOperator(A), 3, seed=7)
    b = SOLVERS[solver](DenseOperator(A), 3, seed=7)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.n_hvp == b.n_hvp


def test_lanczos_counts_products_and_stops_at_tolerance():
    """A cold start fills its basis (20) before its first test; a warm start tests from the first step."""
    op = DenseOperator(symmetric(torch.cat([torch.tensor([100.0]), torch.linspace(0, 50, 149)])))
    result = lanczos(op, 1, tol=1e-3)
    assert result.n_hvp == op.n_matvec == 20
    assert result.all_converged
    gen = torch.Generator().manual_seed(3)
    v0 = result.eigenvectors[:, 0] + 0.1 * torch.randn(150, generator=gen, dtype=torch.float64) / 150**0.5
    warm = lanczos(op, 1, tol=1e-3, v0=v0)
    assert warm.all_converged
    assert warm.n_hvp <= 8  # a gap of half the spectrum: error shrinks ~ 0.17^j per step
    torch.testing.assert_close(
        warm.eigenvalues, torch.tensor([100.0], dtype=torch.float64), rtol=1e-3, atol=0
    )
    early = lanczos(op, 1, tol=1e-3, first_test=1)  # the caller knows the gap: tested from the first product
    assert early.all_converged and early.n_hvp <= 12
    torch.testing.assert_close(
        early.eigenvalues, torch.tensor([100.0], dtype=torch.float64), rtol=1e-3, atol=0
    )
    with pytest.raises(ValueError, match="first_test must be a positive int"):
        lanczos(op, 1, first_test=0)
    # A review: past the basis it restarted into an IndexError; a large basis made a cold start cost all of
    # it (100 products); a zero v0 (the Gaussian alone) was tested from the first product as a warm start.
    late = lanczos(op, 2, basis_size=20, first_test=25)
    assert late.all_converged and late.n_hvp >= 25
    assert lanczos(op, 1, basis_size=100).n_hvp == 20
    zero = lanczos(op, 1, v0=torch.zeros(150, dtype=torch.float64))
    assert zero.n_hvp == 20 and not zero.info["warm_start"]


def test_a_cold_start_does_not_return_a_lower_eigenvalue_for_one_its_krylov_space_had_not_reached():
    """Top 2 of [1, 0.95, 0.9, bulk in [0, 0.5]]: tested from the 2nd step, Lanczos returned [1, 0.9],
    converged, from 2 of 100 random starts (12-14 products); at a 0.5% gap [1, 0.99] from 20 of 100."""
    gen = torch.Generator().manual_seed(7)
    n = 300
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    bulk = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    wrong = 0
    for gap in (0.05, 0.005):
        eigs = bulk.clone()
        eigs[:3] = torch.tensor([1.0, 1.0 - gap, 1.0 - 2 * gap], dtype=torch.float64)
        op = DenseOperator((Q * eigs) @ Q.mT)
        for seed in range(25):
            result = lanczos(op, 2, seed=seed)
            assert result.all_converged
            wrong += bool((result.eigenvalues - eigs[:2]).abs().max() > 1e-3)
    assert wrong == 0


def test_whole_space_is_exact():
    eigs = torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    A = symmetric(eigs)
    result = lanczos(DenseOperator(A), 4, tol=1e-12)
    torch.testing.assert_close(result.eigenvalues, torch.sort(eigs, descending=True).values)
    assert result.all_converged and result.n_hvp <= 5


@pytest.mark.parametrize("solver", SOLVERS)
def test_budget_exhaustion_is_flagged_and_warned(solver):
    A = symmetric(torch.linspace(0.99, 1.0, 300))  # a tight cluster: hopeless in a few products
    with pytest.warns(NonConvergenceWarning, match="raise max_hvp"):
        result = SOLVERS[solver](DenseOperator(A), 3, tol=1e-10, max_matvec=30)
    assert not result.all_converged
    assert result.n_hvp <= 30


class _NaNOperator(LinearOperator):
    def __init__(self):
        super().__init__(50, torch.float64, "cpu")

    def _matmat(self, X):
        return torch.full_like(X, float("nan"))


class _Identity(LinearOperator):
    """Hands back its input: the product is the basis vector itself."""

    def __init__(self, n=40):
        super().__init__(n, torch.float64, "cpu")

    def _matmat(self, X):
        return X


class _GraphCarrying(DenseOperator):
    """Products that carry a graph (through a matrix that requires grad)."""

    def _matmat(self, X):
        return self.matrix.requires_grad_() @ X


class _InferenceMode(DenseOperator):
    """Products made in inference mode (which may not be updated in place outside it)."""

    def _matmat(self, X):
        with torch.inference_mode():
            return self.matrix @ X


@pytest.mark.parametrize("where", ["start", "inf", "nan", "overflow"])
def test_the_finiteness_check_catches_one_bad_entry_anywhere(where):
    """Checked on the remainder's norm, which a NaN or infinity anywhere in the product reaches; so does a
    float32 product whose norm overflows (an eigenvalue near 1e19 would)."""

    class OneBad(DenseOperator):
        def _matmat(self, X):
            Y = self.matrix @ X
            bad = {"start": float("nan"), "inf": float("-inf"), "nan": float("nan"), "overflow": 3e19}[where]
            Y[{"start": 0, "inf": 17, "nan": -1, "overflow": 5}[where]] = bad
            return Y

    A = symmetric(hessian_like(60))
    with pytest.raises(NonFiniteOperatorError, match="non-finite"):
        lanczos(OneBad(A.float() if where == "overflow" else A), 2)
    with pytest.raises(NonFiniteOperatorError, match="non-finite"):
        slq_density(OneBad(A.float() if where == "overflow" else A), n_steps=10, n_vectors=1)


def test_lanczos_updates_products_in_place_but_never_the_basis_nor_a_graph():
    """The step removes the projections from the product in place: an operator that returns its input, or a
    product a graph holds or one made in inference mode, is copied first."""
    result = lanczos(_Identity(), 1, tol=1e-10)
    torch.testing.assert_close(result.eigenvalues, torch.ones(1, dtype=torch.float64))
    # A basis updated through the alias would be zeroed: the eigenvalue 1 still, but no eigenvector.
    torch.testing.assert_close(result.eigenvectors.norm(dim=0), torch.ones(1, dtype=torch.float64))
    A = symmetric(hessian_like(60))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scalar read off a tensor that requires grad
        result = lanczos(_GraphCarrying(A.clone()), 3, tol=1e-10)
        made_in_inference = lanczos(_InferenceMode(A), 3, tol=1e-10)
    for r in (result, made_in_inference):
        torch.testing.assert_close(r.eigenvalues, wanted(hessian_like(60), 3, "top"), rtol=1e-9, atol=0)
        residual = A @ r.eigenvectors - r.eigenvectors * r.eigenvalues
        assert float(residual.norm(dim=0).max()) < 1e-8 * 40
    assert not result.eigenvectors.requires_grad


@pytest.mark.parametrize("solver", SOLVERS)
def test_non_finite_operator_raises(solver):
    with pytest.raises(NonFiniteOperatorError, match="non-finite"):
        SOLVERS[solver](_NaNOperator(), 2)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be a positive int"),
        ({"k": 2.5}, "k must be a positive int"),
        ({"k": 11}, "lower k"),
        ({"k": 6, "which": "both"}, "lower k"),
        ({"k": 2, "which": "largest"}, "which must be one of"),
        ({"k": 2, "tol": 0.0}, "tol"),
    ],
)
def test_bad_arguments(solver, kwargs, match):
    op = DenseOperator(symmetric(torch.arange(10.0)))
    with pytest.raises(ValueError, match=match):
        SOLVERS[solver](op, **kwargs)


def test_warm_start_needs_fewer_products():
    eigs = SPECTRA["hessian_like"]
    A = symmetric(eigs)
    cold = lanczos(DenseOperator(A), 5, tol=1e-4)
    E = symmetric(
        torch.randn(eigs.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64), seed=9
    )
    B = A + 0.05 * E  # eigenvalues move by up to ~1e-1, the top eigenvectors rotate a little
    cold_b = lanczos(DenseOperator(B), 5, tol=1e-4)
    warm_lanczos = lanczos(DenseOperator(B), 5, tol=1e-4, v0=cold.eigenvectors.sum(dim=1))
    warm_block = lobpcg(DenseOperator(B), 5, tol=1e-4, X0=cold.eigenvectors)
    for warm in (warm_lanczos, warm_block):
        assert warm.all_converged
        torch.testing.assert_close(warm.eigenvalues, cold_b.eigenvalues, rtol=1e-6, atol=1e-6)
    assert warm_lanczos.n_hvp < cold_b.n_hvp


def test_a_warm_start_along_a_lower_eigenvector_still_finds_the_top():
    """A previous top direction that is now the second: alone it is an eigenvector (Lanczos would stop
    at once, converged on 9); mixed with a random vector the solver finds 10."""
    eigs = torch.cat([torch.tensor([10.0, 9.0]), torch.linspace(-1.0, 1.0, 40)]).double()
    A = torch.diag(eigs)
    v0 = torch.zeros(eigs.numel(), dtype=torch.float64)
    v0[1], v0[0] = 1.0, 1e-9
    result = lanczos(DenseOperator(A), 1, tol=1e-6, v0=v0)
    assert result.all_converged
    assert float(result.eigenvalues[0]) == pytest.approx(10.0, rel=1e-6)


class _Diagonal(LinearOperator):
    def __init__(self, d: torch.Tensor) -> None:
        super().__init__(d.numel(), d.dtype, d.device)
        self.d = d

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * X


def test_inner_products_along_millions_of_float32_entries_are_summed_accurately():
    """torch's CPU BLAS adds a float32 product's terms one after another: the Gram matrix of an (n, 4) block
    was 3.7e-3 off at n = 2^22 (the rows layout of a Lanczos basis too, and 2e-5 for one dot product); a
    narrower second block is multiplied first and the result transposed."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2**22, 4, generator=gen)
    want = X.double().mT @ X.double()
    basis = X.mT.contiguous().mT  # (n, 4) whose rows are n apart: Lanczos's V[: j + 1].mT
    for got, ref in [
        (gram(X, X), want),
        (gram(basis, X[:, 0]), want[:, 0]),
        (gram(basis, X[:, :2]), want[:, :2]),  # the narrower block goes first: both orientations
        (gram(X[:, 0], basis), want[0]),
        (gram(X[:, 1].contiguous(), X[:, 1].contiguous()), want[1, 1]),
    ]:
        assert got.dtype == torch.float32 and got.shape == ref.shape
        err = float((got.double() - ref).abs().max() / ref.abs().max())
        assert err < 1e-6, err


def test_lobpcg_finds_the_top_eigenvalues_of_four_million_float32_entries():
    """With one-call Gram matrices LOBPCG returned 484.2 for a top eigenvalue of 10 (n = 2^22, float32, a
    warm start near the answer) after 299 products; 16-20 products now, as at n = 2^16."""
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(2**22, generator=gen)
    top = torch.randperm(d.numel(), generator=gen)[:3]
    d[top] = torch.tensor([10.0, 9.0, 8.5])
    X0 = torch.zeros(d.numel(), 3)
    X0[top, torch.arange(3)] = 1.0
    X0 += 1e-3 * torch.randn(X0.shape, generator=gen)
    result = lobpcg(_Diagonal(d), 3, tol=1e-4, max_matvec=300, X0=X0)
    assert result.all_converged and result.n_hvp <= 30, result.n_hvp
    torch.testing.assert_close(result.eigenvalues, torch.tensor([10.0, 9.0, 8.5]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("which", ["bottom", "both", "top"])
def test_an_invariant_krylov_space_does_not_hide_repeated_eigenvalues(which):
    """A rank-8 Hessian-like matrix (the softmax regression of 4 samples has one): the Krylov space of a
    start vector is invariant after 9 steps and holds the zero eigenvalue once. Lanczos returned its 9
    exact Ritz values as converged, the bottom 3 as [17.99, 16.79, 0] and the bottom pair of "both" as
    [16.79, 0]; the fresh directions after the breakdown find the other zeros (LOBPCG, a block, did)."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 8, generator=gen, dtype=torch.float64))
    top = torch.tensor([60.0, 52.5, 50.8, 40.2, 33.1, 24.0, 18.0, 16.8], dtype=torch.float64)
    A = Q @ torch.diag(top) @ Q.mT
    want = torch.linalg.eigvalsh(A)
    k = 3
    want = {"bottom": want[:k], "top": want.flip(0)[:k], "both": torch.cat([want.flip(0)[:k], want[:k]])}[
        which
    ]
    result = lanczos(DenseOperator(A), k, which=which, tol=1e-6)
    assert result.all_converged
    got = torch.sort(result.eigenvalues).values
    torch.testing.assert_close(got, torch.sort(want).values, rtol=0, atol=1e-8 * 60)
    assert result.n_hvp <= 15, result.n_hvp


def test_residuals_after_a_breakdown_count_the_coupling_set_to_zero():
    """Invariant to the tolerance (a rank-8 matrix plus 1e-9 of noise): a step's small coupling is dropped
    to go on from a fresh direction, and the residuals reported still include it."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 8, generator=gen, dtype=torch.float64))
    noise = torch.randn(300, 300, generator=gen, dtype=torch.float64)
    A = Q @ torch.diag(torch.linspace(10.0, 60.0, 8, dtype=torch.float64)) @ Q.mT + 1e-9 * (noise + noise.mT)
    result = lanczos(
        DenseOperator(A), 3, which="bottom", tol=1e-6
    )  # the noise's: ~1e-8, found in fresh blocks
    true = (A @ result.eigenvectors - result.eigenvectors * result.eigenvalues).norm(dim=0)
    assert float(true.min()) > 1e-10  # the noise, not rounding
    assert bool((true <= 1.01 * result.residuals).all()), (true, result.residuals)


def test_a_tiny_operator_whose_rank_is_below_k_gives_its_bottom_eigenvalues():
    """n = 8, rank 4: for which="bottom" and k = 2..7 Lanczos returned the top values, converged."""
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(8, 4, generator=gen, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([0.57, 0.36, 0.23, 0.065], dtype=torch.float64)) @ Q.mT
    want = torch.linalg.eigvalsh(A)
    for k in range(1, 8):
        result = lanczos(DenseOperator(A), k, which="bottom", tol=1e-8)
        torch.testing.assert_close(torch.sort(result.eigenvalues).values, want[:k], rtol=0, atol=1e-10)


def test_residuals_after_a_restart_still_count_the_couplings_set_to_zero():
    """Eigenvalues 1e-6..1e4, the bottom 3 (below 1% of the scale, held to that 1%): the Krylov space is
    invariant to the tolerance several times, and a thick restart recombined the basis. The residuals
    reported after it left out the couplings dropped before it: 7.9e-3 for a true 4.5e-2 (seed 0; 47x under
    on a least-squares Hessian of this spectrum)."""
    A = symmetric(torch.logspace(-6, 4, 40, dtype=torch.float64))
    restarted = 0
    for seed in range(6):
        result = lanczos(DenseOperator(A), 3, which="bottom", seed=seed)
        restarted += result.info["restarts"] > 0
        true = (A @ result.eigenvectors - result.eigenvectors * result.eigenvalues).norm(dim=0)
        assert bool((true <= 1.01 * result.residuals).all()), (seed, true, result.residuals)
    assert restarted >= 2


def test_lanczos_residuals_count_the_products_own_error_and_an_asymmetric_operator_is_flagged():
    """The recurrence's residual estimate cannot see the error of the products themselves: a float32
    operator at tol=1e-8 came back converged with residuals of 4e-10 for true ones of 1.3e-7 (an outside
    trial), and a non-symmetric one (a finite difference across a ReLU kink) converged on wrong values. The
    asymmetry of the projected matrix is a floor under every residual; where it exceeds the tolerance the
    run stops, flagged, with a warning that says why."""
    A = symmetric(SPECTRA["hessian_like"], dtype=torch.float32)
    result = lanczos(DenseOperator(A), 3, tol=1e-6)
    true = (
        A.double() @ result.eigenvectors.double() - result.eigenvectors.double() * result.eigenvalues.double()
    )
    assert result.all_converged and bool((true.norm(dim=0) <= 10 * result.residuals.double()).all())
    assert 1e-9 < result.info["asymmetry"] < 1e-6
    with pytest.warns(NonConvergenceWarning, match="not symmetric to tol=1e-08"):
        coarse = lanczos(DenseOperator(A), 3, tol=1e-8)
    assert not coarse.converged.any() and coarse.n_hvp < 100  # stopped once no pair could pass
    skew = torch.randn(200, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    B = symmetric(SPECTRA["hessian_like"]) + 0.5 * (skew - skew.T)  # 5% of the scale
    with pytest.warns(NonConvergenceWarning, match="not symmetric"):
        flagged = lanczos(DenseOperator(B), 3)
    assert not flagged.converged.any() and flagged.info["asymmetry"] > 1e-2
    exact = lanczos(DenseOperator(symmetric(SPECTRA["hessian_like"])), 3, tol=1e-9)
    assert exact.all_converged and exact.info["asymmetry"] < 1e-14


def test_pairs_the_floor_keeps_from_tol_stop_the_solver_once_the_rest_of_their_residual_is_down_to_it():
    """Finite differences in float32 are asymmetric by 3e-5 of the scale, above the 1e-5 that eigenvalues
    near zero are held to at tol=1e-3: `which="bottom"` spent the whole budget (300 products, or all of a
    larger max_hvp) and advised raising it (a review). It stops once the recurrence's part of their residual
    is down to the floor, flagged, and the warning says why; the values are as good as the products allow."""
    generator = torch.Generator().manual_seed(3)
    eigs = torch.cat(
        [torch.tensor([40.0, 25.0, 18.0]), torch.rand(197, generator=generator) * 0.4 - 0.1]
    ).double()
    skew = torch.randn(200, 200, generator=generator, dtype=torch.float64)
    A = symmetric(eigs) + 2e-4 * (skew - skew.T)
    with pytest.warns(NonConvergenceWarning, match="cannot reach it"):
        result = lanczos(DenseOperator(A), 3, which="bottom", max_matvec=2000)
    assert not result.converged.any() and result.info["floored"] == 3 and result.n_hvp < 300
    exact = torch.sort(eigs).values[:3]
    torch.testing.assert_close(torch.sort(result.eigenvalues).values, exact, rtol=0, atol=1e-2)


def test_a_breakdown_coupling_is_not_taken_for_the_products_error():
    """At a breakdown the next column holds the dropped coupling (up to 100 eps of the scale in float32),
    which `slack` already counts: read as asymmetry it flagged converged pairs of a rank-5 operator at
    tol=1e-5 after 300 products, with residuals larger than the spectrum (a review); 9 products before."""
    eigs = torch.cat([torch.tensor([5.0, 3.0, 2.0, -1.0, -0.5]), torch.zeros(195)])
    for seed in range(4):
        A = symmetric(eigs, seed, dtype=torch.float32)
        result = lanczos(DenseOperator(A), 6, seed=seed, tol=1e-5)
        assert result.all_converged and result.n_hvp <= 12, (seed, result.n_hvp)
        true = (
            A.double() @ result.eigenvectors.double()
            - result.eigenvectors.double() * result.eigenvalues.double()
        )
        assert bool((true.norm(dim=0) <= 1e-5 * result.eigenvalues.double().abs().clamp_min(0.05)).all())
