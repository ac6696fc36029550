r"""Learning-rate schedulers that act on measured curvature: DAL-p and a sharpness cap.

Both are ``torch.optim.lr_scheduler.LRScheduler`` subclasses with a closed-form rate and a
``step(metric)`` that takes the measured quantity, so Lightning steps them like ``ReduceLROnPlateau``
(``interval="step"``, ``monitor=<metric>``): after the optimizer step and after the callbacks of that
batch have measured, ``LearningRateMonitor`` shows the effective rate, and checkpoints keep their state.
:meth:`DriftAdaptiveLR.lightning_config` returns that configuration; the
:class:`~pf_lightning.callbacks.LRAdaptation` callback supplies the metric every step (and can install
the scheduler itself when ``configure_optimizers`` cannot be edited).

Timing: a rate set by ``step(metric)`` is used by the *next* optimizer step. Under Lightning the
metric is measured at the parameters that step starts from, on the batch just trained: for full-batch
gradient descent that is exactly the paper's DAL; with mini-batches the curvature comes from the
previous batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from . import logging as names
from ._validation import Checks, is_int, is_number
from .stability import UnsupportedOptimizer, dal_learning_rate, edge_lr, optimizer_rule, supported_optimizers

__all__ = ["DriftAdaptiveLR", "SharpnessCappedLR"]

_check = Checks()


def _set_lr(group: dict[str, Any], lr: float) -> None:
    """Set a parameter group's rate as torch's schedulers do: in place where the optimizer holds it as a
    tensor (``lr=torch.tensor(1e-2)`` keeps its dtype, so the step computes as without a scheduler)."""
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _check_common(optimizer: Any, last_epoch: Any) -> None:
    _check.instance("optimizer", optimizer, Optimizer, "a torch.optim.Optimizer")
    _check.integer("last_epoch", last_epoch, -1, hint="-1 for a fresh run, as in every LRScheduler")


def _check_steps_at_rate(optimizer: Optimizer, refusal: str) -> None:
    """Both schedulers set a rate that is the step's scale, in every group: an optimizer without a rule (LBFGS's
    line search, Rprop's sign steps), whose step does not scale with its rate (ASGD), or that ascends the loss
    stops here, not mid-run."""
    try:
        optimizer_rule(optimizer)
    except UnsupportedOptimizer as err:  # its list names those with a threshold, ASGD among them
        fixed = supported_optimizers(step_scales_with_lr=False)
        note = f" ({', '.join(fixed)} excepted here: its step is not its rate's multiple)" if fixed else ""
        raise UnsupportedOptimizer(f"{refusal}: {err}{note}") from err
    try:
        for i in range(len(optimizer.param_groups)):
            edge_lr(optimizer, 1.0, group=i)
    except (UnsupportedOptimizer, ValueError) as err:  # ValueError: settings with no step rule (momentum 1)
        raise type(err)(f"{refusal}: {err}") from err


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a scalar metric, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach())
    return float(value)


class _MeasuredLR(LRScheduler):
    """The machinery both schedulers share: a held measurement, its warnings, a Lightning config."""

    monitor: str
    _quantity: str

    def _clean(self, value: float | None) -> float | None:
        return value

    def _observe(self, value: Any) -> None:
        """Take a new measurement; a non-finite one keeps the previous value (one warning, a flag)."""
        raw = _as_float(value)
        value = self._clean(raw)
        self.held = False
        if value is None:
            return
        if math.isfinite(value):
            self.measured = value
            return
        self.held = True
        self.held_count += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{type(self).__name__}: the measured {self._quantity} is {raw}; holding the previous "
                "rate (flagged in the logs each time it happens, warned once)",
                RuntimeWarning,
                stacklevel=names.user_stacklevel(),  # the user's line: under Lightning, their trainer.fit
            )

    def adopt_new_groups(self) -> None:
        """Take parameter groups added since the last step (``optimizer.add_param_group``: a layer unfrozen
        mid-run, Lightning's ``BaseFinetuning``) into the schedule, from their rate when added (their base
        rate, as torch's schedulers take a group's ``initial_lr``), and set their rate now.

        :meth:`step` and :meth:`refresh` call it; :class:`~pf_lightning.callbacks.LRAdaptation` calls it
        before every optimizer step too, so that a group added at an epoch's start takes its first step at
        the adapted (or capped) rate, not at the rate it was added with."""
        groups = self.optimizer.param_groups
        first = len(self.base_lrs)
        if first == len(groups):
            return
        for group in groups[first:]:
            group.setdefault("initial_lr", group["lr"])
            for key in self._lists:
                rate = group["initial_lr"] if key == "base_lrs" else group["lr"]
                getattr(self, key).append(float(rate))
        for i, lr in enumerate(self.get_lr()[first:], start=first):
            _set_lr(groups[i], lr)
            self._last_lr[i] = float(groups[i]["lr"])

    def refresh(self, value: Any) -> None:
        """Take a measurement for the optimizer step about to run, without advancing the schedule.

        :class:`~pf_lightning.callbacks.LRAdaptation` uses it for a measurement made after the schedule's
        step for the last optimizer step (before the first step of a fit, at an epoch's end), so that the
        next step already runs at the adapted (or capped) rate.
        """
        self.adopt_new_groups()
        self._observe(value)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            _set_lr(group, lr)
        self._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]

    # What a checkpoint's state must hold, and the form of every entry it may hold (beyond torch's own).
    _lists = ("base_lrs", "_last_lr")

    def _check_state(self, state: Any) -> None:
        """Raise a ``ValueError`` naming the entry, before a state this scheduler did not write is used.

        A scheduler sets the learning rate: starting it afresh in silence would change a resumed run's
        training, so a bad state is an error, not a warning.
        """
        name = type(self).__name__

        def bad(what: str) -> None:
            raise ValueError(
                f"{name}.load_state_dict: {what}. The checkpoint's scheduler state was not written by a "
                f"{name} (or is corrupted): resume from a checkpoint this scheduler wrote, or remove its "
                "entry from the checkpoint's 'lr_schedulers' to restart the schedule"
            )

        if not isinstance(state, Mapping):
            bad(f"the state is a {type(state).__name__}, not a dict")
        missing = [key for key in ("last_epoch", "measured", *self._lists) if key not in state]
        if missing:
            bad(f"keys {missing} are missing")
        # Loading updates the scheduler's attributes from the state: an entry naming its optimizer or one of
        # its methods would replace them (and fail later with an unrelated error).
        reserved = sorted(
            k
            for k in state
            if k == "optimizer"
            or callable(getattr(type(self), str(k), None))
            or isinstance(getattr(type(self), str(k), None), property)
        )
        if reserved:
            bad(f"it holds {reserved}, which name the scheduler's optimizer or methods, not its state")
        epoch = state["last_epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < -1:
            bad(f"last_epoch is {epoch!r}, not an int >= -1")
        n_groups = len(self.optimizer.param_groups)
        for key in self._lists:
            values = state[key]
            if not isinstance(values, list | tuple) or len(values) != n_groups:
                bad(f"{key} is {values!r}, not a list of {n_groups} rate(s), one per parameter group")
            for value in values:  # a rate the optimizer holds as a tensor is saved as one (torch's clone)
                rate = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
                if not is_number(rate) or not math.isfinite(rate) or rate < 0:
                    bad(f"{key} holds {value!r}, not a finite rate >= 0")
        measured = state["measured"]
        if measured is not None and not (is_number(measured) and math.isfinite(measured)):
            bad(f"measured is {measured!r}, not a finite number or None")
        foreign = sorted(
            key
            for other in _MeasuredLR.__subclasses__()
            if other is not type(self)
            for key in other._settings
            if key in state and key not in self._settings
        )
        if foreign:
            bad(f"it holds {foreign}, settings of another scheduler")
        try:  # the settings as the constructor checks them: a rate of -1 or NaN must not come back this way
            self._check_settings(state)
        except ValueError as err:
            bad(str(err))

    # A state's settings (beyond the rates): the entries another scheduler's state does not hold.
    _settings: tuple[str, ...] = ()
    # The constructor's arguments among them: a resumed run keeps those it was built with (see _rebuilt).
    _arguments: tuple[str, ...] = ()

    def _arguments_now(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._arguments}

    def describe(self) -> str:
        """The scheduler and its arguments as the loggers' settings record them, e.g.
        ``DriftAdaptiveLR(p=1.0, max_lr=5.0, window=None, warmup_steps=0)``."""
        arguments = [f"{key}={value!r}" for key, value in self._arguments_now().items()]
        return f"{type(self).__name__}({', '.join(arguments)})"

    def _rebuilt(self, built: Mapping[str, Any]) -> None:
        """After a checkpoint's state is loaded, put back the arguments this scheduler was built with (its
        code or config now) where the checkpoint's run used others, and say so once: a resumed run that
        changed ``p`` or ``fraction`` ran on the checkpoint's in silence. The checkpoint's rates and
        measurement are kept; the next rate this scheduler sets follows the new arguments."""
        changed = {key: getattr(self, key) for key, value in built.items() if getattr(self, key) != value}
        for key, value in built.items():
            setattr(self, key, value)
        if changed:  # on rank zero, at the user's line
            names.warn_user(
                f"{type(self).__name__}: resumed with {', '.join(f'{k}={built[k]!r}' for k in changed)} where the "
                f"checkpoint's run had {', '.join(f'{k}={v!r}' for k, v in changed.items())}: the rates from "
                "the next one it sets follow the new settings (build it with the checkpoint's to resume that run "
                "as it was)"
            )

    def _check_settings(self, state: Mapping[str, Any]) -> None:
        """Raise a ``ValueError`` where a setting in ``state`` is one the constructor would refuse."""

    def lightning_config(self, name: str | None = None) -> dict[str, Any]:
        """The ``lr_scheduler`` entry of ``configure_optimizers`` that steps this scheduler correctly.

        Every optimizer step, after the callbacks have measured ``self.monitor``:
        ``{"scheduler": self, "interval": "step", "frequency": 1, "reduce_on_plateau": True,
        "monitor": self.monitor, "strict": False}``.
        """
        config = {
            "scheduler": self,
            "interval": "step",
            "frequency": 1,
            "reduce_on_plateau": True,
            "monitor": self.monitor,
            "strict": False,
        }
        if name is not None:
            config["name"] = name
        return config


class DriftAdaptiveLR(_MeasuredLR):
    r"""DAL-p (Dherin et al. 2023): the step :math:`h = \min(2/v^p, h_{\max})`, :math:`v = \lVert Hg\rVert/\lVert g\rVert`.

    :math:`v` is the curvature along the current gradient (:func:`~pf_lightning.curvature.drift.gradient_curvature`),
    passed to :meth:`step`. ``p`` is the stability/performance knob: ``p = 1`` sets
    :math:`(h/2)\lVert Hg\rVert = \lVert g\rVert`, which is :math:`h = 2/\lambda_{\max}` when ``g`` lies along
    the top eigenvector; for :math:`v > 1` a larger ``p`` gives smaller, more stable steps, for
    :math:`v < 1` *larger* ones (then ``max_lr`` decides). ``p = 0`` leaves the optimizer's own rate.

    What the rate multiplies: with SGD it is the step itself (with momentum :math:`\beta` the stability
    edge is :math:`(2+2\beta)/h`, so DAL-1 sits a factor :math:`1+\beta` below it). With Adam-family
    optimizers it multiplies the preconditioned update :math:`\hat m/(\sqrt{\hat\nu}+\epsilon)`, while
    :math:`v` measures the raw Hessian: the rate is then a curvature-scaled step, not the paper's method.
    Several parameter groups keep their ratios: group ``i`` gets :math:`h \cdot \eta_i/\eta_0` with
    :math:`\eta_i` the groups' initial rates (for a group added mid-run by ``optimizer.add_param_group``,
    its rate when added).

    Args:
        optimizer: the wrapped optimizer; its current rates are the base rates.
        p: the power, ``p >= 0``.
        max_lr: the cap :math:`h_{\max} > 0` (``max_lr_scale`` in ``dal.py``, absolute units).
        window: ``(start, stop)``: adapt only for optimizer steps ``start <= step < stop`` (``stop`` may be
            ``None``); the base rate outside. ``None`` adapts from the first measurement on.
        warmup_steps: blend linearly from the base rate to the DAL rate over this many steps from
            the window's start.
        last_epoch: as in every ``LRScheduler`` (``-1`` for a fresh run).

    Raises:
        ValueError: ``p < 0``, ``max_lr <= 0``, a window with ``stop <= start`` or ``start < 0``,
            ``warmup_steps < 0``, or a base rate of 0 in the first parameter group.
        UnsupportedOptimizer: an optimizer whose step is not its rate's multiple (no rule, as LBFGS's line
            search or Rprop's sign steps, which read ``lr`` once; the others the EoS monitor refuses, and
            ASGD) or a group with ``maximize=True``.
        ValueError: also settings of the optimizer with no step rule (``momentum >= 1``).

    Example::

        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = DriftAdaptiveLR(optimizer, p=1.0, max_lr=5.0)
        return {"optimizer": optimizer, "lr_scheduler": scheduler.lightning_config()}
        # and Trainer(callbacks=[LRAdaptation()]) measures ||Hg||/||g|| every step
    """

    monitor = names.DAL_HG_RATIO
    _quantity = "||Hg||/||g||"

    def __init__(
        self,
        optimizer: Optimizer,
        p: float = 1.0,
        max_lr: float = 5.0,
        *,
        window: tuple[int, int | None] | None = None,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ) -> None:
        _check_common(optimizer, last_epoch)
        self.p, self.max_lr, self.window, self.warmup_steps = self._checked(p, max_lr, window, warmup_steps)
        lr = optimizer.param_groups[0]["lr"]
        if not (is_int(lr) or isinstance(lr, float | Tensor)) or not float(lr) > 0:
            raise ValueError(
                f"`optimizer` must have a positive lr in its first parameter group (DAL scales the groups "
                f"by their base rates), got lr={lr!r}"
            )
        _check_steps_at_rate(optimizer, "DAL cannot set `optimizer`'s rate")
        self.measured: float | None = None
        self.held, self.held_count, self._warned = False, 0, False
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _checked(
        p: Any, max_lr: Any, window: Any, warmup_steps: Any
    ) -> tuple[float, float, tuple[int, int | None] | None, int]:
        """The settings as the scheduler holds them, or a ``ValueError`` naming the one refused."""
        p = _check.number("p", p, at_least=0, hint="p = 0 keeps the base rate, p = 1 is DAL-1")
        max_lr = _check.number(
            "max_lr", max_lr, above=0, hint="pass the largest step DAL may take, e.g. max_lr=5.0"
        )
        if window is not None:
            start, stop = window if isinstance(window, tuple | list) and len(window) == 2 else (None, None)
            if not (is_int(start) and start >= 0 and (stop is None or (is_int(stop) and stop > start))):
                _check.fail(
                    "window", "None or (start, stop) with ints 0 <= start < stop, or stop None", window
                )
            window = (int(start), None if stop is None else int(stop))
        return p, max_lr, window, _check.integer("warmup_steps", warmup_steps, 0)

    _settings = ("p", "max_lr", "window", "warmup_steps")
    _arguments = _settings

    def _check_settings(self, state: Mapping[str, Any]) -> None:
        mine = (self.p, self.max_lr, self.window, self.warmup_steps)
        self._checked(*(state.get(key, value) for key, value in zip(self._settings, mine, strict=True)))
        measured = state["measured"]
        if measured is not None and measured <= 0:  # a v the scheduler held would be positive
            raise ValueError(f"`measured` must be a positive ||Hg||/||g|| or None, got {measured!r}")

    @property
    def hg_ratio(self) -> float | None:
        """The :math:`v` the current rate came from (``None`` before the first measurement)."""
        return self.measured

    def step(self, hg_ratio: Any = None) -> None:  # type: ignore[override]
        """Set the rate of the next optimizer step from ``hg_ratio`` (:math:`v`).

        ``None`` keeps the last measurement (the every-n-steps mode); a non-finite or non-positive
        :math:`v` keeps it too, with one warning and ``held`` set. For a step outside the window, which runs
        at the base rate, ``hg_ratio`` is not read: nothing is taken, held or warned about.
        """
        self.adopt_new_groups()
        if self.adapts(self.last_epoch + 1):
            self._observe(hg_ratio)
        else:
            self.held = False
        super().step()

    def adapts(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 0) runs at a DAL rate: inside the window, warm-up
        included. :class:`~pf_lightning.callbacks.LRAdaptation` measures :math:`v` only for such steps."""
        return self._blend(step) > 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state this scheduler wrote; a ``ValueError`` names what is wrong with any other."""
        self._check_state(state_dict)
        if state_dict["base_lrs"][0] <= 0:
            raise ValueError(
                f"DriftAdaptiveLR.load_state_dict: base_lrs {state_dict['base_lrs']!r} (the first must be "
                "positive) is not one this scheduler wrote"
            )
        built = self._arguments_now()
        super().load_state_dict(state_dict)
        # As the constructor holds them (a checkpoint keeps the window's tuple as a list).
        self.p, self.max_lr, self.window, self.warmup_steps = self._checked(
            self.p, self.max_lr, self.window, self.warmup_steps
        )
        self._rebuilt(built)

    def _clean(self, value: float | None) -> float | None:
        # v = 0: Hg or the gradient vanished, and 2/v^p is meaningless: held like a NaN.
        return math.nan if value is not None and value <= 0 else value

    def _blend(self, step: int) -> float:
        """0 outside the window, rising linearly to 1 over the warm-up, then 1."""
        start, stop = self.window if self.window is not None else (0, None)
        if step < start or (stop is not None and step >= stop):
            return 0.0
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step - start + 1) / self.warmup_steps)

    def get_lr(self) -> list[float]:
        base = [float(lr) for lr in self.base_lrs]
        weight = self._blend(self.last_epoch)
        if self.measured is None or self.p == 0.0 or weight == 0.0:
            return base
        rate = dal_learning_rate(self.measured, self.p, self.max_lr)
        return [b + weight * (rate * b / base[0] - b) for b in base]

    def metrics(self) -> dict[str, float]:
        """What the callbacks log as ``dal/*``: the rate, its :math:`v`, whether it adapted or held."""
        return {
            "lr": float(self.get_last_lr()[0]),
            "hg_ratio": math.nan if self.measured is None else self.measured,
            "active": float(self.measured is not None and self.p > 0 and self._blend(self.last_epoch) > 0),
            "held": float(self.held),
        }


class SharpnessCappedLR(_MeasuredLR):
    r"""Keep the step at or below ``fraction`` of the stability edge of the latest sharpness.

    With sharpness :math:`S` (``eos/sharpness``: :math:`\lambda_{\max}(H)` for SGD,
    :math:`\lambda_{\max}(P^{-1}H)` for Adam) the edge is the rate at which the optimizer's threshold
    equals :math:`S` (:func:`~pf_lightning.stability.edge_lr`: :math:`2/S` for gradient descent,
    :math:`(2+2\beta)/S` with heavy-ball momentum, :math:`38/S` for Adam with :math:`\beta_1 = 0.9`). The
    rate is

    .. math::  \eta_t = \min(\eta^{\text{base}}_t,\ \text{fraction}\cdot\eta_{\text{edge}}(S)),

    with :math:`\eta^{\text{base}}_t` the rate of ``base`` (any scheduler, e.g. cosine) or the optimizer's
    initial rate. ``fraction < 1`` keeps training on the stable side of the edge, ``fraction`` slightly
    above 1 lets it sit at the edge. The base schedule runs on its own uncapped values, so the cap
    never distorts it. A sharpness :math:`S \le 0` (no positive curvature) imposes no cap; before the
    first measurement there is none either. Under a preconditioning optimizer parameter groups at
    different rates keep their ratios (the edge is group 0's, each other group gets its share of it);
    otherwise each group is capped at its own edge (:meth:`edge_lrs`). A group added mid-run
    (``optimizer.add_param_group``) is capped from its next step, from its rate when added or the base's.

    Args:
        optimizer: the wrapped optimizer.
        fraction: the cap as a fraction of the edge rate, positive.
        base: a scheduler on the same optimizer to cap (stepped by this one, once per optimizer step: give
            it a schedule counted in steps, ``T_max`` in steps for a cosine; do not step or configure it
            separately). ``ReduceLROnPlateau`` is not supported as a base.
        last_epoch: as in every ``LRScheduler``.

    Raises:
        ValueError: ``fraction`` not positive and finite; ``base`` not an ``LRScheduler`` of the same
            optimizer; optimizer settings with no threshold (``momentum >= 1``).
        UnsupportedOptimizer: the optimizer has no known threshold, or its step is not proportional to its
            rate (ASGD).

    Example::

        optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10_000)
        scheduler = SharpnessCappedLR(optimizer, fraction=0.9, base=cosine)
        return {"optimizer": optimizer, "lr_scheduler": scheduler.lightning_config()}
        # with Trainer(callbacks=[HessianEigenMonitor(), EdgeOfStabilityMonitor(), LRAdaptation()])
    """

    monitor = names.CAP_SHARPNESS
    _quantity = "sharpness"
    _lists = ("base_lrs", "_last_lr", "_uncapped")
    _settings = ("fraction", "base", "_uncapped")
    _arguments = ("fraction",)

    def __init__(
        self,
        optimizer: Optimizer,
        fraction: float = 0.9,
        *,
        base: LRScheduler | None = None,
        last_epoch: int = -1,
    ) -> None:
        _check_common(optimizer, last_epoch)
        self.fraction = self._checked_fraction(fraction)
        if base is not None and (
            not isinstance(base, LRScheduler)
            or isinstance(base, ReduceLROnPlateau | _MeasuredLR)  # stepped with a metric, not by the cap
            or base.optimizer is not optimizer
        ):
            why = (
                "ReduceLROnPlateau cannot be capped"
                if isinstance(base, ReduceLROnPlateau)
                else "cap a DAL schedule by lowering its max_lr instead"
                if isinstance(base, _MeasuredLR)
                else "it is built on another optimizer"
                if isinstance(base, LRScheduler)
                else ""
            )
            _check.fail(
                "base",
                "None or an LRScheduler built on the same optimizer, e.g. CosineAnnealingLR(optimizer, T_max=...)",
                base,
                why,
            )
        _check_steps_at_rate(optimizer, "`optimizer`'s rate cannot be capped")
        self.base = base
        self.measured: float | None = None
        self.held, self.held_count, self._warned = False, 0, False
        self._uncapped = [float(g["lr"]) for g in optimizer.param_groups]
        self._started = False
        super().__init__(optimizer, last_epoch)
        self._started = True

    def describe(self) -> str:
        """The cap and its arguments with the base schedule's class, e.g.
        ``SharpnessCappedLR(fraction=0.9, base=CosineAnnealingLR)``."""
        described = super().describe()
        return described if self.base is None else f"{described[:-1]}, base={type(self.base).__name__})"

    @staticmethod
    def _checked_fraction(fraction: Any) -> float:
        return _check.number(
            "fraction",
            fraction,
            above=0,
            hint="use a fraction of the edge rate such as 0.9 (stable) or 1.1 (at the edge)",
        )

    def _check_settings(self, state: Mapping[str, Any]) -> None:
        self._checked_fraction(state.get("fraction", self.fraction))
        base = state.get("base")
        if (base is None) != (self.base is None):
            raise ValueError(
                "`base` must match: the checkpoint's cap "
                + ("had no base schedule" if base is None else "capped a base schedule")
                + " and this one "
                + (f"caps a {type(self.base).__name__}" if self.base is not None else "has none")
            )
        if not (base is None or isinstance(base, Mapping)):
            raise ValueError(f"`base` must be a scheduler's state dict, got {base!r}")

    @property
    def sharpness(self) -> float | None:
        """The sharpness the current cap came from (``None`` before the first measurement)."""
        return self.measured

    def step(self, sharpness: Any = None) -> None:  # type: ignore[override]
        """Advance the base schedule one step and cap it with ``sharpness``.

        ``None`` keeps the last sharpness (so does NaN before the first measurement, silently); a
        non-finite value after one keeps it too, with one warning and ``held`` set.
        """
        if self._started:
            self.adopt_new_groups()
        self._observe(sharpness)
        if self._started and self.base is not None:
            for group, lr in zip(self.optimizer.param_groups, self._uncapped, strict=True):
                _set_lr(group, lr)  # the base schedule continues from its own, uncapped, value
            self.base.step()
            self._uncapped = [float(g["lr"]) for g in self.optimizer.param_groups]
        super().step()

    def _clean(self, value: float | None) -> float | None:
        # NaN before the first measurement: the sharpness is simply not measured yet.
        return None if value is not None and math.isnan(value) and self.measured is None else value

    def uncapped_lrs(self) -> list[float]:
        """Each group's rate before the cap: the base schedule's, or the optimizer's initial rate."""
        return list(self._uncapped) if self.base is not None else [float(lr) for lr in self.base_lrs]

    def edge_lrs(self) -> list[float]:
        """The edge rate of each parameter group for the current sharpness (``inf`` when uncapped).

        For a preconditioning optimizer the sharpness is measured with each group's rate relative to
        group 0's (:func:`~pf_lightning.curvature.optimizer_preconditioner`): the edge is group 0's and
        every other group gets its uncapped rate's share of it, so the groups keep their ratios. Otherwise
        the sharpness is the Hessian's, and each group's edge is its own (2/S for gradient descent).
        """
        n = len(self.optimizer.param_groups)
        if self.measured is None or self.measured <= 0:
            return [math.inf] * n
        if not optimizer_rule(self.optimizer).preconditioned:
            return [edge_lr(self.optimizer, self.measured, group=i) for i in range(n)]
        edge = edge_lr(self.optimizer, self.measured)
        rates = self.uncapped_lrs()
        if rates[0] <= 0:  # no ratio to keep (a warm-up from zero caps nothing yet)
            return [edge] * n
        return [edge * rate / rates[0] for rate in rates]

    def get_lr(self) -> list[float]:
        uncapped = self.uncapped_lrs()
        return [min(lr, self.fraction * edge) for lr, edge in zip(uncapped, self.edge_lrs(), strict=True)]

    def metrics(self) -> dict[str, float]:
        """What the callbacks log as ``cap/*``: group 0's rate, uncapped rate and edge; whether the cap binds
        on any group (under SGD each group meets its own edge: a faster group 1 is capped while group 0 is
        not, which ``capped`` read from group 0 alone missed: an outside trial)."""
        rates, uncapped = [float(lr) for lr in self.get_last_lr()], self.uncapped_lrs()
        return {
            "lr": rates[0],
            "base_lr": uncapped[0],
            "edge_lr": self.edge_lrs()[0],
            "sharpness": math.nan if self.measured is None else self.measured,
            "capped": float(any(lr < base for lr, base in zip(rates, uncapped, strict=True))),
            "held": float(self.held),
        }

    def state_dict(self) -> dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "base")}
        state["base"] = None if self.base is None else self.base.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state this scheduler wrote; a ``ValueError`` names what is wrong with any other."""
        self._check_state(state_dict)
        built = self._arguments_now()
        state = dict(state_dict)
        base_state = state.pop("base", None)
        self.__dict__.update(state)
        if self.base is not None and base_state is not None:
            self.base.load_state_dict(base_state)
        self._rebuilt(built)
