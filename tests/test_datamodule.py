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

import support.downloads as downloads
import train
from support.downloads import COMPLETE_MARKER, prepare_dataset, remote_files

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
