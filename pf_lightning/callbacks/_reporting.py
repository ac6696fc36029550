"""What a :class:`~pf_lightning.HessianEigenMonitor` logs and keeps after a measurement, and W&B charts.

The eigenvalue metrics and the history entry of every measurement, and the trace and the spectral
density at their slower cadence (counted in measurements); a failed trace or density is skipped and
flagged like a failed measurement (``hessian/trace_skipped``, ``hessian/density_skipped``).
The functions take the monitor as their first argument. Also the W&B chart of an
:class:`~pf_lightning.EdgeOfStabilityMonitor`.
"""

from __future__ import annotations

from typing import Any

from ..curvature.params import measurement_dtype
from ..linalg import EigenResult
from ..logging import log_metrics, wandb_experiments, wandb_log
from ..measure import hessian_density, hessian_trace


def record(self: Any, trainer: Any, result: EigenResult) -> None:
    """Log a measurement's metrics at its step and append it to ``self.history``."""
    top = result.eigenvalues[: self.k]
    metrics = {self.metric(f"eig_{i + 1}"): float(v) for i, v in enumerate(top)}
    if self.which == "both":
        bottom = result.eigenvalues[self.k :].flip(0)
        metrics.update({self.metric(f"eig_bottom_{i + 1}"): float(v) for i, v in enumerate(bottom)})
        metrics[self.metric("eig_min")] = float(bottom[0])
    relative = result.relative_residuals
    metrics.update(
        {
            self.metric("residual_max"): float(relative.max()),
            self.metric("n_hvp"): float(result.n_hvp),
            self.metric("seconds"): result.seconds,
            self.metric("converged"): float(result.all_converged),
        }
    )
    if not result.all_converged:
        self._warn_once(
            "converged", f"some eigenpairs did not converge (tol={self.tol}); see hessian/converged"
        )
    log_metrics(trainer, metrics, trainer.global_step)
    self.history.append(
        {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "eigenvalues": result.eigenvalues.detach().cpu().tolist(),
            "residuals": result.residuals.detach().cpu().tolist(),
            "converged": result.converged.detach().cpu().tolist(),
            "n_hvp": result.n_hvp,
            "seconds": result.seconds,
            "hvp": result.info.get("hvp", ""),
        }
    )
    del self.history[: max(0, len(self.history) - self.max_history)]


def spectrum_extras(self: Any, trainer: Any, pl_module: Any) -> None:
    """Trace and density at their slower cadence (counted in measurements taken, not in the capped
    history)."""
    count = self._measured
    common = {
        "hvp": self.hvp_in_use,
        "seed": self.seed,
        "params": self.params,
        "dtype": measurement_dtype(pl_module, self.dtype),
    }
    metrics: dict[str, float] = {}
    if self.trace_every and count % self.trace_every == 1 % self.trace_every:
        try:
            estimate = hessian_trace(pl_module, self.loss_fn, self.probe, n_hvp=self.trace_hvp, **common)
        except Exception as err:
            self._skip(trainer, err, "trace skipped", "trace_skipped")
        else:
            metrics[self.metric("trace")] = estimate.trace
            metrics[self.metric("trace_std")] = estimate.std_error
            self.history[-1]["trace"] = estimate.trace
    if self.density_every and count % self.density_every == 1 % self.density_every:
        try:
            self.density = hessian_density(
                pl_module, self.loss_fn, self.probe, n_steps=self.density_steps, **common
            )
            log_density(self, trainer)
        except Exception as err:
            self._skip(trainer, err, "density skipped", "density_skipped")
    log_metrics(trainer, metrics, trainer.global_step)


def log_density(self: Any, trainer: Any) -> None:
    """With W&B, the density evaluated at bin centres, as a histogram over the spectral range."""
    if not wandb_experiments(trainer) or self.density is None:
        return
    import wandb

    edges = self.density.grid(n_points=121)
    values = self.density.density((edges[1:] + edges[:-1]) / 2)
    histogram = wandb.Histogram(np_histogram=(values.numpy(), edges.numpy()))
    wandb_log(trainer, {self.metric("density"): histogram}, trainer.global_step)


def eos_chart(trainer: Any, history: list[dict[str, Any]], step: int) -> None:
    """W&B, for an :class:`~pf_lightning.EdgeOfStabilityMonitor`: the top-k eigenvalues and the
    threshold over steps, as one line chart, and the spectra as a table."""
    if not wandb_experiments(trainer) or not history:
        return
    import wandb

    steps = [h["step"] for h in history]
    k = min(len(h["eigenvalues"]) for h in history)
    ys = [[h["eigenvalues"][i] for h in history] for i in range(k)] + [[h["eos/threshold"] for h in history]]
    keys = [f"eig_{i + 1}" for i in range(k)] + ["threshold"]
    chart = wandb.plot.line_series(
        xs=steps, ys=ys, keys=keys, title="Hessian eigenvalues vs stability threshold", xname="step"
    )
    rows = [
        [h["step"], i + 1, v, h["eos/threshold"]] for h in history for i, v in enumerate(h["eigenvalues"])
    ]
    spectra = wandb.Table(columns=["step", "index", "eigenvalue", "threshold"], data=rows)
    wandb_log(trainer, {"eos/spectrum_vs_threshold": chart, "hessian/spectra": spectra}, step)
