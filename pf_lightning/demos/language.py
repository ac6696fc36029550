"""A small causal transformer language model on synthetic sequences with a known best loss.

The sequences come from a random second-order Markov chain: each token depends on the two before it,
so a model must attend to the previous position to predict well (a bigram table cannot). Because the
chain is known, so is the lowest achievable loss (its conditional entropy), which the example prints
next to the model's loss. Attention goes through ``F.scaled_dot_product_attention``, whose fused CPU
kernel has no double backward: the Hessian measurements switch it to the math kernel for their
duration (see :func:`pf_lightning.curvature.hvp.math_attention`).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .digits import OptimizerFactory, tensor_loader

__all__ = ["MarkovSequenceDataModule", "TinyTransformerLM"]


class MarkovSequenceDataModule(L.LightningDataModule):
    """Sequences from a random second-order Markov chain over ``vocab`` tokens.

    The first two tokens of a sequence are uniform; after that, each pair of previous tokens allows
    ``branching`` next tokens with random (Dirichlet) probabilities.

    Args:
        vocab: number of distinct tokens.
        seq_len: tokens per sequence (the model predicts ``seq_len - 1`` of them).
        n: sequences in the training set (drawn once).
        branching: possible next tokens per context.
        batch_size: sequences per batch (``None``: full batch).
        seed: seeds the chain and the sequences.
    """

    def __init__(
        self,
        vocab: int = 16,
        seq_len: int = 32,
        n: int = 2048,
        branching: int = 2,
        batch_size: int | None = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 1 <= branching <= vocab:
            raise ValueError(f"`branching` must be in [1, vocab={vocab}], got {branching!r}")
        if seq_len < 3:
            raise ValueError(
                f"`seq_len` must be at least 3 (two context tokens and a target), got {seq_len!r}"
            )
        self.vocab, self.seq_len, self.n, self.batch_size = vocab, seq_len, n, batch_size
        generator = torch.Generator().manual_seed(seed)
        # transition[a, b] is the distribution of the token after the pair (a, b)
        successors = torch.rand(vocab, vocab, vocab, generator=generator).argsort(-1)[..., :branching]
        # Dirichlet(1, ..., 1) as normalized exponentials, from the seeded generator (torch's Dirichlet draws
        # from the global one: the chain, and so the data, changed from process to process).
        uniform = torch.rand(vocab, vocab, branching, generator=generator).clamp_min_(torch.finfo().tiny)
        exponentials = -uniform.log()  # (a draw of exactly 0 would give inf, and NaN probabilities)
        weights = exponentials / exponentials.sum(-1, keepdim=True)
        self.transition = torch.zeros(vocab, vocab, vocab).scatter_(-1, successors, weights)
        self.sequences = self._sample(n, generator)

    def _sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        tokens = torch.randint(self.vocab, (n, self.seq_len), generator=generator)
        for t in range(2, self.seq_len):
            probs = self.transition[tokens[:, t - 2], tokens[:, t - 1]]
            tokens[:, t] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return tokens

    @property
    def best_loss(self) -> float:
        """The lowest achievable mean next-token cross-entropy (nats): the chain's conditional entropy,
        averaged over the ``seq_len - 1`` predicted positions (the first one is uniform, ``log vocab``)."""
        p = self.transition
        row_entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # entropy of the next token given (a, b)
        pair = torch.full((self.vocab, self.vocab), 1.0 / self.vocab**2)  # distribution of (t-2, t-1)
        total = math.log(self.vocab)
        for _ in range(2, self.seq_len):
            total += float((pair * row_entropy).sum())
            pair = torch.einsum("ab,abc->bc", pair, p)
        return total / (self.seq_len - 1)

    def train_dataloader(self) -> DataLoader:
        return tensor_loader((self.sequences,), self.batch_size)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc", nn.Linear(d_model, 4 * d_model))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("proj", nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformerLM(L.LightningModule):
    """A pre-norm causal transformer; parameter names ``embed.*``, ``pos``, ``blocks.{i}.attn.*``,
    ``blocks.{i}.mlp.*``, ``norm.*``, ``head.*`` (for ``HessianEigenMonitor(params=...)`` globs).

    Args:
        vocab: number of distinct tokens.
        seq_len: longest sequence.
        d_model: width of the residual stream.
        n_heads: attention heads per block.
        n_layers: transformer blocks.
        optimizer: ``optimizer(params) -> Optimizer``; ``None`` is ``AdamW(lr=3e-3, weight_decay=0.01)``.
        seed: seeds the initial weights.
    """

    def __init__(
        self,
        vocab: int = 16,
        seq_len: int = 32,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        optimizer: OptimizerFactory | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"`d_model` ({d_model}) must be a multiple of `n_heads` ({n_heads})")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, d_model)
            self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
            self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
            self.norm = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, batch: tuple[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch of sequences."""
        tokens = batch[0] if isinstance(batch, tuple | list) else batch
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
        return self.optimizer_factory(self.parameters())
