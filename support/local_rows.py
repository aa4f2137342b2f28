"""slurm_train.py --local: a grid's rows (or a search's workers) as processes of this machine, each running the
directory's job.sbatch (same run directories, markers and records as under Slurm), at most k at a time, one per
visible GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def visible_gpus() -> list[str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# The variable job.sbatch reads its array index from when it runs outside Slurm.
TASK_VARIABLE = {"row": "GRID_ROW", "worker": "SEARCH_WORKER"}


def run_local(grid_dir: Path, indices: list[int], k: int, label: str = "row") -> int:
    """The rows (label "row") or search workers ("worker") as processes here running job.sbatch: at most k at a time
    on CPU, one per visible GPU, pinned by CUDA_VISIBLE_DEVICES; without SLURM_*, so no srun step (it gets all GPUs).
    Each writes <label>-<i>.out in grid_dir."""
    gpus = visible_gpus()
    slots: list[str | None] = list(gpus[:k]) if gpus else [None] * k
    pending, running, failed = list(indices), {}, []  # running: process -> (row, slot)
    while pending or running:
        while pending and len(running) < len(slots):
            slot = next(s for s in range(len(slots)) if s not in {sl for _, sl in running.values()})
            row = pending.pop(0)
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
            env[TASK_VARIABLE[label]] = str(row)
            if slots[slot] is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(slots[slot])
            with open(grid_dir / f"{label}-{row}.out", "a") as log:
                proc = subprocess.Popen(["bash", str(grid_dir / "job.sbatch")], stdout=log, stderr=subprocess.STDOUT,
                                        env=env)
            running[proc] = (row, slot)
            print(f"{label} {row} started (log {grid_dir}/{label}-{row}.out)", flush=True)
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            row, _ = running.pop(proc)
            ended = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"{label} {row} {ended}", flush=True)
            if proc.returncode != 0:
                failed.append(row)
    if failed:
        print(f"{len(failed)} {label}(s) failed: {', '.join(map(str, sorted(failed)))}; see their {label}-<i>.out. "
              f"Rerun them: python slurm_train.py --local --resume {grid_dir}", file=sys.stderr)
    return 1 if failed else 0
