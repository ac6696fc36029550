r"""The Hessian of the mean loss over a probe set, as a linear operator.

.. math::  H = \sum_b \frac{w_b}{W} \nabla^2 L_b(\theta), \qquad W = \sum_b w_b ,

with :math:`L_b` the mean loss of batch :math:`b` and :math:`w_b` its sample count, summed over every
rank's batches when ``torch.distributed`` is initialized (one flat all-reduce per application).

Use it as a context manager: entering it puts the model in the measurement state (see
:mod:`pf_lightning.curvature.state`), leaving it frees cached graphs and restores the model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..linalg.operator import LinearOperator
from ..probe import ProbeSet, map_tensors
from .hvp import BACKENDS, DoubleBackwardHVP, FiniteDifferenceHVP, ForwardOverReverseHVP, HVPBackend
from .params import ParameterSpace
from .state import cast_model, measurement_context, rng_state, seeded

__all__ = ["HVP_CHOICES", "HessianOperator", "NonFiniteLossError", "PreconditionedOperator"]

LossFn = Callable[[nn.Module, Any], Tensor]
HVP_CHOICES = ("auto", *BACKENDS)


class NonFiniteLossError(FloatingPointError):
    """The loss of a probe batch is NaN or infinite: its curvature is meaningless."""


class FiniteDifferenceFallbackWarning(UserWarning):
    """``hvp="auto"`` found no exact backend that runs on this model and uses finite differences."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class HessianOperator(LinearOperator):
    """Hessian of ``loss_fn`` averaged over a probe set, applied by a chosen HVP backend.

    Args:
        model: the module (unwrapped: never a DDP wrapper, which does not support ``autograd.grad``).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, the mean loss of one batch.
        probe: a :class:`ProbeSet`, or batches as :class:`ProbeSet` accepts them.
        params: glob patterns selecting the parameters (all trainable ones by default).
        hvp: ``"auto"``, ``"double_backward"``, ``"forward_over_reverse"`` or ``"finite_difference"``.
            ``"auto"`` takes double backward and falls back to finite differences, with one warning,
            when the model's kernels have no second derivative.
        seed: seeds the random state of every forward pass, so dropout masks are the same in all
            products of one measurement and the operator is one fixed symmetric matrix.
        cache_graphs: for double backward, keep each batch's gradient graph during the measurement.
        dtype: measure in this dtype (``torch.float64`` for reference accuracy, ``torch.bfloat16`` to
            save memory); parameters, buffers and floating inputs are cast for the measurement only.

    Raises:
        ValueError: unknown backend, empty probe set, parameters that cannot be measured.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        probe: Any,
        *,
        params: str | Sequence[str] | None = None,
        hvp: str = "auto",
        seed: int = 0,
        cache_graphs: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if hvp not in HVP_CHOICES:
            raise ValueError(f"hvp must be one of {HVP_CHOICES}, got {hvp!r}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(model, batch) -> scalar Tensor")
        self.space = ParameterSpace(model, params, dtype=dtype)
        super().__init__(self.space.n, self.space.dtype, self.space.device)
        self.model, self.loss_fn, self.seed = model, loss_fn, int(seed)
        self.probe = probe if isinstance(probe, ProbeSet) else ProbeSet(probe)
        self.cast = dtype
        if dtype is not None:
            cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
            self.probe = ProbeSet([map_tensors(b, cast) for b in self.probe.batches], self.probe.weights)
        self.requested, self.cache_graphs = hvp, cache_graphs
        self.backend: HVPBackend | None = None
        self._stack: Any = None
        self._total_weight = self.probe.total_weight

    # -- the measurement state ---------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(measurement_context(self.model))
        self._stack.enter_context(cast_model(self.model, self.cast))
        if _distributed():
            total = torch.tensor([self.probe.total_weight], dtype=torch.float64, device=self.device)
            dist.all_reduce(total)
            self._total_weight = float(total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.backend is not None:
            self.backend.release()
        self.backend = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # -- loss and backends -------------------------------------------------------------------
    def loss_at(self, index: int) -> Tensor:
        """Mean loss of probe batch ``index`` with that batch's fixed random state (dropout masks)."""
        with rng_state():
            seeded(self.seed * 1_000_003 + index)
            loss = self.loss_fn(self.model, self.probe.batches[index])
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar Tensor, got {type(loss).__name__}"
                f"{'' if not isinstance(loss, Tensor) else f' of shape {tuple(loss.shape)}'}"
            )
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteLossError(
                f"the loss of probe batch {index} is {float(loss.detach())}: check the probe data and the parameters"
            )
        return loss.reshape(())

    def _make_backend(self, name: str) -> HVPBackend:
        if name == "double_backward":
            return DoubleBackwardHVP(self.space, self.loss_at, cache_graphs=self.cache_graphs)
        if name == "forward_over_reverse":
            return ForwardOverReverseHVP(self.space, self.loss_at, self.model)
        if name == "finite_difference":
            return FiniteDifferenceHVP(self.space, self.loss_at)
        # auto: try the exact backend on the first batch; the graph it builds stays cached.
        backend = DoubleBackwardHVP(self.space, self.loss_at, cache_graphs=self.cache_graphs)
        try:
            trial = backend.apply(0, torch.ones(self.n, 1, dtype=self.dtype, device=self.device))
            if not bool(torch.isfinite(trial).all()):
                raise RuntimeError("double backward gave a non-finite product")
            return backend
        except NonFiniteLossError:
            raise
        except (RuntimeError, NotImplementedError) as err:
            backend.release()
            warnings.warn(
                f"hvp='auto': double backward does not run on this model ({str(err).splitlines()[0][:160]}); "
                "using central finite differences (two gradients per product). Pass hvp='finite_difference' "
                "to silence this warning.",
                FiniteDifferenceFallbackWarning,
                stacklevel=4,
            )
            return FiniteDifferenceHVP(self.space, self.loss_at)

    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend is not None else self.requested

    # -- the operator ------------------------------------------------------------------------
    def _reduce(self, out: Tensor) -> Tensor:
        if _distributed():
            dist.all_reduce(out)  # one flat collective per application, weighted by sample counts
        return out.div_(self._total_weight)

    def _require_context(self) -> None:
        if self._stack is None:
            raise RuntimeError("use the HessianOperator inside `with HessianOperator(...) as op:`")

    def _matmat(self, X: Tensor) -> Tensor:
        self._require_context()
        if self.backend is None:  # chosen on the first product: a gradient alone needs no backend
            self.backend = self._make_backend(self.requested)
        out = torch.zeros_like(X)
        for index, weight in enumerate(self.probe.weights):
            out.add_(self.backend.apply(index, X), alpha=weight)
        return self._reduce(out)

    def gradient(self) -> Tensor:
        """The flat gradient of the same sample-weighted mean loss (same dropout masks as the products)."""
        self._require_context()
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for index, weight in enumerate(self.probe.weights):
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    self.loss_at(index), self.space.params, allow_unused=True, materialize_grads=True
                )
            out.add_(self.space.flatten(grads), alpha=weight)
        return self._reduce(out)


class PreconditionedOperator(LinearOperator):
    r"""The preconditioned Hessian :math:`P^{-1/2} H P^{-1/2}` for a diagonal preconditioner ``P``.

    Its eigenvalues are those of :math:`P^{-1} H`; for Adam, :math:`\lambda_{max}` is the
    *preconditioned sharpness* whose stability threshold is :math:`(2 + 2\beta_1)/((1-\beta_1)\eta)`
    (Cohen et al. 2022, REFERENCE §1.2).

    Args:
        base: the Hessian operator.
        diagonal: the flat, positive diagonal of ``P`` (e.g. from :func:`adam_preconditioner`).
    """

    def __init__(self, base: LinearOperator, diagonal: Tensor) -> None:
        super().__init__(base.n, base.dtype, base.device)
        if diagonal.shape != (base.n,):
            raise ValueError(f"the preconditioner has shape {tuple(diagonal.shape)}, expected ({base.n},)")
        if not bool((diagonal > 0).all()) or not bool(torch.isfinite(diagonal).all()):
            raise ValueError("the preconditioner's diagonal must be positive and finite")
        self.base = base
        self.scale = diagonal.to(device=base.device, dtype=base.dtype).rsqrt()[:, None]

    @property
    def global_n(self) -> int:
        return self.base.global_n

    def _matmat(self, X: Tensor) -> Tensor:
        return self.scale * self.base.matmat(self.scale * X)

    def inner(self, X: Tensor, Y: Tensor) -> Tensor:
        return self.base.inner(X, Y)

    def randn(self, b: int, generator: torch.Generator) -> Tensor:
        return self.base.randn(b, generator)
