"""The wall-time budget of a :class:`~pf_lightning.HessianEigenMonitor`'s measurements.

``max_time_fraction`` caps one monitor's measuring time as a fraction of the time spent on
everything else in the fit (training, validation, logging, other callbacks). A measurement is charged
its whole wall time (the eigenpairs, the trace and density at their cadence, the listeners such as
the edge-of-stability diagnostics, and a failed attempt), and a due measurement is postponed while
the time charged so far plus the expected cost of this one (the last one's) would exceed the fraction
of the rest.

The window is one fit (a resumed fit, or a second ``fit`` with the same monitor, starts a fresh one),
and its first measurement is always taken: there is no cost to expect before it. So the cap holds
from the second measurement of a fit on, approximately (a measurement dearer than the last one, e.g.
one that also takes the trace, can overshoot it), and for each monitor on its own: several monitors
(``per_group``) each count the others' time as the rest of the fit.
"""

from __future__ import annotations

import time


class TimeBudget:
    """Measuring time against the rest of one fit's wall time.

    The cap itself is the monitor's ``max_time_fraction``, read at every decision.
    """

    def __init__(self) -> None:
        self.total = 0.0  # every fit's measuring time (kept in checkpoints)
        self._start: float | None = None
        self._spent = 0.0
        self._last: float | None = None  # the last measurement of this fit, None before the first
        self._count = 0  # measurements charged in this fit

    def start_fit(self) -> None:
        self._start, self._spent, self._last, self._count = time.perf_counter(), 0.0, None, 0

    def charge(self, seconds: float) -> None:
        self._spent += seconds
        self.total += seconds
        self._last = seconds
        self._count += 1

    def _rest(self, start: float) -> float:
        return time.perf_counter() - start - self._spent

    def over(self, fraction: float | None) -> bool:
        """Whether one more measurement, expected to last as long as the last one of this fit, would take
        the measuring time past ``fraction`` of the rest of the fit's time (never before the first)."""
        if fraction is None or self._start is None or self._last is None:
            return False
        return self._spent + self._last > fraction * self._rest(self._start)

    def overhead(self) -> float | None:
        """This fit's measuring time over the rest of its wall time so far; ``None`` until the fit has
        measured twice (after its first measurement the rest is the set-up's few milliseconds, and the
        ratio says nothing about the run)."""
        if self._start is None or self._count < 2:
            return None
        return self._spent / max(self._rest(self._start), 1e-9)
