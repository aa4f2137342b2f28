"""What check.py measures when a contract fails, so that it names the cause it found (see check.py's contracts).

- BatchFingerprints: a hash of every training batch, by (epoch, batch index): a resumed run that trains on other
  batches than the uninterrupted one (a stream restarted from its beginning, a sampler the checkpoint does not
  restore) shows at the first batch after the resume; DDP ranks that train on the same batches show as equal hashes.
- hidden_state: a model's attributes a checkpoint does not hold (plain numbers, lists, tensors that are not
  registered buffers), compared between two runs.
- clean_process_state: each contract starts with the environment it was given and without a process group, so that
  one contract's in-process DDP set-up (MASTER_PORT, a process group of one) cannot break the next one (measured:
  `ARGS=--trainer.strategy=ddp_find_unused_parameters_true` made the 2-process contract fail with EADDRINUSE)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from torch.utils.data import IterableDataset


def fingerprint(batch: Any) -> str:
    """A short hash of every tensor (and plain value) in a batch, nested lists, tuples and dicts included."""
    digest = hashlib.sha1()

    def add(part: Any) -> None:
        if isinstance(part, torch.Tensor):
            digest.update(str((part.dtype, tuple(part.shape))).encode())
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, dict):
            for key in sorted(part, key=str):
                digest.update(str(key).encode())
                add(part[key])
        elif isinstance(part, (list, tuple)):
            for item in part:
                add(item)
        else:
            digest.update(repr(part).encode())

    add(batch)
    return digest.hexdigest()[:16]


class BatchFingerprints(Callback):
    """Records the fingerprint of each training batch by "epoch/batch_index", and whether the training data is a
    stream (IterableDataset); with `path`, each rank writes its record to `path`.rank<N>.json when training ends."""

    def __init__(self, path: str | None = None) -> None:
        self.path, self.seen, self.stream = path, {}, False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stream = isinstance(getattr(trainer.train_dataloader, "dataset", None), IterableDataset)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.seen[f"{trainer.current_epoch}/{batch_idx}"] = fingerprint(batch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.path:
            Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def ranks_fingerprints(path: str, ranks: int) -> list[dict[str, str]]:
    """What BatchFingerprints(path) wrote on each of `ranks` ranks (an empty record for a rank that wrote none)."""
    files = [Path(f"{path}.rank{rank}.json") for rank in range(ranks)]
    return [json.loads(file.read_text()) if file.is_file() else {} for file in files]


def hidden_state(model: LightningModule) -> dict[str, Any]:
    """The model's own attributes that a checkpoint does not hold unless the model saves them: plain values
    (counters, flags, lists of numbers) and tensors that are not registered as parameters or buffers."""
    skip = {"training", "prepare_data_per_node", "allow_zero_length_dataloader_with_multiple_devices"}
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in vars(model).items()
            if not k.startswith("_") and k not in skip and isinstance(v, (int, float, bool, str, list, tuple,
                                                                           torch.Tensor))}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            bool((a == b).all())
    return a == b


def drifted(first: dict[str, Any], second: dict[str, Any], labels: tuple[str, str] = ("uninterrupted", "resumed")
            ) -> list[str]:
    """The hidden_state attributes that differ between two models, each as one phrase using `labels`."""
    def shown(value: Any) -> str:
        return f"tensor {value.flatten()[:4].tolist()}" if isinstance(value, torch.Tensor) else repr(value)

    return [f"{k} is {shown(v)} {labels[0]} but {shown(second.get(k))} {labels[1]}"
            for k, v in first.items() if not same(v, second.get(k))]


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first entry of state dict `a` that `b` lacks, reshapes or holds with other values, or None."""
    for key, value in a.items():
        other = b.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        if other is None or other.shape != value.shape:
            return f"{key} missing or reshaped"
        if not bool((value == other).all()):
            return f"{key} differs by up to {float((value.double() - other.double()).abs().max()):.3g}"
    return None


@contextmanager
def clean_process_state() -> Iterator[None]:
    """Runs the block, then destroys any process group it left and puts os.environ back as it was."""
    before = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key in [key for key in os.environ if key not in before]:
            del os.environ[key]
        os.environ.update(before)
