"""Datasets declared at a local path (`file:///data/points.csv` or `/data/points.csv`, or a local --data.mirror):
support/data/downloads.py copies them, notices an edited file (its size and modification time, then its checksum)
and prepares the dataset again, and says what is wrong with the file, not with "the network and mirror". On a
dataset of this file's own: points in a CSV file, built into tensors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from http_fixtures import sha256s

import support.data.downloads as downloads
from support.data.downloads import COMPLETE_MARKER, SOURCES_FILE, DownloadError, RemoteFile, prepare_dataset

FIRST = "x,y,label\n0.5,1.0,0\n2.0,-1.5,1\n"
EDITED = FIRST + "3.0,3.5,1\n"  # one more row


def build_points(raw: Path) -> dict[str, torch.Tensor]:
    rows = [line.split(",") for line in (raw / "points.csv").read_text().splitlines()[1:]]
    return {"x": torch.tensor([[float(a), float(b)] for a, b, _ in rows]),
            "y": torch.tensor([int(label) for _, _, label in rows])}


class Points:
    """A declaration as datamodule.py's DatasetSpec: the CSV at `url`, with the checksum of `content`."""

    def __init__(self, url: str, content: str) -> None:
        self.files = (RemoteFile("points.csv", sha256s({"points.csv": content.encode()})["points.csv"], (url,)),)
        self.build = build_points


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "my data" / "points.csv"  # a space: a file:// URL quotes it
    path.parent.mkdir()
    path.write_text(FIRST)
    return path


def edit(path: Path, content: str) -> None:
    before = path.stat().st_mtime_ns
    path.write_text(content)
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a later mtime even on a coarse-grained filesystem


def rows(path: Path) -> int:
    return len(torch.load(path, weights_only=True)["y"])


@pytest.mark.parametrize("as_url", [True, False], ids=["file-url", "path"])
def test_an_edited_local_file_is_noticed_named_and_prepared_again_once_declared(as_url: bool, source: Path,
                                                                               tmp_path: Path, capsys):
    """Issue 33: an edited file:// dataset was served from the old data.pt without a word (only the declaration
    was fingerprinted)."""
    url = source.as_uri() if as_url else str(source)
    data = tmp_path / "data"
    path = prepare_dataset("points", Points(url, FIRST), data)
    assert rows(path) == 2 and f"copying {source}" in capsys.readouterr().out
    edit(source, EDITED)
    for _ in range(2):  # refused each time: never served stale
        with pytest.raises(DownloadError) as error:
            prepare_dataset("points", Points(url, FIRST), data)
        message = str(error.value)
        new = sha256s({"points.csv": EDITED.encode()})["points.csv"]
        assert message == (f"{source} (file points.csv of dataset 'points') is not the file declared: its checksum is "
                           f"{new}, the declaration says {Points(url, FIRST).files[0].checksum}. Changed on purpose? "
                           f"Put '{new}' in the declaration. If not, put the declared version back"), message
        assert "changed since it was prepared: preparing it again" in capsys.readouterr().out
    assert rows(path) == 2  # the old data is left as it was, and not trusted while the file differs
    assert rows(prepare_dataset("points", Points(url, EDITED), data)) == 3  # the new checksum declared
    assert "declared differently" in capsys.readouterr().out
    assert rows(prepare_dataset("points", Points(url, EDITED), data)) == 3
    assert capsys.readouterr().out == ""  # then reused: nothing copied or built again


def test_a_touched_file_with_the_same_bytes_is_read_once_and_then_only_stat_ed(source: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    spec, data = Points(source.as_uri(), FIRST), tmp_path / "data"
    path = prepare_dataset("points", spec, data)
    stamp = path.stat().st_mtime_ns
    edit(source, FIRST)  # the same bytes, a new mtime (copied over, or touched)
    reads: list[Path] = []
    checksum = downloads.file_checksum
    monkeypatch.setattr(downloads, "file_checksum", lambda p, like: reads.append(p) or checksum(p, like))
    assert prepare_dataset("points", spec, data) == path and reads == [source]  # read once: unchanged
    assert prepare_dataset("points", spec, data) == path and reads == [source]  # then the record's size and mtime
    assert path.stat().st_mtime_ns == stamp  # nothing prepared again


def test_an_edit_that_keeps_size_and_mtime_and_a_relinked_symlink_are_noticed(source: Path, tmp_path: Path):
    """`cp -p` or `rsync -t` of another version of the same size keeps the size and mtime: the change time shows it.
    A symbolic link pointed at another version is watched as the link, not as the file it pointed to first."""
    link, other = tmp_path / "current.csv", tmp_path / "v2.csv"
    link.symlink_to(source)
    other.write_text(EDITED)
    prepare_dataset("points", Points(source.as_uri(), FIRST), tmp_path / "data")
    prepare_dataset("points", Points(str(link), FIRST), tmp_path / "linked")
    link.unlink()
    link.symlink_to(other)
    with pytest.raises(DownloadError, match=f"{link} .file points.csv of dataset 'points'. is not the file declared"):
        prepare_dataset("points", Points(str(link), FIRST), tmp_path / "linked")
    stat = source.stat()
    source.write_text(FIRST.replace("0.5", "0.7"))  # the same size
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DownloadError, match="is not the file declared"):
        prepare_dataset("points", Points(source.as_uri(), FIRST), tmp_path / "data")


def test_a_file_declared_at_another_path_is_read_from_there(source: Path, tmp_path: Path, capsys):
    """URLs are not in the declaration's fingerprint (a mirror serves the same bytes), so a moved file would have
    been watched at its old path."""
    moved = tmp_path / "moved.csv"
    shutil.copy(source, moved)
    path = prepare_dataset("points", Points(str(source), FIRST), tmp_path / "data")
    assert prepare_dataset("points", Points(str(moved), FIRST), tmp_path / "data") == path
    assert f"points.csv is declared at {moved} now, not at {source}: preparing it again" in capsys.readouterr().out
    moved.write_text(EDITED)
    with pytest.raises(DownloadError, match=f"{moved} .file points.csv"):
        prepare_dataset("points", Points(str(moved), FIRST), tmp_path / "data")


def test_after_deleting_data_the_error_is_about_the_local_file(source: Path, tmp_path: Path):
    """Issue 33: with data/ deleted and the file edited, the checksum error said "Check the network and mirror"."""
    url, data = source.as_uri(), tmp_path / "data"
    prepare_dataset("points", Points(url, FIRST), data)
    shutil.rmtree(data)
    edit(source, EDITED)
    with pytest.raises(DownloadError, match=r"is not the file declared: its checksum is sha256:") as error:
        prepare_dataset("points", Points(url, FIRST), data)
    assert str(error.value).startswith(f"{source} (file points.csv of dataset 'points')")
    assert "network" not in str(error.value) and "\n" not in str(error.value)
    assert sorted(p.name for p in (data / "points").rglob("*")) == ["raw"]  # nothing that passes as prepared
    source.unlink()
    with pytest.raises(DownloadError) as error:
        prepare_dataset("points", Points(url, FIRST), data)
    assert str(error.value) == (f"cannot read points.csv of dataset 'points': {source}: No such file or directory. "
                                "Put the file there, or correct its path in the dataset's declaration")


def test_a_vanished_local_file_keeps_the_prepared_data_and_a_copy_put_into_raw_is_used(source: Path, tmp_path: Path):
    spec, data = Points(str(source), FIRST), tmp_path / "data"
    path = prepare_dataset("points", spec, data)
    stamp = path.stat().st_mtime_ns
    source.unlink()  # data.pt holds the declared bytes: still what the declaration asks for
    assert prepare_dataset("points", spec, data) == path and path.stat().st_mtime_ns == stamp
    (data / "points" / COMPLETE_MARKER).unlink()  # prepared again from raw/'s verified copy, no source needed
    assert rows(prepare_dataset("points", spec, data)) == 2


def test_a_local_mirror_is_watched_too_and_a_dataset_prepared_before_sources_were_recorded_is_prepared_once(
        source: Path, tmp_path: Path, capsys):
    spec, data = Points("https://127.0.0.1:9/points.csv", FIRST), tmp_path / "data"  # a mirror that is never asked
    mirror = str(source.parent.parent / "{dataset}")
    source.parent.rename(source.parent.parent / "points")
    source = source.parent.parent / "points" / "points.csv"
    path = prepare_dataset("points", spec, data, mirror=mirror)
    for record in ("", "[]", '{"points.csv": {"size": 3}}'):  # missing (the template before this version), damaged
        (data / "points" / SOURCES_FILE).unlink()
        if record:
            (data / "points" / SOURCES_FILE).write_text(record)
        assert prepare_dataset("points", spec, data, mirror=mirror) == path
        assert f"no record ({SOURCES_FILE}) of the local files it was prepared from" in capsys.readouterr().out
    edit(source, EDITED)
    with pytest.raises(DownloadError, match=f"{source} .file points.csv of dataset 'points'. is not the file declared"):
        prepare_dataset("points", spec, data, mirror=mirror)
    assert prepare_dataset("points", spec, data) == path  # the declared (remote) URL: nothing local to watch


def test_a_relative_path_is_refused_where_it_is_declared():
    """A Slurm job runs in runs/.code/<hash>/: a relative path would name another file there."""
    with pytest.raises(ValueError, match=r"points.csv: 'data/points.csv' is neither a URL .* nor an absolute path"):
        RemoteFile("points.csv", "sha256:00", ("data/points.csv",))
    assert RemoteFile("points.csv", "sha256:00", ("~/data/points.csv",)).urls  # the home directory is absolute
