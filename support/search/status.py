"""An offline search's progress from its records (support/search/records.py): a table of the runs, best first, a
cross-validation table when the runs have folds, and a plot of each run's best value with the running best.
Light on purpose (no torch; matplotlib only when plotting): sweep.py --status runs on login nodes."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from support.atomic import write_atomic
from support.search.records import (
    IN_FLIGHT,
    SearchError,
    effective_state,
    load_search,
    queued_slurm_tasks,
    read_records,
)

STATE_ORDER = ("finished", "stopped", "running", "preempted", "failed", "crashed")
LABELS = {"stopped": "stopped early"}  # hyperband's stop is a result, not an interruption: say so
FOLD, COUNTED = "data.fold", ("finished", "stopped")  # only complete runs count towards a setting's mean
# A record with no owner (a file edited by hand) can only be judged by its heartbeat.
UNKNOWN_OWNER = {"host": None, "pid": None, "worker": None, "slurm_task": None}
PLOT_STYLES = {  # state: (legend label, marker, colour); runs still in flight have partial values
    "finished": ("finished", "o", "C0"), "stopped": ("stopped early", "v", "C1"), "running": ("in flight", "s", "C2"),
    "preempted": ("in flight", "s", "C2"), "failed": ("failed", "x", "C3"), "crashed": ("crashed", "X", "C4")}


def snapshot(search_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The search's settings and its records, each with its effective state under "shown_state"."""
    search = load_search(search_dir)  # SearchError for anything but a readable search directory
    records = read_records(search_dir)
    for record in records:
        record["owner"] = record.get("owner") or UNKNOWN_OWNER
    # squeue can take seconds on a busy cluster: ask it only when a run in flight belongs to a Slurm task
    needs_slurm = any(r["owner"]["slurm_task"] for r in records if r["state"] in IN_FLIGHT)
    queued, now = queued_slurm_tasks() if needs_slurm else None, time.time()
    for record in records:
        record["shown_state"] = effective_state(record, search["heartbeat_timeout"], queued, now)
    return search, records


def value_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # a proposed learning rate has 16 figures; 4 tell the runs apart
        return str(float(f"{value:.4g}"))
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def table(headers: Sequence[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Aligned columns; those numbered in `right` (numbers) are right-aligned, the rest left-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return ["  ".join(cell.rjust(width) if i in right else cell.ljust(width)
                      for i, (cell, width) in enumerate(zip(cells, widths, strict=True))).rstrip()
            for cells in [list(headers), *rows]]


def ranked(records: list[dict[str, Any]], goal: str) -> list[dict[str, Any]]:
    """Best first by the goal; runs without a value last, by number."""
    sign = -1.0 if goal == "maximize" else 1.0
    return sorted(records, key=lambda r: (r.get("best") is None, sign * (r.get("best") or 0.0), r["number"]))


def varying_keys(configs: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """The settings that differ between runs (a key missing from some runs differs), and the constant ones."""
    keys = sorted({key for config in configs for key in config})
    constant = {key: configs[0][key] for key in keys
                if all(key in config and config[key] == configs[0][key] for config in configs)}
    return [key for key in keys if key not in constant], constant


def extra_settings(extra: list[str]) -> dict[str, str]:
    """The --key=value settings among the arguments given after `--` (the last of each key: train.py's rule)."""
    return dict(arg[2:].split("=", 1) for arg in extra if arg.startswith("--") and "=" in arg)


def status_lines(search_dir: Path) -> list[str]:
    search, records = snapshot(search_dir)
    metric, goal = search["sweep"]["metric"]["name"], search["sweep"]["metric"]["goal"]
    counts = [f"{n} {LABELS.get(state, state)}" for state in STATE_ORDER
              if (n := sum(r["shown_state"] == state for r in records))]
    lines = [f"{search['name']}: {search['sweep'].get('method', '?')} search, {goal} {metric}",
             f"{len(records)} of {search['count']} runs" + (": " + ", ".join(counts) if counts else "")]
    order = ranked(records, goal)
    leader = order[0] if order and order[0].get("best") is not None else None
    lines.append(f"best so far: run {leader['number']}, {metric} {leader['best']:.4g}" if leader
                 else "best so far: none yet")
    if search.get("extra"):  # given after `--`: they come after the proposed settings, so they win
        lines.append("every run also: " + " ".join(search["extra"]))
    varying, constant = varying_keys([r["config"] for r in records]) if records else ([], {})
    overridden = {key: value for key, value in extra_settings(search.get("extra", [])).items()
                  if key in search["sweep"].get("parameters", {})}
    for key, value in overridden.items():
        lines.append(f"applied: {key}={value} (given after --, it overrides the sweep's "
                     f"{value_text(constant[key]) if key in constant else 'values'} in every run)")
    varying = [key for key in varying if key not in overridden]  # their sweep values never reached a run
    if constant := {key: value for key, value in constant.items() if key not in overridden}:
        lines.append("fixed: " + ", ".join(f"{key}={value_text(value)}" for key, value in constant.items()))
    rows = [[str(r["number"]), LABELS.get(r["shown_state"], r["shown_state"]),
             "-" if r.get("best") is None else f"{r['best']:.4g}", str(len(r["history"])),
             *(value_text(r["config"].get(key)) for key in varying)] for r in order]
    lines += ["", *table(["run", "state", f"best {metric}", "epochs", *varying], rows, right={0, 2, 3})]
    if any(FOLD in r["config"] for r in records):
        lines += ["", f"cross-validation ({FOLD}), by mean best {metric} over finished and stopped runs:",
                  *fold_table(records, [k for k in varying if k != FOLD], goal)]
    return lines


def fold_table(records: list[dict[str, Any]], setting_keys: list[str], goal: str) -> list[str]:
    """One row per setting (the config without its fold): folds present, runs counted, mean and std of their best."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        setting = {key: value for key, value in record["config"].items() if key != FOLD}
        groups.setdefault(json.dumps(setting, sort_keys=True), []).append(record)
    summaries = []
    for members in groups.values():
        values = [r["best"] for r in members if r["shown_state"] in COUNTED and r.get("best") is not None]
        mean = float(np.mean(values)) if values else None
        summaries.append((mean, members, values))
    sign = -1.0 if goal == "maximize" else 1.0
    summaries.sort(key=lambda s: (s[0] is None, sign * (s[0] or 0.0), min(r["number"] for r in s[1])))
    rows = []
    for mean, members, values in summaries:
        folds = sorted({value_text(r["config"].get(FOLD)) for r in members}, key=lambda f: (len(f), f))
        std = f"{float(np.std(values)):.4g}" if len(values) > 1 else "-"  # population std, as over all folds
        rows.append([",".join(folds), str(len(values)), "-" if mean is None else f"{mean:.4g}", std,
                     *(value_text(members[0]["config"].get(key)) for key in setting_keys)])
    return table(["folds", "n", "mean", "std", *setting_keys], rows, right={1, 2, 3})


def write_plot(search_dir: Path, path: Path | None = None) -> Path:
    """A PNG of each run's best value by run number, marked by state, and the running best; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: the table alone needs no plotting
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    search, records = snapshot(search_dir)
    metric, goal = search["sweep"]["metric"]["name"], search["sweep"]["metric"]["goal"]
    path = Path(path) if path is not None else search_dir / "status.png"
    # A Figure with its own Agg canvas, not pyplot: no global backend or figure list to change or leak
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    valued = [r for r in sorted(records, key=lambda r: r["number"]) if r.get("best") is not None]
    for label, marker, colour in dict.fromkeys(PLOT_STYLES.values()):
        points = [r for r in valued if PLOT_STYLES[r["shown_state"]][0] == label]
        if points:
            ax.scatter([r["number"] for r in points], [r["best"] for r in points], marker=marker, color=colour,
                       label=label, zorder=3)
    if valued:
        best = [r["best"] for r in valued]
        running = np.maximum.accumulate(best) if goal == "maximize" else np.minimum.accumulate(best)
        ax.step([r["number"] for r in valued], running, where="post", color="black", label="best so far")
        ax.legend()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="run number", ylabel=f"best {metric} ({goal})", title=search["name"])
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    fig.clear()  # what "close" means for a Figure outside pyplot: drop its artists now
    return path


def show_status(search_dir: Path) -> int:
    """sweep.py --status: prints the tables and writes the plot; 1 for a directory that is not a search."""
    try:
        lines = status_lines(Path(search_dir))
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print(f"plot: {write_plot(Path(search_dir))}")
    return 0
