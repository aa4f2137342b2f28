"""support/run_dir/resumable.py: exact mid-epoch resume and DDP sharding for any DataModule's training DataLoader,
tested on the tests' own model and data (tests/toy.py: a plain `DataLoader(TensorDataset(...), shuffle=True)`)."""

from __future__ import annotations

import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, WeightedRandomSampler
from toy import ToyData
from toy_train import fit

from support.run_dir.resumable import EpochShuffleSampler, ExactShards, ResumableTrainingData


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return {**checkpoint["state_dict"], "global_step": torch.tensor(checkpoint["global_step"])}


def assert_same_weights(a: str | Path, b: str | Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_a_plain_shuffling_dataloader_resumes_mid_epoch_exactly():
    # 168 training samples in batches of 16: 11 batches an epoch, so step 15 is in the middle of epoch 1.
    fit("full", max_epochs=3, save_at_step=15)
    mid = torch.load("full/mid.ckpt", map_location="cpu", weights_only=False)
    assert mid["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 4  # mid-epoch 1
    fit("resumed", max_epochs=3, ckpt_path="full/mid.ckpt")
    assert_same_weights("full/last.ckpt", "resumed/last.ckpt")


def test_without_the_resumable_sampler_the_same_resume_differs():
    """The control: the check above can fail. Lightning alone restarts the interrupted epoch in another order."""
    fit("full", max_epochs=2, save_at_step=15, resumable=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit("resumed", max_epochs=2, ckpt_path="full/mid.ckpt", resumable=False)
    wa, wb = weights("full/last.ckpt"), weights("resumed/last.ckpt")
    assert any(not torch.equal(wa[key], wb[key]) for key in wa)


@pytest.mark.slow
def test_under_two_process_ddp_a_resumed_run_ends_like_an_uninterrupted_one():
    # Each rank takes 84 of the 168 samples: 6 batches an epoch, so step 15 is batch 3 of epoch 2.
    full = run_script("tests/toy_train.py", "full", "--devices=2", "--save_at_step=15", timeout=240)
    assert full.returncode == 0, full.stderr[-3000:]
    mid = torch.load("full/mid.ckpt", map_location="cpu", weights_only=False)
    assert mid["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 3
    resumed = run_script("tests/toy_train.py", "resumed", "--devices=2", "--ckpt_path=full/mid.ckpt", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights("full/last.ckpt", "resumed/last.ckpt")
    assert weights("full/last.ckpt")["global_step"] == 18  # 3 epochs of 6 batches: each rank saw half the data


def test_ranks_take_disjoint_shares_of_one_permutation_that_depends_only_on_seed_and_epoch():
    data = list(range(10))
    shares = [list(EpochShuffleSampler(data, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == data
    again = EpochShuffleSampler(data, seed=3, num_replicas=2, rank=0)
    assert list(again) == shares[0]
    again.set_epoch(1)
    assert list(again) != shares[0]
    in_order = EpochShuffleSampler(data, seed=3, shuffle=False)
    assert list(in_order) == data
    in_order.resume_at = (0, 4)  # 4 samples of epoch 0 already trained: the pass continues after them, once
    assert list(in_order) == data[4:] and list(in_order) == data


class Stream(IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(8), torch.tensor(0))] * 4)


@pytest.mark.parametrize("loader, why", [
    (DataLoader(Stream(), batch_size=2), "IterableDataset"),
    (DataLoader(TensorDataset(torch.zeros(8, 2)), batch_size=2,
                sampler=WeightedRandomSampler([1.0] * 8, 8)), "custom sampler (WeightedRandomSampler)"),
])
def test_a_loader_it_cannot_resume_gets_one_warning_and_is_left_as_it_is(loader: DataLoader, why: str):
    from types import SimpleNamespace

    trainer = SimpleNamespace(world_size=1, global_rank=0)
    with pytest.warns(UserWarning, match="restarts its interrupted epoch") as caught:
        assert ResumableTrainingData().resumable(loader, trainer) is loader
    assert len(caught) == 1 and why in str(caught[0].message)


def test_the_rebuilt_loader_keeps_everything_but_the_sampler():
    from types import SimpleNamespace

    data = ToyData()
    data.setup()
    original = DataLoader(data.splits["train"], batch_size=5, shuffle=True, drop_last=True, collate_fn=list)
    trainer = SimpleNamespace(world_size=2, global_rank=1, fit_loop=None)
    rebuilt = ResumableTrainingData().resumable(original, trainer)
    assert isinstance(rebuilt.sampler, EpochShuffleSampler) and rebuilt.sampler.rank == 1
    assert (rebuilt.batch_size, rebuilt.drop_last, rebuilt.collate_fn) == (5, True, list)
    assert callable(rebuilt.state_dict) and callable(rebuilt.load_state_dict)


def test_the_support_package_names_nothing_of_the_example():
    for path in (REPO / "support").glob("*.py"):
        text = path.read_text()
        for name in ("ImageClassifier", "import model", "from model", "import datamodule", "from datamodule",
                     "digits", "mnist", "cifar"):
            assert name not in text.lower() if name.islower() else name not in text, (path.name, name)


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(devices: int):
    """kill PID (or scancel) mid-epoch: the run stops at a batch boundary with status 143, never 0, leaving a last.ckpt
    from which the run resumes to exactly the weights of an uninterrupted run. Under DDP only rank 0 gets the signal
    (as from `kill`): every rank stops at the same batch and exits."""
    steps = 11 if devices == 1 else 6  # batches an epoch: 168 samples of 16, or 84 per rank
    epochs = "--max_epochs=4"  # DDP acts at every 10th batch of an epoch: here at the start of epoch 3
    full = run_script("tests/toy_train.py", "full", f"--devices={devices}", epochs, timeout=240)
    assert full.returncode == 0, full.stderr[-3000:]
    started = time.monotonic()
    stopped = run_script("tests/toy_train.py", "stopped", f"--devices={devices}", epochs, "--sigterm_at_step=15",
                         timeout=240)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert time.monotonic() - started < 120 and "stopped by SIGTERM" in stopped.stderr
    last = torch.load("stopped/last.ckpt", map_location="cpu", weights_only=False)
    # Acted on at the next batch (one process) or the next agreed batch (every 10th of an epoch, DDP).
    assert last["global_step"] == (15 if devices == 1 else 3 * steps), last["global_step"]
    assert not list(Path("stopped").glob(".*.tmp"))
    resumed = run_script("tests/toy_train.py", "stopped", f"--devices={devices}", epochs,
                         "--ckpt_path=stopped/last.ckpt", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights("full/last.ckpt", "stopped/last.ckpt")


@pytest.mark.slow
def test_under_ddp_every_rank_exits_within_seconds_of_sigterm_every_time():
    """Five more stops of a 2-process DDP run (the test above is the first): each time both ranks exit, with
    status 143 and a checkpoint, within 30 s of the signal, and no process of the run is left behind."""
    for attempt in range(4):
        out = f"stop{attempt}"
        result = run_script("tests/toy_train.py", out, "--devices=2", "--max_epochs=4", "--sigterm_at_step=15",
                            timeout=240)
        ended = time.time()
        assert result.returncode == 143, result.stderr[-3000:]
        assert ended - float(Path(out, "sigterm_sent_at").read_text()) < 30
        assert Path(out, "last.ckpt").is_file()
        left = subprocess.run(["pgrep", "-f", f"toy_train.py {out}"], capture_output=True, text=True).stdout.split()
        assert not left, f"processes of the stopped run still running: {left}"


@pytest.mark.parametrize("samples, ranks, batch_size", [(270, 2, 64), (271, 2, 64), (257, 4, 64), (256 + 3, 4, 64),
                                                        (129, 2, 64), (5, 4, 2), (100, 8, 3), (7, 3, 1)])
def test_exact_shards_evaluate_each_sample_once_in_equally_many_batches(samples: int, ranks: int, batch_size: int):
    """Lightning's DistributedSampler pads evaluation shards with repeated samples; these take each sample once and
    pick a batch size at which every rank runs as many batches (DDP's forward is a collective)."""
    size = ExactShards.batch_size_for(samples, ranks, batch_size)
    if size is None:  # fewer samples than ranks, or no batch size that fits: Lightning's padding stays
        assert samples < ranks or samples % ranks and all((samples // ranks) % b == 0 for b in range(1, batch_size + 1))
        return
    assert 1 <= size <= batch_size and (size == batch_size or samples % ranks)
    data = TensorDataset(torch.arange(samples))
    shards = [list(ExactShards(data, ranks, rank)) for rank in range(ranks)]
    assert sorted(i for shard in shards for i in shard) == list(range(samples))
    assert [len(shard) for shard in shards] == [len(ExactShards(data, ranks, rank)) for rank in range(ranks)]
    assert len({-(-len(shard) // size) for shard in shards}) == 1, (size, [len(s) for s in shards])
