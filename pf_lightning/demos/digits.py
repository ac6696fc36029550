"""The edge-of-stability set-up of Cohen et al. (2021) on sklearn's digits, as Lightning classes.

A fully connected tanh network trained on the squared error against one-hot targets,
``0.5 * sum((out - onehot)**2) / n``, by full-batch gradient descent: the analogue of the paper's
first figure (their CIFAR-10 subset is replaced by the 1797 8x8 digits that ship with scikit-learn,
so nothing is downloaded).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DigitsDataModule",
    "DigitsMLP",
    "OptimizerFactory",
    "build_optimizer",
    "load_digits_tensors",
    "tensor_loader",
]

# The form LightningCLI and jsonargparse read as "a class_path plus init_args, called with the parameters".
OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


def build_optimizer(
    factory: OptimizerFactory | None, params: Iterable[torch.Tensor], default_lr: float
) -> torch.optim.Optimizer:
    """``factory(params)``, or plain gradient descent ``SGD(params, lr=default_lr)`` without one."""
    return torch.optim.SGD(params, lr=default_lr) if factory is None else factory(params)


class BatchedTensorDataset(TensorDataset):
    """A ``TensorDataset`` that serves a whole batch with one indexing operation.

    ``DataLoader`` calls ``__getitems__`` with the batch's indices; the default per-sample path
    costs three times a full-batch gradient step of the digits MLP in Python overhead alone.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def _whole_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch  # already collated by BatchedTensorDataset.__getitems__


def tensor_loader(tensors: Sequence[torch.Tensor], batch_size: int | None) -> DataLoader:
    """Batches of ``tensors`` (shuffled mini-batches, or the full batch if ``batch_size`` is None)."""
    dataset = BatchedTensorDataset(*tensors)
    return DataLoader(
        dataset,
        batch_size=batch_size or len(dataset),
        shuffle=batch_size is not None,
        collate_fn=_whole_batch,
    )


@functools.cache
def load_digits_tensors(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` digits (all 1797 if ``None``): standardized pixels and integer labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # the digits ship inside scikit-learn: nothing is downloaded
        raise ImportError(
            "the digits examples need scikit-learn: pip install 'pf-lightning[examples]'"
        ) from err

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)  # standardized inputs, as in the paper
    y = torch.tensor(y)
    return (x[:n], y[:n]) if n else (x, y)


class DigitsDataModule(L.LightningDataModule):
    """sklearn's digits as one training set (there is no held-out split: the subject is the training loss).

    Args:
        n: use the first ``n`` of the 1797 images (``None``: all).
        batch_size: samples per batch; ``None`` is full-batch gradient descent (one batch per epoch).
    """

    def __init__(self, n: int | None = None, batch_size: int | None = None) -> None:
        super().__init__()
        if n is not None and n < 1:
            raise ValueError(f"`n` must be a positive number of images or None, got {n!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be positive or None (full batch), got {batch_size!r}")
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> DataLoader:
        x, y = load_digits_tensors(self.n)
        # Under DDP Lightning inserts a DistributedSampler: each rank then holds half of the full batch.
        return tensor_loader((x, y), self.batch_size)


class DigitsMLP(L.LightningModule):
    """A fully connected tanh network on 8x8 digits (64 inputs, 10 outputs).

    Args:
        hidden: widths of the hidden layers (Cohen et al. use 200, 200).
        loss: ``"mse"`` is ``0.5 * sum((out - onehot)**2)`` averaged over samples (the paper's
            squared error); ``"cross_entropy"`` the usual classification loss.
        optimizer: ``optimizer(params) -> Optimizer``, e.g. ``functools.partial(torch.optim.Adam,
            lr=1e-3)`` or, in YAML, ``class_path: torch.optim.SGD`` with ``init_args: {lr: 0.2}``;
            ``None`` is plain gradient descent, ``SGD(lr=0.1)``.
        seed: seeds the initial weights, so runs at different learning rates start from one point.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (200, 200),
        loss: Literal["mse", "cross_entropy"] = "mse",
        optimizer: OptimizerFactory | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if loss not in ("mse", "cross_entropy"):
            raise ValueError(f'`loss` must be "mse" or "cross_entropy", got {loss!r}')
        self.save_hyperparameters(ignore=["optimizer"])
        self.loss_kind, self.optimizer_factory = loss, optimizer
        widths = [64, *hidden]
        layers: list[nn.Module] = []
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for fan_in, fan_out in itertools.pairwise(widths):
                layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
            layers.append(nn.Linear(widths[-1], 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The mean loss of one batch."""
        return self._loss(self(batch[0]), batch[1])

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "mse":
            return 0.5 * ((out - F.one_hot(y, 10).to(out.dtype)) ** 2).sum(dim=1).mean()
        return F.cross_entropy(out, y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch[0])
        loss = self._loss(out, batch[1])
        self.log("train_loss", loss)
        self.log("train_accuracy", (out.detach().argmax(1) == batch[1]).float().mean())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.optimizer_factory, self.parameters(), default_lr=0.1)
