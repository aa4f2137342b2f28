"""Your data: a LightningDataModule. It starts with synthetic data (Gaussian clusters, one per class), so that
`make train` and `make test` work from the first minute; replace setup() with loading your dataset.

    python train.py --data.batch_size=32

Every constructor argument is a command-line option (--data.NAME). A property the model's constructor also takes
(num_classes, in_channels: train.py's LINKED) is handed to the model. Return plain DataLoaders: under train.py a
seeded, resumable sampler goes into the training one. README.md, "Make it your own", and docs/datasets.md (downloads,
checksums and file locks for real datasets: support/data/downloads.py).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64, num_workers: int = 0, samples: int = 600, features: int = 16,
                 classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()  # stored in checkpoints, so a checkpoint knows its data
        self.splits: dict[str, TensorDataset] = {}

    @property
    def num_classes(self) -> int:
        return self.hparams.classes

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        options = self.hparams
        generator = torch.Generator().manual_seed(options.seed)
        y = torch.randint(0, options.classes, (options.samples,), generator=generator)
        centres = 2 * torch.randn(options.classes, options.features, generator=generator)
        x = centres[y] + torch.randn(options.samples, options.features, generator=generator)
        n_val = n_test = options.samples // 5
        self.splits = {"val": TensorDataset(x[:n_val], y[:n_val]),
                       "test": TensorDataset(x[n_val:n_val + n_test], y[n_val:n_val + n_test]),
                       "train": TensorDataset(x[n_val + n_test:], y[n_val + n_test:])}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


# train.py's DATAMODULE_CLASS names datamodule.DataModule (the template's example): once you name your class there
# (DATAMODULE_CLASS = datamodule.Data), delete this line.
DataModule = Data
