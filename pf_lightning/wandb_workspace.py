"""A W&B workspace with the panels a pf-lightning run needs: ``pf-lightning workspace``.

The panels are built offline from the metric names of :mod:`pf_lightning.logging` (the tests check
every one of them against the names a real fit logs); saving the workspace needs a W&B account and
network::

    pf-lightning workspace --entity ENTITY --project PROJECT      # prints the workspace's URL

Sections: the edge of stability (sharpness with its threshold, batch and critical sharpness each with its
own, the top-k eigenvalues, the ratios), principal flow (hλᵢ, unstable and oscillating
directions), and the measurements (residuals, products, seconds). Smoothing is off (measurements are
sparse) and the x-axis is ``trainer/global_step``. Needs the ``wandb-workspaces`` package:
``pip install 'pf-lightning[wandb]'``.
"""

from __future__ import annotations

from typing import Any

from . import logging as names

__all__ = ["X_AXIS", "build_workspace"]

X_AXIS = "trainer/global_step"


def build_workspace(entity: str, project: str, k: int = 5, name: str = "pf-lightning") -> Any:
    """The workspace (a ``wandb_workspaces.workspaces.Workspace``, not saved) for ``k`` tracked
    eigenvalues; ``.save()`` creates it in ``entity/project``."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the W&B workspace needs wandb-workspaces, which is not installed: pip install 'pf-lightning[wandb]'",
            name=err.name,
        ) from err
    if k < 1:
        raise ValueError(f"k must be a positive number of eigenvalues, got {k}")

    def line(title: str, metrics: list[str], log_y: bool | None = None) -> Any:
        return wr.LinePlot(title=title, x=X_AXIS, y=metrics, log_y=log_y, smoothing_type="none")

    eigenvalues = [names.eigenvalue(i) for i in range(1, k + 1)]
    edge = [line(title, list(metrics)) for title, metrics in names.EDGE_CHARTS.items()]
    # No threshold with them: a project's runs may train under Adam, whose threshold is that of P^-1 H.
    edge.insert(1, line(names.TOP_K_ONLY_CHART, eigenvalues))
    flow = [
        line(
            "hλᵢ = 2λᵢ / threshold (ηλᵢ under GD)", [names.direction("hlambda", i) for i in range(1, k + 1)]
        ),
        line("directions", [names.UNSTABLE_DIRECTIONS, names.OSCILLATING_DIRECTIONS]),
    ]
    quality = [
        line("largest relative residual", [names.RESIDUAL_MAX], log_y=True),
        line("Hessian-vector products", [names.N_HVP]),
        line("seconds per measurement", [names.SECONDS]),
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[
            ws.Section(name="edge of stability", panels=edge, is_open=True),
            ws.Section(name="principal flow", panels=flow, is_open=True),
            ws.Section(name="measurements", panels=quality),
        ],
        settings=ws.WorkspaceSettings(x_axis=X_AXIS, smoothing_type="none"),
    )
