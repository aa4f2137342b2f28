"""Every search method with its metric named or taken from train.py's MONITOR, through every sweep path: the engine
always sees the metric (wandb's bayes and hyperband need it), sweep.py --dry-run and --list work, and a 2-run offline
search trains; random draws repeat no point while the space has unseen ones."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import sweeps
from conftest import run_script

import sweep
import train
from support.search import records as search_records

METHODS = ["grid", "random", "bayes"]
NAMED = {"name": "val/acc", "goal": "maximize"}
SPACE = {"optimizer.lr": {"values": [0.001, 0.003]}, "model.hidden_dim": {"values": [16, 32]}}
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--cka.every_n_epochs=0"]


def config_for(method: str, named: bool) -> dict[str, Any]:
    config = {"program": "train.py", "method": method, "parameters": SPACE,
              "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 3}}
    return {**config, "metric": NAMED} if named else config


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every config handed to wandb's engine, wherever it is called from."""
    seen: list[dict[str, Any]] = []
    for name in ("next_runs", "next_run", "stop_runs"):
        real = getattr(sweeps, name)

        def spy(config: dict[str, Any], *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.append(dict(config))
            return _real(config, *args, **kwargs)

        monkeypatch.setattr(sweeps, name, spy)
    return seen


@pytest.mark.example_model
@pytest.mark.parametrize("named", [True, False], ids=["metric-named", "metric-from-MONITOR"])
@pytest.mark.parametrize("method", METHODS)
def test_dry_run_and_list_work_for_every_method_and_the_engine_always_sees_the_metric(
        method: str, named: bool, engine_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    config = config_for(method, named)
    metric = NAMED if named else {"name": train.MONITOR, "goal": {"min": "minimize", "max": "maximize"}[
        train.MONITOR_MODE]}
    monkeypatch.setattr(sweep, "SWEEP_CONFIG", config)
    assert sweep.main(["--dry-run"]) == 0
    assert f"{method} search over 2 parameters (grid of 4 runs), {metric['goal']} {metric['name']}" in \
        capsys.readouterr().out
    assert sweep.main(["--list"]) == 0  # the grid: the engine's grid search
    assert len(capsys.readouterr().out.splitlines()) == 4
    if method != "grid":
        assert sweep.main(["--list", "--samples", "3"]) == 0
        assert len(set(capsys.readouterr().out.splitlines())) == 3  # three different runs of the four
    for record in ({"sweep": sweep.validate(config), "seed": 0},):  # the offline search's first proposal
        assert search_records.propose(record, [], 1) is not None
    assert engine_calls and all(call.get("metric") == metric for call in engine_calls), engine_calls


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.parametrize("named", [True, False], ids=["metric-named", "metric-from-MONITOR"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_a_two_run_offline_search_trains_for_every_method(method: str, named: bool, tmp_path: Path) -> None:
    """slurm_train.py --search --count 2 --local, as a researcher runs it (bayes without a metric used to die in
    the engine with 'Bayesian search requires "metric" section')."""
    (tmp_path / "sweep.json").write_text(json.dumps(config_for(method, named)))
    result = run_script("slurm_train.py", "--search", "--count", "2", "--max-concurrent", "1", "--local",
                        "--gpus-per-node", "0", "--sweep-config", str(tmp_path / "sweep.json"), "--", *TINY,
                        timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    search_dir = Path(re.search(r"run directory: (\S+)", result.stdout).group(1))
    found = [json.loads(path.read_text()) for path in sorted(search_dir.glob("run-*.json"))]
    logs = "".join(path.read_text() for path in search_dir.glob("*.out"))
    assert [r["state"] for r in found] == ["finished", "finished"], logs
    if method != "bayes":  # four points, two runs: no repeat (bayes proposes where it expects the best)
        assert found[0]["config"] != found[1]["config"]
    assert all(r["best"] is not None for r in found)


def test_random_draws_repeat_no_point_while_the_space_has_unseen_ones() -> None:
    """wandb's random search draws with replacement: 9 draws of a 9-point space repeat one with probability
    1 - 9!/9^9 = 0.999. Here the first 9 cover the space, the 10th may repeat, and the same seed gives the same."""
    space = {"program": "train.py", "method": "random", "metric": {"name": "m", "goal": "minimize"},
             "parameters": {"a": {"values": [1, 2, 3]}, "b": {"values": ["x", "y", "z"]}}}
    for seed in range(5):
        draws = sweep.random_configs(10, seed, space)
        assert len({json.dumps(d, sort_keys=True) for d in draws[:9]}) == 9, draws
        assert draws == sweep.random_configs(10, seed, space)
    # The offline search: each proposal avoids the runs the records already hold.
    records: list[dict[str, Any]] = []
    for number in range(1, 10):
        proposal = search_records.propose({"sweep": space, "seed": 3}, records, number)
        assert proposal["config"] not in [r["config"] for r in records], (number, proposal["config"])
        records.append(proposal)


# --- a sweep over classes with their own arguments --------------------------------------------------------------
ADAM_OR_SGD = {"values": [{"class_path": "torch.optim.Adam"},
                          {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}}]}


@pytest.mark.example_model
def test_an_optimizer_sweep_is_written_as_train_py_takes_it_and_a_class_argument_is_blamed_by_name() -> None:
    config = {"program": "train.py", "method": "grid", "parameters": {"optimizer": ADAM_OR_SGD}}
    assert [run["optimizer"] for run in sweep.grid_configs(sweep.validate(config))] == ADAM_OR_SGD["values"]
    # Momentum for every class: Adam lacks it. The error names optimizer.momentum (not --optimizer=Adam, which parses)
    # and shows the per-class form.
    shared = {**config, "parameters": {"optimizer": {"values": ["Adam", "SGD"]}, "optimizer.momentum": {"value": 0.9}}}
    with pytest.raises(sweep.SweepConfigError) as raised:
        sweep.validate(shared)
    message = str(raised.value)
    assert message.startswith("parameters/optimizer.momentum: train.py rejects --optimizer=Adam "
                              "--optimizer.momentum=0.9")
    assert "Adam takes no momentum" in message and '"init_args": {"momentum": 0.9}' in message
    # A value for a class's argument that does not arrive is still named.
    wrong = {**config, "parameters": {"optimizer": {"value": {"class_path": "SGD", "init_args": {"nesterov": "x"}}}}}
    with pytest.raises(sweep.SweepConfigError, match="parameters/optimizer"):
        sweep.validate(wrong)


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.slow
def test_an_optimizer_sweep_runs_offline_each_run_with_its_own_optimizers_defaults(tmp_path: Path) -> None:
    config = {"program": "train.py", "method": "grid", "metric": {"name": train.MONITOR, "goal": "minimize"},
              "parameters": {"optimizer": ADAM_OR_SGD}}
    (tmp_path / "sweep.json").write_text(json.dumps(config))
    result = run_script("slurm_train.py", "--search", "--count", "2", "--max-concurrent", "1", "--local",
                        "--gpus-per-node", "0", "--sweep-config", str(tmp_path / "sweep.json"), "--", *TINY,
                        timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    search_dir = Path(re.search(r"run directory: (\S+)", result.stdout).group(1))
    import torch
    import yaml

    expected = {"torch.optim.Adam": {"weight_decay": 0, "lr": 0.001, "betas": [0.9, 0.999]},
                "torch.optim.SGD": {"weight_decay": 0, "lr": 0.001, "momentum": 0.9, "dampening": 0}}
    saved = {}
    for run_dir in sorted(search_dir.glob("run-*/")):
        optimizer = yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]
        saved[optimizer["class_path"]] = optimizer["init_args"]
    assert sorted(saved) == sorted(expected), saved
    for class_path, init_args in saved.items():
        assert {key: init_args[key] for key in expected[class_path]} == expected[class_path], (class_path, init_args)
    assert torch.optim.SGD([torch.zeros(1)]).defaults["weight_decay"] == 0  # what "its own default" means
