"""An offline search (slurm_train.py --search) on the real local Slurm: its workers as one job array, and an array task
requeued mid-run (`scontrol requeue`) that comes back and resumes its own run. The runs are tests/search_objective.py,
a stand-in for train.py that takes seconds."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from slurm_fixtures import SlurmCluster, slurm, slurm_cluster  # noqa: F401  (fixtures)

import slurm_train
from support.search.launch import new_search

SWEEP = {"method": "random", "metric": {"name": "val/loss", "goal": "minimize"},
         "parameters": {"optimizer.lr": {"values": [0.001, 0.003, 0.01]}, "model.dropout": {"values": [0.0, 0.2]}}}
EPOCHS = 6
SMALL = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--mem", "500M", "--time", "00:05:00"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers inherit this environment (sbatch exports it): one thread each, no wandb service of this process."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


def records(search_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(search_dir.glob("run-[0-9]*.json"))}


def logs(search_dir: Path) -> str:
    return "\n".join(f"==> {p.name} <==\n{p.read_text()[-3000:]}" for p in
                     [*sorted(search_dir.glob("worker-*.out")), *sorted(search_dir.glob("run-*.out"))])


def wait_for(condition: Any, what: str, search_dir: Path, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout:g} s\n{logs(search_dir)}"
        time.sleep(0.2)
    return result


@pytest.mark.slow
def test_a_requeued_worker_resumes_its_own_run_and_the_search_ends_with_its_count(
        slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture):
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    search_dir = tmp_path / "search"  # both slurmd (n1, n2) run on this machine: they read tmp_path
    new_search(search_dir, SWEEP, 4, 0, [f"--epochs={EPOCHS}", "--seconds_per_epoch=1.5"], 600.0,
               program=[sys.executable, str(REPO / "tests" / "search_objective.py")])
    plan = slurm_train.job_plan(slurm_train.parse_args(SMALL)[0])
    header = slurm_train.sbatch_header("search", "0-1", "2 workers", plan.res, f"{search_dir}/worker-%a.out")
    (search_dir / "job.sbatch").write_text(slurm_train.render_search_script(
        search_dir, slurm_train.script_head(plan, header, local=False), REPO))
    assert slurm_train.main(["--resume", str(search_dir), "--max-concurrent", "2"]) == 0
    job = re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1)
    slurm.submitted.append(job)

    def training() -> tuple[str, dict[str, Any]] | None:  # a run with 2 epochs done, and 4 to go
        return next(((name, r) for name, r in records(search_dir).items()
                     if r["state"] == "running" and len(r["history"]) >= 2), None)

    name, before = wait_for(training, "no run reached 2 epochs", search_dir, timeout=60)
    task = before["owner"]["slurm_task"]
    assert task.startswith(f"{job}_"), before["owner"]
    wandb_id = (search_dir / name / "wandb_id").read_text()
    # Measured here (Slurm 22.05, local_slurm.sh): `scontrol requeue` of a running array task cancels its srun step and
    # SIGTERMs the batch script (the worker, exec'd by it: it logs "preempted (exit 143)"); the task is COMPLETING for
    # ~1 s, then PENDING with Reason=BeginTime, not held (no `scontrol release` needed), with Restarts=1, the same
    # array task id (so the same SLURM_ARRAY_JOB_ID/TASK_ID) and EligibleTime = the requeue + 11 s (local_slurm.sh's
    # cred_expire 10 s + 1): the worker starts again ~12.5 s after the requeue. The whole test takes ~35 s.
    requeue = slurm.run("scontrol", "requeue", task)
    assert requeue.returncode == 0, requeue.stderr
    wait_for(lambda: not slurm.active([job]), f"array {job} still queued or running", search_dir, timeout=180)

    after = records(search_dir)
    assert sorted(after) == [f"run-{n:04d}" for n in range(1, 5)], logs(search_dir)
    assert [r["state"] for r in after.values()] == ["finished"] * 4, logs(search_dir)
    assert slurm.job_field(task, "Restarts") == "1"
    resumed = after[name]  # its own run, taken up again by the requeued task: same record, directory and wandb id
    assert resumed["attempts"] == 2 and resumed["owner"]["slurm_task"] == task, (resumed, logs(search_dir))
    assert (search_dir / name / "wandb_id").read_text() == wandb_id
    reported = [e["epoch"] for e in resumed["history"]]  # (an epoch may be missing: SIGTERM before its report)
    assert reported == sorted(set(reported)) and reported[-1] == EPOCHS - 1, resumed["history"]
    # The first attempt stopped mid-run (SIGTERM: recorded as preempted) after 2 to 5 epochs; the second continued from
    # its checkpoint: every epoch ran once (a fresh start would have run epoch 0 again).
    worker_log = (search_dir / f"worker-{task.split('_')[1]}.out").read_text()
    preempted = re.search(rf"^{name} preempted \(exit \d+\) after (\d+) epoch", worker_log, re.MULTILINE)
    assert preempted and 2 <= int(preempted.group(1)) < EPOCHS, worker_log
    starts = re.findall(rf"^{name} \(attempt (\d)\) on \S+: (.*)$", worker_log, re.MULTILINE)
    assert [attempt for attempt, _ in starts] == ["1", "2"], worker_log  # one log, appended to by the requeued task
    assert "--ckpt_path=last" not in starts[0][1] and "--ckpt_path=last" in starts[1][1]
    epochs = [int(line.split()[0]) for line in (search_dir / name / "epochs").read_text().splitlines()]
    assert epochs == list(range(EPOCHS)), epochs
