"""support/data/downloads.py, with datasets declared here and served from 127.0.0.1 only: every failure path, 8
processes preparing at once, and working offline once a dataset is present. Nothing here imports datamodule.py: the
machinery works for any declaration (the example's datasets are tested in test_datamodule.py)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pySmartDL.pySmartDL
import pytest
import torch
from conftest import REPO
from http_fixtures import Declaration, FileServer, declare, digest, prepare_in_child, random_files, refused_url

import support.data.downloads as downloads
from support.data.downloads import COMPLETE_MARKER, DownloadError, RemoteFile, prepare_dataset

SMALL = random_files({"images.bin": 235_200, "labels.bin": 300, "test-images.bin": 39_200, "test-labels.bin": 50})


@pytest.fixture(autouse=True)
def quick_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short timeouts and back-off, so that each failure path takes about a second."""
    monkeypatch.setattr(downloads, "TIMEOUT_S", 1.0)
    monkeypatch.setattr(downloads, "ATTEMPTS", 2)
    monkeypatch.setattr(downloads, "BACKOFF_S", 0.01)
    monkeypatch.delenv(downloads.MIRROR_ENV, raising=False)


def assert_equal_tensors(data: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(data) == sorted(expected)
    for key, value in expected.items():
        assert data[key].dtype == value.dtype and torch.equal(data[key], value), key


def assert_nothing_passes_as_complete(root: Path) -> None:
    """After a failure: no marker, no data.pt, no raw file, no temporary directory or .000 part left over."""
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left in ([], ["raw"]), left


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_support_downloads_imports_and_names_nothing_of_the_example():
    code = "import support.data.downloads, sys; assert not {'datamodule', 'model', 'train'} & set(sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    named = [f"{path.relative_to(REPO)}: {found}" for path in sorted((REPO / "support").rglob("*.py"))
             if (found := re.findall(r"\bdigits\b(?! of)|mnist|cifar|imageclassifier", path.read_text().lower()))]
    assert not named, f"support/ names the example's data or model: {named}"


def test_a_checksum_must_name_an_algorithm():
    assert RemoteFile("x.bin", "md5:f68b3c", ("http://127.0.0.1/x.bin",)).checksum == "md5:f68b3c"
    with pytest.raises(ValueError, match="checksum must look like"):
        RemoteFile("x.bin", "not-a-checksum", ("http://127.0.0.1/x.bin",))
    with pytest.raises(ValueError, match="checksum must look like"):
        RemoteFile("x.bin", "sha256:", ("http://127.0.0.1/x.bin",))


def test_prepare_writes_once_with_a_completion_marker(tmp_path: Path):
    builds = []
    spec = Declaration(files=(), build=lambda raw: builds.append(raw) or {"x": torch.arange(5)})  # nothing to fetch
    path = prepare_dataset("made", spec, tmp_path / "data")
    assert path == (tmp_path / "data" / "made" / "data.pt") and (path.parent / COMPLETE_MARKER).is_file()
    before = path.stat().st_mtime_ns
    assert prepare_dataset("made", spec, tmp_path / "data") == path
    assert path.stat().st_mtime_ns == before and len(builds) == 1  # reused, not rebuilt
    assert torch.equal(load(path)["x"], torch.arange(5))
    assert sorted(p.name for p in path.parent.iterdir()) == [COMPLETE_MARKER, "data.pt"]  # no raw/ without files


def test_a_dataset_without_its_marker_is_rebuilt(tmp_path: Path):
    spec = Declaration(files=(), build=lambda raw: {"y": torch.arange(7)})
    path = prepare_dataset("made", spec, tmp_path)
    (path.parent / COMPLETE_MARKER).unlink()
    path.write_bytes(b"half-written")
    prepare_dataset("made", spec, tmp_path)
    assert load(path)["y"].shape == (7,)


def test_files_download_in_parallel_ranges_and_load_what_was_served(tmp_path: Path):
    files, expected = random_files({"large.bin": 4_704_000, "small.bin": 1000})  # pySmartDL: 2 MB ranges
    with FileServer(files) as server:
        path = prepare_dataset("parallel", declare([server.url], files), tmp_path)
    starts = {r for name, r in server.ranges if name == "large.bin" and r != "bytes=0-3"}
    assert len(starts) == 2, server.ranges  # two parallel connections
    assert_equal_tensors(load(path), expected)
    assert sorted(p.name for p in (path.parent / "raw").iterdir()) == sorted(files)  # no temp dir or parts left


@pytest.mark.parametrize("mode", ["404", "refused", "silent", "stall", "truncate", "drop", "wrong"])
def test_failures_are_named_leave_nothing_and_a_good_mirror_then_works(tmp_path: Path, mode: str):
    files, expected = SMALL
    reasons = {"404": "HTTP 404 Not Found", "refused": "cannot connect", "silent": "server stalled",
               "stall": "server stalled",
               "truncate": "incomplete transfer: received", "drop": "connection dropped", "wrong": "checksum mismatch"}
    with FileServer(files, mode="ok" if mode == "refused" else mode) as bad, FileServer(files) as good:
        url = refused_url() if mode == "refused" else bad.url
        spec = declare([url], files)
        start = time.monotonic()
        with pytest.raises(DownloadError) as caught:
            prepare_dataset("broken", spec, tmp_path)
        assert time.monotonic() - start < 20
        message = str(caught.value)
        assert "\n" not in message and reasons[mode] in message
        assert f"{url}images.bin" in message and "python datamodule.py --dataset broken" in message
        assert_nothing_passes_as_complete(tmp_path / "broken")
        with pytest.raises(DownloadError):  # nor does a second try take anything as done
            prepare_dataset("broken", spec, tmp_path)
        path = prepare_dataset("broken", spec, tmp_path, mirror=good.url)  # what the message suggests
    assert_equal_tensors(load(path), expected)


def test_transient_failures_are_retried_and_the_next_mirror_is_tried(tmp_path: Path):
    files, expected = SMALL
    with FileServer(files, mode="drop", failures=1) as flaky, FileServer(files, mode="404") as missing:
        assert_equal_tensors(load(prepare_dataset("flaky", declare([flaky.url], files), tmp_path)), expected)
        # The first file took two attempts (the first dropped mid-body), the others one.
        assert flaky.requests["images.bin"] == 2 * flaky.requests["test-images.bin"]
        fallback = declare([missing.url, flaky.url], files)
        assert_equal_tensors(load(prepare_dataset("fallback", fallback, tmp_path)), expected)
    assert set(missing.requests.values()) == {2}  # one try per file (pySmartDL sizes it first), not retried


def test_a_trickling_server_is_abandoned_in_bounded_time(monkeypatch, tmp_path: Path):
    files, _ = SMALL
    monkeypatch.setattr(downloads, "MIN_SPEED", 1e6)  # a byte every 50 ms resets every socket timeout
    with FileServer(files, mode="trickle") as server:
        start = time.monotonic()
        with pytest.raises(DownloadError, match="too slow"):
            prepare_dataset("trickle", declare([server.url], files), tmp_path)
    assert time.monotonic() - start < 15
    assert_nothing_passes_as_complete(tmp_path / "trickle")


def test_a_full_disk_is_named_and_leaves_nothing(monkeypatch, capsys, tmp_path: Path):
    files, _ = SMALL
    root = tmp_path / "full"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def assert_one_line(caught: pytest.ExceptionInfo, step: str) -> None:
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"no space left on device while preparing full in {root} ")
        assert step in message and message.endswith(": free some space or pass --data.data_dir on a larger disk")

    with FileServer(files) as server:
        spec = declare([server.url], files)
        with monkeypatch.context() as patch:
            patch.setattr(pySmartDL.pySmartDL, "download", no_space)  # the function each pySmartDL thread runs
            with pytest.raises(DownloadError) as caught:
                prepare_dataset("full", spec, tmp_path)
        assert_one_line(caught, f"(downloading images.bin from {server.url}images.bin)")
        assert capsys.readouterr().out.count("downloading") == 1  # no retry: no other attempt or URL can help
        assert_nothing_passes_as_complete(root)
        with monkeypatch.context() as patch:
            patch.setattr(downloads.torch, "save", no_space)  # full while writing data.pt
            with pytest.raises(DownloadError) as caught:
                prepare_dataset("full", spec, tmp_path)
        assert_one_line(caught, "(writing data.pt)")
        assert not (root / COMPLETE_MARKER).exists() and [p.name for p in root.iterdir()] == ["raw"]
        with pytest.raises(DownloadError) as caught:  # full while the declaration's build writes its own files
            prepare_dataset("full", Declaration(spec.files, no_space), tmp_path)
        assert_one_line(caught, "(building data.pt)")
        prepare_dataset("full", spec, tmp_path)
    assert (root / COMPLETE_MARKER).exists()


def test_the_mirror_setting_replaces_the_declared_urls(monkeypatch, tmp_path: Path):
    files, expected = SMALL
    with FileServer(files) as server:
        spec = declare([refused_url()], files)  # the declared mirror is down
        monkeypatch.setenv(downloads.MIRROR_ENV, server.url + "datasets/{dataset}")
        assert_equal_tensors(load(prepare_dataset("mirrored", spec, tmp_path)), expected)
        monkeypatch.delenv(downloads.MIRROR_ENV)
        # The argument wins over the declared URLs too, with or without a trailing slash.
        assert_equal_tensors(load(prepare_dataset("argument", spec, tmp_path, mirror=server.url.rstrip("/"))),
                             expected)
    assert server.requests["images.bin"] >= 2  # served to both


def test_files_copied_in_by_hand_are_verified_and_need_no_network(tmp_path: Path):
    files, expected = SMALL
    raw = tmp_path / "by_hand" / "raw"
    (raw / ".download-1234").mkdir(parents=True)  # a killed process's partial download: removed
    (raw / ".download-1234" / "images.bin.000").write_bytes(b"part")
    for name, data in files.items():
        (raw / name).write_bytes(data)
    assert_equal_tensors(load(prepare_dataset("by_hand", declare([refused_url()], files), tmp_path)), expected)
    assert sorted(p.name for p in raw.iterdir()) == sorted(files)
    (tmp_path / "corrupt" / "raw").mkdir(parents=True)
    for name, data in files.items():  # one wrong byte: not trusted, so it would need the (down) server
        (tmp_path / "corrupt" / "raw" / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DownloadError, match="cannot connect"):
        prepare_dataset("corrupt", declare([refused_url()], files), tmp_path)
    assert not (tmp_path / "corrupt" / COMPLETE_MARKER).exists()


def test_eight_processes_at_once_download_once_and_all_succeed(monkeypatch, tmp_path: Path):
    files, expected = random_files({"images.bin": 2_352_000, "labels.bin": 3000, "test-images.bin": 78_400})
    files_dir, sync = tmp_path / "files", tmp_path / "sync"
    files_dir.mkdir(), sync.mkdir()
    for name, data in files.items():
        (files_dir / name).write_bytes(data)
    # Processes forked from a server that imported support.data.downloads once: 8 fresh interpreters would each spend
    # seconds of CPU importing torch. Each is still its own process with its own lock file handle.
    # (The fork server ignores our sys.path, so it finds the modules through PYTHONPATH.)
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{REPO / 'tests'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["support.data.downloads", "http_fixtures"])
    with FileServer(files) as server:
        prepare_dataset("race", declare([server.url], files), tmp_path / "reference")  # one download's requests
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


def test_a_shared_directory_prepared_once_is_reused_by_later_runs(monkeypatch, tmp_path: Path):
    files, _ = SMALL
    with FileServer(files) as server:
        spec = declare([server.url], files)
        path = prepare_dataset("reused", spec, tmp_path)
        before, stamp = dict(server.requests), path.stat().st_mtime_ns
        shutil.rmtree(tmp_path / "reused" / "raw")  # the raw files are not needed once data.pt is complete
        monkeypatch.setattr(downloads, "SmartDL", lambda *a, **k: pytest.fail("tried to download"))
        for _ in range(3):
            assert prepare_dataset("reused", spec, tmp_path) == path
    assert dict(server.requests) == before and path.stat().st_mtime_ns == stamp


BUILD_MODULE = '''
import torch


def samples(n):
    return torch.arange(n)


def build(raw):
    return {{"y": samples({n})}}
'''


def build_from_source(tmp_path: Path, version: str, n: int):
    """A build function in a module of its own (a researcher's datamodule.py), whose helper makes n samples."""
    import importlib.util

    path = tmp_path / f"declared_{version}.py"
    path.write_text(BUILD_MODULE.format(n=n))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def test_an_edited_build_function_is_rebuilt_and_an_unchanged_one_reused(capsys, tmp_path: Path):
    """Measured before the fingerprint: after editing a build function to make more samples, training silently
    reused the old data.pt, because the COMPLETE marker did not record what built it."""
    path = prepare_dataset("made", Declaration((), build_from_source(tmp_path, "a", 5)), tmp_path / "data")
    assert load(path)["y"].shape == (5,)
    before = path.stat().st_mtime_ns
    prepare_dataset("made", Declaration((), build_from_source(tmp_path, "b", 5)), tmp_path / "data")  # same source
    assert path.stat().st_mtime_ns == before and "rebuilding" not in capsys.readouterr().out
    prepare_dataset("made", Declaration((), build_from_source(tmp_path, "c", 9)), tmp_path / "data")
    assert load(path)["y"].shape == (9,)
    assert "'made' was declared differently" in capsys.readouterr().out
    assert sorted(p.name for p in path.parent.iterdir()) == [COMPLETE_MARKER, "data.pt"]  # no temporary file left


def test_the_fingerprint_follows_checksums_and_called_functions_but_not_urls(tmp_path: Path):
    files = {"a.bin": b"abc"}
    here = downloads.declaration_fingerprint(declare(["http://127.0.0.1:1/"], files))
    assert downloads.declaration_fingerprint(declare(["http://mirror.example/"], files)) == here
    assert downloads.declaration_fingerprint(declare(["http://127.0.0.1:1/"], {"a.bin": b"abd"})) != here
    # build() calls samples(): editing only the helper changes the fingerprint
    sources = list(downloads.source_of(build_from_source(tmp_path, "d", 3)))
    assert len(sources) == 2 and "def samples" in sources[1]


def test_a_marker_from_before_fingerprints_is_rebuilt_once(tmp_path: Path):
    spec = Declaration(files=(), build=lambda raw: {"y": torch.arange(4)})
    path = prepare_dataset("made", spec, tmp_path)
    (path.parent / COMPLETE_MARKER).write_text("ok\n")  # what the template wrote before
    prepare_dataset("made", spec, tmp_path)
    assert (path.parent / COMPLETE_MARKER).read_text().startswith("sha256:")
