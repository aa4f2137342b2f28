"""An offline search that trains for real: slurm_train.py --search --local with bayes and hyperband, 2 workers,
6 runs of train.py on the embedded digits, no wandb credentials and no network; then sweep.py --status."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_script, script_env

# These tests run the example model and data (their keys, their speed): skipped once you replace them.
pytestmark = [pytest.mark.example_model, pytest.mark.example_data]

SEARCH = {"name": "tiny-search", "program": "train.py", "method": "bayes",
          "metric": {"name": "val/loss", "goal": "minimize"},
          "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 3},
          "parameters": {"optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 3e-2},
                         "model.hidden_dim": {"values": [16, 32]}}}
EPOCHS = ["--trainer.max_epochs=3", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
          "--data.batch_size=256", "--cka.every_n_epochs=0"]


@pytest.mark.slow
def test_a_bayes_search_with_hyperband_trains_offline_and_reports(tmp_path: Path) -> None:
    (tmp_path / "search.json").write_text(json.dumps(SEARCH))
    home = tmp_path / "home"  # no ~/.netrc: no wandb credentials
    home.mkdir()
    env = script_env(HOME=str(home))
    env.pop("WANDB_MODE")  # as on a cluster: nothing says offline, there are just no credentials
    launched = subprocess.run([sys.executable, str(REPO / "slurm_train.py"), "--search", "--count", "6",
                               "--max-concurrent", "2", "--local", "--gpus-per-node", "0", "--sweep-config",
                               str(tmp_path / "search.json"), "--seed", "1", "--", *EPOCHS],
                              capture_output=True, text=True, timeout=600, env=env)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    search_dir = Path(re.search(r"run directory: (\S+)", launched.stdout).group(1))
    records = [json.loads(path.read_text()) for path in sorted(search_dir.glob("run-*.json"))]
    logs = "".join(path.read_text() for path in search_dir.glob("*.out"))
    assert [r["number"] for r in records] == [1, 2, 3, 4, 5, 6], logs
    assert all(r["state"] in ("finished", "stopped") for r in records), [(r["name"], r["state"]) for r in records]
    assert all(r["history"] and r["test"].get("test/acc") is not None for r in records)
    assert all(len(r["history"]) < 3 for r in records if r["state"] == "stopped")
    for record in records:  # no credentials: each run logged offline, under its own id, derived from the search
        run_dir = search_dir / record["name"]
        wandb_id = (run_dir / "wandb_id").read_text().strip()
        assert wandb_id == f"{search_dir.name}-{record['name']}"
        assert list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}")), logs
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert f"group: {search_dir.name}" in (run_dir / "config.yaml").read_text()

    status = run_script("sweep.py", "--status", str(search_dir))
    assert status.returncode == 0, status.stderr
    best = min(records, key=lambda r: r["best"])
    first_row = next(line for line in status.stdout.splitlines() if re.match(r"\s*\d+\s", line))
    assert first_row.split()[0].lstrip("0") == str(best["number"]), status.stdout
    assert (search_dir / "status.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_search_dry_run_writes_nothing_and_bad_options_are_one_line(tmp_path: Path) -> None:
    dry = run_script("slurm_train.py", "--search", "--count", "4", "--max-concurrent", "3", "--dry-run",
                     "--gpus-per-node", "0", "--", "--trainer.max_epochs=2")
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH --array=0-2" in dry.stdout and '"$code/support/search/worker.py"' in dry.stdout
    assert "random search of 4 runs by 3 workers, minimize val/loss, hyperband stopping" in dry.stdout
    for args, message in [(["--search"], "--search needs --count N"),
                          (["--count", "3"], "--search needs --count N"),
                          (["--search", "--count", "3", "--sample", "2"], "--search needs --count N"),
                          (["--search", "--count", "3", "--", "--run_dir=x"], "--run_dir after -- cannot be given")]:
        result = run_script("slurm_train.py", *args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()[-1]) < 300
    assert not (tmp_path / "runs").exists()  # nothing written by any of them


def test_folds_are_a_dimension_the_sweep_checks() -> None:
    """Cross-validation in a search: data.fold as a parameter reaches train.py; a fold outside data.folds is named."""
    import sweep

    folds = {"data.folds": {"value": 3}, "data.fold": {"values": [0, 1, 2]}, "optimizer.lr": {"values": [1e-3, 3e-3]}}
    config = {**SEARCH, "method": "grid", "parameters": folds}
    assert len(sweep.grid_configs(sweep.validate(config))) == 6
    with pytest.raises(sweep.SweepConfigError, match="data.fold"):
        sweep.validate({**config, "parameters": {**folds, "data.fold": {"values": [0, 3]}}})
