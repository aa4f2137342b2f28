"""train.py across Slurm nodes, on the local cluster's two nodes (tests/slurm/local_slurm.sh: n1 and n2, one slurmd
each, on this machine): DDP over srun tasks on CPU (gloo). Node layout does not change the result, a requeued
two-node job resumes exactly, evaluation counts every sample once on any number of ranks, grids take --nodes, and
a job whose nodes do not match the Trainer stops at once on every task."""

from __future__ import annotations

import glob
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, REPO, script_env
from slurm_fixtures import SlurmCluster

import evaluate
import slurm_train

# These tests run the example model and data (their keys, their speed): skipped once you replace them.
pytestmark = [pytest.mark.example_model, pytest.mark.example_data, pytest.mark.slow]

# 4-sample batches over 4 ranks: 79 steps per epoch, validated every quarter; a signal sent when last.ckpt first
# appears (step 19) lands mid-epoch with ~60 batches to spare.
STEPS_PER_EPOCH = 79
# ddp_find_unused_parameters_true: DDP without its bucket rebuild. Plain ddp regroups its gradient buckets after the
# first backward, so the first step after a resume all-reduces in the initial grouping; with 3 or more ranks a float
# sum depends on its order, and the resumed weights differed from step 31 on (measured; 2 ranks stay exact).
ARGS = QUICK + ["--data.batch_size=4", "--trainer.max_epochs=2", "--trainer.val_check_interval=0.25",
                "--model.dropout=0.3", "--early_stopping.patience=100", "--cka.every_n_epochs=0",
                "--trainer.accelerator=cpu", "--trainer.strategy=ddp_find_unused_parameters_true"]


def job(path: Path, nodes: int, tasks: int, command: str, *sbatch: str) -> Path:
    header = "".join(f"#SBATCH {option}\n" for option in (f"--nodes={nodes}", f"--ntasks-per-node={tasks}",
                                                           f"--output={path.parent}/{path.stem}-%j.out",
                                                           "--open-mode=append", *sbatch))
    path.write_text(f"#!/bin/bash\n{header}srun {sys.executable} {command}\n")
    return path


def train_job(path: Path, nodes: int, tasks: int, run_dir: Path, *sbatch: str) -> Path:
    command = " ".join([str(REPO / "train.py"), *ARGS, f"--trainer.num_nodes={nodes}", f"--trainer.devices={tasks}",
                        f"--run_dir={run_dir}"])
    return job(path, nodes, tasks, command, *sbatch)


def log_of(path: Path) -> str:
    return "".join(Path(p).read_text() for p in sorted(glob.glob(f"{path.parent}/{path.stem}-*.out")))


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def two_node_runs(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three runs with the same seed and settings: 2 nodes x 2 tasks interrupted mid-epoch by Slurm's requeue signal,
    2 nodes x 2 tasks uninterrupted, 1 node x 4 tasks uninterrupted. One job at a time: the machine has 2 cores."""
    tmp = tmp_path_factory.mktemp("multinode")
    dirs = {name: tmp / name for name in ("requeued", "two_nodes", "one_node")}
    try:
        requeued = slurm_cluster.sbatch(str(train_job(tmp / "requeued.sh", 2, 2, dirs["requeued"], "--requeue")),
                                        cwd=tmp, env=script_env())
        deadline = time.monotonic() + 180
        while not (dirs["requeued"] / "checkpoints" / "last.ckpt").exists():  # a quarter of epoch 0 is done
            assert time.monotonic() < deadline, "the job never reached its first validation: " + log_of(
                tmp / "requeued.sh")[-3000:]
            time.sleep(0.02)
        assert slurm_cluster.run("scancel", "--signal=USR1", requeued).returncode == 0  # to every task, both nodes
        slurm_cluster.wait([requeued], timeout=300)
        assert slurm_cluster.job_field(requeued, "Restarts") == "1", log_of(tmp / "requeued.sh")[-3000:]
        for name, nodes, tasks in (("two_nodes", 2, 2), ("one_node", 1, 4)):
            reference = slurm_cluster.sbatch(str(train_job(tmp / f"{name}.sh", nodes, tasks, dirs[name])), cwd=tmp,
                                             env=script_env())
            slurm_cluster.wait([reference], timeout=240)
            assert slurm_cluster.job_field(reference, "ExitCode") == "0:0", log_of(tmp / f"{name}.sh")[-3000:]
    finally:
        slurm_cluster.cancel_submitted()
    return dirs


@pytest.mark.slow
def test_two_nodes_end_with_exactly_the_weights_of_one_node(two_node_runs: dict[str, Path]):
    two, one = last(two_node_runs["two_nodes"]), last(two_node_runs["one_node"])
    assert two["global_step"] == one["global_step"] == 2 * STEPS_PER_EPOCH - 3  # last validation: 3 steps early
    for key, value in one["state_dict"].items():
        assert torch.equal(value, two["state_dict"][key]), key


def test_a_requeued_two_node_job_resumes_on_both_nodes_exactly(two_node_runs: dict[str, Path]):
    run_dir = two_node_runs["requeued"]
    log = log_of(run_dir.parent / "requeued.sh")
    assert len(re.findall(r"^run directory: ", log, re.M)) == 1 and "not resumable" not in log, log[-3000:]
    hpc = glob.glob(str(run_dir / "hpc_ckpt_*.ckpt"))
    assert hpc, "Lightning's requeue checkpoint is missing"
    position = torch.load(hpc[0], map_location="cpu", weights_only=False)["loops"]["fit_loop"]
    assert 0 < position["epoch_loop.batch_progress"]["current"]["completed"] < STEPS_PER_EPOCH, "not mid-epoch"
    resumed, full = last(run_dir), last(two_node_runs["two_nodes"])
    assert resumed["global_step"] == full["global_step"]
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    # The same run directory and wandb run: two offline segments of one run id.
    segments = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(segments) == 2 and len({Path(p).name.rsplit("-", 1)[-1] for p in segments}) == 1, segments


@pytest.mark.slow
def test_evaluation_on_four_ranks_over_two_nodes_equals_one_process(two_node_runs: dict[str, Path],
                                                                    slurm_cluster: SlurmCluster, tmp_path: Path):
    """The 270 test samples split 68/68/67/67 over 4 ranks: Lightning's sampler would pad them to 272 (2 counted
    twice), and its mean of the ranks' sample counts would truncate 67.5 to 67."""
    run_dir = two_node_runs["two_nodes"]
    single = evaluate.main([str(run_dir)])
    overrides = "--trainer.num_nodes=2 --trainer.devices=2 --trainer.accelerator=cpu --trainer.strategy=ddp"
    script = job(tmp_path / "evaluate.sh", 2, 2,
                 f"{REPO / 'evaluate.py'} {run_dir} --json {tmp_path / 'ddp.json'} -- {overrides}")
    try:
        slurm_cluster.wait([slurm_cluster.sbatch(str(script), cwd=tmp_path, env=script_env())], timeout=180)
    finally:
        slurm_cluster.cancel_submitted()
    log = log_of(script)
    assert "padded" not in log and (tmp_path / "ddp.json").is_file(), log[-3000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["checkpoint"] == single["checkpoint"]
    assert ddp["test/acc"] == pytest.approx(single["test/acc"], abs=1e-7)
    assert ddp["test/loss"] == pytest.approx(single["test/loss"], rel=1e-6)


@pytest.mark.slow
def test_a_two_node_job_running_a_one_node_trainer_stops_on_every_task(slurm: SlurmCluster, tmp_path: Path):
    command = " ".join([str(REPO / "train.py"), *QUICK, "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
                        "--trainer.num_nodes=1", f"--run_dir={tmp_path / 'run'}"])
    script = job(tmp_path / "mismatch.sh", 2, 1, command, "--time=5")
    started = time.monotonic()
    job_id = slurm.sbatch(str(script), cwd=tmp_path, env=script_env())
    slurm.wait([job_id], timeout=120)
    assert time.monotonic() - started < 110  # stopped at once, not at the time limit
    log = log_of(script)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, log[-3000:]  # one line from each task
    assert all("2 node(s) (--nodes=2)" in e and "--trainer.num_nodes=1" in e for e in errors), errors
    assert slurm.job_field(job_id, "ExitCode") != "0:0" and "Traceback" not in log


@pytest.mark.slow
def test_a_grid_of_two_node_rows_runs_to_completion(slurm: SlurmCluster, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"program": "train.py", "method": "grid",
                                 "parameters": {"model.hidden_dim": {"values": [16, 32]}}}))
    argv = ["--sweep-config", str(sweep), "--nodes", "2", "--gpus-per-node", "0", "--max-concurrent", "1",
            "--cpus-per-task", "1", "--mem", "1G", "--time", "00:10:00", "--",
            "--trainer.num_nodes=2", "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.max_epochs=1",
            "--data.batch_size=256", *QUICK]
    assert slurm_train.main(argv) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    slurm.submitted.append(job_id)
    grid = Path(re.search(r"run directory: (\S+)", out).group(1))
    slurm.wait([job_id], timeout=240)
    logs = "\n".join(p.read_text() for p in grid.glob("row-*.out"))
    for row in range(2):
        assert (grid / f"row-{row}" / "done").is_file(), logs[-3000:]
        assert slurm.job_field(f"{job_id}_{row}", "NodeList") == "n[1-2]"
    # Without --trainer.num_nodes the grid is refused before anything is written.
    assert slurm_train.main(argv[:argv.index("--trainer.num_nodes=2")] + argv[argv.index("--trainer.num_nodes=2") + 1:]
                            ) == 1
    assert "--nodes=2 but the Trainer runs --trainer.num_nodes=1" in capsys.readouterr().err
