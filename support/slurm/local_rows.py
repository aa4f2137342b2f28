"""slurm_train.py --local: a grid's rows (or a search's workers) as processes of this machine, each running the
directory's job.sbatch (same run directories, markers and records as under Slurm), at most k at a time, one per
visible GPU.

No row outlives the launcher. Each row runs under a guard (this file run as a script, standard library only): the
guard leads the row's own process group, gets SIGTERM when the launcher dies even by SIGKILL (Linux's
PR_SET_PDEATHSIG), adopts the row's orphaned descendants (PR_SET_CHILD_SUBREAPER) and, when told to stop, passes
SIGTERM to the whole group (train.py saves last.ckpt and exits 143) and waits for every member. Before, a row was a
plain `bash job.sbatch` child: the launcher's death left bash's train.py training with parent pid 1, and a later
`--local --resume` failed that row because its run directory was still in use.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36  # <linux/prctl.h>
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_SECONDS = 120.0  # how long a stopped row may take to save its checkpoint before it is killed
# The run directory's one-writer lock (support/run_dir/writer.py, whose constants these are) and its holder.
WRITER_LOCK, WRITER = ".writer.lock", ".writer"


def visible_gpus() -> list[str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


LOCAL_LOCK = ".local.lock"  # held by the slurm_train.py --local running a grid or search directory
# The array task a job script runs outside Slurm (where Slurm sets SLURM_ARRAY_TASK_ID).
LOCAL_TASK_ENV = "LOCAL_ARRAY_TASK"
# The variables job.sbatch read their array index from outside Slurm before LOCAL_TASK_ENV: set too, so a directory
# written by an earlier version resumes here.
TASK_VARIABLE = {"row": "GRID_ROW", "worker": "SEARCH_WORKER"}


def run_local(grid_dir: Path, indices: list[int], k: int, label: str = "row") -> int:
    """The rows (label "row"), search workers ("worker") or packed tasks of either ("task") as processes here running
    job.sbatch: at most k at a time on CPU, one per visible GPU, pinned by CUDA_VISIBLE_DEVICES; without SLURM_*, so
    no srun step (it gets all GPUs). Each writes <label>-<i>.out in grid_dir. SIGTERM, SIGINT or SIGHUP stop every
    row (each saves its last.ckpt), start no more, and end with 128 + the signal."""
    gpus = visible_gpus()
    slots: list[str | None] = list(gpus[:k]) if gpus else [None] * k
    pending, running, failed = list(indices), {}, []  # running: guard process -> (row, slot)
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if not stopped:
            print(f"stopping: {signal.Signals(signum).name}; each running {label} saves its last.ckpt", flush=True)
        stopped.append(signum)
        for proc in running:
            proc.send_signal(signal.SIGTERM)

    handlers = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        while running or (pending and not stopped):
            while pending and not stopped and len(running) < len(slots):
                slot = next(s for s in range(len(slots)) if s not in {sl for _, sl in running.values()})
                row = pending.pop(0)
                env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
                env[LOCAL_TASK_ENV] = str(row)
                if label in TASK_VARIABLE:
                    env[TASK_VARIABLE[label]] = str(row)
                if slots[slot] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = str(slots[slot])
                with open(grid_dir / f"{label}-{row}.out", "a") as log:
                    proc = subprocess.Popen(guarded(["bash", str(grid_dir / "job.sbatch")]), stdout=log,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
                running[proc] = (row, slot)
                if stopped:  # the signal came while it started
                    proc.send_signal(signal.SIGTERM)
                print(f"{label} {row} started (log {grid_dir}/{label}-{row}.out)", flush=True)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                row, _ = running.pop(proc)
                missing = unmarked_rows(grid_dir, row, label) if proc.returncode == 0 else []
                ended = "finished" if proc.returncode == 0 and not missing else \
                    f"FAILED (exit {proc.returncode})" if proc.returncode else \
                    f"FAILED (exit 0, but no done marker for row(s) {', '.join(map(str, missing))})"
                print(f"{label} {row} {ended}", flush=True)
                if ended != "finished":
                    failed.append(row)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if stopped:
        print(f"stopped by {signal.Signals(stopped[0]).name}: resume with python slurm_train.py --local --resume "
              f"{grid_dir}", file=sys.stderr)
        return 128 + stopped[0]
    if failed:
        print(f"{len(failed)} {label}(s) failed: {', '.join(map(str, sorted(failed)))}; see their {label}-<i>.out. "
              f"Rerun them: python slurm_train.py --local --resume {grid_dir}", file=sys.stderr)
    return 1 if failed else 0


def unmarked_rows(grid_dir: Path, index: int, label: str) -> list[int]:
    """The grid rows of array index `index` (a row, or a packed task's rows) without their done marker: what Slurm's
    resume counts as finished, so --local says "finished" only with it (an emptied job.sbatch exited 0 and was
    reported finished, nothing having run). A search's workers have no markers: their records say."""
    if label not in ("row", "task"):
        return []
    from support.slurm.resume import load_grid  # here: the guard runs this file as a script, standard library only

    grid = load_grid(grid_dir)
    per_task = grid["runs_per_gpu"] if label == "task" else 1
    rows = range(index * per_task, min((index + 1) * per_task, len(grid["rows"])))
    return [r for r in rows if not (grid_dir / f"row-{r}" / "done").exists()]


def guarded(command: list[str]) -> list[str]:
    """`command` run under this file's guard, tied to this process."""
    return [sys.executable, str(Path(__file__).resolve()), "--guard", str(os.getpid()), *command]


def guard(parent: int, command: list[str]) -> int:
    """Runs `command` in this process's group (the launcher made it a session of its own) and returns its exit
    status; on SIGTERM/SIGINT/SIGHUP, or when `parent` dies, passes SIGTERM to the whole group and returns 128 + the
    signal once every member has ended (SIGKILL for those still there after GRACE_SECONDS)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # the row's orphans become ours: waited for, never left behind
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if not stopped:  # the group's SIGTERM below reaches this process too: acted on once
            stopped.append(signum)
            os.killpg(os.getpgrp(), signal.SIGTERM)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent or stopped:  # the launcher died, or said stop, before the row started
        return 128 + signal.SIGTERM
    # Kept referenced: a Popen collected at once reaps a child that has already ended (its __del__ polls), and the
    # loop below then never saw its status: an emptied job.sbatch ended "exit 1", or by timing "finished".
    process = subprocess.Popen(command)
    child = process.pid
    if stopped:  # said while the row was being started: it may have missed the group's signal
        os.killpg(os.getpgrp(), signal.SIGTERM)
    code: int | None = None
    deadline = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # every descendant has ended
            break
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            if not stopped:  # the row ended: what it started (a logger's service, say) ends with it
                stop(0, None)
        if pid == 0:
            if stopped and deadline is None:
                deadline = time.monotonic() + GRACE_SECONDS
            if deadline is not None and time.monotonic() > deadline:
                os.killpg(os.getpgrp(), signal.SIGKILL)  # also this process: the row is over either way
            time.sleep(0.1)
    if stopped and stopped[0]:
        return 128 + stopped[0]
    return code if code is not None else 1


def running_locally(grid_dir: Path) -> bool:
    """Whether a slurm_train.py --local holds the directory's LOCAL_LOCK (the OS releases it when that ends): a Slurm
    --resume beside it resubmitted every row it was running."""
    from filelock import FileLock, Timeout

    if not (grid_dir / LOCAL_LOCK).exists():
        return False
    lock = FileLock(str(grid_dir / LOCAL_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def stop_orphans(grid_dir: Path) -> str | None:
    """Before a --local resume: stops the runs of this directory that an earlier launcher left training on this
    machine (a run directory whose one-writer lock is still held, by a process here), and waits until they have
    saved their checkpoint and ended, so their rows resume from it instead of failing as "in use". Returns why it
    cannot (a run held from another machine), else None."""
    from filelock import FileLock, Timeout

    host, pids = socket.gethostname(), []
    # Rows' scripts and search workers of this directory: with no launcher (the caller holds .local.lock), orphans.
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if int(proc.name) != os.getpid() and (str(grid_dir / "job.sbatch") in args or (
                "support.search.worker" in args and str(grid_dir) in args)):
            print(f"stopping pid {proc.name} ({' '.join(args).strip()[:120]}) left running by an earlier launcher",
                  flush=True)
            os.kill(int(proc.name), signal.SIGTERM)
            pids.append(int(proc.name))
    for owner in sorted(grid_dir.glob(f"*/{WRITER}")):
        lock = FileLock(str(owner.parent / WRITER_LOCK), blocking=False)
        try:
            lock.acquire()
            lock.release()
            continue  # a stale note: its writer is gone
        except Timeout:
            pass
        match = re.match(r"pid (\d+) on (\S+)", owner.read_text() if owner.is_file() else "")
        if not match or match.group(2) != host:
            return (f"{owner.parent} is in use by a run on another machine ({match and match.group(2)}): wait for "
                    "it or stop it, then resume")
        pid = int(match.group(1))
        print(f"{owner.parent.name}: stopping train.py (pid {pid}) left running by an earlier launcher; it saves "
              "its last.ckpt, then the row resumes from it", flush=True)
        os.kill(pid, signal.SIGTERM)
        pids.append(pid)
    for pid in pids:
        deadline = time.monotonic() + GRACE_SECONDS
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.2)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    return None


if __name__ == "__main__" and sys.argv[1:2] == ["--guard"]:
    sys.exit(guard(int(sys.argv[2]), sys.argv[3:]))
