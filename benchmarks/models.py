"""The benchmark models, their probe batches and a short pre-training so the spectra are not those of
an untrained network.

Every model is float32 on the CPU and measured on one fixed probe batch with a cross-entropy loss:

- ``mlp``: tanh MLP 64-200-200-10 on sklearn digits (standardized), ~55k parameters;
- ``cnn``: two 3x3 convolutions (tanh, GELU) and a linear head on digits as 1x8x8 images, ~25k;
- ``transformer``: an embedding, two ``nn.TransformerEncoderLayer`` (d_model 64, 4 heads, GELU,
  dropout 0) and a linear head on the mean-pooled output, on synthetic token sequences, ~103k.
- ``llama``: a Llama-style causal language model (:class:`LlamaStyleLM`: tied embeddings, RMSNorm,
  rotary positions, SwiGLU, no biases; d_model 64, two blocks) on sequences of a random Markov chain,
  next-token loss, ~70k.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODELS = ("mlp", "cnn", "transformer", "llama")


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


class RMSNorm(nn.Module):
    """Root-mean-square normalization with a learned gain. ``upcast`` computes it in float32 and casts
    back, as Hugging Face's ``LlamaRMSNorm`` does (in a float64 model that is a float32 step)."""

    def __init__(self, d: int, upcast: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.upcast, self.eps = upcast, eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float() if self.upcast else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding of ``x`` (batch, heads, time, head_dim), rotate-half convention."""
    t, d = x.shape[-2], x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    angle = torch.arange(t, dtype=torch.float64, device=x.device)[:, None] * freq
    cos, sin = (
        torch.cat([angle, angle], -1).cos().to(x.dtype),
        torch.cat([angle, angle], -1).sin().to(x.dtype),
    )
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class LlamaBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, hidden: int, upcast: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm, self.mlp_norm = RMSNorm(d, upcast), RMSNorm(d, upcast)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (f(h).view(b, t, self.n_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaStyleLM(nn.Module):
    """A Llama-style causal LM: tied input and output embeddings, RMSNorm, rotary positions, SwiGLU.

    ``hf_casts`` adds the two casts of Hugging Face's Llama: RMSNorm in float32, and the logits cast to
    float32 before the loss (``ForCausalLMLoss``). They change nothing in a float32 model; in a float64
    model they make part of the loss float32.
    """

    def __init__(
        self, vocab: int = 64, d: int = 64, n_layers: int = 2, n_heads: int = 4, hf_casts: bool = False
    ) -> None:
        super().__init__()
        self.hf_casts = hf_casts
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(LlamaBlock(d, n_heads, 8 * d // 3, hf_casts) for _ in range(n_layers))
        self.norm = RMSNorm(d, hf_casts)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.norm(h) @ self.embed.weight.T  # tied: the output projection is the embedding

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross-entropy."""
        logits = self(tokens)[:, :-1]
        if self.hf_casts:
            logits = logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def next_token_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return model.loss(batch[0])


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

    def to(self, device: str | torch.device) -> Bench:
        """The same bench on ``device`` (the model moved in place, the batches copied)."""
        move = lambda t: tuple(x.to(device) for x in t)  # noqa: E731
        return Bench(self.name, self.model.to(device), self.loss_fn, move(self.probe), move(self.train))

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


def _markov_tokens(n: int, vocab: int = 64, seq_len: int = 32) -> tuple[Tensor, Tensor]:
    """Sequences of a random Markov chain whose rows put most mass on a few tokens (so there is
    something to learn); the target is the sequence itself (next-token loss)."""
    g = torch.Generator().manual_seed(3)
    transition = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=g), dim=1)
    tokens = torch.empty(n, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, seq_len):
        tokens[:, t] = torch.multinomial(transition[tokens[:, t - 1]], 1, generator=g)[:, 0]
    return tokens, tokens


def _pretrain(
    model: nn.Module, data: tuple[Tensor, Tensor], steps: int, lr: float, loss_fn: Callable = cross_entropy
) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(2)
    x, y = data
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss_fn(model, (x[idx], y[idx])).backward()
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
    elif name == "llama":
        x, y = _markov_tokens(2048)
        model = LlamaStyleLM(d=32 if quick else 64)
    else:
        raise KeyError(f"unknown model {name!r}; choose from {MODELS}")
    model.train()
    loss_fn = next_token_loss if name == "llama" else cross_entropy
    _pretrain(model, (x, y), pretrain_steps, lr=1e-3, loss_fn=loss_fn)
    probe = (x[:probe_size].contiguous(), y[:probe_size].contiguous())
    return Bench(name, model, loss_fn, probe, (x, y))
