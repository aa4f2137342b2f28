"""Which of train.py's LINKED names can be handed from the DataModule to the model, and when.

A DataModule provides a name as a constructor argument, linked while parsing (so --print_config shows it); or as a
property, class attribute, or attribute that its __init__, prepare_data() or setup() sets: each is read off the
DataModule once it exists (jsonargparse's apply_on="instantiate"). A name that is not there yet (a vocabulary size
that setup() computes, or a property reading something setup() makes) is read after the DataModule's prepare_data()
and setup("fit"), run then, as Lightning's documentation does by hand (`dm.prepare_data(); dm.setup("fit");
Model(num_classes=dm.num_classes)`). A name the model's constructor takes but the DataModule provides in none of these
ways is not linked; that gets one warning saying why, instead of the model silently keeping its default; one that
is still missing after setup("fit") stops the run in one line naming it."""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_only

from support.errors import SettingError

WARNED: set[str] = set()  # each unlinkable name is warned about once per process (sweep.py parses many times)


def set_in_init(cls: type, methods: tuple[str, ...] = ("__init__",)) -> set[str]:
    """The attributes `self.NAME = ...` that the `methods` (default: the constructor) of `cls` and of its bases
    assign, read from their source (tuple targets too: `self.a, self.b = a, b`)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        for method in (klass.__dict__.get(name) for name in methods):
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(method))) if method else None
            except (OSError, TypeError, SyntaxError):  # a C constructor (object's) or no source: nothing to read
                continue
            for node in ast.walk(tree) if tree else ():
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
                for target in targets:
                    for leaf in target.elts if isinstance(target, ast.Tuple) else [target]:
                        if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and \
                                leaf.value.id == "self":
                            names.add(leaf.attr)
    return names


SET_UP = "_linked_after_setup"  # on a DataModule whose prepare_data() and setup("fit") ran for a link


def reader(name: str) -> Callable[[Any], Any]:
    """What a link applied at instantiation hands the model: the DataModule's `name`, read after its prepare_data()
    and setup("fit") when it is not there before (once per DataModule: Lightning calls setup() again in fit, as it
    does for a DataModule that a script set up by hand)."""

    def read(data: Any) -> Any:
        try:
            return getattr(data, name)
        except AttributeError:
            if getattr(data, SET_UP, False):
                raise
        # A parse without training (sweep.py, check.py) builds on the meta device: the data is made on the CPU.
        with torch.device("cpu"):
            data.prepare_data()
            data.setup("fit")
        setattr(data, SET_UP, True)
        try:
            return getattr(data, name)
        except AttributeError as err:
            raise SettingError(f"LINKED {name!r}: {type(data).__name__} has no {name!r} even after its prepare_data() "
                               f"and setup('fit') ({err}): set self.{name} in __init__, prepare_data() or setup(), "
                               "or drop it from LINKED in train.py") from None

    return read


@rank_zero_only
def warn_once(message: str) -> None:
    if message not in WARNED:
        WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def links(linked: tuple[str, ...], model_class: type, data_class: type) -> list[tuple[str, str]]:
    """(name, when) for each name in `linked` that the model's constructor takes and the DataModule provides:
    "parse" (constructor argument) or "instantiate" (property, class attribute, attribute set in __init__,
    prepare_data() or setup(): read by `reader`). A name the model takes that the DataModule does not provide is
    warned about, once."""
    model_args = inspect.signature(model_class.__init__).parameters
    data_args = inspect.signature(data_class.__init__).parameters
    found = []
    for name in (name for name in linked if name in model_args):
        if name in data_args:
            found.append((name, "parse"))
        elif hasattr(data_class, name) or name in set_in_init(data_class, ("__init__", "prepare_data", "setup")):
            found.append((name, "instantiate"))
        else:
            default = model_args[name].default
            keeps = "has no default: it must be given" if default is inspect.Parameter.empty else \
                f"keeps its default {name}={default!r}"
            warn_once(f"LINKED {name!r} is not linked: {data_class.__name__} has no property, class attribute, "
                      f"constructor argument or attribute set in __init__, prepare_data() or setup() by that name, so "
                      f"{model_class.__name__} {keeps}; provide it in one of those ways, or drop it from LINKED")
    return found


def link(parser: Any, name: str, when: str) -> None:
    """Links the DataModule's `name` to the model's constructor argument of that name (`when`: from links)."""
    if when == "parse":
        parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="parse")
    else:
        parser.link_arguments("data", f"model.{name}", compute_fn=reader(name), apply_on="instantiate")
