"""train.py under a real Slurm (the local one-node cluster): preemption and requeue, of one task and of DDP over
srun tasks."""

from __future__ import annotations

import glob
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, REPO, run_script, script_env

# These tests run the example model and data (their keys, their speed): skipped once you replace them.
pytestmark = [pytest.mark.example_model, pytest.mark.example_data]

# 4-sample batches (315 steps per epoch) validated every quarter epoch: last.ckpt first appears after batch 79
# of epoch 0, and a signal sent then lands mid-epoch with ~235 batches to spare.
STEPS_PER_EPOCH = 315
ARGS = QUICK + ["--data.batch_size=4", "--trainer.max_epochs=3", "--trainer.val_check_interval=0.25",
                "--model.dropout=0.3", "--early_stopping.patience=100", "--cka.every_n_epochs=0"]


def job_script(path: Path, sbatch: str, command: str) -> Path:
    path.write_text(f"#!/bin/bash\n{sbatch}\n#SBATCH --output={path.parent}/job-%j.out\n#SBATCH --open-mode=append\n"
                    f"srun {sys.executable} {REPO / 'train.py'} {command}\n")
    return path


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_a_requeued_task_resumes_exactly_and_continues_its_wandb_run(slurm, tmp_path: Path):
    run_dir = tmp_path / "preempted"
    script = job_script(tmp_path / "job.sh", "#SBATCH --job-name=preempt\n#SBATCH --ntasks=1\n#SBATCH --requeue",
                        " ".join(ARGS + [f"--run_dir={run_dir}"]))
    job = slurm.sbatch(str(script), cwd=tmp_path, env=script_env())
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists():  # a quarter of epoch 0 is done: interrupt it
        assert time.monotonic() < deadline, "the job never reached its first validation"
        time.sleep(0.02)
    assert slurm.run("scancel", "--signal=USR1", job).returncode == 0
    # Uninterrupted reference, meanwhile: same settings, one thread as in the job.
    reference = run_script("train.py", *ARGS, f"--run_dir={tmp_path / 'uninterrupted'}", timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    slurm.wait([job], timeout=240)
    log = "".join(Path(p).read_text() for p in glob.glob(str(tmp_path / "job-*.out")))
    assert slurm.job_field(job, "Restarts") == "1", log[-3000:]
    hpc = glob.glob(str(run_dir / "hpc_ckpt_*.ckpt"))
    assert hpc, "Lightning's requeue checkpoint is missing"
    position = torch.load(hpc[0], map_location="cpu", weights_only=False)["loops"]["fit_loop"]
    assert 0 < position["epoch_loop.batch_progress"]["current"]["completed"] < STEPS_PER_EPOCH, "not mid-epoch"
    assert "final metrics" in log and "not resumable" not in log  # Lightning's warning for loaders that cannot skip
    resumed, full = weights(run_dir), weights(tmp_path / "uninterrupted")
    # last.ckpt is from the last validation: step 2 * 315 + 312 (every 78 batches, a quarter of 315).
    assert resumed["global_step"] == full["global_step"] == 2 * STEPS_PER_EPOCH + 4 * (STEPS_PER_EPOCH // 4)
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    # One wandb run, continued: two offline segments under the same run id.
    segments = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(segments) == 2 and len({Path(p).name.rsplit("-", 1)[-1] for p in segments}) == 1, segments


@pytest.mark.slow
def test_a_requeued_ddp_job_resumes_exactly(slurm, tmp_path: Path):
    """Two srun tasks (DDP on CPU) interrupted mid-epoch end with the weights of an uninterrupted DDP run: all
    ranks act on the signal at the same batch, and each rank's sampler skips what it had trained."""
    ddp = " ".join(ARGS + ["--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.strategy=ddp"])
    tasks = "#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=2"
    run_dir, reference_dir = tmp_path / "preempted", tmp_path / "uninterrupted"
    job = slurm.sbatch(str(job_script(tmp_path / "job.sh", f"#SBATCH --job-name=ddp\n{tasks}\n#SBATCH --requeue",
                                      f"{ddp} --run_dir={run_dir}")), cwd=tmp_path, env=script_env())
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert time.monotonic() < deadline, "the job never reached its first validation"
        time.sleep(0.02)
    assert slurm.run("scancel", "--signal=USR1", job).returncode == 0  # every task gets it, at slightly different times
    # The node's 2 CPUs take one job at a time: the reference starts once the preempted one is done.
    reference = slurm.sbatch(str(job_script(tmp_path / "ref.sh", f"#SBATCH --job-name=ref\n{tasks}",
                                            f"{ddp} --run_dir={reference_dir}")), cwd=tmp_path, env=script_env())
    slurm.wait([job, reference], timeout=300)
    log = "".join(Path(p).read_text() for p in glob.glob(str(tmp_path / "job-*.out")))
    assert slurm.job_field(job, "Restarts") == "1" and slurm.job_field(reference, "ExitCode") == "0:0", log[-3000:]
    assert log.count("final metrics") == 2 and "not resumable" not in log  # rank 0 of each job
    hpc = glob.glob(str(run_dir / "hpc_ckpt_*.ckpt"))
    assert hpc, "Lightning's requeue checkpoint is missing"
    position = torch.load(hpc[0], map_location="cpu", weights_only=False)["loops"]["fit_loop"]
    assert 0 < position["epoch_loop.batch_progress"]["current"]["completed"] < STEPS_PER_EPOCH // 2, "not mid-epoch"
    resumed, full = weights(run_dir), weights(reference_dir)
    assert resumed["global_step"] == full["global_step"] > 0
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


@pytest.mark.slow
def test_tasks_that_do_not_match_the_trainers_devices_fail_before_training(slurm, tmp_path: Path):
    script = job_script(tmp_path / "bad.sh", "#SBATCH --job-name=mismatch\n#SBATCH --ntasks-per-node=2",
                        " ".join(QUICK + ["--trainer.max_epochs=1", "--trainer.accelerator=cpu",
                                          f"--run_dir={tmp_path / 'bad'}"]))
    job = slurm.sbatch(str(script), cwd=tmp_path, env=script_env())
    slurm.wait([job], timeout=120)
    log = "".join(Path(p).read_text() for p in glob.glob(str(tmp_path / "job-*.out")))
    assert slurm.job_field(job, "ExitCode") != "0:0"
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors and "ntasks-per-node" in errors[0], log[-3000:]
    assert "Traceback" not in log and not (tmp_path / "bad" / "checkpoints").exists()
