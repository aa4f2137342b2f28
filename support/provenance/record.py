"""What a run ran, in RUN_DIR/provenance.json: written by train.py (rank 0) when a run starts and again when it ends,
one entry per start (a resume or a Slurm requeue adds one), read by evaluate.py and the status table.

    {"attempts": [{"start": ..., "end": ..., "exit": 0, "code": {"hash", "dir", "commit", "dirty", "patch"},
                   "lock": "<sha256[:12] of requirements.lock>", "python": ..., "torch": ..., "lightning": ...,
                   "cuda": ..., "host": ..., "slurm": {"job", "array_job", "array_task", "restarts"},
                   "devices": {"gpus": [...], "driver": ...} or {"cpu": ...}}]}

The code is the frozen copy the job runs (support/provenance/snapshot.py) where there is one; for a plain
`python train.py` it is the working tree: its content hash, commit, dirty flag, and its uncommitted changes saved
beside the record as RUN_DIR/uncommitted-<N>.patch. No environment dump, no credentials: only the Slurm ids named.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

from support import REPO_DIR
from support.atomic import write_atomic
from support.provenance.snapshot import CODE_RECORD, PATCH_FILE, git_state, read_record, tree_hash

PROVENANCE_FILE = "provenance.json"
SLURM_IDS = {"job": "SLURM_JOB_ID", "array_job": "SLURM_ARRAY_JOB_ID", "array_task": "SLURM_ARRAY_TASK_ID",
             "restarts": "SLURM_RESTART_COUNT"}  # SLURM_RESTART_COUNT: how often Slurm requeued the job


def code_hash() -> str:
    """The content hash of the code this process runs: its frozen copy's, else the working tree's (no git calls)."""
    copy = read_record(REPO_DIR)
    return str(copy.get("hash")) if copy is not None else tree_hash(REPO_DIR)


def code_identity(run_dir: Path | None = None, attempt: int = 0) -> dict[str, Any]:
    """The code this process runs: its frozen copy's record, or the working tree's (its patch saved in run_dir)."""
    if (copy := read_record(REPO_DIR)) is not None:
        patch = REPO_DIR / PATCH_FILE if copy.get("patch") else None
        return {"hash": copy.get("hash"), "dir": str(REPO_DIR), "commit": copy.get("commit"),
                "dirty": copy.get("dirty"), "patch": str(patch) if patch else None}
    commit, dirty, patch, _ = git_state(REPO_DIR)
    saved = None
    if patch and run_dir is not None:
        saved = run_dir / f"uncommitted-{attempt}.patch"
        write_atomic(saved, patch)
    return {"hash": tree_hash(REPO_DIR), "dir": None, "commit": commit, "dirty": dirty,
            "patch": str(saved) if saved else None}


def versions() -> dict[str, Any]:
    import pytorch_lightning
    import torch

    lock = REPO_DIR / "requirements.lock"
    return {"lock": hashlib.sha256(lock.read_bytes()).hexdigest()[:12] if lock.is_file() else None,
            "python": platform.python_version(), "torch": torch.__version__, "lightning": pytorch_lightning.__version__,
            "cuda": torch.version.cuda}


def devices() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        try:
            from torch.cuda import get_device_name

            gpus = [get_device_name(i) for i in range(torch.cuda.device_count())]
        except RuntimeError:
            gpus = []
        driver = None
        try:
            import subprocess

            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
        return {"gpus": gpus, "driver": driver}
    return {"cpu": cpu_model(), "cores": os.cpu_count()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read(run_dir: Path) -> dict[str, Any]:
    """The run's record, or an empty one (none yet, or damaged: a new record is started rather than failing)."""
    try:
        record = json.loads((run_dir / PROVENANCE_FILE).read_text())
        return record if isinstance(record.get("attempts"), list) else {"attempts": []}
    except (OSError, ValueError, AttributeError):
        return {"attempts": []}


def record_start(run_dir: Path) -> dict[str, Any]:
    """Adds this start to RUN_DIR/provenance.json; returns its entry."""
    record = read(run_dir)
    entry = {"start": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "end": None, "exit": None,
             "code": code_identity(run_dir, len(record["attempts"])), **versions(), "host": socket.gethostname(),
             "slurm": {key: os.environ[name] for key, name in SLURM_IDS.items() if name in os.environ} or None,
             "devices": devices()}
    record["attempts"].append(entry)
    write_atomic(run_dir / PROVENANCE_FILE, json.dumps(record, indent=1) + "\n")
    return entry


def record_end(run_dir: Path, exit_status: int, reason: str | None = None) -> None:
    """Closes this process's entry: the end time, exit status (0 done, 1 failed, 143 stopped by a signal) and, for a
    failure, its one-line reason (what sweep.py --status shows as the cause)."""
    record = read(run_dir)
    if record["attempts"] and record["attempts"][-1].get("end") is None:
        record["attempts"][-1].update(end=time.strftime("%Y-%m-%dT%H:%M:%S%z"), exit=exit_status, reason=reason)
        write_atomic(run_dir / PROVENANCE_FILE, json.dumps(record, indent=1) + "\n")


def failure_reason(err: BaseException) -> str:
    """One line saying why a run ended with `err`: its own message for the template's one-line errors."""
    if isinstance(err, SystemExit):
        return str(err.code).removeprefix("error: ").splitlines()[0] if isinstance(err.code, str) else \
            f"exit {err.code}"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def exit_status(err: BaseException) -> int:
    """The exit status a run ends with when `err` ends it (what the shell and Slurm then see)."""
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else 1
    return 130 if isinstance(err, KeyboardInterrupt) else 1


def trained_with(run_dir: Path) -> dict[str, Any] | None:
    """The code of the run's latest start, or None for a run without a record (older than this template's v0.3.0)."""
    attempts = read(run_dir)["attempts"]
    return attempts[-1].get("code") if attempts else None


__all__ = ["CODE_RECORD", "PROVENANCE_FILE", "code_hash", "code_identity", "exit_status", "failure_reason", "read",
           "record_end", "record_start", "trained_with"]
