"""datamodule.py with the embedded digits: preparation once, seeded splits, fast batched loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_script

from datamodule import COMPLETE_MARKER, DataModule, EpochShuffleSampler, prepare_dataset


def test_prepare_writes_once_with_a_completion_marker(tmp_path: Path):
    path = prepare_dataset("digits", tmp_path / "data")
    assert (path.parent / COMPLETE_MARKER).is_file()
    before = path.stat().st_mtime_ns
    assert prepare_dataset("digits", tmp_path / "data") == path
    assert path.stat().st_mtime_ns == before  # reused, not rebuilt
    data = torch.load(path, weights_only=True)
    assert data["x"].shape == (1797, 1, 8, 8) and data["x"].dtype == torch.uint8 and int(data["x"].max()) == 16


def test_a_dataset_without_its_marker_is_rebuilt(tmp_path: Path):
    path = prepare_dataset("digits", tmp_path)
    (path.parent / COMPLETE_MARKER).unlink()
    path.write_bytes(b"half-written")
    prepare_dataset("digits", tmp_path)
    assert torch.load(path, weights_only=True)["y"].shape == (1797,)


def test_splits_are_disjoint_seeded_and_cover_the_data():
    def splits(seed: int) -> dict[str, torch.Tensor]:
        dm = DataModule(split_seed=seed)
        dm.prepare_data()
        dm.setup("fit")
        return {name: dm.splits[name].images.flatten(1) for name in ("train", "val", "test")}

    a, b, c = splits(0), splits(0), splits(1)
    assert [len(a[s]) for s in ("train", "val", "test")] == [1257, 270, 270]
    for name in a:
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["test"], c["test"])
    rows = {tuple(row.tolist()) for name in a for row in a[name]}
    everything = torch.load(prepare_dataset("digits", "data"), weights_only=True)["x"].flatten(1)
    assert rows == {tuple(row.tolist()) for row in everything}  # nothing lost (the digits contain duplicates)


def test_loader_gives_normalised_batches():
    dm = DataModule(batch_size=100)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (100,) and y.dtype == torch.int64
    all_x = torch.cat([batch[0] for batch in dm.train_dataloader()])
    assert abs(all_x.mean().item()) < 1e-4 and abs(all_x.std().item() - 1) < 1e-2
    assert sum(len(batch[1]) for batch in dm.val_dataloader()) == 270
    assert dm.num_classes == 10 and dm.in_channels == 1


def test_shuffle_depends_only_on_seed_and_epoch():
    sampler = EpochShuffleSampler(range(50), seed=3)
    epoch0 = list(sampler)
    torch.manual_seed(123)  # the global RNG must not matter
    assert list(sampler) == epoch0 and sorted(epoch0) == list(range(50))
    sampler.set_epoch(1)
    assert list(sampler) != epoch0


def test_ddp_ranks_split_each_epoch_and_a_resumed_rank_skips_what_it_trained():
    full = EpochShuffleSampler(range(51), seed=3)
    full.set_epoch(2)
    order = list(full)
    ranks = [EpochShuffleSampler(range(51), seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    shards = [list(sampler) for sampler in ranks]
    assert shards == [order[0::2], order[1::2] + order[:1]]  # padded with the first index, so both get 26
    assert len(ranks[1]) == 26
    ranks[1].resume_at = (2, 10)  # resumed after 10 samples of this rank's epoch-2 shard
    assert list(ranks[1]) == shards[1][10:] and list(ranks[1]) == shards[1]  # the skip applies to one pass only
    ranks[1].resume_at = (1, 10)  # saved at the end of epoch 1: epoch 2 is whole
    assert list(ranks[1]) == shards[1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'"),
    (dict(batch_size=0), "batch_size"),
    (dict(val_fraction=0.6, test_fraction=0.5), "val_fraction"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        DataModule(**kwargs)


def test_command_line_prepares_and_exits(tmp_path: Path):
    result = run_script("datamodule.py", "--data_dir", str(tmp_path / "d"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "digits ready" in result.stdout and (tmp_path / "d" / "digits" / COMPLETE_MARKER).is_file()


def test_downloadable_datasets_describe_themselves_before_any_download():
    for name, channels in (("mnist", 1), ("fashion_mnist", 1), ("cifar10", 3)):
        dm = DataModule(dataset=name, mirror="http://127.0.0.1:9/")  # train.py links these to the model first
        assert (dm.in_channels, dm.num_classes) == (channels, 10)
    assert not Path("data").exists()  # __init__ neither downloads nor creates anything
