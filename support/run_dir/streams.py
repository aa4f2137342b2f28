"""Streaming data (an IterableDataset) shared out between DDP processes and DataLoader workers.

Lightning shards a map-style dataset by rank with its DistributedSampler, but leaves a stream as it is: every
process then trains on the whole stream (measured: the same step count on 1 and on 2 processes, so 2 GPUs did the
work of one), and every DataLoader worker yields the whole stream too, so `num_workers=4` trains on each sample 4
times. PyTorch leaves that to the dataset's __iter__ (torch.utils.data.get_worker_info, torch.distributed).

ShardedStream gives each (rank, worker) every n-th item of the stream (n = ranks x workers), reading the whole
stream in each and keeping its share, which works for any stream at the cost of reading it n times. For training,
a last incomplete round of n items is dropped, so that every rank takes as many steps (DDP's gradient exchange
waits for all ranks: one more batch on one rank would hang the run); evaluation keeps every item, each on exactly
one rank. A dataset that shards itself says so with a `shards_by_rank = True` attribute and is left as it is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from support.errors import SettingError

SELF_SHARDED = "shards_by_rank"  # a dataset attribute: True when its __iter__ already takes its rank's share
_NOTHING = object()


class ShardedStream(IterableDataset):
    """The items of `stream` that belong to process `rank` of `ranks` and to the DataLoader worker iterating it.
    `equal`: every shard gets as many items (the last incomplete round dropped)."""

    def __init__(self, stream: IterableDataset, rank: int, ranks: int, equal: bool) -> None:
        self.stream, self.rank, self.ranks, self.equal = stream, rank, ranks, equal

    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        shards, shard = self.ranks * workers, self.rank * workers + worker_id
        kept = _NOTHING
        for index, item in enumerate(self.stream):
            position = index % shards
            if position == shard:
                kept = item
            if position == shards - 1 and kept is not _NOTHING:  # the round is whole: this shard's item goes out
                yield kept
                kept = _NOTHING
        if kept is not _NOTHING and not self.equal:
            yield kept


def needs_sharding(loader: Any, ranks: int) -> bool:
    """A DataLoader over a stream that several processes or workers would each read whole."""
    return isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset) and \
        not isinstance(loader.dataset, ShardedStream) and not getattr(loader.dataset, SELF_SHARDED, False) and \
        (ranks > 1 or loader.num_workers > 1)


def sharded(loader: DataLoader, rank: int, ranks: int, stage: str) -> DataLoader:
    """The same DataLoader over this process's share of its stream (see the module docstring)."""
    if type(loader) is not DataLoader:  # a subclass: its own arguments cannot be recovered for a stream
        raise SettingError(
            f"the {stage} data is a stream (an IterableDataset) in a {type(loader).__name__}, which the template "
            f"cannot share out: each of the {ranks} process(es) and {max(loader.num_workers, 1)} worker(s) would read "
            f"all of it; return a plain DataLoader, or take each rank's and worker's share in the dataset's __iter__ "
            f"and set {SELF_SHARDED} = True on it")
    return rebuilt(loader, dataset=ShardedStream(loader.dataset, rank, ranks, equal=stage == "training"))


def rebuilt(loader: DataLoader, **changes: Any) -> DataLoader:
    """A plain DataLoader built again from its public attributes, with `changes` (dataset, sampler, batch_size,
    generator) in place of its own."""
    workers = loader.num_workers
    arguments = dict(dataset=loader.dataset, batch_size=loader.batch_size, num_workers=workers,
                     collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                     timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                     multiprocessing_context=loader.multiprocessing_context,
                     prefetch_factor=loader.prefetch_factor if workers > 0 else None,
                     persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device,
                     in_order=loader.in_order)
    return DataLoader(**{**arguments, **changes})
