"""Named parameter groups: the blocks of a large model whose spectra are worth tracking separately."""

from __future__ import annotations

from torch import nn

from .._validation import Checks

__all__ = ["parameter_groups"]

_check = Checks()


def parameter_groups(model: nn.Module, depth: int = 1) -> dict[str, list[str]]:
    """One group per module prefix of ``depth`` dotted name components that holds trainable parameters.

    ``depth=1`` gives the top-level children (``"embed"``, ``"blocks"``, ``"head"``); ``depth=2`` one group
    per block of a ``ModuleList`` (``"blocks.0"``, ``"blocks.1"``, ...). Each group is the glob pattern list
    that :class:`~pf_lightning.curvature.ParameterSpace` and the monitors' ``params=`` take; a parameter
    whose name is shorter than ``depth`` components forms a group of its own.

    Args:
        model: the module (a ``torch.compile``d one is grouped by its original module's names, which
            Lightning and :func:`~pf_lightning.hessian_eigenpairs` measure).
        depth: how many leading name components make a group, at least 1.

    Returns:
        ``{group name: [patterns]}`` in the order of ``model.named_parameters()``.

    Raises:
        ValueError: ``depth < 1``, or no trainable parameter.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> parameter_groups(model)
        {'0': ['0.*'], '2': ['2.*']}
        >>> parameter_groups(model, depth=2)
        {'0.weight': ['0.weight'], '0.bias': ['0.bias'], '2.weight': ['2.weight'], '2.bias': ['2.bias']}
    """
    _check.instance("model", model, nn.Module, "a torch.nn.Module")
    depth = _check.integer("depth", depth, 1, hint="1 groups by top-level child, 2 by their children")
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the names the measurement sees
    groups: dict[str, list[str]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        parts = name.split(".")
        if len(parts) <= depth:
            groups[name] = [name]
        else:
            prefix = ".".join(parts[:depth])
            groups.setdefault(prefix, [f"{prefix}.*"])
    if not groups:
        raise ValueError(
            "the `model` has no trainable parameters to group: it must have some (requires_grad=True)"
        )
    return groups
