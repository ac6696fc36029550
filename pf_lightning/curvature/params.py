"""The parameters a measurement differentiates, and the flat vectors that live on them.

With FSDP2 (``DTensor`` parameters) the flat vectors hold this rank's slices only: ``n`` counts the
local entries and ``global_n`` the full length (see :mod:`pf_lightning.curvature.distributed`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._validation import Checks
from .distributed import ShardLayout, is_sharded, local_part, reshard

__all__ = ["ParameterSpace", "measurement_dtype", "select_parameters"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)
_check = Checks()


def select_parameters(
    model: nn.Module, patterns: str | Sequence[str] | None = None, *, argument: str = "patterns"
) -> list[tuple[str, nn.Parameter]]:
    """The trainable named parameters of ``model`` whose names match a glob pattern (all when ``None``).

    A parameter shared by several modules (tied embeddings: GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``) is listed once, under its first name, and matched by any of its names.

    Raises:
        ValueError: ``model`` is not a module, no trainable parameter, or ``patterns`` (called
            ``argument`` in the message) is not a pattern list, matches no trainable parameter, or holds a
            pattern that matches no parameter's name (frozen parameters' included).
    """
    _check.instance("model", model, nn.Module, "a torch.nn.Module")
    pats = _check.patterns(argument, patterns)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "the `model` has no trainable parameters (requires_grad=True): the measured parameters must "
            "require grad; unfreeze the ones whose curvature you want to measure"
        )
    if pats is None:
        return trainable
    pats = [pats] if isinstance(pats, str) else pats
    aliases: dict[int, list[str]] = {}
    try:
        every = list(model.named_parameters(remove_duplicate=False))
    except TypeError:  # a module overriding named_parameters without the keyword: its own names only
        every = trainable
    for name, p in every:
        aliases.setdefault(id(p), []).append(name)
    chosen = [
        (n, p)
        for n, p in trainable
        if any(fnmatch.fnmatchcase(alias, pat) for alias in aliases.get(id(p), [n]) for pat in pats)
    ]
    if not chosen:
        names = ", ".join(n for n, _ in trainable[:8])
        raise ValueError(
            f"`{argument}` must match a trainable parameter's name: no trainable parameter name matches "
            f"{pats}; names look like: {names}{', ...' if len(trainable) > 8 else ''}"
        )
    names_of_all = {name for name, _ in model.named_parameters()} | {n for ns in aliases.values() for n in ns}
    unmatched = [pat for pat in pats if not any(fnmatch.fnmatchcase(name, pat) for name in names_of_all)]
    if unmatched:  # a typo in one pattern of several would measure a smaller block without a word
        raise ValueError(
            f"`{argument}` must be patterns that each match a parameter's name: {unmatched} match none "
            f"(the others match {len(chosen)} trainable parameter(s)); correct or drop "
            f"{'it' if len(unmatched) == 1 else 'them'}"
        )
    return chosen


def measurement_dtype(module: nn.Module, dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype a callback measures in: ``dtype`` when given; otherwise float32 for a module with
    half-precision trainable weights (bfloat16 or float16 passes are too coarse for the solver), and
    ``None`` (the parameters' own) for any other; sharded (FSDP2) ones are measured in their own dtype,
    named where it is a half-precision one (a bf16-true FSDP2 fit with a default monitor was refused, naming no
    fix: an outside trial)."""
    if dtype is not None:
        return dtype
    trainable = [p for p in module.parameters() if p.requires_grad]
    half = {p.dtype for p in trainable} & {torch.float16, torch.bfloat16}
    if not half:
        return None
    if any(is_sharded(p) for p in trainable):
        return next(iter(half)) if len(half) == 1 else None  # two: ParameterSpace names the mix
    return torch.float32


class ParameterSpace:
    """An ordered set of named parameters and the map between them and one flat vector.

    Args:
        model: the module whose parameters are measured.
        patterns: glob patterns on parameter names (``"blocks.*.attn.*"``); ``None`` takes every
            trainable parameter. Parameters with ``requires_grad=False`` are never included.
        dtype: the dtype the measurement runs in, when it differs from the parameters' own.

    Raises:
        ValueError: no trainable parameter, no name matching the patterns, mixed or unsupported dtypes.
    """

    def __init__(
        self,
        model: nn.Module,
        patterns: str | Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(model, nn.Module):  # anything else is named by select_parameters
            reshard(model)  # a forward pass without backward (a validation loop) leaves FSDP2's root gathered
        trainable = select_parameters(model, patterns)
        meta = [n for n, p in trainable if p.device.type == "meta"]
        if meta:
            raise ValueError(
                f"the selected parameters ({', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}) are on the "
                "'meta' device, which holds no values: materialize them first (module.to_empty(device=...) "
                "and initialize, or load a checkpoint)"
            )
        dtypes = {p.dtype for _, p in trainable}
        if len(dtypes) > 1:
            raise ValueError(
                f"the selected parameters mix dtypes {sorted(map(str, dtypes))}: select parameters of one "
                "dtype with `params=` patterns"
            )
        own = dtypes.pop()
        _check.dtype("dtype", dtype, (*SUPPORTED_DTYPES, torch.bfloat16))
        if dtype is None and own not in SUPPORTED_DTYPES:
            raise ValueError(
                f"`dtype` must be given for {own} parameters (curvature is measured in float32 or float64): "
                "pass dtype=torch.float32 to measure in float32, or keep float32 master weights "
                "(Trainer(precision='bf16-mixed') instead of 'bf16-true')"
            )
        dtype = own if dtype is None else dtype
        self.names = [n for n, _ in trainable]
        self.params = [p for _, p in trainable]
        sharded = [is_sharded(p) for p in self.params]
        self.sharded = all(sharded)
        if any(sharded) and not self.sharded:
            raise ValueError(
                "some selected parameters are sharded DTensors and some are not: apply fully_shard to the "
                "whole model, or select one kind with `params=` patterns"
            )
        if self.sharded and dtype != own:
            raise ValueError(
                f"sharded (FSDP2) parameters are measured in their own dtype {own}, not {dtype}: pass dtype=None, "
                "or train with parameters of the dtype to measure in (float32 master weights: "
                "Trainer(precision='bf16-mixed'))"
            )
        self.layout = ShardLayout(self.params) if self.sharded else None
        local = self.local_params()
        self.shapes = [t.shape for t in local]
        self.numels = [t.numel() for t in local]
        self.n = sum(self.numels)
        self.global_n = self.layout.global_n if self.layout is not None else self.n
        self.dtype = dtype
        self.device = local[0].device
        self._checked = self._backward_only = False  # whether autograd.grad runs through the model

    def __len__(self) -> int:
        return len(self.params)

    def local_params(self) -> list[Tensor]:
        """The parameters, or for sharded ones this rank's slices (views: writing to them moves the model)."""
        return [local_part(p) for p in self.params]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (local slices of DTensors) into one flat vector."""
        return torch.cat([_dense(local_part(t)).reshape(-1) for t in tensors])

    def local_rows(self, X: Tensor) -> Tensor:
        """This rank's rows of a global ``(global_n, b)`` block (the block itself when not sharded)."""
        return X if self.layout is None else self.layout.local_rows(X)

    def gradient(self, loss: Tensor) -> Tensor:
        """The flat gradient of ``loss`` (local slices when sharded; then already reduced over ranks).

        Plain parameters use ``torch.autograd.grad`` (``.grad`` untouched). Sharded ones need an ordinary
        ``backward``: FSDP2 connects its sharded parameters to the graph only through the hooks that
        reduce-scatter gradients into ``.grad``; so do models with reentrant activation checkpointing
        (``torch.utils.checkpoint(..., use_reentrant=True)`` refuses ``autograd.grad``), found on the
        first gradient. A ``backward`` also fills the ``.grad`` of every other leaf the loss uses (the
        model's are set aside and restored by the measurement; tensors a ``loss_fn`` closes over are not)
        and runs ``.grad`` hooks, as a training backward would. Their ``.grad`` is cleared before and after; the caller
        (:func:`~pf_lightning.curvature.state.measurement_context`) restores the training run's own.
        """
        if not self.sharded and not self._backward_only:
            try:
                # The graph is kept until it is known that autograd.grad runs through it: reentrant
                # checkpointing refuses it (after consuming part of the graph) but allows backward.
                grads = torch.autograd.grad(
                    loss,
                    self.params,
                    allow_unused=True,
                    materialize_grads=True,
                    retain_graph=not self._checked,
                )
                self._checked = True
                return self.flatten(grads)
            except RuntimeError as err:
                if self._checked or "use_reentrant=True" not in str(err):
                    raise
                self._backward_only = self._checked = True  # torch.utils.checkpoint(use_reentrant=True)
        for p in self.params:
            p.grad = None
        loss.backward()
        out = self.flatten([torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]).detach()
        for p in self.params:
            p.grad = None
        return out

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat ``(n,)`` vector (or the rows of an ``(n, b)`` block) shaped like the parameters."""
        pieces = torch.split(flat, self.numels, dim=0)
        tail = tuple(flat.shape[1:])
        return [piece.reshape(*shape, *tail) for piece, shape in zip(pieces, self.shapes, strict=True)]

    def values(self) -> Tensor:
        """The current parameter values as one flat vector (a copy; local slices when sharded)."""
        return self.flatten([p.detach() for p in self.local_params()])


def _dense(t: Tensor) -> Tensor:
    """``t``, or the dense form of a sparse gradient (``nn.Embedding(sparse=True)`` makes one)."""
    return t.to_dense() if t.is_sparse else t
