"""Monitors per named parameter group (``HessianEigenMonitor.per_group``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from .._validation import Checks, is_tag, parameter_names
from ._probe import SharedProbe

check = Checks(MisconfigurationException)


def monitors_per_group(cls: type, groups: Mapping[str, str | Sequence[str]], kwargs: dict[str, Any]) -> list:
    """``cls(name=group, params=patterns, **kwargs)`` for every group, all sharing one probe set."""
    clash = {"name", "params"} & set(kwargs)
    if clash:
        raise MisconfigurationException(
            f"per_group sets `name` and `params` from the groups: do not pass {sorted(clash)}"
        )
    check.keywords(f"{cls.__name__}.per_group", kwargs, parameter_names(cls) - {"name", "params"})
    expected = (
        "a non-empty {name: patterns} mapping, e.g. parameter_groups(model) or {'attn': 'blocks.*.attn.*'}"
    )
    if not isinstance(groups, Mapping) or not groups:
        check.fail("groups", expected, groups)
    for name, patterns in groups.items():
        if not is_tag(name):
            hint = "each name must be a non-empty string without '/' or spaces: it names metrics hessian/<name>/..."
            check.fail("groups", expected, groups, hint)
        pattern_list = [patterns] if isinstance(patterns, str) else patterns
        if not (
            isinstance(pattern_list, list | tuple)
            and pattern_list
            and all(isinstance(p, str) and p for p in pattern_list)
        ):
            hint = f"group {name!r} must map to a glob pattern or a non-empty list of them"
            check.fail("groups", expected, groups, hint)
    shared = SharedProbe()
    monitors = []
    for name, patterns in groups.items():
        params = patterns if isinstance(patterns, str) else list(patterns)
        monitor = cls(name=name, params=params, **kwargs)
        monitor._shared_probe = shared
        monitors.append(monitor)
    return monitors
