"""A run directory holds one run: a new run refused where another one trained, whatever picked the directory's name
(here a stale SLURM_JOB_ID), while a resume (--ckpt_path) continues it; and evaluate.py reads a run on a read-only
filesystem (an archive, a colleague's runs), since it writes nothing there."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import QUICK, run_script
from mount_fixtures import remount_read_only

pytestmark = [pytest.mark.example_model, pytest.mark.example_data]

ONE_EPOCH = ["--trainer.max_epochs=1", "--cka.every_n_epochs=0", *QUICK]


def snapshot(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


@pytest.mark.slow
def test_a_second_run_cannot_take_a_used_run_directory_and_evaluate_reads_a_read_only_run(tmp_path: Path, tmpfs):
    stale = {"SLURM_JOB_ID": "12345"}  # left in the environment by an earlier interactive job
    first = run_script("train.py", *ONE_EPOCH, **stale)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "runs" / "slurm-12345"
    before = snapshot(run_dir)
    second = run_script("train.py", *ONE_EPOCH, "--model.hidden_dim=16", **stale)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: --run_dir {run_dir} already holds a trained run (its name comes from SLURM_JOB_ID=12345: outside "
        "that Slurm job, unset SLURM_JOB_ID): continue it with --ckpt_path last, or give another --run_dir")
    assert snapshot(run_dir) == before  # nothing of the second run was written there

    archive = tmpfs("archive", "20m")
    shutil.copytree(run_dir, archive / "run")
    remount_read_only(archive)
    evaluated = run_script("evaluate.py", str(archive / "run"), "--json", str(tmp_path / "metrics.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "test metrics:    test/loss=" in evaluated.stdout and (tmp_path / "metrics.json").is_file()
