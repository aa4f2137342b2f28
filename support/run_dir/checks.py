"""Run directories and Slurm jobs: how runs and grids are named, and whether a job's tasks fit the Trainer.

Light on purpose (no torch, no Lightning): slurm_train.py uses it before it loads anything heavy.
"""

from __future__ import annotations

import os
import re
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from support.errors import SettingError


def slurm_batch_job() -> str | None:
    """'<array job>_<task>' or '<job>' inside a Slurm batch job (not an interactive `srun --pty`), else None: stable
    across requeues of the same job, so a requeued task finds its own run directory again."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # as Lightning's SLURMEnvironment
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else job


def timestamped_name(prefix: str = "") -> str:
    """<prefix><time>-<random>: sorts by start time, and two runs started in the same second never collide."""
    return prefix + time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def default_run_name() -> str:
    sweep, sweep_run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and sweep_run:  # started by a wandb sweep agent: one directory per sweep run, found again on resume
        return f"sweep-{sweep}-{sweep_run}"
    if job := slurm_batch_job():
        return f"slurm-{job}"
    return timestamped_name()


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of a run directory: made once and kept in the directory (SaveConfigAndLog writes it when
    training starts), so a resumed or requeued run continues the same wandb run, while two clusters' job 123
    never share one. A sweep agent's run id (WANDB_RUN_ID) wins: the sweep knows its run by that id."""
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    id_file = run_dir / "wandb_id"
    if id_file.exists():
        return id_file.read_text().strip()
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[:50] + "-" + uuid.uuid4().hex[:8]


def tasks_devices_mismatch(tasks: int, devices: int, nodes: int) -> str | None:
    """Why Slurm's tasks do not fit the Trainer's devices x nodes (Lightning needs one task per device, or each task
    trains alone / DDP hangs), as one line; None when they fit. The one copy of this check: train.py runs it on the
    Trainer, slurm_train.py on every row before it submits."""
    if tasks == devices * nodes:
        return None
    return (f"Slurm runs {tasks} task(s) but the Trainer runs {devices} device(s) x {nodes} node(s); Lightning needs "
            f"one task per device: set --ntasks-per-node={devices} --nodes={nodes}, or --trainer.devices / "
            f"--trainer.num_nodes to match the job")


def slurm_job_mismatch(devices: int, nodes: int) -> str | None:
    """Why this Slurm job's nodes and tasks do not fit the Trainer's devices x nodes, as one line; None when they fit.
    Lightning would otherwise train each node alone, or hang at its first collective until the time limit."""
    job_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    if job_nodes != nodes:
        return (f"Slurm gave the job {job_nodes} node(s) (--nodes={job_nodes}) but the Trainer runs "
                f"--trainer.num_nodes={nodes}: make them equal (#SBATCH --nodes or --trainer.num_nodes)")
    return tasks_devices_mismatch(int(os.environ.get("SLURM_NTASKS", 1)), devices, nodes)


def check_run_dir_and_checkpoint(run_dir: Path, ckpt_path: str | None, writes: bool = True) -> None:
    """Refuses, before anything is written, a run directory that is a file or already holds another run, and a
    --ckpt_path that cannot be resumed from: a path that is no checkpoint (missing, truncated, another kind of file),
    or `last` where the run directory has none (a mistyped --run_dir would otherwise train from scratch with only a
    warning). `writes=False` (evaluate.py): the directory is only read, so it need not be writable or new."""
    if exists(run_dir) and not run_dir.is_dir():
        raise SettingError(f"--run_dir {run_dir} is a file: give a directory (a new one starts a new run)")
    existing = next(path for path in [run_dir, *run_dir.parents] if exists(path))  # where mkdir would start
    longest = os.pathconf(existing, "PC_NAME_MAX") if existing.is_dir() else 255
    if too_long := [part for part in run_dir.relative_to(existing).parts if len(part.encode()) > longest]:
        raise SettingError(f"--run_dir: the name {too_long[0][:40]}... is {len(too_long[0].encode())} bytes, over the "
                           f"{longest} that {existing}'s filesystem allows: give a shorter one")
    if writes and (not existing.is_dir() or not os.access(existing, os.W_OK)):
        raise SettingError(f"--run_dir {run_dir}: {existing} is not a directory this user can write; give another")
    if writes and ckpt_path is None:
        require_no_other_run(run_dir)
    if ckpt_path == "last":
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise SettingError(f"--ckpt_path last: {run_dir}/checkpoints has no last.ckpt; check --run_dir, or leave "
                               "--ckpt_path out to start afresh")
    elif ckpt_path not in (None, "hpc", "best", "registry"):
        require_checkpoint(ckpt_path, "--ckpt_path ", "a .ckpt file or `last`")


def exists(path: Path) -> bool:
    """Path.exists, but False for a name over the filesystem's limit: stat raised ENAMETOOLONG there (a traceback for
    a 300-byte --run_dir whose parent exists), where a missing parent had said ENOENT first."""
    try:
        return path.exists()
    except OSError:
        return False


def require_no_other_run(run_dir: Path) -> None:
    """A run directory holds one run: a new run (no --ckpt_path) may not start where another one saved checkpoints,
    unless Lightning resumes it itself (a Slurm requeue's hpc_ckpt_N.ckpt). Before, the second run trained with only
    Lightning's "Checkpoint directory ... exists and is not empty": two models' checkpoints under one wandb id."""
    if not any((run_dir / "checkpoints").glob("*.ckpt")) or any(run_dir.glob("hpc_ckpt_*.ckpt")):
        return
    why = ""
    if (job := slurm_batch_job()) and run_dir.name == f"slurm-{job}":
        why = (f" (its name comes from SLURM_JOB_ID={os.environ['SLURM_JOB_ID']}: outside that Slurm job, unset "
               "SLURM_JOB_ID)")
    elif os.environ.get("WANDB_SWEEP_ID") and run_dir.name.startswith("sweep-"):
        why = " (its name comes from WANDB_SWEEP_ID and WANDB_RUN_ID: outside that sweep run, unset them)"
    raise SettingError(f"--run_dir {run_dir} already holds a trained run{why}: continue it with --ckpt_path last, "
                       "or give another --run_dir")


def checkpoint_file(run_dir: Path, ckpt_path: str | None) -> Path | None:
    """The file a fit resumes from: the one --ckpt_path names (`last`: the run's last.ckpt), or without it, under
    Slurm, the newest hpc_ckpt_N.ckpt of the run directory, which Lightning resumes by itself (a stale directory of an
    earlier job of the same SLURM_JOB_ID held another model's: a state_dict traceback); else None."""
    if ckpt_path == "last":
        return run_dir / "checkpoints" / "last.ckpt"
    if ckpt_path in (None, "hpc") and "SLURM_NTASKS" in os.environ and \
            os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):  # as Lightning's SLURMEnvironment
        numbered = [(int(m.group(1)), path) for path in run_dir.glob("hpc_ckpt_*.ckpt")
                    if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name))]
        return max(numbered)[1] if numbered else None
    return None if ckpt_path in (None, "hpc", "best", "registry") else Path(ckpt_path).expanduser()


def require_checkpoint(path: str | Path, what: str = "", instead: str = "a .ckpt that train.py saved") -> None:
    """Refuses a path that is no checkpoint, naming it (`what` + path): missing, truncated or another kind of file,
    told apart without unpickling anything (torch.save writes a zip; a truncated one has lost its directory)."""
    if Path(path).expanduser().is_dir():
        raise SettingError(f"{what}{path} is a directory: give a .ckpt file in it ({path}/checkpoints/last.ckpt, say), "
                           f"or --run_dir {path} --ckpt_path last")
    if not Path(path).expanduser().is_file():
        raise SettingError(f"{what}{path} does not exist: give {instead}")
    if not zipfile.is_zipfile(Path(path).expanduser()):
        raise SettingError(f"{what}{path} is not a checkpoint (truncated, or another kind of file): give {instead}")
    if not torch_archive(Path(path).expanduser()):  # a NumPy .npz, a .zip: passed, then a 31-line traceback
        raise SettingError(f"{what}{path} is a zip archive but not a checkpoint (no data.pkl in it: a NumPy .npz, "
                           f"say): give {instead}")


def torch_archive(path: Path) -> bool:
    """Whether a zip file is torch.save's: one top folder holding data.pkl (read from the zip's directory only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.count("/") == 1 and name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def require_training(trainer: Any) -> None:
    """Refuses settings that train nothing (--trainer.max_epochs=0, max_steps=0, limit_train_batches=0): the run would
    test its untrained model and report that as its result, with exit status 0."""
    for option in ("max_epochs", "max_steps", "limit_train_batches"):
        if getattr(trainer, option, None) == 0:
            raise SettingError(f"--trainer.{option}=0 trains nothing: the test at the end would report an untrained "
                               "model as the result; give at least 1 (to test a trained run: python evaluate.py "
                               "RUN_DIR)")
