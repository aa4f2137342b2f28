"""Faults on the local Slurm: `scancel` of a grid (its SIGTERM reaches every process of the step, wandb's service
included) leaves every run saved with exit 143, packed or not, and the grid resumes from those saves, in place, as a
copy and after a move (the copy's rows train in the copy; the original is not touched)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from slurm_fixtures import SlurmCluster, slurm, slurm_cluster  # noqa: F401  (fixtures)
from test_packing import ONE_GPU, logs, submit, sweep_file
from test_slurm_search import one_thread  # noqa: F401  (autouse: one torch thread each, no wandb service of ours)

pytestmark = [pytest.mark.example_model, pytest.mark.example_data, pytest.mark.slow]

TWO_ROWS = {"model.hidden_dim": {"values": [16, 32]}}
# 4-sample batches (315 steps per epoch) validated every quarter epoch: last.ckpt appears at step 78, and the cancel
# lands in training with ~1,100 steps to spare (an idle machine trains an epoch in ~3 s: with one epoch, a row once
# finished its fit before the cancel and was killed in its test).
SETTINGS = ["--trainer.max_epochs=4", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
            "--data.batch_size=4", "--trainer.val_check_interval=0.25", "--early_stopping.patience=100",
            "--cka.every_n_epochs=0", "--trainer.accelerator=cpu"]
FIRST_VALIDATION_STEP = 78


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")


def cancelled_grid(cluster: SlurmCluster, tmp_path: Path, runs_per_gpu: int) -> Path:
    """A two-row grid cancelled with plain `scancel` (SIGTERM to every process of every step) mid-epoch: each row
    saved at its next batch and exited 143, with no traceback, whatever happened to wandb's service first."""
    job, grid = submit(cluster, ["--sweep-config", sweep_file(tmp_path / "sweep.json", TWO_ROWS), "--runs-dir",
                                 str(tmp_path / "runs"), "--runs-per-gpu", str(runs_per_gpu), "--max-concurrent", "2",
                                 *ONE_GPU, "--", *SETTINGS])
    deadline = time.monotonic() + 150
    while not all((grid / f"row-{i}" / "checkpoints" / "last.ckpt").exists() for i in (0, 1)):
        assert time.monotonic() < deadline, f"the rows never reached their first validation\n{logs(grid)}"
        time.sleep(0.05)
    time.sleep(0.2)  # past the validation's save: the stop's save is a later step
    assert cluster.run("scancel", job).returncode == 0
    cluster.wait([job], timeout=120)
    for i in (0, 1):
        log = (grid / f"row-{i}.out").read_text()
        assert "stopped by SIGTERM" in log and "Traceback" not in log, log[-3000:]
        attempts = json.loads((grid / f"row-{i}" / "provenance.json").read_text())["attempts"]
        assert attempts[-1]["exit"] == 143, attempts
        saved = torch.load(grid / f"row-{i}" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert saved["global_step"] > FIRST_VALIDATION_STEP, saved["global_step"]  # the stop's save
        assert not (grid / f"row-{i}" / "done").exists()
    return grid


def resume(cluster: SlurmCluster, grid: Path) -> None:
    """slurm_train.py --resume GRID, waited for: both rows resumed from their saves and finished."""
    job, _ = submit(cluster, ["--resume", str(grid)])
    cluster.wait([job], timeout=400)
    for i in (0, 1):
        log = (grid / f"row-{i}.out").read_text()
        assert f"Restored all states from the checkpoint at {grid}/row-{i}/checkpoints/last.ckpt" in log, log[-3000:]
        assert (grid / f"row-{i}" / "done").exists(), logs(grid)


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_scancel_of_a_packed_grid_saves_every_run_and_resume_continues_from_the_saves(
        slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    resume(slurm, cancelled_grid(slurm, tmp_path, runs_per_gpu=2))


def test_scancel_of_a_grid_then_a_copy_and_a_move_resume_where_they_are(
        slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    """Before: the job script named the old directory, so a copy's rows trained the original's (the launcher said
    "row 1 finished" of the copy) and a moved grid's rows all failed, its --resume hint looping."""
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    original = cancelled_grid(slurm, tmp_path, runs_per_gpu=1)
    copy = tmp_path / "elsewhere" / "copied-grid"
    shutil.copytree(original, copy)
    before = fingerprint(original)
    resume(slurm, copy)
    assert fingerprint(original) == before  # the original: not trained, not marked, not rewritten
    moved = tmp_path / "moved-grid"
    shutil.move(original, moved)
    resume(slurm, moved)
    for grid in (copy, moved):
        script = (grid / "job.sbatch").read_text()
        assert f"grid_dir={grid}" in script and f"--output={grid}/row-%a.out" in script
