"""Lazy layers (torch.nn.LazyLinear, LazyConv2d, ...) under DDP: torch's DistributedDataParallel refuses a module
with uninitialized parameters ("Modules with uninitialized parameters can't be used with DistributedDataParallel"),
and Lightning leaves that to the user. MaterializeLazyLayers runs the model once on one real batch, in eval mode and
without gradients, in the `setup` hook: after the DataModule's setup, before the strategy moves and wraps the model
and before the optimizer is built (so it sees the real parameters). A resumed run then loads its checkpoint into the
materialized layers, and its random state comes from the checkpoint as any run's does (support/run_dir/rng_state.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch.nn.parameter import is_lazy
from torchmetrics import Metric

from support.errors import SettingError

# For each stage: the step that runs the batch, and the DataModule hook that gives it (validation first: no
# optimizer, no backward, the least a step can do).
STEPS = {"fit": [("validation_step", "val_dataloader"), ("training_step", "train_dataloader")],
         "validate": [("validation_step", "val_dataloader")], "test": [("test_step", "test_dataloader")],
         "predict": [("predict_step", "predict_dataloader")]}


def has_lazy_layers(module: torch.nn.Module) -> bool:
    return any(is_lazy(tensor) for tensor in [*module.parameters(), *module.buffers()])


@contextmanager
def shapes_only(pl_module: LightningModule) -> Iterator[None]:
    """Eval mode (batch norm statistics stay as they are), no gradients, and self.log muted: outside the loops,
    Lightning refuses it."""
    training = pl_module.training
    pl_module.eval()
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            yield
    finally:
        del pl_module.log, pl_module.log_dict  # the class's methods again
        pl_module.train(training)
        for module in pl_module.modules():  # the step updated its torchmetrics accumulators: that batch never ran
            if isinstance(module, Metric):
                module.reset()


class MaterializeLazyLayers(Callback):
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not has_lazy_layers(pl_module):
            return
        with shapes_only(pl_module):
            if pl_module.example_input_array is not None:  # Lightning's own convention for an example input
                pl_module(pl_module.example_input_array)
            else:
                step, batch = self._first_batch(trainer, pl_module, stage)
                getattr(pl_module, step)(batch, 0)
        if has_lazy_layers(pl_module):
            raise SettingError(f"{type(pl_module).__name__} still has uninitialized lazy layers after a forward pass "
                               "on one batch: call every lazy layer in the step, or set example_input_array")

    @staticmethod
    def _first_batch(trainer: Trainer, pl_module: LightningModule, stage: str) -> tuple[str, Any]:
        data = trainer.datamodule
        for step, hook in STEPS.get(stage, []):
            if data is not None and is_overridden(step, pl_module) and is_overridden(hook, data):
                return step, next(iter(getattr(data, hook)()))
        raise SettingError(f"{type(pl_module).__name__} has lazy layers, which need one batch to get their shapes "
                           "before training on several processes: give the Trainer a DataModule, or set the model's "
                           "example_input_array")
