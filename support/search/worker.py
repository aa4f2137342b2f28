"""One worker of an offline search (slurm_train.py --search starts K of them, as a Slurm job array or here):

    PYTHONPATH=. python support/search/worker.py runs/search-20261202-140000-abc123 --worker 0

It loops until the search has its count of runs: take a run (its own unfinished one first: a requeued array task
resumes it with the same directory, checkpoint and wandb id; else a preempted one left by a gone worker; else a new
one proposed by the engine, see support/search/records.py), train it with train.py in its own run directory
SEARCH_DIR/run-NNNN/, record how it ended, repeat. While train.py runs, the worker refreshes the record's heartbeat;
train.py itself adds each validation epoch's metric to the record and stops early when hyperband says so.

Exit status: 0 when the search has its count (some runs may have failed: sweep.py --status shows them), 143 when
stopped by SIGTERM (the run is then marked preempted and resumed later).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from support import REPO_DIR
from support.atomic import write_atomic
from support.search.records import (
    HEARTBEAT_SECONDS,
    RECORD_ENV,
    claim_or_propose,
    heartbeat,
    load_search,
    owner_identity,
    read_record,
    record_path,
    write_record,
)
from support.slurm.grid_rows import given_keys
from support.slurm.packing import free_port, packed


def die_with_parent() -> None:
    """In the child, before train.py starts: SIGTERM it when this worker dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so a killed worker leaves no run training unrecorded; train.py saves last.ckpt on SIGTERM."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def wandb_run_id(search_name: str, run_name: str) -> str:
    """The run's wandb id, from the search and the run number: `wandb sync` puts the runs of one search together, and
    a resumed run continues its own wandb run. wandb ids allow letters, numbers, - and _ (at most 64)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{search_name}-{run_name}")[-64:]


def resume_arguments(run_dir: Path) -> list[str]:
    """How train.py continues an interrupted run: from Lightning's requeue checkpoint (hpc_ckpt_N.ckpt, written on
    Slurm's SIGUSR1) or from last.ckpt (written at every validation and on SIGTERM), whichever is newer."""
    saved = [*run_dir.glob("hpc_ckpt_*.ckpt"), run_dir / "checkpoints" / "last.ckpt"]
    newest = max((path for path in saved if path.is_file()), key=lambda path: path.stat().st_mtime, default=None)
    if newest is None:
        return []
    return ["--ckpt_path=last" if newest.name == "last.ckpt" else "--ckpt_path=hpc"]


def launcher() -> list[str]:
    """Inside a Slurm job, train.py runs as a job step with one task per device (what Lightning expects) and
    receives the job's SIGUSR1 (#SBATCH --signal) there: Lightning then saves and requeues the array task."""
    if not os.environ.get("SLURM_JOB_ID"):
        return []
    overlap = ["--overlap"] if packed() > 1 else []  # packed workers' runs share the task's CPUs and GPUs
    return ["srun", f"--ntasks-per-node={os.environ.get('SLURM_NTASKS_PER_NODE', '1')}", "--kill-on-bad-exit=1",
            *overlap]


class Worker:
    def __init__(self, search_dir: Path, worker: int) -> None:
        self.search_dir, self.search = search_dir, load_search(search_dir)
        self.owner = owner_identity(worker)
        self.child: subprocess.Popen[bytes] | None = None
        self.terminated = False

    def on_stop_signal(self, signum: int, frame: Any) -> None:
        """Slurm's requeue, time limit or scancel (or a user's kill): pass it on to train.py, which saves last.ckpt;
        the run is recorded as preempted once it has stopped."""
        self.terminated = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def command(self, record: dict[str, Any], run_dir: Path) -> list[str]:
        # As a wandb agent gives them, less the keys given again after `--` (they come later and win: the run's
        # argv would hold both, as a grid's rows did).
        given = given_keys(self.search["extra"])
        settings = [f"--{key}={value}" for key, value in sorted(record["config"].items()) if key not in given]
        # A script runs under this worker's interpreter: the environment of the node's architecture (job.sbatch's
        # $python), not the submitting machine's.
        program = self.search["program"] or [str(REPO_DIR / "train.py")]  # the copy's train.py, beside this worker
        program = [sys.executable, *program] if program[0].endswith(".py") else program
        return [*launcher(), *program, *resume_arguments(run_dir), *settings, *self.search["extra"],
                f"--run_dir={run_dir}", f"--wandb.group={self.search['name']}"]

    def train(self, record: dict[str, Any]) -> None:
        """Runs train.py for the record's run, refreshing the heartbeat, then records how it ended."""
        run_dir, path = self.search_dir / record["name"], record_path(self.search_dir, record["number"])
        run_dir.mkdir(exist_ok=True)
        if not (run_dir / "wandb_id").exists():  # train.py's wandb logger continues the run this file names
            write_atomic(run_dir / "wandb_id", wandb_run_id(self.search["name"], record["name"]) + "\n")
        command = self.command(record, run_dir)
        env = {**os.environ, RECORD_ENV: str(path)}
        if "SLURM_CPUS_PER_TASK" in env:  # since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch
            env["SRUN_CPUS_PER_TASK"] = env["SLURM_CPUS_PER_TASK"]
        if packed() > 1 and "SLURM_JOB_ID" in env:  # Lightning's port from the job id is the same for every packed run
            env["MASTER_PORT"] = str(free_port())
        started = time.time()
        print(f"{record['name']} (attempt {record['attempts']}) on {self.owner['host']}: {shlex.join(command)}",
              flush=True)
        with open(self.search_dir / f"{record['name']}.out", "ab") as log:
            self.child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          preexec_fn=die_with_parent)
            if self.terminated:  # the signal came while it started
                self.child.send_signal(signal.SIGTERM)
            while self.child.poll() is None:
                try:
                    self.child.wait(timeout=min(HEARTBEAT_SECONDS, self.search["heartbeat_timeout"] / 4))
                except subprocess.TimeoutExpired:
                    heartbeat(path)
        code, self.child = self.child.returncode, None
        record = read_record(path)  # with the history train.py added
        if self.terminated:
            state = "preempted"
        elif code == 0:
            state = "stopped" if record["stopped_early"] else "finished"
        else:
            state = "failed"
        record.update(state=state, exit_code=code, ended=time.time())
        record["seconds"] = record.get("seconds", 0.0) + record["ended"] - started
        write_record(self.search_dir, record)
        best = "none" if record["best"] is None else f"{record['best']:.6g}"
        print(f"{record['name']} {state} (exit {code}) after {len(record['history'])} epoch(s); best "
              f"{self.search['sweep']['metric']['name']} {best}; log {self.search_dir}/{record['name']}.out",
              flush=True)

    def run(self) -> int:
        # SIGINT: Ctrl-C on slurm_train.py --local, the same clean stop. The handlers are restored at the end.
        handlers = {signum: signal.signal(signum, self.on_stop_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            done = 0
            while not self.terminated:
                record = claim_or_propose(self.search_dir, self.owner)
                if record is None:
                    print(f"the search has its {self.search['count']} runs (or its grid is exhausted): worker "
                          f"{self.owner['worker']} ends after {done} run(s)", flush=True)
                    return 0
                if self.terminated:  # stopped while proposing: the run is left for whoever resumes the search
                    write_record(self.search_dir, {**record, "state": "preempted", "ended": time.time()})
                    break
                self.train(record)
                done += 1
            return 128 + signal.SIGTERM
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One worker of an offline search (see slurm_train.py --search).")
    parser.add_argument("search_dir", type=Path)
    parser.add_argument("--worker", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)),
                        help="this worker's number (default: the Slurm array task id)")
    args = parser.parse_args(argv)
    return Worker(args.search_dir.resolve(), args.worker).run()


if __name__ == "__main__":
    sys.exit(main())
