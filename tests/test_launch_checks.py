"""slurm_train.py and sweep.py refuse bad options before anything is written or submitted, with the reason in one
line, and leave nothing behind when submitting fails (grid configs here use train.py's own keys, not the example's)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from filelock import FileLock

import slurm_train
import sweep
from support.clusters.profiles import time_seconds

GRID = {"name": "tiny", "program": "train.py", "method": "grid", "parameters": {"seed_everything": {"values": [1, 2]}}}


def sweep_file(tmp_path: Path, config: object = GRID, name: str = "sweep.json") -> str:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


@pytest.mark.parametrize("argv, words", [
    (["--sample", "0"], "--sample must be at least 1"),
    (["--sample", "-3"], "--sample must be at least 1"),
    (["--gpus-per-node", "-1"], "--gpus-per-node must be at least 0"),
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--max-concurrent", "0"], "--max-concurrent must be at least 1"),
    (["--time", "garbage"], "is not a Slurm time"),
    (["--time", "1:2:3:4"], "is not a Slurm time"),
    (["--runs-dir", "a-file"], "is a file"),
])
def test_bad_options_are_refused_in_one_line(argv: list[str], words: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture):
    Path("a-file").write_text("not a directory")
    with pytest.raises(SystemExit) as stopped:
        slurm_train.main(["--sweep-config", sweep_file(tmp_path), "--dry-run", *argv])
    assert stopped.value.code == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]
    assert not Path("runs").exists()


@pytest.mark.parametrize("time_limit, seconds", [("30", 1800), ("30:00", 1800), ("08:00:00", 28800), ("2-00", 172800),
                                                 ("1-12:30", 131400), ("1-12:30:00", 131400), ("8h", None),
                                                 ("1:2:3:4", None), ("", None)])
def test_slurm_time_formats_and_their_length(time_limit: str, seconds: int | None):
    assert time_seconds(time_limit) == seconds


@pytest.mark.parametrize("content, words", [(None, "No such file"), ("{not json: [", "neither JSON nor YAML"),
                                            ("[1, 2]", "not a mapping")])
def test_a_sweep_config_file_that_is_missing_or_broken_is_one_line(content: str | None, words: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture):
    path = str(tmp_path / "missing.json") if content is None else sweep_file(tmp_path, content)
    assert slurm_train.main(["--sweep-config", path, "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_a_failed_submission_leaves_no_grid_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = ["--sweep-config", sweep_file(tmp_path), "--gpus-per-node", "0", "--partition", "nope"]
    assert slurm_train.main(argv) == 1
    assert "invalid partition" in capsys.readouterr().err
    assert list(Path("runs").iterdir()) == []  # made, then removed: nothing that looks queued


def test_a_local_grid_runs_once_at_a_time(tmp_path: Path, capsys: pytest.CaptureFixture):
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "grid.json").write_text(json.dumps({"rows": [{"row": 0, "config": {}, "argv": []}]}))
    (grid / "job.sbatch").write_text("#!/bin/sh\nmkdir -p \"$(dirname \"$0\")/row-$GRID_ROW\"\n"
                                     "touch \"$(dirname \"$0\")/row-$GRID_ROW/done\"\n")
    with FileLock(str(grid / ".local.lock")):  # as another `slurm_train.py --local` holds it while it runs
        assert slurm_train.main(["--resume", str(grid), "--local"]) == 1
        assert "already running on this machine" in capsys.readouterr().err
    assert slurm_train.main(["--resume", str(grid), "--local"]) == 0
    assert (grid / "row-0" / "done").exists()


@pytest.mark.parametrize("samples", ["0", "-3"])
def test_sweep_list_refuses_a_sample_count_below_one(samples: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as stopped:
        sweep.main(["--list", "--samples", samples])
    assert stopped.value.code == 2 and "--samples must be at least 1" in capsys.readouterr().err


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.parametrize("parameter, values, words", [("model.dropout", [0.1, 1.5], "dropout must be in [0, 1)"),
                                                      ("data.batch_size", [64, -64], "batch_size must be at least 1")])
def test_values_the_constructors_refuse_are_caught_before_submission(parameter: str, values: list, words: str,
                                                                     tmp_path: Path, capsys: pytest.CaptureFixture):
    config = {**GRID, "parameters": {parameter: {"values": values}}}
    assert slurm_train.main(["--sweep-config", sweep_file(tmp_path, config), "--gpus-per-node", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and parameter in err[0] and words in err[0], err
    assert not Path("runs").exists()
