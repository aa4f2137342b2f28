"""One run directory read into a `Run`, from the files train.py and the job scripts leave there, whatever state they
are in: metrics.jsonl and cost.json (support/training/run_record.py), provenance.json (support/provenance/record.py),
config.yaml, a grid row's `done` marker and its log. A file that is missing, half-written or from another version is
read as far as it goes and noted in `Run.problems`; nothing here raises for a damaged directory. No torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from support.provenance.record import PROVENANCE_FILE

METRICS_FILE = "metrics.jsonl"
COST_FILE = "cost.json"
CONFIG_FILE = "config.yaml"  # support/run_dir/config.py's (which loads torch: not imported here)
NOT_SETTINGS = ("run_dir", "ckpt_path", "config", "seed_everything_default", "trainer.logger", "trainer.callbacks",
                "trainer.default_root_dir", "wandb.name", "wandb.group", "wandb.tags")


@dataclass
class Run:
    """What a table line shows of one run; `state` and `cause` are set by support/results/states.py."""

    name: str
    dir: Path | None
    settings: dict[str, Any] = field(default_factory=dict)
    monitor: str | None = None
    mode: str = "min"
    epochs: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl's epoch lines
    test: dict[str, float] = field(default_factory=dict)
    cost: list[dict[str, Any]] = field(default_factory=list)  # cost.json's attempts
    attempts: list[dict[str, Any]] = field(default_factory=list)  # provenance.json's
    done: bool = False  # a grid row's done marker, or a search record's finished state
    log: Path | None = None
    job: str | None = None  # the Slurm job (or array task) that ran it, "JOB_TASK"
    state: str = "unknown"
    cause: str = ""
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # the directory kind's own (a search record's state)

    def best(self) -> tuple[float | None, int | None]:
        """The monitored metric's best value and its epoch (1-based), from the run's validation epochs."""
        values = [(line["metrics"][self.monitor], line["epoch"] + 1) for line in self.epochs
                  if isinstance(line.get("metrics"), dict) and isinstance(line["metrics"].get(self.monitor), float)
                  and line["metrics"][self.monitor] == line["metrics"][self.monitor]]  # NaN is no best
        if not values:
            return None, None
        return (min if self.mode == "min" else max)(values, key=lambda v: v[0])

    def wall_s(self) -> float | None:
        walls = [a.get("wall_s") for a in self.cost if isinstance(a.get("wall_s"), (int, float))]
        return sum(walls) if walls else None

    def gpus(self) -> int | None:
        counts = [a.get("gpus") for a in self.cost if isinstance(a.get("gpus"), int)]
        return max(counts) if counts else None

    def gpu_hours(self) -> float | None:
        hours = [a.get("gpu_hours") for a in self.cost if isinstance(a.get("gpu_hours"), (int, float))]
        return sum(hours) if hours else None


def json_file(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        problems.append(f"{path.name} unreadable ({type(err).__name__})")
        return None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config as dotted keys (class arguments under init_args flattened away, as train.py's options name them)."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "init_args" and isinstance(value, dict):
            flat.update(flatten(value, prefix))
        elif key == "class_path":
            flat[prefix] = str(value).rsplit(".", 1)[-1]
        else:
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def read_run(run_dir: Path | None, name: str, settings: dict[str, Any] | None = None) -> Run:
    """A run from its directory (None: a row that never started); `settings`: the grid's or search's own."""
    run = Run(name=name, dir=run_dir, settings=dict(settings or {}))
    if run_dir is None or not run_dir.is_dir():
        return run
    if settings is None and (run_dir / CONFIG_FILE).is_file():
        try:
            config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
            run.settings = {k: v for k, v in flatten(config).items() if not k.startswith(NOT_SETTINGS)}
        except (OSError, yaml.YAMLError):
            run.problems.append("config.yaml unreadable")
    if (run_dir / METRICS_FILE).is_file():
        try:
            lines = (run_dir / METRICS_FILE).read_text().splitlines()
        except OSError:
            lines = []
        for number, line in enumerate(lines):
            try:
                item = json.loads(line)
            except ValueError:
                if number < len(lines) - 1:  # the last line may be cut by a kill; another is damage
                    run.problems.append(f"{METRICS_FILE} line {number + 1} damaged")
                continue
            if not isinstance(item, dict):
                continue
            if "monitor" in item:
                run.monitor, run.mode = item.get("monitor"), item.get("mode") or "min"
            elif "test" in item and isinstance(item["test"], dict):
                run.test = {k: v for k, v in item["test"].items() if isinstance(v, (int, float))}
            elif "epoch" in item:
                run.epochs = [e for e in run.epochs if e.get("epoch", -1) < item["epoch"]] + [item]  # a resume
    cost = json_file(run_dir / COST_FILE, run.problems)
    run.cost = [a for a in cost.get("attempts", []) if isinstance(a, dict)] if isinstance(cost, dict) else []
    provenance = json_file(run_dir / PROVENANCE_FILE, run.problems)
    run.attempts = [a for a in provenance.get("attempts", []) if isinstance(a, dict)] \
        if isinstance(provenance, dict) else []
    run.done = run.done or (run_dir / "done").is_file()
    if run.attempts and isinstance(slurm := run.attempts[-1].get("slurm"), dict):
        job = slurm.get("array_job") or slurm.get("job")
        run.job = f"{job}_{slurm['array_task']}" if slurm.get("array_task") and slurm.get("array_job") else job
    return run
