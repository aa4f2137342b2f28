"""The results table of `sweep.py --status DIR`: one line per run, best first by its monitored metric, the settings
that vary, the best value and its epoch, the test metrics, epochs, wall time, GPUs and GPU-hours; repeats of one
setting (seeds, folds) as mean ± std over n; a footer with the totals and the command that resubmits what did not
finish. Exports: CSV and Markdown (every recorded field), and a PNG. No torch; matplotlib only for the PNG."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from support.atomic import write_atomic
from support.results.collect import Group, as_dict
from support.results.files import Run
from support.search.status import table, value_text, varying_keys

# Settings that repeat a run rather than change it: their runs are summarised together.
REPEAT_KEYS = ("seed_everything", "data.fold", "fold", "seed")
STATE_ORDER = ("done", "stopped early", "running", "queued", "preempted", "stopped for a NaN", "failed", "not started",
               "unknown")


def number(value: float | None, figures: int = 4) -> str:
    return "–" if value is None else f"{value:.{figures}g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def ranked(runs: list[Run]) -> list[Run]:
    """Best first by each run's monitored metric; runs without a value after, in their own order."""
    def key(run: Run) -> tuple[bool, float]:
        best = run.best()[0]
        return best is None, 0.0 if best is None else (best if run.mode == "min" else -best)
    return sorted(runs, key=key)


def is_repeat_key(key: str) -> bool:
    return key in REPEAT_KEYS or key.endswith((".seed", ".fold"))


def repeats(runs: list[Run], varying: list[str]) -> list[tuple[dict[str, Any], list[Run]]]:
    """Finished runs grouped by their settings without the repeat keys: the groups of two or more."""
    groups: dict[str, tuple[dict[str, Any], list[Run]]] = {}
    for run in runs:
        if run.state not in ("done", "stopped early"):
            continue
        setting = {key: run.settings.get(key) for key in varying if not is_repeat_key(key)}
        groups.setdefault(json.dumps(setting, sort_keys=True, default=str), (setting, []))[1].append(run)
    return [(setting, members) for setting, members in groups.values() if len(members) > 1]


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0  # sample std: n repeats estimate the spread
    return f"{statistics.fmean(values):.4g} ± {spread:.2g} (n={len(values)})"


def group_lines(group: Group) -> list[str]:
    runs = ranked(group.runs)
    varying, constant = varying_keys([run.settings for run in runs]) if runs else ([], {})
    monitors = sorted({run.monitor for run in runs if run.monitor})
    monitor = monitors[0] if len(monitors) == 1 else "monitored metric"
    tests = sorted({key for run in runs for key in run.test})
    title = {"grid": "grid", "search": "search", "agents": "wandb agents' job", "runs": "runs"}[group.kind]
    lines = [f"{group.dir} ({title}, {len(runs)} run{'s' if len(runs) != 1 else ''})"]
    shown = [f"{k}={value_text(v)}" for k, v in constant.items() if not k.startswith(("trainer.", "wandb.", "cka."))]
    if shown and len(runs) > 1:
        lines.append(("fixed: " + ", ".join(shown))[:300])
    headers = ["run", "state", *varying, f"best {monitor} (epoch)", *tests, "epochs", "wall", "GPUs", "GPU-h"]
    rows = []
    for run in runs:
        best, epoch = run.best()
        state = run.state + (f": {run.cause}" if run.cause else "") + (" [damaged: " + "; ".join(run.problems) + "]"
                                                                        if run.problems else "")
        gpus, hours = run.gpus(), run.gpu_hours()
        rows.append([run.name, state, *(value_text(run.settings.get(k)) for k in varying),
                     "–" if best is None else f"{best:.4g} ({epoch})", *(number(run.test.get(k)) for k in tests),
                     str(len(run.epochs)), duration(run.wall_s()), "–" if not gpus else str(gpus),
                     "–" if not hours else f"{hours:.3g}"])
    numeric = {len(varying) + 2 + i for i in range(len(tests) + 5)}
    lines += table(headers, rows, right=numeric)
    for setting, members in repeats(runs, varying):
        described = ", ".join(f"{k}={value_text(v)}" for k, v in setting.items()) or "the same settings"
        bests = [b for run in members if (b := run.best()[0]) is not None]
        summary = [f"best {monitor} {mean_std(bests)}"] + [
            f"{key} {mean_std([run.test[key] for run in members if key in run.test])}" for key in tests]
        lines.append(f"repeats of {described}: " + "; ".join(summary))
    counts = [f"{n} {state}" for state in STATE_ORDER if (n := sum(run.state == state for run in runs))]
    hours = sum(run.gpu_hours() or 0.0 for run in runs)
    wall = sum(run.wall_s() or 0.0 for run in runs)
    lines.append(f"total: {', '.join(counts) or 'no runs'}; GPU-hours {hours:.3g}; wall time {duration(wall)}")
    if command := group.resubmit():
        lines.append(f"resubmit what did not finish: {command}")
    lines += [f"note: {note}" for note in group.notes]
    return lines


def status_lines(groups: list[Group]) -> list[str]:
    lines: list[str] = []
    for group in groups:
        lines += [*group_lines(group), ""]
    return lines[:-1]


def rows_of(groups: list[Group]) -> list[dict[str, Any]]:
    return [{"group": str(group.dir), "kind": group.kind, **as_dict(run)} for group in groups for run in group.runs]


def write_csv(groups: list[Group], path: Path) -> None:
    rows = rows_of(groups)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else "" if v is None else v
                         for k, v in row.items()})
    write_atomic(path, out.getvalue())


def write_markdown(groups: list[Group], path: Path) -> None:
    rows = rows_of(groups)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|")  # noqa: E731
    text = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    text += ["| " + " | ".join(cell(row.get(field)) for field in fields) + " |" for row in rows]
    write_atomic(path, "\n".join(text) + "\n")


def write_plot(groups: list[Group], path: Path, curves: int = 3) -> None:
    """The monitored metric against each varying setting (one panel each), and the learning curves of the best
    runs, from what the runs logged (metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = ranked([run for group in groups for run in group.runs])
    varying = varying_keys([run.settings for run in runs])[0] if runs else []
    numeric = [key for key in varying if all(isinstance(run.settings.get(key), (int, float, type(None)))
                                            for run in runs)]
    panels = len(numeric) + 1
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    monitor = next((run.monitor for run in runs if run.monitor), "metric")
    for axis, key in zip(axes[0], numeric, strict=False):
        points = [(run.settings[key], best) for run in runs if run.settings.get(key) is not None
                  and (best := run.best()[0]) is not None and math.isfinite(best)]
        axis.scatter([p[0] for p in points], [p[1] for p in points])
        axis.set_xlabel(key)
        axis.set_ylabel(f"best {monitor}")
        if points and min(p[0] for p in points) > 0 and max(p[0] for p in points) / min(p[0] for p in points) > 50:
            axis.set_xscale("log")
    curve_axis = axes[0][-1]
    for run in [run for run in runs if run.best()[0] is not None][:curves]:
        series = [(line["epoch"] + 1, line["metrics"][run.monitor]) for line in run.epochs
                  if run.monitor in line.get("metrics", {})]
        curve_axis.plot([s[0] for s in series], [s[1] for s in series], marker="o", label=run.name)
    curve_axis.set_xlabel("epoch")
    curve_axis.set_ylabel(monitor)
    curve_axis.set_title(f"the {min(curves, len(runs))} best runs")
    if curve_axis.lines:
        curve_axis.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    write_atomic(path, buffer.getvalue())


def show(path: Path, csv_file: Path | None = None, markdown: Path | None = None, plot: Path | None = None) -> int:
    """sweep.py --status DIR: prints the table and writes the exports asked for; 1 with one line for a directory
    that holds no runs."""
    from support.results.collect import ResultsError, collect

    try:
        groups = collect(path.resolve())
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(status_lines(groups)))
    for target, writer in ((csv_file, write_csv), (markdown, write_markdown), (plot, write_plot)):
        if target is not None:
            writer(groups, target)
            print(f"written: {target}")
    return 0
