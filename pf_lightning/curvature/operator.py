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
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._validation import Checks
from ..linalg import NonFiniteOperatorError
from ..linalg._common import all_finite
from ..linalg.operator import LinearOperator
from ..probe import ProbeSet, map_tensors
from .distributed import (
    CollectiveFailure,
    LocalFailure,
    any_rank,
    data_parallel_size,
    is_agreed,
    is_distributed,
    reduce_agreed,
    reshard,
    world_size,
)
from .hvp import BACKENDS, DoubleBackwardHVP, FiniteDifferenceHVP, ForwardOverReverseHVP, HVPBackend
from .params import ParameterSpace, select_parameters
from .state import cast_model, measurement_context, rng_state, seeded

__all__ = ["HVP_CHOICES", "PRODUCT_COST", "HessianOperator", "NonFiniteLossError", "WorkMeter"]

LossFn = Callable[[nn.Module, Any], Tensor]
HVP_CHOICES = ("auto", *BACKENDS)
_check = Checks()


def check_arguments(
    model: Any, loss_fn: Any, probe: Any, hvp: Any, seed: Any, probe_name: str = "probe"
) -> int:
    """The arguments of a Hessian operator, and of every measurement function (``probe_name``:
    what the caller calls the batches), checked before any work; the seed, as an int."""
    _check.instance("model", model, nn.Module, "a torch.nn.Module")
    _check.function("loss_fn", loss_fn, "loss_fn(model, batch) -> scalar Tensor", 2, allow_none=False)
    if not isinstance(probe, ProbeSet):
        _check.batches(probe_name, probe, single_batch=True)
    _check.choice("hvp", hvp, HVP_CHOICES)
    return _check.seed("seed", seed)


class NonFiniteLossError(FloatingPointError):
    """The loss of a probe batch is NaN or infinite: its curvature is meaningless."""


class FiniteDifferenceFallbackWarning(UserWarning):
    """``hvp="auto"`` found no exact backend that runs on this model and uses finite differences."""


PRODUCT_COST = 2.0
"""One Hessian-vector product in gradients of the same batch: finite differences take exactly two; double
backward through a cached graph 1.9-2.5 on CPU and 1.5-2.3 on an H100 (REFERENCE §5, BENCHMARKS.md)."""
FORWARD_COST = 1.0 / 3.0
"""One forward pass (a loss without its gradient) in gradients: the backward costs about two forwards."""


class WorkMeter:
    """Counts the work of every :class:`HessianOperator` left inside ``with meter:``, in sample-gradients.

    An operator's work is ``(PRODUCT_COST * products + gradients + FORWARD_COST * loss passes)`` times the
    samples of this rank's probe, the gradients counting double backward's gradient graphs (one per batch,
    built by its first product, or by every product with ``cache_graphs=False``): the unit is one sample's
    gradient, the unit in which training spends ``batch size`` per micro-batch. It depends on the product
    counts alone, not on the machine, so a budget counted in it (``HessianEigenMonitor(max_work_fraction=...)``)
    measures the same steps in every run. Meters nest; each one counts what was done inside it.
    """

    def __init__(self) -> None:
        self.work = 0.0

    def __enter__(self) -> WorkMeter:
        _METERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _METERS.remove(self)


_METERS: list[WorkMeter] = []


def _is_rank_zero() -> bool:
    return not is_distributed() or dist.get_rank() == 0


class HessianOperator(LinearOperator):
    """Hessian of ``loss_fn`` averaged over a probe set, applied by a chosen HVP backend.

    Under ``torch.distributed`` the probe set is this rank's shard and the operator is the Hessian of
    the mean loss over all ranks' samples: with replicated parameters (DDP) through one flat
    all-reduce per application, with FSDP2-sharded parameters through FSDP's own gradient
    reduce-scatter, by finite differences, on vectors that hold this rank's slices
    (:mod:`pf_lightning.curvature.distributed`). A non-finite loss or product on any rank raises on
    every rank, after a collective that all of them take; so does an exception of one rank's loss,
    gradient or product (:class:`~pf_lightning.curvature.distributed.MeasurementAborted` on every rank
    unless all raised alike), and of building this rank's probe shard (raised on entering).

    Args:
        model: the module (unwrapped: never a DDP wrapper, which does not support ``autograd.grad``). Its
            ``torch.compile``d code runs eagerly, as its original Python, while the operator is open
            (:func:`~pf_lightning.curvature.state.measurement_context`).
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
        weights: sample count of each probe batch (counted from the leading dimension otherwise).

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
        weights: Sequence[float] | None = None,
    ) -> None:
        seed = check_arguments(model, loss_fn, probe, hvp, seed)
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
        self.model, self.loss_fn, self.seed = model, loss_fn, seed
        self.cast = dtype
        # Distributed: a failure on this rank's shard is held and reported to every rank on entering.
        self._failure = LocalFailure()
        self.probe: ProbeSet | None = None
        with self._failure:
            shard = probe if isinstance(probe, ProbeSet) and weights is None else ProbeSet(probe, weights)
            if dtype is not None:
                cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
                shard = ProbeSet([map_tensors(b, cast) for b in shard.batches], shard.weights)
            self.probe = shard
        self.requested, self.cache_graphs = hvp, cache_graphs
        self.backend: HVPBackend | None = None
        self._stack: Any = None
        self._total_weight = math.nan if self.probe is None else self.probe.total_weight
        # sharded: batches every rank runs (the most any rank holds)
        self._n_batches = 0 if self.probe is None else len(self.probe)
        self._local_error: NonFiniteLossError | None = None
        self.n_gradient = self.n_loss = 0  # besides n_matvec: what the work meters are charged

    @property
    def global_n(self) -> int:
        return self.space.global_n

    # -- the measurement state ---------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        self._stack = contextlib.ExitStack()
        try:
            with self._failure:
                # Exact products need second-order autograd: Hugging Face-style checkpointing is off then.
                exact = not self.space.sharded and self.requested != "finite_difference"
                self._stack.enter_context(measurement_context(self.model, exact=exact))
                self._stack.enter_context(cast_model(self.model, self.cast))
            if is_distributed():
                # One collective: the total sample weight, and every rank's batch count (slot = rank); it
                # also reports a failure held so far (this rank's probe shard, its preconditioner).
                counts = torch.zeros(1 + world_size(), dtype=torch.float64, device=self.device)
                if self.probe is not None:
                    counts[0], counts[1 + dist.get_rank()] = self.probe.total_weight, len(self.probe)
                self._reduce(counts)
                self._total_weight, self._n_batches = float(counts[0]), int(counts[1:].max())
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if _METERS and self.probe is not None:
            passes = PRODUCT_COST * self.n_matvec + self.n_gradient + FORWARD_COST * self.n_loss
            if self.backend is not None:  # double backward's gradient graphs: a gradient of their batch each
                passes += self.backend.graph_builds / max(1, len(self.probe))
            for meter in _METERS:
                meter.work += passes * self.probe.total_weight
        if self.backend is not None:
            self.backend.release()
        self.backend = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        held = self._failure.take()
        if held is not None and exc[:1] in ((), (None,)):
            raise held  # held after the operator's last collective: nothing can report it any more

    def local_step(self) -> LocalFailure:
        """A context for local work of the measurement between two of this operator's collectives.

        Under ``torch.distributed`` an exception in the block is held on this rank, which goes on to the
        operator's next collective (entering it, a product, a gradient, a sharded inner product); that
        collective reports it and every rank raises together. Without a process group it does nothing.
        The code after the block must reach that collective without the block's results.

        Example::

            hessian = HessianOperator(model, loss_fn, shard)
            with hessian.local_step():  # e.g. this rank's slice of a preconditioner
                op = PreconditionedOperator(hessian, diagonal)
            with hessian:  # raises on every rank if the block failed on one
                ...
        """
        return self._failure

    def _reduce(self, buffer: Tensor, error: BaseException | None = None) -> bool:
        """The operator's own all-reduce of ``buffer``, reporting what this rank holds (see
        :func:`~pf_lightning.curvature.distributed.reduce_agreed`); whether the sum is finite."""
        held = self._failure.take()
        # the failure this rank held comes first: an error after it is most likely its consequence
        return reduce_agreed(buffer, held if held is not None else error, NonFiniteLossError)

    # -- loss and backends -------------------------------------------------------------------
    def _loss(self, index: int) -> Tensor:
        with rng_state():
            seeded(self.seed * 1_000_003 + index)
            try:
                loss = self.loss_fn(self.model, self.probe.batches[index])
            except Exception as err:  # the type is kept (callers tell errors apart): the batch is noted
                err.add_note(
                    f"(raised by loss_fn on measured batch {index} of {len(self.probe)}: check that batch's "
                    "shapes and dtypes against what the model expects)"
                )
                raise
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar Tensor, got {type(loss).__name__}"
                f"{'' if not isinstance(loss, Tensor) else f' of shape {tuple(loss.shape)}'}"
            )
        if loss.is_floating_point() and loss.dtype.itemsize < self.space.dtype.itemsize:
            _warn_lower_precision(loss.dtype, self.space.dtype)
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise ValueError(
                f"the loss of measured batch {index} does not depend on the measured parameters (it has no "
                "grad_fn): compute it from the model's output with gradients enabled (not under "
                "torch.no_grad() or torch.inference_mode(), not .detach()ed), and select parameters the "
                "loss uses with `params`"
            )
        return loss.reshape(())

    def _nonfinite(self, index: int, loss: Tensor) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"the loss of measured batch {index} is {float(loss.detach())}: check that batch's data and the "
            "parameters"
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
        still take part in the collectives, and :meth:`_accumulate` raises on every rank afterwards.
        """
        own = index < len(self.probe)
        loss = self._loss(index if own else 0)
        if own and self._local_error is None and not bool(torch.isfinite(loss.detach())):
            self._local_error = self._nonfinite(index, loss)
        weight = self.probe.weights[index] if own else 0.0
        return loss * (weight * data_parallel_size(self.space.params) / self._total_weight)

    def _make_backend(self, name: str, X: Tensor) -> tuple[HVPBackend, Tensor | None]:
        """The backend for ``name``, and for ``"auto"`` the product of batch 0 with the first block ``X``.

        ``"auto"`` tries the exact backend on that product itself, so the trial is the measurement's
        first term and costs nothing extra; the graph it builds stays cached. Every rank must choose the
        same backend, so the outcome is agreed (one small collective) before use. An error of the loss
        itself (not of its double backward) is a failure of the measurement.
        """
        if self.space.sharded:
            return FiniteDifferenceHVP(self.space, self._sharded_loss, column_norms=self._column_norms), None
        if name == "double_backward":
            return DoubleBackwardHVP(self.space, self.loss_at, cache_graphs=self.cache_graphs), None
        if name == "forward_over_reverse":
            return ForwardOverReverseHVP(self.space, self.loss_at, self.model), None
        if name == "finite_difference":
            return FiniteDifferenceHVP(self.space, self.loss_at), None
        backend = DoubleBackwardHVP(self.space, _TrialLoss(self.loss_at), cache_graphs=self.cache_graphs)
        failure: BaseException | None = None
        first: Tensor | None = None
        with self._failure:
            try:
                first = backend.apply(0, X)
                if not all_finite(first):
                    raise RuntimeError(
                        "double backward gave a non-finite product: its second derivative is not finite here, "
                        "or the probe batch holds an inf"
                    )
            except _LossFailed as err:
                raise err.error from None
            except (RuntimeError, NotImplementedError) as err:
                failure, first = err, None
        backend.loss_at = self.loss_at
        try:
            (failed,) = any_rank([failure is not None], self.device, self._failure.take(), NonFiniteLossError)
        except BaseException:
            backend.release()
            raise
        if not failed:
            return backend, first
        backend.release()
        if _is_rank_zero():
            reason = "on another rank" if failure is None else str(failure).splitlines()[0][:160]
            warnings.warn(
                f"hvp='auto': double backward does not run on this model ({reason}); using central finite "
                "differences (two gradients per product). Pass hvp='finite_difference' to silence this warning.",
                FiniteDifferenceFallbackWarning,
                stacklevel=4,
            )
        return FiniteDifferenceHVP(self.space, self.loss_at), None

    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend is not None else self.requested

    # -- the distributed contract of LinearOperator ------------------------------------------
    def inner(self, X: Tensor, Y: Tensor) -> Tensor:
        if not self.space.sharded:
            return super().inner(X, Y)
        # A basis kept in host memory gives a host Gram matrix: reduce it on the operator's device
        # (NCCL reduces device tensors only), then hand it back where the solver keeps its vectors.
        # A rank whose local product fails joins the reduction with NaN of the Gram matrix's shape
        # (a block against a vector gives a vector, two vectors a scalar).
        shape = (*X.shape[1:], *Y.shape[1:])
        gram = self._local_sum(lambda: super(HessianOperator, self).inner(X, Y), shape, X)
        return gram.to(X.device)

    def local_rows(self, X: Tensor) -> Tensor:
        return self.space.local_rows(X)

    def _column_norms(self, X: Tensor) -> Tensor:
        return self._local_sum(lambda: X.square().sum(dim=0), (X.shape[1],), X).sqrt()

    def _local_sum(self, local: Callable[[], Tensor], shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The sum over ranks of ``local()``; a rank whose ``local()`` raises reports it instead."""
        with self._failure:
            part = local().to(self.device)
        if self._failure.error is not None:
            part = torch.full(shape, math.nan, dtype=like.dtype, device=self.device)
        self._reduce(part)
        return part

    # -- the operator ------------------------------------------------------------------------
    def _require_context(self) -> None:
        if self._stack is None:
            raise RuntimeError("use the HessianOperator inside `with HessianOperator(...) as op:`")

    def _accumulate(self, term: Callable[[int], Tensor], out: Tensor) -> Tensor:
        """``out`` = the operator's weighted sum of ``term(batch)`` over all ranks' batches.

        Replicated: local weighted sum, then the one flat all-reduce. A term that raises on this rank (a
        non-finite loss, the loss function, the backward, out of memory) ends the local sum: the rank
        still takes the all-reduce, with NaN, and every rank raises together after it (see
        :func:`~pf_lightning.curvature.distributed.reduce_agreed`). Sharded: the terms are already
        scaled and reduced by FSDP, and a non-finite loss is agreed on through one small flag; an
        exception inside a pass cannot be matched (FSDP's own collectives) and raises
        :class:`~pf_lightning.curvature.distributed.CollectiveFailure`.
        """
        self._local_error = None
        if self.space.sharded:
            try:
                for index in range(self._n_batches):
                    out.add_(term(index))
            except Exception as err:
                if not is_distributed() or is_agreed(err):
                    raise
                raise CollectiveFailure(
                    f"rank {dist.get_rank()} raised {type(err).__qualname__} inside a sharded (FSDP2) forward or "
                    "backward pass, whose own collectives the other ranks wait in: they cannot be told, and fail "
                    f"at the process group's timeout or when this process exits ({err})"
                ) from err
            # Local slices may differ in finiteness: agree through one small flag, which also reports a
            # non-finite loss recorded on this rank.
            (bad,) = any_rank(
                [not all_finite(out)],
                self.device,
                self._local_error or self._failure.take(),
                NonFiniteLossError,
            )
            finite = not bad
        else:
            failure: Exception | None = None
            for index, weight in enumerate(self.probe.weights if self.probe is not None else ()):
                try:
                    out.add_(term(index), alpha=weight)
                except Exception as err:  # held for the collective below, which every rank takes
                    if not is_distributed() or is_agreed(err):
                        raise
                    failure = err
                    break
            finite = self._reduce(out, failure) if is_distributed() else True  # one flat collective
            out.div_(self._total_weight)
        if not finite and is_distributed():  # one process: the solver's own check decides
            raise NonFiniteOperatorError(
                "a Hessian-vector product is not finite on some rank: check the probe data and the parameters"
            )
        return out

    def _matmat(self, X: Tensor) -> Tensor:
        self._require_context()
        Xp = X.to(self.space.dtype)  # the passes' dtype (bfloat16 on request); products come back in X's
        first: Tensor | None = None  # batch 0's product, when choosing the backend computed it
        if self.backend is None:  # chosen on the first product: a gradient alone needs no backend
            self.backend, first = self._make_backend(self.requested, Xp)
            if self.backend.name == "finite_difference" and self.space.dtype == torch.bfloat16:
                warnings.warn(
                    "finite-difference products in bfloat16 are 1-39% off on the top eigenvalues (README, "
                    "'Memory'): "
                    + (
                        "sharded (FSDP2) parameters are measured in their own dtype: keep float32 master "
                        "weights (Trainer(precision='bf16-mixed')) for accurate values"
                        if self.space.sharded
                        else "measure in float32 (dtype=None) or with an exact backend for accurate values"
                    ),
                    UserWarning,
                    stacklevel=3,
                )
        self.backend.begin_block(Xp)

        def term(index: int) -> Tensor:  # in the passes' dtype: adding it to X's dtype converts as it goes
            return first if index == 0 and first is not None else self.backend.apply(index, Xp)

        return self._accumulate(term, torch.zeros_like(X))

    def loss(self) -> float:
        """The sample-weighted mean loss over all ranks' batches at the current parameters (forward passes
        only, with the products' dropout masks), identical on every rank: one small all-reduce.

        Raises:
            NonFiniteLossError: the loss of a batch (on any rank) is NaN or infinite.
        """
        self._require_context()
        self.n_loss += 1
        buffer = torch.zeros(2, dtype=torch.float64, device=self.device)  # weighted sum, total weight
        failure: Exception | None = None
        with torch.no_grad():
            if self.space.sharded:
                # Every rank runs the same passes (FSDP's all-gathers); a rank out of batches pads at weight 0.
                for index in range(self._n_batches):
                    own = index < len(self.probe)
                    weight = self.probe.weights[index] if own else 0.0
                    buffer[0] += weight * self._loss(index if own else 0).detach().double()
                    buffer[1] += weight
                # A caller that moves the shards between passes must be seen by the next one (see reshard).
                reshard(self.model)
            else:
                for index, weight in enumerate(self.probe.weights if self.probe is not None else ()):
                    try:
                        buffer[0] += weight * self.loss_at(index).detach().double()
                        buffer[1] += weight
                    except Exception as err:  # held for the collective below, which every rank takes
                        if not is_distributed() or is_agreed(err):
                            raise
                        failure = err
                        break
        if is_distributed():
            self._reduce(buffer, failure)
        value = float(buffer[0] / buffer[1])
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the mean loss is {value}: check the batches and the parameters")
        return value

    def gradient(self) -> Tensor:
        """The flat gradient of the same sample-weighted mean loss (same dropout masks as the products).

        After a product with double backward the batches' gradients are read off the cached gradient
        graphs, at no pass (and charge no work to a :class:`WorkMeter`); otherwise one backward per batch."""
        self._require_context()
        cache = self.backend if isinstance(self.backend, DoubleBackwardHVP) else None
        passes = [0]

        def term(index: int) -> Tensor:
            cached = None if cache is None else cache.cached_gradient(index)
            if cached is not None:  # in the passes' dtype, as below: adding it to the result converts it
                return self.space.flatten(cached)
            passes[0] += 1
            with torch.enable_grad():
                return self.space.gradient(
                    self._sharded_loss(index) if self.space.sharded else self.loss_at(index)
                )

        try:
            return self._accumulate(term, torch.zeros(self.n, dtype=self.dtype, device=self.device))
        finally:
            batches = self._n_batches if self.space.sharded else len(self.probe or ())
            self.n_gradient += passes[0] / max(1, batches)


_LOWER_PRECISION_WARNED: set[tuple[torch.dtype, torch.dtype]] = set()


def _warn_lower_precision(got: torch.dtype, wanted: torch.dtype) -> None:
    """Once per process and pair: the loss is less precise than the measurement it serves."""
    if (got, wanted) in _LOWER_PRECISION_WARNED or not _is_rank_zero():
        return
    _LOWER_PRECISION_WARNED.add((got, wanted))
    warnings.warn(
        f"the loss comes back in {got} while the measurement runs in {wanted}: every product is then only as "
        f"accurate as {got} (finite differences then take {got}'s step, and are up to 4e-4 off in float32 "
        f"against 1e-10 in float64 on the benchmark models; a tight {wanted} tolerance is out of reach. "
        "Hugging Face's causal-LM loss casts the logits to float32). Compute the loss in "
        f"{wanted} (e.g. a loss_fn on the logits kept in {wanted}) for a {wanted} measurement",
        UserWarning,
        stacklevel=5,
    )


class _LossFailed(Exception):
    """The loss itself raised while ``hvp="auto"`` tried double backward (not the double backward)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _TrialLoss:
    """``loss_at`` for the double-backward trial, telling the loss's own errors apart."""

    def __init__(self, loss_at: Callable[[int], Tensor]) -> None:
        self.loss_at = loss_at

    def __call__(self, index: int) -> Tensor:
        try:
            return self.loss_at(index)
        except Exception as err:
            raise _LossFailed(err) from err
