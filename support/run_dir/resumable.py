"""Exact mid-epoch resume and DDP sharding for any DataModule's training DataLoader.

A DataModule returns its training loader the way Lightning's docs write it, `DataLoader(dataset, batch_size=...,
shuffle=True)`. ResumableTrainingData (a callback train.py adds) rebuilds that loader with EpochShuffleSampler, the
way Lightning itself puts in its DistributedSampler: a permutation that depends only on (seed, epoch), sharded by
rank, that can start part-way through an epoch. The loader's `state_dict` records (epoch, batches trained), which
Lightning saves in every checkpoint and hands back on resume, so a resumed run trains on exactly the batches an
uninterrupted run would. Where that cannot be done (an IterableDataset, a custom sampler or batch_sampler), one
warning says that a resumed run restarts its interrupted epoch. A stream (IterableDataset) is shared out between
processes and DataLoader workers by support/run_dir/streams.py.

Under DDP the validation and test loaders get ExactShards: every sample on exactly one rank, where Lightning's
DistributedSampler pads each rank with repeated samples, so metrics counted some samples twice and depended on
the number of processes. torchmetrics and Lightning's epoch means (self.log with sync_dist: a sum over samples
divided by their count, with the count made exact by ExactEpochMeans) then equal the single-process values.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import MethodType
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from support.run_dir.streams import needs_sharding, rebuilt, sharded


class EpochShuffleSampler(DistributedSampler):
    """A new permutation every epoch that depends only on (seed, epoch), not on the global RNG (or the data order
    when shuffle is off); under DDP each rank takes every num_replicas-th index of it (padded, as torch's
    DistributedSampler does). `resume_at` makes one epoch's pass start after the samples this rank had already
    trained on. Being a DistributedSampler, Lightning keeps it under DDP instead of swapping in its own."""

    def __init__(self, data_source: Dataset, seed: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples of it already trained), for one pass

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(self.dataset), generator=generator)
        else:
            order = torch.arange(len(self.dataset))
        order = order.repeat(-(-self.total_size // len(order)))[:self.total_size]  # pad so every rank gets as many
        epoch, skip = self.resume_at or (self.epoch, 0)
        self.resume_at = None
        return iter(order[self.rank::self.num_replicas][skip if epoch == self.epoch else 0:].tolist())


class ExactShards(DistributedSampler):
    """Evaluation sharding without padding: rank r of W takes samples r, r+W, r+2W, ... (in order), so each sample
    is evaluated once. Shards then differ by one sample; `batch_size_for` picks a batch size at which every rank
    still runs the same number of batches, as DDP needs (its forward broadcasts buffers, a collective per batch)."""

    def __init__(self, data_source: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(data_source), num_replicas))  # this rank's share, unpadded
        self.total_size = len(data_source)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    @staticmethod
    def batch_size_for(samples: int, ranks: int, batch_size: int) -> int | None:
        """The largest batch size <= batch_size at which every rank runs as many batches: ranks hold samples // ranks
        samples or one more, and one more needs another batch exactly when the batch size divides the fewer. None
        when no size does (fewer samples than ranks; batch size 1)."""
        fewest = samples // ranks
        if fewest == 0:
            return None
        if samples % ranks == 0:
            return batch_size
        return next((size for size in range(batch_size, 1, -1) if fewest % size), None)


class ExactEpochMeans(Callback):
    """Lightning averages a value logged with sync_dist=True over DDP ranks as (mean of the ranks' sums) / (mean of
    their sample counts), and its mean of an integer count truncates (Tensor.copy_ of count / ranks into the integer
    tensor). Measured: 271 test samples on 2 ranks, 136 + 135, gave a count of 135 instead of 135.5 and a test/loss
    0.4% too high. Counts made floating point after each evaluation batch (Lightning syncs after the last one,
    before on_*_epoch_end) keep the mean exact. Private: watched by tests/test_private_names.py."""

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self.counts_in_floating_point(trainer)

    def on_test_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self.counts_in_floating_point(trainer)

    @staticmethod
    def counts_in_floating_point(trainer: Trainer) -> None:
        if trainer.world_size < 2:
            return
        for result in trainer._results.values():
            count = getattr(result, "cumulated_batch_size", None)
            if isinstance(count, torch.Tensor) and not count.is_floating_point():
                result.cumulated_batch_size = count.to(torch.float32 if count.device.type == "mps" else torch.float64)


def run_seed() -> int:
    """The run's seed, as Lightning's samplers take it: seed_everything sets PL_GLOBAL_SEED, for DDP workers too."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def why_not_resumable(loader: DataLoader) -> str | None:
    """Why EpochShuffleSampler cannot replace this loader's sampler, or None when it can."""
    if isinstance(loader.dataset, IterableDataset):
        return "its dataset is an IterableDataset (no indices to reorder)"
    if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
        return f"it has a custom batch_sampler ({type(loader.batch_sampler).__name__})"
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler, DistributedSampler)):
        return f"it has a custom sampler ({type(loader.sampler).__name__})"
    if isinstance(loader.sampler, RandomSampler) and (loader.sampler.replacement
                                                      or loader.sampler.num_samples != len(loader.dataset)):
        return "its RandomSampler draws with replacement or a fixed number of samples"
    return None


def with_sampler(loader: DataLoader, sampler: DistributedSampler, seed: int, batch_size: int | None = None
                 ) -> DataLoader:
    """The same DataLoader with `sampler` instead of its own (and `batch_size`, if given). Its own generator:
    creating an iterator then never draws from the global RNG, which the model's dropout uses, so a resumed run's
    dropout masks match."""
    generator = torch.Generator().manual_seed(seed)
    if type(loader) is DataLoader:  # the common case, rebuilt from its public attributes
        return rebuilt(loader, sampler=sampler, batch_size=batch_size or loader.batch_size, generator=generator)
    # A DataLoader subclass: rebuilt the way Lightning rebuilds it to put in its DistributedSampler, from the
    # arguments it recorded when train_dataloader() made it. Private; watched by tests/test_private_names.py.
    from pytorch_lightning.trainer.states import RunningStage
    from pytorch_lightning.utilities.data import _update_dataloader

    if batch_size not in (None, loader.batch_size):
        raise ValueError(f"a {type(loader).__name__} cannot be rebuilt with another batch size")
    subclass = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    subclass.generator = generator
    return subclass


def exactly_once(loader: Any, trainer: Trainer, stage: str) -> Any:
    """An evaluation loader with ExactShards under DDP (each sample on one rank, every rank as many batches), or as
    it is, with one warning where that cannot be done (Lightning then pads, as it always did)."""
    if needs_sharding(loader, trainer.world_size):  # a stream: each rank and worker gets its share
        return sharded(loader, trainer.global_rank, trainer.world_size, stage)
    if trainer.world_size < 2 or not isinstance(loader, DataLoader) or isinstance(loader.sampler, DistributedSampler):
        return loader  # one process, several loaders (Lightning handles each), or the user's own sharding
    problem = why_not_resumable(loader) or ("it drops its last batch" if loader.drop_last else None)
    batch_size = None if problem else ExactShards.batch_size_for(len(loader.dataset), trainer.world_size,
                                                                 loader.batch_size)
    if not problem and batch_size is None:
        problem = f"{len(loader.dataset)} samples at batch size {loader.batch_size} cannot give {trainer.world_size} " \
                  "ranks equally many batches"
    if not problem:
        try:
            return with_sampler(loader, ExactShards(loader.dataset, trainer.world_size, trainer.global_rank),
                                run_seed(), batch_size)
        except Exception as err:  # a subclass whose arguments Lightning could not recover
            problem = str(err)
    rank_zero_warn(f"the {stage} DataLoader is sharded by Lightning's padded DistributedSampler ({problem}): "
                   f"its metrics count up to {trainer.world_size - 1} samples twice")
    return loader


class ResumableTrainingData(Callback):
    """Puts EpochShuffleSampler into the training DataLoader that the DataModule (or the model) returns and makes the
    loader resumable in Lightning's sense (`state_dict` / `load_state_dict`), and ExactShards into the evaluation
    loaders under DDP, as the module docstring explains."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        for hook in ("train_dataloader", "val_dataloader", "test_dataloader"):
            make_loader = getattr(owner, hook)
            if getattr(make_loader, "wrapped_by_template", False):
                continue

            def wrapped(hook: str = hook, make_loader: Any = make_loader) -> Any:
                loader = make_loader()
                if hook == "train_dataloader":  # the Trainer asking now (a DataModule may serve several in turn)
                    return self.resumable(loader, getattr(owner, "trainer", None) or trainer)
                if isinstance(loader, DataLoader):
                    # Evaluation loaders draw their iterators' seeds from here rather than from the global RNG, so
                    # validating (or validating more often) never changes the training run's dropout masks.
                    loader.generator = torch.Generator().manual_seed(run_seed())
                stage = hook.removesuffix("_dataloader")
                return exactly_once(loader, getattr(owner, "trainer", None) or trainer, stage)

            wrapped.wrapped_by_template = True  # type: ignore[attr-defined]
            setattr(owner, hook, wrapped)  # an instance attribute: Lightning calls the hook by name

    def resumable(self, loader: Any, trainer: Trainer) -> Any:
        if needs_sharding(loader, trainer.world_size):
            loader = sharded(loader, trainer.global_rank, trainer.world_size, "training")
        if not isinstance(loader, DataLoader):
            rank_zero_warn(f"the training data is a {type(loader).__name__}, not one DataLoader: a resumed run "
                           "restarts its interrupted epoch (exact mid-epoch resume needs one map-style DataLoader)")
            return loader
        if problem := why_not_resumable(loader):
            rank_zero_warn(f"the training DataLoader cannot be resumed mid-epoch: {problem}; a resumed run restarts "
                           "its interrupted epoch")
            return loader
        seed = run_seed()
        shuffle = not isinstance(loader.sampler, SequentialSampler) and getattr(loader.sampler, "shuffle", True)
        sampler = EpochShuffleSampler(loader.dataset, seed, trainer.world_size, trainer.global_rank, shuffle)
        try:
            loader = with_sampler(loader, sampler, seed)
        except Exception as err:  # a subclass whose arguments Lightning could not recover
            rank_zero_warn(f"the training DataLoader ({type(loader).__name__}) could not be rebuilt with a resumable "
                           f"sampler ({err}); a resumed run restarts its interrupted epoch")
            return loader
        loop = trainer.fit_loop
        batch_size = loader.batch_size

        def state_dict(_loader: DataLoader) -> dict[str, int]:
            # The Trainer's counts, not the loader's: they say what was trained rather than what was prefetched.
            return {"epoch": loop.epoch_progress.current.completed,
                    "batches_trained": loop.epoch_loop.batch_progress.current.completed}

        def load_state_dict(_loader: DataLoader, state: dict[str, int]) -> None:
            if _loader.sampler is sampler:  # Lightning swaps in a SequentialSampler for overfit_batches
                sampler.resume_at = (state["epoch"], state["batches_trained"] * batch_size)

        loader.state_dict = MethodType(state_dict, loader)
        loader.load_state_dict = MethodType(load_state_dict, loader)
        return loader
