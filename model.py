"""The example model: a small CNN image classifier as a LightningModule. Make it your own.

    python train.py --model.channels=16 --model.depth=3 --model.dropout=0.2
    python train.py --cka.layers='[blocks.0, blocks.1, fc]' --cka.reference_checkpoint=runs/OLD/checkpoints/last.ckpt

The constructor takes only what changes the structure. The optimizer and its learning rate come from the CLI's
optimizer group (`--optimizer.lr=3e-4`, `--optimizer=SGD`), in_channels and num_classes from the DataModule.
There are no `.cuda()` calls: the Trainer puts the model and batches on the right device.

`cka_layers` is optional: it names the layers that train.py's CKA monitor compares (without it the monitor picks
the top-level layers that hold parameters). Replace this class by your own LightningModule (and rename it in
train.py's first lines): nothing else in the template names it.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ConvBlock(nn.Module):
    """conv 3x3 -> batch norm -> ReLU -> 2x2 max pool (ceil mode, so tiny images never shrink to nothing)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2, ceil_mode=True)


class ImageClassifier(pl.LightningModule):
    """`depth` conv blocks (channels doubling each block), global average pool, one hidden layer, classifier.

    Args:
        in_channels: image channels (linked from the DataModule).
        num_classes: number of classes (linked from the DataModule).
        channels: channels of the first conv block; block i has channels * 2**i.
        depth: number of conv blocks.
        hidden_dim: width of the fully connected hidden layer.
        dropout: dropout probability before the classifier.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: int = 32, depth: int = 2,
                 hidden_dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        if min(in_channels, channels, depth, hidden_dim) < 1 or num_classes < 2:
            raise ValueError("in_channels, channels, depth and hidden_dim must be >= 1 and num_classes >= 2")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.save_hyperparameters()  # stored in checkpoints: load_from_checkpoint rebuilds the same structure
        widths = [in_channels] + [channels * 2**i for i in range(depth)]
        self.blocks = nn.ModuleList(ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.fc = nn.Linear(widths[-1], hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)
        # torchmetrics accumulates over the epoch and syncs across DDP ranks itself.
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @property
    def cka_layers(self) -> list[str]:
        """The layers CKAMonitor compares by default: each conv block, the hidden layer and the classifier."""
        return [f"blocks.{i}" for i in range(len(self.blocks))] + ["fc", "classifier"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        x = F.relu(self.fc(x.mean(dim=(2, 3))))  # global average pool: any image size works
        return self.classifier(self.dropout(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        # Logged as a tensor, converted for the logger every log_every_n_steps; but prog_bar=True: in a terminal the
        # progress bar reads it at every batch (.item(), a GPU sync). Without prog_bar (or in log files) it doesn't.
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)
