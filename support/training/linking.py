"""Which of train.py's LINKED names can be handed from the DataModule to the model, and when.

A DataModule provides a name as a property or class attribute, or as an attribute its constructor sets
(`self.num_classes = 2`): each is read off the DataModule once it exists (jsonargparse's apply_on="instantiate"); or
as a constructor argument, linked while parsing (so --print_config shows it). A name the model's constructor takes
but the DataModule provides in none of these ways is not linked; that gets one warning saying why, instead of the
model silently keeping its default."""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap

from pytorch_lightning.utilities import rank_zero_only

WARNED: set[str] = set()  # each unlinkable name is warned about once per process (sweep.py parses many times)


def set_in_init(cls: type) -> set[str]:
    """The attributes `self.NAME = ...` that the constructors of `cls` and of its bases assign, read from their
    source (tuple targets too: `self.a, self.b = a, b`)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(init))) if init else None
        except (OSError, TypeError, SyntaxError):  # a C constructor (object's) or no source: nothing to read
            continue
        for node in ast.walk(tree) if tree else ():
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                for leaf in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                        names.add(leaf.attr)
    return names


@rank_zero_only
def warn_once(message: str) -> None:
    if message not in WARNED:
        WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def links(linked: tuple[str, ...], model_class: type, data_class: type) -> list[tuple[str, str]]:
    """(name, when) for each name in `linked` that the model's constructor takes and the DataModule provides:
    "instantiate" (property, class attribute, attribute set in its constructor) or "parse" (constructor argument).
    A name the model takes that the DataModule does not provide is warned about, once."""
    model_args = inspect.signature(model_class.__init__).parameters
    data_args = inspect.signature(data_class.__init__).parameters
    found = []
    for name in (name for name in linked if name in model_args):
        if hasattr(data_class, name):
            found.append((name, "instantiate"))
        elif name in data_args:
            found.append((name, "parse"))
        elif name in set_in_init(data_class):
            found.append((name, "instantiate"))
        else:
            default = model_args[name].default
            keeps = "has no default: it must be given" if default is inspect.Parameter.empty else \
                f"keeps its default {name}={default!r}"
            warn_once(f"LINKED {name!r} is not linked: {data_class.__name__} has no property, class attribute, "
                      f"constructor argument or attribute set in its constructor by that name (one set later, in "
                      f"setup(), comes too late), so {model_class.__name__} {keeps}; provide it in one of those "
                      f"ways, or drop it from LINKED")
    return found
