"""Argument checks shared by every public constructor and function: one wording, one place.

Every check raises its owner's error type (``ValueError`` in the library's lower layers, Lightning's
``MisconfigurationException`` in the callbacks) with a message that names the argument in backticks
and says what it must be: "`tol` must be a number in (0, 1), got nan (float)". A ``bool`` is never
accepted as a number (Python counts ``True`` as the int 1, but ``k=True`` is a mistake), and a
number is finite unless a check says otherwise. This module imports nothing from the package, so
every layer may use it.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import torch

__all__ = ["MEASURE_DTYPES", "SEED_MAX", "Checks"]

MEASURE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
"""The dtypes a measurement can run in (``dtype=`` of the monitors and of the functions)."""

SEED_MAX = 2**32 - 1
"""Largest seed accepted (the range of ``numpy`` and ``lightning.seed_everything``); a measurement
derives per-batch seeds from it, which stay within ``torch.manual_seed``'s 64-bit range."""


def show(value: Any) -> str:
    """``value``'s repr (shortened) and its type, for "got ..." in a message."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the configuration error
        text = object.__repr__(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_tag(value: Any) -> bool:
    """A non-empty string that can be one component of a metric name (no '/', no whitespace)."""
    return (
        isinstance(value, str)
        and bool(value)
        and "/" not in value
        and value.isprintable()
        and not any(c.isspace() for c in value)
    )


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Checks:
    """Argument checks that raise ``error``; one instance per layer (see the module docstring).

    Each method returns the value normalized (an ``int``, a ``float``, a ``torch.device``) or raises.
    """

    def __init__(self, error: type[Exception] = ValueError) -> None:
        self.error = error

    def fail(self, name: str, expected: str, value: Any, hint: str = "") -> None:
        raise self.error(f"`{name}` must be {expected}, got {show(value)}{f': {hint}' if hint else ''}")

    def integer(
        self,
        name: str,
        value: Any,
        minimum: int | None = None,
        maximum: int | None = None,
        *,
        allow_none: bool = False,
        hint: str = "",
    ) -> int | None:
        if value is None and allow_none:
            return None
        if (
            not is_int(value)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            bounds = [f">= {minimum}"] if minimum is not None else []
            bounds += [f"<= {maximum}"] if maximum is not None else []
            expected = "an int" + (f" {' and '.join(bounds)}" if bounds else "")
            self.fail(name, expected + (" or None" if allow_none else ""), value, hint)
        return int(value)

    def seed(self, name: str, value: Any) -> int:
        return self.integer(name, value, 0, SEED_MAX)

    def number(
        self,
        name: str,
        value: Any,
        *,
        above: float | None = None,
        at_least: float | None = None,
        below: float | None = None,
        allow_none: bool = False,
        hint: str = "",
    ) -> float | None:
        """A finite real number with the given bounds (``above``/``below`` exclusive, ``at_least`` inclusive)."""
        if value is None and allow_none:
            return None
        ok = is_number(value) and math.isfinite(value)
        ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
        ok = ok and (below is None or value < below)
        if not ok:
            if above is not None and below is not None:
                expected = f"a number in ({above:g}, {below:g})"
            else:
                bounds = [f"> {above:g}"] if above is not None else []
                bounds += [f">= {at_least:g}"] if at_least is not None else []
                bounds += [f"< {below:g}"] if below is not None else []
                expected = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
            self.fail(name, expected + (" or None" if allow_none else ""), value, hint)
        return float(value)

    def flag(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(name, "True or False", value)
        return value

    def choice(self, name: str, value: Any, choices: Collection[str]) -> str:
        if not (isinstance(value, str) and value in choices):
            hint = ""
            if isinstance(value, str):
                close = difflib.get_close_matches(value, list(choices), n=1)
                hint = f"did you mean {close[0]!r}?" if close else ""
            self.fail(name, "one of " + ", ".join(repr(c) for c in choices), value, hint)
        return value

    def function(self, name: str, value: Any, call: str, n_args: int, *, allow_none: bool = True) -> Any:
        """``None`` (when allowed) or a callable that takes ``n_args`` positional arguments."""
        if value is None and allow_none:
            return None
        expected = f"callable as {call}" + (" or None" if allow_none else "")
        if not callable(value):
            self.fail(name, expected, value)
        try:
            signature = inspect.signature(value)
        except (TypeError, ValueError):  # builtins and some C callables have none: trust them
            return value
        try:
            signature.bind(*([None] * n_args))
        except TypeError as err:
            # Refused outside the handler: the CLI reads the innermost error of a chain as the refusal.
            problem = str(err)
        else:
            return value
        self.fail(name, expected, value, f"it cannot take {n_args} positional arguments ({problem})")
        return value

    def instance(
        self, name: str, value: Any, kind: type | tuple[type, ...], what: str, hint: str = ""
    ) -> Any:
        if isinstance(value, bool) or not isinstance(value, kind):
            self.fail(name, what, value, hint)
        return value

    def dtype(
        self, name: str, value: Any, allowed: Iterable[torch.dtype] = MEASURE_DTYPES
    ) -> torch.dtype | None:
        allowed = tuple(allowed)
        if value is not None and not (isinstance(value, torch.dtype) and value in allowed):
            self.fail(name, "None or one of " + ", ".join(map(str, allowed)), value)
        return value

    def device(self, name: str, value: Any) -> torch.device | None:
        """``None``, or a ``torch.device`` or a device string (``"cpu"``, ``"cuda:0"``) that names real memory.

        Only the spelling is checked: whether this machine has the device is known where the
        measurement runs (:meth:`usable_device`), and asking CUDA here would initialize it in a
        process that may fork its workers.
        """
        if value is None:
            return None
        expected = "None or a device such as 'cpu' or 'cuda:0'"
        if not isinstance(value, str | torch.device):
            self.fail(name, expected, value)
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError) as err:
            problem = str(err).splitlines()[0]
        else:
            problem = "a 'meta' tensor holds no values" if device.type == "meta" else ""
        if problem:  # refused outside the handler: the CLI reads the innermost error as the refusal
            self.fail(name, expected, value, problem)
        return device

    def usable_device(self, name: str, value: Any) -> torch.device | None:
        """:meth:`device`, and this process can allocate on it (an existing GPU index, a built backend)."""
        device = self.device(name, value)
        if device is not None:
            try:
                torch.empty(0, device=device)
            except Exception as err:  # AssertionError, RuntimeError, ...: torch's wording varies by backend
                problem = str(err).splitlines()[0][:160]
            else:
                return device
            self.fail(name, "a device this machine has", value, problem)
        return device

    def patterns(self, name: str, value: Any) -> str | list[str] | None:
        """``None``, a glob pattern, or a non-empty list (or tuple) of them."""
        expected = "None, a glob pattern such as 'blocks.*.attn.*', or a non-empty list of them"
        if value is None:
            return None
        if isinstance(value, str):
            if not value:
                self.fail(name, expected, value, "an empty pattern matches no parameter")
            return value
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(p, str) and p for p in value)
        ):
            self.fail(name, expected, value)
        return list(value)

    def tag(self, name: str, value: Any, *, allow_none: bool = True) -> str | None:
        """A name that becomes one component of a metric name (``hessian/<tag>/eig_1``)."""
        if value is None and allow_none:
            return None
        if not is_tag(value):
            expected = "a non-empty string without '/' or spaces (it names metrics: hessian/<name>/eig_1)"
            self.fail(name, expected + (" or None" if allow_none else ""), value)
        return value

    def batches(self, name: str, value: Any, *, single_batch: bool) -> Any:
        """Batches to measure on: a list or tuple of batches, a ``DataLoader`` or another iterable (a
        :class:`~pf_lightning.ProbeSet` too); with ``single_batch``, a Tensor or a dict is one batch."""
        expected = "a non-empty list of batches or a DataLoader" + (
            " (or one batch: a Tensor, a tuple or a dict)" if single_batch else ""
        )
        one = isinstance(value, torch.Tensor | Mapping)
        if one and single_batch:
            return value
        hint = "wrap a single batch in a list" if one else ""
        if one or isinstance(value, str | bytes) or not isinstance(value, Iterable):
            self.fail(name, expected, value, hint)
        # Under a process group an empty list is this rank's shard: the operator reports it to every
        # rank at its first collective (raising here, on one rank only, would leave the others waiting).
        if isinstance(value, list | tuple) and not value and not _several_ranks():
            self.fail(name, expected, value, "the probe set is empty")
        return value

    def keywords(self, owner: str, given: Iterable[str], accepted: Collection[str]) -> None:
        """Every name in ``given`` is an argument of ``owner`` (for ``**kwargs`` passed on to it)."""
        for key in given:
            if key not in accepted:
                close = difflib.get_close_matches(str(key), list(accepted), n=1)
                raise self.error(
                    f"`{key}` is not an argument of {owner}: arguments must be among "
                    f"{', '.join(sorted(accepted))}{f' (did you mean `{close[0]}`?)' if close else ''}"
                )


def _several_ranks() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def parameter_names(target: Callable[..., Any], skip: Collection[str] = ("self",)) -> set[str]:
    """The keyword-passable argument names of ``target`` (a function or a class's ``__init__``)."""
    signature = inspect.signature(target)
    return {
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip
    }
