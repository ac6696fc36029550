"""The budgets of a :class:`~pf_lightning.HessianEigenMonitor`'s measurements: work and wall time.

Both cap what measuring costs as a fraction of the rest of one fit, and both postpone a due measurement
while the cost charged so far plus the expected cost of this one (the last one's) would exceed that
fraction of the rest. They differ in the unit:

- ``max_work_fraction`` counts work in sample-gradients (:class:`~pf_lightning.curvature.WorkMeter`:
  every Hessian-vector product, gradient and forward pass of the measurement, its trace, density and
  listeners such as the edge-of-stability diagnostics, times its probe samples) against the samples the
  fit has trained on. The counts do not depend on the machine's speed or load, so the measured and
  postponed steps are the same in every run on one machine (the solver's product counts read rounding,
  which another thread count or machine can change).
- ``max_time_fraction`` counts wall time against the time spent on everything else in the fit
  (training, validation, logging, other callbacks), a failed attempt included. It follows the machine's
  real costs and its noise: the measured steps differ from run to run.

The work budget's window is the run: a fit continued on the same Trainer goes on with it, and so does a
fit resumed from a checkpoint (the window is in it), so a resumed run measures the steps of the
uninterrupted one where the checkpoint also holds the warm start (a cold start costs other products: FSDP2's
sharded vectors, ``checkpoint_eigenvectors=False``), and a continued one too, but for the fit-end
measurement its first fit took, which the window charges. The work of measuring and training is counted only while the cap is set, so a run
resumed with a cap it did not have starts with an empty window. The time budget's window is one fit
(wall time does not carry over between processes).
A window's first measurement is always taken: there is no cost to expect before it. So the cap holds
from the second measurement on, approximately (a measurement dearer than the last one, e.g. one that
also takes the trace, can overshoot it), and for each monitor on its own: several monitors
(``per_group``) each count the others' time as the rest of the fit (the work budget's rest is training
alone).
"""

from __future__ import annotations

import time


class Budget:
    """A measuring cost against the rest of its window (a fit, or the run), in the unit of a subclass (its
    :meth:`rest`).

    The cap itself is the monitor's fraction, read at every decision.
    """

    def __init__(self) -> None:
        self.total = 0.0  # the run's measuring cost, all its fits (the time budget's is kept in checkpoints)
        self._open = False
        self._spent = 0.0
        self._last: float | None = None  # the window's last measurement, None before the first
        self._count = 0  # measurements charged in the window

    def start_fit(self) -> None:
        self._open, self._spent, self._last, self._count = True, 0.0, None, 0

    def charge(self, cost: float) -> None:
        self._spent += cost
        self.total += cost
        self._last = cost
        self._count += 1

    def rest(self) -> float:  # pragma: no cover - interface
        """The window's cost apart from measuring so far, in the budget's unit."""
        raise NotImplementedError

    def over(self, fraction: float | None) -> bool:
        """Whether one more measurement, expected to cost as much as the window's last one, would take the
        measuring cost past ``fraction`` of the rest of the window (never before the first)."""
        if fraction is None or not self._open or self._last is None:
            return False
        return self._spent + self._last > fraction * self.rest()

    def overhead(self, measured: int = 2) -> float | None:
        """The window's measuring cost over the rest of it so far; ``None`` until the window has measured
        ``measured`` times, or while the rest is nothing. Right after its first measurement the rest is
        the set-up's, and the ratio says nothing about the run; at a postponed step ``measured=1`` gives
        the ratio so far, which one more measurement like the last would take past the cap."""
        rest = self.rest() if self._open and self._count >= measured else 0.0
        return self._spent / rest if rest > 0 else None


class TimeBudget(Budget):
    """Measuring seconds against the rest of the fit's wall time."""

    def __init__(self) -> None:
        super().__init__()
        self._start = 0.0

    def start_fit(self) -> None:
        super().start_fit()
        self._start = time.perf_counter()

    def rest(self) -> float:
        return time.perf_counter() - self._start - self._spent


class WorkBudget(Budget):
    """Measuring work against the work of training, both in sample-gradients: training spends one per
    sample of every micro-batch (:meth:`trained`)."""

    def __init__(self) -> None:
        super().__init__()
        self._trained = 0.0

    def start_fit(self) -> None:
        if not self._open:  # a new run; a continued or resumed one goes on with its window
            super().start_fit()
            self._trained = 0.0

    def state(self) -> dict[str, float | int | None] | None:
        """The run's window, for a checkpoint (None before the run has started)."""
        if not self._open:
            return None
        return {"spent": self._spent, "last": self._last, "count": self._count, "trained": self._trained}

    def restore(self, state: dict[str, float | int | None] | None) -> None:
        """Go on with the window :meth:`state` gave (None: a fresh one at the next :meth:`start_fit`)."""
        self._open = state is not None
        if state is not None:
            self._spent, self._last, self._count = state["spent"], state["last"], state["count"]
            self._trained = state["trained"]

    def trained(self, samples: int) -> None:
        self._trained += samples

    def rest(self) -> float:
        return self._trained
