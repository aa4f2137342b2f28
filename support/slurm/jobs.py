"""Slurm job arrays as slurm_train.py writes and submits them: the #SBATCH header, the --array value, one sbatch
call, and which of a directory's jobs Slurm still lists. Light on purpose (no torch): used before anything heavy."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from support.clusters.profiles import time_seconds
from support.errors import LaunchError

# sbatch reads a #SBATCH line itself, without a shell: no quoting, a value ends at whitespace, and a newline ends the
# header. Measured: a newline in --account became a shell line of job.sbatch, the job ran it, and Slurm ignored every
# later #SBATCH line (no time limit, the log in the working directory, no requeue). So a value holds only what
# partition, account, memory, time, GPU type and job names are made of; anything else is refused in one line.
SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:=+@/\[\]-]+")
SBATCH_VALUE_SOURCES = {
    "job_name": "--job-name", "partition": "--partition (or a partition of clusters.toml)",
    "account": "--account (or clusters.toml's default_account)", "mem": "--mem (or the cluster's mem in clusters.toml)",
    "gpu_type": "--gpu-type (or a gres type of clusters.toml)",
    "time": "--time (or the partition's max_time in clusters.toml)"}


def sbatch_value_problem(key: str, value: object) -> str | None:
    """Why `value` cannot be written as the #SBATCH value of resource `key` (SBATCH_VALUE_SOURCES), or None."""
    text = str(value)
    if SBATCH_VALUE.fullmatch(text):
        return None
    bad = next((c for c in text if not SBATCH_VALUE.fullmatch(c)), "")
    why = ("it is empty" if not text else
           "a newline ends the job's #SBATCH header and runs the rest as a shell line" if bad in ("\n", "\r") else
           f"{bad!r} is no character of a Slurm name, size or time")
    return (f"{SBATCH_VALUE_SOURCES.get(key, key)} {text!r} cannot be a #SBATCH value ({why}): give letters, numerals "
            "and . _ - : , = + @ / [ ] only")


def check_sbatch_values(res: dict[str, Any], name: str | None = None) -> None:
    """LaunchError (one line) for the first resource, or the job name, that cannot be a #SBATCH value (an empty one
    is not written: the header leaves it out, and a job name falls back to the default)."""
    given = {"job_name": name, **{key: res.get(key) for key in SBATCH_VALUE_SOURCES if key != "job_name"}}
    for key, value in given.items():
        if value not in (None, "") and (problem := sbatch_value_problem(key, value)):
            raise LaunchError(problem)


def log_path_problem(path: str) -> str | None:
    """Why `path` cannot be a #SBATCH --output path (whitespace ends the value, % is Slurm's pattern), or None."""
    if any(c.isspace() or c == "%" or ord(c) < 32 or ord(c) == 127 for c in path):
        return (f"{path!r}: a path with spaces (or other whitespace), % or control characters cannot be a Slurm log "
                "path; use --runs-dir")
    return None


def control_character_problem(path: str) -> str | None:
    """Why `path` cannot be named in a job script's lines at all (a newline ends a comment line), or None."""
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return f"{path!r}: a path with a newline or other control character cannot go into a job script; use --runs-dir"
    return None


def sbatch_header(name: str, array: str | None, comment: str, res: dict[str, Any], log: str) -> list[str]:
    """The #SBATCH lines of a job (an array, unless `array` is None): exactly the resources in `res` (a cluster
    profile's: support/clusters/plan.py), Slurm's requeue signal, one log per array task."""
    def line(option: str, comment: str = "") -> str:
        return f"#SBATCH {option:<32}{'  # ' + comment if comment else ''}".rstrip()

    check_sbatch_values(res, name)
    if problem := control_character_problem(log):  # whitespace and %: refused for Slurm where the directory is made
        raise LaunchError(problem)
    gpus, gpu_type = res["gpus_per_node"], res.get("gpu_type")
    header = [line(f"--job-name={name}")] + ([line(f"--array={array}", comment)] if array else [])
    header += [line(f"--partition={res['partition']}")] if res.get("partition") else []
    header += [line(f"--account={res['account']}")] if res.get("account") else []
    header += [line(f"--nodes={res['nodes']}"),
               line(f"--ntasks-per-node={res['ntasks_per_node']}", "= the Trainer's devices: one task per GPU")]
    if gpus and res.get("gpu_request") == "gres":
        header.append(line(f"--gres=gpu:{gpu_type + ':' if gpu_type else ''}{gpus}"))
    elif gpus:
        header.append(line(f"--gpus-per-node={gpus}"))
    if res.get("cpus_per_task"):
        header.append(line(f"--cpus-per-task={res['cpus_per_task']}", "data loading workers + the main process"))
    header += [line(f"--mem={res['mem']}", "memory per node")] if res.get("mem") else []
    margin = requeue_margin(res["time"])
    return header + [line(f"--time={res['time']}"),
                     line(f"--signal=SIGUSR1@{margin}", f"to train.py {margin} s before the limit: Lightning "
                                                         "checkpoints, requeues"),
                     line("--requeue"), line("--open-mode=append", "a requeued task appends to its log"),
                     line(f"--output={log}", "one log per array task")]


def requeue_margin(time: str) -> int:
    """Seconds before the time limit at which Slurm sends SIGUSR1: 90, or a quarter of a limit under 6 minutes. Slurm
    sends a signal due before the job starts at once: a 1-minute job with @90 was requeued as soon as it started."""
    seconds = time_seconds(time) or 0
    return 90 if seconds >= 360 or seconds == 0 else max(5, seconds // 4)


def array_spec(indices: list[int], k: int) -> str:
    """--array value: consecutive indices as ranges (0-80%4, 3,5,7%2, 0-2,9%2)."""
    parts, start = [], None
    for i, index in enumerate(indices):
        start = index if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return f"{','.join(parts)}%{k}"


def active_jobs(grid_dir: Path) -> list[str]:
    """Jobs this grid submitted that Slurm still lists (a resume beside them would run rows twice)."""
    jobs_file = grid_dir / "jobs.txt"
    if not jobs_file.exists() or shutil.which("squeue") is None:
        return []
    # All queued jobs' array ids, filtered here: `squeue -j` fails outright once one of the ids is purged.
    out = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True)
    return sorted(set(jobs_file.read_text().split()) & set(out.stdout.split()))


def submit(grid_dir: Path, indices: list[int], k: int, command: str = "sbatch") -> str:
    """One submission (sbatch, or a site's wrapper such as Bede's ghbatch) for all the rows; returns the job id."""
    result = subprocess.run([command, "--parsable", f"--array={array_spec(indices, k)}", str(grid_dir / "job.sbatch")],
                            capture_output=True, text=True)
    job = re.search(r"\d+", result.stdout)  # --parsable prints "123" or "123;cluster"; a wrapper may say more
    if result.returncode != 0 or job is None:
        raise LaunchError(f"{command} failed: {' '.join((result.stderr or result.stdout).split())}")
    with open(grid_dir / "jobs.txt", "a") as f:
        f.write(job.group() + "\n")
    return job.group()


def written_concurrency(script: Path) -> int | None:
    """How many array tasks at once a job.sbatch was written for (--array=0-9%4: 4; a search's --array=0-3: its 4
    workers), so a resume keeps the directory's own; None when the script does not say."""
    match = re.search(r"^#SBATCH --array=(\d+)-(\d+)(?:%(\d+))?", script.read_text() if script.is_file() else "", re.M)
    if not match:
        return None
    first, last, throttle = match.groups()
    return int(throttle) if throttle else int(last) - int(first) + 1


def unwritable(runs_dir: Path, err: OSError) -> str:
    """One line for a runs directory that cannot take a new grid, search or agents' directory (read-only, full, over
    quota): the path that failed, why, and the free space of its disk. Before: a 12-21-line traceback."""
    place = Path(err.filename) if err.filename else runs_dir.resolve()
    existing = next((p for p in [place, *place.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    return (f"cannot write {place} ({err.strerror or err}; {free / 2**20:.1f} MB free on its disk): give --runs-dir a "
            "writable directory with room (or free space); nothing was started")
