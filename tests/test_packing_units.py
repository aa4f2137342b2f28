"""Packing and node-local data without Slurm: the options' checks, the dry run's summary, out-of-memory as one line,
and the node-local copy's life (made once, verified, replaced when corrupt or stale, skipped when it cannot be made).
The same on the local Slurm: tests/test_packing.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import QUICK
from toy import ToyClassifier

import slurm_train
from support.data.downloads import prepare_dataset
from support.data.local_copy import COPY_RECORD, LOCAL_DATA_ENV, copy_dir, staged
from support.slurm import packing


def data_pt(tmp_path: Path, values: list[int]) -> Path:
    path = tmp_path / "shared" / "toyset" / "data.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": torch.tensor(values, dtype=torch.uint8)}, path)
    return path


def test_without_local_scratch_the_shared_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(LOCAL_DATA_ENV, raising=False)
    source = data_pt(tmp_path, [1, 2, 3])
    assert staged(source, "fp") == source
    monkeypatch.setenv(LOCAL_DATA_ENV, "")  # a node whose $TMPDIR is unset: the job script exported it empty
    assert staged(source, "fp") == source


def test_the_copy_is_made_once_verified_and_replaced_when_corrupt_or_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    scratch = tmp_path / "node-scratch"
    monkeypatch.setenv(LOCAL_DATA_ENV, str(scratch))
    source = data_pt(tmp_path, [1, 2, 3])
    copy = staged(source, "fp1")
    assert copy == copy_dir(source, scratch) / "data.pt" and copy.read_bytes() == source.read_bytes()
    assert "copying" in capsys.readouterr().out
    assert staged(source, "fp1") == copy  # the second run on the node reads it, verified
    assert capsys.readouterr().out.startswith(f"data: reading the node-local copy {copy} of {source}")

    corrupt = bytearray(copy.read_bytes())
    corrupt[-1] ^= 0xFF
    copy.write_bytes(bytes(corrupt))
    assert staged(source, "fp1") == copy and copy.read_bytes() == source.read_bytes()
    assert "is corrupt (its SHA-256 differs from the copy's): copying" in capsys.readouterr().out

    staged(source, "fp2")  # the declaration changed (a rebuilt dataset): a new fingerprint
    assert "is stale (the dataset was rebuilt since)" in capsys.readouterr().out
    data_pt(tmp_path, [4, 5, 6, 7])  # rebuilt in place: another size and modification time
    assert torch.load(staged(source, "fp2"))["x"].tolist() == [4, 5, 6, 7]
    assert "is stale" in capsys.readouterr().out
    record = json.loads((copy.parent / COPY_RECORD).read_text())
    assert record["fingerprint"] == "fp2" and record["source"] == str(source.resolve())

    copy.unlink()  # the site cleaned its scratch, the record stayed
    assert staged(source, "fp2") == copy and copy.exists()
    assert "is missing" in capsys.readouterr().out


def test_a_copy_that_cannot_be_made_is_said_and_the_shared_file_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the scratch directory should be")
    monkeypatch.setenv(LOCAL_DATA_ENV, str(blocker))
    source = data_pt(tmp_path, [1])
    assert staged(source, "fp") == source
    assert re.search(rf"data: cannot copy {re.escape(str(source))} to {re.escape(str(blocker))} \(.+\): reading it "
                     "from the shared filesystem", capsys.readouterr().out)


def test_prepare_dataset_returns_the_node_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    class Declaration:
        files = ()

        @staticmethod
        def build(raw: Path) -> dict[str, torch.Tensor]:
            return {"x": torch.zeros(4, 1, 2, 2, dtype=torch.uint8), "y": torch.zeros(4, dtype=torch.int64)}

    monkeypatch.setenv(LOCAL_DATA_ENV, str(tmp_path / "scratch"))
    first = prepare_dataset("blank", Declaration(), tmp_path / "data")  # built, then copied
    again = prepare_dataset("blank", Declaration(), tmp_path / "data")  # the fast path: copied already
    assert first == again and first.is_relative_to(tmp_path / "scratch")
    assert torch.load(first)["x"].shape == (4, 1, 2, 2)


def test_out_of_memory_is_one_line_that_names_the_packing(monkeypatch: pytest.MonkeyPatch):
    err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)\nmore")
    monkeypatch.setenv(packing.RUNS_PER_GPU_ENV, "4")
    line = packing.out_of_memory_line(err)
    assert line.startswith("error: CUDA out of memory while packed 4 per GPU (CUDA out of memory. Tried to allocate")
    assert "lower --runs-per-gpu" in line and "\n" not in line
    monkeypatch.setenv(packing.RUNS_PER_GPU_ENV, "1")
    assert "--runs-per-gpu" not in packing.out_of_memory_line(err) and "--data.batch_size" in \
        packing.out_of_memory_line(err)


class OutOfMemoryOnStep(ToyClassifier):
    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")


def test_train_py_says_out_of_memory_in_one_line_and_exits_nonzero(
        toy_in_train: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import train

    monkeypatch.setitem(train.CLI_SETUP, "model_class", OutOfMemoryOnStep)
    monkeypatch.setattr(train, "MODEL_CLASS", OutOfMemoryOnStep)
    monkeypatch.setenv(packing.RUNS_PER_GPU_ENV, "2")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(SystemExit) as stopped:
        train.main([*QUICK, "--trainer.max_epochs=1", f"--run_dir={tmp_path / 'run'}"])
    assert str(stopped.value.code).startswith("error: CUDA out of memory while packed 2 per GPU")


@pytest.mark.parametrize("argv, message", [
    (["--runs-per-gpu", "0"], "--runs-per-gpu must be at least 1, got 0"),
    (["--runs-per-gpu", "2", "--nodes", "2"], "--runs-per-gpu packs grid rows and search workers of one node"),
    (["--runs-per-gpu", "2", "--agents", "e/p/s", "--count", "2"], "drop it for --agents"),
    (["--resume", "runs/x", "--runs-per-gpu", "2"], "--resume reruns the grid as it was written: drop --runs-per-gpu"),
])
def test_bad_packing_options_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as stopped:
        slurm_train.parse_args(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_dry_run_says_how_many_runs_share_a_gpu_and_how_many_tasks(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(tmp_path / "clusters.toml"))
    (tmp_path / "clusters.toml").write_text(Path(slurm_train.REPO_DIR / "clusters.toml").read_text().replace(
        'local_scratch = ""  # no node-local disk known', 'local_scratch = "$TMPDIR"  # as HEC', 1))
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"program": "train.py", "method": "grid",
                                 "metric": {"name": "val/loss", "goal": "minimize"},
                                 "parameters": {"optimizer.lr": {"values": [0.1, 0.01, 0.001, 1e-4, 1e-5]}}}))
    assert slurm_train.main(["--sweep-config", str(sweep), "--runs-per-gpu", "2", "--dry-run", "--runs-dir",
                             str(tmp_path / "runs"), "--gpus-per-node", "0"]) == 0
    out = capsys.readouterr().out
    # --gpus-per-node 0: the runs share the CPUs, not a GPU
    assert "#SBATCH --array=0-2%4" in out and "# 5 rows, 2 runs sharing the CPUs: 3 tasks, at most 4 tasks" in out
    assert "2 sharing the CPUs at once: 3 array tasks" in out and "--output=" in out and "/task-%a.out" in out
    assert "2 per GPU" not in out and "runs per GPU" not in out
    assert 'export MLMODELDEV_LOCAL_DATA="$TMPDIR"' in out  # the cluster's node-local disk (clusters.toml)
    assert not (tmp_path / "runs").exists()
    assert slurm_train.main(["--sweep-config", str(sweep), "--runs-per-gpu", "2", "--dry-run", "--no-local-data",
                             "--runs-dir", str(tmp_path / "runs"), "--gpus-per-node", "1", "--",
                             "--optimizer.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "MLMODELDEV_LOCAL_DATA" not in out and "2 per GPU at once: 3 array tasks" in out
    # The value after -- replaces the sweep's in every row: one --optimizer.lr each, and a note saying so.
    rows = [line for line in out.splitlines() if line.startswith("# row ")]
    assert len(rows) == 5 and all(row.count("--optimizer.lr=") == 1 and row.endswith("--optimizer.lr=0.5")
                                  for row in rows), rows
    assert "note: the arguments after -- set optimizer.lr: that value replaces the sweep's in every row" in out
    assert os.environ.get(packing.RUNS_PER_GPU_ENV) is None


def test_a_requeued_packed_task_gives_each_worker_back_its_own_run():
    """Workers 3, 4 and 5 share array task 7_1 (--runs-per-gpu 3): after a requeue each takes up its own run."""
    from support.search.records import is_own

    records = [{"owner": {"host": "n1", "pid": 10 + w, "worker": w, "slurm_task": "7_1"}} for w in (3, 4, 5)]
    for worker in (3, 4, 5):
        owner = {"host": "n2", "pid": 99, "worker": worker, "slurm_task": "7_1"}  # back on another node
        assert [is_own(record, owner) for record in records] == [w == worker for w in (3, 4, 5)]
    assert not is_own(records[0], {"host": "n1", "pid": 1, "worker": 3, "slurm_task": "8_1"})
