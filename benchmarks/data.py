"""How fast do the template's loaders deliver data? One epoch of MNIST-sized data: ours vs torchvision's MNIST.

    python benchmarks/data.py                       # 60,000 28x28 training images, batch 128, 5 repeats (~1 min)
    python benchmarks/data.py --samples 12000 --repeats 3                               # a quick look

Writes MNIST's four files in their real format (gzipped IDX, random pixels) into a temporary directory laid out
the way torchvision expects: ROOT/MNIST/raw/, holding the .gz files as downloaded and the unzipped copies that
torchvision's download leaves beside them and reads. Then, in the same run:

  ours         support/data/downloads.py prepares dataset "MNIST" (datamodule.py's MNIST declaration, with these
               files' checksums) in ROOT, that is from ROOT/MNIST/raw/ itself (checksums, decoding into
               ROOT/MNIST/data.pt: timed once, as it happens once), and an epoch is a pass over datamodule.py's
               DataModule's train and val loaders, which together hold all the training images;
  torchvision  torchvision.datasets.MNIST(ROOT, train=True, transform=ToTensor()) in a DataLoader with
               batch_size=128, shuffle=True.

Both use one torch thread and no worker processes (the template's default). The two sides alternate for
--repeats epochs each, and the ratio compares medians. Goal: ours at least 5x faster.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import inspect
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import MNIST
from torchvision.transforms import ToTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from support.data.downloads import prepare_dataset, remote_files  # noqa: E402

datamodule = inspect.getmodule(train.DATAMODULE_CLASS)  # datamodule.py, found through train.py's one place

BATCH = 128


def write_mnist(raw: Path, samples: int, test_samples: int) -> dict[str, str]:
    """MNIST's files with random content; returns their checksums, as a dataset declaration holds them."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (samples, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, samples, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (test_samples, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, test_samples, dtype=np.uint8)}
    raw.mkdir(parents=True)
    checksums = {}
    for name, array in arrays.items():
        idx = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes() + array.tobytes()
        (raw / name).write_bytes(idx)  # what torchvision reads
        packed = gzip.compress(idx, compresslevel=1, mtime=0)  # what a mirror serves and datamodule.py reads
        (raw / f"{name}.gz").write_bytes(packed)
        checksums[f"{name}.gz"] = "sha256:" + hashlib.sha256(packed).hexdigest()
    return checksums


def epoch_ours(dm: datamodule.DataModule) -> tuple[float, int]:
    start, seen = time.perf_counter(), 0
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for _x, y in loader:
            seen += len(y)
    return time.perf_counter() - start, seen


def epoch_torchvision(dataset: MNIST) -> tuple[float, int]:
    start, seen = time.perf_counter(), 0
    for _x, y in DataLoader(dataset, batch_size=BATCH, shuffle=True):
        seen += len(y)
    return time.perf_counter() - start, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checksums = write_mnist(root / "MNIST" / "raw", args.samples, max(1, args.samples // 6))
        # Declared as a user declares a dataset; the files are already there, so nothing is downloaded.
        spec = replace(datamodule.DATASETS["mnist"], files=remote_files(["http://mirror.invalid/"], checksums))
        datamodule.DATASETS["MNIST"] = spec  # the DataModule takes a dataset's name
        start = time.perf_counter()
        prepare_dataset("MNIST", spec, root)
        prepare = time.perf_counter() - start

        start = time.perf_counter()
        dm = datamodule.DataModule(dataset="MNIST", data_dir=str(root), batch_size=BATCH)
        dm.setup("fit")
        setup_ours = time.perf_counter() - start
        start = time.perf_counter()
        theirs = MNIST(str(root), train=True, transform=ToTensor())
        setup_theirs = time.perf_counter() - start

        ours, torchvision = [], []
        for repeat in range(args.repeats):
            seconds, seen = epoch_ours(dm)
            ours.append(seconds)
            seconds, seen_theirs = epoch_torchvision(theirs)
            torchvision.append(seconds)
            assert seen == seen_theirs == args.samples, (seen, seen_theirs)
            print(f"repeat {repeat + 1}: ours {ours[-1]:.3f} s, torchvision {torchvision[-1]:.3f} s", flush=True)
    ours_s, theirs_s = statistics.median(ours), statistics.median(torchvision)
    print(f"\none epoch of {args.samples:,} 28x28 images, batch {BATCH}, 1 torch thread (medians of {args.repeats}):")
    print(f"  ours         {ours_s:.3f} s   (+ setup {setup_ours:.2f} s: load data.pt, split; one-off prepare "
          f"{prepare:.2f} s)")
    print(f"  torchvision  {theirs_s:.3f} s   (+ setup {setup_theirs:.2f} s: read the IDX files)")
    print(f"torchvision / ours = {theirs_s / ours_s:.1f}x per epoch (goal >= 5x); for one epoch plus each setup: "
          f"{(theirs_s + setup_theirs) / (ours_s + setup_ours):.1f}x")


if __name__ == "__main__":
    main()
