"""The callbacks under Lightning's multi-process strategies on CPU (2 gloo processes).

Each rank trains on its own uneven slice of digits and measures on its own probe shard; the reference
is one process on the union of the recorded shards at the recorded weights (dense float64 Hessian).
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cases import Case, dense_hessian
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import digits
from lightning_workers import (
    MINI_BATCHES,
    SHARDS,
    STEPS,
    ShardedDigits,
    fit,
    fit_failing_projections,
    fit_fixed_order,
    fit_flaky_draw,
    fit_minibatch,
    fit_uneven_set_up,
    fit_with_time_budget,
)
from torch.utils.data import TensorDataset, default_collate
from workers import load

from pf_lightning import HessianEigenMonitor

SCRIPT = Path(__file__).resolve().parent / "lightning_script.py"
pytestmark = pytest.mark.timeout(300)


def mse(model, batch):
    x, y = batch
    out = model(x.to(torch.float64))
    return 0.5 * ((out - F.one_hot(y, 10).to(out.dtype)) ** 2).sum(dim=1).mean()


def reference_top(ranks: list[dict], k: int) -> torch.Tensor:
    """Top-k eigenvalues of one process on the union of the ranks' probe shards."""
    model = ShardedDigits()
    model.load_state_dict(ranks[0]["weights"])
    batches = [b for r in ranks for b in r["probe"]]
    H = dense_hessian(Case("digits", model.net, mse, batches))
    return torch.linalg.eigvalsh(H).flip(0)[:k]


def check_agreement(ranks: list[dict], rtol: float) -> None:
    r0, r1 = ranks
    assert sum(len(b[0]) for r in ranks for b in r["probe"]) == 34  # 24 + 10: the uneven shards
    assert torch.equal(r0["weights"]["net.0.weight"], r1["weights"]["net.0.weight"])
    assert torch.equal(r0["eigenvalues"], r1["eigenvalues"])  # identical on every rank
    assert torch.equal(r0["final_eigenvalues"], r1["final_eigenvalues"])
    want = reference_top(ranks, 3)
    err = float(((r0["eigenvalues"] - want) / want.abs()).abs().max())
    assert err < rtol, (r0["eigenvalues"], want)
    assert r0["global_step"] == STEPS and r0["measurements"] == 3  # fit start, steps 2 and 4
    # The sampling error of eig_1 over groups of both ranks' samples: one value on both ranks.
    assert not r0["stderr_skipped"] and r0["stderr"] is not None and r0["stderr"] > 0
    assert r0["stderr"] == r1["stderr"]
    # Batch sharpness (forced on: each rank's draws are its whole shard) and critical sharpness along the
    # optimizer's next update ran on both ranks and agree; neither was skipped.
    e0, e1 = r0["edge"], r1["edge"]
    for key in ("eos/batch_sharpness", "eos/batch_ratio", "eos/critical_sharpness", "eos/critical_ratio"):
        assert key in e0 and e0[key] == e1[key] and e0[key] > 0, key
    assert not any(k.endswith("skipped") for k in e0)
    # Each global draw is the union of the shards: the quotient of the full loss at the final weights.
    model = ShardedDigits()
    model.load_state_dict(r0["final_weights"])
    union = [b for r in ranks for b in r["probe"]]
    H = dense_hessian(Case("digits", model.net, mse, union))
    loss = sum(mse(model.net, b) * len(b[0]) for b in union) / 34
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, model.net.parameters())])
    assert e0["eos/batch_sharpness"] == pytest.approx(float(g @ H @ g / (g @ g)), rel=rtol)


@pytest.mark.slow
def test_ddp_spawn_matches_one_process_and_skips_nan_together(tmp_path):
    trainer = fit("ddp_spawn", str(tmp_path), nan_probe=True)
    ranks = load(tmp_path)
    check_agreement(ranks, rtol=1e-6)
    assert ranks[0]["hvp"] == "double_backward"
    # The NaN on rank 1's probe: every measurement of that monitor skipped on both ranks, training went
    # on, one warning (rank zero only), the flag logged.
    for r in ranks:
        assert r["skipped"] == (True, 0)
        assert r["skipped_metric"] == 1.0
    assert len(ranks[0]["warnings"]) == 1 and not ranks[1]["warnings"]
    assert float(trainer.callback_metrics["hessian/bad/skipped"]) == 1.0
    assert float(trainer.callback_metrics["hessian/n_hvp"]) > 0


@pytest.mark.slow
def test_ddp_spawn_batch_sharpness_is_one_value_over_both_ranks_draws(tmp_path):
    """Mini-batch DDP: both ranks log the same batch sharpness, and it is the mean over global mini-batches
    (rank 0's i-th draw with rank 1's i-th draw) of g^T H g / ||g||^2 from dense Hessians of their union."""
    from pf_lightning.callbacks._probe import TrainingBatches

    fit_minibatch("ddp_spawn", str(tmp_path))
    ranks = load(tmp_path)
    m0, m1 = ranks[0]["metrics"], ranks[1]["metrics"]
    assert m0["eos/batch_sharpness"] == m1["eos/batch_sharpness"]
    assert m0["eos/batch_sharpness_stderr"] == m1["eos/batch_sharpness_stderr"]
    n, step = int(m0["eos/batch_sharpness_batches"]), ranks[0]["step"]
    model = ShardedDigits()
    model.load_state_dict(ranks[0]["weights"])
    x, y = digits(SHARDS[-1][1])
    draws = []
    for rank, ((lo, hi), size) in enumerate(zip(SHARDS, MINI_BATCHES, strict=True)):
        source = TrainingBatches(TensorDataset(x[lo:hi], y[lo:hi]), default_collate, size)
        draws.append(list(source.draw(n, hash((0, step, rank)))))
    quotients = []
    for a, b in zip(*draws, strict=True):
        union = [a, b]
        H = dense_hessian(Case("global batch", model.net, mse, union))
        loss = sum(mse(model.net, batch) * len(batch[0]) for batch in union) / 13
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, model.net.parameters())])
        quotients.append(float(g @ H @ g / (g @ g)))
    assert m0["eos/batch_sharpness"] == pytest.approx(sum(quotients) / n, rel=1e-6)
    assert m0["eos/batch_ratio"] == pytest.approx(m0["eos/batch_sharpness"] * 0.05 / 2, rel=1e-9)
    # The loss a step descends is the mean of the ranks' batch losses: the non-monotonicity of those means,
    # the same on both ranks (each rank judged its own batches' losses).
    means = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    expected = [sum(b > a for a, b in itertools.pairwise(means[:s])) / (s - 1) for s in (2, 4)]
    assert ranks[0]["non_monotonicity"] == ranks[1]["non_monotonicity"]
    assert ranks[0]["non_monotonicity"] == [None, *expected], (ranks[0]["losses"], ranks[1]["losses"])


@pytest.mark.slow
def test_ddp_batch_sharpness_of_a_fixed_epoch_is_that_of_the_steps_trained(tmp_path):
    """limit_train_batches=2 on a DistributedSampler that does not shuffle: every epoch trains on the global
    batches {0..7} and {8..15} (rank 0 the even samples, rank 1 the odd). The batch sharpness is the mean of
    those two steps' quotients (it drew random regroupings of each rank's 8 samples, paired across ranks by
    chance)."""
    fit_fixed_order(str(tmp_path))
    ranks = load(tmp_path)
    m0, m1 = ranks[0]["metrics"], ranks[1]["metrics"]
    assert m0["eos/batch_sharpness"] == m1["eos/batch_sharpness"] and m0["eos/batch_sharpness_batches"] == 2
    model = ShardedDigits()
    model.load_state_dict(ranks[0]["weights"])
    x, y = digits(SHARDS[-1][1])
    quotients = []
    for step in range(2):
        union = [(x[8 * step + r : 8 * (step + 1) : 2], y[8 * step + r : 8 * (step + 1) : 2]) for r in (0, 1)]
        H = dense_hessian(Case("trained step", model.net, mse, union))
        loss = sum(mse(model.net, batch) for batch in union) / 2
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, model.net.parameters())])
        quotients.append(float(g @ H @ g / (g @ g)))
    assert m0["eos/batch_sharpness"] == pytest.approx(sum(quotients) / 2, rel=1e-6)


@pytest.mark.slow
def test_a_draw_that_fails_on_one_rank_skips_batch_sharpness_on_both_and_training_goes_on(tmp_path):
    fit_flaky_draw(str(tmp_path))
    ranks = load(tmp_path)
    for r in ranks:
        assert r["step"] == STEPS and "eos/batch_sharpness" not in r["metrics"]
        assert r["logged"]["eos/batch_sharpness_skipped"] == 1.0 and r["logged"]["hessian/eig_1"] > 0
    assert ranks[0]["logged"]["eos/ratio"] == ranks[1]["logged"]["eos/ratio"]


@pytest.mark.slow
def test_a_failure_of_the_gradient_s_projections_on_one_rank_skips_the_diagnostics_on_both(tmp_path):
    """Under DDP a failure of one rank's projections was held for a collective that never came: that rank
    judged the edge with every projection and the gradient norm 0, the other with its own. Both skip now."""
    fit_failing_projections(str(tmp_path))
    for r in load(tmp_path):
        assert r["steps"] == [] and r["logged"]["eos/skipped"] == 1.0


def test_ranks_that_train_on_batches_and_on_their_whole_shard_agree_to_measure_batch_sharpness(tmp_path):
    """Rank 0 trains on 2 batches of its 24 samples, rank 1 on its 10 at once: rank 0 alone turned batch
    sharpness on and gloo aborted at the fit-start measurement (an outside trial). Both ranks take it as
    mini-batch training; rank 1's shard is smaller than a mini-batch of 16, so neither measures it."""
    fit_uneven_set_up(str(tmp_path), "default")
    ranks = load(tmp_path)
    for r in ranks:
        assert r["step"] == STEPS and "eos/batch_sharpness" not in r["logged"]
    assert ranks[0]["logged"]["eos/ratio"] == ranks[1]["logged"]["eos/ratio"] > 0
    # The probes are the shards, 24 and 10 samples: measured as their sample-weighted mean, which DDP does
    # not descend where the batches differ in size; said once, on rank zero (an outside trial found no word).
    said = [m for m in torch.load(tmp_path / "warnings0.pt") if "different numbers of samples" in m]
    assert len(said) == 1 and "(rank 0: 24, rank 1: 10)" in said[0]
    assert not [m for m in torch.load(tmp_path / "warnings1.pt") if "different numbers of samples" in m]


def test_the_few_groups_warning_counts_the_groups_of_the_rank_with_the_fewest(tmp_path):
    """Whole probe batches are eig_1_stderr's groups, and the measurement takes as many as the rank with the
    fewest has (two here): the set-up warning counted rank 0's three (two degrees of freedom for one)."""
    fit_uneven_set_up(str(tmp_path), "stderr")
    said = [m for m in torch.load(tmp_path / "warnings0.pt") if "eig_1_stderr" in m]
    assert len(said) == 1 and "probe holds 2 on the rank with the fewest: 1 degree(s) of freedom" in said[0]
    assert not [m for m in torch.load(tmp_path / "warnings1.pt") if "eig_1_stderr" in m]  # rank zero warns


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("required", "batch_sharpness=True needs mini-batches .* on rank 1, a mini-batch of 16 samples"),
        (
            "epochs",
            r"every_n_epochs=1, but the ranks' epochs differ in length \(rank 0: 2 batches, rank 1: 1",
        ),
        ("probe", r"could not be set up on rank 1 .*`probe` holds no batch \(EmptyOnRankOne of none\)"),
    ],
)
def test_a_set_up_that_fails_on_one_rank_fails_on_every_rank(tmp_path, case, match):
    """A rank raising alone left the others in the fit's first collectives: gloo's 'collective mismatch', or
    a hang until the process group's timeout (outside trial). Every rank raises, naming the failing one."""
    with pytest.raises(Exception):  # noqa: B017 - the launcher re-raises a rank's exception in its own type
        fit_uneven_set_up(str(tmp_path), case)
    for rank in range(2):
        failure = torch.load(tmp_path / f"failure{rank}.pt", weights_only=False)
        assert failure["error"] == "MisconfigurationException", failure
        assert re.search(match, failure["message"]), failure["message"]


def test_ranks_postpone_together_under_a_time_budget(tmp_path):
    """Rank 1's clock says measuring is cheap, rank 0's that it is dear: a rank measuring alone would
    wait at the collective forever. Both follow the stricter rank (closed form in test_time_budget.py:
    a step of 1 s and a measurement of 4 s under a cap of 0.5 measure at 0, 16, then every 8 steps)."""
    fit_with_time_budget(str(tmp_path))
    ranks = load(tmp_path)
    assert ranks[0]["steps"] == ranks[1]["steps"] == [0, 16, 24, 32, 40]
    expected = [s for s in range(1, 40) if s not in (16, 24, 32)]
    assert ranks[0]["postponed"] == ranks[1]["postponed"] == expected


def _run_script(kind: str, out: Path) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), kind, str(out)], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load(out)


@pytest.mark.slow
def test_ddp_script_matches_one_process(tmp_path):
    ranks = _run_script("ddp", tmp_path)
    check_agreement(ranks, rtol=1e-6)


@pytest.mark.slow
def test_fsdp2_model_parallel_strategy_matches_one_process(tmp_path):
    ranks = _run_script("fsdp", tmp_path)
    assert ranks[0]["hvp"] == "finite_difference"
    assert ranks[0]["n_local"] + ranks[1]["n_local"] == sum(v.numel() for v in ranks[0]["weights"].values())
    # Central differences in float64 (see test_torch_distributed): 1e-6 relative.
    check_agreement(ranks, rtol=1e-6)


@pytest.mark.slow
def test_fsdp2_measures_after_a_validation_loop(tmp_path):
    """A validation loop (forward passes without backward) leaves the FSDP2 root's parameters gathered; the
    fit-end measurement right after it measures (on_error="raise") and agrees with one process."""
    ranks = _run_script("fsdp_validation", tmp_path)
    assert ranks[0]["measured"] == ranks[1]["measured"] == [2]
    assert torch.equal(ranks[0]["eigenvalues"], ranks[1]["eigenvalues"])
    want = reference_top(ranks, 1)
    assert float(((ranks[0]["eigenvalues"] - want) / want).abs().max()) < 1e-6


class _Trainer:
    def __init__(self, strategy):
        self.strategy, self.global_step, self.callbacks = strategy, 0, []


def test_unsupported_strategies_fail_at_setup_naming_the_supported_choice():
    monitor = HessianEigenMonitor()
    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy"):
        monitor.setup(_Trainer(FSDPStrategy()), None, "fit")
    deepspeed = type("DeepSpeedStrategy", (), {})()
    with pytest.raises(MisconfigurationException, match="fully_shard"):
        monitor.setup(_Trainer(deepspeed), None, "fit")
    from lightning.pytorch.strategies import ModelParallelStrategy

    with pytest.raises(MisconfigurationException, match="finite_difference"):
        HessianEigenMonitor(hvp="double_backward").setup(_Trainer(ModelParallelStrategy()), None, "fit")
    HessianEigenMonitor(hvp="auto").setup(_Trainer(ModelParallelStrategy()), None, "fit")
