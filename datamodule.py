"""The data: a LightningDataModule over image-classification datasets held as compact tensors. Edit it freely.

    python datamodule.py                                  # prepare DEFAULT_DATASET (the embedded digits) in ./data
    python datamodule.py --dataset mnist --data_dir /scratch/$USER/data       # on a login node, with internet
    python datamodule.py --dataset cifar10 --mirror http://mirror.example.org/datasets/{dataset}/
    python train.py --data.dataset=mnist --data.data_dir=/scratch/$USER/data    # then on any node, offline
    python train.py --data.folds=5 --data.fold=2                  # 5-fold cross-validation, validating on fold 2

The default dataset is embedded (scikit-learn's 1,797 handwritten 8x8 digits), so `python train.py` needs no
network; MNIST, Fashion-MNIST and CIFAR-10 are downloaded. Each dataset is declared once, in DATASETS, and prepared
once per data directory by support/data/downloads.py: under a file lock (DDP ranks, array tasks and jobs wait for one
process to do it) its files are downloaded with pySmartDL, verified, built into DIR/<name>/data.pt, and the marker
DIR/<name>/COMPLETE is written last. A run that finds the marker loads data.pt and touches no network; the marker
records the declaration (files, checksums, build function), so editing one rebuilds that dataset at the next run.

To use your own data: write a function that takes the raw directory and returns {"x": uint8 (N, C, H, W),
"y": int64 (N,)} (optionally also "x_test"/"y_test" for an official test split), and add a DatasetSpec for it to
DATASETS, with `files=remote_files([mirror URLs], {file name: "sha256:<hex>"})` if it is downloaded; name it in
DEFAULT_DATASET to make it what `python train.py`, sweeps and grids train on.
"""

from __future__ import annotations

import argparse
import gzip
import pickle
import struct
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from support.data.downloads import MIRROR_ENV, DownloadError, RemoteFile, load_prepared, prepare_dataset, remote_files
from support.errors import SettingError  # a bad setting found in setup: train.py prints it as one line


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the template needs to know about a dataset, in one place."""

    in_channels: int
    num_classes: int
    max_value: int  # pixel value that maps to 1.0 (16 for the digits, 255 for 8-bit images)
    build: Callable[[Path], dict[str, torch.Tensor]]  # DIR/<name>/raw -> {"x", "y"[, "x_test", "y_test"]}
    files: tuple[RemoteFile, ...] = ()  # downloaded and verified into DIR/<name>/raw before `build` runs


def build_digits(_raw_dir: Path) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    return {"x": x, "y": torch.as_tensor(digits.target, dtype=torch.int64)}


def read_idx(path: Path) -> torch.Tensor:
    """MNIST's gzipped IDX format: 0, 0, type 8 (uint8), number of dimensions, big-endian int32 sizes, the data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\0\0\x08":
        raise ValueError(f"{path} is not an IDX file of uint8 values")
    start = 4 + 4 * data[3]  # data[3] is the number of dimensions
    return torch.frombuffer(bytearray(memoryview(data)[start:]), dtype=torch.uint8).reshape(
        struct.unpack(f">{data[3]}i", data[4:start]))


def build_mnist(raw: Path) -> dict[str, torch.Tensor]:  # Fashion-MNIST too: same file names, same format
    def read(stem: str) -> torch.Tensor:
        return read_idx(raw / f"{stem}-ubyte.gz")

    return {"x": read("train-images-idx3").unsqueeze(1), "y": read("train-labels-idx1").long(),
            "x_test": read("t10k-images-idx3").unsqueeze(1), "y_test": read("t10k-labels-idx1").long()}


def build_cifar10(raw: Path) -> dict[str, torch.Tensor]:
    """The "python version": a tarball of pickled {"data": uint8 (N, 3072) as R, G, B planes, "labels": [...]}."""
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with tarfile.open(raw / "cifar-10-python.tar.gz") as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if name.startswith("data_batch_") or name == "test_batch":
                # pickle can run code: acceptable only because the tarball matched its published checksum
                entry = pickle.load(tar.extractfile(member), encoding="latin1")
                batches[name] = torch.from_numpy(entry["data"]).reshape(-1, 3, 32, 32), torch.tensor(entry["labels"])
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    return {"x": torch.cat([x for x, _ in train]), "y": torch.cat([y for _, y in train]),
            "x_test": batches["test_batch"][0], "y_test": batches["test_batch"][1]}


# Checksums and mirrors as torchvision publishes them (torchvision/datasets/mnist.py, cifar.py).
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(in_channels=1, num_classes=10, max_value=16, build=build_digits),
    "mnist": DatasetSpec(1, 10, 255, build_mnist, remote_files(
        ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        {"train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c"})),
    "fashion_mnist": DatasetSpec(1, 10, 255, build_mnist, remote_files(
        ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        {"train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310"})),
    "cifar10": DatasetSpec(3, 10, 255, build_cifar10, remote_files(
        ["https://www.cs.toronto.edu/~kriz/"], {"cifar-10-python.tar.gz": "md5:c58f30108f718f92721af3b95e74349a"})),
}
# What every run, sweep and grid trains on unless --data.dataset (or SWEEP_CONFIG's data.dataset) names another.
DEFAULT_DATASET = "digits"


def dataset_spec(name: str) -> DatasetSpec:
    """The declaration of dataset `name`, or a ValueError that lists the declared ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


class DataModule(pl.LightningDataModule):
    """Seeded train/val/test splits of one dataset from DATASETS.

    Args:
        dataset: name of a dataset declared in DATASETS (default: DEFAULT_DATASET).
        data_dir: where prepared datasets live (shared between runs; use scratch space on a cluster).
        batch_size: samples per batch for every split.
        num_workers: DataLoader worker processes (0 is fastest for in-memory tensors).
        val_fraction: fraction of the training data held out for validation (with folds > 1 it no longer sets the
            validation size: validation is then one fold).
        test_fraction: fraction held out for testing when the dataset has no official test split.
        split_seed: seed of the splits, kept apart from the training seed so all runs share one test set.
        mirror: base URL to download every file from instead of the declared mirrors ({dataset} is replaced by
            the dataset's name); default: $DATA_MIRROR if set.
        folds: K > 1 for K-fold cross-validation: all data outside the test split (which stays the same as with
            folds=1) is cut into K near-equal folds in the seeded order; fold `fold` validates, the others train.
            1 (default): the val_fraction split. Run every fold with `python train.py --data.folds=5 --data.fold=I`
            for I = 0..4.
        fold: which fold validates, 0..folds-1.
    """

    def __init__(self, dataset: str = DEFAULT_DATASET, data_dir: str = "data", batch_size: int = 64,
                 num_workers: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0, mirror: str | None = None, folds: int = 1, fold: int = 0) -> None:
        super().__init__()
        self.spec = dataset_spec(dataset)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0 (0: load in the main process), got {num_workers}")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must leave training data")
        if folds < 1:
            raise ValueError(f"folds={folds} must be at least 1: give --data.folds 1 (no cross-validation) or K > 1")
        if folds == 1 and fold != 0:
            raise ValueError(f"fold={fold} without folds: --data.fold needs --data.folds K > 1")
        if not 0 <= fold < folds:
            raise ValueError(f"fold={fold} is outside 0..{folds - 1} for folds={folds}: "
                             f"give --data.fold between 0 and {folds - 1}")
        self.save_hyperparameters()  # stored in checkpoints, so a checkpoint knows its data
        self.splits: dict[str, ImageTensors] = {}

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: downloads and one-off preprocessing, no state set here.
        prepare_dataset(self.hparams.dataset, self.spec, self.hparams.data_dir, self.hparams.mirror)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        options = self.hparams
        path = prepare_dataset(options.dataset, self.spec, options.data_dir, options.mirror)
        data = load_prepared(path)
        order = torch.randperm(len(data["y"]), generator=torch.Generator().manual_seed(options.split_seed))
        n_val = round(len(order) * options.val_fraction)
        # With an official test split, validation comes out of the training data; without one, the test split is
        # order[n_val:n_val + n_test] whatever the folds, and train and val share the rest (the pool).
        n_test = 0 if "x_test" in data else round(len(order) * options.test_fraction)
        pool = torch.cat([order[:n_val], order[n_val + n_test:]])
        if options.folds == 1:
            val, train = pool[:n_val], pool[n_val:]
        elif options.folds > len(pool):
            raise SettingError(f"folds={options.folds} is more than the {len(pool)} training and validation samples "
                             f"of {options.dataset}: give --data.folds at most {len(pool)}")
        else:
            chunks = pool.tensor_split(options.folds)  # sizes differ by at most 1
            val, train = chunks[options.fold], torch.cat(chunks[:options.fold] + chunks[options.fold + 1:])
        if "x_test" in data:
            parts = {"val": val, "train": train}
        else:
            parts = {"val": val, "test": order[n_val:n_val + n_test], "train": train}
        # Normalise with statistics of the training split only.
        train_x = data["x"][parts["train"]].float() / self.spec.max_value
        mean, std = train_x.mean(dim=(0, 2, 3)), train_x.std(dim=(0, 2, 3)).clamp_min(1e-6)

        def make(x: torch.Tensor, y: torch.Tensor) -> ImageTensors:
            return ImageTensors(x, y, float(self.spec.max_value), mean, std)

        self.splits = {split: make(data["x"][idx], data["y"][idx]) for split, idx in parts.items()}
        if "x_test" in data:
            self.splits["test"] = make(data["x_test"], data["y_test"])

    # Plain loaders, as Lightning's docs write them: under train.py, support/run_dir/resumable.py gives the training
    # one a seeded order that a resumed run continues where it stopped.
    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self.splits[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          collate_fn=keep_batch, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare a dataset once (e.g. on a login node), then exit.")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, choices=sorted(DATASETS))
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--mirror", help=f"base URL to use instead of the declared mirrors (default ${MIRROR_ENV})")
    args = parser.parse_args(argv)
    try:
        path = prepare_dataset(args.dataset, dataset_spec(args.dataset), args.data_dir, args.mirror)
    except (DownloadError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    data = load_prepared(path)
    sizes = ", ".join(f"{key} {tuple(value.shape)}" for key, value in data.items())
    print(f"{args.dataset} ready at {path.parent}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
