"""slurm_train.py: a sweep's grid as one throttled Slurm job array (on the local test cluster), resuming only the
unfinished rows, refusing bad grids before anything exists, dry runs, and --local without Slurm."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from slurm_fixtures import SlurmCluster, slurm, slurm_cluster  # noqa: F401  (fixtures)

import slurm_train

# These tests run the example model and data (their keys, their speed): skipped once you replace them.
pytestmark = [pytest.mark.example_model, pytest.mark.example_data]

# A row trains one epoch on the embedded digits in a few seconds.
EXTRA = ["--", "--trainer.max_epochs=1", "--trainer.enable_model_summary=false",
         "--trainer.enable_progress_bar=false", "--data.batch_size=256"]
SMALL = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--mem", "1G", "--time", "00:10:00"]


def sweep_file(tmp_path: Path, parameters: dict[str, Any]) -> str:
    config = {"name": "tiny", "program": "train.py", "method": "grid",
              "metric": {"name": "val/loss", "goal": "minimize"}, "parameters": parameters}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows inherit this environment (Slurm jobs and --local processes): one torch thread each on 2 cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `sbatch` first on PATH that only records that it was called."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 999\n')
    (bin_dir / "sbatch").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def grid_dir_of(out: str) -> Path:
    return Path(re.search(r"run directory: (\S+)", out).group(1))


def lookup(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree["init_args"] if part not in tree and "init_args" in tree else tree
        tree = tree[part]
    return tree


def most_at_once(spans: list[tuple[float, float]]) -> int:
    return max(sum(start <= t < end for start, end in spans) for t, _ in spans)


def done_markers(grid: Path, n: int) -> list[dict[str, Any]]:
    return [json.loads((grid / f"row-{i}" / "done").read_text()) for i in range(n)]


@pytest.mark.slow
def test_grid_runs_as_one_throttled_array_and_resume_reruns_only_unfinished_rows(
        slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture):
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    params = {"model.hidden_dim": {"values": [16, 32]}, "optimizer.lr": {"values": [0.001, 0.01]}}
    argv = ["--sweep-config", sweep_file(tmp_path, params), "--max-concurrent", "2", *SMALL, *EXTRA]
    assert slurm_train.main(argv) == 0
    out = capsys.readouterr().out
    job = re.search(r"submitted job (\d+)", out).group(1)
    slurm.submitted.append(job)
    grid = grid_dir_of(out)
    assert "squeue -r -j" in out and "tail -f" in out and "--resume" in out
    slurm.wait([job], timeout=150)
    logs = "\n".join(p.read_text() for p in grid.glob("row-*.out"))

    rows = json.loads((grid / "grid.json").read_text())["rows"]
    assert len(rows) == 4 and sorted(p.name for p in grid.glob("row-*.out")) == [f"row-{i}.out" for i in range(4)]
    done = done_markers(grid, 4)  # every task finished, each in the one array job
    assert [d["job"] for d in done] == [f"{job}_{i}" for i in range(4)], logs
    assert most_at_once([(d["start"], d["end"]) for d in done]) <= 2
    assert slurm.job_field(f"{job}_0", "ArrayTaskThrottle") == "2"
    assert all(slurm.job_field(f"{job}_{i}", "ExitCode") == "0:0" for i in range(4))
    for i, row in enumerate(rows):  # each run saved its own grid row's values
        saved = yaml.safe_load((grid / f"row-{i}" / "config.yaml").read_text())
        assert all(lookup(saved, key) == value for key, value in row["config"].items()), (i, row)
        assert saved["trainer"]["max_epochs"] == 1
    assert {(r["config"]["model.hidden_dim"], r["config"]["optimizer.lr"]) for r in rows} == \
           {(16, 0.001), (16, 0.01), (32, 0.001), (32, 0.01)}

    # Rows 1 and 3 "did not finish": only they are resubmitted, as one array.
    for i in (1, 3):
        (grid / f"row-{i}" / "done").unlink()
    assert slurm_train.main(["--resume", str(grid), "--max-concurrent", "2", "--dry-run"]) == 0
    assert "--array=1,3%2" in capsys.readouterr().out
    assert slurm_train.main(["--resume", str(grid), "--max-concurrent", "2"]) == 0
    again = re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1)
    slurm.submitted.append(again)
    assert slurm_train.main(["--resume", str(grid)]) == 1  # not beside a job of the grid that still runs
    assert f"job(s) {again} of this grid are still queued or running" in capsys.readouterr().err
    slurm.wait([again], timeout=120)
    done2 = done_markers(grid, 4)
    assert [d["job"] for d in done2] == [f"{job}_0", f"{again}_1", f"{job}_2", f"{again}_3"]
    assert slurm.job_field(f"{again}_1", "ArrayTaskThrottle") == "2"  # one array over exactly rows 1 and 3
    assert slurm_train.main(["--resume", str(grid)]) == 0
    assert "every row" in capsys.readouterr().out


@pytest.mark.parametrize("extra, key", [(["--", "--model.nope=1"], "model.nope"),
                                        (["--", "--trainer.max_epochs=soon"], "trainer.max_epochs")])
def test_bad_grid_fails_before_anything_is_written_or_submitted(extra: list[str], key: str, tmp_path: Path,
                                                                fake_sbatch: Path, capsys: pytest.CaptureFixture):
    params = {"model.hidden_dim": {"values": [16, 32]}}
    assert slurm_train.main(["--sweep-config", sweep_file(tmp_path, params), *extra]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and key in err, err
    assert not fake_sbatch.exists() and not (tmp_path / "runs").exists()


def test_bad_row_value_and_inconsistent_tasks_are_refused(tmp_path: Path, fake_sbatch: Path,
                                                          capsys: pytest.CaptureFixture):
    bad = sweep_file(tmp_path, {"model.hidden_dim": {"values": [16, "wide"]}})
    assert slurm_train.main(["--sweep-config", bad]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.hidden_dim" in err, err
    good = sweep_file(tmp_path, {"model.hidden_dim": {"values": [16]}})
    for argv, words in [(["--gpus-per-node", "2", "--ntasks-per-node", "1"], "runs 1 task(s) but the Trainer "
                                                                              "runs 2 device(s)"),
                        (["--gpus-per-node", "2", "--", "--trainer.devices=1"], "the Trainer runs 1 device(s)"),
                        (["--nodes", "2"], "--nodes=2 but the Trainer runs --trainer.num_nodes=1"),
                        (["--nodes", "2", "--ntasks-per-node", "2", "--", "--trainer.num_nodes=2"],
                         "runs 4 task(s) but the Trainer runs 1 device(s) x 2 node(s)"),
                        (["--preset", "bede"], "--account"),
                        (["--runs-dir", "my runs"], "spaces")]:
        assert slurm_train.main(["--sweep-config", good, *argv]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err, (argv, err)
    assert not fake_sbatch.exists() and not (tmp_path / "runs").exists()


def test_dry_run_prints_the_script_and_runs_and_submits_nothing(tmp_path: Path, fake_sbatch: Path,
                                                                capsys: pytest.CaptureFixture):
    params = {"model.hidden_dim": {"values": [16, 32]}, "optimizer.lr": {"values": [0.001, 0.01]}}
    argv = ["--sweep-config", sweep_file(tmp_path, params), "--max-concurrent", "2", "--dry-run",
            "--cluster", "hec", "--gpu-type", "nvidia_h200_nvl", "--gpus-per-node", "2", "--",
            "--trainer.max_epochs=1"]
    assert slurm_train.main(argv) == 0
    out = capsys.readouterr().out
    for line in ["#SBATCH --array=0-3%2", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --partition=gpu-short", "#SBATCH --gres=gpu:nvidia_h200_nvl:2",
                 "#SBATCH --ntasks-per-node=2", "/row-%a.out"]:
        assert line in out, line
    commands = [line for line in out.splitlines() if line.startswith("# row ")]
    assert len(commands) == 4 and all(c.endswith("--trainer.max_epochs=1") for c in commands)
    assert "--model.hidden_dim=32 --optimizer.lr=0.01" in commands[3]
    assert not fake_sbatch.exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_local_runs_rows_concurrently_and_fails_when_a_row_fails(tmp_path: Path, capsys: pytest.CaptureFixture):
    # Every row passes the checks, but row 1's data directory lies under a file: it crashes when it prepares its data.
    (tmp_path / "blocker").write_text("a file, not a directory")
    data_dirs = [str(tmp_path / "data"), str(tmp_path / "blocker" / "data"), str(tmp_path / "data2")]
    params = {"data.data_dir": {"values": data_dirs}}
    argv = ["--sweep-config", sweep_file(tmp_path, params), "--local", "--max-concurrent", "2", *EXTRA[:-1]]
    assert slurm_train.main(argv) == 1
    captured = capsys.readouterr()
    grid = grid_dir_of(captured.out)
    assert "1 row(s) failed: 1" in captured.err
    done = [json.loads((grid / f"row-{i}" / "done").read_text()) for i in (0, 2)]
    assert not (grid / "row-1" / "done").exists()  # a crashed row is not finished
    assert "cannot create data directory" in (grid / "row-1.out").read_text()
    assert all((grid / f"row-{i}" / "checkpoints" / "last.ckpt").exists() for i in (0, 2))
    with open(grid / "row-0.out") as log0, open(grid / "row-2.out") as log2:
        assert "final metrics" in log0.read() and "final metrics" in log2.read()
    assert done[0]["start"] < done[1]["start"]
    assert slurm_train.main(["--resume", str(grid), "--local", "--dry-run", "--max-concurrent", "2"]) == 0
    assert "--array=1%2" in capsys.readouterr().out
    # rows 0 and 1 started together (2 at a time): row 2 only once one of them had ended
    log = captured.out
    assert log.index("row 2 started") > min(log.index("row 0 "), log.index("row 1 FAILED")) and \
           log.index("row 1 started") < log.index("row 0 finished")
    assert sys.executable in (grid / "job.sbatch").read_text()
