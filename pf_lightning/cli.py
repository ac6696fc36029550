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
from pathlib import Path
from typing import Any

__all__ = ["cli_main", "main", "report_main", "workspace_main"]

_USAGE = """\
pf-lightning: Hessian eigenpairs and edge-of-stability diagnostics for Lightning runs.

  pf-lightning fit --config configs/eos_digits.yaml     train (LightningCLI: fit, validate, test, predict)
  pf-lightning report <run dir> [--out DIR]            PNG plots from metrics.csv or an offline W&B run
  pf-lightning report --help                           options of the report command
  pf-lightning workspace --entity E --project P        create the W&B workspace (online; wandb-workspaces)
"""
_LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


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

    class _CLI(LightningCLI):
        """LightningCLI whose classes that refuse their configured arguments end the command with their
        message (as a parse error does) instead of the instantiation's chained traceback."""

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except Exception as err:  # a class that refused its arguments, wrapped by jsonargparse
                refused = _refused_arguments(err)
                if refused is None:
                    raise
                print(f"pf-lightning: error: {refused}", file=sys.stderr)
                raise SystemExit(2) from err

    return _CLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        # A re-run into the same log folder replaces its config.yaml instead of failing.
        save_config_kwargs={"overwrite": True},
        args=None if args is None else list(args),
        run=run,
    )


def _refused_arguments(err: BaseException) -> str | None:
    """``"<Class>(...): <message>"`` when the innermost exception under ``err`` is a constructor refusing
    its configured arguments: a ``ValueError``, ``TypeError`` or ``MisconfigurationException`` raised by
    some class's ``__init__`` itself, or by pf-lightning's argument checks it called (which name the
    argument and the fix). None otherwise (an error deeper down, a bug, keeps its traceback)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: set[int] = set()
    while id(err) not in seen:  # down the chain jsonargparse builds while it tries each type it allows
        seen.add(id(err))
        inner = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None:
            break
        err = inner
    if not isinstance(err, (ValueError, TypeError, MisconfigurationException)):
        return None
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    constructor = next(
        (f for f in frames if f.f_code.co_name == "__init__" and "self" in f.f_locals), None
    )  # the outermost constructor the error left: the class configured
    if constructor is None:
        return None
    raised_in = frames[-1]
    own = raised_in is constructor  # the constructor's own refusal
    package = Path(__file__).resolve().parent
    checked = not isinstance(err, TypeError) and Path(raised_in.f_code.co_filename).resolve().is_relative_to(
        package
    )  # pf-lightning's argument checks, called by the constructor
    if not (own or checked):
        return None
    return f"{type(constructor.f_locals['self']).__qualname__}(...): {err}"


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
    except (OSError, ValueError, ModuleNotFoundError) as err:  # a path; wandb, for W&B runs, is an extra
        print(f"pf-lightning report: {err}", file=sys.stderr)
        return 1
    return 0 if written else 1


def workspace_main(args: Sequence[str] | None = None) -> int:
    """``pf-lightning workspace``: create the W&B workspace of :mod:`pf_lightning.wandb_workspace`."""
    parser = argparse.ArgumentParser(
        prog="pf-lightning workspace",
        description="Create a W&B workspace with the pf-lightning panels in a project (needs a W&B login).",
    )
    parser.add_argument("--entity", required=True, help="the W&B entity (user or team)")
    parser.add_argument("--project", required=True, help="the W&B project the runs log to")
    parser.add_argument("--k", type=int, default=5, help="tracked eigenvalues to chart (default 5)")
    parser.add_argument("--name", default="pf-lightning", help="the workspace's name")
    options = parser.parse_args(args)
    try:
        from .wandb_workspace import build_workspace

        workspace = build_workspace(options.entity, options.project, options.k, options.name)
    except (ImportError, ValueError) as err:  # not installed, or versions that do not fit together
        print(f"pf-lightning workspace: {err}", file=sys.stderr)
        return 1
    try:
        workspace.save()
    except Exception as err:  # no login, no network, no such entity or project
        print(
            f"pf-lightning workspace: W&B did not save it ({err}); log in with `wandb login`", file=sys.stderr
        )
        return 1
    print(f"pf-lightning workspace: saved {workspace.url}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``pf-lightning`` console script: ``report`` here, the rest to LightningCLI.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "report":
        raise SystemExit(report_main(args[1:]))
    if args and args[0] == "workspace":
        raise SystemExit(workspace_main(args[1:]))
    if not args:  # no command: the usage, as an error (LightningCLI would only say a subcommand is missing)
        print(_USAGE, file=sys.stderr)
        raise SystemExit(2)
    if args[0] in ("-h", "--help"):
        print(_USAGE + "\nLightningCLI's own help follows.\n")
    elif not args[0].startswith("-") and args[0] not in _LIGHTNING_SUBCOMMANDS:
        print(
            f"pf-lightning: unknown command {args[0]!r}: choose from "
            f"{', '.join((*_LIGHTNING_SUBCOMMANDS, 'report', 'workspace'))} (pf-lightning --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    cli_main(None if argv is None else args)  # None: LightningCLI reads sys.argv itself, without a warning


if __name__ == "__main__":
    main()
