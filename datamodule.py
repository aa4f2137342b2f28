"""The data: a LightningDataModule over image-classification datasets held as compact tensors.

    python datamodule.py                                 # prepare the default dataset (digits) into ./data
    python datamodule.py --dataset digits --data_dir /scratch/$USER/data

The default dataset is embedded: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes),
so `python train.py` works with no network at all. Each dataset is declared once in DATASETS. Preparation (the
one-off CPU-bound part: decoding, converting to uint8 tensors) happens once, in `prepare_data`, under a file lock,
and is written atomically with a completion marker; every later run just loads `DIR/<name>/data.pt`.

To use your own data: write a function that returns {"x": uint8 (N, C, H, W), "y": int64 (N,)} (optionally also
"x_test"/"y_test" for an official test split), and add a DatasetSpec for it to DATASETS.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, RandomSampler

COMPLETE_MARKER = "COMPLETE"  # written last: a dataset directory without it is never trusted
PROCESSED_FILE = "data.pt"


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the template needs to know about a dataset, in one place."""

    in_channels: int
    num_classes: int
    max_value: int  # pixel value that maps to 1.0 (16 for the digits, 255 for 8-bit images)
    build: Callable[[Path], dict[str, torch.Tensor]]  # raw files in DIR -> {"x", "y"[, "x_test", "y_test"]}


def build_digits(_raw_dir: Path) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    return {"x": x, "y": torch.as_tensor(digits.target, dtype=torch.int64)}


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(in_channels=1, num_classes=10, max_value=16, build=build_digits),
}


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never half of it


def prepare_dataset(name: str, data_dir: str | Path) -> Path:
    """Build DIR/<name>/data.pt once; safe when many processes (DDP ranks, array tasks) call it at once."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    root = Path(data_dir).expanduser().resolve() / name
    marker = root / COMPLETE_MARKER
    if marker.exists():  # fast path: no lock, no network
        return root / PROCESSED_FILE
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create data directory {root}: {err.strerror}; pass a writable --data.data_dir") from err
    with FileLock(str(root) + ".lock"):
        if not marker.exists():  # another process may have finished while we waited
            tensors = spec.build(root)
            _atomic_torch_save(tensors, root / PROCESSED_FILE)
            marker.write_text("ok\n")
    return root / PROCESSED_FILE


class ImageTensors(Dataset):
    """Images kept as one uint8 tensor; a whole batch is gathered and normalised in one indexing operation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, scale: float, mean: torch.Tensor,
                 std: torch.Tensor) -> None:
        self.images, self.labels, self.scale = images, labels, scale
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # DataLoader calls this with the batch's indices, so there is no per-sample Python loop or stacking.
        idx = torch.as_tensor(indices)
        x = (self.images[idx].float() / self.scale - self.mean) / self.std
        return x, self.labels[idx]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for ImageTensors: the batch is already stacked (module level, so workers can pickle it)."""
    return batch


class EpochShuffleSampler(RandomSampler):
    """A new permutation every epoch that depends only on (seed, epoch), not on the global RNG.

    So a run resumed from a checkpoint sees exactly the batches an uninterrupted run would. It subclasses
    RandomSampler so that under DDP Lightning swaps it for its DistributedSampler, which is seeded the same way.
    """

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


class DataModule(pl.LightningDataModule):
    """Seeded train/val/test splits of one dataset from DATASETS.

    Args:
        dataset: name of a dataset declared in DATASETS.
        data_dir: where prepared datasets live (shared between runs; use scratch space on a cluster).
        batch_size: samples per batch for every split.
        num_workers: DataLoader worker processes (0 is fastest for in-memory tensors).
        val_fraction: fraction of the training data held out for validation.
        test_fraction: fraction held out for testing when the dataset has no official test split.
        split_seed: seed of the splits, kept apart from the training seed so all runs share one test set.
    """

    def __init__(self, dataset: str = "digits", data_dir: str = "data", batch_size: int = 64,
                 num_workers: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must leave training data")
        self.save_hyperparameters()  # stored in checkpoints, so a checkpoint knows its data
        self.spec = DATASETS[dataset]
        self.splits: dict[str, ImageTensors] = {}

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: downloads and one-off preprocessing, no state set here.
        prepare_dataset(self.hparams.dataset, self.hparams.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        data = torch.load(prepare_dataset(hp.dataset, hp.data_dir), weights_only=True)
        generator = torch.Generator().manual_seed(hp.split_seed)
        order = torch.randperm(len(data["y"]), generator=generator)
        n_val = round(len(order) * hp.val_fraction)
        if "x_test" in data:  # official test split: validation comes out of the training data
            parts = {"val": order[:n_val], "train": order[n_val:]}
        else:
            n_test = round(len(order) * hp.test_fraction)
            parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        # Normalise with statistics of the training split only.
        train_x = data["x"][parts["train"]].float() / self.spec.max_value
        mean, std = train_x.mean(dim=(0, 2, 3)), train_x.std(dim=(0, 2, 3)).clamp_min(1e-6)

        def make(x: torch.Tensor, y: torch.Tensor) -> ImageTensors:
            return ImageTensors(x, y, float(self.spec.max_value), mean, std)

        self.splits = {split: make(data["x"][idx], data["y"][idx]) for split, idx in parts.items()}
        if "x_test" in data:
            self.splits["test"] = make(data["x_test"], data["y_test"])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.splits[split]
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything, as Lightning's own samplers do
        workers = self.hparams.num_workers
        # Own generator: creating an iterator then never draws from the global RNG, which the model's dropout
        # uses, so a resumed run's dropout masks match an uninterrupted run's.
        return DataLoader(dataset, batch_size=self.hparams.batch_size, collate_fn=keep_batch,
                          sampler=EpochShuffleSampler(dataset, seed) if shuffle else None,
                          generator=torch.Generator().manual_seed(seed), num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare a dataset once (e.g. on a login node), then exit.")
    parser.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    parser.add_argument("--data_dir", default="data")
    args = parser.parse_args(argv)
    try:
        path = prepare_dataset(args.dataset, args.data_dir)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    data = torch.load(path, weights_only=True)
    sizes = ", ".join(f"{key} {tuple(value.shape)}" for key, value in data.items())
    print(f"{args.dataset} ready at {path.parent}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
