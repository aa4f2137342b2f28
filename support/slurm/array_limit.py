"""The largest job array a cluster accepts (Slurm's MaxArraySize), checked before anything is written: sbatch
refuses an array with an index of MaxArraySize or more (`Invalid job array specification`, issue 35: a 1,600-row
grid on a cluster whose limit is 1001), and a refusal then, after the rows were checked and the grid written, says
nothing of the limit. Light on purpose (no torch).

    max_array_size(cluster)              # clusters.toml's max_array_size, else `scontrol show config`'s, else None
    array_problem(plan, tasks, what)     # the one line when `tasks` array indices are too many; None else
"""

from __future__ import annotations

import re
import shutil
import subprocess

from support.clusters.plan import JobPlan
from support.clusters.profiles import Cluster

SCONTROL_SECONDS = 10  # a controller that does not answer in this time is taken as unknown, not waited for


def scontrol_max_array_size() -> int | None:
    """MaxArraySize of the Slurm this machine talks to, or None where there is none or it does not answer."""
    if shutil.which("scontrol") is None:
        return None
    try:
        result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                                timeout=SCONTROL_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", result.stdout, re.M)
    return int(match.group(1)) if result.returncode == 0 and match else None


def max_array_size(cluster: Cluster) -> tuple[int, str] | None:
    """(the limit, where it comes from): the cluster's profile first (a dry run from a laptop has no scontrol), else
    the Slurm here; None when neither says."""
    if cluster.max_array_size:
        return cluster.max_array_size, f"clusters.toml [clusters.{cluster.key}] max_array_size"
    if (found := scontrol_max_array_size()) is not None:
        return found, "`scontrol show config` here"
    return None


def array_problem(plan: JobPlan, tasks: int, rows: int, runs_per_gpu: int = 1) -> str | None:
    """Why an array of `tasks` tasks (indices 0 to tasks - 1, holding `rows` rows) cannot be submitted to the plan's
    cluster, with the ways to make it fit; None when it fits or the limit is unknown."""
    limit = max_array_size(plan.cluster)
    if limit is None or tasks <= limit[0]:
        return None
    most, source = limit
    packed = -(-rows // most)  # rows per task that bring the tasks within the limit
    fixes = [f"--runs-per-gpu {packed} ({-(-rows // packed)} tasks of {packed} rows run at once on each GPU)"
             if packed > runs_per_gpu else "",
             f"--sample {most * runs_per_gpu} (random rows of the grid)",
             f"sweeps of {most * runs_per_gpu} rows or fewer, one submission each"]
    profile = source.startswith("clusters.toml")
    where = plan.cluster.name if profile else "this Slurm"
    return (f"{tasks} array tasks (indices 0-{tasks - 1}), but {where} takes arrays of at most {most} (MaxArraySize, "
            f"from {source}; sbatch refuses the rest): use " + ", or ".join(f for f in fixes if f)
            + ("; if the cluster allows more, correct max_array_size there" if profile else ""))
