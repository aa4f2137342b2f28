"""train.py's side of an offline search: the run reports each validation epoch's metric into its record and stops
when hyperband says so (support/search/records.py). Active only when a search worker set SEARCH_RUN_RECORD."""

from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from support.search.records import load_search, report_epoch, report_test


class SearchReport(Callback):
    """After each validation epoch (not the sanity check), rank 0 adds the search's metric to the run's record and
    asks the engine whether hyperband stops the run; all ranks then stop together (trainer.should_stop), so the run
    ends as any finished run does: last.ckpt written at this validation, the best checkpoint tested, wandb closed.
    After testing, the test metrics go into the record too, for sweep.py --status."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.metric = load_search(record.parent)["sweep"]["metric"]["name"]

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        stop = False
        if trainer.is_global_zero and (value := trainer.callback_metrics.get(self.metric)) is not None:
            stop = report_epoch(self.record, trainer.current_epoch, float(value))
        if trainer.strategy.broadcast(stop, src=0):
            trainer.should_stop = True
            rank_zero_info(f"hyperband stops this run after epoch {trainer.current_epoch}: its {self.metric} trails "
                           "the search's other runs at this epoch")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            report_test(self.record, {name: float(value) for name, value in trainer.callback_metrics.items()
                                      if isinstance(value, torch.Tensor) and value.numel() == 1})
