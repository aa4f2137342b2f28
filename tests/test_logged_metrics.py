"""The metric-name check reads the model class in use (and the classes it inherits from), not its whole file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import sweep
import train

TWO_MODELS = '''
import pytorch_lightning as pl


class Base(pl.LightningModule):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", 0.0)


class NewModel(Base):
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log(f"{'val'}/acc", 1.0)


class OldModel(pl.LightningModule):  # kept for comparison, not in use
    def validation_step(self, batch, batch_idx):
        self.log("val/f1", 1.0)
'''


def test_only_the_model_in_use_and_its_bases_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "two_models.py").write_text(TWO_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import two_models

    try:
        monkeypatch.setattr(train, "MODEL_CLASS", two_models.NewModel)
        assert sweep.metric_problem("val/loss") is None  # logged by its base class
        assert sweep.metric_problem("val/acc") is None  # an f-string in the class itself
        problem, certain = sweep.metric_problem("val/f1")  # only OldModel logs it
        assert certain and "'val/f1' is never logged; NewModel logs val/loss, .+/acc" in problem
        monkeypatch.setattr(train, "MODEL_CLASS", two_models.OldModel)
        assert sweep.metric_problem("val/f1") is None and sweep.metric_problem("val/loss")[1]
    finally:
        sys.modules.pop("two_models", None)
