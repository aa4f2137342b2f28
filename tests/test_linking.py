"""train.py's LINKED: a DataModule attribute set in its constructor is linked to the model's argument of the same
name; a name the model takes that the DataModule cannot provide gets one warning saying why
(support/training/linking.py). Names the DataModule makes in setup(): tests/test_any_model.py."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from conftest import QUICK
from toy import ToyClassifier, ToyData

import train
from support.training import linking


class TwoClasses(ToyData):
    """num_classes is no constructor argument here: the constructor sets it."""

    def __init__(self, samples: int = 240, batch_size: int = 16) -> None:
        super().__init__(samples=samples, num_classes=2, batch_size=batch_size)
        self.num_classes = 2


class Unlabelled(pl.LightningDataModule):
    def setup(self, stage: str | None = None) -> None:
        self.labels = 5  # by another name: nothing provides num_classes


def use(monkeypatch: pytest.MonkeyPatch, data_class: type) -> None:
    monkeypatch.setattr(train, "MODEL_CLASS", ToyClassifier)
    monkeypatch.setattr(train, "DATAMODULE_CLASS", data_class)
    monkeypatch.setitem(train.CLI_SETUP, "model_class", ToyClassifier)
    monkeypatch.setitem(train.CLI_SETUP, "datamodule_class", data_class)
    monkeypatch.setattr(linking, "WARNED", set())


def test_an_attribute_set_in_the_constructor_is_linked(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    use(monkeypatch, TwoClasses)
    assert linking.set_in_init(TwoClasses) >= {"num_classes", "features", "splits"}  # its own and ToyData's
    assert train.linked_arguments() == [("num_classes", "instantiate")]
    cli = train.build_cli(QUICK + ["--trainer.max_epochs=1", "--run_dir=run"], record=False)
    assert cli.model.head.out_features == 2  # not ToyClassifier's default of 3
    assert "LINKED" not in capsys.readouterr().err


def test_a_name_the_data_cannot_provide_gets_one_warning_saying_why(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    use(monkeypatch, Unlabelled)
    assert train.linked_arguments() == [] and train.linked_arguments() == []
    warnings = [line for line in capsys.readouterr().err.splitlines() if "LINKED" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: LINKED 'num_classes' is not linked: Unlabelled has no property")
    assert "ToyClassifier keeps its default num_classes=3" in warnings[0] and "setup()" in warnings[0]
