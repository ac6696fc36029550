"""Monitors per named parameter group (``HessianEigenMonitor.per_group``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ._probe import SharedProbe


def monitors_per_group(cls: type, groups: Mapping[str, str | Sequence[str]], kwargs: dict[str, Any]) -> list:
    """``cls(name=group, params=patterns, **kwargs)`` for every group, all sharing one probe set."""
    clash = {"name", "params"} & set(kwargs)
    if clash:
        raise MisconfigurationException(
            f"per_group sets `name` and `params` from the groups: do not pass {sorted(clash)}"
        )
    if not isinstance(groups, Mapping) or not groups:
        raise MisconfigurationException("`groups` must be a non-empty {name: patterns} mapping")
    shared = SharedProbe()
    monitors = []
    for name, patterns in groups.items():
        if not isinstance(name, str) or not name:
            raise MisconfigurationException(f"group names must be non-empty strings, got {name!r}")
        params = patterns if isinstance(patterns, str) else list(patterns)
        monitor = cls(name=name, params=params, **kwargs)
        monitor._shared_probe = shared
        monitors.append(monitor)
    return monitors
