"""The wall-time budget of a :class:`~pf_lightning.HessianEigenMonitor`'s measurements.

``max_time_fraction`` caps the time spent measuring as a fraction of the time spent on everything
else in the fit (training, validation, logging): with ``0.05`` a fit takes at most about 5% longer
than it would without the monitor. A measurement is charged its whole wall time (the eigenpairs, the
trace and density at their cadence, the listeners such as the edge-of-stability diagnostics, and a
failed attempt), and a due measurement is postponed while the time charged so far plus the expected
cost of this one (the last one's) would exceed the fraction of the rest. The window is one fit: a
resumed fit starts a fresh one, so the interrupted process's measuring time does not count against
the new process.
"""

from __future__ import annotations

import time

from ..linalg import EigenResult


class TimeBudget:
    """Measuring time against the rest of one fit's wall time.

    The cap itself is the monitor's ``max_time_fraction``, read at every decision.
    """

    def __init__(self) -> None:
        self.total = 0.0  # every fit's measuring time (kept in checkpoints)
        self._start: float | None = None
        self._spent = 0.0
        self._last: float | None = None

    def start_fit(self) -> None:
        self._start, self._spent, self._last = time.perf_counter(), 0.0, None

    def charge(self, seconds: float) -> None:
        self._spent += seconds
        self.total += seconds
        self._last = seconds

    def _rest(self, start: float) -> float:
        return time.perf_counter() - start - self._spent

    def over(self, fraction: float | None, latest: EigenResult | None) -> bool:
        """Whether one more measurement would take the measuring time past ``fraction`` of the rest of
        the fit's time; it is expected to last as long as the last one in this fit (before any:
        ``latest``'s solver time, e.g. from a checkpoint)."""
        if fraction is None or self._start is None:
            return False
        cost = self._last if self._last is not None else None if latest is None else latest.seconds
        if cost is None:
            return False
        return self._spent + cost > fraction * self._rest(self._start)

    def overhead(self) -> float:
        """This fit's measuring time over the rest of its wall time so far (the rest counted as at least
        1 ms, so the value after a fit-start measurement is large but finite)."""
        if self._start is None:
            return 0.0
        return self._spent / max(self._rest(self._start), 1e-3)
