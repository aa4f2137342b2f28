"""Which layers CKA compares, and recording them: the forward hooks (`LayerRecorder`), the layers picked when none
are named (`pick_layers`, `choose_layers`) and the split of named layers into those the model has and those it has
not (`find_layers`), which the monitor (support/cka/monitor.py) runs once the model's setup() and configure_model()
have built every layer. Torch and torchmetrics only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from support.errors import SettingError

__all__ = ["HOW_TO_CHOOSE", "FoundLayers", "LayerOutputError", "LayerRecorder", "choose_layers", "find_layers",
           "model_input", "pick_layers"]

NO_FORWARD = (nn.ModuleList, nn.ModuleDict)  # containers without a forward, hence without an output to record
HOW_TO_CHOOSE = ("choose the layers with --cka.layers='[a, b]' (names as in model.named_modules()) or give the "
                 "model a cka_layers property")
SHOWN_NAMES = 12  # of a model's layers in a message: a ResNet-50 has 150 named modules, one line should not


class LayerOutputError(RuntimeError):
    """A recorded layer gave nothing CKA can use: no output in the last forward, or no tensor of the batch's size."""


def layer_names(model: nn.Module) -> list[str]:
    """The names a layer can be recorded by: every named module but the model itself and the containers."""
    return [name for name, module in model.named_modules() if name and not isinstance(module, NO_FORWARD)]


def some_of(names: Sequence[str]) -> str:
    """`names` for a one-line message: the first SHOWN_NAMES, then how many there are in all."""
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN_NAMES else "") if names else "none"


class LayerRecorder:
    """``with LayerRecorder(model, ["body", "head"]) as rec: model(x); acts = rec.collect()``: the detached outputs
    (the first tensor of a tuple or list, as an LSTM's) of the named submodules (as in ``model.named_modules()``)
    in the last forward, in the order of ``names``. Forward hooks are removed on exit."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        if unknown := [name for name in names if name not in modules]:
            raise SettingError(f"unknown layer name(s) {unknown}; valid names: {layer_names(model)}")
        if containers := [name for name in names if isinstance(modules[name], NO_FORWARD)]:
            raise SettingError(f"layer(s) {containers} are containers (ModuleList/ModuleDict) that have no forward, "
                               "hence no output: name a child module instead")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate layer names in {list(names)}")
        self.names, self._modules = list(names), [modules[name] for name in names]  # fail here, not mid-epoch
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.activations: dict[str, Tensor | str] = {}  # a tensor, or the type name of an output that holds none

    def _hook(self, name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, (tuple, list)):
                output = next((o for o in output if isinstance(o, Tensor)), output)
            self.activations[name] = output.detach() if isinstance(output, Tensor) else type(output).__name__
        return hook  # never raises: a forward pass is not the place to fail; collect() says what is wrong

    def __enter__(self) -> LayerRecorder:
        if self._handles:
            raise RuntimeError("LayerRecorder is already active")
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in zip(self.names, self._modules, strict=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.activations = [], {}

    def collect(self) -> list[Tensor]:
        """The recorded activations in ``names`` order, each a tensor with the same batch size first; clears them
        so a stale batch is never returned twice. Raises LayerOutputError otherwise."""
        if missing := [name for name in self.names if name not in self.activations]:
            raise LayerOutputError(f"no output recorded for layer(s) {missing}: did the forward pass run through "
                                   "them?")
        out, self.activations = [self.activations[name] for name in self.names], {}
        if bad := {n: a if isinstance(a, str) else "a 0-dim tensor" for n, a in zip(self.names, out, strict=True)
                   if not isinstance(a, Tensor) or a.dim() == 0}:
            raise LayerOutputError(f"layer output(s) with no batch dimension to compare: {bad}")
        sizes = {n: a.shape[0] for n, a in zip(self.names, out, strict=True)}
        if len(set(sizes.values())) > 1:
            raise LayerOutputError(f"layer outputs differ in their first (batch) dimension: {sizes}")
        return out


def pick_layers(model: nn.Module) -> list[str]:
    """The layers compared when none are named: the model's children that hold parameters, in registration order,
    each ModuleList / ModuleDict replaced by its own such children; torchmetrics metrics are left out. A model that
    is one block at its top (an MLP in one nn.Sequential, as the skeleton's model.py) has nothing to compare there:
    that block's own layers are taken instead, and so on down."""
    def walk(module: nn.Module, prefix: str) -> list[str]:
        names = []
        for name, child in module.named_children():
            if isinstance(child, Metric) or next(child.parameters(), None) is None:
                continue
            names += walk(child, f"{prefix}{name}.") if isinstance(child, NO_FORWARD) else [prefix + name]
        return names

    names = walk(model, "")
    while len(names) == 1 and (inside := walk(model.get_submodule(names[0]), names[0] + ".")):
        names = inside
    return names


def choose_layers(model: nn.Module, layers: Sequence[str] | None = None) -> tuple[list[str], bool]:
    """(names, named): `layers` if given, else the model's `cka_layers` if it has any, else `pick_layers(model)`;
    `named` tells whether a person chose them (then each is kept if the model has it, see find_layers)."""
    named = layers or getattr(model, "cka_layers", None)
    named = [named] if isinstance(named, str) else named  # cka_layers = "embed": one layer, not five letters
    return (list(named), True) if named else (pick_layers(model), False)


@dataclass(frozen=True)
class FoundLayers:
    """Named layers split by whether they can be recorded: `found` (in the order named, once each), `unknown`
    (no module of that name) and `containers` (a ModuleList / ModuleDict: no forward, no output)."""

    found: list[str]
    unknown: list[str]
    containers: list[str]

    def problem(self, model: nn.Module, where: str) -> str | None:
        """One sentence on the names that cannot be recorded (None if there are none); `where` says who named
        them ("--cka.layers", "MyModel.cka_layers")."""
        parts = [f"{self.unknown}, which {type(model).__name__} does not have after its setup() and "
                 f"configure_model() (its layers: {some_of(layer_names(model))})"] if self.unknown else []
        if self.containers:
            parts.append(f"{self.containers}, a ModuleList/ModuleDict, which has no output (name a layer inside it)")
        return f"{where} names {'; and '.join(parts)}" if parts else None


def find_layers(model: nn.Module, names: Sequence[str]) -> FoundLayers:
    """Split `names` into those LayerRecorder can record on `model` and those it cannot (see FoundLayers)."""
    modules = dict(model.named_modules())
    found, unknown, containers = [], [], []
    for name in dict.fromkeys(names):  # a name given twice is recorded once
        kind = unknown if name not in modules else containers if isinstance(modules[name], NO_FORWARD) else found
        kind.append(name)
    return FoundLayers(found, unknown, containers)


def model_input(batch: object) -> Tensor | None:
    """The input of an (x, y, ...) batch: its first element, if the batch is a tuple or list starting with a tensor."""
    return batch[0] if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor) else None
