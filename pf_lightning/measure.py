"""The measurement outside Lightning: eigenpairs of a model's loss Hessian in one call."""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._validation import Checks, show
from .curvature import (
    HessianOperator,
    NonFiniteLossError,
    ParameterSpace,
    PreconditionedOperator,
    optimizer_preconditioner,
    optimizer_update,
    optimizer_weight_decay,
)
from .curvature.distributed import LocalFailure, all_reduce_sum, is_distributed, reduce_agreed, world_size
from .curvature.operator import check_arguments
from .curvature.precondition import check_diagonal
from .curvature.state import drawn_quietly
from .linalg import EigenResult, NonFiniteOperatorError, lanczos, lobpcg
from .linalg._common import WHICH, default_budget, guard_count, wanted_pairs
from .linalg.density import SpectralDensity, slq_density
from .linalg.trace import TraceEstimate, hutchinson_trace, hutchpp_trace
from .probe import ProbeSet, couples_samples, sample_count, sample_slice
from .stability.optimizers import step_dynamics, update_threshold

__all__ = [
    "METHODS",
    "MeasurementSpec",
    "eigenvalue_stderr",
    "hessian_density",
    "hessian_eigenpairs",
    "hessian_trace",
    "loss_of",
    "output_loss",
]

METHODS = ("auto", "lanczos", "lobpcg")
WARM_INFO = ("warm_costs", "warm_method", "warm_streak", "warm_retry")
"""The entries of a warm result's ``info`` that choose the next warm start (kept in checkpoints)."""
BLOCK_MARGIN = 0.85
"""The block warm start is taken over Lanczos when its last cost was at most this fraction of Lanczos's:
where the two cost about the same (measurements far apart) the block's dearer linear algebra and its
occasional misses are not worth it; where it wins, it wins by 30-70% (BENCHMARKS.md, "Measurement cost")."""
WARM_RETRY = 8
"""After this many block warm starts in a row, ``method="auto"`` takes one by Lanczos, and it waits at least
this many Lanczos ones before it tries a block again (see :func:`_warm_method`)."""
TRACE_METHODS = ("hutch++", "hutchinson")
_check = Checks()


def check_basis_size(check: Checks, basis_size: Any, k: int, which: str) -> int | None:
    """``basis_size`` is None or an int above the number of wanted pairs (``k``, twice that for both ends)."""
    n_wanted = wanted_pairs(k, which)
    return check.integer(
        "basis_size",
        basis_size,
        n_wanted + 1,
        allow_none=True,
        hint=f"more than the {n_wanted} eigenpairs wanted (k={k}, which={which!r}); "
        "the solver keeps basis_size + 1 parameter-sized vectors and as many more as the pairs wanted",
    )


def check_method(
    check: Checks,
    method: Any,
    basis_size: int | None,
    max_hvp: int | None = None,
    k: int = 1,
    which: str = "top",
    n: int | None = None,
) -> str:
    """``method`` is one of :data:`METHODS`; ``"lobpcg"`` takes no ``basis_size`` (a Lanczos setting) and a
    ``max_hvp`` of at least one block of products (the wanted pairs and their guards, at most ``n``, the
    operator's size where known)."""
    check.choice("method", method, METHODS)
    if method == "lobpcg" and basis_size is not None:
        raise check.error(
            f"`basis_size` must be None with method='lobpcg' (a Lanczos setting; LOBPCG holds about "
            f"11 (k + max(2, k // 2)) vectors), got {basis_size}: use method='lanczos' or 'auto', or drop it"
        )
    n_wanted = wanted_pairs(k, which)
    block = n_wanted + guard_count(n_wanted) if n is None else min(n_wanted + guard_count(n_wanted), n)
    if method == "lobpcg" and max_hvp is not None and max_hvp < block:
        raise check.error(
            f"`max_hvp` must be at least {block} with method='lobpcg' (one block of products for "
            f"k={k}, which={which!r}), got {max_hvp}: raise it, or use method='lanczos'"
        )
    return method


def check_max_hvp(check: Checks, max_hvp: Any, k: int, which: str) -> int | None:
    """``max_hvp`` is None or an int of at least one product per wanted pair (``k``, twice that for both
    ends): fewer cannot return ``k`` eigenvalues."""
    n_wanted = wanted_pairs(k, which)
    return check.integer(
        "max_hvp",
        max_hvp,
        n_wanted,
        allow_none=True,
        hint=f"at least one product per eigenpair wanted ({n_wanted}: k={k}, which={which!r})",
    )


def _check_measurement(
    model: Any, loss_fn: Any, batches: Any, hvp: Any, seed: Any, params: Any, dtype: Any
) -> int:
    """The arguments every measurement function shares, checked before any work; the seed, as an int."""
    seed = check_arguments(model, loss_fn, batches, hvp, seed, probe_name="batches")
    _check.patterns("params", params)
    _check.dtype("dtype", dtype)
    return seed


def loss_of(output: Any) -> Tensor | None:
    """The loss held by a model's or a ``training_step``'s output, or None when it holds none.

    A Tensor is the loss; a Mapping gives its ``"loss"`` entry (Lightning's dict, Hugging Face's
    ``ModelOutput``); any other object its ``.loss`` attribute (a dataclass output).
    """
    if isinstance(output, Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def output_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch).loss`` for a dict batch (Hugging Face style), ``model(batch).loss`` otherwise.

    The ready ``loss_fn`` for models that compute their own loss from labels in the batch, e.g.
    ``hessian_eigenpairs(model, output_loss, [{"input_ids": ids, "labels": labels}])``.

    Raises:
        ValueError: the output holds no loss (pass ``labels`` in the batch, or write a ``loss_fn``).
    """
    _check.instance("model", model, nn.Module, "a torch.nn.Module whose output holds a `loss`")
    output = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = loss_of(output)
    if loss is None:
        raise ValueError(
            f"the model returned {type(output).__name__} without a `loss`: put the labels in the batch "
            "(e.g. {'input_ids': ..., 'labels': ...}) or pass a loss_fn(model, batch) of your own"
        )
    return loss


def _warm_vectors(warm_start: EigenResult | None, n: int, which: str, n_wanted: int) -> Tensor | None:
    """A warm start's eigenvectors, the wanted end's first: a block solver keeps only its first columns, so
    a start from more pairs than wanted leads with the extreme ones (the most negative for
    ``"bottom"``, both ends alternately for ``"both"``; a result holds them in descending order)."""
    if warm_start is None:
        return None
    _check.instance("warm_start", warm_start, EigenResult, "None or a previous EigenResult")
    vectors = warm_start.eigenvectors
    if vectors.ndim != 2 or vectors.shape[0] != n or vectors.shape[1] == 0:
        raise ValueError(
            f"`warm_start` must hold eigenvectors of shape ({n}, k), got {tuple(vectors.shape)}: "
            "warm-start only from a result on the same parameters (and keep its eigenvectors)"
        )
    if warm_start.which not in (which, "both"):
        # Its vectors are exact eigenvectors of the other end: a block start converges on them at once.
        raise ValueError(
            f"`warm_start` holds which={warm_start.which!r} eigenvectors, which cannot start a which={which!r} "
            f"measurement: pass a result measured with "
            f"{'which=' + repr(which) + ' or ' if which != 'both' else ''}which='both', or warm_start=None"
        )
    width = vectors.shape[1]
    if which == "top" or width <= n_wanted:  # the block keeps every column: no reordered copy
        return vectors
    if which == "bottom":
        order = list(range(width - 1, -1, -1))
    else:
        order = [i for pair in zip(range(width), range(width - 1, -1, -1), strict=True) for i in pair]
        order = list(dict.fromkeys(order))  # each column once: the two ends meet in the middle
    return vectors[:, order]


def _warm_method(warm_start: EigenResult, n_wanted: int, max_hvp: int | None) -> tuple[str, dict]:
    """The warm start ``method="auto"`` takes, and the bookkeeping its result carries to the next one.

    Two warm starts, each best in its own regime: ``"block"``, LOBPCG from the previous eigenvectors and
    their ``neighbours`` (``k + max(2, k // 2)`` products where nothing moved, a few blocks where the
    parameters moved a little), and ``"lanczos"``, Lanczos from the sum of both plus a random vector (cheaper
    where the top directions rotate between measurements, as at the edge of stability 100 steps apart,
    and for large ``k``). The product count of each one's last run is carried from result to result
    (``info["warm_costs"]``). The block one is taken when it was clearly cheaper (:data:`BLOCK_MARGIN`),
    Lanczos otherwise; after :data:`WARM_RETRY` measurements in a row with one, the other is tried again
    (a direction rising into the top ``k`` from below the block's guards is found by Lanczos then at the
    latest), and each block retry that does not pay doubles the wait before the next one (at most 64).
    The first warm start is a block one. A warm start whose eigenvalues repeat one (:func:`_repeated`: an
    exact multiplicity, measured by a block) starts a block every time: Lanczos from one vector holds one
    copy of each eigenvalue, and its Krylov space closed on the next distinct ones, converged (an outside
    trial's last layer under MSE: [1.0698, 0.9708, 0.5422] for three times 1.0698). The choice depends on
    product counts and the measured values only: the same in every run.
    """
    info = warm_start.info
    costs = dict(info.get("warm_costs", {}))
    last, streak = info.get("warm_method"), info.get("warm_streak", 0)
    wait = info.get("warm_retry", WARM_RETRY)
    if last == "block" and streak == 1 and "lanczos" in costs:  # a block retry just ran: did it pay?
        wait = WARM_RETRY if costs["block"] <= BLOCK_MARGIN * costs["lanczos"] else min(2 * wait, 64)
    if "block" not in costs:
        choice = "block"
    elif "lanczos" not in costs:
        choice = "lanczos"
    else:
        choice = "block" if costs["block"] <= BLOCK_MARGIN * costs["lanczos"] else "lanczos"
        if choice == last and streak >= (wait if choice == "lanczos" else WARM_RETRY):
            choice = "lanczos" if choice == "block" else "block"
    if _repeated(warm_start) is not None:
        choice = "block"
    if choice == "block" and max_hvp is not None and max_hvp < n_wanted + guard_count(n_wanted):
        choice = "lanczos"  # not even one block of products
    bookkeeping = (costs, choice, streak + 1 if choice == last else 1, wait)
    return choice, dict(zip(WARM_INFO, bookkeeping, strict=True))


def _repeated(result: EigenResult) -> float | None:
    """An eigenvalue a converged Lanczos result holds twice, or None.

    Generic Hessian spectra do not repeat an eigenvalue; a Krylov space from one start vector holds each
    once, so two converged copies mean an exact multiplicity that rounding exposed once and may hide
    again (two of a last linear layer's ten under MSE: [1.5129459, 1.5129458, 0.3155] for three times
    1.5129). Two Ritz values of one eigenvalue agree to about the square of the tolerance times λ over the
    gap to the rest of the spectrum (their error is of the residual's square over the gap), and to the
    dtype's rounding: closer than ``max(10 tol², 100 eps)`` relative counts, for gaps down to a tenth of λ
    (README, "What a residual test cannot see"; distinct eigenvalues 0.05% apart at ``tol=1e-3`` do not).
    Values below 1% of the largest, zero to the tolerance (``converged_mask``), do not count."""
    if not result.all_converged or result.eigenvalues.numel() < 2:
        return None
    values = torch.sort(result.eigenvalues.detach().double().cpu()).values
    magnitude = values.abs()
    floor = 1e-2 * float(magnitude.max())
    same = max(10 * result.tol**2, 100 * torch.finfo(result.eigenvalues.dtype).eps)
    close = (values.diff().abs() <= same * magnitude[1:]) & (magnitude[1:] > floor)
    return float(values[1:][close][0]) if bool(close.any()) else None


def _unwrap(model: nn.Module) -> nn.Module:
    """The module to differentiate: DDP's wrapper does not support ``torch.autograd.grad``, and
    ``torch.compile``'s wrapper names the parameters ``_orig_mod.*``; the original module has the same numbers
    (and the operator runs its compiled code eagerly)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return _unwrap(model.module)
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return _unwrap(model._orig_mod)
    if type(model).__name__ == "FullyShardedDataParallel":
        raise ValueError(
            "FSDP1 (FullyShardedDataParallel) wrappers are not supported: shard the model with FSDP2's "
            "fully_shard (Lightning: ModelParallelStrategy, fully_shard in configure_model), or use DDP"
        )
    return model


def hessian_eigenpairs(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Any,
    k: int = 5,
    *,
    which: str = "top",
    hvp: str = "auto",
    tol: float = 1e-3,
    max_hvp: int | None = None,
    warm_start: EigenResult | None = None,
    seed: int = 0,
    params: str | Sequence[str] | None = None,
    method: str = "auto",
    preconditioner: torch.optim.Optimizer | Tensor | None = None,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    cache_graphs: bool = True,
    basis_device: torch.device | str | None = None,
    basis_size: int | None = None,
    gradient: bool = False,
) -> EigenResult:
    """Top-k (and/or bottom-k) eigenpairs of the Hessian of the mean loss over ``batches``.

    The model is left exactly as it was: parameters, ``.grad``, buffers, modes and random states.
    Under an initialized ``torch.distributed`` process group, ``batches`` is this rank's shard and the
    result is that of the mean loss over all ranks' samples, identical on every rank (every rank must
    call it). With DDP each product costs one flat all-reduce; with FSDP2 (``fully_shard``) products go
    by finite differences and ``eigenvectors`` hold this rank's slices of the global vectors.

    Args:
        model: the module (not a DDP wrapper).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, the mean loss of one batch.
        batches: a list (or a ``DataLoader``) of batches, or one batch (a Tensor, tuple or dict).
        k: eigenpairs wanted (at each end for ``which="both"``).
        which: ``"top"`` (largest), ``"bottom"`` (most negative) or ``"both"``.
        hvp: ``"auto"``, ``"double_backward"``, ``"forward_over_reverse"`` or ``"finite_difference"``.
        tol: relative residual tolerance ``||Hv - lambda v|| <= tol * |lambda|``.
        max_hvp: budget of Hessian-vector products (default ``max(300, 40 * k)``), at least one per
            wanted pair; pairs that have not converged when it runs out are flagged in ``converged`` and
            warned about.
        warm_start: a previous result on the same parameters, of the same ``which`` or ``"both"``: its
            eigenvectors start the solver (the extreme ones first where it holds more than wanted).
        seed: seeds start vectors and the dropout masks held fixed during the measurement.
        params: glob patterns selecting the parameters (all trainable ones by default).
        method: ``"auto"``: cold, Lanczos (measured again by a cold LOBPCG block where it returned an
            eigenvalue twice, the sign of an exact multiplicity a one-vector Krylov space hides;
            ``info["repeated"]``); warm, LOBPCG from the previous eigenvectors and their
            ``neighbours`` as one block (``k + max(2, k // 2)`` products when nothing moved) where that was
            clearly cheaper the last time, Lanczos from the sum of both otherwise (see :func:`_warm_method`;
            ``info["warm_method"]``); ``"lanczos"`` (warm: from the sum of the previous eigenvectors, and of
            their ``neighbours`` where the previous result has them, unless ``basis_size`` is set)
            or ``"lobpcg"`` (a block method, warm-started from all previous eigenvectors, with
            ``max(2, k // 2)`` random guard vectors).
        preconditioner: an optimizer that preconditions (Adam family, RMSprop, Adagrad, Adadelta: the
            ``P`` its rule reads from its state, and its coupled weight decay ``W``) or a flat positive
            diagonal ``P``: then the eigenpairs are those of ``P^{-1/2} (H + W) P^{-1/2}`` (the
            preconditioned sharpness; ``W = 0`` for a diagonal).
        weights: sample count of each batch (counted from the leading dimension otherwise).
        dtype: measure in this dtype instead of the parameters' own. ``torch.bfloat16`` runs the
            passes in bfloat16 (half the memory of float32 activations and graphs) with solver vectors
            in float32; measured accuracy of the top eigenvalues: within 0.2-2% of float64 with the
            exact backends, 1-39% off with finite differences, which warn (README, "Memory").
        cache_graphs: with double backward, keep each batch's gradient graph during the measurement
            (the graph of a gradient holds that batch's activations: ``False`` keeps one at a time).
        basis_device: keep the solver's vectors (Krylov basis, LOBPCG blocks, the returned
            eigenvectors) on this device, e.g. ``"cpu"`` for models too large for the accelerator to
            hold them; only the vectors being multiplied go to the model's device. Memory on the
            model's device otherwise, in parameter-sized vectors: for Lanczos ``basis_size + 1`` (default
            ``max(2k + 10, 20)``) and one more, or at the end the ``k`` eigenvectors with their
            ``max(2, k // 2)`` neighbours (:func:`~pf_lightning.linalg.lanczos.lanczos_vectors`: 24 for
            ``k = 1``); about ``11 (k + max(2, k // 2))`` for LOBPCG; plus the products' own (finite
            differences: 3; double backward: each probe batch's graph) and the ``warm_start``'s eigenvectors.
        basis_size: Lanczos vectors kept between restarts (``None``: ``max(2k + 10, 20)``), for a model
            whose parameters the device (or the host, with ``basis_device``) holds only a few copies of:
            the solver then keeps ``basis_size + 1`` vectors and as many more as the pairs wanted, at least
            one (the product during a step, the eigenvectors at the end): 4 for the top eigenpair at
            ``basis_size=2``. Any value above the number of wanted pairs converges to
            the same eigenpairs; a small one takes more products (``basis_size=2``: 1.4-2.2 times the
            default's 20 for the top eigenpair to ``tol=1e-2`` on LMs of 0.8M-110M parameters; BENCHMARKS.md,
            "A small basis"; the bottom end, crowded near zero, 6-16 times on a small MLP, past the default
            ``max_hvp``). With it, ``method="auto"`` warm-starts Lanczos from the
            previous eigenvectors' sum (a block warm start holds ``11 (k + max(2, k // 2))`` vectors);
            ``method="lobpcg"`` refuses it.
        gradient: also return the gradient of the mean loss over ``batches`` (``EigenResult.gradient``,
            in the eigenvectors' layout and on their device; this rank's slices under FSDP2). With
            double backward and ``cache_graphs=True`` (the default) it is read off the gradient graphs
            the products cached, at no pass; otherwise (finite differences, forward over reverse,
            ``cache_graphs=False``) it costs one gradient.

    Returns:
        :class:`EigenResult` with eigenvalues in descending order; ``info["hvp"]`` names the backend.

    Raises:
        ValueError: a bad argument (the message names the fix).
        NonFiniteLossError: the loss of a probe batch is NaN or infinite.
        NonFiniteOperatorError: a Hessian-vector product came out NaN or infinite.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x = torch.eye(3)
        >>> y = torch.zeros(3, 1)
        >>> loss_fn = lambda m, batch: 0.5 * ((m(batch[0]) - batch[1]) ** 2).sum() / 3
        >>> result = hessian_eigenpairs(model, loss_fn, (x, y), k=1)
        >>> round(float(result.eigenvalues[0]), 6)  # H = x^T x / 3 = I / 3
        0.333333
    """
    seed = _check_measurement(model, loss_fn, batches, hvp, seed, params, dtype)
    k = _check.integer("k", k, 1)
    _check.choice("which", which, WHICH)
    tol = _check.number("tol", tol, above=0, below=1, hint="a relative residual tolerance such as 1e-3")
    max_hvp = check_max_hvp(_check, max_hvp, k, which)
    basis_size = check_basis_size(_check, basis_size, k, which)
    check_method(_check, method, basis_size)
    if preconditioner is not None:
        _check.instance(
            "preconditioner",
            preconditioner,
            (torch.optim.Optimizer, Tensor),
            "None, a preconditioning optimizer (Adam, RMSprop, ...) or a flat positive diagonal Tensor",
        )
    _check.flag("cache_graphs", cache_graphs)
    _check.usable_device("basis_device", basis_device)
    _check.flag("gradient", gradient)
    model = _unwrap(model)
    hessian = HessianOperator(
        model,
        loss_fn,
        batches,
        params=params,
        hvp=hvp,
        seed=seed,
        cache_graphs=cache_graphs,
        dtype=dtype,
        weights=weights,
    )
    n_wanted = wanted_pairs(k, which)
    if n_wanted > hessian.global_n:
        raise ValueError(
            f"`k` must be at most {hessian.global_n // wanted_pairs(1, which)} for {hessian.global_n} "
            f"parameters (which={which!r} asks for {n_wanted} eigenpairs), got {k}: lower k"
        )
    check_method(_check, method, None, max_hvp, k, which, n=hessian.global_n)
    op: HessianOperator | PreconditionedOperator = hessian
    X0 = None
    # This rank's own inputs (its slice of the preconditioner, its warm start; its probe shard in the
    # operator) are checked before the first collective, which reports a failure here to every rank.
    with hessian.local_step():
        if preconditioner is not None:
            shift = None
            if isinstance(preconditioner, torch.optim.Optimizer):
                diagonal, shift = optimizer_preconditioner(preconditioner, hessian.space)
            else:
                diagonal = preconditioner
                check_diagonal("preconditioner", diagonal, hessian.n)  # named as the caller knows it
            op = PreconditionedOperator(hessian, diagonal, shift)
            del diagonal, shift  # the operator holds what it needs: not two more vectors for the solve
        X0 = _warm_vectors(warm_start, op.n, which, n_wanted)
    with hessian:
        common = {
            "which": which,
            "tol": tol,
            "max_matvec": max_hvp,
            "seed": seed,
            "basis_device": basis_device,
        }
        if method == "lobpcg":
            result = lobpcg(op, k, X0=X0, **common)
        else:
            few_vectors = basis_size is not None  # the caller bounds memory: no block, no neighbours
            warm, bookkeeping = (
                ("lanczos", {})
                if X0 is None or method == "lanczos" or few_vectors
                else _warm_method(warm_start, n_wanted, max_hvp)
            )
            guards = None if X0 is None or few_vectors else warm_start.neighbours
            if guards is not None and not (guards.ndim == 2 and guards.shape[0] == X0.shape[0]):
                guards = None
            if warm == "block":
                block = torch.cat([X0, guards.to(X0.device, X0.dtype)], dim=1) if guards is not None else X0
                result = lobpcg(op, k, X0=block, **common)
            else:
                v0 = None
                if X0 is not None:
                    X0 = X0.to(dtype=op.dtype)
                    if guards is None:  # one previous eigenvector starts it as it is: a view, no vector more
                        v0 = X0[:, 0] if X0.shape[1] == 1 else X0.sum(dim=1)
                    else:
                        # The neighbours too: where the top two trade places within a fraction of a percent
                        # (at the edge of stability), the previous top vector is now the second one, and
                        # Lanczos from it converges there before the top can emerge from the random half
                        # of the start; the previous second vector, a neighbour, carries the new top.
                        v0 = X0.sum(dim=1)
                        for guard in guards.unbind(dim=1):
                            v0.add_(guard.to(v0.device, v0.dtype))
                neighbours = method == "auto" and not few_vectors
                result = lanczos(op, k, v0=v0, basis_size=basis_size, neighbours=neighbours, **common)
                repeated = _repeated(result) if neighbours and X0 is None else None
                if repeated is not None:
                    # A one-vector Krylov space holds each eigenvalue once: a second copy came from rounding
                    # alone, and more may be missing (a last layer under MSE: every eigenvalue C-fold). A
                    # cold block, which holds as many copies as its columns, measures again, within the
                    # products left (Lanczos's default budget where none was given).
                    left = (default_budget(n_wanted) if max_hvp is None else max_hvp) - result.n_hvp
                    if left >= n_wanted + guard_count(n_wanted):
                        block = lobpcg(op, k, X0=None, **{**common, "max_matvec": left})
                        block.info["repeated"] = repeated
                        result = replace(block, n_hvp=block.n_hvp + result.n_hvp)
                    else:
                        warnings.warn(
                            f"hessian_eigenpairs: the eigenvalue {repeated:.6g} came back twice, the sign of an "
                            "exact multiplicity Lanczos can miss copies of, and max_hvp leaves no products for a "
                            "block to measure again: raise max_hvp, or use method='lobpcg'",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                        result.info["repeated"] = repeated
            if bookkeeping:
                bookkeeping["warm_costs"][warm] = result.n_hvp
                result.info.update(bookkeeping)
        result.info.update(
            {"hvp": hessian.backend_name, "n_params": hessian.n, "sharded": hessian.space.sharded}
        )
        if preconditioner is not None:
            result.info["preconditioned"] = True
        if gradient:  # before leaving: the products' cached graphs hold it
            result = replace(result, gradient=hessian.gradient().to(result.eigenvectors.device))
    return result


STDERR_GROUPS = 8
"""The groups of the probe's samples :func:`eigenvalue_stderr` takes the spread over, by default."""


def split_samples(probe: ProbeSet, chunks: int, cut: bool = True) -> list[ProbeSet]:
    """The probe's samples in about ``chunks`` groups, in order: its batches dealt round-robin where it holds
    at least ``chunks`` of them (or where ``cut`` is False: a loss whose batches' samples interact, through
    batch normalization or in-batch negatives, must keep its batches whole), otherwise each batch cut
    along its samples (:func:`~pf_lightning.probe.sample_slice`; the batch's weight shared in proportion).
    Fewer groups where the batches are smaller.

    Raises:
        ValueError: a batch to cut holds its samples in a container that cannot be taken apart."""
    if len(probe) >= chunks or not cut:
        groups = [list(range(c, len(probe), chunks)) for c in range(min(chunks, len(probe)))]
        return [ProbeSet([probe.batches[i] for i in g], [probe.weights[i] for i in g]) for g in groups]
    pieces = -(-chunks // len(probe))
    out: list[tuple[Any, float]] = []
    for batch, weight in zip(probe.batches, probe.weights, strict=True):
        count = sample_count(batch)
        edges = [round(i * count / pieces) for i in range(pieces + 1)]
        for lo, hi in itertools.pairwise(edges):
            if hi > lo:
                out.append((sample_slice(batch, lo, hi), weight * (hi - lo) / count))
    return [ProbeSet([b], [w]) for b, w in out]


def eigenvalue_stderr(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Any,
    vector: Tensor,
    *,
    chunks: int = STDERR_GROUPS,
    cut: bool | None = None,
    hvp: str = "auto",
    seed: int = 0,
    params: str | Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> float:
    r"""The sampling error of an eigenvalue measured on ``batches``: the standard error of the Rayleigh
    quotient :math:`v^\top H v / v^\top v` of ``vector`` over groups of the probe's samples.

    The eigenvalue of the probe's Hessian is, to first order in the sample set, the sample-weighted mean
    of the quotients :math:`q_c = v^\top H_c v` of its groups (:func:`split_samples`, ``chunks`` of
    them); their spread says how far another probe of that size would put it. One product per group
    (about two over the whole probe, with each group's gradient graph). The groups are treated as
    independent draws: the weighted standard error ``sqrt(sum w_c^2 (q_c - q)^2 / (sum w_c)^2 *
    C / (C - 1))``. NaN where the probe gives fewer than two groups. ``cut``: whether batches may be cut
    into groups of their samples (``None``: unless the model has batch normalization, whose batch
    statistics are part of the loss; pass ``False`` for a loss that couples a batch's samples).

    Under ``torch.distributed`` ``batches`` is this rank's shard and ``vector`` what the eigenpair
    measurement returned (this rank's slices under FSDP2): every rank splits its own shard, group ``c`` is
    the union of the ranks' groups ``c`` (their count agreed on: the fewest any rank has, a rank with more
    dealing its groups round-robin into that many), and the result is the same on every rank.

    Raises:
        ValueError: a bad argument: ``chunks`` below 2, ``vector`` not a finite non-zero flat Tensor of
            the measured parameters' length (this rank's slices under FSDP2).
    """
    seed = _check_measurement(model, loss_fn, batches, hvp, seed, params, dtype)
    chunks = _check.integer("chunks", chunks, 2, hint="a spread needs two groups at least")
    if cut is not None:
        _check.flag("cut", cut)
    if (
        not isinstance(vector, Tensor)
        or vector.ndim != 1
        or not bool(torch.isfinite(vector).all())
        or not bool(vector.ne(0).any())
    ):
        _check.fail("vector", "a flat, finite, non-zero Tensor (an eigenvector of the measurement)", vector)
    model = _unwrap(model)
    if cut is None:
        cut = not couples_samples(model)
    device = next(model.parameters()).device  # of the collectives (NCCL reduces device tensors only)
    groups = (
        _agreed_groups(batches, chunks, cut, device) if is_distributed() else _groups(batches, chunks, cut)
    )
    if len(groups) < 2:
        return math.nan
    quotients = []
    for group in groups:
        with HessianOperator(model, loss_fn, group, hvp=hvp, seed=seed, params=params, dtype=dtype) as op:
            if vector.shape[0] != op.n:
                _check.fail("vector", f"of the {op.n} measured parameters' length", vector)
            v = vector.to(op.device, op.dtype)
            quotients.append(float(op.inner(v, op.matvec(v)) / op.inner(v, v)))
    q = torch.tensor(quotients, dtype=torch.float64)
    w = all_reduce_sum(
        torch.tensor([g.total_weight for g in groups], dtype=torch.float64, device=device)
    ).cpu()
    mean = (w * q).sum() / w.sum()
    n = len(groups)
    return float(((w**2 * (q - mean) ** 2).sum() / w.sum() ** 2 * n / (n - 1)).sqrt())


def _groups(batches: Any, chunks: int, cut: bool) -> list[ProbeSet]:
    return split_samples(batches if isinstance(batches, ProbeSet) else ProbeSet(batches), chunks, cut)


def _agreed_groups(batches: Any, chunks: int, cut: bool, device: torch.device) -> list[ProbeSet]:
    """This rank's groups of :func:`eigenvalue_stderr`, as many as every other rank's (one collective that
    also reports a rank's failure to read or split its shard)."""
    hold, groups = LocalFailure(), []
    with hold:
        groups = _groups(batches, chunks, cut)
    counts = torch.zeros(world_size(), dtype=torch.float64, device=device)
    counts[dist.get_rank()] = len(groups)
    reduce_agreed(counts, hold.take())
    count = int(counts.min())
    if count >= len(groups):
        return groups
    dealt = [groups[c::count] for c in range(count)]
    return [ProbeSet([b for g in d for b in g.batches], [w for g in d for w in g.weights]) for d in dealt]


def hessian_trace(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Any,
    *,
    n_hvp: int = 99,
    method: str = "hutch++",
    hvp: str = "auto",
    seed: int = 0,
    params: str | Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    probe_seed: int | None = None,
) -> TraceEstimate:
    """Stochastic trace of the Hessian of the mean loss (Hutch++ by default, or Hutchinson).

    Args:
        n_hvp: Hessian-vector products to spend.
        probe_seed: seed of the random probes (and Hutch++'s sketch); ``None``: ``seed``, which also fixes
            the dropout masks. A monitor draws new probes at each measurement of one operator.
        method: ``"hutch++"`` (Meyer et al. 2021; lower variance where a few eigenvalues dominate the
            trace, higher where a bulk of small ones makes most of it: on a 1,210-parameter tanh MLP at
            99 products a spread of 0.76 against Hutchinson's 0.50, over 30 seeds; an outside trial) or
            ``"hutchinson"``. Hutch++'s ``std_error`` is that of its probes' part alone: the sketch is
            random too, and over those seeds it ran about 20% small.
        The other arguments are those of :func:`hessian_eigenpairs`.
    """
    seed = _check_measurement(model, loss_fn, batches, hvp, seed, params, dtype)
    _check.choice("method", method, TRACE_METHODS)
    n_hvp = _check.integer("n_hvp", n_hvp, 3 if method == "hutch++" else 1)
    draws = seed if probe_seed is None else _check.seed("probe_seed", probe_seed)
    model = _unwrap(model)
    with HessianOperator(model, loss_fn, batches, params=params, hvp=hvp, seed=seed, dtype=dtype) as op:
        if method == "hutch++":
            return hutchpp_trace(op, n_matvec=n_hvp, seed=draws)
        return hutchinson_trace(op, n_samples=n_hvp, seed=draws)


def hessian_density(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Any,
    *,
    n_steps: int = 80,
    n_vectors: int = 2,
    hvp: str = "auto",
    seed: int = 0,
    params: str | Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    probe_seed: int | None = None,
) -> SpectralDensity:
    """Spectral density of the Hessian by stochastic Lanczos quadrature (``n_steps * n_vectors`` HVPs).

    ``probe_seed``: seed of the start vectors (``None``: ``seed``, which also fixes the dropout masks).
    The other arguments are those of :func:`hessian_eigenpairs`.
    """
    seed = _check_measurement(model, loss_fn, batches, hvp, seed, params, dtype)
    n_steps = _check.integer("n_steps", n_steps, 2)
    n_vectors = _check.integer("n_vectors", n_vectors, 1)
    draws = seed if probe_seed is None else _check.seed("probe_seed", probe_seed)
    model = _unwrap(model)
    with HessianOperator(model, loss_fn, batches, params=params, hvp=hvp, seed=seed, dtype=dtype) as op:
        return slq_density(op, n_steps=min(n_steps, op.global_n), n_vectors=n_vectors, seed=draws)


@dataclass(frozen=True)
class MeasurementSpec:
    """The settings every measurement of a fit shares, resolved once (the callbacks' one way in).

    A :class:`~pf_lightning.HessianEigenMonitor` builds it when a fit starts, from its arguments, the
    module (``dtype``) and the trainer (the probe set on the module's device); the monitor, the
    :class:`~pf_lightning.EdgeOfStabilityMonitor` reading it and the trace and density all measure
    through it, so they differentiate the same loss on the same probe with the same parameters,
    backend, seed and dtype. When ``hvp="auto"`` falls back to finite differences the monitor replaces
    its spec with one that asks for them directly (:func:`dataclasses.replace`).

    Attributes:
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        probe: the probe set.
        params: glob patterns of the measured parameters (None: all trainable ones).
        hvp: the HVP backend.
        seed: seeds start vectors and dropout masks.
        dtype: the measurement dtype.
        tol: relative residual tolerance of eigenpairs.
        max_hvp: products allowed per eigenpair measurement.
        basis_device: where the solver keeps its vectors.
        basis_size: Lanczos vectors kept between restarts (None: the solver's default).
        method: the eigensolver (:func:`hessian_eigenpairs`'s ``method``).
    """

    loss_fn: Callable[[nn.Module, Any], Tensor]
    probe: ProbeSet
    params: str | Sequence[str] | None = None
    hvp: str = "auto"
    seed: int = 0
    dtype: torch.dtype | None = None
    tol: float = 1e-3
    max_hvp: int | None = None
    basis_device: torch.device | str | None = None
    basis_size: int | None = None
    method: str = "auto"

    def eigenpairs(
        self,
        model: nn.Module,
        k: int,
        which: str = "top",
        *,
        warm_start: EigenResult | None = None,
        preconditioner: torch.optim.Optimizer | Tensor | None = None,
        gradient: bool = False,
    ) -> EigenResult:
        """:func:`hessian_eigenpairs` on the probe set with these settings.

        A ``warm_start`` that cannot serve (no eigenvectors, as from a checkpoint without them; vectors of
        another length, from other parameters or another sharding; non-finite ones; the other end's) starts
        cold instead of failing: the callbacks keep results across fits and resumes."""
        if warm_start is not None:
            vectors = warm_start.eigenvectors
            n = ParameterSpace(_unwrap(model), self.params, dtype=self.dtype).n
            usable = vectors.ndim == 2 and vectors.numel() > 0 and vectors.shape[0] == n
            usable = usable and warm_start.which in (which, "both")
            warm_start = warm_start if usable and bool(torch.isfinite(vectors).all()) else None
        return hessian_eigenpairs(
            model,
            self.loss_fn,
            self.probe,
            k,
            which=which,
            hvp=self.hvp,
            tol=self.tol,
            max_hvp=self.max_hvp,
            warm_start=warm_start,
            seed=self.seed,
            params=self.params,
            preconditioner=preconditioner,
            dtype=self.dtype,
            basis_device=self.basis_device,
            basis_size=self.basis_size,
            method=self.method,
            gradient=gradient,
        )

    def trace(self, model: nn.Module, n_hvp: int, probe_seed: int | None = None) -> TraceEstimate:
        """:func:`hessian_trace` on the probe set with these settings (its probes from ``probe_seed``)."""
        settings = self._operator_settings()
        return hessian_trace(model, self.loss_fn, self.probe, n_hvp=n_hvp, probe_seed=probe_seed, **settings)

    def density(self, model: nn.Module, n_steps: int, probe_seed: int | None = None) -> SpectralDensity:
        """:func:`hessian_density` on the probe set with these settings (its start vectors from
        ``probe_seed``)."""
        settings = self._operator_settings()
        return hessian_density(
            model, self.loss_fn, self.probe, n_steps=n_steps, probe_seed=probe_seed, **settings
        )

    def batch_sharpness(
        self,
        model: nn.Module,
        batches: Any,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        rel_stderr: float | None = None,
        max_batches: int | None = None,
    ) -> BatchSharpness:
        """:func:`batch_sharpness` on ``batches`` (mini-batches, not the probe) with these settings."""
        return batch_sharpness(
            model,
            self.loss_fn,
            batches,
            optimizer=optimizer,
            rel_stderr=rel_stderr,
            max_batches=max_batches,
            **self._operator_settings(),
        )

    def critical_sharpness(
        self,
        model: nn.Module,
        batches: Any,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        initial_step: float = 0.01,
        gradient_clip: tuple[float, str] | None = None,
    ) -> CriticalSharpness:
        """:func:`critical_sharpness` on ``batches`` with these settings (forward passes only: no backend)."""
        return critical_sharpness(
            _unwrap(model),
            self.loss_fn,
            batches,
            optimizer=optimizer,
            initial_step=initial_step,
            gradient_clip=gradient_clip,
            seed=self.seed,
            params=self.params,
            dtype=self.dtype,
        )

    def eigenvalue_stderr(
        self, model: nn.Module, vector: Tensor, chunks: int = STDERR_GROUPS, cut: bool | None = None
    ) -> float:
        """:func:`eigenvalue_stderr` of ``vector`` on the probe set with these settings."""
        settings = self._operator_settings()
        return eigenvalue_stderr(model, self.loss_fn, self.probe, vector, chunks=chunks, cut=cut, **settings)

    def operator(self, model: nn.Module, batches: Any = None) -> HessianOperator:
        """A :class:`~pf_lightning.HessianOperator` with these settings on the probe set (or ``batches``),
        for diagnostics that need gradients or single products."""
        return HessianOperator(
            _unwrap(model),
            self.loss_fn,
            self.probe if batches is None else batches,
            **self._operator_settings(),
        )

    def _operator_settings(self) -> dict[str, Any]:
        return {"params": self.params, "hvp": self.hvp, "seed": self.seed, "dtype": self.dtype}


@dataclass(frozen=True)
class BatchSharpness:
    """The batch sharpness of :func:`batch_sharpness`.

    Attributes:
        value: the mean over the measured batches of the per-batch quotient (``along``).
        stderr: its standard error, the sample standard deviation (ddof 1) over :math:`\\sqrt{n}` (NaN for
            one batch).
        n_batches: batches measured.
        n_skipped: batches skipped because their gradient was zero or their loss, gradient or product
            was not finite.
        n_hvp: Hessian-vector products spent.
        seconds: wall time.
        values: the per-batch quotients, in order.
        n_uphill: measured batches along whose update the loss rises at every step size
            (:math:`s^\\top \\tilde g_B < 0`, momentum against that batch's gradient): their quotient is
            negative and pulls the mean down, though the step raises that batch's loss (``along="update"``
            only; 0 otherwise).
        along: ``"gradient"`` (:math:`g_B^\\top H_B g_B / \\lVert g_B\\rVert^2`), ``"update"`` (along the
            optimizer's next update :math:`s`: :math:`s^\\top H_B s / s^\\top g_B`) or
            ``"preconditioned gradient"`` (:math:`x^\\top H_B x / x^\\top P x`, :math:`x = P^{-1} g_B`).
        threshold: the level the value is compared with (the edge): None without an optimizer.
    """

    value: float
    stderr: float
    n_batches: int
    n_skipped: int
    n_hvp: int
    seconds: float
    values: tuple[float, ...] = ()
    along: str = "gradient"
    threshold: float | None = None
    n_uphill: int = 0

    @property
    def ratio(self) -> float | None:
        """``value / threshold`` (1.0 is the edge), None without a threshold."""
        return None if self.threshold is None else self.value / self.threshold


def _update_per_unit_lr(optimizer: torch.optim.Optimizer, space: ParameterSpace, gradient: Tensor) -> Tensor:
    """The optimizer's next update over group 0's learning rate: the direction whose quotients compare
    with :func:`~pf_lightning.stability.update_threshold` (2/lr)."""
    return optimizer_update(optimizer, space, gradient).div_(float(optimizer.param_groups[0]["lr"]))


class _Quotient:
    """The direction a batch's quotient is taken along, from the optimizer's rule (one per measurement).

    Each batch gives :math:`(x^\\top (H_B + W) x) / (x^\\top \\tilde g_B)` with :math:`\\tilde g_B = g_B + W\\theta`
    the gradient the optimizer sees (``W`` its coupled weight decay): :math:`x = g_B` without an
    optimizer, :math:`x = P^{-1}\\tilde g_B` for a preconditioning one (so :math:`x^\\top\\tilde g_B =
    x^\\top P x`), and :math:`x = -\\Delta\\theta / \\eta` along its next update otherwise.
    """

    def __init__(self, model: nn.Module, params: Any, dtype: Any, optimizer: Any) -> None:
        self.optimizer, self.along, self.threshold = optimizer, "gradient", None
        self.diagonal = self.decay = self.theta = None
        if optimizer is None:
            return
        space = ParameterSpace(model, params, dtype=dtype)
        dynamics = step_dynamics(optimizer)
        self.space = space
        if dynamics.preconditioned:
            self.diagonal, self.decay = optimizer_preconditioner(optimizer, space)
            self.along, self.threshold = "preconditioned gradient", dynamics.threshold
        else:
            self.decay = optimizer_weight_decay(optimizer, space)
            self.along, self.threshold = "update", update_threshold(optimizer)
        self.theta = space.values() if bool(self.decay.any()) else None
        if self.theta is None:
            self.decay = None

    def _as(self, name: str, like: Tensor) -> Tensor:
        """``self.<name>`` in ``like``'s dtype and device, converted once for all batches."""
        value = getattr(self, name)
        if value.dtype != like.dtype or value.device != like.device:
            value = value.to(like)
            setattr(self, name, value)
        return value

    def __call__(self, gradient: Tensor) -> tuple[Tensor, Tensor]:
        """The direction ``x`` and the gradient the optimizer sees, for one batch's gradient."""
        seen = (
            gradient
            if self.theta is None
            else gradient + self._as("decay", gradient) * self._as("theta", gradient)
        )
        if self.optimizer is None:
            return gradient, gradient
        if self.diagonal is not None:
            return seen / self._as("diagonal", seen), seen
        return _update_per_unit_lr(self.optimizer, self.space, gradient).to(seen).neg_(), seen

    def curvature(self, op: HessianOperator, x: Tensor) -> float:
        product = op.matvec(x)  # the caller's own: added to in place
        if self.decay is not None:
            product.add_(self._as("decay", x) * x)
        return float(op.inner(x, product))


MIN_BATCHES_TO_STOP = 10
"""Batches :func:`batch_sharpness` measures before its ``rel_stderr`` test may stop it. A standard error
estimated from fewer is too noisy to stop on: from 3 batches, with a spread of 14% a batch (a tiny Llama
under AdamW), 9% of measurements stopped at once, each because its few batches happened to agree, and
reported 1.7% where their error was 7.5% (an outside trial's simulation of the rule)."""


def batch_sharpness(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Any,
    *,
    hvp: str = "auto",
    seed: int = 0,
    params: str | Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    rel_stderr: float | None = None,
    max_batches: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> BatchSharpness:
    r"""Batch sharpness (Andreyev & Beneventano, arXiv 2412.20553): the mean over mini-batches of

    .. math:: \frac{g_B^\top H_B\, g_B}{\lVert g_B\rVert^2},

    with :math:`g_B` and :math:`H_B` the gradient and Hessian of one mini-batch's mean loss: the curvature a
    mini-batch step meets along its own direction. Under mini-batch SGD it is this quantity, not
    :math:`\lambda_{\max}` of the full-batch Hessian, that rises towards :math:`2/\eta`. One gradient and one
    Hessian-vector product per batch (finite differences where second order is unavailable). The mean of
    the ratios is not the ratio of the means (their "expectation inside" variant, another quantity).

    Under an initialized ``torch.distributed`` process group the ``i``-th batches of all ranks form one
    mini-batch, the global batch that data-parallel training steps on: every rank must pass the same
    number of batches, and every rank returns the same result.

    With the ``optimizer`` that trains the model, the quotient follows its rule (REFERENCE §6.1), with
    :math:`\tilde g_B = g_B + W\theta` the gradient it sees under coupled weight decay :math:`W`:

    * a preconditioning optimizer (Adam family, RMSprop, Adagrad, Adadelta): the Rayleigh quotient of the
      pencil :math:`(H_B + W, P)` along :math:`x = P^{-1}\tilde g_B`, i.e. :math:`x^\top (H_B + W) x / x^\top P x`,
      compared with the optimizer's threshold (:math:`38/\eta` for Adam with :math:`\beta_1 = 0.9`), like the
      preconditioned sharpness;
    * any other (SGD with or without momentum, ASGD): the quotient along the optimizer's next update
      :math:`s = -\Delta\theta/\eta` (heavy ball: :math:`s = \beta v + g_B`),
      :math:`s^\top (H_B + W) s / s^\top \tilde g_B`, compared with :math:`2/\eta`: a quadratic's loss rises
      along the step exactly when it exceeds :math:`2/\eta`. At heavy ball's edge
      (:math:`\lambda = (2 + 2\beta)/\eta`, period-two oscillation, :math:`s = g/(1 + \beta)`) it is
      :math:`\lambda/(1 + \beta) = 2/\eta`. Batches whose :math:`s^\top \tilde g_B` is zero are skipped;
      a negative one (momentum against this batch's gradient) is kept, as in the paper's estimator.

    ``P``, ``W`` and the momentum are read from the optimizer's state, which is left untouched;
    :attr:`BatchSharpness.threshold` holds the level compared with.

    Args:
        model: the module (not a DDP wrapper).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, the mean loss of one batch.
        batches: an iterable of mini-batches (a list, or a ``DataLoader`` with the training batch size); a
            :class:`~pf_lightning.ProbeSet` among them is one mini-batch of several micro-batches (gradient
            accumulation: the mean loss over their union, one micro-batch in memory at a time).
        hvp: the HVP backend, as for :func:`hessian_eigenpairs`.
        seed: seeds the dropout masks of each batch (batch ``i`` uses ``seed + i``).
        params: glob patterns selecting the parameters.
        dtype: measure in this dtype.
        rel_stderr: stop once ``stderr <= rel_stderr * |value|`` (after at least
            :data:`MIN_BATCHES_TO_STOP` batches), like the estimator of the paper (0.5% there); None
            measures every batch given.
        max_batches: measure at most this many batches.
        optimizer: the optimizer training ``model``: take the quotient its rule gives (see above).

    Returns:
        :class:`BatchSharpness`.

    Raises:
        ValueError: a bad argument, or no batch with a finite, non-zero gradient.
        UnsupportedOptimizer: ``optimizer`` has no rule (:func:`~pf_lightning.stability.optimizer_rule`).
        PreconditionerUnavailable: a preconditioning ``optimizer`` before its first step.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False)
        >>> loss_fn = lambda m, b: 0.5 * ((m(b) ** 2).sum(dim=1)).mean()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> round(batch_sharpness(model, loss_fn, [x[:1], x[1:]]).value, 6)  # H_B = x_B^T x_B: 1 and 4
        2.5
    """
    _check.batches("batches", batches, single_batch=False)
    if isinstance(batches, tuple) and batches and all(isinstance(t, Tensor) for t in batches):
        _check.fail("batches", "a list of mini-batches", batches, "one (x, y) batch: wrap it in a list")
    seed = _check_measurement(model, loss_fn, batches, hvp, seed, params, dtype)
    rel_stderr = _check.number(
        "rel_stderr", rel_stderr, above=0, allow_none=True, hint="a relative error such as 0.02"
    )
    max_batches = _check.integer("max_batches", max_batches, 1, allow_none=True)
    if optimizer is not None:
        _check.instance(
            "optimizer", optimizer, torch.optim.Optimizer, "None or the torch.optim optimizer in use"
        )
    model = _unwrap(model)
    start = time.perf_counter()
    _same_count_on_every_rank(batches, model)
    quotient = _Quotient(model, params, dtype, optimizer)
    values: list[float] = []
    skipped = n_hvp = uphill = 0
    backend = hvp
    for index, batch in enumerate(drawn_quietly(batches)):
        if max_batches is not None and len(values) + skipped >= max_batches:
            break
        micro = batch if isinstance(batch, ProbeSet) else [batch]  # micro-batches of one mini-batch
        with HessianOperator(
            model, loss_fn, micro, params=params, hvp=backend, seed=(seed + index) % 2**32, dtype=dtype
        ) as op:
            try:
                x, seen = quotient(op.gradient())
                denominator = float(op.inner(x, seen))
                seen = None  # not held through the product
                if not (math.isfinite(denominator) and denominator != 0):
                    skipped += 1
                    continue
                curvature = quotient.curvature(op, x)
                backend = op.backend_name  # 'auto' settles on the first batch: no trial product after it
            except (NonFiniteLossError, NonFiniteOperatorError):
                skipped += 1
                continue
            finally:
                n_hvp += op.n_matvec
                x = seen = None  # not held through the next batch's gradient
        if not math.isfinite(curvature):
            skipped += 1
            continue
        values.append(curvature / denominator)
        uphill += denominator < 0
        if rel_stderr is not None and len(values) >= MIN_BATCHES_TO_STOP:
            mean, err = _mean_stderr(values)
            if err <= rel_stderr * abs(mean):
                break
    if not values and not skipped:
        raise ValueError(f"`batches` must hold a batch, got {show(batches)}, which yielded none")
    if not values:
        raise ValueError(
            f"no batch had a finite, non-zero gradient ({skipped} skipped): check the batches and the parameters"
        )
    mean, err = _mean_stderr(values)
    seconds = time.perf_counter() - start
    return BatchSharpness(
        mean,
        err,
        len(values),
        skipped,
        n_hvp,
        seconds,
        tuple(values),
        quotient.along,
        quotient.threshold,
        uphill,
    )


def _same_count_on_every_rank(batches: Any, model: nn.Module) -> None:
    """Under a process group every rank must measure as many batches (each product is a collective)."""
    if not is_distributed():
        return
    count = float(len(batches)) if hasattr(batches, "__len__") else -1.0
    device = next(model.parameters()).device
    extremes = torch.tensor([count, -count], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    if float(extremes[0]) != -float(extremes[1]):
        raise ValueError(
            "`batches` must hold the same number of mini-batches on every rank (the i-th batches of all ranks "
            f"form one global mini-batch), got from {-float(extremes[1]):g} to {float(extremes[0]):g}"
        )


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


@dataclass(frozen=True)
class CriticalSharpness:
    """The critical sharpness of :func:`critical_sharpness`.

    Attributes:
        value: :math:`2/\\eta_c` (0 when the loss never rose along the direction, up to
            :math:`2^{40}` times ``initial_step``, or stopped changing: a saturated network; ``inf`` when,
            with an ``optimizer``, its next update points uphill: the loss rises at every step size).
        step: :math:`\\eta_c`, within ``rel_tol`` (``inf`` when the loss never rose, 0 uphill).
        n_forward: forward passes over ``batches`` (each a pass over every batch), the first at
            :math:`\\eta = 0` included.
        n_backward: gradients computed (1 for the default direction, 0 for a given one).
        seconds: wall time.
        threshold: with an ``optimizer``, :math:`2/\\eta` (the step along its update is
            :math:`\\eta d`, so the next step raises the loss where ``value`` exceeds it); else None.
    """

    value: float
    step: float
    n_forward: int
    n_backward: int
    seconds: float
    threshold: float | None = None

    @property
    def ratio(self) -> float | None:
        """``value / threshold``: above 1 the optimizer's next step raises the loss (None without one)."""
        return None if self.threshold is None else self.value / self.threshold


def critical_sharpness(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Any,
    direction: Tensor | None = None,
    *,
    initial_step: float = 0.01,
    rel_tol: float = 0.01,
    max_forward: int = 60,
    seed: int = 0,
    params: str | Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    gradient_clip: tuple[float, str] | None = None,
) -> CriticalSharpness:
    r"""Critical sharpness (Kalra et al., arXiv 2601.16979): :math:`2/\eta_c`, with :math:`\eta_c` the smallest
    step :math:`\eta > 0` at which the mean loss over ``batches`` rises above its value at :math:`\theta`
    along :math:`\theta + \eta d`.

    Forward passes only for a given ``direction``, so it runs where second-order autograd cannot
    (FSDP2 shards, fused attention, checkpointing). On a quadratic
    :math:`L(\theta + \eta d) - L(\theta) = \eta g^\top d + \tfrac12\eta^2 d^\top H d`, so
    :math:`\eta_c = -2 g^\top d / d^\top H d` and the value is :math:`d^\top H d / (-g^\top d)`:
    the Rayleigh quotient :math:`g^\top H g / \lVert g\rVert^2` for :math:`d = -g` (8.125/4.25 = 1.912 in
    the example).

    The search brackets :math:`\eta_c` by doubling or halving ``initial_step``, then interpolates the
    root of :math:`(L(\theta + \eta d) - L(\theta))/\eta` (linear on a quadratic, so exact there) and checks
    it with two passes at :math:`(1 \pm \text{rel\_tol}/4)` times the root; bisection where that fails.
    A step at which the loss overflows counts as a rise. When ``max_forward`` runs out after the bracket
    was found, the midpoint of the bracket reached is returned.
    The model is left exactly as it was (parameters, buffers, modes, ``.grad``, random states).

    Args:
        model: the module (not a DDP wrapper).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: the batches whose sample-weighted mean loss is searched (this rank's under a process
            group, as for :func:`hessian_eigenpairs`).
        direction: a flat tensor over the measured parameters (``named_parameters()`` order, this rank's
            slices under FSDP2); default :math:`-\nabla L` (one gradient), or with ``optimizer`` its next
            update per unit learning rate, :math:`d = \Delta\theta/\eta`, computed by its rule from its state
            and the gradient over ``batches`` without stepping it (:func:`~pf_lightning.curvature.optimizer_update`).
        initial_step: the first step tried, e.g. the learning rate.
        rel_tol: relative accuracy of :math:`\eta_c`.
        max_forward: forward passes allowed.
        seed: seeds the dropout masks, fixed for every pass.
        params: glob patterns selecting the parameters ``direction`` runs over.
        dtype: run the passes in this dtype.
        optimizer: the optimizer training ``model`` (group 0's learning rate :math:`\eta`): search along
            its next update and compare with :math:`2/\eta` (``threshold``, ``ratio``). The ratio is
            :math:`1/\mu_c` for the smallest multiple :math:`\mu_c` of the actual step that raises the loss,
            whatever the optimizer: the edge (1.0) is where its next step overshoots. An update that
            points uphill on ``batches`` (momentum against their gradient, or coupled weight decay: the
            search runs on the loss itself, without the optimizer's L2 term) gives ``inf``, not an error.
        gradient_clip: ``(value, "norm" | "value")``: the gradient is clipped before the optimizer's rule
            takes it, as Lightning's ``gradient_clip_val`` and ``gradient_clip_algorithm`` do (and
            ``torch.nn.utils.clip_grad_norm_``: times ``min(1, value / (norm + 1e-6))``, the norm over the
            measured parameters that ``optimizer`` holds; or each entry clamped to ``[-value, value]``), so
            the search runs along the step the trainer takes. Only where the direction comes from the
            gradient. Lightning's norm also counts parameters outside ``params``, and under gradient
            accumulation it clips the accumulated gradient where this clips that of ``batches``.

    Returns:
        :class:`CriticalSharpness`.

    Raises:
        ValueError: a bad argument; a ``direction`` of the wrong length, not finite or zero; a direction
            along which the loss rises at every step tried (it points uphill); no bracket within
            ``max_forward`` passes.
        NonFiniteLossError: the loss at the current parameters is not finite.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        >>> loss_fn = lambda m, b: 0.5 * (m(b) ** 2).sum() / 2  # H = diag(1, 4) / 2 for b = diag(1, 2)
        >>> round(critical_sharpness(model, loss_fn, torch.diag(torch.tensor([1.0, 2.0]))).value, 3)
        1.912
    """
    seed = _check_measurement(model, loss_fn, batches, "finite_difference", seed, params, dtype)
    initial_step = _check.number(
        "initial_step", initial_step, above=0, hint="a step such as the learning rate"
    )
    rel_tol = _check.number("rel_tol", rel_tol, above=1e-9, below=1, hint="a relative accuracy such as 0.01")
    max_forward = _check.integer("max_forward", max_forward, 4)
    if direction is not None:
        _check.instance("direction", direction, Tensor, "None or a flat Tensor over the measured parameters")
    if optimizer is not None:
        _check.instance(
            "optimizer", optimizer, torch.optim.Optimizer, "None or the torch.optim optimizer in use"
        )
        if direction is not None:
            _check.fail(
                "direction", "None when `optimizer` is given (its next update is the direction)", direction
            )
    if gradient_clip is not None:
        if direction is not None:
            _check.fail(
                "gradient_clip", "None when `direction` is given (it clips the gradient)", gradient_clip
            )
        pair = isinstance(gradient_clip, tuple) and len(gradient_clip) == 2
        value = gradient_clip[0] if pair else None
        if not (
            pair
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
            and gradient_clip[1] in ("norm", "value")
        ):
            _check.fail("gradient_clip", 'None or a (value > 0, "norm" | "value") pair', gradient_clip)
    model = _unwrap(model)
    start = time.perf_counter()
    counter = {"forward": 0}
    with HessianOperator(
        model, loss_fn, batches, params=params, hvp="finite_difference", seed=seed, dtype=dtype
    ) as op:
        space, n_backward = op.space, 0
        uphill = False  # the optimizer's update against the gradient: the loss rises at every small step
        if direction is None:
            gradient, n_backward = op.gradient(), 1  # a fresh tensor: changed in place below
            if gradient_clip is not None:
                value, algorithm = float(gradient_clip[0]), gradient_clip[1]
                if algorithm == "value":
                    gradient.clamp_(-value, value)
                else:  # torch's clip_grad_norm_ over the optimizer's parameters, every rank's slice
                    counted = gradient
                    if optimizer is not None:
                        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
                        counted = gradient.clone()
                        for p, piece in zip(space.params, space.unflatten(counted), strict=True):
                            if id(p) not in held:
                                piece.zero_()
                        del piece  # a view of counted
                    norm = float(op.inner(counted, counted)) ** 0.5
                    del counted
                    gradient.mul_(min(1.0, value / (norm + 1e-6)))
            if optimizer is None:
                d = gradient.to(space.dtype).neg_()
            else:
                d = _update_per_unit_lr(optimizer, space, gradient)
                # The slope's sign, not the search, tells an update that points uphill: in float32 the loss's
                # rise at the small steps that show it is below the dtype's resolution, a change of exactly 0,
                # which a search reads as "not rising" (an outside trial: 1.8e8 for inf). A norm clip keeps
                # the sign (a positive factor); a value clip may not, and leaves it to the search.
                if gradient_clip is None or gradient_clip[1] == "norm":
                    uphill = float(op.inner(gradient, d.to(gradient.dtype))) > 0
            del gradient  # not needed in the search: d and the saved parameters are
        else:
            d = torch.zeros(space.n, dtype=space.dtype, device=space.device)  # where this rank's check fails
            # This rank's own check, reported to every rank by the next collective (the base loss).
            with op.local_step():
                if direction.dim() != 1 or direction.numel() != space.n:
                    raise ValueError(
                        f"`direction` must be a flat tensor of the {space.n} measured parameters "
                        f"(named_parameters() order), got shape {tuple(direction.shape)}"
                    )
                d = direction.detach().to(device=space.device, dtype=space.dtype)
        saved = [p.detach().clone() for p in space.local_params()]

        def rise(eta: float) -> float:
            """L(theta + eta d) - L(theta); inf where the loss overflows (it rose)."""
            if counter["forward"] >= max_forward:
                raise _OutOfPasses(
                    f"critical_sharpness: no bracket of the critical step within max_forward={max_forward} "
                    "passes: raise max_forward or give an initial_step closer to it"
                )
            with torch.no_grad():
                for p, value, piece in zip(space.local_params(), saved, space.unflatten(d), strict=True):
                    p.copy_(value)
                    p.add_(piece, alpha=eta)
            counter["forward"] += 1
            try:
                return op.loss() - base
            except NonFiniteLossError:  # agreed by every rank
                return math.inf

        try:
            counter["forward"] += 1
            base = op.loss()
            norm_sq = float(op.inner(d, d))  # over every rank's slice
            if not (math.isfinite(norm_sq) and norm_sq > 0):
                raise ValueError(
                    "`direction` must be finite and non-zero (a zero gradient has no critical step)"
                )
            try:
                step, fell = (
                    (0.0, True) if uphill else _critical_step(rise, float(initial_step), float(rel_tol))
                )
            except _Uphill:
                if optimizer is None:
                    raise
                step, fell = 0.0, True  # the optimizer's next step raises the loss at any size: eta_c = 0
            if not fell and direction is not None:
                warnings.warn(
                    "critical_sharpness: the loss fell below its value at no step tried along `direction` (its "
                    "changes at the small steps were below the dtype's resolution): the direction may point "
                    "uphill, which this search cannot tell; measure with dtype=torch.float64",
                    RuntimeWarning,
                    stacklevel=2,
                )
        finally:
            with torch.no_grad():
                for p, value in zip(space.local_params(), saved, strict=True):
                    p.copy_(value)
    value = 0.0 if math.isinf(step) else (math.inf if step == 0.0 else 2.0 / step)
    threshold = None if optimizer is None else update_threshold(optimizer)
    return CriticalSharpness(
        value, step, counter["forward"], n_backward, time.perf_counter() - start, threshold
    )


class _OutOfPasses(ValueError):
    """The line search ran out of forward passes."""


class _Uphill(ValueError):
    """The loss rose at every step tried along the direction."""


def _critical_step(rise: Callable[[float], float], eta: float, rel_tol: float) -> tuple[float, bool]:
    """The smallest eta > 0 with rise(eta) > 0, within rel_tol (inf if it never rises up to 2^40 eta, or
    falls by the same amount over three doublings: a saturated loss), and whether any step tried lowered
    the loss (below the dtype's resolution a step changes it by exactly 0, which is read as not rising: a
    direction uphill at every step that resolution shows looks like a descent with an unresolved dip)."""
    tiny, huge = eta * 2.0**-40, eta * 2.0**40
    changes: list[float] = []

    def tried(step: float) -> float:
        changes.append(rise(step))
        return changes[-1]

    r = tried(eta)
    if r > 0:  # halve down to a step where the loss does not rise
        hi, r_hi = eta, r
        while True:
            eta /= 2.0
            if eta < tiny:
                raise _Uphill(
                    "the loss rises along `direction` at every step tried: it points uphill (or initial_step "
                    "is far too large)"
                )
            r = tried(eta)
            if r <= 0:
                lo, r_lo = eta, r
                break
            hi, r_hi = eta, r
    else:  # double up to a step where it rises
        lo, r_lo, flat = eta, r, 0
        while True:
            eta *= 2.0
            if eta > huge or flat >= 3:
                return math.inf, min(changes) < 0
            r = tried(eta)
            if r > 0:
                hi, r_hi = eta, r
                break
            # Strictly below and unchanged: a plateau. A rise of exactly 0 is a step below the dtype's
            # resolution (bfloat16), not a plateau.
            flat = flat + 1 if r < 0 and abs(r - r_lo) <= 1e-9 * abs(r) else 0
            lo, r_lo = eta, r
    try:
        while hi - lo > rel_tol * lo:
            # rise(eta) / eta is linear in eta on a quadratic: its root is the critical step there.
            s_lo, s_hi = r_lo / lo, (r_hi / hi if math.isfinite(r_hi) else math.inf)
            root = (
                lo + (hi - lo) * (-s_lo) / (s_hi - s_lo)
                if math.isfinite(s_hi) and s_hi > s_lo
                else (lo + hi) / 2
            )
            if not lo < root < hi:
                root = (lo + hi) / 2
            below, above = root * (1 - rel_tol / 4), root * (1 + rel_tol / 4)
            probes = (below, above) if lo < below and above < hi else ((lo + hi) / 2,)
            for probe in probes:
                if not lo < probe < hi:  # the bracket moved past it
                    continue
                r = tried(probe)
                if r > 0:
                    hi, r_hi = probe, r
                else:
                    lo, r_lo = probe, r
    except _OutOfPasses:  # the bracket is found: its midpoint, within the width reached
        pass
    return (lo + hi) / 2, min(changes) < 0
