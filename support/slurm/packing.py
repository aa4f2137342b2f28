"""Several small runs at once on one GPU (slurm_train.py --runs-per-gpu K): which rows an array task runs, and how a
run packed with others says that it did not fit. Light on purpose (no torch): slurm_train.py uses it first.

A grid of n rows packed K per GPU is ceil(n / K) array tasks; task t runs rows t*K .. t*K+K-1 at once, each in its
own run directory with its own log (row-<i>.out), done marker and resume; the task's own log is task-<t>.out. A
search packed K per GPU runs K workers per task (worker t*K + j). Each packed run is its own `srun --overlap` step,
so Slurm signals each one (the requeue's SIGUSR1, a time limit's SIGTERM) and a run that dies takes only itself.
"""

from __future__ import annotations

import os
import socket

# Set by the job script for every packed run: how many runs share the GPU(s), so an out-of-memory error says so.
RUNS_PER_GPU_ENV = "MLMODELDEV_RUNS_PER_GPU"


def task_count(rows: int, runs_per_gpu: int) -> int:
    return -(-rows // runs_per_gpu)


def tasks_of(rows: list[int], runs_per_gpu: int) -> list[int]:
    """The array tasks that hold these rows (a resume resubmits those; their finished rows are skipped)."""
    return sorted({row // runs_per_gpu for row in rows})


def packed() -> int:
    """How many runs this run shares its GPU(s) with, itself included (1: not packed)."""
    try:
        return max(1, int(os.environ.get(RUNS_PER_GPU_ENV, "1")))
    except ValueError:
        return 1


def free_port() -> int:
    """A free TCP port for one packed run's DDP rendezvous: under Slurm, Lightning derives MASTER_PORT from the job
    id, the same for every run of the task, so the second packed DDP run would fail to bind it."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def out_of_memory_line(err: BaseException) -> str:
    """One line for CUDA running out of memory: packed runs are told to lower --runs-per-gpu, not retried."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")[:160]
    k = packed()
    if k > 1:
        return (f"error: CUDA out of memory while packed {k} per GPU ({first}): lower --runs-per-gpu (slurm_train.py), "
                "or the batch size or model of each run")
    return f"error: CUDA out of memory ({first}): lower --data.batch_size or the model's size"
