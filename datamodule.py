"""The data: a LightningDataModule over image-classification datasets held as compact tensors.

    python datamodule.py                                          # prepare the default dataset (digits) into ./data
    python datamodule.py --dataset mnist --data_dir /scratch/$USER/data       # on a login node, with internet
    python datamodule.py --dataset cifar10 --mirror http://mirror.example.org/datasets/{dataset}/
    python train.py --data.dataset=mnist --data.data_dir=/scratch/$USER/data    # then on any node, offline

The default dataset is embedded (scikit-learn's 1,797 handwritten 8x8 digits), so `python train.py` needs no
network; MNIST, Fashion-MNIST and CIFAR-10 are downloaded. Each dataset is declared once, in DATASETS. It is
prepared once per data directory under a file lock (DDP ranks, array tasks and jobs wait for one process to do
it): files are downloaded with pySmartDL, verified, decoded into DIR/<name>/data.pt, and the marker
DIR/<name>/COMPLETE is written last. A run that finds the marker loads data.pt and touches no network.

To use your own data: write a function that takes the raw directory and returns {"x": uint8 (N, C, H, W),
"y": int64 (N,)} (optionally also "x_test"/"y_test" for an official test split), and add a DatasetSpec for it to
DATASETS, with `files=remote_files([mirror URLs], {file name: "sha256:<hex>"})` if it is downloaded.
"""

from __future__ import annotations

import argparse
import errno
import gzip
import hashlib
import os
import pickle
import shutil
import struct
import sys
import tarfile
import tempfile
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from filelock import FileLock, Timeout
from pySmartDL import SmartDL
from torch.utils.data import DataLoader, Dataset, DistributedSampler

COMPLETE_MARKER = "COMPLETE"  # written last: a dataset directory without it is never trusted
PROCESSED_FILE = "data.pt"
MIRROR_ENV = "DATA_MIRROR"  # a cluster's own mirror, used instead of the declared: http://host/data/{dataset}/
TIMEOUT_S = 20.0  # a connection or read that waits longer fails (pySmartDL applies it per socket operation)
MIN_SPEED = 50_000  # bytes/s: a transfer slower than this on average is abandoned, so a trickle cannot hang us
ATTEMPTS = 3  # per URL, when the server answered but the transfer failed (dropped, stalled, truncated, HTTP 5xx)
BACKOFF_S = 2.0  # wait 2 s, then 4 s, ... between attempts at one URL
THREADS = 4  # parallel connections per file where the server allows ranges (pySmartDL keeps parts >= 2 MB)


class DownloadError(RuntimeError):
    """A dataset could not be downloaded or prepared. The message is one line: file, URLs tried, what to do."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloaded file: its name in DIR/<dataset>/raw/, its checksum, and the URLs that serve it, in order."""

    name: str
    checksum: str  # "<hashlib algorithm>:<hex digest>", e.g. "sha256:9f86d0..." or "md5:f68b3c..."
    urls: tuple[str, ...]

    def __post_init__(self) -> None:
        algorithm, _, digest = self.checksum.partition(":")
        if algorithm not in hashlib.algorithms_available or not digest:
            raise ValueError(f"{self.name}: checksum must look like 'sha256:<hex>', got {self.checksum!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the template needs to know about a dataset, in one place."""

    in_channels: int
    num_classes: int
    max_value: int  # pixel value that maps to 1.0 (16 for the digits, 255 for 8-bit images)
    build: Callable[[Path], dict[str, torch.Tensor]]  # DIR/<name>/raw -> {"x", "y"[, "x_test", "y_test"]}
    files: tuple[RemoteFile, ...] = ()  # downloaded and verified into DIR/<name>/raw before `build` runs


def remote_files(mirrors: list[str], checksums: dict[str, str]) -> tuple[RemoteFile, ...]:  # file f is at mirror + f
    return tuple(RemoteFile(name, checksum, tuple(m + name for m in mirrors)) for name, checksum in checksums.items())


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


def file_checksum(path: Path, like: str) -> str:
    """path's checksum with the algorithm of `like` ("sha256:..."), read in blocks: CIFAR-10 is 170 MB."""
    algorithm = like.partition(":")[0]
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return f"{algorithm}:{digest.hexdigest()}"


def fetch(url: str, dest: Path) -> None:
    """One pySmartDL transfer of url to dest; raises what went wrong."""
    dl = SmartDL(url, str(dest), threads=THREADS, timeout=TIMEOUT_S, progress_bar=sys.stdout.isatty())
    # pySmartDL's own retries reuse a thread pool that remembers the first failure, so they re-download the
    # whole file three times and fail anyway: it makes one attempt, the retries with back-off are ours.
    dl.attemps_limit = 1
    dl.start(blocking=False)  # raises at once for a refused connection or an HTTP error
    # Its timeout bounds each socket operation, not the transfer: a server trickling bytes would keep it going
    # forever, so wait against a deadline of our own (unknown sizes count as 1 GiB).
    deadline = time.monotonic() + 2 * TIMEOUT_S + (dl.filesize or 1 << 30) / MIN_SPEED
    try:
        while not dl.isFinished():
            if time.monotonic() > deadline:
                raise OSError(f"too slow: under {MIN_SPEED / 1000:g} kB/s on average")
            time.sleep(0.05)
    except BaseException:  # our deadline, or Ctrl-C: stop its threads, which would otherwise carry on
        dl.stop()
        raise
    dl.wait()
    if not dl.isSuccessful():
        thread_errors = dl.pool.get_exceptions()  # the errors its threads hit (get_errors() only summarises them)
        raise thread_errors[0] if thread_errors else OSError("incomplete transfer: the connection closed early")
    size = dest.stat().st_size
    if dl.filesize and size != dl.filesize:  # pySmartDL lets up to 4 kB per thread go missing
        raise OSError(f"incomplete transfer: received {size} of {dl.filesize} bytes")


def describe(err: Exception) -> tuple[str, bool]:
    """A short reason, and whether the same URL is worth another try (the server answered, the transfer failed)."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}", int(err.code) >= 500 or int(err.code) in (408, 429)
    if isinstance(err, urllib.error.URLError):  # no connection at all: refused, unknown host, no route, timeout
        return f"cannot connect ({getattr(err.reason, 'strerror', None) or err.reason})", False
    if isinstance(err, (TimeoutError, ConnectionError)):
        stalled = isinstance(err, TimeoutError)
        return f"no data for {TIMEOUT_S:g} s (server stalled)" if stalled else f"connection dropped ({err})", True
    return str(err) or type(err).__name__, True


def download(file: RemoteFile, urls: list[str], raw: Path, dataset: str) -> None:
    """Fetch file into raw/, verified: it appears under its name whole and correct, or not at all."""
    failures, mismatch = [], False
    for url in urls:
        for attempt in range(1, ATTEMPTS + 1):
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=raw))  # also catches pySmartDL's .000 parts
            try:
                print(f"downloading {url}", flush=True)
                fetch(url, tmp / file.name)
                got = file_checksum(tmp / file.name, file.checksum)
                if got == file.checksum.lower():
                    os.replace(tmp / file.name, raw / file.name)  # atomic: the final name only holds verified files
                    return
                problem, retry, mismatch = f"checksum mismatch (got {got}, declared {file.checksum})", False, True
            except Exception as err:  # whatever pySmartDL raises: report it, then try again or move on
                if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                    raise DownloadError(f"no space left on device writing {file.name} from {url} into {raw}: "
                                        "free some space or pass --data.data_dir on a larger disk") from err
                problem, retry = describe(err)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if not retry or attempt == ATTEMPTS:
                failures.append(f"{url}: {problem}" + (f" ({attempt} attempts)" if attempt > 1 else ""))
                break
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
    hint = "; a checksum mismatch means the server sent other bytes than declared" if mismatch else ""
    raise DownloadError(f"could not download {file.name} of dataset {dataset!r}: {'; '.join(failures)}. "
                        f"Check the network and mirror, or prepare it where there is internet (a login node): "
                        f"`python datamodule.py --dataset {dataset} --data_dir DIR`, or point --data.mirror or "
                        f"${MIRROR_ENV} at a mirror that has it{hint}")


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the marker can be, even if the node crashes
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half of it
    finally:
        tmp.unlink(missing_ok=True)


def prepare_dataset(name: str, data_dir: str | Path, mirror: str | None = None) -> Path:
    """Download, verify and build DIR/<name>/data.pt once; safe when many processes (DDP ranks, array tasks,
    separate jobs) call it at once: one does the work under a file lock, the others wait and then reuse it.
    Each file comes from its declared URLs in order, or only from `mirror` (default $DATA_MIRROR) + its name."""
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
    lock = FileLock(str(root) + ".lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        print(f"waiting for another process to prepare {name} in {root}", flush=True)
        lock.acquire()
    try:
        if not marker.exists():  # another process may have finished while we waited
            raw = root / "raw"
            if spec.files:
                raw.mkdir(exist_ok=True)
                for leftover in raw.glob(".download-*"):  # from a process that was killed mid-download
                    shutil.rmtree(leftover, ignore_errors=True)
            base = mirror or os.environ.get(MIRROR_ENV)
            for file in spec.files:
                path = raw / file.name
                if path.exists() and file_checksum(path, file.checksum) == file.checksum.lower():
                    continue  # copied in by hand, or fetched by an earlier, interrupted preparation
                urls = [base.replace("{dataset}", name).rstrip("/") + "/" + file.name] if base else list(file.urls)
                download(file, urls, raw, name)
            _atomic_torch_save(spec.build(raw), root / PROCESSED_FILE)
            marker.write_text("ok\n")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DownloadError(f"no space left on device while preparing {name} in {root}: free some space or "
                                "pass --data.data_dir on a larger disk") from err
        raise
    finally:
        lock.release()
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


class EpochShuffleSampler(DistributedSampler):
    """A new permutation every epoch that depends only on (seed, epoch), not on the global RNG; under DDP each rank
    takes every num_replicas-th index of it (padded, as torch's DistributedSampler does).

    So a run resumed from a checkpoint sees exactly the batches an uninterrupted run would; `resume_at` makes that
    epoch's pass start after the samples this rank had already trained on. Being a DistributedSampler, Lightning
    uses it as it is under DDP instead of swapping in its own, which cannot skip.
    """

    def __init__(self, data_source: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples of it already trained), for one pass

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        order = order.repeat(-(-self.total_size // len(order)))[:self.total_size]  # pad so every rank gets as many
        epoch, skip = self.resume_at or (self.epoch, 0)
        self.resume_at = None
        return iter(order[self.rank::self.num_replicas][skip if epoch == self.epoch else 0:].tolist())


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable in Lightning's sense (`state_dict` / `load_state_dict`): a checkpoint
    records the epoch and the batches trained in it (``position``, from the Trainer, which knows what was trained
    rather than prefetched), and a run restored from it continues that epoch's order where it stopped."""

    position: Callable[[], tuple[int, int]] | None = None

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.position() if self.position is not None else (getattr(self.sampler, "epoch", 0), 0)
        return {"epoch": epoch, "batches_trained": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, EpochShuffleSampler):  # Lightning swaps in a SequentialSampler for overfit_batches
            self.sampler.resume_at = (state["epoch"], state["batches_trained"] * self.batch_size)


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
        mirror: base URL to download every file from instead of the declared mirrors ({dataset} is replaced by
            the dataset's name); default: $DATA_MIRROR if set.
    """

    def __init__(self, dataset: str = "digits", data_dir: str = "data", batch_size: int = 64,
                 num_workers: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0, mirror: str | None = None) -> None:
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
        prepare_dataset(self.hparams.dataset, self.hparams.data_dir, self.hparams.mirror)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        data = torch.load(prepare_dataset(hp.dataset, hp.data_dir, hp.mirror), weights_only=True)
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
        trainer = self.trainer
        ranks = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Own generator: creating an iterator then never draws from the global RNG, which the model's dropout
        # uses, so a resumed run's dropout masks match an uninterrupted run's.
        loader = (ResumableLoader if shuffle else DataLoader)(
            dataset, batch_size=self.hparams.batch_size, collate_fn=keep_batch,
            sampler=EpochShuffleSampler(dataset, seed, *ranks) if shuffle else None,
            generator=torch.Generator().manual_seed(seed), num_workers=workers, persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available())
        if shuffle and trainer is not None:
            loop = trainer.fit_loop
            loader.position = lambda: (loop.epoch_progress.current.completed,
                                       loop.epoch_loop.batch_progress.current.completed)
        return loader

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
    parser.add_argument("--mirror", help=f"base URL to use instead of the declared mirrors (default ${MIRROR_ENV})")
    args = parser.parse_args(argv)
    try:
        path = prepare_dataset(args.dataset, args.data_dir, args.mirror)
    except (DownloadError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    data = torch.load(path, weights_only=True)
    sizes = ", ".join(f"{key} {tuple(value.shape)}" for key, value in data.items())
    print(f"{args.dataset} ready at {path.parent}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
