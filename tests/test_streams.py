"""Streaming data (an IterableDataset) is shared out between DDP processes and DataLoader workers: each sample on one
of them, training shards equally long (support/run_dir/streams.py). Lightning leaves a stream whole on every
process, and PyTorch on every worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from any_models import Stream
from conftest import QUICK, REPO, run_script
from torch.utils.data import DataLoader

from support.errors import SettingError
from support.run_dir.streams import ShardedStream, needs_sharding, sharded


def items(loader: DataLoader) -> list[float]:
    return [float(x[0]) for batch in loader for x in batch[0]]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_rank_and_worker_gets_its_own_share(workers: int) -> None:
    stream = Stream(samples=37, seed=0)  # 37: not a multiple of 2 ranks x 2 workers
    every = items(DataLoader(stream, batch_size=4))
    for stage, equal in (("training", True), ("validation", False)):
        shares = [items(sharded(DataLoader(stream, batch_size=4, num_workers=workers), rank, 2, stage))
                  for rank in (0, 1)]
        assert not set(shares[0]) & set(shares[1])  # no sample on two ranks
        if equal:  # as many samples on each rank (and worker): the same number of steps
            assert len(shares[0]) == len(shares[1]) == 37 // (2 * max(workers, 1)) * max(workers, 1)
        else:  # evaluation: every sample once
            assert sorted(shares[0] + shares[1]) == sorted(every)


def test_workers_of_one_process_do_not_repeat_the_stream() -> None:
    loader = DataLoader(Stream(samples=20, seed=0), batch_size=4, num_workers=2)
    assert needs_sharding(loader, ranks=1)
    assert sorted(items(sharded(loader, 0, 1, "validation"))) == sorted(items(DataLoader(Stream(20, 0), 4)))
    assert not needs_sharding(DataLoader(Stream(20, 0), batch_size=4), ranks=1)  # one process, no workers: whole


class SelfSharded(Stream):
    shards_by_rank = True


class OwnLoader(DataLoader):
    pass


def test_a_self_sharded_stream_is_left_alone_and_a_loader_subclass_is_one_line() -> None:
    assert not needs_sharding(DataLoader(SelfSharded(8, 0), batch_size=4), ranks=2)
    assert isinstance(sharded(DataLoader(Stream(8, 0)), 0, 2, "training").dataset, ShardedStream)
    with pytest.raises(SettingError, match=r"^the training data is a stream \(an IterableDataset\) in a OwnLoader, "
                                           r"which the template cannot share out: .* set shards_by_rank = True"):
        sharded(OwnLoader(Stream(8, 0), batch_size=4), 0, 2, "training")


DRIVER = f'''
import sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
from any_models import StreamData, StreamModel
import train

train.MODEL_CLASS = train.CLI_SETUP["model_class"] = StreamModel
train.DATAMODULE_CLASS = train.CLI_SETUP["datamodule_class"] = StreamData
train.LINKED = ()
train.main()
'''


@pytest.mark.slow
def test_a_stream_on_two_ddp_processes_trains_each_sample_once(tmp_path: Path) -> None:
    (tmp_path / "stream_train.py").write_text(DRIVER)
    result = run_script(str(tmp_path / "stream_train.py"), "--trainer.devices=2", "--trainer.accelerator=cpu",
                        "--trainer.strategy=ddp", "--trainer.max_epochs=2", "--cka.every_n_epochs=0",
                        "--early_stopping.patience=100", "--run_dir=run", *QUICK, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # 96 samples a stream, 2 ranks, batches of 8: 6 steps an epoch (12 if every rank read it all), and rank 0's
    # count of the samples it trained on (DDP broadcasts rank 0's buffers) is half of each epoch's.
    assert saved["global_step"] == 12 and int(saved["state_dict"]["samples_seen"]) == 96
    assert "Lightning's padded DistributedSampler" not in result.stderr

