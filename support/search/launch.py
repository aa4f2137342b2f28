"""slurm_train.py --search: the search directory's settings and its batch script (K workers, one array task each).
The workers are support/search/worker.py; the records they share, support/search/records.py."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

from support.errors import LaunchError
from support.search.records import IN_FLIGHT, SEARCH_FILE, SearchError, create_search, load_search, read_records
from support.slurm.local_rows import LOCAL_TASK_ENV
from support.slurm.packing import RUNS_PER_GPU_ENV
from support.slurm.scripts import code_lines

# The worker sets these for every run; given after `--` they would break a run's place in the search.
WORKER_ARGUMENTS = ("--run_dir", "--ckpt_path", "--wandb.group")


def extra_problem(extra: list[str]) -> str | None:
    given = [arg.split("=")[0] for arg in extra if arg.split("=")[0] in WORKER_ARGUMENTS]
    if given:
        return (f"{', '.join(given)} after -- cannot be given to a search: each run gets its own directory in the "
                "search directory, its checkpoint and its wandb group from the worker")
    return None


def new_search(search_dir: Path, sweep: dict[str, Any], count: int, seed: int, extra: list[str],
               heartbeat_timeout: float, program: list[str] | None = None, runs_per_gpu: int = 1) -> None:
    """Creates the search directory with search.json: what every worker reads, never changed afterwards. `program`
    is what each run runs, with the run's --key=value settings; by default the train.py beside the worker, i.e. of
    the frozen copy the job script names (support/provenance/snapshot.py)."""
    create_search(search_dir, {
        "name": search_dir.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sweep": sweep, "count": count,
        "seed": seed, "extra": extra, "heartbeat_timeout": heartbeat_timeout, "runs_per_gpu": runs_per_gpu,
        # A script: each worker runs it with its own interpreter (the environment of its node's architecture).
        "program": program})


def render_search_script(search_dir: Path, head: str, code: Path, runs_per_gpu: int = 1) -> str:
    """The workers' batch script; `head`: its #SBATCH header, set-up and $python (support/slurm/scripts.py). Each array
    task runs `runs_per_gpu` workers at once (worker task*K + j, each logging to worker-<n>.out)."""
    q = shlex.quote
    # By path, not -m: `python -m` puts the working directory (the project, whose code may have changed) first.
    worker = f'"$python" "$code/support/search/worker.py" {q(str(search_dir))} --worker'
    if runs_per_gpu == 1:
        run = f'exec {worker} "$task"\n'
    else:
        run = f"""pids=()
for ((j = 0; j < {runs_per_gpu}; j++)); do  # one that fails or is killed leaves the others running
  {worker} $((task * {runs_per_gpu} + j)) >> {q(str(search_dir))}/worker-$((task * {runs_per_gpu} + j)).out 2>&1 &
  pids+=($!)
done
status=0
for pid in "${{pids[@]}}"; do wait "$pid" || status=$?; done
exit "$status"
"""
    return f"""#!/usr/bin/env bash
# Offline search: workers sharing {q(str(search_dir))}, {runs_per_gpu} per array task; by slurm_train.py --search.
#   python sweep.py --status {q(str(search_dir))}      # the runs so far, best first, and status.png
#   python slurm_train.py --resume {q(str(search_dir))}   # new workers, if the workers ended before the search
{head}
task=${{{LOCAL_TASK_ENV}:-${{SLURM_ARRAY_TASK_ID:?submit with sbatch, or run: python slurm_train.py --search --local}}}}
{code_lines(code)}# Runs sharing this task's GPU(s): train.py names it when memory runs out.
export {RUNS_PER_GPU_ENV}={runs_per_gpu}
{run}"""


def search_settings(search_dir: Path) -> dict[str, Any]:
    """search.json, checked for what a resume reads (its count and runs per GPU): LaunchError, one line, else. A
    list, or a count of "40", raised TypeError or KeyError from a resume."""
    try:
        settings = load_search(search_dir)
    except SearchError as err:
        raise LaunchError(str(err)) from None
    count = settings.get("count") if isinstance(settings, dict) else None
    per_gpu = settings.get("runs_per_gpu", 1) if isinstance(settings, dict) else None
    for name, value in [("count", count), ("runs_per_gpu", per_gpu)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LaunchError(f"{search_dir / SEARCH_FILE} is damaged ({name} is {value!r}, not a whole number of 1 "
                              "or more): it is written once when the search is created; restore it or start a new "
                              "search")
    return {**settings, "runs_per_gpu": per_gpu}


def unfinished_search(search_dir: Path) -> bool:
    """Whether a search still has runs to make or runs in flight (resume would start workers for it)."""
    records = read_records(search_dir)
    return len(records) < search_settings(search_dir)["count"] or any(r["state"] in IN_FLIGHT for r in records)
