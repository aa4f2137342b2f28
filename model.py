"""The example model: a small CNN image classifier as a LightningModule. Make it your own.

    python train.py --model.channels=16 --model.depth=3 --model.dropout=0.2
    python train.py --cka.layers='[blocks.0, blocks.1, fc]' --cka.reference_checkpoint=runs/OLD/checkpoints/last.ckpt

The constructor takes only what changes the structure. The optimizer and its learning rate come from the CLI's
optimizer group (`--optimizer.lr=3e-4`, `--optimizer=SGD`), in_channels and num_classes from the DataModule.
There are no `.cuda()` calls: the Trainer puts the model and batches on the right device.

CKAMonitor (a callback, on by default in train.py) compares the model's layers with each other, and optionally
with a reference checkpoint's, by minibatch CKA over every validation epoch, and saves/logs the heatmap.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from cka import LayerRecorder, MinibatchCKA, plot_cka_heatmap


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
        # Logged as a tensor: Lightning converts it only every log_every_n_steps, so no host sync per step.
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


class CKAMonitor(pl.Callback):
    """Minibatch CKA between layers, accumulated over each validation epoch without storing activations.

    Records the outputs of `layers` (default: the model's `cka_layers`) with forward hooks during validation,
    adds each batch to an unbiased-HSIC accumulator (summed over DDP ranks), and at the epoch's end saves the
    layer-by-layer heatmap as RUN_DIR/cka/<name>-epochNNN.png and logs it to wandb as `cka/<name>`. With
    `reference_checkpoint` (a local .ckpt of this model class; nothing is downloaded) it also compares the model's
    layers with the reference's on the same batches. It writes the model and DataModule class paths into every
    checkpoint, so `python cka.py CKPT_A CKPT_B` can rebuild both without knowing this file.

    The defaults keep it cheap enough to leave on (benchmarks/cka_validation.py): a few batches estimate the
    matrix well, and a heatmap costs ~0.1 s to draw, so it runs every 5th epoch on the first 8 batches.

    Args:
        layers: module names as in `model.named_modules()`; containers (Sequential, ModuleList) are rejected.
        reference_checkpoint: path of a checkpoint to compare against, or None.
        every_n_epochs: compute every n-th training epoch's validation (always in `trainer.validate`); 0: off.
        max_batches: validation batches per computation (None: all of them).
    """

    def __init__(self, layers: list[str] | None = None, reference_checkpoint: str | None = None,
                 every_n_epochs: int = 5, max_batches: int | None = 8) -> None:
        self.layers, self.reference_checkpoint, self.every_n_epochs = layers, reference_checkpoint, every_n_epochs
        self.max_batches = max_batches
        self.reference: pl.LightningModule | None = None
        self.recorders: list[LayerRecorder] = []
        self.batches = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.every_n_epochs <= 0:
            return
        self.names = list(self.layers or getattr(pl_module, "cka_layers", None) or [])
        if not self.names:
            raise ValueError("CKAMonitor needs layers: set --cka.layers or give the model a cka_layers property")
        LayerRecorder(pl_module, self.names)  # fails now, naming the bad layer, rather than after an epoch
        self.self_cka = MinibatchCKA(len(self.names))
        if self.reference_checkpoint and self.reference is None:
            path = Path(self.reference_checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"--cka.reference_checkpoint {path} is not a file: give a local checkpoint")
            self.reference = type(pl_module).load_from_checkpoint(path, map_location="cpu").eval()
            self.reference.requires_grad_(False)
            self.cross_cka = MinibatchCKA(len(self.names))

    def _due(self, trainer: pl.Trainer) -> bool:
        if self.every_n_epochs <= 0 or trainer.sanity_checking:
            return False
        return trainer.state.fn != "fit" or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _stop_recording(self) -> None:
        for recorder in self.recorders:
            recorder.__exit__(None, None, None)
        self.recorders = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        self.batches = self.skipped = 0
        self.self_cka.to(pl_module.device).reset()
        self.recorders = [LayerRecorder(pl_module, self.names).__enter__()]
        if self.reference is not None:
            self.reference.to(pl_module.device)
            self.cross_cka.to(pl_module.device).reset()
            self.recorders.append(LayerRecorder(self.reference, self.names).__enter__())

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object,
                                batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.recorders:
            return
        acts = self.recorders[0].collect()
        if acts[0].shape[0] < 4:  # the unbiased estimator needs 4 samples: skip a tiny ragged last batch
            self.skipped += 1
            return
        self.self_cka.update(acts)
        if self.reference is not None:
            with torch.no_grad():
                self.reference(batch[0])  # the reference sees the same inputs as the model
            self.cross_cka.update(acts, self.recorders[1].collect())
        self.batches += 1
        if self.max_batches is not None and self.batches >= self.max_batches:
            self._stop_recording()  # enough for this epoch: the remaining batches run without hooks

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        self._stop_recording()
        if self.skipped:
            rank_zero_warn(f"CKA skipped {self.skipped} validation batch(es) of fewer than 4 samples")
        if self.batches == 0:
            return
        results = {"self": self.self_cka.compute()}  # compute() sums the accumulators across DDP ranks
        if self.reference is not None:
            results["reference"] = self.cross_cka.compute()
        if trainer.is_global_zero:
            for name, matrix in results.items():
                self._publish(trainer, name, matrix)

    def _publish(self, trainer: pl.Trainer, name: str, matrix: torch.Tensor) -> None:
        path = Path(trainer.default_root_dir) / "cka" / f"{name}-epoch{trainer.current_epoch:03d}.png"
        y_names = self.names if name == "self" else [f"ref {n}" for n in self.names]
        figure = plot_cka_heatmap(matrix, self.names, y_names, path=str(path),
                                  title=f"CKA {name}, epoch {trainer.current_epoch}")
        figure.clear()
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.log_image(key=f"cka/{name}", images=[str(path)], step=trainer.global_step)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        classes = {"model": type(pl_module)}
        if trainer.datamodule is not None:
            classes["datamodule"] = type(trainer.datamodule)
        checkpoint["class_paths"] = {key: f"{cls.__module__}.{cls.__qualname__}" for key, cls in classes.items()}
