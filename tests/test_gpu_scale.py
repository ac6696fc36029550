"""``benchmarks/gpu_scale.py`` at its smoke-test sizes on the CPU: the script a lent GPU runs at 1B and 7B
parameters must run there the first time."""

import copy

import pytest
import torch

from benchmarks import gpu_scale
from benchmarks.models import next_token_loss
from pf_lightning import hessian_eigenpairs


def test_the_rows_hold_the_top_eigenvalue_in_bfloat16_and_critical_sharpness_per_step():
    size, vocab, shape = gpu_scale.QUICK_SIZES["1B"], gpu_scale.QUICK_VOCAB, gpu_scale.QUICK_PROBE
    row = gpu_scale.measure("1B", size, vocab, shape, "cpu")
    top, critical = row["top1"], row["critical"]
    assert "error" not in top and "error" not in critical, row
    # The same model and probe in float64 (independent of bfloat16's rounding): bfloat16 passes are
    # within a few percent (README, "Memory": 0.2-2% on the benchmark models).
    model = gpu_scale.build(size, vocab, "cpu")
    tokens = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    reference = hessian_eigenpairs(
        copy.deepcopy(model).double(), next_token_loss, [(tokens, tokens)], k=1, tol=1e-8
    )
    assert top["eig_1"] == pytest.approx(float(reference.eigenvalues[0]), rel=0.02)
    assert top["n_hvp"] <= 100 and top["rel_residual"] <= 1e-2 and top["converged"]
    assert critical["fraction"] > 0 and critical["n_forward"] >= 3 and critical["step_seconds"] > 0
    table = gpu_scale.render(
        {"env": {"device": "cpu", "torch": torch.__version__}, "command": "c", "date": "d", "rows": [row]}
    )
    assert f"{top['eig_1']:.4g}" in table and f"{critical['fraction']:.2f}×" in table


def test_a_model_whose_solver_vectors_fit_nowhere_is_reported_not_run(monkeypatch):
    monkeypatch.setattr(gpu_scale, "_free", lambda device: (1e6, 2e6))
    model = gpu_scale.build(gpu_scale.QUICK_SIZES["1B"], gpu_scale.QUICK_VOCAB, "cpu")
    row = gpu_scale.top_eigenpair(model, [], "cpu")
    n = sum(p.numel() for p in model.parameters())
    assert row["vector_gib"] == gpu_scale.solver_bytes(n, 2) / 2**30 == 4 * 4 * n / 2**30
    assert (
        row["error"].startswith("not run: even basis_size=2's float32 solver vectors need")
        and "n_hvp" not in row
    )


def test_a_small_basis_in_host_memory_runs_where_the_default_basis_fits_nowhere(monkeypatch):
    """The 7B row's configuration at the smoke-test size: basis_size=2 in host memory, the eigenvalue of the
    default basis all the same."""
    model = gpu_scale.build(gpu_scale.QUICK_SIZES["1B"], gpu_scale.QUICK_VOCAB, "cpu")
    n = sum(p.numel() for p in model.parameters())
    free = (gpu_scale.graph_reserve(n) + 2 * 4 * n, gpu_scale.solver_bytes(n, 2) + gpu_scale.HOST_MARGIN)
    monkeypatch.setattr(gpu_scale, "_free", lambda device: free)
    tokens = torch.randint(
        0, gpu_scale.QUICK_VOCAB, gpu_scale.QUICK_PROBE, generator=torch.Generator().manual_seed(1)
    )
    row = gpu_scale.top_eigenpair(model, [(tokens, tokens)], "cpu")
    assert row["basis_size"] == 2 and row["basis_device"] == "cpu" and row["converged"], row
    default = hessian_eigenpairs(
        model, next_token_loss, [(tokens, tokens)], k=1, tol=1e-2, dtype=torch.bfloat16
    )
    assert row["eig_1"] == pytest.approx(float(default.eigenvalues[0]), rel=2e-2)  # both to tol 1e-2
    table = gpu_scale.render(
        {
            "env": {"device": "cpu", "torch": "t"},
            "command": "c",
            "date": "d",
            "rows": [{"size": "7B", "params": n, "tokens": 32, "top1": row, "critical": {"error": "e"}}],
        }
    )
    assert "(host, basis_size=2)" in table


def test_the_solver_vectors_go_where_they_fit_at_1b_and_7b():
    """An H200 holds 1.07B parameters' 24 float32 vectors (96 GiB) beside the model; 6.57B's default basis
    (24 vectors, 588 GiB) fits neither the GPU nor a 128 GiB host, basis_size=2's 4 vectors (98 GiB) fit the
    host while the GPU holds the vector being multiplied and its product. Free memory as an H200 shows it
    once the bfloat16 model is loaded."""
    gib = 2**30
    for n, want in ((1_072_211_968, (None, "device")), (6_573_527_040, (2, "cpu"))):
        # README, "Memory": 20 + 1 basis, 1 eigenvector, 2 neighbours; basis_size=2: 3 basis vectors and 1
        assert gpu_scale.solver_bytes(n) == 24 * 4 * n and gpu_scale.solver_bytes(n, 2) == 4 * 4 * n
        assert gpu_scale.choose(n, 139 * gib - 2 * n, 120 * gib) == want
    assert gpu_scale.solver_bytes(6_573_527_040, 2) / gib == pytest.approx(97.96, abs=0.01)
    assert gpu_scale.choose(1_072_211_968, 80 * gib, 125 * gib) == (None, "cpu")  # an 80 GB GPU: the host
    assert gpu_scale.choose(6_573_527_040, 139 * gib, 60 * gib) == (None, None)  # a small host: nowhere
