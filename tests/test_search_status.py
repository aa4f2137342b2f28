"""support/search/status.py: the status table, the cross-validation table and the plot of an offline search, from
search directories written by hand (search.json and one run-NNNN.json per run, as support/search/records.py keeps)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from support.search.status import show_status, status_lines, write_plot

NAME = "search-20261202-140000-abc123"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): no process has it now."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def owner(alive: bool | None = None) -> dict[str, Any]:
    """A worker on another node (None: cannot be checked here), or a local process that lives or has died."""
    if alive is None:
        return {"host": "n1", "pid": 123, "worker": 0, "slurm_task": None}
    return {"host": socket.gethostname(), "pid": os.getpid() if alive else dead_pid(), "worker": 0, "slurm_task": None}


def run(number: int, config: dict[str, Any], values: list[float], state: str = "finished", goal: str = "minimize",
        run_owner: dict[str, Any] | None = None, stopped_early: bool = False) -> dict[str, Any]:
    best = (max(values) if goal == "maximize" else min(values)) if values else None
    return {"number": number, "name": f"run-{number:04d}", "config": config, "state": state,
            "owner": run_owner or owner(), "attempts": 1, "created": 1733150000.0 + number,
            "ended": None if state in ("running", "preempted") else 1733150100.0 + number,
            "history": [{"epoch": epoch, "val/loss": value} for epoch, value in enumerate(values)], "best": best,
            "stopped_early": stopped_early, "exit_code": {"finished": 0, "stopped": 0, "failed": 1}.get(state),
            "test": {}, "heartbeat": time.time()}


def make_search(directory: Path, records: list[dict[str, Any]], goal: str = "minimize", count: int = 40) -> Path:
    directory.mkdir()
    sweep = {"method": "bayes", "metric": {"name": "val/loss", "goal": goal},
             "parameters": {"optimizer.lr": {"values": [0.1, 0.01]}}}
    search = {"name": NAME, "sweep": sweep, "count": count, "seed": 0, "extra": [], "program": ["train.py"],
              "heartbeat_timeout": 600.0, "created": "2026-12-02T14:00:00"}
    (directory / "search.json").write_text(json.dumps(search))
    for record in records:
        (directory / f"run-{record['number']:04d}.json").write_text(json.dumps(record))
    return directory


def run_table(lines: list[str]) -> list[list[str]]:
    """The per-run table's rows (no header), as cells split on runs of two or more spaces."""
    start = lines.index("") + 1
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return [re.split(r"\s{2,}", line.strip()) for line in lines[start + 1:end]]


def fold_table(lines: list[str]) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith("cross-validation"))
    return lines[start + 1:]


@pytest.mark.parametrize("goal, order", [("minimize", [2, 4, 1, 3]), ("maximize", [1, 4, 2, 3])])
def test_runs_best_first_by_goal_and_runs_without_a_value_last(tmp_path: Path, goal: str, order: list[int]):
    lr = {"optimizer.lr": 0.1}
    records = [run(1, lr, [0.5], goal=goal), run(2, lr, [0.3], goal=goal), run(3, lr, [], state="failed"),
               run(4, lr, [0.45, 0.4], goal=goal)]
    lines = status_lines(make_search(tmp_path / "search", records, goal=goal))
    assert [int(row[0]) for row in run_table(lines)] == order
    assert lines[0] == f"{NAME}: bayes search, {goal} val/loss"
    leader = {"minimize": "run 2, val/loss 0.3", "maximize": "run 1, val/loss 0.5"}[goal]
    assert lines[2] == f"best so far: {leader}"
    assert run_table(lines)[-1][2] == "-"  # the failed run has no best value
    assert not any(line.startswith("cross-validation") for line in lines)  # no folds, no fold table


def test_header_counts_and_stopped_early_wording(tmp_path: Path):
    lr = {"optimizer.lr": 0.1}
    records = [run(1, lr, [0.5, 0.4]), run(2, lr, [0.6]), run(3, lr, [0.7], state="stopped", stopped_early=True),
               run(4, lr, [0.55], state="running", run_owner=owner(alive=True)), run(5, lr, [], state="failed"),
               run(6, lr, [0.65], state="running", run_owner=owner(alive=False))]
    lines = status_lines(make_search(tmp_path / "search", records))
    assert lines[1] == "6 of 40 runs: 2 finished, 1 stopped early, 1 running, 1 failed, 1 crashed"
    states = {int(row[0]): row[1] for row in run_table(lines)}
    assert states == {1: "finished", 2: "finished", 3: "stopped early", 4: "running", 5: "failed", 6: "crashed"}


def test_running_runs_whose_owner_vanished_show_as_crashed(tmp_path: Path):
    lr, hour_ago = {"optimizer.lr": 0.1}, time.time() - 3600
    records = [run(1, lr, [0.5], state="running", run_owner=owner(alive=True)),
               run(2, lr, [0.5], state="running", run_owner=owner(alive=False)),
               run(3, lr, [0.5], state="preempted", run_owner=owner(alive=False)),
               run(4, lr, [0.5], state="running", run_owner=owner()),  # another node, fresh heartbeat
               {**run(5, lr, [0.5], state="running", run_owner=owner()), "heartbeat": hour_ago},  # silent 1 h
               {**run(6, lr, [], state="running"), "owner": None}]  # no owner recorded: judged by heartbeat
    search_dir = make_search(tmp_path / "search", records)
    os.utime(search_dir / "run-0005.json", (hour_ago, hour_ago))  # the worker's heartbeat is the file's time
    states = {int(row[0]): row[1] for row in run_table(status_lines(search_dir))}
    # a preempted run stopped cleanly with a checkpoint: whoever resumes the search continues it
    assert states == {1: "running", 2: "crashed", 3: "preempted", 4: "running", 5: "crashed", 6: "running"}


def test_varying_settings_are_columns_and_constant_ones_a_header_line(tmp_path: Path):
    records = [run(n, {"model.hidden_dim": 64, "optimizer.lr": lr, "model.act": act}, [value])
               for n, lr, act, value in [(1, 0.003, "relu", 0.5), (2, 0.0003, "relu", 0.3), (3, 0.03, "gelu", 0.4)]]
    lines = status_lines(make_search(tmp_path / "search", records))
    assert lines[3] == "fixed: model.hidden_dim=64"
    header = lines[lines.index("") + 1]
    assert header.split() == ["run", "state", "best", "val/loss", "epochs", "model.act", "optimizer.lr"]
    assert run_table(lines) == [["2", "finished", "0.3", "1", "relu", "0.0003"],
                                ["3", "finished", "0.4", "1", "gelu", "0.03"],
                                ["1", "finished", "0.5", "1", "relu", "0.003"]]
    table = lines[lines.index("") + 1:]
    # aligned: each left-aligned column starts where its heading does, on every row
    for heading, cells in [("state", ["finished"]), ("model.act", ["relu", "gelu"]), ("optimizer.lr", ["0.0"])]:
        column = header.index(heading)
        assert all(any(row[column:].startswith(cell) for cell in cells) for row in table[1:]), heading


@pytest.mark.parametrize("goal", ["minimize", "maximize"])
def test_folds_grouped_by_setting_with_mean_and_population_std(tmp_path: Path, goal: str):
    def config(lr: float, fold: int, folds: int = 3) -> dict[str, Any]:
        return {"optimizer.lr": lr, "data.fold": fold, "data.folds": folds}

    values = {0.1: [0.5, 0.6, 0.7], 0.01: [0.2, 0.3, 0.7]}
    records = [run(3 * i + fold + 1, config(lr, fold), [value], goal=goal)
               for i, (lr, fold_values) in enumerate(values.items()) for fold, value in enumerate(fold_values)]
    records += [run(7, config(0.01, 2), [0.01, 0.99], state="failed", goal=goal),  # not counted: not complete
                run(8, config(0.01, 1), [0.02, 0.98], state="running", run_owner=owner(alive=True), goal=goal),
                run(9, config(1.0, 0), [0.9], goal=goal),
                run(10, config(1.0, 1), [0.05, 0.95], state="running", run_owner=owner(alive=False), goal=goal),
                run(11, config(0.1, 0, folds=5), [0.65], goal=goal)]  # another split: a setting of its own
    table = fold_table(status_lines(make_search(tmp_path / "search", records, goal=goal)))
    assert table[0].split() == ["folds", "n", "mean", "std", "data.folds", "optimizer.lr"]
    # by hand: lr 0.1: mean 0.6, std sqrt((0.01 + 0 + 0.01) / 3) = 0.08165; lr 0.01: mean 0.4,
    # std sqrt((0.04 + 0.01 + 0.09) / 3) = 0.2160; lr 1.0: one complete run (the other crashed): 0.9, no std
    rows = {"0.1": ["0,1,2", "3", "0.6", "0.08165", "3", "0.1"], "0.01": ["0,1,2", "3", "0.4", "0.216", "3", "0.01"],
            "1.0": ["0,1", "1", "0.9", "-", "3", "1.0"], "0.1 of 5": ["0", "1", "0.65", "-", "5", "0.1"]}
    order = ["0.01", "0.1", "0.1 of 5", "1.0"]
    order = order if goal == "minimize" else order[::-1]
    assert [line.split() for line in table[1:]] == [rows[lr] for lr in order]


def test_plot_is_a_png_rewritten_on_each_call(tmp_path: Path):
    lr = {"optimizer.lr": 0.1}
    records = [run(1, lr, [0.5]), run(2, lr, [0.7], state="stopped", stopped_early=True),
               run(3, lr, [], state="failed"), run(4, lr, [0.8], state="running", run_owner=owner(alive=False)),
               run(5, lr, [0.3, 0.2])]
    search_dir = make_search(tmp_path / "search", records[:3])
    path = write_plot(search_dir)
    assert path == search_dir / "status.png"
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG")
    for record in records[3:]:
        (search_dir / f"run-{record['number']:04d}.json").write_text(json.dumps(record))
    assert write_plot(search_dir) == path
    second = path.read_bytes()
    assert second.startswith(b"\x89PNG") and second != first
    assert sorted(p.name for p in search_dir.iterdir() if not p.name.startswith("run-")) == ["search.json",
                                                                                              "status.png"]
    elsewhere = write_plot(search_dir, tmp_path / "elsewhere.png")
    assert elsewhere == tmp_path / "elsewhere.png" and elsewhere.read_bytes().startswith(b"\x89PNG")


def test_plot_of_a_search_without_values(tmp_path: Path):
    search_dir = make_search(tmp_path / "search", [run(1, {"optimizer.lr": 0.1}, [], state="failed")])
    assert write_plot(search_dir).read_bytes().startswith(b"\x89PNG")
    assert status_lines(search_dir)[1:3] == ["1 of 40 runs: 1 failed", "best so far: none yet"]


def test_show_status_prints_the_table_and_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture):
    search_dir = make_search(tmp_path / "search", [run(1, {"optimizer.lr": 0.1}, [0.5])])
    assert show_status(search_dir) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:-1] == status_lines(search_dir)
    assert out[-1] == f"plot: {search_dir / 'status.png'}" and (search_dir / "status.png").exists()


@pytest.mark.parametrize("what", ["empty directory", "file", "damaged search.json"])
def test_not_a_search_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture, what: str):
    target = tmp_path / "target"
    if what == "file":
        target.write_text("not a directory")
    else:
        target.mkdir()
        if what == "damaged search.json":
            (target / "search.json").write_text('{"name": ')
    assert show_status(target) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and "search.json" in captured.err
    assert len(captured.err.splitlines()) == 1
