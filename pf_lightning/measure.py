"""The measurement outside Lightning: eigenpairs of a model's loss Hessian in one call."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import Checks
from .curvature import HessianOperator, ParameterSpace, PreconditionedOperator, optimizer_preconditioner
from .curvature.operator import check_arguments
from .curvature.precondition import check_diagonal
from .linalg import EigenResult, lanczos, lobpcg
from .linalg._common import WHICH
from .linalg.density import SpectralDensity, slq_density
from .linalg.trace import TraceEstimate, hutchinson_trace, hutchpp_trace
from .probe import ProbeSet

__all__ = [
    "METHODS",
    "MeasurementSpec",
    "hessian_density",
    "hessian_eigenpairs",
    "hessian_trace",
    "loss_of",
    "output_loss",
]

METHODS = ("auto", "lanczos", "lobpcg")
TRACE_METHODS = ("hutch++", "hutchinson")
_check = Checks()


def _check_measurement(
    model: Any, loss_fn: Any, batches: Any, hvp: Any, seed: Any, params: Any, dtype: Any
) -> None:
    """The arguments every measurement function shares, checked before any work."""
    check_arguments(model, loss_fn, batches, hvp, seed, probe_name="batches")
    _check.patterns("params", params)
    _check.dtype("dtype", dtype)


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


def _warm_vectors(warm_start: EigenResult | None, n: int) -> Tensor | None:
    if warm_start is None:
        return None
    _check.instance("warm_start", warm_start, EigenResult, "None or a previous EigenResult")
    vectors = warm_start.eigenvectors
    if vectors.ndim != 2 or vectors.shape[0] != n or vectors.shape[1] == 0:
        raise ValueError(
            f"`warm_start` must hold eigenvectors of shape ({n}, k), got {tuple(vectors.shape)}: "
            "warm-start only from a result on the same parameters (and keep its eigenvectors)"
        )
    return vectors


def _unwrap(model: nn.Module) -> nn.Module:
    """The module to differentiate: DDP's wrapper does not support ``torch.autograd.grad``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
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
        max_hvp: budget of Hessian-vector products (default ``max(300, 40 * k)``); pairs that have
            not converged when it runs out are flagged in ``converged`` and warned about.
        warm_start: a previous result on the same parameters: its eigenvectors start the solver.
        seed: seeds start vectors and the dropout masks held fixed during the measurement.
        params: glob patterns selecting the parameters (all trainable ones by default).
        method: ``"auto"`` (Lanczos, started from the previous eigenvectors when warm), ``"lanczos"``
            or ``"lobpcg"`` (a block method, warm-started from all previous eigenvectors).
        preconditioner: an optimizer that preconditions (Adam family, RMSprop, Adagrad, Adadelta: the
            ``P`` its rule reads from its state, and its coupled weight decay ``W``) or a flat positive
            diagonal ``P``: then the eigenpairs are those of ``P^{-1/2} (H + W) P^{-1/2}`` (the
            preconditioned sharpness; ``W = 0`` for a diagonal).
        weights: sample count of each batch (counted from the leading dimension otherwise).
        dtype: measure in this dtype instead of the parameters' own. ``torch.bfloat16`` runs the
            passes in bfloat16 (half the memory of float32 activations and graphs) with solver vectors
            in float32; measured accuracy of the top eigenvalues: within 0.2% of float64 with the
            exact backends, 1-10% with finite differences (too coarse a step in bfloat16).
        cache_graphs: with double backward, keep each batch's gradient graph during the measurement
            (the graph of a gradient holds that batch's activations: ``False`` keeps one at a time).
        basis_device: keep the solver's vectors (Krylov basis, LOBPCG blocks, the returned
            eigenvectors) on this device, e.g. ``"cpu"`` for models too large for the accelerator to
            hold them; only the vectors being multiplied go to the model's device. Memory on the
            model's device otherwise: ``basis_size + 1`` (default ``max(2k + 10, 20)``) plus about
            5 parameter-sized vectors for Lanczos, about ``11 (k + max(2, k // 2))`` for LOBPCG, plus
            the products' own (finite differences: 3; double backward: each probe batch's graph).

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
    _check_measurement(model, loss_fn, batches, hvp, seed, params, dtype)
    _check.integer("k", k, 1)
    _check.choice("which", which, WHICH)
    _check.number("tol", tol, above=0, below=1, hint="a relative residual tolerance such as 1e-3")
    _check.integer("max_hvp", max_hvp, 1, allow_none=True)
    _check.choice("method", method, METHODS)
    if preconditioner is not None:
        _check.instance(
            "preconditioner",
            preconditioner,
            (torch.optim.Optimizer, Tensor),
            "None, a preconditioning optimizer (Adam, RMSprop, ...) or a flat positive diagonal Tensor",
        )
    _check.flag("cache_graphs", cache_graphs)
    _check.usable_device("basis_device", basis_device)
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
    n_wanted = 2 * k if which == "both" else k
    if n_wanted > hessian.global_n:
        raise ValueError(
            f"`k` must be at most {hessian.global_n // (2 if which == 'both' else 1)} for {hessian.global_n} "
            f"parameters (which={which!r} asks for {n_wanted} eigenpairs), got {k}: lower k"
        )
    block = min(n_wanted + max(2, n_wanted // 2), hessian.global_n)
    if method == "lobpcg" and max_hvp is not None and max_hvp < block:
        raise ValueError(
            f"`max_hvp` must be at least {block} with method='lobpcg' (one block of products for "
            f"k={k}, which={which!r}), got {max_hvp}: raise it, or use method='lanczos'"
        )
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
        X0 = _warm_vectors(warm_start, op.n)
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
            v0 = None if X0 is None else X0.to(dtype=op.dtype).sum(dim=1)
            result = lanczos(op, k, v0=v0, **common)
        result.info.update(
            {"hvp": hessian.backend_name, "n_params": hessian.n, "sharded": hessian.space.sharded}
        )
        if preconditioner is not None:
            result.info["preconditioned"] = True
    return result


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
) -> TraceEstimate:
    """Stochastic trace of the Hessian of the mean loss (Hutch++ by default, or Hutchinson).

    Args:
        n_hvp: Hessian-vector products to spend.
        method: ``"hutch++"`` (Meyer et al. 2021; far lower variance when a few eigenvalues dominate,
            as in neural-network Hessians) or ``"hutchinson"``.
        The other arguments are those of :func:`hessian_eigenpairs`.
    """
    _check_measurement(model, loss_fn, batches, hvp, seed, params, dtype)
    _check.choice("method", method, TRACE_METHODS)
    _check.integer("n_hvp", n_hvp, 3 if method == "hutch++" else 1)
    model = _unwrap(model)
    with HessianOperator(model, loss_fn, batches, params=params, hvp=hvp, seed=seed, dtype=dtype) as op:
        if method == "hutch++":
            return hutchpp_trace(op, n_matvec=n_hvp, seed=seed)
        return hutchinson_trace(op, n_samples=n_hvp, seed=seed)


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
) -> SpectralDensity:
    """Spectral density of the Hessian by stochastic Lanczos quadrature (``n_steps * n_vectors`` HVPs).

    The other arguments are those of :func:`hessian_eigenpairs`.
    """
    _check_measurement(model, loss_fn, batches, hvp, seed, params, dtype)
    _check.integer("n_steps", n_steps, 2)
    _check.integer("n_vectors", n_vectors, 1)
    model = _unwrap(model)
    with HessianOperator(model, loss_fn, batches, params=params, hvp=hvp, seed=seed, dtype=dtype) as op:
        return slq_density(op, n_steps=min(n_steps, op.global_n), n_vectors=n_vectors, seed=seed)


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

    def eigenpairs(
        self,
        model: nn.Module,
        k: int,
        which: str = "top",
        *,
        warm_start: EigenResult | None = None,
        preconditioner: torch.optim.Optimizer | Tensor | None = None,
    ) -> EigenResult:
        """:func:`hessian_eigenpairs` on the probe set with these settings.

        A ``warm_start`` that cannot serve (no eigenvectors, as from a checkpoint without them; vectors of
        another length, from other parameters or another sharding; non-finite ones) starts cold instead
        of failing: the callbacks keep results across fits and resumes."""
        if warm_start is not None:
            vectors = warm_start.eigenvectors
            n = ParameterSpace(_unwrap(model), self.params, dtype=self.dtype).n
            usable = vectors.ndim == 2 and vectors.numel() > 0 and vectors.shape[0] == n
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
        )

    def trace(self, model: nn.Module, n_hvp: int) -> TraceEstimate:
        """:func:`hessian_trace` on the probe set with these settings."""
        return hessian_trace(model, self.loss_fn, self.probe, n_hvp=n_hvp, **self._operator_settings())

    def density(self, model: nn.Module, n_steps: int) -> SpectralDensity:
        """:func:`hessian_density` on the probe set with these settings."""
        return hessian_density(model, self.loss_fn, self.probe, n_steps=n_steps, **self._operator_settings())

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
