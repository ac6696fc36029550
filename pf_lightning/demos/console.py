"""Console output for the examples: one table row per Hessian measurement, and an end-of-run summary."""

from __future__ import annotations

import math
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from .._validation import Checks
from ..callbacks import EdgeOfStabilityMonitor, HessianEigenMonitor
from ..stability import judged_edge

__all__ = ["MeasurementTable", "edge_summary"]


REACHED = 0.95
"""The ratio counted as at the edge in the examples' output: the table's rows and :func:`edge_summary`
(``eos/first_edge_step`` is the first step at or above 1)."""


def _regime(ratio: float) -> str:
    if ratio < REACHED:
        return "below the edge"
    return "at the edge" if ratio <= 1.1 else "above the edge"


class MeasurementTable(Callback):
    """Print one row per measurement: step, loss, top eigenvalues, sharpness, threshold and their ratio.

    The last three are those the edge is judged on (:func:`~pf_lightning.stability.judged_edge`): the
    full-batch sharpness, or under mini-batch training the batch sharpness where its ratio is the larger
    (the row then says so).

    Reads the histories of the trainer's :class:`~pf_lightning.HessianEigenMonitor` (named ones get a
    row of their own) and :class:`~pf_lightning.EdgeOfStabilityMonitor`; prints on rank zero only.

    Args:
        k: eigenvalues shown per row.
        prefix: printed before every line (e.g. the run's learning rate).
    """

    def __init__(self, k: int = 3, prefix: str = "") -> None:
        super().__init__()
        self.k, self.prefix = Checks(MisconfigurationException).integer("k", k, 1), str(prefix)
        self._printed: dict[int, int] = {}
        self._header = False
        self._start = 0

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._printed, self._header, self._start = {}, False, trainer.global_step
        self._flush(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._flush(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        eos = next((cb for cb in trainer.callbacks if isinstance(cb, EdgeOfStabilityMonitor)), None)
        for monitor in (cb for cb in trainer.callbacks if isinstance(cb, HessianEigenMonitor)):
            done = self._printed.get(id(monitor), 0)
            for entry in monitor.history[done:]:
                self._row(trainer, monitor, entry, eos)
            self._printed[id(monitor)] = len(monitor.history)

    def _row(
        self,
        trainer: Trainer,
        monitor: HessianEigenMonitor,
        entry: dict[str, Any],
        eos: EdgeOfStabilityMonitor | None,
    ) -> None:
        # The monitor's top k at most (a which="both" entry holds its bottom ones after them); a column the
        # monitor does not measure is shown empty, so the others stay under their headers.
        top = entry["eigenvalues"][: min(self.k, monitor.k)]
        eigs = " ".join([f"{v:9.4g}" for v in top] + [f"{'-':>9}"] * (self.k - len(top)))
        cost = f"{entry['n_hvp']:4d} {entry['seconds']:5.2f}"
        if monitor.name is not None:
            print(
                f"{self.prefix}{entry['step']:6d} {'[' + monitor.name + ']':>9}  {eigs}  {cost}", flush=True
            )
            return
        if not self._header:
            self._header = True
            eig_names = " ".join(f"{'eig_' + str(i + 1):>9}" for i in range(self.k))
            print(
                f"{self.prefix}{'step':>6} {'loss':>9}  {eig_names}  {'HVPs':>4} {'sec':>5}  "
                f"{'sharpness':>9} {'threshold':>9} {'ratio':>6}  regime",
                flush=True,
            )
        loss = (  # the latest loss: none for a measurement a resumed fit restored, from before its start
            None
            if entry["step"] < self._start
            else eos.losses[-1]
            if eos is not None and eos.losses
            else trainer.callback_metrics.get("train_loss")
        )
        loss_text = f"{float(loss):9.4g}" if loss is not None else f"{'-':>9}"
        line = f"{self.prefix}{entry['step']:6d} {loss_text}  {eigs}  {cost}"
        measured = [h for h in (eos.history if eos else []) if h["step"] == entry["step"]]
        if measured:
            edge = judged_edge(measured[-1])
            line += f"  {edge.value:9.4g} {edge.threshold:9.4g} {edge.ratio:6.3f}  {_regime(edge.ratio)}"
            if edge.quantity != "sharpness":
                line += f" ({edge.quantity})"
        print(line, flush=True)


def edge_summary(eos: EdgeOfStabilityMonitor, reached: float = REACHED) -> dict[str, float]:
    """What the run did at the edge: the first step with ``ratio >= reached`` and the ratio after it.

    The ratio is the one the edge is judged on (:func:`~pf_lightning.stability.judged_edge`): ``eos/ratio``,
    or under mini-batch training ``eos/batch_ratio`` where it is the larger.

    Args:
        eos: the monitor, after ``fit``.
        reached: the ratio counted as having reached the edge.

    Returns:
        ``first_step`` (nan if never reached), ``initial_ratio``, ``final_ratio``, and over the
        measurements from the first one at the edge on: ``ratio_min``, ``ratio_mean``, ``ratio_max``,
        ``measurements``.
    """
    ratios = [(h["step"], judged_edge(h).ratio) for h in eos.history]
    out = {
        "first_step": math.nan,
        "initial_ratio": ratios[0][1] if ratios else math.nan,
        "final_ratio": ratios[-1][1] if ratios else math.nan,
        "measurements": 0.0,
    }
    start = next((i for i, (_, r) in enumerate(ratios) if r >= reached), None)
    if start is not None:
        after = [r for _, r in ratios[start:]]
        out.update(
            first_step=float(ratios[start][0]),
            ratio_min=min(after),
            ratio_mean=sum(after) / len(after),
            ratio_max=max(after),
            measurements=float(len(after)),
        )
    return out
