"""The parameters a measurement differentiates, and the flat vectors that live on them."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ParameterSpace"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)


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
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(
                "the model has no trainable parameters (requires_grad=True): unfreeze the parameters "
                "whose curvature you want to measure"
            )
        if patterns is not None:
            pats = [patterns] if isinstance(patterns, str) else patterns
            if not isinstance(pats, list | tuple) or not pats or not all(isinstance(p, str) for p in pats):
                raise ValueError(f"params must be a glob pattern or a list of them, got {patterns!r}")
            chosen = [(n, p) for n, p in trainable if any(fnmatch.fnmatchcase(n, pat) for pat in pats)]
            if not chosen:
                names = ", ".join(n for n, _ in trainable[:8])
                raise ValueError(
                    f"no trainable parameter name matches {pats}; names look like: {names}"
                    f"{', ...' if len(trainable) > 8 else ''}"
                )
            trainable = chosen
        dtypes = {p.dtype for _, p in trainable}
        if len(dtypes) > 1:
            raise ValueError(
                f"the selected parameters mix dtypes {sorted(map(str, dtypes))}: select parameters of one "
                "dtype with `params=` patterns"
            )
        own = dtypes.pop()
        if dtype is not None and dtype not in (*SUPPORTED_DTYPES, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, torch.float64 or torch.bfloat16, got {dtype}")
        if dtype is None and own not in SUPPORTED_DTYPES:
            raise ValueError(
                f"curvature is measured in float32 or float64, these parameters are {own}: pass "
                "dtype=torch.float32 to measure in float32, or keep float32 master weights "
                "(Trainer(precision='bf16-mixed') instead of 'bf16-true')"
            )
        dtype = own if dtype is None else dtype
        self.names = [n for n, _ in trainable]
        self.params = [p for _, p in trainable]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.n = sum(self.numels)
        self.dtype = dtype
        self.device = self.params[0].device

    def __len__(self) -> int:
        return len(self.params)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat ``(n,)`` vector (or the rows of an ``(n, b)`` block) shaped like the parameters."""
        pieces = torch.split(flat, self.numels, dim=0)
        tail = tuple(flat.shape[1:])
        return [piece.reshape(*shape, *tail) for piece, shape in zip(pieces, self.shapes, strict=True)]

    def values(self) -> Tensor:
        """The current parameter values as one flat vector (a copy)."""
        return self.flatten([p.detach() for p in self.params])
