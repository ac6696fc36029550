"""What the callbacks do when a measurement fails at run time (DESIGN, principle 5).

A measurement that raises any ``Exception`` (a NaN or infinite loss or product, a probe batch the
model cannot consume, a loss function that returns no loss, a kernel without a second derivative, a
failure on another rank) is skipped: the measurement's context managers have already put the model
back as it was on the way out, the skip is flagged in the logs at that step (``hessian/skipped``,
``eos/skipped``, ``dal/skipped``: every attached logger and ``trainer.callback_metrics``), one warning
per kind of error (its type) names it, and training goes on. Under DDP a failure on one rank reaches
every rank as :class:`~pf_lightning.curvature.MeasurementAborted` at the same collective, so all ranks
skip together. A :class:`~pf_lightning.curvature.CollectiveFailure` (a peer that hung past the process
group's timeout or died) always propagates: the process group is unusable after it. A ``BaseException`` that is not an
``Exception`` (``KeyboardInterrupt``, ``SystemExit``) always propagates. ``on_error="raise"`` re-raises
the original exception instead, for tests and for users who prefer a crash to a gap in the curves.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ..curvature.distributed import CollectiveFailure
from ..logging import log_metrics, warn_once

__all__ = ["ON_ERROR", "OnError", "check_on_error", "skip_or_raise"]

OnError = Literal["skip", "raise"]
ON_ERROR = ("skip", "raise")


def check_on_error(on_error: Any) -> None:
    """Fail at construction on anything but ``"skip"`` or ``"raise"``."""
    if not isinstance(on_error, str) or on_error not in ON_ERROR:
        raise MisconfigurationException(
            f'`on_error` must be "skip" (a failed measurement is skipped, warned once and flagged, and '
            f'training goes on) or "raise" (it stops training), got {on_error!r}'
        )


def notify(
    listeners: list[Any],
    args: tuple,
    *,
    on_error: str,
    warned: set[str],
    trainer: Any,
    what: str,
    metric: str,
) -> None:
    """Call every listener with ``args``; one that raises is skipped or re-raised like a measurement, under
    ``on_error`` unless its owner (the callback whose bound method it is) has ``on_error="raise"``: that
    callback skips its own failures otherwise, so what reaches here must stop training."""
    for listener in listeners:
        try:
            listener(*args)
        except Exception as err:
            owner = getattr(listener, "__self__", None)
            name = getattr(listener, "__qualname__", type(listener).__name__)
            policy = "raise" if getattr(owner, "on_error", None) == "raise" else on_error
            skip_or_raise(
                err,
                on_error=policy,
                warned=warned,
                trainer=trainer,
                what=f"{what} {name} failed",
                metric=metric,
            )


def _notes(err: BaseException) -> str:
    """The notes an error collected on its way up (e.g. which probe batch raised), for its warning."""
    return "".join(f" {note}" for note in getattr(err, "__notes__", ()))


def skip_or_raise(
    err: Exception,
    *,
    on_error: str,
    warned: set[str],
    trainer: Any,
    what: str,
    metric: str | None,
) -> None:
    """Re-raise ``err`` (``on_error="raise"``), or warn once per error type and flag ``metric`` at this step.

    Call it from the ``except Exception`` block around a measurement; ``what`` says what was not
    measured ("Hessian measurement skipped"), ``metric`` is the flag logged as 1.0 at the step.
    """
    if on_error == "raise" or isinstance(err, CollectiveFailure):
        # A collective that failed (a peer hung past the timeout, or died) leaves the process group
        # unusable: skipping would leave this rank training while the others cannot. Fail the fit.
        raise err
    step = trainer.global_step
    later = f"; later failures of this kind are flagged as {metric}, not warned" if metric else ""
    warn_once(
        warned,
        f"{what}:{type(err).__name__}",
        f"{what} at step {step} ({type(err).__name__}: {err}{_notes(err)}); training goes on{later}",
    )
    if metric is not None:
        log_metrics(trainer, {metric: 1.0}, step)
