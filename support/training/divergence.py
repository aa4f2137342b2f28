"""Stops a run whose training loss or monitored metric is no longer a finite number (a diverged run: too high a
learning rate, an exploding gradient, a log of zero), with one line saying where. Before, Lightning's EarlyStopping
ended such a run quietly after its epoch, with exit status 0, a "best" checkpoint holding NaN weights and
`test/loss=nan` printed as the result; a sweep or search took it for a finished run.

None of it names the example model or data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Callback

from support.errors import SettingError

CHECK_EVERY = 10  # under DDP, the ranks agree on a non-finite loss every this many batches (one small all-reduce)


class Diverged(SettingError):
    """The run's loss or monitored metric became NaN or infinite: train.py prints the message and exits 1."""


def first_non_finite(values: dict[str, Any]) -> tuple[str, float] | None:
    for name, value in values.items():
        number = float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if isinstance(number, float) and not math.isfinite(number):
            return name, number
    return None


class StopOnNonFinite(Callback):
    """Raises Diverged at the first training batch whose loss is not finite (under DDP: whichever rank sees it, the
    ranks agreeing at most CHECK_EVERY - 1 batches later) and at a validation whose monitored metrics are not
    finite, before the checkpoint callbacks (which Lightning runs last) could save that state as best or last."""

    def __init__(self, monitors: list[str]) -> None:
        self.monitors = [metric for metric in monitors if metric]
        self.seen: tuple[str, float, int, int] | None = None  # (what, value, epoch, step) of this rank's first one

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.seen is None and isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
            self.seen = ("the training loss", float(loss.detach().float().mean()), trainer.current_epoch,
                         trainer.global_step)
        if trainer.world_size > 1:
            if batch_idx % CHECK_EVERY:
                return
            if not trainer.strategy.reduce_boolean_decision(self.seen is not None, all=False):
                return
        self.stop(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.seen is None and (bad := first_non_finite({m: trainer.callback_metrics.get(m) for m in self.monitors})):
            self.seen = (f"the monitored metric {bad[0]}", bad[1], trainer.current_epoch, trainer.global_step)
        if trainer.world_size > 1 and not trainer.strategy.reduce_boolean_decision(self.seen is not None, all=False):
            return
        self.stop(trainer)

    def stop(self, trainer: Trainer) -> None:
        if self.seen is None:
            if trainer.world_size > 1:  # another rank saw it: its rank 0 names it, or this one does in general terms
                raise Diverged(f"the run diverged on another process at epoch {trainer.current_epoch}, step "
                               f"{trainer.global_step}: lower --optimizer.lr, or clip gradients "
                               "(--trainer.gradient_clip_val)")
            return
        what, value, epoch, step = self.seen
        raise Diverged(f"{what} is {value} at epoch {epoch}, step {step}: the run diverged and stopped (its "
                       "checkpoints are from before); lower --optimizer.lr, or clip gradients "
                       "(--trainer.gradient_clip_val=1.0)")
