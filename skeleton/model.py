"""Your model: a LightningModule. It starts as a small MLP that runs on datamodule.py's synthetic data, so that
`make train` and `make test` work from the first minute; replace its insides with your model.

    python train.py --model.hidden_dim=64 --model.dropout=0.2

Every constructor argument is a command-line option (--model.NAME); num_classes comes from the DataModule
(train.py's LINKED). The optimizer is the CLI's (--optimizer.lr=3e-4) unless you define configure_optimizers.
Log the metric that train.py's MONITOR names ("val/loss" to begin with). README.md, "Make it your own", and
docs/your-code.md.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class Model(pl.LightningModule):
    # in_features: the width of datamodule.py's synthetic samples (its `features`); num_classes is linked.
    def __init__(self, num_classes: int = 2, in_features: int = 16, hidden_dim: int = 64,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()  # stored in checkpoints: load_from_checkpoint rebuilds the same model
        self.net = nn.Sequential(nn.Linear(in_features, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", (logits.argmax(dim=1) == y).float().mean(), sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.evaluate(batch, "test")


# train.py's MODEL_CLASS names model.ImageClassifier (the template's example): once you name your class there
# (MODEL_CLASS = model.Model), delete this line.
ImageClassifier = Model
