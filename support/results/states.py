"""Each run's state and, for one that did not finish, one short cause: from what train.py recorded (provenance.json:
each start's exit status and the one-line reason of a failure), the end of the run's log, and on Slurm what `sacct`
and `squeue` answer (each asked once per table, with a short timeout: a login node's Slurm can be slow or absent,
and the table then prints from the files alone and says so).

    done                 finished (train.py exited 0); "requeued N×" when Slurm restarted it on the way
    stopped early        hyperband stopped it (a search's), a result like any finished run
    running / queued     Slurm says so (or, off Slurm, the run's writer process is alive on this host)
    preempted            stopped by a signal (SIGTERM, a requeue) with its checkpoint saved; --resume continues it
    stopped for a NaN    the loss or the monitored metric became NaN or infinite
    failed               with its cause: out of GPU memory, time limit, node failure, cancelled, no environment for
                         the node, out of CPU memory, killed, or the error's last line
    not started          a row no task has run yet
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from support.results.files import Run

SLURM_TIMEOUT_S = 5.0
# sacct's state -> the cause it means (the first word: "CANCELLED by 0")
SACCT_CAUSES = {"TIMEOUT": "time limit", "CANCELLED": "cancelled", "NODE_FAIL": "node failure",
                "OUT_OF_MEMORY": "out of CPU memory", "PREEMPTED": "preempted", "BOOT_FAIL": "node failure",
                "DEADLINE": "time limit"}
# Lines of a run's log (or of train.py's recorded reason) -> the cause they mean, first match wins.
LOG_CAUSES = [
    (re.compile(r"CUDA out of memory|OutOfMemoryError|out of GPU memory", re.I), "out of GPU memory"),
    (re.compile(r"DUE TO TIME LIMIT"), "time limit"),
    (re.compile(r"DUE TO NODE FAILURE"), "node failure"),
    (re.compile(r"DUE TO PREEMPTION"), "preempted"),
    (re.compile(r"CANCELLED AT"), "cancelled"),
    (re.compile(r"no environment for"), "no environment for the node"),
    (re.compile(r"oom[-_]kill|Out of memory: Killed process|OUT_OF_MEMORY"), "out of CPU memory"),
]
KILLED = "killed: it ended without recording why (SIGKILL, out of CPU memory or the node lost)"
NAN = re.compile(r"diverged|not finite|\bnan\b", re.I)


@dataclass
class SlurmView:
    """What Slurm says of a table's jobs: queue states and accounting states by job id ("123", "123_4")."""

    queue: dict[str, str] = field(default_factory=dict)
    accounting: dict[str, str] = field(default_factory=dict)
    note: str | None = None  # one line when Slurm could not be asked


def ask(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_view(jobs: set[str]) -> SlurmView:
    """squeue and sacct for these jobs (array tasks expanded); an empty view with a note where they do not answer."""
    view = SlurmView()
    if not jobs:
        return view
    queue = ask(["squeue", "-h", "-r", "-o", "%i %T"])
    accounting = ask(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(sorted(jobs))])
    for line in (queue or "").splitlines():
        if len(parts := line.split()) == 2 and parts[0].split("_")[0] in jobs:
            view.queue[parts[0]] = parts[1]
    for line in (accounting or "").splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            view.accounting[job] = state.split()[0] if state.split() else ""
    missing = [name for name, answer in (("squeue", queue), ("sacct", accounting)) if answer is None]
    if missing:
        view.note = (f"{' and '.join(missing)} did not answer (not here, or slower than {SLURM_TIMEOUT_S:g} s): the "
                     "states come from the run directories alone")
    return view


def log_tail(path: Path | None, lines: int = 300) -> list[str]:
    if path is None or not path.is_file():
        return []
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))  # Slurm's "CANCELLED AT" may precede a long traceback
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def cause_from_text(lines: list[str]) -> str | None:
    for pattern, cause in LOG_CAUSES:
        if any(pattern.search(line) for line in lines):
            return cause
    return None


def error_line(lines: list[str]) -> str | None:
    """The failure's own words: train.py's one `error: ...` line, else a traceback's last line."""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")[:160]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*", lines[i]) and any(
                "Traceback" in line for line in lines[:i]):
            return lines[i][:160]
    return None


def writer_alive(run: Run) -> bool:
    """Off Slurm: the process holding the run directory is alive on this host (its .writer note names it)."""
    note = run.dir / ".writer" if run.dir else None
    if note is None or not note.is_file():
        return False
    match = re.match(r"pid (\d+) on (\S+)", note.read_text())
    if not match or match.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def requeues(run: Run) -> int:
    counts = [int(a["slurm"]["restarts"]) for a in run.attempts if isinstance(a.get("slurm"), dict)
              and str(a["slurm"].get("restarts", "")).isdigit()]
    return max(counts, default=0)


def classify(run: Run, slurm: SlurmView) -> None:
    """Sets run.state and run.cause."""
    queued = slurm.queue.get(run.job or "") if run.job else None
    accounted = SACCT_CAUSES.get(slurm.accounting.get(run.job or "", ""))
    last = run.attempts[-1] if run.attempts else None
    tail = log_tail(run.log)
    reason = (last or {}).get("reason") or ""
    requeued = requeues(run)
    again = f"requeued {requeued}×" if requeued else ""
    if run.extra.get("search_state") == "stopped":
        run.state, run.cause = "stopped early", again
    elif run.done or (last is not None and last.get("exit") == 0):
        run.state, run.cause = "done", again
    elif queued in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING"):
        run.state, run.cause = ("preempted", f"requeued {max(requeued, 1)}×, waiting") if run.attempts else \
            ("queued", "")
    elif queued in ("RUNNING", "COMPLETING") or (last is not None and last.get("end") is None and not run.job and
                                                  writer_alive(run)):
        run.state, run.cause = "running", again
    elif last is None and not tail and not accounted:
        run.state = "not started" if run.dir is None or not run.dir.exists() else "unknown"
        run.cause = "no record of a start" if run.state == "unknown" else ""
    elif NAN.search(reason) or any(NAN.search(line) and "diverged" in line for line in tail):
        run.state, run.cause = "stopped for a NaN", (reason or error_line(tail) or "")[:160]
    elif last is not None and last.get("exit") == 143 and accounted in (None, "preempted") and \
            cause_from_text(tail) in (None, "preempted"):  # a SIGTERM that was scancel or the time limit: failed
        run.state, run.cause = "preempted", (f"{again}; " if again else "") + "saved; --resume continues it"
    else:
        run.state = "failed"
        run.cause = (accounted or cause_from_text([reason]) or cause_from_text(tail) or
                     (reason and reason[:160]) or error_line(tail) or
                     (KILLED if last is not None and last.get("end") is None else
                      f"exit {last.get('exit')}" if last is not None else "it never started: see its log"))
