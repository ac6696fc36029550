"""Faults inside a distributed measurement (2 gloo processes on the CPU): no rank raises alone, none hangs.

A rank that raises makes every rank raise at the same collective (``MeasurementAborted``, or the rank's
own error when all raised alike); the callbacks then skip that measurement on every rank and training
goes on, bit for bit as without the failure. A rank that dies or hangs makes the others raise
``CollectiveFailure``: at once when its process is gone, at the process group's timeout when it hangs.
"""

from __future__ import annotations

import time

import fault_workers
import pytest
import torch
from cases import dense_hessian
from workers import global_case

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank of one plain gloo launch saw (process-group timeout 60 s, deadline 150 s)."""
    return fault_workers.launch(fault_workers.faults, tmp_path_factory.mktemp("faults"), 60, 150)


def test_a_rank_raising_inside_a_measurement_stops_it_on_every_rank(ranks):
    r0, r1 = ranks[0], ranks[1]
    n = global_case().n
    exchange = ("all_reduce", 2 * 1024)  # the failure path's one extra collective: a byte row per rank

    # Rank 1's forward raises a shape error in its 3rd product: both ranks raise MeasurementAborted naming
    # rank 1 and its error, after the same collectives (entry, 3 products, the exchange); only rank 1
    # chains the original.
    for r in (r0, r1):
        third = r["third_product"]
        assert third["type"] == "MeasurementAborted" and third["rank"] == 1
        assert third["error_type"] == "RuntimeError" and "cannot be multiplied" in third["error_message"]
        assert third["calls"] == [("all_reduce", 3), *[("all_reduce", n)] * 3, exchange]
    assert r1["third_product"]["loss_calls"] == 3
    assert r1["third_product"]["cause"] == "RuntimeError" and r0["third_product"]["cause"] is None
    assert r0["unchanged"] and r1["unchanged"] and r0["unchanged_after_all"] and r1["unchanged_after_all"]

    # Every rank raised KeyError at its 2nd product: each raises its own, as one process would.
    for r in (r0, r1):
        assert r["all_ranks"]["type"] == "KeyError"
        assert r["all_ranks"]["calls"] == [("all_reduce", 3), *[("all_reduce", n)] * 2, exchange]

    # The loss fails in hvp="auto"'s double-backward trial: aborted, not a fallback to finite differences.
    for r in (r0, r1):
        trial = r["auto_trial"]
        assert (trial["type"], trial["rank"], trial["error_type"]) == ("MeasurementAborted", 1, "KeyError")
        assert trial["calls"] == [("all_reduce", 3), ("all_reduce", 1), exchange]

    # Rank 1's own inputs fail before any product: reported by the first collective, on entry.
    for key, message in (
        ("empty_shard", "probe set is empty"),
        ("preconditioner", "positive, finite entries"),
    ):
        for r in (r0, r1):
            got = r[key]
            assert (got["type"], got["rank"], got["error_type"]) == ("MeasurementAborted", 1, "ValueError")
            assert message in got["error_message"]
            assert got["calls"] == [("all_reduce", 3), exchange]

    # The gradient of the EoS proxies and the drift measurement: the gradient's collective reports it.
    for r in (r0, r1):
        assert (r["gradient"]["type"], r["gradient"]["rank"]) == ("MeasurementAborted", 1)
        assert r["gradient"]["calls"] == [("all_reduce", 3), ("all_reduce", n), exchange]

    # Six failed measurements later the ranks are still in step: the next one agrees bit for bit and
    # with the dense Hessian of one process on the union of the shards.
    want = torch.linalg.eigvalsh(dense_hessian(global_case())).flip(0)[:3]
    assert torch.equal(r0["after"], r1["after"])
    assert float(((r0["after"] - want) / want).abs().max()) < 1e-8


def test_a_rank_that_dies_in_a_measurement_fails_the_others_at_once(ranks):
    assert "dying" not in ranks[1]  # killed in its 3rd product
    r0 = ranks[0]["dying"]
    assert r0["type"] == "CollectiveFailure"
    assert "Connection" in r0["message"]  # gloo's own error, chained: reset or closed by peer
    assert r0["seconds"] < 10, r0["seconds"]  # gloo sees the connection close: no wait for the timeout
    assert r0["calls"] == [("all_reduce", 3), *[("all_reduce", global_case().n)] * 3]  # in the 3rd product


def _records(out) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def clean_then_hanging(tmp_path_factory):
    """One ddp_spawn fit with a 10 s process-group timeout: clean up to step 4 (the reference run
    without a failure), then rank 1 sleeps 120 s in its probe loss during the step-6 measurement."""
    out = tmp_path_factory.mktemp("hanging")
    start = time.monotonic()
    with pytest.raises(Exception) as raised:
        fault_workers.fit(
            str(out), fault_workers.ProbeLoss(step=6, how="sleep", seconds=120), 6, timeout_s=10
        )
    failure = torch.load(out / "failure0.pt", weights_only=False)
    return {
        "ranks": _records(out),
        "failure": failure,
        "raised": raised.value,
        "seconds": time.monotonic() - start,
    }


@pytest.mark.slow
def test_ddp_spawn_skips_a_failed_measurement_on_every_rank_and_trains_on(tmp_path, clean_then_hanging):
    fault_workers.fit(str(tmp_path), fault_workers.ProbeLoss(step=2))  # rank 1 raises at step 2
    failing, clean = _records(tmp_path), clean_then_hanging["ranks"]
    for r, c in zip(failing, clean, strict=True):  # recorded at step 4: training went on
        assert r["steps"] == [0, 4] and c["steps"] == [0, 2, 4]  # step 2 skipped, on both ranks
        assert r["skipped"] == {1: None, 2: 1.0, 3: 1.0, 4: 1.0}  # flagged at step 2 (then held)
        assert c["skipped"] == {1: None, 2: None, 3: None, 4: None}
        for name, value in r["weights"].items():  # bit for bit as without the failure
            assert torch.equal(value, c["weights"][name]), name
    assert failing[0]["eigenvalues"] == failing[1]["eigenvalues"]  # later measurements agree
    # Step 4 is warm-started from step 0 instead of step 2: the same eigenvalues to the tolerance.
    got, want = torch.tensor(failing[0]["eigenvalues"][-1]), torch.tensor(clean[0]["eigenvalues"][-1])
    assert float(((got - want) / want).abs().max()) < 1e-5


@pytest.mark.slow
def test_a_rank_hanging_in_a_measurement_fails_the_fit_at_the_process_group_timeout(clean_then_hanging):
    # Rank 0 raised CollectiveFailure from the step-6 all-reduce that rank 1 never joined, 10 s after the
    # measurement began; the launcher then stopped rank 1 (asleep for 120 s) and the fit failed.
    failure = clean_then_hanging["failure"]
    assert failure["error"] == "CollectiveFailure" and "Timed out waiting 10000ms" in failure["message"]
    assert 9.5 < failure["seconds"] < 25, failure["seconds"]
    assert "CollectiveFailure" in str(clean_then_hanging["raised"])
    assert clean_then_hanging["seconds"] < 100  # not the 120 s of the sleeping rank
