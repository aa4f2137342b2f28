"""Big grids (issue 35): a 1,600-row grid spent 3 min 54 s being checked, one parse per row, and was then refused by
sbatch (`Invalid job array specification`) because the cluster's MaxArraySize was never named. Each parse now takes
the next distinct value of every key, and the array's size is checked against the cluster's limit (clusters.toml's
max_array_size, else `scontrol show config`) before anything is written."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from slurm_fixtures import SlurmCluster, slurm, slurm_cluster  # noqa: F401  (fixtures)

import slurm_train
import sweep
from support.clusters.profiles import load_clusters
from support.slurm import array_limit

# 10 x 10 x 4 x 4 = 1,600 rows, every key in the "model" group: the old check parsed each row.
BIG = {"name": "big", "program": "train.py", "method": "grid",
       "parameters": {"model.hidden_dim": {"values": [8 * (i + 1) for i in range(10)]},
                      "model.dropout": {"values": [round(0.05 * i, 2) for i in range(10)]},
                      "model.channels": {"values": [4, 8, 12, 16]},
                      "model.depth": {"values": [1, 2, 3, 4]},
                      "trainer.max_epochs": {"value": 1}}}
HEC_H200 = ["--cluster", "hec", "--gpu-type", "nvidia_h200_nvl"]  # a GPU the running torch drives: no torch note


@pytest.fixture
def big_grid(tmp_path: Path) -> str:
    path = tmp_path / "big.json"
    path.write_text(json.dumps(BIG))
    return str(path)


@pytest.fixture
def counted_parses(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every argv train.py's parser is given (sweep.validate's and slurm_train.check_rows' parses)."""
    parses: list[list[str]] = []
    parse = sweep.train_config

    def counting(argv: list[str]) -> object:
        parses.append(list(argv))
        return parse(argv)

    monkeypatch.setattr(sweep, "train_config", counting)
    return parses


@pytest.mark.example_model
def test_a_1600_row_grid_is_checked_in_seconds_with_each_distinct_value_parsed(
        big_grid: str, counted_parses: list[list[str]], capsys: pytest.CaptureFixture):
    sweep.train_config([])  # torch and train.py loaded once, as in any command: not the check's time
    counted_parses.clear()
    start = time.perf_counter()
    assert slurm_train.main(["--local", "--dry-run", "--sweep-config", big_grid]) == 0, capsys.readouterr().err
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "# row 1599: python train.py --model.channels=16 --model.depth=4" in out
    assert len(counted_parses) <= 20, f"{len(counted_parses)} parses for 10 + 10 distinct values"
    seen = {arg for argv in counted_parses for arg in argv}
    assert all(f"--model.hidden_dim={8 * (i + 1)}" in seen for i in range(10))  # each value parsed at least once
    assert all(f"--model.depth={d}" in seen for d in range(1, 5))
    assert seconds < 10, f"checking 1,600 rows took {seconds:.1f} s"


def test_a_row_that_train_py_refuses_is_still_named_among_combined_parses(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture):
    """Values parsed together: one that train.py refuses is parsed again alone and named (its key and value), and
    the values parsed with it are still checked (here a YAML-style "1e-3" that reaches train.py as a number)."""
    config = {**BIG, "parameters": {**BIG["parameters"], "model.depth": {"values": [1, 2, 0, 4]},
                                    "optimizer.lr": {"values": [0.001, 0.002, "1e-3", 0.004]}}}  # with depth 0
    (tmp_path / "bad.json").write_text(json.dumps(config))
    assert slurm_train.main(["--local", "--dry-run", "--sweep-config", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "parameters/model.depth" in err and "--model.depth=0" in err, err
    assert "parameters/optimizer.lr: value '1e-3' reaches train.py as 0.001" in err, err


# Refused before the rows are checked (fast); the grids that fit have all 1,600 rows checked and printed (slow).
FITS = [pytest.param(extra, False, marks=pytest.mark.slow)
        for extra in (["--runs-per-gpu", "2"], ["--local"], ["--sample", "1001"])]


@pytest.mark.parametrize("extra, refused", [([], True), *FITS])
def test_a_grid_over_the_clusters_max_array_size_is_refused_in_one_line_naming_the_limit(
        extra: list[str], refused: bool, big_grid: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture):
    monkeypatch.setattr(array_limit, "scontrol_max_array_size", lambda: pytest.fail("clusters.toml says it"))
    assert load_clusters().get("hec").max_array_size == 1001
    code = slurm_train.main([*HEC_H200, "--dry-run", "--sweep-config", big_grid, *extra])
    out, err = capsys.readouterr()
    if refused:
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: 1600 array tasks (indices 0-1599), but Lancaster HEC takes arrays of at most "
                              "1001 (MaxArraySize, from clusters.toml [clusters.hec] max_array_size; ")
        assert "use --runs-per-gpu 2 (800 tasks of 2 rows run at once on each GPU), or --sample 1001" in err
    else:
        assert code == 0, err
        assert "--array=0-799%4" in out or "--local" in extra or "--array=0-1000%4" in out
    assert not (tmp_path / "runs").exists()


def test_the_limit_comes_from_scontrol_where_clusters_toml_names_none(big_grid: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho 'MaxArraySize            = 1001'\n")
    (fake / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert load_clusters().get("generic").max_array_size is None
    assert slurm_train.main(["--cluster", "generic", "--dry-run", "--sweep-config", big_grid]) == 1
    assert "but this Slurm takes arrays of at most 1001 (MaxArraySize, from `scontrol show config` here" in \
        capsys.readouterr().err
    (fake / "scontrol").write_text("#!/bin/sh\nexit 1\n")  # no answer: the limit is unknown, nothing is refused
    assert array_limit.max_array_size(load_clusters().get("generic")) is None


@pytest.mark.slow
def test_the_local_slurms_max_array_size_refuses_the_grid_before_sbatch_would(
        slurm: SlurmCluster, big_grid: str, capsys: pytest.CaptureFixture):  # noqa: F811
    assert array_limit.scontrol_max_array_size() == 1001  # tests/slurm/local_slurm.sh's, Slurm's default
    assert slurm_train.main(["--cluster", "generic", "--sweep-config", big_grid]) == 1
    err = capsys.readouterr().err
    assert "but this Slurm takes arrays of at most 1001" in err and len(err.strip().splitlines()) == 1
    assert not slurm.submitted and not (Path.cwd() / "runs").exists()
