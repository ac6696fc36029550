"""``hessian_eigenpairs`` under plain ``torch.distributed`` (2 gloo processes, no Lightning).

References: the dense float64 Hessian of the mean loss over the union of both ranks' probe shards
(``tests/cases.py``, ``torch.func``), and single-process results on that union.
"""

from __future__ import annotations

import pytest
import torch
import torch_workers
from cases import dense_hessian
from workers import global_case, model_copy, shard, spawn

from pf_lightning import ProbeSet
from pf_lightning.curvature import HessianOperator
from pf_lightning.curvature.drift import gradient_curvature
from pf_lightning.measure import batch_sharpness, critical_sharpness, hessian_trace, split_samples

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank measured, replicated (DDP) and sharded (FSDP2): one launch for both tests."""
    return spawn(torch_workers.both, tmp_path_factory.mktemp("ranks"))


def reference_eigenvalues() -> torch.Tensor:
    return torch.linalg.eigvalsh(dense_hessian(global_case())).flip(0)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want) / want.abs()).abs().max())


def big_and_small(calls: list[tuple[str, int]], n: int) -> tuple[list[int], list[int]]:
    big = [numel for name, numel in calls if name == "all_reduce" and numel >= n]
    small = [numel for name, numel in calls if not (name == "all_reduce" and numel >= n)]
    return big, small


def union_stderr(vector: torch.Tensor) -> float:
    """The sampling error of ``vector``'s quotient over the union groups, from dense float64 Hessians:
    each rank's shard split into 3 groups (rank 0's 12 + 7 samples give 4, dealt round-robin into 3;
    rank 1's 5 give 3), group c the union of the ranks' groups c."""
    import copy

    case = global_case()
    per_rank = [split_samples(ProbeSet(shard(case, rank)), 3) for rank in (0, 1)]
    assert [len(g) for g in per_rank] == [4, 3]
    dealt = [
        [*per_rank[0][0].batches, *per_rank[0][3].batches],
        per_rank[0][1].batches,
        per_rank[0][2].batches,
    ]
    q, w = [], []
    for c in range(3):
        group = copy.copy(case)
        group.batches = [*dealt[c], *per_rank[1][c].batches]
        H = dense_hessian(group)
        q.append(float(vector @ H @ vector / (vector @ vector)))
        w.append(sum(x.shape[0] for x, _ in group.batches))
    q, w = torch.tensor(q, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)
    mean = (w * q).sum() / w.sum()
    return float(((w**2 * (q - mean) ** 2).sum() / w.sum() ** 2 * 3 / 2).sqrt())


def test_ddp_matches_one_process_on_the_union_with_one_collective_per_product(ranks):
    evals = reference_eigenvalues()
    r0, r1 = (r["ddp"] for r in ranks)
    n = r0["n"]
    for key in ("lanczos64", "lobpcg64", "fd64", "lanczos32"):  # identical on every rank, bit for bit
        assert torch.equal(r0[key]["eigenvalues"], r1[key]["eigenvalues"]), key
        assert torch.equal(r0[key]["eigenvectors"], r1[key]["eigenvectors"]), key
        assert r0[key]["n_hvp"] == r1[key]["n_hvp"] and r0[key]["calls"] == r1[key]["calls"], key
    assert relative_error(r0["lanczos64"]["eigenvalues"], evals[:3]) < 1e-8
    assert relative_error(r0["lobpcg64"]["eigenvalues"], torch.cat([evals[:2], evals[-2:]])) < 1e-6
    assert relative_error(r0["fd64"]["eigenvalues"], evals[:2]) < 1e-6
    assert relative_error(r0["lanczos32"]["eigenvalues"], evals[:3]) < 1e-3
    assert relative_error(r0["wrapped"], evals[:1]) < 1e-8
    assert r0["unchanged"] and r1["unchanged"]

    # One flat all-reduce of n * b entries per application, plus two tiny ones per measurement
    # (total sample weight and batch counts on entry; the 'auto' backend agreement, one flag: a rank's
    # failure travels as NaN in the same buffer). Failures cost one more collective, on their path only.
    for key in ("lanczos64", "lanczos32"):
        big, small = big_and_small(r0[key]["calls"], n)
        assert big == [n] * r0[key]["n_hvp"], key
        assert small == [3, 1], key
    big, small = big_and_small(r0["lobpcg64"]["calls"], n)
    assert sum(big) == n * r0["lobpcg64"]["n_hvp"] and all(b % n == 0 for b in big)
    assert len(big) < r0["lobpcg64"]["n_hvp"]  # one collective per block, not per vector
    big, small = big_and_small(r0["fd64"]["calls"], n)
    assert big == [n] * r0["fd64"]["n_hvp"] and small == [3]  # no backend trial to agree on

    # Hutchinson on the union: the same probes as one process, so the same estimate.
    case = global_case()
    single = hessian_trace(
        model_copy(case, torch.float64), case.loss_fn, case.batches, method="hutchinson", n_hvp=6, seed=3
    )
    assert abs(r0["trace"] - single.trace) <= 1e-10 * abs(single.trace)
    assert r0["trace"] == r1["trace"]

    # The sampling error over groups of both ranks' samples: one value, the dense one.
    assert r0["stderr"] == r1["stderr"] > 0
    assert r0["stderr"] == pytest.approx(union_stderr(r0["lanczos64"]["eigenvectors"][:, 0]), rel=1e-8)

    # A NaN on rank 1 only: both ranks raise the same error (no hang), and the next measurement agrees.
    assert r1["nan"] == "NonFiniteLossError" and r0["nan"] == "NonFiniteLossError"
    assert torch.equal(r0["after_nan"], r1["after_nan"])
    assert relative_error(r0["after_nan"], evals[:1]) < 1e-8

    # Batch sharpness: the ranks' first batches are one global mini-batch (the union, sample-weighted).
    model = model_copy(case, torch.float64)
    union = [torch.cat([a, b]) for a, b in zip(case.batches[0], case.batches[2], strict=True)]
    assert r0["batch_sharpness"] == r1["batch_sharpness"]
    assert r0["batch_sharpness"] == pytest.approx(
        batch_sharpness(model, case.loss_fn, [union]).value, rel=1e-9
    )
    # Critical sharpness of the mean loss over the union of the shards, identical on both ranks.
    single = critical_sharpness(model, case.loss_fn, case.batches, rel_tol=1e-4).value
    assert r0["critical"] == r1["critical"] == pytest.approx(single, rel=1e-3)


def test_fsdp2_matches_one_process_within_the_finite_difference_bound(ranks):
    case = global_case()
    H = dense_hessian(case)
    evals, evecs = torch.linalg.eigh(H)
    evals, evecs = evals.flip(0), evecs.flip(1)
    r0, r1 = (r["fsdp"] for r in ranks)
    assert r0["global_n"] == r1["global_n"] == case.n
    assert r0["n"] + r1["n"] == case.n and r0["n"] < case.n  # each rank holds a slice
    assert sorted(torch.cat([r0["rows"], r1["rows"]]).tolist()) == list(range(case.n))
    assert torch.equal(r0["auto"]["eigenvalues"], r1["auto"]["eigenvalues"])
    assert r0["auto"]["hvp"] == "finite_difference"
    # Central differences in float64: truncation O(h^2) with h = eps^(1/3) max(1, |theta|) ~ 6e-6 |theta|
    # relative, rounding O(eps / h) ~ 4e-11: 1e-6 relative leaves a wide margin over the ~1e-9 seen.
    assert relative_error(r0["auto"]["eigenvalues"], evals[:3]) < 1e-6
    # The ranks' slices of each eigenvector assemble into the reference eigenvector (up to sign).
    for i in range(3):
        v = torch.zeros(case.n, dtype=torch.float64)
        v[r0["rows"]] = r0["auto"]["eigenvectors"][:, i]
        v[r1["rows"]] = r1["auto"]["eigenvectors"][:, i]
        assert abs(float(v @ evecs[:, i])) > 1 - 1e-6
    assert r0["unchanged"] and r1["unchanged"]
    # Products go through FSDP's reduce-scatter; our own collectives are small (norms, flags, Gram).
    assert all(numel < case.n for name, numel in r0["auto"]["calls"] if name == "all_reduce")
    single = hessian_trace(
        model_copy(case, torch.float64), case.loss_fn, case.batches, method="hutchinson", n_hvp=6, seed=3
    )
    assert abs(r0["trace"] - single.trace) <= 1e-6 * abs(single.trace)
    v = torch.zeros(case.n, dtype=torch.float64)
    v[r0["rows"]], v[r1["rows"]] = r0["auto"]["eigenvectors"][:, 0], r1["auto"]["eigenvectors"][:, 0]
    assert r0["stderr"] == r1["stderr"] > 0
    assert r0["stderr"] == pytest.approx(union_stderr(v), rel=1e-5)
    assert "finite_difference" in r0["exact_backend"]
    assert r1["nan"] == "NonFiniteLossError" and r0["nan"] == "NonFiniteLossError"
    assert relative_error(r0["after_nan"], evals[:1]) < 1e-6
    # Critical sharpness on the shards (forward passes and one sharded gradient): the one-process value.
    reference = critical_sharpness(model_copy(case, torch.float64), case.loss_fn, case.batches, rel_tol=1e-4)
    assert r0["critical"] == r1["critical"] == pytest.approx(reference.value, rel=1e-3)
    assert r0["critical_root"] == r1["critical_root"] == pytest.approx(reference.value, rel=1e-3)
    assert r0["critical_unchanged"] and r1["critical_unchanged"]
    # DAL's ||Hg||/||g|| by a forward difference (LRAdaptation's default) on the shards: it added a flat
    # piece to a DTensor and failed at every step (DAL held its rate through the whole fit).
    with HessianOperator(model_copy(case, torch.float64), case.loss_fn, case.batches) as op:
        drift = gradient_curvature(op, "forward_difference").hg_ratio
    assert r0["drift"] == r1["drift"] == pytest.approx(drift, rel=1e-9)
    assert r0["drift_unchanged"] and r1["drift_unchanged"]


def test_the_edge_monitor_s_loss_window_is_averaged_over_ranks_only_where_they_agree(tmp_path):
    """Three ranks. The same steps: each loss the mean of the three ranks'. Different counts (0, 2, 1): each
    rank keeps its own; a check of their sum (3 = 3 x rank 2's 1) let rank 2 take a third of a sum of other
    ranks' steps as its loss (11.67)."""
    windows = spawn(torch_workers.loss_windows, tmp_path, [(2, 2, 2), (0, 2, 1)], world=3)
    assert [w[0] for w in windows] == [[10.0, 11.0]] * 3
    assert [w[1] for w in windows] == [[], [10.0, 11.0], [20.0]]
