"""The models every curvature test runs on, and their independent dense references.

Each case builds a small model, a loss function and uneven probe batches. The reference Hessian is
computed by ``torch.func.hessian`` in float64 on a *pure* function of the parameters, written here
without any of pf_lightning's machinery:
- BatchNorm in train mode becomes a copy with ``track_running_stats=False`` (same output, no buffer
  update, which ``torch.func`` would reject);
- dropout becomes a multiplication by the mask that ``F.dropout`` draws from the seed the operator uses
  for that batch (``seed * 1_000_003 + index``): the operator must hold exactly those masks fixed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacfwd

SEED_STRIDE = 1_000_003


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def squared_error(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    # 0.5 * sum over outputs, mean over samples (Cohen et al.'s MSE); hand-written because
    # forward-over-reverse through F.mse_loss fails on torch 2.13 ("ZeroTensors are immutable").
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(dim=-1).mean()


class MLP(nn.Sequential):
    def __init__(self, d_in: int = 10, hidden: int = 16, d_out: int = 3) -> None:
        super().__init__(
            nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 8), nn.Tanh(), nn.Linear(8, d_out)
        )


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class BatchNormMLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


class DropoutMLP(nn.Module):
    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(10, 16), nn.Dropout(p), nn.Linear(16, 3)
        self.mask: Tensor | None = None  # set only on the reference copy

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x))
        h = self.drop(h) if self.mask is None else h * self.mask
        return self.fc2(h)


class Attention(nn.Module):
    """One transformer encoder layer on short sequences, mean-pooled into a classifier.

    GELU, not the default ReLU: finite differences across a ReLU kink are meaningless (the gradient
    jumps), and this case measures the finite-difference backend's accuracy on a smooth loss.
    """

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=16, dropout=0.0, activation="gelu", batch_first=True
        )
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(dim=1))


@dataclass
class Case:
    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batches: list[tuple[Tensor, Tensor]]
    train: bool = True

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _batches(shape: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype, targets: str, gen) -> list:
    out = []
    for size in sizes:
        # Drawn in float64 and cast, so a float32 case holds the same data as its float64 twin.
        x = torch.randn(size, *shape, generator=gen, dtype=torch.float64).to(dtype)
        if targets == "class":
            y = torch.randint(0, 3, (size,), generator=gen)
        else:
            y = torch.randn(size, 3, generator=gen, dtype=torch.float64).to(dtype)
        out.append((x, y))
    return out


def make_case(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sizes = (12, 7)  # uneven on purpose: the operator must weight by sample count
    if name == "mlp":
        case = Case(name, MLP(), cross_entropy, _batches((10,), sizes, dtype, "class", gen))
    elif name == "mlp_mse":
        case = Case(name, MLP(), squared_error, _batches((10,), sizes, dtype, "regression", gen))
    elif name == "cnn":
        case = Case(name, CNN(), cross_entropy, _batches((1, 6, 6), sizes, dtype, "class", gen))
    elif name == "batchnorm":
        case = Case(name, BatchNormMLP(), cross_entropy, _batches((10,), sizes, dtype, "class", gen))
    elif name == "dropout":
        case = Case(name, DropoutMLP(), cross_entropy, _batches((10,), sizes, dtype, "class", gen))
    elif name == "attention":
        case = Case(name, Attention(), cross_entropy, _batches((5, 8), sizes, dtype, "class", gen))
    else:
        raise KeyError(name)
    case.model.to(dtype).train(case.train)
    return case


CASES = ("mlp", "mlp_mse", "cnn", "batchnorm", "dropout", "attention")


def dense_hessian(case: Case, seed: int = 0) -> Tensor:
    """The float64 Hessian of the sample-weighted mean loss over the case's batches, by torch.func."""
    model = copy.deepcopy(case.model).to(torch.float64)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    total = sum(_count(b) for b in case.batches)
    masks = []
    for index, batch in enumerate(case.batches):
        if isinstance(model, DropoutMLP) and model.training:
            x = batch[0]
            torch.manual_seed(seed * SEED_STRIDE + index)
            masks.append(
                F.dropout(torch.ones(x.shape[0], 16, dtype=torch.float64), model.drop.p, training=True)
            )
        else:
            masks.append(None)

    def loss(flat: Tensor) -> Tensor:
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes, strict=True)}
        value = flat.new_zeros(())
        for batch, mask in zip(case.batches, masks, strict=True):
            model.mask = mask if isinstance(model, DropoutMLP) else None
            value = value + _count(batch) * case.loss_fn(_Bound(model, params), _float64(batch))
        return value / total

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # jacfwd(grad), not torch.func.hessian (= jacfwd(jacrev)): on torch 2.13 the latter returns wrong,
    # asymmetric rows for BatchNorm/LayerNorm weights (off by 7% of the Hessian's scale here), while
    # jacfwd(grad) agrees with central differences of plain gradients to 4e-9.
    with sdpa_kernel([SDPBackend.MATH]):
        H = jacfwd(grad(loss))(flat0)
    if isinstance(model, DropoutMLP):
        model.mask = None
    asymmetry = float((H - H.mT).abs().max())
    assert asymmetry <= 1e-10 * float(H.abs().max()), f"reference Hessian is asymmetric ({asymmetry:.1e})"
    return H


class _Bound(nn.Module):
    """Calls ``model`` with ``params`` bound through ``functional_call`` (what the loss sees)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__()
        self._model, self._params = model, params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._model, self._params, args, kwargs)


def _count(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (a tuple's or a dict's)."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return first.shape[0]


def _float64(batch: Any) -> Any:
    cast = lambda t: t.to(torch.float64) if t.is_floating_point() else t  # noqa: E731
    if isinstance(batch, dict):
        return {key: cast(value) for key, value in batch.items()}
    return tuple(cast(t) for t in batch)
