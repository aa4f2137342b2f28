"""train.py's wiring with a model and DataModule of the tests' own (tests/toy.py), put in its "What you change"
section the way a researcher would: no hidden contract beyond what Lightning itself asks of them."""

from __future__ import annotations

import pytest
import torch
from conftest import QUICK
from toy import ToyClassifier

import sweep
import train


def test_a_model_with_its_own_optimizer_keeps_it_and_constructor_arguments_are_linked(toy_in_train: None):
    config = train.parse_config(["--data.num_classes=4"])
    assert config.get("optimizer") is None  # no default optimizer: ToyClassifier.configure_optimizers is kept
    assert config.model.num_classes == 4  # linked from the DataModule's constructor argument of the same name
    cli = train.build_cli(QUICK + ["--data.num_classes=4", "--trainer.max_epochs=1"])
    assert isinstance(cli.model.configure_optimizers(), torch.optim.SGD)
    assert cli.model.head.out_features == 4


def test_the_toy_pair_trains_and_tests_through_train_py(toy_in_train: None):
    results = train.main(QUICK + ["--trainer.max_epochs=2", "--run_dir=run"])
    assert {"test/loss", "test/acc"} <= results.keys() and results["best_checkpoint"]


def test_the_monitored_metric_has_one_source(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setattr(train, "MONITOR", "val/acc")
    monkeypatch.setattr(train, "MONITOR_MODE", "max")
    cli = train.build_cli(QUICK)
    assert (cli.config_init.checkpoint.monitor, cli.config_init.checkpoint.mode) == ("val/acc", "max")
    assert (cli.trainer.early_stopping_callback.monitor, cli.trainer.early_stopping_callback.mode) == ("val/acc", "max")
    assert sweep.with_default_metric(sweep.SWEEP_CONFIG)["metric"] == {"name": "val/acc", "goal": "maximize"}
    other = {**sweep.SWEEP_CONFIG, "metric": {"name": "val/loss", "goal": "minimize"}}
    notes = sweep.notes(other)
    assert len(notes) == 1 and "MONITOR='val/acc'" in notes[0] and "val/loss" in notes[0]
    assert sweep.notes(sweep.SWEEP_CONFIG) == []


def test_metric_names_built_with_f_strings_pass_and_unknowable_ones_are_a_warning(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(train, "MODEL_CLASS", ToyClassifier)  # logs f"{stage}/loss", f"{stage}/acc"
    assert sweep.metric_problem("val/acc") is None and sweep.metric_problem("test/loss") is None
    problem, certain = sweep.metric_problem("val/f1")
    assert certain and "never logged" in problem

    class LogsADict(ToyClassifier):
        def validation_step(self, batch, batch_idx):
            self.log_dict({"val/f1": 1.0})

    monkeypatch.setattr(train, "MODEL_CLASS", LogsADict)  # this file's source has a log_dict call
    problem, certain = sweep.metric_problem("val/f1x")
    assert not certain and "only a run shows" in problem
