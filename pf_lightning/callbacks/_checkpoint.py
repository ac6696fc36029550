"""What the callbacks keep in a checkpoint, how it comes back, and what they do with a bad one.

The latest eigenvectors (``n x k`` floats) warm-start the first measurement after a resume. They are
left out when asked (``checkpoint_eigenvectors=False``: large models, small checkpoints) and always
when they are FSDP2 shards: the callback state is saved from rank 0 only, so a resumed run would
hand rank 0's slice to every rank, whose slices differ (and may differ in size). Without vectors the
first measurement after a resume starts cold.

A state is checked before any of it is used: a callback handed a state it did not write (missing
keys, wrong types, tensors of the wrong shape, NaN, another callback's state) raises
:class:`UnreadableState` here, and the callback then starts fresh with one warning instead of failing
later, deep in a solver or a chart.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .. import logging as names
from ..linalg import EigenResult
from ..linalg._common import WHICH
from ..measure import WARM_INFO


class UnreadableState(ValueError):
    """A checkpoint's callback state that this version did not write, or that was corrupted."""


def cached_state_key(callback: Any, **identity: Any) -> str:
    """``callback``'s Lightning state key for ``identity``, built once: Lightning reads ``state_key`` at
    every hook call (it names the profiler's sections), a dozen times per training step."""
    cached = callback.__dict__.get("_state_key")
    if cached is None or cached[0] != identity:
        cached = callback.__dict__["_state_key"] = (identity, callback._generate_state_key(**identity))
    return cached[1]


def warn_other_settings(callback: Any, trainer: Any, checkpoint: Mapping[str, Any], same: str) -> None:
    """Say why ``callback`` resumes without its state where the checkpoint holds one of its class and of its
    ``same`` (the name a HessianEigenMonitor takes, the monitor an EdgeOfStabilityMonitor reads) under other
    settings (the rest of its state key: ``k``, ``which``) that no callback of this fit takes: it starts
    afresh, and measures the step it resumes at again. Lightning's own warning names only the key it found
    no callback for."""
    saved = checkpoint.get("callbacks") or {}
    key = callback.state_key
    if key in saved:
        return
    prefix = type(callback).__qualname__
    mine = callback.__dict__["_state_key"][0].get(same)  # the identity cached_state_key built the key from
    taken = {getattr(c, "state_key", None) for c in trainer.callbacks}
    others = []
    for other in saved:
        if not isinstance(other, str) or not other.startswith(prefix + "{") or other in taken:
            continue
        try:
            identity = ast.literal_eval(other[len(prefix) :])
        except (ValueError, SyntaxError):
            continue
        if isinstance(identity, dict) and identity.get(same) == mine:
            others.append(other)
    if others:
        rank_zero_warn(
            f"{type(callback).__name__}: the checkpoint holds its state under other settings ({'; '.join(others)}), "
            f"not under this one's ({key}): it starts afresh (empty history, no warm start), training itself is "
            "restored as usual",
            category=RuntimeWarning,
        )


def starts_a_run(trainer: Any) -> bool:
    """Whether a fit set up on ``trainer`` starts a new run: its steps begin at 0 (a new Trainer) instead of
    going on from the ``global_step`` an earlier fit on the same Trainer reached.

    A new run starts what the callbacks accumulate afresh (history, warm start, loss window, edge, warnings):
    callbacks reused with another Trainer would otherwise judge one run's steps with another's (a first edge
    step, a sharpening slope, a warning already given). A checkpoint the run resumes from brings their state
    back afterwards (Lightning restores callback state after setup). A fit continued on the same Trainer
    continues them: its fit-start measurement is the previous fit's end one, not taken twice.
    """
    return trainer.global_step == 0


def result_state(result: EigenResult | None, with_vectors: bool) -> dict[str, Any] | None:
    """The result as plain CPU tensors; ``eigenvectors`` empty unless kept and not sharded."""
    if result is None:
        return None
    keep = with_vectors and not result.info.get("sharded", False)
    vectors = result.eigenvectors.detach().cpu() if keep else torch.empty(0, result.k)
    neighbours = result.neighbours.detach().cpu() if keep and result.neighbours is not None else None
    return {
        "neighbours": neighbours,
        "warm": {key: result.info[key] for key in WARM_INFO if key in result.info},
        "eigenvalues": result.eigenvalues.detach().cpu(),
        "eigenvectors": vectors,
        "residuals": result.residuals.detach().cpu(),
        "converged": result.converged.detach().cpu(),
        "n_hvp": result.n_hvp,
        "seconds": result.seconds,
        "tol": result.tol,
        "which": result.which,
        "method": result.method,
    }


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UnreadableState(message)


def _finite_tensor(value: Any, name: str, ndim: int) -> torch.Tensor:
    _check(isinstance(value, torch.Tensor), f"{name} is a {type(value).__name__}, not a Tensor")
    _check(value.ndim == ndim and value.is_floating_point(), f"{name} has shape {tuple(value.shape)}")
    _check(bool(torch.isfinite(value).all()), f"{name} holds NaN or infinity")
    return value


def count(value: Any, name: str, minimum: int = 0) -> int:
    """An int ``>= minimum`` (a bool is not a count)."""
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name} is {value!r}, not an int >= {minimum}",
    )
    return int(value)


def finite(value: Any, name: str) -> float:
    """A finite real number."""
    _check(
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
        f"{name} is {value!r}, not a finite number",
    )
    return float(value)


def real(value: Any, name: str) -> float:
    """A real number, NaN allowed (a value not measured yet)."""
    _check(
        isinstance(value, int | float) and not isinstance(value, bool), f"{name} is {value!r}, not a number"
    )
    return float(value)


def mapping(state: Any, keys: Sequence[str], owner: str) -> Mapping[str, Any]:
    """``state`` as a mapping that holds ``keys``."""
    _check(isinstance(state, Mapping), f"the state is a {type(state).__name__}, not a dict")
    missing = [key for key in keys if key not in state]
    _check(not missing, f"keys {missing} are missing (not a {owner} state)")
    return state


def result_from_state(state: Any) -> EigenResult | None:
    """The :class:`EigenResult` that :func:`result_state` saved, checked entry by entry."""
    if state is None:
        return None
    keys = (
        "eigenvalues",
        "eigenvectors",
        "residuals",
        "converged",
        "n_hvp",
        "seconds",
        "tol",
        "which",
        "method",
    )
    state = mapping(state, keys, "EigenResult")
    eigenvalues = _finite_tensor(state["eigenvalues"], "latest eigenvalues", 1)
    k = eigenvalues.numel()
    _check(k >= 1, "latest holds no eigenvalue")
    vectors = state["eigenvectors"]
    _check(
        isinstance(vectors, torch.Tensor) and vectors.ndim == 2 and vectors.shape[1] == k,
        f"latest eigenvectors are not an (n, {k}) matrix",
    )
    if vectors.numel():
        _finite_tensor(vectors, "latest eigenvectors", 2)
    residuals = _finite_tensor(state["residuals"], "latest residuals", 1)
    converged = state["converged"]
    _check(
        isinstance(converged, torch.Tensor) and residuals.shape == converged.shape == (k,),
        f"latest residuals and converged flags are not of length {k}",
    )
    _check(state["which"] in WHICH, f"latest which is {state['which']!r}")
    _check(isinstance(state["method"], str), "latest method is not a string")
    tol = finite(state["tol"], "latest tol")
    # Saved since the block warm starts: the next warm start's choice and guards (absent in older states).
    neighbours = state.get("neighbours")
    if neighbours is not None:
        _finite_tensor(neighbours, "latest neighbours", 2)
        _check(
            vectors.numel() > 0 and neighbours.shape[0] == vectors.shape[0], "latest neighbours do not match"
        )
    warm = state.get("warm", {})
    costs = warm.get("warm_costs", {}) if isinstance(warm, Mapping) else None
    _check(
        isinstance(warm, Mapping)
        and set(warm) <= set(WARM_INFO)
        and isinstance(costs, Mapping)
        and all(key in ("block", "lanczos") for key in costs)
        and all(count(v, "a warm-start cost", 1) for v in costs.values())
        and warm.get("warm_method", "block") in ("block", "lanczos")
        and all(count(warm.get(key, 1), key, 1) for key in ("warm_streak", "warm_retry")),
        f"latest warm-start record is {warm!r}",
    )
    return EigenResult(
        neighbours=neighbours,
        info=dict(warm),
        eigenvalues=eigenvalues,
        eigenvectors=vectors,
        residuals=residuals,
        converged=converged.bool(),
        n_hvp=count(state["n_hvp"], "latest n_hvp"),
        seconds=max(0.0, finite(state["seconds"], "latest seconds")),
        tol=tol,
        which=state["which"],
        method=state["method"],
    )


def history_from_state(history: Any, numbers: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A list of measurement records: each a dict with an int ``step``, finite ``eigenvalues`` and the
    finite ``numbers`` named. (Steps may go back: a callback used for a second fit keeps its history.)"""
    _check(isinstance(history, list | tuple), f"the history is a {type(history).__name__}, not a list")
    entries = []
    for i, entry in enumerate(history):
        _check(isinstance(entry, Mapping), f"history entry {i} is not a dict")
        count(entry.get("step"), f"history entry {i}'s step")
        eigenvalues = entry.get("eigenvalues")
        _check(
            isinstance(eigenvalues, list | tuple) and len(eigenvalues) > 0,
            f"history entry {i} holds no eigenvalues",
        )
        for value in eigenvalues:
            finite(value, f"an eigenvalue of history entry {i}")
        for name in numbers:
            finite(entry.get(name), f"history entry {i}'s {name}")
        entries.append(dict(entry))
    return entries


def warn_fresh_start(owner: str, err: Exception) -> None:
    """The one warning of a callback that starts fresh instead of using an unreadable state."""
    rank_zero_warn(
        f"{owner}: the checkpoint's callback state cannot be used ({err}); this callback starts fresh "
        "(empty history, no warm start), training itself is restored as usual",
        category=RuntimeWarning,
    )


def monitor_from_state(
    state: Any,
) -> tuple[list[dict[str, Any]], EigenResult | None, tuple[int, int], float, int, dict[str, Any] | None]:
    """A :class:`~pf_lightning.HessianEigenMonitor` state: history, latest result, the last steps measured
    and postponed, seconds, measurements taken (the history is capped, so it cannot tell the trace and
    density cadence), and the work budget's window (None: none yet, or a state saved before it was kept)."""
    state = mapping(state, ("history", "latest", "last_step"), "HessianEigenMonitor")
    history = history_from_state(state["history"])
    latest = result_from_state(state["latest"])
    last_step = count(state["last_step"], "last_step", minimum=-1)
    postponed_step = count(state.get("postponed_step", -1), "postponed_step", minimum=-1)
    seconds = max(0.0, finite(state.get("measure_seconds", 0.0), "measure_seconds"))
    measured = count(state.get("measured", len(history)), "measured")
    work = state.get("work")
    if work is not None:
        work = mapping(work, ("spent", "last", "count", "trained"), "the work budget")
        last = work["last"]
        work = {
            "spent": max(0.0, finite(work["spent"], "work spent")),
            "last": None if last is None else max(0.0, finite(last, "work last")),
            "count": count(work["count"], "work count"),
            "trained": max(0.0, finite(work["trained"], "work trained")),
        }
    return history, latest, (last_step, postponed_step), seconds, measured, work


def eos_from_state(
    state: Any,
) -> tuple[
    list[dict[str, Any]],
    list[float],
    int | None,
    float,
    int | None,
    bool,
    EigenResult | None,
    dict[str, float],
]:
    """An :class:`~pf_lightning.EdgeOfStabilityMonitor` state: history, loss window, first edge step,
    accumulated negative curvature, the judged optimizer's steps since the last measurement (None where
    absent: states saved before it was kept), whether the last ratio was above the warning level, the
    latest preconditioned measurement (its warm start; absent from states saved before it was kept), and
    the W&B summary's extremes so far (empty where absent: rebuilt from the history)."""
    keys = ("history", "losses", "first_edge_step", "negative_curvature", "above")
    state = mapping(state, keys, "EdgeOfStabilityMonitor")
    history = history_from_state(state["history"], (names.SHARPNESS, names.THRESHOLD, names.RATIO))
    _check(isinstance(state["losses"], list | tuple), "the loss window is not a list")
    for value in state["losses"]:  # a diverging run records NaN losses: any number is a loss
        _check(isinstance(value, int | float) and not isinstance(value, bool), f"a loss is {value!r}")
    edge = state["first_edge_step"]
    edge = None if edge is None else count(edge, "first_edge_step")
    curvature = finite(state["negative_curvature"], "negative_curvature")
    interval = state.get("interval_steps")
    interval = None if interval is None else count(interval, "interval_steps")
    _check(isinstance(state["above"], bool), f"above is {state['above']!r}, not a bool")
    preconditioned = result_from_state(state.get("preconditioned_latest"))
    losses = [float(x) for x in state["losses"]]
    extremes = state.get("extremes", {})
    _check(isinstance(extremes, Mapping), f"the summary's extremes are {extremes!r}, not a mapping")
    extremes = {str(key): finite(value, f"extremes[{key!r}]") for key, value in extremes.items()}
    return history, losses, edge, curvature, interval, state["above"], preconditioned, extremes
