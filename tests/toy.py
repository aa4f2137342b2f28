"""A small model and DataModule of the tests' own, written the way Lightning's docs write them, for testing the
template's machinery apart from the example in model.py / datamodule.py (so those tests survive a researcher
replacing the example). The model has no `cka_layers` and no `in_channels`, logs its metrics with f-strings and
uses dropout (so resumed runs must restore the RNG); the data is a plain shuffling DataLoader over a TensorDataset."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ToyData(pl.LightningDataModule):
    """Gaussian blobs, one per class, split 70/15/15 by a fixed seed."""

    def __init__(self, samples: int = 240, features: int = 8, num_classes: int = 3, batch_size: int = 16,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features, self.num_classes = features, num_classes
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        generator = torch.Generator().manual_seed(self.hparams.seed)
        centres = 3 * torch.randn(self.num_classes, self.features, generator=generator)
        y = torch.randint(self.num_classes, (self.hparams.samples,), generator=generator)
        x = centres[y] + torch.randn(len(y), self.features, generator=generator)
        n_val = n_test = len(y) * 15 // 100
        bounds = {"val": (0, n_val), "test": (n_val, n_val + n_test), "train": (n_val + n_test, len(y))}
        self.splits = {name: TensorDataset(x[a:b], y[a:b]) for name, (a, b) in bounds.items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.hparams.batch_size)


class ToyClassifier(pl.LightningModule):
    """An MLP: Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, features: int = 8, num_classes: int = 3, hidden: int = 16, dropout: float = 0.2,
                 lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
