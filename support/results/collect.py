"""Which runs a directory holds, for `sweep.py --status DIR`: a grid (grid.json, row-<i>/), a search (search.json,
run-NNNN/), an agents' job (agents-*/, whose runs train.py put beside it as slurm-<job>_<task>/), a single run
(provenance.json, config.yaml or metrics.jsonl), or a folder of those, such as runs/ (each grid, search and agents'
job a group of its own, the single runs together). No torch."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.results.files import CONFIG_FILE, METRICS_FILE, PROVENANCE_FILE, Run, read_run
from support.results.states import SlurmView, classify, slurm_view
from support.search.records import SEARCH_FILE, SearchError, effective_state, load_search, read_records

RUN_MARKERS = (PROVENANCE_FILE, CONFIG_FILE, METRICS_FILE)
ACCEPTED = ("a grid (runs/grid-*), a search (runs/search-*), an agents' job (runs/agents-*), a run directory, or a "
            "folder of them such as runs/")


class ResultsError(ValueError):
    """A directory --status cannot read; the message is one line."""


@dataclass
class Group:
    kind: str  # grid, search, agents, runs
    dir: Path
    runs: list[Run] = field(default_factory=list)
    jobs: set[str] = field(default_factory=set)  # its Slurm jobs (jobs.txt)
    metric: tuple[str, str] | None = None  # a search's own metric and goal
    notes: list[str] = field(default_factory=list)

    def resubmit(self) -> str | None:
        unfinished = [r for r in self.runs if r.state in ("failed", "preempted", "not started", "stopped for a NaN")]
        if self.kind in ("grid", "search") and unfinished:
            return f"python slurm_train.py --resume {self.dir}"
        return None


def jobs_of(job_dir: Path) -> set[str]:
    try:
        return set((job_dir / "jobs.txt").read_text().split())
    except OSError:
        return set()


def is_run(path: Path) -> bool:
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def grid_group(grid_dir: Path) -> Group:
    group = Group("grid", grid_dir, jobs=jobs_of(grid_dir))
    try:
        grid = json.loads((grid_dir / "grid.json").read_text())
        rows = grid["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        group.notes.append(f"{grid_dir / 'grid.json'} is unreadable: its rows cannot be listed")
        return group
    per_task, last_job = grid.get("runs_per_gpu", 1) or 1, max(group.jobs, key=int, default=None)
    for index, row in enumerate(rows):
        config = row.get("config", {}) if isinstance(row, dict) else {}
        run = read_run(grid_dir / f"row-{index}", f"row-{index}", config)
        run.log = grid_dir / f"row-{index}.out"
        if run.job is None and last_job is not None:
            run.job = f"{last_job}_{index // per_task}"  # the task that runs (or ran) it in the latest submission
        group.runs.append(run)
    return group


def search_group(search_dir: Path) -> Group:
    group = Group("search", search_dir, jobs=jobs_of(search_dir))
    try:
        search = load_search(search_dir)
    except SearchError as err:
        group.notes.append(str(err))
        return group
    group.metric = (search["sweep"]["metric"]["name"], search["sweep"]["metric"].get("goal", "minimize"))
    records = read_records(search_dir)
    for record in records:
        name = f"run-{record['number']:04d}"
        run = read_run(search_dir / name, name, record.get("config", {}))
        run.log = search_dir / f"{name}.out"
        timeout = search.get("heartbeat_timeout", 600.0)
        state = effective_state(record, timeout, None, time.time()) if record.get("owner") else record.get("state")
        run.extra["search_state"] = state
        run.done = run.done or state == "finished"
        if not run.test and isinstance(record.get("test"), dict):
            run.test = {k: v for k, v in record["test"].items() if isinstance(v, (int, float))}
        group.runs.append(run)
    return group


def agents_group(agents_dir: Path) -> Group:
    group = Group("agents", agents_dir, jobs=jobs_of(agents_dir))
    for job in sorted(group.jobs):
        for run_dir in sorted(agents_dir.parent.glob(f"slurm-{job}_*"), key=lambda p: int(p.name.rsplit("_", 1)[1])
                              if p.name.rsplit("_", 1)[1].isdigit() else 0):
            run = read_run(run_dir, run_dir.name)
            task = run_dir.name.rsplit("_", 1)[1]
            run.log, run.job = agents_dir / f"agent-{task}.out", run.job or f"{job}_{task}"
            group.runs.append(run)
    if not group.jobs:
        group.notes.append("no jobs.txt: the agents' job was never submitted, so it has no runs")
    return group


def kind_of(path: Path) -> str | None:
    if (path / "grid.json").is_file():
        return "grid"
    if (path / SEARCH_FILE).is_file():
        return "search"
    if path.name.startswith("agents-") and (path / "job.sbatch").is_file():
        return "agents"
    return "run" if is_run(path) else None


def collect(path: Path) -> list[Group]:
    """The groups of runs under `path`, each run's state classified (Slurm asked once for all of them)."""
    if not path.is_dir():
        raise ResultsError(f"{path} is not a directory: --status takes {ACCEPTED}")
    kind = kind_of(path)
    if kind == "run":
        groups = [Group("runs", path.parent, runs=[read_run(path, path.name)])]
    elif kind is not None:
        groups = [{"grid": grid_group, "search": search_group, "agents": agents_group}[kind](path)]
    else:
        children = sorted(child for child in path.iterdir() if child.is_dir() and not child.name.startswith("."))
        groups = [{"grid": grid_group, "search": search_group, "agents": agents_group}[k](child)
                  for child in children if (k := kind_of(child)) in ("grid", "search", "agents")]
        claimed = {run.dir for group in groups for run in group.runs}
        singles = [read_run(child, child.name) for child in children if kind_of(child) == "run" and
                   child not in claimed]
        if singles:
            groups.append(Group("runs", path, runs=singles))
        if not groups:
            raise ResultsError(f"{path} holds no runs: --status takes {ACCEPTED}")
    view = slurm_view(set().union(*(group.jobs | {r.job.split("_")[0] for r in group.runs if r.job}
                                    for group in groups)))
    for group in groups:
        classify_all(group, view)
    return groups


def classify_all(group: Group, view: SlurmView) -> None:
    for run in group.runs:
        if group.metric:  # a search ranks by its own metric
            run.monitor = group.metric[0]
            run.mode = "max" if group.metric[1] == "maximize" else "min"
        classify(run, view)
    if view.note:
        group.notes.append(view.note)


def as_dict(run: Run) -> dict[str, Any]:
    """Every recorded field of a run, flat (the CSV's row)."""
    best, epoch = run.best()
    last_cost = run.cost[-1] if run.cost else {}
    code = (run.attempts[-1].get("code") or {}) if run.attempts else {}
    return {"run": run.name, "dir": str(run.dir) if run.dir else "", "state": run.state, "cause": run.cause,
            **{f"setting:{k}": v for k, v in run.settings.items()}, "monitor": run.monitor or "", "best": best,
            "best_epoch": epoch, **{f"test:{k}": v for k, v in run.test.items()}, "epochs": len(run.epochs),
            "wall_s": run.wall_s(), "gpus": run.gpus(), "gpu_hours": run.gpu_hours(),
            "gpu_model": last_cost.get("gpu_model"), "peak_gpu_mem_mb": last_cost.get("peak_gpu_mem_mb"),
            "peak_cpu_mem_mb": last_cost.get("peak_cpu_mem_mb"), "job": run.job or "", "commit": code.get("commit"),
            "code_hash": code.get("hash"), "starts": len(run.attempts), "problems": "; ".join(run.problems)}
