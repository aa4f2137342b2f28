"""A diverged run (too high a learning rate) stops at its first NaN with one line naming the epoch, the step and the
value, exits 1, and leaves no checkpoint of the NaN state: on one process, under DDP on 2 CPU processes, and in an
offline search, which records the run as failed while the other run finishes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import QUICK, run_script

pytestmark = [pytest.mark.example_model, pytest.mark.example_data]

DIVERGES = ["--optimizer.lr=1e6", "--trainer.max_epochs=3", "--cka.every_n_epochs=0", *QUICK]
ONE_LINE = re.compile(r"^error: the (training loss|monitored metric \S+) is nan at epoch \d+, step \d+: the run "
                      r"diverged.*lower --optimizer.lr")


def assert_stopped_at_nan(result, run_dir: Path) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(errors) == 1 and ONE_LINE.match(errors[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "final metrics" not in result.stdout
    assert not list(run_dir.glob("checkpoints/*.ckpt"))  # nothing saved the NaN state (as best or as last)


@pytest.mark.parametrize("ddp", [[], ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]],
                         ids=["one-process", "ddp-2-cpu"])
@pytest.mark.slow
def test_a_diverged_run_stops_with_one_line_and_no_nan_checkpoint(ddp: list[str], tmp_path: Path):
    result = run_script("train.py", *DIVERGES, *ddp, "--run_dir=run", timeout=240)
    assert_stopped_at_nan(result, tmp_path / "run")


@pytest.mark.slow
def test_a_search_records_the_diverged_run_as_failed(tmp_path: Path):
    search = {"name": "nan-search", "program": "train.py", "method": "grid",
              "metric": {"name": "val/loss", "goal": "minimize"},
              "parameters": {"optimizer.lr": {"values": [3e-3, 1e6]}}}
    (tmp_path / "search.json").write_text(json.dumps(search))
    launched = run_script("slurm_train.py", "--search", "--count", "2", "--local", "--max-concurrent", "1",
                          "--sweep-config", str(tmp_path / "search.json"), "--",
                          "--trainer.max_epochs=2", "--cka.every_n_epochs=0", *QUICK, timeout=400)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    search_dir = Path(re.search(r"run directory: (\S+)", launched.stdout).group(1))
    records = {r["config"]["optimizer.lr"]: r for r in map(json.loads, map(Path.read_text,
                                                                            sorted(search_dir.glob("run-*.json"))))}
    assert records[1e6]["state"] == "failed" and records[1e6]["exit_code"] == 1, records[1e6]
    assert records[1e6]["best"] is None and not records[1e6]["history"], records[1e6]
    assert records[3e-3]["state"] == "finished" and records[3e-3]["best"] < 1, records[3e-3]
    log = (search_dir / f"{records[1e6]['name']}.out").read_text()
    assert "error: the training loss is nan at epoch" in log or "error: the monitored metric" in log, log[-2000:]
    status = run_script("sweep.py", "--status", str(search_dir))
    assert status.returncode == 0 and "failed" in status.stdout, status.stdout + status.stderr
