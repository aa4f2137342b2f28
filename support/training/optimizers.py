"""The optimizer (and scheduler) of --optimizer built when Lightning asks for it, and names for several optimizers.

LightningCLI builds the optimizer of --optimizer from `model.parameters()` while it parses the command line, before
the model's `setup()` and `configure_model()` run: a layer made there (an embedding sized by the data's vocabulary,
Lightning's documented place for it) was in no optimizer, and its weights stayed at their initial values through
training, with nothing said (measured: a character model's `embed.weight` unchanged after 2 epochs). Here the
optimizer is built in `configure_optimizers`, which Lightning calls after both hooks, from the same settings (the
CLI's class choice and defaults included).

Any parameter that still needs a gradient but is held by no optimizer (a model's own `configure_optimizers` that
misses a layer) gets one warning naming it, when training starts: it would not train."""

from __future__ import annotations

from types import MethodType
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.cli import LightningCLI, instantiate_class

from support.errors import warn


def build_when_fit_starts(model: LightningModule, optimizer_init: dict[str, Any],
                          scheduler_init: dict[str, Any] | None = None) -> None:
    """Replaces the CLI's configure_optimizers (an optimizer built at parsing) with one that builds it from the
    parameters the model has when Lightning asks: after setup() and configure_model()."""

    def configure_optimizers(module: LightningModule) -> Any:
        optimizer = instantiate_class(module.parameters(), optimizer_init)
        scheduler = instantiate_class(optimizer, scheduler_init) if scheduler_init else None
        return LightningCLI.configure_optimizers(module, optimizer, scheduler)

    model.configure_optimizers = MethodType(configure_optimizers, model)  # type: ignore[method-assign]


def untrained_parameters(model: LightningModule, optimizers: list[Any]) -> list[str]:
    """The names of the parameters that need a gradient but that no optimizer holds."""
    held = {id(p) for optimizer in optimizers for group in getattr(optimizer, "param_groups", [])
            for p in group["params"]}
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]


def module_names(model: LightningModule, optimizer: Any) -> list[str]:
    """The model's top-level children whose parameters are all in `optimizer`: what the model calls that optimizer's
    part of it (a GAN's generator, its discriminator)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [name for name, child in model.named_children()
            if (params := list(child.parameters())) and all(id(p) in held for p in params)]


class OptimizerChecks(Callback):
    """At the start of training (after configure_optimizers): one warning for parameters no optimizer holds, and,
    when there are several optimizers, each single-group optimizer's group named after the model's parts it trains,
    so the learning-rate lines say `lr-Adam/generator` and `lr-Adam-1/discriminator` rather than `lr-Adam`, `lr-Adam-1`
    (Lightning's LearningRateMonitor adds a param group's "name" to its line)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]  # DeepSpeed wraps them
        if missing := untrained_parameters(pl_module, optimizers):
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            warn(f"{shown} need(s) gradients but no optimizer holds them, so they will not train: build those layers "
                 "before configure_optimizers runs (in __init__, setup() or configure_model()) and give their "
                 "parameters to an optimizer, or set requires_grad=False")
        if len(optimizers) < 2:
            return
        for optimizer in optimizers:
            groups = optimizer.param_groups
            if len(groups) == 1 and "name" not in groups[0] and (names := module_names(pl_module, optimizer)):
                groups[0]["name"] = "+".join(names)
