"""Downloadable datasets, served from 127.0.0.1 only: real file formats end to end, every failure path, 8 processes
preparing at once, and working offline once a dataset is present."""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import pySmartDL.pySmartDL
import pytest
import torch
from conftest import QUICK, REPO, run_script
from http_fixtures import FileServer, cifar10_files, declare, digest, mnist_files, prepare_in_child, refused_url

import datamodule
import train
from datamodule import COMPLETE_MARKER, DATASETS, DataModule, DownloadError, prepare_dataset

SMALL_MNIST = mnist_files(300, 50)


@pytest.fixture(autouse=True)
def quick_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short timeouts and back-off, so that each failure path takes about a second."""
    monkeypatch.setattr(datamodule, "TIMEOUT_S", 1.0)
    monkeypatch.setattr(datamodule, "ATTEMPTS", 2)
    monkeypatch.setattr(datamodule, "BACKOFF_S", 0.01)
    monkeypatch.delenv(datamodule.MIRROR_ENV, raising=False)


def register(monkeypatch: pytest.MonkeyPatch, name: str, like: str, mirrors: list[str], files: dict[str, bytes]):
    monkeypatch.setitem(DATASETS, name, declare(like, mirrors, files))


def assert_equal_tensors(data: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(data) == sorted(expected)
    for key, value in expected.items():
        assert data[key].dtype == value.dtype and torch.equal(data[key], value), key


def assert_nothing_passes_as_complete(root: Path) -> None:
    """After a failure: no marker, no data.pt, no raw file, no temporary directory or .000 part left over."""
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left in ([], ["raw"]), left


def test_shipped_declarations_carry_torchvision_checksums_and_mirrors():
    from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

    for name, cls in (("mnist", MNIST), ("fashion_mnist", FashionMNIST)):
        files = DATASETS[name].files
        assert [(f.name, f.checksum) for f in files] == [(n, f"md5:{md5}") for n, md5 in cls.resources]
        assert all(f.urls == tuple(m + f.name for m in cls.mirrors) for f in files)
    (cifar,) = DATASETS["cifar10"].files
    assert (cifar.checksum, cifar.urls) == (f"md5:{CIFAR10.tgz_md5}", (CIFAR10.url,))
    assert DATASETS["digits"].files == ()
    with pytest.raises(ValueError, match="checksum must look like"):
        datamodule.RemoteFile("x.bin", "not-a-checksum", ("http://127.0.0.1/x.bin",))


def test_mnist_downloads_in_parallel_ranges_and_loads_what_was_served(monkeypatch, tmp_path: Path):
    files, expected = mnist_files(6000, 200)  # a 4.7 MB training file: pySmartDL splits it into 2 MB ranges
    with FileServer(files) as server:
        register(monkeypatch, "test_mnist", "mnist", [server.url], files)
        path = prepare_dataset("test_mnist", tmp_path)
    starts = {r for name, r in server.ranges if name == "train-images-idx3-ubyte.gz" and r != "bytes=0-3"}
    assert len(starts) == 2, server.ranges  # two parallel connections
    assert_equal_tensors(torch.load(path, weights_only=True), expected)
    assert sorted(p.name for p in (path.parent / "raw").iterdir()) == sorted(files)  # no temp dir or parts left
    dm = DataModule(dataset="test_mnist", data_dir=str(tmp_path), batch_size=500)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.in_channels == 1
    assert torch.equal(dm.splits["test"].images, expected["x_test"])  # the official test split
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 6000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize("like, make", [("fashion_mnist", lambda: mnist_files(200, 40, seed=1)),
                                        ("cifar10", lambda: cifar10_files(30))])
def test_real_formats_round_trip(monkeypatch, tmp_path: Path, like: str, make):
    files, expected = make()
    with FileServer(files) as server:
        register(monkeypatch, f"test_{like}", like, [server.url], files)
        data = torch.load(prepare_dataset(f"test_{like}", tmp_path), weights_only=True)
    assert_equal_tensors(data, expected)
    assert DataModule(dataset=f"test_{like}").in_channels == DATASETS[like].in_channels


@pytest.mark.parametrize("mode", ["404", "refused", "silent", "stall", "truncate", "drop", "wrong"])
def test_failures_are_named_leave_nothing_and_a_good_mirror_then_works(monkeypatch, tmp_path: Path, mode: str):
    files, expected = SMALL_MNIST
    reasons = {"404": "HTTP 404 Not Found", "refused": "cannot connect", "silent": "server stalled",
               "stall": "server stalled",
               "truncate": "incomplete transfer: received", "drop": "connection dropped", "wrong": "checksum mismatch"}
    with FileServer(files, mode="ok" if mode == "refused" else mode) as bad, FileServer(files) as good:
        url = refused_url() if mode == "refused" else bad.url
        register(monkeypatch, "broken", "mnist", [url], files)
        start = time.monotonic()
        with pytest.raises(DownloadError) as caught:
            prepare_dataset("broken", tmp_path)
        assert time.monotonic() - start < 20
        message = str(caught.value)
        assert "\n" not in message and reasons[mode] in message
        assert f"{url}train-images-idx3-ubyte.gz" in message and "python datamodule.py --dataset broken" in message
        assert_nothing_passes_as_complete(tmp_path / "broken")
        with pytest.raises(DownloadError):  # nor does a second try (DataModule's path) take anything as done
            DataModule(dataset="broken", data_dir=str(tmp_path)).prepare_data()
        path = prepare_dataset("broken", tmp_path, mirror=good.url)  # what the message suggests
    assert_equal_tensors(torch.load(path, weights_only=True), expected)


def test_transient_failures_are_retried_and_the_next_mirror_is_tried(monkeypatch, tmp_path: Path):
    files, expected = SMALL_MNIST
    with FileServer(files, mode="drop", failures=1) as flaky, FileServer(files, mode="404") as missing:
        register(monkeypatch, "flaky", "mnist", [flaky.url], files)
        assert_equal_tensors(torch.load(prepare_dataset("flaky", tmp_path), weights_only=True), expected)
        # The first file took two attempts (the first dropped mid-body), the others one.
        assert flaky.requests["train-images-idx3-ubyte.gz"] == 2 * flaky.requests["t10k-images-idx3-ubyte.gz"]
        register(monkeypatch, "fallback", "mnist", [missing.url, flaky.url], files)
        assert_equal_tensors(torch.load(prepare_dataset("fallback", tmp_path), weights_only=True), expected)
    assert set(missing.requests.values()) == {2}  # one try per file (pySmartDL sizes it first), not retried


def test_a_trickling_server_is_abandoned_in_bounded_time(monkeypatch, tmp_path: Path):
    files, _ = SMALL_MNIST
    monkeypatch.setattr(datamodule, "MIN_SPEED", 1e6)  # a byte every 50 ms resets every socket timeout
    with FileServer(files, mode="trickle") as server:
        register(monkeypatch, "trickle", "mnist", [server.url], files)
        start = time.monotonic()
        with pytest.raises(DownloadError, match="too slow"):
            prepare_dataset("trickle", tmp_path)
    assert time.monotonic() - start < 15
    assert_nothing_passes_as_complete(tmp_path / "trickle")


def test_a_full_disk_is_named_and_leaves_nothing(monkeypatch, tmp_path: Path):
    files, _ = SMALL_MNIST

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with FileServer(files) as server:
        register(monkeypatch, "full", "mnist", [server.url], files)
        with monkeypatch.context() as patch:
            patch.setattr(pySmartDL.pySmartDL, "download", no_space)  # the function each pySmartDL thread runs
            where = re.escape(f"{server.url}train-images-idx3-ubyte.gz into {tmp_path / 'full' / 'raw'}")
            with pytest.raises(DownloadError, match=f"no space left on device writing .* from {where}: free"):
                prepare_dataset("full", tmp_path)
        assert_nothing_passes_as_complete(tmp_path / "full")
        with monkeypatch.context() as patch:
            patch.setattr(datamodule.torch, "save", no_space)  # full while writing data.pt
            with pytest.raises(DownloadError, match="no space left on device while preparing full"):
                prepare_dataset("full", tmp_path)
        root = tmp_path / "full"
        assert not (root / COMPLETE_MARKER).exists() and [p.name for p in root.iterdir()] == ["raw"]
        prepare_dataset("full", tmp_path)
    assert (root / COMPLETE_MARKER).exists()


def test_the_mirror_setting_replaces_the_declared_urls(monkeypatch, tmp_path: Path):
    files, expected = SMALL_MNIST
    with FileServer(files) as server:
        register(monkeypatch, "mirrored", "mnist", [refused_url()], files)  # the declared mirror is down
        monkeypatch.setenv(datamodule.MIRROR_ENV, server.url + "datasets/{dataset}")
        assert_equal_tensors(torch.load(prepare_dataset("mirrored", tmp_path), weights_only=True), expected)
        # The real MNIST declaration, through the command line, from our mirror: no internet needed.
        monkeypatch.delenv(datamodule.MIRROR_ENV)
        refused = refused_url().rstrip("/")
        result = run_script("datamodule.py", "--dataset", "mnist", "--data_dir", str(tmp_path), "--mirror", refused,
                            timeout=120)
    assert result.returncode == 1 and result.stdout.startswith("downloading " + refused)
    (line,) = result.stderr.strip().splitlines()  # one line: the file, the URL and the fix
    assert line.startswith(f"error: could not download train-images-idx3-ubyte.gz of dataset 'mnist': "
                           f"{refused}/train-images-idx3-ubyte.gz: cannot connect")
    assert "python datamodule.py --dataset mnist" in line
    assert_nothing_passes_as_complete(tmp_path / "mnist")


def test_files_copied_in_by_hand_are_verified_and_need_no_network(monkeypatch, tmp_path: Path):
    files, expected = SMALL_MNIST
    register(monkeypatch, "by_hand", "mnist", [refused_url()], files)
    raw = tmp_path / "by_hand" / "raw"
    (raw / ".download-1234").mkdir(parents=True)  # a killed process's partial download: removed
    (raw / ".download-1234" / "train-images-idx3-ubyte.gz.000").write_bytes(b"part")
    for name, data in files.items():
        (raw / name).write_bytes(data)
    assert_equal_tensors(torch.load(prepare_dataset("by_hand", tmp_path), weights_only=True), expected)
    assert sorted(p.name for p in raw.iterdir()) == sorted(files)
    register(monkeypatch, "corrupt", "mnist", [refused_url()], files)
    (tmp_path / "corrupt" / "raw").mkdir(parents=True)
    for name, data in files.items():  # one wrong byte: not trusted, so it would need the (down) server
        (tmp_path / "corrupt" / "raw" / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DownloadError, match="cannot connect"):
        prepare_dataset("corrupt", tmp_path)
    assert not (tmp_path / "corrupt" / COMPLETE_MARKER).exists()


def test_eight_processes_at_once_download_once_and_all_succeed(monkeypatch, tmp_path: Path):
    files, expected = mnist_files(3000, 100)
    files_dir, sync = tmp_path / "files", tmp_path / "sync"
    files_dir.mkdir(), sync.mkdir()
    for name, data in files.items():
        (files_dir / name).write_bytes(data)
    # Processes forked from a server that imported datamodule once: 8 fresh interpreters would each spend
    # 4 s of CPU importing Lightning. Each is still its own process with its own lock file handle.
    # (The fork server ignores our sys.path, so it finds the modules through PYTHONPATH.)
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{REPO / 'tests'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["datamodule", "http_fixtures"])
    with FileServer(files) as server:
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(DATASETS, "race", declare("mnist", [server.url], files))
            prepare_dataset("race", tmp_path / "reference")  # what one download costs, in requests
        one_download = dict(server.requests)
        server.requests.clear()
        outs = [tmp_path / f"out-{i}" for i in range(8)]
        children = [context.Process(target=prepare_in_child, args=(str(files_dir), server.url,
                                                                   str(tmp_path / "shared"), str(sync), str(out)))
                    for out in outs]
        try:
            for child in children:
                child.start()
            deadline = time.monotonic() + 120
            while len(list(sync.iterdir())) < 8 and time.monotonic() < deadline:
                if any(child.exitcode is not None for child in children):  # one died before the start
                    break
                time.sleep(0.02)
            (sync / "go").touch()
            for child in children:
                child.join(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for child in children:
                if child.is_alive():
                    child.kill()
    outputs = [out.read_text() if out.exists() else "" for out in outs]
    assert [child.exitcode for child in children] == [0] * 8, outputs
    for output in outputs:
        assert output.strip().splitlines()[-1] == f"digest {digest(expected)}"  # identical: what was served
    assert dict(server.requests) == one_download  # exactly one download's requests
    assert sum("downloading" in output for output in outputs) == 1  # by exactly one process
    assert sum("waiting for another process" in output for output in outputs) >= 1
    assert sorted(p.name for p in (tmp_path / "shared" / "race" / "raw").iterdir()) == sorted(files)


def test_offline_prepare_and_train_with_no_server_at_all(monkeypatch, tmp_path: Path):
    files, expected = mnist_files(600, 100, seed=2)
    data_dir = tmp_path / "data"
    with FileServer(files) as server, monkeypatch.context() as patch:  # "mnist" served locally, for once
        patch.setitem(DATASETS, "mnist", declare("mnist", [server.url], files))
        prepare_dataset("mnist", data_dir)
    # From here there is no server: the shipped MNIST declaration points at the internet, which we lack, and
    # any attempt to download fails the test.
    monkeypatch.setattr(datamodule, "SmartDL", lambda *a, **k: pytest.fail("tried to download"))
    assert_equal_tensors(torch.load(prepare_dataset("mnist", data_dir), weights_only=True), expected)
    result = run_script("datamodule.py", "--dataset", "mnist", "--data_dir", str(data_dir), timeout=120,
                        DATA_MIRROR=refused_url())
    assert result.returncode == 0 and "mnist ready" in result.stdout and "downloading" not in result.stdout
    results = train.main(QUICK + ["--data.dataset=mnist", f"--data.data_dir={data_dir}", "--data.batch_size=32",
                                  "--trainer.max_epochs=1",
                                  "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=2"])
    assert 0 <= results["test/acc"] <= 1


def test_a_shared_directory_prepared_once_is_reused_by_later_runs(monkeypatch, tmp_path: Path):
    files, _ = SMALL_MNIST
    with FileServer(files) as server:
        register(monkeypatch, "reused", "mnist", [server.url], files)
        path = prepare_dataset("reused", tmp_path)
        before, stamp = dict(server.requests), path.stat().st_mtime_ns
        shutil.rmtree(tmp_path / "reused" / "raw")  # the raw files are not needed once data.pt is complete
        for _ in range(3):
            assert prepare_dataset("reused", tmp_path) == path
    assert dict(server.requests) == before and path.stat().st_mtime_ns == stamp
