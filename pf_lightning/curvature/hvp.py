r"""Hessian-vector product backends over one batch.

Each backend computes :math:`\nabla^2 L_b(\theta)\,V` for the mean loss :math:`L_b` of one probe batch
and a block :math:`V` of flat vectors, on the parameters of a :class:`ParameterSpace`:

- ``"double_backward"`` (exact): reverse-over-reverse. The gradient graph of each batch is built once
  per measurement and every product is one more backward pass through it (1.9-2.5x a gradient on
  CPU, REFERENCE §5), at the price of keeping that graph alive during the measurement.
- ``"forward_over_reverse"`` (exact): ``torch.func.jvp`` of ``torch.func.grad``, vmapped over the
  block, so a block of products costs little more than one on wide layers.
- ``"finite_difference"`` (approximate): the central difference of two ordinary gradients,
  :math:`(\nabla L(\theta + hv) - \nabla L(\theta - hv)) / 2h`. It needs no second-order autograd, so
  it works with fused attention kernels, sharded (DTensor) parameters and very large models.

The step is :math:`h = c\,\epsilon^{1/3} \max(1, \|\theta\|/\sqrt{n}) / \|v\|`, with :math:`\epsilon`
the machine epsilon of the precision the gradients are computed in (the parameters' dtype, or the
loss's when it comes back coarser, as a float32 loss of a float64 model does) and :math:`c` =
:data:`STEP_FACTOR`. :math:`\epsilon^{1/3}` balances the :math:`O(h^2)` truncation error of a central
difference against the :math:`O(\epsilon / h)` rounding error of the two gradients, for a move of unit
length whatever the norm of ``v``, grown only where the typical parameter
(:math:`\|\theta\|/\sqrt{n}`, its root mean square) is larger than 1 so that the move stays well
above the parameters' rounding. (Scaling by :math:`\|\theta\|` itself, as this module once did, takes
steps 6-54 times too long on ordinary networks: 0.6-13% error on the top eigenvalues in float32.)
The constant is measured (``benchmarks/fd_accuracy.py``, BENCHMARKS.md): an eigenvalue feels the
truncation error along its own eigenvector in full but the rounding noise only through its small
projection there, so the step that is best for eigenvalues is shorter than the one that balances
the two errors in a product's norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .params import ParameterSpace

__all__ = [
    "BACKENDS",
    "STEP_FACTOR",
    "DoubleBackwardHVP",
    "FiniteDifferenceHVP",
    "ForwardOverReverseHVP",
    "HVPBackend",
]

STEP_FACTOR = 0.3
"""The finite-difference step over ``eps^(1/3)`` of a unit move. The best step is model-dependent:
truncation dominates along the sharp directions of transformers, rounding where the top eigenvalues
are small. Measured on the top-5 eigenvalues in float32 (``benchmarks/fd_accuracy.py``), the largest
error over the benchmark models is 3.7e-4 at 0.3, against 4.2e-3 at 1 (the rule before) and 1.6e-4 at
0.1; 0.1 also puts a tanh MLP whose top eigenvalues are 0.03 at 1.4e-3 and short of convergence,
where 0.3 keeps it near 1e-4."""


def math_attention():
    """Scope attention to the math SDPA kernel: the fused kernels have no double backward and no
    forward-mode derivative (pytorch issues 116350, 117629, 128971). Graphs built inside it are
    differentiated inside it too: non-reentrant activation checkpointing re-runs the forward during that
    backward, where a fused kernel would give tensors other than those saved (torch's CheckpointError)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


LossAt = Callable[[int], Tensor]
"""``loss_at(i)``: the mean loss of probe batch ``i``, evaluated with that batch's fixed random state."""


class HVPBackend:
    """Computes ``H_b @ V`` for probe batch ``b``; holds per-measurement caches until :meth:`release`."""

    name = ""
    exact = True

    def __init__(self, space: ParameterSpace, loss_at: LossAt) -> None:
        self.space = space
        self.loss_at = loss_at
        self.graph_builds = 0  # gradient graphs built, one backward pass each (the work meters count them)

    def apply(self, index: int, V: Tensor) -> Tensor:  # pragma: no cover - interface
        """``(n, b)`` block of products of batch ``index``'s Hessian with the columns of ``V``."""
        raise NotImplementedError

    def begin_block(self, V: Tensor) -> None:
        """Called once before the products of every batch with the block ``V`` (one operator application)."""

    def release(self) -> None:
        """Free what the backend cached for the measurement."""


class DoubleBackwardHVP(HVPBackend):
    """Exact products by differentiating the gradient again (reverse over reverse).

    Args:
        cache_graphs: keep each batch's gradient graph for the whole measurement (fast: one backward
            per product) or rebuild it for every product (memory of one batch's graph at a time).
    """

    name = "double_backward"

    def __init__(self, space: ParameterSpace, loss_at: LossAt, cache_graphs: bool = True) -> None:
        super().__init__(space, loss_at)
        self.cache_graphs = cache_graphs
        self._graphs: dict[int, list[Tensor]] = {}
        self._versions: dict[int, tuple[int, ...]] = {}  # the parameters' in-place versions at each graph

    def _gradient_graph(self, index: int) -> list[Tensor]:
        if index in self._graphs:
            return self._graphs[index]
        with torch.enable_grad(), math_attention():
            loss = self.loss_at(index)
            self.graph_builds += 1
            try:
                grads = torch.autograd.grad(loss, self.space.params, create_graph=True, allow_unused=True)
            except RuntimeError as err:
                if "use_reentrant=True" not in str(err):
                    raise
                raise RuntimeError(
                    "double backward does not run through reentrant activation checkpointing "
                    "(torch.utils.checkpoint(..., use_reentrant=True)): finite differences of ordinary "
                    "backward passes do (hvp='finite_difference', where 'auto' falls back); "
                    "use_reentrant=False gives exact products"
                ) from err
        grads = [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.space.params, strict=True)
        ]
        if self.cache_graphs:
            self._graphs[index] = grads
            self._versions[index] = self._parameter_versions()
        return grads

    def _parameter_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.space.params)

    def cached_gradient(self, index: int) -> list[Tensor] | None:
        """Batch ``index``'s gradient read off its cached gradient graph (no pass), or None where none is
        cached or a measured parameter was updated in place since it was built (its version counter: a
        gradient elsewhere; writes through ``.data`` are not seen, and no measurement makes them)."""
        graph = self._graphs.get(index)
        if graph is None or self._versions.get(index) != self._parameter_versions():
            return None
        return [g.detach() for g in graph]

    def apply(self, index: int, V: Tensor) -> Tensor:
        grads = self._gradient_graph(index)
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:  # the loss is at most linear in these parameters
            return torch.zeros_like(V)
        pieces = self.space.unflatten(V)
        out = None if V.shape[1] == 1 else torch.zeros_like(V)  # one column is its own flat product
        for col in range(V.shape[1]):
            with math_attention():  # a checkpointed forward re-run here must take the graph's kernel
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    self.space.params,
                    grad_outputs=[pieces[i][..., col] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
            if out is None:
                return self.space.flatten(hv).unsqueeze(1)
            out[:, col] = self.space.flatten(hv)
        return out

    def release(self) -> None:
        self._graphs.clear()
        self._versions.clear()


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``torch.func.functional_call`` can rebind the
    model's parameters inside a user's loss function."""

    def __init__(self, model: nn.Module, loss_at: LossAt) -> None:
        super().__init__()
        self.model = model
        self._loss_at = loss_at

    def forward(self, index: int) -> Tensor:
        return self._loss_at(index)


class ForwardOverReverseHVP(HVPBackend):
    """Exact products by ``torch.func.jvp`` of ``torch.func.grad``, vmapped over the block.

    Does not run through ops without forward-mode derivatives (fused attention kernels, in-place
    updates of tensors captured from outside) nor through ``F.mse_loss`` on torch 2.13
    ("ZeroTensors are immutable"); ``hvp="auto"`` never picks it on its own.
    """

    name = "forward_over_reverse"

    def __init__(self, space: ParameterSpace, loss_at: LossAt, model: nn.Module) -> None:
        super().__init__(space, loss_at)
        self._wrapper = _LossModule(model, loss_at)
        self._keys = ["model." + name for name in space.names]
        # functional_call swaps tensors into the parameter slots and, for a module reachable under two names
        # (`self.fast = torch.compile(self.net)` beside `self.net`, a layer kept twice), puts a functorch
        # tensor back into one (torch 2.13): the model's own loss then no longer depends on its parameters.
        self._slots = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()]

    def apply(self, index: int, V: Tensor) -> Tensor:
        from torch.func import functional_call, grad, jvp, vmap

        primals = {key: p.detach() for key, p in zip(self._keys, self.space.params, strict=True)}

        def loss_of(params: dict[str, Tensor]) -> Tensor:
            return functional_call(self._wrapper, params, (index,), strict=False)

        grad_fn = grad(loss_of)

        def hvp(tangents: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(grad_fn, (primals,), (tangents,))[1]

        # vmap over the block's columns: move them to the leading dimension of each piece.
        pieces = [piece.movedim(-1, 0) for piece in self.space.unflatten(V)]
        tangents = dict(zip(self._keys, pieces, strict=True))
        # Outside the transforms nothing is recorded: the parameters left out of the measurement still
        # require grad, and without no_grad every product would carry (and keep alive) a graph through them.
        with torch.no_grad(), math_attention():
            try:
                out = vmap(hvp, randomness="same")(tangents)
            except (NotImplementedError, RuntimeError) as err:
                # a kernel without forward-mode AD (LSTM, some fused ops); F.mse_loss's on torch 2.13
                if not isinstance(err, NotImplementedError) and "ZeroTensors are immutable" not in str(err):
                    raise
                reason = str(err).splitlines()[0][:200]
                raise NotImplementedError(
                    f"hvp='forward_over_reverse' does not run on this model ({reason}): use "
                    "hvp='double_backward', or 'auto' (double backward, finite differences where it fails)"
                ) from err
            finally:
                for module, name, param in self._slots:
                    if module._parameters.get(name) is not param:
                        module._parameters[name] = param
        return torch.cat([out[key].reshape(V.shape[1], -1) for key in self._keys], dim=1).mT.contiguous()


class FiniteDifferenceHVP(HVPBackend):
    """Products by central differences of two ordinary gradients (no second-order autograd).

    The parameters are moved to ``theta +- h v`` in place and copied back from a saved copy after each
    product, so they end bit-identical. The step (module docstring) is set by the precision of the
    gradients: the parameters' dtype, or the loss's when the first gradient shows it coarser (that
    column is then taken again at the coarser step; a loss cast down only at its very end keeps
    float64-accurate gradients, and the coarser step is then merely cautious: 3e-7 instead of 3e-12). On
    smooth losses the top five eigenvalues are within 4e-4 in float32 and 6e-10 in float64 of the exact
    ones on the benchmark models (BENCHMARKS.md, "Accuracy of finite differences"). Across a kink of a piecewise-linear activation (ReLU) the gradient jumps
    and the difference quotient is meaningless: prefer an exact backend for ReLU networks, or a
    smooth activation (GELU, SiLU, tanh) where only finite differences run.

    Args:
        relative_step: a fixed step per unit move, in place of ``STEP_FACTOR * eps^(1/3)``.
        column_norms: the global norms of the columns of a flat block (one all-reduce when vectors
            are sharded, so that every rank takes the same step).
    """

    name = "finite_difference"
    exact = False

    def __init__(
        self,
        space: ParameterSpace,
        loss_at: LossAt,
        relative_step: float | None = None,
        column_norms: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(space, loss_at)
        self.relative_step = relative_step
        self.precision = space.dtype  # of the gradients: the loss's dtype when it is coarser (see _gradient)
        self._column_norms = column_norms or (lambda X: torch.linalg.vector_norm(X, dim=0))
        self._saved: list[Tensor] | None = None
        self._scale = 1.0
        self._block: tuple[Tensor, list[float]] | None = None

    def begin_block(self, V: Tensor) -> None:
        # The step of each column depends on global norms: take them once per application, not per batch.
        self._block = (V, self._column_norms(V).tolist())

    def step(self) -> float:
        """The step of a unit move (before the parameter scale), for the gradients' precision."""
        if self.relative_step is not None:
            return self.relative_step
        return STEP_FACTOR * torch.finfo(self.precision).eps ** (1.0 / 3.0)

    def _gradient(self, index: int) -> Tensor:
        with torch.enable_grad():
            loss = self.loss_at(index)
            if loss.is_floating_point() and torch.finfo(loss.dtype).eps > torch.finfo(self.precision).eps:
                self.precision = loss.dtype
            return self.space.gradient(loss)

    def _shift(self, v: list[Tensor], h: float) -> None:
        with torch.no_grad():
            for p, saved, piece in zip(self.space.local_params(), self._saved, v, strict=True):
                p.copy_(saved)
                p.add_(piece, alpha=h)

    def apply(self, index: int, V: Tensor) -> Tensor:
        if self._saved is None:
            self._saved = [p.detach().clone() for p in self.space.local_params()]
            theta_norm = float(self._column_norms(self.space.values()[:, None])[0])
            self._scale = max(1.0, theta_norm / math.sqrt(self.space.global_n))
        out = None if V.shape[1] == 1 else torch.empty_like(V)  # one column is its own product
        norms = (
            self._block[1]
            if self._block is not None and self._block[0] is V
            else self._column_norms(V).tolist()
        )
        try:
            for col in range(V.shape[1]):
                v = V[:, col]
                v_norm = norms[col]
                if v_norm == 0.0 or not math.isfinite(v_norm):
                    column = torch.full_like(v, 0.0 if v_norm == 0.0 else float("nan"))
                else:
                    pieces = self.space.unflatten(v)
                    while True:  # twice at most per coarser precision: the first gradient may reveal it
                        precision = self.precision
                        h = self.step() * self._scale / v_norm
                        self._shift(pieces, h)
                        g_plus = self._gradient(index)
                        if self.precision == precision:
                            break
                    self._shift(pieces, -h)
                    column = g_plus.sub_(self._gradient(index)).div_(2.0 * h)  # in place: fresh gradients
                    del g_plus
                if out is None:
                    return column.to(V.dtype).unsqueeze(1)
                out[:, col] = column
                del column
        finally:
            self._restore()
        return out

    def _restore(self) -> None:
        if self._saved is not None:
            with torch.no_grad():
                for p, saved in zip(self.space.local_params(), self._saved, strict=True):
                    p.copy_(saved)

    def release(self) -> None:
        self._restore()
        self._saved = self._block = None


BACKENDS: dict[str, Any] = {
    "double_backward": DoubleBackwardHVP,
    "forward_over_reverse": ForwardOverReverseHVP,
    "finite_difference": FiniteDifferenceHVP,
}
