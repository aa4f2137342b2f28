"""One results table for everything that ran (`sweep.py --status DIR`, support/results/): states and causes, the
metrics, repeats as mean ± std, the cost of each run (support/training/run_record.py), exports, and directories
that are damaged, from elsewhere or none of the kinds. Synthetic run directories where the files are the point; real
runs (a local grid with a killed and a diverged row, Slurm's time limit, cancel, requeue and queue) where the
states are."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import QUICK, REPO, script_env
from slurm_fixtures import SlurmCluster, slurm, slurm_cluster  # noqa: F401  (fixtures)

import sweep
import train
from support.results import states
from support.results.collect import collect

TINY = [*QUICK, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
        "--cka.every_n_epochs=0"]


def write_run(run_dir: Path, settings: dict[str, Any], curve: list[float], test: dict[str, float] | None = None,
              exit_status: int | None = 0, gpus: int = 0, wall: float = 60.0, monitor: str = "val/loss",
              mode: str = "min", reason: str | None = None) -> Path:
    """A run directory as train.py leaves it: config.yaml, metrics.jsonl, cost.json, provenance.json."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": settings}}))
    lines = [{"monitor": monitor, "mode": mode, "time": 0}]
    lines += [{"epoch": i, "step": 10 * (i + 1), "time": i, "metrics": {monitor: v}} for i, v in enumerate(curve)]
    if test is not None:
        lines.append({"test": test, "time": 99})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cost = {"start": 0, "wall_s": wall, "gpus": gpus, "gpu_model": "NVIDIA H200" if gpus else None,
            "gpu_hours": wall * gpus / 3600 if gpus else None, "peak_gpu_mem_mb": [1024.0] * gpus or None,
            "peak_cpu_mem_mb": 900.0, "final": exit_status is not None}
    (run_dir / "cost.json").write_text(json.dumps({"attempts": [cost]}))
    attempt = {"start": "s", "end": None if exit_status is None else "e", "exit": exit_status, "reason": reason,
               "code": {"hash": "abc", "commit": "c0ffee", "dirty": False}, "slurm": None}
    (run_dir / "provenance.json").write_text(json.dumps({"attempts": [attempt]}))
    return run_dir


def write_grid(grid_dir: Path, rows: list[dict[str, Any]]) -> Path:
    grid_dir.mkdir(parents=True)
    table = [{"row": i, "config": row, "argv": []} for i, row in enumerate(rows)]
    (grid_dir / "grid.json").write_text(json.dumps({"rows": table, "runs_per_gpu": 1}))
    (grid_dir / "job.sbatch").write_text("#!/bin/sh\n")
    return grid_dir


def status(directory: Path, *extra: str) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, str(REPO / "sweep.py"), "--status", str(directory), *extra],
                            capture_output=True, text=True, timeout=120, env=script_env())
    return result.returncode, result.stdout, result.stderr


def line_of(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(name + " "))


def test_a_grid_table_ranks_the_runs_summarises_repeats_and_totals_the_cost(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture):
    grid = write_grid(tmp_path / "grid-x", [{"model.hidden_dim": h, "seed_everything": s} for h in (16, 64)
                                            for s in (1, 2, 3)])
    curves = {0: [0.9, 0.5], 1: [0.8, 0.45], 2: [0.7, 0.55], 3: [0.6, 0.3], 4: [0.5, 0.2], 5: [0.4, 0.35]}
    for i, curve in curves.items():
        write_run(grid / f"row-{i}", {}, curve, test={"test/acc": 0.9 + i / 100}, gpus=2, wall=1800)
        (grid / f"row-{i}" / "done").write_text("{}")
    assert sweep.main(["--status", str(grid)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("row-")]
    assert rows == ["row-4", "row-3", "row-5", "row-1", "row-0", "row-2"]  # best first by val/loss (min)
    assert re.search(r"row-4\s+done\s+64\s+2\s+0\.2 \(2\)\s+0\.94\s+2\s+30:00\s+2\s+1\b", out), out
    # Repeats (seeds) of each setting: mean ± sample std over n, by hand.
    for hidden, members in ((16, (0, 1, 2)), (64, (3, 4, 5))):
        bests = [min(curves[i]) for i in members]
        tests = [0.9 + i / 100 for i in members]
        expected = (f"repeats of model.hidden_dim={hidden}: best val/loss {statistics.fmean(bests):.4g} ± "
                    f"{statistics.stdev(bests):.2g} (n=3); test/acc {statistics.fmean(tests):.4g} ± "
                    f"{statistics.stdev(tests):.2g} (n=3)")
        assert expected in out, out
    assert "total: 6 done; GPU-hours 6; wall time 3:00:00" in out and "resubmit" not in out


def test_exports_hold_every_run_and_field(tmp_path: Path, capsys: pytest.CaptureFixture):
    grid = write_grid(tmp_path / "grid-y", [{"optimizer.lr": lr} for lr in (0.001, 0.01, 0.1)])
    for i in range(3):
        write_run(grid / f"row-{i}", {}, [0.5 - i / 10, 0.4 - i / 10], test={"test/acc": 0.8 + i / 20}, gpus=1)
    csv_file, markdown, plot = tmp_path / "r.csv", tmp_path / "r.md", tmp_path / "r.png"
    assert sweep.main(["--status", str(grid), "--csv", str(csv_file), "--markdown", str(markdown),
                       "--plot", str(plot)]) == 0
    rows = list(csv.DictReader(csv_file.open()))
    assert [row["run"] for row in rows] == ["row-0", "row-1", "row-2"]
    for i, row in enumerate(rows):
        assert float(row["setting:optimizer.lr"]) == (0.001, 0.01, 0.1)[i]
        assert float(row["best"]) == pytest.approx(0.4 - i / 10) and row["best_epoch"] == "2"
        assert float(row["test:test/acc"]) == pytest.approx(0.8 + i / 20) and row["gpus"] == "1"
        assert float(row["gpu_hours"]) == pytest.approx(60 / 3600) and row["gpu_model"] == "NVIDIA H200"
        assert row["commit"] == "c0ffee" and row["state"] == "done" and json.loads(row["peak_gpu_mem_mb"]) == [1024]
    assert markdown.read_text().count("| row-") == 3 and markdown.read_text().startswith("| group | kind | run |")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert capsys.readouterr().out.count("written: ") == 3


def test_damaged_foreign_and_wrong_directories_never_stop_the_table(tmp_path: Path):
    root = tmp_path / "runs"
    write_run(root / "good", {"hidden_dim": 8}, [0.5, 0.4], test={"test/acc": 0.9})
    cut = write_run(root / "cut", {"hidden_dim": 16}, [0.6, 0.5])
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "ste')  # killed while writing: read up to there
    bad = write_run(root / "bad", {"hidden_dim": 32}, [0.7])
    (bad / "cost.json").write_text("{not json")
    (bad / "metrics.jsonl").write_text('{"monitor": "val/loss", "mode": "min"}\nnot json\n'
                                       '{"epoch": 0, "metrics": {}}\n')
    old = root / "older"  # an older template's run: provenance without attempts, no metrics, no cost
    old.mkdir()
    (old / "provenance.json").write_text(json.dumps({"code": "something else"}))
    foreign = root / "foreign"  # another project's run directory: a config.yaml of other keys
    foreign.mkdir()
    (foreign / "config.yaml").write_text("learning_rate: 3\nlayers: [1, 2]\n")
    (root / "notes").mkdir()  # not a run: left out
    code, out, err = status(root)
    assert code == 0 and err.strip() == "" or "Traceback" not in err, err
    for name in ("good", "cut", "bad", "older", "foreign"):
        assert line_of(out, name)
    assert "done" in line_of(out, "good") and "[damaged" not in line_of(out, "cut")  # a cut last line is no damage
    assert "[damaged: metrics.jsonl line 2 damaged; cost.json unreadable (JSONDecodeError)]" in line_of(out, "bad")
    assert "unknown: no record of a start" in line_of(out, "older")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = status(empty)
    assert code == 1 and err.strip() == (f"error: {empty} holds no runs: --status takes a grid (runs/grid-*), a "
                                         "search (runs/search-*), an agents' job (runs/agents-*), a run directory, "
                                         "or a folder of them such as runs/")


def test_the_table_of_200_runs_loads_no_torch(tmp_path: Path):
    """200 run directories: every line, without torch (login nodes); the time is benchmarks/results_table.py's."""
    grid = write_grid(tmp_path / "grid-big", [{"model.hidden_dim": i} for i in range(200)])
    for i in range(200):
        write_run(grid / f"row-{i}", {}, [1.0 / (i + 1)])
    code = f"import sys, sweep; sweep.main(['--status', {str(grid)!r}]); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=script_env())
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[-1] == "False", result.stderr
    assert sum(line.startswith("row-") for line in lines) == 200 and lines[2].startswith("row-199 ")


def test_slurm_that_does_not_answer_is_one_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("squeue", "sacct"):
        (bin_dir / tool).write_text("#!/bin/sh\nsleep 5\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(states, "SLURM_TIMEOUT_S", 0.3)
    grid = write_grid(tmp_path / "grid-z", [{"a": 1}, {"a": 2}])
    (grid / "jobs.txt").write_text("123\n")
    write_run(grid / "row-0", {}, [0.5], exit_status=0)
    start = time.monotonic()
    assert sweep.main(["--status", str(grid)]) == 0
    out = capsys.readouterr().out
    assert time.monotonic() - start < 4
    assert "note: squeue and sacct did not answer (not here, or slower than 0.3 s): the states come from the run " \
           "directories alone" in out
    assert "not started" in line_of(out, "row-1") and "resubmit what did not finish: python slurm_train.py " \
           f"--resume {grid}" in out


def test_a_cpu_run_records_its_cost_and_metrics_and_a_killed_run_keeps_them(tmp_path: Path):
    results = train.main([*TINY, "--trainer.max_epochs=2", f"--run_dir={tmp_path / 'cpu'}"])
    run = collect(tmp_path / "cpu")[0].runs[0]
    assert run.state == "done" and len(run.epochs) == 2 and run.cost[-1]["final"] is True
    assert run.cost[-1]["gpus"] == 0 and run.cost[-1]["gpu_hours"] is None and run.cost[-1]["peak_cpu_mem_mb"] > 50
    assert run.test == {k: pytest.approx(v) for k, v in results.items() if k.startswith("test/")}
    assert run.best()[0] == pytest.approx(min(line["metrics"]["val/loss"] for line in run.epochs))
    code, out, _ = status(tmp_path / "cpu")
    assert re.search(r"^cpu\s+done\s+\S+ \(\d\)\s+\S+\s+\S+\s+2\s+\d+:\d\d\s+–\s+–$", out, re.M), out

    # Killed (SIGKILL) after its first checkpoint: the cost written then stays, and the table says what happened.
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, "--trainer.max_epochs=400",
                             f"--run_dir={killed}"], env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run = collect(killed)[0].runs[0]
    assert run.cost and run.cost[-1]["final"] is False and run.epochs
    # Written with each checkpoint (just before it): the cost up to the last one, not only up to the start.
    assert run.cost[-1]["updated"] >= (killed / "checkpoints" / "last.ckpt").stat().st_mtime - 0.3
    assert run.state == "failed" and run.cause.startswith("killed: it ended without recording why")


@pytest.mark.slow
def test_a_local_grid_with_a_killed_and_a_diverged_row(tmp_path: Path):
    config = {"name": "states", "program": "train.py", "method": "grid", "metric": {"name": "val/loss",
              "goal": "minimize"}, "parameters": {"optimizer.lr": {"values": [0.001, 1.0e6, 0.002]}}}
    (tmp_path / "sweep.json").write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, str(REPO / "slurm_train.py"), "--sweep-config", str(tmp_path /
                            "sweep.json"), "--local", "--max-concurrent", "3", "--runs-dir", str(tmp_path / "runs"),
                             "--", *TINY, "--trainer.max_epochs=60", "--early_stopping.patience=100"],
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    row2 = None
    while time.monotonic() < deadline:  # row 2 killed once it trains (its first validation recorded)
        grids = list((tmp_path / "runs").glob("grid-*"))
        if grids and (grids[0] / "row-2" / "metrics.jsonl").is_file() and \
                (grids[0] / "row-2" / "metrics.jsonl").read_text().count('"epoch"') >= 1:
            row2 = grids[0] / "row-2"
            break
        time.sleep(0.1)
    assert row2 is not None, "row 2 never trained"
    pid = int(re.match(r"pid (\d+)", (row2 / ".writer").read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output
    grid = row2.parent
    code, out, err = status(grid)
    assert code == 0, err
    assert "done" in line_of(out, "row-0").split()[1]
    assert line_of(out, "row-1").split(None, 1)[1].startswith("stopped for a NaN: Diverged: "), out
    assert "failed: killed: it ended without recording why" in line_of(out, "row-2")
    final = re.search(r"final metrics:\s+test/loss=(\S+)\s+test/acc=(\S+)", (grid / "row-0.out").read_text())
    finished = next(run for run in collect(grid)[0].runs if run.name == "row-0")
    assert finished.test["test/acc"] == pytest.approx(float(final.group(2)), abs=5e-5)
    assert finished.test["test/loss"] == pytest.approx(float(final.group(1)), abs=5e-5)
    assert f"{finished.test['test/acc']:.4g}" in line_of(out, "row-0")
    assert f"resubmit what did not finish: python slurm_train.py --resume {grid}" in out
    assert "total: 1 done, 1 stopped for a NaN, 1 failed" in out


@pytest.mark.parametrize("sacct_state, cause", [("TIMEOUT", "time limit"), ("NODE_FAIL", "node failure"),
                                                ("OUT_OF_MEMORY", "out of CPU memory"),
                                                ("CANCELLED by 0", "cancelled")])
def test_what_sacct_says_of_a_task_that_ended_without_a_record_is_its_cause(sacct_state: str, cause: str,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture):
    """Slurm ended the task before train.py could record why (its end is empty): sacct's state is the cause."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\n")
    (bin_dir / "sacct").write_text(f"#!/bin/sh\necho '777_0|{sacct_state}'\necho '777_1|COMPLETED'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    grid = write_grid(tmp_path / "grid-s", [{"a": 1}, {"a": 2}])
    (grid / "jobs.txt").write_text("777\n")
    write_run(grid / "row-0", {}, [0.5], exit_status=None)  # started, never ended
    write_run(grid / "row-1", {}, [0.4], exit_status=0)
    assert sweep.main(["--status", str(grid)]) == 0
    out = capsys.readouterr().out
    assert line_of(out, "row-0").split(None, 1)[1].startswith(f"failed: {cause}"), out
    assert "done" in line_of(out, "row-1") and "note:" not in out


@pytest.mark.slow
def test_slurm_states_queued_cancelled_requeued_and_no_environment(slurm: SlurmCluster, tmp_path: Path,  # noqa: F811
                                                                  monkeypatch: pytest.MonkeyPatch):
    config = {"name": "slurm-states", "program": "train.py", "method": "grid", "metric": {"name": "val/loss",
              "goal": "minimize"}, "parameters": {"trainer.max_epochs": {"values": [10**6, 10**6 + 1, 600, 10**6 + 2]}}}
    (tmp_path / "sweep.json").write_text(json.dumps(config))
    env = slurm.env(script_env())
    base = [sys.executable, str(REPO / "slurm_train.py"), "--sweep-config", str(tmp_path / "sweep.json"),
            "--max-concurrent", "3", "--runs-dir", str(tmp_path / "runs"), "--gpus-per-node", "0", "--cpus-per-task",
            "1", "--mem", "1G", "--time", "00:10:00", "--", *TINY, "--early_stopping.patience=10000"]
    submitted = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    slurm.submitted.append(job)
    grid = Path(re.search(r"run directory: (\S+)", submitted.stdout).group(1))

    def wait_until(check, what: str, timeout: float = 150) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not check() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert check(), f"{what}: not within {timeout} s"

    trains = lambda row: (grid / f"row-{row}" / "metrics.jsonl").is_file() and \
        '"epoch"' in (grid / f"row-{row}" / "metrics.jsonl").read_text()  # noqa: E731
    wait_until(lambda: trains(0) and trains(1) and trains(2), "rows 0, 1 and 2 training")
    code, out, err = status(grid)
    assert code == 0, err
    assert [line_of(out, f"row-{i}").split()[1] for i in range(4)] == ["running", "running", "running", "queued"], out

    slurm.run("scancel", f"{job}_1")  # cancelled while it trains; row 3 starts in its place
    assert slurm.run("scontrol", "requeue", f"{job}_2").returncode == 0  # row 2 (600 epochs) restarts, then ends
    wait_until(lambda: (grid / "row-2" / "done").is_file(), "row 2 done after its requeue", 240)
    code, out, err = status(grid)
    assert line_of(out, "row-1").split(None, 1)[1].startswith("failed: cancelled"), out
    assert line_of(out, "row-2").split(None, 1)[1].startswith("done: requeued 1×"), out
    assert line_of(out, "row-0").split()[1] == "running"
    slurm.run("scancel", job)

    # A node without an environment for its architecture: the row never reaches train.py; its log says why.
    no_env = subprocess.run(base[:3] + [str(tmp_path / "sweep.json"), "--max-concurrent", "1", *base[6:]],
                            env={**env, "SBATCH_EXPORT": "ALL,MLMODELDEV_ARCH=ppc64le"},  # the job's node only
                            capture_output=True, text=True, timeout=300)
    assert no_env.returncode == 0, no_env.stdout + no_env.stderr
    other = re.search(r"submitted job (\d+)", no_env.stdout).group(1)
    slurm.submitted.append(other)
    slurm.wait([other], timeout=120)
    code, out, err = status(Path(re.search(r"run directory: (\S+)", no_env.stdout).group(1)))
    assert line_of(out, "row-0").split(None, 1)[1].startswith("failed: no environment for the node"), out


def test_every_kind_of_directory_and_runs_itself_are_one_command_each(tmp_path: Path):
    from support.search.launch import new_search
    from support.search.records import write_record

    runs = tmp_path / "runs"
    grid = write_grid(runs / "grid-a", [{"model.hidden_dim": 8}, {"model.hidden_dim": 16}])
    for i in range(2):
        write_run(grid / f"row-{i}", {}, [0.5 - i / 10], test={"test/acc": 0.8})
        (grid / f"row-{i}" / "done").write_text("{}")
    search = runs / "search-b"
    sweep_config = {"method": "random", "metric": {"name": "val/acc", "goal": "maximize"},
                    "parameters": {"optimizer.lr": {"values": [0.1, 0.2]}}}
    new_search(search, sweep_config, 2, 0, [], 600.0)
    for number, (lr, state) in enumerate([(0.1, "finished"), (0.2, "stopped")]):
        write_record(search, {"number": number, "name": f"run-{number:04d}", "config": {"optimizer.lr": lr},
                              "state": state, "owner": None, "attempts": 1, "created": 0.0, "ended": 1.0,
                              "history": [], "best": None, "stopped_early": state == "stopped", "exit_code": 0,
                              "test": {}})
        write_run(search / f"run-{number:04d}", {}, [0.7 + number / 10], monitor="val/acc", mode="max")
    agents = runs / "agents-c"
    agents.mkdir()
    (agents / "job.sbatch").write_text("#!/bin/sh\n")
    (agents / "jobs.txt").write_text("555\n")
    for task in (0, 1):
        write_run(runs / f"slurm-555_{task}", {"hidden_dim": 32 * (task + 1)}, [0.3 + task / 10])
    write_run(runs / "single", {"hidden_dim": 64}, [0.2], test={"test/acc": 0.95})
    expected = {grid: ["row-0", "row-1"], search: ["run-0000", "run-0001"], agents: ["slurm-555_0", "slurm-555_1"],
                runs / "single": ["single"]}
    for directory, names in expected.items():
        code, out, err = status(directory, "--csv", str(tmp_path / "one.csv"))
        assert code == 0 and "Traceback" not in err, err
        assert [row["run"] for row in csv.DictReader((tmp_path / "one.csv").open())] == names
    assert line_of(status(search, "--csv", str(tmp_path / "s.csv"))[1], "run-0001").split()[1:3] == ["stopped",
                                                                                                       "early"]
    code, out, err = status(runs)
    assert code == 0, err
    headers = [line for line in out.splitlines() if line.startswith(str(runs))]
    assert headers == [f"{agents} (wandb agents' job, 2 runs)", f"{grid} (grid, 2 runs)", f"{search} (search, 2 runs)",
                       f"{runs} (runs, 1 run)"], out  # the agents' runs are theirs, not single runs
    order = [line.split()[0] for line in out.splitlines() if line.startswith("run-")]
    assert order == ["run-0001", "run-0000"]  # the search's own metric and goal: val/acc, maximize
