"""What `slurm_train.py --resume DIR` reads from a grid or search directory before it resubmits anything: grid.json,
checked (a damaged one is one line, not a traceback), the rows without a done marker, and the directory the job
script was written for, rewritten to the directory as it is now when it was moved or copied."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from support.atomic import write_atomic
from support.errors import LaunchError
from support.slurm.jobs import control_character_problem, log_path_problem

GRID_FILE = "grid.json"
# The line both job scripts (a grid's, a search's) carry: how to resume them, naming the directory they were written
# for (support/slurm/scripts.py, support/search/launch.py).
RESUME_LINE = re.compile(r"^#   python slurm_train\.py --resume (.+?)   # ", re.M)


def load_grid(grid_dir: Path) -> dict[str, Any]:
    """grid.json, checked: a mapping whose "rows" is a list of rows, each with its "argv" (a list of strings), and a
    whole runs_per_gpu of 1 or more. A truncated or edited one raised KeyError, TypeError or JSONDecodeError."""
    path = grid_dir / GRID_FILE
    try:
        grid = json.loads(path.read_text())
        problem = _grid_problem(grid)
    except UnicodeDecodeError:
        problem = "it is not UTF-8 text"
    except ValueError as err:
        problem = f"it is not JSON: {err}"
    except OSError as err:
        problem = err.strerror or str(err)
    if problem:
        raise LaunchError(f"{path} is damaged ({problem}): slurm_train.py writes it once with the grid; restore it "
                          "from a copy, or start the grid again with the sweep it was made from")
    return {**grid, "runs_per_gpu": grid.get("runs_per_gpu", 1)}  # a grid written before packing: 1


def _grid_problem(grid: Any) -> str | None:
    if not isinstance(grid, dict):
        return f"a JSON {type(grid).__name__}, not the grid's mapping"
    rows, per_gpu = grid.get("rows"), grid.get("runs_per_gpu", 1)
    if not isinstance(rows, list) or not rows:
        return '"rows" is missing or not a list of rows' if not isinstance(rows, list) else '"rows" is empty'
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("argv"), list) or \
                not all(isinstance(arg, str) for arg in row["argv"]):
            return f'row {i} has no "argv" list of strings'
    if isinstance(per_gpu, bool) or not isinstance(per_gpu, int) or per_gpu < 1:
        return f'"runs_per_gpu" is {per_gpu!r}, not a whole number of 1 or more'
    return None


def unfinished(grid_dir: Path) -> list[int]:
    """The rows of a grid without their done marker (the only sign of a finished row, under Slurm and --local)."""
    rows = load_grid(grid_dir)["rows"]
    return [i for i in range(len(rows)) if not (grid_dir / f"row-{i}" / "done").exists()]


def written_for(script: Path) -> Path | None:
    """The directory a job script was written for (its --resume line), or None for a script without one."""
    match = RESUME_LINE.search(script.read_text(errors="replace"))
    if not match:
        return None
    try:
        words = shlex.split(match.group(1))
    except ValueError:
        return None
    return Path(words[0]) if len(words) == 1 else None


def relocate(job_dir: Path, local: bool, dry_run: bool) -> None:
    """A grid or search directory moved or copied since its job script was written resumes where it is now: every
    path of the old directory in job.sbatch becomes this one (measured before: a moved grid's rows all failed and
    the printed --resume looped; a copied one trained the original's rows and left the copy's unfinished). The
    original is never touched. Nothing to do for a directory where it was written."""
    script = job_dir / "job.sbatch"
    old = written_for(script)
    if old is None or old == job_dir:
        return
    problem = control_character_problem(str(job_dir)) if local else log_path_problem(str(job_dir))
    if problem:
        raise LaunchError(f"{job_dir} was moved or copied from {old}, and {problem}")
    print(f"note: {job_dir} was written as {old} (moved or copied since): its job.sbatch now names {job_dir}; "
          f"{old} is not touched", file=sys.stderr)
    if dry_run:
        return
    quoted_old, quoted_new = shlex.quote(str(old)), shlex.quote(str(job_dir))
    lines = [line.replace(str(old), str(job_dir)) if line.startswith("#SBATCH") else
             line.replace(quoted_old, quoted_new) for line in script.read_text().splitlines(keepends=True)]
    write_atomic(script, "".join(lines))
