"""The benchmark models, their probe batches and a short pre-training so the spectra are not those of
an untrained network.

Every model is float32 on the CPU and measured on one fixed probe batch with a cross-entropy loss:

- ``mlp``: tanh MLP 64-200-200-10 on sklearn digits (standardized), ~55k parameters;
- ``cnn``: two 3x3 convolutions (tanh, GELU) and a linear head on digits as 1x8x8 images, ~25k;
- ``transformer``: an embedding, two ``nn.TransformerEncoderLayer`` (d_model 64, 4 heads, GELU,
  dropout 0) and a linear head on the mean-pooled output, on synthetic token sequences, ~103k.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODELS = ("mlp", "cnn", "transformer")


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


class MLP(nn.Sequential):
    def __init__(self, widths: tuple[int, ...] = (64, 200, 200, 10)) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        super().__init__(*layers)


class CNN(nn.Module):
    def __init__(self, c1: int = 16, c2: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.head = nn.Linear(c2 * 8 * 8, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv1(x))
        h = F.gelu(self.conv2(h))
        return self.head(h.flatten(1))


class Transformer(nn.Module):
    def __init__(
        self, vocab: int = 32, d_model: int = 64, n_layers: int = 2, seq_len: int = 16, n_classes: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                nhead=4,
                dim_feedforward=4 * d_model,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
            )
            for _ in range(n_layers)
        )
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


@dataclass
class Bench:
    """A model at its measurement point, its loss and its data."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    probe: tuple[Tensor, Tensor]  # the fixed batch every measurement uses
    train: tuple[Tensor, Tensor]  # the data the warm-start SGD steps train on

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def sgd_steps(self, steps: int, lr: float) -> None:
        """Full-batch SGD on the training set: what moves the parameters between two measurements."""
        opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            self.loss_fn(self.model, self.train).backward()
            opt.step()
        opt.zero_grad(set_to_none=True)


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)  # standardized; constant pixels stay 0
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(x.shape[0], generator=g)
    return x[order], torch.tensor(data.target, dtype=torch.long)[order]


def _tokens(n: int, vocab: int = 32, seq_len: int = 16, n_classes: int = 4) -> tuple[Tensor, Tensor]:
    """Uniform random tokens; the label is the argmax of a fixed random score of the token counts,
    plus a term on the first token so that position matters."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (n, seq_len), generator=g)
    counts = F.one_hot(tokens, vocab).sum(1).float()
    w = torch.randn(vocab, n_classes, generator=g)
    first = torch.randn(vocab, n_classes, generator=g)
    return tokens, (counts @ w + 2.0 * first[tokens[:, 0]]).argmax(1)


def _pretrain(model: nn.Module, data: tuple[Tensor, Tensor], steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(2)
    x, y = data
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        opt.zero_grad(set_to_none=True)
        cross_entropy(model, (x[idx], y[idx])).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def make_bench(name: str, probe_size: int = 512, pretrain_steps: int = 100, quick: bool = False) -> Bench:
    """Build model ``name`` (seeded), pre-train it with ``pretrain_steps`` Adam steps on mini-batches
    of 128, and fix its probe batch of ``probe_size`` samples.

    ``quick`` shrinks the models for a smoke test (hidden widths and d_model halved).
    """
    torch.manual_seed(0)
    if name in ("mlp", "cnn"):
        x, y = _digits()
        model: nn.Module = (
            MLP((64, 100, 100, 10) if quick else (64, 200, 200, 10)) if name == "mlp" else CNN()
        )
        if name == "cnn":
            x = x.reshape(-1, 1, 8, 8)
            if quick:
                model = CNN(8, 16)
    elif name == "transformer":
        x, y = _tokens(2048)
        model = Transformer(d_model=32 if quick else 64)
    else:
        raise KeyError(f"unknown model {name!r}; choose from {MODELS}")
    model.train()
    _pretrain(model, (x, y), pretrain_steps, lr=1e-3)
    probe = (x[:probe_size].contiguous(), y[:probe_size].contiguous())
    return Bench(name, model, cross_entropy, probe, (x, y))
