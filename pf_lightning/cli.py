"""The ``pf-lightning`` command.

``pf-lightning report <run dir>`` writes PNG plots of a run's logged metrics (a CSVLogger's
``metrics.csv`` or an offline W&B run; see :mod:`pf_lightning.report`). Every other subcommand goes to
Lightning's ``LightningCLI``: ``pf-lightning fit --config configs/eos_digits.yaml`` trains the model and
data module named by ``class_path`` in the YAML file (any importable ``LightningModule``, such as the
examples' :mod:`pf_lightning.demos`), with the callbacks listed under ``trainer.callbacks``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["cli_main", "main", "report_main"]

_USAGE = """\
pf-lightning: Hessian eigenpairs and edge-of-stability diagnostics for Lightning runs.

  pf-lightning fit --config configs/eos_digits.yaml     train (LightningCLI: fit, validate, test, predict)
  pf-lightning report <run dir> [--out DIR]            PNG plots from metrics.csv or an offline W&B run
  pf-lightning report --help                           options of the report command

LightningCLI's own help follows.
"""


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """``LightningCLI`` with any ``LightningModule`` and ``LightningDataModule`` given by ``class_path``.

    Args:
        args: command-line arguments (default ``sys.argv[1:]``).
        run: run the subcommand; ``False`` only parses and instantiates (then pass no subcommand).

    Returns:
        The ``LightningCLI`` instance (its ``trainer``, ``model`` and ``datamodule`` are set).
    """
    try:
        import jsonargparse  # noqa: F401
    except ModuleNotFoundError as err:  # an extra: the core install has no LightningCLI
        raise ModuleNotFoundError(
            "pf-lightning fit (LightningCLI) needs jsonargparse, which is not installed: "
            "pip install 'pf-lightning[cli]'",
            name="jsonargparse",
        ) from err
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        # A re-run into the same log folder replaces its config.yaml instead of failing.
        save_config_kwargs={"overwrite": True},
        args=None if args is None else list(args),
        run=run,
    )


def report_main(args: Sequence[str] | None = None) -> int:
    """``pf-lightning report``: parse ``args``, write the plots, return the exit status."""
    try:
        from .report import write_report
    except ModuleNotFoundError as err:  # matplotlib, an extra
        print(f"pf-lightning report: {err}", file=sys.stderr)
        return 1

    parser = argparse.ArgumentParser(
        prog="pf-lightning report",
        description="PNG plots of logged pf-lightning metrics: sharpness against the threshold, the "
        "Hessian spectrum over time, principal-flow regimes, the learning rate and the loss.",
    )
    parser.add_argument(
        "run_dir", help="a run folder, a parent of several runs, or a metrics.csv / run-*.wandb file"
    )
    parser.add_argument("--out", default=None, help="output folder (default: <run dir>/plots)")
    parser.add_argument(
        "--source",
        choices=("auto", "csv", "wandb"),
        default="auto",
        help="which logs to read (default: both CSV and offline W&B)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--html",
        action="store_true",
        help="also write report.html: all plots, settings and measurements on one page",
    )
    options = parser.parse_args(args)
    try:
        written = write_report(
            options.run_dir,
            options.out,
            source=options.source,
            progress=False if options.no_progress else None,
            html=options.html,
        )
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:  # wandb, for W&B runs, is an extra
        print(f"pf-lightning report: {err}", file=sys.stderr)
        return 1
    return 0 if written else 1


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``pf-lightning`` console script: ``report`` here, the rest to LightningCLI.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "report":
        raise SystemExit(report_main(args[1:]))
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
    cli_main(None if argv is None else args)  # None: LightningCLI reads sys.argv itself, without a warning


if __name__ == "__main__":
    main()
