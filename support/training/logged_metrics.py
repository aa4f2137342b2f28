"""Which metric names a LightningModule logs, read from its source: what sweep.py checks a sweep's metric against.

Only the class itself and the classes it inherits from (other than Lightning's and torch's) are read, not the
rest of their files: a name that another class in model.py logs (an old model kept for comparison) is not one that
the model in use logs."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap

FRAMEWORKS = ("pytorch_lightning", "lightning", "torch", "builtins")  # their log calls are not the model's metrics


def own_classes(model_class: type) -> list[type]:
    """The model class and the classes it inherits from that are not Lightning's, torch's or Python's."""
    return [cls for cls in model_class.__mro__ if cls.__module__.split(".")[0] not in FRAMEWORKS]


def logged_metric_names(model_class: type) -> tuple[set[str], list[re.Pattern[str]], bool]:
    """The literal names of the `self.log("name", ...)` calls in the model's classes, the patterns of f-string
    names (`f"{stage}/loss"` matches val/loss), and whether some log call names its metrics in a way that only
    running tells (a variable, log_dict), or some class's source cannot be read."""
    names: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    unknowable = False
    for cls in own_classes(model_class):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):  # defined in a notebook cell or compiled: nothing to read
            unknowable = True
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr == "log_dict":
                unknowable = True
            if node.func.attr != "log" or not node.args:
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
            elif isinstance(first, ast.JoinedStr):  # an f-string: its literal parts, anything in between
                parts = [re.escape(p.value) if isinstance(p, ast.Constant) else ".+" for p in first.values]
                patterns.append(re.compile("".join(parts)))
            else:
                unknowable = True
    return names, patterns, unknowable


def metric_problem(metric: str, model_class: type) -> tuple[str, bool] | None:
    """Why `metric` may never be logged, and whether that is certain (an error) or only unverifiable (a warning)."""
    names, patterns, unknowable = logged_metric_names(model_class)
    if metric in names or any(p.fullmatch(metric) for p in patterns):
        return None
    logged = ", ".join(sorted(names) + [p.pattern.replace("\\", "") for p in patterns]) or "nothing found"
    if unknowable:
        return f"{metric!r} is not among the names {model_class.__name__}'s source logs ({logged}); it may be logged " \
               "under a name only a run shows", False
    return f"{metric!r} is never logged; {model_class.__name__} logs {logged}", True
