"""Models built the ways Lightning documents train through train.py as they would by hand (tests/any_models.py):
layers made in setup() or configure_model() are in the optimizer, train and resume exactly, and evaluate.py reads
their runs; LINKED names that the DataModule makes in setup(); parameters no optimizer holds are named; several
optimizers are told apart in the learning-rate lines (support/training/optimizers.py, linking.py)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from any_models import GAN, TEXT, BlobData, CharData, EmbeddingInConfigureModel, EmbeddingInSetup, LinkedVocabulary
from conftest import QUICK
from pytorch_lightning import Callback

import evaluate
import train
from support.data.downloads import DownloadError
from support.training import linking

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHORT = [*QUICK, "--cka.every_n_epochs=0", "--early_stopping.patience=100"]


def use(monkeypatch: pytest.MonkeyPatch, model_class: type, data_class: type, linked: tuple[str, ...] = ()) -> None:
    """train.py as it reads after a researcher names these classes (and LINKED) in "What you change"."""
    monkeypatch.setattr(train, "MODEL_CLASS", model_class)
    monkeypatch.setattr(train, "DATAMODULE_CLASS", data_class)
    monkeypatch.setitem(train.CLI_SETUP, "model_class", model_class)
    monkeypatch.setitem(train.CLI_SETUP, "datamodule_class", data_class)
    monkeypatch.setattr(train, "LINKED", linked)
    monkeypatch.setattr(linking, "WARNED", set())


class FirstWeights(Callback):
    """The model's weights when training starts (after setup() and configure_model())."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def fit(*args: str) -> tuple[Any, dict[str, Any], FirstWeights]:
    cli = train.build_cli([*SHORT, *args])
    first = FirstWeights()
    cli.trainer.callbacks.append(first)
    try:
        return cli, train.fit_and_test(cli), first
    finally:
        train.finish_wandb()


def last(run_dir: str) -> dict[str, Any]:
    return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("model_class", [EmbeddingInSetup, EmbeddingInConfigureModel])
def test_a_layer_built_in_setup_trains_resumes_exactly_and_evaluates(monkeypatch: pytest.MonkeyPatch,
                                                                      model_class: type) -> None:
    use(monkeypatch, model_class, CharData)
    cli, ended, first = fit("--run_dir=full", "--trainer.max_epochs=3")
    trained = cli.model.state_dict()
    assert not torch.equal(first.weights["embed.weight"], trained["embed.weight"]), "the embedding never trained"
    assert not torch.equal(first.weights["head.weight"], trained["head.weight"])
    assert len(cli.trainer.optimizers[0].param_groups[0]["params"]) == 3  # head's weight and bias, the embedding
    fit("--run_dir=part", "--trainer.max_epochs=2")
    fit("--run_dir=part", "--ckpt_path=last", "--trainer.max_epochs=3")
    full, resumed = last("full"), last("part")
    assert full["global_step"] == resumed["global_step"] == 36
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    again = evaluate.evaluate(Path("full"))
    assert again["test/loss"] == ended["test/loss"]


def test_a_linked_name_that_the_datamodule_makes_in_setup(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    use(monkeypatch, LinkedVocabulary, CharData, linked=("vocab_size",))
    assert train.linked_arguments() == [("vocab_size", "instantiate")]
    cli = train.build_cli([*SHORT, "--run_dir=run", "--trainer.max_epochs=1"])
    assert cli.model.embed.num_embeddings == len(set(TEXT)) == cli.datamodule.vocab_size
    assert "LINKED" not in capsys.readouterr().err
    train.parse_config([*SHORT, "--trainer.max_epochs=1"])  # sweep.py's and check.py's parse (meta device) too


class NoVocabulary(CharData):
    """Its setup() makes no vocabulary: the property it inherits can never be read."""

    def setup(self, stage: str) -> None:
        self.prepared = True


def test_a_linked_name_still_missing_after_setup_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, LinkedVocabulary, NoVocabulary, linked=("vocab_size",))
    with pytest.raises(SystemExit) as stop:
        train.build_cli_or_exit([*SHORT, "--run_dir=run", "--trainer.max_epochs=1"])
    line = str(stop.value)
    assert line.startswith("error: LINKED 'vocab_size': NoVocabulary has no 'vocab_size' even after its "
                           "prepare_data() and setup('fit')") and "drop it from LINKED" in line, line


class UnreachableVocabulary(CharData):
    """Its setup() needs data it cannot download."""

    def setup(self, stage: str) -> None:
        raise DownloadError("cannot download vocab.txt of dataset 'chars': connection refused; try again later")


def test_data_that_cannot_be_had_for_a_linked_name_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, LinkedVocabulary, UnreachableVocabulary, linked=("vocab_size",))
    with pytest.raises(SystemExit) as stop:
        train.build_cli_or_exit([*SHORT, "--run_dir=run", "--trainer.max_epochs=1"])
    assert str(stop.value) == "error: cannot download vocab.txt of dataset 'chars': connection refused; try again later"


class HeadOnlyOptimizer(EmbeddingInSetup):
    """Its own configure_optimizers gives the optimizer only the head: the embedding would never train."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_parameters_that_no_optimizer_holds_are_named(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    use(monkeypatch, HeadOnlyOptimizer, CharData)
    fit("--run_dir=run", "--trainer.max_epochs=1")
    warned = [line for line in capsys.readouterr().err.splitlines() if "no optimizer holds" in line]
    assert warned == ["warning: embed.weight need(s) gradients but no optimizer holds them, so they will not "
                      "train: build those layers before configure_optimizers runs (in __init__, setup() or "
                      "configure_model()) and give their parameters to an optimizer, or set requires_grad=False"]


def test_two_optimizers_are_named_by_the_parts_they_train(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, GAN, BlobData)
    fit("--run_dir=run", "--trainer.max_epochs=1", "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        "--trainer.logger.save_dir=logs", "--trainer.log_every_n_steps=1")
    with next(Path("logs").rglob("metrics.csv")).open() as file:
        columns = next(csv.reader(file))
    assert {"lr-Adam/generator", "lr-Adam-1/discriminator"} <= set(columns), columns
