"""--runs-per-gpu K on the local Slurm: K grid rows (or search workers) at once in one array task, sharing its (fake)
GPU; a packed run killed, a packed task requeued; and datasets read from a node-local copy, one per node."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from slurm_fixtures import SlurmCluster, slurm, slurm_cluster  # noqa: F401  (fixtures)
from test_slurm_search import one_thread  # noqa: F401  (autouse: one torch thread each, no wandb service of ours)

import slurm_train
from support.search.launch import new_search

pytestmark = [pytest.mark.example_model, pytest.mark.example_data, pytest.mark.slow]

PARAMS = {"model.hidden_dim": {"values": [16, 32]}, "optimizer.lr": {"values": [0.001, 0.01]}}
TRAIN = ["--", "--trainer.max_epochs=2", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
         "--data.batch_size=64", "--cka.every_n_epochs=0", "--trainer.accelerator=cpu"]
# One fake GPU per task (local_slurm.sh's gres): packed runs share it only as `srun --overlap` steps, else the second
# waits for the first ("step creation temporarily disabled"); their run times would not overlap. The runs train on
# the CPU (--trainer.accelerator=cpu): train.py refuses a GPU that torch cannot see.
ONE_GPU = ["--gpus-per-node", "1", "--cpus-per-task", "1", "--mem", "1G", "--time", "00:10:00"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")


def sweep_file(path: Path, parameters: dict[str, Any] = PARAMS) -> str:
    path.write_text(json.dumps({"name": "pack", "program": "train.py", "method": "grid",
                                "metric": {"name": "val/loss", "goal": "minimize"}, "parameters": parameters}))
    return str(path)


def submit(cluster: SlurmCluster, argv: list[str]) -> tuple[str, Path]:
    """slurm_train.py in this process; returns the job id and the grid directory."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert slurm_train.main(argv) == 0, out.getvalue()
    job = re.search(r"submitted job (\d+)", out.getvalue()).group(1)
    cluster.submitted.append(job)
    return job, Path(re.search(r"run directory: (\S+)", out.getvalue()).group(1))


def logs(grid: Path) -> str:
    return "\n".join(f"==> {p.name} <==\n{p.read_text()[-2500:]}" for p in sorted(grid.glob("*.out")))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def final_metrics(log: str) -> str:
    return re.findall(r"^final metrics: +(.*)$", log, re.MULTILINE)[-1]


def assert_same_runs(grid: Path, reference: Path) -> None:
    """Every row of `grid` ended with the final metrics and weights of the reference row of the same settings."""
    def rows(directory: Path) -> dict[str, int]:
        table = json.loads((directory / "grid.json").read_text())["rows"]
        return {json.dumps(row["config"], sort_keys=True): row["row"] for row in table}

    theirs = rows(reference)
    for config, i in rows(grid).items():
        j = theirs[config]
        log, ref_log = (grid / f"row-{i}.out").read_text(), (reference / f"row-{j}.out").read_text()
        assert final_metrics(log) == final_metrics(ref_log), (config, log[-2000:])
        mine, expected = weights(grid / f"row-{i}"), weights(reference / f"row-{j}")
        assert all(torch.equal(mine[key], value) for key, value in expected.items()), config


@pytest.fixture(scope="module")
def reference_grid(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:  # noqa: F811
    """The 4 rows run one per array task, without node-local data: what packed and staged runs must equal."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", slurm_cluster.conf)
        for key, value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}.items():
            patch.setenv(key, value)
        patch.delenv("WANDB_SERVICE", raising=False)
        job, grid = submit(slurm_cluster, ["--sweep-config", sweep_file(root / "sweep.json"), "--runs-dir",
                                           str(root), "--max-concurrent", "4", *ONE_GPU, *TRAIN])
        slurm_cluster.wait([job], timeout=240)
    assert all((grid / f"row-{i}" / "done").exists() for i in range(4)), logs(grid)
    yield grid


def test_four_rows_packed_two_per_gpu_run_as_two_tasks_at_once_and_equal_one_per_task(
        slurm: SlurmCluster, reference_grid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    job, grid = submit(slurm, ["--sweep-config", sweep_file(tmp_path / "sweep.json"), "--runs-dir", str(tmp_path),
                               "--runs-per-gpu", "2", "--max-concurrent", "2", *ONE_GPU, *TRAIN])
    script = (grid / "job.sbatch").read_text()
    assert "#SBATCH --array=0-1%2" in script and "4 rows, 2 runs per GPU: 2 tasks" in script
    assert json.loads((grid / "grid.json").read_text())["runs_per_gpu"] == 2
    slurm.wait([job], timeout=240)
    done = [json.loads((grid / f"row-{i}" / "done").read_text()) for i in range(4)]
    assert [d["job"] for d in done] == [f"{job}_0", f"{job}_0", f"{job}_1", f"{job}_1"], logs(grid)
    for first, second in ((done[0], done[1]), (done[2], done[3])):  # a task's two rows trained at the same time
        assert max(first["start"], second["start"]) < min(first["end"], second["end"]), (first, second)
    assert all(slurm.job_field(f"{job}_{t}", "ExitCode") == "0:0" for t in (0, 1))
    assert sorted(p.name for p in grid.glob("task-*.out")) == ["task-0.out", "task-1.out"]
    assert_same_runs(grid, reference_grid)


def writer_pid(run_dir: Path, timeout: float, grid: Path) -> int:
    """The pid of the train.py that holds the run directory (support/run_dir/writer.py's .writer note)."""
    deadline = time.monotonic() + timeout
    while not (run_dir / ".writer").is_file() or not (run_dir / "checkpoints").is_dir():
        assert time.monotonic() < deadline, f"{run_dir.name} never started training\n{logs(grid)}"
        time.sleep(0.1)
    return int(re.match(r"pid (\d+)", (run_dir / ".writer").read_text()).group(1))


def test_a_packed_run_killed_leaves_its_sibling_running_and_resume_reruns_only_it(
        slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    two_rows = {"model.hidden_dim": {"values": [16, 32]}}
    longer = [*TRAIN[:1], "--trainer.max_epochs=3", *TRAIN[2:4], "--data.batch_size=16", *TRAIN[5:]]
    job, grid = submit(slurm, ["--sweep-config", sweep_file(tmp_path / "sweep.json", two_rows), "--runs-dir",
                               str(tmp_path), "--runs-per-gpu", "2", *ONE_GPU, *longer])
    os.kill(writer_pid(grid / "row-1", 120, grid), signal.SIGKILL)  # the row's train.py, not its task
    slurm.wait([job], timeout=240)
    assert (grid / "row-0" / "done").exists(), logs(grid)  # the sibling trained to the end
    assert not (grid / "row-1" / "done").exists() and "final metrics" not in (grid / "row-1.out").read_text()
    assert slurm.job_field(f"{job}_0", "ExitCode") == "1:0"  # the task failed: one of its rows did
    assert "row(s) 1 of task 0 failed" in (grid / "task-0.out").read_text()
    first_done = (grid / "row-0" / "done").read_text()

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert slurm_train.main(["--resume", str(grid), "--dry-run"]) == 0
    assert "1 unfinished row(s) in 1 task(s): --array=0%" in out.getvalue()
    again, _ = submit(slurm, ["--resume", str(grid)])
    slurm.wait([again], timeout=240)
    assert json.loads((grid / "row-1" / "done").read_text())["job"] == f"{again}_0", logs(grid)
    assert (grid / "row-0" / "done").read_text() == first_done  # not run again
    assert "row 0 already finished" in (grid / "row-0.out").read_text()


def test_a_packed_task_requeued_mid_epoch_resumes_both_runs_exactly(
        slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    two_rows = {"model.hidden_dim": {"values": [16, 32]}}
    # 4-sample batches (315 steps per epoch) validated every quarter epoch: last.ckpt appears early in epoch 0, and
    # the requeue lands mid-epoch with ~200 steps to spare.
    settings = ["--trainer.max_epochs=1", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
                "--data.batch_size=4", "--trainer.val_check_interval=0.25", "--model.dropout=0.3",
                "--early_stopping.patience=100", "--cka.every_n_epochs=0", "--trainer.accelerator=cpu"]
    job, grid = submit(slurm, ["--sweep-config", sweep_file(tmp_path / "sweep.json", two_rows), "--runs-dir",
                               str(tmp_path / "packed"), "--runs-per-gpu", "2", *ONE_GPU, "--", *settings])
    deadline = time.monotonic() + 150
    while not all((grid / f"row-{i}" / "checkpoints" / "last.ckpt").exists() for i in (0, 1)):
        assert time.monotonic() < deadline, f"the rows never reached their first validation\n{logs(grid)}"
        time.sleep(0.05)
    requeue = slurm.run("scontrol", "requeue", f"{job}_0")
    assert requeue.returncode == 0, requeue.stderr
    ref_job, reference = submit(slurm, ["--sweep-config", sweep_file(tmp_path / "sweep.json", two_rows),
                                        "--runs-dir", str(tmp_path / "reference"), *ONE_GPU, "--", *settings])
    slurm.wait([job, ref_job], timeout=400)
    assert slurm.job_field(f"{job}_0", "Restarts") == "1", logs(grid)
    for i in (0, 1):  # each run came back from its own checkpoint: saved on SIGTERM, or at a quarter-epoch validation
        log = (grid / f"row-{i}.out").read_text()
        assert f"Restored all states from the checkpoint at {grid}/row-{i}/checkpoints/last.ckpt" in log, log[-3000:]
        assert (grid / f"row-{i}" / "done").exists(), logs(grid)
    assert_same_runs(grid, reference)


def test_a_search_packed_three_per_gpu_makes_its_count_three_at_a_time(
        slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    search_dir = tmp_path / "search"
    sweep = {"method": "random", "metric": {"name": "val/loss", "goal": "minimize"},
             "parameters": {"optimizer.lr": {"values": [0.001, 0.003, 0.01]}, "model.dropout": {"values": [0.0, 0.2]}}}
    new_search(search_dir, sweep, 6, 0, ["--epochs=3", "--seconds_per_epoch=0.7"], 600.0,
               program=[sys.executable, str(REPO / "tests" / "search_objective.py")], runs_per_gpu=3)
    plan = slurm_train.job_plan(slurm_train.parse_args([*ONE_GPU, "--runs-per-gpu", "3"])[0])
    header = slurm_train.sbatch_header("search", "0-0", "3 workers", plan.res, f"{search_dir}/task-%a.out")
    (search_dir / "job.sbatch").write_text(slurm_train.render_search_script(
        search_dir, slurm_train.script_head(plan, header, local=False), REPO, 3))
    job, _ = submit(slurm, ["--resume", str(search_dir), "--max-concurrent", "1"])
    slurm.wait([job], timeout=180)
    records = [json.loads(p.read_text()) for p in sorted(search_dir.glob("run-[0-9]*.json"))]
    assert [r["state"] for r in records] == ["finished"] * 6, logs(search_dir)
    spans = [(r["created"], r["ended"]) for r in records]
    at_once = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert at_once == 3, spans
    assert sorted({r["owner"]["worker"] for r in records}) == [0, 1, 2]
    assert sorted(p.name for p in search_dir.glob("worker-*.out")) == [f"worker-{i}.out" for i in range(3)]


AUDIT = """import os, sys
def _hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].endswith("data.pt"):
        with open(os.environ["DATA_OPENS"], "a") as f:
            f.write(f"{os.getpid()} {os.environ.get('SLURMD_NODENAME', '-')} {os.path.abspath(args[0])}\\n")
sys.addaudithook(_hook)
"""


def test_each_node_copies_the_dataset_once_and_training_reads_that_copy(
        slurm: SlurmCluster, reference_grid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    scratch, opens = tmp_path / "scratch", tmp_path / "opens.txt"
    clusters = (REPO / "clusters.toml").read_text().replace(
        'local_scratch = ""  # no node-local disk known', f'local_scratch = "{scratch}/$SLURMD_NODENAME"  #', 1)
    (tmp_path / "clusters.toml").write_text(clusters)
    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(tmp_path / "clusters.toml"))
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "sitecustomize.py").write_text(AUDIT)  # every open of a data.pt, by node
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "audit"))
    monkeypatch.setenv("DATA_OPENS", str(opens))
    # 16 CPUs per task: a whole node each, so the two tasks run on n1 and n2 at once.
    whole_node = [*ONE_GPU[:2], "--cpus-per-task", "16", *ONE_GPU[4:]]
    job, grid = submit(slurm, ["--sweep-config", sweep_file(tmp_path / "sweep.json"), "--runs-dir",
                               str(tmp_path / "staged"), "--runs-per-gpu", "2", "--max-concurrent", "2",
                               *whole_node, *TRAIN])
    assert f'export MLMODELDEV_LOCAL_DATA="{scratch}/$SLURMD_NODENAME"' in (grid / "job.sbatch").read_text()
    slurm.wait([job], timeout=240)
    text = logs(grid)
    copies = re.findall(r"data: copying (\S+) to the node-local (\S+) \(once per node\)", text)
    assert sorted(Path(dest).relative_to(scratch).parts[0] for _, dest in copies) == ["n1", "n2"], text
    reads = re.findall(r"data: reading the node-local copy (\S+) of", text)
    assert len(reads) >= 2 and {Path(r).relative_to(scratch).parts[0] for r in reads} == {"n1", "n2"}, text
    last_open: dict[str, tuple[str, str]] = {}  # each process's last data.pt: the one it trained on
    for pid, node, path in (line.split() for line in opens.read_text().splitlines()):
        last_open[pid] = (node, path)
    trained = [(node, path) for node, path in last_open.values() if node != "-"]
    assert len(trained) >= 4 and all(Path(path).is_relative_to(scratch / node) for node, path in trained), last_open
    assert_same_runs(grid, reference_grid)

    # Both copies corrupted (same size, one byte changed): the next run on either node finds it and copies again.
    for _, dest in copies:
        data = bytearray(Path(dest).read_bytes())
        data[len(data) // 2] ^= 0xFF
        Path(dest).write_bytes(bytes(data))
    job, again = submit(slurm, ["--sweep-config", sweep_file(tmp_path / "two.json", {
        "model.hidden_dim": {"values": [16]}, "optimizer.lr": {"values": [0.001, 0.01]}}), "--runs-dir",
        str(tmp_path / "again"), "--runs-per-gpu", "2", *whole_node, *TRAIN])
    slurm.wait([job], timeout=240)
    text = logs(again)
    replaced = re.findall(r"data: the node-local copy (\S+) is corrupt \(its SHA-256 differs from the copy's\): "
                          r"copying \S+ again", text)
    assert len(replaced) == 1, text  # once: the second run on the node finds it whole again
    copy = Path(replaced[0])
    assert json.loads((copy.parent / "COPIED").read_text())["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert_same_runs(again, reference_grid)


def test_local_rows_packed_two_per_slot_train_at_once_in_one_task(tmp_path: Path, capsys: pytest.CaptureFixture):
    """--local: the same task script, without Slurm: one slot (--max-concurrent 1) runs its two rows at once."""
    two_rows = {"model.hidden_dim": {"values": [16, 32]}}
    assert slurm_train.main(["--local", "--sweep-config", sweep_file(tmp_path / "sweep.json", two_rows), "--runs-dir",
                             str(tmp_path), "--runs-per-gpu", "2", "--max-concurrent", "1", "--gpus-per-node", "0",
                             *TRAIN]) == 0
    out = capsys.readouterr().out
    assert "running 1 task(s), at most 1 at a time, 2 runs at once in each task (--runs-per-gpu)" in out
    grid = Path(re.search(r"run directory: (\S+)", out).group(1))
    done = [json.loads((grid / f"row-{i}" / "done").read_text()) for i in (0, 1)]
    assert [d["job"] for d in done] == ["local_0", "local_0"], logs(grid)
    assert max(d["start"] for d in done) < min(d["end"] for d in done), done
    assert "final metrics" in (grid / "row-0.out").read_text() and (grid / "task-0.out").exists()
