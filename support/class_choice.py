"""A class chosen on the command line starts from its own defaults.

jsonargparse carries every init_arg of the previous class that the new one also takes across a class switch:
`python train.py --optimizer=SGD` trained with AdamW's weight_decay=0.01 (and the template's lr=3e-3) instead of
SGD's own 0 (and 1e-3), and nothing said so. The same held for any class-typed option (--lr_scheduler, a model's
or DataModule's own class arguments). Here, before parsing, each such option that the arguments switch to another
class loses its default: the switch then starts from nothing, i.e. from the new class's own defaults, and the
arguments given with it (--optimizer.momentum=0.9, or init_args in the value) apply on top. An option left alone, or
given the class it already has, keeps the template's defaults (AdamW with lr=3e-3)."""

from __future__ import annotations

import sys
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace


def class_defaults(parser: ArgumentParser) -> dict[str, str]:
    """Each option whose default is a class (a class_path, with init_args), and that class."""
    defaults = parser.get_defaults()
    return {key[: -len(".class_path")]: defaults[key] for key in defaults.keys()
            if key.endswith(".class_path") and isinstance(defaults[key], str)}


def _class_of(value: Any) -> str | None:
    """The class a command-line or dict value names: a (short) class name, or a dict/YAML with a class_path."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return None
    if isinstance(value, (dict, Namespace)) and isinstance(value.get("class_path"), str):
        return value["class_path"]
    return value if isinstance(value, str) and value and not value.startswith(".") else None


def given_class(args: list[str] | dict[str, Any] | Namespace, option: str) -> str | None:
    """The class the arguments give to `option` (dotted, e.g. "optimizer" or "model.encoder"), the last one given."""
    if isinstance(args, (dict, Namespace)):
        node: Any = args
        for part in option.split("."):
            if not isinstance(node, (dict, Namespace)) or part not in node:
                return None
            node = node[part]
        return _class_of(node)
    found = None
    for index, arg in enumerate(args):
        if arg.startswith(f"--{option}="):
            found = _class_of(arg.split("=", 1)[1])
        elif arg == f"--{option}" and index + 1 < len(args):
            found = _class_of(args[index + 1])
    return found


def same_class(given: str, class_path: str) -> bool:
    return given == class_path or class_path.endswith(f".{given}")


def start_switched_classes_from_their_defaults(parser: ArgumentParser, args: Any) -> None:
    """Drops the default of every class option that `args` switch to another class (see the module's docstring)."""
    args = sys.argv[1:] if args is None else args
    for option, default in class_defaults(parser).items():
        given = given_class(args, option)
        if given is not None and not same_class(given, default):
            parser.set_defaults({option: None})
