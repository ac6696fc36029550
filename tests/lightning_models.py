"""Small LightningModules on sklearn digits for the callback tests."""

from __future__ import annotations

import collections
import csv
import functools

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@functools.cache
def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(y)
    return (x[:n], y[:n]) if n else (x, y)


class DigitsClassifier(L.LightningModule):
    """A tanh MLP on digits; MSE against one-hot targets (Cohen et al.) or cross-entropy."""

    def __init__(
        self,
        hidden: int = 32,
        lr: float = 0.1,
        loss: str = "mse",
        optimizer: str = "sgd",
        momentum: float = 0.0,
        dropout: float = 0.0,
        batchnorm: bool = False,
        n: int = 256,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(64, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 10),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out = self(x.to(self.net[0].weight.dtype))
        if self.hparams.loss == "mse":
            return 0.5 * ((out - F.one_hot(y, 10).to(out.dtype)) ** 2).sum(dim=1).mean()
        return F.cross_entropy(out, y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)

    def train_dataloader(self):
        x, y = digits(self.hparams.n)
        size = self.hparams.batch_size or len(x)
        return DataLoader(TensorDataset(x, y), batch_size=size, shuffle=self.hparams.batch_size is not None)


class ManualDigits(DigitsClassifier):
    """Manual optimization with the one optimizer stepped each batch. training_step returns nothing."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.loss(batch))
        optimizer.step()


class TwoOptimizers(DigitsClassifier):
    """Manual optimization with two optimizers stepped each batch (Lightning's step counts both): SGD at lr
    0.1 on the first layer, SGD at lr 0.05 with momentum 0.9 on the rest. training_step returns nothing."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(self.loss(batch))
        for optimizer in self.optimizers():
            optimizer.step()

    def configure_optimizers(self):
        first, rest = list(self.net[0].parameters()), list(self.net[1:].parameters())
        return [torch.optim.SGD(first, lr=0.1), torch.optim.SGD(rest, lr=0.05, momentum=0.9)]


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def logged(t: L.Trainer) -> dict[str, dict[int, float]]:
    """A CSVLogger run's metrics.csv as ``{metric: {step: value}}``."""
    t.logger.save()
    out: dict[str, dict[int, float]] = collections.defaultdict(dict)
    with open(f"{t.logger.log_dir}/metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value != "":
                    out[key][int(row["step"])] = float(value)
    return out
