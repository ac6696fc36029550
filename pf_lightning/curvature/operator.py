r"""The Hessian of the mean loss over a probe set, as a linear operator.

.. math::  H = \sum_b \frac{w_b}{W} \nabla^2 L_b(\theta), \qquad W = \sum_b w_b ,

with :math:`L_b` the mean loss of batch :math:`b` and :math:`w_b` its sample count, summed over every
rank's batches when ``torch.distributed`` is initialized (one flat all-reduce per application under
DDP; FSDP's gradient reduce-scatter with sharded parameters).

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

from .._validation import Checks
from ..linalg import NonFiniteOperatorError
from ..linalg.operator import LinearOperator
from ..probe import ProbeSet, map_tensors
from .distributed import all_reduce_sum, any_rank, data_parallel_size, is_distributed, world_size
from .hvp import BACKENDS, DoubleBackwardHVP, FiniteDifferenceHVP, ForwardOverReverseHVP, HVPBackend
from .params import ParameterSpace, select_parameters
from .state import cast_model, measurement_context, rng_state, seeded

__all__ = ["HVP_CHOICES", "HessianOperator", "NonFiniteLossError", "PreconditionedOperator"]

LossFn = Callable[[nn.Module, Any], Tensor]
HVP_CHOICES = ("auto", *BACKENDS)
_check = Checks()


class NonFiniteLossError(FloatingPointError):
    """The loss of a probe batch is NaN or infinite: its curvature is meaningless."""


class FiniteDifferenceFallbackWarning(UserWarning):
    """``hvp="auto"`` found no exact backend that runs on this model and uses finite differences."""


def _is_rank_zero() -> bool:
    return not is_distributed() or dist.get_rank() == 0


class HessianOperator(LinearOperator):
    """Hessian of ``loss_fn`` averaged over a probe set, applied by a chosen HVP backend.

    Under ``torch.distributed`` the probe set is this rank's shard and the operator is the Hessian of
    the mean loss over all ranks' samples: with replicated parameters (DDP) through one flat
    all-reduce per application, with FSDP2-sharded parameters through FSDP's own gradient
    reduce-scatter, by finite differences, on vectors that hold this rank's slices
    (:mod:`pf_lightning.curvature.distributed`). A non-finite loss or product on any rank raises on
    every rank, after a collective that all of them take.

    Args:
        model: the module (unwrapped: never a DDP wrapper, which does not support ``autograd.grad``).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, the mean loss of one batch.
        probe: a :class:`ProbeSet`, or batches as :class:`ProbeSet` accepts them.
        params: glob patterns selecting the parameters (all trainable ones by default).
        hvp: ``"auto"``, ``"double_backward"``, ``"forward_over_reverse"`` or ``"finite_difference"``.
            ``"auto"`` takes double backward and falls back to finite differences, with one warning,
            when the model's kernels have no second derivative; with sharded parameters it takes
            finite differences, the only backend that runs on them, without a warning.
        seed: seeds the random state of every forward pass, so dropout masks are the same in all
            products of one measurement and the operator is one fixed symmetric matrix.
        cache_graphs: for double backward, keep each batch's gradient graph during the measurement.
        dtype: measure in this dtype (``torch.float64`` for reference accuracy, ``torch.bfloat16`` to
            save memory); parameters, buffers and floating inputs are cast for the measurement only.
            In bfloat16 the forward and backward passes (activations, gradient graphs) run in
            bfloat16 but the vectors the solvers see are float32: a Krylov basis orthogonalized with
            bfloat16's 8-bit mantissa breaks down after a few steps and reports wrong eigenvalues as
            converged. Accuracy in bfloat16: a few percent on the top eigenvalue (README, "Memory").

    Raises:
        ValueError: unknown backend, empty probe set, parameters that cannot be measured, an exact
            backend asked for on sharded parameters.
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
        _check.instance("model", model, nn.Module, "a torch.nn.Module")
        _check.function("loss_fn", loss_fn, "loss_fn(model, batch) -> scalar Tensor", 2, allow_none=False)
        if not isinstance(probe, ProbeSet):
            _check.batches("probe", probe, single_batch=True)
        _check.choice("hvp", hvp, HVP_CHOICES)
        _check.seed("seed", seed)
        _check.flag("cache_graphs", cache_graphs)
        select_parameters(model, params, argument="params")  # names `params` if none matches
        self.space = ParameterSpace(model, params, dtype=dtype)
        if self.space.sharded and hvp not in ("auto", "finite_difference"):
            raise ValueError(
                f"hvp={hvp!r} needs second-order autograd, which does not run on sharded (FSDP2 DTensor) "
                "parameters: use hvp='auto' or 'finite_difference'"
            )
        # Solver vectors in float32 when the passes run in a 16-bit type (see ``dtype`` above).
        vector_dtype = torch.float32 if self.space.dtype.itemsize < 4 else self.space.dtype
        super().__init__(self.space.n, vector_dtype, self.space.device)
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
        self._n_batches = len(self.probe)  # sharded: batches every rank runs (the most any rank holds)
        self._local_error: NonFiniteLossError | None = None

    @property
    def global_n(self) -> int:
        return self.space.global_n

    # -- the measurement state ---------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(measurement_context(self.model))
        self._stack.enter_context(cast_model(self.model, self.cast))
        if is_distributed():
            # One collective: the total sample weight, and every rank's batch count (slot = rank).
            counts = torch.zeros(1 + world_size(), dtype=torch.float64, device=self.device)
            counts[0], counts[1 + dist.get_rank()] = self.probe.total_weight, len(self.probe)
            all_reduce_sum(counts)
            self._total_weight, self._n_batches = float(counts[0]), int(counts[1:].max())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.backend is not None:
            self.backend.release()
        self.backend = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # -- loss and backends -------------------------------------------------------------------
    def _loss(self, index: int) -> Tensor:
        with rng_state():
            seeded(self.seed * 1_000_003 + index)
            loss = self.loss_fn(self.model, self.probe.batches[index])
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar Tensor, got {type(loss).__name__}"
                f"{'' if not isinstance(loss, Tensor) else f' of shape {tuple(loss.shape)}'}"
            )
        return loss.reshape(())

    def _nonfinite(self, index: int, loss: Tensor) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"the loss of probe batch {index} is {float(loss.detach())}: check the probe data and the parameters"
        )

    def loss_at(self, index: int) -> Tensor:
        """Mean loss of probe batch ``index`` with that batch's fixed random state (dropout masks)."""
        loss = self._loss(index)
        if not bool(torch.isfinite(loss.detach())):
            raise self._nonfinite(index, loss)
        return loss

    def _sharded_loss(self, index: int) -> Tensor:
        """Batch ``index``'s loss scaled so that FSDP's average over ranks gives the sample-weighted mean.

        Every rank runs the same number of passes (each one holds collectives); a rank with fewer batches
        runs its first batch at weight zero. A non-finite loss is recorded, not raised: the backward must
        still take part in the collectives, and :meth:`_agree` raises on every rank afterwards.
        """
        own = index < len(self.probe)
        loss = self._loss(index if own else 0)
        if own and self._local_error is None and not bool(torch.isfinite(loss.detach())):
            self._local_error = self._nonfinite(index, loss)
        weight = self.probe.weights[index] if own else 0.0
        return loss * (weight * data_parallel_size(self.space.params) / self._total_weight)

    def _make_backend(self, name: str) -> HVPBackend:
        if self.space.sharded:
            return FiniteDifferenceHVP(self.space, self._sharded_loss, column_norms=self._column_norms)
        if name == "double_backward":
            return DoubleBackwardHVP(self.space, self.loss_at, cache_graphs=self.cache_graphs)
        if name == "forward_over_reverse":
            return ForwardOverReverseHVP(self.space, self.loss_at, self.model)
        if name == "finite_difference":
            return FiniteDifferenceHVP(self.space, self.loss_at)
        # auto: try the exact backend on the first batch; the graph it builds stays cached. Every rank
        # must choose the same backend, so the outcome is agreed (one small collective) before use.
        backend = DoubleBackwardHVP(self.space, self.loss_at, cache_graphs=self.cache_graphs)
        failure: BaseException | None = None
        nonfinite: NonFiniteLossError | None = None
        try:
            trial = backend.apply(0, torch.ones(self.n, 1, dtype=self.space.dtype, device=self.device))
            if not bool(torch.isfinite(trial).all()):
                raise RuntimeError("double backward gave a non-finite product")
        except NonFiniteLossError as err:
            nonfinite = err
        except (RuntimeError, NotImplementedError) as err:
            failure = err
        failed, nonfinite_anywhere = any_rank([failure is not None, nonfinite is not None], self.device)
        if nonfinite_anywhere:
            backend.release()
            raise nonfinite or NonFiniteLossError("the loss of a probe batch is not finite on another rank")
        if not failed:
            return backend
        backend.release()
        if _is_rank_zero():
            reason = "on another rank" if failure is None else str(failure).splitlines()[0][:160]
            warnings.warn(
                f"hvp='auto': double backward does not run on this model ({reason}); using central finite "
                "differences (two gradients per product). Pass hvp='finite_difference' to silence this warning.",
                FiniteDifferenceFallbackWarning,
                stacklevel=4,
            )
        return FiniteDifferenceHVP(self.space, self.loss_at)

    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend is not None else self.requested

    # -- the distributed contract of LinearOperator ------------------------------------------
    def inner(self, X: Tensor, Y: Tensor) -> Tensor:
        gram = super().inner(X, Y)
        if not self.space.sharded:
            return gram
        # A basis kept in host memory gives a host Gram matrix: reduce it on the operator's device
        # (NCCL reduces device tensors only), then hand it back where the solver keeps its vectors.
        return all_reduce_sum(gram.to(self.device)).to(gram.device)

    def local_rows(self, X: Tensor) -> Tensor:
        return self.space.local_rows(X)

    def _column_norms(self, X: Tensor) -> Tensor:
        return all_reduce_sum(X.square().sum(dim=0)).sqrt()

    # -- the operator ------------------------------------------------------------------------
    def _require_context(self) -> None:
        if self._stack is None:
            raise RuntimeError("use the HessianOperator inside `with HessianOperator(...) as op:`")

    def _accumulate(self, term: Callable[[int], Tensor], out: Tensor) -> Tensor:
        """``out`` = the operator's weighted sum of ``term(batch)`` over all ranks' batches.

        Replicated: local weighted sum, then the one flat all-reduce (a non-finite local loss turns the
        local sum into NaN, which the reduction carries to every rank). Sharded: the terms are already
        scaled and reduced by FSDP. Either way every rank raises together, or none does.
        """
        self._local_error = None
        if self.space.sharded:
            for index in range(self._n_batches):
                out.add_(term(index))
        else:
            for index, weight in enumerate(self.probe.weights):
                try:
                    out.add_(term(index), alpha=weight)
                except NonFiniteLossError as err:
                    if not is_distributed():
                        raise
                    self._local_error = err
                    out.fill_(float("nan"))
                    break
            all_reduce_sum(out).div_(self._total_weight)  # one flat collective per application
        self._agree(out)
        return out

    def _agree(self, out: Tensor) -> None:
        if not is_distributed():
            return
        finite, lost = bool(torch.isfinite(out).all()), self._local_error is not None
        if self.space.sharded:  # local slices may differ in finiteness: agree through one small flag
            bad_out, lost_anywhere = any_rank([not finite, lost], self.device)
            finite = not bad_out
            if lost_anywhere and not lost:
                raise NonFiniteLossError("the loss of a probe batch is not finite on another rank")
        if self._local_error is not None:
            raise self._local_error
        if not finite:
            raise NonFiniteOperatorError(
                "a Hessian-vector product is not finite on some rank: check the probe data and the parameters"
            )

    def _matmat(self, X: Tensor) -> Tensor:
        self._require_context()
        if self.backend is None:  # chosen on the first product: a gradient alone needs no backend
            self.backend = self._make_backend(self.requested)
            if self.backend.name == "finite_difference" and self.space.dtype == torch.bfloat16:
                warnings.warn(
                    "finite-difference products in bfloat16 are 1-13% off on the top eigenvalues (README, "
                    "'Memory'): measure in float32 (dtype=None) or with an exact backend for accurate values",
                    UserWarning,
                    stacklevel=3,
                )
        Xp = X.to(self.space.dtype)  # the passes' dtype (bfloat16 on request); products come back in X's
        self.backend.begin_block(Xp)
        return self._accumulate(lambda index: self.backend.apply(index, Xp).to(X.dtype), torch.zeros_like(X))

    def gradient(self) -> Tensor:
        """The flat gradient of the same sample-weighted mean loss (same dropout masks as the products)."""
        self._require_context()

        def term(index: int) -> Tensor:
            with torch.enable_grad():
                return self.space.gradient(
                    self._sharded_loss(index) if self.space.sharded else self.loss_at(index)
                ).to(self.dtype)

        return self._accumulate(term, torch.zeros(self.n, dtype=self.dtype, device=self.device))


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
        _check.instance("base", base, LinearOperator, "a LinearOperator such as a HessianOperator")
        expected = f"a flat Tensor of shape ({base.n},), positive and finite (e.g. from adam_preconditioner)"
        _check.instance("diagonal", diagonal, Tensor, expected)
        if diagonal.shape != (base.n,) or diagonal.is_complex() or diagonal.dtype == torch.bool:
            hint = f"its shape is {tuple(diagonal.shape)} and its dtype {diagonal.dtype}"
            _check.fail("diagonal", expected, diagonal, hint)
        if not bool((diagonal > 0).all()) or not bool(torch.isfinite(diagonal).all()):
            _check.fail("diagonal", expected, diagonal, "some entries are not positive and finite")
        super().__init__(base.n, base.dtype, base.device)
        self.base = base
        self.scale = diagonal.to(device=base.device, dtype=base.dtype).rsqrt()[:, None]

    @property
    def global_n(self) -> int:
        return self.base.global_n

    def _matmat(self, X: Tensor) -> Tensor:
        return self.scale * self.base.matmat(self.scale * X)

    def inner(self, X: Tensor, Y: Tensor) -> Tensor:
        return self.base.inner(X, Y)

    def local_rows(self, X: Tensor) -> Tensor:
        return self.base.local_rows(X)
