"""Stochastic Lanczos quadrature against known spectra (``scipy.linalg.eigvalsh`` as the reference)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.linalg import eigvalsh
from scipy.stats import ortho_group

from pf_lightning.linalg.density import SpectralDensity, slq_density
from pf_lightning.linalg.operator import DenseOperator


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    Q = torch.from_numpy(ortho_group.rvs(n, random_state=seed))
    return (Q * eigenvalues) @ Q.T


def bimodal_spectrum(n: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    bulk = 0.3 * torch.rand(n - 20, generator=g, dtype=torch.float64) - 0.1
    outliers = torch.linspace(2.0, 5.0, 20, dtype=torch.float64)
    return torch.cat([bulk, outliers])


def trapezoid_moment(sd: SpectralDensity, p: int, sigma: float) -> float:
    grid = sd.grid(n_points=4000, pad=0.2)
    return float(torch.trapezoid(grid**p * sd.density(grid, sigma=sigma), grid))


def test_density_moments_of_a_diagonal_match_the_spectrum():
    eigenvalues = bimodal_spectrum()
    sd = slq_density(DenseOperator(torch.diag(eigenvalues)), n_steps=30, n_vectors=4)
    sigma = 0.01 * sd.spectral_range
    exact = [float((eigenvalues**p).mean()) for p in range(3)]
    # Gaussian broadening adds sigma^2 to the second moment and nothing to the first two.
    assert trapezoid_moment(sd, 0, sigma) == pytest.approx(1.0, abs=1e-6)
    assert trapezoid_moment(sd, 1, sigma) == pytest.approx(exact[1], abs=1e-6)
    assert trapezoid_moment(sd, 2, sigma) == pytest.approx(exact[2] + sigma**2, abs=1e-6)
    # Sign start vectors see a diagonal exactly: the quadrature moments are the true ones.
    for p in range(3):
        moments = (sd.weights * sd.nodes**p).sum(-1)
        assert torch.allclose(moments, torch.full_like(moments, exact[p]), atol=1e-10)


def test_density_moments_of_a_rotated_matrix_within_sampling_error():
    A = with_spectrum(bimodal_spectrum(), seed=3)
    reference = eigvalsh(A.numpy())
    n, n_vectors = A.shape[0], 8
    sd = slq_density(DenseOperator(A), n_steps=30, n_vectors=n_vectors, seed=1)
    for p in (1, 2):
        Ap = torch.linalg.matrix_power(A, p)
        off_diagonal = Ap - torch.diag(torch.diag(Ap))
        # Per-vector variance of v^T A^p v / n for a sign vector, averaged over the start vectors.
        std = math.sqrt(2 * float((off_diagonal**2).sum()) / n**2 / n_vectors)
        estimate = float((sd.weights * sd.nodes**p).sum(-1).mean())
        assert abs(estimate - (reference**p).mean()) <= 4 * std


def test_nodes_lie_within_the_spectrum():
    eigenvalues = bimodal_spectrum()
    sd = slq_density(DenseOperator(with_spectrum(eigenvalues)), n_steps=40, n_vectors=3)
    assert sd.nodes.shape == sd.weights.shape == (3, 40)
    assert float(sd.nodes.min()) >= float(eigenvalues.min()) - 1e-10
    assert float(sd.nodes.max()) <= float(eigenvalues.max()) + 1e-10
    assert torch.allclose(sd.weights.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12)
    # The top eigenvalue is an isolated outlier: 40 steps resolve it.
    assert float(sd.nodes.max()) == pytest.approx(float(eigenvalues.max()), abs=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_runs_grow_no_ghost_copies_of_outliers(dtype):
    # Ten outliers above a bulk in [0, 1]: in exact arithmetic at most one node falls in the gap
    # (1, 5) and none duplicates a converged outlier; lost orthogonality would add copies.
    eigenvalues = torch.cat(
        [
            torch.linspace(0.0, 1.0, 290, dtype=torch.float64),
            torch.linspace(5.0, 10.0, 10, dtype=torch.float64),
        ]
    )
    op = DenseOperator(with_spectrum(eigenvalues, seed=1).to(dtype))
    sd = slq_density(op, n_steps=150, n_vectors=2)
    for nodes in sd.nodes:
        assert int((nodes > 1.01).sum()) <= 11
        assert int(((nodes - 10.0).abs() < 1e-3).sum()) == 1


def test_full_lanczos_recovers_every_eigenvalue():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = (X + X.T) / 2
    reference = torch.from_numpy(eigvalsh(A.numpy()))
    sd = slq_density(DenseOperator(A), n_steps=12, n_vectors=3)
    for nodes, weights in zip(sd.nodes, sd.weights, strict=True):
        resolved = nodes[weights > 1e-12]
        distance = (resolved[:, None] - reference[None, :]).abs().min(dim=1).values
        assert float(distance.max()) < 1e-8


def test_density_integrates_to_one_over_its_grid():
    sd = slq_density(DenseOperator(with_spectrum(bimodal_spectrum())), n_steps=30, n_vectors=4)
    grid = sd.grid()
    assert grid.shape == (1000,)
    assert float(torch.trapezoid(sd.density(grid), grid)) == pytest.approx(1.0, abs=1e-2)
    assert float(sd.density(grid).min()) >= 0.0


def test_cost_and_trace_estimate():
    A = with_spectrum(bimodal_spectrum())
    op = DenseOperator(A)
    sd = slq_density(op, n_steps=25, n_vectors=3)
    assert sd.n_hvp == op.n_matvec == 25 * 3
    assert sd.seconds >= 0.0
    off_diagonal = A - torch.diag(torch.diag(A))
    std = math.sqrt(2 * float((off_diagonal**2).sum()) / 3)
    assert abs(sd.trace_estimate(op.n) - float(torch.trace(A))) <= 4 * std


def test_breakdown_on_few_distinct_eigenvalues_gives_an_exact_rule():
    eigenvalues = torch.tensor([1.0] * 10 + [2.0] * 30 + [4.0] * 10, dtype=torch.float64)
    op = DenseOperator(torch.diag(eigenvalues))
    sd = slq_density(op, n_steps=20, n_vectors=2)
    assert sd.n_hvp == op.n_matvec == 3 * 2  # the Krylov space is invariant after three steps
    for nodes, weights in zip(sd.nodes, sd.weights, strict=True):
        assert torch.allclose(nodes[:3], torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), atol=1e-12)
        assert torch.allclose(weights[:3], torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64), atol=1e-12)
        assert float(weights[3:].abs().max()) == 0.0


def test_multiple_of_identity_has_a_usable_grid_and_density():
    sd = slq_density(DenseOperator(3.0 * torch.eye(20, dtype=torch.float64)), n_steps=5, n_vectors=2)
    assert sd.n_hvp == 2 and sd.spectral_range == pytest.approx(0.0, abs=1e-12)
    grid = sd.grid()
    assert float(grid[0]) < 3.0 < float(grid[-1])
    assert float(torch.trapezoid(sd.density(grid), grid)) == pytest.approx(1.0, abs=1e-2)


def test_float32_operator():
    eigenvalues = bimodal_spectrum()
    sd = slq_density(DenseOperator(with_spectrum(eigenvalues).float()), n_steps=30, n_vectors=2)
    assert sd.nodes.dtype == torch.float64
    assert float(sd.nodes.max()) == pytest.approx(float(eigenvalues.max()), rel=1e-4)
    assert float(sd.nodes.min()) >= float(eigenvalues.min()) - 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_steps": 1}, "n_steps"),
        ({"n_vectors": 0}, "n_vectors"),
        ({"n_steps": 11}, "lower n_steps"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        slq_density(DenseOperator(torch.eye(10)), **kwargs)


def test_bad_sigma_and_grid():
    sd = slq_density(DenseOperator(torch.diag(torch.arange(5.0))), n_steps=3, n_vectors=1)
    with pytest.raises(ValueError, match="sigma"):
        sd.density(sd.grid(), sigma=0.0)
    with pytest.raises(ValueError, match="n_points"):
        sd.grid(n_points=1)
