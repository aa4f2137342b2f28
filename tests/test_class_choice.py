"""A class chosen on the command line (or in a dict, or a sweep value) starts from its own defaults: jsonargparse
carries the previous class's matching init_args across a switch (support/training/class_choice.py)."""

from __future__ import annotations

import inspect

import pytest
import torch

import train
from support.training import class_choice

# The example model leaves its optimizer to the CLI (--optimizer); a model with its own configure_optimizers has none.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.example_model]


def own_defaults(cls: type) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def optimizer_of(args) -> dict:
    return train.parse_config(args).as_dict()["optimizer"]


@pytest.mark.parametrize("args, cls", [
    (["--optimizer=SGD"], torch.optim.SGD),
    (["--optimizer=Adam"], torch.optim.Adam),
    (["--optimizer", "torch.optim.RMSprop"], torch.optim.RMSprop),
    ({"optimizer": "SGD"}, torch.optim.SGD),
    ({"optimizer": {"class_path": "torch.optim.Adam"}}, torch.optim.Adam),
])
def test_a_switched_optimizer_starts_from_its_own_defaults(args, cls: type) -> None:
    optimizer = optimizer_of(args)
    assert optimizer["class_path"] == f"torch.optim.{cls.__qualname__}"
    defaults = own_defaults(cls)
    assert optimizer["init_args"]["weight_decay"] == defaults["weight_decay"] == 0  # not AdamW's 0.01
    assert optimizer["init_args"]["lr"] == defaults["lr"]  # not the template's 3e-3 for AdamW


def test_arguments_given_with_the_switch_apply_and_the_default_class_keeps_the_templates_defaults() -> None:
    sgd = optimizer_of(["--optimizer=SGD", "--optimizer.momentum=0.9"])["init_args"]
    assert (sgd["momentum"], sgd["weight_decay"]) == (0.9, 0)
    sgd = optimizer_of(["--optimizer={'class_path': 'torch.optim.SGD', 'init_args': {'momentum': 0.9}}"])["init_args"]
    assert (sgd["momentum"], sgd["weight_decay"]) == (0.9, 0)
    adamw = optimizer_of(["--optimizer=AdamW", "--optimizer.betas=[0.8,0.9]"])["init_args"]
    assert (adamw["lr"], adamw["weight_decay"], tuple(adamw["betas"])) == (3e-3, 0.01, (0.8, 0.9))
    assert optimizer_of(["--optimizer.lr=0.01"])["init_args"]["lr"] == 0.01


def test_the_class_given_is_read_from_every_form() -> None:
    assert class_choice.given_class(["--optimizer=SGD", "--optimizer.lr=1"], "optimizer") == "SGD"
    assert class_choice.given_class(["--optimizer.lr=1"], "optimizer") is None
    assert class_choice.given_class(["--model.encoder", "{class_path: a.B}"], "model.encoder") == "a.B"
    assert class_choice.given_class({"model": {"encoder": {"class_path": "a.B"}}}, "model.encoder") == "a.B"
    assert class_choice.same_class("SGD", "torch.optim.SGD") and not class_choice.same_class("SGD", "torch.optim.ASGD")
    assert class_choice.given_options(["--optimizer=SGD", "--a.b", "1"]) == {"optimizer", "a.b"}
    assert class_choice.given_options({"model": {"encoder": "x"}}) == {"model", "model.encoder"}
