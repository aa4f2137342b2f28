"""slurm_train.py --local never leaves a row training after it is gone: SIGTERM or SIGKILL to the launcher stops
every row's train.py (which saves its last.ckpt), and a --local --resume that finds a run still training in one of
its rows (left by a launcher of an earlier version, or started by hand) stops it and resumes the row from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, script_env

pytestmark = [pytest.mark.example_model, pytest.mark.example_data]

# A row that would train for a long time: only a signal ends it.
LONG = ["--trainer.max_epochs=1000", "--early_stopping.patience=1000", "--trainer.enable_model_summary=false",
        "--trainer.enable_progress_bar=false", "--data.batch_size=256", "--cka.every_n_epochs=0"]


def processes_of(folder: Path) -> list[str]:
    """The command lines of the processes on this machine that name `folder` (rows, guards, train.py)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if str(folder) in args and int(proc.name) != os.getpid() and "zombie" not in state:
            found.append(f"{proc.name}: {args[:200]}")
    return found


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds:.0f} s for {what}"
        time.sleep(0.2)


def launcher(runs: Path, *args: str) -> subprocess.Popen:
    """slurm_train.py --local as a shell would start it: in the test's own process group, no setsid."""
    return subprocess.Popen([sys.executable, str(REPO / "slurm_train.py"), "--local", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=script_env(), cwd=runs.parent)


def start_grid(tmp_path: Path, at_start: bool = False) -> tuple[subprocess.Popen, Path]:
    config = {"name": "long", "program": "train.py", "method": "grid",
              "metric": {"name": "val/loss", "goal": "minimize"}, "parameters": {"model.hidden_dim": {"values": [16]}}}
    (tmp_path / "sweep.json").write_text(json.dumps(config))
    runs = tmp_path / "runs"
    proc = launcher(runs, "--sweep-config", str(tmp_path / "sweep.json"), "--runs-dir", str(runs), "--", *LONG)
    if at_start:  # the signal while the row starts (its log is opened just before it)
        wait_for(lambda: list(runs.glob("grid-*/row-0.out")), 120, "the row's start")
    else:
        wait_for(lambda: list(runs.glob("grid-*/row-0/checkpoints/last.ckpt")), 120, "the row's first checkpoint")
    return proc, next(runs.glob("grid-*"))


@pytest.mark.parametrize("signum, at_start", [(signal.SIGTERM, False), (signal.SIGKILL, False),
                                             (signal.SIGTERM, True)], ids=["TERM", "KILL", "TERM-at-start"])
@pytest.mark.slow
def test_a_killed_launcher_leaves_no_row_training(signum: int, at_start: bool, tmp_path: Path):
    proc, grid = start_grid(tmp_path, at_start)
    assert at_start or any("train.py" in p for p in processes_of(grid))
    started = time.monotonic()
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    wait_for(lambda: not processes_of(grid), 30, f"no process of {grid} left: {processes_of(grid)}")
    print(f"{signal.Signals(signum).name}: every process of the grid gone {time.monotonic() - started:.1f} s later")
    assert proc.returncode == (143 if signum == signal.SIGTERM else -9), out
    assert not (grid / "row-0" / "done").exists()
    if at_start:
        time.sleep(5)  # nothing starts late either
        assert not processes_of(grid) and proc.returncode == 143
        return
    assert "stopped by SIGTERM at epoch" in (grid / "row-0.out").read_text()  # train.py saved its last.ckpt
    if signum == signal.SIGKILL:
        return
    assert "resume with python slurm_train.py --local --resume" in out
    # A row left training by hand (as an older launcher did): the resume stops it, then resumes the row from it.
    row = grid / "row-0"
    orphan_log = tmp_path / "orphan.out"
    orphan = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--ckpt_path=last", *LONG, f"--run_dir={row}"],
                              stdout=orphan_log.open("w"), stderr=subprocess.STDOUT, env=script_env(),
                              start_new_session=True)
    # Training, not still starting: a SIGTERM before Lightning restored the checkpoint ends it with -15, not 143 (seen
    # once under CI's load, when the lock alone was waited for).
    wait_for(lambda: "Restored all states" in orphan_log.read_text(), 120, "the orphan to resume training")
    resumed = launcher(grid.parent, "--resume", str(grid))
    wait_for(lambda: orphan.poll() is not None, 60, "the orphan to be stopped")
    wait_for(lambda: (grid / "row-0.out").read_text().count("resuming ") >= 1, 120, "the row to resume")
    resumed.send_signal(signal.SIGTERM)
    out, _ = resumed.communicate(timeout=60)
    assert "stopping train.py (pid" in out and orphan.returncode == 143, out
    assert resumed.returncode == 143, out
    wait_for(lambda: not processes_of(grid), 30, f"no process of {grid} left: {processes_of(grid)}")
