"""Hutchinson and Hutch++ against closed forms: ``torch.trace`` and the Rademacher variance."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ortho_group

from pf_lightning.linalg._common import orthonormalize
from pf_lightning.linalg.operator import DenseOperator, LinearOperator
from pf_lightning.linalg.trace import (
    TraceEstimate,
    hutchinson_trace,
    hutchpp_trace,
    rademacher,
)


def random_symmetric(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (X + X.T) / 2 + torch.diag(torch.linspace(0.0, 5.0, n, dtype=torch.float64))


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    Q = torch.from_numpy(ortho_group.rvs(n, random_state=seed))
    return (Q * eigenvalues) @ Q.T


class RecordingOperator(DenseOperator):
    """Remembers the width of every block it was applied to."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__(matrix)
        self.widths: list[int] = []

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        self.widths.append(X.shape[1])
        return super()._matmat(X)


class ShardedOperator(DenseOperator):
    """The second half of the rows of a vector twice as long as the matrix."""

    @property
    def global_n(self) -> int:
        return 2 * self.n

    def local_rows(self, X: torch.Tensor) -> torch.Tensor:
        return X[self.n :]


def test_rademacher_signs_are_deterministic_and_balanced():
    op = DenseOperator(torch.eye(1000, dtype=torch.float32))
    Z = rademacher(op, 4, torch.Generator().manual_seed(3))
    assert Z.shape == (1000, 4) and Z.dtype == torch.float32
    assert set(Z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(Z.mean())) < 0.05
    assert torch.equal(Z, rademacher(op, 4, torch.Generator().manual_seed(3)))


def test_rademacher_on_shards_takes_this_process_rows_of_the_global_probes():
    full = rademacher(DenseOperator(torch.eye(8)), 3, torch.Generator().manual_seed(5))
    local = rademacher(ShardedOperator(torch.eye(4)), 3, torch.Generator().manual_seed(5))
    assert torch.equal(local, full[4:])


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_sketch_basis_is_orthonormal_for_an_ill_conditioned_block(dtype, tol):
    op = DenseOperator(with_spectrum(0.7 ** torch.arange(200, dtype=torch.float64)).to(dtype))
    Q = orthonormalize(op, op.matmat(rademacher(op, 30, torch.Generator().manual_seed(0))))
    assert 10 <= Q.shape[1] <= 30
    assert float((Q.T @ Q - torch.eye(Q.shape[1], dtype=dtype)).abs().max()) < tol


def test_hutchinson_within_four_standard_errors():
    A = random_symmetric(200)
    for seed in range(5):
        est = hutchinson_trace(DenseOperator(A), 100, seed=seed)
        assert isinstance(est, TraceEstimate) and est.method == "hutchinson"
        assert abs(est.trace - float(torch.trace(A))) <= 4 * est.std_error


def test_hutchinson_std_error_matches_rademacher_variance():
    A = random_symmetric(200)
    n_samples = 200
    off_diagonal = A - torch.diag(torch.diag(A))
    expected = math.sqrt(2 * float((off_diagonal**2).sum()) / n_samples)
    est = hutchinson_trace(DenseOperator(A), n_samples, seed=1)
    assert expected / 1.5 <= est.std_error <= expected * 1.5


def test_hutchinson_is_deterministic_for_a_seed():
    A = random_symmetric(50)
    first = hutchinson_trace(DenseOperator(A), 20, seed=7)
    again = hutchinson_trace(DenseOperator(A), 20, seed=7, block_size=3)
    other = hutchinson_trace(DenseOperator(A), 20, seed=8)
    assert first.trace == pytest.approx(again.trace, rel=1e-12, abs=1e-12)
    assert first.trace != other.trace


def test_hutchinson_counts_every_application_in_blocks():
    op = RecordingOperator(random_symmetric(30))
    est = hutchinson_trace(op, 23, block_size=10)
    assert est.n_hvp == op.n_matvec == 23
    assert op.widths == [10, 10, 3]


def test_hutchinson_is_exact_on_a_diagonal():
    op = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
    est = hutchinson_trace(op, 5)
    assert est.trace == pytest.approx(55.0, abs=1e-12)
    assert est.std_error == pytest.approx(0.0, abs=1e-12)


def test_hutchinson_single_probe_has_unknown_std_error():
    assert math.isnan(hutchinson_trace(DenseOperator(random_symmetric(10)), 1).std_error)


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    eigenvalues = 0.8 ** torch.arange(300, dtype=torch.float64)
    A = with_spectrum(eigenvalues)
    exact, budget, seeds = float(eigenvalues.sum()), 60, range(8)
    err_hutch = sum(abs(hutchinson_trace(DenseOperator(A), budget, seed=s).trace - exact) for s in seeds)
    err_pp = sum(abs(hutchpp_trace(DenseOperator(A), budget, seed=s).trace - exact) for s in seeds)
    assert err_pp <= err_hutch / 5


def test_hutchpp_is_exact_when_rank_fits_the_sketch():
    eigenvalues = torch.zeros(200, dtype=torch.float64)
    eigenvalues[:10] = torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0, -1.0, -2.0, -4.0, -6.0, -8.0])
    op = DenseOperator(with_spectrum(eigenvalues, seed=2))
    est = hutchpp_trace(op, n_matvec=31)
    assert est.method == "hutch++"
    assert est.trace == pytest.approx(float(eigenvalues.sum()), abs=1e-9)
    assert est.std_error < 1e-9
    assert est.n_hvp == op.n_matvec == 31


def test_hutchpp_std_error_bounds_its_error():
    A = with_spectrum(0.9 ** torch.arange(150, dtype=torch.float64), seed=1)
    exact = float(torch.trace(A))
    for seed in range(5):
        est = hutchpp_trace(DenseOperator(A), 45, seed=seed)
        assert abs(est.trace - exact) <= 4 * est.std_error


def test_hutchpp_skips_the_residual_once_the_sketch_spans_everything():
    A = random_symmetric(8)
    op = DenseOperator(A)
    est = hutchpp_trace(op, n_matvec=60)  # 20 sketch vectors for n = 8
    assert est.trace == pytest.approx(float(torch.trace(A)), abs=1e-10)
    assert est.std_error == 0.0
    assert est.n_hvp == op.n_matvec == 20 + 8


def test_hutchpp_in_float32():
    eigenvalues = 0.7 ** torch.arange(100, dtype=torch.float64)
    op = DenseOperator(with_spectrum(eigenvalues).float())
    est = hutchpp_trace(op, 60)
    exact = float(eigenvalues.sum())
    # float32 resolves a shorter sketch (directions below ~sqrt(eps) are left to the residual probes).
    assert abs(est.trace - exact) <= 4 * est.std_error
    assert est.trace == pytest.approx(exact, rel=2e-3)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda op: hutchinson_trace(op, 0), "n_samples"),
        (lambda op: hutchinson_trace(op, 10, block_size=0), "block_size"),
        (lambda op: hutchinson_trace(op, 2.5), "n_samples"),
        (lambda op: hutchpp_trace(op, 2), "n_matvec"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    op: LinearOperator = DenseOperator(torch.eye(5))
    with pytest.raises(ValueError, match=name):
        call(op)
