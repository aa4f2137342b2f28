"""The example data in datamodule.py: its declarations (the embedded digits; MNIST, Fashion-MNIST and CIFAR-10 in
their real formats, served from 127.0.0.1), seeded splits, fast batched loading, and its command line.

Every test here is marked example_data: they are skipped once a researcher replaces the example DataModule. The
DataModule and its module (DATASETS, main) are reached through train.DATAMODULE_CLASS, the one place that names
them."""

from __future__ import annotations

import errno
import inspect
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import QUICK, run_script
from http_fixtures import FileServer, cifar10_files, mnist_files, refused_url, sha256s

import support.data.downloads as downloads
import train
from support.data.downloads import COMPLETE_MARKER, prepare_dataset, remote_files

pytestmark = pytest.mark.example_data
datamodule = inspect.getmodule(train.DATAMODULE_CLASS)  # datamodule.py, found through train.py's one place


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(downloads.MIRROR_ENV, raising=False)


def data_module(**kwargs) -> datamodule.DataModule:
    return train.DATAMODULE_CLASS(**kwargs)


def served(like: str, mirrors: list[str], files: dict[str, bytes]) -> datamodule.DatasetSpec:
    """The shipped dataset `like`, declared with `files` (their sha256 checksums) at our mirrors instead."""
    return replace(datamodule.DATASETS[like], files=remote_files(mirrors, sha256s(files)))


def assert_equal_tensors(data: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(data) == sorted(expected)
    for key, value in expected.items():
        assert data[key].dtype == value.dtype and torch.equal(data[key], value), key


def test_splits_are_disjoint_seeded_and_cover_the_data():
    def splits(seed: int) -> dict[str, torch.Tensor]:
        dm = data_module(split_seed=seed)
        dm.prepare_data()
        dm.setup("fit")
        return {name: dm.splits[name].images.flatten(1) for name in ("train", "val", "test")}

    a, b, c = splits(0), splits(0), splits(1)
    assert [len(a[s]) for s in ("train", "val", "test")] == [1257, 270, 270]
    for name in a:
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["test"], c["test"])
    rows = {tuple(row.tolist()) for name in a for row in a[name]}
    everything = torch.load(prepare_dataset("digits", datamodule.dataset_spec("digits"), "data"), weights_only=True)
    assert everything["x"].shape == (1797, 1, 8, 8) and everything["x"].dtype == torch.uint8
    assert int(everything["x"].max()) == 16
    assert rows == {tuple(row.tolist()) for row in everything["x"].flatten(1)}  # nothing lost (there are duplicates)


def test_loader_gives_normalised_batches():
    dm = data_module(batch_size=100)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (100,) and y.dtype == torch.int64
    all_x = torch.cat([batch[0] for batch in dm.train_dataloader()])
    assert abs(all_x.mean().item()) < 1e-4 and abs(all_x.std().item() - 1) < 1e-2
    assert sum(len(batch[1]) for batch in dm.val_dataloader()) == 270
    assert sum(len(batch[1]) for batch in dm.test_dataloader()) == 270
    assert dm.num_classes == 10 and dm.in_channels == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset="imagenet"), "unknown dataset 'imagenet': choose one of digits, mnist"),
    (dict(batch_size=0), "batch_size"),
    (dict(val_fraction=0.6, test_fraction=0.5), "val_fraction"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        data_module(**kwargs)


@pytest.mark.slow
def test_command_line_prepares_and_exits(tmp_path: Path):
    result = run_script("datamodule.py", "--data_dir", str(tmp_path / "d"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "digits ready" in result.stdout and (tmp_path / "d" / "digits" / COMPLETE_MARKER).is_file()


def test_command_line_names_a_full_disk_in_one_line(monkeypatch, capsys, tmp_path: Path):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(downloads.torch, "save", no_space)
    assert datamodule.main(["--data_dir", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: no space left on device while preparing digits in {tmp_path / 'digits'} ")
    assert line.endswith("pass --data.data_dir on a larger disk")


def test_downloadable_datasets_describe_themselves_before_any_download():
    for name, channels in (("mnist", 1), ("fashion_mnist", 1), ("cifar10", 3)):
        dm = data_module(dataset=name, mirror="http://127.0.0.1:9/")  # train.py links these to the model first
        assert (dm.in_channels, dm.num_classes) == (channels, 10)
    assert not Path("data").exists()  # __init__ neither downloads nor creates anything


def test_shipped_declarations_carry_torchvision_checksums_and_mirrors():
    from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

    for name, cls in (("mnist", MNIST), ("fashion_mnist", FashionMNIST)):
        files = datamodule.DATASETS[name].files
        assert [(f.name, f.checksum) for f in files] == [(n, f"md5:{md5}") for n, md5 in cls.resources]
        assert all(f.urls == tuple(m + f.name for m in cls.mirrors) for f in files)
    (cifar,) = datamodule.DATASETS["cifar10"].files
    assert (cifar.checksum, cifar.urls) == (f"md5:{CIFAR10.tgz_md5}", (CIFAR10.url,))
    assert datamodule.DATASETS["digits"].files == ()


def test_a_served_mnist_feeds_the_datamodule(monkeypatch, tmp_path: Path):
    files, expected = mnist_files(600, 200)
    with FileServer(files) as server:  # a DataModule takes a name: the served MNIST is declared under one
        monkeypatch.setitem(datamodule.DATASETS, "test_mnist", served("mnist", [server.url], files))
        dm = data_module(dataset="test_mnist", data_dir=str(tmp_path), batch_size=500)
        dm.prepare_data()
        dm.setup("fit")
    assert_equal_tensors(torch.load(tmp_path / "test_mnist" / "data.pt", weights_only=True), expected)
    assert dm.num_classes == 10 and dm.in_channels == 1
    assert torch.equal(dm.splits["test"].images, expected["x_test"])  # the official test split
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 600
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize("like, make", [("fashion_mnist", lambda: mnist_files(200, 40, seed=1)),
                                        ("cifar10", lambda: cifar10_files(30))])
def test_real_formats_round_trip(tmp_path: Path, like: str, make):
    files, expected = make()
    with FileServer(files) as server:
        data = torch.load(prepare_dataset(f"test_{like}", served(like, [server.url], files), tmp_path),
                          weights_only=True)
    assert_equal_tensors(data, expected)


@pytest.mark.slow
def test_command_line_failure_is_one_line(tmp_path: Path):
    # The real MNIST declaration, through the command line, from a mirror that is down: no internet needed.
    refused = refused_url().rstrip("/")
    result = run_script("datamodule.py", "--dataset", "mnist", "--data_dir", str(tmp_path), "--mirror", refused,
                        timeout=120)
    assert result.returncode == 1 and result.stdout.startswith("downloading " + refused)
    (line,) = result.stderr.strip().splitlines()  # one line: the file, the URL and the fix
    assert line.startswith(f"error: could not download train-images-idx3-ubyte.gz of dataset 'mnist': "
                           f"{refused}/train-images-idx3-ubyte.gz: cannot connect")
    assert "python datamodule.py --dataset mnist" in line
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == ["raw"]
    assert not any((tmp_path / "mnist" / "raw").iterdir())


@pytest.mark.slow
def test_offline_prepare_and_train_with_no_server_at_all(monkeypatch, tmp_path: Path):
    files, expected = mnist_files(600, 100, seed=2)
    data_dir = tmp_path / "data"
    with FileServer(files) as server:  # "mnist" served locally, for once
        prepare_dataset("mnist", served("mnist", [server.url], files), data_dir)
    # As if prepared from the shipped declaration on a login node: its fingerprint (the real files' checksums, which
    # these synthetic files cannot have) in the marker.
    shipped = downloads.declaration_fingerprint(datamodule.dataset_spec("mnist"))
    (data_dir / "mnist" / COMPLETE_MARKER).write_text(shipped + "\n")
    # From here there is no server: the shipped MNIST declaration points at the internet, which we lack, and
    # any attempt to download fails the test.
    monkeypatch.setattr(downloads, "SmartDL", lambda *a, **k: pytest.fail("tried to download"))
    data = torch.load(prepare_dataset("mnist", datamodule.dataset_spec("mnist"), data_dir), weights_only=True)
    assert_equal_tensors(data, expected)
    result = run_script("datamodule.py", "--dataset", "mnist", "--data_dir", str(data_dir), timeout=120,
                        DATA_MIRROR=refused_url())
    assert result.returncode == 0 and "mnist ready" in result.stdout and "downloading" not in result.stdout
    results = train.main(QUICK + ["--data.dataset=mnist", f"--data.data_dir={data_dir}", "--data.batch_size=32",
                                  "--trainer.max_epochs=1",
                                  "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=2"])
    assert 0 <= results["test/acc"] <= 1


def numbered(n: int) -> dict[str, torch.Tensor]:
    """n samples whose 1x1x2 image spells their own index, so the tests can tell every sample apart."""
    index = torch.arange(n)
    return {"x": torch.stack([index // 256, index % 256], dim=1).to(torch.uint8).view(n, 1, 1, 2),
            "y": index % 10}


def build_numbered(_raw: Path) -> dict[str, torch.Tensor]:
    return numbered(103)  # no official test split; 103 leaves folds of unequal sizes


def build_numbered_with_test(_raw: Path) -> dict[str, torch.Tensor]:
    test = numbered(20)
    return {**numbered(103), "x_test": test["x"], "y_test": test["y"]}


def sample_ids(dm: datamodule.DataModule, split: str) -> list[int]:
    images = dm.splits[split].images.long()
    return (images[:, 0, 0, 0] * 256 + images[:, 0, 0, 1]).tolist()


def set_up(**kwargs) -> datamodule.DataModule:
    dm = data_module(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_one_fold_is_todays_split_and_every_fold_keeps_its_test_split():
    today = set_up()
    assert (today.hparams.folds, today.hparams.fold) == (1, 0)  # recorded in checkpoints
    one_fold = set_up(folds=1, fold=0)
    for split in ("train", "val", "test"):
        a, b = today.splits[split], one_fold.splits[split]
        assert all(torch.equal(x, y) for x, y in ((a.images, b.images), (a.labels, b.labels), (a.mean, b.mean),
                                                  (a.std, b.std))), split
    for fold in range(5):
        dm = set_up(folds=5, fold=fold)
        assert torch.equal(dm.splits["test"].images, today.splits["test"].images)
        assert torch.equal(dm.splits["test"].labels, today.splits["test"].labels)


@pytest.mark.parametrize("build", [build_numbered, build_numbered_with_test])
def test_folds_partition_everything_but_the_test_split(monkeypatch, tmp_path: Path, build):
    monkeypatch.setitem(datamodule.DATASETS, "test_numbered", datamodule.DatasetSpec(1, 10, 255, build))
    options = dict(dataset="test_numbered", data_dir=str(tmp_path))
    test = sample_ids(set_up(**options), "test")
    folds = [set_up(**options, folds=5, fold=fold) for fold in range(5)]
    pool = set(range(103)) if build is build_numbered_with_test else set(range(103)) - set(test)
    val_folds = [sample_ids(dm, "val") for dm in folds]
    assert sorted(sum(val_folds, [])) == sorted(pool)  # each sample of the pool validates exactly once
    assert max(map(len, val_folds)) - min(map(len, val_folds)) <= 1
    for dm, val in zip(folds, val_folds, strict=True):
        train = sample_ids(dm, "train")
        assert sample_ids(dm, "test") == test
        assert not set(train) & set(val) and sorted(train + val) == sorted(pool)
        train_x = dm.splits["train"].images.float() / 255  # normalised with the training split's statistics only
        assert torch.allclose(dm.splits["val"].mean.flatten(), train_x.mean(dim=(0, 2, 3)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(folds=0), r"folds=0 must be at least 1: give --data.folds 1"),
    (dict(folds=5, fold=5), r"fold=5 is outside 0..4 for folds=5: give --data.fold between 0 and 4"),
    (dict(folds=3, fold=-1), r"fold=-1 is outside 0..2 for folds=3"),
    (dict(fold=2), r"--data.fold needs --data.folds K > 1"),
])
def test_bad_folds_are_named(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        data_module(**kwargs)


def test_more_folds_than_samples_is_named_in_setup(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(datamodule.DATASETS, "test_numbered", datamodule.DatasetSpec(1, 10, 255, build_numbered))
    options = dict(dataset="test_numbered", data_dir=str(tmp_path))
    dm = data_module(**options, folds=200)
    with pytest.raises(ValueError, match=r"folds=200 is more than the 88 training and validation samples of "
                                         r"test_numbered: give --data.folds at most 88"):
        dm.setup("fit")
    assert len(set_up(**options, folds=88, fold=87).splits["val"]) == 1  # leave-one-out is the most there is


def test_train_py_takes_folds():
    parsed = train.parse_config(["--data.folds=3", "--data.fold=1"])
    assert (parsed.data.folds, parsed.data.fold) == (3, 1)
    with pytest.raises(ValueError, match="--data.fold needs --data.folds K > 1"):  # caught before anything runs
        train.parse_config(["--data.fold=1"])
